"""Mutants found by writing engines blind, round 2, from SPEC §1, §2, §6, §7 and §8: the order
of hooks, the RPC connection, signals and the wait status (tests/blind2_order.py)."""

from __future__ import annotations

import os
import signal
import socket
import time

from kit.contract import Context, SignalChannel, WaitStatus
from kit.rpc import RPCClient
from mutants.zoo.base import Mutant
from reference_engines.minimal.engine import FORWARDED_SIGNALS, MONITOR_POLL


class MonitorShellStatus(Mutant):
    slug = "monitor-shell-status"
    bug = (
        "monitor_container returns a container killed by signal N as the wait status of one "
        "that exited 128+N (the shell's convention): the run's exit code is the same number, "
        "but the status is not the container's and its signal cannot be re-raised"
    )
    killed_by = ("SIG-003",)
    mechanism = "other-field"
    flows = ("root", "userns")

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        status = super().monitor_container(pid, signals)
        if os.WIFSIGNALED(status):
            return ((128 + os.WTERMSIG(status)) & 0xFF) << 8
        return status


class CreateKeepsRpcDup(Mutant):
    slug = "create-keeps-rpc-dup"
    bug = (
        "create_container keeps an RPC client for cleanup_container on socket.fromfd of "
        "rpc_conn, a duplicate: the kit's close is not the last, so the RPC server never "
        "sees the connection close and stage 2 cannot start"
    )
    killed_by = ("RPC-001",)
    flows = ("root", "suid")

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg = self.reference_config()
        sock = socket.fromfd(rpc_conn.fileno(), rpc_conn.family, rpc_conn.type)
        self.kept = RPCClient(sock, self.common.engine_name)
        if cfg.hostname is not None:
            self.kept.sethostname(name=cfg.hostname)
        self.prepare_rootfs(self.kept, cfg)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        kept = getattr(self, "kept", None)
        if kept is not None:
            kept.close()


class CreateHelperHoldsRpc(Mutant):
    slug = "create-helper-holds-rpc"
    bug = (
        "create_container forks a watcher process that inherits rpc_conn and lives until "
        "cleanup_container kills it: its copy keeps the RPC connection open, although it "
        "makes no call"
    )
    killed_by = ("RPC-001",)
    mechanism = "child-process"
    flows = ("root", "fakeroot")

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        child = os.fork()
        if child == 0:
            time.sleep(60)  # the watcher's work; killed by cleanup_container
            os._exit(0)
        self.watcher = child

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        watcher = getattr(self, "watcher", None)
        if watcher is not None:
            os.kill(watcher, signal.SIGKILL)
            os.waitpid(watcher, 0)


class MonitorTakesSignalsItself(Mutant):
    slug = "monitor-takes-signals-itself"
    bug = (
        "monitor_container takes the signals to forward off the master itself with "
        "sigtimedwait (they are blocked in its thread) instead of reading the signals "
        "channel: it races the kit, and what it wins never reaches the channel or the ledger"
    )
    killed_by = ("SIG-002",)
    mechanism = "other-field"
    flows = ("root", "suid")

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            info = signal.sigtimedwait(FORWARDED_SIGNALS, MONITOR_POLL)
            if info is not None:
                try:
                    os.kill(pid, info.si_signo)
                except ProcessLookupError:
                    pass
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


MUTANTS: tuple[type[Mutant], ...] = (
    MonitorShellStatus,
    CreateKeepsRpcDup,
    CreateHelperHoldsRpc,
    MonitorTakesSignalsItself,
)
