"""Round trips of kit.rpc over real socketpairs: server in a thread (or a forked child).

The module uses ``from __future__ import annotations``: every served method below has string
annotations, which check_method must resolve.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import wait_until

from kit.rpc import (
    MAX_FDS,
    MAX_FRAME,
    FileDescriptor,
    FrameError,
    ProtocolError,
    RemoteError,
    RPCClient,
    RPCMethodError,
    UnknownMethodError,
    WithFds,
    check_method,
    parse_reply,
    recv_frame,
    send_frame,
    serve,
)
from kit.rpc.messages import Reply

ENGINE = "test"
TIMEOUT = 5.0


# --------------------------------------------------------------------------- served methods


class CustomError(Exception):
    pass


def add(a: int, b: int = 0) -> int:
    return a + b


def scale(x: float, factor: float = 2.0) -> float:
    return x * factor


def echo(
    text: str | None = None,
    items: list[int] | None = None,
    mapping: dict[str, list[str]] | None = None,
    flag: bool = False,
    anything: list | dict | None = None,
) -> dict:
    return {"text": text, "items": items, "mapping": mapping, "flag": flag, "anything": anything}


def fail(kind: str, message: str = "boom") -> None:
    if kind == "enoent":
        open("/nonexistent/kit-rpc-test", encoding="utf-8")  # noqa: SIM115 raises ENOENT
    if kind == "eacces":
        raise PermissionError(errno.EACCES, "Permission denied", "/secret")
    if kind == "eperm_rename":
        raise OSError(errno.EPERM, "Operation not permitted", "/a", None, "/b")
    if kind == "oserror_noerrno":
        raise OSError(message)
    if kind == "value":
        raise ValueError(message)
    if kind == "key":
        raise KeyError(message)
    if kind == "custom":
        raise CustomError(message)
    raise RuntimeError(f"unknown kind {kind}")


def read_fd(fd: FileDescriptor, size: int = 100) -> str:
    try:
        return os.read(fd, size).decode()
    finally:
        os.close(fd)


def read_two(first: FileDescriptor, second: FileDescriptor | None = None) -> list:
    out = [read_fd(first)]
    if second is not None:
        out.append(read_fd(second))
    return out


def make_pipe(data: str) -> WithFds:
    r, w = os.pipe()
    os.write(w, data.encode())
    os.close(w)
    return WithFds({"made": True}, fds=[r])


def bad_fds() -> WithFds:
    return WithFds(None, fds=[True, -3, "4"])


def pass_back(fd: FileDescriptor) -> WithFds:
    return WithFds("back", fds=[fd])  # the server closes its copy once sent


def unserialisable() -> object:
    return {"set": {1, 2}}


def huge() -> str:
    return "x" * (MAX_FRAME + 10)


def nan() -> float:
    return float("nan")


def length(text: str) -> int:
    return len(text)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


BLOCK = threading.Event()
BLOCKED = threading.Event()


def block() -> str:
    BLOCKED.set()
    BLOCK.wait(TIMEOUT)
    return "released"


METHODS: dict[str, Callable[..., Any]] = {
    f"{ENGINE}.{f.__name__}": f
    for f in (
        add,
        scale,
        echo,
        fail,
        read_fd,
        read_two,
        make_pipe,
        bad_fds,
        pass_back,
        unserialisable,
        huge,
        nan,
        length,
        sleep,
        block,
    )
}


# --------------------------------------------------------------------------- helpers


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def queued(sock: socket.socket) -> int:
    """Bytes received on ``sock`` and not read yet."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]


class ServerThread:
    """serve() in a thread on one end of a socketpair; records on_call records."""

    def __init__(self, methods: dict[str, Any] | None = None) -> None:
        self.records: list[dict] = []
        self.sock, self.server_sock = socket.socketpair()
        self.sock.settimeout(TIMEOUT)
        self.result: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(METHODS if methods is None else methods,), daemon=True
        )
        self.thread.start()

    def _run(self, methods: dict[str, Any]) -> None:
        try:
            self.result = serve(self.server_sock, methods, on_call=self.records.append)
        except BaseException as exc:  # surfaced by wait()
            self.error = exc

    def client(self) -> RPCClient:
        return RPCClient(self.sock, ENGINE)

    def wait(self) -> int | None:
        """Wait for serve() to return (the client side must have closed or been shut)."""
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "serve() did not return"
        if self.error is not None:
            raise self.error
        return self.result

    def finish(self) -> int | None:
        self.sock.close()
        result = self.wait()
        self.server_sock.close()
        return result


