"""The RPC client used by the master (``create_container``) to call the RPC server."""

from __future__ import annotations

import builtins
import functools
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .codec import FrameError, close_fds, recv_frame, send_frame
from .messages import (
    ErrorInfo,
    ProtocolError,
    UnknownMethodError,
    make_request,
    parse_reply,
    split_method_name,
)
from .methods import FileDescriptor, WithFds

__all__ = ["REMOTE_BUILTIN_ERRORS", "RPCClient", "RemoteError", "exception_from_error"]


class RemoteError(Exception):
    """The server raised an exception the client does not map to a local class.

    ``remote_type`` is the remote class name, ``message`` its message."""

    def __init__(self, remote_type: str, message: str) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.message = message


# Remote exception class names that are raised as the builtin class of the same name (only
# classes constructible from one message; never BaseException-only ones or StopIteration).
REMOTE_BUILTIN_ERRORS: frozenset[str] = frozenset(
    {
        "Exception",
        "ValueError",
        "TypeError",
        "KeyError",
        "IndexError",
        "LookupError",
        "RuntimeError",
        "NotImplementedError",
        "RecursionError",
        "AttributeError",
        "AssertionError",
        "ArithmeticError",
        "ZeroDivisionError",
        "OverflowError",
        "UnicodeError",
        "EOFError",
        "OSError",
        "PermissionError",
        "FileNotFoundError",
        "FileExistsError",
        "IsADirectoryError",
        "NotADirectoryError",
        "TimeoutError",
        "ProcessLookupError",
        "ChildProcessError",
        "BlockingIOError",
        "InterruptedError",
        "ConnectionError",
        "BrokenPipeError",
        "ConnectionResetError",
        "ConnectionRefusedError",
        "ConnectionAbortedError",
    }
)
_KIT_ERRORS: dict[str, type[Exception]] = {
    "ProtocolError": ProtocolError,
    "UnknownMethodError": UnknownMethodError,
}


def exception_from_error(info: ErrorInfo) -> Exception:
    """The local exception for an error reply; ``remote_type`` always holds the remote name.

    - errno not null: ``OSError(errno, message)`` (Python picks the subclass for the errno,
      e.g. ``FileNotFoundError`` for ENOENT);
    - a name in :data:`REMOTE_BUILTIN_ERRORS`: that builtin class with the message;
    - ``ProtocolError`` / ``UnknownMethodError``: the kit's classes;
    - anything else: :class:`RemoteError`.
    """
    exc: Exception
    if info.errno is not None:
        exc = OSError(info.errno, info.message)
    elif info.type in REMOTE_BUILTIN_ERRORS:
        exc = getattr(builtins, info.type)(info.message)
    elif info.type in _KIT_ERRORS:
        exc = _KIT_ERRORS[info.type](info.message)
    else:
        exc = RemoteError(info.type, info.message)
    exc.remote_type = info.type  # type: ignore[attr-defined]
    return exc


