"""Blind engines for round 7 (credentials), written from SPEC.md alone (not from the suite).

Each class is ``blind7_cred_correct.ScratchEngine`` (a small engine written from scratch,
conformant in every flow) with ONE honest mistake about privileges: a credential left on a
thread other than the hook's own (a helper thread of the master, a worker thread of the RPC
server), on a grandchild process that lives while hooks run, or on the hook's thread but in
one part of the credential only (the saved uid, the fs uid, the supplementary groups, the
securebits, one capability set of the payload, no_new_privs, the bounding set), or only in one
flow, or only at the hook's return. Each docstring's first line names the bug; its body
quotes the SPEC.md sentence it breaks and says in which flows it shows. In the other flows the
same code runs and changes nothing that the contract speaks of.

Every engine runs its lifecycle to the end in every flow (the bug is subtle, not a crash).
Loaded as ``blind7_cred:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here runs at
import time: every bug starts inside a hook or an RPC method. None of them changes the host
(files, mounts, sysctls, hostname): what they get wrong is the credentials of the run's own
processes, so none needs the host sandbox guard.
"""

from __future__ import annotations

import grp
import os
import select
import threading
from typing import Any, ClassVar

from blind7_cred_correct import (
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_KILL,
    CAP_NET_BIND_SERVICE,
    CAP_SETGID,
    CLONE_NEWUSER,
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_RAISE,
    PR_SET_KEEPCAPS,
    USERNS_FLOWS,
    ScratchEngine,
    ScratchRPC,
    bit,
    capget,
    capset,
    prctl,
    setuid_master,
    thread_setfsuid,
    thread_setgroups,
    thread_setresuid,
    unshare,
)

from kit.contract import Context, SignalChannel, WaitStatus
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig

NBS = ("CAP_NET_BIND_SERVICE",)


# --- 1. a long-lived helper thread of the master ------------------------------------------


