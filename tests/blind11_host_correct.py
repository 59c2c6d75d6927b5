"""Blind engines for SPEC §11 (the host): two CORRECT engines.

Written from SPEC.md alone (plus the kit's public API: kit.contract, kit.starter.config,
kit.rpc, kit.system), without reading the conformance suite, the mutants, the reference
engines or the host diff.

Both engines do a lot that *looks* like a host change but stays inside the container's own
namespaces or is undone before the run ends: mounts in the container's mount namespace
(private/slave propagation, so nothing travels back to the host), a hostname and domainname
in its uts namespace, SysV IPC objects and POSIX message queues in its ipc namespace (they die
with it), a loopback MTU and a net sysctl in its network namespace, files in a temporary
directory of the run that cleanup removes, and a helper process that cleanup kills and reaps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from kit import system
from kit.contract import EngineConfig, Operations
from kit.rpc import RPCClient
from kit.system import linux

FORWARDED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# SysV IPC / POSIX mqueue constants (x86_64 Linux, glibc)
IPC_PRIVATE = 0
IPC_CREAT = 0o1000
IPC_EXCL = 0o2000
IPC_RMID = 0

# ioctls on an AF_INET socket
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
    libc.semget.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    libc.msgget.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mq_open.restype = ctypes.c_int
    libc.mq_close.argtypes = [ctypes.c_int]
    libc.mq_unlink.argtypes = [ctypes.c_char_p]
    libc.sem_open.restype = ctypes.c_void_p
    libc.sem_close.argtypes = [ctypes.c_void_p]
    libc.sem_unlink.argtypes = [ctypes.c_char_p]
    return libc


def _ok(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def shmget(key: int, size: int, flags: int) -> int:
    return _ok(_libc().shmget(key, size, flags), "shmget")


def semget(key: int, nsems: int, flags: int) -> int:
    return _ok(_libc().semget(key, nsems, flags), "semget")


def msgget(key: int, flags: int) -> int:
    return _ok(_libc().msgget(key, flags), "msgget")


def mq_create(name: str) -> int:
    """Create (or open) POSIX message queue ``name`` and return its descriptor."""
    fd = _libc().mq_open(name.encode(), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600, None)
    return _ok(fd, f"mq_open {name}")


def mq_close(fd: int) -> None:
    _libc().mq_close(fd)


def ifmtu(ifname: str, mtu: int | None = None) -> int:
    """Read (``mtu`` None) or set an interface's MTU in the caller's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if mtu is None:
            req = struct.pack("16si12x", ifname.encode(), 0)
            out = fcntl.ioctl(s.fileno(), SIOCGIFMTU, req)
            return struct.unpack("16si12x", out)[1]
        req = struct.pack("16si12x", ifname.encode(), mtu)
        fcntl.ioctl(s.fileno(), SIOCSIFMTU, req)
        return mtu


@contextlib.contextmanager
def thread_caps(names: list[str]):
    """Raise ``names`` into the calling thread's effective set when they are permitted
    (the suid RPC server starts with CAP_SYS_ADMIN only); restore the sets on the way out."""
    sysif = system.current()
    eff, perm, inh = sysif.capabilities()
    want = linux.caps_to_mask(names) & perm
    changed = bool(want & ~eff)
    if changed:
        sysif.set_capabilities(eff | want, perm, inh)
    try:
        yield
    finally:
        if changed:
            sysif.set_capabilities(eff, perm, inh)


def _attempt(done: dict[str, Any], key: str, func, *args: Any) -> Any:
    """Best effort: record a result, or the errno when the flow's privilege does not allow it
    (e.g. no CAP_NET_ADMIN over the container's network namespace)."""
    try:
        value = func(*args)
    except OSError as exc:
        done[key] = f"errno {exc.errno} ({errno.errorcode.get(exc.errno, '?')})"
        return None
    done[key] = value if isinstance(value, (str, int, bool)) or value is None else str(value)
    return value


# --- configuration -----------------------------------------------------------------------


@dataclass
class HostConfig(EngineConfig):
    hostname: str = "blind11-box"
    domainname: str = "blind11.test"
    propagation: str = "rprivate"


# --- RPC methods (run in the RPC server: the container's namespaces) ---------------------------


