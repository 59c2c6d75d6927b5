"""Byte-level RPC faults for the kit's own client and codec tests: a relay that cuts and corrupts
frames in front of a :class:`~kit.testing.rpc_mock.MockTransport`."""

from __future__ import annotations

import array
import collections
import os
import select
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kit.rpc.client import RPCClient
from kit.rpc.codec import HEADER, MAX_FRAME, FrameError, close_fds, decode_body
from kit.rpc.messages import ProtocolError, parse_reply
from kit.testing.rpc_mock import Fault, MockTransport

_FD_SIZE = array.array("i").itemsize
_SCM_MAX_FD = 253  # the kernel's limit per message: the relay never truncates what it relays
_RELAY_ANCBUF = socket.CMSG_SPACE(_SCM_MAX_FD * _FD_SIZE)
_CHUNK = 1 << 16

Marks = list[tuple[int, list[int]]]
"""Descriptors received with a frame, each group at the byte offset it arrived at."""


@dataclass(frozen=True)
class WireFault:
    """What to do to the bytes of one frame: ``"request"`` or ``"reply"`` (``phase``).

    ``truncate(keep)``: forward the first *keep* bytes (default: header and half the body), then
    cut the connection. ``corrupt(at, data)``: overwrite bytes at offset *at* of the frame
    (0-3 is the length header); the length is unchanged. ``close()``: deliver the reply, then
    cut the connection.
    """

    kind: str
    phase: str = "reply"
    keep: int | None = None
    at: int = HEADER.size
    data: bytes = b"\xff"

    def __post_init__(self) -> None:
        if self.phase not in ("request", "reply"):
            raise ValueError(f"WireFault: phase must be 'request' or 'reply': {self.phase!r}")

    @classmethod
    def truncate(cls, keep: int | None = None, phase: str = "reply") -> WireFault:
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"WireFault.truncate: keep must be a byte count >= 0, got {keep!r}")
        return cls("truncate", phase, keep=keep)

    @classmethod
    def corrupt(
        cls, at: int = HEADER.size, data: bytes = b"\xff", phase: str = "reply"
    ) -> WireFault:
        if isinstance(at, bool) or not isinstance(at, int) or at < 0:
            raise ValueError(f"WireFault.corrupt: at must be an offset >= 0, got {at!r}")
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise ValueError("WireFault.corrupt: data must be non-empty bytes")
        return cls("corrupt", phase, at=at, data=bytes(data))

    @classmethod
    def close(cls) -> WireFault:
        return cls("close", "reply")

    def keep_of(self, frame: bytes) -> int:
        if self.keep is None:
            return HEADER.size + (len(frame) - HEADER.size) // 2
        return min(self.keep, len(frame) - 1)

    def corrupted(self, frame: bytes) -> bytes:
        out = bytearray(frame)
        at = min(self.at, len(out) - 1)
        patch = self.data[: len(out) - at]
        out[at : at + len(patch)] = patch
        return bytes(out)


@dataclass
class WireCall:
    """One request frame as the relay saw it (decoded from a copy), and its reply."""

    index: int
    method: str | None
    fds: int = 0
    result: Any = None
    error: dict[str, Any] | None = None
    answered: bool = False
    delivered: bool = False
    faults: list[str] = field(default_factory=list)

    @property
    def name(self) -> str | None:
        return None if self.method is None else self.method.rpartition(".")[2]


@dataclass
class _WireRule:
    fault: WireFault
    method: str | None
    on_call: int | None
    spent: bool = False

    def fires(self, call: WireCall) -> bool:
        if self.spent or self.method not in (None, call.method, call.name):
            return False
        if self.on_call is not None:
            if call.index != self.on_call:
                return False
            self.spent = True
        return True


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _fds(marks: Sequence[tuple[int, list[int]]]) -> list[int]:
    return [fd for _, fds in marks for fd in fds]


