"""Blind engines, round 3: one SPEC §3-§6 privilege bug each (``blind3_priv:X``)."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import pwd
import queue
import sys
import threading

from kit.rpc import RPCClient
from kit.system import linux
from reference_engines.minimal.engine import (
    FORWARDED_SIGNALS,
    MONITOR_POLL,
    ReferenceEngine,
)
from reference_engines.minimal.rpc import ReferenceRPC, check_path

NOBODY = 65534
CAP_DAC_OVERRIDE = linux.CAP_NUMBERS["CAP_DAC_OVERRIDE"]
CAP_NET_BIND = "CAP_NET_BIND_SERVICE"
#: Where a crashed run would have left its lock (never there: removing it is best effort).
LOCK_DIR = "/run"


def _setuid_role() -> bool:
    """The master (and the RPC server) of the setuid flows: r=e=U, saved uid 0."""
    _ruid, euid, suid = os.getresuid()
    return euid != 0 and suid == 0


def _root_in_host() -> bool:
    """Full root in the host user namespace: the root flow's stage 1, master, RPC server."""
    return os.getresuid() == (0, 0, 0) and linux.in_initial_user_namespace()


def _bits(mask: int) -> list[int]:
    return [i for i in range(64) if mask >> i & 1]


def _remove_stale_lock(container_id: str) -> None:
    """Remove the lock a crashed run of this container would have left (none here)."""
    try:
        os.unlink(os.path.join(LOCK_DIR, f"blind3-{container_id}.lock"))
    except OSError:
        pass  # no such lock: the usual case


class MonitorForwardRawRestore(ReferenceEngine):
    """Monitor forwards as root via os.seteuid (all threads), drops back on its own thread only.

    §4 master, suid/hybrid: "r=e=U, saved uid 0, effective caps empty at entry and again
    at return", for every thread of the process at every hook entry and return. To forward
    a signal to a container that may run as another uid, monitor_container takes euid 0
    with os.seteuid(0) -- glibc applies it to every thread of the master -- and drops back
    with the kit's thread-only helper (a raw setresuid on the monitor's own thread). The
    monitor's thread is U again; the main loop, start-waiter and any other thread keep euid
    0 with every permitted capability effective, seen at monitor_container's return and at
    cleanup_container's entry and return. Only runs that forward a signal show it."""

    engine_name = "blind3-monitor-forward-raw-restore"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                user = os.geteuid()
                raised = _setuid_role()
                if raised:
                    os.seteuid(0)  # glibc: every thread of the process
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass  # gone already: waitpid collects it
                finally:
                    if raised:
                        # The bug: a raw syscall, this thread only.
                        linux.thread_setresuid(-1, user, -1)
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class MasterRootWorkerThread(ReferenceEngine):
    """create_container starts a full-root worker thread (raw setresuid) that lives to cleanup.

    §4 master, suid/hybrid: "r=e=U, saved uid 0, effective caps empty at entry and again
    at return", and "Every rule of this table holds for every thread of the process,
    threads the engine started included". create_container starts a privileged worker
    thread ("privilege separation inside the master") that makes itself full root with a
    raw setresuid(0, 0, 0) -- its own thread only, so the hook's thread stays U -- and waits
    for jobs until cleanup_container, which hands it the removal of a stale lock and joins
    it. Every master hook entry and return after create_container's (monitor, post-start,
    cleanup entry) has one thread with uid 0 and a full effective set."""

    engine_name = "blind3-master-root-worker-thread"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        super().__init__()
        self.jobs: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.worker: threading.Thread | None = None

    def _serve_jobs(self) -> None:
        try:
            linux.thread_setresuid(0, 0, 0)
        except OSError:
            return
        while (job := self.jobs.get()) is not None:
            _remove_stale_lock(job)

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        super().create_container(ctx, pid, rpc_conn)
        if _setuid_role():
            self.worker = threading.Thread(target=self._serve_jobs, name="blind3-root", daemon=True)
            self.worker.start()

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        if self.worker is not None:
            self.jobs.put(self.common.container_id)
            self.jobs.put(None)
            self.worker.join(2)
            self.worker = None
        super().cleanup_container(ctx, fatal, status)


