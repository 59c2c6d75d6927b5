"""The starter: runs one engine lifecycle in real processes (``SPEC.md`` §2, §3, §5).

Process tree of one run (the supervisor forks the starter; see :mod:`kit.run.supervisor`)::

    starter (becomes the master)
      ├─ stage 1: config, init_config, prepare_config → Common + StarterConfig as JSON
      └─ container process (clone: new pid [+ user] namespace; pid 1 there)
           ├─ RPC server (clone with CLONE_FS): serves the engine's RPC methods
           └─ stage 2: config, init_config, start_process → exec of the payload

The master runs ``create_container``, the start waiter (→ ``post_start_process``) and
``monitor_container`` in threads, then ``cleanup_container`` once.

Master ↔ container control bytes on the master socket: ``M`` (uid maps written, go on with
namespace setup), ``R`` (namespaces ready, RPC server started), ``E…`` (setup failed, message
follows), ``G`` (create_container done, start stage 2), ``A`` (abort), ``F…`` (stage 2
failed, message follows). EOF after ``G`` without ``F`` means the payload was exec'd (the
container's end is close-on-exec).
"""

from __future__ import annotations

import functools
import json
import os
import queue
import resource
import select
import signal
import socket
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from kit import registry
from kit.contract import (
    Common,
    ConfigError,
    Context,
    Engine,
    EngineConfig,
    Operations,
    SignalChannel,
    dumps,
)
from kit.ledger import probe
from kit.ledger.record import LedgerWriter
from kit.run import seccomp
from kit.run.request import Invoker, RunRequest
from kit.starter import inject
from kit.starter.config import StarterConfig
from kit.system import System, current, linux

EXIT_FATAL = 255
STAGE2_NAME = "kit-stage2"
#: Capabilities the RPC server keeps permitted (and bounding) in the setuid flows.
RPC_SERVER_CAPS = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN",
                   "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SYS_CHROOT", "CAP_MKNOD",
                   "CAP_NET_ADMIN", "CAP_SETPCAP")
#: The order the container process enters its namespaces in, after user and pid (entered in
#: the starter, before the fork): joined by path or created, one kind at a time (SPEC §5).
CONTAINER_NS_ORDER = ("net", "uts", "ipc", "cgroup", "mount")
#: Hooks the supervisor does not time: they wait for the payload by design.
UNTIMED_HOOKS = ("monitor_container",)
#: Signals the master never blocks (synchronous faults, and the uncatchable ones).
_UNBLOCKABLE = {signal.SIGKILL, signal.SIGSTOP, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE,
                signal.SIGILL, signal.SIGTRAP, signal.SIGSYS, signal.SIGABRT}
MASTER_SIGNALS = {s for s in signal.valid_signals() if s not in _UNBLOCKABLE}
#: Signals CPython itself ignores at start-up (it wants EPIPE and EFBIG, not death).
_PYTHON_IGNORED = (signal.SIGPIPE, signal.SIGXFSZ)


def default_signals(for_exec: bool = False) -> None:
    """Undo what the launcher's shell left: ignored signals back to their defaults, none
    blocked.

    An ignored signal stays ignored across fork and exec, and so does the signal mask: under
    ``nohup`` or a CI runner that ignores SIGHUP, the payload would otherwise inherit that and
    a forwarded SIGHUP would do nothing. SIGINT goes back to CPython's own handler, as in an
    interpreter started normally; ``for_exec`` (stage 2, just before the payload) also
    restores the two signals CPython ignores.
    """
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if sig in _PYTHON_IGNORED:
            if for_exec:
                signal.signal(sig, signal.SIG_DFL)
            continue
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                          else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


class StageFailed(Exception):
    """A step of the starter failed (not an engine hook)."""


class HookFailed(Exception):
    """An engine hook raised (already recorded in the ledger); ``error`` is what it raised."""

    def __init__(self, hook: str, error: BaseException) -> None:
        super().__init__(f"{hook} raised {type(error).__name__}: {error}")
        self.hook = hook
        self.error = error


class ContainerCreationFailed(RuntimeError):
    """Fatal value handed to cleanup_container when create_container raised."""


# --- hooks ------------------------------------------------------------------------------------

def describe_error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc),
            "errno": getattr(exc, "errno", None),
            # whole: the report shows it once as the root cause (a ledger event may be 1 MiB)
            "traceback": "".join(traceback.format_exception(exc))[-60000:]}


#: Parameter names of the hooks, for the ``args`` of hook_enter events.
HOOK_PARAMETERS: dict[str, tuple[str, ...]] = {
    "config": (), "init_config": ("common", "privileged_stage1"),
    "prepare_config": ("starter_config",), "create_container": ("ctx", "pid", "rpc_conn"),
    "start_process": ("master_fd",), "post_start_process": ("ctx", "pid"),
    "monitor_container": ("pid", "signals"), "cleanup_container": ("ctx", "fatal", "status"),
}


def _argument(value: Any) -> Any:
    """A hook argument as the ledger shows it: plain values as they are, errors as
    type and message, other objects by type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value)}
    if isinstance(value, Common):
        return {"engine_name": value.engine_name, "container_id": value.container_id}
    return {"type": type(value).__name__}


def _summary(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, EngineConfig):
        return {"type": type(value).__name__, "id": id(value), "json": value.to_json()}
    return repr(value)[:500]


def own_thread(snap: dict[str, Any]) -> dict[str, Any] | None:
    """The calling thread's entry in a snapshot (tids as the mounted /proc numbers them)."""
    tid = linux.proc_tid()
    return next((t for t in snap["threads"] if t["tid"] == tid), None)


