"""An in-process RPC transport for unit tests: the real codec and server, plus faults."""

from __future__ import annotations

import array
import collections
import errno as _errno
import inspect
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kit import system as kit_system
from kit.contract import Common, Engine, Operations
from kit.registry import RegistryError, find
from kit.rpc.client import RPCClient
from kit.rpc.codec import HEADER, MAX_FRAME, FrameError, close_fds, decode_body, encode_body
from kit.rpc.messages import (
    MAX_ID,
    ErrorInfo,
    ProtocolError,
    make_error,
    parse_reply,
    split_method_name,
)
from kit.rpc.methods import MethodSpec
from kit.rpc.server import CallRecord, prepare_methods, serve

__all__ = ["Call", "Fault", "MockTransport", "RecordingSystem", "Rule", "SystemCall"]

_FD_SIZE = array.array("i").itemsize
_SCM_MAX_FD = 253  # the kernel's limit per message: the relay never truncates what it relays
_RELAY_ANCBUF = socket.CMSG_SPACE(_SCM_MAX_FD * _FD_SIZE)
_CHUNK = 1 << 16
_PHASES = ("request", "reply")


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """What to do to one call; build it with the class methods below.

    ``phase`` says which frame is hit: ``"request"`` (before the server sees it; the method
    does not run) or ``"reply"`` (the method ran; its reply is affected).

    Faults, injected on the Nth call, by method name, or both (:meth:`MockTransport.inject`):

    ===========================  =======================================================
    ``Fault.errno(code)``        error reply ``OSError(code, strerror)`` built with the
                                 codec; the method does not run (nothing reaches the
                                 server)
    ``Fault.drop()``             the request is lost and the connection cut: the client
                                 gets ``ConnectionError``; ``phase="reply"``: the method
                                 runs, its reply is lost
    ``Fault.delay(s)``           hold the reply (or, ``phase="request"``, the request)
                                 *s* seconds
    ``Fault.truncate(keep)``     forward only the first *keep* bytes of the reply (or
                                 request), then cut the connection
    ``Fault.corrupt(at, data)``  overwrite bytes of the reply (or request) frame; the
                                 length is unchanged, so the stream stays in sync
    ``Fault.close()``            deliver the reply, then close the connection cleanly
                                 (the server "exits" after this call)
    ===========================  =======================================================
    """

    kind: str
    phase: str
    seconds: float = 0.0
    keep: int | None = None
    at: int = HEADER.size
    data: bytes = b"\xff"
    code: int | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.phase not in _PHASES:
            raise ValueError(
                f"Fault.{self.kind}: phase must be 'request' or 'reply', got {self.phase!r}"
            )

    @classmethod
    def errno(cls, code: int, message: str | None = None) -> Fault:
        """Answer with an error reply carrying errno *code* (the client raises
        ``OSError(code, message)``, e.g. ``PermissionError`` for ``EPERM``). *message* defaults
        to ``os.strerror(code)``. The request never reaches the server."""
        if isinstance(code, bool) or not isinstance(code, int) or code <= 0:
            raise ValueError(f"Fault.errno: code must be a positive errno number, got {code!r}")
        return cls("errno", "request", code=code, message=message)

    @classmethod
    def drop(cls, phase: str = "request") -> Fault:
        """Cut the connection: with ``phase="request"`` the request is lost (the method does
        not run); with ``phase="reply"`` the method runs and its reply is lost. Both ends see
        the connection go away: the client raises ``ConnectionError``, ``serve`` returns 0."""
        return cls("drop", phase)

    @classmethod
    def delay(cls, seconds: float, phase: str = "reply") -> Fault:
        """Hold the frame *seconds* before forwarding it (nothing else moves meanwhile: the
        server answers one request at a time anyway). A client socket timeout shorter than
        that raises ``TimeoutError`` in the client."""
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not 0 <= seconds < 3600
        ):
            raise ValueError(f"Fault.delay: seconds must be within [0, 3600), got {seconds!r}")
        return cls("delay", phase, seconds=float(seconds))

    @classmethod
    def truncate(cls, keep: int | None = None, phase: str = "reply") -> Fault:
        """Forward only the first *keep* bytes of the frame (default: the 4-byte header and
        half of the body), then cut the connection. A truncated reply makes the client raise
        ``ProtocolError`` (then ``ConnectionError`` on later calls); a truncated request makes
        the server end quietly (exit 0) and the client get ``ConnectionError``."""
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"Fault.truncate: keep must be a byte count >= 0, got {keep!r}")
        return cls("truncate", phase, keep=keep)

    @classmethod
    def corrupt(cls, at: int = HEADER.size, data: bytes = b"\xff", phase: str = "reply") -> Fault:
        """Overwrite the frame's bytes at offset *at* (counted from the frame's start: 0-3 is
        the length header, 4 the first body byte) with *data*; the frame keeps its length.
        The default makes the body invalid UTF-8: the client raises ``ProtocolError`` for a
        reply; the server answers a request with a ``ProtocolError`` reply and keeps serving.
        Overwriting the header changes the announced length: an oversized one is answered
        like any oversized frame, a smaller one desynchronises the stream (the receiver then
        waits for bytes that never come: use a client timeout)."""
        if isinstance(at, bool) or not isinstance(at, int) or at < 0:
            raise ValueError(f"Fault.corrupt: at must be an offset >= 0, got {at!r}")
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise ValueError("Fault.corrupt: data must be non-empty bytes")
        return cls("corrupt", phase, at=at, data=bytes(data))

    @classmethod
    def close(cls) -> Fault:
        """Deliver this call's reply, then close the connection cleanly (both ways): the next
        call raises ``ConnectionError``; ``serve`` returns 0."""
        return cls("close", "reply")


