"""Blind engines, round 2: one SPEC §3-§5 privilege or namespace bug each (``blind2_priv:X``)."""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import threading

from kit.system import linux
from reference_engines.minimal.engine import (
    FORWARDED_SIGNALS,
    MONITOR_POLL,
    ReferenceEngine,
)
from reference_engines.minimal.rpc import ReferenceRPC

_libc = ctypes.CDLL(None, use_errno=True)
NOBODY = 65534
SYS_PTRACE = 1 << linux.CAP_NUMBERS["CAP_SYS_PTRACE"]
SYS_MODULE = linux.CAP_NUMBERS["CAP_SYS_MODULE"]
PR_SET_SECUREBITS = 28
SECBIT_NO_SETUID_FIXUP = 1 << 2


def _setuid_master() -> bool:
    """The master of the setuid flows (suid, hybrid): r=e=U, saved uid 0."""
    _ruid, euid, suid = os.getresuid()
    return euid != 0 and suid == 0


def _root_in_host() -> bool:
    """Full root in the host user namespace: the root flow's master, RPC server, stage 1."""
    return os.getresuid() == (0, 0, 0) and linux.in_initial_user_namespace()


class MonitorForwardLosesSaved(ReferenceEngine):
    """§4 master, suid/hybrid: "r=e=U, saved uid 0 ...; escalation possible", at every hook
    entry and return. To forward a signal monitor_container becomes root with setreuid(-1, 0)
    and "drops back" with setreuid(U, U): that also sets the saved uid to U, so the master
    has lost its saved uid 0 (and every permitted capability) for the rest of the run. Only
    the runs that forward a signal show it."""

    engine_name = "blind2-monitor-forward-loses-saved"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                user = os.getuid()
                raised = False
                if _setuid_master():
                    os.setreuid(-1, 0)
                    raised = True
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                if raised:
                    os.setreuid(user, user)  # the bug: the saved uid follows the new euid
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class CleanupDropsForGood(ReferenceEngine):
    """§4 master, suid/hybrid: "r=e=U, saved uid 0 ...; escalation possible", at every hook
    entry and return (cleanup_container's return included). cleanup_container "drops
    privilege for good" before the master exits: setresuid(U, U, U) through glibc, every
    thread, so cleanup_container returns without the saved uid 0."""

    engine_name = "blind2-cleanup-drops-for-good"
    rpc_methods = ReferenceRPC

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        super().cleanup_container(ctx, fatal, status)
        if _setuid_master():
            user = os.getuid()
            os.setresuid(user, user, user)


class RootMasterFsuidNobody(ReferenceEngine):
    """§4 master, root: "uid 0" (real, effective, saved and fs uid, every thread).
    create_container switches its thread's fs uid to nobody to write a state file a user
    may delete, and never switches it back."""

    engine_name = "blind2-root-master-fsuid-nobody"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        super().create_container(ctx, pid, rpc_conn)
        if _root_in_host():
            linux.thread_setfsuid(NOBODY)  # the bug: no setfsuid(0) afterwards


class Stage1RootRealUidNobody(ReferenceEngine):
    """§4 stage 1, root: "uid 0, full caps" ("Host privilege means a uid 0 (real, effective
    or saved)"). prepare_config sets its real uid to nobody ("so that what stage 1 starts
    is charged to nobody"), keeping effective and saved uid 0 and every capability."""

    engine_name = "blind2-stage1-root-real-uid-nobody"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        super().prepare_config(starter_config)
        if starter_config.flow == "root":
            os.setreuid(NOBODY, -1)


class _BoundingDropRPC(ReferenceRPC):
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        # The bug: "defence in depth" before mounting: CAP_SYS_MODULE leaves the serving
        # thread's bounding set for good (a bounding set cannot be raised again).
        if linux.bounding_has(SYS_MODULE):
            try:
                linux.bounding_drop(SYS_MODULE)
            except OSError:
                pass  # no CAP_SETPCAP: the unprivileged flows
        super().mount(source, target, fstype, flags, data)


