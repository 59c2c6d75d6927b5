"""Round 9 of the blind engines, the correct half: privileges of the RPC server and of stage 2.

Written from ``SPEC.md`` alone (§4: the RPC server and stage 2 rows and the sentences under
the table; §5; §6), not from the suite. :class:`ScratchPrivEngine` is a small engine written
from scratch (it imports nothing from ``reference_engines``) that is conformant in all five
flows; the two others are conformant too, but do something unusual that the contract allows:

- :class:`ScratchPrivEngine`: the base. Its RPC methods mount a tmpfs scratch directory in the
  container's mount namespace, write a file there and set the hostname.
- :class:`BorrowedCapEngine`: an RPC method raises a permitted capability on its own thread
  for one file operation and lowers it in a ``finally``, also on a worker thread of its own.
- :class:`TargetIdsEngine`: a stage 2 that changes to a configured target uid and gids in
  the root flow, with capabilities configured for the payload in every flow where §4/§5
  allow it.

Loaded as ``blind9_priv_correct:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here
acts at import time: the libc handle is opened at the first call, inside a hook or a method.
The buggy engines of ``blind9_priv.py`` are this base with one mistake each, and use the
helpers below.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kit import system
from kit.contract import Context, EngineConfig, Operations, SignalChannel, WaitStatus
from kit.rpc import RPCClient

if TYPE_CHECKING:
    from kit.starter.config import StarterConfig

FORWARDED = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
)
PAYLOAD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

# --- the kernel, through libc (Python 3.11's os has no capability or per-thread id calls) ---

# Capability numbers (linux/capability.h) used here.
CAP_DAC_OVERRIDE = 1
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_SYS_ADMIN = 21

# prctl options.
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2

_CAP_V3 = 0x20080522
# x86_64, aarch64 numbers of the per-thread system calls used here (the raw setresuid changes
# only the calling thread; glibc's wrapper changes every thread of the process).
_NR = {
    "x86_64": {"setresuid": 117, "setfsuid": 122, "setfsgid": 123},
    "aarch64": {"setresuid": 147, "setfsuid": 151, "setfsgid": 152},
}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, opened at the first call (never at import)."""
    return ctypes.CDLL(None, use_errno=True)


def _nr(name: str) -> int:
    return _NR[os.uname().machine][name]


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread."""
    header = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    _check(libc().capget(ctypes.byref(header), data), "capget")
    return (
        data[0].effective | data[1].effective << 32,
        data[0].permitted | data[1].permitted << 32,
        data[0].inheritable | data[1].inheritable << 32,
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's capability sets (capset is per thread)."""
    header = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    for i, shift in enumerate((0, 32)):
        data[i].effective = effective >> shift & 0xFFFFFFFF
        data[i].permitted = permitted >> shift & 0xFFFFFFFF
        data[i].inheritable = inheritable >> shift & 0xFFFFFFFF
    _check(libc().capset(ctypes.byref(header), data), "capset")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    return _check(libc().prctl(ctypes.c_int(option), *args), f"prctl({option})")


def raise_effective(cap: int) -> bool:
    """Raise ``cap`` into the calling thread's effective set; False when it is already
    effective (nothing to undo) or not permitted (nothing to do)."""
    eff, perm, inh = capget()
    bit = 1 << cap
    if eff & bit or not perm & bit:
        return False
    capset(eff | bit, perm, inh)
    return True


def lower_effective(cap: int) -> None:
    eff, perm, inh = capget()
    capset(eff & ~(1 << cap), perm, inh)


def thread_setresuid(ruid: int, euid: int, suid: int) -> None:
    """setresuid of the calling thread only (the raw system call)."""
    args = (ctypes.c_long(_nr("setresuid")), ctypes.c_long(ruid), ctypes.c_long(euid))
    _check(libc().syscall(*args, ctypes.c_long(suid)), "setresuid")


def thread_setfsuid(fsuid: int) -> int:
    """setfsuid of the calling thread; the previous fs uid (the call reports no error)."""
    return int(libc().syscall(ctypes.c_long(_nr("setfsuid")), ctypes.c_long(fsuid)))