@dataclass
class Rule:
    """An injected fault and when it fires (see :meth:`MockTransport.inject`)."""

    fault: Fault
    method: str | None = None
    on_call: int | None = None
    times: int | None = None
    hits: int = 0

    def exhausted(self) -> bool:
        limit = 1 if self.on_call is not None else self.times
        return limit is not None and self.hits >= limit

    def matches(self, call: Call) -> bool:
        if self.exhausted():
            return False
        if self.method is not None and self.method not in (call.method, call.name):
            return False
        if self.on_call is not None:
            nth = call.index if self.method is None else call.nth
            if nth != self.on_call:
                return False
        return True


# --------------------------------------------------------------------------- recording


@dataclass
class Call:
    """One request frame that reached the transport, and what became of it.

    ``error`` is the wire form ``{"type", "errno", "message"}``. ``answered``: a reply was
    produced (by the server, or by an ``errno`` fault); ``delivered``: that whole reply frame
    was written to the client (possibly corrupted, see ``faults``). ``duration`` is the time
    in seconds from the request reaching the transport to its reply leaving it, injected
    delays included.
    """

    index: int
    """1-based position among all requests of this transport."""
    method: str | None
    """``"<engine>.<method>"`` as sent; None when the frame could not be read."""
    args: dict[str, Any] | None
    """The arguments as sent (a ``FileDescriptor`` argument is the index of its descriptor)."""
    nth: int = 1
    """1-based position among the calls to the same ``method``."""
    id: int | None = None
    fds: int = 0
    """Number of descriptors attached to the request."""
    result: Any = None
    error: dict[str, Any] | None = None
    reply_fds: int = 0
    answered: bool = False
    delivered: bool = False
    duration: float | None = None
    faults: list[str] = field(default_factory=list)
    bad_frame: str | None = None
    """Why the relay could not decode the request (the server's reply says it too)."""

    @property
    def name(self) -> str | None:
        """The method name without the engine (``"mount"``)."""
        return None if self.method is None else self.method.rpartition(".")[2]

    @property
    def ok(self) -> bool:
        return self.answered and self.error is None

    @property
    def errno(self) -> int | None:
        return None if self.error is None else self.error.get("errno")


