"""Correct engines of the second blind round, loaded as ``blind2_correct:NAME`` (``tests/`` on
``PYTHONPATH``): shapes SPEC.md allows that the reference does not take; any failure is a
false failure of a check (or a disputed reading, said in the docstring)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import select
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from conformance import Capabilities
from conformance.capabilities import JOIN_FIELD
from kit import system
from kit.contract import EngineConfig, Operations
from kit.rpc import RPCClient
from kit.rpc.methods import FileDescriptor, WithFds
from kit.system import linux
from reference_engines.minimal.engine import (
    FORWARDED_SIGNALS,
    USERNS_FLOWS,
    ReferenceConfig,
    ReferenceEngine,
)
from reference_engines.minimal.rpc import ReferenceRPC, check_path, hostname_error

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


def _forward(pid: int, sig: int | None) -> None:
    """Send ``sig`` on to the container when it is one SPEC §7 names."""
    if sig in FORWARDED_SIGNALS:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # already gone: the caller's wait collects it


def _status_of(info: os.waitid_result) -> int:
    """The raw wait status (as ``os.waitpid`` gives it) of a ``waitid`` result."""
    if info.si_code == os.CLD_EXITED:
        return (info.si_status & 0xFF) << 8
    if info.si_code == os.CLD_DUMPED:
        return info.si_status | 0x80
    return info.si_status  # CLD_KILLED


def _helper_child_setup(caps: tuple[int, ...]) -> None:
    """In the child, before exec of a helper binary: an empty signal mask (the master's hooks
    block every signal) and, when this uid is not 0, ``caps`` carried across exec as ambient
    capabilities (an exec by a non-root uid keeps none otherwise). Only the child changes."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    if os.geteuid() == 0 or not caps:
        return
    eff, prm, inh = linux.capget()
    want = sum(1 << c for c in caps) & prm
    if want:
        linux.capset(eff, prm, inh | want)
        for cap in caps:
            if want >> cap & 1:
                linux.ambient_raise(cap)


def _run_helper(argv: list[str], caps: tuple[int, ...] = ()) -> None:
    """Run a helper binary in a child, wait for it (by its pid) and raise its stderr on
    failure, as an OSError with EPERM when it says permission was denied."""
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        # Python code between fork and exec: the RPC server runs one request at a time.
        preexec_fn=lambda: _helper_child_setup(caps),
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
    )
    if proc.returncode != 0:
        text = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        code = errno.EPERM if "permission" in text.lower() else errno.EIO
        raise OSError(code, f"{argv[0]} exited {proc.returncode}: {text}")


def _uid_zero_in_namespace() -> bool:
    """Real and effective uid 0 in this process's user namespace (root, fakeroot's ns root)."""
    return os.getuid() == 0 and os.geteuid() == 0


# --- 1. helper binaries in the RPC server ------------------------------------------------------


class _HostnameBinaryRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        why = hostname_error(name)
        if why is not None:
            raise ValueError(f"sethostname: {why}")
        self._need_namespace("uts", "sethostname")
        _run_helper(["/bin/hostname", name], caps=(CAP_SYS_ADMIN,))


class HostnameBinaryEngine(ReferenceEngine):
    """SPEC §2: create_container "prepares the container (mounts, network...) through RPC calls
    to the RPC server"; §4, RPC server row: "a method may raise more on its own thread" --
    how a method does its work is its own: this one runs hostname(1) in a child of the RPC
    server (in the container's uts namespace), carrying CAP_SYS_ADMIN across the exec as an
    ambient capability of that child where the server's uid is not 0. Legal."""

    engine_name = "blind2-ok-hostname-binary"
    rpc_methods = _HostnameBinaryRPC


class _MountBinaryRPC(ReferenceRPC):
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        if not _uid_zero_in_namespace():
            super().mount(source, target, fstype, flags, data)
            return
        # The reference's checks, then mount(8) instead of mount(2) (no mtab: -n).
        self._need_namespace("mount", "mount")
        if fstype not in ("proc", "tmpfs"):
            raise PermissionError(errno.EPERM, f"mount: filesystem type {fstype!r} refused")
        if fstype == "proc":
            self._need_namespace("pid", "mount proc")
        full = check_path(target, "mount target")
        options = ",".join([*flags, *([data] if data else [])]) or "defaults"
        _run_helper(["/bin/mount", "-n", "-t", fstype, "-o", options, fstype, full])


class MountBinaryEngine(ReferenceEngine):
    """SPEC §2: the container is prepared "through RPC calls to the RPC server"; nothing says
    by which system call -- where the RPC server is uid 0 of its user namespace (root,
    fakeroot) its mount method runs mount(8) in a child, elsewhere mount(2) through
    kit.system as the reference does. Legal."""

    engine_name = "blind2-ok-mount-binary"
    rpc_methods = _MountBinaryRPC


class _IpRPC(ReferenceRPC):
    def loopback_up(self) -> None:
        """Bring lo up in the container's network namespace with ip(8)."""
        self._need_namespace("net", "loopback_up")
        _run_helper(["/bin/ip", "link", "set", "lo", "up"], caps=(CAP_NET_ADMIN,))


@dataclass
class _IpConfig(ReferenceConfig):
    #: Not an option: stage 1 sets it where the RPC server will run ip(8) (root, fakeroot).
    loopback_by_ip: bool = False


class IpLoopbackEngine(ReferenceEngine):
    """SPEC §5: set_bring_loopback_interface is one of the setters, not a duty; §2:
    create_container prepares "mounts, network..." through the RPC server -- where the RPC
    server is uid 0 of its namespace (root, fakeroot) ip(8) brings lo up from an RPC method;
    the other flows ask the starter. Legal."""

    engine_name = "blind2-ok-ip-loopback"
    rpc_methods = _IpRPC

    def config(self) -> _IpConfig:
        return _IpConfig()

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        cfg: _IpConfig = self.common.engine_config
        if starter_config.flow in ("root", "fakeroot") and "net" in cfg.namespaces:
            starter_config.set_bring_loopback_interface(False)
            cfg.loopback_by_ip = True  # crosses as JSON: the master makes the call

    def create_container(self, ctx, pid, rpc_conn):
        super().create_container(ctx, pid, rpc_conn)
        if self.common.engine_config.loopback_by_ip:
            RPCClient(rpc_conn, self.common.engine_name).loopback_up()


