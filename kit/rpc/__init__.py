"""RPC between the master process and the RPC server process (SPEC §6), stdlib only."""

from .client import REMOTE_BUILTIN_ERRORS, RemoteError, RPCClient, exception_from_error
from .codec import MAX_FDS, MAX_FRAME, FrameError, recv_frame, send_frame
from .messages import (
    ErrorInfo,
    ProtocolError,
    Reply,
    Request,
    UnknownMethodError,
    make_error,
    make_request,
    make_result,
    parse_reply,
    parse_request,
)
from .methods import FileDescriptor, MethodSpec, RPCMethodError, WithFds, check_method
from .server import CallRecord, prepare_methods, serve

__all__ = [
    "MAX_FDS",
    "MAX_FRAME",
    "REMOTE_BUILTIN_ERRORS",
    "CallRecord",
    "ErrorInfo",
    "FileDescriptor",
    "FrameError",
    "MethodSpec",
    "ProtocolError",
    "RPCClient",
    "RPCMethodError",
    "RemoteError",
    "Reply",
    "Request",
    "UnknownMethodError",
    "WithFds",
    "check_method",
    "exception_from_error",
    "make_error",
    "make_request",
    "make_result",
    "parse_reply",
    "parse_request",
    "prepare_methods",
    "recv_frame",
    "send_frame",
    "serve",
]
