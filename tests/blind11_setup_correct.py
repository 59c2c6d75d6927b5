"""Correct blind engines, theme "realistic container setup" (written from SPEC.md alone).

Written from ``/work/shared/SPEC.md`` and the kit's public API only (``kit.contract``,
``kit.starter.config``, ``kit.rpc``, ``kit.system``), not from the conformance suite, the
mutants or the reference engines. Each engine does real setup work in ``create_container``
through RPC methods of its own, served by the RPC server inside the container's namespaces,
and is meant to be conformant in all five flows (root, suid, userns, fakeroot, hybrid):

* :class:`PivotTmpfsEngine` builds a tmpfs root file system (read-only binds of ``/usr`` and
  the merged-usr top directories, a small ``/etc``, a ``/dev`` tmpfs with a few host nodes
  bound in, a devpts instance, ``/proc`` for the new pid namespace, a ``/tmp`` tmpfs) inside a
  tmpfs session directory of the container's mount namespace, sets the hostname, then
  ``pivot_root``\\ s into it, detaches the old root and makes ``/`` read-only.
* :class:`RoBindRootEngine` binds the host's root file system read-only (recursively), puts
  fresh tmpfs/proc mounts over ``/dev``, ``/dev/shm``, ``/proc``, ``/tmp`` and ``/run``, and
  switches to it the way Apptainer does: ``mount --move . /`` then ``chroot .`` (raising
  ``CAP_SYS_CHROOT`` on the RPC server's own thread where it is not effective, and
  restoring the exact previous sets afterwards).
* :class:`MinimalSlaveEngine` keeps the host's root but lets host mounts in (``rslave``), hands
  its setup to the RPC server as JSON through a pipe passed with SCM_RIGHTS, brings ``lo``
  up itself from an RPC method (instead of asking the starter), keeps the invoker's stdio
  explicitly with ``keep_file_descriptor`` and waits on a pidfd in ``monitor_container``.

What each flow allows (SPEC §4): the RPC server is uid 0 in root; e=U with only
``CAP_SYS_ADMIN`` effective in suid (a method may raise more on its own thread and must
restore them); root of (or U in) the container's user namespace in userns/fakeroot; ns root
with only ``CAP_SYS_ADMIN`` effective in hybrid. Every mount is made by the RPC server in the
container's own (private or slave) mount namespace, which dies with the container, so there
is nothing to undo on the host in ``cleanup_container``. No capability set is configured: the
payload has none (SPEC §5).

Loaded as ``blind11_setup_correct:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here
runs at import time but definitions.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kit import system
from kit.contract import (
    Common,
    ConfigError,
    Context,
    EngineConfig,
    Operations,
    SignalChannel,
    WaitStatus,
)
from kit.rpc import FileDescriptor, RPCClient
from kit.starter.config import StarterConfig
from kit.system.linux import CAP_NUMBERS

#: The signals a conformant monitor_container forwards to the container (SPEC §7).
FORWARDED = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
)
#: The payload's environment.
PAYLOAD_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/"}
#: Host device nodes bound into a container's own /dev.
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
#: Top-level directories that merged-usr systems make symlinks into /usr.
TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
#: Flows whose caller is unprivileged and gets a user namespace.
USERNS_FLOWS = ("userns", "fakeroot", "hybrid")


def cap_mask(*names: str) -> int:
    mask = 0
    for name in names:
        mask |= 1 << CAP_NUMBERS[name]
    return mask


@contextlib.contextmanager
def thread_caps(*names: str) -> Iterator[None]:
    """Raise the permitted capabilities ``names`` into the calling thread's effective set for
    the block, then put back exactly the sets the thread had (SPEC §4: a method may raise
    more on its own thread and must restore them). Nothing changes where they are already
    effective (root flow, or a user namespace's owner)."""
    sysi = system.current()
    saved = sysi.capabilities()
    eff, prm, inh = saved
    want = eff | (cap_mask(*names) & prm)
    changed = want != eff
    if changed:
        sysi.set_capabilities(want, prm, inh)
    try:
        yield
    finally:
        if changed:
            sysi.set_capabilities(*saved)


def request_namespaces(sc: StarterConfig, propagation: str, loopback: bool = True) -> None:
    """The namespaces every engine here asks for: mount, pid, uts, ipc, net, plus a user
    namespace for the unprivileged callers (userns maps U to U, fakeroot and hybrid map 0 to
    U), hybrid through the setuid starter (SPEC §3, §5)."""
    kinds = ["mount", "pid", "uts", "ipc", "net"]
    if sc.flow in USERNS_FLOWS:
        kinds.append("user")
        if sc.flow == "userns":
            uid, gid = sc.invoker_uid, sc.invoker_gid
        else:
            uid, gid = 0, 0
        sc.add_uid_mappings([(uid, sc.invoker_uid, 1)])
        sc.add_gid_mappings([(gid, sc.invoker_gid, 1)])
    if sc.flow == "hybrid":
        sc.set_hybrid_workflow()
    sc.set_ns_flags(kinds)
    sc.set_mount_propagation(propagation)
    if loopback:
        sc.set_bring_loopback_interface()
    if sc.flow != "root":
        sc.set_no_new_privs()


def check_common_config(cfg: Any) -> None:
    if not cfg.argv:
        raise ConfigError("argv: no payload command given")
    if not isinstance(cfg.hostname, str) or not 0 < len(cfg.hostname) <= 64:
        raise ConfigError(f"hostname: invalid host name {cfg.hostname!r}")
    if "/" in cfg.hostname:
        raise ConfigError(f"hostname: '/' not allowed in {cfg.hostname!r}")


def check_session_dir(path: str) -> None:
    """The session directory must exist on the host: the engine never creates one there (a
    new directory would be a change on the host, SPEC §11); it mounts over it in the
    container's mount namespace only."""
    if not os.path.isabs(path) or os.path.normpath(path) in ("/", "/proc", "/dev", "/sys"):
        raise ConfigError(f"session_dir: {path!r} must be an absolute path of a plain directory")
    if not os.path.isdir(path):
        raise ConfigError(f"session_dir: {path!r} is not an existing directory")


class _SetupMixin:
    """Helpers of the RPC classes: mount flags read back, read-only remounts, /dev."""

    sys: Any

    def _kept_flags(self, target: str) -> list[str]:
        """The nosuid/nodev/noexec flags a mount has: a remount must repeat them (in a user
        namespace they may be locked: dropping one is refused)."""
        flags = os.statvfs(target).f_flag
        names = []
        for bit, name in (
            (os.ST_NOSUID, "nosuid"),
            (os.ST_NODEV, "nodev"),
            (os.ST_NOEXEC, "noexec"),
        ):
            if flags & bit:
                names.append(name)
        return names

    def _remount_ro(self, target: str, extra: tuple[str, ...] = ()) -> None:
        flags = {"remount", "bind", "ro", *self._kept_flags(target), *extra}
        self.sys.mount(None, target, None, sorted(flags))

    def _bind_ro(self, source: str, target: str) -> None:
        self.sys.mount(source, target, None, ["bind", "rec"])
        self._remount_ro(target, ("nosuid", "nodev"))

    def _populate_dev(self, dev: str, devpts: bool) -> None:
        """A tmpfs /dev with the host's harmless nodes bound in (no mknod: a bind works in
        every flow, a device node made in a user namespace would not open)."""
        self.sys.mount("tmpfs", dev, "tmpfs", ["nosuid", "noexec"], "mode=0755,size=1m")
        for node in DEV_NODES:
            host = f"/dev/{node}"
            if not os.path.exists(host) or not stat.S_ISCHR(os.stat(host).st_mode):
                continue
            target = os.path.join(dev, node)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
            self.sys.mount(host, target, None, ["bind"])
        for name, link in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ):
            os.symlink(link, os.path.join(dev, name))
        shm = os.path.join(dev, "shm")
        os.mkdir(shm, 0o1777)
        self.sys.mount("tmpfs", shm, "tmpfs", ["nosuid", "nodev", "noexec"], "mode=1777,size=16m")
        if devpts:
            pts = os.path.join(dev, "pts")
            os.mkdir(pts, 0o755)
            self.sys.mount(
                "devpts", pts, "devpts", ["nosuid", "noexec"], "newinstance,ptmxmode=0666,mode=0620"
            )
            os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))

    def _mount_proc(self, target: str) -> None:
        """A procfs of the container's pid namespace (this process is in it)."""
        self.sys.mount("proc", target, "proc", ["nosuid", "nodev", "noexec"])


