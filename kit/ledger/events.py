"""Ledger events, one TypedDict per kind: the one schema of writer, validator and readers."""

# No ``from __future__ import annotations`` here: TypedDict computes __required_keys__ from
# the evaluated Required/NotRequired wrappers, which a string annotation would hide (3.11).

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import NoneType, UnionType
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,
    Required,
    TypeAlias,
    TypedDict,
    Union,
    get_args,
    get_origin,
    is_typeddict,
)

from kit.contract import Engine

#: Any JSON value: the validator does not look inside (the kit reads it defensively).
Json: TypeAlias = Any
#: A JSON object of any content.
JsonObject: TypeAlias = dict[str, Any]

Role = Literal[
    "launcher", "supervisor", "starter", "stage1", "master", "rpc", "container", "stage2"
]
ROLES: tuple[Role, ...] = get_args(Role)
#: Roles of the processes that share the ledger socket (the others write no datagram).
RUN_ROLES: frozenset[str] = frozenset(ROLES) - {"launcher", "supervisor"}
#: Longest identifier (role, kind, hook, method name…) and any other string in an event.
MAX_NAME = 256
MAX_TEXT = 64 << 10


def _always(value: Any) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    """What a field's value must be beyond its type, for a datagram of a run's process to be
    accepted (``Annotated`` metadata): ``test`` sees only values of the right type; ``what``
    is how a rejection names the expectation."""

    what: str
    test: Callable[[Any], bool] = _always


# The value constraints a type cannot say; everything else follows from the annotations.
Name = Annotated[str, Rule("a name", lambda v: len(v) <= MAX_NAME)]
Text = Annotated[str, Rule("a text", lambda v: len(v) <= MAX_TEXT)]
Pid = Annotated[int, Rule("a pid")]
HookName = Annotated[str, Rule("a hook of the contract", lambda v: v in Engine.HOOKS)]
SenderRole = Annotated[Role, Rule(f"one of {sorted(RUN_ROLES)}", lambda v: v in RUN_ROLES)]


class Common(TypedDict):
    """Keys of every event (``kind`` is each kind's own literal)."""

    #: Numbered by the supervisor as events arrive; whatever a sender put there is replaced.
    seq: int
    #: CLOCK_MONOTONIC in ns.
    t: int
    role: SenderRole
    #: As the process sees itself (1 for stage 2 in a new pid namespace).
    pid: Annotated[int, Rule("a pid", lambda v: v >= 0)]
    tid: Annotated[int, Rule("a thread id", lambda v: v >= 0)]
    #: Set instead of the kind's keys when the event was larger than a datagram may be: such
    #: an event carries the common keys only, whatever its kind requires.
    truncated: NotRequired[int]


# -- what a run's processes send (a kit process; an engine may forge any of these) ----------


class ProcessStart(Common):
    kind: Literal["process_start"]
    ppid: NotRequired[Pid]
    nspid: NotRequired[Annotated[list[int], Rule("a list of pids")]]


class HookEnter(Common):
    kind: Literal["hook_enter"]
    hook: HookName
    snapshot: NotRequired[JsonObject | None]
    escalation: NotRequired[JsonObject | None]
    args: NotRequired[JsonObject]
    caller: NotRequired[Literal["kit", "engine"]]


class HookReturn(Common):
    kind: Literal["hook_return"]
    hook: HookName
    snapshot: NotRequired[JsonObject | None]
    result: NotRequired[Json]
    caller: NotRequired[Literal["kit", "engine"]]  # as its hook_enter's


class HookRaise(Common):
    kind: Literal["hook_raise"]
    hook: HookName
    snapshot: NotRequired[JsonObject | None]
    error: NotRequired[JsonObject]
    caller: NotRequired[Literal["kit", "engine"]]  # as its hook_enter's


class RpcCall(Common):
    kind: Literal["rpc_call"]
    method: NotRequired[Name | None]
    args: NotRequired[JsonObject | None]
    ok: bool
    error: NotRequired[JsonObject | None]
    duration_ms: NotRequired[float]
    creds: NotRequired[JsonObject | None]


class Signal(Common):
    kind: Literal["signal"]
    signum: int
    name: NotRequired[Name]
    sender: NotRequired[Pid]
    #: The container's SIGCHLD, taken by another child's pending one (signals do not queue).
    merged: NotRequired[bool]


class ContainerStart(Common):
    kind: Literal["container_start"]
    container_pid: Pid
    created: NotRequired[list[Json]]
    joined: NotRequired[list[Json]]
    sentinel_pid: NotRequired[Pid]
    rpc_conn: NotRequired[JsonObject]  # the master's RPC socket: inode, fd, fd_base


class Namespaces(Common):
    kind: Literal["namespaces"]
    created: NotRequired[list[Json]]
    joined: NotRequired[JsonObject]
    order: NotRequired[list[Json]]
    propagation: NotRequired[Annotated[Name | None, Rule("a name")]]
    ns: NotRequired[JsonObject]