@pytest.fixture
def srv():
    before = fd_count()
    server = ServerThread()
    yield server
    if not server.sock._closed:  # type: ignore[attr-defined]
        server.sock.close()
    assert server.wait() == 0
    server.server_sock.close()
    assert fd_count() == before, "file descriptors leaked"


def frame_bytes(body: bytes | dict) -> bytes:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return struct.pack(">I", len(body)) + body


def send_raw(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def request(id: int, method: str, args: dict | None = None, nfds: int = 0) -> dict:
    return {"id": id, "method": method, "args": args or {}, "fds": nfds}


def read_reply(sock: socket.socket) -> Reply:
    frame = recv_frame(sock)
    assert frame is not None, "server closed instead of replying"
    obj, fds = frame
    assert fds == []
    return parse_reply(obj)


def assert_error(reply: Reply, type_: str, *fragments: str, id: int | object | None = ...) -> None:
    assert reply.error is not None, f"expected an error reply, got {reply}"
    assert reply.error.type == type_, reply.error
    for fragment in fragments:
        assert fragment in reply.error.message, reply.error.message
    if id is not ...:
        assert reply.id == id


def assert_still_serving(sock: socket.socket, id: int = 999) -> None:
    send_frame(sock, request(id, f"{ENGINE}.add", {"a": 40, "b": 2}))
    reply = read_reply(sock)
    assert reply.ok and reply.result == 42 and reply.id == id


def make_fds(n: int) -> list[int]:
    r, w = os.pipe()
    fds = [r, w] + [os.dup(r) for _ in range(n - 2)]
    return fds[:n]


# --------------------------------------------------------------------------- round trips


def test_round_trip_results(srv: ServerThread) -> None:
    c = srv.client()
    assert c.call("add", a=1, b=2) == 3
    assert c.add(a=5) == 5
    assert c.scale(x=3) == 6  # int accepted for float
    assert c.scale(x=1.5, factor=0.5) == 0.75
    got = c.echo(
        text="héllo \u2603 \ud800",
        items=[1, 2],
        mapping={"k": ["v"]},
        flag=True,
        anything={"x": [None]},
    )
    assert got == {
        "text": "héllo \u2603 \ud800",
        "items": [1, 2],
        "mapping": {"k": ["v"]},
        "flag": True,
        "anything": {"x": [None]},
    }
    assert c.echo() == {
        "text": None,
        "items": None,
        "mapping": None,
        "flag": False,
        "anything": None,
    }
    assert c.sleep(seconds=0) is None


def test_request_ids_and_records(srv: ServerThread) -> None:
    c = srv.client()
    c.add(a=1)
    with pytest.raises(ValueError):
        c.fail(kind="value", message="nope")
    assert [r["method"] for r in srv.records] == ["test.add", "test.fail"]
    ok, err = srv.records
    assert ok["ok"] is True and ok["error"] is None and ok["args"] == {"a": 1}
    assert ok["duration_ms"] >= 0
    assert err["ok"] is False
    assert err["error"] == {"type": "ValueError", "errno": None, "message": "nope"}
    assert set(ok) == {"method", "args", "ok", "error", "duration_ms"}
    json.dumps(srv.records)  # JSON-safe for the ledger


def test_on_call_runs_before_reply(srv: ServerThread) -> None:
    c = srv.client()
    for i in range(20):
        c.add(a=i)
        assert len(srv.records) == i + 1


# --------------------------------------------------------------------------- typed errors


def test_errno_survives_as_oserror_subclass(srv: ServerThread) -> None:
    c = srv.client()
    with pytest.raises(FileNotFoundError) as info:
        c.fail(kind="enoent")
    assert info.value.errno == errno.ENOENT
    assert info.value.remote_type == "FileNotFoundError"
    assert str(info.value) == "[Errno 2] No such file or directory: '/nonexistent/kit-rpc-test'"
    with pytest.raises(PermissionError) as info2:
        c.fail(kind="eacces")
    assert info2.value.errno == errno.EACCES and "'/secret'" in str(info2.value)
    with pytest.raises(PermissionError) as info3:
        c.fail(kind="eperm_rename")
    assert info3.value.errno == errno.EPERM and "'/a' -> '/b'" in str(info3.value)
    with pytest.raises(OSError) as info4:
        c.fail(kind="oserror_noerrno", message="plain")
    assert (
        type(info4.value) is OSError and info4.value.errno is None and str(info4.value) == "plain"
    )


def test_builtin_and_custom_exceptions(srv: ServerThread) -> None:
    c = srv.client()
    with pytest.raises(ValueError, match=r"^bad value$") as v:
        c.fail(kind="value", message="bad value")
    assert v.value.remote_type == "ValueError"
    with pytest.raises(KeyError) as k:
        c.fail(kind="key", message="missing-key")
    assert k.value.args == ("missing-key",)
    with pytest.raises(RuntimeError, match="unknown kind other"):
        c.fail(kind="other")
    with pytest.raises(RemoteError) as r:
        c.fail(kind="custom", message="mine")
    assert r.value.remote_type == "CustomError" and r.value.message == "mine"
    assert str(r.value) == "CustomError: mine"
    assert c.add(a=1) == 1


# --------------------------------------------------------------------------- bad requests


def test_unknown_method(srv: ServerThread) -> None:
    c = srv.client()
    with pytest.raises(UnknownMethodError, match=r"unknown method 'test.nope'"):
        c.nope()
    send_frame(srv.sock, request(7, "other.add", {"a": 1}))
    assert_error(read_reply(srv.sock), "UnknownMethodError", "unknown method 'other.add'", id=7)
    assert c.add(a=1) == 1
    assert srv.records[0]["method"] == "test.nope" and not srv.records[0]["ok"]


@pytest.mark.parametrize(
    "method, fragment",
    [
        ("test.__init__", "private method '__init__' is never served"),
        ("test._secret", "private method '_secret' is never served"),
        ("test.__class__", "private method '__class__' is never served"),
        ("add", 'must have the form "<engine>.<method>"'),
        ("test.", 'must have the form "<engine>.<method>"'),
        ("test.a-b", "invalid method name 'a-b'"),
        ("te st.add", "invalid engine name 'te st'"),
    ],
)
def test_bad_method_names(srv: ServerThread, method: str, fragment: str) -> None:
    send_frame(srv.sock, request(3, method))
    assert_error(read_reply(srv.sock), "ProtocolError", "'method'", fragment, id=3)
    assert_still_serving(srv.sock)


def test_private_names_rejected_locally_and_at_registration() -> None:
    a, b = socket.socketpair()
    with a, b:
        c = RPCClient(a, ENGINE)
        with pytest.raises(ProtocolError, match="private method '_secret'"):
            c.call("_secret")
        with pytest.raises(AttributeError):
            c._secret  # noqa: B018 -- attribute sugar never reaches private names
        with pytest.raises(RPCMethodError, match=r"private method .* is never served"):
            serve(b, {"test._secret": add})
        with pytest.raises(RPCMethodError, match="private method '__init__'"):
            serve(b, {"test.__init__": check_method("init", add)})


@pytest.mark.parametrize(
    "obj, fragments",
    [
        ({"id": 1, "method": "test.add", "args": {}}, ["missing field 'fds'"]),
        (
            {"id": 1, "method": "test.add", "args": {}, "fds": 0, "extra": 1},
            ["unknown field 'extra'"],
        ),
        ({"id": True, "method": "test.add", "args": {}, "fds": 0}, ["'id'"]),
        ({"id": -1, "method": "test.add", "args": {}, "fds": 0}, ["'id'"]),
        ({"id": 1, "method": 5, "args": {}, "fds": 0}, ["'method' must be a string"]),
        ({"id": 1, "method": "test.add", "args": [], "fds": 0}, ["'args' must be an object"]),
        (
            {"id": 1, "method": "test.add", "args": {"a b": 1}, "fds": 0},
            ["invalid argument name 'a b'"],
        ),
        ({"id": 1, "method": "test.add", "args": {}, "fds": -1}, ["'fds'"]),
        ({"id": 1, "method": "test.add", "args": {}, "fds": 99}, ["'fds'"]),
    ],
)
def test_schema_violations(srv: ServerThread, obj: dict, fragments: list[str]) -> None:
    send_frame(srv.sock, obj)
    reply = read_reply(srv.sock)
    assert_error(reply, "ProtocolError", *fragments)
    assert reply.id == (obj["id"] if type(obj["id"]) is int and obj["id"] >= 0 else None)
    assert_still_serving(srv.sock)


@pytest.mark.parametrize(
    "method, args, fragment, exc",
    [
        ("add", {"a": 1, "c": 2}, "method 'test.add': unexpected argument 'c'", TypeError),
        ("add", {"b": 2}, "method 'test.add': missing required argument 'a'", TypeError),
        ("add", {"a": "1"}, "method 'test.add': argument 'a' must be int, got str", TypeError),
        ("add", {"a": True}, "argument 'a' must be int, got bool", TypeError),
        ("add", {"a": 1.0}, "argument 'a' must be int, got float", TypeError),
        ("add", {"a": None}, "argument 'a' must be int, got None", TypeError),
        ("scale", {"x": False}, "argument 'x' must be float, got bool", TypeError),
        ("echo", {"items": [1, "2"]}, "argument 'items'[1] must be int, got str", TypeError),
        (
            "echo",
            {"mapping": {"k": [1]}},
            "argument 'mapping'['k'][0] must be str, got int",
            TypeError,
        ),
        (
            "echo",
            {"mapping": []},
            "argument 'mapping' must be dict[str, list[str]] | None, got list",
            TypeError,
        ),
        ("echo", {"flag": 1}, "argument 'flag' must be bool, got int", TypeError),
        ("echo", {"anything": "x"}, "argument 'anything' must be", TypeError),
        (
            "read_fd",
            {"fd": 0},
            "refers to descriptor #0, but 0 descriptor(s) were attached",
            TypeError,
        ),
        ("read_fd", {"fd": "0"}, "argument 'fd' is a FileDescriptor", TypeError),
    ],
)
def test_bad_arguments(
    srv: ServerThread, method: str, args: dict, fragment: str, exc: type
) -> None:
    c = srv.client()
    with pytest.raises(exc) as info:
        c.call(method, **args)
    assert fragment in str(info.value)
    assert info.value.remote_type == "TypeError"
    assert c.add(a=2, b=3) == 5


def test_client_rejects_unencodable_arguments_without_sending(srv: ServerThread) -> None:
    c = srv.client()
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        c.echo(text={1, 2})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        c.scale(x=float("inf"))
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        c.echo(text="x" * MAX_FRAME)
    assert srv.records == []
    assert c.add(a=1) == 1


def test_unsendable_results(srv: ServerThread) -> None:
    c = srv.client()
    with pytest.raises(
        TypeError, match=r"method 'test.unserialisable' returned an unsendable result"
    ):
        c.unserialisable()
    with pytest.raises(TypeError, match="returned an unsendable result"):
        c.nan()
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        c.huge()
    with pytest.raises(TypeError, match="returned invalid file descriptors: True, -3, '4'"):
        c.bad_fds()
    assert c.add(a=1) == 1
    assert [r["ok"] for r in srv.records] == [False, False, False, False, True]


# --------------------------------------------------------------------------- bad frames


def test_invalid_utf8(srv: ServerThread) -> None:
    send_raw(
        srv.sock, frame_bytes(b'{"id": 1, "method": "test.add", "args": {"a": "\xff"}, "fds": 0}')
    )
    assert_error(
        read_reply(srv.sock),
        "ProtocolError",
        "malformed frame (invalid_utf8)",
        "not valid UTF-8",
        id=None,
    )
    assert_still_serving(srv.sock)
    assert srv.records[0]["method"] is None and srv.records[0]["ok"] is False


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b'{"id": 1, "method": ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"id": NaN}', "NaN is not valid JSON"),
        (b'{"id": 1, "id": 2}', "duplicate key 'id'"),
        (b'{"id": 1e999}', "number 1e999 is out of range"),
        (b'{"id": -Infinity}', "-Infinity is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"9" * 5000, "not valid JSON"),
    ],
)
def test_invalid_json(srv: ServerThread, body: bytes, fragment: str) -> None:
    send_raw(srv.sock, frame_bytes(body))
    assert_error(read_reply(srv.sock), "ProtocolError", "invalid_json", fragment, id=None)
    assert_still_serving(srv.sock)