@dataclass(frozen=True)
class SystemCall:
    """One call made on a :class:`RecordingSystem`."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class RecordingSystem(kit_system.System):
    """A ``kit.system`` interface that records every call and does nothing.

    Every operation (``mount``, ``sethostname``, ``pivot_root``…) is accepted, appended to
    :attr:`calls` and returns None, or ``results[name]`` (a value, or a callable called with
    the arguments), or raises ``errors[name]`` (an exception instance or class). Nothing
    touches the host unless a ``results`` callable does so on purpose. Thread-safe.
    """

    name = "recording"

    def __init__(
        self,
        *,
        results: Mapping[str, Any] | None = None,
        errors: Mapping[str, BaseException | type[BaseException]] | None = None,
    ) -> None:
        self.calls: list[SystemCall] = []
        self._results = dict(results or {})
        self._errors = dict(errors or {})
        self._lock = threading.Lock()

    def __getattr__(self, item: str) -> Callable[..., Any]:
        if item.startswith("_"):
            raise AttributeError(item)

        def operation(*args: Any, **kwargs: Any) -> Any:
            return self._record(item, args, kwargs)

        operation.__name__ = operation.__qualname__ = item
        return operation

    def _record(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._lock:
            self.calls.append(SystemCall(name, args, kwargs))
        if name in self._errors:
            raise self._errors[name]
        result = self._results.get(name)
        return result(*args, **kwargs) if callable(result) else result

    def names(self) -> list[str]:
        """The names of the operations called, in order."""
        with self._lock:
            return [c.name for c in self.calls]

    def __repr__(self) -> str:
        return f"<RecordingSystem {len(self.calls)} call(s)>"


# --------------------------------------------------------------------------- the relay


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _write(sock: socket.socket, data: bytes, marks: Sequence[tuple[int, list[int]]]) -> None:
    """Send *data*, attaching each group of descriptors at the offset it arrived at (a mark at
    offset 0 travels with the header; a later one starts a new ``sendmsg`` so it stays inside
    the body, as the sender had it)."""
    cuts = sorted({0, *(off for off, _ in marks)})
    fds_at: dict[int, list[int]] = collections.defaultdict(list)
    for off, fds in marks:
        fds_at[off].extend(fds)
    view = memoryview(data)
    for i, start in enumerate(cuts):
        end = cuts[i + 1] if i + 1 < len(cuts) else len(data)
        chunk = view[start:end]
        fds = fds_at.get(start, [])
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        while chunk or anc:
            try:
                sent = sock.sendmsg([chunk], anc, socket.MSG_NOSIGNAL)
            except InterruptedError:
                continue
            anc = []
            chunk = chunk[sent:]


def _marks_fds(marks: Sequence[tuple[int, list[int]]]) -> list[int]:
    return [fd for _, fds in marks for fd in fds]


def _request_id(obj: Any) -> int | None:
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_ID:
            return rid
    return None


class _Flow:
    """One direction of the relay: splits what *src* sends into frames for *dst*."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.buf = bytearray()
        self.marks: list[tuple[int, list[int]]] = []
        self.length: int | None = None
        self.passthrough = False  # after an oversized header: bytes are relayed as they come
        self.reading = True
        self.writable = True

    def take(self) -> tuple[bytes, list[tuple[int, list[int]]]]:
        out = (bytes(self.buf), self.marks)
        self.buf = bytearray()
        self.marks = []
        self.length = None
        return out

    def read(self) -> tuple[str, tuple[bytes, list[tuple[int, list[int]]]] | None]:
        """One ``recvmsg``, never past the end of the current frame. Returns ``("more",
        None)``, or ``(kind, (bytes, marks))`` with kind ``frame``, ``oversized`` (a header
        announcing more than MAX_FRAME), ``raw`` (passthrough bytes) or ``eof`` (the bytes of
        an unfinished frame, possibly none)."""
        if self.passthrough:
            want = _CHUNK
        elif self.length is None:
            want = HEADER.size - len(self.buf)
        else:
            want = min(_CHUNK, HEADER.size + self.length - len(self.buf))
        try:
            data, anc, _flags, _ = self.src.recvmsg(want, _RELAY_ANCBUF, socket.MSG_CMSG_CLOEXEC)
        except InterruptedError:
            return "more", None
        except OSError:  # reset by the peer, or closed under us while stopping
            data, anc = b"", []
        fds: list[int] = []
        for level, ctype, payload in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % _FD_SIZE]))
        if not data:
            close_fds(fds)
            return "eof", self.take()
        if self.passthrough:
            return "raw", (data, [(0, fds)] if fds else [])
        if fds:
            self.marks.append((len(self.buf), fds))
        self.buf += data
        if self.length is None:
            if len(self.buf) < HEADER.size:
                return "more", None
            (self.length,) = HEADER.unpack(self.buf)
            if self.length > MAX_FRAME:
                self.passthrough = True
                return "oversized", self.take()
        if len(self.buf) < HEADER.size + self.length:
            return "more", None
        return "frame", self.take()

    def discard(self) -> None:
        close_fds(_marks_fds(self.take()[1]))


@dataclass
class _Pending:
    call: Call
    started: float
    reply_faults: list[Fault]
    synthetic: bytes | None = None  # an injected reply waiting for earlier replies


