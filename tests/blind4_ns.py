"""Blind engines, round 4: one SPEC §2/§4/§7 namespace or identity bug each (``blind4_ns:X``).

The area: which namespaces (and which root directory) each process and each thread of a run
is in, the user namespace that makes "host privilege", the pids the engine hands around, and
what monitor_container reaps. Every engine is the reference (or the bind-rootfs example) with
one realistic mistake; each docstring quotes the SPEC sentence it breaks and says in which
flows and runs it shows. Nothing here writes outside namespaces the run made itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

from kit import system
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig
from kit.system import linux
from reference_engines.bind_rootfs.engine import BindRootfsEngine
from reference_engines.bind_rootfs.rpc import BindRootfsRPC
from reference_engines.minimal.engine import (
    FORWARDED_SIGNALS,
    GUARDED_NAMESPACES,
    MONITOR_POLL,
    ReferenceConfig,
    ReferenceEngine,
    validate_config,
)
from reference_engines.minimal.rpc import ReferenceRPC, check_path, hostname_error, refuse

SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")


@contextlib.contextmanager
def _raised(*names: str) -> Iterator[None]:
    """Raise ``names`` from the calling thread's permitted set into its effective set for
    the block when they are not effective already (the setuid master and RPC server), and
    put the three sets back afterwards. Elsewhere (root, a user namespace's root) a no-op."""
    eff, perm, inh = linux.capget()
    want = linux.caps_to_mask(names) & perm & ~eff
    if want:
        linux.capset(eff | want, perm, inh)
    try:
        yield
    finally:
        if want:
            linux.capset(eff, perm, inh)


def _ns_flag(kind: str) -> int:
    return linux.NAMESPACES[kind][0]


def _open_ns(pid: int | str, kind: str) -> int:
    """A descriptor of process ``pid``'s namespace of ``kind`` (``/proc/PID/ns/...``)."""
    with _raised("CAP_SYS_PTRACE"):  # the container process may not be dumpable
        return os.open(linux.ns_path(kind, pid), os.O_RDONLY | os.O_CLOEXEC)


def _join(fd: int, kind: str) -> None:
    """setns(2) of the calling thread into the namespace behind ``fd``."""
    with _raised("CAP_SYS_ADMIN"):
        linux.setns(fd, _ns_flag(kind))


def _link_flags(sock: socket.socket, ifname: str) -> int:
    """SIOCGIFFLAGS of ``ifname`` in the network namespace ``sock`` was made in."""
    raw = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, _IFREQ.pack(ifname.encode(), 0))
    return int(_IFREQ.unpack(raw)[1])


# --- stage 2 and the RPC server: "share all seven namespace inodes and their root" ---------


class _UnsharedFsChrootRPC(BindRootfsRPC):
    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        # The bug: "the methods chdir() into the new root to resolve paths; with CLONE_FS
        # that would move the container process's cwd too", so the server stops sharing
        # its fs_struct (root and cwd) with the container process.
        linux.unshare(linux.CLONE_FS)

    def pivot_root(self, new_root: str) -> None:
        """Enter the container root made by make_root, with chroot(2) (pivot_root(2)
        refuses roots that are not mount points in some setups)."""
        what = "pivot_root"
        check_path(new_root, what)
        self._need_namespace("mount", what)
        if self.pivoted:
            raise refuse(f"{what}: already done")
        if self.root is None or new_root != self.root:
            raise refuse(
                f"{what}: {new_root!r} is not the container root made by make_root ({self.root!r})"
            )
        self.system.chdir(new_root)
        with _raised("CAP_SYS_CHROOT"):
            self.system.chroot(".")
        self.system.chdir("/")
        self.root = "/"
        self.pivoted = True


class RpcUnsharedFsChroot(BindRootfsEngine):
    """The RPC server unshares CLONE_FS, then chroots into the container root alone.

    §4: "stage 2 and the RPC server share all seven namespace inodes and their root
    directory"; §2: the container side "forks RPC server sharing its root/cwd (CLONE_FS)".
    The bind-rootfs example, entering its root with chroot instead of pivot_root. The
    author's RPC methods chdir() a lot, so the methods class unshares CLONE_FS when it is
    built "so that the container process's cwd is left alone". chroot then changes only the
    RPC server's root: stage 2 starts on the host's root (the container root's mounts were
    made in its mount namespace, but it never enters them) and the payload runs there. Every
    flow, every run (after create_container's last RPC call the RPC server's root is the
    tmpfs, stage 2's is the host's /)."""

    engine_name = "blind4-ns-rpc-unshared-fs-chroot"
    rpc_methods = _UnsharedFsChrootRPC