class _RootRelay:
    """A master helper thread that regains euid 0 for itself (raw setresuid: this thread
    only) and keeps it until told to stop."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="scratch-umount-relay", daemon=True)
        self.thread.start()
        self.ready.wait(5.0)

    def _run(self) -> None:
        user = os.geteuid()
        raised = False
        try:
            thread_setresuid(-1, 0, -1)  # to unmount the container's leftovers at the end
            raised = True
        except OSError:
            pass
        self.ready.set()
        self.stop.wait()
        if raised:
            thread_setresuid(-1, user, -1)

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5.0)


class HelperThreadRegainsRoot(ScratchEngine):
    """A master helper thread started in create_container keeps euid 0 until cleanup.

    The hook's own thread is right at every entry and return; the helper ("umount relay",
    meant to unmount leftovers in cleanup_container) calls setresuid(-1, 0, -1) on itself at
    its start, so its effective uid is 0 and its effective set the full permitted set from
    create_container's return to cleanup_container's entry (it lowers them and ends there).
    Breaks SPEC §4, master in suid: "r=e=U, saved uid 0, effective caps empty at entry and
    again at return", with "Every rule of this table holds for every thread of the process,
    threads the engine started included, at every hook entry and return". Shows in suid and
    hybrid ("as suid, host user ns"); in root, userns and fakeroot the master has no saved
    root uid beside a non-root effective one, and the engine starts no relay.
    """

    engine_name = "blind7-cred-helper-thread-euid0"

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        self._relay = _RootRelay()
        if setuid_master():
            self._relay.start()

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        relay = getattr(self, "_relay", None)
        if relay is not None:
            relay.finish()


# --- 2. a worker thread of the RPC server -------------------------------------------------


class _LogWorkerRPC(ScratchRPC):
    """sethostname also starts, once, a log writer thread that raises CAP_DAC_OVERRIDE on
    itself (to write the container's log wherever it is) and lives as long as the server."""

    worker: ClassVar[threading.Thread | None] = None

    def sethostname(self, name: str) -> None:
        super().sethostname(name)
        if _LogWorkerRPC.worker is None:
            ready = threading.Event()
            t = threading.Thread(
                target=self._log_writer, args=(ready,), name="scratch-log", daemon=True
            )
            _LogWorkerRPC.worker = t
            t.start()
            ready.wait(5.0)

    @staticmethod
    def _log_writer(ready: threading.Event) -> None:
        try:
            eff, perm, inh = capget()
            if perm & bit(CAP_DAC_OVERRIDE):
                capset(eff | bit(CAP_DAC_OVERRIDE), perm, inh)
        finally:
            ready.set()
        threading.Event().wait()  # waits for log lines that never come; ends with the server


class RpcWorkerThreadKeepsCap(ScratchEngine):
    """A worker thread the RPC server's sethostname starts keeps CAP_DAC_OVERRIDE effective.

    The method's own thread returns with exactly the credentials it was entered with; the
    worker it starts (a log writer) raises CAP_DAC_OVERRIDE into its own effective set and
    lives until the server exits, so at sethostname's return, and at every later method
    entry and return, a thread of the RPC server holds a second effective capability.
    Breaks SPEC §4, RPC server in suid: "e=U, only CAP_SYS_ADMIN effective and a small
    bounding set; a method may raise more on its own thread and must restore them", with
    "Every rule of this table holds for every thread of the process, threads the engine
    started included, ... at every RPC method entry and return". Shows in suid and hybrid
    ("as suid, inside the container's user ns"); in root, userns and fakeroot the server's
    effective set is already full, so the raise changes nothing.
    """

    engine_name = "blind7-cred-rpc-worker-thread-cap"
    rpc_methods = _LogWorkerRPC

    def more_rpc(self, rpc: RPCClient) -> None:
        rpc.gethostname()


# --- 3. a grandchild process of the master ------------------------------------------------


def _close_fds_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


class DaemonGrandchildRoot(ScratchEngine):
    """A daemonised grandchild of the master regains uid 0 and lives until cleanup.

    create_container double-forks an "unmount daemon" (child forks, child exits at once, the
    grandchild lives on); the grandchild calls setresuid(0, 0, 0), which the master's saved
    uid 0 allows, then waits on a pipe for the end of the run. While create_container
    returns and post_start_process, monitor_container and cleanup_container run, a process
    the master's hook started holds host uid 0 (real, effective, saved) and a full effective
    set; cleanup_container closes the pipe and waits for it to be gone. The master's own
    threads are right throughout. Breaks SPEC §4, master in suid: "r=e=U, saved uid 0,
    effective caps empty at entry and again at return" — the master's work, done by a process
    its hook started, runs as host root ("Host privilege means a uid 0 (real, effective or
    saved) or any permitted capability while in the host user namespace"). Shows in suid and
    hybrid; in root, userns and fakeroot the grandchild lives on with the master's own
    credentials (no saved root uid to take back).
    """

    engine_name = "blind7-cred-grandchild-root"
    escapes = (
        "SPEC §4's rules are the hooked process's, for every thread of it: a process the "
        "master's hook started (here a double-forked grandchild, reparented away from the "
        "master) is not the master, and no sentence gives its credentials a rule; §11 judges "
        "it only if it outlives the run"
    )

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        stop_r, stop_w = os.pipe()
        gone_r, gone_w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                if os.fork() == 0:
                    try:
                        _close_fds_except({stop_r, gone_w})
                        if setuid_master():
                            os.setresuid(0, 0, 0)
                        os.read(stop_r, 1)  # EOF: the master closed its end
                    finally:
                        os._exit(0)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        os.close(stop_r)
        os.close(gone_w)
        self._daemon = (stop_w, gone_r)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        daemon = getattr(self, "_daemon", None)
        if daemon is None:
            return
        stop_w, gone_r = daemon
        os.close(stop_w)
        try:
            select.select([gone_r], [], [], 5.0)  # EOF once the grandchild is gone
        finally:
            os.close(gone_r)


# --- 4. an RPC method that keeps a supplementary group ------------------------------------


def _disk_gid() -> int:
    try:
        return grp.getgrnam("disk").gr_gid
    except KeyError:
        return 6


class _DiskGroupRPC(ScratchRPC):
    def probe_block_device(self, path: str) -> bool:
        """Whether ``path`` is a block device the container may read: the server joins the
        ``disk`` group for it (CAP_SETGID raised and lowered again, as it must be) and never
        leaves it."""
        if os.geteuid() != 0:
            eff, perm, inh = capget()
            if perm & bit(CAP_SETGID):
                capset(eff | bit(CAP_SETGID), perm, inh)
                try:
                    thread_setgroups([*os.getgroups(), _disk_gid()])
                except OSError:
                    pass  # a user namespace whose setgroups is denied
                finally:
                    capset(eff, perm, inh)
        try:
            return os.path.exists(path) and os.access(path, os.R_OK)
        except OSError:
            return False


class RpcMethodKeepsGroup(ScratchEngine):
    """An RPC method returns with the ``disk`` group added to the server's groups.

    probe_block_device raises CAP_SETGID on its thread, adds the ``disk`` group (gid 6) to
    the thread's supplementary groups, lowers CAP_SETGID again and returns: uids, gids and
    every capability set are as at entry, the groups are not. Breaks SPEC §4, RPC server in
    suid: "a method may raise more on its own thread and must restore them", with "A rule
    that says a hook 'changes no credential' compares the whole credential: uids and gids
    (r/e/s/fs), supplementary groups, ..." and "at every RPC method entry and return". Shows
    in suid. In hybrid (the other flow of that sentence) the server is uid 0 of a user
    namespace that maps no group but U's and denies setgroups, and skips the step, as in
    root and fakeroot; in userns setgroups is denied, the call fails and changes nothing.
    """

    engine_name = "blind7-cred-rpc-groups"
    rpc_methods = _DiskGroupRPC

    def more_rpc(self, rpc: RPCClient) -> None:
        rpc.probe_block_device(path="/dev/loop0")


# --- 5. the fs uid only ----------------------------------------------------------------------


class FsuidLeftRoot(ScratchEngine):
    """post_start_process returns with fsuid 0 (everything else put back).

    To read the payload's files as their owner, post_start_process calls setfsuid(0) on its
    thread (allowed without capabilities: the saved uid is 0), which also raises the
    file-system capabilities into the effective set; it then "puts its privileges back" by
    restoring the capability sets it saved, but never sets the fs uid back to U. At its
    return the hook's thread has r=e=U, saved 0, an empty effective set, and fs uid 0.
    Breaks SPEC §4, master in suid: "r=e=U, saved uid 0, effective caps empty at entry and
    again at return", read over "real/effective/saved/fs uid" ("A rule that says a hook
    'changes no credential' compares the whole credential: uids and gids (r/e/s/fs)"): the
    thread opens files as host uid 0. Shows in suid and hybrid; in root and fakeroot the fs
    uid is 0 already, in userns 0 is not mapped and setfsuid changes nothing.
    """

    engine_name = "blind7-cred-fsuid-root"

    def post_start_process(self, ctx: Context, pid: int) -> None:
        saved = capget()
        thread_setfsuid(0)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                f.read()
        except OSError:
            pass
        finally:
            capset(*saved)  # the fs uid stays 0


# --- 6. the saved uid only ------------------------------------------------------------------


class MonitorDropsSavedUid(ScratchEngine):
    """monitor_container sets its thread's saved uid to U (keeping its capabilities).

    To "harden" the thread that forwards signals, monitor_container drops the saved root uid
    of its own thread with setresuid(-1, -1, U), under PR_SET_KEEPCAPS so that it keeps its
    permitted capabilities (for kill(2)), and clears KEEPCAPS again: at its return the
    thread has r=e=U, an empty effective set, the full permitted set, securebits 0 — and
    saved uid U. Breaks SPEC §4, master in suid: "r=e=U, saved uid 0, effective caps empty
    at entry and again at return" (the saved uid is part of the state the table fixes; the
    thread still has every permitted capability, so the drop hardens nothing). Shows in suid
    and hybrid; in root the uid is 0 throughout and the engine skips it, in userns and
    fakeroot every uid is already the only mapped one.
    """

    engine_name = "blind7-cred-saved-uid-dropped"

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        if setuid_master():
            prctl(PR_SET_KEEPCAPS, 1)
            try:
                thread_setresuid(-1, -1, os.geteuid())
            finally:
                prctl(PR_SET_KEEPCAPS, 0)
        return super().monitor_container(pid, signals)


# --- 7, 8. one capability set of the payload ---------------------------------------------


class AmbientRaisedForPayload(ScratchEngine):
    """start_process raises CAP_NET_BIND_SERVICE into the ambient set before the exec.

    The engine gives stage 2 CAP_NET_BIND_SERVICE in its effective, permitted, inheritable
    and bounding sets (configured, allowed) and leaves the ambient set unset. Then, "so that
    the web server keeps its capability across exec as a non-root user", start_process
    raises it into the ambient set: the payload runs with a non-empty ambient set (and, as a
    non-root payload, CAP_NET_BIND_SERVICE permitted and effective: in the host user
    namespace in suid). Breaks SPEC §5: "A capability set the StarterConfig leaves unset is
    empty when stage 2 execs the payload, the bounding set included". Shows in every flow
    (root, suid, userns, fakeroot, hybrid).
    """

    engine_name = "blind7-cred-payload-ambient"
    payload_caps: ClassVar[dict[str, tuple[str, ...]]] = {
        kind: NBS for kind in ("effective", "permitted", "inheritable", "bounding")
    }

    def before_exec(self) -> None:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE)


