"""The RPC codec's limits fed violations: the frame size at and one past its maximum, the
descriptor count, truncated frames, bad bodies; every rejection closes what it received."""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import pytest
from conftest import signal_taken, wait_until

from kit.rpc import codec
from kit.rpc.codec import (
    HEADER,
    MAX_FDS,
    MAX_FRAME,
    FrameError,
    close_fds,
    decode_body,
    encode_body,
    recv_frame,
    send_body,
    send_frame,
)
from kit.system import linux


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    yield a, b
    a.close()
    b.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def body_of(size: int) -> bytes:
    """A JSON object body of exactly ``size`` bytes."""
    head = b'{"p":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def pipes(n: int) -> list[int]:
    """``n`` open descriptors (read ends of pipes) to send."""
    fds = []
    for _ in range(n):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    return fds


def raw_send(sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def raises(kind: str, sock: socket.socket, match: str | None = None) -> FrameError:
    with pytest.raises(FrameError, match=match) as info:
        recv_frame(sock)
    assert info.value.kind == kind
    return info.value


# -- the frame size --------------------------------------------------------------------------


def test_a_body_of_exactly_the_maximum_is_sent_and_received(pair):
    a, b = pair
    body = body_of(MAX_FRAME)
    assert len(encode_body(json.loads(body))) == MAX_FRAME
    send_body(a, body)
    obj, fds = recv_frame(b)
    assert len(obj["p"]) == MAX_FRAME - 8 and fds == []


def test_one_byte_past_the_maximum_is_refused_before_sending(pair):
    a, b = pair
    body = body_of(MAX_FRAME + 1)
    with pytest.raises(
        FrameError, match=f"frame of {MAX_FRAME + 1} bytes exceeds the maximum of {MAX_FRAME}"
    ) as info:
        send_body(a, body)
    assert info.value.kind == FrameError.OVERSIZED and not info.value.recoverable
    with pytest.raises(FrameError, match=f"frame of {MAX_FRAME + 1} bytes") as info:
        encode_body(json.loads(body))
    assert info.value.kind == FrameError.OVERSIZED
    with pytest.raises(FrameError) as info:
        send_frame(a, json.loads(body))
    assert info.value.kind == FrameError.OVERSIZED
    b.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing was written
        b.recv(1)


def test_an_announced_length_one_past_the_maximum_is_refused_unread(pair):
    a, b = pair
    a.sendall(HEADER.pack(MAX_FRAME + 1) + b"{}")
    err = raises(FrameError.OVERSIZED, b, f"frame of {MAX_FRAME + 1} bytes exceeds")
    assert not err.recoverable
    assert b.recv(10) == b"{}"  # the body was left unread


def test_an_announced_length_of_the_maximum_is_read(pair):
    a, b = pair
    a.sendall(HEADER.pack(MAX_FRAME) + body_of(MAX_FRAME))
    assert len(recv_frame(b)[0]["p"]) == MAX_FRAME - 8


def test_an_empty_body_is_invalid_json_and_recoverable(pair):
    a, b = pair
    a.sendall(HEADER.pack(0) + HEADER.pack(2) + b"{}")
    err = raises(FrameError.INVALID_JSON, b, "not valid JSON")
    assert err.recoverable
    assert recv_frame(b) == ({}, [])


# -- truncated frames ------------------------------------------------------------------------


def test_a_clean_eof_at_a_frame_boundary_is_none(pair):
    a, b = pair
    send_frame(a, {"x": 1})
    a.shutdown(socket.SHUT_WR)
    assert recv_frame(b) == ({"x": 1}, [])
    assert recv_frame(b) is None


@pytest.mark.parametrize("got", [1, 2, 3])
def test_eof_inside_the_header_is_truncated_naming_how_much(pair, got):
    a, b = pair
    a.sendall(HEADER.pack(2)[:got])
    a.shutdown(socket.SHUT_WR)
    err = raises(FrameError.TRUNCATED, b, rf"inside a frame header \({got} of 4 bytes\)")
    assert not err.recoverable


@pytest.mark.parametrize("got", [0, 1, 9])
def test_eof_inside_the_body_is_truncated_naming_how_much(pair, got):
    a, b = pair
    a.sendall(HEADER.pack(10) + b"x" * got)
    a.shutdown(socket.SHUT_WR)
    err = raises(FrameError.TRUNCATED, b, rf"inside a frame body \({got} of 10 bytes\)")
    assert not err.recoverable


def test_eof_after_descriptors_without_a_byte_is_truncated_and_closes_them(pair):
    a, b = pair
    fds = pipes(1)
    before = open_fds()
    raw_send(a, HEADER.pack(2)[:1], fds)
    a.shutdown(socket.SHUT_WR)
    raises(FrameError.TRUNCATED, b)
    assert open_fds() == before
    close_fds(fds)


def test_a_frame_arriving_in_pieces_is_reassembled(pair):
    a, b = pair
    data = HEADER.pack(9) + b'{"a":"b"}'
    for i in range(len(data)):
        a.send(data[i : i + 1])
    assert recv_frame(b) == ({"a": "b"}, [])


# -- descriptors -----------------------------------------------------------------------------


def test_the_maximum_number_of_descriptors_arrives(pair):
    a, b = pair
    fds = pipes(MAX_FDS)
    send_frame(a, {"n": MAX_FDS}, fds)
    obj, got = recv_frame(b)
    assert obj == {"n": MAX_FDS} and len(got) == MAX_FDS
    assert all(os.get_inheritable(fd) is False for fd in got)
    assert [os.fstat(x).st_ino for x in got] == [os.fstat(x).st_ino for x in fds]
    close_fds(got + fds)


def test_one_descriptor_past_the_maximum_is_refused_before_sending(pair):
    a, _b = pair
    fds = pipes(MAX_FDS + 1)
    with pytest.raises(
        FrameError, match=f"{MAX_FDS + 1} file descriptors exceed the maximum of {MAX_FDS}"
    ) as info:
        send_frame(a, {}, fds)
    assert info.value.kind == FrameError.TOO_MANY_FDS
    assert all(os.fstat(fd) for fd in fds)  # the caller's fds stay open
    close_fds(fds)


def test_one_descriptor_past_the_maximum_received_is_refused_and_closed(pair):
    a, b = pair
    fds = pipes(MAX_FDS + 1)
    before = open_fds()
    raw_send(a, HEADER.pack(8) + b'{"id":7}', fds)
    send_frame(a, {"next": 1})
    err = raises(FrameError.TOO_MANY_FDS, b, f"more than {MAX_FDS}")
    assert err.recoverable and err.obj == {"id": 7}
    assert open_fds() == before
    assert recv_frame(b) == ({"next": 1}, [])
    close_fds(fds)


def test_far_too_many_descriptors_are_truncated_by_the_kernel_and_refused(pair):
    a, b = pair
    fds = pipes(40)
    before = open_fds()
    raw_send(a, HEADER.pack(2) + b"{}", fds)
    raises(FrameError.TOO_MANY_FDS, b)
    assert open_fds() == before
    close_fds(fds)


def test_descriptors_with_the_body_are_unexpected_and_closed(pair):
    a, b = pair
    fds = pipes(2)
    before = open_fds()
    a.sendall(HEADER.pack(8))
    raw_send(a, b'{"id":3}', fds)
    err = raises(FrameError.UNEXPECTED_FDS, b, "inside a frame body")
    assert err.recoverable and err.obj == {"id": 3}
    assert open_fds() == before
    close_fds(fds)


def test_descriptors_with_a_bad_body_are_closed(pair):
    a, b = pair
    fds = pipes(3)
    before = open_fds()
    raw_send(a, HEADER.pack(3) + b"[1]", fds)
    err = raises(FrameError.NOT_OBJECT, b)
    assert err.obj is None
    assert open_fds() == before
    close_fds(fds)


@pytest.mark.parametrize("bad", [-1, True, "3", 2.0, None])
def test_a_bad_descriptor_is_refused_before_sending(pair, bad):
    a, _b = pair
    with pytest.raises(FrameError, match=f"not a file descriptor: {bad!r}") as info:
        send_frame(a, {}, [bad])
    assert info.value.kind == FrameError.UNENCODABLE and info.value.recoverable


# -- bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,kind,message",
    [
        (b"\xff{}", FrameError.INVALID_UTF8, "not valid UTF-8: invalid start byte at byte 0"),
        (b'{"a":"\xc3"}', FrameError.INVALID_UTF8, "at byte 6"),
        (b'{"a":NaN}', FrameError.INVALID_JSON, "NaN is not valid JSON"),
        (b'{"a":-Infinity}', FrameError.INVALID_JSON, "-Infinity is not valid JSON"),
        (b'{"a":1e999}', FrameError.INVALID_JSON, "number 1e999 is out of range"),
        (b'{"a":-1e999}', FrameError.INVALID_JSON, "out of range"),
        (b'{"a":1,"b":2,"a":3}', FrameError.INVALID_JSON, "duplicate key 'a'"),
        (b'{"a":{"b":1,"b":1}}', FrameError.INVALID_JSON, "duplicate key 'b'"),
        (b"[" * 100000 + b"]" * 100000, FrameError.INVALID_JSON, "nested too deeply"),
        (b'{"a":', FrameError.INVALID_JSON, "not valid JSON"),
        (b"1" * 5000, FrameError.INVALID_JSON, "not valid JSON"),
        (b"[]", FrameError.NOT_OBJECT, "must be a JSON object, not an array"),
        (b"null", FrameError.NOT_OBJECT, "not null"),
        (b"true", FrameError.NOT_OBJECT, "not a boolean"),
        (b"1.5", FrameError.NOT_OBJECT, "not a number"),
        (b"7", FrameError.NOT_OBJECT, "not a number"),
        (b'"s"', FrameError.NOT_OBJECT, "not a string"),
    ],
)
def test_a_bad_body_is_refused_naming_why(body, kind, message):
    with pytest.raises(FrameError, match=message) as info:
        decode_body(body)
    assert info.value.kind == kind and info.value.recoverable


