"""RPC transport between the master process and the RPC server process (SPEC §6).

Length-prefixed JSON frames over a connected unix stream socket, file descriptors via
``SCM_RIGHTS`` (:mod:`.codec`); a strict request/reply schema (:mod:`.messages`); methods
validated at registration (:mod:`.methods`); the one-request-at-a-time server loop
(:mod:`.server`) and the client (:mod:`.client`). Standard library only; no pickle, no eval.
"""

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
    "FrameError",
    "send_frame",
    "recv_frame",
    "ProtocolError",
    "UnknownMethodError",
    "Request",
    "Reply",
    "ErrorInfo",
    "make_request",
    "parse_request",
    "make_result",
    "make_error",
    "parse_reply",
    "FileDescriptor",
    "WithFds",
    "MethodSpec",
    "RPCMethodError",
    "check_method",
    "serve",
    "prepare_methods",
    "CallRecord",
    "RPCClient",
    "RemoteError",
    "REMOTE_BUILTIN_ERRORS",
    "exception_from_error",
]