class _Relay:
    def __init__(
        self, transport: MockTransport, c_peer: socket.socket, s_peer: socket.socket, wake: int
    ) -> None:
        self.t = transport
        self.c_peer = c_peer
        self.s_peer = s_peer
        self.wake = wake
        self.up = _Flow(c_peer, s_peer)  # requests
        self.down = _Flow(s_peer, c_peer)  # replies
        self.pending: collections.deque[_Pending] = collections.deque()
        self.delaying = False  # inside a delay fault: MockTransport.close need not wait

    # -- loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        poller = select.poll()
        flows = {self.c_peer.fileno(): self.up, self.s_peer.fileno(): self.down}
        poller.register(self.wake, select.POLLIN)
        for fd in flows:
            poller.register(fd, select.POLLIN)
        polled = set(flows)
        try:
            while polled and not self.t._stop.is_set():
                for fd, _ in poller.poll():
                    if fd == self.wake:
                        return
                    flow = flows[fd]
                    if flow.reading:
                        self._step(flow)
                    if self.t._stop.is_set():
                        return
                for fd, flow in flows.items():
                    if not flow.reading and fd in polled:
                        poller.unregister(fd)
                        polled.discard(fd)
        except BaseException as exc:  # noqa: BLE001 a bug: never leave the client waiting
            self.t.relay_error = exc
            self._cut()
        finally:
            # The sockets stay open (shut down as needed): MockTransport.close closes them
            # once this thread is gone, so no other thread ever touches a closed descriptor.
            self.up.discard()
            self.down.discard()

    def _step(self, flow: _Flow) -> None:
        kind, payload = flow.read()
        if payload is None:
            return
        data, marks = payload
        if kind == "eof":
            if data:
                self._send(flow, data, marks)
            flow.reading = False
            _shutdown(flow.dst, socket.SHUT_WR)  # mirror the EOF
        elif kind == "raw":
            self._send(flow, data, marks)
        elif kind == "oversized":
            if flow is self.up:
                call = self._record_request(None, marks, "oversized")
                self.pending.append(_Pending(call, time.monotonic(), []))
            self._send(flow, data, marks)
        elif flow is self.up:
            self._request(data, marks)
        else:
            self._reply(data, marks)

    def _send(self, flow: _Flow, data: bytes, marks: list[tuple[int, list[int]]]) -> bool:
        """Forward to ``flow.dst``; closes the relay's copies of the descriptors. If the
        destination is gone, stop reading the source and make its writes fail (EPIPE), as
        writing to a closed RPC server would."""
        try:
            if not flow.writable:
                return False
            _write(flow.dst, data, marks)
            return True
        except OSError:
            flow.writable = False
            flow.reading = False
            flow.discard()
            _shutdown(flow.src, socket.SHUT_RD)
            return False
        finally:
            close_fds(_marks_fds(marks))

    def _cut(self) -> None:
        """Take the connection down both ways (a fault)."""
        for flow in (self.up, self.down):
            flow.reading = False
            flow.writable = False
        _shutdown(self.c_peer, socket.SHUT_RDWR)
        _shutdown(self.s_peer, socket.SHUT_RDWR)

    def _wait(self, seconds: float) -> bool:
        """Sleep; True when the transport is being closed meanwhile."""
        self.delaying = True
        try:
            return self.t._stop.wait(seconds)
        finally:
            self.delaying = False

    # -- requests ------------------------------------------------------------------------------
    def _record_request(
        self, frame: bytes | None, marks: list[tuple[int, list[int]]], bad: str | None = None
    ) -> Call:
        obj: Any = None
        if frame is not None:
            try:
                obj = decode_body(frame[HEADER.size :])
            except FrameError as exc:
                bad = f"{exc.kind}: {exc}"
        method = obj.get("method") if isinstance(obj, dict) else None
        args = obj.get("args") if isinstance(obj, dict) else None
        return self.t._new_call(
            method=method if isinstance(method, str) else None,
            args=args if isinstance(args, dict) else None,
            id=_request_id(obj),
            fds=len(_marks_fds(marks)),
            bad_frame=bad,
        )

    def _request(self, frame: bytes, marks: list[tuple[int, list[int]]]) -> None:
        call = self._record_request(frame, marks)
        started = time.monotonic()
        faults = self.t._match(call)
        reply_faults = [f for f in faults if f.phase == "reply"]
        for fault in (f for f in faults if f.phase == "request"):
            if fault.kind == "delay":
                call.faults.append("delay")
                if self._wait(fault.seconds):
                    close_fds(_marks_fds(marks))
                    return
            elif fault.kind == "corrupt":
                call.faults.append("corrupt")
                frame = _corrupt(frame, fault)
            elif fault.kind == "drop":
                call.faults.append("drop")
                close_fds(_marks_fds(marks))
                self._cut()
                return
            elif fault.kind == "truncate":
                call.faults.append("truncate")
                keep = _keep(frame, fault)
                self._send(self.up, frame[:keep], [m for m in marks if m[0] < keep])
                close_fds([fd for off, fds in marks if off >= keep for fd in fds])
                self._cut()
                return
            elif fault.kind == "errno":
                call.faults.append("errno")
                close_fds(_marks_fds(marks))
                code = fault.code if fault.code is not None else _errno.EIO
                exc = OSError(
                    code, fault.message if fault.message is not None else os.strerror(code)
                )
                info = ErrorInfo(type(exc).__name__, code, exc.strerror or "")
                body = encode_body(make_error(call.id, info))
                reply = HEADER.pack(len(body)) + body
                call.answered = True
                call.error = info.to_json()
                entry = _Pending(call, started, reply_faults, synthetic=reply)
                if self.pending:  # keep replies in request order
                    self.pending.append(entry)
                else:
                    self._deliver(entry, reply, [])
                return
        self.pending.append(_Pending(call, started, reply_faults))
        self._send(self.up, frame, marks)

    # -- replies -------------------------------------------------------------------------------
    def _reply(self, frame: bytes, marks: list[tuple[int, list[int]]]) -> None:
        if (
            not self.pending or self.pending[0].synthetic is not None
        ):  # no request waits: relay as is
            self._send(self.down, frame, marks)
            return
        entry = self.pending.popleft()
        call = entry.call
        try:
            reply = parse_reply(decode_body(frame[HEADER.size :]))
        except (FrameError, ProtocolError) as exc:
            call.error = {
                "type": "ProtocolError",
                "errno": None,
                "message": f"undecodable reply: {exc}",
            }
        else:
            call.result = reply.result
            call.error = None if reply.error is None else reply.error.to_json()
            call.reply_fds = reply.fds
        call.answered = True
        self._deliver(entry, frame, marks)
        # A fresh name: mypy would keep the narrowing of self.pending[0] from above.
        while self.pending and (head := self.pending[0]).synthetic is not None:
            entry = self.pending.popleft()
            self._deliver(entry, head.synthetic, [])

    def _deliver(self, entry: _Pending, frame: bytes, marks: list[tuple[int, list[int]]]) -> None:
        call = entry.call
        close_after = False
        for fault in entry.reply_faults:
            if fault.kind == "delay":
                call.faults.append("delay")
                if self._wait(fault.seconds):
                    close_fds(_marks_fds(marks))
                    return
            elif fault.kind == "corrupt":
                call.faults.append("corrupt")
                frame = _corrupt(frame, fault)
            elif fault.kind == "drop":
                call.faults.append("drop")
                call.duration = time.monotonic() - entry.started
                close_fds(_marks_fds(marks))
                self._cut()
                return
            elif fault.kind == "truncate":
                call.faults.append("truncate")
                call.duration = time.monotonic() - entry.started
                keep = _keep(frame, fault)
                self._send(self.down, frame[:keep], [m for m in marks if m[0] < keep])
                close_fds([fd for off, fds in marks if off >= keep for fd in fds])
                self._cut()
                return
            elif fault.kind == "close":
                call.faults.append("close")
                close_after = True
        # The record is complete before the client can see the reply.
        call.duration = time.monotonic() - entry.started
        call.delivered = self.down.writable
        if not self._send(self.down, frame, marks):
            call.delivered = False
        if close_after:
            self._cut()