class InheritableForPayload(ScratchEngine):
    """start_process copies its permitted set into the inheritable set before the exec.

    The engine gives stage 2 CAP_NET_BIND_SERVICE in its effective, permitted and bounding
    sets (configured, allowed) and leaves the inheritable set unset; start_process copies
    the permitted set into the inheritable one "so that a file-capability binary of the
    payload can use it", and the payload starts with CAP_NET_BIND_SERVICE inheritable.
    Breaks SPEC §5: "A capability set the StarterConfig leaves unset is empty when stage 2
    execs the payload, the bounding set included". Shows in every flow (root, suid, userns,
    fakeroot, hybrid).
    """

    engine_name = "blind7-cred-payload-inheritable"
    payload_caps: ClassVar[dict[str, tuple[str, ...]]] = {
        kind: NBS for kind in ("effective", "permitted", "bounding")
    }

    def before_exec(self) -> None:
        eff, perm, _ = capget()
        capset(eff, perm, perm)


# --- 9. the bounding set, in one flow --------------------------------------------------------


class FakerootNestedUserns(ScratchEngine):
    """In fakeroot, start_process unshares a nested user namespace: the payload's bounding set
    is full again.

    "So that the payload can run rootless tools inside the fakeroot container", start_process
    calls unshare(CLONE_NEWUSER) before the exec in the fakeroot flow only. The kernel gives
    a new user namespace's creator a full bounding set (and full capabilities there, which
    the exec as an unmapped non-root uid clears): the payload has no permitted, effective,
    inheritable or ambient capability, but every capability in its bounding set, though the
    engine configured none. Breaks SPEC §5: "A capability set the StarterConfig leaves unset
    is empty when stage 2 execs the payload, the bounding set included (as container runtimes
    drop every bounding capability that is not configured): a payload whose engine
    configured no capabilities has none, in every flow". Shows in fakeroot only.
    """

    engine_name = "blind7-cred-fakeroot-bounding"

    def before_exec(self) -> None:
        if self.cfg.flow == "fakeroot":
            unshare(CLONE_NEWUSER)