# ==========================================================================================
# 1. pivot_root into a tmpfs root file system
# ==========================================================================================


@dataclass
class PivotConfig(EngineConfig):
    hostname: str = "pivot-box"
    domainname: str = "blind11.test"
    #: An existing host directory that the container's mount namespace covers with a tmpfs.
    session_dir: str = "/mnt"
    session_size_mb: int = 64


class PivotRPC(_SetupMixin):
    """RPC methods of :class:`PivotTmpfsEngine`, served in the container's namespaces."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.sys = system.current()

    def mount_session(self, path: str, size_mb: int) -> str:
        """Cover ``path`` with a tmpfs (the session) in the container's mount namespace and
        make it a mount point for the root file system inside it."""
        if not os.path.isdir(path):
            raise FileNotFoundError(2, f"session directory {path!r} does not exist")
        self.sys.mount(
            "tmpfs", path, "tmpfs", ["nosuid", "nodev"], f"mode=0755,size={int(size_mb)}m"
        )
        rootfs = os.path.join(path, "rootfs")
        os.mkdir(rootfs, 0o755)
        # pivot_root wants the new root to be a mount point: a tmpfs of its own.
        self.sys.mount("tmpfs", rootfs, "tmpfs", ["nosuid", "nodev"], "mode=0755,size=32m")
        return rootfs

    def populate_rootfs(self, rootfs: str, hostname: str) -> list[str]:
        """Lay out the root file system; return what was bound from the host."""
        bound = []
        os.mkdir(os.path.join(rootfs, "usr"), 0o755)
        self._bind_ro("/usr", os.path.join(rootfs, "usr"))
        bound.append("/usr")
        for name in TOP_LEVEL:
            host = f"/{name}"
            target = os.path.join(rootfs, name)
            if os.path.islink(host):
                os.symlink(os.readlink(host), target)
            elif os.path.isdir(host):
                os.mkdir(target, 0o755)
                self._bind_ro(host, target)
                bound.append(host)
        for name, mode in (
            ("etc", 0o755),
            ("proc", 0o555),
            ("dev", 0o755),
            ("tmp", 0o1777),
            ("run", 0o755),
            ("root", 0o700),
            ("home", 0o755),
        ):
            os.mkdir(os.path.join(rootfs, name), mode)
            os.chmod(os.path.join(rootfs, name), mode)  # umask
        self._write_etc(os.path.join(rootfs, "etc"), hostname)
        if os.path.isdir("/etc/alternatives"):  # Debian's /usr/bin/awk & co. point there
            os.mkdir(os.path.join(rootfs, "etc", "alternatives"), 0o755)
            self._bind_ro("/etc/alternatives", os.path.join(rootfs, "etc", "alternatives"))
            bound.append("/etc/alternatives")
        self._populate_dev(os.path.join(rootfs, "dev"), devpts=True)
        self._mount_proc(os.path.join(rootfs, "proc"))
        self.sys.mount(
            "tmpfs", os.path.join(rootfs, "tmp"), "tmpfs", ["nosuid", "nodev"], "mode=1777,size=64m"
        )
        return bound

    def set_identity(self, hostname: str, domainname: str) -> None:
        self.sys.sethostname(hostname)
        self.sys.setdomainname(domainname)

    def pivot(self, rootfs: str) -> str:
        """pivot_root into ``rootfs``; the old root is detached. The container process shares
        root and cwd with this server (CLONE_FS), so it ends up in the new root too."""
        os.chdir(rootfs)
        os.mkdir(".oldroot", 0o700)
        self.sys.pivot_root(".", ".oldroot")
        os.chdir("/")
        self.sys.umount("/.oldroot", detach=True)
        os.rmdir("/.oldroot")
        self._remount_ro("/")
        return str(self.sys.propagation("/"))

    def _write_etc(self, etc: str, hostname: str) -> None:
        files = {
            "hostname": f"{hostname}\n",
            "hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost\n",
            "passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
            "group": "root:x:0:\nnogroup:x:65534:\n",
            "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
        }
        try:
            with open("/etc/resolv.conf") as f:
                files["resolv.conf"] = f.read()
        except OSError:
            pass
        for name, content in files.items():
            with open(os.path.join(etc, name), "w") as f:
                f.write(content)


class _PollingMonitor:
    """monitor_container shared by the first two engines: forward the five signals, reap
    only the container."""

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=0.1)
            while sig is not None:
                if sig in FORWARDED:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                sig = signals.get(timeout=0)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status


class PivotTmpfsEngine(_PollingMonitor, Operations):
    """Correct: pivot_root into a tmpfs root (ro /usr binds, own /dev, /proc, /tmp) built by RPC in the container's private mount namespace."""  # noqa: E501

    engine_name = "blind11-setup-pivot"
    rpc_methods = PivotRPC

    def config(self) -> PivotConfig:
        return PivotConfig()

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        self.common = common

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg = self.common.engine_config
        check_common_config(cfg)
        check_session_dir(cfg.session_dir)
        if not 8 <= cfg.session_size_mb <= 4096:
            raise ConfigError(f"session_size_mb: {cfg.session_size_mb} out of range 8..4096")
        # pivot_root needs a root that is not shared: rprivate.
        request_namespaces(starter_config, "rprivate")

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rootfs = rpc.mount_session(path=cfg.session_dir, size_mb=cfg.session_size_mb)
        rpc.populate_rootfs(rootfs=rootfs, hostname=cfg.hostname)
        rpc.set_identity(hostname=cfg.hostname, domainname=cfg.domainname)
        if ctx.cancelled:
            raise RuntimeError(f"container gone during setup: {ctx.reason}")
        rpc.pivot(rootfs=rootfs)

    def start_process(self, master_fd: int) -> None:
        argv = list(self.common.engine_config.argv)
        os.execvpe(argv[0], argv, dict(PAYLOAD_ENV))

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        # Everything lives in the container's mount namespace, gone with the container.
        return None