def thread_setfsgid(fsgid: int) -> int:
    return int(libc().syscall(ctypes.c_long(_nr("setfsgid")), ctypes.c_long(fsgid)))


def task_count() -> int:
    """The number of threads of this process, as the kernel lists them."""
    return len(os.listdir("/proc/self/task"))


def wait_task_count(count: int, timeout: float = 2.0) -> None:
    """Wait until a joined thread is gone from the kernel's list too: Python's ``join``
    returns a little before the thread has exited, and the kit reads every thread the kernel
    still lists when a method returns."""
    deadline = time.monotonic() + timeout
    while task_count() > count and time.monotonic() < deadline:
        time.sleep(0.001)


def write_new(path: str, data: str) -> int:
    """Create (or truncate) ``path`` without following a symlink planted there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o644)
    try:
        return os.write(fd, data.encode())
    finally:
        os.close(fd)


# --- the engine -----------------------------------------------------------------------------

FLOWS = ("root", "suid", "userns", "fakeroot", "hybrid")
#: Flows whose payload may hold the capabilities an engine configures: every flow but suid,
#: whose payload has no host privilege (SPEC §4) and where an ambient set would give it some.
PAYLOAD_CAP_FLOWS = ("root", "userns", "fakeroot", "hybrid")
#: Capabilities that TargetIdsEngine gives its payload (a small Docker-like set);
#: NET_BIND_SERVICE is ambient too, so that a non-root payload keeps it across exec.
PAYLOAD_CAPS: dict[str, list[str]] = {
    "bounding": [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_NET_BIND_SERVICE",
    ],
    "permitted": [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_NET_BIND_SERVICE",
    ],
    "effective": [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_NET_BIND_SERVICE",
    ],
    "inheritable": ["CAP_NET_BIND_SERVICE"],
    "ambient": ["CAP_NET_BIND_SERVICE"],
}
#: Host files copied into the scratch directory when they exist (the second never does).
OPTIONAL_FILES = ("/etc/hostname", "/etc/container-motd")
NOBODY = 65534


@dataclass
class ScratchConfig(EngineConfig):
    """Only dataclass fields cross processes."""

    hostname: str = "scratch9"
    #: A tmpfs the RPC server mounts in the container's mount namespace.
    scratch_dir: str = "/mnt"
    #: Stage 2's target uid and gids (SPEC §4: honoured in root; ignored for a non-root
    #: caller; in a user namespace, only an id the namespace maps).
    target_uid: int | None = None
    target_gids: list[int] = field(default_factory=list)
    #: Capability sets configured for stage 2 and the payload, by kind (in the flows of
    #: ``payload_cap_flows``).
    capabilities: dict[str, list[str]] = field(default_factory=dict)
    #: uid and gid of the files written "as the owner" (write_file_as).
    file_owner: list[int] = field(default_factory=lambda: [NOBODY, NOBODY])


def scratch_namespaces(flow: str) -> list[str]:
    namespaces = ["mount", "pid", "uts", "ipc", "net"]
    if flow in ("userns", "fakeroot", "hybrid"):
        namespaces.append("user")
    return namespaces


class ScratchRPC:
    """Served as ``"<engine>.<method>"`` with the RPC server's privileges (SPEC §4): every
    method leaves the credentials of every thread as it found them."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.system = system.current()

    def mount_scratch(self, path: str) -> None:
        """A tmpfs in the container's mount namespace (CAP_SYS_ADMIN is effective in every
        flow's RPC server)."""
        self.system.mount("tmpfs", path, "tmpfs", ["nosuid", "nodev"], "mode=0755,size=1m")

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)

    def write_file(self, path: str, data: str) -> int:
        return write_new(path, data)

    def make_public_dir(self, path: str) -> None:
        """A sticky, world-writable directory (like /tmp) for files written as others."""
        os.mkdir(path, 0o755)
        os.chmod(path, 0o1777)


