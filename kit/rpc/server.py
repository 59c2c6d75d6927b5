"""The RPC server loop: one request at a time over one connection."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .codec import FrameError, close_fds, encode_body, recv_frame, send_body, send_frame
from .messages import (
    MAX_ID,
    ErrorInfo,
    ProtocolError,
    UnknownMethodError,
    error_info,
    make_error,
    make_result,
    parse_request,
    split_method_name,
)
from .methods import MethodSpec, RPCMethodError, WithFds, check_method

__all__ = ["CallRecord", "prepare_methods", "serve"]

CallRecord = dict[str, Any]
"""``{"method": str | None, "args": dict | None, "ok": bool, "error": dict | None,
"duration_ms": float}``: passed to ``on_call`` after each frame the server answered."""

# What a method may raise and still get an error reply: everything but the exceptions that
# are the interpreter's own business (GeneratorExit…). SystemExit and KeyboardInterrupt from
# engine code must not end the server.
_METHOD_ERRORS = (Exception, SystemExit, KeyboardInterrupt)

# Exceptions meaning "the client went away": the server ends quietly.
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def prepare_methods(
    methods: Mapping[str, MethodSpec | Callable[..., Any]],
) -> dict[str, MethodSpec]:
    """Validate a method table: keys are ``"<engine>.<method>"``, values a :class:`MethodSpec`
    or a plain callable (checked with :func:`check_method`). Raises ``RPCMethodError``."""
    specs: dict[str, MethodSpec] = {}
    for full, value in methods.items():
        try:
            split_method_name(full)
        except ProtocolError as exc:
            raise RPCMethodError(f"RPC method {full!r}: {exc}") from None
        specs[full] = value if isinstance(value, MethodSpec) else check_method(full, value)
    return specs


def _request_id(obj: Any) -> int | None:
    """The id of a possibly malformed request, if it is a usable one."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_ID:
            return rid
    return None


def serve(
    conn: socket.socket,
    methods: Mapping[str, MethodSpec | Callable[..., Any]],
    *,
    on_call: Callable[[CallRecord], None] | None = None,
    reserved_fds: Sequence[int] = (),
) -> int:
    """Serve requests from *conn* until the client closes it; return the exit code (0).

    *methods* maps full names ``"<engine>.<method>"`` to :class:`MethodSpec` objects (or
    callables, validated here before serving; ``RPCMethodError`` if one is not servable).
    Requests are handled one at a time, in the calling thread; the reply to every kind of bad
    input is in the table below.

    *on_call*, if given, is called once per answered frame, before its reply is sent, with a
    :data:`CallRecord`; ``method``/``args`` are ``None`` when the frame did not carry usable
    ones. Its exceptions propagate (they end ``serve``).

    Descriptors: those passed to ``FileDescriptor`` parameters belong to the method; every
    other received descriptor is closed. Descriptors a method returns in a :class:`WithFds`
    are closed by the server after the reply is sent (or could not be sent).

    ``serve`` never closes *conn*; it shuts it down after an oversized frame.

    *reserved_fds*: descriptors a method must never hand out (besides *conn*), compared by
    the open file they refer to, so a ``dup`` of one is refused too.

    Behaviour by input (every reply follows :mod:`kit.rpc.messages`):

    ================================================  =====================================
    input                                             server
    ================================================  =====================================
    well-formed request, method returns               result reply
    method raises ``Exception``, ``SystemExit`` or    error reply: class name, errno,
    ``KeyboardInterrupt``                             message; keeps serving
    unknown method                                    ``UnknownMethodError`` reply, keeps
                                                      serving
    private name (``x._secret``), bad schema          ``ProtocolError`` reply, keeps serving
    bad UTF-8 / JSON / not an object / too many fds   ``ProtocolError`` reply, keeps serving
    declared ``fds`` differs from attached            ``ProtocolError`` reply, keeps serving
    descriptors
    unknown/missing/mistyped argument, unused fd      ``TypeError`` reply, keeps serving
    result not JSON-serialisable or too large         ``TypeError``/``ProtocolError`` reply
    result with a non-string object key               ``TypeError`` reply (JSON would coerce
    (``{1: "a"}``)                                    it)
    returned fd is the connection or a reserved one   ``PermissionError`` reply (the
                                                      descriptors are not sent, and not
                                                      closed)
    oversized frame (length > MAX_FRAME)              ``ProtocolError`` reply, then shuts the
                                                      connection down and returns 0: the
                                                      body is not read, so the stream cannot
                                                      be resynchronised
    clean EOF, EOF inside a frame, connection reset   returns 0
    ================================================  =====================================

    Error replies have ``"id": null`` when the request's id could not be read. The return value is
    the exit code for the RPC server process: 0 in every case above, since the server itself did not
    fail (an oversized frame is the client's fault and was reported to it in-band). Exceptions
    escaping ``serve`` are bugs or a failing ``on_call``.
    """
    specs = prepare_methods(methods)
    server = _Server(conn, specs, on_call, [conn.fileno(), *reserved_fds])
    try:
        return server.run()
    except _GONE:
        return 0


