"""The mock RPC transport (kit.testing.rpc_mock): the same codec and server as a real
socketpair, call recording, dispatch faults, and no descriptor or thread left behind; the
byte-level faults of tests/rpc_wire_faults.py on the kit's client and codec.

Every test of ``tests/test_rpc.py`` that takes the ``srv`` server (round trips, typed errors,
every bad request, bad frame and descriptor misuse) runs again here against a MockTransport,
unchanged: same inputs, same expected error text, same "still serving" checks. A test added
there later is picked up automatically.
"""

from __future__ import annotations

import errno
import inspect
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import test_rpc as real
from conftest import wait_until
from rpc_wire_faults import WireFault, WireTransport
from test_rpc import (
    ENGINE,
    METHODS,
    TIMEOUT,
    add,
    assert_error,
    assert_still_serving,
    fd_count,
    frame_bytes,
    make_fds,
    read_reply,
    request,
    send_raw,
)

from kit import system as kit_system
from kit.registry import RegistryError
from kit.rpc import (
    FileDescriptor,
    ProtocolError,
    RPCClient,
    RPCMethodError,
    WithFds,
    recv_frame,
    send_frame,
)
from kit.testing.rpc_mock import Fault, MockTransport, RecordingSystem, Rule

# --------------------------------------------------------------------------- helpers


def thread_count() -> int:
    return threading.active_count()


def mock_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kit-rpc-mock")]


class MockServer:
    """``test_rpc.ServerThread``'s interface, served through a MockTransport."""

    def __init__(self, methods: dict[str, Any] | None = None) -> None:
        self.transport = MockTransport(
            ENGINE, METHODS if methods is None else methods, timeout=TIMEOUT
        )
        self.sock = self.transport.client_socket

    @property
    def records(self) -> list[dict]:
        return self.transport.server_records

    @property
    def server_sock(self) -> socket.socket:
        """The end the server reads the requests from."""
        return self.transport._server_sock

    def client(self) -> RPCClient:
        return self.transport.client()

    def wait(self) -> int:
        return self.transport.wait_server(TIMEOUT)


@pytest.fixture
def msrv() -> Iterator[MockServer]:
    """A MockTransport serving test_rpc's methods; checks at teardown that serve() returned 0
    and that no descriptor or thread is left."""
    fds, threads = fd_count(), thread_count()
    server = MockServer()
    yield server
    server.transport.close()
    assert server.transport.exit_code == 0
    assert fd_count() == fds, "file descriptors leaked"
    assert mock_threads() == [] and thread_count() <= threads, "threads leaked"


@pytest.fixture
def t(msrv: MockServer) -> MockTransport:
    return msrv.transport


@pytest.fixture
def w(no_leak: None) -> Iterator[WireTransport]:
    """test_rpc's methods behind the wire-fault relay."""
    with WireTransport(ENGINE, METHODS, timeout=TIMEOUT) as wire:
        yield wire
    assert wire.exit_code == 0


@pytest.fixture
def no_leak() -> Iterator[None]:
    fds, threads = fd_count(), thread_count()
    yield
    assert fd_count() == fds, "file descriptors leaked"
    assert mock_threads() == [] and thread_count() <= threads, "threads leaked"


# --------------------------------------------------------------------------- test_rpc, on the mock

_PARAM_SET = type(pytest.param(None))


