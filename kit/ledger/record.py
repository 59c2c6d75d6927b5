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

# Kinds, their keys and the datagram checks all come from the TypedDicts of events.py; the
# names re-exported here are the ones this module's users have always read from it.
from kit.ledger.events import COMMON_FIELDS, FIELDS, SET_ON_ARRIVAL
from kit.ledger.events import COMMON_KEYS as COMMON_KEYS
from kit.ledger.events import EVENT_KINDS as EVENT_KINDS
from kit.ledger.events import MAX_NAME as MAX_NAME
from kit.ledger.events import MAX_TEXT as MAX_TEXT
from kit.ledger.events import REQUIRED as REQUIRED
from kit.ledger.events import ROLES as ROLES
from kit.ledger.events import RUN_ROLES as RUN_ROLES
from kit.ledger.events import SUPERVISOR_KINDS as SUPERVISOR_KINDS
from kit.ledger.probe import named_caps
from kit.system import current

SCHEMA_VERSION = 1
MAX_EVENT = 1 << 20

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
    fields = FIELDS[kind]
    for key, field in COMMON_FIELDS.items():
        if field.required and key not in SET_ON_ARRIVAL and key not in event:
            return f"{kind} event without {key!r}"
    extra = sorted(k for k in event if k not in fields)
    if extra:
        return f"{kind} event with keys outside the schema: {_short(extra)}"
    if "truncated" not in event:
        missing = [k for k in REQUIRED[kind] if k not in event]
        if missing:
            return f"{kind} event without {missing[0]!r}"
    for key, value in event.items():
        field = fields[key]
        if key not in SET_ON_ARRIVAL and not field.check(value):
            return f"{kind} event: {key} must be {field.what}, not {_short(value)}"
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