def test_a_large_but_finite_number_and_unicode_are_fine():
    assert decode_body(b'{"a":1e308,"b":"\\u00e9\\ud800","c":[1,{}]}') == {
        "a": 1e308,
        "b": "\u00e9\ud800",
        "c": [1, {}],
    }
    assert decode_body('{"é":"✓"}'.encode()) == {"é": "✓"}


@pytest.mark.parametrize(
    "obj,kind,message",
    [
        ([], FrameError.NOT_OBJECT, "must carry a JSON object, not list"),
        ({"a": float("nan")}, FrameError.UNENCODABLE, "not JSON-serialisable"),
        ({"a": float("inf")}, FrameError.UNENCODABLE, "not JSON-serialisable"),
        ({(1, 2): 1}, FrameError.UNENCODABLE, "not JSON-serialisable"),
        ({"a": object()}, FrameError.UNENCODABLE, "not JSON-serialisable"),
        ({"a": b"x"}, FrameError.UNENCODABLE, "not JSON-serialisable"),
    ],
)
def test_an_unencodable_object_is_refused_naming_why(obj, kind, message):
    with pytest.raises(FrameError, match=message) as info:
        encode_body(obj)
    assert info.value.kind == kind


def test_the_encoding_is_compact_ascii_and_keeps_lone_surrogates():
    assert encode_body({"a": [1, "é"], "b": "\ud800"}) == b'{"a":[1,"\\u00e9"],"b":"\\ud800"}'