class RpcMethodDropsBounding(ReferenceEngine):
    """§4 RPC server: "a method may raise more on its own thread and must restore them";
    "changes no credential" compares the whole credential, the five capability sets (the
    bounding set among them). The mount method drops CAP_SYS_MODULE from its thread's
    bounding set and returns so."""

    engine_name = "blind2-rpc-method-drops-bounding"
    rpc_methods = _BoundingDropRPC


class _NsCapsRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        if not linux.in_initial_user_namespace():
            # The bug: "capabilities in a user namespace are harmless", so the method raises
            # every permitted one and does not bother lowering them.
            _eff, perm, inh = linux.capget()
            try:
                linux.capset(perm, perm, inh)
            except OSError:
                pass
        super().sethostname(name)


class RpcMethodKeepsNsCaps(ReferenceEngine):
    """§4 RPC server, hybrid: "as suid, inside the container's user ns" (suid: "only
    CAP_SYS_ADMIN effective ...; a method may raise more on its own thread and must restore
    them"). sethostname raises every permitted capability when the server is in a user
    namespace of its own and leaves them raised: only the user-namespace flows show it."""

    engine_name = "blind2-rpc-method-keeps-ns-caps"
    rpc_methods = _NsCapsRPC


class _HostNetRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        try:
            # The bug: reads the host's routes from pid 1's network namespace on the
            # serving thread and never goes back to the container's.
            fd = os.open("/proc/1/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                linux.setns(fd, linux.CLONE_NEWNET)
            finally:
                os.close(fd)
            with open("/proc/thread-self/net/route", "rb") as f:
                f.read()
        except OSError:
            pass  # not allowed in this flow: no routes to copy
        super().sethostname(name)


class RpcMethodLeavesNetNs(ReferenceEngine):
    """§4 namespaces: "stage 2 and the RPC server share all seven namespace inodes", for
    every thread at every RPC method entry and return. sethostname enters the host's net
    namespace on its thread (to read the routes) and stays there."""

    engine_name = "blind2-rpc-method-leaves-net-ns"
    rpc_methods = _HostNetRPC


class FakerootGidMapIdentity(ReferenceEngine):
    """§3 fakeroot: "map 0→U" (the gid map too). The gid mapping is copied from the userns
    branch: the container's uid 0 is U, but its gid map is U's gid to itself."""

    engine_name = "blind2-fakeroot-gid-map-identity"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        sc = starter_config
        if sc.flow != "fakeroot":
            return super().prepare_config(sc)
        orig = sc.add_gid_mappings

        def gid_identity(mappings):  # type: ignore[no-untyped-def]
            orig([(sc.invoker_gid, sc.invoker_gid, 1)])

        sc.add_gid_mappings = gid_identity
        try:
            super().prepare_config(sc)
        finally:
            del sc.add_gid_mappings


class HybridGidMapSystemGroups(ReferenceEngine):
    """§3 hybrid: "fakeroot requested" (fakeroot: "map 0→U", "+ subordinate range when
    newuidmap is available"); §4 stage 2 hybrid: "as fakeroot". The privileged master
    writes the maps, so besides 0→U the engine maps the host's system groups 1-100 to
    themselves ("so that ls -l shows their names"): container root can take the host's
    adm, disk or shadow group."""

    engine_name = "blind2-hybrid-gid-map-system-groups"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        super().prepare_config(starter_config)
        if starter_config.flow == "hybrid":
            starter_config.add_gid_mappings([(1, 1, 100)])


class MasterLateTimerEuid(ReferenceEngine):
    """§4 master, suid/hybrid: "r=e=U, saved uid 0", every thread at every hook entry and
    return. create_container arms a timer that, a moment after it returned, takes effective
    uid 0 through libc's seteuid (ctypes: every thread) to read a root-only file and, when
    the read fails, never gives it back."""

    engine_name = "blind2-master-late-timer-euid"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        super().create_container(ctx, pid, rpc_conn)
        if not _setuid_master():
            return
        user = os.getuid()

        def late() -> None:
            if _libc.seteuid(0) != 0:
                return
            with open("/run/blind2-engine.state", "rb") as f:  # missing: raises, no restore
                f.read()
            _libc.seteuid(user)

        timer = threading.Timer(0.05, late)
        timer.daemon = True
        timer.start()


class PostStartExecutorCaps(ReferenceEngine):
    """§4 master, suid/hybrid: "effective caps empty at entry and again at return", for
    every thread ("threads the engine started included"). post_start_process hands a read
    of the payload's environment to a thread pool; the worker raises CAP_SYS_PTRACE, reads,
    and stays idle in the pool with the capability still effective."""

    engine_name = "blind2-post-start-executor-caps"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        super().__init__()
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blind2-pool")

    def post_start_process(self, ctx, pid):  # type: ignore[no-untyped-def]
        def read_environ() -> bytes:
            eff, perm, inh = linux.capget()
            if perm & SYS_PTRACE:
                linux.capset(eff | SYS_PTRACE, perm, inh)  # the bug: never lowered
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    return f.read()
            except OSError:
                return b""

        self.pool.submit(read_environ).result(5)


class MonitorJoinsContainerUts(ReferenceEngine):
    """§4 namespaces: "the master shares none of pid/net/uts/ipc/cgroup with them", for
    every thread. monitor_container enters the container's uts namespace on its own thread
    (to log the container's hostname with every signal) and stays there until it returns."""

    engine_name = "blind2-monitor-joins-container-uts"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        try:
            fd = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
            try:
                linux.setns(fd, linux.CLONE_NEWUTS)
            finally:
                os.close(fd)
        except OSError:
            pass  # no CAP_SYS_ADMIN here: log the master's name instead
        return super().monitor_container(pid, signals)


class _EgidRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        if _root_in_host():
            # Writes a marker as the user and restores the euid only: the egid (glibc,
            # every thread) stays nogroup.
            os.setegid(NOBODY)
            os.seteuid(NOBODY)
            try:
                pass  # the marker file: dropped since, the uid dance stayed
            finally:
                os.seteuid(0)
        super().sethostname(name)


class RpcMethodLeavesEgid(ReferenceEngine):
    """§4 RPC server, root: "uid 0"; "a method may raise more ... and must restore them"
    and "changes no credential" compares "uids and gids (r/e/s/fs)". sethostname switches
    effective uid and gid to nobody for a file and restores only the uid."""

    engine_name = "blind2-rpc-method-leaves-egid"
    rpc_methods = _EgidRPC


class MasterRootHelperChild(ReferenceEngine):
    """§4 master, suid/hybrid: "r=e=U, saved uid 0, effective caps empty" with "every
    process of the role": create_container forks a privileged helper child of the master
    that becomes full root (setresuid(0, 0, 0)) and waits for work until cleanup_container
    tells it to go."""

    engine_name = "blind2-master-root-helper-child"
    rpc_methods = ReferenceRPC
    escapes: str = (
        "SPEC question: §4 states the master row 'for every thread of the process'; is a "
        "child process the master forks (here full root, alive from create_container to "
        "cleanup_container, changing nothing on the host) bound by it? The suite judges the "
        "hooked processes' threads only. (Its first version, whose child kept the master's "
        "RPC connection, hung the whole session: the RPC server never saw EOF, stage 2 never "
        "started, and no hook was running for a hook timeout to fire.)"
    )

    def __init__(self) -> None:
        super().__init__()
        self.helper: tuple[int, int] | None = None

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        super().create_container(ctx, pid, rpc_conn)
        if not _setuid_master():
            return
        rd, wr = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                # Keeps only its pipe: a helper holding the master's RPC connection would
                # keep the RPC server (and so stage 2) waiting.
                os.closerange(3, rd)
                os.closerange(rd + 1, 1 << 16)
                os.setresuid(0, 0, 0)
                os.read(rd, 1)
            finally:
                os._exit(0)
        os.close(rd)
        self.helper = (child, wr)

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        if self.helper is not None:
            child, wr = self.helper
            os.close(wr)
            os.waitpid(child, 0)
            self.helper = None
        super().cleanup_container(ctx, fatal, status)


class PostStartNoNewPrivs(ReferenceEngine):
    """§4 master, suid/hybrid: "escalation possible" (the probes: setresuid to 0, raising a
    permitted capability, exec of a setuid-root binary, "each way tried on its own").
    post_start_process sets no_new_privs on its thread before running a notification helper
    ("hardening"): from then on no setuid binary raises that thread."""

    engine_name = "blind2-post-start-no-new-privs"
    rpc_methods = ReferenceRPC
    escapes: str = (
        "SPEC question: §4 'escalation possible' (setuid master): must every probe way "
        "(setresuid to 0, raising a permitted capability, exec of a setuid-root binary) "
        "succeed, or one? With no_new_privs on one master thread only the setuid exec fails; "
        "PRIV-MASTER-003 reads 'possible' as any way, probed from the hooked thread at hook "
        "entry (the start waiter's thread, which sets it after its entry and then ends)."
    )

    def post_start_process(self, ctx, pid):  # type: ignore[no-untyped-def]
        if _setuid_master():
            linux.set_no_new_privs()


class Stage1RootLowersEffective(ReferenceEngine):
    """§4 stage 1, root: "uid 0, full caps". prepare_config follows "least privilege": it
    lowers every capability from its effective set and keeps them permitted, to raise one
    when it needs it, and returns like that (nothing is lost: they are still permitted)."""

    engine_name = "blind2-stage1-root-lowers-effective"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        super().prepare_config(starter_config)
        if starter_config.flow == "root":
            _eff, perm, inh = linux.capget()
            linux.capset(0, perm, inh)


class StartProcessNoSetuidFixup(ReferenceEngine):
    """§4 payload: "as the kernel derives from stage 2"; "changes no credential" compares
    the whole credential (securebits among it). start_process (root flow) sets
    SECBIT_NO_SETUID_FIXUP before the exec "so that a payload that drops to a user keeps
    its capabilities": the bit survives exec, the capability sets do not change."""

    engine_name = "blind2-start-process-no-setuid-fixup"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd):  # type: ignore[no-untyped-def]
        try:
            linux.prctl(PR_SET_SECUREBITS, linux.get_securebits() | SECBIT_NO_SETUID_FIXUP)
        except OSError:
            pass  # no CAP_SETPCAP (the unprivileged flows): nothing to keep
        super().start_process(master_fd)