def _expand(func: Any) -> list[tuple[dict[str, Any], str]] | None:
    """The keyword arguments of every parametrized case of *func* (None if its parameters
    are not all covered by parametrize marks)."""
    combos: list[tuple[dict[str, Any], str]] = [({}, "")]
    covered: set[str] = set()
    for mark in getattr(func, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        covered.update(names)
        expanded = []
        for kwargs, cid in combos:
            for i, value in enumerate(mark.args[1]):
                if isinstance(value, _PARAM_SET):
                    value = value.values
                elif len(names) == 1:
                    value = (value,)
                expanded.append(
                    (
                        {**kwargs, **dict(zip(names, value, strict=False))},
                        f"{cid}-{i}" if cid else str(i),
                    )
                )
        combos = expanded
    params = list(inspect.signature(func).parameters)[1:]
    return combos if set(params) == covered else None


def _reused_cases() -> list[Any]:
    cases = []
    for name, func in sorted(vars(real).items()):
        if not name.startswith("test_") or not inspect.isfunction(func):
            continue
        params = list(inspect.signature(func).parameters)
        if not params or params[0] != "srv":
            continue
        combos = _expand(func)
        assert combos is not None, (
            f"test_rpc.{name}: parameters not all parametrized; adapt _expand"
        )
        for kwargs, cid in combos:
            cases.append(pytest.param(func, kwargs, id=f"{name}[{cid}]" if cid else name))
    return cases


REUSED = _reused_cases()


def test_reuse_covers_the_bad_inputs() -> None:
    names = {case.values[0].__name__ for case in REUSED}
    assert {
        "test_unknown_method",
        "test_bad_method_names",
        "test_schema_violations",
        "test_bad_arguments",
        "test_invalid_utf8",
        "test_invalid_json",
        "test_json_not_an_object",
        "test_oversized_frame_replies_then_closes",
        "test_fds_where_none_expected",
        "test_fds_inside_body_rejected",
        "test_too_many_fds",
        "test_unsendable_results",
        "test_client_rejects_unencodable_arguments_without_sending",
    } <= names
    assert len(REUSED) > 60


@pytest.mark.parametrize("func, kwargs", REUSED)
def test_rpc_suite_on_the_mock(msrv: MockServer, func: Any, kwargs: dict[str, Any]) -> None:
    func(msrv, **kwargs)


# ------------------------------------------------ test_rpc cases that build their own server


@pytest.mark.parametrize("how", ["header", "body", "empty-body"])
@pytest.mark.parametrize("close", ["shutdown", "close"])
def test_truncated_frame_ends_serving(how: str, close: str, no_leak: None) -> None:
    transport = MockTransport(ENGINE, METHODS, timeout=TIMEOUT)
    sock = transport.client_socket
    data = frame_bytes(request(1, "test.add", {"a": 1}))
    partial = {"header": data[:2], "body": data[:10], "empty-body": data[:4]}[how]
    fds = make_fds(2)
    send_raw(sock, partial, fds)  # descriptors of a truncated frame must be closed
    if close == "shutdown":
        sock.shutdown(socket.SHUT_WR)
        assert transport.wait_server(TIMEOUT) == 0
        assert recv_frame(sock) is None  # no reply was sent
    else:
        sock.close()
        assert transport.wait_server(TIMEOUT) == 0
    assert transport.server_records == [] and transport.calls == []
    transport.close()
    for fd in fds:
        os.close(fd)


def test_clean_eof_returns_zero(no_leak: None) -> None:
    transport = MockTransport(ENGINE, METHODS)
    c = transport.client()
    assert c.add(a=1) == 1
    c.close()
    c.close()
    assert transport.wait_server(TIMEOUT) == 0
    with pytest.raises(ConnectionError, match="closed"):
        c.add(a=1)
    transport.close()
    transport.close()  # idempotent
    assert transport.closed


def test_unservable_methods_rejected_before_anything_starts(no_leak: None) -> None:
    with pytest.raises(RPCMethodError, match="private method '_secret' is never served"):
        MockTransport(ENGINE, {"_secret": add})

    def untyped(a):  # type: ignore[no-untyped-def]
        return a

    with pytest.raises(RPCMethodError, match="parameter 'a': missing type annotation"):
        MockTransport(ENGINE, {"untyped": untyped})
    with pytest.raises(ValueError, match="does not belong to engine 'test'"):
        MockTransport(ENGINE, {"other.add": add})
    with pytest.raises(ProtocolError, match="invalid engine name"):
        MockTransport("bad engine", {"add": add})
    with pytest.raises(TypeError, match="not of a mapping"):
        MockTransport(ENGINE, {"add": add}, system=RecordingSystem())


# --------------------------------------------------------------------------- recording


def test_calls_are_recorded(t: MockTransport) -> None:
    c = t.client()
    assert c.add(a=1, b=2) == 3
    with pytest.raises(FileNotFoundError):
        c.fail(kind="enoent")
    r, w = os.pipe()
    os.write(w, b"data")
    os.close(w)
    assert c.read_fd(fd=FileDescriptor(r)) == "data"
    os.close(r)
    _value, fds = c.make_pipe(data="x")
    os.close(fds[0])
    assert t.names == ["add", "fail", "read_fd", "make_pipe"]
    ok, failed, with_fd, returned_fd = t.calls
    assert (ok.index, ok.method, ok.args, ok.result, ok.error) == (
        1,
        "test.add",
        {"a": 1, "b": 2},
        3,
        None,
    )
    assert ok.ok and ok.answered and ok.ran and ok.faults == [] and ok.duration >= 0
    assert (
        failed.error["type"] == "FileNotFoundError"
        and failed.errno == errno.ENOENT
        and not failed.ok
    )
    assert "'/nonexistent/kit-rpc-test'" in failed.error["message"]
    assert with_fd.fds == 1 and with_fd.args == {"fd": 0}
    assert returned_fd.reply_fds == 1 and returned_fd.result == {"made": True}
    assert t.calls_to("add") == [ok] and t.calls_to("test.fail") == [failed]
    assert [r["method"] for r in t.server_records] == [
        "test.add",
        "test.fail",
        "test.read_fd",
        "test.make_pipe",
    ]


def test_bad_frames_are_recorded(t: MockTransport) -> None:
    send_raw(t.client_socket, frame_bytes(b"not json"))
    assert_error(read_reply(t.client_socket), "ProtocolError", "invalid_json")
    send_frame(t.client_socket, request(5, "test.nope"))
    assert_error(read_reply(t.client_socket), "UnknownMethodError", id=5)
    bad, unknown = t.calls
    assert bad.method is None and bad.args is None and "(invalid_json)" in bad.error["message"]
    assert bad.error["type"] == "ProtocolError" and bad.answered and not bad.ran
    assert unknown.method == "test.nope" and unknown.name == "nope" and not unknown.ran
    assert unknown.error["type"] == "UnknownMethodError"


def test_record_is_complete_before_the_client_sees_the_reply(t: MockTransport) -> None:
    c = t.client()
    for i in range(30):
        assert c.add(a=i) == i
        last = t.calls[-1]
        assert last.index == i + 1 and last.nth == i + 1 and last.result == i and last.answered


@pytest.mark.parametrize(
    "fault",
    [Fault.drop(), Fault.drop(phase="reply"), Fault.truncate(), Fault.close()],
    ids=["drop", "drop-reply", "truncate", "close"],
)
def test_record_is_complete_when_the_client_sees_a_cut(fault: Fault, no_leak: None) -> None:
    """Read right after the client's error, with no wait_server(): a fault must not let the
    client see the connection go before the call's record is complete."""
    incomplete = []
    for i in range(150):
        with MockTransport(ENGINE, METHODS, timeout=TIMEOUT) as transport:
            transport.inject(fault, on_call=1)
            c = transport.client()
            with pytest.raises(ConnectionError):
                c.add(a=i)
                c.add(a=i)  # close: the first call is answered, the next one fails
            call = transport.calls[0]
            complete = (
                call.args == {"a": i}
                and call.duration is not None
                and call.answered == call.ran
                and call.faults == [fault.kind]
                and len(transport.server_records) == 1
            )
            if not complete:
                incomplete.append(repr(call))
    assert incomplete == [], f"{len(incomplete)} of 150 records incomplete: {incomplete[0]}"


# --------------------------------------------------------------------------- faults


def test_errno_fault_by_method(t: MockTransport) -> None:
    rule = t.inject(Fault.errno(errno.EPERM), method="add")
    c = t.client()
    for _ in range(2):
        with pytest.raises(PermissionError) as info:
            c.add(a=1)
        assert info.value.errno == errno.EPERM
        assert str(info.value) == "[Errno 1] Operation not permitted"
        assert info.value.remote_type == "PermissionError"
    assert c.scale(x=2) == 4  # other methods are untouched
    assert rule.hits == 2
    assert [c.ran for c in t.calls] == [False, False, True]  # add never ran
    first = t.calls[0]
    assert first.faults == ["errno"] and first.answered
    assert first.error == {
        "type": "PermissionError",
        "errno": errno.EPERM,
        "message": "Operation not permitted",
    }


def test_errno_fault_full_name_and_message(t: MockTransport) -> None:
    t.inject(Fault.errno(errno.ENOSPC, "disk full"), method="test.echo")
    with pytest.raises(OSError) as info:
        t.client().echo(text="x")
    assert info.value.errno == errno.ENOSPC and info.value.strerror == "disk full"


def test_exception_fault_replaces_the_method(t: MockTransport) -> None:
    t.inject(Fault.exception(ValueError("bad input")), method="add", times=1)
    c = t.client()
    with pytest.raises(ValueError, match="bad input"):
        c.add(a=1)
    assert c.add(a=2) == 2
    refused, ran = t.calls
    assert refused.faults == ["exception"] and not refused.ran and refused.answered
    assert refused.error["type"] == "ValueError" and ran.ran and ran.ok


def test_on_call_counts_all_calls_or_calls_to_the_method(t: MockTransport) -> None:
    t.inject(Fault.errno(errno.EIO), on_call=2)  # the 2nd call of the transport
    t.inject(Fault.errno(errno.EBUSY), on_call=2, method="scale")  # the 2nd call to scale
    c = t.client()
    outcomes = []
    for method, args in [
        ("scale", {"x": 1}),
        ("add", {"a": 1}),
        ("add", {"a": 2}),
        ("scale", {"x": 2}),
        ("scale", {"x": 3}),
    ]:
        try:
            outcomes.append(c.call(method, **args))
        except OSError as exc:
            outcomes.append(errno.errorcode[exc.errno])
    assert outcomes == [2, "EIO", 2, "EBUSY", 6]
    assert [(call.name, call.nth) for call in t.calls] == [
        ("scale", 1),
        ("add", 1),
        ("add", 2),
        ("scale", 2),
        ("scale", 3),
    ]


def test_times_and_clear(t: MockTransport) -> None:
    rule = t.inject(Fault.errno(errno.EAGAIN), method="add", times=2)
    c = t.client()
    for _ in range(2):
        with pytest.raises(BlockingIOError):
            c.add(a=1)
    assert c.add(a=1) == 1 and rule.hits == 2 and rule.exhausted()
    t.inject(Fault.errno(errno.EAGAIN))
    with pytest.raises(BlockingIOError):
        c.scale(x=1)
    t.clear_faults()
    assert c.scale(x=1) == 2


def test_a_rule_counts_only_the_calls_its_fault_applied_to(t: MockTransport) -> None:
    ends = t.inject(Fault.errno(errno.EPERM), on_call=1)
    pre_empted = t.inject(Fault.exception(ValueError("never")), on_call=1)
    cut = t.inject(Fault.truncate(), times=1)
    c = t.client()
    with pytest.raises(PermissionError):
        c.add(a=1)  # the errno ended the call: the method never ran, nothing to truncate
    assert (ends.hits, pre_empted.hits, cut.hits) == (1, 0, 0)
    assert t.calls[0].faults == ["errno"] and not cut.exhausted()
    with pytest.raises(ConnectionError, match="in the middle of the reply"):
        c.add(a=2)  # the truncate rule still had its one hit
    assert cut.hits == 1 and cut.exhausted() and t.calls[1].faults == ["truncate"]


def test_the_first_cut_is_the_last_fault_applied(t: MockTransport) -> None:
    early = t.inject(Fault.delay(0.05), on_call=1)
    drop = t.inject(Fault.drop(phase="reply"), on_call=1)
    close = t.inject(Fault.close())
    late = t.inject(Fault.delay(30))
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="before replying"):
        t.client().add(a=1)
    assert 0.05 <= time.monotonic() - start < 10
    assert [r.hits for r in (early, drop, close, late)] == [1, 1, 0, 0]
    assert t.calls[0].faults == ["delay", "drop"]