def _keep(frame: bytes, fault: Fault) -> int:
    if fault.keep is None:
        return HEADER.size + (len(frame) - HEADER.size) // 2
    return min(fault.keep, len(frame) - 1)


def _corrupt(frame: bytes, fault: Fault) -> bytes:
    out = bytearray(frame)
    at = min(fault.at, len(out) - 1)
    patch = fault.data[: len(out) - at]
    out[at : at + len(patch)] = patch
    return bytes(out)


# --------------------------------------------------------------------------- the transport


def _public_methods(obj: Any) -> dict[str, Callable[..., Any]]:
    """The public methods of an instance, as the registry serves them."""
    return {
        attr: getattr(obj, attr)
        for attr, _ in inspect.getmembers(type(obj), inspect.isfunction)
        if not attr.startswith("_")
    }


def _as_engine(name: str, engine: Any) -> Any:
    """A :class:`kit.contract.Engine` from an Engine or an Operations instance (whose
    ``init_config`` ran)."""
    if engine is None or isinstance(engine, Engine):
        return engine
    if isinstance(engine, Operations):
        return Engine(name=name, operations=engine, common=getattr(engine, "common", None))
    raise TypeError(
        f"engine must be a kit.contract.Engine or Operations instance, got {type(engine).__name__}"
    )


