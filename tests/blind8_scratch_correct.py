"""Correct blind engines written from scratch (round 8), each doing unusual but allowed things
where a kit is likely to be too strict: descriptors over RPC both ways, large and many calls
and a recovered remote error; a monitor that sleeps on the signal channel, with a payload
shell that has children; rarely used StarterConfig settings; namespaces joined from a holder
process the engine started in stage 1, and all seven created; slow hooks and a retrying
cleanup; hooks that start and join threads and child processes.

Every class subclasses ``kit.contract.Operations`` directly (no reference engine) and follows
the whole contract (SPEC.md) in every flow: failing one is a false failure. Loaded as
``blind8_scratch_correct:ClassName`` with ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kit import system
from kit.contract import Context, EngineConfig, Operations, SignalChannel, WaitStatus
from kit.rpc import FileDescriptor, RemoteError, RPCClient, UnknownMethodError, WithFds

if TYPE_CHECKING:
    from kit.starter.config import StarterConfig

FORWARDED = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
)
PAYLOAD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
SIGCHLD = signal.SIGCHLD


# --- helpers shared by the engines (plain functions: each engine is its own class) ---------


def _namespaces(sc: StarterConfig, kinds: list[str]) -> list[str]:
    """``kinds`` plus, where the flow has one, the user namespace with its one-id maps
    (userns U→U; fakeroot and hybrid 0→U), the hybrid workflow, and no_new_privs in every
    flow but root (SPEC §3, §4: stage 2 of suid has no_new_privs set)."""
    kinds = list(kinds)
    if sc.flow in ("userns", "fakeroot", "hybrid"):
        kinds.append("user")
        inside = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
        sc.add_uid_mappings([(inside[0], sc.invoker_uid, 1)])
        sc.add_gid_mappings([(inside[1], sc.invoker_gid, 1)])
    if sc.flow == "hybrid":
        sc.set_hybrid_workflow()
    if sc.flow != "root":
        sc.set_no_new_privs()
    return kinds


def _in_host_sandbox() -> bool:
    """True only inside the kit's host sandbox: ``KIT_HOST_SANDBOX`` names this process's
    mount and uts namespaces (``MNT:UTS`` inode numbers)."""
    mnt, _, uts = os.environ.get("KIT_HOST_SANDBOX", "").partition(":")
    try:
        return (
            int(mnt) == os.stat("/proc/self/ns/mnt").st_ino
            and int(uts) == os.stat("/proc/self/ns/uts").st_ino
        )
    except (OSError, ValueError):
        return False


def _payload_path(argv: list[str]) -> str:
    """The executable ``argv[0]`` names (PATH searched for a bare name), or the error
    execve would give: an engine that wraps the payload still fails like one that execs it."""
    if not argv:
        raise ValueError("empty payload command line")
    name = argv[0]
    candidates = (
        [name] if "/" in name else [os.path.join(d, name) for d in PAYLOAD_ENV["PATH"].split(":")]
    )
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(2, "payload not found or not executable", name)


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # gone already (SIGCHLD follows), or not yet ours to signal


def _start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: the process's start time, to tell it from a pid reuse."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _close_all_but(keep: set[int]) -> None:
    top = os.sysconf("SC_OPEN_MAX")
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, top)


# === 1. RPC: descriptors both ways, large results and arguments, many calls, errors ========


class _Refused(Exception):
    """An exception class the client cannot map: it arrives as a RemoteError."""


class _DescriptorRPC:
    """Served as ``blind8-scratch-rpc-descriptors.<method>`` in the RPC server."""

    def __init__(self, engine: Any) -> None:
        self.system = system.current()

    def scratch(self, target: str) -> None:
        self.system.mount("tmpfs", target, "tmpfs", ["nosuid", "nodev"], "mode=1777,size=4m")

    def open_dir(self, path: str) -> WithFds:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        return WithFds({"dev": st.st_dev, "ino": st.st_ino}, [fd])

    def drain(self, source: FileDescriptor) -> dict[str, int]:
        total = crc = 0
        try:
            while chunk := os.read(source, 65536):
                total += len(chunk)
                crc = zlib.crc32(chunk, crc)
        finally:
            os.close(source)
        return {"bytes": total, "crc": crc}

    def swap(self, give: FileDescriptor, spare: FileDescriptor | None = None) -> WithFds:
        """Hands ``give`` back, with the read end of a new pipe holding ``from-rpc``."""
        if spare is not None:
            os.close(spare)
        r, w = os.pipe()
        os.write(w, b"from-rpc")
        os.close(w)
        return WithFds({"spare": spare is not None}, [give, r])

    def big(self, size: int) -> str:
        return "r" * size

    def measure(self, blob: str) -> int:
        return len(blob)

    def ping(self, n: int) -> int:
        return n + 1

    def lookup(self, path: str) -> dict[str, int]:
        st = os.stat(path)  # FileNotFoundError: an error reply with errno ENOENT
        return {"size": st.st_size, "mode": st.st_mode}

    def create(self, path: str, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def refuse(self) -> None:
        raise _Refused("refused on purpose")


@dataclass
class RpcDescriptorsConfig(EngineConfig):
    calls: int = 400
    large: int = 800_000


class RpcDescriptors(Operations):
    """RPC with descriptors both ways, 800 kB results/arguments, 400 calls, recovered errors.

    A method returns a directory fd that create_container uses with openat and fchdir, then
    closes; descriptors are sent to methods (one comes back); remote errors are caught.

    Allowed: SPEC §6 "File descriptors may ride along (SCM_RIGHTS)" — ``open_dir`` returns
    a directory of the container's own tmpfs; create_container creates a file in it with
    openat, fchdir's into it and back to where it was, then closes it; ``drain`` and
    ``swap`` receive descriptors (``swap`` sends one back with a new pipe). "a maximum frame
    size": 800 kB is under ``kit.rpc.MAX_FRAME`` (1 MiB), both as a result and as an
    argument. "The server handles one request at a time": 400 pings in a row. "the reply
    carries a result or a typed error (errno and message survive)" and the server "answers
    an unknown method, a malformed frame or bad arguments with an error reply and keeps
    serving": the engine catches ENOENT and creates the file, catches an unknown exception
    class (RemoteError), an unknown method and a mistyped argument, and goes on. §4: the
    master "prepares the container (mounts, network…) through RPC calls"; the file it writes
    lives on a tmpfs of the container's mount namespace, which dies with it (§11). Stage 2
    checks the file before the exec.
    """

    engine_name = "blind8-scratch-rpc-descriptors"
    rpc_methods = _DescriptorRPC
    scratch = "/tmp"
    marker = "blind8-marker"

    def config(self) -> RpcDescriptorsConfig:
        return RpcDescriptorsConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        sc.set_ns_flags(_namespaces(sc, ["mount", "pid", "uts", "ipc", "net"]))
        sc.set_bring_loopback_interface()

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, RpcDescriptorsConfig)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.scratch(target=self.scratch)
        self._use_directory(rpc)
        self._send_descriptors(rpc)
        if len(rpc.big(size=cfg.large)) != cfg.large:
            raise RuntimeError("large result cut short")
        if rpc.measure(blob="b" * cfg.large) != cfg.large:
            raise RuntimeError("large argument cut short")
        for n in range(cfg.calls):
            if rpc.ping(n=n) != n + 1:
                raise RuntimeError(f"ping {n} answered wrongly")
        self._recover(rpc)

    def _use_directory(self, rpc: RPCClient) -> None:
        value, fds = rpc.open_dir(path=self.scratch)
        (dirfd,) = fds
        try:
            st = os.fstat(dirfd)
            if (st.st_dev, st.st_ino) != (value["dev"], value["ino"]):
                raise RuntimeError("open_dir sent another directory")
            fd = os.open(
                self.marker,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o644,
                dir_fd=dirfd,
            )
            try:
                os.write(fd, self.common.container_id.encode())
            finally:
                os.close(fd)
            home = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fchdir(dirfd)
                seen = os.listdir(".")
            finally:
                os.fchdir(home)
                os.close(home)
            if self.marker not in seen:
                raise RuntimeError(f"fchdir into the container's {self.scratch}: {seen}")
        finally:
            os.close(dirfd)

    def _send_descriptors(self, rpc: RPCClient) -> None:
        data = bytes(range(256)) * 128
        r, w = os.pipe()
        try:
            os.write(w, data)
            os.close(w)
            w = -1
            got = rpc.drain(source=FileDescriptor(r))
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        if got != {"bytes": len(data), "crc": zlib.crc32(data)}:
            raise RuntimeError(f"drain read {got}")
        for with_spare in (True, False):
            a, b = socket.socketpair()
            sr, sw = os.pipe()
            try:
                spare = FileDescriptor(sr) if with_spare else None
                value, back = rpc.swap(give=FileDescriptor(a.fileno()), spare=spare)
                mine, theirs = back
                try:
                    os.write(mine, b"ping")
                    if b.recv(4) != b"ping" or os.read(theirs, 16) != b"from-rpc":
                        raise RuntimeError("swap sent back the wrong descriptors")
                    if value != {"spare": with_spare}:
                        raise RuntimeError(f"swap answered {value}")
                finally:
                    os.close(mine)
                    os.close(theirs)
            finally:
                a.close()
                b.close()
                os.close(sr)
                os.close(sw)

    def _recover(self, rpc: RPCClient) -> None:
        late = f"{self.scratch}/blind8-late"
        try:
            rpc.lookup(path=late)
        except FileNotFoundError:
            rpc.create(path=late, text="late")
        else:
            raise RuntimeError(f"{late} exists before it was made")
        if rpc.lookup(path=late)["size"] != 4:
            raise RuntimeError("the file made after ENOENT is wrong")
        try:
            rpc.refuse()
        except RemoteError as exc:
            if exc.remote_type != "_Refused":
                raise
        try:
            rpc.call("no_such_method")
        except UnknownMethodError:
            pass
        try:
            rpc.ping(n="not a number")
        except TypeError:
            pass
        if rpc.ping(n=41) != 42:
            raise RuntimeError("the server stopped serving after errors")

    def start_process(self, master_fd: int) -> None:
        argv = self.common.engine_config.argv
        with open(f"{self.scratch}/{self.marker}", encoding="ascii") as f:
            if f.read() != self.common.container_id:
                raise RuntimeError("the master's file is not in the container")
        if not os.path.exists(f"{self.scratch}/blind8-late"):
            raise RuntimeError("the file made after ENOENT is missing")
        os.execve(_payload_path(argv), argv, PAYLOAD_ENV)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=0.2)
            if sig in FORWARDED:
                _forward(pid, sig)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pass  # the tmpfs goes with the container's mount namespace


# === 2. Signals: a monitor asleep on the channel, a payload shell with children ===========

# The payload's shell starts two children that outlive it (they die with the container's pid
# namespace), then becomes the payload.
_SHELL_WITH_CHILDREN = (
    "/bin/sleep 3600 </dev/null >/dev/null 2>&1 & "
    "/bin/sh -c 'exec /bin/sleep 3600' </dev/null >/dev/null 2>&1 & "
    'exec "$@"'
)
# The drill's payload: a shell (pid 1) that reports the signals it traps, ignores SIGTERM,
# and keeps children running until SIGKILL.
_DRILL = (
    'for s in USR1 USR2 HUP INT; do trap "echo blind8-got-$s" "$s"; done; '
    "trap '' TERM; "
    "/bin/sleep 3600 </dev/null >/dev/null 2>&1 & "
    "while :; do /bin/sleep 0.1 & wait $!; done"
)


@dataclass
class SignalShellConfig(EngineConfig):
    drill: bool = False  # payload: the drill shell (argv unused), signals sent by the master
    kill_after: float | None = None  # SIGKILL this long after a forwarded SIGTERM


class SignalShell(Operations):
    """A monitor asleep on the signal channel (45 s timeouts); the payload is a shell with children.

    The monitor reaps only on SIGCHLD; the shell starts two children and execs the command.
    With ``{"drill": true}`` the master signals itself with all five forwarded signals and
    kills the SIGTERM-ignoring shell with SIGKILL after a grace period (exit 137).

    Allowed: SPEC §7 "The master turns every signal it receives into an entry on the
    signals channel" and §10 "the kit's channel must not lose SIGCHLD or a forwarded signal":
    waiting on the channel for SIGCHLD, sigwaitinfo-style, is enough to learn the container
    exited (a wake-up by the 45 s timeout is printed as a lost SIGCHLD). §1 ``monitor_container``
    "blocks until the container exits, forwarding signals": it forwards SIGINT/SIGTERM/
    SIGHUP/SIGUSR1/SIGUSR2, "reaps only the container pid, and returns its wait status";
    a SIGKILL after a grace period (only with ``kill_after`` or the drill) is still the
    container's status ("or 128+signal when it was killed by a signal", §2 rule 8). The
    payload's shell is the container process: §1 ``start_process`` "becomes the payload: it
    must exec or exit"; its children live in the container's pid namespace and die with it
    (§11: no process outlives the run). A payload that does not exist fails in
    start_process, as an exec would.
    """

    engine_name = "blind8-scratch-signal-shell"

    def config(self) -> SignalShellConfig:
        return SignalShellConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        sc.set_ns_flags(_namespaces(sc, ["mount", "pid", "uts", "ipc", "net"]))

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        pass  # nothing to prepare: no RPC call at all

    def start_process(self, master_fd: int) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, SignalShellConfig)
        if cfg.drill:
            os.execve("/bin/sh", ["sh", "-c", _DRILL], PAYLOAD_ENV)
        argv = cfg.argv
        _payload_path(argv)
        os.execve("/bin/sh", ["sh", "-c", _SHELL_WITH_CHILDREN, "sh", *argv], PAYLOAD_ENV)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, SignalShellConfig)
        if not cfg.drill:
            return
        wanted = sum(1 << (s - 1) for s in (10, 12, 1, 2))  # USR1 USR2 HUP INT
        deadline = time.monotonic() + 3.0
        while True:
            fields = {}
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    fields[key] = value.strip()
            caught = int(fields.get("SigCgt", "0"), 16)
            ignored = int(fields.get("SigIgn", "0"), 16)
            if caught & wanted == wanted and ignored >> (signal.SIGTERM - 1) & 1:
                break
            if time.monotonic() > deadline or ctx.wait(0.02):
                raise RuntimeError(f"the drill shell set no traps: {fields.get('SigCgt')}")
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT):
            os.kill(os.getpid(), sig)  # through the master's signal channel
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        cfg = self.common.engine_config
        assert isinstance(cfg, SignalShellConfig)
        grace = cfg.kill_after if cfg.kill_after is not None else (1.0 if cfg.drill else None)
        kill_at: float | None = None
        done, status = os.waitpid(pid, os.WNOHANG)
        while done != pid:
            timeout = 45.0 if kill_at is None else max(0.0, kill_at - time.monotonic())
            sig = signals.get(timeout=timeout)
            if sig in FORWARDED:
                _forward(pid, sig)
                if sig == signal.SIGTERM and grace is not None and kill_at is None:
                    kill_at = time.monotonic() + grace
                continue
            if kill_at is not None and time.monotonic() >= kill_at:
                _forward(pid, signal.SIGKILL)
                kill_at = None
                grace = None
            if sig == SIGCHLD or sig is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if sig is None and done == pid:
                    print("blind8: SIGCHLD never reached the signal channel", flush=True)
        return status

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pass


# === 3. StarterConfig: propagation, master propagation, target ids, kept descriptors ======


class _KnobsRPC:
    def __init__(self, engine: Any) -> None:
        self.system = system.current()

    def private_tmpfs(self, target: str, token: str) -> dict[str, str | None]:
        """Mount a tmpfs on ``target``, first making the mount it covers private when it is
        a mount point that could still share (``private`` on / alone leaves submounts as
        they were)."""
        before = self.system.propagation(target)
        if before is not None and before != "private":
            self.system.set_propagation(target, "private")
        self.system.mount("tmpfs", target, "tmpfs", ["nosuid", "nodev"], "mode=1777,size=4m")
        with open(os.path.join(target, "blind8-knobs"), "w", encoding="ascii") as f:
            f.write(token)
        os.chmod(os.path.join(target, "blind8-knobs"), 0o644)
        return {"before": before, "root": self.system.propagation("/")}


_PROPAGATION = {
    "root": "rslave",
    "suid": "private",
    "userns": "rslave",
    "fakeroot": "private",
    "hybrid": "rslave",
}
_STAGE1_FD = 57


@dataclass
class StarterKnobsConfig(EngineConfig):
    propagation: str = ""  # empty: by flow (rslave, or private in suid and fakeroot)
    stage1_fd: bool = False  # keep a pipe stage 1 opens (upstream's CLONE_FILES stage 1)
    kept: list[int] = field(default_factory=list)
    target_uid: int = 65534
    target_gids: list[int] = field(default_factory=lambda: [65534, 100])


class StarterKnobs(Operations):
    """Rare StarterConfig settings: rslave/private propagation, master propagation, kept fds.

    ``set_mount_propagation('rslave')`` or ``('private')`` (by flow),
    ``set_master_propagate_mount``, a target uid and gids in the root flow, and
    ``keep_file_descriptor`` of the descriptors stage 1 holds (stdio; with
    ``{"stage1_fd": true}`` also a pipe stage 1 opens, which the payload's shell reads).

    Allowed: SPEC §5 lists every one of these setters; "Invalid combinations (effective not
    a subset of permitted; a user ns in suid without hybrid; an unknown namespace or
    capability name) are rejected" and none is used here. ``rslave`` and ``private`` are
    propagations the setter accepts; with ``private`` (not recursive) the RPC server makes
    the one mount it covers (/tmp, if it is a mount point) private first, so no mount of the
    container reaches the host (§11). §4 stage 2, root: "r=e=s=target uid (default 0)":
    the payload runs as 65534 with groups 65534 and 100. ``set_master_propagate_mount``
    asks for nothing the kit must refuse (no mount is made from the master). Upstream's
    stage 1 shares the starter's descriptor table (CLONE_FILES) precisely so that a
    descriptor it opens can be kept; SPEC §2 rule 3 only says "Only JSON-visible fields of
    the engine config cross": the ``stage1_fd`` variant tests which reading the kit takes.
    """

    engine_name = "blind8-scratch-starter-knobs"
    rpc_methods = _KnobsRPC
    target = "/tmp"

    def config(self) -> StarterKnobsConfig:
        return StarterKnobsConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        cfg = self.common.engine_config
        assert isinstance(cfg, StarterKnobsConfig)
        sc.set_ns_flags(_namespaces(sc, ["mount", "pid", "uts", "ipc", "net"]))
        cfg.propagation = cfg.propagation or _PROPAGATION[sc.flow]
        sc.set_mount_propagation(cfg.propagation)
        sc.set_master_propagate_mount()
        if sc.flow == "root":
            sc.set_target_uid(cfg.target_uid)
            sc.set_target_gids(cfg.target_gids)
        cfg.kept = []
        for fd in (0, 1, 2):
            try:
                os.fstat(fd)
            except OSError:
                continue
            sc.keep_file_descriptor(fd)
            cfg.kept.append(fd)
        if cfg.stage1_fd:
            r, w = os.pipe()
            os.write(w, self.common.container_id.encode() + b"\n")
            os.close(w)
            os.dup2(r, _STAGE1_FD, inheritable=True)
            os.close(r)
            sc.keep_file_descriptor(_STAGE1_FD)
            cfg.kept.append(_STAGE1_FD)

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, StarterKnobsConfig)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.private_tmpfs(target=self.target, token=self.common.container_id)

    def start_process(self, master_fd: int) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, StarterKnobsConfig)
        with open(os.path.join(self.target, "blind8-knobs"), encoding="ascii") as f:
            if f.read() != self.common.container_id:
                raise RuntimeError("the container's tmpfs is not there")
        for fd in cfg.kept:
            os.fstat(fd)  # EBADF: a kept descriptor was closed
        argv = cfg.argv
        path = _payload_path(argv)
        if _STAGE1_FD not in cfg.kept:
            os.execve(path, argv, PAYLOAD_ENV)
        script = (
            f'IFS= read -r got </proc/self/fd/{_STAGE1_FD} && [ "$got" = "$BLIND8_TOKEN" ] '
            '|| exit 97; exec "$@"'
        )
        env = dict(PAYLOAD_ENV, BLIND8_TOKEN=self.common.container_id)
        os.execve("/bin/sh", ["sh", "-c", script, "sh", *argv], env)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status
            sig = signals.get(timeout=1.0)
            if sig in FORWARDED:
                _forward(pid, sig)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pass


# === 4. Namespaces: join a holder made in stage 1 (root), create all seven elsewhere =======

_HELD = ("net", "uts", "ipc")


def _hold_namespaces(kinds: tuple[str, ...], lifetime: float) -> tuple[int, int]:
    """Fork a holder process (double fork: it is nobody's child here) with new ``kinds``
    namespaces; it lives until the starter (the master to be) is gone, or ``lifetime``.
    Returns its pid and start time."""
    watch = os.pidfd_open(os.getppid())
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            if os.fork() == 0:
                null = os.open("/dev/null", os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                _close_all_but({w, watch})
                system.current().unshare(kinds)
                try:
                    system.current().link_up("lo")
                except OSError:
                    pass
                os.write(w, str(os.getpid()).encode())
                os.close(w)
                select.select([watch], [], [], lifetime)
        finally:
            os._exit(0)
    os.close(w)
    os.close(watch)
    os.waitpid(child, 0)
    try:
        ready, _, _ = select.select([r], [], [], 5.0)
        data = os.read(r, 32) if ready else b""
    finally:
        os.close(r)
    if not data:
        raise RuntimeError("the namespace holder did not start")
    pid = int(data)
    return pid, _start_time(pid)


def _stop_holder(pid: int, start: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        try:
            if _start_time(pid) != start:
                return  # another process has the pid now
        except (FileNotFoundError, ProcessLookupError):
            return
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        ready, _, _ = select.select([pidfd], [], [], 3.0)
        if not ready:
            raise TimeoutError(f"the namespace holder {pid} did not die")
        deadline = time.monotonic() + 2.0
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            try:
                if _start_time(pid) != start:
                    break
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.01)  # a zombie until the sandbox's init reaps it
    finally:
        os.close(pidfd)


class _HolderRPC:
    def __init__(self, engine: Any) -> None:
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)

    def namespace_ids(self) -> dict[str, int]:
        kinds = ("mnt", "pid", "net", "uts", "ipc", "user", "cgroup")
        return {k: os.stat(f"/proc/self/ns/{k}").st_ino for k in kinds}


@dataclass
class NamespaceHolderConfig(EngineConfig):
    holder_pid: int = 0
    holder_start: int = 0
    holder_ns: dict[str, int] = field(default_factory=dict)


class NamespaceHolder(Operations):
    """Joins namespaces a stage-1 holder process made (root); creates all seven elsewhere.

    Root flow: stage 1 starts a holder process with new net, uts and ipc namespaces and the
    container joins them by ``/proc/PID/ns/KIND`` (the flags ask to create them too);
    cleanup_container kills the holder. Every other flow creates all seven namespaces (six
    in suid), the cgroup namespace included.

    Allowed: SPEC §5 "Each is either created (a flag) or joined (a path such as
    /proc/PID/ns/net); join wins over create" — the path is a process's, as in the example;
    the namespaces are new ones the engine made, never the host's, and nothing is
    bind-mounted (§11: the mount table of the host must not change even while the run
    lasts). §2 rule 3: the holder's pid and start time cross to the master as JSON fields of
    the engine config. §11 "a run changes nothing on the host that outlives it": the holder
    is killed (by pidfd, its start time checked) in cleanup_container, and it exits by
    itself when the starter that became the master is gone. A new user namespace is not
    asked for in the root flow (§3: root has none; suid rejects one without hybrid). Only
    done inside the kit's host sandbox and with the real backend.
    """

    engine_name = "blind8-scratch-ns-holder"
    rpc_methods = _HolderRPC

    def config(self) -> NamespaceHolderConfig:
        return NamespaceHolderConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        cfg = self.common.engine_config
        assert isinstance(cfg, NamespaceHolderConfig)
        sc.set_ns_flags(_namespaces(sc, ["mount", "pid", "net", "uts", "ipc", "cgroup"]))
        holder = (
            sc.flow == "root"
            and os.geteuid() == 0
            and system.current().name == "real"
            and _in_host_sandbox()
        )
        if not holder:
            sc.set_bring_loopback_interface()
            return
        pid, start = _hold_namespaces(_HELD, lifetime=300.0)
        cfg.holder_pid, cfg.holder_start = pid, start
        for kind in _HELD:
            path = f"/proc/{pid}/ns/{kind}"
            sc.set_ns_path(kind, path)
            cfg.holder_ns[kind] = os.stat(path).st_ino

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, NamespaceHolderConfig)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        ids = rpc.namespace_ids()
        for kind, ino in cfg.holder_ns.items():
            if ids[kind] != ino:
                raise RuntimeError(f"the container is not in the holder's {kind} namespace")
        rpc.sethostname(name="blind8-holder" if cfg.holder_ns else "blind8-own")

    def start_process(self, master_fd: int) -> None:
        argv = self.common.engine_config.argv
        os.execve(_payload_path(argv), argv, PAYLOAD_ENV)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=0.1)
            if sig is not None and sig in FORWARDED:
                _forward(pid, sig)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        cfg = self.common.engine_config
        if isinstance(cfg, NamespaceHolderConfig) and cfg.holder_pid:
            _stop_holder(cfg.holder_pid, cfg.holder_start)


# === 5. Hooks that take their time, a cleanup that retries ================================


class _SlowRPC:
    def __init__(self, engine: Any) -> None:
        self.system = system.current()
        self.ready = threading.Event()
        self.worker: threading.Thread | None = None

    def begin(self, target: str, delay: float) -> None:
        """Mount a tmpfs and have a thread of the RPC server fill it ``delay`` s later."""
        self.system.mount("tmpfs", target, "tmpfs", ["nosuid", "nodev"], "mode=1777,size=4m")

        def fill() -> None:
            time.sleep(delay)
            with open(os.path.join(target, "blind8-ready"), "w", encoding="ascii") as f:
                f.write("ready")
            os.chmod(os.path.join(target, "blind8-ready"), 0o644)
            self.ready.set()

        self.worker = threading.Thread(target=fill, name="blind8-fill")
        self.worker.start()

    def is_ready(self) -> bool:
        return self.ready.is_set()

    def finish(self) -> None:
        if self.worker is not None:
            self.worker.join()


class Unhurried(Operations):
    """Slow hooks (up to about 1 s each, under the 5 s timeout) and a cleanup that retries.

    prepare_config 0.5 s, create_container waits about a second for a thread of the RPC
    server to finish, start_process 0.3 s, post_start_process 1 s; cleanup_container
    retries the removal of a work directory (in the run's TMPDIR) that a thread started by
    post_start_process still writes to.

    Allowed: SPEC §2 "A hook that does not return within its timeout → the kit kills the
    run" — the timeout is 5 s by default (README "Timeouts"), none of these waits comes
    near it, and create_container waits for the RPC server, not for the container (§2 rule
    5: only that deadlocks). ``Context.wait`` is what the kit offers to wait ("a hook that
    waits should wait on wait rather than sleep"); the waits end early when the run is torn
    down. §1 ``cleanup_container`` "must tolerate partial setup": it retries with backoff
    until the writer stopped, and the work directory is gone when it returns (§11: nothing
    left in the run's TMPDIR). §4 "threads the engine started included": the threads never
    touch a credential. The work directory is used only inside the kit's host sandbox.
    """

    engine_name = "blind8-scratch-unhurried"
    rpc_methods = _SlowRPC
    target = "/tmp"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._closed = False
        self._workdir: str | None = None
        self._writer: threading.Thread | None = None

    def config(self) -> EngineConfig:
        return EngineConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        time.sleep(0.5)
        sc.set_ns_flags(_namespaces(sc, ["mount", "pid", "uts", "ipc", "net"]))

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.begin(target=self.target, delay=0.8)
        deadline = time.monotonic() + 3.5
        while not rpc.is_ready():
            if ctx.wait(0.05):
                raise RuntimeError(f"run torn down while waiting: {ctx.reason}")
            if time.monotonic() > deadline:
                raise TimeoutError("the RPC server's thread did not finish in time")
        rpc.finish()
        tmp = os.environ.get("TMPDIR")
        if tmp and _in_host_sandbox():
            with self._lock:
                if not self._closed:
                    self._workdir = os.path.join(tmp, f"blind8-work-{os.getpid()}")
                    os.mkdir(self._workdir, 0o700)

    def start_process(self, master_fd: int) -> None:
        time.sleep(0.3)
        if not os.path.exists(os.path.join(self.target, "blind8-ready")):
            raise RuntimeError("the RPC server's file is missing")
        argv = self.common.engine_config.argv
        os.execve(_payload_path(argv), argv, PAYLOAD_ENV)

    def _write_log(self) -> None:
        for n in range(15):
            with self._lock:
                if self._closed or self._workdir is None:
                    return
                try:
                    path = os.path.join(self._workdir, f"log-{n}")
                    with open(path, "w", encoding="ascii") as f:
                        f.write(str(n))
                except FileNotFoundError:
                    return
            time.sleep(0.1)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        self._writer = threading.Thread(target=self._write_log, name="blind8-log")
        self._writer.start()
        ctx.wait(1.0)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=0.05)
            if sig in FORWARDED:
                _forward(pid, sig)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        deadline = time.monotonic() + 3.0
        attempt = 0
        while True:
            attempt += 1
            writer = self._writer
            try:
                if writer is not None and writer.is_alive() and attempt < 4:
                    raise BlockingIOError("the log writer is still running")
                with self._lock:
                    self._closed = True
                    workdir = self._workdir
                if workdir is not None:
                    shutil.rmtree(workdir)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(min(0.05 * 2**attempt, 0.4))
        if writer is not None:
            writer.join(3.0)


# === 6. Threads and child processes in the hooks; a monitor with a reaper thread =========


def _census(out: dict[str, str], key: str, path: str) -> None:
    with open(path, encoding="utf-8", errors="replace") as f:
        out[key] = f.read(4096)


def _run_true(drop_root: bool) -> int:
    """fork+exec /bin/true without host privilege (as 65534 when the caller is host root; a
    non-root caller's exec drops its saved uid and capabilities itself) and reap it."""
    extra: dict[str, Any] = {}
    if drop_root:
        extra = {"user": 65534, "group": 65534, "extra_groups": []}
    proc = subprocess.Popen(
        ["/bin/true"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=PAYLOAD_ENV,
        close_fds=True,
        **extra,
    )
    try:
        _, status = os.waitpid(proc.pid, 0)
    except ChildProcessError:
        proc.returncode = -1
        raise RuntimeError(f"/bin/true (pid {proc.pid}) was reaped by someone else") from None
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"/bin/true ended with {proc.returncode}")
    return proc.pid


def _drop_root() -> bool:
    """Root of the host user namespace (the root flow) drops to 65534 before exec; the
    fakeroot master's uid 0 of its own user namespace has no other id mapped to become."""
    sysm = system.current()
    return sysm.name == "real" and os.getuid() == 0 and sysm.privileged()


class _ThreadedRPC:
    def __init__(self, engine: Any) -> None:
        self.system = system.current()

    def fan_out(self, count: int) -> int:
        results: list[int] = [0] * count

        def work(i: int) -> None:
            results[i] = sum(range(i * 1000)) + os.stat("/").st_mode

        threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(results)

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)


class ThreadsAndChildren(Operations):
    """Hooks start and join threads and reaped /bin/true children; a reaper-thread monitor.

    Hooks (and an RPC method) start and join threads; the master fork+execs /bin/true
    without privilege and reaps it before each hook returns; the monitor reaps the container
    from a thread of its own that waits for that pid alone.

    Allowed: SPEC §4 "Every rule of this table holds for every thread of the process,
    threads the engine started included": the threads inherit the hook's credentials and
    change none. A helper process is not forbidden; ``kit.contract.Operations`` even says how
    to stop one ("a child process they start inherits that mask across exec"): /bin/true
    exits by itself, runs as 65534 in the root flow (dropped in the child before exec) and,
    elsewhere, loses the master's saved uid 0 and capabilities at exec as the kernel does
    for a non-root exec; it is reaped by its own pid before the hook returns, so nothing
    outlives the hook (§11). §7 the monitor "reaps only the container pid": the reaper
    thread waits for that pid only, the monitor thread forwards the five signals meanwhile.
    """

    engine_name = "blind8-scratch-threads-children"
    rpc_methods = _ThreadedRPC

    def config(self) -> EngineConfig:
        return EngineConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        found: list[str] = []

        def ns_present(kind: str, name: str) -> None:
            if os.path.exists(f"/proc/self/ns/{name}"):
                found.append(kind)

        names = {"mount": "mnt", "pid": "pid", "uts": "uts", "ipc": "ipc", "net": "net"}
        threads = [
            threading.Thread(target=ns_present, args=(kind, name)) for kind, name in names.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        kinds = [k for k in names if k in found]
        sc.set_ns_flags(_namespaces(sc, kinds))
        if "net" in kinds:
            sc.set_bring_loopback_interface()

    def _census_threads(self) -> dict[str, str]:
        out: dict[str, str] = {}
        paths = {
            "status": "/proc/self/status",
            "limits": "/proc/self/limits",
            "mounts": "/proc/self/mountinfo",
            "cgroup": "/proc/self/cgroup",
        }
        threads = [
            threading.Thread(target=_census, args=(out, key, path), name=f"blind8-{key}")
            for key, path in paths.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if set(out) != set(paths):
            raise RuntimeError(f"a census thread failed: {sorted(out)}")
        return out

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        self._census_threads()
        _run_true(_drop_root())
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        box: dict[str, int] = {}

        def call() -> None:
            box["sum"] = rpc.fan_out(count=6)

        caller = threading.Thread(target=call, name="blind8-rpc")
        caller.start()
        caller.join()
        if "sum" not in box:
            raise RuntimeError("the RPC thread failed")
        rpc.sethostname(name="blind8-threads")

    def start_process(self, master_fd: int) -> None:
        out: dict[str, str] = {}
        t = threading.Thread(target=_census, args=(out, "status", "/proc/self/status"))
        t.start()
        t.join()
        if "status" not in out:
            raise RuntimeError("the stage 2 thread failed")
        argv = self.common.engine_config.argv
        os.execve(_payload_path(argv), argv, PAYLOAD_ENV)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        errors: list[BaseException] = []

        def spawn() -> None:
            try:
                _run_true(_drop_root())
            except Exception as exc:
                errors.append(exc)

        t = threading.Thread(target=spawn, name="blind8-spawn")
        t.start()
        t.join()
        if errors:
            raise errors[0]
        self._census_threads()

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        box: dict[str, int] = {}
        failed: list[BaseException] = []

        def reap() -> None:
            try:
                _, box["status"] = os.waitpid(pid, 0)
            except Exception as exc:
                failed.append(exc)

        reaper = threading.Thread(target=reap, name="blind8-reaper", daemon=True)
        reaper.start()
        while reaper.is_alive():
            sig = signals.get(timeout=0.1)
            if sig in FORWARDED:
                _forward(pid, sig)
        reaper.join()
        if failed:
            raise failed[0]
        return box["status"]

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        _run_true(_drop_root())


__all__ = [
    "NamespaceHolder",
    "RpcDescriptors",
    "SignalShell",
    "StarterKnobs",
    "ThreadsAndChildren",
    "Unhurried",
]
