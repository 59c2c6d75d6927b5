"""Blind engines for SPEC §6, §7, §2's error paths and §8: one realistic bug each."""

from __future__ import annotations

import errno
import json
import os
import signal
import time

from kit.rpc import RPCClient
from kit.system import linux
from mutants.zoo import rpc as zoo_rpc
from reference_engines.minimal.engine import FORWARDED_SIGNALS, MONITOR_POLL, ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC

#: Where the state-file engine keeps its per-container state (the host's file system).
STATE_DIR = "/var/tmp"


class MonitorDropsSighup(ReferenceEngine):
    """§7: "A conformant monitor_container forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 to
    the container". The author leaves SIGHUP out, nohup-style ("our terminal went away; the
    container should keep running")."""

    engine_name = "blind-monitor-drops-sighup"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        forwarded = FORWARDED_SIGNALS - {signal.SIGHUP}
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in forwarded:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class MonitorTranslatesSigint(ReferenceEngine):
    """§7: monitor_container "forwards SIGINT/SIGTERM/... to the container". The author
    turns an interactive SIGINT into SIGTERM ("containers shut down on SIGTERM"): the
    container gets a signal, not the one the master received."""

    engine_name = "blind-monitor-translates-sigint"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)
                except ProcessLookupError:
                    pass
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class MonitorForwardsOncePerKind(zoo_rpc.MonitorForwardsOncePerKind):
    """§7 (forwards every SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2) and §10 ("the kit's
    channel must not lose ... a forwarded signal"): the author de-duplicates ("a second
    SIGTERM while the first is handled would kill it"), so each kind is forwarded once per
    run and every later one of that kind is dropped."""

    engine_name = "blind-monitor-forwards-once"
    rpc_methods = ReferenceRPC


class CleanupSetEuidRootOnError(zoo_rpc.CleanupEuidRootOnError):
    """§4 master row (suid, hybrid: "r=e=U, saved uid 0 ... escalation possible", at every
    hook entry and return) on §2's error path: after a fatal error cleanup_container takes
    its saved uid 0 back as effective ("force-remove whatever is left, as root") and never
    gives it up. Only the runs where a hook failed show it."""

    engine_name = "blind-cleanup-euid-root-on-error"
    rpc_methods = ReferenceRPC


class RpcErrorPathKeepsCap(ReferenceEngine):
    """§4 RPC server row (suid, hybrid: "only CAP_SYS_ADMIN effective ...; a method may raise
    more on its own thread and must restore them", at every RPC method entry and return):
    the mount method raises every permitted capability for its work and lowers them after
    it, but not when the work raised. create_container asks for an optional mount that
    fails (and ignores the failure), so the error path is taken in every run."""

    engine_name = "blind-rpc-error-path-keeps-cap"

    class rpc_methods(ReferenceRPC):
        def mount(
            self,
            source: str | None,
            target: str,
            fstype: str | None,
            flags: list[str],
            data: str | None,
        ) -> None:
            eff, perm, inh = linux.capget()
            try:
                linux.capset(perm, perm, inh)
            except OSError:
                pass
            super().mount(source, target, fstype, flags, data)  # raises: no restore
            linux.capset(eff, perm, inh)

    def prepare_rootfs(self, rpc: RPCClient, cfg) -> None:  # type: ignore[no-untyped-def]
        super().prepare_rootfs(rpc, cfg)
        try:  # optional: not every host has it
            rpc.mount(source="mqueue", target="/blind/mqueue", fstype="mqueue", flags=[], data=None)
        except OSError:
            pass


class StartProcessClosesAllFds(ReferenceEngine):
    """§2 rule 6 ("post_start_process runs ... not if stage 2 reported failure") and the
    error table ("start_process raises → stage 2 writes the failure byte, no
    post_start_process"): the author closes every inherited descriptor above 2 before exec
    ("no fd leaks into the payload"), master_fd included, so a failing exec can no longer
    be reported."""

    engine_name = "blind-start-process-closes-fds"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd: int) -> None:
        os.closerange(3, 65536)
        super().start_process(master_fd)


class StartProcessClosesMasterFd(ReferenceEngine):
    """§2 rule 6 and the error table, as above, with only ``master_fd`` closed before exec
    ("it is close-on-exec anyway; close it now")."""

    engine_name = "blind-start-process-closes-master-fd"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd: int) -> None:
        os.close(master_fd)
        super().start_process(master_fd)


class CleanupLeaksOnError(ReferenceEngine):
    """§1 (cleanup_container "tears everything down; must tolerate partial setup"), §2's
    error table (a failing hook → cleanup_container(err, status)) and §11 (a run changes
    nothing on the host that outlives it): create_container writes a state file on the
    host; cleanup_container removes it only after a clean exit ("on a fatal error the kit
    tears the run down anyway")."""

    engine_name = "blind-cleanup-leaks-on-error"
    rpc_methods = ReferenceRPC

    def _state_path(self) -> str:
        return os.path.join(STATE_DIR, f"blind-engine-{self.common.container_id}.json")

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        with open(self._state_path(), "w") as f:
            json.dump({"pid": pid}, f)
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        if fatal is None:
            try:
                os.unlink(self._state_path())
            except FileNotFoundError:
                pass