def wire_snapshot(system: System) -> dict[str, Any]:
    """A snapshot for the ledger: in the real backend with capability masks as integers (a
    fifth of the JSON to encode, send, check and decode; the Ledger names them again)."""
    if system.name == "real":
        return probe.snapshot(masks=True)
    snap: dict[str, Any] = system.snapshot()
    return snap


_calls = threading.local()  # kit_hook: the hook the kit is calling on this thread, if any


class HookRunner:
    """Calls engine hooks of one process, recording entry/return/raise in the ledger with a
    privilege snapshot (and escalation probes at entry)."""

    def __init__(self, ledger: LedgerWriter, system: System, probes: bool) -> None:
        self.ledger = ledger
        self.system = system
        self.probes = probes
        self._probe_cache: dict[str, dict[str, Any]] = {}

    def _snap(self) -> dict[str, Any] | None:
        """A snapshot; a probe failure is recorded, never allowed to skip the hook."""
        if not self.probes:
            return None
        try:
            return wire_snapshot(self.system)
        except Exception as exc:  # noqa: BLE001 a probe failure is recorded, never fatal
            return {"probe_error": f"{type(exc).__name__}: {exc}"}

    def _escalation(self, snap: dict[str, Any] | None) -> dict[str, Any] | None:
        """The escalation probe, re-run only when the calling thread's credentials changed:
        its outcome is a function of them (uids, gids, capabilities, no_new_privs, user
        namespace and maps) and of the root the setuid binary is found from, so a repeat
        would only cost a fork."""
        if not self.probes or snap is None or "probe_error" in snap:
            return None
        me = own_thread(snap)
        key = None if me is None else json.dumps(
            [{k: v for k, v in me.items() if k != "tid"}, snap["ns"]["user"], snap["uid_map"],
             snap["securebits"], snap.get("root")], sort_keys=True)
        cached = self._probe_cache.get(key) if key is not None else None
        if cached is not None:
            return {**cached, "cached": True}
        try:
            result: dict[str, Any] = self.system.escalation()
        except Exception as exc:  # noqa: BLE001 a probe failure is recorded, never fatal
            return {"probe_error": f"{type(exc).__name__}: {exc}"}
        if key is not None:
            self._probe_cache[key] = result
        return result

    def enter(self, hook: str, args: tuple[Any, ...] = (),
              kwargs: dict[str, Any] | None = None, caller: str = "kit") -> None:
        names = HOOK_PARAMETERS.get(hook, ())
        arguments = {name: _argument(value) for name, value in zip(names, args, strict=False)}
        arguments.update({name: _argument(value) for name, value in (kwargs or {}).items()})
        snap = self._snap()
        extra = {"caller": caller} if caller != "kit" else {}
        self.ledger.emit("hook_enter", hook=hook, snapshot=snap, escalation=self._escalation(snap),
                         args=arguments, refresh=self._snap, **extra)

    def call(self, hook: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn``, the engine's (instrumented) hook, as the kit."""
        _calls.kit_hook = hook
        try:
            return fn(*args)
        finally:
            _calls.kit_hook = None

    def instrument(self, ops: Operations) -> None:
        """Record every call of the engine's hooks in this process — the kit's and the
        engine's own (``caller: "engine"``: e.g. a monitor that calls post_start_process
        again) — by wrapping them on the instance."""
        for hook in HOOK_PARAMETERS:
            original = getattr(ops, hook)
            # A fault the run asked the kit to inject goes inside the record: the ledger
            # shows the hook raising, and the kit_injected event says who made it raise.
            setattr(ops, hook, self._recorded(hook, inject.wrap(hook, original, self.ledger)))

    def _recorded(self, hook: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            by_kit = getattr(_calls, "kit_hook", None) == hook
            _calls.kit_hook = None  # hooks called from inside this one are the engine's
            self.enter(hook, args, kwargs, "kit" if by_kit else "engine")
            try:
                result = original(*args, **kwargs)
            except BaseException as exc:
                self.ledger.emit("hook_raise", hook=hook, snapshot=self._snap(),
                                 error=describe_error(exc), refresh=self._snap)
                if by_kit:
                    raise HookFailed(hook, exc) from exc
                raise  # the engine's own call gets its own exception back
            self.ledger.emit("hook_return", hook=hook, snapshot=self._snap(),
                             result=_summary(result), refresh=self._snap)
            return result
        return recorded

    def init_engine(self, engine: Engine, config_json: dict[str, Any], container_id: str,
                    privileged_stage1: bool) -> Common:
        """config then init_config (rule 1); returns the Common given to init_config."""
        ops = engine.operations
        self.instrument(ops)
        cfg = self.call("config", ops.config)
        if not isinstance(cfg, EngineConfig):
            raise StageFailed(f"{engine.name}.config() returned {type(cfg).__name__}, "
                              "not an EngineConfig")
        try:
            cfg.update_from_json(config_json)
        except ConfigError as exc:
            self.ledger.emit("starter_error", stage="engine_config", message=str(exc))
            raise StageFailed(str(exc)) from None
        common = Common(engine.name, container_id, cfg)
        self.call("init_config", ops.init_config, common, privileged_stage1)
        engine.common = common
        return common


# --- small helpers ------------------------------------------------------------------------

_REAL_EXIT = os._exit  # stage 2 wraps os._exit for the engine; the kit always uses this


def _exit(code: int) -> NoReturn:
    _REAL_EXIT(code)


def _recv_control(sock: socket.socket) -> tuple[str, str]:
    """One control byte and, for E/F, the message that follows up to EOF."""
    head = sock.recv(1)
    if not head:
        return "", ""
    kind = head.decode()
    if kind in "EF":
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        return kind, b"".join(chunks).decode(errors="replace")
    return kind, ""


def _send(sock: socket.socket, data: str) -> None:
    try:
        sock.sendall(data.encode())
    except OSError:
        pass


def rearm_parent_death(parent: int | None = None, sock: socket.socket | None = None) -> None:
    """Re-arm SIGKILL-on-parent-death, which the kernel clears on every credential change,
    and exit if the parent already died (by pid, or by a hung-up socket to it)."""
    linux.set_parent_death_signal(signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        _exit(EXIT_FATAL)
    if sock is not None:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLHUP)
        if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0)):
            _exit(EXIT_FATAL)