def _write(sock: socket.socket, data: bytes, marks: Sequence[tuple[int, list[int]]]) -> None:
    """Send *data*, each group of descriptors at the offset it arrived at (a later mark starts a
    new ``sendmsg`` so it stays inside the body, as the sender had it)."""
    cuts = sorted({0, *(off for off, _ in marks)})
    fds_at: dict[int, list[int]] = collections.defaultdict(list)
    for off, fds in marks:
        fds_at[off].extend(fds)
    view = memoryview(data)
    for i, start in enumerate(cuts):
        chunk = view[start : cuts[i + 1] if i + 1 < len(cuts) else len(data)]
        fds = fds_at.get(start, [])
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        while chunk or anc:
            sent = sock.sendmsg([chunk], anc, socket.MSG_NOSIGNAL)
            anc = []
            chunk = chunk[sent:]


class _Flow:
    """One direction of the relay: splits what *src* sends into frames for *dst*."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.buf = bytearray()
        self.marks: Marks = []
        self.length: int | None = None
        self.passthrough = False  # after an oversized header: bytes are relayed as they come
        self.reading = True
        self.writable = True

    def take(self) -> tuple[bytes, Marks]:
        out = (bytes(self.buf), self.marks)
        self.buf, self.marks, self.length = bytearray(), [], None
        return out

    def read(self) -> tuple[str, tuple[bytes, Marks] | None]:
        """One ``recvmsg``, never past the current frame: ``("more", None)`` or ``(kind, (bytes,
        marks))`` with kind ``frame``, ``oversized``, ``raw`` (passthrough) or ``eof``."""
        if self.passthrough:
            want = _CHUNK
        elif self.length is None:
            want = HEADER.size - len(self.buf)
        else:
            want = min(_CHUNK, HEADER.size + self.length - len(self.buf))
        try:
            data, anc, _flags, _ = self.src.recvmsg(want, _RELAY_ANCBUF, socket.MSG_CMSG_CLOEXEC)
        except OSError:  # reset by the peer, or shut down under us while stopping
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
        close_fds(_fds(self.take()[1]))


class _Relay:
    """Forwards frames both ways, records requests and applies :class:`WireFault` rules."""

    def __init__(self, wire: WireTransport, c_peer: socket.socket, s_peer: socket.socket) -> None:
        self.wire = wire
        self.c_peer = c_peer
        self.s_peer = s_peer
        self.up = _Flow(c_peer, s_peer)  # requests
        self.down = _Flow(s_peer, c_peer)  # replies
        self.pending: collections.deque[tuple[WireCall, list[WireFault]]] = collections.deque()

    def run(self) -> None:
        poller = select.poll()
        flows = {self.c_peer.fileno(): self.up, self.s_peer.fileno(): self.down}
        poller.register(self.wire.wake_r, select.POLLIN)
        for fd in flows:
            poller.register(fd, select.POLLIN)
        polled = set(flows)
        try:
            while polled:
                for fd, _ in poller.poll():
                    if fd == self.wire.wake_r:
                        return
                    if flows[fd].reading:
                        self._step(flows[fd])
                for fd, flow in flows.items():
                    if not flow.reading and fd in polled:
                        poller.unregister(fd)  # a hung-up socket would poll ready forever
                        polled.discard(fd)
        except BaseException as exc:  # a bug: never leave the client waiting
            self.wire.relay_error = exc
            self._cut()
        finally:
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
                self.pending.append((self.wire.record(None, len(_fds(marks))), []))
            self._send(flow, data, marks)
        elif flow is self.up:
            self._request(data, marks)
        else:
            self._reply(data, marks)

    def _send(self, flow: _Flow, data: bytes, marks: Marks) -> bool:
        """Forward to ``flow.dst`` and close the relay's copies of the descriptors; if the
        destination is gone, stop reading the source and make its writes fail (EPIPE)."""
        try:
            if not flow.writable:
                return False
            _write(flow.dst, data, marks)
            return True
        except OSError:
            flow.writable = flow.reading = False
            flow.discard()
            _shutdown(flow.src, socket.SHUT_RD)
            return False
        finally:
            close_fds(_fds(marks))

    def _cut(self) -> None:
        for flow in (self.up, self.down):
            flow.reading = flow.writable = False
        _shutdown(self.c_peer, socket.SHUT_RDWR)
        _shutdown(self.s_peer, socket.SHUT_RDWR)

    def _truncate(self, flow: _Flow, frame: bytes, marks: Marks, fault: WireFault) -> None:
        keep = fault.keep_of(frame)
        self._send(flow, frame[:keep], [m for m in marks if m[0] < keep])
        close_fds([fd for off, fds in marks if off >= keep for fd in fds])
        self._cut()

    def _request(self, frame: bytes, marks: Marks) -> None:
        try:
            obj = decode_body(frame[HEADER.size :])
        except FrameError:
            obj = None
        method = obj.get("method") if isinstance(obj, dict) else None
        call = self.wire.record(method if isinstance(method, str) else None, len(_fds(marks)))
        faults = self.wire.faults_for(call)
        for fault in (f for f in faults if f.phase == "request"):
            call.faults.append(fault.kind)
            if fault.kind == "truncate":
                self._truncate(self.up, frame, marks, fault)
                return
            frame = fault.corrupted(frame)
        self.pending.append((call, [f for f in faults if f.phase == "reply"]))
        self._send(self.up, frame, marks)

    def _reply(self, frame: bytes, marks: Marks) -> None:
        if not self.pending:
            self._send(self.down, frame, marks)
            return
        call, faults = self.pending.popleft()
        try:
            reply = parse_reply(decode_body(frame[HEADER.size :]))
        except (FrameError, ProtocolError) as exc:
            call.error = {"type": "ProtocolError", "errno": None, "message": str(exc)}
        else:
            call.result = reply.result
            call.error = None if reply.error is None else reply.error.to_json()
        call.answered = True
        close_after = False
        for fault in faults:
            call.faults.append(fault.kind)
            if fault.kind == "truncate":
                self._truncate(self.down, frame, marks, fault)
                return
            if fault.kind == "corrupt":
                frame = fault.corrupted(frame)
            close_after = close_after or fault.kind == "close"
        call.delivered = self._send(self.down, frame, marks)
        if close_after:
            self._cut()


class WireTransport:
    """A :class:`MockTransport` behind a relay thread that applies :class:`WireFault` rules.

    ``client_socket ==socketpair== [relay] ==> MockTransport.client_socket ... serve()``:
    the relay forwards whole frames byte for byte with their descriptors where they were,
    mirrors EOFs, and records each request as a :class:`WireCall` (:attr:`calls`). A dispatch
    :class:`~kit.testing.rpc_mock.Fault` given to :meth:`inject` goes to the mock itself.
    """

    def __init__(self, engine: str, methods: Any, *, timeout: float | None = None) -> None:
        self.engine = engine
        self.mock = MockTransport(engine, methods)
        self.calls: list[WireCall] = []
        self.rules: list[_WireRule] = []
        self.relay_error: BaseException | None = None
        self.closed = False
        self.client_socket, c_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if timeout is not None:
            self.client_socket.settimeout(timeout)
        self.wake_r, self.wake_w = os.pipe()
        self.relay = _Relay(self, c_peer, self.mock.client_socket)
        self.thread = threading.Thread(target=self.relay.run, name="kit-rpc-mock-relay")
        self.thread.start()

    def record(self, method: str | None, fds: int) -> WireCall:
        call = WireCall(len(self.calls) + 1, method, fds)
        self.calls.append(call)
        return call

    def faults_for(self, call: WireCall) -> list[WireFault]:
        return [rule.fault for rule in self.rules if rule.fires(call)]

    def inject(
        self, fault: WireFault | Fault, *, on_call: int | None = None, method: str | None = None
    ) -> None:
        if isinstance(fault, Fault):
            self.mock.inject(fault, on_call=on_call, method=method)
        else:
            self.rules.append(_WireRule(fault, method, on_call))

    def client(self) -> RPCClient:
        return RPCClient(self.client_socket, self.engine)

    @property
    def server_records(self) -> list[dict[str, Any]]:
        return self.mock.server_records

    @property
    def exit_code(self) -> int | None:
        return self.mock.exit_code

    def wait_server(self, timeout: float = 5.0) -> int:
        return self.mock.wait_server(timeout)

    def close(self) -> None:
        """Stop the relay, close its sockets and the mock; raise what the relay raised."""
        if self.closed:
            return
        self.client_socket.close()
        os.write(self.wake_w, b"x")
        self.relay._cut()  # unblocks a relay send
        self.thread.join(5.0)
        assert not self.thread.is_alive(), "the wire relay did not stop"
        self.closed = True
        self.relay.c_peer.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        self.mock.close()
        if self.relay_error is not None:
            raise self.relay_error

    def __enter__(self) -> WireTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
