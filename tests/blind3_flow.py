"""Blind engines, round 3, for SPEC §1, §2, §6, §7, §8 and the error paths: the reference
engine with one realistic contract, order, RPC, signal, exit-status or cleanup bug each, loaded
as ``blind3_flow:NAME`` (``tests/`` on ``PYTHONPATH``). Most show in one scenario only: a
signal sent to the master, a payload that fails or is killed, a hook (or an RPC call) that
fails, a payload that outlives a helper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from kit.contract import ConfigError, WaitStatus
from kit.rpc import RPCClient
from reference_engines.minimal.engine import (
    FORWARDED_SIGNALS,
    MONITOR_POLL,
    ReferenceConfig,
    ReferenceEngine,
)
from reference_engines.minimal.rpc import ReferenceRPC, check_path


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # gone already: the wait collects it


def _reap_nohang(pid: int) -> WaitStatus | None:
    """The container's wait status if it has ended (reaped now), else None."""
    wpid, status = os.waitpid(pid, os.WNOHANG)
    return status if wpid == pid else None


class MonitorSiginfoExitStatus(ReferenceEngine):
    """§7: a conformant monitor_container "reaps only the container pid, and returns its wait
    status. The run exits with the container's code, or re-raises its signal" (§2 rule 8:
    "or 128+signal when it was killed by a signal"). The author reaps with os.waitid (to get
    a siginfo) and turns it into a wait status as ``si_status << 8`` whatever ``si_code``
    says: right for a payload that exits, but a payload killed by signal N comes back as
    "exited with N" (SIGTERM: exit 15 instead of 143, and nothing to re-raise). Every flow;
    only runs whose payload dies of a signal (a forwarded one it does not handle, or its
    own, without a pid namespace) show it, and the fatal paths in which the kit SIGKILLs a
    running container: cleanup_container gets "exited 9" as the wait status."""

    engine_name = "blind3-monitor-siginfo-exit-status"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                _kill(pid, sig)
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
            if info is not None:
                return (info.si_status & 0xFF) << 8  # the bug: CLD_KILLED/CLD_DUMPED too


class MonitorReturnsExitCode(ReferenceEngine):
    """§1: monitor_container "blocks until the container exits, forwarding signals" and
    returns a "wait status"; §2 rule 8: "The run's exit code equals the payload's (or
    128+signal ...)". The author returns what the shell would print as ``$?``
    (``os.waitstatus_to_exitcode``): equal to the wait status for a payload that exits 0,
    so the happy path passes; a payload exiting 3 becomes wait status 3 ("killed by SIGQUIT",
    run exit 131), and a payload killed by a signal a negative number the kit refuses
    (fatal, 255). Every flow; only failing or signalled payloads."""

    engine_name = "blind3-monitor-returns-exit-code"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        status = super().monitor_container(pid, signals)
        return os.waitstatus_to_exitcode(status)


class MonitorTrustsAnySigchld(ReferenceEngine):
    """§7: monitor_container "reaps only the container pid, and returns its wait status";
    §1: it "blocks until the container exits". post_start_process runs a poststart hook
    (a short helper child, reaped by its own pid: legal), and the monitor, which sleeps on
    the channel until a SIGCHLD comes (the kit loses none, §10), takes any SIGCHLD for the
    container's: it collects with ``waitpid(pid, WNOHANG)`` and returns the status it got,
    0 when the container is still running. The run ends "exited 0" while the payload runs
    on. Every flow; payloads that outlive the hook (anything waiting for a signal, a sleep,
    a failing payload that takes a moment); /bin/true usually passes."""

    engine_name = "blind3-monitor-trusts-any-sigchld"
    rpc_methods = ReferenceRPC

    def post_start_process(self, ctx, pid):  # type: ignore[no-untyped-def]
        subprocess.run(["/bin/true"], check=False)  # the "poststart hook"

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        while True:
            sig = signals.get()
            if sig in FORWARDED_SIGNALS:
                _kill(pid, sig)
            elif sig == signal.SIGCHLD:
                _, status = os.waitpid(pid, os.WNOHANG)  # the bug: (0, 0) when still running
                return status