def _unwrap(exc: BaseException) -> BaseException:
    """What the engine raised (the kit wraps hook errors in HookFailed)."""
    return exc.error if isinstance(exc, HookFailed) else exc


def _how_ended(pid: int) -> str:
    """": how" a child that has exited ended, without reaping it (the monitor reaps: when
    it was first, nothing can be told)."""
    try:
        found = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return ""
    if found is None:
        return ""
    if found.si_code == os.CLD_EXITED:
        return f": exit code {found.si_status}"
    return f": killed by signal {found.si_status}"


def _status_to_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return EXIT_FATAL


# --- the starter --------------------------------------------------------------------------

class Starter:
    """One run's starter, in the starter process. :meth:`main` never returns."""

    def __init__(self, request: RunRequest, ledger_sock: socket.socket,
                 filter_channel: socket.socket | None = None,
                 parent: int | None = None) -> None:
        # The supervisor's pid, known before the fork: read after it (getppid), it would be
        # the reaper's pid if the supervisor died in between, and the starter would live on.
        self.parent = parent
        self.req = request
        inject.arm(request.inject)  # before any process of the run is forked
        self.filter_channel = filter_channel
        self.user: Invoker = request.user()
        self.system = current()
        self.ledger_sock = ledger_sock
        self.ledger = LedgerWriter(ledger_sock, "starter",
                                   confirm=self.system.name == "real" and request.probes)
        self.hooks = HookRunner(self.ledger, self.system, request.probes)

    # -- invoker state ---------------------------------------------------------------------
    def become_invoker(self) -> None:
        """Put the starter in the state the flow's caller leaves it in (SPEC §3)."""
        flow, u = self.req.flow, self.user
        if flow == "root" and self.system.privileged():
            return
        if not self.system.privileged():
            if flow == "root":
                raise StageFailed("flow root: needs uid 0")
            if flow in ("suid", "hybrid"):
                raise StageFailed(f"flow {flow}: needs root to emulate the setuid starter")
            return  # already U
        if flow in ("suid", "hybrid"):
            self.system.emulate_setuid_exec(u.uid, u.gid, u.groups)
        else:
            self.system.become_user(u.uid, u.gid, u.groups)
            self.system.set_dumpable(True)  # uid maps and /proc need it after setresuid

    def main(self) -> NoReturn:
        code = EXIT_FATAL
        try:
            if self.filter_channel is not None:
                # First, while the starter still has the launcher's privilege and before
                # any engine code: the fake backend's containment, or (real backend, as
                # root, in the host sandbox or not) the host-global refusals. The one place
                # a run's filter is installed: every process of the run descends from here.
                refused = seccomp.install_for_run(self.req.backend, self.filter_channel)
                self.filter_channel = None
                if refused:
                    raise StageFailed(refused)
            linux.set_name("kit-starter")
            default_signals()
            if self.parent is None:
                self.parent = os.getppid()
            self.become_invoker()
            rearm_parent_death(self.parent)
            self.ledger.emit("process_start", ppid=self.system.getppid(),
                             nspid=[self.system.getpid()])
            common_json, sconf = self.run_stage1()
            self.ledger.emit("starter_config", config=sconf.to_json())
            try:
                sconf.validate()
            except ConfigError as exc:
                self.ledger.emit("starter_error", stage="starter_config", message=str(exc))
            else:
                code = self.run_container(common_json, sconf)
        except StageFailed as exc:
            self.ledger.emit("starter_error", stage="starter", message=str(exc))
        except BaseException as exc:  # noqa: BLE001 a kit bug: report, never hang
            self.ledger.emit("starter_error", stage="starter", message=describe_error(exc)[
                "traceback"])
        self.ledger.emit("starter_exit", code=code)
        _exit(code)

    # -- stage 1 ---------------------------------------------------------------------------
    def run_stage1(self) -> tuple[dict[str, Any], StarterConfig]:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            self._stage1_child(wfd)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        self.ledger.emit("process_exit", child_role="stage1", child_pid=pid, status=status)
        if status != 0 or not data:
            raise StageFailed(f"stage 1 failed (exit code {_status_to_code(status)})")
        doc = json.loads(data)
        return doc["common"], StarterConfig.from_json(doc["starter_config"])

    def _stage1_child(self, wfd: int) -> NoReturn:
        code = EXIT_FATAL
        self.system_parent = os.getppid()
        try:
            rearm_parent_death(self.system_parent)
            linux.set_name("kit-stage1")
            ledger = self.ledger.for_role("stage1")
            u = self.user
            if self.req.flow in ("suid", "hybrid"):
                # Stage 1 of the setuid starter runs with every privilege dropped.
                self.system.become_user(u.uid, u.gid, u.groups)
                self.system.set_no_new_privs()
                rearm_parent_death(self.system_parent)
            ledger.emit("process_start", ppid=self.system.getppid(),
                             nspid=[self.system.getpid()])
            hooks = HookRunner(ledger, self.system, self.req.probes)
            engine = registry.make_engine(self.req.engine)
            config_json = dict(self.req.engine_config)
            if self.req.argv:
                config_json["argv"] = list(self.req.argv)
            privileged = self.req.flow in ("suid", "hybrid")
            common = hooks.init_engine(engine, config_json, self.req.container_id, privileged)
            sconf = StarterConfig(self.req.flow, u.uid if self.req.flow != "root" else 0,
                                  u.gid if self.req.flow != "root" else 0)
            hooks.call("prepare_config", engine.operations.prepare_config, sconf)
            os.write(wfd, dumps({"common": common.to_json(),
                                 "starter_config": sconf.to_json()}).encode())
            code = 0
        except HookFailed:
            pass  # the ledger has the hook_raise
        except BaseException as exc:  # noqa: BLE001 stage 1 reports any failure, then exits
            self.ledger.for_role("stage1").emit(
                "starter_error", stage="stage1", message=describe_error(exc)["traceback"])
        _exit(code)

    # -- namespaces and the container process ----------------------------------------------
    def _write_maps(self, pid: int, sconf: StarterConfig) -> None:
        uid_map, gid_map = sconf.uid_mappings, sconf.gid_mappings
        if not self.system.privileged():
            euid, egid = self.system.getresuid()[1], self.system.getresgid()[1]
            for name, maps, own in (("add_uid_mappings", uid_map, euid),
                                    ("add_gid_mappings", gid_map, egid)):
                if len(maps) != 1 or maps[0][1] != own or maps[0][2] != 1:
                    raise StageFailed(f"{name}: {maps} needs privilege (an unprivileged "
                                      f"starter can map only its own id {own}, size 1)")
            if sconf.allow_setgroups:
                raise StageFailed("set_allow_setgroups: an unprivileged starter must deny "
                                  "setgroups in the user namespace")
        self.system.write_id_maps(pid, uid_map, gid_map,
                                  deny_setgroups=not sconf.allow_setgroups)

    def run_container(self, common_json: dict[str, Any], sconf: StarterConfig) -> int:
        """Create/join namespaces, start the container process, run the master."""
        created = sconf.namespaces_created()
        joined = dict(sconf.ns_paths)
        # user and pid: in the starter, before the fork (joined by path here; created by
        # the clone so that the new pid namespace is owned by a new user namespace).
        starter_joined = [kind for kind in ("user", "pid") if kind in joined]
        for kind in starter_joined:
            self.system.setns(kind, joined[kind])
        clone_kinds = [k for k in ("user", "pid") if k in created]
        master_sock, container_sock = socket.socketpair()
        rpc_master, rpc_server = socket.socketpair()
        for s in (master_sock, container_sock, rpc_master, rpc_server):
            s.set_inheritable(False)

        # A sentinel child, older than the container, that exits at once: a monitor that
        # reaps any child (waitpid(-1)) takes it first, and the master sees it gone.
        self.sentinel = os.fork()
        if self.sentinel == 0:
            _exit(0)
        pid = self.system.clone(clone_kinds)
        if pid == 0:
            master_sock.close()
            rpc_master.close()
            Container(self, common_json, sconf, container_sock, rpc_server).main()
        container_sock.close()
        rpc_server.close()
        self.ledger.emit("container_start", container_pid=pid, created=clone_kinds,
                         joined=starter_joined)

        try:
            if "user" in created:
                self._write_maps(pid, sconf)
                if not sconf.hybrid_workflow:
                    self.system.setns("user", f"/proc/{pid}/ns/user")
                    rearm_parent_death(self.parent)
        except (OSError, StageFailed) as exc:
            self.ledger.emit("starter_error", stage="user_namespace", message=str(exc))
            _send(master_sock, "A")
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return EXIT_FATAL
        if self.req.flow in ("suid", "hybrid"):
            # The setuid master: r=e=U, saved uid 0, no effective capabilities.
            self.system.drop_effective(self.user.uid)
            rearm_parent_death(self.parent)
        _send(master_sock, "M")

        if sconf.namespace_join_only:
            return self._join_only_master(pid, master_sock, rpc_master)
        return Master(self, common_json, sconf, pid, master_sock, rpc_master).main()

    def _join_only_master(self, pid: int, master_sock: socket.socket,
                          rpc_master: socket.socket) -> int:
        rpc_master.close()
        os.waitpid(self.sentinel, 0)  # no monitor in a join-only run
        kind, message = _recv_control(master_sock)
        if kind == "E":
            self.ledger.emit("starter_error", stage="namespaces", message=message)
        elif kind == "R":
            _send(master_sock, "G")
            kind, message = _recv_control(master_sock)
            if kind == "F":
                self.ledger.emit("stage2_failed", message=message)
            else:
                self.ledger.emit("stage2_exec")
        master_sock.close()
        _, status = os.waitpid(pid, 0)
        self.ledger.emit("process_exit", child_role="container", child_pid=pid, status=status)
        return EXIT_FATAL if kind == "E" else _status_to_code(status)


