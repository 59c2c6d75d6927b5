"""Blind round 5, area "exit": correct engines whose exit path differs from the reference's.

Each engine is the reference engine with a monitor loop, a signal set or a cleanup that
SPEC.md allows but the reference does not use (SPEC §2 rules 6-10 and the error table, §7).
They were written from SPEC.md alone, without reading the conformance suite: each should
pass every check in every flow, so any failure the suite reports for them is a false failure.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import socket
import tempfile
import threading

from kit.contract import Context, SignalChannel, WaitStatus
from reference_engines.minimal.engine import FORWARDED_SIGNALS, MONITOR_POLL, ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC

__all__ = [
    "ForwardsMoreSignals",
    "PidfdMonitor",
    "SigchldDrivenMonitor",
    "StateFileCleanup",
    "ThreadedWaitMonitor",
]


def _forward(pid: int, sig: int | None, forwarded: frozenset[int]) -> None:
    """Send ``sig`` to the container if it is one of ``forwarded``; a container that is
    already gone is collected by the wait that follows."""
    if sig is not None and sig in forwarded:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_status(info: os.waitid_result) -> WaitStatus:
    """The waitpid(2)-style wait status of a waitid(2) result of an exited child."""
    if info.si_code == os.CLD_EXITED:
        return (info.si_status & 0xFF) << 8
    if info.si_code == os.CLD_KILLED:
        return info.si_status & 0x7F
    if info.si_code == os.CLD_DUMPED:
        return (info.si_status & 0x7F) | 0x80
    raise ValueError(f"waitid: si_code {info.si_code} is not an exit")


class PidfdMonitor(ReferenceEngine):
    """monitor_container watches a pidfd of the container and reaps it with
    ``waitid(P_PIDFD)``, building the wait status from si_code and si_status.

    SPEC §1: monitor_container "blocks until the container exits, forwarding signals" and
    returns a wait status; §7: it "reaps only the container pid". A pidfd names exactly the
    container (no pid reuse, no other child), and the status it returns is the one waitpid
    would have returned: exit code in the high byte, signal (and core flag) in the low one.
    """

    engine_name = "blind5-exit-ok-pidfd-monitor"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        pidfd = os.pidfd_open(pid)
        try:
            exited = select.poll()
            exited.register(pidfd, select.POLLIN)
            while True:
                if exited.poll(0):  # readable once the container has exited
                    info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
                    if info is not None:
                        return wait_status(info)
                # SIGCHLD comes on the channel too, so the exit wakes this wait.
                _forward(pid, signals.get(timeout=MONITOR_POLL), FORWARDED_SIGNALS)
        finally:
            os.close(pidfd)  # ours: opened above


class ThreadedWaitMonitor(ReferenceEngine):
    """monitor_container reaps the container with a blocking ``waitpid(pid, 0)`` on a
    helper thread, while its own thread forwards signals until the helper reports.

    SPEC §7: the monitor "forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 to the container,
    reaps only the container pid, and returns its wait status". The blocking wait is the
    classic shape of Go runtimes (a goroutine in ``Wait4`` beside the signal loop); the
    helper is joined before the hook returns, so no thread of the engine outlives it.
    """

    engine_name = "blind5-exit-ok-threaded-wait"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        result: queue.SimpleQueue[WaitStatus | BaseException] = queue.SimpleQueue()

        def reap() -> None:
            try:
                result.put(os.waitpid(pid, 0)[1])  # this pid only, never -1
            except BaseException as exc:  # handed to the monitor's thread
                result.put(exc)

        waiter = threading.Thread(target=reap, name="blind5-reaper", daemon=True)
        waiter.start()
        while True:
            _forward(pid, signals.get(timeout=MONITOR_POLL), FORWARDED_SIGNALS)
            try:
                outcome = result.get_nowait()
            except queue.Empty:
                continue
            waiter.join()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome


class ForwardsMoreSignals(ReferenceEngine):
    """monitor_container forwards SIGQUIT, SIGWINCH and SIGCONT as well as the five signals
    SPEC §7 names.

    SPEC §7: "A conformant `monitor_container` forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/
    SIGUSR2 to the container": a floor, not a ceiling. Container runtimes' signal proxies
    (runc, docker's sig-proxy) pass on more, e.g. SIGQUIT for a thread dump and SIGWINCH for
    a terminal resize. Every other signal (SIGCHLD above all) is still not forwarded.
    """

    engine_name = "blind5-exit-ok-forwards-more-signals"
    rpc_methods = ReferenceRPC

    FORWARDED = FORWARDED_SIGNALS | {signal.SIGQUIT, signal.SIGWINCH, signal.SIGCONT}

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            _forward(pid, signals.get(timeout=MONITOR_POLL), self.FORWARDED)
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class SigchldDrivenMonitor(ReferenceEngine):
    """monitor_container sleeps on the signal channel with no timeout and looks for the
    container's exit only when a SIGCHLD arrives.

    SPEC §7: "The master turns every signal it receives into an entry on the `signals`
    channel", and §10: "the kit's channel must not lose SIGCHLD or a forwarded signal". So
    the container's exit always wakes this loop: no polling is needed. A SIGCHLD that is not
    the container's exit (another child, a stop) finds ``waitpid(pid, WNOHANG)`` returning
    0, and the loop waits on.
    """

    engine_name = "blind5-exit-ok-sigchld-driven"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get()  # no timeout: every SIGCHLD comes through here
            if sig != signal.SIGCHLD:
                _forward(pid, sig, FORWARDED_SIGNALS)
                continue
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class StateFileCleanup(ReferenceEngine):
    """The master keeps a state file for the container (written by create_container,
    updated by post_start_process) and cleanup_container records the outcome in it and
    removes it, whatever part of the setup happened.

    SPEC §1: cleanup_container "tears everything down; must tolerate partial setup", and
    §2 rule 7: it runs once "with the first fatal error (or none) and the wait status".
    The file lives in the run's temporary directory, on the host, as the master's (like the
    bind-rootfs example's root directory), so cleanup must remove it: it copes with a file
    never made (create_container failed or never ran), with no status, and with a second call.
    post_start_process reads the payload's start time and copes with a payload already gone.
    """

    engine_name = "blind5-exit-ok-state-file-cleanup"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        self._state_path: str | None = None  # master only

    def _write_state(self, **fields: object) -> None:
        if self._state_path is None:
            return
        with open(self._state_path, "w") as f:
            json.dump({"container_id": self.common.container_id, **fields}, f)

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        fd, self._state_path = tempfile.mkstemp(prefix="blind5-ok-state-", suffix=".json")
        os.close(fd)
        self._write_state(pid=pid, phase="creating")
        super().create_container(ctx, pid, rpc_conn)
        self._write_state(pid=pid, phase="created")

    def post_start_process(self, ctx: Context, pid: int) -> None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # starttime is field 22; fields 3+ follow the last ')' (comm may hold spaces)
                start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        except (FileNotFoundError, ProcessLookupError):
            start_ticks = None  # the payload has exited already, and was reaped
        self._write_state(pid=pid, phase="running", start_ticks=start_ticks)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        path = self._state_path
        if path is None:
            return  # create_container never made it (or this is a second call)
        code = None if status is None else os.waitstatus_to_exitcode(status)
        why = None if fatal is None else str(fatal)
        self._write_state(phase="stopped", exit_code=code, fatal=why)
        self._state_path = None
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
