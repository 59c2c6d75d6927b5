"""Correct blind engines written from scratch, from SPEC.md and the README alone: six
engines that subclass :class:`kit.contract.Operations` directly (nothing of the reference
engine is imported), each in a style of its own that the contract allows: a root file
system of its own entered with ``pivot_root``, a ``chroot`` into a work directory that the
cleanup removes, a pidfd monitor with a forwarding thread, a ``create_container`` that
fans its RPC calls out over threads, a config of nested dataclasses, and capabilities plus
a user namespace in the root flow.

Each follows the whole contract (SPEC.md) in every flow: failing one is a false failure.
Loaded as ``blind7_scratch_correct:ClassName`` with ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import select
import shutil
import signal
import stat
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kit import system
from kit.contract import (
    Common,
    ConfigError,
    Context,
    Engine,
    EngineConfig,
    Operations,
    SignalChannel,
    WaitStatus,
)
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig
from kit.system import linux

#: The signals SPEC §7 says a monitor forwards to the container.
FORWARDED = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
)
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Every namespace but the user one, which depends on the flow.
CONTAINER_NAMESPACES = ("mount", "pid", "net", "uts", "ipc", "cgroup")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,63})*")


def _absolute(path: object, what: str) -> str:
    """``path`` when absolute, normalised and without ``..``; ``ValueError`` otherwise."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ValueError(f"{what}: {path!r} is not an absolute path")
    if posixpath.normpath(path) != path or ".." in path.split("/"):
        raise ValueError(f"{what}: {path!r} is not normalised")
    return path


