"""Correct engines for the host rules (written from SPEC.md alone, not from the suite).

``ScratchHostEngine`` is a small engine written from scratch (it does not build on the
reference engine): in every flow it creates mount, pid, uts, ipc and net namespaces (plus a
user namespace where the caller is unprivileged), brings ``lo`` up, sets a hostname and a
NIS domain name, mounts a private tmpfs on the container's ``/dev/shm`` and leaves a marker
there, and sets two per-network-namespace sysctls of the container's network namespace, all
through its RPC server. ``tests/blind7_host.py`` derives twelve buggy engines from it, each
with one mistake that reaches the host.

The other two classes are correct but unusual, for the kit's false-failure side:

* ``ScratchStateEngine`` makes scratch state on the host while it runs (a directory under
  ``/tmp``, a file in ``/dev/shm``, a POSIX message queue, a SysV semaphore set, and in the
  root flow a changed net sysctl of the host's network namespace) and removes or restores
  all of it in ``cleanup_container``: SPEC §11 forbids only what outlives the run (and
  hostname and mount changes even while it runs).
* ``PrivateFirstEngine`` asks for ``rshared`` propagation on the container's ``/`` (the
  container starts in the host's peer group) and makes ``/`` private in the container's
  mount namespace before its first mount, so its tmpfs mounts live only there.

Loaded as ``blind7_host_correct:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here
acts at import time. Anything that may touch "the host" acts only inside the kit's host
sandbox (:func:`inside_kit_sandbox`), checked in stage 1 (``ScratchConfig.armed``, which the
later processes receive) and again in the master before it asks the RPC server for anything
that could reach the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kit import system
from kit.contract import Context, Engine, EngineConfig, Operations, SignalChannel, WaitStatus
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig
from kit.system import linux

#: The environment variable the kit's host sandbox sets: "MNT:UTS" inode numbers.
SANDBOX_ENV = "KIT_HOST_SANDBOX"
#: Signals a conformant monitor forwards to the container (SPEC §7).
FORWARDED = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
)
MONITOR_POLL = 0.05
PAYLOAD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
#: Per-network-namespace sysctls the engine sets in the container's network namespace.
DEFAULT_SYSCTLS = {
    "net.ipv4.ping_group_range": "0 0",
    "net.ipv4.ip_unprivileged_port_start": "0",
}
IPC_CREAT = 0o1000
IPC_EXCL = 0o2000
IPC_PRIVATE = 0
IPC_RMID = 0

_libc = ctypes.CDLL(None, use_errno=True)


# --- helpers ---------------------------------------------------------------------------------


def inside_kit_sandbox() -> bool:
    """Whether this process is in the kit's host sandbox: its mount and uts namespaces are
    the ones the sandbox announces in ``KIT_HOST_SANDBOX``. Only there may an engine of this
    file touch anything that could be the host's."""
    try:
        mnt, uts = (int(x) for x in os.environ.get(SANDBOX_ENV, "").split(":"))
        return (
            os.stat("/proc/self/ns/mnt").st_ino == mnt
            and os.stat("/proc/self/ns/uts").st_ino == uts
        )
    except (ValueError, OSError):
        return False


def sandbox_announced() -> bool:
    """A weaker check for processes in the container's namespaces (the RPC server, stage 2),
    which cannot compare their own namespaces with the sandbox's: the sandbox's variable is
    set. Used only together with ``ScratchConfig.armed`` (stage 1's full check)."""
    return bool(os.environ.get(SANDBOX_ENV))


def safe_name(text: str, size: int = 16) -> str:
    """``text`` reduced to letters, digits, ``-``, ``_`` and inner dots (for names of
    files, queues, links)."""
    keep = string.ascii_letters + string.digits + "-_."
    return "".join(c for c in text if c in keep).lstrip(".")[:size] or "x"