class _LateCgroupNsRPC(ReferenceRPC):
    def enter_cgroup_namespace(self) -> bool:
        """Make the container's cgroup namespace, now that its cgroup is set up (runc
        creates it after placing the process in its cgroup, so that the namespace's root
        is the container's cgroup)."""
        try:
            # The bug: unshare changes the caller's namespace -- the RPC server's -- not
            # the container process's.
            self.system.unshare(["cgroup"])
        except OSError:
            return False
        return True


class RpcLateCgroupNamespace(ReferenceEngine):
    """The cgroup namespace is made late, by the RPC server, for "the container".

    §4: "stage 2 and the RPC server share all seven namespace inodes ...; the master shares
    none of pid/net/uts/ipc/cgroup with them"; §5: "net, uts, ipc, cgroup, mount in the
    container side". Like runc, the author wants the container's cgroup namespace created
    only once the container sits in its cgroup, so prepare_config leaves "cgroup" out of the
    starter's flags and create_container asks the RPC server, last, to unshare it. That
    moves the RPC server alone: stage 2 stays in the starter's cgroup namespace (the
    master's, the host's), and the RPC server returns from the call in a cgroup namespace
    nobody else has. Every flow, every run."""

    engine_name = "blind4-ns-rpc-late-cgroup-namespace"
    rpc_methods = _LateCgroupNsRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        _prepare(self, starter_config, created_late=("cgroup",))

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        cfg: ReferenceConfig = self.common.engine_config
        if "cgroup" in cfg.namespaces:
            RPCClient(rpc_conn, self.common.engine_name).enter_cgroup_namespace()


def _try_new_netns() -> bool:
    """On a pool worker: can a network namespace be made here and its lo brought up?"""
    try:
        # The bug: unshare changes this thread only -- as intended -- but the thread is a
        # pool worker, which lives on in the scratch namespace after the task.
        linux.unshare(linux.CLONE_NEWNET)
        linux.link_up("lo")
    except OSError:
        return False
    return True


class _NestedNetProbeRPC(ReferenceRPC):
    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blind4-probe")

    def nested_network(self) -> bool:
        """Whether the payload can make network namespaces of its own (nested runtimes),
        tried on a worker thread so that the serving thread stays where it is."""
        return self._pool.submit(_try_new_netns).result(5)


class RpcPoolWorkerScratchNetns(ReferenceEngine):
    """An RPC pool worker unshares a scratch network namespace and stays in it.

    §4: "stage 2 and the RPC server share all seven namespace inodes", and "Every rule of
    this table holds for every thread of the process, threads the engine started included,
    ... at every RPC method entry and return". create_container first asks the RPC server
    whether nested network namespaces work (to tell the user before a nested runtime
    fails). The method knows unshare is per thread and tries it on a worker thread -- of a
    thread pool, whose worker does not end with the task: from that call's return on, a
    thread of the RPC server is in a network namespace stage 2 does not share (every later
    method entry and return: sethostname, the mounts). Every flow, every run."""

    engine_name = "blind4-ns-rpc-pool-worker-scratch-netns"
    rpc_methods = _NestedNetProbeRPC

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        RPCClient(rpc_conn, self.common.engine_name).nested_network()
        super().create_container(ctx, pid, rpc_conn)