def _which(name: str, search: str = SAFE_PATH) -> str:
    """The payload's path: ``name`` itself when it has a slash, else found on ``search``."""
    if "/" in name:
        return name
    for directory in search.split(":"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(errno.ENOENT, f"payload {name!r} not found on {search}")


def _status_from_siginfo(info: os.waitid_result) -> WaitStatus:
    """The raw wait status ``os.waitpid`` would have returned for a ``waitid`` result."""
    if info.si_code == os.CLD_EXITED:
        return (info.si_status & 0xFF) << 8
    if info.si_code == os.CLD_DUMPED:
        return (info.si_status & 0x7F) | 0x80
    return info.si_status & 0x7F


def _user_namespace_for(sc: StarterConfig) -> bool:
    """The README's choice for the unprivileged flows: a user namespace mapping U to itself
    (userns) or container root to U (fakeroot, hybrid). True when one was asked for."""
    if sc.flow not in ("userns", "fakeroot", "hybrid"):
        return False
    inside_uid, inside_gid = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
    sc.add_uid_mappings([(inside_uid, sc.invoker_uid, 1)])
    sc.add_gid_mappings([(inside_gid, sc.invoker_gid, 1)])
    if sc.flow == "hybrid":
        sc.set_hybrid_workflow()
    return True


# ============================================================================================
# 1. A root file system of its own, entered with pivot_root
# ============================================================================================


@dataclass
class PivotConfig(EngineConfig):
    hostname: str = "pivot-box"
    read_only_root: bool = True
    #: Host directories bound (read-only) into the new root, or recreated as links.
    host_dirs: list[str] = field(
        default_factory=lambda: ["/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64"]
    )
    #: The host's mount namespace inode, read in stage 1: the RPC server refuses to build
    #: anything while it is still in it.
    host_mnt_ns: int = 0


class PivotRootfsRPC:
    """Served as ``blind7-scratch-pivot-rootfs.<method>``: fine-grained steps that build a
    root in a tmpfs of the container's own mount namespace, then ``pivot_root`` into it.
    Paths are container paths below the root being built; none may pass a symbolic link."""

    #: Existing directories a root tmpfs may cover (in the container's mount namespace).
    ROOT_CANDIDATES = ("/media", "/srv", "/mnt", "/opt")
    ALLOWED_HOST_DIRS = frozenset(
        {"/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"}
    )
    DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
    FS_FLAGS: ClassVar[dict[str, list[str]]] = {
        "proc": ["nosuid", "nodev", "noexec"],
        "tmpfs": ["nosuid", "nodev"],
    }

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.system = system.current()
        self.root: str | None = None
        self.pivoted = False

    # -- helpers (private: never served) --------------------------------------------------
    def _config(self) -> PivotConfig:
        cfg = self.engine.common.engine_config  # type: ignore[union-attr]
        assert isinstance(cfg, PivotConfig)
        return cfg

    def _own_namespace(self, what: str) -> None:
        if self.system.ns_inode("mount") == self._config().host_mnt_ns:
            raise PermissionError(errno.EPERM, f"{what}: still in the host's mount namespace")

    def _inside(self, path: str, what: str) -> str:
        """Where container path ``path`` is now: below the root while it is built."""
        _absolute(path, what)
        if self.root is None:
            raise PermissionError(errno.EPERM, f"{what}: no root was made yet")
        base = "/" if self.pivoted else self.root
        step = base
        for part in [p for p in path.split("/") if p]:
            step = os.path.join(step, part)
            if os.path.islink(step):
                raise PermissionError(errno.EPERM, f"{what}: {path!r} passes a symbolic link")
        return os.path.join(base, path.lstrip("/")) if path != "/" else base

    def _remount_read_only(self, where: str) -> None:
        flags = ["bind", "remount", "ro", "nosuid", "nodev"]
        if os.statvfs(where).f_flag & os.ST_NOEXEC:
            flags.append("noexec")  # locked on the source in a user namespace: keep it
        self.system.mount(None, where, None, flags)

    # -- served methods --------------------------------------------------------------------
    def make_root(self) -> str:
        """Cover the first existing candidate directory with a tmpfs: the future root."""
        self._own_namespace("make_root")
        if self.root is not None:
            raise FileExistsError(errno.EEXIST, f"make_root: already made at {self.root}")
        for candidate in self.ROOT_CANDIDATES:
            if os.path.isdir(candidate) and not os.path.islink(candidate):
                self.system.mount(
                    "tmpfs", candidate, "tmpfs", ["nosuid", "nodev"], "mode=0755,size=8m"
                )
                self.root = candidate
                return candidate
        raise FileNotFoundError(errno.ENOENT, "make_root: no directory to build the root on")

    def populate(self, host_dirs: list[str]) -> list[str]:
        """Bind each host directory read-only at the same place in the root (recreate it as
        a link where the host has a link); returns what was done, one word each."""
        done = []
        for source in host_dirs:
            if source not in self.ALLOWED_HOST_DIRS:
                raise PermissionError(errno.EPERM, f"populate: {source!r} is not allowed")
            target = self._inside(source, "populate")
            if os.path.islink(source):
                link = os.readlink(source)
                if link.startswith("/") or ".." in link.split("/"):
                    raise PermissionError(errno.EPERM, f"populate: {source} -> {link}")
                os.symlink(link, target)
                done.append(f"link:{source}")
            elif os.path.isdir(source):
                self.system.mkdir(target, 0o755)
                self.system.mount(source, target, None, ["bind", "rec"])
                self._remount_read_only(target)
                done.append(f"bind:{source}")
            else:
                done.append(f"absent:{source}")
        return done

    def mount_fs(self, fstype: str, target: str, data: str | None) -> None:
        """A new proc or tmpfs at ``target`` in the root (its directory made if missing)."""
        if fstype not in self.FS_FLAGS:
            raise PermissionError(errno.EPERM, f"mount_fs: file system {fstype!r} not allowed")
        if data is not None and not re.fullmatch(r"[a-z_]+=[0-9a-z]+(,[a-z_]+=[0-9a-z]+)*", data):
            raise ValueError(f"mount_fs: bad options {data!r}")
        where = self._inside(target, "mount_fs")
        if not os.path.isdir(where):
            self.system.mkdir(where, 0o755)
        self.system.mount(fstype, where, fstype, self.FS_FLAGS[fstype], data)

    def devices(self, names: list[str]) -> list[str]:
        """Bind the host's device nodes into the root's /dev (a tmpfs mount_fs made), plus
        the usual links; returns the nodes bound."""
        dev = self._inside("/dev", "devices")
        if not os.path.ismount(dev):
            raise FileNotFoundError(errno.ENOENT, "devices: mount a tmpfs on /dev first")
        bound = []
        for name in names:
            if name not in self.DEVICES:
                raise PermissionError(errno.EPERM, f"devices: {name!r} is not allowed")
            source = f"/dev/{name}"
            try:
                if not stat.S_ISCHR(os.stat(source).st_mode):
                    continue
            except FileNotFoundError:
                continue
            node = os.path.join(dev, name)
            os.close(os.open(node, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o666))
            self.system.mount(source, node, None, ["bind"])
            bound.append(name)
        for name, target in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ):
            os.symlink(target, os.path.join(dev, name))
        return bound

    def sethostname(self, name: str) -> None:
        self._own_namespace("sethostname")
        if not _HOSTNAME.fullmatch(name) or len(name) > 64:
            raise ValueError(f"sethostname: {name!r} is not a host name")
        self.system.sethostname(name)

    def pivot(self, read_only: bool) -> None:
        """pivot_root into the root; the old one goes to a directory that is then detached
        and removed; the root tmpfs is remounted read-only when asked."""
        if self.root is None or self.pivoted:
            raise PermissionError(errno.EPERM, "pivot: nothing to pivot into")
        old = os.path.join(self.root, ".old-root")
        self.system.mkdir(old, 0o700)
        self.system.chdir(self.root)
        self.system.pivot_root(".", ".old-root")
        self.system.chdir("/")
        self.system.umount("/.old-root", detach=True)
        os.rmdir("/.old-root")
        self.pivoted = True
        if read_only:
            self.system.mount(None, "/", None, ["remount", "ro", "nosuid", "nodev"])


