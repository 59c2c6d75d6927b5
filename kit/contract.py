"""The engine contract: the eight operations an engine implements, and the objects they get."""

from __future__ import annotations

import abc
import dataclasses
import json
import queue
import signal
import threading
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

if typing.TYPE_CHECKING:
    from kit.starter.config import StarterConfig

__all__ = [
    "FORWARDED_SIGNALS",
    "Common",
    "ConfigError",
    "Context",
    "Engine",
    "EngineConfig",
    "Operations",
    "SignalChannel",
    "WaitStatus",
]


class ConfigError(ValueError):
    """An engine configuration (user input) or a StarterConfig setting is invalid.

    The message names the offending setting.
    """


# --- engine configuration ------------------------------------------------------------------

T = TypeVar("T", bound="EngineConfig")


@dataclass
class EngineConfig:
    """Base class of an engine's configuration: a dataclass whose fields are JSON values.

    Only the dataclass fields cross from stage 1 to the later processes (as JSON); any other
    attribute, and any module global set in stage 1, is gone there (``SPEC.md`` §2 rule 3).
    Fields may be ``str``, ``int``, ``float``, ``bool``, ``None``, lists, ``dict[str, …]``
    and nested ``EngineConfig`` dataclasses.

    ``argv`` is the payload's command line; the launcher fills it from ``kit run -- CMD``.
    """

    argv: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON-visible state: every dataclass field, recursively."""
        return {f.name: _dump(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def update_from_json(self, data: dict[str, Any], where: str = "engine config") -> None:
        """Set fields from ``data``; an unknown key or a value of the wrong type is a
        :class:`ConfigError` naming the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        hints = field_types(type(self))
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in data.items():
            if key not in names:
                raise ConfigError(
                    f"{where}: unknown field {key!r} (known: {', '.join(sorted(names))})"
                )
            setattr(self, key, _load(hints[key], value, f"{where}.{key}"))

    @classmethod
    def from_json(cls: type[T], data: dict[str, Any]) -> T:
        obj = cls()
        obj.update_from_json(data)
        return obj


#: Resolved type hints by config class (see :func:`field_types`).
FIELD_TYPES: dict[type[EngineConfig], dict[str, Any]] = {}


def field_types(cls: type[EngineConfig]) -> dict[str, Any]:
    """The resolved type hints of a config class, cached: resolving evaluates (compiles)
    every string annotation, a millisecond in each process of a run unless resolved once
    before the forks (:meth:`kit.starter.stage1.Starter.main`)."""
    hints = FIELD_TYPES.get(cls)
    if hints is None:
        hints = FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return hints