# --- 2. monitors of other shapes ----------------------------------------------------------


class AsyncioEngine(ReferenceEngine):
    """SPEC §2: create_container and monitor_container "run concurrently" in threads of the
    master; §7 says what the monitor does, not how -- both run an asyncio event loop of their
    own: create_container awaits the reference's work in a worker thread; the monitor waits
    on a pidfd reader and takes signals from the channel through the loop's executor.
    Legal."""

    engine_name = "blind2-ok-asyncio"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):
        async def work() -> None:
            await asyncio.to_thread(ReferenceEngine.create_container, self, ctx, pid, rpc_conn)

        asyncio.run(work())

    def monitor_container(self, pid, signals):
        async def watch() -> int:
            loop = asyncio.get_running_loop()
            exited = loop.create_future()
            pidfd = os.pidfd_open(pid)

            def ready() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, ready)
            try:
                while not exited.done():
                    _forward(pid, await loop.run_in_executor(None, signals.get, 0.05))
                return os.waitpid(pid, 0)[1]
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)

        return asyncio.run(watch())


class PidfdEngine(ReferenceEngine):
    """SPEC §7: the monitor "forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 to the container,
    reaps only the container pid, and returns its wait status" -- through a pidfd: it forwards
    with pidfd_send_signal, polls the pidfd, reaps with waitid(P_PIDFD) and builds the wait
    status from the siginfo. Legal."""

    engine_name = "blind2-ok-pidfd"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):
        pidfd = os.pidfd_open(pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while True:
                while (sig := signals.get(timeout=0)) is not None:
                    if sig in FORWARDED_SIGNALS:
                        try:
                            signal.pidfd_send_signal(pidfd, sig)
                        except ProcessLookupError:
                            pass
                if poller.poll(50):
                    return _status_of(os.waitid(os.P_PIDFD, pidfd, os.WEXITED))
        finally:
            os.close(pidfd)


class SelectorMonitorEngine(ReferenceEngine):
    """SPEC §7 (what a monitor does) and §4 ("threads the engine started included" hold the
    process's privileges) -- a wakeup-fd monitor: a helper thread moves signals from the
    channel to a self-pipe, the monitor selects on that pipe and a pidfd, forwards what it
    reads, and reaps the container when the pidfd fires. Legal."""

    engine_name = "blind2-ok-selector-monitor"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        pidfd = os.pidfd_open(pid)
        done = threading.Event()

        def pump() -> None:
            while not done.is_set():
                sig = signals.get(timeout=0.1)
                if sig is not None:
                    os.write(w, bytes([sig]))

        pumper = threading.Thread(target=pump, name="signal-pump", daemon=True)
        pumper.start()
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(r, selectors.EVENT_READ, "signals")
                sel.register(pidfd, selectors.EVENT_READ, "exit")
                while True:
                    for key, _ in sel.select():
                        if key.data == "signals":
                            for sig in os.read(r, 256):
                                _forward(pid, sig)
                        else:
                            return os.waitpid(pid, 0)[1]
        finally:
            done.set()
            pumper.join()
            for fd in (r, w, pidfd):
                os.close(fd)


class SigchldDrivenMonitorEngine(ReferenceEngine):
    """SPEC §7: "The master turns every signal it receives into an entry on the signals
    channel" and §10: "the kit's channel must not lose SIGCHLD" -- so a monitor may sleep on
    the channel with no timeout and look at the container only when a SIGCHLD comes (any
    child's: it then tries waitpid on the container alone), forwarding the rest. Legal.
    (The first version waited in sigtimedwait(SIGCHLD) itself, which takes the master's
    SIGCHLD from the kit's signalfd: SIG-005 failed it, rightly, as the channel lost it.)"""

    engine_name = "blind2-ok-sigchld-driven-monitor"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):
        while True:
            sig = signals.get()
            if sig != signal.SIGCHLD:
                _forward(pid, sig)
                continue
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class LateMonitorEngine(ReferenceEngine):
    """SPEC §7 sets no latency, and §10: "the kit's channel must not lose SIGCHLD or a
    forwarded signal" -- the monitor starts looking only 2 s after it is called (signals
    sent meanwhile wait on the channel); create_container paces its RPC calls on ctx.wait;
    every hook stays well within the 5 s hook timeout. Legal."""

    engine_name = "blind2-ok-late-monitor"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):
        if ctx.wait(0.7):
            raise RuntimeError(f"cancelled: {ctx.reason}")
        super().create_container(ctx, pid, rpc_conn)

    def monitor_container(self, pid, signals):
        time.sleep(2.0)
        return super().monitor_container(pid, signals)

    def post_start_process(self, ctx, pid):
        ctx.wait(1.0)

    def cleanup_container(self, ctx, fatal, status):
        time.sleep(1.0)


# --- 3. processes and threads of the engine's own ------------------------------------------


def _spawn_and_wait(argv: list[str], resetids: bool = False) -> None:
    """posix_spawn a helper with an empty signal mask and reap it by its pid."""
    child = os.posix_spawn(argv[0], argv, {"PATH": "/bin"}, setsigmask=(), resetids=resetids)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(errno.EIO, f"{argv[0]} failed: status {status}")


class _SpawnRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        _spawn_and_wait(["/bin/true"])
        super().sethostname(name)


