"""Blind round 5, area "exit": buggy engines for wait status, exit code, signals and cleanup.

Each engine is the reference engine (or its bind-rootfs example) with one mistake an engine
author could plausibly make in the master's exit path: SPEC §2 rules 6-10 and the error table,
and §7 (signals and exit). They were written from SPEC.md alone, without reading the
conformance suite; each docstring names the SPEC sentence the engine breaks and the runs in
which the mistake shows (every run, a failing payload, a payload killed by a signal, a
forwarded signal, an exec failure, or a create_container that failed part-way).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection

from kit.contract import Context, SignalChannel, WaitStatus
from reference_engines.bind_rootfs.engine import BindRootfsEngine
from reference_engines.bind_rootfs.rpc import BindRootfsRPC
from reference_engines.minimal.engine import (
    FORWARDED_SIGNALS,
    MONITOR_POLL,
    ReferenceConfig,
    ReferenceEngine,
)
from reference_engines.minimal.rpc import ReferenceRPC

__all__ = [
    "AnySigchldIsExit",
    "AssumesStopKills",
    "CleanupFromMonitor",
    "CleanupNeedsRootDir",
    "CleanupReraisesFatal",
    "CoalescesSignals",
    "ForkExecShim",
    "ForwardsIntTermOnly",
    "PostStartFromCreate",
    "PriorityInPostStart",
    "ReapsAnyChild",
    "ReturnsExitCode",
    "StartReturnsOnExecError",
    "WaitidIgnoresSiCode",
]


def _forward(pid: int, sig: int | None, forwarded: Collection[int]) -> None:
    """Send ``sig`` to the container if it is one of ``forwarded`` (a gone container is
    fine: the wait that follows collects it)."""
    if sig is not None and sig in forwarded:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _reaped(pid: int) -> WaitStatus | None:
    """The container's wait status if it has exited (reaping only it), else None."""
    wpid, status = os.waitpid(pid, os.WNOHANG)
    return status if wpid == pid else None


# --- what monitor_container returns ----------------------------------------------------------


class ReturnsExitCode(ReferenceEngine):
    """monitor_container returns the container's exit code instead of its raw wait status.

    SPEC §1: "`monitor_container(pid, signals)` → wait status … blocks until the container
    exits, forwarding signals" and §2 rule 8: "The run's exit code equals the payload's (or
    128+signal when it was killed by a signal)". The author decoded the status once too
    often (``os.waitstatus_to_exitcode``), as if the hook returned an exit code. Invisible
    when the payload exits 0 (status and code are both 0); a payload that exits 3 returns 3,
    which as a wait status reads "killed by signal 3" (run exits 131, cleanup_container gets
    status 3); a payload killed by SIGTERM returns -15, which is no wait status at all.
    """

    engine_name = "blind5-exit-returns-exit-code"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        status = super().monitor_container(pid, signals)
        # Bug: "the starter wants the container's exit code".
        return os.waitstatus_to_exitcode(status)


class WaitidIgnoresSiCode(ReferenceEngine):
    """monitor_container waits with waitid and rebuilds the wait status from si_status
    alone, as if the container always exited normally.

    SPEC §7: "A conformant `monitor_container` … returns its wait status. The run exits with
    the container's code, or re-raises its signal", and §2 rule 8 (128+signal when killed).
    For CLD_KILLED, waitid's si_status is the signal number, not an exit code; this engine
    encodes it as ``si_status << 8`` regardless of si_code, so a payload killed by SIGTERM
    is reported as "exited with code 15" (run exits 15, not 143). Normal exits, zero or not,
    are right: it shows only in runs whose payload dies of a signal.
    """

    engine_name = "blind5-exit-waitid-si-status"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            _forward(pid, signals.get(timeout=MONITOR_POLL), FORWARDED_SIGNALS)
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
            if info is not None:
                # Bug: si_code (CLD_EXITED / CLD_KILLED / CLD_DUMPED) is never looked at.
                return (info.si_status & 0xFF) << 8


