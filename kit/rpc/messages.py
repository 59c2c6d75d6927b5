"""The RPC message schema: building and strictly validating requests and replies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .codec import MAX_FDS

__all__ = [
    "MAX_ID",
    "ErrorInfo",
    "ProtocolError",
    "Reply",
    "Request",
    "UnknownMethodError",
    "error_info",
    "make_error",
    "make_request",
    "make_result",
    "parse_reply",
    "parse_request",
    "split_method_name",
]

MAX_ID = (1 << 63) - 1
MAX_MESSAGE = 64 * 1024
"""Error messages longer than this (in characters) are truncated by :func:`error_info`."""

# Engine names: letters, digits, "_", "-", "." (a method name never contains a dot, so the
# last dot separates the two). Method names: a public Python identifier.
_ENGINE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_METHOD_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,127}")


class ProtocolError(ValueError):
    """A message does not follow the RPC schema (the message names the bad field), or a
    frame was malformed. Sent on the wire with type ``"ProtocolError"``.

    Unknown keys are rejected everywhere; the message names the offending field.
    """


class UnknownMethodError(ProtocolError):
    """A well-formed request names a method the server does not serve."""


@dataclass(frozen=True)
class Request:
    """A validated request. ``method`` is the full ``"<engine>.<method>"`` name.

    On the wire::

        {"id": int >= 0, "method": "<engine>.<method>", "args": {name: JSON value},
         "fds": int >= 0}

    ``fds`` is the number of descriptors attached to the frame. An argument whose parameter is
    annotated ``FileDescriptor`` carries the index of its descriptor in that list.
    """

    id: int
    method: str
    args: dict[str, Any]
    fds: int = 0

    @property
    def engine(self) -> str:
        return self.method.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.method.rpartition(".")[2]


@dataclass(frozen=True)
class ErrorInfo:
    """The ``error`` member of a failure reply."""

    type: str
    errno: int | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "errno": self.errno, "message": self.message}


@dataclass(frozen=True)
class Reply:
    """A validated reply: exactly one of ``result`` (when ``error`` is None) or ``error``.

    On the wire, success (optionally with ``"fds": int >= 0``, descriptors returned)::

        {"id": int, "result": JSON value}

    failure::

        {"id": int | null, "error": {"type": str, "errno": int | null, "message": str}}

    ``id`` is ``null`` only when the server could not read the request's id (malformed frame).
    """

    id: int | None
    result: Any = None
    error: ErrorInfo | None = None
    fds: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_id(value: Any, what: str = "id", *, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if not _is_int(value) or not 0 <= value <= MAX_ID:
        raise ProtocolError(f"{what!r} must be an integer in [0, 2**63), got {value!r:.80}")


def _check_nfds(value: Any) -> None:
    if not _is_int(value) or not 0 <= value <= MAX_FDS:
        raise ProtocolError(f"'fds' must be an integer in [0, {MAX_FDS}], got {value!r:.80}")


def _check_keys(
    obj: dict[str, Any], what: str, required: set[str], optional: frozenset[str] = frozenset()
) -> None:
    missing = sorted(required - obj.keys())
    if missing:
        raise ProtocolError(f"{what}: missing field {missing[0]!r}")
    unknown = sorted(obj.keys() - required - optional)
    if unknown:
        raise ProtocolError(f"{what}: unknown field {unknown[0]!r:.80}")


def split_method_name(full: Any) -> tuple[str, str]:
    """Split and validate ``"<engine>.<method>"``; raises :class:`ProtocolError`.

    Method names starting with ``_`` (private, dunder) are rejected: they are never served.
    """
    if not isinstance(full, str):
        raise ProtocolError(f"'method' must be a string \"<engine>.<method>\", got {full!r:.80}")
    engine, dot, name = full.rpartition(".")
    if not dot or not engine or not name:
        raise ProtocolError(f"'method' must have the form \"<engine>.<method>\", got {full!r:.80}")
    if name.startswith("_"):
        raise ProtocolError(f"'method': private method {name!r:.80} is never served")
    if not _METHOD_RE.fullmatch(name):
        raise ProtocolError(f"'method': invalid method name {name!r:.80}")
    if not _ENGINE_RE.fullmatch(engine):
        raise ProtocolError(f"'method': invalid engine name {engine!r:.80}")
    return engine, name


def _check_args(args: Any) -> None:
    if not isinstance(args, dict):
        raise ProtocolError(f"'args' must be an object, got {type(args).__name__}")
    for key in args:
        if not isinstance(key, str) or not key.isidentifier():
            raise ProtocolError(f"'args': invalid argument name {key!r:.80}")


def make_request(id: int, method: str, args: dict[str, Any], fds: int = 0) -> dict[str, Any]:
    """Build a request object (validated; raises :class:`ProtocolError`)."""
    obj = {"id": id, "method": method, "args": args, "fds": fds}
    parse_request(obj)
    return obj


def parse_request(obj: Any) -> Request:
    """Validate a received request object; raises :class:`ProtocolError` naming the field."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"request must be an object, got {type(obj).__name__}")
    _check_keys(obj, "request", {"id", "method", "args", "fds"})
    _check_id(obj["id"])
    split_method_name(obj["method"])
    _check_args(obj["args"])
    _check_nfds(obj["fds"])
    return Request(id=obj["id"], method=obj["method"], args=obj["args"], fds=obj["fds"])