class PivotRootfs(Operations):
    """A container with a root file system of its own: a tmpfs holding read-only binds of
    the host's /usr, /etc and /lib* (links recreated), a new /proc, a tmpfs /tmp, a tmpfs
    /dev of bound device nodes, entered with ``pivot_root``; the RPC methods are many small
    steps, each called from ``create_container``.

    Allowed: SPEC §1 "``create_container`` … prepares the container (mounts, network…)
    through RPC calls to the RPC server", and §2 forks the RPC server "sharing its root/cwd
    (CLONE_FS)", so a ``pivot_root`` there moves stage 2 too ("stage 2 and the RPC server
    share all seven namespace inodes and their root directory", §4). The root tmpfs covers
    a directory of the host only in the container's own mount namespace (propagation
    ``rprivate``), so §11's "a run changes nothing on the host" holds without any cleanup:
    every mount dies with that namespace. §9 names "pivot_root/chroot" among what the
    system interface offers. The suid RPC server has "only CAP_SYS_ADMIN effective" (§4),
    which is all a mount, a bind, a remount and pivot_root need; the files it creates are
    in the tmpfs it mounted itself.
    """

    engine_name = "blind7-scratch-pivot-rootfs"
    rpc_methods = PivotRootfsRPC

    def config(self) -> PivotConfig:
        return PivotConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, PivotConfig)
        if not cfg.argv:
            raise ConfigError("argv: no payload given")
        if not _HOSTNAME.fullmatch(cfg.hostname) or len(cfg.hostname) > 64:
            raise ConfigError(f"hostname: {cfg.hostname!r} is not a host name")
        cfg.host_mnt_ns = system.current().ns_inode("mount")
        sc = starter_config
        kinds = list(CONTAINER_NAMESPACES)
        if _user_namespace_for(sc):
            kinds.append("user")
        sc.set_ns_flags(kinds)
        sc.set_mount_propagation("rprivate")
        sc.set_bring_loopback_interface()
        if sc.flow != "root":
            sc.set_no_new_privs()

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, PivotConfig)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.make_root()
        rpc.populate(host_dirs=cfg.host_dirs)
        rpc.mount_fs(fstype="proc", target="/proc", data=None)
        rpc.mount_fs(fstype="tmpfs", target="/tmp", data="mode=1777,size=16m")
        rpc.mount_fs(fstype="tmpfs", target="/dev", data="mode=0755,size=64k")
        rpc.devices(names=list(PivotRootfsRPC.DEVICES))
        rpc.mount_fs(fstype="tmpfs", target="/dev/shm", data="mode=1777,size=1m")
        rpc.sethostname(name=cfg.hostname)
        rpc.pivot(read_only=cfg.read_only_root)

    def start_process(self, master_fd: int) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, PivotConfig)
        os.chdir("/")
        env = {"PATH": SAFE_PATH, "HOME": "/", "HOSTNAME": cfg.hostname}
        os.execve(_which(cfg.argv[0]), cfg.argv, env)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=0.5)
            if sig in FORWARDED:
                os.kill(pid, sig)
            reaped, status = os.waitpid(pid, os.WNOHANG)
            if reaped == pid:
                return status

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pass  # every mount lived in the container's mount namespace


# ============================================================================================
# 2. chroot into a work directory that the cleanup removes
# ============================================================================================


@dataclass
class ChrootConfig(EngineConfig):
    hostname: str = "chroot-box"
    links: dict[str, str] = field(default_factory=dict)
    binds: list[str] = field(default_factory=list)


