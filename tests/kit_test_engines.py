"""Engines used by the kit's own tests, loaded by the supervisor as ``kit_test_engines:NAME``.

:class:`FaultEngine` is the reference engine plus one configurable fault: in hook
``fault_hook`` (optionally only in the process ``fault_role``) it does ``fault_action``.
:class:`ReportEngine` writes the kernel's own report of each hooked process (read by
``/bin/cat`` and ``/usr/bin/stat``, separate programs) into ``report_dir``.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from blind_correct import LateEOFEngine

from kit.rpc import RPCClient
from kit.starter.config import StarterConfig
from kit.system import linux
from reference_engines.bind_rootfs import BindRootfsEngine, BindRootfsRPC
from reference_engines.minimal.engine import FORWARDED_SIGNALS, ReferenceConfig, ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC

ROLE_BY_NAME = {
    "kit-stage1": "stage1",
    "kit-master": "master",
    "kit-rpc": "rpc",
    "kit-container": "stage2",
    "kit-stage2": "stage2",
}


def current_role() -> str:
    return ROLE_BY_NAME.get(linux.process_name("self") or "", "unknown")


@dataclass
class FaultConfig(ReferenceConfig):
    fault_hook: str = ""
    fault_action: str = "raise"  # raise | hang | exit | exit0 | child_exits | segv | return |
    # wait_container | leak_*
    fault_role: str = ""
    marker: str = ""  # a file the payload creates (wait_container waits for it), or that
    # hang creates once it hangs (a test waits for it)


def _exit_once_waited_for() -> None:
    """Close every pipe this process can write to and stage 1's channel (the parent reads
    EOF), then exit 7 once the parent sleeps in a wait for it, or 1 once the parent is gone:
    a parent that reads the status without waiting never sees the 7."""
    with contextlib.suppress(AssertionError):
        os.close(_stage1_channel())
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:") and (
                fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
            ):
                os.close(fd)
        except OSError:
            pass  # the listing's own descriptor, gone
    parent = os.getppid()
    deadline = time.monotonic() + 60
    while os.getppid() == parent and time.monotonic() < deadline:
        with open(f"/proc/{parent}/wchan") as f:
            if f.read() == "do_wait":
                os._exit(7)
        time.sleep(0.005)
    os._exit(1)


class FaultEngine(ReferenceEngine):
    engine_name = "test-fault"
    rpc_methods = ReferenceRPC

    def config(self) -> FaultConfig:
        return FaultConfig()

    def _maybe_fault(self, hook: str, cfg: FaultConfig | None = None) -> None:
        cfg = cfg or self.common.engine_config
        if cfg.fault_hook != hook or (cfg.fault_role and cfg.fault_role != current_role()):
            return
        action = cfg.fault_action
        if action == "raise":
            raise RuntimeError(f"injected fault in {hook}")
        if action == "hang":
            if cfg.marker:
                open(cfg.marker, "w").close()
            while True:
                time.sleep(1)
        if action == "exit":
            os._exit(3)
        if action == "exit0":  # ends its process as if all went well
            os._exit(0)
        if action == "close_pipes_exit_waited":  # see _exit_once_waited_for
            _exit_once_waited_for()
        if action == "child_exits":  # a helper the hook forks ends by os._exit, then on
            child = os.fork()
            if child == 0:
                os._exit(0)
            os.waitpid(child, 0)
        if action == "segv":  # a real fault: kills even pid 1 of a pid namespace
            ctypes.string_at(0)
        if action == "wait_container":  # the classic deadlock: wait for the payload
            while not os.path.exists(cfg.marker):
                time.sleep(0.01)
        if action == "leak_process" and os.fork() == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
        if action == "leak_tempdir":
            tempfile.mkdtemp(prefix="leaked-")

    def init_config(self, common, privileged_stage1):  # type: ignore[override]
        super().init_config(common, privileged_stage1)
        self._maybe_fault("init_config")

    def prepare_config(self, starter_config):  # type: ignore[override]
        self._maybe_fault("prepare_config")
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[override]
        self._maybe_fault("create_container")
        super().create_container(ctx, pid, rpc_conn)

    def post_start_process(self, ctx, pid):  # type: ignore[override]
        self._maybe_fault("post_start_process")

    def monitor_container(self, pid, signals):  # type: ignore[override]
        self._maybe_fault("monitor_container")
        return super().monitor_container(pid, signals)

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[override]
        self._maybe_fault("cleanup_container")

    def start_process(self, master_fd):  # type: ignore[override]
        cfg = self.common.engine_config
        if cfg.fault_hook == "start_process" and cfg.fault_action == "return":
            return
        self._maybe_fault("start_process")
        super().start_process(master_fd)


@dataclass
class ReportConfig(ReferenceConfig):
    report_dir: str = ""


class ReportEngine(ReferenceEngine):
    """Writes ``<role>-<hook>.status`` and ``.ns`` files: the kernel's report at the hook."""

    engine_name = "test-report"
    rpc_methods = ReferenceRPC

    def config(self) -> ReportConfig:
        return ReportConfig()

    def _report(self, hook: str) -> None:
        cfg = self.common.engine_config
        base = os.path.join(cfg.report_dir, f"{current_role()}-{hook}")
        pid = os.getpid()
        tid = threading.get_native_id()
        with open(base + ".status", "wb") as out:
            subprocess.run(["/bin/cat", f"/proc/{pid}/task/{tid}/status"], stdout=out, check=True)
        with open(base + ".ns", "wb") as out:
            subprocess.run(
                ["/usr/bin/stat", "-L", "-c", "%n %i"]
                + [
                    f"/proc/{pid}/ns/{n}"
                    for n in ("user", "pid", "net", "uts", "ipc", "cgroup", "mnt")
                ],
                stdout=out,
                stderr=subprocess.DEVNULL,
                check=False,
            )

    def prepare_config(self, starter_config):  # type: ignore[override]
        self._report("prepare_config")
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[override]
        self._report("create_container")
        super().create_container(ctx, pid, rpc_conn)

    def post_start_process(self, ctx, pid):  # type: ignore[override]
        self._report("post_start_process")

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[override]
        self._report("cleanup_container")

    def start_process(self, master_fd):  # type: ignore[override]
        self._report("start_process")
        super().start_process(master_fd)


