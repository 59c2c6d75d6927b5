"""Framing of JSON messages (and file descriptors) over a connected unix stream socket."""

from __future__ import annotations

import array
import json
import math
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = [
    "HEADER",
    "MAX_FDS",
    "MAX_FRAME",
    "FrameError",
    "close_fds",
    "decode_body",
    "encode_body",
    "recv_frame",
    "send_body",
    "send_frame",
]

MAX_FRAME = 1 << 20
"""Largest accepted body, in bytes (the 4-byte header is not counted)."""
MAX_FDS = 16
"""Largest number of file descriptors accepted with one frame."""

HEADER = struct.Struct(">I")

_T = TypeVar("_T")

_FD_SIZE = array.array("i").itemsize
# Room for one descriptor more than allowed, so "too many" is seen as such even when the
# kernel does not report MSG_CTRUNC; anything beyond is truncated by the kernel (MSG_CTRUNC)
# and never installed in this process.
_ANCBUF = socket.CMSG_SPACE((MAX_FDS + 1) * _FD_SIZE)


class FrameError(Exception):
    """A frame could not be sent or received.

    ``kind`` is one of the ``FrameError.*`` constants. ``recoverable`` tells whether the stream
    is still positioned on a frame boundary (the whole bad frame was consumed) so that more
    frames can follow; it is false for :attr:`OVERSIZED` (the body was not read) and
    :attr:`TRUNCATED` (the peer closed mid-frame). ``obj`` is the decoded JSON object when the
    body itself was fine (only for :attr:`TOO_MANY_FDS` / :attr:`UNEXPECTED_FDS`), so that a
    server can still answer with the request's id.
    """

    OVERSIZED = "oversized"
    TRUNCATED = "truncated"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_OBJECT = "not_object"
    TOO_MANY_FDS = "too_many_fds"
    UNEXPECTED_FDS = "unexpected_fds"
    UNENCODABLE = "unencodable"  # send side only: the object is not strict JSON

    _UNRECOVERABLE = frozenset({OVERSIZED, TRUNCATED})

    def __init__(self, kind: str, message: str, *, obj: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.obj = obj

    @property
    def recoverable(self) -> bool:
        return self.kind not in self._UNRECOVERABLE


def close_fds(fds: Sequence[int]) -> None:
    """Close every descriptor in *fds*, ignoring ones that are already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def encode_body(obj: dict[str, Any]) -> bytes:
    """Serialise *obj* to a frame body (strict JSON: no NaN/Infinity, str keys only).

    Raises :class:`FrameError` (``UNENCODABLE`` or ``OVERSIZED``).
    """
    if not isinstance(obj, dict):
        raise FrameError(
            FrameError.NOT_OBJECT, f"a frame must carry a JSON object, not {type(obj).__name__}"
        )
    bad_key = _non_string_key(obj)
    if bad_key is not _NO_KEY:
        # json.dumps would turn 1, True, None into "1", "true", "null" (and merge {1: …,
        # "1": …}): the receiver would get another object than the one sent.
        raise FrameError(
            FrameError.UNENCODABLE,
            f"not JSON-serialisable: object key "
            f"{bad_key!r} ({type(bad_key).__name__}) is not a string",
        )
    try:
        # ensure_ascii: lone surrogates (legal in JSON strings) stay encodable.
        text = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise FrameError(FrameError.UNENCODABLE, f"not JSON-serialisable: {exc}") from None
    body = text.encode("ascii")
    if len(body) > MAX_FRAME:
        raise FrameError(
            FrameError.OVERSIZED, f"frame of {len(body)} bytes exceeds the maximum of {MAX_FRAME}"
        )
    return body


_NO_KEY = object()


def _non_string_key(obj: Any) -> Any:
    """The first dict key anywhere in *obj* that is not a string (``_NO_KEY`` when none).
    Iterative: depth is json.dumps's business (it raises RecursionError, reported as
    unencodable)."""
    todo = [obj]
    seen: set[int] = set()
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            if id(item) in seen:
                continue  # a cycle: json.dumps reports it
            seen.add(id(item))
            for key, value in item.items():
                if not isinstance(key, str):
                    return key
                if isinstance(value, (dict, list, tuple)):
                    todo.append(value)
        elif isinstance(item, (list, tuple)):
            if id(item) in seen:
                continue
            seen.add(id(item))
            todo.extend(v for v in item if isinstance(v, (dict, list, tuple)))
    return _NO_KEY


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse a frame body: strict UTF-8, strict JSON (no NaN/Infinity, no number that
    overflows a float, no duplicate keys), and the top level must be an object.
    Raises :class:`FrameError`."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(
            FrameError.INVALID_UTF8,
            f"frame body is not valid UTF-8: {exc.reason} at byte {exc.start}",
        ) from None
    try:
        obj = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_no_duplicate_keys,
        )
    except RecursionError:
        raise FrameError(
            FrameError.INVALID_JSON, "frame body is not valid JSON: nested too deeply"
        ) from None
    except ValueError as exc:  # includes json.JSONDecodeError and the int-digits limit
        raise FrameError(FrameError.INVALID_JSON, f"frame body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(
            FrameError.NOT_OBJECT, f"frame body must be a JSON object, not {_json_type(obj)}"
        )
    return obj


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def send_frame(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send *obj* as one frame, with *fds* attached via ``SCM_RIGHTS``.

    Validates everything before writing a byte: raises :class:`FrameError` for a body that is
    not strict JSON (``UNENCODABLE``), larger than :data:`MAX_FRAME` (``OVERSIZED``) or more
    than :data:`MAX_FDS` descriptors (``TOO_MANY_FDS``); then nothing was sent. ``OSError``
    from the socket (e.g. ``BrokenPipeError``) propagates; the stream is then unusable.
    The caller keeps ownership of *fds*.

    Wire format of one frame::

        +----------------------+---------------------------+
        | length: u32, BE      | body: `length` bytes of   |
        | (the body only)      | UTF-8 JSON, an object     |
        +----------------------+---------------------------+

    File descriptors ride along as one ``SCM_RIGHTS`` control message attached to the ``sendmsg``
    that carries the frame header, so the receiver gets them while reading the header. Limits: a
    body of at most :data:`MAX_FRAME` bytes and at most :data:`MAX_FDS` descriptors per frame. The
    kernel duplicates the caller's descriptors into the receiver.

    The sockets (here and in :func:`recv_frame`) must be blocking (a timeout set with ``settimeout``
    is fine and surfaces as ``TimeoutError``). ``EINTR`` and short reads/writes are handled. JSON
    only: no pickle, no eval.
    """
    send_body(sock, encode_body(obj), fds)