class _WorkdirRPC(ReferenceRPC):
    def make_workdir(self, path: str) -> None:
        """A scratch directory in the container's /tmp owned by the container's user, with
        that user's primary group."""
        check_path(path, "make_workdir")
        if self.system.name != "real":
            return  # the fake backend mounts no tmpfs: /tmp would be the host's
        cfg = self.engine.common.engine_config  # type: ignore[union-attr]
        uid = cfg.target_uid if cfg.target_uid is not None else os.getuid()
        try:
            entry = pwd.getpwuid(uid)
            name, gid = entry.pw_name, entry.pw_gid
        except KeyError:
            name, gid = None, os.getgid()
        groups = [gid]
        if name is not None:
            try:
                # The bug: meant as a look-up of the user's groups, initgroups sets them as
                # this process's own supplementary groups.
                os.initgroups(name, gid)
                groups = os.getgroups() or [gid]
            except OSError:
                pass  # no CAP_SETGID here: the primary group will do
        try:
            os.mkdir(path, 0o770)
        except FileExistsError:
            pass
        try:
            os.chown(path, uid, gid if gid in groups else groups[0])
        except OSError:
            pass  # not ours to give away (unprivileged flows): it is the user's already


class _WorkdirEngine(ReferenceEngine):
    """create_container also asks the RPC server for a scratch directory in /tmp."""

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        super().create_container(ctx, pid, rpc_conn)
        cfg = self.common.engine_config
        if cfg.mount_tmp:
            RPCClient(rpc_conn, self.common.engine_name).make_workdir(path="/tmp/.blind3-work")


class RpcInitgroupsLookup(_WorkdirEngine):
    """An RPC method "looks up" groups with os.initgroups, setting the server's own groups.

    §4 RPC server, root: "uid 0, container namespaces"; "a method may raise more on its
    own thread and must restore them", and a credential rule compares "the whole
    credential: uids and gids (r/e/s/fs), supplementary groups, ...". An extra RPC method
    makes a scratch directory in the container's /tmp for the container's user and "looks
    up" that user's groups with os.initgroups (meaning os.getgrouplist): the RPC server's
    own supplementary groups become root's ([] -> [0]) and stay so. Only the root flow
    shows it (elsewhere setgroups is refused and the method falls back)."""

    engine_name = "blind3-rpc-initgroups-lookup"
    rpc_methods = _WorkdirRPC


class StartProcessAmbientRoot(ReferenceEngine):
    """start_process raises the permitted caps as inheritable and ambient before exec (root).

    §5: "A capability set the StarterConfig leaves unset is empty when stage 2 execs the
    payload"; §4 payload: "as the kernel derives from stage 2" and stage 2 root "caps
    exactly as configured". The reference configures effective, permitted and bounding
    only; start_process copies the permitted set into inheritable and raises each one as
    ambient "so that a payload that drops to a user (su, gosu, setpriv) keeps them" (the
    docker --user habit): the root payload execs with 13 inheritable and 13 ambient
    capabilities nobody configured. Root flow only (elsewhere nothing is permitted)."""

    engine_name = "blind3-start-process-ambient-root"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd):  # type: ignore[no-untyped-def]
        eff, perm, inh = linux.capget()
        if perm and not inh:
            try:
                linux.capset(eff, perm, inh | perm)
                for cap in _bits(perm):
                    linux.ambient_raise(cap)
            except OSError:
                pass  # best effort: the payload runs without them
        super().start_process(master_fd)


class SuidPayloadNetBind(ReferenceEngine):
    """The suid payload gets CAP_NET_BIND_SERVICE ambient: a capability in the host user ns.

    §4 payload: "as the kernel derives from stage 2 (check: no host privilege in every
    flow but root)", with §4's "Host privilege means ... any permitted capability while in
    the host user namespace". Like Apptainer's --add-caps for an authorised user, in the
    setuid flow the engine grants the payload CAP_NET_BIND_SERVICE (effective, permitted,
    inheritable, ambient and bounding) "so that a web server may bind port 80; it is
    harmless". Stage 2 is "caps as configured", but the ambient capability survives the
    payload's exec: the payload runs as U in the host user namespace with a permitted
    capability. suid flow only (hybrid's payload is in a user namespace, unchanged)."""

    engine_name = "blind3-suid-payload-net-bind"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        super().prepare_config(starter_config)
        if starter_config.flow == "suid":
            for kind in ("effective", "permitted", "inheritable", "ambient", "bounding"):
                starter_config.set_capabilities(kind, [CAP_NET_BIND])


class NnpOnlyWithUserns(ReferenceEngine):
    """no_new_privs only with a user namespace: the suid payload may exec setuid-root binaries.

    §4 stage 2, suid: "r=e=s=U ...; caps as configured (default none); no_new_privs set;
    no saved uid 0", and the payload "no host privilege in every flow but root". The author
    asks for no_new_privs only where the container has a user namespace ("that is where a
    setuid binary could map to root; in the suid flow the payload is r=e=s=U with an empty
    bounding set, so a setuid-root binary gives it nothing"): the bounding set limits the
    capabilities, not the uid, so exec of a setuid-root binary makes the suid payload euid
    0 on the host. suid flow only; the user-namespace flows keep no_new_privs."""

    engine_name = "blind3-nnp-only-with-userns"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        super().prepare_config(starter_config)
        sc = starter_config
        sc.set_no_new_privs(sc.uses_namespace("user"))