@dataclass
class JoinConfig(ReferenceConfig):
    join: dict[str, str] = None  # type: ignore[assignment]
    keep_fds: list[int] = None  # type: ignore[assignment]
    start_exit: int = -1  # start_process exits with this code instead of exec'ing
    loopback: bool = False  # asks for lo up in a join-only run too
    #: Numbers at which prepare_config puts a pipe of its own (holding "N\n"), and keeps it.
    stage1_pipes: list[int] = None  # type: ignore[assignment]
    #: Numbers prepare_config closes (descriptors the run inherited).
    stage1_closes: list[int] = None  # type: ignore[assignment]


class JoinEngine(ReferenceEngine):
    """Join-only runs (``join`` = kind → path) and kept file descriptors."""

    engine_name = "test-join"
    rpc_methods = ReferenceRPC

    def config(self) -> JoinConfig:
        cfg = JoinConfig()
        cfg.join, cfg.keep_fds, cfg.stage1_pipes, cfg.stage1_closes = {}, [], [], []
        return cfg

    def prepare_config(self, starter_config):  # type: ignore[override]
        cfg = self.common.engine_config
        if cfg.join:
            starter_config.set_namespace_join_only()
            for kind, path in cfg.join.items():
                starter_config.set_ns_path(kind, path)
            if cfg.loopback:
                starter_config.set_bring_loopback_interface()
        else:
            super().prepare_config(starter_config)
        for number in cfg.stage1_pipes:
            r, w = os.pipe()
            os.write(w, f"{number}\n".encode())
            os.close(w)
            if r != number:
                os.dup2(r, number)
                os.close(r)
            starter_config.keep_file_descriptor(number)
        for number in cfg.stage1_closes:
            os.close(number)
        for fd in cfg.keep_fds:
            starter_config.keep_file_descriptor(fd)

    def start_process(self, master_fd):  # type: ignore[override]
        if self.common.engine_config.start_exit >= 0:
            os._exit(self.common.engine_config.start_exit)
        super().start_process(master_fd)


@dataclass
class MapsConfig(ReferenceConfig):
    uid_map: list[list[int]] = None  # type: ignore[assignment]  # in place of the reference's


class MapsEngine(ReferenceEngine):
    """The reference engine with the uid map of ``uid_map`` (a user namespace flow)."""

    engine_name = "test-maps"
    rpc_methods = ReferenceRPC

    def config(self) -> MapsConfig:
        return MapsConfig()

    def prepare_config(self, starter_config):  # type: ignore[override]
        super().prepare_config(starter_config)
        if self.common.engine_config.uid_map is not None:
            starter_config._s.uid_mappings = []  # no setter takes a mapping back
            starter_config.add_uid_mappings(self.common.engine_config.uid_map)


class BrokenConfigEngine(ReferenceEngine):
    """Leaves a StarterConfig that only a kit bug would make: a capability set that is a
    number, past every setter's check. The starter's config check then fails unforeseen."""

    engine_name = "test-broken-config"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[override]
        super().prepare_config(starter_config)
        starter_config._s.capabilities["effective"] = 5


@dataclass
class CapsConfig(ReferenceConfig):
    caps: dict[str, list[str]] = None  # type: ignore[assignment]
    propagation: str = "rprivate"


class CapsEngine(ReferenceEngine):
    """The reference engine with every capability set and the propagation configurable."""

    engine_name = "test-caps"
    rpc_methods = ReferenceRPC

    def config(self) -> CapsConfig:
        cfg = CapsConfig()
        cfg.caps = {}
        return cfg

    def prepare_config(self, starter_config):  # type: ignore[override]
        super().prepare_config(starter_config)
        cfg = self.common.engine_config
        for kind, names in cfg.caps.items():
            starter_config.set_capabilities(kind, names)
        starter_config.set_mount_propagation(cfg.propagation)


class ClosesItsRPCClientEngine(ReferenceEngine):
    """SPEC §1: create_container builds its RPC client from rpc_conn and closes it when done
    (a ``with`` block: the kit's client owns the socket and closes it). Legal."""

    engine_name = "test-closes-its-rpc-client"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        from kit.rpc import RPCClient

        cfg = self.common.engine_config
        with RPCClient(rpc_conn, self.common.engine_name) as rpc:
            if cfg.hostname is not None:
                rpc.sethostname(name=cfg.hostname)
            self.prepare_rootfs(rpc, cfg)
        assert rpc_conn.fileno() == -1  # closed with its client


class ClosesItsRPCClientThenForksEngine(ClosesItsRPCClientEngine):
    """Closes its RPC client, then forks a helper (no exec) that outlives create_container
    a moment: the helper holds only the kit's own copies of the connection, inherited by the
    fork, not rpc_conn. Legal (no RPC-001)."""

    engine_name = "test-closes-its-rpc-client-then-forks"

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        super().create_container(ctx, pid, rpc_conn)
        if os.fork() == 0:
            time.sleep(0.3)
            os._exit(0)


