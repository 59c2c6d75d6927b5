"""Mutants found by writing engines blind from SPEC §2's error paths, §6, §7 and §8: bugs that
show only in some runs (a failure, a forwarded signal, a payload killed by a signal)."""

from __future__ import annotations

import os
import signal
import socket
import time

from kit.contract import Context, SignalChannel, WaitStatus
from kit.rpc import RPCClient
from kit.system import linux
from mutants.zoo.base import Mutant
from reference_engines.minimal import ReferenceRPC
from reference_engines.minimal.engine import FORWARDED_SIGNALS, MONITOR_POLL


def _take_saved_root() -> None:
    """seteuid(0) when the saved uid allows it (suid, hybrid); elsewhere nothing to take."""
    if os.geteuid() != 0:
        try:
            os.seteuid(0)
        except OSError:
            pass  # userns, fakeroot: no saved uid 0 to take back


class CleanupEuidRootOnError(Mutant):
    slug = "cleanup-euid-root-on-error"
    bug = (
        "after a fatal error cleanup_container takes its saved uid 0 back as effective uid "
        "(to force-remove what is left, as root) and returns with it"
    )
    killed_by = ("PRIV-MASTER-001", "PRIV-MASTER-002")
    mechanism = "partial"
    flows = ("suid", "hybrid")

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        if fatal is not None:
            _take_saved_root()


class MonitorEuidRootWhenForwarding(Mutant):
    slug = "monitor-euid-root-when-forwarding"
    bug = (
        "monitor_container takes its saved uid 0 back as effective uid before it forwards a "
        "signal (to be allowed to signal any container) and keeps it"
    )
    killed_by = ("PRIV-MASTER-001", "PRIV-MASTER-002")
    mechanism = "partial"
    flows = ("suid", "hybrid")

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                _take_saved_root()
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class MonitorNeverReaps(Mutant):
    slug = "monitor-never-reaps"
    bug = (
        "monitor_container peeks at the container's exit with WNOWAIT and returns the wait "
        "status rebuilt from it, leaving the container unreaped"
    )
    killed_by = ("SIG-004",)
    mechanism = "other-field"
    flows = ("root", "fakeroot")

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None and info.si_pid == pid:
                if info.si_code == os.CLD_EXITED:
                    return (info.si_status & 0xFF) << 8
                return info.si_status | (0x80 if info.si_code == os.CLD_DUMPED else 0)


class MonitorForwardsOncePerKind(Mutant):
    slug = "monitor-forwards-once-per-kind"
    bug = (
        "monitor_container forwards each kind of signal once per run and drops the later "
        "ones (so that a second SIGTERM cannot interrupt the container's shutdown)"
    )
    killed_by = ("SIG-002",)
    mechanism = "partial"
    flows = ("root", "hybrid")

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        sent: set[int] = set()
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS and sig not in sent:
                sent.add(sig)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class _PayloadCheckKeepsCaps(ReferenceRPC):
    def payload_exists(self, path: str) -> bool:
        """Whether the payload is in the container's root, looked up with every permitted
        capability raised, and (the bug) lowered again only when it is there."""
        eff, perm, inh = linux.capget()
        try:
            linux.capset(perm, perm, inh)
        except OSError:
            pass
        os.stat(self._host_path(path, "payload"))
        linux.capset(eff, perm, inh)
        return True


class RpcPayloadCheckKeepsCaps(Mutant):
    slug = "rpc-payload-check-keeps-caps"
    bug = (
        "an RPC method that looks for the payload with every permitted capability raised "
        "lowers them only when the payload is there: a run whose payload is missing leaves the "
        "RPC server with them"
    )
    killed_by = ("PRIV-RPC-002", "PRIV-RPC-004")
    mechanism = "partial"
    flows = ("suid", "hybrid")
    rpc = _PayloadCheckKeepsCaps

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        try:
            rpc.payload_exists(path=self.reference_config().argv[0])
        except OSError:
            pass  # stage 2 reports a missing payload better
        super().create_container(ctx, pid, rpc_conn)


class MonitorKillsAfterGrace(Mutant):
    slug = "monitor-kills-after-grace"
    bug = (
        "monitor_container forwards SIGTERM and then SIGKILLs the container after a 10 s "
        "grace period ('docker stop'), although the container handles SIGTERM and stays"
    )
    killed_by = ("SIG-002",)
    mechanism = "other-field"
    flows = ("root",)
    gap = (
        "only a payload that outlives a forwarded SIGTERM by more than the grace period shows "
        "the SIGKILL in its exit; the signals payload exits as soon as every signal arrived "
        "twice, and a run that waits longer than any grace an engine may choose is not one a "
        "suite can afford"
    )
    GRACE = 10.0

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        deadline: float | None = None
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                if sig == signal.SIGTERM and deadline is None:
                    deadline = time.monotonic() + self.GRACE
            if deadline is not None and time.monotonic() >= deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = None
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


MUTANTS: tuple[type[Mutant], ...] = (
    CleanupEuidRootOnError,
    MonitorEuidRootWhenForwarding,
    MonitorNeverReaps,
    MonitorForwardsOncePerKind,
    RpcPayloadCheckKeepsCaps,
    MonitorKillsAfterGrace,
)