class ChrootWorkdirRPC:
    """Served as ``blind7-scratch-chroot-workdir.<method>``: one coarse ``assemble`` call
    builds the whole root in a tmpfs over ``<workdir>/rootfs``; ``enter`` chroots into it,
    raising CAP_SYS_CHROOT on its own thread only when it lacks it, and restoring it."""

    PREFIX = "blind7-chroot-"
    BINDABLE = frozenset({"/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64"})

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.system = system.current()
        self.rootfs: str | None = None

    def _check_workdir(self, workdir: str) -> str:
        _absolute(workdir, "workdir")
        if os.path.dirname(workdir) != tempfile.gettempdir():
            raise PermissionError(errno.EPERM, f"{workdir!r} is not in the run's TMPDIR")
        if not os.path.basename(workdir).startswith(self.PREFIX):
            raise PermissionError(errno.EPERM, f"{workdir!r} is not one of ours")
        st = os.lstat(workdir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise PermissionError(errno.EPERM, f"{workdir!r} is not our directory")
        rootfs = os.path.join(workdir, "rootfs")
        if os.path.islink(rootfs) or not os.path.isdir(rootfs) or os.listdir(rootfs):
            raise PermissionError(errno.EPERM, f"{rootfs!r} is not an empty directory")
        return rootfs

    def assemble(self, workdir: str, binds: list[str], links: dict[str, str]) -> int:
        """Build the root: a tmpfs, the binds (read-only), the links, a proc, a /tmp and a
        /dev with null, zero and urandom. Returns the number of entries made."""
        if self.rootfs is not None:
            raise FileExistsError(errno.EEXIST, "assemble: done already")
        rootfs = self._check_workdir(workdir)
        sysi = self.system
        sysi.mount("tmpfs", rootfs, "tmpfs", ["nosuid", "nodev"], "mode=0755,size=4m")
        self.rootfs = rootfs
        made = 0
        for name, target in sorted(links.items()):
            if name not in self.BINDABLE or target.startswith("/") or ".." in target:
                raise PermissionError(errno.EPERM, f"assemble: link {name} -> {target}")
            os.symlink(target, rootfs + name)
            made += 1
        for source in binds:
            if source not in self.BINDABLE or os.path.islink(source):
                raise PermissionError(errno.EPERM, f"assemble: bind of {source!r}")
            sysi.mkdir(rootfs + source, 0o755)
            sysi.mount(source, rootfs + source, None, ["bind", "rec"])
            flags = ["bind", "remount", "ro", "nosuid", "nodev"]
            if os.statvfs(rootfs + source).f_flag & os.ST_NOEXEC:
                flags.append("noexec")  # locked on the source in a user namespace
            sysi.mount(None, rootfs + source, None, flags)
            made += 1
        for directory, mode in (("/proc", 0o555), ("/tmp", 0o1777), ("/dev", 0o755)):
            sysi.mkdir(rootfs + directory, mode)
            made += 1
        sysi.mount("proc", rootfs + "/proc", "proc", ["nosuid", "nodev", "noexec"])
        sysi.mount("tmpfs", rootfs + "/tmp", "tmpfs", ["nosuid", "nodev"], "mode=1777")
        sysi.mount("tmpfs", rootfs + "/dev", "tmpfs", ["nosuid"], "mode=0755,size=64k")
        for node in ("null", "zero", "urandom"):
            path = f"{rootfs}/dev/{node}"
            with open(path, "x"):
                pass
            sysi.mount(f"/dev/{node}", path, None, ["bind"])
            made += 1
        return made

    def sethostname(self, name: str) -> str:
        self.system.sethostname(name)
        return self.system.gethostname()

    def enter(self) -> None:
        """chroot into the assembled root (the container process follows: CLONE_FS)."""
        if self.rootfs is None:
            raise PermissionError(errno.EPERM, "enter: nothing assembled")
        chroot_bit = linux.caps_to_mask(["CAP_SYS_CHROOT"])
        effective, permitted, inheritable = self.system.capabilities()
        raise_it = not effective & chroot_bit
        if raise_it:  # suid/hybrid: permitted, not effective (SPEC §4: raise, then restore)
            self.system.set_capabilities(effective | chroot_bit, permitted, inheritable)
        try:
            self.system.chdir(self.rootfs)
            self.system.chroot(".")
            self.system.chdir("/")
        finally:
            if raise_it:
                self.system.set_capabilities(effective, permitted, inheritable)
        self.rootfs = "/"


class ChrootWorkdir(Operations):
    """A container rooted, with ``chroot``, in a tmpfs over a work directory the master
    makes in the run's TMPDIR; the master keeps a state file there, and
    ``cleanup_container`` really removes the work directory, whatever was set up.

    Allowed: SPEC §1 ``cleanup_container`` "tears everything down; must tolerate partial
    setup", and §11 "a run changes nothing on the host that outlives it": the work
    directory is the master's own, made with the master's credentials (U in the setuid
    flows) and removed by them. The RPC server "may raise more [capabilities] on its own
    thread and must restore them" (§4, RPC server row, suid): ``enter`` raises
    CAP_SYS_CHROOT from its permitted set only for the chroot and puts the sets back as
    they were. §5 offers ``set_mount_propagation``: ``rslave`` lets nothing the container
    mounts reach the host (it receives, never sends), and the chroot needs no
    ``pivot_root``. The master reads the host's layout (links or directories) before
    asking for binds: it is in the host's mount namespace and reads nothing privileged.
    """

    engine_name = "blind7-scratch-chroot-workdir"
    rpc_methods = ChrootWorkdirRPC

    def __init__(self) -> None:
        self.workdir: str | None = None

    def config(self) -> ChrootConfig:
        return ChrootConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, ChrootConfig)
        if not cfg.argv or not cfg.argv[0]:
            raise ConfigError("argv: no payload given")
        # What the root needs, read from the host here, crosses as JSON (SPEC §2 rule 3).
        for name in ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64"):
            if os.path.islink(name):
                cfg.links[name] = os.readlink(name).lstrip("/")
            elif os.path.isdir(name):
                cfg.binds.append(name)
        sc = starter_config
        _user_namespace_for(sc)
        sc.set_ns_flags([*CONTAINER_NAMESPACES, *(["user"] if sc.uid_mappings else [])])
        sc.set_mount_propagation("rslave")
        sc.set_bring_loopback_interface(True)
        sc.set_no_new_privs(sc.flow != "root")

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, ChrootConfig)
        self.workdir = tempfile.mkdtemp(prefix=ChrootWorkdirRPC.PREFIX)
        os.mkdir(os.path.join(self.workdir, "rootfs"), 0o755)
        self._state({"container_pid": pid, "phase": "creating"})
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        made = rpc.assemble(workdir=self.workdir, binds=cfg.binds, links=cfg.links)
        rpc.sethostname(name=cfg.hostname)
        rpc.enter()
        self._state({"container_pid": pid, "phase": "created", "entries": made})

    def _state(self, data: dict[str, Any]) -> None:
        assert self.workdir is not None
        path = os.path.join(self.workdir, "state.json")
        with open(path + ".new", "w") as f:
            json.dump(data, f)
        os.replace(path + ".new", path)

    def start_process(self, master_fd: int) -> None:
        argv = self.common.engine_config.argv
        os.execve(_which(argv[0]), argv, {"PATH": SAFE_PATH, "TERM": "dumb"})

    def post_start_process(self, ctx: Context, pid: int) -> None:
        if self.workdir is not None:
            self._state({"container_pid": pid, "phase": "running"})

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        def forward(sig: int) -> None:
            os.kill(pid, sig)

        def ignore(sig: int) -> None:
            pass

        handlers = {int(s): forward for s in FORWARDED}
        while True:
            sig = signals.get(timeout=0.1)
            if sig is not None:
                handlers.get(sig, ignore)(sig)
            reaped, status = os.waitpid(pid, os.WNOHANG)
            if reaped:
                return status

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        workdir, self.workdir = self.workdir, None
        if workdir is None or not os.path.isdir(workdir):
            return  # never made, or removed already (idempotent)
        shutil.rmtree(workdir)


# ============================================================================================
# 3. pidfd monitor with a forwarding thread
# ============================================================================================


@dataclass
class PidfdConfig(EngineConfig):
    hostname: str = "pidfd-box"
    #: Extra file systems: [fstype, target, options] (options "" for none).
    mounts: list[list[str]] = field(
        default_factory=lambda: [["proc", "/proc", ""], ["tmpfs", "/tmp", "mode=1777,size=8m"]]
    )