class StarterConfig(Common):
    kind: Literal["starter_config"]
    config: NotRequired[JsonObject]


class Stage2Exec(Common):
    kind: Literal["stage2_exec"]


class Stage2Failed(Common):
    kind: Literal["stage2_failed"]
    message: NotRequired[Text]


class Fatal(Common):
    kind: Literal["fatal"]
    message: NotRequired[Text]
    error: NotRequired[JsonObject | None]


class StarterError(Common):
    kind: Literal["starter_error"]
    stage: NotRequired[Name]
    message: NotRequired[Text]


class ProcessExit(Common):
    kind: Literal["process_exit"]
    child_role: Annotated[Role, Rule("a role")]
    child_pid: Pid
    status: NotRequired[Annotated[int | None, Rule("a wait status")]]


class ForeignReap(Common):
    kind: Literal["foreign_reap"]
    child_pid: NotRequired[Pid]
    detail: NotRequired[Text]


class RpcConnKept(Common):
    """Copies of the RPC connection open when create_container returned (the master's)."""

    kind: Literal["rpc_conn_kept"]
    holders: Json
    shut_down: NotRequired[bool]
    detail: NotRequired[Text]


class MasterFdClosedEarly(Common):
    """Stage 2 closed its end of the master socket before it exec'd (the master's)."""

    kind: Literal["master_fd_closed_early"]
    detail: NotRequired[Text]


class StarterExit(Common):
    kind: Literal["starter_exit"]
    code: NotRequired[int]


class KitInjected(Common):
    """A fault the kit made (``RunRequest.inject``)."""

    kind: Literal["kit_injected"]
    hook: HookName
    fault: Json
    detail: NotRequired[Json]


# -- what the supervisor writes itself (SUPERVISOR_KINDS: from a process of the run, forged) --


class HostChanges(Common):
    kind: Literal["host_changes"]
    changes: NotRequired[Json]
    omitted: NotRequired[Json]
    errors: NotRequired[Json]
    looks: NotRequired[Json]
    cost_ms: NotRequired[Json]


class SeccompFilter(Common):
    kind: Literal["seccomp_filter"]
    filter: NotRequired[Json]
    syscalls: NotRequired[Json]
    error: NotRequired[Json]
    reason: NotRequired[Json]


class SyscallRefused(Common):
    kind: Literal["syscall_refused"]
    syscall: NotRequired[Json]
    nr: NotRequired[Json]
    args: NotRequired[Json]
    category: NotRequired[Json]
    errno: NotRequired[Json]
    answered: NotRequired[Json]
    target_tid: NotRequired[Json]
    target: NotRequired[Json]
    process_role: NotRequired[Json]
    hook: NotRequired[Json]
    strings: NotRequired[Json]


class SyscallsUnrecorded(Common):
    """Refusals beyond ``kit.run.seccomp.MAX_RECORDED``, counted."""

    kind: Literal["syscalls_unrecorded"]
    count: NotRequired[Json]


# -- what only the supervisor writes (a datagram of these kinds is a forgery) ----------------


class RunStart(Common):
    kind: Literal["run_start"]
    engine: str
    flow: str
    backend: str
    invoker: JsonObject
    probes: bool
    hook_timeout: float
    run_dir: str
    host_userns: Json
    #: In the host sandbox: the host's mount points it does not reproduce (kit.run.sandbox).
    sandbox_left_out: NotRequired[list[str]]


class HookTimeout(Common):
    kind: Literal["hook_timeout"]
    hook: str
    hook_role: str
    hook_pid: int
    seconds: float
    open_hooks: list[Json]


class Leak(Common):
    kind: Literal["leak"]
    what: str
    detail: str


class ModelLimit(Common):
    kind: Literal["model_limit"]
    reason: str


class Exit(Common):
    kind: Literal["exit"]
    code: int
    reason: str


class EngineFault(Common):
    kind: Literal["engine_fault"]
    fault: str
    sender_pid: int | None
    sender_role: str | None
    open_hooks: list[str]
    detail: str
    #: The datagram's first 200 bytes (record.EXCERPT), as UTF-8 with replacements.
    excerpt: str


Event = Union[  # noqa: UP007  (the members are read at run time: get_args)
    RunStart,
    ProcessStart,
    HookEnter,
    HookReturn,
    HookRaise,
    RpcCall,
    Signal,
    ContainerStart,
    Namespaces,
    StarterConfig,
    Stage2Exec,
    Stage2Failed,
    Fatal,
    StarterError,
    HookTimeout,
    ProcessExit,
    Leak,
    ModelLimit,
    HostChanges,
    ForeignReap,
    RpcConnKept,
    MasterFdClosedEarly,
    StarterExit,
    SeccompFilter,
    SyscallRefused,
    SyscallsUnrecorded,
    Exit,
    KitInjected,
    EngineFault,
]