def test_drop_request(t: MockTransport) -> None:
    t.inject(Fault.drop(), on_call=2)
    c = t.client()
    assert c.add(a=1) == 1
    with pytest.raises(
        ConnectionError, match=r"closed the connection before replying to 'test.add'"
    ):
        c.add(a=2)
    with pytest.raises(ConnectionError, match="unusable"):
        c.add(a=3)
    assert t.wait_server(TIMEOUT) == 0  # the server saw the connection end
    dropped = t.calls[1]
    assert dropped.faults == ["drop"] and not dropped.answered and not dropped.ran


def test_drop_reply_after_the_method_ran(t: MockTransport) -> None:
    t.inject(Fault.drop(phase="reply"), method="add")
    with pytest.raises(ConnectionError):
        t.client().add(a=7)
    assert t.wait_server(TIMEOUT) == 0
    assert [r["method"] for r in t.server_records] == ["test.add"]  # it ran
    call = t.calls[0]
    assert call.answered and call.ran and call.result == 7 and call.faults == ["drop"]
    # a raw client sees a clean EOF and then a broken pipe
    assert recv_frame(t.client_socket) is None
    with pytest.raises(BrokenPipeError):
        send_frame(t.client_socket, request(9, "test.add", {"a": 1}))


def test_delay_reply_and_timeout(t: MockTransport) -> None:
    t.inject(Fault.delay(0.2), on_call=1)
    c = t.client()
    start = time.monotonic()
    assert c.add(a=1) == 1
    assert time.monotonic() - start >= 0.2
    assert t.calls[0].duration >= 0.2 and t.calls[0].faults == ["delay"]
    t.inject(Fault.delay(0.5), on_call=2)
    t.client_socket.settimeout(0.05)
    with pytest.raises(TimeoutError):
        c.add(a=2)
    with pytest.raises(ConnectionError, match="unusable"):
        c.add(a=3)