class PidfdMonitorEngine(ReferenceEngine):
    """The reference engine with a correct monitor of another shape: it waits on a pidfd and
    reaps the container the moment it exits, without waiting for the signals channel."""

    engine_name = "test-pidfd-monitor"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        pidfd = os.pidfd_open(pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while not poller.poll(5):
                while not signals.empty():
                    sig = signals.get(timeout=0)
                    if sig in FORWARDED_SIGNALS:
                        os.kill(pid, sig)
            return os.waitpid(pid, 0)[1]
        finally:
            os.close(pidfd)


class GreedyReaperEngine(ReferenceEngine):
    """The reference engine whose monitor polls ``waitpid(pid, WNOHANG)`` in a busy loop and
    keeps the GIL for a second at a time (``sys.setswitchinterval``): the master's start
    waiter, woken by the exec, cannot read the container's name before the monitor could
    reap it. Its poll is its own choice; the run must still see the exec. ``shape``: the
    wait call it reaps with."""

    engine_name = "test-greedy-reaper"
    rpc_methods = ReferenceRPC
    shape = "waitpid"

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        import sys

        sys.setswitchinterval(1.0)
        while True:
            while not signals.empty():
                sig = signals.get(timeout=0)
                if sig in FORWARDED_SIGNALS:
                    os.kill(pid, sig)
            if self.shape == "waitid":
                found = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
                if found is not None:
                    if found.si_code == os.CLD_EXITED:
                        return found.si_status << 8
                    return found.si_status  # killed: the signal's number
            else:
                wait = os.wait4 if self.shape == "wait4" else os.waitpid
                got = wait(pid, os.WNOHANG)
                if got[0] == pid:
                    return got[1]


class GreedyWait4ReaperEngine(GreedyReaperEngine):
    engine_name = "test-greedy-reaper-wait4"
    shape = "wait4"


class GreedyWaitidReaperEngine(GreedyReaperEngine):
    engine_name = "test-greedy-reaper-waitid"
    shape = "waitid"


class _FlowSeenAsSuid:
    """A StarterConfig whose ``flow`` reads "suid" in the hybrid flow: the engine asks for
    what the suid flow asks for (no user namespace, no hybrid workflow)."""

    def __init__(self, real: StarterConfig) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    @property
    def flow(self) -> str:
        return "suid" if self._real.flow == "hybrid" else self._real.flow


class HybridAsSuidEngine(ReferenceEngine):
    """In the hybrid flow, asks for no user namespace (as in suid): the container side and
    the RPC server stay in the host user namespace, where the setuid starter left them with
    an effective uid 0."""

    engine_name = "test-hybrid-as-suid"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(_FlowSeenAsSuid(starter_config))  # type: ignore[arg-type]


class RefusedCallsEngine(ReferenceEngine):
    """Before its own calls, create_container makes two the RPC server refuses before any
    method runs (an unknown method, an unknown argument) and takes their errors
    (UnknownMethodError, TypeError): legal."""

    engine_name = "test-refused-calls"
    rpc_methods = ReferenceRPC

    def prepare_rootfs(self, rpc: RPCClient, cfg: ReferenceConfig) -> None:
        with contextlib.suppress(Exception):
            rpc.call("no_such_method")
        with contextlib.suppress(Exception):
            rpc.call("sethostname", name="x", colour="blue")
        super().prepare_rootfs(rpc, cfg)


class CleanupCallsPostStartEngine(ReferenceEngine):
    """cleanup_container calls the engine's own post_start_process (an ORDER bug, not a
    reap): after the master reaped its sentinel, the hook's end is the engine's call."""

    engine_name = "test-cleanup-calls-post-start"
    rpc_methods = ReferenceRPC

    def cleanup_container(self, ctx: Any, fatal: BaseException | None, status: int | None) -> None:
        self.post_start_process(ctx, 0)
        super().cleanup_container(ctx, fatal, status)


def _state(pid: int) -> str:
    """The state letter of process ``pid`` ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (SigCgt of its status)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) & 1 << (signum - 1))


class MergedSigchldEngine(ReferenceEngine):
    """post_start_process makes the container's SIGCHLD merge into another child's: with
    the GIL held (ctypes.PyDLL calls keep it) until the container has exited, a helper
    exits and then another tells the payload to exit (SIGUSR1, which it traps): the
    master's loop cannot read the first helper's SIGCHLD before the container's merges into
    it (standard signals do not queue). Legal: a hook may start and reap children."""

    engine_name = "test-merged-sigchld"
    rpc_methods = ReferenceRPC

    def post_start_process(self, ctx: Any, pid: int) -> None:
        super().post_start_process(ctx, pid)
        while not _catches(pid, signal.SIGUSR1):  # the payload's trap is set
            time.sleep(0.005)
        held = ctypes.PyDLL(None, use_errno=True)  # calls that keep the GIL
        # Both helpers act while this thread holds the GIL: the first exits, then the
        # second, once the first is a zombie, makes the payload exit (and exits). The GIL
        # is let go once the container is a zombie too (peeked at, not reaped).
        first = os.fork()
        if first == 0:
            time.sleep(0.05)
            os._exit(0)
        second = os.fork()
        if second == 0:
            while _state(first) != "Z":
                time.sleep(0.005)
            os.kill(pid, signal.SIGUSR1)
            os._exit(0)
        # One call, not a loop: between two calls the interpreter hands the GIL over to a
        # thread that waited for it (the master's loop, with the first SIGCHLD to read).
        info = ctypes.create_string_buffer(128)
        held.waitid(1, pid, info, os.WEXITED | os.WNOWAIT)  # P_PID; the zombie stays
        for helper in (first, second):
            os.waitpid(helper, 0)


class KeepsTheLedgerSocketEngine(ReferenceEngine):
    """Keeps every socket open in stage 1 for the payload ("socket activation"): the only
    one there is the kit's ledger socket."""

    engine_name = "test-keeps-the-ledger-socket"
    rpc_methods = ReferenceRPC
    #: What the descriptors it keeps are (the start of their /proc/self/fd link).
    keeps = "socket:"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if int(name) > 2 and os.readlink(f"/proc/self/fd/{name}").startswith(self.keeps):
                    starter_config.keep_file_descriptor(int(name))


class KeepsEveryPipeEngine(KeepsTheLedgerSocketEngine):
    """Keeps every pipe open in stage 1 for the payload: unsandboxed, the supervisor's
    result pipe is one of them."""

    engine_name = "test-keeps-every-pipe"
    keeps = "pipe:"


class NoCapabilitiesConfiguredEngine(ReferenceEngine):
    """The reference engine that never calls ``set_capabilities``: every set is unset, which
    SPEC §5 says means empty at exec, the bounding set included."""

    engine_name = "test-no-caps-configured"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        starter_config.set_capabilities = lambda kind, names: None
        try:
            super().prepare_config(starter_config)
        finally:
            del starter_config.set_capabilities


class BindRootEngine(BindRootfsEngine):
    """The bind-rootfs example engine (``reference-bind``), named by import path."""

    engine_name = "test-bind-root"
    rpc_methods = BindRootfsRPC


# --- hostile engine code: forged ledger datagrams, hostile RPC replies ---------------------


def _ledger_writer():
    """The kit's ledger writer of this process, found the way hostile engine code would."""
    import gc

    from kit.ledger.record import LedgerWriter

    return next(o for o in gc.get_objects() if isinstance(o, LedgerWriter) and o.sock is not None)


def _event(role: str, kind: str, **fields) -> bytes:
    import json

    return json.dumps(
        {
            "t": time.monotonic_ns(),
            "kind": kind,
            "role": role,
            "pid": os.getpid(),
            "tid": threading.get_native_id(),
            **fields,
        }
    ).encode()


def hostile_datagram(name: str, role: str) -> bytes:
    """The datagram ``name`` as the process in ``role`` would forge it."""
    hook = {"kind": "hook_enter", "hook": "create_container", "snapshot": None}
    table = {
        "list_hook": lambda: b'{"kind": "hook_enter", "hook": ["x"]}',
        "list_hook_full": lambda: _event(role, "hook_enter", hook=["x"], args={}),
        "not_json": lambda: b"\xff\xfe{ not json",
        "deep": lambda: b"[" * 100_000,
        "empty": lambda: b"",
        "oversized": lambda: _event(role, "stage2_failed", message="x" * (2 << 20)),
        "nan": lambda: _event(role, "rpc_call", ok=True).replace(b"}", b',"duration_ms":NaN}'),
        "unknown_kind": lambda: _event(role, "coffee"),
        "supervisor_kind": lambda: _event(role, "exit", code=0, reason="exited"),
        # An empty host diff sent early would hide the supervisor's, which comes last.
        "forged_host_changes": lambda: _event(
            role, "host_changes", changes=[], omitted=0, errors={}, looks=1, cost_ms=0
        ),
        "forged_seccomp_filter": lambda: _event(role, "seccomp_filter", filter="none"),
        "forged_syscall_refused": lambda: _event(role, "syscall_refused", syscall="x"),
        "forged_syscalls_unrecorded": lambda: _event(role, "syscalls_unrecorded", count=0),
        "extra_key": lambda: _event(role, "stage2_exec", bogus=1),
        "bad_type": lambda: _event(role, "process_exit", child_role="rpc", child_pid="1"),
        "other_role": lambda: _event(
            "supervisor" if role == "rpc" else "rpc", "starter_error", stage="x", message="forged"
        ),
        "other_pid": lambda: _event(role, "starter_error", stage="x", message="forged").replace(
            f'"pid": {os.getpid()},'.encode(), f'"pid": {os.getpid() + 7},'.encode()
        ),
        "bare_hook": lambda: _event(role, **hook)[:-1] + b', "args": {}}',
    }
    return table[name]()


def send_hostile(name: str, role: str) -> None:
    sock = _ledger_writer().sock
    if name.startswith("helper_"):  # a child of engine code posing as a kit process
        claimed = name.removeprefix("helper_")
        ready_r, ready_w = os.pipe()
        if os.fork() == 0:
            try:  # stays until its parent ends (the kit's leak check waits for that)
                linux.set_parent_death_signal(9)
                sock.send(_event(claimed, "process_start", ppid=os.getppid(), nspid=[os.getpid()]))
                os.close(ready_w)
                while True:
                    time.sleep(1)
            finally:
                os._exit(0)
        os.close(ready_w)
        os.read(ready_r, 1)  # sent
        os.close(ready_r)
        return
    if name == "flood":  # more faults than a run records
        for _ in range(150):
            sock.send(b"{")
        return
    if name == "full_pipe":  # a "confirmation pipe" the supervisor could block on
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            while True:
                os.write(w, b"x" * 65536)
        except BlockingIOError:
            pass
        import array
        import socket as socket_module

        sock.sendmsg(
            [_event(role, "stage2_exec")],
            [(socket_module.SOL_SOCKET, socket_module.SCM_RIGHTS, array.array("i", [w, w]))],
        )
        os.close(w)
        os.close(r)
        return
    sock.send(hostile_datagram(name, role))


def fake_probe(how: str) -> None:
    """Engine code lying about its privileges in the kit's own snapshots, from inside."""
    from kit.ledger import probe
    from kit.ledger.record import LedgerWriter

    if how == "unconfirmed":
        for writer in (o for o in __import__("gc").get_objects() if isinstance(o, LedgerWriter)):
            writer.confirm = False
        return
    real = probe.snapshot
    lies = [1 if how == "caps-once" else -1]  # how many snapshots to fake (-1: all)

    def innocent(*args: object, **kwargs: object) -> dict:
        snap = real(*args, **kwargs)
        if lies[0] == 0:
            return snap
        lies[0] -= 1
        for thread in snap["threads"]:
            thread["caps"] = {k: [] for k in thread["caps"]}
        return snap

    probe.snapshot = innocent


@dataclass
class HostileConfig(ReferenceConfig):
    hostile_hook: str = "create_container"
    hostile_role: str = ""  # only in this process (stage1, master, rpc, stage2)
    datagram: str = ""  # a name of hostile_datagram (or helper_<role>)
    rpc_calls: list[str] = None  # type: ignore[assignment]  # HostileRPC methods to call
    leak_tempdir: bool = False  # the leak checks must still see this
    out: str = ""  # create_container appends what each RPC call gave here
    die: str = ""  # container | rpc: killed during create_container, which then waits
    fake_probe: str = ""  # in create_container: "caps" fakes the snapshots ("caps-once": the
    # next one only), "unconfirmed"
    # sends them without waiting for the supervisor's outside check


class HostileRPC(ReferenceRPC):
    """RPC methods whose replies the server must turn into error replies."""

    def hostile_send(self, name: str) -> None:
        send_hostile(name, "rpc")

    def exits(self) -> None:
        raise SystemExit(3)

    def interrupted(self) -> None:
        raise KeyboardInterrupt

    def own_connection(self) -> int:
        import gc

        from kit.rpc.methods import WithFds

        server = next(o for o in gc.get_objects() if type(o).__name__ == "RPCServerProcess")
        return WithFds(0, [server.c.rpc_sock.fileno()])  # type: ignore[return-value]

    def ledger_dup(self) -> int:
        from kit.rpc.methods import WithFds

        return WithFds(0, [os.dup(_ledger_writer().sock.fileno())])  # type: ignore

    def int_keys(self) -> dict:
        return {1: "c"}  # an int key: JSON objects have str keys only

    def alive(self) -> str:
        return "yes"

    def umask(self, name: str) -> int:
        # the RPC server shares root, cwd and umask with the container process (CLONE_FS)
        return os.umask(int(name, 8))

    def exit_soon(self) -> None:
        threading.Timer(0.05, os._exit, (7,)).start()


class HostileEngine(ReferenceEngine):
    """The reference engine plus hostile engine code (see :class:`HostileConfig`)."""

    engine_name = "test-hostile"
    rpc_methods = HostileRPC

    def config(self) -> HostileConfig:
        cfg = HostileConfig()
        cfg.rpc_calls = []
        return cfg

    def _hostile(self, hook: str) -> None:
        cfg = self.common.engine_config
        if cfg.hostile_hook != hook or not cfg.datagram:
            return
        if cfg.hostile_role and cfg.hostile_role != current_role():
            return
        send_hostile(cfg.datagram, current_role())

    def init_config(self, common, privileged_stage1):  # type: ignore[override]
        super().init_config(common, privileged_stage1)
        self._hostile("init_config")

    def prepare_config(self, starter_config):  # type: ignore[override]
        self._hostile("prepare_config")
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[override]
        from kit.rpc import RPCClient

        self._hostile("create_container")
        cfg = self.common.engine_config
        if cfg.fake_probe:
            fake_probe(cfg.fake_probe)
        if cfg.leak_tempdir:
            tempfile.mkdtemp(prefix="hostile-")
        super().create_container(ctx, pid, rpc_conn)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        replies = []
        for name in cfg.rpc_calls:
            method, _, arg = name.partition(":")
            try:
                value = rpc.call(method, **({"name": arg} if arg else {}))
                replies.append(f"{method}: returned {value!r}")
            except Exception as exc:
                replies.append(f"{method}: {type(exc).__name__}: {exc}")
            replies.append(f"alive: {rpc.call('alive')}")  # the server goes on
        if cfg.die:
            self._die(cfg, ctx, pid, rpc)
        if replies and cfg.out:
            with open(cfg.out, "a") as f:
                f.write("".join(line + "\n" for line in replies))

    def _die(self, cfg: HostileConfig, ctx, pid: int, rpc) -> None:
        """Kill the container or the RPC server, then wait as a hook would: the kit must
        cancel ctx at once and fail the next call at once."""
        if cfg.die == "container":
            os.kill(pid, 9)
        else:
            rpc.call("exit_soon")
        start = time.monotonic()
        cancelled = ctx.wait(30)
        waited = time.monotonic() - start
        try:
            rpc.call("alive")
            call = "answered"
        except Exception as exc:
            call = f"{type(exc).__name__}"
        call_took = time.monotonic() - start - waited
        with open(cfg.out, "a") as f:
            f.write(f"{cancelled} {waited:.3f} {call_took:.3f} {call}\n{ctx.reason}\n")
        raise RuntimeError(f"creation interrupted: {ctx.reason}")

    def post_start_process(self, ctx, pid):  # type: ignore[override]
        self._hostile("post_start_process")

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[override]
        self._hostile("cleanup_container")

    def start_process(self, master_fd):  # type: ignore[override]
        self._hostile("start_process")
        super().start_process(master_fd)


@dataclass
class HostAttackConfig(ReferenceConfig):
    """What :class:`HostAttackEngine` tries, where, and against which host objects."""

    acts: list[str] = None  # type: ignore[assignment]  # names of HostAttackEngine.ACTS
    hostile_hook: str = "create_container"
    hostile_role: str = "master"
    then: str = ""  # after the acts: "" (go on) | hang | segv
    unique: str = ""  # the file /etc/<unique>; the hostname hostile-<unique>
    umount_path: str = ""
    remount_path: str = ""
    tmpfs_path: str = ""
    victim_pid: int = 0
    report_dir: str = ""  # <role>-<hook>.json: each act's outcome ("done" or the errno name)
    write_paths: list[str] = None  # type: ignore[assignment]  # each written (write_paths)
    delete_paths: list[str] = None  # type: ignore[assignment]  # each removed (delete_paths)
    read_only_path: str = ""  # a file to write in a host mount the sandbox binds read-only


#: The comm of every process of the hostile engine's re-forking daemon.
DAEMON_NAME = "kit-hostile-d"


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _reforking_daemon(report_dir: str) -> None:
    """Detach, then keep forking a successor and exiting: no pid lives long."""
    if os.fork() != 0:
        return
    try:
        os.setsid()
        linux.set_name(DAEMON_NAME)
        for fd in range(3, 1024):
            try:
                os.close(fd)
            except OSError:
                pass
        while True:
            if os.fork() != 0:
                os._exit(0)
            time.sleep(0.002)
    except BaseException as exc:
        _write(os.path.join(report_dir, "daemon.error"), repr(exc))
    finally:
        os._exit(1)


#: ioctl_ns(2): the owning user namespace, the parent (pid and user namespaces).
_NS_GET_USERNS, _NS_GET_PARENT = 0xB701, 0xB702


def _namespace_files() -> list[str]:
    """Every path of the run's view that may be a namespace file: /proc/*/ns/*, the fds and
    threads of every process it sees, and all of /dev (links followed by the stat)."""
    paths = []
    for pid in (n for n in os.listdir("/proc") if n.isdigit()):
        for sub in ("ns", "fd"):
            try:
                paths += [f"/proc/{pid}/{sub}/{n}" for n in os.listdir(f"/proc/{pid}/{sub}")]
            except OSError:
                pass
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                paths += [
                    f"/proc/{pid}/task/{tid}/ns/{n}"
                    for n in os.listdir(f"/proc/{pid}/task/{tid}/ns")
                ]
        except OSError:
            pass
    for top, dirs, files in os.walk("/dev"):
        paths += [os.path.join(top, n) for n in dirs + files]
    return paths


def _hide_upper(unique: str) -> None:
    """Remove /etc/<unique> from the root's upper layer through a descriptor, root or cwd of
    the sandbox's init: the file would stay in the run's view but leave the host diff.
    ENOENT when no such way leads to the scratch tmpfs."""
    ways = ["/proc/1/root", "/proc/1/cwd"]
    with contextlib.suppress(OSError):
        ways += [f"/proc/1/fd/{fd}" for fd in os.listdir("/proc/1/fd")]
    removed = []
    for way in ways:
        # Wherever /etc is: in the root's upper layer, or a layer of its own (cow/<n>/upper).
        for upper in glob.glob(f"{way}/cow/*/upper/**/{unique}", recursive=True):
            with contextlib.suppress(OSError):
                os.unlink(upper)
                removed.append(upper)
    if not removed:
        raise FileNotFoundError(errno.ENOENT, "no way to the upper layers")


def _ns_escape(report_dir: str) -> None:
    """Try to enter every namespace a path leads to (and each one's owner and parent, by
    ioctl): each setns in a child of its own. Report the inodes of those entered."""
    nsfs = os.stat("/proc/self/ns/uts").st_dev
    fds: dict[int, int] = {}  # inode -> fd: each namespace once
    for path in _namespace_files():
        try:
            st = os.stat(path)
            if st.st_dev == nsfs and st.st_ino not in fds:
                fds[st.st_ino] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass
    import fcntl

    for fd in list(fds.values()):
        for request in (_NS_GET_USERNS, _NS_GET_PARENT):
            try:
                found = fcntl.ioctl(fd, request)
            except OSError:
                continue
            if os.fstat(found).st_ino in fds:
                os.close(found)
            else:
                fds[os.fstat(found).st_ino] = found
    entered, refused = set(), 0
    for fd in fds.values():
        pid = os.fork()
        if pid == 0:
            os._exit(0 if _libc.setns(fd, 0) == 0 else 1)
        _, status = os.waitpid(pid, 0)
        if status == 0:
            entered.add(os.fstat(fd).st_ino)
        else:
            refused += 1
    for fd in fds.values():
        os.close(fd)
    _write(
        os.path.join(report_dir, "ns-escape.json"),
        json.dumps({"tried": len(fds), "refused": refused, "entered": sorted(entered)}),
    )


class HostAttackEngine(ReferenceEngine):
    """The reference engine that, in one hook and process, tries to change the host: each
    act of ``acts`` in turn (its outcome recorded in ``report_dir``), then ``then``."""

    engine_name = "test-host-attack"
    rpc_methods = ReferenceRPC
    ACTS: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "write_etc": lambda c: _write(f"/etc/{c.unique}", "hostile\n"),
        "hide_upper": lambda c: _hide_upper(c.unique),
        "write_paths": lambda c: [_write(path, "hostile\n") for path in c.write_paths],
        "delete_paths": lambda c: [os.unlink(path) for path in c.delete_paths],
        "write_read_only": lambda c: _write(c.read_only_path, "hostile\n"),
        "init_fds": lambda c: _write(
            os.path.join(c.report_dir, "init_fds"), json.dumps(sorted(os.listdir("/proc/1/fd")))
        ),
        "mountinfo": lambda c: shutil.copyfile(
            "/proc/self/mountinfo", os.path.join(c.report_dir, "mountinfo")
        ),
        "umount": lambda c: linux.umount(c.umount_path),
        "remount_ro": lambda c: linux.mount(
            None, c.remount_path, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY
        ),
        "mount_tmpfs": lambda c: linux.mount("tmpfs", c.tmpfs_path, "tmpfs", 0, "size=64k"),
        "hostname": lambda c: socket.sethostname(f"hostile-{c.unique}"),
        "sysctl_net": lambda c: _write("/proc/sys/net/ipv4/ip_forward", "1\n"),
        "sysctl_vm": lambda c: _write("/proc/sys/vm/stat_interval", "7\n"),
        "daemon": lambda c: _reforking_daemon(c.report_dir),
        "kill": lambda c: os.kill(c.victim_pid, 9),
        "ns_escape": lambda c: _ns_escape(c.report_dir),
    }

    def config(self) -> HostAttackConfig:
        cfg = HostAttackConfig()
        cfg.acts, cfg.write_paths, cfg.delete_paths = [], [], []
        return cfg

    def _attack(self, hook: str, cfg: HostAttackConfig | None = None) -> None:
        cfg = cfg or self.common.engine_config
        if cfg.hostile_hook != hook or cfg.hostile_role != current_role():
            return
        outcomes = {}
        for act in cfg.acts:
            try:
                self.ACTS[act](cfg)
                outcomes[act] = "done"
            except OSError as exc:
                outcomes[act] = errno.errorcode.get(exc.errno or 0, str(exc))
        if cfg.report_dir:
            _write(
                os.path.join(cfg.report_dir, f"{current_role()}-{hook}.json"), json.dumps(outcomes)
            )
        if cfg.then == "hang":
            while True:
                time.sleep(1)
        if cfg.then == "segv":
            ctypes.string_at(0)

    def prepare_config(self, starter_config):  # type: ignore[override]
        self._attack("prepare_config")
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[override]
        self._attack("create_container")
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[override]
        self._attack("cleanup_container")
        super().cleanup_container(ctx, fatal, status)