class PidfdMonitorRPC:
    """Served as ``blind7-scratch-pidfd-monitor.<method>``: one batch method."""

    def __init__(self, engine: Engine) -> None:
        self.system = system.current()

    def apply(self, hostname: str, mounts: list[list[str]]) -> list[str]:
        """Set the host name, then mount each [fstype, target, options]; returns targets."""
        self.system.sethostname(hostname)
        done = []
        for entry in mounts:
            if len(entry) != 3:
                raise ValueError(f"apply: {entry!r} is not [fstype, target, options]")
            fstype, target, options = entry
            if fstype not in ("proc", "tmpfs"):
                raise PermissionError(errno.EPERM, f"apply: {fstype!r} not allowed")
            _absolute(target, "apply")
            flags = ["nosuid", "nodev"] + (["noexec"] if fstype == "proc" else [])
            self.system.mount(fstype, target, fstype, flags, options or None)
            done.append(target)
        return done


class PidfdMonitor(Operations):
    """A monitor built on a pidfd: a helper thread forwards signals from the channel with
    ``pidfd_send_signal``, the hook's own thread polls the pidfd and reaps the container
    with ``waitid(P_PIDFD)``, turning the siginfo back into a wait status; the helper is
    stopped and joined before the hook returns.

    Allowed: SPEC §7 "A conformant ``monitor_container`` forwards SIGINT/SIGTERM/SIGHUP/
    SIGUSR1/SIGUSR2 to the container, reaps only the container pid, and returns its wait
    status": a pidfd names only that pid and ``waitid(P_PIDFD)`` reaps only it; §1 says only
    that it "blocks until the container exits, forwarding signals", not how. §4: "Every
    rule of this table holds for every thread of the process, threads the engine started
    included": the helper thread changes no credential and is gone at return. The
    container gets proc and tmpfs mounts from a config list of lists (§2 rule 3: JSON
    fields).
    """

    engine_name = "blind7-scratch-pidfd-monitor"
    rpc_methods = PidfdMonitorRPC

    def config(self) -> PidfdConfig:
        return PidfdConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, PidfdConfig)
        if not cfg.argv:
            raise ConfigError("argv: nothing to run")
        for entry in cfg.mounts:
            if len(entry) != 3 or entry[0] not in ("proc", "tmpfs"):
                raise ConfigError(f"mounts: {entry!r} is not [proc|tmpfs, target, options]")
        sc = starter_config
        user = _user_namespace_for(sc)
        sc.set_ns_flags(["user", *CONTAINER_NAMESPACES] if user else CONTAINER_NAMESPACES)
        sc.set_bring_loopback_interface()
        if sc.is_suid or user:
            sc.set_no_new_privs()

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, PidfdConfig)
        done = RPCClient(rpc_conn, self.common.engine_name).apply(
            hostname=cfg.hostname, mounts=cfg.mounts
        )
        if len(done) != len(cfg.mounts):
            raise RuntimeError(f"the RPC server mounted {done}, not {cfg.mounts}")

    def start_process(self, master_fd: int) -> None:
        argv = self.common.engine_config.argv
        os.execvpe(argv[0], argv, {"PATH": SAFE_PATH})

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        pidfd = os.pidfd_open(pid)
        stop = threading.Event()

        def forward() -> None:
            while not stop.is_set():
                sig = signals.get(timeout=0.1)
                if sig in FORWARDED:
                    try:
                        signal.pidfd_send_signal(pidfd, sig)
                    except ProcessLookupError:
                        return  # exited meanwhile: the poll below sees it

        helper = threading.Thread(target=forward, name="blind7-forwarder", daemon=True)
        helper.start()
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while True:
                if poller.poll(1000):
                    info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
                    if info is not None:
                        return _status_from_siginfo(info)
        finally:
            stop.set()
            helper.join()
            os.close(pidfd)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        return None


# ============================================================================================
# 4. create_container fans RPC calls out over threads; the monitor blocks on the channel
# ============================================================================================


@dataclass
class ThreadedConfig(EngineConfig):
    hostname: str = "threaded-box"
    tmpfs: list[str] = field(default_factory=lambda: ["/tmp", "/dev/shm", "/run/lock"])


class ThreadedCreateRPC:
    """Served as ``blind7-scratch-threaded-create.<method>``: small independent methods."""

    def __init__(self, engine: Engine) -> None:
        self.system = system.current()

    def hostname(self, name: str) -> str:
        self.system.sethostname(name)
        return self.system.gethostname()

    def proc(self) -> None:
        self.system.mount("proc", "/proc", "proc", ["nosuid", "nodev", "noexec"])

    def tmpfs(self, target: str, mode: int) -> bool:
        """A tmpfs at ``target`` when it is an existing directory; False when it is not."""
        _absolute(target, "tmpfs")
        if not 0 <= mode <= 0o1777:
            raise ValueError(f"tmpfs: mode {mode:o}")
        if os.path.islink(target) or not os.path.isdir(target):
            return False
        self.system.mount("tmpfs", target, "tmpfs", ["nosuid", "nodev"], f"mode={mode:o}")
        return True

    def whoami(self) -> dict[str, int]:
        uid = os.getresuid()
        return {"ruid": uid[0], "euid": uid[1], "pid": os.getpid()}


