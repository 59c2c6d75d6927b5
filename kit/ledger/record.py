"""The ledger: every event of a run, from every process, in one ordered list."""

from __future__ import annotations

import array
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kit.contract import Engine
from kit.ledger.probe import named_caps
from kit.system import current

SCHEMA_VERSION = 1
MAX_EVENT = 1 << 20

ROLES = ("launcher", "supervisor", "starter", "stage1", "master", "rpc", "container", "stage2")

#: kind -> keys it carries besides the common ones.
EVENT_KINDS: dict[str, tuple[str, ...]] = {
    "run_start": (
        "engine",
        "flow",
        "backend",
        "invoker",
        "probes",
        "hook_timeout",
        "run_dir",
        "host_userns",
    ),
    "process_start": ("ppid", "nspid"),
    "hook_enter": ("hook", "snapshot", "escalation", "args", "caller"),
    "hook_return": ("hook", "snapshot", "result"),
    "hook_raise": ("hook", "snapshot", "error"),
    "rpc_call": ("method", "args", "ok", "error", "duration_ms", "creds"),
    "signal": ("signum", "name", "sender"),
    "container_start": ("container_pid", "created", "joined"),
    "namespaces": ("created", "joined", "order", "propagation", "ns"),
    "starter_config": ("config",),
    "stage2_exec": (),
    "stage2_failed": ("message",),
    "fatal": ("message", "error"),
    "starter_error": ("stage", "message"),
    "hook_timeout": ("hook", "hook_role", "hook_pid", "seconds", "open_hooks"),
    "process_exit": ("child_role", "child_pid", "status"),
    "leak": ("what", "detail"),
    "model_limit": ("reason",),
    "host_changes": ("changes", "omitted", "errors", "looks", "cost_ms"),
    "foreign_reap": ("child_pid", "detail"),
    "starter_exit": ("code",),
    "seccomp_filter": ("filter", "syscalls", "error", "reason"),
    "syscall_refused": (
        "syscall",
        "nr",
        "args",
        "category",
        "errno",
        "answered",
        "target_tid",
        "target",
        "process_role",
        "hook",
        "strings",
    ),
    "syscalls_unrecorded": ("count",),  # refused beyond kit.run.seccomp.MAX_RECORDED
    "exit": ("code", "reason"),
    "kit_injected": ("hook", "fault", "detail"),  # a fault the kit made (RunRequest.inject)
    "engine_fault": ("fault", "sender_pid", "sender_role", "open_hooks", "detail", "excerpt"),
}
COMMON_KEYS = ("seq", "t", "kind", "role", "pid", "tid")

#: Kinds only the supervisor writes: from any process of the run, they are forgeries.
SUPERVISOR_KINDS = frozenset(
    {"run_start", "hook_timeout", "leak", "exit", "engine_fault", "model_limit"}
)
#: Roles of the processes that share the ledger socket (the others write no datagram).
RUN_ROLES = frozenset(ROLES) - {"launcher", "supervisor"}
#: Longest identifier (role, kind, hook, method name…) and any other string in an event.
MAX_NAME = 256
MAX_TEXT = 64 << 10
#: How much of a rejected datagram its engine_fault event quotes.
EXCERPT = 200

_local = threading.local()