def test_delay_request_then_errno(t: MockTransport) -> None:
    t.inject(Fault.delay(0.1, phase="request"), method="add")
    t.inject(Fault.errno(errno.EPERM), method="add")
    start = time.monotonic()
    with pytest.raises(PermissionError):
        t.client().add(a=1)
    assert time.monotonic() - start >= 0.1
    assert t.calls[0].faults == ["delay", "errno"]


@pytest.mark.parametrize(
    "keep, where", [(None, "frame body"), (2, "frame header"), (4, "frame body")]
)
def test_truncate_reply(w: WireTransport, keep: int | None, where: str) -> None:
    w.inject(WireFault.truncate(keep), method="echo")
    c = w.client()
    # The server went away mid-reply: a connection error, like a dead server.
    with pytest.raises(ConnectionError, match=r"in the middle of the reply to 'test.echo'"):
        c.echo(text="hello")
    with pytest.raises(ConnectionError, match="unusable"):
        c.add(a=1)
    assert w.wait_server(TIMEOUT) == 0
    call = w.calls[0]
    assert call.answered and call.faults == ["truncate"] and not call.delivered


@pytest.mark.parametrize("keep", [None, 0, 3, 10])
def test_truncate_request(w: WireTransport, keep: int | None) -> None:
    fds = make_fds(2)
    w.inject(WireFault.truncate(keep, phase="request"))
    with pytest.raises(ConnectionError, match="closed the connection"):
        w.client().call("read_two", fds=fds, first=0, second=1)
    assert w.wait_server(TIMEOUT) == 0  # a frame cut short ends serve() quietly
    assert w.server_records == []  # nothing was answered, nothing ran
    assert w.calls[0].faults == ["truncate"] and w.calls[0].fds == 2
    for fd in fds:
        os.close(fd)