class AssumesStopKills(ReferenceEngine):
    """After forwarding SIGTERM or SIGINT, monitor_container returns "killed by that signal"
    at once instead of waiting for the container to exit.

    SPEC §1: monitor_container "blocks until the container exits", and §7: it "reaps only
    the container pid, and returns its wait status". The author treated a forwarded stop
    signal as fatal, like a `stop` command that does not wait: a payload that traps SIGTERM
    and exits 7 still makes the run exit 143, the container is left for someone else to reap,
    and a pid-1 payload without a handler (which the kernel does not let SIGTERM kill) keeps
    running after the monitor said it died. Shows only in runs that get SIGTERM or SIGINT.
    """

    engine_name = "blind5-exit-assumes-stop-kills"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            _forward(pid, sig, FORWARDED_SIGNALS)
            if sig in (signal.SIGTERM, signal.SIGINT):
                # Bug: the wait status of "killed by sig", assumed rather than observed.
                return int(sig)
            status = _reaped(pid)
            if status is not None:
                return status


# --- which signals are forwarded, and when -----------------------------------------------------


class ForwardsIntTermOnly(ReferenceEngine):
    """monitor_container forwards only SIGINT and SIGTERM and drops SIGHUP, SIGUSR1 and
    SIGUSR2.

    SPEC §7: "A conformant `monitor_container` forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2
    to the container". The author only thought of "interrupt and terminate" (a Ctrl-C and a
    `kill`), as many shutdown handlers do. Shows only in runs that send SIGHUP, SIGUSR1 or
    SIGUSR2: the payload never gets them (a trapping payload does not react, and its exit
    code differs).
    """

    engine_name = "blind5-exit-forwards-int-term-only"
    rpc_methods = ReferenceRPC

    #: Bug: the three other signals of SPEC §7 are missing.
    FORWARDED = frozenset({signal.SIGINT, signal.SIGTERM})

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            _forward(pid, signals.get(timeout=MONITOR_POLL), self.FORWARDED)
            status = _reaped(pid)
            if status is not None:
                return status


class CoalescesSignals(ReferenceEngine):
    """monitor_container polls on a fixed tick and, on each tick, forwards the set of
    signals that arrived since the last one, in signal-number order: repeated signals are
    merged and a burst is reordered.

    SPEC §7: the monitor "forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 to the container"
    and §10: "the kit's channel must not lose SIGCHLD or a forwarded signal". The author
    collected "pending" signals in a set (as a bitmask of pending signals, or a Go select
    over a small buffered channel, would): two SIGUSR1 sent 50 ms apart reach the payload
    once, and SIGTERM followed by SIGHUP arrives as SIGHUP then SIGTERM. Shows only in runs
    that send several signals within one tick (a quarter of a second); a single signal is
    forwarded correctly, only a little late.
    """

    engine_name = "blind5-exit-coalesces-signals"
    escapes = (
        "standard signals do not queue: what reaches the payload together is a set, "
        "delivered lowest number first, so a correct engine's forwarding of a burst looks "
        "the same at the payload; only a trace of the master's kill calls could tell"
    )
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            status = _reaped(pid)
            if status is not None:
                return status
            time.sleep(MONITOR_POLL)
            pending: set[int] = set()
            sig = signals.get(timeout=0)
            while sig is not None:
                pending.add(sig)  # Bug: a set merges repeats and forgets arrival order
                sig = signals.get(timeout=0)
            for sig in sorted(pending):
                _forward(pid, sig, FORWARDED_SIGNALS)


# --- reaping -------------------------------------------------------------------------------


class ReapsAnyChild(ReferenceEngine):
    """monitor_container reaps with ``waitpid(-1, WNOHANG)`` and throws away the status of
    every child that is not the container, like a little init.

    SPEC §7: a conformant `monitor_container` "reaps only the container pid". The master's
    other children belong to the kit (and to other hooks): reaping them steals their exit
    status from whoever waits for them. Shows in every run, whatever the payload, as soon as
    another child of the master has exited (the run's exit code is still right).
    """

    engine_name = "blind5-exit-reaps-any-child"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            _forward(pid, signals.get(timeout=MONITOR_POLL), FORWARDED_SIGNALS)
            while True:
                # Bug: -1 reaps any child; the others' statuses are discarded.
                wpid, status = os.waitpid(-1, os.WNOHANG)
                if wpid == 0:
                    break
                if wpid == pid:
                    return status


