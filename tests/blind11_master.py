"""Five buggy engines about the master's life, written from SPEC.md alone.

Each subclasses one of the correct engines of :mod:`blind11_master_correct` and breaks
exactly one rule of SPEC §2 (rules 6-8, the error table) or §7, the way a plausible author
would. Every run still completes; the first line of each docstring names the bug.
"""

from __future__ import annotations

import os
import select
import signal

import blind11_master_correct as correct

from kit.rpc import RPCClient


class SignalDeathAsExitCode(correct.WaitidLoop):
    """Breaks SPEC §2 rule 8 / §7: a container killed by signal N is returned as "exited N" (no 128+N).

    The author decodes waitid's siginfo by shifting ``si_status`` into the exit-code byte
    whatever ``si_code`` says: right for CLD_EXITED, but for CLD_KILLED/CLD_DUMPED
    ``si_status`` is the signal number, so a payload killed by SIGSEGV makes the run exit 11
    instead of 139.
    """  # noqa: E501

    engine_name = "blind11-master-sigascode"

    @staticmethod
    def _status_from_siginfo(info: os.waitid_result) -> int:
        # waitid already split the status for us: put the code back where waitpid has it.
        return (info.si_status & 0xFF) << 8


class InterruptToProcessGroup(correct.PidfdPoll):
    """Breaks SPEC §7: SIGINT is sent to process group ``pid`` (which does not exist), so it never reaches the container.

    The author imitates a terminal, where Ctrl-C goes to the foreground job: SIGINT is sent
    with ``killpg(pid, SIGINT)``. The container is not a process-group leader, so the call
    fails with ESRCH, which the forwarder takes for "the container is already gone" and
    ignores. SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 are forwarded correctly.
    """  # noqa: E501

    engine_name = "blind11-master-killpg"

    def _send(self, fd: int, pid: int, sig: int) -> None:
        if sig == signal.SIGINT:
            try:
                os.killpg(pid, sig)  # the whole job, as a terminal would
            except ProcessLookupError:
                pass  # gone already
            return
        super()._send(fd, pid, sig)


class ReapAnyChild(correct.ThreadedWait):
    """Breaks SPEC §7 ("reaps only the container pid"): the helper waits with wait4(-1) and reaps every child of the master.

    The author wants no zombie left behind by helpers and so waits for *any* child, looping
    until the container's pid comes back; each other child of the master that has exited
    (the kit's own, such as its sentinel) is reaped and its status thrown away. The wait
    status returned for the container is right.
    """  # noqa: E501

    engine_name = "blind11-master-anychild"

    def _reaper(self, pid: int, box) -> None:
        try:
            while True:
                wpid, status, _ = os.wait4(-1, 0)
                if wpid == pid:
                    box.put(("status", status))
                    return
                # some helper of ours: reaped, keep waiting for the container
        except BaseException as exc:
            box.put(("error", exc))


class ReturnsOnceSignalled(correct.PidfdPoll):
    """Breaks SPEC §7 (block until the container exits, return its wait status): after forwarding a terminating signal the monitor returns "killed by it" after a short grace, while the container still runs.

    The author assumes SIGINT/SIGTERM/SIGHUP end the container: once forwarded, the monitor
    gives it GRACE seconds and then returns the raw status "killed by that signal" without
    having seen or reaped the container. A payload that traps the signal and takes longer
    to exit is still running when monitor_container returns; the run exits 128+signal
    instead of the payload's own code.
    """  # noqa: E501

    engine_name = "blind11-master-early"

    GRACE = 0.5
    TERMINATING = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

    def monitor_container(self, pid, signals):
        fd = os.pidfd_open(pid)
        with self._pidfd_lock():
            self._pidfd = fd
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            sig = signals.get(timeout=0)
            while sig is not None:
                if sig in correct.FORWARDED:
                    self._send(fd, pid, sig)
                    if sig in self.TERMINATING and not poller.poll(int(self.GRACE * 1000)):
                        # it has been told to stop: report it stopped (pidfd left to cleanup)
                        return sig
                sig = signals.get(timeout=0)
            if poller.poll(self.POLL_MS):
                break
        _, status = os.waitpid(pid, 0)
        self._close_pidfd()
        return status


class SwallowsCreateError(correct.WaitidLoop):
    """Breaks SPEC §2's error table (create_container fails → cleanup with "container creation failed", stage 2 never starts, exit 255): a failed RPC in create_container is logged and ignored.

    The author treats the hostname as cosmetic: an ``OSError`` from the ``sethostname`` RPC
    (e.g. EINVAL for a name longer than 64 bytes) is printed and swallowed, so the container
    starts half-configured and the run exits with the payload's code.
    """  # noqa: E501

    engine_name = "blind11-master-swallow"

    def create_container(self, ctx, pid, rpc_conn) -> None:
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        try:
            rpc.sethostname(name=self.common.engine_config.hostname)
        except OSError as exc:
            print(f"{self.common.engine_name}: warning: hostname not set: {exc}", flush=True)
