"""Buggy engines of blind round 8 (flows), written from SPEC.md alone (not from the suite).

Each class is :class:`blind8_flow_correct.ScratchFlowEngine` (a correct engine written from
scratch) with ONE honest mistake that breaks a sentence of SPEC.md §1, §2, §5, §6 or §7,
wherever that sentence applies. The mechanisms vary: which process or hook does the work and
when (the master instead of the RPC server, a hook that returns before its work is done),
what crosses from stage 1 (a module global, a field that is not a dataclass field), error
handling (a swallowed exec error, a cleanup that assumes the setup), signals and exit (a
signal death turned into an exit, a monitor that returns before reaping, signals sent to the
container's pid as its own namespace numbers it), RPC (a result that is not JSON in some
flows, a method that leaves its work to a thread) and the StarterConfig (an invalid
capability request in one flow).

Each docstring's first line names the bug; its body quotes the sentence it breaks and says in
which flows it shows. Every engine still runs its lifecycle to the end in every flow.

Loaded as ``blind8_flow:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here runs at
import time. The engine that would change "the host" (:class:`MasterHostnameEngine`) and the
one that signals the host's pid 1 (:class:`InnerPidForwardEngine`) first check that they run
inside the kit's host sandbox, and do neither otherwise.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, Any

from blind8_flow_correct import (
    FORWARDED,
    MONITOR_POLL,
    ScratchFlowConfig,
    ScratchFlowEngine,
    ScratchFlowRPC,
    inside_kit_sandbox,
)

from kit import system
from kit.contract import Context, EngineConfig, SignalChannel, WaitStatus
from kit.rpc import RPCClient

if TYPE_CHECKING:
    import socket

    from kit.starter.config import StarterConfig


def _warn(message: str) -> None:
    print(f"blind8-flow: {message}", file=sys.stderr, flush=True)


# --- hook order and process placement ------------------------------------------------------------


class MasterHostnameEngine(ScratchFlowEngine):
    """The master sets the hostname itself when it is privileged (root flow), not via RPC.

    SPEC §1: ``create_container`` "prepares the container (mounts, network…) through RPC
    calls to the RPC server"; §2: the container side creates the uts namespace, the master
    stays outside it. The engine skips the RPC round trip when the master "is already root"
    (``system.current().privileged()``), and so calls sethostname in the master, which is in
    the host's uts namespace: the host's hostname changes and the container keeps the name
    it inherited. Shows in the root flow only (in every other flow the master is not host
    root and uses the RPC server). Outside the kit's host sandbox it always uses RPC.
    """

    engine_name = "blind8-flow-master-hostname"

    def set_hostname(self, rpc: RPCClient) -> None:
        if system.current().privileged() and inside_kit_sandbox():
            system.current().sethostname(self.cfg.hostname)  # BUG: the master's uts ns
            return
        super().set_hostname(rpc)


class BackgroundCreateEngine(ScratchFlowEngine):
    """create_container returns at once and a thread makes the RPC calls after it returned.

    SPEC §2 rule 5: "start_process begins only after create_container returned and the RPC
    connection closed"; §1: create_container "prepares the container … through RPC calls".
    To "not delay the start", the engine hands the hostname and tmpfs calls to a background
    thread with its own duplicate of the RPC connection and returns: the setup happens after
    create_container returned (or not at all, when the kit shuts the connection), racing the
    start of the payload. Shows in every flow.
    """

    engine_name = "blind8-flow-background-create"

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        self.make_state_dir(pid)
        conn: socket.socket = rpc_conn.dup()
        threading.Thread(target=self._finish_setup, args=(conn,), name="setup", daemon=True).start()
        # BUG: returns while the setup still runs

    def _finish_setup(self, conn: socket.socket) -> None:
        rpc = RPCClient(conn, self.common.engine_name)
        try:
            self.set_hostname(rpc)
            self.mount_scratch(rpc)
        except Exception as exc:
            _warn(f"background setup failed: {type(exc).__name__}: {exc}")
        finally:
            rpc.close()


# --- config crossing processes -------------------------------------------------------------------


class ForwardingConfig(ScratchFlowConfig):  # BUG: no @dataclass, forward_signals is no field
    """The base config plus the signals the monitor forwards."""

    #: Names of the signals to forward; prepare_config sets the five of SPEC §7.
    forward_signals: tuple[str, ...] = ("SIGINT", "SIGTERM")


class UndecoratedFieldEngine(ScratchFlowEngine):
    """The forwarded-signal list is set in a config subclass that lacks @dataclass.

    SPEC §2 rule 3: "Only JSON-visible fields of the engine config cross from stage 1 to
    later processes"; §7: "A conformant monitor_container forwards SIGINT/SIGTERM/SIGHUP/
    SIGUSR1/SIGUSR2 to the container". prepare_config stores the five names in
    ``forward_signals``, an attribute of a subclass that was never decorated with
    ``@dataclass``: it is not a field, does not reach the master, and the master's monitor
    reads the class default (SIGINT, SIGTERM), so SIGHUP, SIGUSR1 and SIGUSR2 are dropped.
    Shows in every flow.
    """

    engine_name = "blind8-flow-undecorated-field"

    def config(self) -> EngineConfig:
        return ForwardingConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        cfg = self.cfg
        assert isinstance(cfg, ForwardingConfig)
        cfg.forward_signals = FORWARDED

    def signals_to_forward(self) -> set[int]:
        cfg = self.cfg
        names = cfg.forward_signals if isinstance(cfg, ForwardingConfig) else FORWARDED
        return {signal.Signals[name] for name in names}


#: State directories reserved by prepare_config, by container id (BUG: stage 1's memory).
_STATE_DIRS: dict[str, str] = {}


class GlobalStateDirEngine(ScratchFlowEngine):
    """Stage 1 reserves the state directory in a module global that the master never sees.

    SPEC §2 rule 3: "state kept in Python globals in stage 1 is gone later (the kit really
    runs stages in separate processes…)"; §1: cleanup_container "tears everything down".
    prepare_config records the state directory in a module-level registry instead of the
    config. In the master the registry is empty: create_container falls back to a fresh
    ``mkdtemp`` directory (its pid file must go somewhere) that it does not register, and
    cleanup_container, which removes only what stage 1 reserved, finds nothing and leaves
    the directory in the run's TMPDIR. Shows in every flow, on every run.
    """

    engine_name = "blind8-flow-global-state-dir"

    def reserve_state_dir(self) -> None:
        tmp = os.environ.get("TMPDIR") or "/tmp"
        _STATE_DIRS[self.common.container_id] = os.path.join(
            tmp, f"scratch-flow-{self.common.container_id}"
        )

    def state_dir(self) -> str | None:
        return _STATE_DIRS.get(self.common.container_id)

    def make_state_dir(self, pid: int) -> None:
        path = self.state_dir()
        if path is None:  # "cannot happen": prepare_config reserved it
            path = tempfile.mkdtemp(prefix="scratch-flow-")
        else:
            os.mkdir(path, 0o700)
        with open(os.path.join(path, "pid"), "w") as f:
            f.write(f"{pid}\n")


# --- error handling ----------------------------------------------------------------------------


class CleanupAssumesSetupEngine(ScratchFlowEngine):
    """cleanup_container removes each file the setup made, by name, and fails if one is missing.

    SPEC §1: cleanup_container "tears everything down; must tolerate partial setup"; §2
    rule 7 and the error table: after a failed create_container or start_process the
    cleanup still runs. This cleanup unlinks ``started`` and ``pid`` and then removes the
    directory, as if create_container and post_start_process had both run: when
    create_container failed (or never ran) or stage 2 failed before exec, it raises
    FileNotFoundError. Shows in every flow, on every run with a partial setup (a successful
    run cleans up fine).
    """

    engine_name = "blind8-flow-cleanup-assumes-setup"

    def remove_state_dir(self) -> None:
        path = self.state_dir()
        if path is None:
            return
        for name in ("started", "pid"):
            os.unlink(os.path.join(path, name))  # BUG: missing after a partial setup
        os.rmdir(path)


class ExecErrorReturnsEngine(ScratchFlowEngine):
    """start_process reports a failed exec on stderr and returns.

    SPEC §1: start_process "becomes the payload: it must exec or exit, never return"; §2 rule
    10: "start_process that returns instead of exec'ing is a failure ('stage 2 returned')";
    the error table: "start_process raises → stage 2 writes the failure byte". The engine
    catches the OSError of execvpe (a payload that does not exist or is not executable),
    prints it and returns, swallowing the error it should raise. Shows in every flow,
    whenever the payload cannot be exec'd.
    """

    engine_name = "blind8-flow-exec-error-returns"

    def start_process(self, master_fd: int) -> None:
        argv = self.cfg.argv
        try:
            os.execvpe(argv[0], argv, self.payload_env())
        except OSError as exc:
            _warn(f"cannot run {argv[0]!r}: {exc.strerror}")  # BUG: swallowed, returns


# --- signals and exit --------------------------------------------------------------------------


class SignalDeathAsExitEngine(ScratchFlowEngine):
    """monitor_container turns a death by signal N into an exit with code 128+N.

    SPEC §7: monitor_container "reaps only the container pid, and returns its wait status.
    The run exits with the container's code, or re-raises its signal"; §2 rule 7:
    cleanup_container gets "the wait status". Like a shell, the monitor "normalises" a
    signalled status into exited(128+N): the exit code looks right, but the wait status
    handed back (and to cleanup_container) says the container exited, and the signal is
    never re-raised. Shows in every flow, when the payload dies by a signal.
    """

    engine_name = "blind8-flow-signal-as-exit"

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        status = super().monitor_container(pid, signals)
        if os.WIFSIGNALED(status):
            return (128 + os.WTERMSIG(status)) << 8  # BUG: not the container's status
        return status


class ZombieMonitorEngine(ScratchFlowEngine):
    """monitor_container peeks at the exit with WNOWAIT and leaves the reaping to cleanup.

    SPEC §7: "A conformant monitor_container forwards … to the container, reaps only the
    container pid, and returns its wait status"; §1: it "blocks until the container exits".
    The monitor waits with ``waitid(…, WEXITED | WNOWAIT)`` "so that the pid stays reserved
    until cleanup", builds the wait status from the siginfo and returns with the container
    still a zombie; cleanup_container means to reap it. Shows in every flow, on every run.
    """

    engine_name = "blind8-flow-monitor-leaves-zombie"

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        forward = self.signals_to_forward()
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            while sig is not None:
                if sig in forward:
                    self.forward_signal(pid, sig)
                sig = signals.get(timeout=0)
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None and info.si_pid == pid:
                if info.si_code == os.CLD_EXITED:
                    return (info.si_status & 0xFF) << 8
                core = 0x80 if info.si_code == os.CLD_DUMPED else 0
                return info.si_status | core  # BUG: returns with the zombie unreaped

    def post_start_process(self, ctx: Context, pid: int) -> None:
        super().post_start_process(ctx, pid)
        self.zombie = pid

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pid = getattr(self, "zombie", None)
        if pid is not None:
            try:
                os.waitpid(pid, 0)  # the reaping the monitor left for later
            except ChildProcessError:
                pass
        super().cleanup_container(ctx, fatal, status)


class InnerPidRPC(ScratchFlowRPC):
    def container_pid(self) -> int:
        """The container process's pid (the RPC server's parent)."""
        return int(self.system.getppid())


class InnerPidForwardEngine(ScratchFlowEngine):
    """Signals are forwarded to the container's pid as its own pid namespace numbers it (1).

    SPEC §2 rule 9: "The pid given to create_container, post_start_process and
    monitor_container is the container's pid as the master sees it; with a new pid
    namespace, stage 2 sees itself as pid 1"; §7: the monitor forwards the signals "to the
    container". create_container asks the RPC server for the container's pid (its parent,
    ``getppid()``, which is 1 inside the container's pid namespace) and the monitor forwards
    to that number, which in the master is the host's pid 1, not the container: the payload
    never gets the signals (the host's init does, or the kill fails with EPERM). Shows in
    every flow (each has a new pid namespace), for every forwarded signal. Outside the kit's
    host sandbox it forwards nothing rather than signal the real pid 1.
    """

    engine_name = "blind8-flow-inner-pid"
    rpc_methods: type = InnerPidRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        self.make_state_dir(pid)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        self.target = int(rpc.container_pid())  # BUG: the container's own numbering
        self.set_hostname(rpc)
        self.mount_scratch(rpc)

    def forward_signal(self, pid: int, sig: int) -> None:
        target = getattr(self, "target", pid)
        if target != pid and not inside_kit_sandbox():
            return
        try:
            os.kill(target, sig)
        except OSError as exc:
            _warn(f"cannot forward signal {sig} to {target}: {exc.strerror}")


# --- RPC -----------------------------------------------------------------------------------------


class SetResultRPC(ScratchFlowRPC):
    def mount_tmpfs(self, target: str, owner: list[int] | None = None) -> Any:
        if not os.path.isabs(target):
            raise ValueError(f"mount_tmpfs: target must be absolute, got {target!r}")
        options = {"mode=0755", "size=1m"}
        if owner is None:
            data = ",".join(sorted(options))
            self.system.mount("tmpfs", target, "tmpfs", ["nosuid", "nodev"], data)
            return data
        options |= {f"uid={owner[0]}", f"gid={owner[1]}"}
        self.system.mount("tmpfs", target, "tmpfs", ["nosuid", "nodev"], ",".join(options))
        return options  # BUG: a set, not JSON


class SetResultEngine(ScratchFlowEngine):
    """An RPC method returns a Python set (not JSON) when the tmpfs gets an owner.

    SPEC §6: "Frames are length-prefixed and carry JSON … the reply carries a result or a
    typed error". The ``mount_tmpfs`` method returns its mount options as a ``set`` in the
    branch that adds ``uid=``/``gid=``: the reply cannot be encoded, the call fails with a
    TypeError after the mount was made, and create_container fails (exit 255). Shows in
    the flows where the payload is not root in the RPC server's user namespace, suid and
    userns; root, fakeroot and hybrid take the other branch and pass.
    """

    engine_name = "blind8-flow-set-result"
    rpc_methods: type = SetResultRPC


class BackgroundMountRPC(ScratchFlowRPC):
    def mount_tmpfs(self, target: str, owner: list[int] | None = None) -> str:
        # "Mounting may be slow: do not hold the master up."
        threading.Thread(
            target=self._mount, args=(target, owner), name="mount", daemon=True
        ).start()
        return "pending"  # BUG: the work goes on after the reply, beside the next request

    def _mount(self, target: str, owner: list[int] | None) -> None:
        try:
            super().mount_tmpfs(target, owner)
        except Exception as exc:
            _warn(f"mount of {target} failed: {type(exc).__name__}: {exc}")


class BackgroundMountEngine(ScratchFlowEngine):
    """An RPC method starts a thread for the mount and replies before the mount is made.

    SPEC §6: "The server handles one request at a time"; §1: create_container prepares the
    container "through RPC calls to the RPC server" (a call that returned has done its
    work). ``mount_tmpfs`` replies "pending" at once and mounts on a thread of its own, so
    the mount runs beside whatever the server does next (the next request, its exit once
    the master closes the connection: the mount may never happen). Shows in every flow.
    """

    engine_name = "blind8-flow-rpc-background"
    escapes = (
        "no rule the kit can read: \"one request at a time\" (SPEC §6) is the server's, "
        "which the kit's is; a thread a method leaves running changes no credential, and "
        "its late mount lands in the container's own mount namespace, where no rule "
        "looks (a functional bug of the engine: its payload may not see the mount)"
    )
    rpc_methods: type = BackgroundMountRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        self.make_state_dir(pid)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        self.mount_scratch(rpc)
        self.set_hostname(rpc)


# --- StarterConfig -------------------------------------------------------------------------------

#: The capability CapsNotSubsetEngine gives the root flow's payload.
BIND_CAP = "CAP_NET_BIND_SERVICE"


class CapsNotSubsetEngine(ScratchFlowEngine):
    """In the root flow the payload's capability is effective but never made permitted.

    SPEC §5: "Invalid combinations (effective not a subset of permitted; …) are rejected
    before any namespace exists". To let a root payload bind low ports with nothing else,
    the engine sets CAP_NET_BIND_SERVICE in the effective, inheritable, ambient and bounding
    sets and forgets the permitted set: an invalid StarterConfig, so the root flow never
    starts a container (exit 255). Shows in the root flow only; the other flows configure
    no capability and pass.
    """

    engine_name = "blind8-flow-caps-not-subset"

    def fill_starter_config(self, sc: StarterConfig) -> None:
        super().fill_starter_config(sc)
        if sc.flow == "root":
            for kind in ("effective", "inheritable", "ambient", "bounding"):  # BUG: no permitted
                sc.set_capabilities(kind, [BIND_CAP])