class Stage1ProbesUserns(ReferenceEngine):
    """§4 stage 1: "uid 0, full caps" (root), "U, no host privilege" (the others), at
    prepare_config's return; §2 rule 2 (prepare_config runs "before any container
    namespace exists"). prepare_config checks that user namespaces work here by unsharing
    one in stage 1 itself (not in a child): it returns in a user namespace of its own,
    with no uid map (uid 65534)."""

    engine_name = "blind2-stage1-probes-userns"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        super().prepare_config(starter_config)
        try:
            linux.unshare(linux.CLONE_NEWUSER)
        except OSError:
            pass  # no user namespaces here: the userns flows will say so


class Stage2InitNoRoot(ReferenceEngine):
    """§4 stage 2, root: "caps exactly as configured"; payload: "as the kernel derives from
    stage 2". init_config, in the container process (pid 1 of its pid namespace, root flow),
    sets SECBIT_NOROOT "to harden the container": stage 2 keeps its configured capability
    sets, but exec gives the uid-0 payload none of them."""

    engine_name = "blind2-stage2-init-noroot"
    rpc_methods = ReferenceRPC
    escapes: str = (
        "SPEC question: stage 2's row names its uids and capability sets, not its "
        "securebits; the payload row is 'as the kernel derives from stage 2', which holds "
        "(SECBIT_NOROOT was set before start_process began, so exec rightly gives nothing). "
        "Does 'caps exactly as configured' mean the sets only, or what the payload gets?"
    )

    def init_config(self, common, privileged_stage1):  # type: ignore[no-untyped-def]
        super().init_config(common, privileged_stage1)
        if os.getpid() == 1 and _root_in_host():
            try:
                linux.prctl(PR_SET_SECUREBITS, linux.get_securebits() | 1)  # SECBIT_NOROOT
            except OSError:
                pass  # no CAP_SETPCAP configured: nothing to harden