@pytest.mark.parametrize(
    "body, what",
    [(b"[1, 2]", "an array"), (b'"x"', "a string"), (b"null", "null"), (b"3", "a number")],
)
def test_json_not_an_object(srv: ServerThread, body: bytes, what: str) -> None:
    send_raw(srv.sock, frame_bytes(body))
    assert_error(
        read_reply(srv.sock), "ProtocolError", f"must be a JSON object, not {what}", id=None
    )
    assert_still_serving(srv.sock)


def test_oversized_frame_replies_then_closes(srv: ServerThread) -> None:
    send_raw(srv.sock, struct.pack(">I", MAX_FRAME + 1) + b"{}")
    assert_error(
        read_reply(srv.sock),
        "ProtocolError",
        "oversized",
        f"exceeds the maximum of {MAX_FRAME}",
        id=None,
    )
    assert recv_frame(srv.sock) is None  # shut down: the stream cannot be resynchronised
    assert srv.wait() == 0


def test_max_size_frame_accepted(srv: ServerThread) -> None:
    c = srv.client()
    overhead = len(json.dumps(request(1, "test.length", {"text": ""}), separators=(",", ":")))
    text = "y" * (MAX_FRAME - overhead)
    assert c.length(text=text) == len(text)  # the request body is exactly MAX_FRAME bytes
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        c.length(text=text + "y")