class _ScratchUtsRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        """Set the container's hostname, tried first in a scratch uts namespace so that a
        name the kernel refuses leaves the container's untouched."""
        if hostname_error(name) is None:
            self._try_in_scratch(name)
        super().sethostname(name)

    def _try_in_scratch(self, name: str) -> None:
        try:
            self.system.unshare(["uts"])
        except OSError:
            return  # cannot make one: the real call will tell
        try:
            self.system.sethostname(name)  # only the scratch namespace's
        finally:
            self._back("uts")

    @staticmethod
    def _back(kind: str) -> None:
        # The bug: /proc/self is the thread group leader. From a worker thread this is the
        # process's namespace, as the author's tests ran it; the RPC server serves on its
        # leader, whose namespace is the scratch one by now: setns to itself, a no-op.
        fd = os.open(linux.ns_path(kind, "self"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(fd, _ns_flag(kind))
        finally:
            os.close(fd)


class RpcScratchUtsProcSelf(ReferenceEngine):
    """sethostname tries the name in a scratch uts namespace; the way back is a no-op.

    §4: "stage 2 and the RPC server share all seven namespace inodes", at every RPC method
    entry and return. To validate a hostname without touching the container's, the method
    unshares a scratch uts namespace, sets the name there and "goes back" with setns to
    /proc/self/ns/uts. /proc/self names the thread group leader: right on a worker thread,
    but the RPC server serves on its leader, so it reopens the scratch namespace and stays:
    sethostname returns in a uts namespace of its own (where the real name is set too;
    stage 2 keeps the inherited hostname). Every flow, every run with a hostname (the
    default)."""

    engine_name = "blind4-ns-rpc-scratch-uts-proc-self"
    rpc_methods = _ScratchUtsRPC


class _PrivateMountsRPC(ReferenceRPC):
    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        # The bug: "belt and braces -- whatever propagation the starter set, our mounts
        # must never reach the host": a mount namespace of the server's own, / rprivate.
        try:
            self.system.unshare(["mount"])
            self.system.set_propagation("/", "rprivate")
        except OSError:
            pass  # not allowed here: the starter's namespace will do


class RpcPrivateMountNamespace(ReferenceEngine):
    """The RPC server makes a private mount namespace of its own before it mounts.

    §4: "stage 2 and the RPC server share all seven namespace inodes and their root
    directory". Defensive against a starter that would leave / shared, the RPC methods class
    unshares a new mount namespace (and makes / rprivate in it) when it is built, before any
    method runs. Every mount the methods make (/proc, /tmp) then lands in a namespace that
    dies with the RPC server; stage 2 runs in the container's, without them (its /proc is
    the host's pid namespace view). Every flow, every run: each RPC method entry and return
    is in another mount namespace than stage 2."""

    engine_name = "blind4-ns-rpc-private-mount-namespace"
    rpc_methods = _PrivateMountsRPC


def _host_lookup(path: str) -> bool:
    """On a pool worker: does ``path`` exist in the host's mount namespace?"""
    try:
        linux.unshare(linux.CLONE_FS)  # setns to a mount namespace needs a private fs_struct
        # The bug, twice: "pid 1 is the host's init" holds only because /proc is still the
        # starter's (the container's /proc is mounted later); and the pool worker stays in
        # that mount namespace once the task is done.
        fd = os.open("/proc/1/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(fd, linux.CLONE_NEWNS)
        finally:
            os.close(fd)
    except OSError:
        return False
    return os.path.exists(path)


class _PayloadHintRPC(ReferenceRPC):
    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blind4-hint")

    def payload_hint(self, path: str) -> str | None:
        """None when ``path`` exists in the container; else a hint for the error message
        (whether it exists on the host, outside the container)."""
        check_path(path, "payload_hint")
        if os.path.exists(path):
            return None
        on_host = self._pool.submit(_host_lookup, path).result(5)
        return f"{path} exists on the host but not in the container" if on_host else None


class RpcPayloadHintHostMount(ReferenceEngine):
    """For a missing payload an RPC pool worker joins "the host's" mount namespace and stays.

    §4: "stage 2 and the RPC server share all seven namespace inodes", for every thread at
    every RPC method entry and return. create_container asks the RPC server, first, whether
    the payload exists in the container, to fail with a helpful message. When it does not,
    a worker thread looks for it on the host: it unshares its fs_struct and setns'es to
    /proc/1/ns/mnt, taking pid 1 of the /proc it sees (still the starter's pid namespace:
    the container's /proc is mounted afterwards) for the host's init. The pool worker stays
    in that mount namespace for every later method (sethostname, the mounts). Root flow (the
    other flows may not open /proc/1/ns), in runs whose payload does not exist."""

    engine_name = "blind4-ns-rpc-payload-hint-host-mount"
    rpc_methods = _PayloadHintRPC

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        cfg: ReferenceConfig = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        self.payload_hint = rpc.payload_hint(path=cfg.argv[0])
        super().create_container(ctx, pid, rpc_conn)


# --- the master: "shares none of pid/net/uts/ipc/cgroup with them" ---------------------------


class MasterLoopbackWatcher(ReferenceEngine):
    """A master thread joins the container's network namespace to watch lo, and stays.

    §4: "the master shares none of pid/net/uts/ipc/cgroup with them", for "every thread of
    the process, threads the engine started included". create_container starts a watcher
    that reports when the container's lo goes down. The author knows a socket stays bound
    to the network namespace it was made in, so the thread setns'es into the container's,
    makes its socket -- and never goes back, "this thread only serves that socket". From
    create_container's return to cleanup_container's entry the master has a thread in the
    container's network namespace. Every flow (suid, hybrid: the thread raises CAP_SYS_ADMIN
    for the setns and lowers it again), every run."""

    engine_name = "blind4-ns-master-loopback-watcher"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        super().__init__()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.lo_down_seen = False

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        ready = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch, args=(pid, ready), name="blind4-lo-watch", daemon=True
        )
        self._watcher.start()
        ready.wait(5)

    def _watch(self, pid: int, ready: threading.Event) -> None:
        try:
            fd = _open_ns(pid, "net")
            try:
                _join(fd, "net")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        except OSError:
            return
        finally:
            ready.set()
        with sock:
            while not self._stop.wait(0.2):
                try:
                    if not _link_flags(sock, "lo") & IFF_UP:
                        self.lo_down_seen = True
                except OSError:
                    return

    def cleanup_container(self, ctx: Any, fatal: Any, status: Any) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(2)
        super().cleanup_container(ctx, fatal, status)


#: The container namespaces cleanup_container reports from.
REPORT_KINDS = ("ipc", "uts")


class CleanupNamespaceRestoreMismatch(ReferenceEngine):
    """cleanup_container visits the container's ipc and uts namespaces; the way back fails.

    §4: "the master shares none of pid/net/uts/ipc/cgroup with them", at every hook entry
    and return. create_container keeps descriptors of the container's ipc and uts
    namespaces, so that cleanup_container can report, after the container is gone, the SysV
    IPC objects it left and its hostname. The report enters both namespaces and restores the
    master's "in reverse order" -- but reverses the kinds and not the saved descriptors, so
    each setns back gets the other kind's descriptor and fails with EINVAL, which the
    best-effort restore swallows. cleanup_container returns in the container's ipc and uts
    namespaces. Every flow (in userns and fakeroot no way back would work either), every run
    that created the container: success, failing or missing payload, signals."""

    engine_name = "blind4-ns-cleanup-namespace-restore-mismatch"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        super().__init__()
        self._container_ns: dict[str, int] = {}
        self.report = ""

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        for kind in REPORT_KINDS:
            try:
                self._container_ns[kind] = _open_ns(pid, kind)
            except OSError:
                pass  # no report for it

    def cleanup_container(self, ctx: Any, fatal: Any, status: Any) -> None:
        fds, self._container_ns = self._container_ns, {}
        try:
            if fds:
                self.report = self._report(fds)
        except OSError as exc:
            self.report = f"no report: {exc}"
        finally:
            for fd in fds.values():
                os.close(fd)
        super().cleanup_container(ctx, fatal, status)

    def _report(self, fds: dict[str, int]) -> str:
        kinds = list(fds)
        saved = [
            os.open(linux.ns_path(kind, "thread-self"), os.O_RDONLY | os.O_CLOEXEC)
            for kind in kinds
        ]
        try:
            for kind in kinds:
                _join(fds[kind], kind)
            objects = 0
            for table in ("msg", "sem", "shm"):
                with open(f"/proc/sysvipc/{table}") as f:
                    objects += max(0, len(f.readlines()) - 1)
            return f"container {socket.gethostname()}: {objects} SysV IPC objects left"
        finally:
            # The bug: the kinds are reversed, the saved descriptors are not.
            for fd, kind in zip(saved, reversed(kinds), strict=True):
                with contextlib.suppress(OSError):
                    _join(fd, kind)
            for fd in saved:
                os.close(fd)


class MonitorSignalDiagnostics(ReferenceEngine):
    """On a forwarded signal the monitor logs the container's network; no finally.

    §4: "the master shares none of pid/net/uts/ipc/cgroup with them", at every hook entry
    and return. Before forwarding a signal, monitor_container records the container's
    network state (a stop or reload is often about the network): it setns'es its thread
    into the container's network namespace, reads the flags of eth0 and setns'es back --
    but not in a finally, and the container has no eth0 (ENODEV), which the monitor
    swallows ("diagnostics must never stop the monitor"). The monitor thread stays in the
    container's network namespace and monitor_container returns there. Every flow, only in
    runs where a signal is forwarded."""

    engine_name = "blind4-ns-monitor-signal-diagnostics"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: Any) -> int:
        try:
            netns: int | None = _open_ns(pid, "net")
        except OSError:
            netns = None
        try:
            while True:
                sig = signals.get(timeout=MONITOR_POLL)
                if sig in FORWARDED_SIGNALS:
                    if netns is not None:
                        try:
                            self._log_network(netns)
                        except OSError:
                            pass  # diagnostics must never stop the monitor
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    wpid, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    raise ChildProcessError(
                        errno.ECHILD, f"container process {pid} was reaped by someone else"
                    ) from None
                if wpid == pid:
                    return status
        finally:
            if netns is not None:
                os.close(netns)

    def _log_network(self, netns: int) -> None:
        own = os.open(linux.ns_path("net", "thread-self"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _join(netns, "net")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                self.eth0_flags = _link_flags(sock, "eth0")  # ENODEV: no eth0 there
            _join(own, "net")  # the bug: not reached when the read fails
        finally:
            os.close(own)


# --- §7: monitor_container "reaps only the container pid" ------------------------------------


class MonitorReapsOrphans(ReferenceEngine):
    """After the container the monitor reaps "its orphans" with waitpid(-1).

    §7: "A conformant monitor_container forwards ... to the container, reaps only the
    container pid, and returns its wait status". The author believes the processes the
    payload left behind are reparented to the master when the container's init dies, so
    once the container is reaped, monitor_container collects every child that has exited
    (waitpid(-1, WNOHANG) until none) "so that none stays a zombie". They die with the
    container's pid namespace instead; what it reaps are the master's other children (the
    kit's). Every flow, every run that reaches the container's exit."""

    engine_name = "blind4-ns-monitor-reaps-orphans"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: Any) -> int:
        status = super().monitor_container(pid, signals)
        while True:
            try:
                wpid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if wpid == 0:
                break
        return status


# --- the user namespace of the flows ------------------------------------------------------


#: The author's list of the flows of an unprivileged caller (hybrid forgotten).
ROOTLESS_FLOWS = ("userns", "fakeroot")


def _prepare(
    engine: ReferenceEngine,
    sc: StarterConfig,
    *,
    rootless_flows: tuple[str, ...] = ("userns", "fakeroot", "hybrid"),
    created_late: tuple[str, ...] = (),
) -> None:
    """The reference's prepare_config, with the two knobs the engines here turn."""
    cfg: ReferenceConfig = engine.common.engine_config
    caps = validate_config(cfg, sc)
    host = system.current()
    cfg.host_namespaces = {kind: host.ns_inode(kind) for kind in GUARDED_NAMESPACES}
    namespaces = [k for k in cfg.namespaces if k not in created_late]
    if sc.flow in rootless_flows:
        namespaces.append("user")
        inside = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
        sc.add_uid_mappings([(inside[0], sc.invoker_uid, 1)])
        sc.add_gid_mappings([(inside[1], sc.invoker_gid, 1)])
        if sc.is_suid:
            sc.set_hybrid_workflow()
    sc.set_ns_flags(namespaces)
    if "net" in namespaces:
        sc.set_bring_loopback_interface()
    if "mount" in namespaces:
        sc.set_mount_propagation("rprivate")
    if cfg.target_uid is not None:
        sc.set_target_uid(cfg.target_uid)
    if cfg.target_gids:
        sc.set_target_gids(cfg.target_gids)
    for kind in ("effective", "permitted", "bounding"):
        sc.set_capabilities(kind, caps)
    if sc.flow != "root":
        sc.set_no_new_privs()


class HybridWithoutUserNamespace(ReferenceEngine):
    """The hybrid flow is run as plain suid: no user namespace for the container.

    §3 hybrid: "U via setuid starter, fakeroot requested | created by the container side
    only"; §4: RPC server, hybrid "as suid, inside the container's user ns"; stage 2, hybrid
    "as fakeroot" ("uid 0 in ns = U on the host"). The author's list of rootless flows is
    ("userns", "fakeroot") -- "hybrid is the setuid starter, it is privileged" -- so in
    the hybrid flow prepare_config asks for no user namespace and no hybrid workflow: the
    RPC server and stage 2 stay in the host user namespace, stage 2 runs as U instead of
    the namespace's root, and the RPC server (whose hybrid drop expects to be namespace
    root) keeps uid 0 and CAP_SYS_ADMIN there: host privilege. Only the hybrid flow; every
    run."""

    engine_name = "blind4-ns-hybrid-without-user-namespace"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        _prepare(self, starter_config, rootless_flows=ROOTLESS_FLOWS)