@dataclass
class _StopSignalConfig(ReferenceConfig):
    """The reference's options plus Docker's STOPSIGNAL: what a SIGTERM is forwarded as."""

    stop_signal: str = "SIGTERM"


#: Received signal -> signal sent to the container, resolved by prepare_config.
_FORWARD_TABLE: dict[int, int] = {}


class ForwardTableInStage1Global(ReferenceEngine):
    """§2 rule 3: "Only JSON-visible fields of the engine config cross from stage 1 to later
    processes; state kept in Python globals in stage 1 is gone later"; §7: monitor_container
    "forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 to the container". The engine has a
    ``stop_signal`` option (what SIGTERM is forwarded as, default SIGTERM); prepare_config
    validates it and resolves the whole forwarding table once, into a module global. In the
    master (another process) the table is empty, and monitor_container, which forwards what
    the table maps, forwards nothing. Every flow; only runs that signal the master."""

    engine_name = "blind3-forward-table-in-stage1-global"
    rpc_methods = ReferenceRPC

    def config(self) -> _StopSignalConfig:
        return _StopSignalConfig()

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        cfg: _StopSignalConfig = self.common.engine_config  # type: ignore[assignment]
        try:
            stop = signal.Signals[cfg.stop_signal]
        except KeyError:
            raise ConfigError(f"stop_signal: unknown signal {cfg.stop_signal!r}") from None
        super().prepare_config(starter_config)
        _FORWARD_TABLE.clear()
        _FORWARD_TABLE.update({int(s): int(s) for s in FORWARDED_SIGNALS})
        _FORWARD_TABLE[signal.SIGTERM] = int(stop)

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            target = _FORWARD_TABLE.get(sig) if sig is not None else None
            if target is not None:
                _kill(pid, target)
            status = _reap_nohang(pid)
            if status is not None:
                return status


class CleanupClosesUnsetPidfd(ReferenceEngine):
    """§1: cleanup_container "tears everything down; must tolerate partial setup"; error
    table: "create_container raises → cleanup_container("container creation failed: …")" and
    "cleanup_container raises → reported". create_container opens a pidfd of the container
    first thing (the monitor forwards through it, safe from pid reuse) and cleanup_container
    closes it unconditionally: when create_container never ran or failed before its first
    line (a kit-injected create_container fault), cleanup raises AttributeError. Every flow;
    only that error path."""

    engine_name = "blind3-cleanup-closes-unset-pidfd"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        self.pidfd = os.pidfd_open(pid)
        super().create_container(ctx, pid, rpc_conn)

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                pidfd = getattr(self, "pidfd", None)  # create_container may not have run yet
                try:
                    if pidfd is None:
                        os.kill(pid, sig)
                    else:
                        signal.pidfd_send_signal(pidfd, sig)
                except ProcessLookupError:
                    pass
            status = _reap_nohang(pid)
            if status is not None:
                return status

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        os.close(self.pidfd)  # the bug: unset unless create_container ran