def test_a_frame_round_trips_with_its_header(pair):
    a, b = pair
    send_frame(a, {"k": "v"})
    assert b.recv(100) == struct.pack(">I", 9) + b'{"k":"v"}'


def test_close_fds_ignores_descriptors_already_closed():
    r, w = os.pipe()
    os.close(w)
    close_fds([w, r, r])
    with pytest.raises(OSError):
        os.fstat(r)


def test_which_kinds_leave_the_stream_in_sync():
    assert {
        k
        for k in (
            FrameError.OVERSIZED,
            FrameError.TRUNCATED,
            FrameError.INVALID_UTF8,
            FrameError.INVALID_JSON,
            FrameError.NOT_OBJECT,
            FrameError.TOO_MANY_FDS,
            FrameError.UNEXPECTED_FDS,
            FrameError.UNENCODABLE,
        )
        if not FrameError(k, "m").recoverable
    } == {"oversized", "truncated"}


def test_descriptor_zero_is_a_descriptor(pair):
    a, b = pair
    send_frame(a, {"stdin": True}, [0])
    obj, fds = recv_frame(b)
    assert obj == {"stdin": True} and len(fds) == 1
    assert os.path.sameopenfile(fds[0], 0)
    close_fds(fds)


def test_the_duplicate_key_named_is_the_repeated_one():
    with pytest.raises(FrameError, match="duplicate key 'b'"):
        decode_body(b'{"a":1,"b":2,"b":3}')