class RPCClient:
    """Calls ``"<engine_name>.<method>"`` on the RPC server at the other end of *sock*.

    The client owns *sock* (:meth:`close` closes it). After a transport failure (EOF,
    truncated or undecodable reply, mismatched id, an exception while sending or waiting,
    including a timeout) the stream may be out of sync: the client marks itself broken and
    every later call raises ``ConnectionError``.

    Usage::

        client = RPCClient(rpc_conn, "myengine")
        client.call("mount", source="/src", target="/dst")     # -> the method's result
        client.mount(source="/src", target="/dst")             # the same, as attribute sugar
        client.read_config(fd=FileDescriptor(r))               # attaches r via SCM_RIGHTS
        value, fds = client.open_pipe()                        # reply carrying descriptors

    A client is not thread-safe: use it from one thread at a time (concurrent use raises
    ``RuntimeError`` rather than interleaving frames). A timeout set on the socket
    (``sock.settimeout``) bounds each read/write and surfaces as ``TimeoutError``.
    """

    def __init__(self, sock: socket.socket, engine_name: str) -> None:
        split_method_name(f"{engine_name}.x")  # validates the engine name (ProtocolError)
        self.sock = sock
        self.engine_name = engine_name
        self._next_id = 1
        self._broken: str | None = None
        self._closed = False
        self._busy = threading.Lock()

    def call(self, method: str, /, *, fds: Sequence[int] = (), **args: Any) -> Any:
        """Call *method* with keyword *args*; return its result.

        Descriptors: an argument given as ``FileDescriptor(fd)`` is attached to the request
        and sent as its index; *fds* attaches raw descriptors first (indexes 0, 1, …) for
        arguments given as explicit indexes. The caller keeps ownership of what it sends.

        Returns the JSON result, or -- when the reply carries descriptors -- a
        :class:`~kit.rpc.methods.WithFds` ``(value, fds)`` whose descriptors the caller owns.

        Raises the remote exception as described in :func:`exception_from_error`;
        ``ProtocolError`` for a request the schema rejects (nothing sent) or a bad reply;
        ``TypeError`` for arguments that are not JSON-serialisable (nothing sent);
        ``ConnectionError`` when the server closed the connection or the client is broken.
        An argument named ``fds`` cannot be passed (the name is taken).
        """
        full = f"{self.engine_name}.{method}"
        send_fds = list(fds)
        wire_args: dict[str, Any] = {}
        for name, value in args.items():
            if isinstance(value, FileDescriptor):
                wire_args[name] = len(send_fds)
                send_fds.append(int(value))
            else:
                wire_args[name] = value
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("RPCClient is used from several threads at once")
        try:
            if self._closed:
                raise ConnectionError("RPCClient is closed")
            if self._broken is not None:
                raise ConnectionError(f"RPC connection unusable: {self._broken}")
            rid = self._next_id
            self._next_id += 1
            request = make_request(rid, full, wire_args, len(send_fds))
            self._send(full, request, send_fds)
            return self._receive(full, rid)
        finally:
            self._busy.release()

    def _send(self, full: str, request: dict[str, Any], send_fds: list[int]) -> None:
        try:
            send_frame(self.sock, request, send_fds)
        except FrameError as exc:  # validated before any byte was written: still in sync
            if exc.kind == FrameError.UNENCODABLE:
                raise TypeError(f"cannot send {full!r}: {exc}") from None
            raise ProtocolError(f"cannot send {full!r}: {exc}") from None
        except BaseException as exc:
            self._broken = f"sending {full!r} failed: {exc!r}"
            raise

    def _receive(self, full: str, rid: int) -> Any:
        try:
            frame = recv_frame(self.sock)
        except FrameError as exc:
            if not exc.recoverable:
                self._broken = f"bad reply to {full!r}: {exc}"
            if exc.kind == FrameError.TRUNCATED:  # the server went away mid-reply
                raise ConnectionError(
                    f"the RPC server closed the connection in the middle of the reply to {full!r}"
                ) from None
            raise ProtocolError(f"bad reply to {full!r}: {exc}") from None
        except BaseException as exc:
            self._broken = f"waiting for the reply to {full!r} failed: {exc!r}"
            raise
        if frame is None:
            self._broken = "the RPC server closed the connection"
            raise ConnectionError(
                f"the RPC server closed the connection before replying to {full!r}"
            )
        obj, rfds = frame
        try:
            reply = parse_reply(obj)
            if reply.id is not None and reply.id != rid:
                self._broken = f"reply id {reply.id} for request id {rid}"
                raise ProtocolError(f"reply to {full!r}: 'id' is {reply.id}, expected {rid}")
            if reply.fds != len(rfds):
                raise ProtocolError(
                    f"reply to {full!r}: 'fds' declares {reply.fds} descriptor(s), "
                    f"{len(rfds)} attached"
                )
        except ProtocolError:
            close_fds(rfds)
            raise
        if reply.error is not None:
            close_fds(rfds)
            raise exception_from_error(reply.error)
        if rfds:
            return WithFds(reply.result, rfds)
        return reply.result

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """``client.mount(**args)`` is ``client.call("mount", **args)``."""
        if name.startswith("_"):
            raise AttributeError(name)
        return functools.partial(self.call, name)

    def close(self) -> None:
        """Close the socket (idempotent); the server then sees EOF and exits 0."""
        if not self._closed:
            self._closed = True
            self.sock.close()

    def __enter__(self) -> RPCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._broken else "open"
        return f"<RPCClient engine={self.engine_name!r} {state}>"