class Master:
    """The master process: create_container ‖ start waiter ‖ monitor_container, then
    cleanup_container (SPEC §2)."""

    def __init__(self, starter: Starter, common_json: dict[str, Any], sconf: StarterConfig,
                 pid: int, master_sock: socket.socket, rpc_sock: socket.socket) -> None:
        self.starter = starter
        self.common_json = common_json
        self.sconf = sconf
        self.pid = pid
        self.sock = master_sock
        self.rpc_sock = rpc_sock
        self.ledger = starter.ledger.for_role("master")
        self.hooks = HookRunner(self.ledger, starter.system, starter.req.probes)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.go_sent = threading.Event()
        self.exec_checked = threading.Event()
        self.signals = SignalChannel()
        self.ctx = Context()
        self.container_sigchld = threading.Event()

    def main(self) -> int:
        linux.set_name("kit-master")
        signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        kind, message = _recv_control(self.sock)
        if kind != "R":
            self.ledger.emit("starter_error", stage="namespaces",
                             message=message or "container process died during setup")
            self.sock.close()
            self.rpc_sock.close()
            _, wstatus = os.waitpid(self.pid, 0)
            self.ledger.emit("process_exit", child_role="container", child_pid=self.pid,
                             status=wstatus)
            return EXIT_FATAL
        engine = registry.make_engine(self.starter.req.engine)
        try:
            self.hooks.init_engine(engine, self.common_json["engine_config"],
                                   self.common_json["container_id"], False)
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            self.ledger.emit("fatal", message=f"master initialisation failed: {_unwrap(exc)}")
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            return EXIT_FATAL
        self.engine = engine
        threading.Thread(target=self._signal_loop, name="kit-signals", daemon=True).start()
        threads = [threading.Thread(target=fn, name=name, daemon=True) for fn, name in (
            (self._create, "kit-create"), (self._start_waiter, "kit-start-waiter"),
            (self._monitor, "kit-monitor"))]
        for t in threads:
            t.start()

        fatal: BaseException | None = None
        status: int | None = None
        kind, value = self.events.get()
        if kind == "fatal":
            fatal = value
            self.ledger.emit("fatal", message=str(fatal), error=describe_error(fatal))
            self._kill_container()
            status = self._await_status()
        else:
            status = value
        if status is not None:
            self._await_container_sigchld()
        threads[0].join()
        threads[1].join()
        self._check_sentinel()
        while not self.events.empty():  # a fatal error of post_start after the status
            kind, value = self.events.get_nowait()
            if kind == "fatal" and fatal is None:
                fatal = value
                self.ledger.emit("fatal", message=str(fatal), error=describe_error(fatal))
        self.ctx.cancel()
        try:
            self.hooks.call("cleanup_container", engine.operations.cleanup_container,
                            self.ctx, fatal, status)
        except BaseException:  # noqa: BLE001 engine code may raise anything
            pass  # recorded by the hook runner; the exit code is unchanged
        if fatal is not None or status is None:
            return EXIT_FATAL
        return _status_to_code(status)

    def _check_sentinel(self) -> None:
        """Reap the starter's sentinel child; record it if someone else (the engine) did."""
        sentinel = getattr(self.starter, "sentinel", None)
        if not sentinel:
            return
        try:
            os.waitpid(sentinel, 0)
        except ChildProcessError:
            self.ledger.emit("foreign_reap", child_pid=sentinel, detail=(
                "a child of the master that is not the container (the kit's sentinel) was "
                "reaped by the engine: monitor_container must reap only the container's pid"))

    def _await_container_sigchld(self) -> None:
        """Hold the master until the signal thread has recorded the container's SIGCHLD.

        A monitor that waits on a pidfd reaps the container as soon as it exits, possibly
        before the signal thread has taken the SIGCHLD off the pending set: without this
        wait the master could finish and exit with the SIGCHLD never recorded (SIG-005).
        When SIGCHLD is ignored (an engine's doing) the kernel sends none: nothing to wait for.
        """
        if not linux.signal_ignored(signal.SIGCHLD):
            self.container_sigchld.wait(self.starter.req.hook_timeout)

    def _kill_container(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _await_status(self) -> int | None:
        """After a fatal error: the container's status from the monitor, or our own wait."""
        while True:
            try:
                kind, value = self.events.get(timeout=self.starter.req.hook_timeout)
            except queue.Empty:
                break
            if kind == "status":
                status: int | None = value
                return status
            if kind == "monitor_failed":
                break
        try:
            _, status = os.waitpid(self.pid, 0)
            return status
        except ChildProcessError:
            return None

    def _signal_loop(self) -> None:
        while True:
            info = signal.sigwaitinfo(MASTER_SIGNALS)
            if info.si_signo == signal.SIGCHLD and info.si_pid != self.pid \
                    and probe.is_probe_child(info.si_pid):
                # The exit of one of the kit's own probe children: not the engine's business,
                # unless the container's SIGCHLD was merged into it (standard signals
                # coalesce): peek, without reaping, whether the container has exited.
                if not self._container_exited():
                    continue
                info = signal.struct_siginfo((signal.SIGCHLD, 0, 0, self.pid, 0, 0, 0))
            if info.si_signo == signal.SIGCHLD and info.si_pid == self.pid:
                # Let the start waiter tell exec from exit before anyone can reap the
                # container: a monitor reaps it when it sees this SIGCHLD.
                self.exec_checked.wait(self.starter.req.hook_timeout)
            self.ledger.emit("signal", signum=info.si_signo,
                             name=signal.Signals(info.si_signo).name, sender=info.si_pid)
            self.signals.put(info.si_signo)
            if info.si_signo == signal.SIGCHLD and info.si_pid == self.pid:
                self.container_sigchld.set()

    def _container_exited(self) -> bool:
        try:
            found = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # already reaped by the engine
        return found is not None

    def _create(self) -> None:
        stop_watch = self._watch_creation()
        try:
            self.hooks.call("create_container", self.engine.operations.create_container,
                            self.ctx, self.pid, self.rpc_sock)
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            stop_watch()
            self.rpc_sock.close()
            _send(self.sock, "A")
            err = _unwrap(exc)
            self.events.put(("fatal", ContainerCreationFailed(
                f"container creation failed: {type(err).__name__}: {err}")))
            return
        stop_watch()
        self.rpc_sock.close()  # the RPC server exits; then stage 2 may start
        self.go_sent.set()
        _send(self.sock, "G")

    def _watch_creation(self) -> Callable[[], None]:
        """Until the returned function is called: if the container process dies (its
        pidfd) or the RPC server does (its end of the connection hangs up), cancel ``ctx``
        with the reason and shut the RPC connection down, so that create_container learns it
        at once instead of after a wait or a timeout."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            return lambda: None
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(self.rpc_sock.fileno(), select.POLLRDHUP)
        poller.register(wake_r, select.POLLIN)

        def watch() -> None:
            ready = dict(poller.poll())
            if wake_r in ready:
                return
            if pidfd not in ready and select.select([pidfd], [], [], 0.05)[0]:
                # The container's death takes its RPC server along, which may hang up
                # first: the container's end is the reason worth giving.
                ready[pidfd] = select.POLLIN
            if pidfd in ready:
                what = f"the container process (pid {self.pid}) died{_how_ended(self.pid)}"
            else:
                what = "the RPC server ended (its end of the connection was closed)"
            self.ctx.cancel(what)
            try:
                self.rpc_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        watcher = threading.Thread(target=watch, name="kit-create-watch", daemon=True)
        watcher.start()

        def stop() -> None:
            os.write(wake_w, b"x")
            watcher.join()
            for fd in (pidfd, wake_r, wake_w):
                os.close(fd)
        return stop

    def _start_waiter(self) -> None:
        try:
            exec_seen = self._wait_for_exec()
        finally:
            self.exec_checked.set()
        if not exec_seen:
            return
        self.ledger.emit("stage2_exec")
        try:
            self.hooks.call("post_start_process", self.engine.operations.post_start_process,
                            self.ctx, self.pid)
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            self.events.put(("fatal", _unwrap(exc)))

    def _wait_for_exec(self) -> bool:
        """True once the payload was exec'd; False when stage 2 failed or never started."""
        kind, message = _recv_control(self.sock)
        self.sock.close()
        if kind == "F":
            self.ledger.emit("stage2_failed", message=message)
            return False
        if not self.go_sent.is_set():
            return False  # create_container failed: the container never started stage 2
        # EOF: the close-on-exec end went away, by exec or by death. A dead stage 2 still
        # carries the kit's process name (exec renames it).
        if linux.process_name(self.pid) in (STAGE2_NAME, None):
            self.ledger.emit("stage2_failed", message="stage 2 died before exec")
            return False
        return True

    def _monitor(self) -> None:
        try:
            status = self.hooks.call("monitor_container",
                                     self.engine.operations.monitor_container,
                                     self.pid, self.signals)
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            self.events.put(("fatal", _unwrap(exc)))
            self.events.put(("monitor_failed", None))
            return
        if not isinstance(status, int):
            self.events.put(("fatal", TypeError(
                f"monitor_container returned {status!r}, not a wait status")))
            self.events.put(("monitor_failed", None))
            return
        self.events.put(("status", status))


class Container:
    """The container process (pid 1 of a new pid namespace): namespace setup, the RPC
    server, then stage 2."""

    def __init__(self, starter: Starter, common_json: dict[str, Any], sconf: StarterConfig,
                 sock: socket.socket, rpc_server_sock: socket.socket) -> None:
        self.starter = starter
        self.req = starter.req
        self.system = starter.system
        self.common_json = common_json
        self.sconf = sconf
        self.sock = sock
        self.rpc_sock = rpc_server_sock
        self.ledger = starter.ledger.for_role("container")

    def main(self) -> NoReturn:
        try:
            linux.set_name("kit-container")
            linux.set_parent_death_signal(signal.SIGKILL)
            kind, _ = _recv_control(self.sock)  # uid maps are written
            if kind != "M":
                _exit(EXIT_FATAL)
            if self.sconf.hybrid_workflow:
                # Cloned by the setuid starter (kuids U, 0, 0): become the id U maps to in
                # the new user namespace, which drops host root for good.
                u = self.starter.user
                gid = _inside_id(self.sconf.gid_mappings, u.gid)
                uid = _inside_id(self.sconf.uid_mappings, u.uid)
                self.system.become_user(uid, gid, None)
                rearm_parent_death(sock=self.sock)
            self.ledger.emit("process_start", ppid=self.system.getppid(),
                             nspid=[self.system.getpid()])
            self.setup_namespaces()
        except BaseException as exc:  # noqa: BLE001 the container reports any failure, then exits
            _send(self.sock, "E" + f"namespace setup failed: {type(exc).__name__}: {exc}")
            _exit(EXIT_FATAL)
        rpc_pid = None
        if not self.sconf.namespace_join_only:
            parent = os.getpid()
            rpc_pid = self.system.clone(share_fs=True)
            if rpc_pid == 0:
                self.sock.close()
                RPCServerProcess(self, parent).main()
        self.rpc_sock.close()
        _send(self.sock, "R")
        if rpc_pid is not None:
            _, status = os.waitpid(rpc_pid, 0)
            self.ledger.emit("process_exit", child_role="rpc", child_pid=rpc_pid, status=status)
        if self.sock.recv(1) != b"G":
            _exit(EXIT_FATAL)  # create_container failed: stage 2 never starts
        Stage2(self).main()

    def setup_namespaces(self) -> None:
        """Join or create each namespace in :data:`CONTAINER_NS_ORDER`, one at a time (a
        path wins over creating), then set the propagation of / in a new mount namespace;
        records the order and the propagation / then has."""
        s, system = self.sconf, self.system
        created = s.namespaces_created()
        order: list[list[str]] = []
        for kind in CONTAINER_NS_ORDER:
            if kind in s.ns_paths:
                system.setns(kind, s.ns_paths[kind])
                order.append(["setns", kind])
            elif kind in created:
                system.unshare([kind])
                order.append(["unshare", kind])
        propagation = None
        if "mount" in created:
            system.set_propagation("/", s.mount_propagation)
            propagation = system.propagation("/")
        if s.bring_loopback_interface:
            system.link_up("lo")
        self.ledger.emit("namespaces", created=created, joined=dict(s.ns_paths), order=order,
                         propagation=propagation,
                         ns={k: system.ns_inode(k) for k in linux.NAMESPACES})


class RPCServerProcess:
    """The RPC server: shares the container's namespaces, root and cwd (CLONE_FS)."""

    def __init__(self, container: Container, parent: int) -> None:
        self.c = container
        self.parent = parent
        self.ledger = container.ledger.for_role("rpc")

    def drop_privileges(self) -> None:
        req, system = self.c.req, self.c.system
        if req.flow in ("suid", "hybrid"):
            keep = linux.caps_to_mask(RPC_SERVER_CAPS)
            system.limit_bounding(keep)
            ruid, euid, _ = system.getresuid()
            if req.flow == "hybrid":
                ruid = euid  # inside the container's user namespace, U is ns root
            # e=U with keep-caps: permitted survives, effective cleared; then only
            # CAP_SYS_ADMIN effective (a method may raise more on its own thread).
            system.set_keepcaps(True)
            system.setresuid(ruid, ruid, -1)
            system.set_keepcaps(False)
            system.set_capabilities(linux.caps_to_mask(["CAP_SYS_ADMIN"]), keep, 0)
        rearm_parent_death(self.parent)

    def _creds(self) -> dict[str, Any] | None:
        """The calling thread's credentials (uids, gids, capability sets, no_new_privs), the
        process's root directory, and every thread's whole credential."""
        if not self.c.req.probes:
            return None
        try:
            snap = wire_snapshot(self.c.system)
        except Exception:  # noqa: BLE001 a probe failure: no credentials to record
            return None
        me = own_thread(snap)
        if me is None:
            return None
        # Every thread and the user namespace's map too: the privilege rules hold for every
        # thread around every method (SPEC §4), not only for the one serving it.
        return {**{k: me.get(k) for k in ("uid", "gid", "groups", "caps", "no_new_privs",
                                          "seccomp")},
                "root": snap.get("root"), "threads": snap["threads"],
                "uid_map": snap.get("uid_map"), "securebits": snap.get("securebits")}

    def main(self) -> NoReturn:
        code = EXIT_FATAL
        try:
            linux.set_name("kit-rpc")
            self.drop_privileges()
            self.ledger.emit("process_start", ppid=self.c.system.getppid(),
                             nspid=[self.c.system.getpid()])
            hooks = HookRunner(self.ledger, self.c.system, self.c.req.probes)
            engine = registry.make_engine(self.c.req.engine)
            hooks.init_engine(engine, self.c.common_json["engine_config"],
                              self.c.common_json["container_id"], False)
            observed: list[dict[str, Any]] = []

            def around(method: Callable[..., Any]) -> Callable[..., Any]:
                @functools.wraps(method)
                def observed_method(*args: Any, **kwargs: Any) -> Any:
                    before = self._creds()
                    try:
                        return method(*args, **kwargs)
                    finally:
                        observed.append({"before": before, "after": self._creds()})
                return observed_method

            def on_call(record: dict[str, Any]) -> None:
                creds = observed.pop() if observed else None
                observed.clear()
                self.ledger.emit("rpc_call", **record, creds=creds)

            code = registry.serve_rpc_requests(
                engine, self.c.rpc_sock, on_call=on_call, around=around,
                reserved_fds=(self.c.starter.ledger_sock.fileno(),))
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            self.ledger.emit("starter_error", stage="rpc_server",
                             message=describe_error(exc)["traceback"])
        _exit(code)


class Stage2:
    """The container process after setup: target credentials, then start_process."""

    def __init__(self, container: Container) -> None:
        self.c = container
        self.ledger = container.ledger.for_role("stage2")

    def target_ids(self) -> tuple[int, list[int]]:
        """(uid, gids) of stage 2 as the container sees them (SPEC §4)."""
        s, flow, u = self.c.sconf, self.c.req.flow, self.c.starter.user
        if flow == "root":
            uid = s.target_uid if s.target_uid is not None else 0
            gids = s.target_gids or [0]
            return uid, gids
        in_userns = s.uses_namespace("user")
        if not in_userns:
            return u.uid, [u.gid]
        # Inside a user namespace: the id that U maps to (or a mapped target id).
        uid = _inside_id(s.uid_mappings, u.uid)
        gid = _inside_id(s.gid_mappings, u.gid)
        if s.target_uid is not None and _is_mapped(s.uid_mappings, s.target_uid):
            uid = s.target_uid
        gids = [gid]
        if s.target_gids and all(_is_mapped(s.gid_mappings, g) for g in s.target_gids):
            gids = list(s.target_gids)
        return uid, gids

    def apply_credentials(self) -> None:
        s, system = self.c.sconf, self.c.system
        # A set left unset is empty at exec, the bounding set too (SPEC §5): a full bounding
        # set would hand a root payload every capability at exec.
        caps = {k: linux.caps_to_mask(v or ()) for k, v in s.capabilities.items()}
        system.limit_bounding(caps["bounding"])
        uid, gids = self.target_ids()
        in_userns = s.uses_namespace("user")
        groups = None  # setuid flows keep U's supplementary groups; a userns may deny them
        if self.c.req.flow == "root" or (in_userns and s.allow_setgroups):
            groups = gids[1:]
        system.become_user(uid, gids[0], groups, keep_caps=True)
        system.set_capabilities(caps["effective"], caps["permitted"], caps["inheritable"])
        system.set_ambient(caps["ambient"])
        if s.no_new_privs:
            system.set_no_new_privs()
        rearm_parent_death(sock=self.c.sock)

    def close_fds(self, master_fd: int) -> None:
        keep = {0, 1, 2, master_fd, *self.c.sconf.keep_fds}
        ledger_fd = self.c.starter.ledger_sock.fileno()
        keep.add(ledger_fd)  # close-on-exec: gone with the exec
        fd = 3
        # Up to the hard limit, not a fixed 65536: hosts often allow far more open fds, and
        # one above a fixed bound would reach the payload.
        ceiling = max(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536, *keep) + 1
        for k in sorted(keep | {ceiling}):
            if k >= fd:
                os.closerange(fd, k)
                fd = k + 1
        for k in self.c.sconf.keep_fds:
            os.set_inheritable(k, True)

    def main(self) -> NoReturn:
        sock = self.c.sock
        try:
            self.apply_credentials()
            default_signals(for_exec=True)
            self.ledger.emit("process_start", ppid=self.c.system.getppid(),
                             nspid=[self.c.system.getpid()])
            hooks = HookRunner(self.ledger, self.c.system, self.c.req.probes)
            engine = registry.make_engine(self.c.req.engine)
            hooks.init_engine(engine, self.c.common_json["engine_config"],
                              self.c.common_json["container_id"], False)
            master_fd = sock.fileno()
            self.close_fds(master_fd)
            linux.set_name(STAGE2_NAME)
            me = os.getpid()

            def reported_exit(code: int) -> NoReturn:  # exiting is allowed; tell the master
                if os.getpid() == me:  # not in a child forked by the engine or a probe
                    _send(sock, f"Fstart_process exited with code {code} instead of exec")
                _REAL_EXIT(code)

            os._exit = reported_exit  # type: ignore[assignment]
            hooks.call("start_process", engine.operations.start_process, master_fd)
            message = "stage 2 returned: start_process must exec the payload or exit"
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            err = _unwrap(exc)
            message = f"start_process failed: {type(err).__name__}: {err}"
        _send(sock, "F" + message)
        _exit(EXIT_FATAL)


def _inside_id(maps: list[list[int]], host_id: int) -> int:
    for inside, outside, size in maps:
        if outside <= host_id < outside + size:
            return inside + host_id - outside
    return 65534


def _is_mapped(maps: list[list[int]], inside_id: int) -> bool:
    return any(inside <= inside_id < inside + size for inside, _, size in maps)