@contextlib.contextmanager
def effective(names: Sequence[str]) -> Iterator[bool]:
    """Raise the capabilities ``names`` into the calling thread's effective set for the
    block, when they are permitted (the setuid master and RPC server), and lower again
    exactly those that were raised. Yields whether they are effective in the block."""
    mask = linux.caps_to_mask(names)
    eff, perm, inh = linux.capget()
    if mask & ~perm:
        yield False
        return
    raised = mask & ~eff
    if raised:
        linux.capset(eff | raised, perm, inh)
    try:
        yield True
    finally:
        if raised:
            now_eff, now_perm, now_inh = linux.capget()
            linux.capset(now_eff & ~raised, now_perm, now_inh)


def sysctl_path(key: str) -> str:
    if not key.startswith("net.") or ".." in key or "/" in key:
        raise ValueError(f"not a per-network-namespace sysctl: {key!r}")
    return "/proc/sys/" + key.replace(".", "/")


def read_sysctl(key: str) -> str:
    with open(sysctl_path(key)) as f:
        return f.read().strip()


def write_sysctl(key: str, value: str) -> None:
    with open(sysctl_path(key), "w") as f:
        f.write(value)


def _ctypes_check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def mq_create(name: str) -> int:
    """Create a POSIX message queue (``mq_open(O_CREAT|O_EXCL)``) in the calling process's
    ipc namespace; returns its descriptor."""
    mq_open = _libc.mq_open
    mq_open.restype = ctypes.c_int
    mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    return _ctypes_check(mq_open(name.encode(), flags, 0o600, None), f"mq_open({name!r})")


def mq_close(mqd: int) -> None:
    _ctypes_check(_libc.mq_close(ctypes.c_int(mqd)), "mq_close")


def mq_unlink(name: str) -> None:
    _ctypes_check(_libc.mq_unlink(name.encode()), f"mq_unlink({name!r})")


def sem_create(nsems: int = 1) -> int:
    """Create a private SysV semaphore set in the calling process's ipc namespace."""
    semget = _libc.semget
    semget.restype = ctypes.c_int
    semget.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return _ctypes_check(semget(IPC_PRIVATE, nsems, IPC_CREAT | IPC_EXCL | 0o600), "semget")


def sem_remove(semid: int) -> None:
    semctl = _libc.semctl
    semctl.restype = ctypes.c_int
    semctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    _ctypes_check(semctl(semid, 0, IPC_RMID), f"semctl({semid}, IPC_RMID)")


def exec_payload(argv: list[str]) -> None:
    """Exec the payload; never returns."""
    if not argv:
        raise ValueError("no payload: the engine config's argv is empty")
    os.execvpe(argv[0], argv, dict(PAYLOAD_ENV))


# --- the base engine -------------------------------------------------------------------------


@dataclass
class ScratchConfig(EngineConfig):
    """The engine config (JSON fields only cross processes)."""

    hostname: str = "blind7"
    domainname: str = "blind7.invalid"
    sysctls: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SYSCTLS))
    #: Set by stage 1: whether the run is inside the kit's host sandbox.
    armed: bool = False


class ScratchHostRPC:
    """The RPC methods, served as ``<engine>.<method>`` in the container's namespaces."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.system = system.current()

    def set_names(self, hostname: str, domainname: str) -> None:
        """Host and NIS domain name of the container's uts namespace."""
        if hostname:
            self.system.sethostname(hostname)
        if domainname:
            self.system.setdomainname(domainname)

    def private_shm(self) -> None:
        """A tmpfs of the container's own on ``/dev/shm`` (POSIX shared memory lives in a
        file system, not in the ipc namespace)."""
        self.system.mount(
            "blind7-shm", "/dev/shm", "tmpfs", ["nosuid", "nodev", "noexec"], "mode=1777,size=1m"
        )

    def write_marker(self, name: str, armed: bool) -> str:
        """A readiness marker in ``/dev/shm`` (the payload's ``sem_open`` would put its
        semaphores there too). Returns its path."""
        if not (armed and sandbox_announced()):
            return ""
        path = os.path.join("/dev/shm", safe_name(name, 40))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, b"ready\n")
        finally:
            os.close(fd)
        return path

    def apply_sysctls(self, values: dict[str, str], armed: bool) -> list[str]:
        """Per-network-namespace sysctls of the container's network namespace; a key the
        server may not write here (no CAP_NET_ADMIN over it) is skipped. Returns the keys
        set."""
        done: list[str] = []
        if not (armed and sandbox_announced()):
            return done
        with effective(["CAP_NET_ADMIN"]):
            for key, value in values.items():
                try:
                    write_sysctl(key, value)
                except PermissionError:
                    continue
                done.append(key)
        return done