class ThreadedCreate(Operations):
    """``create_container`` runs its RPC calls on a pool of worker threads (one client,
    serialised by a lock, as the client is not thread-safe), and one more plain thread
    checks what the RPC server answered; every thread has finished when the hook returns. The
    monitor blocks on the signal channel with no timeout and reaps on SIGCHLD.

    Allowed: SPEC §4 "Every rule of this table holds for every thread of the process,
    threads the engine started included, at every hook entry and return": the workers
    inherit the master's credentials, change none, and are joined (the pool is shut down
    with ``wait=True``) before the hook returns; §2 rule 5 asks only that
    ``create_container`` return before stage 2 starts. The blocking monitor relies on §7
    "The master turns every signal it receives into an entry on the ``signals`` channel"
    and §10 "the kit's channel must not lose SIGCHLD": the container's exit always puts a
    SIGCHLD there, so ``signals.get()`` with no timeout cannot wait forever.
    """

    engine_name = "blind7-scratch-threaded-create"
    rpc_methods = ThreadedCreateRPC

    def config(self) -> ThreadedConfig:
        return ThreadedConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, ThreadedConfig)
        if not cfg.argv:
            raise ConfigError("argv: empty")
        for target in cfg.tmpfs:
            try:
                _absolute(target, "tmpfs")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        sc = starter_config
        namespaces = ["mount", "pid", "net", "uts", "ipc", "cgroup"]
        if _user_namespace_for(sc):
            namespaces.insert(0, "user")
        sc.set_ns_flags(namespaces)
        sc.set_mount_propagation("rprivate")
        sc.set_bring_loopback_interface()
        if sc.flow != "root":
            sc.set_no_new_privs()

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, ThreadedConfig)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        lock = threading.Lock()

        def call(method: str, **args: Any) -> Any:
            if ctx.cancelled:
                raise RuntimeError(f"cancelled: {ctx.reason}")
            with lock:
                return rpc.call(method, **args)

        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="blind7-create") as pool:
            jobs = [
                pool.submit(call, "hostname", name=cfg.hostname),
                pool.submit(call, "proc"),
                pool.submit(call, "whoami"),
                *(pool.submit(call, "tmpfs", target=t, mode=0o1777) for t in cfg.tmpfs),
            ]
            results = [job.result() for job in jobs]
        if results[0] != cfg.hostname:
            raise RuntimeError(f"the container's hostname is {results[0]!r}")
        # One more thread, not a pool's: checks who served the calls.
        problems: list[str] = []
        checker = threading.Thread(
            target=lambda: problems.extend(
                [] if results[2]["pid"] != 1 else ["the RPC server is pid 1 of the container"]
            ),
            name="blind7-check",
        )
        checker.start()
        checker.join()
        if problems:
            raise RuntimeError("; ".join(problems))
        self.mounted = [t for t, ok in zip(cfg.tmpfs, results[3:], strict=True) if ok]

    def start_process(self, master_fd: int) -> None:
        argv = self.common.engine_config.argv
        os.execve(_which(argv[0]), argv, {"PATH": SAFE_PATH, "LC_ALL": "C"})

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return status
        while True:
            sig = signals.get()  # no timeout: the container's exit brings a SIGCHLD
            if sig in FORWARDED:
                os.kill(pid, sig)
            elif sig == signal.SIGCHLD:
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped == pid:
                    return status

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        self.mounted = []


# ============================================================================================
# 5. A config of nested dataclasses, lists and dicts; hostname and domainname
# ============================================================================================


@dataclass
class UtsSettings(EngineConfig):
    hostname: str = "nested"
    domainname: str = "blind7.test"


@dataclass
class MountSpec(EngineConfig):
    fstype: str = "tmpfs"
    target: str = "/tmp"
    options: dict[str, str] = field(default_factory=dict)
    read_only: bool = False


@dataclass
class ProcessSpec(EngineConfig):
    env: dict[str, str] = field(default_factory=lambda: {"PATH": SAFE_PATH, "LANG": "C.UTF-8"})
    cwd: str = "/"
    #: The payload's path, resolved on PATH in stage 1 (as given when not found there).
    executable: str | None = None


@dataclass
class NestedSettings(EngineConfig):
    uts: UtsSettings = field(default_factory=UtsSettings)
    mounts: list[MountSpec] = field(
        default_factory=lambda: [
            MountSpec(fstype="proc", target="/proc"),
            MountSpec(fstype="tmpfs", target="/tmp", options={"mode": "1777", "size": "8m"}),
            MountSpec(fstype="tmpfs", target="/mnt", options={"mode": "755"}, read_only=True),
        ]
    )
    process: ProcessSpec = field(default_factory=ProcessSpec)
    labels: dict[str, str] = field(default_factory=lambda: {"round": "7"})
    #: Filled by prepare_config: the mounts in the order the RPC server makes them.
    plan: list[MountSpec] = field(default_factory=list)
    flow_seen: str | None = None


class NestedConfigRPC:
    """Served as ``blind7-scratch-nested-config.<method>``."""

    def __init__(self, engine: Engine) -> None:
        self.system = system.current()

    def set_uts(self, hostname: str, domainname: str) -> dict[str, str]:
        self.system.sethostname(hostname)
        self.system.setdomainname(domainname)
        return {
            "hostname": self.system.gethostname(),
            "domainname": self.system.getdomainname(),
        }

    def mount(self, fstype: str, target: str, options: dict[str, str], read_only: bool) -> None:
        if fstype not in ("proc", "tmpfs", "mqueue"):
            raise PermissionError(errno.EPERM, f"mount: {fstype!r}")
        _absolute(target, "mount")
        for key, value in options.items():
            if not re.fullmatch(r"[a-z_]+", key) or not re.fullmatch(r"[0-9a-z]+", value):
                raise ValueError(f"mount: option {key}={value}")
        data = ",".join(f"{k}={v}" for k, v in sorted(options.items())) or None
        flags = ["nosuid", "nodev", "noexec"] if fstype != "tmpfs" else ["nosuid", "nodev"]
        if read_only:
            flags.append("ro")
        self.system.mount(fstype, target, fstype, flags, data)