@pytest.mark.parametrize("how", ["header", "body", "empty-body"])
@pytest.mark.parametrize("close", ["shutdown", "close"])
def test_truncated_frame_ends_serving(how: str, close: str) -> None:
    before = fd_count()
    server = ServerThread()
    data = frame_bytes(request(1, "test.add", {"a": 1}))
    partial = {"header": data[:2], "body": data[:10], "empty-body": data[:4]}[how]
    fds = make_fds(2)
    send_raw(server.sock, partial, fds)  # descriptors of a truncated frame must be closed
    if close == "shutdown":
        server.sock.shutdown(socket.SHUT_WR)
        assert server.wait() == 0
        server.server_sock.close()
        assert recv_frame(server.sock) is None  # no reply was sent
    server.sock.close()
    assert server.wait() == 0
    assert server.records == []
    server.server_sock.close()
    for fd in fds:
        os.close(fd)
    assert fd_count() == before


def test_clean_eof_returns_zero() -> None:
    server = ServerThread()
    c = server.client()
    assert c.add(a=1) == 1
    c.close()
    c.close()  # idempotent
    assert server.wait() == 0
    server.server_sock.close()
    with pytest.raises(ConnectionError, match="closed"):
        c.add(a=1)


# --------------------------------------------------------------------------- descriptors


