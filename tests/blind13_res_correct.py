"""Blind round 13, theme ``res``: correct engines that set up resources for the container
beyond its namespaces (namespaced sysctls, a fresh /proc, a private /dev with device nodes,
devpts, /dev/shm and /dev/mqueue, POSIX IPC objects, a private /tmp, tmpfs sizes, a cgroup
namespace, loopback, the payload's resource limits), written from SPEC.md alone (and the
kit's public API: ``kit.contract``, ``kit.system``, ``kit.rpc``, ``kit.starter.config``),
without reading the conformance suite, the reference engines or the mutants. Each resource is
the container's own: made by the RPC server, which runs in the container's namespaces, with
the privilege §4 gives it in each flow (raised on its own thread and restored where the
setuid RPC server needs more), or by the master on the container's process only. Nothing
is left on the host (§11): every object lives in a namespace or a file system that dies
with the container.

- ``blind13-res-sysctl`` (:class:`SysctlEngine`): mount, pid, uts, ipc, net and cgroup
  namespaces (+ user); the RPC server mounts a fresh /proc for the container's pid namespace
  and writes the configured ``net.*`` and IPC sysctls (``kernel.msg*``, ``kernel.shm*``,
  ``fs.mqueue.*``) there; in suid/hybrid it raises CAP_NET_ADMIN on its thread for the
  ``net.*`` ones, in suid it becomes euid 0 on its thread for the IPC ones (they need root
  of the IPC namespace's owner); the userns flow, which maps no root, skips the IPC ones.
- ``blind13-res-dev`` (:class:`DevEngine`): a private /dev (a size-limited tmpfs) with
  device nodes (mknod where the RPC server may, CAP_MKNOD raised on its thread in suid;
  binds of the host's nodes in the user-namespace flows), a new devpts instance, a private
  /dev/shm and the container's own mqueue on /dev/mqueue, the usual symlinks, then a
  control message queue and an info object in /dev/shm for the payload.
- ``blind13-res-limits`` (:class:`LimitsEngine`): a private /tmp and /dev/shm (new tmpfs
  mounts with a size), a cgroup namespace and loopback, and the payload's resource limits
  applied by the master with ``prlimit`` on the container's pid once the payload runs
  (raised above the current hard limit only where the master is host root with
  CAP_SYS_RESOURCE, clamped to it elsewhere).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kit import system
from kit.contract import ConfigError, EngineConfig, Operations
from kit.rpc import RPCClient
from kit.system import linux

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PAYLOAD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def _warn(message: str) -> None:
    print(f"blind13-res: {message}", file=sys.stderr, flush=True)


# --- shared pieces ------------------------------------------------------------------------


class _ResourceEngine(Operations):
    """What the three engines share: namespaces per flow, the payload's exec, a monitor that
    forwards §7's signals and reaps only the container, an idempotent cleanup."""

    #: namespaces created in every flow (the user namespace is added where U runs it)
    NAMESPACES: tuple[str, ...] = ("mount", "pid", "uts", "ipc", "net")
    PROPAGATION = "rprivate"

    def config(self) -> EngineConfig:
        raise NotImplementedError

    # stage 1 --------------------------------------------------------------------------
    def prepare_config(self, sc: Any) -> None:
        namespaces = list(self.NAMESPACES)
        if sc.flow in ("userns", "fakeroot", "hybrid"):
            namespaces.append("user")
            inside = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
            sc.add_uid_mappings([(inside[0], sc.invoker_uid, 1)])
            sc.add_gid_mappings([(inside[1], sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_ns_flags(namespaces)
        if "net" in namespaces:
            sc.set_bring_loopback_interface()
        sc.set_mount_propagation(self.PROPAGATION)
        if sc.flow != "root":
            sc.set_no_new_privs()
        cfg = self.common.engine_config
        cfg.flow = sc.flow
        self.plan(sc, cfg)

    def plan(self, sc: Any, cfg: Any) -> None:
        """Validate the engine's own settings and record what this flow will do."""

    # stage 2 --------------------------------------------------------------------------
    def start_process(self, master_fd: int) -> None:
        argv = self.common.engine_config.argv
        if not argv:
            raise ConfigError("argv: no payload to run")
        os.execve(argv[0], argv, dict(PAYLOAD_ENV))

    # master ---------------------------------------------------------------------------
    def rpc(self, rpc_conn: Any) -> RPCClient:
        return RPCClient(rpc_conn, self.common.engine_name)

    def monitor_container(self, pid: int, signals: Any) -> int:
        while True:
            sig = signals.get(timeout=0.1)
            if sig in FORWARDED:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status

    def cleanup_container(self, ctx: Any, fatal: BaseException | None, status: int | None) -> None:
        # Everything this engine made lives in the container's namespaces and file systems
        # (its mount, ipc and net namespaces, tmpfs instances): they go with the container.
        pass


def _safe_name(text: str) -> str:
    """A name usable for a POSIX IPC object (no slash, a short portable alphabet)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:200] or "container"


@contextlib.contextmanager
def raised_capabilities(*names: str) -> Iterator[None]:
    """Raise capabilities from the permitted into the effective set of the calling thread
    for the duration of the block, then restore the thread's sets exactly (SPEC §4: a
    method of the RPC server may raise more on its own thread and must restore them)."""
    sys_ = system.current()
    eff, perm, inh = sys_.capabilities()
    want = linux.caps_to_mask(names)
    if not want & ~eff:
        yield
        return
    if want & ~perm:
        missing = ", ".join(linux.mask_to_caps(want & ~perm))
        raise PermissionError(f"not permitted on this thread: {missing}")
    sys_.set_capabilities(eff | want, perm, inh)
    try:
        yield
    finally:
        sys_.set_capabilities(eff, perm, inh)


# --- 1. namespaced sysctls --------------------------------------------------------------------

#: sysctls that belong to the IPC namespace (the rest of kernel.* is global)
IPC_SYSCTLS = {
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
}


def sysctl_kind(name: str) -> str:
    """``net`` or ``ipc``: the namespace a sysctl belongs to; ConfigError for any other."""
    if not re.fullmatch(r"[a-z0-9_]+(\.[A-Za-z0-9_-]+)+", name) or ".." in name:
        raise ConfigError(f"sysctls: invalid sysctl name {name!r}")
    if name.startswith("net."):
        return "net"
    if name in IPC_SYSCTLS or name.startswith("fs.mqueue."):
        return "ipc"
    raise ConfigError(
        f"sysctls: {name!r} is not namespaced (only net.* and the IPC sysctls may be set "
        "for a container)"
    )


def sysctl_path(name: str, proc: str = "/proc") -> str:
    return f"{proc}/sys/" + name.replace(".", "/")


@dataclass
class SysctlConfig(EngineConfig):
    hostname: str = "res-sysctl"
    sysctls: dict[str, str] = field(
        default_factory=lambda: {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.ip_unprivileged_port_start": "80",
            "kernel.msgmnb": "65536",
            "kernel.shmmni": "2048",
            "fs.mqueue.msg_max": "64",
        }
    )
    flow: str = ""
    #: filled by prepare_config: what this flow applies, and what it cannot
    apply: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


class SysctlRPC:
    """Served by the RPC server, in the container's namespaces."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)

    def mount_proc(self) -> None:
        """A /proc of the container's own pid namespace (the one it inherits shows the
        host's, with a read-only /proc/sys)."""
        self.system.mount("proc", "/proc", "proc", ["nosuid", "nodev", "noexec"])

    def apply_sysctls(self, values: dict[str, str]) -> dict[str, str]:
        """Write each sysctl through the container's /proc; returns the values replaced.

        A sysctl file resolves to the namespace of the process that opens it: this process
        is in the container's net and ipc namespaces, so these are the container's copies."""
        before: dict[str, str] = {}
        for name, value in values.items():
            kind = sysctl_kind(name)
            with self._privilege(kind):
                before[name] = self._write(sysctl_path(name), value)
        return before

    # helpers -----------------------------------------------------------------------------
    @staticmethod
    def _write(path: str, value: str) -> str:
        with open(path, "r+") as f:
            old = f.read().strip()
            f.seek(0)
            f.write(value + "\n")
        return old

    def _privilege(self, kind: str) -> contextlib.AbstractContextManager[None]:
        if kind == "net":
            # net.* files answer to CAP_NET_ADMIN over the network namespace's owner; the
            # setuid RPC server holds it in its permitted set only.
            return raised_capabilities("CAP_NET_ADMIN")
        return self._ns_root()

    @contextlib.contextmanager
    def _ns_root(self) -> Iterator[None]:
        """The IPC sysctls are writable by root of the IPC namespace's owner only (a uid
        check, no capability). The setuid RPC server is euid U with saved uid 0: it becomes
        euid 0 on this thread and comes back to exactly the credentials it had."""
        _ruid, euid, suid = os.getresuid()
        if euid == 0:
            yield
            return
        if suid != 0:
            raise PermissionError("no root in the container's IPC namespace to write its sysctls")
        saved = linux.capget()  # before the switch: euid 0 makes every permitted cap effective
        linux.thread_setresuid(-1, 0, -1)
        try:
            yield
        finally:
            linux.thread_setresuid(-1, euid, -1)  # the kernel clears the effective set
            linux.capset(*saved)


class SysctlEngine(_ResourceEngine):
    """Namespaced sysctls, written by the RPC server in the container's namespaces."""

    engine_name = "blind13-res-sysctl"
    rpc_methods = SysctlRPC
    NAMESPACES = ("mount", "pid", "uts", "ipc", "net", "cgroup")

    def config(self) -> SysctlConfig:
        return SysctlConfig()

    def plan(self, sc: Any, cfg: SysctlConfig) -> None:
        apply: dict[str, str] = {}
        skipped: list[str] = []
        for name, value in cfg.sysctls.items():
            if not isinstance(value, str) or "\n" in value:
                raise ConfigError(f"sysctls.{name}: value must be a one-line string")
            kind = sysctl_kind(name)
            if not sc.uses_namespace(kind):
                raise ConfigError(f"sysctls.{name}: needs a {kind} namespace of the container's")
            if kind == "ipc" and sc.flow == "userns":
                # The userns flow maps U to itself: the container has no root that owns its
                # IPC namespace, and only that root may write these files.
                skipped.append(name)
                continue
            apply[name] = value
        cfg.apply = apply
        cfg.skipped = skipped

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        rpc = self.rpc(rpc_conn)
        rpc.sethostname(name=cfg.hostname)
        rpc.mount_proc()
        self.set_sysctls(rpc, pid, cfg.apply)
        for name in cfg.skipped:
            _warn(f"{name} not set: the {cfg.flow} flow has no root in the container")

    def set_sysctls(self, rpc: RPCClient, pid: int, values: dict[str, str]) -> None:
        if values:
            rpc.apply_sysctls(values=values)


# --- 2. a private /dev ------------------------------------------------------------------------

#: device nodes of a container's /dev: name -> (major, minor)
DEVICES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
SYMLINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}


@dataclass
class DevConfig(EngineConfig):
    hostname: str = "res-dev"
    dev_size: str = "256k"
    shm_size: str = "64m"
    devices: list[str] = field(default_factory=lambda: sorted(DEVICES))
    flow: str = ""
    #: filled by prepare_config
    nodes: str = ""  # "mknod" or "bind"
    pts_options: str = ""
    shm_owner: list[int] = field(default_factory=list)
    object_name: str = ""


_SIZE = re.compile(r"[1-9][0-9]*[kmg]?")


class DevRPC:
    """Served by the RPC server: it shares the container's mount and ipc namespaces, root
    and cwd, so what it mounts is the container's and what it makes in /dev/mqueue is in the
    container's IPC namespace."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)

    def setup_dev(
        self,
        size: str,
        devices: list[str],
        nodes: str,
        pts_options: str,
        shm_size: str,
        shm_owner: list[int],
    ) -> list[str]:
        """Replace the container's /dev by a tmpfs of its own; returns what it holds."""
        # The host's nodes stay reachable through this descriptor once /dev is covered.
        old_dev = os.open("/dev", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.system.mount("dev", "/dev", "tmpfs", ["nosuid", "noexec"], f"mode=755,size={size}")
            host = f"/proc/self/fd/{old_dev}"
            for name in devices:
                self._node(name, host, nodes)
            self.system.mkdir("/dev/pts", 0o755)
            self.system.mount("devpts", "/dev/pts", "devpts", ["nosuid", "noexec"], pts_options)
            self.system.mkdir("/dev/shm", 0o1777)
            self._mount_shm(shm_size, shm_owner, host)
            self.system.mkdir("/dev/mqueue", 0o1777)
            self.system.mount("mqueue", "/dev/mqueue", "mqueue", ["nosuid", "nodev", "noexec"])
            for name, target in SYMLINKS.items():
                os.symlink(target, f"/dev/{name}")
        finally:
            os.close(old_dev)
        return sorted(os.listdir("/dev"))

    def claim_queue(self, name: str) -> str:
        """Create the payload's control message queue (O_EXCL: one container per name)."""
        path = f"/dev/mqueue/{name}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        return path

    def write_info(self, name: str, info: dict[str, str]) -> str:
        """A POSIX shared-memory object (a file in /dev/shm) the payload can map."""
        path = f"/dev/shm/{name}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, json.dumps(info, sort_keys=True).encode() + b"\n")
        finally:
            os.close(fd)
        return path

    # helpers ---------------------------------------------------------------------------
    def _node(self, name: str, host: str, how: str) -> None:
        path = f"/dev/{name}"
        if how == "mknod":
            major, minor = DEVICES[name]
            with raised_capabilities("CAP_MKNOD"):
                os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(path, 0o666)  # the umask (shared with the container) applies to mknod
        else:
            # No device nodes of our own in a user namespace: bind the host's on an empty file.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
            self.system.mount(f"{host}/{name}", path, None, ["bind"])

    def _mount_shm(self, size: str, owner: list[int], host: str) -> None:
        options = f"mode=1777,size={size}"
        if owner:
            options += f",uid={owner[0]},gid={owner[1]}"
        self.system.mount("shm", "/dev/shm", "tmpfs", ["nosuid", "nodev", "noexec"], options)


class DevEngine(_ResourceEngine):
    """A private /dev: device nodes, devpts, /dev/shm, /dev/mqueue; a control queue and an
    info object for the payload."""

    engine_name = "blind13-res-dev"
    rpc_methods = DevRPC

    def config(self) -> DevConfig:
        return DevConfig()

    def plan(self, sc: Any, cfg: DevConfig) -> None:
        for what, size in (("dev_size", cfg.dev_size), ("shm_size", cfg.shm_size)):
            if not _SIZE.fullmatch(size):
                raise ConfigError(f"{what}: not a tmpfs size: {size!r}")
        unknown = sorted(set(cfg.devices) - set(DEVICES))
        if unknown:
            raise ConfigError(f"devices: unknown device(s) {', '.join(unknown)}")
        # mknod of a device needs CAP_MKNOD in the host user namespace: the root flow's RPC
        # server has it, the setuid one may raise it; a user namespace never may.
        cfg.nodes = "mknod" if sc.flow in ("root", "suid") else "bind"
        # gid 5 (tty) exists for devpts only where the host's gids are the container's.
        options = "newinstance,ptmxmode=0666,mode=0620"
        cfg.pts_options = options + (",gid=5" if sc.flow in ("root", "suid") else "")
        # /dev/shm belongs to the container's root, where the container has one mapped.
        cfg.shm_owner = [] if sc.flow == "userns" else [0, 0]
        cfg.object_name = _safe_name(f"{self.common.engine_name}-{self.common.container_id}")

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        rpc = self.rpc(rpc_conn)
        rpc.sethostname(name=cfg.hostname)
        rpc.setup_dev(
            size=cfg.dev_size,
            devices=cfg.devices,
            nodes=cfg.nodes,
            pts_options=cfg.pts_options,
            shm_size=cfg.shm_size,
            shm_owner=cfg.shm_owner,
        )
        rpc.claim_queue(name=cfg.object_name)
        rpc.write_info(
            name=cfg.object_name + ".json",
            info={"container": self.common.container_id, "hostname": cfg.hostname},
        )


# --- 3. a private /tmp and /dev/shm, the payload's limits ------------------------------------

RLIMITS = {
    "AS": resource.RLIMIT_AS,
    "CORE": resource.RLIMIT_CORE,
    "CPU": resource.RLIMIT_CPU,
    "DATA": resource.RLIMIT_DATA,
    "FSIZE": resource.RLIMIT_FSIZE,
    "MEMLOCK": resource.RLIMIT_MEMLOCK,
    "MSGQUEUE": resource.RLIMIT_MSGQUEUE,
    "NOFILE": resource.RLIMIT_NOFILE,
    "NPROC": resource.RLIMIT_NPROC,
    "STACK": resource.RLIMIT_STACK,
}


@dataclass
class LimitsConfig(EngineConfig):
    hostname: str = "res-limits"
    tmp_size: str = "128m"
    shm_size: str = "32m"
    #: name -> [soft, hard]; -1 is unlimited
    rlimits: dict[str, list[int]] = field(
        default_factory=lambda: {
            "NOFILE": [4096, 65536],
            "CORE": [0, 0],
            "MEMLOCK": [65536, 65536],
            "NPROC": [4096, 4096],
        }
    )
    flow: str = ""


class LimitsRPC:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)

    def private_tmp(self, size: str) -> None:
        self.system.mount("tmpfs", "/tmp", "tmpfs", ["nosuid", "nodev"], f"mode=1777,size={size}")

    def size_shm(self, size: str) -> None:
        """A /dev/shm of the container's own, of the given size (a new tmpfs over the one
        it inherited: that one's superblock is the host's)."""
        self.system.mount(
            "shm", "/dev/shm", "tmpfs", ["nosuid", "nodev", "noexec"], f"mode=1777,size={size}"
        )


class LimitsEngine(_ResourceEngine):
    """A private /tmp and /dev/shm, cgroup namespace, loopback, and the payload's rlimits."""

    engine_name = "blind13-res-limits"
    rpc_methods = LimitsRPC
    NAMESPACES = ("mount", "pid", "uts", "ipc", "net", "cgroup")
    PROPAGATION = "rslave"  # the host's later mounts reach the container, never the reverse

    def config(self) -> LimitsConfig:
        return LimitsConfig()

    def plan(self, sc: Any, cfg: LimitsConfig) -> None:
        for what, size in (("tmp_size", cfg.tmp_size), ("shm_size", cfg.shm_size)):
            if not _SIZE.fullmatch(size):
                raise ConfigError(f"{what}: not a tmpfs size: {size!r}")
        for name, pair in cfg.rlimits.items():
            if name not in RLIMITS:
                raise ConfigError(f"rlimits: unknown limit {name!r} (known: {', '.join(RLIMITS)})")
            if len(pair) != 2 or any(v < -1 for v in pair):
                raise ConfigError(f"rlimits.{name}: expected [soft, hard], got {pair!r}")
            soft, hard = (resource.RLIM_INFINITY if v == -1 else v for v in pair)
            if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
                raise ConfigError(f"rlimits.{name}: soft limit above the hard limit")

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        rpc = self.rpc(rpc_conn)
        rpc.sethostname(name=cfg.hostname)
        rpc.private_tmp(size=cfg.tmp_size)
        rpc.size_shm(size=cfg.shm_size)

    def post_start_process(self, ctx: Any, pid: int) -> None:
        # The payload runs now, under its final credentials: the master (which may act on a
        # process of its own user) sets its limits. Stage 2 had none of the capability that
        # raising a hard limit needs; the master has it only when it is host root.
        self.apply_limits(self.limits_target(pid))

    def limits_target(self, pid: int) -> int:
        return pid

    def apply_limits(self, target: int) -> None:
        # Raising a hard limit takes CAP_SYS_RESOURCE in the host user namespace: only a
        # master that is host root and holds it (a sandbox may have dropped it) may.
        sys_ = system.current()
        may_raise = sys_.privileged() and bool(
            sys_.capabilities()[0] >> linux.CAP_NUMBERS["CAP_SYS_RESOURCE"] & 1
        )
        for name, pair in self.common.engine_config.rlimits.items():
            res = RLIMITS[name]
            soft, hard = (resource.RLIM_INFINITY if v == -1 else v for v in pair)
            try:
                _, cur_hard = resource.prlimit(target, res)
                if not may_raise and _above(hard, cur_hard):
                    hard = cur_hard
                    soft = soft if not _above(soft, hard) else hard
                resource.prlimit(target, res, (soft, hard))
            except ProcessLookupError:
                return  # the payload is gone already: nothing to limit
            except OSError as exc:
                _warn(f"RLIMIT_{name} of pid {target} not set: {exc}")


def _above(value: int, limit: int) -> bool:
    if limit == resource.RLIM_INFINITY:
        return False
    return value == resource.RLIM_INFINITY or value > limit
