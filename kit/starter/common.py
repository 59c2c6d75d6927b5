"""What every role of the starter shares: exit codes, hook runner, control messages."""

from __future__ import annotations

import ctypes
import functools
import importlib
import json
import os
import select
import signal
import socket
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from kit.contract import (
    Common,
    ConfigError,
    Engine,
    EngineConfig,
    Operations,
)
from kit.ledger import probe
from kit.ledger.record import LedgerWriter
from kit.starter import inject
from kit.starter.control import Control
from kit.system import System, linux

EXIT_FATAL = 255
#: The starter's exit code when engine code took its ledger socket (closed it, or put
#: another file under its number): nothing can be recorded any more, the supervisor names it.
EXIT_LEDGER_LOST = 254
STAGE2_NAME = "kit-stage2"
#: The container process's name until stage 2 takes :data:`STAGE2_NAME` (after its hooks
#: config and init_config).
CONTAINER_NAME = "kit-container"
#: Every name the container process carries before the payload's exec renames it.
PRE_EXEC_NAMES = (CONTAINER_NAME, STAGE2_NAME)
#: Hooks the supervisor does not time: they wait for the payload by design.
UNTIMED_HOOKS = ("monitor_container",)
#: Signals CPython itself ignores at start-up (it wants EPIPE and EFBIG, not death).
_PYTHON_IGNORED = (int(signal.SIGPIPE), int(signal.SIGXFSZ))
#: CPython's C signal module, whose calls take and return plain numbers.
_csignal: Any = importlib.import_module("_signal")
_CATCHABLE = tuple(
    int(s) for s in sorted(signal.valid_signals()) if s not in (signal.SIGKILL, signal.SIGSTOP)
)
_SIG_DFL, _SIG_IGN, _SIGINT = int(signal.SIG_DFL), int(signal.SIG_IGN), int(signal.SIGINT)


def default_signals(for_exec: bool = False) -> None:
    """Undo what the launcher's shell left: ignored signals back to their defaults, none
    blocked.

    An ignored signal stays ignored across fork and exec, and so does the signal mask: under
    ``nohup`` or a CI runner that ignores SIGHUP, the payload would otherwise inherit that and
    a forwarded SIGHUP would do nothing. SIGINT goes back to CPython's own handler, as in an
    interpreter started normally; ``for_exec`` (stage 2, just before the payload) also
    restores the two signals CPython ignores.
    """
    # The C module's calls: the wrappers of ``signal`` turn every number and handler into
    # an enum member, which costs more than the system calls (once per process of a run).
    for sig in _CATCHABLE:
        if sig in _PYTHON_IGNORED:
            if for_exec:
                _csignal.signal(sig, _SIG_DFL)
            continue
        if _csignal.getsignal(sig) == _SIG_IGN:
            _csignal.signal(sig, signal.default_int_handler if sig == _SIGINT else _SIG_DFL)
    _csignal.pthread_sigmask(signal.SIG_SETMASK, ())


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
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "errno": getattr(exc, "errno", None),
        # whole: the report shows it once as the root cause (a ledger event may be 1 MiB)
        "traceback": "".join(traceback.format_exception(exc))[-60000:],
    }