class HybridMapsHostRoot(ReferenceEngine):
    """hybrid maps host root to the container's nobody (65534->0) besides 0->U.

    §3 hybrid: "fakeroot requested" (fakeroot: "map 0→U (+ subordinate range when
    newuidmap is available)"), §4 RPC server hybrid "as suid, inside the container's user
    ns" and "Host privilege means a uid 0 ... while in the host user namespace". The
    privileged master writes the maps, so besides 0→U the engine maps the host's root to
    the container's nobody (65534→0, uid and gid) "so that root-owned files show as
    nobody:nogroup rather than the overflow ids, and chown to nobody works inside": a
    process of the container that may setuid (the RPC server keeps CAP_SETUID permitted),
    or a setuid binary owned by host root (it now has an owner inside), becomes host uid
    0. hybrid flow only."""

    engine_name = "blind3-hybrid-maps-host-root"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        super().prepare_config(starter_config)
        if starter_config.flow == "hybrid":
            starter_config.add_uid_mappings([(NOBODY, 0, 1)])
            starter_config.add_gid_mappings([(NOBODY, 0, 1)])


class Stage1PoolWorkerRealUid(ReferenceEngine):
    """prepare_config (root) leaves a pool worker thread with real uid nobody.

    §4 stage 1, root: "uid 0, full caps", for every thread ("threads the engine started
    included") at prepare_config's return; "Host privilege means a uid 0 (real, effective
    or saved)". prepare_config checks, on a worker of a thread pool ("so as not to disturb
    the main thread"), that the payload is executable by an unprivileged container user:
    os.access tests the real uid, so the worker sets its own real uid to nobody (raw
    setresuid, that thread only) and never sets it back -- the worker stays idle in the
    pool, and prepare_config returns with a thread whose real uid is 65534. Root flow only."""

    engine_name = "blind3-stage1-pool-worker-real-uid"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        super().__init__()
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blind3-check")

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        super().prepare_config(starter_config)
        if starter_config.flow != "root" or not _root_in_host():
            return
        cfg = self.common.engine_config
        uid = cfg.target_uid if cfg.target_uid else NOBODY
        path = cfg.argv[0]

        def executable_as_user() -> bool:
            try:
                linux.thread_setresuid(uid, -1, -1)  # the bug: never set back
            except OSError:
                return True  # cannot tell: do not warn
            return os.access(path, os.X_OK)

        if not self.pool.submit(executable_as_user).result(5):
            sys.stderr.write(f"warning: {path} is not executable by uid {uid}\n")


class _PoolRPC(ReferenceRPC):
    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        super().__init__(engine)
        # Blocking file-system checks go to a worker, "so a hung NFS path cannot wedge the
        # server".
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blind3-io")

    def _is_dir(self, path: str) -> bool:
        eff, perm, inh = linux.capget()
        if perm >> CAP_DAC_OVERRIDE & 1 and not eff >> CAP_DAC_OVERRIDE & 1:
            try:
                # The bug: raised on the (long-lived) worker thread and never lowered.
                linux.capset(eff | 1 << CAP_DAC_OVERRIDE, perm, inh)
            except OSError:
                pass
        return os.path.isdir(path)

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        full = check_path(target, "mount target")
        if not self.pool.submit(self._is_dir, full).result(5):
            raise FileNotFoundError(errno.ENOENT, f"mount: target {target!r} is not a directory")
        super().mount(source, target, fstype, flags, data)


class RpcPoolWorkerDac(ReferenceEngine):
    """An RPC pool worker raises CAP_DAC_OVERRIDE and keeps it, idle, past the method's return.

    §4 RPC server, suid/hybrid: "e=U, only CAP_SYS_ADMIN effective ...; a method may
    raise more on its own thread and must restore them", at every RPC method entry and
    return, for every thread ("threads the engine started included"). The RPC methods do
    their blocking file-system checks on a one-thread pool; the mount method's worker
    raises CAP_DAC_OVERRIDE "to see through the user's permissions" and keeps it: the
    serving thread is clean, the idle worker keeps a second effective capability from the
    first mount's return on. suid and hybrid (root and fakeroot have it effective
    anyway)."""

    engine_name = "blind3-rpc-pool-worker-dac"
    rpc_methods = _PoolRPC


