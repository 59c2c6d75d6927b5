"""Property tests: random and mutated frames never crash the RPC server, never hang it and
never leak a file descriptor.

``KIT_FUZZ_EXAMPLES`` sets the number of examples per test (default 2000), e.g.
``KIT_FUZZ_EXAMPLES=50000 pytest tests/test_rpc_fuzz.py`` for a long run.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kit.rpc import MAX_FDS, FileDescriptor, parse_reply, recv_frame, serve

EXAMPLES = int(os.environ.get("KIT_FUZZ_EXAMPLES", "2000"))
TIMEOUT = 5.0  # bound on every request and on serve() returning
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no example database written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- served methods


def add(a: int, b: int = 0) -> int:
    return a + b


def read_fd(fd: FileDescriptor, other: FileDescriptor | None = None) -> int:
    # The fuzzer only attaches /dev/null descriptors: reads never block.
    try:
        return len(os.read(fd, 16))
    finally:
        os.close(fd)
        if other is not None:
            os.close(other)


def fail(kind: str) -> None:
    if kind == "os":
        os.stat("/nonexistent/kit-rpc-fuzz")
    raise ValueError(kind)


def echo(
    text: str | None = None, items: list[int] | None = None, mapping: dict | None = None
) -> list:
    return [text, items, mapping]


METHODS = {f"fuzz.{f.__name__}": f for f in (add, echo, read_fd, fail)}


# --------------------------------------------------------------------------- helpers


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def null_fds(n: int) -> list[int]:
    return [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]


def send_chunk(sock: socket.socket, data: bytes, fds: list[int]) -> bool:
    """Send bytes (with descriptors on the first sendmsg); False if the server hung up."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    view = memoryview(data)
    try:
        while view or anc:
            sent = sock.sendmsg([view], anc)
            anc = []
            view = view[sent:]
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def run_server(chunks: list[tuple[bytes, int]]) -> tuple[list[Any], list[dict]]:
    """Queue *chunks* (bytes, number of /dev/null descriptors to attach) on a socketpair,
    close the writing side, then run serve() to completion in this thread (no thread
    start-up or GIL hand-offs per example; inputs are small enough to sit in the socket
    buffer). Returns (replies, on_call records) after asserting serve() returned 0 in time.

    The server's socket has a timeout, so a server blocked on a read or write fails the
    example with TimeoutError instead of hanging it."""
    client, server = socket.socketpair()
    server.settimeout(TIMEOUT)
    client.settimeout(TIMEOUT)
    records: list[dict] = []
    try:
        for data, attach in chunks:
            fds = null_fds(attach)
            try:
                send_chunk(client, data, fds)  # in flight: the socket holds its own references
            finally:
                for fd in fds:
                    os.close(fd)
        client.shutdown(socket.SHUT_WR)
        start = time.monotonic()
        result = serve(server, METHODS, on_call=records.append)
        assert time.monotonic() - start < TIMEOUT
        assert result == 0, f"serve() returned {result!r}"
    finally:
        server.close()
    replies = []
    try:
        while True:
            try:
                frame = recv_frame(client)
            except ConnectionResetError:
                # The server shut down after an oversized frame and our unread bytes were
                # discarded: Linux reports that as a reset once the replies are read.
                break
            if frame is None:
                break
            obj, fds = frame
            assert fds == [], "the server returned descriptors"
            replies.append(parse_reply(obj))  # every reply is schema-valid
    finally:
        client.close()
    for record in records:  # every request finished (generous: CI machines get loaded)
        assert record["duration_ms"] < 10_000, record  # a hang, not a slow machine
        json.dumps(record, allow_nan=False)  # and its ledger record is strict JSON
    return replies, records


# --------------------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
method_names = st.sampled_from(
    [
        "fuzz.add",
        "fuzz.echo",
        "fuzz.read_fd",
        "fuzz.fail",
        "fuzz.nope",
        "fuzz._secret",
        "fuzz.__init__",
        "fuzz.__class__",
        "other.add",
        "fuzz",
        "fuzz.",
        ".add",
        "fuzz.add.x",
        "fuzz.a-b",
    ]
) | st.text(max_size=12)
arg_names = st.sampled_from(
    ["a", "b", "text", "items", "mapping", "fd", "other", "kind", "zzz", "_x", "__class__"]
) | st.text(max_size=5)

valid_requests = st.one_of(
    st.builds(
        lambda a, b: ("fuzz.add", {"a": a, "b": b}, 0),
        st.integers(-(2**64), 2**64),
        st.integers(-5, 5),
    ),
    st.builds(
        lambda t, i: ("fuzz.echo", {"text": t, "items": i}, 0),
        st.text(max_size=20) | st.none(),
        st.lists(st.integers(), max_size=5),
    ),
    st.just(("fuzz.read_fd", {"fd": 0}, 1)),
    st.just(("fuzz.read_fd", {"fd": 1, "other": 0}, 2)),
    st.builds(lambda k: ("fuzz.fail", {"kind": k}, 0), st.sampled_from(["os", "value", "x"])),
)