class ScratchHostEngine(Operations):
    """A small correct engine, written from scratch, conformant in all five flows."""

    engine_name = "blind7-host-scratch"
    rpc_methods: type = ScratchHostRPC

    # -- every process ----------------------------------------------------------------------
    def config(self) -> ScratchConfig:
        return ScratchConfig()

    def cfg(self) -> ScratchConfig:
        engine_config = self.common.engine_config
        assert isinstance(engine_config, ScratchConfig)
        return engine_config

    # -- stage 1 ----------------------------------------------------------------------------
    def namespaces(self, sc: StarterConfig) -> list[str]:
        """The namespaces to create in flow ``sc.flow`` (user added by :meth:`user_ns`)."""
        return ["mount", "pid", "uts", "ipc", "net"]

    def user_ns(self, sc: StarterConfig, namespaces: list[str]) -> None:
        if sc.flow not in ("userns", "fakeroot", "hybrid"):
            return
        namespaces.append("user")
        inside_uid, inside_gid = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
        sc.add_uid_mappings([(inside_uid, sc.invoker_uid, 1)])
        sc.add_gid_mappings([(inside_gid, sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()

    def propagation(self, sc: StarterConfig) -> str:
        return "rprivate"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        cfg = self.cfg()
        cfg.armed = inside_kit_sandbox()
        for key in cfg.sysctls:
            sysctl_path(key)  # a key outside net.* is refused here, naming it
        ping = "net.ipv4.ping_group_range"
        if sc.flow == "userns" and cfg.sysctls.get(ping) == DEFAULT_SYSCTLS[ping]:
            # gids of the container's user namespace: only the caller's is mapped there
            cfg.sysctls[ping] = f"{sc.invoker_gid} {sc.invoker_gid}"
        namespaces = self.namespaces(sc)
        self.user_ns(sc, namespaces)
        sc.set_ns_flags(namespaces)
        if "net" in namespaces:
            sc.set_bring_loopback_interface()
        sc.set_mount_propagation(self.propagation(sc))
        if sc.flow != "root":
            sc.set_no_new_privs()

    # -- master -----------------------------------------------------------------------------
    def armed(self) -> bool:
        """Stage 1 found the sandbox and this process is in it too."""
        return self.cfg().armed and inside_kit_sandbox()

    def marker_name(self) -> str:
        return f"blind7-{safe_name(self.common.container_id)}.ready"

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        cfg = self.cfg()
        armed = self.armed()
        self.set_names(rpc, cfg)
        self.shm(rpc)
        rpc.write_marker(name=self.marker_name(), armed=armed)
        self.sysctls(rpc, cfg, armed)
        self.more(rpc, armed)

    def more(self, rpc: RPCClient, armed: bool) -> None:
        """Further RPC calls of a derived engine, on the same client (none here)."""

    def set_names(self, rpc: RPCClient, cfg: ScratchConfig) -> None:
        rpc.set_names(hostname=cfg.hostname, domainname=cfg.domainname)

    def shm(self, rpc: RPCClient) -> None:
        rpc.private_shm()

    def sysctls(self, rpc: RPCClient, cfg: ScratchConfig, armed: bool) -> None:
        if cfg.sysctls:
            rpc.apply_sysctls(values=cfg.sysctls, armed=armed)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        pass

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pass  # everything lives in the container's namespaces and goes with them

    # -- stage 2 ----------------------------------------------------------------------------
    def start_process(self, master_fd: int) -> None:
        exec_payload(self.cfg().argv)


# --- correct but unusual ---------------------------------------------------------------------


class ScratchStateEngine(ScratchHostEngine):
    """Correct: makes scratch state on the host while it runs and undoes all of it.

    SPEC §11: "a run changes nothing on the host that outlives it, and a few things
    (hostname, mount table: NS-010, NS-011) not even while it runs." This engine, from the
    master in ``create_container``, makes a directory with a file under ``/tmp``, a file in
    ``/dev/shm``, a POSIX message queue and a SysV semaphore set in the host's ipc namespace
    (the master's), and in the root flow raises ``net.ipv4.ip_default_ttl`` of the host's
    network namespace; ``cleanup_container`` removes every object and restores the sysctl
    to the value it read. Nothing outlives the run, no hostname or mount changes: a kit
    that fails it reports a false failure. All five flows.
    """

    engine_name = "blind7-host-scratch-state"

    def __init__(self) -> None:
        self.scratch_dir: str | None = None
        self.shm_file: str | None = None
        self.queue: tuple[str, int] | None = None
        self.semid: int | None = None
        self.ttl: str | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        if not self.armed():
            return
        tag = safe_name(self.common.container_id)
        scratch = f"/tmp/blind7-scratch-{tag}"
        os.mkdir(scratch, 0o700)
        self.scratch_dir = scratch
        with open(os.path.join(scratch, "state"), "w") as f:
            f.write(f"container {pid}\n")
        shm_file = f"/dev/shm/blind7-scratch-{tag}"
        fd = os.open(shm_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.shm_file = shm_file
        os.close(fd)
        name = f"/blind7-scratch-{tag}"
        self.queue = (name, mq_create(name))
        self.semid = sem_create()
        key = "net.ipv4.ip_default_ttl"
        old = read_sysctl(key)
        try:  # only root of the host's user namespace may (the root flow)
            write_sysctl(key, "77" if old != "77" else "78")
        except PermissionError:
            return
        self.ttl = old

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        if self.ttl is not None:
            write_sysctl("net.ipv4.ip_default_ttl", self.ttl)
            self.ttl = None
        if self.semid is not None:
            with contextlib.suppress(OSError):
                sem_remove(self.semid)
            self.semid = None
        if self.queue is not None:
            name, mqd = self.queue
            with contextlib.suppress(OSError):
                mq_close(mqd)
            with contextlib.suppress(FileNotFoundError):
                mq_unlink(name)
            self.queue = None
        if self.shm_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.shm_file)
            self.shm_file = None
        if self.scratch_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.scratch_dir, "state"))
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(self.scratch_dir)
            self.scratch_dir = None


class PrivateFirstRPC(ScratchHostRPC):
    """Makes ``/`` private in the container's mount namespace before any mount."""

    def private_shm(self) -> None:
        # The container's / was made rshared (in the host's peer group, where the caller's
        # user namespace is the host's): first cut it off, recursively, then mount.
        self.system.set_propagation("/", "rprivate")
        super().private_shm()
        inner = "/dev/shm/inner"
        try:
            self.system.mkdir(inner, 0o755)
        except FileExistsError:
            pass
        self.system.mount("blind7-inner", inner, "tmpfs", ["nosuid", "nodev"], "size=64k")


class PrivateFirstEngine(ScratchHostEngine):
    """Correct: asks for ``rshared`` on the container's ``/``, then makes it private first.

    SPEC §5: ``set_mount_propagation`` is the "propagation applied to ``/`` in a new mount
    namespace"; SPEC §11: the host's mount table does not change "not even while it runs".
    The container starts in the host's peer group (root and suid flows; in the user
    namespace flows the copies are slaves of it), and its RPC server makes ``/`` rprivate
    before it mounts its tmpfs on ``/dev/shm`` and a second one under it: the mounts live
    only in the container's mount namespace. All five flows.
    """

    engine_name = "blind7-host-private-first"
    rpc_methods: type = PrivateFirstRPC

    def propagation(self, sc: StarterConfig) -> str:
        return "rshared"