class PosixSpawnEngine(ReferenceEngine):
    """SPEC §11: "a run changes nothing on the host that outlives it"; §7: the monitor
    "reaps only the container pid" -- every hook (and an RPC method) starts a helper with
    os.posix_spawn (vfork-style, an empty signal mask, ids reset in the master) and reaps
    it by its pid before returning; stage 2 does it too before its exec. Legal."""

    engine_name = "blind2-ok-posix-spawn"
    rpc_methods = _SpawnRPC

    def prepare_config(self, starter_config):
        _spawn_and_wait(["/bin/true"])
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        _spawn_and_wait(["/bin/true"], resetids=True)
        super().create_container(ctx, pid, rpc_conn)

    def post_start_process(self, ctx, pid):
        _spawn_and_wait(["/bin/sh", "-c", "exit 0"])

    def cleanup_container(self, ctx, fatal, status):
        _spawn_and_wait(["/bin/true"], resetids=True)

    def start_process(self, master_fd):
        _spawn_and_wait(["/bin/true"])
        super().start_process(master_fd)


class MasterSubreaperEngine(ReferenceEngine):
    """SPEC §4: the credential is uids, gids, groups, caps, securebits, no_new_privs, seccomp
    -- PR_SET_CHILD_SUBREAPER is none of them; §11 "nothing outlives the run"; §7 the monitor
    reaps only the container -- the master becomes a subreaper in create_container and starts
    a daemonised helper (double fork) that is reparented to it; cleanup_container kills and
    reaps that helper by its pid. Legal."""

    engine_name = "blind2-ok-master-subreaper"
    rpc_methods = ReferenceRPC
    helper_pid: int | None = None

    def create_container(self, ctx, pid, rpc_conn):
        linux.set_child_subreaper()
        r, w = os.pipe2(os.O_CLOEXEC)
        first = os.fork()
        if first == 0:
            try:
                grandchild = os.fork()
                if grandchild == 0:
                    os.close(r)
                    os.close(w)
                    os.execv("/bin/sleep", ["/bin/sleep", "60"])
                os.write(w, str(grandchild).encode())
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(first, 0)
        with os.fdopen(r, "rb") as f:
            self.helper_pid = int(f.read() or 0) or None
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(self, ctx, fatal, status):
        if self.helper_pid is not None:
            try:
                os.kill(self.helper_pid, signal.SIGKILL)
                os.waitpid(self.helper_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.helper_pid = None


class _WorkerThreadRPC(ReferenceRPC):
    """Each method does its work on a worker thread (same credentials) and waits for it."""

    def _on_worker(self, fn, *args):
        result: list[object] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                result.append(fn(*args))
            except BaseException as exc:  # handed back to the method's own thread
                errors.append(exc)

        worker = threading.Thread(target=run, name="rpc-worker")
        worker.start()
        worker.join()
        if errors:
            raise errors[0]
        return result[0]

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        self._on_worker(ReferenceRPC.mount, self, source, target, fstype, flags, data)

    def sethostname(self, name: str) -> None:
        self._on_worker(ReferenceRPC.sethostname, self, name)


class RPCWorkerThreadEngine(ReferenceEngine):
    """SPEC §6: the server "handles one request at a time" (it does: a method returns only when
    its work is done); §4: every thread holds the table's privileges -- the RPC methods do
    their mount and sethostname on a worker thread they start and join. Legal."""

    engine_name = "blind2-ok-rpc-worker-thread"
    rpc_methods = _WorkerThreadRPC


class _LockedClient:
    """One RPC client shared by several threads, one call at a time."""

    def __init__(self, client: RPCClient) -> None:
        self.client = client
        self.lock = threading.Lock()

    def call(self, method: str, **kwargs: object) -> object:
        with self.lock:
            return self.client.call(method, **kwargs)


class RPCThreadPoolEngine(ReferenceEngine):
    """SPEC §2: create_container prepares the container "through RPC calls"; nothing says from
    which thread -- it submits its calls to a pool of 4 threads (a lock keeps them one at a
    time on the socket), waits for every result, and shuts the pool down without waiting for
    its idle threads. Legal."""

    engine_name = "blind2-ok-rpc-threadpool"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):
        cfg: ReferenceConfig = self.common.engine_config
        rpc = _LockedClient(RPCClient(rpc_conn, self.common.engine_name))
        calls: list[tuple[str, dict[str, object]]] = []
        if cfg.hostname is not None:
            calls.append(("sethostname", {"name": cfg.hostname}))
        if cfg.mount_proc:
            calls.append(
                (
                    "mount",
                    {
                        "source": "proc",
                        "target": "/proc",
                        "fstype": "proc",
                        "flags": ["nosuid", "nodev", "noexec"],
                        "data": None,
                    },
                )
            )
        if cfg.mount_tmp:
            calls.append(
                (
                    "mount",
                    {
                        "source": "tmpfs",
                        "target": "/tmp",
                        "fstype": "tmpfs",
                        "flags": ["nosuid", "nodev"],
                        "data": "mode=1777,size=16m",
                    },
                )
            )
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="rpc-pool")
        try:
            futures = [pool.submit(rpc.call, name, **kw) for name, kw in calls]
            for fut in futures:
                fut.result()
        finally:
            pool.shutdown(wait=False)


# --- 4. volume: RPC payloads, logs, config ---------------------------------------------------


class _BulkRPC(ReferenceRPC):
    def store(self, blob: str, numbers: list[int]) -> dict[str, int]:
        return {"chars": len(blob), "sum": sum(numbers)}

    def fetch(self, size: int) -> str:
        return "y" * size

    def open_many(self, count: int) -> WithFds:
        return WithFds(count, [os.open("/dev/null", os.O_RDONLY) for _ in range(count)])

    def fstat_all(self, fd: FileDescriptor) -> int:
        try:
            return os.fstat(fd).st_mode
        finally:
            os.close(fd)