def test_corrupt_reply_is_a_protocol_error_and_the_stream_stays_in_sync(w: WireTransport) -> None:
    w.inject(WireFault.corrupt(), on_call=1)
    c = w.client()
    with pytest.raises(
        ProtocolError, match=r"bad reply to 'test.add': frame body is not valid UTF-8"
    ):
        c.add(a=1)
    assert c.add(a=2) == 2  # a bad body is recoverable: the client is not broken
    assert w.calls[0].faults == ["corrupt"] and w.calls[0].result == 1


def test_corrupt_reply_id_breaks_the_client(w: WireTransport) -> None:
    # reply body: {"id":1,"result":...}: the id's digit is at byte 4 + 6
    w.inject(WireFault.corrupt(at=10, data=b"7"), on_call=1)
    c = w.client()
    with pytest.raises(ProtocolError, match="'id' is 7, expected 1"):
        c.add(a=1)
    with pytest.raises(ConnectionError, match="unusable"):
        c.add(a=1)


def test_corrupt_request_gets_an_error_reply_and_the_server_keeps_serving(
    w: WireTransport,
) -> None:
    w.inject(WireFault.corrupt(phase="request"), on_call=1)
    c = w.client()
    with pytest.raises(ProtocolError, match=r"malformed frame \(invalid_utf8\)"):
        c.add(a=1)
    assert c.add(a=2) == 2
    assert_still_serving(w.client_socket)
    assert w.server_records[0]["method"] is None and not w.server_records[0]["ok"]
    assert w.calls[0].method == "test.add"  # recorded as sent, before the corruption


def test_corrupt_length_header(w: WireTransport) -> None:
    w.inject(WireFault.corrupt(at=0, data=b"\xff"), on_call=1)
    with pytest.raises(
        ProtocolError, match=r"bad reply to 'test.add': frame of .* bytes exceeds the maximum"
    ):
        w.client().add(a=1)


def test_close_after_reply(w: WireTransport) -> None:
    w.inject(WireFault.close(), on_call=1)
    c = w.client()
    assert c.add(a=1) == 1  # delivered
    with pytest.raises(ConnectionError):
        c.add(a=2)
    assert w.wait_server(TIMEOUT) == 0
    assert w.calls[0].faults == ["close"] and w.calls[0].delivered
    assert len(w.server_records) == 1