class CleanupFailureSetuidDrop(ReferenceEngine):
    """After a failed run cleanup drops back from euid 0 with os.setuid: saved uid 0 is lost.

    §4 master, suid/hybrid: "r=e=U, saved uid 0 ...; escalation possible" at every hook
    entry and return, cleanup_container's return included, on §2's error paths too. After
    a failed run (a fatal error, or a payload that did not exit 0) cleanup_container takes
    euid 0 (os.seteuid, allowed by the saved uid) to remove a stale root-owned lock, then
    "drops back" with os.setuid(U): called with euid 0, setuid sets the real, effective
    and saved uids, so the master returns from cleanup with r=e=s=U and no permitted
    capability. Runs that end well are clean."""

    engine_name = "blind3-cleanup-failure-setuid-drop"
    rpc_methods = ReferenceRPC

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        super().cleanup_container(ctx, fatal, status)
        failed = fatal is not None or status is None or os.waitstatus_to_exitcode(status) != 0
        if failed and _setuid_role():
            user = os.getuid()
            os.seteuid(0)
            try:
                _remove_stale_lock(self.common.container_id)
            finally:
                os.setuid(user)  # the bug: as euid 0 this also sets the saved uid


class _ChownTmpRPC(ReferenceRPC):
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        super().mount(source, target, fstype, flags, data)
        if fstype == "tmpfs" and _setuid_role():
            # Give the container's /tmp to the invoking user, "as root for a moment".
            user = os.geteuid()
            os.seteuid(0)
            try:
                os.chown(self._host_path(target, "mount target"), user, os.getegid())
            finally:
                # The bug: euid 0 -> U clears the whole effective set; CAP_SYS_ADMIN is
                # not raised again.
                os.seteuid(user)


class RpcSeteuidDanceLosesSysAdmin(ReferenceEngine):
    """A seteuid(0)/seteuid(U) dance in an RPC method clears CAP_SYS_ADMIN from effective.

    §4 RPC server, suid: "e=U, only CAP_SYS_ADMIN effective ...; a method may raise more
    on its own thread and must restore them", at every RPC method entry and return. After
    mounting the tmpfs, the mount method gives /tmp to the user by becoming euid 0 for a
    moment (seteuid(0), chown, seteuid(U)): the kernel clears the effective set when the
    euid leaves 0, so the method returns with no effective capability at all (CAP_SYS_ADMIN
    lost). The /tmp mount is the last call, so the run itself succeeds. suid flow only."""

    engine_name = "blind3-rpc-seteuid-dance-loses-sys-admin"
    rpc_methods = _ChownTmpRPC


class _UserWorkerRPC(ReferenceRPC):
    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        super().__init__(engine)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blind3-as-user")

    def _mkdir_as(self, path: str, uid: int) -> None:
        """mkdir as ``uid`` on this worker thread only, then back to root, capabilities
        and all (keep-caps keeps the permitted set across the uid change)."""
        if os.geteuid() != 0:
            os.makedirs(path, 0o755, exist_ok=True)  # already the user
            return
        linux.set_keepcaps(True)  # the bug: never cleared on this (long-lived) thread
        try:
            linux.thread_setresuid(uid, uid, uid)
        except OSError:
            os.makedirs(path, 0o755, exist_ok=True)  # uid not mapped here: as ourselves
            return
        try:
            os.makedirs(path, 0o755, exist_ok=True)
        finally:
            _eff, perm, inh = linux.capget()
            linux.capset(perm, perm, inh)  # CAP_SETUID effective again, to go back
            linux.thread_setresuid(0, 0, 0)

    def make_workdir(self, path: str) -> None:
        """A scratch directory in the container's /tmp owned by nobody, made as nobody (no
        chown race) on the server's worker thread."""
        check_path(path, "make_workdir")
        if self.system.name != "real":
            return  # the fake backend mounts no tmpfs: /tmp would be the host's
        self.pool.submit(self._mkdir_as, path, NOBODY).result(5)


class RpcUserWorkerKeepcaps(_WorkdirEngine):
    """An RPC worker thread's keep-caps uid dance restores uids and caps but not keep-caps.

    §4 RPC server: "a method may raise more on its own thread and must restore them",
    for every thread at every RPC method entry and return, where the credential compared
    includes "securebits"; root flow: "uid 0". An extra RPC method makes a directory in
    the container's /tmp as nobody, on a long-lived worker thread, with the classic C-daemon
    dance: PR_SET_KEEPCAPS, setresuid to nobody (raw: that thread only), mkdir, raise the
    kept capabilities, setresuid back to 0. uids and capability sets come back whole; the
    keep-caps securebit stays set on the idle worker from the method's return on. Root,
    fakeroot and hybrid (wherever the server's euid is 0: the bit is set before a setresuid
    that fails where nobody is not mapped)."""

    engine_name = "blind3-rpc-user-worker-keepcaps"
    escapes: str = (
        "beyond what the kernel shows: a thread's securebits are read only by the "
        "thread itself (prctl PR_GET_SECUREBITS; /proc has no securebits line), so the "
        "kit reads them for the thread that takes each snapshot, never for an idle "
        "worker"
    )
    rpc_methods = _UserWorkerRPC
