"""The ledger: every event of a run, from every process, in one ordered list.

Transport: the supervisor creates a ``SOCK_SEQPACKET`` socketpair (close-on-exec) before it
forks the starter; every process of the run inherits the writing end and sends one datagram
per event, so events never interleave and their arrival order respects causality. The
supervisor numbers them (``seq``) as they arrive.

Schema (``SCHEMA_VERSION`` 1): a ledger is ``{"schema_version": 1, "run": {...}, "events":
[...]}``. Every event has ``seq``, ``t`` (CLOCK_MONOTONIC ns), ``kind``, ``role``, ``pid`` (as
the process sees itself), ``tid``; other keys depend on the kind (see :data:`EVENT_KINDS`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Iterable, Iterator

SCHEMA_VERSION = 1
MAX_EVENT = 1 << 20

ROLES = ("launcher", "supervisor", "starter", "stage1", "master", "rpc", "container",
         "stage2")

#: kind -> keys it carries besides the common ones.
EVENT_KINDS: dict[str, tuple[str, ...]] = {
    "run_start": ("engine", "flow", "backend", "invoker", "probes", "hook_timeout", "run_dir",
                  "host_userns"),
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
    "foreign_reap": ("child_pid", "detail"),
    "starter_exit": ("code",),
    "exit": ("code", "reason"),
}
COMMON_KEYS = ("seq", "t", "kind", "role", "pid", "tid")

_local = threading.local()


class LedgerWriter:
    """Sends events of one process to the run's ledger.

    Thread-safe: each event is one datagram. A process that forks creates a new writer with
    its own role (:meth:`for_role`) on the same socket.
    """

    def __init__(self, sock: socket.socket | None, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown ledger role {role!r}")
        self.sock = sock
        self.role = role
        self.pid = os.getpid()
        # The pid as the process sees it (1 for stage 2 in a new pid namespace); the fake
        # backend models it, hence the system interface.
        from kit.system import current
        self._getpid = lambda: current().getpid()

    def for_role(self, role: str) -> LedgerWriter:
        return LedgerWriter(self.sock, role)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown ledger event kind {kind!r}")
        event = {"t": time.monotonic_ns(), "kind": kind, "role": self.role,
                 "pid": self._getpid(), "tid": threading.get_native_id(), **fields}
        if self.sock is not None:
            data = json.dumps(event, separators=(",", ":"), default=repr).encode()
            if len(data) > MAX_EVENT:
                event = {**{k: event[k] for k in ("t", "kind", "role", "pid", "tid")},
                         "truncated": len(data)}
                data = json.dumps(event).encode()
            try:
                self.sock.send(data)
            except OSError:
                pass  # the supervisor is gone: the run is being torn down
        return event


def ledger_socketpair() -> tuple[socket.socket, socket.socket]:
    """(reader, writer), both close-on-exec so the payload never inherits them."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return reader, writer


def decode(datagram: bytes) -> dict[str, Any]:
    return decode_checked(datagram)[0]


def decode_checked(datagram: bytes) -> tuple[dict[str, Any], bool]:
    """(event, True) for a datagram holding an event; else (a ``starter_error`` event that
    describes it, False)."""
    try:
        event = json.loads(datagram)
        if not isinstance(event, dict) or "kind" not in event:
            raise ValueError("not an event object")
        return event, True
    except ValueError as exc:
        return {"kind": "starter_error", "role": "supervisor", "stage": "ledger",
                "message": f"undecodable ledger datagram ({exc}): {datagram[:200]!r}",
                "pid": 0, "tid": 0, "t": time.monotonic_ns()}, False


def validate(ledger: dict[str, Any]) -> list[str]:
    """Problems with a ledger document against the schema (empty when valid)."""
    problems = []
    if ledger.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {ledger.get('schema_version')!r} != {SCHEMA_VERSION}")
    events = ledger.get("events")
    if not isinstance(events, list):
        return problems + ["events is not a list"]
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


class Ledger:
    """A collected ledger with helpers to query it (used by tests and the suite)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.events: list[dict[str, Any]] = document["events"]

    def select(self, kind: str | Iterable[str] | None = None, **match: Any
               ) -> list[dict[str, Any]]:
        kinds = {kind} if isinstance(kind, str) else set(kind) if kind else None
        return [e for e in self.events
                if (kinds is None or e["kind"] in kinds)
                and all(e.get(k) == v for k, v in match.items())]

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