class NestedConfig(Operations):
    """A config of nested ``EngineConfig`` dataclasses (uts settings, a list of mount
    specs with dict options, a process spec), filled further in stage 1 (the resolved
    executable, the mount plan) and read back in the master and stage 2; the container
    gets a hostname and a NIS domain name.

    Allowed: ``EngineConfig``'s fields "may be str, int, float, bool, None, lists,
    dict[str, …] and nested EngineConfig dataclasses", and SPEC §2 rule 3 "Only
    JSON-visible fields of the engine config cross from stage 1 to later processes": what
    prepare_config writes into fields crosses; nothing is kept in a global. §11 names
    "hostname and domainname" of the host: these are set in the container's own uts
    namespace. The monitor's timeouts back off from 1 ms to 1 s and start again at each
    signal (§1: "blocks until the container exits, forwarding signals"), reaping with
    ``os.wait4`` on the container pid only (§7).
    """

    engine_name = "blind7-scratch-nested-config"
    rpc_methods = NestedConfigRPC

    def config(self) -> NestedSettings:
        return NestedSettings()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, NestedSettings)
        if not cfg.argv:
            raise ConfigError("argv: no payload")
        for what, name in (
            ("uts.hostname", cfg.uts.hostname),
            ("uts.domainname", cfg.uts.domainname),
        ):
            if not _HOSTNAME.fullmatch(name) or len(name) > 64:
                raise ConfigError(f"{what}: {name!r} is not a valid name")
        for i, spec in enumerate(cfg.mounts):
            if spec.fstype not in ("proc", "tmpfs", "mqueue"):
                raise ConfigError(f"mounts[{i}].fstype: {spec.fstype!r} is not allowed")
            try:
                _absolute(spec.target, f"mounts[{i}].target")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        try:
            _absolute(cfg.process.cwd, "process.cwd")
        except ValueError as exc:
            raise ConfigError(f"process: {exc}") from None
        try:
            search = cfg.process.env.get("PATH", SAFE_PATH)
            cfg.process.executable = _which(cfg.argv[0], search)
        except FileNotFoundError:
            cfg.process.executable = cfg.argv[0]  # stage 2's exec reports it
        # Shallow targets first, so that a mount never hides an earlier one.
        ordered = sorted(cfg.mounts, key=lambda m: m.target.count("/"))
        cfg.plan = [MountSpec.from_json(m.to_json()) for m in ordered]
        cfg.flow_seen = starter_config.flow
        sc = starter_config
        user = _user_namespace_for(sc)
        sc.set_ns_flags([*CONTAINER_NAMESPACES, "user"] if user else [*CONTAINER_NAMESPACES])
        sc.set_mount_propagation("rprivate")
        sc.set_bring_loopback_interface()
        if sc.flow != "root":
            sc.set_no_new_privs()

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, NestedSettings)
        if cfg.flow_seen is None or cfg.process.executable is None:
            raise RuntimeError("stage 1's plan did not cross to the master")
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        uts = rpc.set_uts(hostname=cfg.uts.hostname, domainname=cfg.uts.domainname)
        if uts != {"hostname": cfg.uts.hostname, "domainname": cfg.uts.domainname}:
            raise RuntimeError(f"uts: {uts}")
        for spec in cfg.plan:
            rpc.mount(
                fstype=spec.fstype,
                target=spec.target,
                options=spec.options,
                read_only=spec.read_only,
            )

    def start_process(self, master_fd: int) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, NestedSettings)
        os.chdir(cfg.process.cwd)
        executable = cfg.process.executable or cfg.argv[0]
        if "/" in executable:
            os.execve(executable, cfg.argv, dict(cfg.process.env))
        os.execvpe(executable, cfg.argv, dict(cfg.process.env))

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        wait = 0.001
        while True:
            reaped, status, _usage = os.wait4(pid, os.WNOHANG)
            if reaped == pid:
                return status
            sig = signals.get(timeout=wait)
            if sig is None:
                wait = min(wait * 2, 1.0)
                continue
            wait = 0.001
            if sig in FORWARDED:
                os.kill(pid, sig)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pass


# ============================================================================================
# 6. Capabilities per flow, and a user namespace in the root flow
# ============================================================================================

#: Capabilities the root flow's payload keeps (a Docker-like set, trimmed).
ROOT_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
)
#: What a payload that is root of its own user namespace keeps (fakeroot, hybrid).
NS_ROOT_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_KILL",
    "CAP_SETUID",
    "CAP_SETGID",
)
#: The one capability an unprivileged payload keeps inside its user namespace (userns).
AMBIENT_CAP = "CAP_NET_BIND_SERVICE"


@dataclass
class CapsConfig(EngineConfig):
    hostname: str = "caps-box"
    #: The root flow's payload uid and groups (inside the user namespace that maps
    #: every id to itself).
    root_target_uid: int = 1000
    root_target_gids: list[int] = field(default_factory=lambda: [1000, 100])
    #: The capability sets stage 2 was configured with, by set name (filled in stage 1).
    granted: dict[str, list[str]] = field(default_factory=dict)


