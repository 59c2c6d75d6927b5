"""The ledger: every event of a run, from every process, in one ordered list."""

from __future__ import annotations

import array
import errno
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, overload

# Kinds, their keys and the datagram checks all come from the TypedDicts of events.py; the
# names re-exported here are the ones this module's users have always read from it.
from kit.ledger import events as ev
from kit.ledger import probe
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
from kit.system import current, linux

SCHEMA_VERSION = 1
MAX_EVENT = 1 << 20

#: How much of a rejected datagram its engine_fault event quotes.
EXCERPT = 200

_local = threading.local()

#: What a send on the ledger socket fails with when its descriptor is no longer the ledger
#: socket (closed, or another file under its number): not the supervisor gone.
LOST_ERRNOS = frozenset(
    {errno.EBADF, errno.ENOTSOCK, errno.ENOTCONN, errno.EDESTADDRREQ, errno.EOPNOTSUPP}
)


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
        #: Called when the socket is lost (see LOST_ERRNOS): the kit's processes exit with
        #: a reason of their own rather than go on unrecorded. None: ignored.
        self.on_lost: Callable[[OSError], None] | None = None
        #: The datagram whose send found the socket lost (for :attr:`on_lost` to tell).
        self.lost: bytes | None = None
        #: What the socket is: a send failing while it still is lost something else (the
        #: pipe of a confirmation).
        self.identity = None if sock is None else linux.fd_identity(sock.fileno())
        self.pid = os.getpid()
        # The pid as the process sees it (1 for stage 2 in a new pid namespace); the fake
        # backend models it, hence the system interface.
        self._getpid: Callable[[], int] = lambda: current().getpid()

    def for_role(self, role: str) -> LedgerWriter:
        writer = LedgerWriter(self.sock, role, self.confirm)
        writer.on_lost, writer.identity = self.on_lost, self.identity
        return writer

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
                # The keys that say what happened (the hook, the child, the signal: small
                # scalars) stay, so the event still reads as what it was; the rest goes.
                # The snapshot or credentials stay too while they fit: a method's large
                # arguments must not take the record of what it left with them.
                full, size = event, len(data)
                kept = ["t", "kind", "role", "pid", "tid", *REQUIRED[kind]]
                kept += [k for k, v in full.items() if _small_scalar(v)]  # the method's name…
                for extra in (("snapshot", "creds"), ()):
                    event = {k: full[k] for k in (*kept, *extra) if k in full}
                    event["truncated"] = size
                    data = json.dumps(event, separators=(",", ":"), default=repr).encode()
                    if len(data) <= MAX_EVENT:
                        break
            try:
                place = _snapshot_place(event)
                if self.confirm and place is not None:
                    for attempt in range(SNAPSHOT_ATTEMPTS):
                        if confirm_send(self.sock, data) != RETRY:
                            break
                        # What moved between the read and the supervisor's may still move
                        # (a burst of threads starting under load): let it settle.
                        time.sleep(RETRY_PAUSE * 2**attempt)
                        if refresh is not None:
                            holder, key = place
                            holder[key] = refresh()
                            data = json.dumps(event, separators=(",", ":"), default=repr).encode()
                else:
                    self.sock.send(data)
            except OSError as exc:
                self._failed(exc, data)
        return event

    def _failed(self, exc: OSError, data: bytes) -> None:
        """A send failed: the supervisor is gone (the run is being torn down), or engine code
        took the socket (:attr:`on_lost`), or only a confirmation's pipe (the event goes
        unconfirmed, which the supervisor reports)."""
        if exc.errno not in LOST_ERRNOS or self.sock is None:
            return
        if linux.fd_identity(self.sock.fileno()) == self.identity:
            try:
                self.sock.send(data)
                return
            except OSError as again:
                exc = again
            if exc.errno not in LOST_ERRNOS:
                return
        if self.on_lost is not None:
            self.lost = data
            self.on_lost(exc)


def _small_scalar(value: Any) -> bool:
    return (
        value is None
        or isinstance(value, (bool, int, float))
        or (isinstance(value, str) and len(value) <= 256)
    )


def outside_checked(event: dict[str, Any]) -> dict[str, Any] | None:
    """The snapshot in ``event`` that the supervisor checks from outside the sending process
    (while the sender waits: :func:`confirm_send`): a hook's ``snapshot``, or the
    credentials an RPC method left (``creds["after"]`` of an rpc_call); None when it
    carries none."""
    place = _snapshot_place(event)
    return None if place is None else place[0][place[1]]