class CreateSwallowsRpcErrors(ReferenceEngine):
    """§2 error table: "create_container raises → cleanup_container("container creation
    failed: …"), stage 2 never starts, exit 255"; §6: "the reply carries a result or a typed
    error (errno and message survive)". The author treats the hostname and the /proc and /tmp
    mounts as best effort ("rootless setups refuse some mounts"): an OSError from an RPC call
    (EPERM, ENOENT, and ConnectionError too: the RPC server gone) is printed and skipped, so
    the container starts half prepared and the run exits with the payload's code. Only runs
    in which an RPC call fails: the mock transport's injected faults, an RPC server that
    refuses or dies; invisible otherwise."""

    engine_name = "blind3-create-swallows-rpc-errors"
    escapes: str = (
        "SPEC question: no sentence makes a failed RPC call fatal to create_container; "
        "what it prepares, and which step is best effort, is the engine's choice (§1 "
        "'prepares the container'), and the error table starts from a create_container "
        "that raises"
    )
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        cfg: ReferenceConfig = self.common.engine_config  # type: ignore[assignment]
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        steps = []
        if cfg.hostname is not None:
            steps.append(("hostname", lambda: rpc.sethostname(name=cfg.hostname)))
        steps.append(("rootfs", lambda: self.prepare_rootfs(rpc, cfg)))
        for what, step in steps:
            try:
                step()
            except OSError as exc:  # the bug: the failure never reaches the kit
                print(f"{self.common.engine_name}: {what} skipped: {exc}", file=sys.stderr)


class _UmountRPC(ReferenceRPC):
    def umount(self, target: str) -> None:
        """Unmount container path ``target`` in the container's mount namespace."""
        self._need_namespace("mount", "umount")
        self.system.umount(check_path(target, "umount target"))


class CleanupUnmountsThroughRpc(ReferenceEngine):
    """§2: create_container works "through RPC calls"; "on success closes rpc conn ->
    RPC server exits when the conn closes"; error table: "post_start_process or
    monitor_container raises → cleanup_container(err, status)", "cleanup_container raises →
    reported". The author keeps the RPC client of create_container and, after a fatal error,
    undoes the mounts "properly" from cleanup_container through it: an RPC call from a hook
    that has no connection any more (the kit closed it), so cleanup_container raises
    (EBADF) on every fatal path after create_container ran: a failing create_container,
    post_start_process or monitor_container. Every flow; clean runs pass."""

    engine_name = "blind3-cleanup-unmounts-through-rpc"
    rpc_methods = _UmountRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        cfg: ReferenceConfig = self.common.engine_config  # type: ignore[assignment]
        rpc = self.rpc = RPCClient(rpc_conn, self.common.engine_name)
        if cfg.hostname is not None:
            rpc.sethostname(name=cfg.hostname)
        self.prepare_rootfs(rpc, cfg)

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        cfg: ReferenceConfig = self.common.engine_config  # type: ignore[assignment]
        rpc = getattr(self, "rpc", None)
        if fatal is None or rpc is None:
            return  # a clean end: the mounts die with the mount namespace
        for target, wanted in (("/tmp", cfg.mount_tmp), ("/proc", cfg.mount_proc)):
            if wanted:
                rpc.umount(target=target)  # the bug: the connection is closed by now


class MonitorDebouncesSignals(ReferenceEngine):
    """§7: a conformant monitor_container "forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 to
    the container"; §10: "the kit's channel must not lose SIGCHLD or a forwarded signal".
    The author debounces ("Ctrl-C hammered five times, or a supervisor's HUP right before its
    TERM: only the last request matters"): after a signal it collects whatever arrives in the
    next 100 ms and forwards only the last one. A single signal is forwarded; of two or more
    sent close together only the last. Every flow; only runs that signal the master several
    times in a row."""

    engine_name = "blind3-monitor-debounces-signals"
    rpc_methods = ReferenceRPC

    DEBOUNCE = 0.1

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                deadline = time.monotonic() + self.DEBOUNCE
                while (left := deadline - time.monotonic()) > 0:
                    later = signals.get(timeout=left)
                    if later in FORWARDED_SIGNALS:
                        sig = later  # the bug: the earlier one is dropped
                _kill(pid, sig)
            status = _reap_nohang(pid)
            if status is not None:
                return status