def test_credentials_in_the_control_data_are_not_taken_for_descriptors(pair):
    # with SO_PASSCRED the kernel attaches SCM_CREDENTIALS (pid, uid, gid) to every message
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    keep = pipes(1)
    send_frame(a, {"x": 1})
    send_frame(a, {"y": 2}, keep)
    assert recv_frame(b) == ({"x": 1}, [])
    obj, fds = recv_frame(b)
    assert obj == {"y": 2} and len(fds) == 1 and os.path.sameopenfile(fds[0], keep[0])
    close_fds(fds + keep)


def test_the_wire_limits_are_the_documented_ones():
    # part of the wire contract (exported by kit.rpc): a peer built against them relies on
    # 1 MiB bodies and 16 descriptors per frame
    assert (MAX_FRAME, MAX_FDS) == (1 << 20, 16)


def test_an_overflowing_number_is_quoted_up_to_40_characters():
    text = "1234567890" * 5 + "e999"
    with pytest.raises(FrameError) as info:
        decode_body(b'{"a":' + text.encode() + b"}")
    assert f"number {text[:40]} is out of range" in str(info.value)
    assert f"number {text[:41]} " not in str(info.value)


def test_the_receive_step_itself_sees_one_descriptor_past_the_maximum(pair):
    # The receive buffer has room for MAX_FDS + 1 descriptors so that "too many" is seen by
    # the count even on a kernel that does not set MSG_CTRUNC; a smaller room would leave
    # only the flag to catch it.
    a, b = pair
    fds = pipes(MAX_FDS + 1)
    raw_send(a, b"x", fds)
    got: list[int] = []
    assert codec._recv_some(b, memoryview(bytearray(1)), got) == (1, False)
    assert len(got) == MAX_FDS + 1
    close_fds(got + fds)


def test_a_flood_of_descriptors_is_cut_by_the_kernel_just_past_the_maximum(pair):
    # the room is bounded: a flood is truncated (MSG_CTRUNC) instead of installed; the room
    # rounds up to 8 bytes, so at most MAX_FDS + 2 descriptors arrive
    a, b = pair
    fds = pipes(64)
    raw_send(a, b"x", fds)
    got: list[int] = []
    assert codec._recv_some(b, memoryview(bytearray(1)), got) == (1, True)
    assert MAX_FDS < len(got) <= MAX_FDS + 2
    close_fds(got + fds)


def test_the_object_of_a_frame_error_is_keyword_only():
    with pytest.raises(TypeError):
        FrameError(FrameError.TOO_MANY_FDS, "m", {"id": 1})  # type: ignore[misc]
    assert FrameError(FrameError.TOO_MANY_FDS, "m", obj={"id": 1}).obj == {"id": 1}


