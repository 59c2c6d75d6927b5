"""Blind engines, round 2, for SPEC §1, §2, §6, §7 and §8: one realistic order, RPC, signal,
exit-status or descriptor bug each, loaded as ``blind2_order:NAME`` (``tests/`` on
``PYTHONPATH``)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading

from kit.contract import Context, SignalChannel, WaitStatus
from kit.rpc import RPCClient
from mutants.zoo import order as zoo_order
from reference_engines.minimal.engine import (
    FORWARDED_SIGNALS,
    MONITOR_POLL,
    ReferenceConfig,
    ReferenceEngine,
)
from reference_engines.minimal.rpc import ReferenceRPC

_libc = ctypes.CDLL(None, use_errno=True)


def _exit_code(status: WaitStatus | None, fatal: BaseException | None) -> int:
    """The run's exit code as SPEC §2 rule 8 states it (what the kit itself computes)."""
    if fatal is not None or status is None:
        return 255
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class MonitorSigtimedwait(zoo_order.MonitorTakesSignalsItself):
    """§7: "The master turns every signal it receives into an entry on the signals channel
    before create_container starts. A conformant monitor_container forwards SIGINT/SIGTERM/
    SIGHUP/SIGUSR1/SIGUSR2 to the container". The author knows the master's threads block
    every signal, so monitor_container takes the signals to forward itself with
    sigtimedwait instead of reading the channel: it races the kit's signalfd, and each signal
    the kit reads first lands on a channel nobody reads."""

    engine_name = "blind2-monitor-sigtimedwait"
    rpc_methods = ReferenceRPC


class MonitorShellStatus(zoo_order.MonitorShellStatus):
    """§7: monitor_container "reaps only the container pid, and returns its wait status. The
    run exits with the container's code, or re-raises its signal." The author normalises a
    signal death the shell's way: it returns the wait status of a container that *exited*
    with 128+N. The run's exit code number is the same, but the status is not the
    container's and the run cannot re-raise the signal."""

    engine_name = "blind2-monitor-shell-status"
    rpc_methods = ReferenceRPC


class MonitorWaitsForPostStart(ReferenceEngine):
    """§2 error table: "start_process raises → stage 2 writes the failure byte, no
    post_start_process, cleanup_container(None, exited 255)", and rule 4 (the monitor runs
    concurrently with the start waiter). The author does not forward signals to a container
    that has not exec'd yet: monitor_container waits for an event post_start_process sets.
    After a stage-2 failure post_start_process never runs, and the monitor never reaps."""

    engine_name = "blind2-monitor-waits-for-post-start"
    rpc_methods = ReferenceRPC

    def init_config(self, common: object, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)  # type: ignore[arg-type]
        self.started = threading.Event()

    def post_start_process(self, ctx: Context, pid: int) -> None:
        self.started.set()

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        self.started.wait()
        return super().monitor_container(pid, signals)


class KeepsRpcDupForCleanup(zoo_order.CreateKeepsRpcDup):
    """§2 rule 5: "start_process begins only after create_container returned and the RPC
    connection closed"; §6: the RPC server "exits 0 when the client closes". The author keeps
    an RPC client for cleanup_container (to unmount there) on ``socket.fromfd`` of the
    connection -- a duplicate: the kit's close is not the last, the RPC server never sees
    EOF, and the container never starts."""

    engine_name = "blind2-keeps-rpc-dup-for-cleanup"
    rpc_methods = ReferenceRPC


class CleanupExitsWithCode(ReferenceEngine):
    """§2 rule 7 and §8 ("one event per hook entry and return"): cleanup_container runs and
    returns; the kit exits. The author reads §7 ("The run exits with the container's code")
    as cleanup's job: it computes the right code (128+N for a signal, 255 after a fatal
    error) and ends the master with os._exit, so cleanup_container never returns."""

    engine_name = "blind2-cleanup-exits-with-code"
    rpc_methods = ReferenceRPC

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code(status, fatal))


class MonitorUnblocksSignals(ReferenceEngine):
    """§7: "The master turns every signal it receives into an entry on the signals channel";
    a conformant monitor_container forwards them. The author finds every signal blocked in
    the monitor's thread and clears the mask "so that Ctrl-C works": a signal sent to the
    master may now be delivered to that thread with its default action instead of the
    kit's signalfd."""

    engine_name = "blind2-monitor-unblocks-signals"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        return super().monitor_container(pid, signals)


class MonitorKillpg(ReferenceEngine):
    """§7: a conformant monitor_container "forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 to
    the container". The author forwards to the container's process group (killpg, "so that
    the payload's children get it too"), and ignores ESRCH: the container process is no
    group leader, so nothing is forwarded."""

    engine_name = "blind2-monitor-killpg"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    pass
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class CreateErrorCallsCleanup(ReferenceEngine):
    """§2 rule 7: "cleanup_container runs exactly once per master run, with the first fatal
    error"; error table: "create_container raises → cleanup_container("container creation
    failed: …")". The author undoes a partial setup at once: when an RPC call of
    create_container fails, it calls cleanup_container itself and re-raises, and the kit
    calls it a second time."""

    engine_name = "blind2-create-error-calls-cleanup"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        try:
            super().create_container(ctx, pid, rpc_conn)
        except Exception as exc:
            self.cleanup_container(ctx, exc, None)
            raise