def send_body(sock: socket.socket, body: bytes, fds: Sequence[int] = ()) -> None:
    """Send an already encoded body (from :func:`encode_body`) as one frame; same contract
    as :func:`send_frame`."""
    fds = list(fds)
    if len(fds) > MAX_FDS:
        raise FrameError(
            FrameError.TOO_MANY_FDS,
            f"{len(fds)} file descriptors exceed the maximum of {MAX_FDS} per frame",
        )
    for fd in fds:
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise FrameError(FrameError.UNENCODABLE, f"not a file descriptor: {fd!r}")
    if len(body) > MAX_FRAME:
        raise FrameError(
            FrameError.OVERSIZED, f"frame of {len(body)} bytes exceeds the maximum of {MAX_FRAME}"
        )
    data = memoryview(HEADER.pack(len(body)) + body)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    while data:
        # The first call carries the header and the descriptors; later calls (after a
        # short write) only the rest of the bytes.
        sent = _unless_interrupted(sock.sendmsg, [data], anc, socket.MSG_NOSIGNAL)
        if sent is None:
            continue  # nothing went out, descriptors included: the same call again
        anc = []
        data = data[sent:]


def _unless_interrupted(call: Callable[..., _T], *args: Any) -> _T | None:
    """``call(*args)`` on a blocking stream socket; None when a signal handler raised
    InterruptedError inside it, before it sent or received anything.

    PEP 475: CPython retries a call that fails with EINTR itself, so InterruptedError comes
    only from a handler that raises it. That handler runs either inside the call, on EINTR,
    when the kernel has sent or received nothing on a stream socket (a partial transfer is
    returned as a count, not EINTR; descriptors travel with the first byte), or at the next
    bytecode boundary after the call returned, which would lose its result: the count of a
    send (which then went out twice, its descriptors too) or the bytes and descriptors of a
    receive. The call is therefore made from C (``list.extend`` over ``map``), which stores
    its result before any bytecode runs; an InterruptedError after it is dropped, the
    result kept. Any other exception from a handler propagates (the stream is then unusable).
    """
    result: list[_T] = []
    try:
        result.extend(map(call, *([arg] for arg in args)))
    except InterruptedError:
        pass
    return result[0] if result else None


