"""Blind round 13, theme ``cve``: correct engines that do, carefully, the things real
container runtimes got wrong in their published vulnerabilities (runc, crun, Apptainer,
bubblewrap, LXC, Docker). Written from ``SPEC.md`` alone (and the kit's public API), as an
outside engine author would; ``blind13_cve.py`` derives one buggy engine per CVE-like
mistake from them. Each engine is conformant in all five flows (root, suid, userns,
fakeroot, hybrid):

- ``RootfsEngine`` (``blind13-cve-rootfs``): the container gets a root of its own, a
  recursive bind of ``/`` entered with ``pivot_root(".", ".")`` and a private ``/run``
  tmpfs; run-time files (a ``.containerenv``, a secret under ``/var/run/secrets``) are
  written by resolving their container paths *inside* the new root (``openat2`` with
  ``RESOLVE_IN_ROOT``), so an absolute symlink such as Debian's ``/var/run -> /run`` lands
  in the container's ``/run``, never the host's; stage 2 resolves the payload's working
  directory the same way and enters it with ``fchdir`` through a close-on-exec descriptor
  (runc's fix for CVE-2024-21626).
- ``VolumesEngine`` (``blind13-cve-volumes``): no root switch; the container's own mount
  namespace (``rprivate``) gets tmpfs ``/run`` and ``/dev/shm``, its own mqueue and the
  host's ``resolv.conf`` (the master opens the host file, hands the descriptor to the RPC
  server over SCM_RIGHTS and closes it before anything runs in the container); the
  hostname is set only in a UTS namespace of the container's own; cleanup leaves the
  mounts to die with the container's mount namespace.
- ``PrivdropEngine`` (``blind13-cve-privdrop``): a setuid-aware engine whose RPC method
  creates root-owned directories in the container's ``/run``: in the setuid flow it
  regains uid/gid 0 on its own thread from the saved uid and gives them back in the
  right order (groups first, while still root; then users; then the capabilities it came
  in with); ``no_new_privs`` is requested in every flow but root.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kit import system
from kit.contract import FORWARDED_SIGNALS, ConfigError, EngineConfig, Operations
from kit.rpc import FileDescriptor, RPCClient
from kit.system import linux

log = logging.getLogger(__name__)

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# --- openat2(2), which Python's os module does not wrap -------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPENAT2 = 437  # the same number on x86-64 and arm64 (new syscalls are unified)
_SYS_SETRESGID = {"x86_64": 119, "aarch64": 149}[os.uname().machine]
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2). Unlike ``os.open`` this adds nothing to *flags*: the caller says
    ``O_CLOEXEC`` itself."""
    how = struct.pack("QQQ", flags, mode if flags & os.O_CREAT else 0, resolve)
    buf = ctypes.create_string_buffer(how, len(how))
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        buf,
        ctypes.c_size_t(len(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"openat2({path!r}): {os.strerror(err)}", path)
    return int(fd)


def open_in_root(root_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """Open *path* (a container path, absolute or not) as if *root_fd* were ``/``: ``..``
    and absolute symlinks stay inside it."""
    return openat2(
        root_fd,
        path.lstrip("/") or ".",
        flags,
        mode,
        RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    )


def makedirs_in_root(root_fd: int, path: str, mode: int = 0o755) -> int:
    """``mkdir -p`` of a container path under *root_fd*, every component resolved inside
    the root; returns a close-on-exec O_PATH descriptor of the last directory."""
    done: list[str] = []
    fd = os.dup(root_fd)
    try:
        for part in (p for p in path.split("/") if p not in ("", ".")):
            done.append(part)
            sub = "/".join(done)
            try:
                nfd = open_in_root(root_fd, sub, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
                nfd = open_in_root(root_fd, sub, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def thread_setresgid(rgid: int, egid: int, sgid: int) -> None:
    """setresgid for the calling thread only (glibc's wrapper changes every thread)."""
    if (
        _libc.syscall(
            ctypes.c_long(_SYS_SETRESGID),
            ctypes.c_int(rgid),
            ctypes.c_int(egid),
            ctypes.c_int(sgid),
        )
        < 0
    ):
        err = ctypes.get_errno()
        raise OSError(err, f"setresgid (thread): {os.strerror(err)}")


# --- what the three engines share --------------------------------------------------------------


class _Base(Operations):
    """StarterConfig per flow, a forwarding monitor, exec of argv. Subclasses add the
    container set-up."""

    config_class: type[EngineConfig] = EngineConfig

    def config(self) -> EngineConfig:
        return self.config_class()

    @property
    def cfg(self) -> Any:
        return self.common.engine_config

    # stage 1
    def namespaces(self, sc: Any) -> list[str]:
        return ["mount", "pid", "uts", "ipc", "net"]

    def wants_no_new_privs(self, sc: Any, namespaces: list[str]) -> bool:
        # Every flow where the invoker is not root: the payload must never regain what the
        # setuid starter or a user namespace could give it back through a setuid binary.
        return sc.flow != "root"

    def prepare_config(self, sc: Any) -> None:
        if not self.cfg.argv:
            raise ConfigError("argv: no payload to run")
        namespaces = self.namespaces(sc)
        if sc.flow in ("userns", "fakeroot", "hybrid"):
            namespaces.append("user")
            inside = sc.invoker_uid if sc.flow == "userns" else 0
            inside_gid = sc.invoker_gid if sc.flow == "userns" else 0
            sc.add_uid_mappings([(inside, sc.invoker_uid, 1)])
            sc.add_gid_mappings([(inside_gid, sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_ns_flags(namespaces)
        if "net" in namespaces:
            sc.set_bring_loopback_interface()
        sc.set_mount_propagation(self.propagation())
        if self.wants_no_new_privs(sc, namespaces):
            sc.set_no_new_privs()

    def propagation(self) -> str:
        return "rprivate"

    # master
    def rpc(self, rpc_conn: Any) -> RPCClient:
        return RPCClient(rpc_conn, self.common.engine_name)

    def monitor_container(self, pid: int, signals: Any) -> int:
        while True:
            sig = signals.get(timeout=0.05)
            if sig in FORWARDED_SIGNALS:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status

    def cleanup_container(self, ctx: Any, fatal: Any, status: Any) -> None:
        # Everything this engine set up lives in the container's own namespaces, which the
        # kernel tears down with the container's last process.
        return None

    # stage 2
    def enter_workdir(self) -> None:
        os.chdir("/")

    def start_process(self, master_fd: int) -> None:
        argv = list(self.cfg.argv)
        self.enter_workdir()
        os.execvpe(argv[0], argv, {"PATH": PATH, "HOME": "/"})


class _BaseRPC:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)


# --- 1. a root of its own, files resolved inside it ----------------------------------------

STAGING = "/mnt"  # an existing, empty-enough directory: nothing is created on the host


@dataclass
class RootfsConfig(EngineConfig):
    hostname: str = "rootfs-box"
    cwd: str = "/"
    # Run-time files, by container path, written before the payload starts. Debian's
    # /var/run is an absolute symlink to /run: inside the container that is the
    # container's /run tmpfs.
    run_files: dict[str, str] = field(
        default_factory=lambda: {
            "/run/.containerenv": "engine=blind13-cve-rootfs\n",
            "/var/run/secrets/blind13/token": "not-a-real-token\n",
        }
    )


class RootfsRPC(_BaseRPC):
    def bind_root(self, staging: str) -> None:
        """The new root: the host's tree, bound recursively (in the container's mount
        namespace only), with a /run of the container's own."""
        self.system.mount("/", staging, None, ["bind", "rec"])
        self.system.mount(
            "tmpfs", f"{staging}/run", "tmpfs", ["nosuid", "nodev"], "mode=0755,size=4m"
        )

    def inject_file(self, staging: str, path: str, content: str) -> bool:
        """Write *content* at container path *path* of the root at *staging*; True once
        written, False when the file system refused it (an optional file)."""
        root = os.open(staging, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            parent = makedirs_in_root(root, os.path.dirname(path))
            try:
                fd = openat2(
                    parent,
                    os.path.basename(path),
                    os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                )
            finally:
                os.close(parent)
        except PermissionError:
            return False
        finally:
            os.close(root)
        with os.fdopen(fd, "w") as f:
            f.write(content)
        return True

    def enter_root(self, staging: str) -> None:
        """pivot_root(".", "."): no directory for the old root is needed (and none is
        created on the host); the old root is detached at once."""
        self.system.chdir(staging)
        self.system.pivot_root(".", ".")
        self.system.umount(".", detach=True)
        self.system.chdir("/")


class RootfsEngine(_Base):
    """A private root (recursive bind + pivot_root), files injected safely."""

    engine_name = "blind13-cve-rootfs"
    rpc_methods = RootfsRPC
    config_class = RootfsConfig

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        rpc = self.rpc(rpc_conn)
        rpc.bind_root(staging=STAGING)
        for path, content in self.cfg.run_files.items():
            if not rpc.inject_file(staging=STAGING, path=path, content=content):
                log.warning("%s: could not write %s (skipped)", self.common.engine_name, path)
        rpc.sethostname(name=self.cfg.hostname)
        rpc.enter_root(staging=STAGING)

    def open_workdir(self) -> int:
        """The payload's working directory, resolved inside the container's root (a
        symlink in it cannot lead out); close-on-exec, so the payload does not inherit it."""
        root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return open_in_root(root, self.cfg.cwd, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            os.close(root)

    def enter_workdir(self) -> None:
        fd = self.open_workdir()
        os.fchdir(fd)  # fd goes at exec (O_CLOEXEC)


# --- 2. volumes in the container's own mount namespace -------------------------------------


@dataclass
class VolumesConfig(EngineConfig):
    hostname: str = ""  # empty: named after the container id
    share_host_uts: bool = False
    shm_size: str = "64m"


class VolumesRPC(_BaseRPC):
    def mount_volumes(self, shm_size: str) -> None:
        self.system.mount("tmpfs", "/run", "tmpfs", ["nosuid", "nodev"], "mode=0755,size=8m")
        self.system.mount(
            "shm", "/dev/shm", "tmpfs", ["nosuid", "nodev", "noexec"], f"mode=1777,size={shm_size}"
        )
        self.system.mount("mqueue", "/dev/mqueue", "mqueue", ["nosuid", "nodev", "noexec"])

    def install_resolv_conf(self, src: FileDescriptor) -> None:
        """Copy the host's resolv.conf (an open descriptor from the master) into the
        container's /run and bind it over the container's /etc/resolv.conf."""
        try:
            data = b""
            while chunk := os.read(src, 65536):
                data += chunk
        finally:
            os.close(src)
        fd = os.open(
            "/run/resolv.conf", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644
        )
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.system.mount("/run/resolv.conf", "/etc/resolv.conf", None, ["bind"])


VOLUMES = ("/run", "/dev/shm", "/dev/mqueue")


class VolumesEngine(_Base):
    """Own mount namespace, private tmpfs/mqueue volumes, the host's resolv.conf handed over
    as a descriptor and closed before the payload."""

    engine_name = "blind13-cve-volumes"
    rpc_methods = VolumesRPC
    config_class = VolumesConfig

    def hostname(self) -> str:
        return self.cfg.hostname or f"c-{self.common.container_id[:12]}"

    def namespaces(self, sc: Any) -> list[str]:
        namespaces = ["mount", "pid", "ipc", "net"]
        if not self.cfg.share_host_uts:
            namespaces.append("uts")
        return namespaces

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        rpc = self.rpc(rpc_conn)
        rpc.mount_volumes(shm_size=self.cfg.shm_size)
        # A host file opened for one set-up step: the RPC server gets its own copy of the
        # descriptor, ours is closed before create_container returns.
        with open("/etc/resolv.conf", "rb") as host_file:
            rpc.install_resolv_conf(src=FileDescriptor(host_file.fileno()))
        if not self.cfg.share_host_uts:
            try:
                rpc.sethostname(name=self.hostname())
            except PermissionError:  # cosmetic: a container runs without its name
                log.warning("%s: hostname not set (EPERM)", self.common.engine_name)


# --- 3. a setuid-aware engine that regains root on one thread -------------------------------


@dataclass
class PrivdropConfig(EngineConfig):
    hostname: str = "privdrop"
    # Root-owned directories in the container's /run, with their modes.
    system_dirs: dict[str, int] = field(
        default_factory=lambda: {"/run/lock": 0o1777, "/run/user": 0o755}
    )


class PrivdropRPC(_BaseRPC):
    def mount_run(self) -> None:
        self.system.mount("tmpfs", "/run", "tmpfs", ["nosuid", "nodev"], "mode=0755,size=4m")

    def make_system_dirs(self, dirs: dict[str, int]) -> list[str]:
        """Create root-owned directories (owner as the kernel gives it: root where the
        server can be root, the server's own uid elsewhere)."""
        made = []
        with self._as_root():
            for path, mode in dirs.items():
                os.mkdir(path, 0o700)
                os.chmod(path, mode)
                made.append(path)
        return made

    @contextlib.contextmanager
    def _as_root(self) -> Iterator[None]:
        """Root on this thread for the duration: in the setuid flow the server keeps saved
        uid 0 and may regain it (SPEC §4: a method may raise more on its own thread and
        must restore them); anywhere else it is root already or cannot become it."""
        ids = os.getresuid(), os.getresgid()
        (_, euid, suid), _ = ids
        if euid == 0 or suid != 0:
            yield
            return
        caps = linux.capget()
        linux.thread_setresuid(0, 0, 0)  # euid 0: the kernel raises effective to permitted
        try:
            thread_setresgid(0, 0, 0)
            yield
        finally:
            self._restore(ids, caps)

    def _restore_steps(self, ids: Any, caps: tuple[int, int, int]) -> list[Any]:
        (ruid, euid, suid), (rgid, egid, sgid) = ids
        # Groups first, while this thread still is root (CAP_SETGID); then the user ids,
        # which clears the effective set; then the capabilities the method came in with.
        return [
            ("gids", lambda: thread_setresgid(rgid, egid, sgid)),
            ("uids", lambda: linux.thread_setresuid(ruid, euid, suid)),
            ("capabilities", lambda: linux.capset(*caps)),
        ]

    def _restore(self, ids: Any, caps: tuple[int, int, int]) -> None:
        # Every step is tried even when one fails, and a failure is logged rather than
        # raised, so it never hides the exception the method itself may be raising.
        for what, step in self._restore_steps(ids, caps):
            try:
                step()
            except OSError as exc:
                log.warning("could not restore %s: %s", what, os.strerror(exc.errno or errno.EIO))


class PrivdropEngine(_Base):
    """Root-owned directories made by an RPC method that borrows root on its own thread."""

    engine_name = "blind13-cve-privdrop"
    rpc_methods = PrivdropRPC
    config_class = PrivdropConfig

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        rpc = self.rpc(rpc_conn)
        rpc.mount_run()
        rpc.make_system_dirs(dirs=dict(self.cfg.system_dirs))
        rpc.sethostname(name=self.cfg.hostname)