class MonitorCallsCleanupOnSignalDeath(ReferenceEngine):
    """§2 rule 7: "cleanup_container runs exactly once per master run". When the container
    was killed by a signal the author's monitor tears down at once ("it crashed: free the
    resources now") by calling cleanup_container itself, before returning the status; the
    kit's own call follows: twice, in the runs whose payload dies of a signal only."""

    engine_name = "blind-monitor-calls-cleanup"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        status = super().monitor_container(pid, signals)
        if os.WIFSIGNALED(status):
            self.cleanup_container(None, None, status)
        return status


class MonitorKillsAfterGrace(ReferenceEngine):
    """§7: "forwards SIGINT/SIGTERM/... to the container ... The run exits with the
    container's code" (§2 rule 8). The author gives the container a grace period after a
    forwarded SIGTERM ("docker stop") and then SIGKILLs it, although the container handles
    SIGTERM and exits on its own."""

    engine_name = "blind-monitor-kills-after-grace"
    escapes = (
        "only a payload that outlives a forwarded SIGTERM by more than the grace period shows the "
        "SIGKILL; the signals payload exits as soon as every signal arrived twice (the zoo's "
        "known survivor monitor-kills-after-grace gives the reason)"
    )
    rpc_methods = ReferenceRPC
    GRACE = 0.3

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
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
            try:
                wpid, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                raise ChildProcessError(errno.ECHILD, "container reaped elsewhere") from None
            if wpid == pid:
                return status


class MonitorSeteuidWhenForwarding(zoo_rpc.MonitorEuidRootWhenForwarding):
    """§4 master row (suid, hybrid: "r=e=U, saved uid 0", at every hook entry and return)
    and §7: to be sure it may signal the container whatever uid it runs as, the author's
    monitor takes its saved uid 0 back as effective before forwarding and never drops it.
    Only runs in which a signal was forwarded show it."""

    engine_name = "blind-monitor-seteuid-when-forwarding"
    rpc_methods = ReferenceRPC


class MonitorNeverReaps(zoo_rpc.MonitorNeverReaps):
    """§7: monitor_container "reaps only the container pid, and returns its wait status".
    The author peeks with WNOWAIT (to leave the zombie "for whoever else needs the status")
    and rebuilds the wait status from the siginfo, so the container is never reaped."""

    engine_name = "blind-monitor-never-reaps"
    rpc_methods = ReferenceRPC


class RpcMethodLeavesKeepcaps(ReferenceEngine):
    """§4 RPC server row ("at every RPC method entry and return"; a rule that says a hook
    "changes no credential" compares the whole credential ... securebits ..."): the
    sethostname method sets PR_SET_KEEPCAPS (a securebit) on its thread for a uid dance it
    later dropped, and never clears it."""

    engine_name = "blind-rpc-method-leaves-keepcaps"

    class rpc_methods(ReferenceRPC):
        def sethostname(self, name: str) -> None:
            linux.set_keepcaps(True)
            super().sethostname(name)


class PostStartForkNoExit(ReferenceEngine):
    """§8: "one event per hook entry and return" and §2 rule 6 ("post_start_process runs at
    most once"): post_start_process forks a child for background work and the child ends
    with sys.exit (not os._exit), so it unwinds through the kit's code as a second master."""

    engine_name = "blind-post-start-fork-no-exit"
    rpc_methods = ReferenceRPC

    def post_start_process(self, ctx, pid):  # type: ignore[no-untyped-def]
        import sys

        if os.fork() == 0:
            sys.exit(0)


class PostStartSeteuid(ReferenceEngine):
    """Control (§4 master row, at return): post_start_process takes the saved uid 0 back as
    effective in every run; shows whether hook returns are checked at all."""

    engine_name = "blind-post-start-seteuid"
    rpc_methods = ReferenceRPC

    def post_start_process(self, ctx, pid):  # type: ignore[no-untyped-def]
        if os.geteuid() != 0:
            try:
                os.seteuid(0)
            except OSError:
                pass


class CleanupExitsOnFatal(ReferenceEngine):
    """§2 error table ("post_start_process or monitor_container raises →
    cleanup_container(err, status), exit 255"; "cleanup_container raises → reported") and
    rule 8: after a fatal error the author's cleanup_container ends the master itself
    ("nothing left to do: exit now"), with os._exit(1)."""

    engine_name = "blind-cleanup-exits-on-fatal"
    rpc_methods = ReferenceRPC

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        if fatal is not None:
            os._exit(1)


class CleanupWaitsForPostStart(ReferenceEngine):
    """§1 (cleanup_container "must tolerate partial setup") and §2 rule 6: cleanup_container
    first waits until post_start_process finished ("do not tear down what it is still
    setting up"), with no timeout; when stage 2 failed post_start_process never runs, and
    cleanup_container hangs."""

    engine_name = "blind-cleanup-waits-for-post-start"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        import threading

        super().__init__()
        self.started = threading.Event()

    def post_start_process(self, ctx, pid):  # type: ignore[no-untyped-def]
        self.started.set()

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        self.started.wait()


class RpcPayloadCheckKeepsCap(zoo_rpc.RpcPayloadCheckKeepsCaps):
    """§4 RPC server row (suid, hybrid: "only CAP_SYS_ADMIN effective ...; a method may raise
    more on its own thread and must restore them", at every RPC method entry and return),
    in the runs whose payload is missing: create_container asks the RPC server whether the
    payload exists in the container (a new method that raises every permitted capability to
    look, as root would) and the method does not restore them when the payload is not
    there. create_container lets stage 2 report the missing payload."""

    engine_name = "blind-rpc-payload-check-keeps-cap"
    rpc_methods = zoo_rpc.RpcPayloadCheckKeepsCaps.rpc