def _recv_some(sock: socket.socket, buf: memoryview, fds: list[int]) -> tuple[int, bool]:
    """One ``recvmsg_into``; appends any received descriptors to *fds* (so the caller can
    close them on every path). Returns (bytes read, control data truncated)."""
    while (
        got := _unless_interrupted(sock.recvmsg_into, [buf], _ANCBUF, socket.MSG_CMSG_CLOEXEC)
    ) is None:
        pass  # nothing was read: the same call again
    nbytes, ancdata, flags, _ = got
    for level, ctype, data in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return nbytes, bool(flags & socket.MSG_CTRUNC)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """Receive one frame: returns ``(object, descriptors)``, or ``None`` on a clean EOF at a
    frame boundary.

    The caller owns the returned descriptors (they have ``O_CLOEXEC`` set). Raises
    :class:`FrameError` for a bad frame after closing every descriptor received with it:

    - ``OVERSIZED``: the announced length exceeds :data:`MAX_FRAME`; the body is left unread
      (not recoverable).
    - ``TRUNCATED``: EOF inside the header or body (not recoverable).
    - ``TOO_MANY_FDS``: more than :data:`MAX_FDS` descriptors, or the control message was
      truncated (``MSG_CTRUNC``); the body was consumed (recoverable).
    - ``UNEXPECTED_FDS``: descriptors arrived with the body rather than the header.
    - ``INVALID_UTF8``, ``INVALID_JSON``, ``NOT_OBJECT``: the body is bad (recoverable).

    ``OSError`` from the socket (``ConnectionResetError``, ``TimeoutError``…) propagates.

    The received descriptors are handed to the caller, who then owns them; when a frame is rejected
    every descriptor received with it is closed first, so a bad frame never leaks one.
    """
    fds: list[int] = []
    try:
        header = bytearray(HEADER.size)
        view = memoryview(header)
        got = 0
        ctrunc = False
        while got < HEADER.size:
            n, trunc = _recv_some(sock, view[got:], fds)
            ctrunc |= trunc
            if n == 0:
                if got == 0 and not fds:
                    return None
                raise FrameError(
                    FrameError.TRUNCATED,
                    f"connection closed inside a frame header ({got} of {HEADER.size} bytes)",
                )
            got += n
        (length,) = HEADER.unpack(header)
        if length > MAX_FRAME:
            raise FrameError(
                FrameError.OVERSIZED, f"frame of {length} bytes exceeds the maximum of {MAX_FRAME}"
            )
        nheader_fds = len(fds)
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        while got < length:
            n, trunc = _recv_some(sock, view[got:], fds)
            ctrunc |= trunc
            if n == 0:
                raise FrameError(
                    FrameError.TRUNCATED,
                    f"connection closed inside a frame body ({got} of {length} bytes)",
                )
            got += n
        # The frame is fully consumed: every error below leaves the stream in sync.
        obj = decode_body(bytes(body))
        if ctrunc or nheader_fds > MAX_FDS:
            raise FrameError(
                FrameError.TOO_MANY_FDS,
                f"too many file descriptors with one frame (more than {MAX_FDS})",
                obj=obj,
            )
        if len(fds) != nheader_fds:
            raise FrameError(
                FrameError.UNEXPECTED_FDS,
                "file descriptors arrived inside a frame body instead of with its header",
                obj=obj,
            )
        result = (obj, fds)
        fds = []  # handed over to the caller
        return result
    finally:
        close_fds(fds)