class AnySigchldIsExit(ReferenceEngine):
    """monitor_container takes any SIGCHLD for the container's exit and returns whatever
    ``waitpid(pid, WNOHANG)`` gives, 0 while the container still runs; post_start_process
    runs a poststart hook command, whose exit is such a SIGCHLD.

    SPEC §1: monitor_container "blocks until the container exits", and §7: it "returns its
    wait status". The SIGCHLD on the channel may come from any child of the master (here the
    engine's own OCI-style poststart hook, `/bin/true`), or from the container stopping; a
    ``(0, 0)`` from WNOHANG means "still running", not "exited 0". Shows in runs whose payload
    outlives the poststart hook (e.g. ``sh -c 'sleep 1; exit 3'`` exits 0 instead of 3, and
    cleanup_container gets status 0 while the payload runs); a payload that exits at once
    usually wins the race and the run looks right.
    """

    engine_name = "blind5-exit-any-sigchld-is-exit"
    rpc_methods = ReferenceRPC

    #: The poststart hook (a real runtime reads it from the bundle's config).
    POSTSTART_HOOK = ("/bin/true",)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        subprocess.run(self.POSTSTART_HOOK, check=False, stdin=subprocess.DEVNULL)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig == signal.SIGCHLD:
                # Bug: whose SIGCHLD, and did waitpid find an exited child at all?
                _, status = os.waitpid(pid, os.WNOHANG)
                return status
            _forward(pid, sig, FORWARDED_SIGNALS)


# --- cleanup_container -----------------------------------------------------------------------


class CleanupFromMonitor(ReferenceEngine):
    """monitor_container calls cleanup_container itself as soon as the container has exited,
    so the kit's own call is the second one.

    SPEC §2 rule 7: "`cleanup_container` runs exactly once per master run, with the first
    fatal error (or none) and the wait status". The author tore down "as early as possible";
    the early call also gets no fatal error even when one is coming (a post_start_process
    failure after the exit). Shows in every run in which monitor_container sees the exit.
    """

    engine_name = "blind5-exit-cleanup-from-monitor"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        status = super().monitor_container(pid, signals)
        # Bug: the kit calls cleanup_container after this returns; it is not the monitor's.
        self.cleanup_container(Context(), None, status)
        return status


class CleanupReraisesFatal(ReferenceEngine):
    """cleanup_container undoes its work and then raises the fatal error it was given, as a
    Go `return fatal` ported to Python.

    SPEC §2 error table: "`cleanup_container` raises → reported", and the contract's
    docstring: cleanup "Must tolerate any partial setup". Cleanup is told about the fatal
    error so that it can tear down what is left, not to report it again: here every fatal
    run also has a failing cleanup_container. Runs without a fatal error (any payload exit
    code, a payload killed by a signal, even an exec failure, whose cleanup gets no fatal
    error) are unaffected; a create_container, post_start_process or monitor_container
    failure shows it.
    """

    engine_name = "blind5-exit-cleanup-reraises-fatal"
    rpc_methods = ReferenceRPC

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        super().cleanup_container(ctx, fatal, status)
        if fatal is not None:
            # Bug: propagating the error the kit already handles.
            raise RuntimeError(f"cleanup after a fatal error: {fatal}") from fatal


class CleanupNeedsRootDir(BindRootfsEngine):
    """The bind-rootfs engine whose cleanup_container removes the root's directory without
    checking that create_container got as far as making it.

    SPEC §1: `cleanup_container` "tears everything down; must tolerate partial setup", and
    the error table: "`create_container` raises → `cleanup_container("container creation
    failed: …")`". When create_container fails before prepare_rootfs (a failing sethostname
    RPC, or any failure at its start), ``_root_dir`` is still None and ``shutil.rmtree(None)``
    raises TypeError. Every run whose create_container succeeds is right.
    """

    engine_name = "blind5-exit-cleanup-needs-root-dir"
    rpc_methods = BindRootfsRPC

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        # Bug: no "if it was made" (the upstream engine's None check was dropped).
        path, self._root_dir = self._root_dir, None
        shutil.rmtree(path)  # type: ignore[arg-type]  # None after a failed create_container