def test_injected_replies_keep_request_order(t: MockTransport) -> None:
    """Pipelined raw requests: the reply made by an errno fault comes in request order."""
    t.inject(Fault.errno(errno.EPERM), on_call=2)
    real.BLOCK.clear()
    real.BLOCKED.clear()
    send_frame(t.client_socket, request(1, "test.block"))
    assert real.BLOCKED.wait(TIMEOUT)
    send_frame(t.client_socket, request(2, "test.add", {"a": 1}))
    send_frame(t.client_socket, request(3, "test.add", {"a": 3}))
    wait_until(lambda: len(t.calls) == 3, what="the mock to read the pipelined requests")
    real.BLOCK.set()
    replies = [read_reply(t.client_socket) for _ in range(3)]
    assert [r.id for r in replies] == [1, 2, 3]
    assert (
        replies[0].result == "released"
        and replies[1].error.errno == errno.EPERM
        and replies[2].result == 3
    )


def test_fault_and_inject_arguments_are_checked(t: MockTransport) -> None:
    with pytest.raises(ValueError, match="positive errno"):
        Fault.errno(0)
    with pytest.raises(ValueError, match="positive errno"):
        Fault.errno(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seconds"):
        Fault.delay(-1)
    with pytest.raises(ValueError, match="phase"):
        Fault.drop(phase="later")
    with pytest.raises(ValueError, match="Exception instance"):
        Fault.exception(ValueError)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep"):
        WireFault.truncate(-1)
    with pytest.raises(ValueError, match="data"):
        WireFault.corrupt(data=b"")
    with pytest.raises(ValueError, match="on_call"):
        t.inject(Fault.drop(), on_call=0)
    with pytest.raises(ValueError, match="times"):
        t.inject(Fault.drop(), times=0)
    with pytest.raises(TypeError, match="expected a Fault"):
        t.inject("drop")  # type: ignore[arg-type]
    assert isinstance(t.inject(Fault.delay(0)), Rule)


# --------------------------------------------------------------------------- lifecycle and leaks


def test_no_descriptor_or_thread_left_after_any_fault(no_leak: None) -> None:
    faults: list[Fault | WireFault] = [
        Fault.drop(),
        Fault.drop(phase="reply"),
        WireFault.truncate(),
        WireFault.truncate(phase="request"),
        WireFault.corrupt(),
        WireFault.corrupt(phase="request"),
        WireFault.close(),
        Fault.errno(errno.EPERM),
        Fault.exception(ValueError("no")),
        Fault.delay(0.01),
        Fault.delay(0.01, phase="request"),
        Fault.truncate(),
        Fault.truncate(keep=0),
        Fault.close(),
    ]
    for fault in faults:
        kind = WireTransport if isinstance(fault, WireFault) else MockTransport
        with kind(ENGINE, METHODS, timeout=TIMEOUT) as transport:
            transport.inject(fault, on_call=2)
            c = transport.client()
            r, w = os.pipe()
            os.write(w, b"data")  # read_two reads it (an empty pipe would block the method)
            for i in range(4):
                try:
                    c.read_two(first=FileDescriptor(r), second=None) if i == 1 else c.add(a=i)
                except (OSError, ValueError, ProtocolError):
                    pass
            got = None
            try:
                got = c.make_pipe(data="x")
            except (OSError, ValueError, ProtocolError):
                pass
            if isinstance(got, WithFds):
                os.close(got.fds[0])
            os.close(r)
            os.close(w)
        assert transport.exit_code == 0, fault


def test_many_transports(no_leak: None) -> None:
    for i in range(50):
        with MockTransport(ENGINE, METHODS) as transport:
            assert transport.client().add(a=i) == i


def test_close_during_a_long_delay_is_prompt(no_leak: None) -> None:
    transport = MockTransport(ENGINE, METHODS)
    transport.inject(Fault.delay(60))
    send_frame(transport.client_socket, request(1, "test.add", {"a": 1}))
    wait_until(lambda: transport.calls, what="the delayed request to arrive")
    start = time.monotonic()
    transport.close()
    assert time.monotonic() - start < 3


def test_close_with_a_hung_method_raises_and_can_be_retried(no_leak: None) -> None:
    transport = MockTransport(ENGINE, METHODS)
    real.BLOCK.clear()
    real.BLOCKED.clear()
    send_frame(transport.client_socket, request(1, "test.block"))
    assert real.BLOCKED.wait(TIMEOUT)
    with pytest.raises(RuntimeError, match=r"did not stop within 0.2 s"):
        transport.close(timeout=0.2)
    assert not transport.closed
    real.BLOCK.set()
    transport.close()
    assert transport.closed and transport.exit_code == 0


def test_a_relay_bug_surfaces_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch, no_leak: None
) -> None:
    import rpc_wire_faults

    def broken(self: Any, frame: bytes, marks: list) -> None:
        raise RuntimeError("relay bug")

    monkeypatch.setattr(rpc_wire_faults._Relay, "_reply", broken)
    transport = WireTransport(ENGINE, METHODS, timeout=TIMEOUT)
    with pytest.raises(ConnectionError):
        transport.client().add(a=1)
    with pytest.raises(RuntimeError, match="relay bug"):
        transport.close()
    assert transport.closed