def _snapshot_place(event: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """(the dictionary that holds :func:`outside_checked`'s snapshot, its key)."""
    if isinstance(event.get("snapshot"), dict):
        return event, "snapshot"
    creds = event.get("creds")
    if event.get("kind") != "rpc_call" or not isinstance(creds, dict):
        return None
    return (creds, "after") if isinstance(creds.get("after"), dict) else None


#: How a process's failure message names the event the lost ledger socket kept from the ledger.
LOST_EVENT = "the event it could not record:"


def lost_event(data: bytes | None) -> str:
    """A lost datagram as a failure message tells it: ``hook_raise of start_process
    (OSError: …)``, ``hook_return of start_process``; empty when it is not a hook event."""
    try:
        event = json.loads(data or b"")
    except ValueError:
        return ""
    if not isinstance(event, dict) or not str(event.get("kind", "")).startswith("hook_"):
        return ""
    told = f"{event['kind']} of {event.get('hook')}"
    error = event.get("error")
    if isinstance(error, dict):
        told += f" ({error.get('type')}: {error.get('message')})"
    return told


#: How long a sender waits for the supervisor's confirmation at most (it never takes that
#: long: the supervisor does nothing else; a dead one closes the pipe at once).
CONFIRM_TIMEOUT = 30.0
#: The supervisor's answers on a confirmation pipe: the snapshot agreed with its own read,
#: or it did not and the sender is to read its snapshot again and resend.
CONFIRMED, RETRY = b"k", b"r"
#: How many snapshots in a row may disagree with the supervisor's read before that counts as
#: a forgery: another thread's process-wide credential change (glibc's set*id reaches every
#: thread) can fall between a snapshot and the supervisor's read of it, and so can the
#: threads a process starts or ends (the master starts three for its hooks at once). The
#: sender waits a little longer before each new read (RETRY_PAUSE, doubled each time).
SNAPSHOT_ATTEMPTS = 6
#: Seconds the sender waits before its first read again (then 2, 4, 8, 16 ms: ~31 in all).
RETRY_PAUSE = 0.001


def confirm_send(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` with the write end of a new pipe and wait until the supervisor answers
    on it (or closes it): it reads the credentials of every thread of this process itself
    (``/proc/PID/task/*/status``) meanwhile, the snapshot's outside check that engine code
    in this process cannot fake (LEDGER-003). Returns the answer (empty: none). Raises only
    when ``data`` was not sent."""
    # The supervisor reads every thread of this process: none of the kit's probe threads
    # may be in the middle of its escalation attempts then.
    with probe.quiet():
        return _confirm_send(sock, data)


def _confirm_send(sock: socket.socket, data: bytes) -> bytes:
    r, w = os.pipe2(os.O_CLOEXEC)
    # High up, as the ledger socket: engine code closing low numbers leaves them alone.
    r, w = linux.move_high(r, linux.fd_base()), linux.move_high(w, linux.fd_base())
    try:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
    except OSError:
        _close_quietly(r, w)
        raise
    # Sent: a pipe end lost from here on (engine code) leaves it unconfirmed, not resent.
    try:
        os.close(w)
        # poll, not select: the pipe may lie at or above FD_SETSIZE (1024), where select
        # cannot wait for it (a sender holding that many descriptors).
        waiting = select.poll()
        waiting.register(r, select.POLLIN)
        if waiting.poll(CONFIRM_TIMEOUT * 1000):
            return os.read(r, 1)
        return b""
    except OSError:
        return b""
    finally:
        _close_quietly(r)


def _close_quietly(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # closed already (by engine code)


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
    missing = [k for k in REQUIRED[kind] if k not in event]  # kept even when truncated
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


#: What ``json.loads(datagram, parse_constant=_no_constant)`` builds anew for each call
#: (a decoder and its scanner, a third of the cost of a small event), built once.
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _loads(datagram: bytes) -> Any:
    """``json.loads(datagram, parse_constant=_no_constant)`` through :data:`_DECODER`: the
    same encodings (UTF-8, -16 or -32, told by the first bytes) and the same errors."""
    return _DECODER.decode(datagram.decode(json.detect_encoding(datagram), "surrogatepass"))


def parse_datagram(datagram: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(event, None) for a datagram holding a JSON object with a kind; else (None, why)."""
    try:
        event = _loads(datagram)
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
    for i, event in enumerate(events):
        for key in COMMON_KEYS:
            if key not in event:
                problems.append(f"event {i} ({event.get('kind')}): missing {key!r}")
        kind = event.get("kind")
        if kind not in EVENT_KINDS:
            problems.append(f"event {i}: unknown kind {kind!r}")
        elif event.get("role") not in ROLES:
            problems.append(f"event {i}: unknown role {event.get('role')!r}")
        if event.get("seq") != i:
            problems.append(f"event {i}: seq {event.get('seq')!r} out of order")
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
    [...]}``, each event one of the TypedDicts of :mod:`kit.ledger.events` (:data:`Event`).
    ``events`` holds them as plain dicts for the readers that probe keys one by one; the
    queries give each kind its TypedDict (a cast: the supervisor checked every datagram when it
    arrived, and the events are the same objects).
    """

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.events: list[dict[str, Any]] = document["events"]
        for event in self.events:
            _name_caps(event)

    @overload
    def select(self, kind: Literal["run_start"], **match: Any) -> list[ev.RunStart]: ...
    @overload
    def select(self, kind: Literal["process_start"], **match: Any) -> list[ev.ProcessStart]: ...
    @overload
    def select(self, kind: Literal["hook_enter"], **match: Any) -> list[ev.HookEnter]: ...
    @overload
    def select(self, kind: Literal["hook_return"], **match: Any) -> list[ev.HookReturn]: ...
    @overload
    def select(self, kind: Literal["hook_raise"], **match: Any) -> list[ev.HookRaise]: ...
    @overload
    def select(self, kind: Literal["rpc_call"], **match: Any) -> list[ev.RpcCall]: ...
    @overload
    def select(self, kind: Literal["signal"], **match: Any) -> list[ev.Signal]: ...
    @overload
    def select(self, kind: Literal["container_start"], **match: Any) -> list[ev.ContainerStart]: ...
    @overload
    def select(self, kind: Literal["namespaces"], **match: Any) -> list[ev.Namespaces]: ...
    @overload
    def select(self, kind: Literal["starter_config"], **match: Any) -> list[ev.StarterConfig]: ...
    @overload
    def select(self, kind: Literal["stage2_exec"], **match: Any) -> list[ev.Stage2Exec]: ...
    @overload
    def select(self, kind: Literal["stage2_failed"], **match: Any) -> list[ev.Stage2Failed]: ...
    @overload
    def select(self, kind: Literal["fatal"], **match: Any) -> list[ev.Fatal]: ...
    @overload
    def select(self, kind: Literal["starter_error"], **match: Any) -> list[ev.StarterError]: ...
    @overload
    def select(self, kind: Literal["hook_timeout"], **match: Any) -> list[ev.HookTimeout]: ...
    @overload
    def select(self, kind: Literal["process_exit"], **match: Any) -> list[ev.ProcessExit]: ...
    @overload
    def select(self, kind: Literal["leak"], **match: Any) -> list[ev.Leak]: ...
    @overload
    def select(self, kind: Literal["model_limit"], **match: Any) -> list[ev.ModelLimit]: ...
    @overload
    def select(self, kind: Literal["host_changes"], **match: Any) -> list[ev.HostChanges]: ...
    @overload
    def select(self, kind: Literal["foreign_reap"], **match: Any) -> list[ev.ForeignReap]: ...
    @overload
    def select(self, kind: Literal["rpc_conn_kept"], **match: Any) -> list[ev.RpcConnKept]: ...
    @overload
    def select(
        self, kind: Literal["master_fd_closed_early"], **match: Any
    ) -> list[ev.MasterFdClosedEarly]: ...
    @overload
    def select(self, kind: Literal["starter_exit"], **match: Any) -> list[ev.StarterExit]: ...
    @overload
    def select(self, kind: Literal["seccomp_filter"], **match: Any) -> list[ev.SeccompFilter]: ...
    @overload
    def select(self, kind: Literal["syscall_refused"], **match: Any) -> list[ev.SyscallRefused]: ...
    @overload
    def select(
        self, kind: Literal["syscalls_unrecorded"], **match: Any
    ) -> list[ev.SyscallsUnrecorded]: ...
    @overload
    def select(self, kind: Literal["exit"], **match: Any) -> list[ev.Exit]: ...
    @overload
    def select(self, kind: Literal["kit_injected"], **match: Any) -> list[ev.KitInjected]: ...
    @overload
    def select(self, kind: Literal["engine_fault"], **match: Any) -> list[ev.EngineFault]: ...
    @overload
    def select(self, kind: str | Iterable[str] | None = None, **match: Any) -> list[ev.Event]: ...

    def select(self, kind: str | Iterable[str] | None = None, **match: Any) -> list[Any]:
        kinds = {kind} if isinstance(kind, str) else set(kind) if kind else None
        return [
            e
            for e in self.events
            if (kinds is None or e["kind"] in kinds)
            and all(e.get(k) == v for k, v in match.items())
        ]

    def hooks(self) -> Iterator[tuple[str, str]]:
        """(role, hook) of every hook entry, in order."""
        for e in self.select("hook_enter"):
            yield e["role"], e["hook"]

    @overload
    def first(self, kind: Literal["run_start"], **match: Any) -> ev.RunStart | None: ...
    @overload
    def first(self, kind: Literal["process_start"], **match: Any) -> ev.ProcessStart | None: ...
    @overload
    def first(self, kind: Literal["hook_enter"], **match: Any) -> ev.HookEnter | None: ...
    @overload
    def first(self, kind: Literal["hook_return"], **match: Any) -> ev.HookReturn | None: ...
    @overload
    def first(self, kind: Literal["hook_raise"], **match: Any) -> ev.HookRaise | None: ...
    @overload
    def first(self, kind: Literal["rpc_call"], **match: Any) -> ev.RpcCall | None: ...
    @overload
    def first(self, kind: Literal["signal"], **match: Any) -> ev.Signal | None: ...
    @overload
    def first(self, kind: Literal["container_start"], **match: Any) -> ev.ContainerStart | None: ...
    @overload
    def first(self, kind: Literal["namespaces"], **match: Any) -> ev.Namespaces | None: ...
    @overload
    def first(self, kind: Literal["starter_config"], **match: Any) -> ev.StarterConfig | None: ...
    @overload
    def first(self, kind: Literal["stage2_exec"], **match: Any) -> ev.Stage2Exec | None: ...
    @overload
    def first(self, kind: Literal["stage2_failed"], **match: Any) -> ev.Stage2Failed | None: ...
    @overload
    def first(self, kind: Literal["fatal"], **match: Any) -> ev.Fatal | None: ...
    @overload
    def first(self, kind: Literal["starter_error"], **match: Any) -> ev.StarterError | None: ...
    @overload
    def first(self, kind: Literal["hook_timeout"], **match: Any) -> ev.HookTimeout | None: ...
    @overload
    def first(self, kind: Literal["process_exit"], **match: Any) -> ev.ProcessExit | None: ...
    @overload
    def first(self, kind: Literal["leak"], **match: Any) -> ev.Leak | None: ...
    @overload
    def first(self, kind: Literal["model_limit"], **match: Any) -> ev.ModelLimit | None: ...
    @overload
    def first(self, kind: Literal["host_changes"], **match: Any) -> ev.HostChanges | None: ...
    @overload
    def first(self, kind: Literal["foreign_reap"], **match: Any) -> ev.ForeignReap | None: ...
    @overload
    def first(self, kind: Literal["rpc_conn_kept"], **match: Any) -> ev.RpcConnKept | None: ...
    @overload
    def first(
        self, kind: Literal["master_fd_closed_early"], **match: Any
    ) -> ev.MasterFdClosedEarly | None: ...
    @overload
    def first(self, kind: Literal["starter_exit"], **match: Any) -> ev.StarterExit | None: ...
    @overload
    def first(self, kind: Literal["seccomp_filter"], **match: Any) -> ev.SeccompFilter | None: ...
    @overload
    def first(self, kind: Literal["syscall_refused"], **match: Any) -> ev.SyscallRefused | None: ...
    @overload
    def first(
        self, kind: Literal["syscalls_unrecorded"], **match: Any
    ) -> ev.SyscallsUnrecorded | None: ...
    @overload
    def first(self, kind: Literal["exit"], **match: Any) -> ev.Exit | None: ...
    @overload
    def first(self, kind: Literal["kit_injected"], **match: Any) -> ev.KitInjected | None: ...
    @overload
    def first(self, kind: Literal["engine_fault"], **match: Any) -> ev.EngineFault | None: ...
    @overload
    def first(self, kind: str, **match: Any) -> ev.Event | None: ...

    def first(self, kind: str, **match: Any) -> Any:
        found = self.select(kind, **match)
        return found[0] if found else None

    def to_json(self) -> str:
        return json.dumps(self.document, indent=1)