class StartProcessReturnsOnExecError(ReferenceEngine):
    """§1: start_process "becomes the payload: it must exec or exit, never return"; §2 rule
    10: "start_process that returns instead of exec'ing is a failure ("stage 2 returned")";
    error table: "start_process raises → stage 2 writes the failure byte". The author
    catches the exec's OSError, prints it and returns "so that the kit reports stage 2's
    failure": the exit code is 255 as for a raise, but the hook returns (rule 10) instead
    of raising. Every flow; only runs whose payload cannot be started (missing, not
    executable, a cwd that does not exist)."""

    engine_name = "blind3-start-process-returns-on-exec-error"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd):  # type: ignore[no-untyped-def]
        try:
            super().start_process(master_fd)
        except OSError as exc:
            print(f"{self.common.engine_name}: {exc}", file=sys.stderr)
            sys.stderr.flush()


class CreateWaitsForMonitor(ReferenceEngine):
    """§2 rule 4: "create_container, the start waiter and monitor_container start after the
    namespaces are ready and run concurrently"; error table: "post_start_process or
    monitor_container raises → cleanup_container(err, status), exit 255"; contract: a hook
    that waits "should wait on ctx.wait rather than sleep". create_container first waits,
    on a plain Event with no timeout, until monitor_container has started ("so that a
    signal that comes during setup is forwarded"). When monitor_container fails before its
    first line (a kit-injected monitor_container fault) the event never fires: the kit kills
    the container and cancels ctx, create_container never sees it, and the run ends in a
    hook timeout naming create_container instead of a cleanup and exit 255. Every flow;
    only that error path."""

    engine_name = "blind3-create-waits-for-monitor"
    rpc_methods = ReferenceRPC

    def init_config(self, common, privileged_stage1):  # type: ignore[no-untyped-def]
        super().init_config(common, privileged_stage1)
        self.monitoring = threading.Event()

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        self.monitoring.wait()  # the bug: neither ctx nor a timeout
        super().create_container(ctx, pid, rpc_conn)

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        self.monitoring.set()
        return super().monitor_container(pid, signals)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (its children, theirs...), from /proc."""
    found: list[int] = []
    queue = [pid]
    while queue:
        parent = queue.pop(0)
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            for child in children:
                if child not in found:
                    found.append(child)
                    queue.append(child)
    return found


class MonitorForwardsToChildren(ReferenceEngine):
    """§7: a conformant monitor_container "forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 to
    the container"; §2 rule 9: the pid given to monitor_container "is the container's pid".
    The author knows that pid 1 of a pid namespace ignores signals it has no handler for,
    and forwards, tini-style, to "the workload": every process below the container's init,
    but not to the container process itself. A payload that traps the signal never gets it
    (its child, a sleep, dies of it instead). Every flow; only runs that signal the master."""

    engine_name = "blind3-monitor-forwards-to-children"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                for child in _descendants(pid):  # the bug: pid itself left out
                    _kill(child, sig)
            status = _reap_nohang(pid)
            if status is not None:
                return status


#: Built once per process ("config() runs in every process: build it once").
_SHARED_CONFIG = ReferenceConfig()


class ConfigReturnsSharedObject(ReferenceEngine):
    """§1: config() "returns a fresh, empty engine-config object (a dataclass)"; contract:
    "(never a shared one)". The author caches the config object in a module global and
    returns it from every call: the kit fills it from JSON, and the next call of config()
    in the same process hands back that filled object (argv and all), not a fresh empty
    one. A run calls config once per process, so lifecycles pass; only a check that calls
    config() twice in one process (after filling the first) shows it."""

    engine_name = "blind3-config-returns-shared-object"
    rpc_methods = ReferenceRPC

    def config(self) -> ReferenceConfig:
        return _SHARED_CONFIG


ENGINES = (
    MonitorSiginfoExitStatus,
    MonitorReturnsExitCode,
    MonitorTrustsAnySigchld,
    ForwardTableInStage1Global,
    CleanupClosesUnsetPidfd,
    CreateSwallowsRpcErrors,
    CleanupUnmountsThroughRpc,
    MonitorDebouncesSignals,
    StartProcessReturnsOnExecError,
    CreateWaitsForMonitor,
    MonitorForwardsToChildren,
    ConfigReturnsSharedObject,
)
