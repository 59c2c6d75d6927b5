"""Mutants of monitor_container and the master's signal handling (SPEC §2 rule 8, §7)."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket

from kit.contract import Context, SignalChannel, WaitStatus
from mutants.zoo.base import Mutant
from reference_engines.minimal.engine import FORWARDED_SIGNALS, MONITOR_POLL


def _reap(pid: int) -> int | None:
    """The container's wait status once it exited (reaping only it), else None."""
    try:
        wpid, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        raise ChildProcessError(
            errno.ECHILD, f"container process {pid} was reaped by someone else"
        ) from None
    return status if wpid == pid else None


class MonitorForwardsNothing(Mutant):
    slug = "monitor-forwards-nothing"
    bug = "monitor_container waits for the container but forwards no signal to it"
    killed_by = ("SIG-002",)
    flows = ("root",)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            signals.get(timeout=MONITOR_POLL)
            status = _reap(pid)
            if status is not None:
                return status


class MonitorTwoSlotBuffer(Mutant):
    slug = "monitor-two-slot-buffer"
    bug = (
        "monitor_container queues the signals to forward in a two-slot buffer that it never "
        "empties (like upstream's channel): from the third signal on, nothing is forwarded"
    )
    killed_by = ("SIG-002",)
    mechanism = "partial"
    flows = ("root",)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        buffered: list[int] = []
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS and len(buffered) < 2:
                buffered.append(sig)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            status = _reap(pid)
            if status is not None:
                return status


class MonitorReturnsTheExitCode(Mutant):
    slug = "monitor-returns-exit-code"
    bug = (
        "monitor_container returns the container's exit code instead of its wait status "
        "(which the kit then reads as 'killed by signal 7')"
    )
    killed_by = ("SIG-003", "EXIT-001")
    flows = ("root",)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        return os.waitstatus_to_exitcode(super().monitor_container(pid, signals))


class MonitorReportsSignalAsExitCode(Mutant):
    slug = "monitor-signal-as-exit-code"
    bug = (
        "monitor_container reports a container killed by signal N as having exited with "
        "code N, so the run exits N instead of 128 + N"
    )
    killed_by = ("EXIT-002",)
    flows = ("root",)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        status = super().monitor_container(pid, signals)
        if os.WIFSIGNALED(status):
            return os.WTERMSIG(status) << 8
        return status


class MasterIgnoresSIGCHLD(Mutant):
    slug = "master-ignores-sigchld"
    bug = (
        "create_container sets SIGCHLD to SIG_IGN in the master 'to avoid zombies': the "
        "kernel then sends no SIGCHLD at all and reaps the container itself"
    )
    killed_by = ("SIG-005",)
    flows = ("root",)

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal(ctypes.c_int(signal.SIGCHLD), ctypes.c_void_p(1))  # SIG_IGN, any thread
        super().create_container(ctx, pid, rpc_conn)


MUTANTS = (
    MonitorForwardsNothing,
    MonitorTwoSlotBuffer,
    MonitorReturnsTheExitCode,
    MonitorReportsSignalAsExitCode,
    MasterIgnoresSIGCHLD,
)