@st.composite
def request_objects(draw: st.DrawFn) -> tuple[Any, int]:
    """A request-shaped object (valid or structurally broken) and the fds to attach."""
    if draw(st.booleans()):
        method, args, nfds = draw(valid_requests)
        obj: dict[str, Any] = {
            "id": draw(st.integers(0, 2**63 - 1)),
            "method": method,
            "args": args,
            "fds": nfds,
        }
        attach = nfds
    else:
        obj = {
            "id": draw(st.integers(-2, 2**64) | json_values),
            "method": draw(method_names | json_values),
            "args": draw(st.dictionaries(arg_names, json_values, max_size=4) | json_values),
            "fds": draw(st.integers(-1, MAX_FDS + 2) | json_values),
        }
        attach = draw(st.integers(0, 3))
    # At most one structural tweak (one draw: generation cost matters at 2000 examples).
    tweak = draw(
        st.sampled_from(
            ["none"] * 6 + ["drop:id", "drop:method", "drop:args", "drop:fds", "extra", "fds"]
        )
    )
    if tweak.startswith("drop:"):
        del obj[tweak[5:]]
    elif tweak == "extra":
        obj["extra"] = 1
    elif tweak == "fds":
        attach = draw(st.integers(0, MAX_FDS + 4))
    return obj, attach


@st.composite
def mutated(draw: st.DrawFn, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "replace"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(
                st.binary(min_size=1, max_size=4)
                | st.sampled_from([b'"', b"{", b"]", b",", b"\\", b"\xff", b"\xc3"])
            )
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[pos:]
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def frame_bodies(draw: st.DrawFn) -> tuple[bytes, int]:
    """One well-framed body (length correct, <= MAX_FRAME) and the number of fds to attach."""
    kind = draw(st.sampled_from(["request", "mutated", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), draw(st.integers(0, 2))
    if kind == "json":
        return json.dumps(draw(json_values)).encode(), draw(st.integers(0, 2))
    obj, attach = draw(request_objects())
    body = json.dumps(obj).encode()
    if kind == "mutated":
        body = draw(mutated(body))
    return body, attach


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# --------------------------------------------------------------------------- properties


@FUZZ_SETTINGS
@given(st.lists(frame_bodies(), min_size=1, max_size=3))
def test_wellframed_garbage_gets_one_reply_each(frames: list[tuple[bytes, int]]) -> None:
    """Every well-framed frame, however bad its content, gets exactly one reply (its
    method's result or an error), and the server still answers a good request afterwards."""
    before = fd_count()
    good = json.dumps(
        {"id": 77, "method": "fuzz.add", "args": {"a": 40, "b": 2}, "fds": 0}
    ).encode()
    replies, records = run_server(
        [(frame(body), attach) for body, attach in frames] + [(frame(good), 0)]
    )
    assert len(replies) == len(frames) + 1, replies
    assert len(records) == len(frames) + 1
    assert replies[-1].id == 77 and replies[-1].result == 42
    assert fd_count() == before, "file descriptors leaked"


@st.composite
def raw_streams(draw: st.DrawFn) -> list[tuple[bytes, int]]:
    """Arbitrary byte streams: random bytes, frames with random or wrong lengths, good frames;
    each chunk sent with some descriptors attached."""
    chunks = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["bytes", "badlen", "frame", "tiny"]))
        if kind == "bytes":
            data = draw(st.binary(max_size=64))
        elif kind == "tiny":
            data = draw(st.binary(min_size=1, max_size=5))
        else:
            body, _ = draw(frame_bodies())
            if kind == "badlen":
                length = draw(
                    st.integers(0, 2**32 - 1) | st.integers(max(0, len(body) - 3), len(body) + 3)
                )
                data = struct.pack(">I", length) + body
            else:
                data = frame(body)
        chunks.append((data, draw(st.integers(0, 3) | st.integers(0, MAX_FDS + 4))))
    return chunks


@FUZZ_SETTINGS
@given(raw_streams())
def test_raw_streams_never_crash_or_hang(chunks: list[tuple[bytes, int]]) -> None:
    """Any byte stream ends with serve() returning 0 within the bound, every byte it sent
    back is a valid reply, and no descriptor leaks."""
    before = fd_count()
    replies, records = run_server(chunks)
    assert len(replies) == len(records)
    assert fd_count() == before, "file descriptors leaked"