class CapsUsernsRPC:
    """Served as ``blind7-scratch-caps-userns.<method>``."""

    def __init__(self, engine: Engine) -> None:
        self.system = system.current()

    def capabilities(self) -> dict[str, int]:
        effective, permitted, inheritable = self.system.capabilities()
        return {"effective": effective, "permitted": permitted, "inheritable": inheritable}

    def setup(self, hostname: str) -> None:
        self.system.sethostname(hostname)
        self.system.mount("proc", "/proc", "proc", ["nosuid", "nodev", "noexec"])
        self.system.mount("tmpfs", "/tmp", "tmpfs", ["nosuid", "nodev"], "mode=1777")


def _bounding_of_stage1() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    return 0


class CapsUserns(Operations):
    """Capabilities configured per flow through the StarterConfig, and a user namespace in
    the root flow too: root's payload runs as uid 1000 with groups [1000, 100] inside a
    user namespace that maps every id to itself, with a trimmed Docker-like set and
    CAP_NET_BIND_SERVICE ambient; the suid payload gets every set explicitly empty; the
    userns payload keeps CAP_NET_BIND_SERVICE (ambient) inside its namespace; the
    fakeroot and hybrid payloads, root of their namespace, a small bounding set.

    Allowed: SPEC §5 "``set_capabilities(kind, names)`` for effective/permitted/inheritable/
    bounding/ambient", and its only invalid combinations are "effective not a subset of
    permitted; a user ns in ``suid`` without hybrid; an unknown namespace or capability
    name": a user namespace in the root flow is none of them. §4, stage 2: root
    "r=e=s=target uid (default 0); caps exactly as configured"; suid "caps as configured
    (default none); no_new_privs set"; and the payload: "no host privilege in every flow
    but ``root``" — the suid payload has no capability at all, the others' capabilities
    belong to a user namespace that is not the host's ("known by its identity, never
    inferred from the content of ``uid_map``… a namespace that maps the full range is not
    the host unless the kit was launched in it"). no_new_privs is set where §4 asks for it
    (suid, and hybrid, which runs through the setuid starter), not in userns and fakeroot,
    whose rows do not. ``set_allow_setgroups`` lets the root flow's stage 2 take its
    supplementary groups inside the new namespace.
    """

    engine_name = "blind7-scratch-caps-userns"
    false_failure = (
        "disputed: SPEC §3's table gives the root flow no user namespace (NS-007, and "
        "NS-004 for the master the starter joins to it), while §5 does not list a user "
        "namespace in root among the invalid combinations, so the kit runs it"
    )
    rpc_methods = CapsUsernsRPC

    def config(self) -> CapsConfig:
        return CapsConfig()

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        self.privileged_stage1 = privileged_stage1

    def _grant(self, sc: StarterConfig, sets: dict[str, tuple[str, ...]]) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, CapsConfig)
        for kind in ("effective", "permitted", "inheritable", "bounding", "ambient"):
            names = sets.get(kind, ())
            sc.set_capabilities(kind, names)
            cfg.granted[kind] = list(names)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, CapsConfig)
        if not cfg.argv:
            raise ConfigError("argv: no payload")
        sc = starter_config
        if self.privileged_stage1 != sc.is_suid:  # SPEC §2 rule 1: only suid/hybrid stage 1
            raise ConfigError(
                f"init_config: privileged_stage1 {self.privileged_stage1} in {sc.flow}"
            )
        namespaces = list(CONTAINER_NAMESPACES)
        if sc.flow == "root":
            bounding = _bounding_of_stage1()
            caps = tuple(c for c in ROOT_CAPS if bounding >> linux.CAP_NUMBERS[c] & 1)
            namespaces.append("user")
            sc.add_uid_mappings([(0, 0, 4294967295)])
            sc.add_gid_mappings([(0, 0, 4294967295)])
            sc.set_allow_setgroups()
            sc.set_target_uid(cfg.root_target_uid)
            sc.set_target_gids(cfg.root_target_gids)
            keep = (AMBIENT_CAP,) if AMBIENT_CAP in caps else ()
            self._grant(
                sc,
                {
                    "effective": caps,
                    "permitted": caps,
                    "bounding": caps,
                    "inheritable": keep,
                    "ambient": keep,
                },
            )
        elif sc.flow == "suid":
            self._grant(sc, {})  # every set explicitly empty
            sc.set_no_new_privs()
        else:
            _user_namespace_for(sc)
            namespaces.append("user")
            if sc.flow == "userns":
                one = (AMBIENT_CAP,)
                self._grant(
                    sc,
                    {
                        k: one
                        for k in ("effective", "permitted", "inheritable", "bounding", "ambient")
                    },
                )
            else:
                self._grant(
                    sc,
                    {
                        "effective": NS_ROOT_CAPS,
                        "permitted": NS_ROOT_CAPS,
                        "bounding": NS_ROOT_CAPS,
                    },
                )
            if sc.flow == "hybrid":
                sc.set_no_new_privs()
        sc.set_ns_flags(namespaces)
        sc.set_bring_loopback_interface()

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, CapsConfig)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        caps = rpc.capabilities()
        if not caps["effective"] & linux.caps_to_mask(["CAP_SYS_ADMIN"]):
            raise PermissionError(errno.EPERM, f"the RPC server cannot mount: {caps}")
        rpc.setup(hostname=cfg.hostname)

    def start_process(self, master_fd: int) -> None:
        argv = self.common.engine_config.argv
        os.execve(_which(argv[0]), argv, {"PATH": SAFE_PATH})

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
            if info is not None and info.si_pid == pid:
                return _status_from_siginfo(info)
            sig = signals.get(timeout=0.2)
            if sig in FORWARDED:
                os.kill(pid, sig)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pass