class LargeRPCEngine(ReferenceEngine):
    """SPEC §6: "Frames are length-prefixed and carry JSON (... a maximum frame size)" and
    "File descriptors may ride along" -- create_container sends a 700 kB argument, gets a
    700 kB result back (both under the 1 MiB frame), sends 50,000 numbers, and receives 16
    descriptors in one reply (MAX_FDS), which it closes. Legal."""

    engine_name = "blind2-ok-large-rpc"
    rpc_methods = _BulkRPC

    def create_container(self, ctx, pid, rpc_conn):
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        blob = "x" * 700_000
        numbers = list(range(50_000))
        got = rpc.store(blob=blob, numbers=numbers)
        assert got == {"chars": 700_000, "sum": sum(numbers)}, got
        assert len(rpc.fetch(size=700_000)) == 700_000
        count, fds = rpc.open_many(count=16)
        assert count == 16 and len(fds) == 16, (count, fds)
        for fd in fds:
            os.close(fd)
        super().create_container(ctx, pid, rpc_conn)


def _spew(fd: int, size: int, what: str) -> None:
    """Write ``size`` bytes of log lines to ``fd``: what a chatty engine does."""
    line = f"[engine] {what}: {'.' * 100}\n".encode()
    data = line * (size // len(line) + 1)
    view = memoryview(data)[:size]
    while view:
        view = view[os.write(fd, view) :]


class _LoudRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        _spew(2, 1 << 20, f"sethostname {name}")
        super().sethostname(name)


class LoudEngine(ReferenceEngine):
    """Nothing in SPEC.md limits what an engine writes to its standard streams -- this one
    writes megabytes: 2 MiB to stderr in stage 1, 2 MiB to stdout and 2 MiB to stderr in the
    master's hooks, 1 MiB to stderr from an RPC method, 256 KiB to stderr in stage 2 before
    the exec (never stage 2's stdout, the payload's). Legal."""

    engine_name = "blind2-ok-loud"
    rpc_methods = _LoudRPC

    def prepare_config(self, starter_config):
        _spew(2, 2 << 20, "prepare_config")
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        _spew(1, 2 << 20, "create_container")
        super().create_container(ctx, pid, rpc_conn)

    def post_start_process(self, ctx, pid):
        _spew(2, 1 << 20, "post_start_process")

    def monitor_container(self, pid, signals):
        _spew(2, 1 << 20, "monitor_container")
        return super().monitor_container(pid, signals)

    def cleanup_container(self, ctx, fatal, status):
        _spew(1, 512 << 10, "cleanup_container")

    def start_process(self, master_fd):
        _spew(2, 256 << 10, "start_process")
        super().start_process(master_fd)


@dataclass
class _Volume(EngineConfig):
    name: str = ""
    options: list[str] = field(default_factory=list)


@dataclass
class _RichConfig(ReferenceConfig):
    """The reference's options plus fields of every JSON shape, some large, some unicode."""

    notes: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    volumes: list[_Volume] = field(default_factory=list)
    big: int = 2**62 + 1
    ratio: float = 0.1
    empty: str = ""
    maybe: int | None = None
    flags: list[bool] = field(default_factory=list)


_NOTES = ("é☃🐍 line\n\ttab \"quote\" \\ back \u2028 sep \x01 ctl " * 8_000)[:400_000]
_LABELS = {"🐍": "snake", "a\nb": "new\nline", "": "empty key", "k" * 200: "v" * 5_000}


class RichConfigEngine(ReferenceEngine):
    """SPEC §2 rule 3: "Only JSON-visible fields of the engine config cross from stage 1 to
    later processes" -- the config has many extra fields (nested dataclasses, unicode keys and
    values, a 400 kB string, a large int, a float, an empty string, None, a list of bools);
    stage 1 fills them and every later process checks they arrived exactly. Legal."""

    engine_name = "blind2-ok-rich-config"
    rpc_methods = ReferenceRPC

    def config(self) -> _RichConfig:
        return _RichConfig()

    def prepare_config(self, starter_config):
        cfg: _RichConfig = self.common.engine_config
        cfg.notes = _NOTES
        cfg.labels = dict(_LABELS)
        cfg.volumes = [_Volume(name=f"v{i}", options=["ro", "ü"]) for i in range(50)]
        cfg.flags = [True, False] * 10
        super().prepare_config(starter_config)

    def _check(self) -> None:
        cfg: _RichConfig = self.common.engine_config
        assert cfg.notes == _NOTES, "notes lost"
        assert cfg.labels == _LABELS, "labels lost"
        assert [v.name for v in cfg.volumes] == [f"v{i}" for i in range(50)]
        assert cfg.volumes[7].options == ["ro", "ü"]
        assert cfg.big == 2**62 + 1 and cfg.ratio == 0.1 and cfg.maybe is None
        assert cfg.flags == [True, False] * 10 and cfg.empty == ""

    def create_container(self, ctx, pid, rpc_conn):
        self._check()
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(self, ctx, fatal, status):
        self._check()

    def start_process(self, master_fd):
        self._check()
        super().start_process(master_fd)


# --- 5. StarterConfig: every option, the least, joins ------------------------------------


class EveryOptionEngine(ReferenceEngine):
    """SPEC §5 lists the StarterConfig setters -- this engine calls each one the flow allows:
    all six namespaces (and the flow's user namespace), loopback, runbindable propagation,
    set_master_propagate_mount, set_allow_setgroups (true only in hybrid, where the master
    writes the maps with privilege), keep_file_descriptor for 0, 1 and 2, no_new_privs in
    every flow (root too), all five capability sets explicitly, and target ids in the root
    flow (uid 0, gid 0 and group 0, the defaults). Legal."""

    engine_name = "blind2-ok-every-option"
    rpc_methods = ReferenceRPC

    def config(self) -> ReferenceConfig:
        return ReferenceConfig(namespaces=["mount", "pid", "uts", "ipc", "net", "cgroup"])

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        sc = starter_config
        sc.set_bring_loopback_interface(True)
        sc.set_mount_propagation("runbindable")
        sc.set_master_propagate_mount(True)
        sc.set_allow_setgroups(sc.flow == "hybrid")
        for fd in (0, 1, 2):
            sc.keep_file_descriptor(fd)
        sc.set_no_new_privs(True)
        sc.set_capabilities("inheritable", [])
        sc.set_capabilities("ambient", [])
        if sc.flow == "root":
            sc.set_target_uid(0)
            sc.set_target_gids([0, 0])


class TargetIdsEverywhereEngine(ReferenceEngine):
    """SPEC §4, stage 2, suid: "r=e=s=U (a target uid is ignored for a non-root caller)";
    StarterConfig.set_target_uid: "ignored for a non-root caller, as upstream" -- this engine
    always names the invoker as the target (uid and gids), in every flow but root, where it
    names 0. Legal."""

    engine_name = "blind2-ok-target-ids-everywhere"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        sc = starter_config
        if sc.flow == "root":
            sc.set_target_uid(0)
            sc.set_target_gids([0])
        else:
            sc.set_target_uid(sc.invoker_uid)
            sc.set_target_gids([sc.invoker_gid])


@dataclass
class _BareConfig(EngineConfig):
    """Only the payload (``argv``, inherited)."""


class MinimalEngine(Operations):
    """SPEC §1-§7 ask for the eight operations and SPEC §4's privileges, nothing more -- this
    engine does the least that allows: no RPC methods and no RPC call, no namespace but the
    flows' user namespace (identity map in userns, root to U in fakeroot and hybrid),
    no_new_privs only where §4 says "no_new_privs set" (suid), no capability set configured
    ("a capability set the StarterConfig leaves unset is empty"), the payload exec'd with
    the environment stage 2 inherited, a monitor that only forwards and reaps. Legal."""

    engine_name = "blind2-ok-minimal"

    def config(self) -> _BareConfig:
        return _BareConfig()

    def prepare_config(self, starter_config):
        sc = starter_config
        if sc.flow in USERNS_FLOWS:
            inside = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
            sc.set_ns_flags(["user"])
            sc.add_uid_mappings([(inside[0], sc.invoker_uid, 1)])
            sc.add_gid_mappings([(inside[1], sc.invoker_gid, 1)])
            if sc.flow == "hybrid":
                sc.set_hybrid_workflow()
        if sc.flow == "suid":
            sc.set_no_new_privs()

    def create_container(self, ctx, pid, rpc_conn):
        pass  # nothing to prepare

    def start_process(self, master_fd):
        argv = self.common.engine_config.argv
        os.execv(argv[0], argv)

    def monitor_container(self, pid, signals):
        while True:
            _forward(pid, signals.get(timeout=0.1))
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status

    def cleanup_container(self, ctx, fatal, status):
        pass  # nothing was set up


class _JoinCapabilities(Capabilities):
    @property
    def join_only(self) -> bool:
        return True


@dataclass
class _JoinConfig(ReferenceConfig):
    conformance_join: dict[str, str] = field(default_factory=dict)


class OwnJoinEngine(ReferenceEngine):
    """SPEC §5: "Each is either created (a flag) or joined (a path ...); join wins over
    create" and "Join-only runs (set_namespace_join_only) call only config/init_config,
    prepare_config and start_process" -- this engine implements the join_only capability
    itself: it keeps its usual namespace flags and lets each requested path win over its
    flag (dropping only the flags it does not join), with no loopback. Legal."""

    engine_name = "blind2-ok-own-join"
    rpc_methods = ReferenceRPC
    conformance_capabilities = _JoinCapabilities

    def config(self) -> _JoinConfig:
        return _JoinConfig()

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        paths: dict[str, str] = getattr(self.common.engine_config, JOIN_FIELD)
        if not paths:
            return
        sc = starter_config
        for kind, path in paths.items():
            sc.set_ns_path(kind, path)
        sc.set_ns_flags([k for k in sc.ns_flags if k in paths])
        sc.set_bring_loopback_interface(False)
        sc.set_namespace_join_only()


class JoinOwnCgroupEngine(ReferenceEngine):
    """SPEC §5: each namespace "is either created (a flag) or joined (a path such as
    /proc/PID/ns/net)" -- where the starter runs in the host user namespace (root, suid) it
    joins the starter's own cgroup namespace (/proc/self/ns/cgroup, as the container side
    sees it) instead of creating one, like a runtime told to share the host's cgroup
    namespace. Disputed: §4 "the master shares none of pid/net/uts/ipc/cgroup with them"."""

    engine_name = "blind2-ok-join-own-cgroup"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        if starter_config.flow in ("root", "suid"):
            starter_config.set_ns_path("cgroup", "/proc/self/ns/cgroup")


# --- 6. file descriptors and the system interface ----------------------------------------


class _DupRPC(ReferenceRPC):
    def inspect(self, fd: FileDescriptor) -> int:
        copy = os.dup(fd)
        os.close(fd)
        try:
            return os.fstat(copy).st_mode
        finally:
            os.close(copy)


class DupFdsEngine(ReferenceEngine):
    """SPEC §1: rpc_conn is the engine's socket ("from which the engine builds an RPC client"
    that owns it) -- create_container duplicates it, closes the original at once and works on
    the copy, which it closes when done; it passes a descriptor the RPC server dups and
    closes; the master keeps /dev/null open from create_container to cleanup_container; stage
    2 duplicates master_fd (close-on-exec, like the original) before the exec. Legal."""

    engine_name = "blind2-ok-dup-fds"
    rpc_methods = _DupRPC
    devnull: int | None = None

    def create_container(self, ctx, pid, rpc_conn):
        copy = rpc_conn.dup()
        rpc_conn.close()
        self.devnull = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        with copy:
            ReferenceEngine.create_container(self, ctx, pid, copy)
            RPCClient(copy, self.common.engine_name).inspect(fd=FileDescriptor(self.devnull))

    def cleanup_container(self, ctx, fatal, status):
        if self.devnull is not None:
            os.close(self.devnull)
            self.devnull = None

    def start_process(self, master_fd):
        spare = os.dup(master_fd)  # non-inheritable: closes on exec like master_fd
        assert not os.get_inheritable(spare)
        super().start_process(master_fd)


class _SystemRPC(ReferenceRPC):
    def setup(self, hostname: str | None, proc: bool, tmp: bool) -> dict[str, object]:
        """Everything through kit.system: hostname, mounts, a directory, propagation, lo."""
        sysc = self.system
        if hostname is not None:
            self.sethostname(hostname)
        if proc:
            self._need_namespace("pid", "setup proc")
            self._need_namespace("mount", "setup proc")
            sysc.mount("proc", "/proc", "proc", ["nosuid", "nodev", "noexec"], None)
        looked: dict[str, object] = {"hostname": sysc.gethostname()}
        if tmp:
            self._need_namespace("mount", "setup tmp")
            sysc.mount("tmpfs", "/tmp", "tmpfs", ["nosuid", "nodev"], "mode=1777,size=16m")
            sysc.mkdir("/tmp/work", 0o755)
            sysc.mount("tmpfs", "/tmp/work", "tmpfs", ["nosuid", "nodev"], "size=1m")
            sysc.set_propagation("/tmp/work", "private")
            looked["work"] = sysc.propagation("/tmp/work")
            sysc.umount("/tmp/work")
        cfg = self.engine.common.engine_config  # type: ignore[union-attr]
        if "net" in cfg.namespaces:
            try:
                sysc.link_up("lo")
                looked["lo"] = "up"
            except PermissionError:
                looked["lo"] = "not allowed here"  # optional: a container without lo
        return looked


class KitSystemEngine(ReferenceEngine):
    """SPEC §9: "Engines that do their privileged work through the kit's system interface
    (kit offers mount, umount, pivot_root/chroot, sethostname, mkdir, link-up...) are fully
    checkable in fake mode" -- one RPC method does all of it through kit.system: hostname,
    /proc, a tmpfs /tmp with a directory and a private tmpfs mounted and unmounted in it, and
    lo brought up by link_up where the server may (instead of the starter's loopback); stage
    2 enters its cwd with kit.system's chdir. Legal."""

    engine_name = "blind2-ok-kit-system"
    rpc_methods = _SystemRPC

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        if starter_config.uses_namespace("net"):
            starter_config.set_bring_loopback_interface(False)

    def create_container(self, ctx, pid, rpc_conn):
        cfg: ReferenceConfig = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        looked = rpc.setup(hostname=cfg.hostname, proc=cfg.mount_proc, tmp=cfg.mount_tmp)
        if cfg.hostname is not None:
            assert looked["hostname"] == cfg.hostname, looked

    def start_process(self, master_fd):
        cfg: ReferenceConfig = self.common.engine_config
        system.current().chdir(cfg.cwd)
        os.execve(cfg.argv[0], cfg.argv, cfg.env)


# --- 7. scratch state the run makes and removes, on the host and in the container ----------


class ScratchFilesEngine(ReferenceEngine):
    """SPEC §11: "a run changes nothing on the host that outlives it" (what it makes and
    removes within the run is not forbidden; only hostname and mounts are watched while it
    runs) -- stage 1 writes and deletes a temporary file, the master keeps a temporary
    directory and a POSIX shared-memory segment (/dev/shm) from create_container to
    cleanup_container, which removes both; post_start_process checks the container is alive
    with kill(pid, 0). Legal."""

    engine_name = "blind2-ok-scratch-files"
    rpc_methods = ReferenceRPC
    scratch: str | None = None
    shm: str | None = None

    def prepare_config(self, starter_config):
        with tempfile.NamedTemporaryFile(prefix="engine-stage1-") as f:
            f.write(b"validated\n")
            f.flush()
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        self.scratch = tempfile.mkdtemp(prefix="engine-run-")
        with open(os.path.join(self.scratch, "state.json"), "w") as f:
            f.write(f'{{"pid": {pid}}}\n')
        self.shm = f"/dev/shm/engine-{os.getpid()}"
        fd = os.open(self.shm, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, 4096)
        finally:
            os.close(fd)
        super().create_container(ctx, pid, rpc_conn)

    def post_start_process(self, ctx, pid):
        try:
            os.kill(pid, 0)  # alive? (no signal is sent)
        except ProcessLookupError:
            pass  # already exited: the monitor reports it

    def cleanup_container(self, ctx, fatal, status):
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        if self.shm is not None:
            try:
                os.unlink(self.shm)
            except FileNotFoundError:
                pass
            self.shm = None


class _ContainerStateRPC(ReferenceRPC):
    def tune(self) -> dict[str, str]:
        """Network, sysctl and IPC state inside the container's own namespaces: an address
        and a route (a veth pair where the driver is loaded), ip_forward, a SysV shared
        memory segment and a
        semaphore. Optional: what the server may not do here is skipped."""
        done: dict[str, str] = {}
        cfg = self.engine.common.engine_config  # type: ignore[union-attr]
        if "net" in cfg.namespaces:
            self._need_namespace("net", "tune")
            steps = [
                ["/bin/ip", "link", "set", "lo", "up"],
                ["/bin/ip", "addr", "add", "10.88.0.1/24", "dev", "lo"],
                ["/bin/ip", "route", "add", "10.99.0.0/16", "via", "10.88.0.2", "dev", "lo"],
                # A link of its own where the kernel has the veth driver loaded already.
                ["/bin/ip", "link", "add", "eng0", "type", "veth", "peer", "name", "eng1"],
            ]
            done["net"] = ""
            try:
                for argv in steps:
                    _run_helper(argv, caps=(CAP_NET_ADMIN,))
                    done["net"] += f"{argv[1:4]} "
            except OSError as exc:
                done["net"] += f"then skipped: {exc}"
            try:
                with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                    f.write("1\n")
                done["sysctl"] = "ip_forward=1"
            except OSError as exc:
                done["sysctl"] = f"skipped: {exc}"
        if "ipc" in cfg.namespaces:
            self._need_namespace("ipc", "tune")
            try:
                _run_helper(["/usr/bin/ipcmk", "-M", "4096"])
                _run_helper(["/usr/bin/ipcmk", "-S", "2"])
                done["ipc"] = "shm and sem"
            except OSError as exc:
                done["ipc"] = f"skipped: {exc}"
        return done


class ContainerStateEngine(ReferenceEngine):
    """SPEC §11: the host's "network links, addresses and routes", "sysctls" and "SysV IPC
    objects" must be as before -- the container's own are the engine's: an RPC method
    (inside the container's net and ipc namespaces) adds an address and a route (and a veth
    pair where the driver is loaded), sets ip_forward and creates SysV IPC objects there;
    all die with the namespaces. Legal."""

    engine_name = "blind2-ok-container-state"
    rpc_methods = _ContainerStateRPC

    def create_container(self, ctx, pid, rpc_conn):
        super().create_container(ctx, pid, rpc_conn)
        RPCClient(rpc_conn, self.common.engine_name).tune()


# --- 8. RPC method signatures and registration ------------------------------------------


class _SignatureRPC(ReferenceRPC):
    """Methods of every servable shape: keyword-only parameters with defaults, optional and
    nested types, results of every JSON kind; a class constant and a property (not methods)."""

    API_VERSION = "2"

    @property
    def config(self) -> ReferenceConfig:
        return self.engine.common.engine_config  # type: ignore[union-attr,return-value]

    def configure(
        self,
        *,
        name: str,
        retries: int = 3,
        ratio: float = 0.5,
        tags: list[str] | None = None,
        limits: dict[str, list[int]] | None = None,
        strict: bool = False,
    ) -> dict[str, object]:
        return {
            "name": name,
            "retries": retries,
            "ratio": ratio,
            "tags": tags or [],
            "limits": limits or {},
            "strict": strict,
        }

    def nothing(self) -> None:
        return None

    def truth(self, value: int | None = None) -> bool:
        return value is not None and value > 0

    @staticmethod
    def version() -> str:
        return _SignatureRPC.API_VERSION

    @staticmethod
    def add(a: int, b: int) -> int:
        return a + b


class RPCSignaturesEngine(ReferenceEngine):
    """SPEC §1: "an RPC method whose signature cannot be served is an error at registration"
    (so every servable one is served) and §6: "A request names "<engine>.<method>" and its
    arguments" -- the RPC class has keyword-only parameters with defaults, optional and nested
    types, results of every JSON kind, two static methods, a class constant and a property;
    create_container calls each method, leaving defaults out. Legal."""

    engine_name = "blind2-ok-rpc-signatures"
    rpc_methods = _SignatureRPC

    def create_container(self, ctx, pid, rpc_conn):
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        got = rpc.configure(name="c", limits={"cpu": [1, 2]})
        assert got == {
            "name": "c",
            "retries": 3,
            "ratio": 0.5,
            "tags": [],
            "limits": {"cpu": [1, 2]},
            "strict": False,
        }, got
        assert rpc.nothing() is None
        assert rpc.truth(value=2) is True and rpc.truth() is False
        assert rpc.version() == "2"
        assert rpc.add(a=2, b=3) == 5
        super().create_container(ctx, pid, rpc_conn)


class _InstanceEngine(ReferenceEngine):
    """The reference, registered as one instance made at import (``register_instance``)."""

    def __init__(self) -> None:
        self.created_in = os.getpid()


def register_instance() -> None:
    """README §2: "a registering function" -- registers an Operations *instance* (the registry
    accepts "an Operations subclass ... or an instance"), its RPC methods and capabilities by
    name, as an entry point would: engine blind2-ok-registered-instance. Legal."""
    from conformance import register_capabilities
    from kit.registry import register_operations, register_rpc_methods

    register_operations("blind2-ok-registered-instance", _InstanceEngine())
    register_rpc_methods("blind2-ok-registered-instance", ReferenceRPC)
    register_capabilities("blind2-ok-registered-instance", Capabilities)


# --- 9. stage 2 narrows the payload before the exec, as upstream's StartProcess does ----

_AUDIT_ARCH_X86_64 = 0xC000003E
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
#: kexec_load, init_module, finit_module, delete_module, reboot (x86-64 numbers).
_DENIED_SYSCALLS = (246, 175, 313, 176, 169)


def _deny_filter() -> list[tuple[int, int, int, int]]:
    """A classic BPF seccomp program: EPERM for _DENIED_SYSCALLS on x86-64, allow the rest."""
    n = len(_DENIED_SYSCALLS)
    program = [(0x20, 0, 0, 4), (0x15, 0, n + 1, _AUDIT_ARCH_X86_64), (0x20, 0, 0, 0)]
    for i, nr in enumerate(_DENIED_SYSCALLS):
        program.append((0x15, n - i, 0, nr))  # equal: jump to the EPERM return
    program.append((0x06, 0, 0, _SECCOMP_RET_ALLOW))
    program.append((0x06, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM))
    return program


class Stage2SeccompEngine(ReferenceEngine):
    """SPEC §4, payload row: "as the kernel derives from stage 2 (check: no host privilege in
    every flow but root)" -- like Apptainer's StartProcess, which applies the container's
    seccomp profile in the container process before the exec, start_process loads a
    deny-list filter (kexec, modules, reboot) in every flow; the no_new_privs the filter needs
    is asked of the StarterConfig (set_no_new_privs, every flow), so stage 2 has it when
    start_process begins. Legal. (The first version set no_new_privs itself in start_process:
    PRIV-PAYLOAD-003 failed it in the root flow, the payload's no_new_privs not derived from
    stage 2's at start_process -- see the report: SPEC §4 does not say whether start_process
    may narrow the payload.)"""

    engine_name = "blind2-ok-stage2-seccomp"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        starter_config.set_no_new_privs()

    def start_process(self, master_fd):
        linux.seccomp_install_filter(_deny_filter(), listener=False)
        super().start_process(master_fd)


# --- 10. what runtimes do around the container process ----------------------------------


class Stage2HygieneEngine(ReferenceEngine):
    """SPEC §1: start_process "becomes the payload" and §4 lists what the credential is --
    signal dispositions, the signal mask and close-on-exec flags are not part of it: like
    runc's init, stage 2 resets every catchable signal to its default, unblocks them all and
    marks every descriptor from 3 up close-on-exec before the exec. Legal."""

    engine_name = "blind2-ok-stage2-hygiene"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd):
        for sig in signal.valid_signals():
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # signals Python will not touch (32, 33: glibc's own)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2:
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    pass  # the directory's own descriptor, closed meanwhile
        super().start_process(master_fd)