def make_result(id: int, result: Any, fds: int = 0) -> dict[str, Any]:
    """Build a success reply; ``fds`` = number of descriptors sent with it (omitted when 0).

    JSON-serialisability of *result* is checked when the frame is encoded."""
    _check_id(id)
    _check_nfds(fds)
    obj: dict[str, Any] = {"id": id, "result": result}
    if fds:
        obj["fds"] = fds
    return obj


def error_info(exc: BaseException) -> ErrorInfo:
    """Describe an exception for the wire: class name, errno (for ``OSError``) and message.

    For an ``OSError`` with an errno the message is ``strerror`` plus the file name(s), so the
    client's ``OSError(errno, message)`` prints like the original."""
    errno: int | None = None
    message: str
    try:
        message = _describe(exc)
    except Exception:  # noqa: BLE001 an exception whose __str__ fails must still be reportable
        message = f"<unprintable {type(exc).__name__} object>"
    if isinstance(exc, OSError) and _is_int(exc.errno):
        errno = exc.errno
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "... (truncated)"
    return ErrorInfo(type=type(exc).__name__, errno=errno, message=message)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and _is_int(exc.errno):
        message = exc.strerror or str(exc)
        if exc.filename is not None:
            message += f": {exc.filename!r}"
            if exc.filename2 is not None:
                message += f" -> {exc.filename2!r}"
        return message
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        return str(exc.args[0])  # str(KeyError('k')) would add quotes
    return str(exc)


def make_error(id: int | None, exc: BaseException | ErrorInfo) -> dict[str, Any]:
    """Build a failure reply from an exception (or a ready :class:`ErrorInfo`).

    *id* is ``None`` only when the request's id could not be read."""
    _check_id(id, nullable=True)
    info = exc if isinstance(exc, ErrorInfo) else error_info(exc)
    return {"id": id, "error": info.to_json()}


def parse_reply(obj: Any) -> Reply:
    """Validate a received reply object; raises :class:`ProtocolError` naming the field."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"reply must be an object, got {type(obj).__name__}")
    if "error" in obj:
        _check_keys(obj, "error reply", {"id", "error"})
        _check_id(obj["id"], nullable=True)
        err = obj["error"]
        if not isinstance(err, dict):
            raise ProtocolError(f"'error' must be an object, got {type(err).__name__}")
        _check_keys(err, "'error'", {"type", "errno", "message"})
        if not isinstance(err["type"], str) or not err["type"]:
            raise ProtocolError(f"'error.type' must be a non-empty string, got {err['type']!r:.80}")
        if err["errno"] is not None and not _is_int(err["errno"]):
            raise ProtocolError(
                f"'error.errno' must be an integer or null, got {err['errno']!r:.80}"
            )
        if not isinstance(err["message"], str):
            raise ProtocolError(f"'error.message' must be a string, got {err['message']!r:.80}")
        return Reply(id=obj["id"], error=ErrorInfo(err["type"], err["errno"], err["message"]))
    _check_keys(obj, "reply", {"id", "result"}, frozenset({"fds"}))
    _check_id(obj["id"])
    nfds = obj.get("fds", 0)
    _check_nfds(nfds)
    return Reply(id=obj["id"], result=obj["result"], fds=nfds)
