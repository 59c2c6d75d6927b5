"""Mutants that were known survivors until the kit learned to see their bug: an engine
calling its own hook (the kit now records such calls), a monitor reaping other children
(the master's sentinel child), capabilities kept after an RPC method (credentials recorded
around every method), a master thread joining the container's network namespace (per-thread
namespaces in snapshots).

A mutant whose bug the suite cannot see yet carries the reason in ``gap``: the kill matrix
reports it as a known survivor and fails the day it is killed after all (then remove the
``gap``).
"""

from __future__ import annotations

import os
import socket

from kit.contract import Context, SignalChannel, WaitStatus
from kit.system import current
from mutants.zoo.base import Mutant
from reference_engines.minimal import ReferenceRPC
from reference_engines.minimal.engine import FORWARDED_SIGNALS, MONITOR_POLL


class PostStartCalledTwice(Mutant):
    slug = "post-start-twice"
    bug = (
        "monitor_container calls post_start_process again once the container exited, to "
        "'finish' the start: post_start_process runs twice"
    )
    killed_by = ("ORDER-009",)
    flows = ("root",)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        status = super().monitor_container(pid, signals)
        self.post_start_process(None, pid)  # type: ignore[arg-type]  # monitor has no ctx
        return status


class MonitorReapsAnyChild(Mutant):
    slug = "monitor-reaps-any-child"
    bug = (
        "monitor_container reaps with waitpid(-1) and takes the first status it gets for "
        "the container's (it forwards signals like the reference)"
    )
    killed_by = ("SIG-004",)
    flows = ("root",)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:  # the reference's loop, but reaping any child
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            wpid, status = os.waitpid(-1, os.WNOHANG)
            if wpid != 0:
                return status  # taken for the container's, whoever it was


class CapabilityRaisingRPC(ReferenceRPC):
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        _effective, permitted, inheritable = current().capabilities()
        current().set_capabilities(permitted, permitted, inheritable)  # never lowered again
        super().mount(source, target, fstype, flags, data)


class RPCMethodKeepsCapabilities(Mutant):
    slug = "rpc-method-keeps-caps"
    bug = (
        "the RPC method mount raises every permitted capability and does not lower them "
        "before returning"
    )
    killed_by = ("PRIV-RPC-004",)
    flows = ("suid",)
    rpc = CapabilityRaisingRPC


class MasterJoinsTheContainersNetwork(Mutant):
    slug = "master-joins-container-net"
    bug = (
        "create_container joins the container's network namespace on its own thread to "
        "configure it from the master, and stays there"
    )
    killed_by = ("NS-003",)
    flows = ("root",)

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        current().setns("net", f"/proc/{pid}/ns/net")
        super().create_container(ctx, pid, rpc_conn)


MUTANTS = (
    PostStartCalledTwice,
    MonitorReapsAnyChild,
    RPCMethodKeepsCapabilities,
    MasterJoinsTheContainersNetwork,
)