class HostRPC:
    """Privileged container setup, served by the RPC server, which is in the container's
    mount, uts, ipc and net namespaces: everything here stays in them."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.system = system.current()

    # uts namespace
    def set_names(self, hostname: str, domainname: str) -> dict:
        self.system.sethostname(hostname)
        self.system.setdomainname(domainname)
        return {"hostname": self.system.gethostname(), "domainname": self.system.getdomainname()}

    # mount namespace: a tmpfs, a read-only bind of part of it, a subtree made private
    def build_mounts(self, workdir: str) -> dict:
        done: dict[str, Any] = {}
        mnt = os.path.join(workdir, "mnt")
        os.mkdir(mnt, 0o755)
        with thread_caps(["CAP_SYS_ADMIN"]):
            self.system.mount("blind11", mnt, "tmpfs", ["nosuid", "nodev"], "size=1m,mode=0755")
            self.system.set_propagation(mnt, "private")
            done["tmpfs"] = mnt
            os.mkdir(os.path.join(mnt, "data"))
            os.mkdir(os.path.join(mnt, "ro"))
            with open(os.path.join(mnt, "data", "hello"), "w") as f:
                f.write("inside the container's tmpfs\n")
            ro = os.path.join(mnt, "ro")
            self.system.mount(os.path.join(mnt, "data"), ro, None, ["bind"])
            self.system.mount(None, ro, None, ["remount", "bind", "ro", "nosuid", "nodev"])
            done["ro_bind"] = ro
            try:
                open(os.path.join(ro, "nope"), "w").close()
                done["ro_write"] = "unexpectedly writable"
            except OSError as exc:
                done["ro_write"] = errno.errorcode.get(exc.errno, str(exc.errno))
            # a second tmpfs mounted and unmounted again, and one detached lazily
            tmp2 = os.path.join(mnt, "scratch")
            os.mkdir(tmp2)
            self.system.mount("blind11-scratch", tmp2, "tmpfs", ["nosuid", "nodev"], "size=64k")
            self.system.umount(tmp2)
            self.system.mount("blind11-scratch", tmp2, "tmpfs", ["nosuid", "nodev"], "size=64k")
            self.system.umount(tmp2, detach=True)
        done["propagation_root"] = self.system.propagation("/")
        return done

    # mount namespace: cover a host file, seen only in the container
    def cover_file(self, source: str, target: str) -> str:
        with thread_caps(["CAP_SYS_ADMIN"]):
            self.system.mount(source, target, None, ["bind"])
        with open(target) as f:
            return f.read()

    # ipc namespace: objects that die with it
    def make_ipc(self, mq_name: str) -> dict:
        done: dict[str, Any] = {}
        _attempt(done, "shm", shmget, IPC_PRIVATE, 4096, IPC_CREAT | 0o600)
        _attempt(done, "sem", semget, 0x0B11, 2, IPC_CREAT | 0o600)
        _attempt(done, "msg", msgget, 0x0B12, IPC_CREAT | 0o600)
        fd = _attempt(done, "mq", mq_create, mq_name)
        if fd is not None:
            mq_close(fd)  # the queue stays, in the container's ipc namespace only
        return done

    # network namespace: the container's loopback and one of its sysctls
    def tune_net(self, mtu: int, sysctl: str, value: str) -> dict:
        done: dict[str, Any] = {}
        with thread_caps(["CAP_NET_ADMIN"]):
            _attempt(done, "mtu_before", ifmtu, "lo")
            _attempt(done, "mtu", ifmtu, "lo", mtu)

            def write() -> str:
                path = "/proc/sys/" + sysctl.replace(".", "/")
                with open(path, "w") as f:
                    f.write(value)
                with open(path) as f:
                    return f.read().strip()

            _attempt(done, sysctl, write)
        return done

    # mount namespace: the container's network namespace bound on a file of its own tmpfs
    # (looks like a named network namespace, but lives and dies in the container's mounts)
    def bind_netns(self, target: str) -> str:
        open(target, "w").close()
        with thread_caps(["CAP_SYS_ADMIN"]):
            try:
                self.system.mount("/proc/self/ns/net", target, None, ["bind"])
            except OSError as exc:
                return f"not bound: {exc.strerror}"
        return "bound"

    # files in the run's work directory (removed by the master's cleanup)
    def write_file(self, path: str, text: str) -> int:
        with open(path, "w") as f:
            return f.write(text)


# --- the engines -----------------------------------------------------------------------------


def _prepare(sc: Any, propagation: str) -> None:
    namespaces = ["mount", "pid", "uts", "ipc", "net"]
    if sc.flow in ("userns", "fakeroot", "hybrid"):
        namespaces.append("user")
        uid, gid = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
        sc.add_uid_mappings([(uid, sc.invoker_uid, 1)])
        sc.add_gid_mappings([(gid, sc.invoker_gid, 1)])
    if sc.flow == "hybrid":
        sc.set_hybrid_workflow()
    sc.set_ns_flags(namespaces)
    sc.set_bring_loopback_interface()
    sc.set_mount_propagation(propagation)
    if sc.flow != "root":
        sc.set_no_new_privs()


class HostCorrectNS(Operations):
    """Correct: mounts, hostname, IPC and net tuning all via RPC in the container's own namespaces, a work dir and a helper process both removed in cleanup."""  # noqa: E501

    engine_name = "blind11-host-ns"
    rpc_methods = HostRPC

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workdir: str | None = None
        self._helper: subprocess.Popen | None = None
        self._cleaned = False
        self.setup_report: dict[str, Any] = {}

    # every process
    def config(self) -> HostConfig:
        return HostConfig()

    # stage 1
    def prepare_config(self, sc: Any) -> None:
        cfg = self.common.engine_config
        if not cfg.hostname or len(cfg.hostname) > 64:
            from kit.contract import ConfigError

            raise ConfigError(f"hostname: invalid value {cfg.hostname!r}")
        _prepare(sc, cfg.propagation)

    # master helpers
    def _make_workdir(self) -> str:
        with self._lock:
            if self._workdir is None:
                self._workdir = tempfile.mkdtemp(prefix="blind11-host-")
            return self._workdir

    def _mq_name(self) -> str:
        return f"/blind11-{self.common.container_id}"[:200]

    def _rpc_setup(self, rpc: RPCClient, workdir: str) -> None:
        cfg = self.common.engine_config
        report = self.setup_report
        report["names"] = rpc.set_names(hostname=cfg.hostname, domainname=cfg.domainname)
        report["mounts"] = rpc.build_mounts(workdir=workdir)
        report["ipc"] = rpc.make_ipc(mq_name=self._mq_name())
        report["net"] = rpc.tune_net(
            mtu=16000, sysctl="net.ipv4.ip_unprivileged_port_start", value="80"
        )
        report["file"] = rpc.write_file(path=os.path.join(workdir, "note"), text="container note\n")

    # master
    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        workdir = self._make_workdir()
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        self._rpc_setup(rpc, workdir)

    def _start_helper(self) -> None:
        with self._lock:
            if self._cleaned or self._helper is not None:
                return
            # a helper process (stands for a log forwarder); killed and reaped in cleanup
            self._helper = subprocess.Popen(
                ["/bin/sleep", "30"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                env={"PATH": PATH},
            )

    def post_start_process(self, ctx: Any, pid: int) -> None:
        self._start_helper()

    # stage 2
    def start_process(self, master_fd: int) -> None:
        argv = self.common.engine_config.argv
        os.execve(argv[0], argv, {"PATH": PATH})

    # master
    def monitor_container(self, pid: int, signals: Any) -> int:
        while True:
            sig = signals.get(timeout=0.1)
            if sig in FORWARDED:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status

    def _stop_helper(self) -> None:
        helper = self._helper
        if helper is not None:
            with contextlib.suppress(ProcessLookupError):
                helper.kill()  # the master's hooks block signals: SIGKILL, not SIGTERM
            helper.wait()

    def cleanup_container(self, ctx: Any, fatal: BaseException | None, status: int | None) -> None:
        with self._lock:
            if self._cleaned:
                return
            self._cleaned = True
            workdir, self._workdir = self._workdir, None
        self._stop_helper()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
            if os.path.exists(workdir):  # a mount point still busy in another namespace
                shutil.rmtree(workdir)


class HostCorrectSlave(HostCorrectNS):
    """Correct: rslave container mounts that cover host files, a netns file bound in the container, IPC and a lock file, all gone with the container or in cleanup."""  # noqa: E501

    engine_name = "blind11-host-rslave"
    rpc_methods = HostRPC

    def config(self) -> HostConfig:
        return HostConfig(
            hostname="blind11-slave", domainname="slave.blind11", propagation="rslave"
        )

    def _rpc_setup(self, rpc: RPCClient, workdir: str) -> None:
        cfg = self.common.engine_config
        report = self.setup_report
        report["names"] = rpc.set_names(hostname=cfg.hostname, domainname=cfg.domainname)
        report["mounts"] = rpc.build_mounts(workdir=workdir)
        # a host file covered in the container's mount namespace only
        motd = os.path.join(workdir, "motd")
        with open(motd, "w") as f:
            f.write("welcome to the container\n")
        os.chmod(motd, 0o644)
        os.chmod(workdir, 0o755)
        for target in ("/etc/motd", "/etc/issue"):
            if os.path.isfile(target):
                report["cover" + target] = rpc.cover_file(source=motd, target=target)
        report["netns"] = rpc.bind_netns(target=os.path.join(workdir, "mnt", "netns"))
        report["ipc"] = rpc.make_ipc(mq_name=self._mq_name() + "-s")
        report["net"] = rpc.tune_net(mtu=9000, sysctl="net.ipv4.ping_group_range", value="0 0")

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        workdir = self._make_workdir()
        # a lock file the master holds for the run (removed in cleanup with the work dir)
        self._lockfd = os.open(
            os.path.join(workdir, "lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600
        )
        fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(self, ctx: Any, fatal: BaseException | None, status: int | None) -> None:
        fd = getattr(self, "_lockfd", None)
        if fd is not None:
            self._lockfd = None
            os.close(fd)
        super().cleanup_container(ctx, fatal, status)