def _identity(fd: int) -> tuple[int, int] | None:
    """The open file a descriptor refers to (device, inode): equal for its duplicates."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _returned_fds(fds: Any) -> tuple[list[int], list[str]]:
    """Split what a method put in ``WithFds.fds`` into open descriptors (as plain ints) and
    descriptions of invalid entries. Only real descriptor numbers are ever closed later
    (``True`` would otherwise be fd 1)."""
    try:
        items = list(fds)
    except TypeError:
        return [], [f"{type(fds).__name__} is not a sequence"]
    good: list[int] = []
    bad: list[str] = []
    for fd in items:
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            bad.append(repr(fd))
            continue
        try:
            os.fstat(fd)
        except OSError as exc:
            bad.append(f"{fd} ({exc.strerror})")
            continue
        good.append(int(fd))
    return good, bad


class _Server:
    def __init__(
        self,
        conn: socket.socket,
        specs: dict[str, MethodSpec],
        on_call: Callable[[CallRecord], None] | None,
        reserved: Sequence[int] = (),
    ):
        self.conn = conn
        self.specs = specs
        self.on_call = on_call
        self.reserved = {_identity(fd): fd for fd in reserved}
        self.reserved.pop(None, None)

    def run(self) -> int:
        while True:
            try:
                frame = recv_frame(self.conn)
            except FrameError as exc:
                if exc.kind == FrameError.TRUNCATED:
                    return 0
                start = time.monotonic()
                obj = exc.obj or {}
                self._fail(
                    start,
                    _request_id(obj),
                    obj,
                    ProtocolError(f"malformed frame ({exc.kind}): {exc}"),
                )
                if not exc.recoverable:
                    self._shutdown()
                    return 0
                continue
            if frame is None:
                return 0
            obj, fds = frame
            self._handle(obj, fds)

    def _shutdown(self) -> None:
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _record(self, start: float, obj: dict[str, Any], error: ErrorInfo | None) -> None:
        if self.on_call is None:
            return
        method = obj.get("method")
        args = obj.get("args")
        self.on_call(
            {
                "method": method if isinstance(method, str) else None,
                "args": args if isinstance(args, dict) else None,  # came from JSON: JSON-safe
                "ok": error is None,
                "error": None if error is None else error.to_json(),
                "duration_ms": (time.monotonic() - start) * 1000.0,
            }
        )

    def _fail(self, start: float, rid: int | None, obj: dict[str, Any], exc: BaseException) -> None:
        info = error_info(exc)
        self._record(start, obj, info)
        send_frame(self.conn, make_error(rid, info))

    def _handle(self, obj: dict[str, Any], fds: list[int]) -> None:
        start = time.monotonic()
        rid = _request_id(obj)
        try:
            req = parse_request(obj)
            if req.fds != len(fds):
                raise ProtocolError(
                    f"request field 'fds' declares {req.fds} descriptor(s) but {len(fds)} "
                    "were attached"
                )
            spec = self.specs.get(req.method)
            if spec is None:
                raise UnknownMethodError(f"unknown method {req.method!r}")
            kwargs = spec.bind(req.args, fds)
        # ProtocolError, UnknownMethodError, TypeError from bind; whatever else a malformed
        # request provokes is replied to as well, and its descriptors closed.
        except Exception as exc:  # noqa: BLE001
            close_fds(fds)
            self._fail(start, rid, obj, exc)
            return
        # From here the method owns the descriptors bound to its FileDescriptor parameters
        # (bind guarantees that every received descriptor was bound).
        try:
            result = spec.func(**kwargs)
        except _METHOD_ERRORS as exc:
            self._fail(start, req.id, obj, exc)
            return
        out_fds: list[int] = []
        if isinstance(result, WithFds):
            result, out_fds, bad = result.value, *_returned_fds(result.fds)
            if bad:
                close_fds(out_fds)
                self._fail(
                    start,
                    req.id,
                    obj,
                    TypeError(
                        f"method {req.method!r} returned invalid file descriptors: {', '.join(bad)}"
                    ),
                )
                return
            kept = [fd for fd in out_fds if _identity(fd) in self.reserved]
            if kept:
                # Not closed either: they are the server's own (its connection, the ledger).
                close_fds([fd for fd in out_fds if fd not in self.reserved.values()])
                self._fail(
                    start,
                    req.id,
                    obj,
                    PermissionError(
                        f"method {req.method!r} returned file descriptor(s) {kept} that the server "
                        "must not give away (its own connection or another reserved descriptor)"
                    ),
                )
                return
        try:
            self._reply(start, req.id, obj, result, out_fds)
        finally:
            close_fds(out_fds)

    def _reply(
        self, start: float, rid: int, obj: dict[str, Any], result: Any, out_fds: list[int]
    ) -> None:
        try:
            reply = make_result(rid, result, len(out_fds))
        except ProtocolError as exc:  # too many descriptors returned
            self._fail(
                start,
                rid,
                obj,
                ProtocolError(f"method {obj['method']!r} returned an invalid result: {exc}"),
            )
            return
        try:
            body = encode_body(reply)
        except FrameError as exc:
            kind: type[Exception] = (
                TypeError if exc.kind == FrameError.UNENCODABLE else ProtocolError
            )
            self._fail(
                start,
                rid,
                obj,
                kind(f"method {obj['method']!r} returned an unsendable result: {exc}"),
            )
            return
        # Record first so that the ledger entry exists before the client sees the reply.
        self._record(start, obj, None)
        send_body(self.conn, body, out_fds)