@pytest.fixture
def interrupting_alarm() -> Iterator[list[str]]:
    """A SIGALRM every 20 ms whose handler raises InterruptedError once, as some callers'
    handlers do, when it finds the main thread in the codec's socket call (raising anywhere
    else would test the caller, not the codec). Yields the socket calls it interrupted.
    (The tests below make each place such a handler can run in, deterministically.)"""
    fired: list[str] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired or frame is None or frame.f_code is not codec._unless_interrupted.__code__:
            return
        fired.append(frame.f_locals["call"].__name__)
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise InterruptedError("interrupted by a test signal handler")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def in_thread_after(delay: float, func: Callable[[], object]) -> tuple[threading.Thread, list]:
    """Run ``func`` in a daemon thread after ``delay`` s; its result lands in the list."""
    result: list = []

    def run() -> None:
        time.sleep(delay)  # not a wait on a condition: the delay is what lets the alarm hit
        result.append(func())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_a_receive_interrupted_by_a_raising_signal_handler_is_retried(pair, interrupting_alarm):
    a, b = pair
    sender, _ = in_thread_after(0.5, lambda: send_frame(a, {"late": 1}))
    try:
        assert recv_frame(b) == ({"late": 1}, [])
    finally:
        a.shutdown(socket.SHUT_RDWR)  # wakes a thread still blocked on the pair
        sender.join(10)
    assert interrupting_alarm == ["recvmsg_into"]


@pytest.mark.parametrize(
    "obj, key",
    [
        ({1: "a"}, "1 (int)"),
        ({"a": {"b": [{"c": 1}, {None: 2}]}}, "None (NoneType)"),  # nested in a list in a dict
        ({"a": ({"x": 1}, [{True: 0}])}, "True (bool)"),  # in a tuple, then a list
        ({"a": 1, "b": {2.5: "x"}}, "2.5 (float)"),  # after a string key with a plain value
    ],
    ids=["top", "list-in-dict", "tuple-list", "after-plain-value"],
)
def test_a_non_string_key_anywhere_is_refused_naming_it(obj, key):
    # json.dumps would turn it into a string key: the peer would get another object
    with pytest.raises(FrameError, match=f"object key {re.escape(key)} is not a string") as info:
        encode_body(obj)
    assert info.value.kind == FrameError.UNENCODABLE


def test_a_shared_or_cyclic_container_is_looked_at_once_and_a_cycle_is_refused():
    # A container seen twice is not a cycle: the key check goes on past it to the bad key
    # (listed first: the check takes the last value first, so it meets the repeat before).
    shared = {"k": 1}
    with pytest.raises(FrameError, match="object key 3 "):
        encode_body({"z": {3: 0}, "a": shared, "b": shared})
    shared_list: list = [{"k": 1}]
    with pytest.raises(FrameError, match="object key 4 "):
        encode_body({"z": {4: 0}, "a": shared_list, "b": shared_list})
    cyclic: dict = {"a": 1}
    cyclic["self"] = cyclic
    with pytest.raises(FrameError, match="Circular reference") as info:
        encode_body(cyclic)
    assert info.value.kind == FrameError.UNENCODABLE


class _EqualToAll:
    """A key that claims to equal anything: the check must not ask it."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "<equal to all>"


def test_a_key_of_any_type_is_named_even_one_that_equals_everything():
    with pytest.raises(FrameError, match=r"object key <equal to all> \(_EqualToAll\) is not"):
        encode_body({"a": {_EqualToAll(): 1}})


# -- a signal handler that raises InterruptedError around the socket calls -------------------
# PEP 475: CPython retries a call that fails with EINTR itself, so InterruptedError reaches
# the codec only from a handler that raises it, which runs either inside the call (on EINTR:
# on a stream socket the kernel then sent or received nothing) or between bytecodes just
# after the call returned (the bytes sent or received, and the descriptors, are then the
# call's result). Each case is made deterministic in a forked child whose main thread the
# test finds blocked in the call (its system call in /proc) before it sends the signal.
SENDMSG, RECVMSG = 46, 47  # x86-64 system call numbers, as /proc/PID/syscall gives them


def _in_syscall(pid: int, nr: int) -> bool:
    """Whether process ``pid``'s main thread sleeps in system call ``nr``."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields[:1] == [str(nr)] and linux.process_state(pid) == "S"