# --- bypassing the system interface (kit/run/seccomp.py) ---------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
#: A mount point that does not exist: a mount that reached the kernel would fail (ENOENT),
#: never mount anything.
NO_SUCH_PATH = b"/nonexistent-kit-bypass-target"


def _errno_of(call) -> int:  # type: ignore[no-untyped-def]
    """0 when ``call`` succeeded, else the errno it failed with."""
    try:
        result = call()
    except OSError as exc:
        return exc.errno or -1
    if isinstance(result, int) and result < 0:
        return ctypes.get_errno()
    return 0


def _lo_flags_as_they_are() -> None:
    """SIOCSIFFLAGS on lo with the flags it has (kit.system's link_up done by hand)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = linux.link_flags("lo")
        fcntl.ioctl(sock.fileno(), linux.SIOCSIFFLAGS, linux._ifreq("lo", flags))


#: Each call is harmless if it ever reached the kernel: the host's own hostname, setresuid
#: that keeps every id, chroot to /, a mount on a missing path, a uts namespace of the
#: calling process only, lo's own flags, swapoff of a missing file, removing a module that
#: does not exist.
BYPASS_CALLS = {
    "sethostname": lambda: socket.sethostname(socket.gethostname()),
    "setresuid": lambda: os.setresuid(-1, -1, -1),
    "chroot": lambda: os.chroot("/"),
    "mount": lambda: _libc.mount(b"none", NO_SUCH_PATH, b"tmpfs", ctypes.c_ulong(0), None),
    "unshare": lambda: _libc.unshare(ctypes.c_int(linux.CLONE_NEWUTS)),
    "ioctl": _lo_flags_as_they_are,
    "swapoff": lambda: _libc.swapoff(NO_SUCH_PATH),
    "delete_module": lambda: _libc.syscall(
        ctypes.c_long(176), b"kit_no_such_module", ctypes.c_uint(os.O_NONBLOCK)
    ),
}
SYSTEM_INTERFACE_CALLS = ["sethostname", "setresuid", "chroot", "mount", "unshare", "ioctl"]


def bypass(calls: list[str], where: str, report_dir: str) -> dict[str, int]:
    """Make each call directly (not through kit.system); errno by call, also written to
    ``report_dir/<where>.json`` when a directory is given."""
    out = {call: _errno_of(BYPASS_CALLS[call]) for call in calls}
    if report_dir:  # with the process's real no_new_privs (the kit's filter may set it)
        nnp = int(linux.read_status().get("NoNewPrivs", "-1"))
        with open(os.path.join(report_dir, f"{where}.json"), "w") as f:
            json.dump({"errno": out, "no_new_privs": nnp}, f)
    return out


@dataclass
class BypassConfig(ReferenceConfig):
    #: hook name (or "rpc" for an RPC method called from create_container) -> calls.
    bypass: dict[str, list[str]] = None  # type: ignore[assignment]
    report_dir: str = ""


class BypassRPC(ReferenceRPC):
    def bypass(self, calls: list[str]) -> dict[str, int]:
        cfg = self.engine.common.engine_config
        return bypass(calls, "rpc-bypass", cfg.report_dir)


class BypassEngine(ReferenceEngine):
    """The reference engine, plus privileged calls made directly from its hooks and from an
    RPC method (by default: sethostname in create_container, chroot in the RPC method)."""

    engine_name = "test-bypass"
    rpc_methods = BypassRPC

    def config(self) -> BypassConfig:
        cfg = BypassConfig()
        cfg.bypass = {"create_container": ["sethostname"], "rpc": ["chroot"]}
        return cfg

    def _bypass(self, hook: str, cfg: BypassConfig | None = None) -> None:
        cfg = cfg or self.common.engine_config
        if cfg.bypass.get(hook):
            bypass(cfg.bypass[hook], f"{current_role()}-{hook}", cfg.report_dir)

    def prepare_config(self, starter_config):  # type: ignore[override]
        self._bypass("prepare_config")
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[override]
        self._bypass("create_container")
        cfg = self.common.engine_config
        if cfg.bypass.get("rpc"):
            from kit.rpc import RPCClient

            RPCClient(rpc_conn, self.common.engine_name).bypass(calls=cfg.bypass["rpc"])
        super().create_container(ctx, pid, rpc_conn)

    def post_start_process(self, ctx, pid):  # type: ignore[override]
        self._bypass("post_start_process")

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[override]
        self._bypass("cleanup_container")

    def start_process(self, master_fd):  # type: ignore[override]
        self._bypass("start_process")
        super().start_process(master_fd)


class HostGlobalEngine(BypassEngine):
    """Host-global calls only (safe in the real backend): swapoff of a missing file in
    create_container, removing a missing module in an RPC method."""

    engine_name = "test-host-global"
    rpc_methods = BypassRPC

    def config(self) -> BypassConfig:
        cfg = BypassConfig()
        cfg.bypass = {"create_container": ["swapoff"], "rpc": ["delete_module"]}
        return cfg


@dataclass
class SlowCleanupConfig(ReferenceConfig):
    marker: str = ""  # created once cleanup_container is open
    release: str = ""  # cleanup_container returns once this exists (or after 30 s)


class SlowCleanupEngine(ReferenceEngine):
    """A cleanup_container that stays open until the test lets it go."""

    engine_name = "test-slow-cleanup"
    rpc_methods = ReferenceRPC

    def config(self) -> SlowCleanupConfig:
        return SlowCleanupConfig()

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[override]
        cfg = self.common.engine_config
        open(cfg.marker, "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(cfg.release) and time.monotonic() < deadline:
            time.sleep(0.01)


def signalfds() -> list[int]:
    """The numbers of every signalfd of this process (the master's: the kit's own)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            with open(f"/proc/self/fdinfo/{name}") as f:
                info = f.read()
        except OSError:
            continue  # the listing's own descriptor, gone
        if "sigmask:" in info:
            found.append(int(name))
    return found