def test_fd_passing_pipe(srv: ServerThread) -> None:
    c = srv.client()
    r, w = os.pipe()
    os.write(w, b"through the socket")
    os.close(w)
    assert c.read_fd(fd=FileDescriptor(r)) == "through the socket"
    os.close(r)  # the client keeps ownership of what it sends


def test_fd_passing_two_and_optional(srv: ServerThread) -> None:
    c = srv.client()
    pipes = [os.pipe() for _ in range(2)]
    for i, (_, w) in enumerate(pipes):
        os.write(w, f"pipe{i}".encode())
        os.close(w)
    (r0, _), (r1, _) = pipes
    assert c.read_two(first=FileDescriptor(r0), second=FileDescriptor(r1)) == ["pipe0", "pipe1"]
    os.close(r0)
    os.close(r1)
    r, w = os.pipe()
    os.write(w, b"only")
    os.close(w)
    # explicit fds= with indexes
    assert c.call("read_two", fds=[r], first=0, second=None) == ["only"]
    os.close(r)


def test_fds_returned_by_method(srv: ServerThread) -> None:
    c = srv.client()
    got = c.make_pipe(data="returned")
    assert isinstance(got, WithFds)
    value, fds = got
    assert value == {"made": True} and len(fds) == 1
    assert os.read(fds[0], 100) == b"returned"
    assert os.get_inheritable(fds[0]) is False  # received with O_CLOEXEC
    os.close(fds[0])