class CleanupKillsOnFatalEngine(ReferenceEngine):
    """SPEC §2: cleanup_container "tears everything down; must tolerate partial setup", called
    "with the first fatal error (or none) and the wait status" -- on a fatal error with no
    wait status the container may still run, so cleanup_container SIGKILLs it (the monitor
    still reaps it: cleanup never waits); after a normal exit it sends nothing (the pid may be
    reused). Legal."""

    engine_name = "blind2-ok-cleanup-kills-on-fatal"
    rpc_methods = ReferenceRPC
    container_pid: int | None = None

    def create_container(self, ctx, pid, rpc_conn):
        self.container_pid = pid
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(self, ctx, fatal, status):
        if fatal is not None and status is None and self.container_pid is not None:
            try:
                os.kill(self.container_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # gone already


# --- 11. process names, limits and looks at the container ------------------------------


def _rename(name: str) -> None:
    """The calling thread's name (comm), and the process's when it is the main thread."""
    linux.set_name(name[:15])


class _RenamedRPC(ReferenceRPC):
    def __init__(self, engine) -> None:
        super().__init__(engine)
        _rename("engine-rpc")

    def sethostname(self, name: str) -> None:
        _rename("engine-rpc-host")
        super().sethostname(name)


class RenamedProcessesEngine(ReferenceEngine):
    """SPEC §4: the credential is ids, groups, caps, securebits, no_new_privs, seccomp --
    names and resource limits are not part of it: every process renames itself (stage 1,
    the master's hook threads, the RPC server, stage 2), the master turns core dumps off
    and raises its soft descriptor limit, and create_container looks at the container
    through /proc (its status and namespace links, read only). Legal."""

    engine_name = "blind2-ok-renamed-processes"
    rpc_methods = _RenamedRPC

    def prepare_config(self, starter_config):
        _rename("engine-stage1")
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        import resource  # only the master needs it

        _rename("engine-create")
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        with open(f"/proc/{pid}/status") as f:
            assert f.read().startswith("Name:")
        for kind in ("mnt", "uts", "net"):
            try:
                os.readlink(f"/proc/{pid}/ns/{kind}")
            except PermissionError:
                pass  # another user's process (suid master, r=e=U)
        super().create_container(ctx, pid, rpc_conn)

    def monitor_container(self, pid, signals):
        _rename("engine-monitor")
        return super().monitor_container(pid, signals)

    def post_start_process(self, ctx, pid):
        _rename("engine-poststart")

    def cleanup_container(self, ctx, fatal, status):
        _rename("engine-cleanup")

    def start_process(self, master_fd):
        _rename("engine-stage2")
        super().start_process(master_fd)


ENGINES = [
    HostnameBinaryEngine,
    MountBinaryEngine,
    IpLoopbackEngine,
    AsyncioEngine,
    PidfdEngine,
    SelectorMonitorEngine,
    SigchldDrivenMonitorEngine,
    LateMonitorEngine,
    PosixSpawnEngine,
    MasterSubreaperEngine,
    RPCWorkerThreadEngine,
    RPCThreadPoolEngine,
    LargeRPCEngine,
    LoudEngine,
    RichConfigEngine,
    EveryOptionEngine,
    TargetIdsEverywhereEngine,
    MinimalEngine,
    OwnJoinEngine,
    JoinOwnCgroupEngine,
    DupFdsEngine,
    KitSystemEngine,
    ScratchFilesEngine,
    ContainerStateEngine,
    RPCSignaturesEngine,
    Stage2SeccompEngine,
    Stage2HygieneEngine,
    CleanupKillsOnFatalEngine,
    RenamedProcessesEngine,
]


def _register_cooperative(name: str, ops: type[Operations]) -> None:
    """README §4: "register the result under another name to check your error paths"."""
    from conformance.cooperation import cooperative
    from kit.registry import register_operations, register_rpc_methods

    register_operations(name, cooperative(ops))
    methods = getattr(ops, "rpc_methods", None)
    if methods is not None:
        register_rpc_methods(name, methods)


def register_minimal_cooperative() -> None:
    """The minimal engine with the fault and join protocols (its error paths, join-only)."""
    _register_cooperative("blind2-ok-minimal-cooperative", MinimalEngine)


def register_cleanup_kills_cooperative() -> None:
    """The engine whose cleanup kills the container after a fatal error, with its faults."""
    _register_cooperative("blind2-ok-cleanup-kills-cooperative", CleanupKillsOnFatalEngine)


def register_asyncio_cooperative() -> None:
    """The asyncio engine with its faults (its event loops on the error paths)."""
    _register_cooperative("blind2-ok-asyncio-cooperative", AsyncioEngine)