def close_signalfds() -> list[int]:
    """Close every signalfd of this process; their numbers."""
    closed = signalfds()
    for fd in closed:
        os.close(fd)
    return closed


@dataclass
class FdCloserConfig(ReferenceConfig):
    close_in: str = "create_container"  # the master's hook that closes the kit's signalfd


class FdCloserEngine(ReferenceEngine):
    """Closes the master's signalfd (a descriptor the kit opened) in one of its hooks."""

    engine_name = "test-fd-closer"
    rpc_methods = ReferenceRPC

    def config(self) -> FdCloserConfig:
        return FdCloserConfig()

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[override]
        if self.common.engine_config.close_in == "create_container":
            close_signalfds()
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[override]
        if self.common.engine_config.close_in == "cleanup_container":
            close_signalfds()


#: The processes (by name) where WhereConfig's field types were evaluated: a forked process
#: inherits the list, and with it where its copy of the resolved types came from.
RESOLVED_IN: list[str] = []


def _note_where() -> bool:
    RESOLVED_IN.append(linux.process_name("self") or "?")
    return True


@dataclass
class WhereConfig(ReferenceConfig):
    report: str = ""  # the master writes RESOLVED_IN here (JSON)
    # An annotation with a side effect: resolving it notes the process that does.
    noted: _note_where() and int = 0  # type: ignore[valid-type]