def test_fd_passed_back(srv: ServerThread) -> None:
    c = srv.client()
    r, w = os.pipe()
    value, fds = c.pass_back(fd=FileDescriptor(w))
    assert value == "back" and len(fds) == 1
    os.write(fds[0], b"loop")
    assert os.read(r, 10) == b"loop"
    for fd in (r, w, *fds):
        os.close(fd)


def test_fds_where_none_expected(srv: ServerThread) -> None:
    fds = make_fds(2)
    send_frame(srv.sock, request(4, "test.add", {"a": 1}, nfds=2), fds)
    assert_error(
        read_reply(srv.sock),
        "TypeError",
        "method 'test.add': 2 file descriptor(s) attached but not used",
        id=4,
    )
    # undeclared: "fds": 0 but one attached
    send_frame(srv.sock, request(5, "test.add", {"a": 1}), fds[:1])
    assert_error(
        read_reply(srv.sock),
        "ProtocolError",
        "'fds' declares 0 descriptor(s) but 1 were attached",
        id=5,
    )
    # declared and used, but one too many attached
    send_frame(srv.sock, request(6, "test.read_fd", {"fd": 1}, nfds=2), fds)
    assert_error(
        read_reply(srv.sock), "TypeError", "1 file descriptor(s) attached but not used", id=6
    )
    # the same descriptor used twice
    send_frame(srv.sock, request(7, "test.read_two", {"first": 0, "second": 0}, nfds=1), fds[:1])
    assert_error(read_reply(srv.sock), "TypeError", "argument 'second' reuses descriptor #0", id=7)
    # descriptors on an unknown method and on a malformed frame
    send_frame(srv.sock, request(8, "test.nope", {}, nfds=1), fds[:1])
    assert_error(read_reply(srv.sock), "UnknownMethodError", id=8)
    send_raw(srv.sock, frame_bytes(b"not json"), fds)
    assert_error(read_reply(srv.sock), "ProtocolError", "invalid_json")
    assert_still_serving(srv.sock)
    for fd in fds:
        os.close(fd)


def test_fds_inside_body_rejected(srv: ServerThread) -> None:
    data = frame_bytes(request(9, "test.add", {"a": 1}))
    fds = make_fds(2)
    send_raw(srv.sock, data[:4])
    # the server has read the header alone (nothing left queued on its end)
    wait_until(lambda: queued(srv.server_sock) == 0, what="the server to read the header")
    send_raw(srv.sock, data[4:], fds)
    assert_error(
        read_reply(srv.sock), "ProtocolError", "unexpected_fds", "inside a frame body", id=9
    )
    assert_still_serving(srv.sock)
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("count", [MAX_FDS + 1, MAX_FDS + 4, 200])
def test_too_many_fds(srv: ServerThread, count: int) -> None:
    fds = make_fds(count)
    send_raw(srv.sock, frame_bytes(request(11, "test.add", {"a": 1}, nfds=0)), fds)
    assert_error(
        read_reply(srv.sock), "ProtocolError", "too_many_fds", f"more than {MAX_FDS}", id=11
    )
    assert_still_serving(srv.sock)
    for fd in fds:
        os.close(fd)


def test_send_frame_limits() -> None:
    a, b = socket.socketpair()
    with a, b:
        fds = make_fds(MAX_FDS + 1)
        with pytest.raises(FrameError) as info:
            send_frame(a, {"x": 1}, fds)
        assert info.value.kind == FrameError.TOO_MANY_FDS
        with pytest.raises(FrameError) as info:
            send_frame(a, {"x": "y" * MAX_FRAME})
        assert info.value.kind == FrameError.OVERSIZED and not info.value.recoverable
        with pytest.raises(FrameError) as info:
            send_frame(a, ["not", "a", "dict"])  # type: ignore[arg-type]
        assert info.value.kind == FrameError.NOT_OBJECT
        for fd in fds:
            os.close(fd)
        # nothing was written by the failed sends
        send_frame(a, {"ok": 1}, [])
        assert recv_frame(b) == ({"ok": 1}, [])
        a.shutdown(socket.SHUT_WR)
        assert recv_frame(b) is None