# --- 10. securebits ---------------------------------------------------------------------------


class KeepCapsLeftAfterFork(ScratchEngine):
    """post_start_process sets PR_SET_KEEPCAPS for a helper child and never clears it.

    post_start_process starts a short helper that runs as U with only CAP_KILL (to check the
    payload is alive); to keep a capability across the helper's setresuid(U, U, U) it sets
    PR_SET_KEEPCAPS before fork() — in the hook's own thread, which the child inherits —
    and never clears it there. The helper drops to CAP_KILL, checks, exits and is reaped:
    at the hook's return its thread has the right uids and capability sets, but securebits
    SECBIT_KEEP_CAPS, so a later uid change of the master keeps the full permitted set.
    Breaks SPEC §4, master in suid ("r=e=U, saved uid 0, effective caps empty at entry and
    again at return"), with "A rule that says a hook 'changes no credential' compares the
    whole credential: ... securebits". Shows in suid and hybrid; in root, userns and
    fakeroot the master has no saved root uid to drop and the engine starts no helper.
    """

    engine_name = "blind7-cred-keepcaps"
    escapes = (
        "SECBIT_KEEP_CAPS on a setuid master's thread adds no power: the thread already "
        "holds saved uid 0 and the full permitted set, and the master's row of §4 asks for "
        "r=e=U, saved uid 0 and an empty effective set, not for an unchanged credential"
    )

    def post_start_process(self, ctx: Context, pid: int) -> None:
        if not setuid_master():
            return
        user = os.geteuid()
        prctl(PR_SET_KEEPCAPS, 1)  # for the helper; the hook's thread keeps it too
        child = os.fork()
        if child == 0:
            code = 1
            try:
                os.setresuid(user, user, user)
                capset(0, bit(CAP_KILL), 0)
                os.kill(pid, 0)
                code = 0
            except BaseException:
                code = 2
            finally:
                os._exit(code)
        os.waitpid(child, 0)