class WhereEngine(ReferenceEngine):
    """Reports where the field types of its config were resolved."""

    engine_name = "test-where"
    rpc_methods = ReferenceRPC

    def config(self) -> WhereConfig:
        return WhereConfig()

    def init_config(self, common, privileged_stage1):  # type: ignore[override]
        super().init_config(common, privileged_stage1)
        cfg = common.engine_config
        if cfg.report and current_role() == "master":
            with open(cfg.report, "w") as f:
                json.dump(RESOLVED_IN, f)


@dataclass
class AbuseConfig(ReferenceConfig):
    abuse: str = ""  # what engine code does to the master's descriptors, signals or channel
    abuse_hook: str = "create_container"  # the master's hook that does it
    path: str = ""  # a file some abuses use (a regular file dup2'd over a descriptor)


def _abuse_master(how: str, rpc_conn: socket.socket | None, cfg: AbuseConfig) -> None:
    """What :class:`AbuseEngine` does in one of the master's hooks."""
    if how == "close_rpc_fd" and rpc_conn is not None:
        os.close(rpc_conn.fileno())  # the kit's descriptor, behind the socket object's back
    elif how == "close_control_fd":
        import gc

        master = next(o for o in gc.get_objects() if type(o).__name__ == "Master")
        os.close(master.sock.fileno())
    elif how == "closerange":
        os.closerange(3, 512)
    elif how in ("devnull_over_signalfd", "file_over_signalfd"):
        over = os.open(cfg.path if how == "file_over_signalfd" else os.devnull, os.O_RDONLY)
        for fd in signalfds():
            os.dup2(over, fd, inheritable=False)
        os.close(over)
    elif how == "devnull_over_all":
        over = os.open(os.devnull, os.O_RDONLY)
        for fd in range(3, 1024):
            if fd != over:
                try:
                    os.dup2(over, fd, inheritable=False)
                except OSError:
                    pass
    elif how == "rt_signal":
        os.kill(os.getpid(), signal.SIGRTMIN + 1)
    elif how == "exit_254":  # the kit's code for a lost ledger, chosen by engine code
        os._exit(254)
    elif how == "dup2_over_rpc" and rpc_conn is not None:
        # Engine code's own socket under the kit's number: the kit must not shut it down.
        mine, peer = socket.socketpair()
        os.dup2(mine.fileno(), rpc_conn.fileno())
        _KEPT.extend([mine.detach(), peer.detach()])
    elif how in ("fork_keeps_rpc", "dup_keeps_rpc") and rpc_conn is not None:
        # A copy of the RPC connection that outlives create_container: in a helper child
        # (which the kit cannot close for it), or a dup kept for later.
        if how == "dup_keeps_rpc":
            _KEPT.append(os.dup(rpc_conn.fileno()))
        elif os.fork() == 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            time.sleep(30)
            os._exit(0)


