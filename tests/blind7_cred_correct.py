"""Correct blind engines for round 7 (credentials), written from SPEC.md alone.

``ScratchEngine`` is a small engine written from scratch (it does not derive from the
reference engine): a hostname set through its own RPC server, the namespaces and
user-namespace maps each flow needs, no_new_privs outside the root flow, and no capability
for the payload unless a subclass configures some (``payload_caps``). ``blind7_cred`` derives
its buggy engines from it, and takes its per-thread credential helpers (ctypes: capget,
capset, prctl and the raw set*id system calls, which act on the calling thread only).

The other engines here do unusual things that SPEC.md allows near the places the buggy
engines break it: worker threads that start and end inside a hook or an RPC method without
touching credentials, payload capabilities configured through the StarterConfig, a capability
raised on the hook's own thread and lowered before it returns, and a helper child process of
the master that drops every privilege before it does its work and is reaped inside the hook.
Each follows the whole contract in every flow: failing one is a false failure.

Loaded as ``blind7_cred_correct:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here
runs at import time; nothing here changes the host (only the container's own hostname, in
its own uts namespace).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import select
import signal
import struct
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from kit import system
from kit.contract import Context, EngineConfig, Operations, SignalChannel, WaitStatus
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig

FORWARDED = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
)
PAYLOAD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
USERNS_FLOWS = ("userns", "fakeroot", "hybrid")

# --- per-thread credential calls (ctypes) -----------------------------------------------------
# glibc's set*id wrappers change every thread of the process (and abort when one thread may
# not); the raw system calls below change the calling thread only, as the kernel does.

_libc = ctypes.CDLL(None, use_errno=True)
_SYSCALLS = {
    # name: (x86_64, aarch64)
    "setgroups": (116, 159),
    "setresuid": (117, 147),
    "setfsuid": (122, 151),
    "capget": (125, 90),
    "capset": (126, 91),
}
_CAP_V3 = 0x20080522

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_KILL = 5
CAP_SETGID = 6
CAP_NET_BIND_SERVICE = 10

PR_SET_KEEPCAPS = 8
PR_GET_SECUREBITS = 27
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CLONE_NEWUSER = 0x10000000


def _nr(name: str) -> int:
    x86, arm = _SYSCALLS[name]
    machine = os.uname().machine
    if machine == "x86_64":
        return x86
    if machine in ("aarch64", "arm64"):
        return arm
    raise OSError(f"unsupported architecture {machine!r}")


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _syscall(name: str, *args: Any) -> int:
    return _check(_libc.syscall(ctypes.c_long(_nr(name)), *args), name)


def bit(cap: int) -> int:
    return 1 << cap


def capget() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling thread."""
    header = ctypes.create_string_buffer(struct.pack("Ii", _CAP_V3, 0), 8)
    data = ctypes.create_string_buffer(24)
    _syscall("capget", header, data)
    e0, p0, i0, e1, p1, i1 = struct.unpack("6I", data.raw)
    return e0 | e1 << 32, p0 | p1 << 32, i0 | i1 << 32


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's capability sets."""
    lo = 0xFFFFFFFF
    header = ctypes.create_string_buffer(struct.pack("Ii", _CAP_V3, 0), 8)
    data = ctypes.create_string_buffer(
        struct.pack(
            "6I",
            effective & lo,
            permitted & lo,
            inheritable & lo,
            effective >> 32 & lo,
            permitted >> 32 & lo,
            inheritable >> 32 & lo,
        ),
        24,
    )
    _syscall("capset", header, data)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        ),
        f"prctl({option})",
    )


def thread_setresuid(ruid: int, euid: int, suid: int) -> None:
    """setresuid(2) for the calling thread only (-1 keeps a value)."""
    _syscall("setresuid", ctypes.c_int(ruid), ctypes.c_int(euid), ctypes.c_int(suid))


def thread_setfsuid(fsuid: int) -> int:
    """setfsuid(2) for the calling thread; returns the previous fs uid."""
    return int(_libc.syscall(ctypes.c_long(_nr("setfsuid")), ctypes.c_int(fsuid)))