def test_oversized_request_is_answered_then_serving_ends(t: MockTransport) -> None:
    data = struct.pack(">I", real.MAX_FRAME + 1) + b"x" * 300_000  # more than a socket buffer
    sender = threading.Thread(target=_send_ignoring_epipe, args=(t.client_socket, data))
    sender.start()
    assert_error(read_reply(t.client_socket), "ProtocolError", "oversized", id=None)
    assert recv_frame(t.client_socket) is None
    sender.join(TIMEOUT)
    assert not sender.is_alive()
    assert t.wait_server(TIMEOUT) == 0
    assert t.calls[0].method is None and t.calls[0].error["type"] == "ProtocolError"
    assert "(oversized)" in t.calls[0].error["message"]


def _send_ignoring_epipe(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


# --------------------------------------------------------------------------- engines and systems


def test_for_engine_swaps_the_system_interface(no_leak: None) -> None:
    rec = RecordingSystem()
    before = kit_system.current()
    with MockTransport.for_engine("reference", system=rec, timeout=TIMEOUT) as transport:
        assert transport.instance.system is rec
        assert kit_system.current() is rec  # swapped while the transport is open
        transport.client().sethostname(name="mock-host")
        assert rec.names() == ["sethostname"]
        assert rec.calls[0].args == ("mock-host",)
        assert transport.calls[0].method == "reference.sethostname" and transport.calls[0].ok
    assert kit_system.current() is before  # and given back on close
    assert socket.gethostname() != "mock-host"


def test_for_engine_errors(no_leak: None) -> None:
    with pytest.raises(RegistryError, match="unknown engine 'no-such-engine'"):
        MockTransport.for_engine("no-such-engine")
    with pytest.raises(TypeError, match="engine= or config="):
        MockTransport.for_engine("reference", engine=object(), config=object())


def test_methods_instance_and_class(no_leak: None) -> None:
    class Methods:
        def __init__(self, engine: Any) -> None:
            self.engine = engine
            self.system = kit_system.current()

        def where(self) -> str:
            return self.system.name

        def engine_is(self) -> str:
            return repr(self.engine)

        def _hidden(self) -> None:
            pass

    rec = RecordingSystem()
    with MockTransport(ENGINE, Methods, engine=None, system=rec) as transport:
        c = transport.client()
        assert c.where() == "recording" and c.engine_is() == "None"
        with pytest.raises(ProtocolError, match="private method '_hidden'"):
            c.call("_hidden")
    instance = Methods(None)
    with MockTransport(ENGINE, instance) as transport:
        assert transport.client().where() == "real" and transport.instance is instance


def test_recording_system() -> None:
    rec = RecordingSystem(
        results={"gethostname": "box", "ns_inode": lambda kind, pid="self": 42},
        errors={"mount": PermissionError(errno.EPERM, "no")},
    )
    assert rec.gethostname() == "box" and rec.ns_inode("mount") == 42 and rec.chdir("/") is None
    with pytest.raises(PermissionError):
        rec.mount("tmpfs", "/x", "tmpfs", ["nosuid"], None)
    assert rec.names() == ["gethostname", "ns_inode", "chdir", "mount"]
    assert rec.calls[3].args == ("tmpfs", "/x", "tmpfs", ["nosuid"], None)
    with pytest.raises(AttributeError):
        rec._private  # noqa: B018
    assert isinstance(rec, kit_system.System)


# --------------------------------------------------------------------------- the fixture


def test_rpc_mock_fixture(rpc_mock: Any) -> None:
    transport = rpc_mock("reference")
    assert isinstance(transport.system, RecordingSystem)  # the default: nothing reaches the host
    transport.client().sethostname(name="fixture-host")
    assert transport.system.names() == ["sethostname"]
    plain = rpc_mock(ENGINE, METHODS)
    assert plain.system is None and plain.client().add(a=1) == 1


def test_mock_factory_closes_everything(no_leak: None) -> None:
    from kit.testing.fixtures import MockFactory  # imported here: pytest_plugins loads the module

    factory = MockFactory()
    made = [factory(ENGINE, METHODS) for _ in range(3)]
    made[0].client().add(a=1)
    factory.close()
    assert all(m.closed for m in made) and factory.made == []


class LooksUpTheSystemPerCall:
    """RPC methods that ask for the system interface when called, not when built."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def sethostname(self, name: str) -> None:
        kit_system.current().sethostname(name)


def test_a_method_that_looks_up_the_system_per_call_is_recorded_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def reached_the_host(name: str) -> None:
        raise AssertionError(f"sethostname({name!r}) reached the host's kernel")

    monkeypatch.setattr(socket, "sethostname", reached_the_host)
    before = kit_system.current()
    with MockTransport("late", LooksUpTheSystemPerCall, system=RecordingSystem()) as t:
        RPCClient(t.client_socket, "late").sethostname(name="box")
        assert t.system.names() == ["sethostname"]
    assert kit_system.current() is before, "the transport must give the system back"


def test_truncate_cuts_the_reply_frame_after_the_method_ran(t: MockTransport) -> None:
    # SPEC §6 names the mock's faults: drop, delay, truncate, close.
    t.inject(Fault.truncate(), method="add")
    with pytest.raises(ConnectionError, match=r"in the middle of the reply to 'test\.add'"):
        t.client().add(a=7)
    assert t.wait_server(TIMEOUT) == 0
    call = t.calls[0]
    assert call.ran and call.result == 7 and call.faults == ["truncate"]


def test_truncate_keeps_the_bytes_asked_for(t: MockTransport) -> None:
    t.inject(Fault.truncate(keep=3), method="add")
    send_frame(t.client_socket, request(1, "test.add", {"a": 1}))
    header = t.client_socket.recv(4, socket.MSG_WAITALL)
    announced = struct.unpack(">I", header)[0]
    rest = b""
    while chunk := t.client_socket.recv(1 << 16):
        rest += chunk
    assert len(rest) == 3 < announced


def test_close_delivers_the_reply_then_ends_the_connection(t: MockTransport) -> None:
    t.inject(Fault.close(), on_call=1)
    c = t.client()
    assert c.add(a=5) == 5  # the reply goes out
    with pytest.raises(ConnectionError):
        c.add(a=6)  # the next call finds the connection closed
    assert t.wait_server(TIMEOUT) == 0
    assert t.names == ["add"]  # the second request never reached the server
    call = t.calls[0]
    assert call.ran and call.ok and call.result == 5 and call.faults == ["close"]
    assert recv_frame(t.client_socket) is None  # after the reply: EOF


def test_close_delivers_an_error_reply_too(t: MockTransport) -> None:
    t.inject(Fault.close(), method="fail")
    c = t.client()
    with pytest.raises(FileNotFoundError):
        c.fail(kind="enoent")
    with pytest.raises(ConnectionError):
        c.add(a=1)
    assert t.wait_server(TIMEOUT) == 0 and t.calls[0].faults == ["close"]


def test_close_discards_the_requests_queued_behind_the_call(t: MockTransport) -> None:
    """A server that exits after replying never reads what was pipelined after the call; the
    descriptors those requests carried are closed (the fixture checks for leaks)."""
    t.inject(Fault.close(), on_call=1)
    real.BLOCK.clear()
    real.BLOCKED.clear()
    send_frame(t.client_socket, request(1, "test.block"))
    assert real.BLOCKED.wait(TIMEOUT)
    fds = make_fds(2)
    send_frame(t.client_socket, request(2, "test.read_two", {"first": 0, "second": 1}, 2), fds)
    for fd in fds:
        os.close(fd)
    real.BLOCK.set()
    assert read_reply(t.client_socket).result == "released"
    assert recv_frame(t.client_socket) is None
    assert t.wait_server(TIMEOUT) == 0 and t.names == ["block"]


@pytest.mark.parametrize("keep", [-1, True, 1.5])
def test_truncate_refuses_a_bad_byte_count(keep: object) -> None:
    with pytest.raises(ValueError, match=r"Fault\.truncate: keep must be"):
        Fault.truncate(keep)  # type: ignore[arg-type]