#: Descriptors engine code keeps across hooks (see _abuse_master).
_KEPT: list[int] = []


def _abuse_master_fd(how: str, master_fd: int) -> None:
    """What :class:`AbuseEngine` writes to the master in start_process, before its exec."""
    if how == "high_byte":
        os.write(master_fd, b"\xff")
    elif how == "ready_byte":
        os.write(master_fd, b"R")
    elif how == "flood":
        # "F" then more than the kit takes; the kit must stop reading, not this writer.
        os.set_blocking(master_fd, False)
        chunk = b"F" + b"x" * 65535
        for _ in range(64):
            try:
                os.write(master_fd, chunk)
            except BlockingIOError:
                time.sleep(0.01)
    elif how == "posix_exit":  # os._exit under its other name, which the kit wraps too
        import posix

        posix._exit(3)
    elif how == "close_ledger":
        os.close(_ledger_writer().sock.fileno())
        raise RuntimeError("start_process fails after closing the ledger socket")
    elif how == "move_master_fd":
        # Correct: the socket kept under another number (close-on-exec), its number given to
        # a file the payload inherits. master_fd is still open until the exec.
        os.dup(master_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, master_fd)
        os.close(null)
    elif how in ("close_master_fd", "close_master_fd_then_fail"):
        os.close(master_fd)
        time.sleep(0.3)  # past the master's grace: it sees stage 2 alive with no master_fd
        if how == "close_master_fd_then_fail":
            raise RuntimeError("start_process fails after closing master_fd")
    elif how == "fork_holder" and os.fork() == 0:
        # A helper that keeps stage 2's end of the channel open long after the exec.
        os.set_inheritable(master_fd, False)
        time.sleep(60)
        os._exit(0)