# ==========================================================================================
# 2. read-only bind of the host root, tmpfs over the writable places, move + chroot
# ==========================================================================================


@dataclass
class RoBindConfig(EngineConfig):
    hostname: str = "robind-box"
    session_dir: str = "/mnt"
    writable: list[str] = field(default_factory=lambda: ["/tmp", "/run", "/var/tmp"])


class RoBindRPC(_SetupMixin):
    """RPC methods of :class:`RoBindRootEngine`."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.sys = system.current()

    def stage_root(self, session: str) -> str:
        """A tmpfs session over ``session`` with the host root bound read-only in it."""
        self.sys.mount("tmpfs", session, "tmpfs", ["nosuid", "nodev"], "mode=0755,size=4m")
        root = os.path.join(session, "root")
        os.mkdir(root, 0o755)
        self.sys.mount("/", root, None, ["bind", "rec"])
        self._remount_ro(root, ("nosuid",))
        return root

    def overlay_mounts(self, root: str, writable: list[str]) -> list[str]:
        """Fresh /proc and /dev, tmpfs on the writable directories that exist in the image."""
        self._mount_proc(os.path.join(root, "proc"))
        self._populate_dev(os.path.join(root, "dev"), devpts=False)
        done = ["/proc", "/dev"]
        for path in writable:
            target = os.path.join(root, path.lstrip("/"))
            if os.path.isdir(target) and not os.path.islink(target):
                mode = "1777" if path in ("/tmp", "/var/tmp") else "0755"
                self.sys.mount(
                    "tmpfs", target, "tmpfs", ["nosuid", "nodev"], f"mode={mode},size=64m"
                )
                done.append(path)
        return done

    def set_hostname(self, name: str) -> None:
        self.sys.sethostname(name)

    def enter(self, root: str) -> str:
        """Switch to ``root`` as Apptainer does: move it over / and chroot into it."""
        os.chdir(root)
        self.sys.mount(".", "/", None, ["move"])
        self._chroot_here()
        os.chdir("/")
        return os.getcwd()

    def _chroot_here(self) -> None:
        with thread_caps("CAP_SYS_CHROOT"):
            self.sys.chroot(".")


class RoBindRootEngine(_PollingMonitor, Operations):
    """Correct: read-only recursive bind of the host root with fresh /proc, /dev and tmpfs over /tmp and /run, entered with mount --move + chroot via RPC."""  # noqa: E501

    engine_name = "blind11-setup-robind"
    rpc_methods = RoBindRPC
    propagation = "rprivate"

    def config(self) -> RoBindConfig:
        return RoBindConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg = self.common.engine_config
        check_common_config(cfg)
        check_session_dir(cfg.session_dir)
        for path in cfg.writable:
            if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/"):
                raise ConfigError(f"writable: {path!r} must be an absolute path without '..'")
        request_namespaces(starter_config, self.propagation)

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        root = rpc.stage_root(session=cfg.session_dir)
        rpc.overlay_mounts(root=root, writable=cfg.writable)
        rpc.set_hostname(name=cfg.hostname)
        rpc.enter(root=root)

    def start_process(self, master_fd: int) -> None:
        argv = list(self.common.engine_config.argv)
        os.execvpe(argv[0], argv, dict(PAYLOAD_ENV))

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        return None


# ==========================================================================================
# 3. minimal: host root, slave propagation, setup handed over a pipe, pidfd monitor
# ==========================================================================================


@dataclass
class MinimalConfig(EngineConfig):
    hostname: str = "minimal-box"
    domainname: str = "minimal.test"
    keep_stdio: bool = True


class MinimalRPC:
    """RPC methods of :class:`MinimalSlaveEngine`."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.sys = system.current()

    def apply_setup(self, spec: FileDescriptor) -> dict[str, str]:
        """Read the setup (JSON) from the pipe ``spec`` and apply it: names, a /proc of the
        container's pid namespace, a private /dev/shm. The descriptor is ours: closed here."""
        try:
            chunks = []
            while True:
                chunk = os.read(spec, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(spec)
        setup = json.loads(b"".join(chunks) or b"{}")
        self.sys.sethostname(setup["hostname"])
        self.sys.setdomainname(setup["domainname"])
        self.sys.mount("proc", "/proc", "proc", ["nosuid", "nodev", "noexec"])
        self.sys.mount(
            "tmpfs", "/dev/shm", "tmpfs", ["nosuid", "nodev", "noexec"], "mode=1777,size=16m"
        )
        return {"hostname": self.sys.gethostname(), "proc": str(self.sys.propagation("/proc"))}

    def loopback_up(self, ifname: str) -> bool:
        """Bring ``ifname`` up in the container's network namespace; CAP_NET_ADMIN is raised
        on this thread only for the call where it is merely permitted (suid, hybrid)."""
        with thread_caps("CAP_NET_ADMIN"):
            self.sys.link_up(ifname)
        return True


class MinimalSlaveEngine(Operations):
    """Correct: host root with rslave propagation, setup JSON sent to the RPC server as an SCM_RIGHTS pipe, lo brought up by RPC, pidfd-based monitor."""  # noqa: E501

    engine_name = "blind11-setup-minimal"
    rpc_methods = MinimalRPC

    def config(self) -> MinimalConfig:
        return MinimalConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg = self.common.engine_config
        check_common_config(cfg)
        # lo is brought up by our own RPC method, not by the starter.
        request_namespaces(starter_config, "rslave", loopback=False)
        if cfg.keep_stdio:
            for fd in (0, 1, 2):
                try:
                    os.fstat(fd)
                except OSError:
                    continue
                starter_config.keep_file_descriptor(fd)

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        setup = json.dumps({"hostname": cfg.hostname, "domainname": cfg.domainname}).encode()
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            os.write(w, setup)  # far below the pipe's capacity
            os.close(w)
            w = -1
            rpc.apply_setup(spec=FileDescriptor(r))
        finally:
            os.close(r)  # the caller keeps ownership of what it sends
            if w >= 0:
                os.close(w)
        rpc.loopback_up(ifname="lo")

    def start_process(self, master_fd: int) -> None:
        argv = list(self.common.engine_config.argv)
        os.execvpe(argv[0], argv, dict(PAYLOAD_ENV))

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        """Wait on a pidfd of the container; forward the five signals; reap only ``pid``."""
        pidfd = os.pidfd_open(pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while True:
                sig = signals.get(timeout=0)
                while sig is not None:
                    if sig in FORWARDED:
                        with contextlib.suppress(ProcessLookupError):
                            signal.pidfd_send_signal(pidfd, sig)
                    sig = signals.get(timeout=0)
                if poller.poll(50):
                    done, status = os.waitpid(pid, 0)
                    if done == pid:
                        return status
        finally:
            os.close(pidfd)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        return None