def thread_setgroups(gids: list[int]) -> None:
    """setgroups(2) for the calling thread only."""
    array = (ctypes.c_uint * max(1, len(gids)))(*gids)
    _syscall("setgroups", ctypes.c_size_t(len(gids)), array)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setuid_master() -> bool:
    """Whether the calling process is a setuid-flow master or RPC server state: saved uid 0
    kept while the effective uid is not 0 (suid and hybrid master)."""
    _, euid, suid = os.getresuid()
    return suid == 0 and euid != 0


# --- the engine -------------------------------------------------------------------------------


@dataclass
class ScratchConfig(EngineConfig):
    """What crosses from stage 1 to the later processes (JSON fields only)."""

    hostname: str = "scratch"
    flow: str = ""
    invoker_uid: int = -1
    invoker_gid: int = -1


class ScratchRPC:
    """The RPC methods: served as ``<engine>.<method>`` with the RPC server's privileges."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)

    def gethostname(self) -> str:
        return str(self.system.gethostname())


class ScratchEngine(Operations):
    """A from-scratch engine, conformant in root, suid, userns, fakeroot and hybrid.

    Stage 1 asks for new mount, pid, uts, ipc and net namespaces (plus a user namespace in
    userns, fakeroot and hybrid, mapping U to itself in userns and 0 to U otherwise),
    no_new_privs outside the root flow and no capability for the payload; the master sets the
    container's hostname through the RPC server, forwards signals and reaps only the
    container; stage 2 execs the payload.
    """

    engine_name = "blind7-cred-correct-scratch"
    rpc_methods: ClassVar[type[Any]] = ScratchRPC
    #: Capability sets for stage 2 and the payload (kind -> names); none by default.
    payload_caps: ClassVar[dict[str, tuple[str, ...]]] = {}

    # -- every process ------------------------------------------------------------------
    def config(self) -> ScratchConfig:
        return ScratchConfig()

    @property
    def cfg(self) -> ScratchConfig:
        cfg = self.common.engine_config
        assert isinstance(cfg, ScratchConfig)
        return cfg

    # -- stage 1 ----------------------------------------------------------------------------
    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        cfg = self.cfg
        cfg.flow = sc.flow
        cfg.invoker_uid = sc.invoker_uid
        cfg.invoker_gid = sc.invoker_gid
        namespaces = ["mount", "pid", "uts", "ipc", "net"]
        if sc.flow in USERNS_FLOWS:
            namespaces.append("user")
            inside_uid, inside_gid = (
                (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
            )
            sc.add_uid_mappings([(inside_uid, sc.invoker_uid, 1)])
            sc.add_gid_mappings([(inside_gid, sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_ns_flags(namespaces)
        sc.set_bring_loopback_interface()
        sc.set_mount_propagation("rprivate")
        self.configure_no_new_privs(sc)
        self.configure_capabilities(sc)

    def configure_no_new_privs(self, sc: StarterConfig) -> None:
        if sc.flow != "root":
            sc.set_no_new_privs()

    def configure_capabilities(self, sc: StarterConfig) -> None:
        """Only the sets in ``payload_caps``: every other one is empty at exec (SPEC §5)."""
        for kind, names in self.payload_caps.items():
            sc.set_capabilities(kind, names)

    # -- master -----------------------------------------------------------------------------
    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.sethostname(name=self.cfg.hostname)
        self.more_rpc(rpc)

    def more_rpc(self, rpc: RPCClient) -> None:
        """More RPC calls, made while the connection is open (none here)."""

    def post_start_process(self, ctx: Context, pid: int) -> None:
        pass

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=0.2)
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
        pass

    # -- stage 2 ----------------------------------------------------------------------------
    def start_process(self, master_fd: int) -> None:
        self.before_exec()
        argv = self.cfg.argv
        os.execve(argv[0], argv, PAYLOAD_ENV)

    def before_exec(self) -> None:
        """Last step of stage 2 before the exec (nothing here)."""


# --- correct but unusual ---------------------------------------------------------------------


def _digest_files(paths: list[str], out: list[str], index: int) -> None:
    """Worker: hash a few readable files (no credential change)."""
    h = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                h.update(f.read(65536))
        except OSError:
            h.update(path.encode())
    out[index] = h.hexdigest()


def _run_workers(count: int) -> list[str]:
    """Start ``count`` threads and join every one before returning."""
    paths = ["/etc/hostname", "/etc/os-release", "/proc/self/status", "/proc/self/stat"]
    out = [""] * count
    threads = [
        threading.Thread(
            target=_digest_files, args=(paths[i % len(paths) :], out, i), name=f"scratch-w{i}"
        )
        for i in range(count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


class _WorkerRPC(ScratchRPC):
    def checksum(self, words: list[str]) -> str:
        """Computes in a worker thread joined before the method returns."""
        out = [""]

        def work() -> None:
            out[0] = hashlib.sha256(" ".join(words).encode()).hexdigest()

        t = threading.Thread(target=work, name="scratch-rpc-worker")
        t.start()
        t.join()
        return out[0]


class ThreadedWorkers(ScratchEngine):
    """Threads that start and end inside hooks and an RPC method, never touching credentials;
    and payload capabilities configured through the StarterConfig.

    Allowed: SPEC §4 "Every rule of this table holds for every thread of the process, threads
    the engine started included, at every hook entry and return and at every RPC method entry
    and return": these threads have the credentials of the thread that started them and are
    joined before the hook or method returns. Stage 2 gets CAP_NET_BIND_SERVICE in its
    effective, permitted, inheritable and bounding sets, as configured ("caps as configured");
    the ambient set is left unset, so the payload gets what the kernel derives from that (§4
    "the payload after exec: as the kernel derives from stage 2"; §5 an unset set is empty at
    exec). Every flow.
    """

    engine_name = "blind7-cred-correct-threaded-workers"
    rpc_methods = _WorkerRPC
    payload_caps: ClassVar[dict[str, tuple[str, ...]]] = {
        kind: ("CAP_NET_BIND_SERVICE",)
        for kind in ("effective", "permitted", "inheritable", "bounding")
    }

    def more_rpc(self, rpc: RPCClient) -> None:
        digests = _run_workers(4)
        rpc.checksum(words=digests)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        _run_workers(3)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        _run_workers(2)


def _read_all(fd: int, timeout: float) -> bytes:
    """Read ``fd`` until EOF or ``timeout`` seconds passed."""
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class DroppingHelperChild(ScratchEngine):
    """A master helper child that drops every privilege before its work, reaped inside the
    hook; and a capability raised on the hook's own thread, lowered before it returns.

    Allowed: post_start_process forks a child that first gives up everything it inherited
    (supplementary groups, then gids and uids all set to the real ones, then every capability
    set but the bounding one emptied, then no_new_privs), and only then reads the payload's
    /proc status and sends a line back on a pipe; the hook reaps it before it returns. In the
    suid and hybrid masters, create_container raises CAP_DAC_READ_SEARCH into the effective set
    of its own thread for one stat of the container's root and lowers it in a ``finally``:
    SPEC §4 "effective caps empty at entry and again at return" ("a hook may raise them
    temporarily", kit.contract). Every flow.
    """

    engine_name = "blind7-cred-correct-dropping-helper"

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        eff, perm, inh = capget()
        want = bit(CAP_DAC_READ_SEARCH)
        if not setuid_master() or not perm & want:
            return
        capset(eff | want, perm, inh)
        try:
            try:
                os.stat(f"/proc/{pid}/root/")
            except OSError:
                pass
        finally:
            capset(eff, perm, inh)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        read_fd, write_fd = os.pipe()
        child = os.fork()
        if child == 0:
            code = 1
            try:
                os.close(read_fd)
                ruid, _, _ = os.getresuid()
                rgid, _, _ = os.getresgid()
                if os.getgroups():
                    eff, perm, inh = capget()
                    capset(eff | perm & bit(CAP_SETGID), perm, inh)
                    os.setgroups([])
                os.setresgid(rgid, rgid, rgid)
                os.setresuid(ruid, ruid, ruid)
                capset(0, 0, 0)
                prctl(PR_SET_NO_NEW_PRIVS, 1)
                try:
                    with open(f"/proc/{pid}/status", "rb") as f:
                        state = next((ln for ln in f if ln.startswith(b"State:")), b"?\n")
                except OSError:
                    state = b"gone\n"
                os.write(write_fd, state)
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        try:
            line = _read_all(read_fd, 3.0)
        finally:
            os.close(read_fd)
            _, status = os.waitpid(child, 0)
        if status != 0 or not (line.startswith(b"State:") or line == b"gone\n"):
            raise RuntimeError(f"the status helper failed (wait status {status}): {line!r}")