# --- post_start_process ----------------------------------------------------------------------


class PostStartFromCreate(ReferenceEngine):
    """create_container calls post_start_process itself when the container is set up, taking
    "post start" to mean "after create".

    SPEC §2 rule 6: "`post_start_process` runs at most once, only after a successful exec;
    not if stage 2 reported failure". The engine's own call runs before stage 2 has even
    started, and runs also when the exec later fails; with the kit's call after the exec,
    every successful run has two. Shows in every run (twice after a good exec, once and
    too early after an exec failure).
    """

    engine_name = "blind5-exit-post-start-from-create"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        # Bug: the kit calls post_start_process once the payload was exec'd.
        self.post_start_process(ctx, pid)


class PriorityInPostStart(ReferenceEngine):
    """post_start_process raises the payload's scheduling priority, which only works with
    host privilege, and lets the permission error escape.

    SPEC §2 error table: "`post_start_process` … raises → `cleanup_container(err, status)`,
    exit 255". Lowering a process's nice value needs CAP_SYS_NICE in the host user
    namespace: it works in the root flow, where the author tested, and raises
    PermissionError in suid, userns, fakeroot and hybrid, so every run of those flows exits
    255 whatever the payload (a success or an exit 3 alike). Exec failures are unaffected
    (no post_start_process), and so is the root flow.
    """

    engine_name = "blind5-exit-priority-in-post-start"
    rpc_methods = ReferenceRPC

    #: The payload's nice value (a real runtime reads it from its config).
    NICE = -5

    def post_start_process(self, ctx: Context, pid: int) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, self.NICE)
        except ProcessLookupError:
            pass  # the payload exited already: nothing to prioritise
        # Bug: PermissionError (EACCES/EPERM) of an unprivileged master is not handled.


# --- start_process ---------------------------------------------------------------------------


class StartReturnsOnExecError(ReferenceEngine):
    """start_process prints the exec error and returns instead of raising it.

    SPEC §1: `start_process` "becomes the payload: it must exec or exit, never return", and
    §2 rule 10: "`start_process` that returns instead of exec'ing is a failure ("stage 2
    returned")". The author assumed the kit notices a failed exec by itself; the cause (the
    missing payload) reaches only stderr, the failure the kit sees is "stage 2 returned".
    Shows only in runs whose exec fails (a payload path that does not exist, a directory, a
    file without the execute bit); a good payload execs and never comes back.
    """

    engine_name = "blind5-exit-start-returns-on-exec-error"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd: int) -> None:
        try:
            super().start_process(master_fd)
        except OSError as exc:
            print(f"{self.common.engine_name}: {exc}", file=sys.stderr)
            return  # Bug: should raise (or exit); returning is "stage 2 returned"


class ForkExecShim(ReferenceEngine):
    """start_process forks, execs the payload in the child and stays behind as a shim that
    waits for it and exits with its code, so the container process itself never execs.

    SPEC §1: `start_process` "becomes the payload: it must exec or exit", §2 rule 9: "with a
    new pid namespace, stage 2 sees itself as pid 1", and rule 6: `post_start_process` runs
    "only after a successful exec". The run's exit code looks right (the shim exits with the
    payload's code, 128+signal for a signal), but no exec of stage 2 ever happens, so
    post_start_process never runs, the payload is pid 2 rather than 1, and signals the
    master forwards go to the shim, which (pid 1 without handlers) never passes them on.
    Shows in every run; an exec failure also exits 127 (the child's) instead of 255.
    """

    engine_name = "blind5-exit-fork-exec-shim"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd: int) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, ReferenceConfig)
        os.chdir(cfg.cwd)
        child = os.fork()
        if child == 0:
            try:
                os.execve(cfg.argv[0], cfg.argv, cfg.env)
            except OSError as exc:
                print(f"cannot execute {cfg.argv[0]!r}: {exc.strerror}", file=sys.stderr)
            os._exit(127)
        # Bug: the container process should have become the payload, not its parent.
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