class ScratchPrivEngine(Operations):
    """The base: conformant in root, suid, userns, fakeroot and hybrid.

    Stage 1 asks for mount, pid, uts, ipc and net namespaces (plus user, mapping U to itself
    in userns and 0 to U in fakeroot and hybrid), no_new_privs in every flow but root, and
    passes on the target ids of its config and, where the payload may hold them, its
    capability sets (none by default: every set, bounding included, is then empty at exec).
    ``create_container`` mounts a tmpfs scratch directory, sets the hostname and writes a file
    there, all through RPC. ``start_process`` execs the payload as it finds itself.
    """

    engine_name = "blind9-priv-scratch"
    rpc_methods: type[ScratchRPC] = ScratchRPC
    #: Flows in which the capability sets of the config are passed on (SPEC §4/§5).
    payload_cap_flows: tuple[str, ...] = PAYLOAD_CAP_FLOWS

    def config(self) -> ScratchConfig:
        return ScratchConfig()

    @property
    def cfg(self) -> ScratchConfig:
        cfg = self.common.engine_config
        assert isinstance(cfg, ScratchConfig)
        return cfg

    # -- stage 1 -----------------------------------------------------------------------------
    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        namespaces = scratch_namespaces(sc.flow)
        if "user" in namespaces:
            uid, gid = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
            sc.add_uid_mappings([(uid, sc.invoker_uid, 1)])
            sc.add_gid_mappings([(gid, sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_ns_flags(namespaces)
        sc.set_bring_loopback_interface()
        sc.set_mount_propagation("rprivate")
        self.configure_credentials(sc)
        if self.wants_no_new_privs(sc, namespaces):
            sc.set_no_new_privs()

    def wants_no_new_privs(self, sc: StarterConfig, namespaces: list[str]) -> bool:
        return sc.flow != "root"

    def configure_credentials(self, sc: StarterConfig) -> None:
        """Target ids (the starter ignores them where SPEC §4 says so) and capabilities."""
        cfg = self.cfg
        if cfg.target_uid is not None:
            sc.set_target_uid(cfg.target_uid)
        if cfg.target_gids:
            sc.set_target_gids(cfg.target_gids)
        if sc.flow in self.payload_cap_flows:
            for kind, names in sorted(cfg.capabilities.items()):
                sc.set_capabilities(kind, names)

    # -- master --------------------------------------------------------------------------------
    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.call("mount_scratch", path=self.cfg.scratch_dir)
        rpc.call("sethostname", name=self.cfg.hostname)
        self.populate(rpc)

    def populate(self, rpc: RPCClient) -> None:
        """Fill the scratch directory (the last RPC calls of create_container)."""
        rpc.call("write_file", path=self.scratch("motd"), data="hello\n")

    def scratch(self, *names: str) -> str:
        return os.path.join(self.cfg.scratch_dir, *names)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
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

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pass  # the tmpfs and the hostname go with the container's namespaces

    # -- stage 2 -------------------------------------------------------------------------------
    def start_process(self, master_fd: int) -> None:
        self.before_exec()
        argv = self.cfg.argv
        os.execve(argv[0], argv, PAYLOAD_ENV)

    def before_exec(self) -> None:
        """The last step of stage 2 before the exec (nothing in the base)."""


# --- correct, but unusual --------------------------------------------------------------------


class BorrowedCapRPC(ScratchRPC):
    """Methods that borrow privilege on their own thread and always give it back."""

    def copy_in(self, src: str, dst: str) -> int:
        """Copy a host file into the scratch directory with CAP_DAC_OVERRIDE raised on this
        thread (permitted but not effective in the setuid flows' server), lowered again on
        every path, the exception of a missing file included."""
        raised = raise_effective(CAP_DAC_OVERRIDE)
        try:
            with open(src) as f:
                data = f.read()
            return write_new(dst, data)
        finally:
            if raised:
                lower_effective(CAP_DAC_OVERRIDE)

    def write_file_as(self, path: str, data: str, uid: int, gid: int) -> int:
        """Create a file as ``uid:gid`` by switching this thread's fs ids (raising
        CAP_SETUID/CAP_SETGID where they are only permitted), all restored in ``finally``.
        Where the ids are not mapped (the user namespaces), the kernel keeps the fs ids."""
        raised = [cap for cap in (CAP_SETGID, CAP_SETUID) if raise_effective(cap)]
        try:
            old_gid = thread_setfsgid(gid)
            old_uid = thread_setfsuid(uid)
            try:
                return write_new(path, data)
            finally:
                thread_setfsuid(old_uid)
                thread_setfsgid(old_gid)
        finally:
            for cap in raised:
                lower_effective(cap)

    def write_root_file(self, path: str, data: str) -> int:
        """A root-owned file. Where the server runs as euid U with saved uid 0 (suid), a
        throwaway thread takes euid 0 back with the raw setresuid (that thread only), puts
        its credentials back, and is gone before the method returns."""
        _, euid, suid = os.getresuid()
        if euid == 0 or suid != 0:
            return write_new(path, data)
        result: list[int] = []
        errors: list[BaseException] = []

        def work() -> None:
            caps = capget()
            try:
                thread_setresuid(-1, 0, -1)
                try:
                    result.append(write_new(path, data))
                finally:
                    thread_setresuid(-1, euid, -1)
                    capset(*caps)
            except BaseException as exc:  # handed to the method's thread
                errors.append(exc)

        before = task_count()
        worker = threading.Thread(target=work, name="scratch-root-write")
        worker.start()
        worker.join()
        wait_task_count(before)
        if errors:
            raise errors[0]
        return result[0]

    def pooled_write(self, path: str, data: str) -> int:
        """The same file write on a pool worker of the method's own, which raises
        CAP_DAC_OVERRIDE, lowers it in ``finally``, and is shut down before the return."""

        def work() -> int:
            raised = raise_effective(CAP_DAC_OVERRIDE)
            try:
                return write_new(path, data)
            finally:
                if raised:
                    lower_effective(CAP_DAC_OVERRIDE)

        before = task_count()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scratch-io") as pool:
            written = pool.submit(work).result()
        wait_task_count(before)
        return written


class BorrowedCapEngine(ScratchPrivEngine):
    """Correct: RPC methods raise a permitted capability or their fs ids (or, on a
    throwaway thread, euid 0) for one operation and restore them in ``finally``.

    SPEC §4, RPC server: "a method may raise more on its own thread and must restore them";
    each method here does, on the exception path too (a missing optional file), and a thread
    of its own is gone before the method returns. Conformant in every flow; the borrowing
    happens in suid and hybrid (capabilities permitted but not effective), in root and suid
    for the fs ids (nobody is not mapped in the user namespaces), and in suid for euid 0.
    """

    engine_name = "blind9-priv-borrowed-cap"
    rpc_methods = BorrowedCapRPC

    def populate(self, rpc: RPCClient) -> None:
        super().populate(rpc)
        for src in OPTIONAL_FILES:
            try:
                rpc.call("copy_in", src=src, dst=self.scratch(os.path.basename(src)))
            except FileNotFoundError:
                pass  # optional
        rpc.call("make_public_dir", path=self.scratch("public"))
        uid, gid = self.cfg.file_owner
        rpc.call(
            "write_file_as", path=self.scratch("public", "note"), data="hi\n", uid=uid, gid=gid
        )
        rpc.call("write_root_file", path=self.scratch("root-owned"), data="root\n")
        rpc.call("pooled_write", path=self.scratch("pooled"), data="pool\n")


class TargetIdsEngine(ScratchPrivEngine):
    """Correct: stage 2 becomes a configured target uid and gids, with capabilities for the
    payload in every flow where SPEC allows them.

    SPEC §4, stage 2: root "r=e=s=target uid (default 0); caps exactly as configured"; suid
    "r=e=s=U (a target uid is ignored for a non-root caller); caps as configured (default
    none)"; the payload: "no host privilege in every flow but root". §5: "A capability set
    the StarterConfig leaves unset is empty when stage 2 execs the payload". By default it
    asks for uid 1000 and gids 1000, 100 (honoured in root; ignored in suid; not mapped in
    the user namespaces) and gives the payload a small capability set, NET_BIND_SERVICE
    ambient too, in root, userns, fakeroot and hybrid, none in suid. Conformant in all five.
    """

    engine_name = "blind9-priv-target-ids"

    def config(self) -> ScratchConfig:
        return ScratchConfig(
            target_uid=1000,
            target_gids=[1000, 100],
            capabilities={kind: list(names) for kind, names in PAYLOAD_CAPS.items()},
        )