class CleanupAssumesStatus(ReferenceEngine):
    """§1: cleanup_container "tears everything down; must tolerate partial setup"; error
    table: create_container raises → cleanup_container("container creation failed: …") with
    no status. The author logs the container's exit code first, and
    waitstatus_to_exitcode(None) raises TypeError on every fatal path without a status."""

    engine_name = "blind2-cleanup-assumes-status"
    escapes: str = (
        "SPEC question: §2 rule 7 hands cleanup_container 'the first fatal error (or none) "
        "and the wait status' in every master run, and the kit does (it kills and reaps the "
        "container after a fatal error), while the contract's type allows status None (the "
        "kit passes None only when engine code reaped the container itself): is None a "
        "value cleanup_container must tolerate?"
    )
    rpc_methods = ReferenceRPC

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        code = os.waitstatus_to_exitcode(status)  # type: ignore[arg-type]
        print(f"container exited with {code}", file=sys.stderr)


class MonitorRaisesOnNonzero(ReferenceEngine):
    """§2 rule 8: "The run's exit code equals the payload's"; §7: monitor_container "returns
    its wait status". The author treats a failing container as an engine error: the monitor
    raises when the container exits non-zero, so the run exits 255 instead of the payload's
    code."""

    engine_name = "blind2-monitor-raises-on-nonzero"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        status = super().monitor_container(pid, signals)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            raise RuntimeError(f"the container failed (wait status {status:#x})")
        return status


class StartProcessCallsPostStart(ReferenceEngine):
    """§1: post_start_process runs in the master, once the payload was exec'd; §2 rule 6:
    "post_start_process runs at most once, only after a successful exec". The author runs
    the post-start work "inside the container, just before the exec": start_process calls
    post_start_process itself, in stage 2, before the payload exists (and the kit calls it
    again in the master)."""

    engine_name = "blind2-start-process-calls-post-start"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd: int) -> None:
        self.post_start_process(Context(), os.getpid())
        super().start_process(master_fd)


class CreateForksRpcHelper(ReferenceEngine):
    """§2 rule 5: "start_process begins only after create_container returned and the RPC
    connection closed" (the RPC calls belong to create_container). The author does the slow
    mounts in a forked helper process that inherits the connection, and create_container
    returns without waiting for it: the helper's calls come after the hook returned."""

    engine_name = "blind2-create-forks-rpc-helper"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg: ReferenceConfig = self.common.engine_config  # type: ignore[assignment]
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        if cfg.hostname is not None:
            rpc.sethostname(name=cfg.hostname)
        child = os.fork()
        if child == 0:
            code = 0
            try:
                threading.Event().wait(0.3)  # the "slow" part
                self.prepare_rootfs(rpc, cfg)
            except BaseException:  # a forked helper must never return
                code = 1
            os._exit(code)
        self.helper = child

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        helper = getattr(self, "helper", None)
        if helper is not None:
            try:
                os.waitpid(helper, 0)
            except ChildProcessError:
                pass


class MonitorBlocksAfterTerm(ReferenceEngine):
    """§7: a conformant monitor_container forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 (every
    one of them: §10 "must not lose ... a forwarded signal"). The author implements a
    graceful stop: after forwarding SIGTERM or SIGINT it waits (blocking) for the container
    to end, and forwards nothing more meanwhile."""

    engine_name = "blind2-monitor-blocks-after-term"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                if sig in (signal.SIGTERM, signal.SIGINT):
                    return os.waitpid(pid, 0)[1]
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class InitConfigInheritableLog(ReferenceEngine):
    """§1: start_process "becomes the payload"; the payload gets the descriptors the
    StarterConfig keeps (keep_file_descriptor), no others. The author opens a debug log in
    init_config, in every process, with libc's open (no O_CLOEXEC, unlike os.open): stage 2
    carries it across the exec into the payload."""

    engine_name = "blind2-init-config-inheritable-log"
    escapes: str = (
        "harmless with this kit: stage 2 closes every descriptor the StarterConfig does "
        "not keep after init_config and before start_process (kit/starter/stage2.py "
        "close_fds), so the log never reaches the payload; no run can show it"
    )
    rpc_methods = ReferenceRPC

    def init_config(self, common: object, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)  # type: ignore[arg-type]
        self.log_fd = _libc.open(b"/dev/null", os.O_WRONLY | os.O_APPEND)


class CleanupReapsContainer(ReferenceEngine):
    """§7: monitor_container "reaps only the container pid, and returns its wait status";
    the kit hands cleanup_container that status. The author makes sure the container is gone
    after a fatal error: cleanup_container kills it and waits for it itself, stealing the
    reap from the monitor."""

    engine_name = "blind2-cleanup-reaps-container"
    escapes: str = (
        "harmless with this kit: cleanup_container runs after the container was reaped "
        "(SPEC §2 rule 7 hands it the wait status), so its kill and wait find no process; "
        "only a reused pid would be hit, which no run can show"
    )
    rpc_methods = ReferenceRPC

    def post_start_process(self, ctx: Context, pid: int) -> None:
        self.container = pid

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pid = getattr(self, "container", None)
        if fatal is not None and pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


ENGINES = (
    MonitorSigtimedwait,
    MonitorShellStatus,
    MonitorWaitsForPostStart,
    KeepsRpcDupForCleanup,
    CleanupExitsWithCode,
    MonitorUnblocksSignals,
    MonitorKillpg,
    CreateErrorCallsCleanup,
    CleanupAssumesStatus,
    MonitorRaisesOnNonzero,
    StartProcessCallsPostStart,
    CreateForksRpcHelper,
    MonitorBlocksAfterTerm,
    InitConfigInheritableLog,
    CleanupReapsContainer,
)