def _queued(sock: socket.socket) -> int:
    """Bytes waiting to be read on ``sock`` (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]


def _forked(fn: Callable[[], object]) -> tuple[int, int]:
    """``fn()`` in a forked child: (its pid, the pipe its JSON result arrives on)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.close(r)
            try:
                out = fn()
            except BaseException as exc:  # reported to the test
                out = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _result(pid: int, r: int) -> object:
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def _end(pid: int) -> None:
    """The child gone, whatever it was doing (a broken codec may block it)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _raise_once(fired: list[int]) -> None:
    """In the child: SIGUSR1's handler raises InterruptedError, the first time."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if not fired:
            fired.append(signum)
            raise InterruptedError("interrupted by a test signal handler")

    signal.signal(signal.SIGUSR1, handler)


def _signals_in_another_thread() -> Callable[[], None]:
    """In the child: SIGUSR1 blocked in the main thread and taken by a helper thread, so a
    signal interrupts no system call of the main thread, and its Python handler runs there
    at the next bytecode boundary after the call returns. Returns what ends the helper."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    ready = threading.Event()
    r, w = os.pipe()

    def helper() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        ready.set()
        os.read(r, 1)

    thread = threading.Thread(target=helper, daemon=True)
    thread.start()
    ready.wait()

    def end() -> None:
        os.close(w)
        thread.join()

    return end


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _same_file(a: int, b: int) -> bool:
    return os.fstat(a).st_ino == os.fstat(b).st_ino


def test_a_send_cut_short_by_a_raising_signal_handler_goes_on_where_it_stopped():
    # blocked on the full socket with part of the frame sent, the signal makes sendmsg
    # return that part; the handler raises before the count is stored
    a, b = socket.socketpair()  # default buffers: a frame of 1 MiB does not fit
    body = body_of(MAX_FRAME)
    [fd] = pipes(1)

    def sender() -> object:
        b.close()
        fired: list[int] = []
        _raise_once(fired)
        send_body(a, body, [fd])
        return {"fired": fired}

    pid, r = _forked(sender)
    a.close()
    try:
        wait_until(
            lambda: _queued(b) > 0 and _in_syscall(pid, SENDMSG),
            what="the sender to block on the full socket with part of the frame sent",
        )
        assert 0 < _queued(b) < len(body)
        os.kill(pid, signal.SIGUSR1)
        # taken: sendmsg has returned what it sent (nothing read yet, so no more)
        wait_until(lambda: signal_taken(pid, signal.SIGUSR1), what="the sender to take it")
        obj, got = recv_frame(b)
        assert len(obj["p"]) == MAX_FRAME - 8 and len(got) == 1 and _same_file(got[0], fd)
        assert recv_frame(b) is None  # nothing after it: neither its start nor its fds again
        close_fds(got)
        assert _result(pid, r) == {"fired": [signal.SIGUSR1]}
    finally:
        _end(pid)
        b.close()
        os.close(fd)


def test_a_send_interrupted_before_a_byte_went_out_is_made_again_with_its_descriptors():
    # the socket is full of earlier frames: sendmsg fails with EINTR, the handler raises
    # inside it, nothing (no descriptor either) was sent
    a, b = socket.socketpair()
    small = encode_body({"fill": 1})
    filled = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            a.send(HEADER.pack(len(small)) + small, socket.MSG_DONTWAIT)
            filled += 1
    [fd] = pipes(1)

    def sender() -> object:
        b.close()
        fired: list[int] = []
        _raise_once(fired)
        send_frame(a, {"after": filled}, [fd])
        return {"fired": fired}

    pid, r = _forked(sender)
    a.close()
    try:
        size = filled * (HEADER.size + len(small))
        wait_until(lambda: _in_syscall(pid, SENDMSG), what="the sender to block")
        assert _queued(b) == size  # nothing of the frame went out
        os.kill(pid, signal.SIGUSR1)
        # Taken: sendmsg has failed with EINTR (nothing read yet, so still no room). Read
        # before, the room made could let the woken call send after all.
        wait_until(lambda: signal_taken(pid, signal.SIGUSR1), what="the sender to take it")
        assert _queued(b) == size
        assert all(recv_frame(b) == ({"fill": 1}, []) for _ in range(filled))
        obj, got = recv_frame(b)
        assert obj == {"after": filled} and len(got) == 1 and _same_file(got[0], fd)
        assert recv_frame(b) is None
        close_fds(got)
        assert _result(pid, r) == {"fired": [signal.SIGUSR1]}
    finally:
        _end(pid)
        b.close()
        os.close(fd)


def test_a_raising_handler_just_after_a_whole_send_does_not_send_the_frame_again():
    # the signal, taken by another thread, interrupts nothing: sendmsg sends the whole
    # frame and returns, and the handler raises before the count is stored
    a, b = socket.socketpair()
    body = body_of(MAX_FRAME)
    [fd] = pipes(1)

    def sender() -> object:
        b.close()
        fired: list[int] = []
        _raise_once(fired)
        end = _signals_in_another_thread()
        send_body(a, body, [fd])
        end()
        return {"fired": fired}

    pid, r = _forked(sender)
    a.close()
    try:
        wait_until(
            lambda: _queued(b) > 0 and _in_syscall(pid, SENDMSG),
            what="the sender to block on the full socket",
        )
        os.kill(pid, signal.SIGUSR1)
        wait_until(lambda: signal_taken(pid, signal.SIGUSR1), what="the helper to take it")
        obj, got = recv_frame(b)
        assert len(obj["p"]) == MAX_FRAME - 8 and len(got) == 1 and _same_file(got[0], fd)
        assert recv_frame(b) is None  # not the same frame a second time
        close_fds(got)
        assert _result(pid, r) == {"fired": [signal.SIGUSR1]}
    finally:
        _end(pid)
        b.close()
        os.close(fd)


def test_a_raising_handler_just_after_a_receive_loses_neither_bytes_nor_descriptors():
    # recvmsg_into returns the header and the descriptors; the handler raises before its
    # result is stored: the bytes would be read over, the descriptors left open
    a, b = socket.socketpair()
    [fd] = pipes(1)

    pipe = os.readlink(f"/proc/self/fd/{fd}")

    def receiver() -> object:
        a.close()
        os.close(fd)  # what refers to the pipe from now on, the codec received
        fired: list[int] = []
        _raise_once(fired)
        end = _signals_in_another_thread()
        try:
            frame = recv_frame(b)
        finally:
            end()
        assert frame is not None
        obj, got = frame
        held = [x for x in map(int, open_fds()) if _link(x) == pipe]
        return {"obj": obj, "got": len(got), "held": held == got, "fired": fired}

    pid, r = _forked(receiver)
    b.close()
    try:
        wait_until(lambda: _in_syscall(pid, RECVMSG), what="the receiver to block")
        os.kill(pid, signal.SIGUSR1)
        wait_until(lambda: signal_taken(pid, signal.SIGUSR1), what="the helper to take it")
        send_frame(a, {"x": 1}, [fd])
        # the frame, once, and no copy of its descriptor but the one handed over
        assert _result(pid, r) == {
            "obj": {"x": 1},
            "got": 1,
            "held": True,
            "fired": [signal.SIGUSR1],
        }
    finally:
        _end(pid)
        a.close()
        os.close(fd)