def test_max_fds_round_trip() -> None:
    before = fd_count()
    a, b = socket.socketpair()
    fds = make_fds(MAX_FDS)
    send_frame(a, {"n": MAX_FDS}, fds)
    obj, got = recv_frame(b)
    assert obj == {"n": MAX_FDS} and len(got) == MAX_FDS
    for fd in fds + got:
        os.close(fd)
    a.close()
    b.close()
    assert fd_count() == before


def test_large_frames_short_reads() -> None:
    """A body much larger than the socket buffer arrives in many pieces, in a thread."""
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        obj = {"data": "z" * (MAX_FRAME - 20)}
        t = threading.Thread(target=send_frame, args=(a, obj))
        t.start()
        assert recv_frame(b) == (obj, [])
        t.join()


# --------------------------------------------------------------------------- client behaviour


def test_client_marks_itself_broken_on_bad_reply_id() -> None:
    a, b = socket.socketpair()
    with a, b:
        c = RPCClient(a, ENGINE)

        def fake_server() -> None:
            recv_frame(b)
            send_frame(b, {"id": 12345, "result": 1})

        t = threading.Thread(target=fake_server)
        t.start()
        with pytest.raises(ProtocolError, match="'id' is 12345, expected 1"):
            c.add(a=1)
        t.join()
        with pytest.raises(ConnectionError, match="unusable"):
            c.add(a=1)


def test_client_rejects_malformed_reply() -> None:
    a, b = socket.socketpair()
    with a, b:
        c = RPCClient(a, ENGINE)

        def fake_server() -> None:
            recv_frame(b)
            send_frame(b, {"id": 1, "result": 1, "extra": 2})
            recv_frame(b)
            send_frame(b, {"id": 2, "error": {"type": "X", "errno": "2", "message": "m"}})

        t = threading.Thread(target=fake_server)
        t.start()
        with pytest.raises(ProtocolError, match="unknown field 'extra'"):
            c.add(a=1)
        with pytest.raises(ProtocolError, match=r"'error.errno'"):
            c.add(a=1)
        t.join()


def test_client_timeout_and_single_thread_guard(srv: ServerThread) -> None:
    c = srv.client()
    BLOCK.clear()
    BLOCKED.clear()
    errors: list[BaseException] = []
    results: list[Any] = []

    def first() -> None:
        try:
            results.append(c.block())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert BLOCKED.wait(TIMEOUT)
    with pytest.raises(RuntimeError, match="several threads"):
        c.add(a=1)
    BLOCK.set()
    t.join(TIMEOUT)
    assert results == ["released"] and not errors
    srv.sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        c.sleep(seconds=0.3)
    with pytest.raises(ConnectionError, match="unusable"):
        c.add(a=1)


def test_getattr_sugar_passes_method_named_argument() -> None:
    def takes_method(method: str) -> str:
        return method.upper()

    server = ServerThread({"test.takes_method": takes_method})
    c = server.client()
    assert c.takes_method(method="x") == "X"
    assert c.call("takes_method", method="y") == "Y"
    assert repr(c) == "<RPCClient engine='test' open>"
    c.close()
    assert server.wait() == 0
    server.server_sock.close()


def test_invalid_engine_name() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ProtocolError, match="invalid engine name"):
        RPCClient(a, "bad engine")


# --------------------------------------------------------------------------- forked server


def test_server_in_forked_child_exits_zero() -> None:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # child: serve, exit with serve's code
        code = 1
        try:
            a.close()
            code = serve(b, METHODS)
        finally:
            os._exit(code)
    b.close()
    c = RPCClient(a, ENGINE)
    assert c.add(a=20, b=22) == 42
    with pytest.raises(FileNotFoundError):
        c.fail(kind="enoent")
    r, w = os.pipe()
    os.write(w, b"to the child")
    os.close(w)
    assert c.read_fd(fd=FileDescriptor(r)) == "to the child"
    os.close(r)
    c.close()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