def _dump(value: Any) -> Any:
    if isinstance(value, EngineConfig):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _dump(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ConfigError(
        f"engine config value {value!r} of type {type(value).__name__} is not JSON-representable"
    )


def _load(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` (decoded JSON) against a type hint and convert nested configs."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _load(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {hint}")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if isinstance(hint, type) and issubclass(hint, EngineConfig):
        obj = hint()
        obj.update_from_json(value, where)
        return obj
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_load(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        _, item = typing.get_args(hint) or (str, Any)
        return {k: _load(item, v, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {hint!r} in engine config")


@dataclass
class Common:
    """What every process of a run knows about the engine (upstream ``config.Common``).

    It crosses process boundaries as JSON: ``engine_config`` is re-created in each process by
    the engine's :meth:`Operations.config` and filled from the JSON.
    """

    engine_name: str
    container_id: str
    engine_config: EngineConfig

    def to_json(self) -> dict[str, Any]:
        return {
            "engine_name": self.engine_name,
            "container_id": self.container_id,
            "engine_config": self.engine_config.to_json(),
        }


# --- runtime objects handed to hooks ----------------------------------------------------------


class Context:
    """The ``ctx`` of master hooks: a cancel event and an optional deadline.

    ``cancelled`` becomes true when the run is being torn down (a fatal error elsewhere, a
    timeout, the container process or the RPC server dying during ``create_container``); a
    hook that waits should wait on :meth:`wait` rather than sleep. ``reason`` says why, when
    the kit knows (e.g. "the container process (pid 1234) died: killed by signal 9").
    """

    def __init__(self, deadline: float | None = None) -> None:
        self._cancel = threading.Event()
        self.deadline = deadline  # time.monotonic() value, or None
        self.reason: str | None = None

    def cancel(self, reason: str | None = None) -> None:
        if reason is not None and self.reason is None:
            self.reason = reason
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until cancelled (True) or ``timeout`` seconds passed (False)."""
        if self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        return self._cancel.wait(timeout)


#: The signals a conformant monitor_container forwards to the container (SPEC §7); the kit
#: forwards the same where it stands in for one (``kit run``, a join-only run's starter).
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


class SignalChannel:
    """The ``signals`` channel given to :meth:`Operations.monitor_container`.

    The master puts every signal it receives here, in arrival order, before
    ``create_container`` starts. It is unbounded: nothing is dropped (unlike upstream's
    two-slot Go channel).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()

    def put(self, signum: int) -> None:
        self._queue.put(signum)

    def get(self, timeout: float | None = None) -> int | None:
        """The next signal number, or None when ``timeout`` expires first."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def empty(self) -> bool:
        return self._queue.empty()


WaitStatus = int
"""A raw wait status as returned by ``os.waitpid`` (decode with ``os.waitstatus_to_exitcode``)."""


# --- the operations ------------------------------------------------------------------------


class Operations(abc.ABC):
    """The eight operations of an engine, called by the kit's starter.

    An instance is created in every process of a run (the kit re-creates it from the
    registered class); state needed across processes must travel in the engine config.
    ``self.common`` is set by :meth:`init_config`.

    Privilege states below are those of ``SPEC.md`` §4, per flow: root, suid (setuid starter),
    userns, fakeroot, hybrid.

    The master's hooks run with every signal blocked (the kit reads them from a signalfd and
    puts them on the ``signals`` channel), and a child process they start inherits that mask
    across exec: such a helper ignores SIGTERM until it unblocks it, so stop it with SIGKILL
    (``Popen.kill()``) or have it reset its signal mask first.

    This restates Apptainer's runtime-engine interface (``internal/pkg/runtime/engine``) for Python.
    The starter (:mod:`kit.starter`) calls the operations in a fixed order, each in its own process
    with a documented privilege state (``SPEC.md`` §2 and §4). The docstrings of this class are the
    contract an engine author codes against.
    """

    #: Set by init_config; the decoded Common of this process.
    common: Common

    @abc.abstractmethod
    def config(self) -> EngineConfig:
        """Return a fresh, empty engine configuration object (never a shared one).

        Runs first in every process (stage 1, master, RPC server, stage 2).
        """

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        """Store the decoded :class:`Common`. Runs in every process, right after ``config``.

        ``privileged_stage1`` is true only in stage 1 of the ``suid`` and ``hybrid`` flows.
        The default stores ``common`` on ``self.common``.
        """
        self.common = common

    @abc.abstractmethod
    def prepare_config(self, starter_config: StarterConfig) -> None:
        """Validate the engine config and fill ``starter_config`` (namespaces, target
        uid/gids, capabilities, flags). Stage 1, before any container namespace exists.

        Privileges: root flow uid 0 with full caps; suid/hybrid r=e=s=U, no capabilities,
        escalation impossible; userns/fakeroot U, no host privilege. Raise
        :class:`ConfigError` (naming the setting) to refuse; the run then exits 255 and no
        other hook runs.
        """

    @abc.abstractmethod
    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        """Prepare the container (mounts, hostname, network…) through RPC calls.

        Runs in the master, in a thread, concurrently with the start waiter and
        ``monitor_container``. ``pid`` is the container process as the master sees it;
        ``rpc_conn`` is a connected socket to the RPC server (build a client with
        ``kit.rpc.RPCClient(rpc_conn, self.common.engine_name)``). The kit closes the
        connection when this returns; only then may stage 2 start, so never wait here for the
        container (that deadlocks and is reported as a hook timeout). Raising makes the run
        fatal: ``cleanup_container`` gets "container creation failed: …", exit 255.

        If the container process or the RPC server dies while this runs, the kit cancels
        ``ctx`` at once (``ctx.wait`` returns True, ``ctx.reason`` names the process and how
        it ended) and shuts ``rpc_conn`` down: a call in progress or made afterwards fails
        at once (``ConnectionError``/``EOFError``), never after a timeout.

        Privileges: root uid 0; suid/hybrid r=e=U, saved uid 0, no effective capabilities at
        entry and return (a hook may raise them temporarily); userns/fakeroot inside the
        container's user namespace, no host privilege.
        """

    @abc.abstractmethod
    def start_process(self, master_fd: int) -> None:
        """Become the payload: exec it (``os.execve``) or exit; never return.

        Runs in stage 2, the container process, with the target credentials and capabilities
        already applied. ``master_fd`` is stage 2's end of the master socket (close-on-exec:
        its closing on exec tells the master the payload started). Raising reports a stage-2
        failure (the kit writes the failure byte, exit 255, no ``post_start_process``);
        returning is a failure too ("stage 2 returned").
        """

    def post_start_process(self, ctx: Context, pid: int) -> None:  # noqa: B027 optional hook
        """Runs in the master once, after the payload was exec'd (never after a stage 2
        failure). Raising makes the run fatal (exit 255). Default: nothing."""

    @abc.abstractmethod
    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        """Block until the container process ``pid`` exits and return its wait status.

        Runs in the master concurrently with ``create_container``. Forward SIGINT, SIGTERM,
        SIGHUP, SIGUSR1 and SIGUSR2 from ``signals`` to ``pid``; reap only ``pid``.
        """

    @abc.abstractmethod
    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        """Tear everything down. Runs exactly once per master run, after the first fatal
        error (``fatal``) or the container's exit (``status``). Must tolerate any partial
        setup and be idempotent. Raising is reported; the exit code is unchanged."""


@dataclass
class Engine:
    """An engine instance in one process: its :class:`Operations` plus its :class:`Common`."""

    name: str
    operations: Operations
    common: Common | None = None
    HOOKS: ClassVar[tuple[str, ...]] = (
        "config",
        "init_config",
        "prepare_config",
        "create_container",
        "start_process",
        "post_start_process",
        "monitor_container",
        "cleanup_container",
    )


def dumps(obj: Any) -> str:
    """Canonical compact JSON used wherever the kit serialises state."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)