#: Kinds only the supervisor writes: from any process of the run, they are forgeries.
SUPERVISOR_KINDS = frozenset(
    {
        "run_start",
        "hook_timeout",
        "leak",
        "exit",
        "engine_fault",
        "model_limit",
        # The checks read these as the kit's word: a forged empty host diff sent before the
        # supervisor's own would hide every host change.
        "host_changes",
        "seccomp_filter",
        "syscall_refused",
        "syscalls_unrecorded",
    }
)
#: Keys the supervisor sets on arrival (a sender's value is replaced, so never checked).
SET_ON_ARRIVAL = frozenset({"seq"})


# -- the validator, derived from the annotations ----------------------------------------------

Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Field:
    """One key of a kind: whether a datagram must carry it, and what its value must be."""

    name: str
    required: bool
    check: Check
    what: str


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return (_int(v) or isinstance(v, float)) and v == v and abs(v) != float("inf")


_SCALARS: dict[Any, tuple[Check, str]] = {
    Any: (_always, ""),
    int: (_int, "an integer"),
    float: (_number, "a number"),
    bool: (lambda v: isinstance(v, bool), "a boolean"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _strip(tp: Any) -> Any:
    """The type inside Required/NotRequired."""
    return get_args(tp)[0] if get_origin(tp) in (Required, NotRequired) else tp


@cache  # the common keys and the shared aliases recur in every kind: derived once each
def checker(tp: Any) -> tuple[Check, str]:
    """(test, what it must be) for a value of annotation ``tp``; raises TypeError for an
    annotation the datagram check cannot read (so a new field fails at import, not later)."""
    tp = _strip(tp)
    origin = get_origin(tp)
    if origin is Annotated:
        check, what = checker(get_args(tp)[0])
        for rule in tp.__metadata__:
            if isinstance(rule, Rule):
                check = _both(check, rule.test)
                what = rule.what
        return check, what
    if origin in (Union, UnionType):
        others = [a for a in get_args(tp) if a is not NoneType]
        if len(others) != 1 or len(others) == len(get_args(tp)):
            raise TypeError(f"only X | None unions are checked, not {tp}")
        inner, what = checker(others[0])
        return (lambda v: v is None or inner(v)), f"{what} or null"
    if origin is Literal:
        values = get_args(tp)
        # a tuple: membership compares, it never hashes (a forged list is just not in it)
        return (lambda v: isinstance(v, str) and v in values), " or ".join(values)
    if origin is dict or tp is dict:
        return (lambda v: isinstance(v, dict)), "an object"
    if origin is list or tp is list:
        item = get_args(tp)[0] if get_args(tp) else Any
        if item is Any:
            return (lambda v: isinstance(v, list)), "a list"
        each, what = checker(item)
        return (lambda v: isinstance(v, list) and all(each(x) for x in v)), f"a list of ({what})"
    if tp in _SCALARS:
        return _SCALARS[tp]
    raise TypeError(f"no datagram check for the annotation {tp!r}")


def _both(first: Check, second: Check) -> Check:
    if second is _always:
        return first
    return lambda v: first(v) and second(v)


def kind_of(cls: type) -> str:
    """The literal ``kind`` of an event TypedDict."""
    (kind,) = get_args(cls.__annotations__["kind"])
    return str(kind)


def fields_of(cls: type) -> dict[str, Field]:
    """Every key of an event TypedDict, in declaration order (common keys first)."""
    if not is_typeddict(cls):
        raise TypeError(f"{cls!r} is not a TypedDict")
    required: frozenset[str] = cls.__required_keys__  # type: ignore[attr-defined]
    out = {}
    # A TypedDict's own __annotations__ already merge its bases' and keep Required,
    # NotRequired and Annotated (what get_type_hints(include_extras=True) would give, at
    # half the import cost).
    for name, tp in cls.__annotations__.items():
        check, what = checker(tp)
        out[name] = Field(name, name in required, check, what)
    return out


EVENT_TYPES: dict[str, type] = {kind_of(cls): cls for cls in get_args(Event)}
FIELDS: dict[str, dict[str, Field]] = {kind: fields_of(cls) for kind, cls in EVENT_TYPES.items()}
COMMON_FIELDS: dict[str, Field] = fields_of(Common)
#: kind -> keys it carries besides the common ones.
EVENT_KINDS: dict[str, tuple[str, ...]] = {
    kind: tuple(k for k in fields if k not in COMMON_FIELDS and k != "kind")
    for kind, fields in FIELDS.items()
}
_COMMON_REQUIRED = [k for k, f in COMMON_FIELDS.items() if f.required]
#: The keys of every event in a ledger, in the order a ledger shows them (``kind`` is each
#: TypedDict's own: a TypedDict may not narrow a key of its base).
COMMON_KEYS: tuple[str, ...] = (*_COMMON_REQUIRED[:2], "kind", *_COMMON_REQUIRED[2:])
#: kind -> the keys besides the common ones that a datagram of the kind must carry.
REQUIRED: dict[str, tuple[str, ...]] = {
    kind: tuple(k for k in keys if FIELDS[kind][k].required) for kind, keys in EVENT_KINDS.items()
}