# --- 11. no_new_privs in one flow -----------------------------------------------------------


class NoNewPrivsOnlyWithUserns(ScratchEngine):
    """no_new_privs is asked for only with a user namespace: the suid payload lacks it.

    The engine reasons that no_new_privs matters where the payload may be root of a user
    namespace, and sets it only in userns, fakeroot and hybrid. In suid, stage 2 (U in the
    host user namespace, no capabilities) and the payload run without no_new_privs: the
    payload can exec a setuid-root binary and become host root. Breaks SPEC §4, stage 2 in
    suid: "r=e=s=U (a target uid is ignored for a non-root caller); caps as configured
    (default none); no_new_privs set; no saved uid 0". Shows in suid only (no_new_privs is
    set in the other flows the table asks it for; root does not ask).
    """

    engine_name = "blind7-cred-suid-no-nnp"

    def configure_no_new_privs(self, sc: StarterConfig) -> None:
        if sc.flow in USERNS_FLOWS:
            sc.set_no_new_privs()


# --- 12. wrong at return, in one flow ----------------------------------------------------------


class HybridEarlyReturnKeepsCap(ScratchEngine):
    """In hybrid, create_container returns early with CAP_DAC_READ_SEARCH still effective.

    create_container raises CAP_DAC_READ_SEARCH on its own thread to look at the container's
    root through /proc/PID/root and lowers it afterwards, but an early return placed between
    the raise and the ``try``/``finally`` ("a hybrid container made its own user namespace:
    nothing of ours to inspect there") skips the lowering. Entry is right; at the return the
    hook's thread has one effective capability. Breaks SPEC §4, master in hybrid ("as suid"):
    "r=e=U, saved uid 0, effective caps empty at entry and again at return". Shows in hybrid
    only: in suid the raise is lowered again; in root, userns and fakeroot the master's
    effective set is full throughout and the engine raises nothing.
    """

    engine_name = "blind7-cred-hybrid-return-cap"

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        if not setuid_master():
            return
        eff, perm, inh = capget()
        capset(eff | bit(CAP_DAC_READ_SEARCH), perm, inh)
        if self.cfg.flow == "hybrid":
            return
        try:
            os.stat(f"/proc/{pid}/root/")
        except OSError:
            pass
        finally:
            capset(eff, perm, inh)