class AbuseEngine(ReferenceEngine):
    """The reference engine plus engine code that abuses what the master lends it."""

    engine_name = "test-abuse"
    rpc_methods = ReferenceRPC

    def config(self) -> AbuseConfig:
        return AbuseConfig()

    def _abuse(self, hook: str, rpc_conn: socket.socket | None = None) -> None:
        cfg = self.common.engine_config
        if cfg.abuse_hook == hook:
            _abuse_master(cfg.abuse, rpc_conn, cfg)

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[override]
        super().create_container(ctx, pid, rpc_conn)
        self._abuse("create_container", rpc_conn)

    def post_start_process(self, ctx, pid):  # type: ignore[override]
        self._abuse("post_start_process")

    def monitor_container(self, pid, signals):  # type: ignore[override]
        self._abuse("monitor_container")
        status = super().monitor_container(pid, signals)
        returns = self.common.engine_config.abuse
        if returns == "status_huge":
            return 1 << 40
        if returns == "status_true":
            return True
        return status

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[override]
        self._abuse("cleanup_container")

    def start_process(self, master_fd):  # type: ignore[override]
        _abuse_master_fd(self.common.engine_config.abuse, master_fd)
        super().start_process(master_fd)


@dataclass
class JoinAbuseConfig(JoinConfig):
    abuse: str = ""  # as AbuseConfig's, in start_process


class JoinAbuseEngine(JoinEngine):
    """A join-only run whose start_process writes to master_fd (see AbuseEngine)."""

    engine_name = "test-join-abuse"

    def config(self) -> JoinAbuseConfig:
        cfg = JoinAbuseConfig()
        cfg.join, cfg.keep_fds, cfg.stage1_pipes, cfg.stage1_closes = {}, [], [], []
        return cfg

    def start_process(self, master_fd):  # type: ignore[override]
        _abuse_master_fd(self.common.engine_config.abuse, master_fd)
        super().start_process(master_fd)


class LateEOFFailedExecEngine(LateEOFEngine):
    """Not correct (for tests/test_master_exec_mark.py): as blind_correct's LateEOFEngine,
    but its exec fails and stage 2 then kills itself, so the monitor reaps a stage 2 that
    called exec and never ran the payload: the kit must still say it died before exec."""

    engine_name = "blind-late-eof-failed-exec"

    def start_process(self, master_fd):
        if os.fork() == 0:
            time.sleep(0.5)  # holds the inherited master_fd
            os._exit(0)
        try:
            os.execv("/nonexistent-kit-payload", ["/nonexistent-kit-payload"])
        except OSError:
            os.kill(os.getpid(), signal.SIGKILL)


def _socket_of_type(kind: int) -> int:
    """The lowest descriptor of this process that is a socket of type ``kind``."""
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(int(name))) as sock:
            if sock.type == kind:
                return int(name)
    raise AssertionError(f"no socket of type {kind} here")


def _stage1_channel() -> int:
    """The kit's stage 1 channel as stage 1 sees it: its one stream socket."""
    return _socket_of_type(socket.SOCK_STREAM)


@dataclass
class ChannelAbuseConfig(JoinConfig):
    abuse: str = "self"


class Stage1ChannelAbuseEngine(JoinEngine):
    """Writes on the kit's stage 1 channel from prepare_config: the channel's own end as a
    descriptor (``self``: held by the starter, the channel would never end) or a pipe it
    does not keep (``unkept``)."""

    engine_name = "test-stage1-channel-abuse"

    def config(self) -> ChannelAbuseConfig:
        cfg = ChannelAbuseConfig()
        cfg.join, cfg.keep_fds, cfg.stage1_pipes, cfg.stage1_closes = {}, [], [], []
        return cfg

    def prepare_config(self, starter_config):  # type: ignore[override]
        super().prepare_config(starter_config)
        channel = _stage1_channel()
        r, w = os.pipe()
        sent = channel if self.common.engine_config.abuse == "self" else r
        with socket.socket(fileno=os.dup(channel)) as sock:
            sock.sendmsg(
                [b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(array.array("i", [sent])))]
            )
        os.close(r)
        os.close(w)


class KeepsACopyOfTheLedgerSocketEngine(ReferenceEngine):
    """prepare_config copies the kit's ledger socket (stage 1's one SOCK_SEQPACKET socket)
    under a number of its own and keeps that for the payload."""

    engine_name = "test-keeps-a-copy-of-the-ledger-socket"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        starter_config.keep_file_descriptor(os.dup(_socket_of_type(socket.SOCK_SEQPACKET)))