#: Parameter names of the hooks, for the ``args`` of hook_enter events.
HOOK_PARAMETERS: dict[str, tuple[str, ...]] = {
    "config": (),
    "init_config": ("common", "privileged_stage1"),
    "prepare_config": ("starter_config",),
    "create_container": ("ctx", "pid", "rpc_conn"),
    "start_process": ("master_fd",),
    "post_start_process": ("ctx", "pid"),
    "monitor_container": ("pid", "signals"),
    "cleanup_container": ("ctx", "fatal", "status"),
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
        key = (
            None
            if me is None
            else json.dumps(
                [
                    {k: v for k, v in me.items() if k != "tid"},
                    snap["ns"]["user"],
                    snap["uid_map"],
                    snap["securebits"],
                    snap.get("root"),
                ],
                sort_keys=True,
            )
        )
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

    def enter(
        self,
        hook: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        caller: str = "kit",
    ) -> None:
        names = HOOK_PARAMETERS.get(hook, ())
        arguments = {name: _argument(value) for name, value in zip(names, args, strict=False)}
        arguments.update({name: _argument(value) for name, value in (kwargs or {}).items()})
        snap = self._snap()
        extra = {"caller": caller} if caller != "kit" else {}
        self.ledger.emit(
            "hook_enter",
            hook=hook,
            snapshot=snap,
            escalation=self._escalation(snap),
            args=arguments,
            refresh=self._snap,
            **extra,
        )

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
            wrapped = inject.wrap(hook, original, self.ledger, _called_by_kit)
            setattr(ops, hook, self._recorded(hook, wrapped))

    def _recorded(self, hook: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            by_kit = getattr(_calls, "kit_hook", None) == hook
            _calls.kit_hook = None  # hooks called from inside this one are the engine's
            self.enter(hook, args, kwargs, "kit" if by_kit else "engine")
            extra = {} if by_kit else {"caller": "engine"}  # the end says whose call it was
            _calls.by_kit = by_kit  # for the injection inside (inject.wrap), read at once
            try:
                result = original(*args, **kwargs)
            except BaseException as exc:
                self.ledger.emit(
                    "hook_raise",
                    hook=hook,
                    snapshot=self._snap(),
                    error=describe_error(exc),
                    refresh=self._snap,
                    **extra,
                )
                if by_kit:
                    raise HookFailed(hook, exc) from exc
                raise  # the engine's own call gets its own exception back
            self.ledger.emit(
                "hook_return",
                hook=hook,
                snapshot=self._snap(),
                result=_summary(result),
                refresh=self._snap,
                **extra,
            )
            return result

        return recorded

    def init_engine(
        self,
        engine: Engine,
        config_json: dict[str, Any],
        container_id: str,
        privileged_stage1: bool,
    ) -> Common:
        """config then init_config (rule 1); returns the Common given to init_config."""
        ops = engine.operations
        self.instrument(ops)
        cfg = self.call("config", ops.config)
        if not isinstance(cfg, EngineConfig):
            raise StageFailed(
                f"{engine.name}.config() returned {type(cfg).__name__}, not an EngineConfig"
            )
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


def ledger_lost(exc: OSError) -> NoReturn:
    """The kit's processes without a ledger: exit at once (see :data:`EXIT_LEDGER_LOST`);
    in the starter (the master) the supervisor reports the code, in the others their end
    shows in the master's events."""
    _exit(EXIT_LEDGER_LOST)


#: The longest failure message a control socket carries; the kit's own are cut well short
#: of it (see :func:`_failure`), so that a longer one is not the kit's.
MAX_CONTROL_MESSAGE = 1 << 16
#: Characters of a failure message the kit sends (four bytes at most each in UTF-8).
_MAX_FAILURE_CHARS = MAX_CONTROL_MESSAGE // 8


class ControlProtocolError(Exception):
    """Bytes on a control socket that are no message the kit sends there (engine code in
    the process at the other end wrote them)."""


def _failure(kind: Control, message: str) -> str:
    """A failure message (E or F), cut to what :func:`_recv_control` accepts."""
    if len(message) > _MAX_FAILURE_CHARS:
        message = message[: _MAX_FAILURE_CHARS - 1] + "…"
    return kind + message


def _recv_control(sock: socket.socket, expected: str | None = None) -> tuple[str, str]:
    """One control byte and, for E/F, the message that follows up to EOF; ``expected``:
    the control bytes the other end may send here (default: any). Anything else, or a
    message longer than :data:`MAX_CONTROL_MESSAGE`, raises ControlProtocolError."""
    head = sock.recv(1)
    if not head:
        return "", ""
    kind = head.decode("ascii", errors="replace")
    if kind not in set(Control) or (expected is not None and kind not in expected):
        raise ControlProtocolError(f"{head!r} is no control message of the kit's here")
    if kind in (Control.SETUP_FAILED, Control.STAGE2_FAILED):
        chunks = []
        size = 0
        while data := sock.recv(65536):
            size += len(data)
            if size > MAX_CONTROL_MESSAGE:
                raise ControlProtocolError(
                    f"a failure message longer than {MAX_CONTROL_MESSAGE} bytes (the kit's "
                    "are shorter)"
                )
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


_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_VM = 0x100
_CLONE_VFORK = 0x4000
_EXIT_FN = ctypes.cast(_libc._exit, ctypes.c_void_p)
#: The exiting child's stack: it runs libc's _exit and nothing else.
_CHILD_STACK = ctypes.create_string_buffer(16384)
_ALL_SIGNALS = signal.valid_signals()


def rpc_conn_kept(copies: list[dict[str, Any]], seen: str = "") -> dict[str, Any]:
    """The fields of an ``rpc_conn_kept`` event for ``copies`` (``{"pid", "fd",
    "process"}`` each) of the RPC connection found when create_container returned; ``seen``:
    who found them, when not the master itself."""
    where = ", ".join(f"fd {c['fd']} of {c['process']}" for c in copies)
    return {
        "holders": copies,
        "shut_down": True,
        "detail": f"{where} still open when create_container returned (the kit shuts the "
        f"connection down{'; ' + seen if seen else ''})",
    }


def exiting_child() -> int:
    """A child that exits at once with status 0; its pid (reap it).

    Made by clone(CLONE_VM | CLONE_VFORK) running libc's ``_exit`` on a stack of its own:
    no page table is copied and no page touched (a fork of the starter and the exit of its
    copy cost about a millisecond of CPU each), and this process resumes only once the child
    has let go of its memory on its way out (a zombie moments later, as a forked one that
    exits at once would be). Signals are blocked around it: a handler must not run in a
    child that shares this interpreter's memory."""
    old = _csignal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
    try:
        top = ctypes.addressof(_CHILD_STACK) + len(_CHILD_STACK)
        pid: int = _libc.clone(
            _EXIT_FN,
            ctypes.c_void_p(top & ~15),
            ctypes.c_int(_CLONE_VM | _CLONE_VFORK | signal.SIGCHLD),
            ctypes.c_void_p(0),
        )
        if pid < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"clone: {os.strerror(err)}")
        return pid
    finally:
        _csignal.pthread_sigmask(signal.SIG_SETMASK, old)


def _called_by_kit() -> bool:
    """Whether the hook call being entered on this thread is the kit's (HookRunner.call)."""
    return bool(getattr(_calls, "by_kit", True))


def _unwrap(exc: BaseException) -> BaseException:
    """What the engine raised (the kit wraps hook errors in HookFailed)."""
    return exc.error if isinstance(exc, HookFailed) else exc


def _how_ended(pid: int) -> str:
    """ ": how" a child that has exited ended, without reaping it (the monitor reaps: when
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