class MockTransport:
    """An RPC server for *engine_name* in this process, behind a real socket.

    *methods* is what to serve, as ``"<engine_name>.<method>"``:

    - a class (like the one given to ``register_rpc_methods``): instantiated as
      ``methods(engine)``; its public methods are served;
    - an instance: its public methods are served;
    - a mapping ``{name or "<engine_name>.<name>": callable}``.

    *engine* is a :class:`kit.contract.Engine`, or an ``Operations`` instance after
    ``init_config`` (wrapped in an Engine). *system*, when given, replaces the system
    interface of the served class/instance: ``kit.system.current()`` returns it while the
    class is instantiated, and the instance's ``system`` attribute is set to it (how
    ``ReferenceRPC`` and engines modelled on it reach the kernel). *timeout* is set on
    :attr:`client_socket` (``settimeout``).

    Methods are validated before anything is started (``RPCMethodError``), so a failing
    constructor leaves no thread or descriptor behind.

    It lets an engine author test ``create_container`` and the engine's RPC methods without
    namespaces, forks or root (SPEC §6)::

        with MockTransport.for_engine("reference", engine=eng, system=RecordingSystem()) as t:
            t.inject(Fault.errno(errno.EPERM), method="mount")
            eng.create_container(Context(), 4242, t.client_socket)   # raises PermissionError
            assert [c.name for c in t.calls] == ["sethostname", "mount"]

    How it is built (nothing is simulated except the faults you ask for)::

        client_socket ==socketpair== [relay thread] ==socketpair== server socket
        (RPCClient, your engine)     records, injects faults       kit.rpc.server.serve()
                                                                   in a thread

    :attr:`client_socket` is a real connected ``AF_UNIX`` stream socket, exactly what the kit hands
    to ``create_container``. Requests and replies are encoded and decoded by :mod:`kit.rpc.codec` on
    both ends and dispatched by :func:`kit.rpc.server.serve`, so codec, schema and dispatch bugs
    show up as they would across processes. The relay in between forwards whole frames byte for
    byte, keeping file descriptors (``SCM_RIGHTS``) attached where they were (with the header or
    inside the body); it decodes a copy of each frame to record the call, and applies injected
    faults (:class:`Fault`). EOF, half-closes and send failures are mirrored to the other side, so
    the server sees what a real RPC server would: a clean EOF ends ``serve`` with 0, a frame cut in
    the middle too.

    Recording: :attr:`calls` lists every request frame that reached the transport as a :class:`Call`
    (method, arguments, result or error, duration, faults), complete before the client sees the
    reply. :attr:`server_records` has the server's own ``on_call`` records.

    The methods served can have their system interface replaced by a :class:`RecordingSystem`
    (``system=``), so that even the privileged calls the real RPC methods make are only recorded.
    Closing the transport (``close()`` or the ``with`` block) stops both threads and closes every
    descriptor it made or received.
    """

    def __init__(
        self,
        engine_name: str,
        methods: type | object | Mapping[str, Callable[..., Any]],
        *,
        engine: Any = None,
        system: kit_system.System | None = None,
        timeout: float | None = None,
    ) -> None:
        split_method_name(f"{engine_name}.x")  # ProtocolError for an invalid engine name
        self.engine_name = engine_name
        self.engine = _as_engine(engine_name, engine)
        self.system = system
        self.instance: Any = None
        table = self._method_table(methods)
        self._specs: dict[str, MethodSpec] = prepare_methods(table)
        # While the transport is open the system interface is the recorder for everything in
        # this process, so a method that looks it up at call time (not only in __init__)
        # records too: nothing may reach the host's kernel from a unit test.
        self._outer_system: kit_system.System | None = None
        if system is not None:
            self._outer_system = kit_system.current()
            kit_system.use(system)

        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._per_method: collections.Counter[str | None] = collections.Counter()
        self._rules: list[Rule] = []
        self.server_records: list[CallRecord] = []
        """The server's ``on_call`` records (see :data:`kit.rpc.server.CallRecord`)."""
        self.exit_code: int | None = None
        """What ``serve`` returned (0 once the connection ended), None while it runs."""
        self.server_error: BaseException | None = None
        self.relay_error: BaseException | None = None
        self._stop = threading.Event()
        self._closed = False

        self.client_socket, c_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        s_peer, self._server_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._wake_r, self._wake_w = os.pipe()
        if timeout is not None:
            self.client_socket.settimeout(timeout)
        self._relay = _Relay(self, c_peer, s_peer, self._wake_r)
        self._server_thread = threading.Thread(
            target=self._serve, name=f"kit-rpc-mock-server[{engine_name}]", daemon=True
        )
        self._relay_thread = threading.Thread(
            target=self._relay.run, name=f"kit-rpc-mock-relay[{engine_name}]", daemon=True
        )
        try:
            self._server_thread.start()
            self._relay_thread.start()
        except BaseException:
            for sock in (self.client_socket, c_peer, s_peer, self._server_sock):
                _shutdown(sock, socket.SHUT_RDWR)
            self.close()
            raise

    @classmethod
    def for_engine(
        cls,
        name: str,
        *,
        engine: Any = None,
        config: Any = None,
        system: kit_system.System | None = None,
        timeout: float | None = None,
    ) -> MockTransport:
        """Serve the RPC methods registered for engine *name* (registry name or entry point),
        like ``serve_rpc_requests`` does in the RPC server process.

        *engine*: an Engine or an ``Operations`` instance after ``init_config``; by default
        a fresh one is made from the registration, with *config* (default: the engine's
        ``config()``) as its engine config and container id ``"mock"``.
        """
        reg = find(name)
        if reg.rpc_methods is None:
            raise RegistryError(f"engine {reg.name!r} registers no RPC methods")
        if engine is None:
            ops = reg.factory()
            ops.init_config(
                Common(reg.name, "mock", ops.config() if config is None else config), False
            )
            engine = Engine(name=reg.name, operations=ops, common=ops.common)
        elif config is not None:
            raise TypeError("for_engine: give engine= or config=, not both")
        return cls(reg.name, reg.rpc_methods, engine=engine, system=system, timeout=timeout)

    def _method_table(self, methods: Any) -> dict[str, Callable[..., Any]]:
        if isinstance(methods, Mapping):
            if self.system is not None:
                raise TypeError(
                    "system= replaces the system interface of a methods class or instance, "
                    "not of a mapping"
                )
            table = {}
            for key, func in methods.items():
                if not isinstance(key, str):
                    raise TypeError(f"method names must be strings, got {key!r}")
                engine, dot, _ = key.rpartition(".")
                if dot and engine != self.engine_name:
                    raise ValueError(
                        f"method {key!r} does not belong to engine {self.engine_name!r}"
                    )
                table[key if dot else f"{self.engine_name}.{key}"] = func
            return table
        if isinstance(methods, type):
            previous = kit_system.current()
            if self.system is not None:
                kit_system.use(self.system)
            try:
                instance = methods(self.engine)
            finally:
                kit_system.use(previous)
        else:
            instance = methods
        if self.system is not None:
            instance.system = self.system
        self.instance = instance
        table = {
            f"{self.engine_name}.{attr}": func for attr, func in _public_methods(instance).items()
        }
        if not table:
            raise TypeError(f"{type(instance).__qualname__} has no public methods to serve")
        return table

    # -- threads -------------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            self.exit_code = serve(
                self._server_sock, self._specs, on_call=self.server_records.append
            )
        except BaseException as exc:  # noqa: BLE001 surfaced by wait_server() and close()
            self.server_error = exc
        finally:
            self._server_sock.close()  # like the RPC server process exiting

    def _new_call(self, **fields: Any) -> Call:
        with self._lock:
            self._per_method[fields["method"]] += 1
            call = Call(
                index=len(self._calls) + 1, nth=self._per_method[fields["method"]], **fields
            )
            self._calls.append(call)
        return call

    def _match(self, call: Call) -> list[Fault]:
        with self._lock:
            faults = []
            for rule in self._rules:
                if rule.matches(call):
                    rule.hits += 1
                    faults.append(rule.fault)
            return faults

    # -- public API ----------------------------------------------------------------------------
    def client(self) -> RPCClient:
        """An :class:`RPCClient` on :attr:`client_socket` (closing it closes the socket)."""
        return RPCClient(self.client_socket, self.engine_name)

    def inject(
        self,
        fault: Fault,
        *,
        on_call: int | None = None,
        method: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Apply *fault* to matching calls; returns the :class:`Rule` (``rule.hits`` counts
        the calls it hit).

        - *method*: only calls to this method (``"mount"`` or ``"reference.mount"``);
        - *on_call*: only the Nth call (1-based): the Nth call of the transport, or with
          *method* the Nth call to that method; counted from the transport's start, so a
          rule injected late for a call already made never fires. Fires once;
        - *times*: fire at most this many times (default: unlimited without *on_call*).

        Several rules may hit one call: they apply in injection order (delays and corruption
        first come first; the first of drop/truncate/errno ends the call).
        """
        if not isinstance(fault, Fault):
            raise TypeError(f"inject: expected a Fault, got {fault!r}")
        if on_call is not None and (
            isinstance(on_call, bool) or not isinstance(on_call, int) or on_call < 1
        ):
            raise ValueError(f"inject: on_call must be an integer >= 1, got {on_call!r}")
        if times is not None and (
            isinstance(times, bool) or not isinstance(times, int) or times < 1
        ):
            raise ValueError(f"inject: times must be an integer >= 1, got {times!r}")
        if method is not None and (not isinstance(method, str) or not method):
            raise ValueError(f"inject: method must be a method name, got {method!r}")
        rule = Rule(fault, method=method, on_call=on_call, times=times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_faults(self) -> None:
        """Remove every injected rule."""
        with self._lock:
            self._rules.clear()

    @property
    def calls(self) -> list[Call]:
        """Every request so far, in order (a copy of the list; the records are live)."""
        with self._lock:
            return list(self._calls)

    @property
    def names(self) -> list[str | None]:
        """The short method names of :attr:`calls`, in order."""
        return [c.name for c in self.calls]

    def calls_to(self, method: str) -> list[Call]:
        """The calls to *method* (``"mount"`` or ``"reference.mount"``)."""
        return [c for c in self.calls if method in (c.method, c.name)]

    def wait_server(self, timeout: float = 5.0) -> int:
        """Wait for ``serve`` to return (the connection ended) and return its exit code.
        Raises ``TimeoutError`` if it still runs, or what ``serve`` raised."""
        self._server_thread.join(timeout)
        if self._server_thread.is_alive():
            raise TimeoutError(
                f"the mock RPC server of {self.engine_name!r} still runs after {timeout} s"
            )
        if self.server_error is not None:
            raise self.server_error
        assert self.exit_code is not None
        return self.exit_code

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Close the client socket, let the server see EOF and return, stop the relay, and
        close every descriptor. Idempotent.

        Raises ``RuntimeError`` if a thread does not stop within *timeout* (a served method
        that does not return); nothing is closed behind its back then, and calling ``close``
        again once the method returned finishes the job. Raises what ``serve`` (or the relay)
        raised, if it raised."""
        if self._closed:
            return
        self.client_socket.close()  # the server sees EOF, as when the kit closes rpc_conn
        threads = [t for t in (self._relay_thread, self._server_thread) if t.ident is not None]
        deadline = time.monotonic() + timeout
        # Normally the relay mirrors the EOF to the server, serve() returns and its socket
        # closes. Give that a moment, then stop the relay (it may sit in a delay fault, or
        # the client closed without the server noticing yet).
        if self._server_thread.ident is not None and not self._relay.delaying:
            self._server_thread.join(min(timeout, 1.0))
        self._stop.set()
        os.write(self._wake_w, b"x")
        for sock in (self._relay.c_peer, self._relay.s_peer):
            _shutdown(sock, socket.SHUT_RDWR)  # unblocks a relay send and a server recv
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise RuntimeError(
                f"MockTransport.close: {', '.join(alive)} did not stop within {timeout} s "
                "(a served method does not return?)"
            )
        self._closed = True
        if self._outer_system is not None and kit_system.current() is self.system:
            kit_system.use(self._outer_system)
        self._relay.c_peer.close()
        self._relay.s_peer.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for error in (self.relay_error, self.server_error):
            if error is not None:
                raise error

    def __enter__(self) -> MockTransport:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 the with block's exception is the interesting one
            pass  # the exception of the with block is the interesting one

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MockTransport {self.engine_name!r} {state}, {len(self._calls)} call(s)>"