class LedgerWriter:
    """Sends events of one process to the run's ledger.

    Thread-safe: each event is one datagram. A process that forks creates a new writer with
    its own role (:meth:`for_role`) on the same socket.
    """

    def __init__(self, sock: socket.socket | None, role: str, confirm: bool = False) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown ledger role {role!r}")
        self.sock = sock
        self.role = role
        # Events with a privilege snapshot wait until the supervisor has read the sending
        # thread's credentials from outside this process (see confirm_send).
        self.confirm = confirm
        self.pid = os.getpid()
        # The pid as the process sees it (1 for stage 2 in a new pid namespace); the fake
        # backend models it, hence the system interface.
        self._getpid: Callable[[], int] = lambda: current().getpid()

    def for_role(self, role: str) -> LedgerWriter:
        return LedgerWriter(self.sock, role, self.confirm)

    def emit(
        self, kind: str, refresh: Callable[[], Any] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Send one event. ``refresh`` reads the snapshot again when the supervisor's own
        read disagreed with the one sent (a credential change in between)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown ledger event kind {kind!r}")
        event = {
            "t": time.monotonic_ns(),
            "kind": kind,
            "role": self.role,
            "pid": self._getpid(),
            "tid": threading.get_native_id(),
            **fields,
        }
        if self.sock is not None:
            data = json.dumps(event, separators=(",", ":"), default=repr).encode()
            if len(data) > MAX_EVENT:
                event = {
                    **{k: event[k] for k in ("t", "kind", "role", "pid", "tid")},
                    "truncated": len(data),
                }
                data = json.dumps(event).encode()
            try:
                if self.confirm and isinstance(event.get("snapshot"), dict):
                    for _ in range(SNAPSHOT_ATTEMPTS):
                        if confirm_send(self.sock, data) != RETRY:
                            break
                        if refresh is not None:
                            event["snapshot"] = refresh()
                            data = json.dumps(event, separators=(",", ":"), default=repr).encode()
                else:
                    self.sock.send(data)
            except OSError:
                pass  # the supervisor is gone: the run is being torn down
        return event


#: How long a sender waits for the supervisor's confirmation at most (it never takes that
#: long: the supervisor does nothing else; a dead one closes the pipe at once).
CONFIRM_TIMEOUT = 30.0
#: The supervisor's answers on a confirmation pipe: the snapshot agreed with its own read,
#: or it did not and the sender is to read its snapshot again and resend.
CONFIRMED, RETRY = b"k", b"r"
#: How many snapshots in a row may disagree with the supervisor's read before that counts as
#: a forgery: another thread's process-wide credential change (glibc's set*id reaches every
#: thread) can fall between a snapshot and the supervisor's read of it.
SNAPSHOT_ATTEMPTS = 3


def confirm_send(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` with the write end of a new pipe and wait until the supervisor answers
    on it (or closes it): it reads the calling thread's credentials itself
    (``/proc/PID/task/TID/status``) meanwhile, the snapshot's outside check that engine code
    in this process cannot fake (LEDGER-003). Returns the answer (empty: none)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
        os.close(w)
        w = -1
        if select.select([r], [], [], CONFIRM_TIMEOUT)[0]:
            return os.read(r, 1)
        return b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def ledger_socketpair() -> tuple[socket.socket, socket.socket]:
    """(reader, writer), both close-on-exec so the payload never inherits them; the reader
    receives each sender's credentials (``SO_PASSCRED``).

    The supervisor creates it before it forks the starter; every process of the run inherits the
    writing end and sends one datagram per event, so events never interleave and their arrival order
    respects causality. The supervisor numbers them (``seq``) as they arrive.
    """
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    # Before any datagram is sent: the kernel then names the sender of each (LEDGER-003).
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return reader, writer


# -- validation of what a run's process sends ---------------------------------------------
# An engine runs inside the run's processes and holds the ledger socket: every datagram is
# checked before the supervisor acts on it (SPEC §8, LEDGER-003).


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _of(t: type) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, t)


def _name(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= MAX_NAME


def _text(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= MAX_TEXT


def _hook(v: Any) -> bool:
    return isinstance(v, str) and v in Engine.HOOKS


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(_int(x) for x in v)


def _number(v: Any) -> bool:
    return (_int(v) or isinstance(v, float)) and v == v and abs(v) != float("inf")


def _any(v: Any) -> bool:
    return True


#: kind -> field -> (check, what it must be); a field listed as required (``REQUIRED``)
#: must be present, the others are checked when present. Fields with no entry here take
#: any JSON value.
FIELD_TYPES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "*": {
        "t": (_int, "an integer"),
        "kind": (_name, "a name"),
        "role": (lambda v: v in RUN_ROLES, f"one of {sorted(RUN_ROLES)}"),
        "pid": (lambda v: _int(v) and v >= 0, "a pid"),
        "tid": (lambda v: _int(v) and v >= 0, "a thread id"),
        "truncated": (_int, "an integer"),
    },
    "hook": {
        "hook": (_hook, "a hook of the contract"),
        "snapshot": (_opt(_of(dict)), "an object or null"),
        "escalation": (_opt(_of(dict)), "an object or null"),
        "args": (_of(dict), "an object"),
        "caller": (lambda v: v in ("kit", "engine"), "kit or engine"),
        "error": (_of(dict), "an object"),
        "result": (_any, ""),
    },
    "rpc_call": {
        "method": (_opt(_name), "a name or null"),
        "ok": (_of(bool), "a boolean"),
        "args": (_opt(_of(dict)), "an object or null"),
        "error": (_opt(_of(dict)), "an object or null"),
        "duration_ms": (_number, "a number"),
        "creds": (_opt(_of(dict)), "an object or null"),
    },
    "signal": {
        "signum": (_int, "an integer"),
        "name": (_name, "a name"),
        "sender": (_int, "a pid"),
    },
    "container_start": {
        "container_pid": (_int, "a pid"),
        "created": (_of(list), "a list"),
        "joined": (_of(list), "a list"),
    },
    "namespaces": {
        "created": (_of(list), "a list"),
        "joined": (_of(dict), "an object"),
        "order": (_of(list), "a list"),
        "propagation": (_opt(_name), "a name"),
        "ns": (_of(dict), "an object"),
    },
    "starter_config": {"config": (_of(dict), "an object")},
    "process_start": {"ppid": (_int, "a pid"), "nspid": (_ints, "a list of pids")},
    "process_exit": {
        "child_role": (lambda v: v in ROLES, "a role"),
        "child_pid": (_int, "a pid"),
        "status": (_opt(_int), "a wait status"),
    },
    "foreign_reap": {"child_pid": (_int, "a pid"), "detail": (_text, "a text")},
    "starter_exit": {"code": (_int, "an integer")},
    "message": {
        "message": (_text, "a text"),
        "stage": (_name, "a name"),
        "error": (_opt(_of(dict)), "an object or null"),
    },
}
_TYPES_OF = {
    "hook_enter": "hook",
    "hook_return": "hook",
    "hook_raise": "hook",
    "kit_injected": "hook",
    "stage2_failed": "message",
    "fatal": "message",
    "starter_error": "message",
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "hook_enter": ("hook",),
    "hook_return": ("hook",),
    "hook_raise": ("hook",),
    "kit_injected": ("hook", "fault"),
    "process_exit": ("child_role", "child_pid"),
    "container_start": ("container_pid",),
    "signal": ("signum",),
    "rpc_call": ("ok",),
}


def check_event(event: Any) -> str | None:
    """What is wrong with an event that a process of the run sent (None when nothing): an
    object, a kind of the schema that such a process may write, the common keys, only the
    kind's keys, each of the right type and size."""
    if not isinstance(event, dict):
        return f"not an event object but {type(event).__name__}"
    kind = event.get("kind")
    if not isinstance(kind, str) or kind not in EVENT_KINDS:
        return f"unknown event kind {_short(kind)}"
    if kind in SUPERVISOR_KINDS:
        return f"a {kind!r} event, which only the supervisor writes"
    for key in ("t", "role", "pid", "tid"):
        if key not in event:
            return f"{kind} event without {key!r}"
    allowed = set(COMMON_KEYS) | set(EVENT_KINDS[kind]) | {"truncated"}
    extra = sorted(k for k in event if k not in allowed)
    if extra:
        return f"{kind} event with keys outside the schema: {_short(extra)}"
    if "truncated" not in event:
        missing = [k for k in REQUIRED.get(kind, ()) if k not in event]
        if missing:
            return f"{kind} event without {missing[0]!r}"
    types = {**FIELD_TYPES["*"], **FIELD_TYPES.get(_TYPES_OF.get(kind, kind), {})}
    for key, value in event.items():
        check, what = types.get(key, (_any, ""))
        if not check(value):
            return f"{kind} event: {key} must be {what}, not {_short(value)}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def decode(datagram: bytes) -> dict[str, Any]:
    return decode_checked(datagram)[0]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_datagram(datagram: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(event, None) for a datagram holding a JSON object with a kind; else (None, why)."""
    try:
        event = json.loads(datagram, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        return None, f"not JSON ({str(exc)[:100]})"
    if not isinstance(event, dict) or "kind" not in event:
        return None, "not an event object"
    return event, None


def decode_checked(datagram: bytes) -> tuple[dict[str, Any], bool]:
    """(event, True) for a datagram holding an event; else (a ``starter_error`` event that
    describes it, False)."""
    event, problem = parse_datagram(datagram)
    if event is not None:
        return event, True
    return {
        "kind": "starter_error",
        "role": "supervisor",
        "stage": "ledger",
        "message": f"undecodable ledger datagram ({problem}): {datagram[:200]!r}",
        "pid": 0,
        "tid": 0,
        "t": time.monotonic_ns(),
    }, False


def validate(ledger: dict[str, Any]) -> list[str]:
    """Problems with a ledger document against the schema (empty when valid)."""
    problems = []
    if ledger.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {ledger.get('schema_version')!r} != {SCHEMA_VERSION}")
    events = ledger.get("events")
    if not isinstance(events, list):
        return [*problems, "events is not a list"]
    for i, ev in enumerate(events):
        for key in COMMON_KEYS:
            if key not in ev:
                problems.append(f"event {i} ({ev.get('kind')}): missing {key!r}")
        kind = ev.get("kind")
        if kind not in EVENT_KINDS:
            problems.append(f"event {i}: unknown kind {kind!r}")
        elif ev.get("role") not in ROLES:
            problems.append(f"event {i}: unknown role {ev.get('role')!r}")
        if ev.get("seq") != i:
            problems.append(f"event {i}: seq {ev.get('seq')!r} out of order")
    return problems


def _name_caps(event: dict[str, Any]) -> None:
    """Capability masks of an event's snapshot and RPC credentials (the datagrams' compact
    form, :func:`kit.ledger.probe.snapshot`) as lists of names, in place: what a ledger shows."""

    def threads(entries: Any) -> None:
        for t in entries if isinstance(entries, list) else ():
            if isinstance(t, dict) and "caps" in t:
                t["caps"] = named_caps(t["caps"])

    snap = event.get("snapshot")
    if isinstance(snap, dict):
        threads(snap.get("threads"))
    creds = event.get("creds")
    for side in creds.values() if isinstance(creds, dict) else ():
        if isinstance(side, dict):
            if "caps" in side:
                side["caps"] = named_caps(side["caps"])
            threads(side.get("threads"))


class Ledger:
    """A collected ledger with helpers to query it (used by tests and the suite).

    Schema (``SCHEMA_VERSION`` 1): a ledger is ``{"schema_version": 1, "run": {...}, "events":
    [...]}``. Every event has ``seq``, ``t`` (CLOCK_MONOTONIC ns), ``kind``, ``role``, ``pid`` (as
    the process sees itself), ``tid``; other keys depend on the kind (see :data:`EVENT_KINDS`).
    """

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.events: list[dict[str, Any]] = document["events"]
        for event in self.events:
            _name_caps(event)

    def select(self, kind: str | Iterable[str] | None = None, **match: Any) -> list[dict[str, Any]]:
        kinds = {kind} if isinstance(kind, str) else set(kind) if kind else None
        return [
            e
            for e in self.events
            if (kinds is None or e["kind"] in kinds)
            and all(e.get(k) == v for k, v in match.items())
        ]

    def hooks(self) -> Iterator[tuple[str, str]]:
        """(role, hook) of every hook entry, in order."""
        for e in self.events:
            if e["kind"] == "hook_enter":
                yield e["role"], e["hook"]

    def first(self, kind: str, **match: Any) -> dict[str, Any] | None:
        found = self.select(kind, **match)
        return found[0] if found else None

    def to_json(self) -> str:
        return json.dumps(self.document, indent=1)
