"""The ledger's own checks fed violations: validate, decode_checked, the writer's limits."""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import struct
import threading
import time

import pytest

from kit.ledger import record as ledger
from kit.ledger.record import (
    COMMON_KEYS,
    EVENT_KINDS,
    MAX_EVENT,
    SCHEMA_VERSION,
    Ledger,
    LedgerWriter,
    decode,
    decode_checked,
    ledger_socketpair,
    validate,
)


def event(seq: int, kind: str = "signal", role: str = "master", **extra: object) -> dict:
    return {"seq": seq, "t": 10 + seq, "kind": kind, "role": role, "pid": 5, "tid": 5, **extra}


def document(events: list[dict]) -> dict:
    return {"schema_version": SCHEMA_VERSION, "run": {}, "events": events}


VALID = [
    event(0, "run_start", "supervisor"),
    event(1, "hook_enter", "stage1", hook="config"),
    event(2, "exit", "supervisor"),
]


def test_a_valid_ledger_has_no_problem():
    assert validate(document([dict(e) for e in VALID])) == []
    assert validate(document([])) == []


def test_events_out_of_order_are_reported_with_their_index_and_seq():
    swapped = [VALID[0], VALID[2], VALID[1]]
    assert validate(document(swapped)) == [
        "event 1: seq 2 out of order",
        "event 2: seq 1 out of order",
    ]


def test_a_repeated_and_a_skipped_seq_are_reported():
    events = [event(0), event(0), event(3)]
    assert validate(document(events)) == [
        "event 1: seq 0 out of order",
        "event 2: seq 3 out of order",
    ]


def test_a_seq_that_is_not_a_number_is_out_of_order():
    assert validate(document([{**event(0), "seq": "0"}])) == ["event 0: seq '0' out of order"]


@pytest.mark.parametrize("key", COMMON_KEYS)
def test_each_missing_common_key_is_named(key):
    events = [dict(e) for e in VALID]
    del events[1][key]
    problems = validate(document(events))
    kind = events[1].get("kind")
    assert f"event 1 ({kind}): missing {key!r}" in problems
    # only that one key is reported (and, for seq/kind/role, what follows from it)
    assert all(p.startswith("event 1") for p in problems), problems


def test_an_unknown_kind_is_named():
    assert validate(document([event(0, "hook_entered")])) == [
        "event 0: unknown kind 'hook_entered'"
    ]


def test_an_unknown_role_is_named_for_a_known_kind():
    assert validate(document([event(0, "signal", "stage3")])) == ["event 0: unknown role 'stage3'"]


def test_every_known_kind_and_role_is_accepted():
    events = [
        event(i, kind, role)
        for i, (kind, role) in enumerate((k, r) for k in EVENT_KINDS for r in ledger.ROLES)
    ]
    assert validate(document(events)) == []


@pytest.mark.parametrize("version", [None, 0, 2, "1", 1.5])
def test_a_wrong_schema_version_is_named(version):
    doc = document(list(VALID))
    if version is None:
        del doc["schema_version"]
    else:
        doc["schema_version"] = version
    assert validate(doc) == [f"schema_version {version!r} != {SCHEMA_VERSION}"]


@pytest.mark.parametrize("events", [None, {"0": VALID[0]}, "events"])
def test_events_that_are_not_a_list_are_reported(events):
    doc = {"schema_version": SCHEMA_VERSION, "events": events}
    if events is None:
        del doc["events"]
    assert validate(doc) == ["events is not a list"]
    doc["schema_version"] = 7
    assert validate(doc) == ["schema_version 7 != 1", "events is not a list"]


# -- decoding datagrams ---------------------------------------------------------------------


def test_a_decodable_datagram_is_the_event():
    data = json.dumps(event(0)).encode()
    assert decode_checked(data) == (event(0), True)
    assert decode(data) == event(0)


@pytest.mark.parametrize(
    "data,why",
    [
        (b'{"kind": "signal"', "Expecting"),
        (b"\xff\xfe\x00garbage", "garbage"),
        (b"[1, 2]", "not an event object"),
        (b'"kind"', "not an event object"),
        (b'{"role": "master"}', "not an event object"),
        (b"", "Expecting value"),
    ],
)
def test_an_undecodable_datagram_becomes_a_starter_error_quoting_it(data, why):
    got, ok = decode_checked(data)
    assert ok is False
    assert got["kind"] == "starter_error" and got["stage"] == "ledger"
    assert got["role"] == "supervisor" and got["pid"] == 0 and got["tid"] == 0
    assert isinstance(got["t"], int) and got["t"] > 0
    assert got["message"].startswith("undecodable ledger datagram (")
    assert why in got["message"]
    assert repr(data[:200]) in got["message"]
    assert validate(document([{**got, "seq": 0}])) == []


def test_the_quoted_datagram_is_cut_at_200_bytes():
    data = b"x" * 199 + b"YZ"
    message = decode_checked(data)[0]["message"]
    assert repr(data[:200]) in message and "Z" not in message.split(": ", 1)[1]


# -- the writer -----------------------------------------------------------------------------


def test_an_unknown_role_or_kind_is_refused_naming_it():
    with pytest.raises(ValueError, match="unknown ledger role 'stage3'"):
        LedgerWriter(None, "stage3")
    with pytest.raises(ValueError, match="unknown ledger event kind 'hook_entered'"):
        LedgerWriter(None, "master").emit("hook_entered")


def test_an_event_carries_the_common_keys_and_its_fields():
    reader, writer = ledger_socketpair()
    with reader, writer:
        got = LedgerWriter(writer, "stage2").emit("stage2_failed", message="m")
        sent = json.loads(reader.recv(MAX_EVENT + 4096))
    assert sent == got
    assert set(got) == {"t", "kind", "role", "pid", "tid", "message"}
    assert got["kind"] == "stage2_failed" and got["role"] == "stage2" and got["message"] == "m"
    assert LedgerWriter(writer, "master").for_role("rpc").role == "rpc"


def _sent_size(writer: LedgerWriter, reader: socket.socket, pad: int) -> dict:
    writer.emit("fatal", message="", error="p" * pad)
    return json.loads(reader.recv(4 * MAX_EVENT))


def test_an_event_of_max_size_is_sent_whole_and_one_byte_more_is_truncated():
    reader, sock = ledger_socketpair()
    with reader, sock:
        writer = LedgerWriter(sock, "master")
        base = len(json.dumps(_sent_size(writer, reader, 0), separators=(",", ":")))
        exact = _sent_size(writer, reader, MAX_EVENT - base)
        over = _sent_size(writer, reader, MAX_EVENT - base + 1)
    assert len(exact["error"]) == MAX_EVENT - base and "truncated" not in exact
    assert over["truncated"] == MAX_EVENT + 1
    # the long field goes; the short ones stay
    assert set(over) == {"t", "kind", "role", "pid", "tid", "message", "truncated"}
    assert over["kind"] == "fatal" and over["role"] == "master"


def test_an_oversized_event_keeps_the_keys_that_say_what_it_was():
    # A hook_enter cut to its common keys would be a hook entry of no hook: the checks that
    # pair entries and returns, and the attribution of refusals, need the hook's name.
    reader, sock = ledger_socketpair()
    with reader, sock:
        LedgerWriter(sock, "master").emit(
            "hook_enter", hook="create_container", args={"big": "x" * MAX_EVENT}
        )
        sent = json.loads(reader.recv(4 * MAX_EVENT))
    assert sent["hook"] == "create_container" and "args" not in sent
    assert sent["truncated"] > MAX_EVENT
    assert ledger.check_event(sent) is None


def test_an_oversized_rpc_call_drops_its_arguments_before_its_credentials():
    # A method called with arguments near the RPC frame limit must not push the record of
    # the credentials it left out of its event (mutant-rpc-method-pushes-its-credentials-out).
    creds = {"before": {"uid": [0] * 4}, "after": {"uid": [0, 0, 0, 1]}}
    reader, sock = ledger_socketpair()
    with reader, sock:
        writer = LedgerWriter(sock, "rpc")
        writer.emit(
            "rpc_call", method="x.note", args={"text": "x" * MAX_EVENT}, ok=True, creds=creds
        )
        sent = json.loads(reader.recv(4 * MAX_EVENT))
        huge = {"before": None, "after": {"big": "y" * MAX_EVENT}}
        writer.emit("rpc_call", method="x.note", args={}, ok=True, creds=huge)
        cut = json.loads(reader.recv(4 * MAX_EVENT))
    assert sent["creds"] == creds and "args" not in sent and sent["truncated"] > MAX_EVENT
    assert sent["method"] == "x.note" and sent["ok"] is True  # what it was, still said
    assert "creds" not in cut and cut["method"] == "x.note"  # too big even alone: dropped
    assert ledger.check_event(sent) is None


def test_the_event_limit_is_what_the_supervisor_reads_whole():
    # The supervisor receives datagrams of up to 1 MiB: a larger event would arrive cut.
    assert MAX_EVENT == 1 << 20
    reader, sock = ledger_socketpair()
    with reader, sock:
        writer = LedgerWriter(sock, "master")
        base = len(json.dumps(_sent_size(writer, reader, 0), separators=(",", ":")))
        writer.emit("fatal", message="", error="p" * (MAX_EVENT - base))
        assert len(reader.recv(1 << 20, socket.MSG_TRUNC)) == MAX_EVENT  # whole, not cut


def test_a_writer_whose_reader_is_gone_does_not_raise():
    reader, sock = ledger_socketpair()
    reader.close()
    with sock:
        assert LedgerWriter(sock, "master").emit("exit", code=0, reason="r")["code"] == 0


def test_the_socketpair_is_seqpacket_and_close_on_exec():
    reader, writer = ledger_socketpair()
    with reader, writer:
        for s in (reader, writer):
            assert s.type == socket.SOCK_SEQPACKET
            assert s.get_inheritable() is False
        # 4 MiB asked (the kernel doubles what it grants, up to net.core.[rw]mem_max)
        for sock, opt, limit in (
            (writer, socket.SO_SNDBUF, "wmem_max"),
            (reader, socket.SO_RCVBUF, "rmem_max"),
        ):
            with open(f"/proc/sys/net/core/{limit}") as f:
                granted = min(4 << 20, int(f.read()))
            assert sock.getsockopt(socket.SOL_SOCKET, opt) == 2 * granted, limit
        # one datagram per event: two sends never merge
        writer.send(b"a")
        writer.send(b"b")
        assert reader.recv(10) == b"a" and reader.recv(10) == b"b"


# -- the query helper -----------------------------------------------------------------------


def test_ledger_queries_select_by_kind_and_fields():
    events = [
        event(0, "hook_enter", "stage1", hook="config"),
        event(1, "hook_return", "stage1", hook="config"),
        event(2, "hook_enter", "master", hook="create_container"),
        event(3, "signal", "master", signum=17),
    ]
    events.append(event(4, "exit", "supervisor"))  # no hook: never asked for one
    # decoded as the launcher gets it: strings equal to, not the same objects as, literals
    led = Ledger(json.loads(json.dumps(document(events))))
    assert list(led.hooks()) == [("stage1", "config"), ("master", "create_container")]
    assert [e["seq"] for e in led.select("hook_enter")] == [0, 2]
    master = "".join(["mas", "ter"])  # equal to, not the same object as, the events' role
    assert [e["seq"] for e in led.select(["hook_enter", "signal"], role=master)] == [2, 3]
    assert led.first("hook_enter")["seq"] == 0
    assert [e["seq"] for e in led.select(None, hook="config")] == [0, 1]
    assert led.select("hook_enter", role="rpc") == []
    assert led.first("hook_enter", role="master")["seq"] == 2
    assert led.first("exit", role="master") is None
    assert json.loads(led.to_json()) == document(events)
    assert led.to_json().startswith('{\n "schema_version": 1,\n "run": {},\n "events": [\n  {')


def test_a_long_valid_ledger_has_no_problem():
    # seq numbers past the small integers CPython caches: compared by value, not identity
    events = [event(int(str(i))) for i in range(600)]
    assert validate(document(events)) == []


# -- snapshots sent for the supervisor's outside check (confirm_send) -----------------------


def _answering(
    reader: socket.socket, answers: list[bytes], delay: float = 0.0
) -> tuple[threading.Thread, list]:
    """A stand-in for the supervisor's confirmation: it takes each datagram with the pipe
    that came with it, answers the next of ``answers`` on it (b"": closes it unanswered)
    ``delay`` seconds later, and keeps the datagrams; it ends when ``answers`` run out."""
    got: list[dict] = []

    def serve() -> None:
        for answer in answers:
            data, ancdata, _flags, _addr = reader.recvmsg(
                4 * MAX_EVENT, socket.CMSG_SPACE(4) + socket.CMSG_SPACE(12)
            )
            got.append(json.loads(data))
            fds = [
                fd
                for level, kind, raw in ancdata
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                for fd in array.array("i", raw[: len(raw) - len(raw) % 4])
            ]
            got[-1]["_fds"] = len(fds)
            time.sleep(delay)  # the supervisor at work: its outside read, a loaded machine
            for fd in fds:
                if answer:
                    os.write(fd, answer)
                os.close(fd)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread, got


#: a forgery is called after six disagreeing snapshots in a row (SPEC, LEDGER-003): every
#: thread of the sender is compared, and a burst of threads starting under load (the
#: master's three hook threads) outlasted three reads; more would hide a forgery longer
SNAPSHOT_ATTEMPTS_EXPECTED = 6


@pytest.mark.parametrize(
    "answers,sends",
    [
        ([ledger.CONFIRMED], 1),
        ([b""], 1),  # closed unanswered: the supervisor is gone, nothing to retry
        ([ledger.RETRY, ledger.CONFIRMED], 2),
        ([ledger.RETRY] * ledger.SNAPSHOT_ATTEMPTS, ledger.SNAPSHOT_ATTEMPTS),
    ],
)
def test_a_snapshot_is_sent_again_read_anew_while_the_supervisor_asks_and_no_more(answers, sends):
    reads = iter(range(1, 10))
    reader, sock = ledger_socketpair()
    with reader, sock:
        thread, got = _answering(reader, answers)
        LedgerWriter(sock, "master", confirm=True).emit(
            "hook_enter", refresh=lambda: {"n": next(reads)}, hook="config", snapshot={"n": 0}
        )
        thread.join(10)
        # nothing beyond the answered sends: the writer stopped where the answers did
        reader.setblocking(False)
        with pytest.raises(BlockingIOError):
            reader.recv(16)
    assert SNAPSHOT_ATTEMPTS_EXPECTED == ledger.SNAPSHOT_ATTEMPTS
    assert len(got) == sends
    # each resend carries the snapshot read again, every one with its own pipe
    assert [g["snapshot"]["n"] for g in got] == list(range(sends))
    assert all(g["_fds"] == 1 for g in got)


def test_without_refresh_the_same_snapshot_is_sent_again():
    reader, sock = ledger_socketpair()
    with reader, sock:
        thread, got = _answering(reader, [ledger.RETRY, ledger.CONFIRMED])
        LedgerWriter(sock, "master", confirm=True).emit(
            "hook_enter", hook="config", snapshot={"n": 0}
        )
        thread.join(10)
    assert [g["snapshot"] for g in got] == [{"n": 0}, {"n": 0}]


@pytest.mark.parametrize(
    "confirm,snapshot",
    [(False, {"n": 0}), (True, None), (True, [1])],
    ids=["not-confirming", "no-snapshot", "snapshot-not-an-object"],
)
def test_only_a_confirming_writer_waits_and_only_for_a_snapshot(confirm, snapshot):
    reader, sock = ledger_socketpair()
    with reader, sock:
        LedgerWriter(sock, "master", confirm=confirm).emit(
            "hook_enter", hook="config", snapshot=snapshot
        )
        _data, ancdata, _flags, _addr = reader.recvmsg(
            MAX_EVENT, socket.CMSG_SPACE(4) + socket.CMSG_SPACE(12)
        )
    # sent plainly: no pipe came with it (a pipe nobody answers would stall the writer)
    assert [a for a in ancdata if a[1] == socket.SCM_RIGHTS] == []


def test_a_writer_does_not_confirm_unless_told():
    assert LedgerWriter(None, "master").confirm is False
    assert LedgerWriter(None, "master", confirm=True).for_role("rpc").confirm is True


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_confirm_send_returns_the_one_byte_answer_and_leaves_no_pipe_open():
    reader, sock = ledger_socketpair()
    with reader, sock:
        before = _open_fds()
        # two bytes written: the answer is the first one only
        thread, _got = _answering(reader, [ledger.RETRY + ledger.CONFIRMED])
        assert ledger.confirm_send(sock, b'{"kind":"exit"}') == ledger.RETRY
        thread.join(10)
        thread, _got = _answering(reader, [b""])
        assert ledger.confirm_send(sock, b'{"kind":"exit"}') == b""
        thread.join(10)
        after = _open_fds()
    # nothing of the pipes left, and nothing else closed (stdin, stdout, stderr among them)
    assert after == before


def test_a_confirmation_pipe_lost_after_the_send_is_no_answer_not_an_error(monkeypatch):
    # Engine code in the sender's process may close the pipe's read end once the datagram
    # is out: the event was sent, so the sender goes on unconfirmed, it does not raise.
    real_close, real_move_high = os.close, ledger.linux.move_high
    moved: list[int] = []  # the pipe's read end, then its write end

    def noting(fd: int, base: int) -> int:
        moved.append(real_move_high(fd, base))
        return moved[-1]

    sender = threading.get_ident()  # the answering thread closes descriptors of its own

    def closing_the_read_end_too(fd: int) -> None:
        real_close(fd)
        if threading.get_ident() == sender and len(moved) == 2 and fd == moved[1]:
            real_close(moved[0])  # the write end's close, after the send: the read end too

    reader, sock = ledger_socketpair()
    with reader, sock:
        thread, got = _answering(reader, [b""])  # closes its end unanswered: no EPIPE
        monkeypatch.setattr(ledger.linux, "move_high", noting)
        monkeypatch.setattr(ledger.os, "close", closing_the_read_end_too)
        assert ledger.confirm_send(sock, b'{"kind":"exit"}') == b""
        monkeypatch.undo()
        thread.join(10)
    assert [g["kind"] for g in got] == ["exit"]


def test_a_confirmation_pipe_above_fd_setsize_is_waited_for():
    # A sender that holds a thousand descriptors: the kit's high numbers are taken, and the
    # pipe lies above 1024, where select() cannot wait.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard descriptor limit ({hard}) is below 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    held: list[int] = []
    reader, sock = ledger_socketpair()
    try:
        while not held or held[-1] < 1100:
            held.append(os.dup(0))
        thread, _got = _answering(reader, [ledger.CONFIRMED])
        assert ledger.confirm_send(sock, b'{"kind":"exit"}') == ledger.CONFIRMED
        thread.join(10)
    finally:
        for fd in held:
            os.close(fd)
        reader.close()
        sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_supervisor_slow_to_confirm_is_waited_for():
    # The sender waits for the answer up to CONFIRM_TIMEOUT (30 s), not a fraction of it: a
    # supervisor slowed by a loaded machine still confirms. (Well within the timeout, and
    # above a second: the wait is in milliseconds, the timeout in seconds.)
    assert ledger.CONFIRM_TIMEOUT == 30.0
    reader, sock = ledger_socketpair()
    with reader, sock:
        thread, _got = _answering(reader, [ledger.CONFIRMED], delay=1.5)
        assert ledger.confirm_send(sock, b'{"kind":"exit"}') == ledger.CONFIRMED
        thread.join(10)


def test_confirm_send_to_a_gone_supervisor_raises_and_leaves_no_pipe_open():
    reader, sock = ledger_socketpair()
    reader.close()
    with sock:
        before = _open_fds()
        with pytest.raises(OSError):
            ledger.confirm_send(sock, b'{"kind":"exit"}')
        assert _open_fds() == before


def test_the_reader_learns_each_senders_credentials_from_the_kernel():
    reader, sock = ledger_socketpair()
    with reader, sock:
        sock.send(b"{}")
        _data, ancdata, _flags, _addr = reader.recvmsg(16, socket.CMSG_SPACE(12))
    creds = [raw for level, kind, raw in ancdata if kind == socket.SCM_CREDENTIALS]
    assert creds and struct.unpack("3i", creds[0][:12])[0] == os.getpid()


# -- what check_event quotes ----------------------------------------------------------------


@pytest.mark.parametrize("size", [79, 80, 81, 200])
def test_a_quoted_value_is_cut_to_80_characters(size):
    kind = "k" * (size - 2)  # its repr: two quotes more
    quoted = ledger.check_event({"kind": kind}).removeprefix("unknown event kind ")
    if size <= 80:
        assert quoted == repr(kind)
    else:
        assert quoted == repr(kind)[:77] + "..." and len(quoted) == 80


def test_an_event_missing_several_required_keys_names_the_first():
    kind = next(
        k
        for k, keys in ledger.REQUIRED.items()
        if len(keys) >= 2 and k not in ledger.SUPERVISOR_KINDS
    )
    sent = {"t": 1, "kind": kind, "role": "master", "pid": 5, "tid": 5}
    assert ledger.check_event(sent) == f"{kind} event without {ledger.REQUIRED[kind][0]!r}"


# -- the ledger as the launcher reads it: capability masks named ----------------------------


def test_a_ledger_names_the_capability_masks_of_snapshots_and_credentials():
    snapshot = {"threads": [{"caps": {"effective": 1}}, "caps", {"uid": [0]}]}
    creds = {"caller": {"caps": {"effective": 1}, "threads": [{"caps": {"permitted": 1}}]}}
    led = Ledger(
        document(
            [
                event(0, "hook_enter", "master", hook="config", snapshot=snapshot),
                event(1, "rpc_call", "rpc", creds=creds),
            ]
        )
    )
    threads = led.events[0]["snapshot"]["threads"]
    # a thread entry that is not an object is left as it came (no error on a bad one)
    assert threads == [{"caps": {"effective": ["CAP_CHOWN"]}}, "caps", {"uid": [0]}]
    assert led.events[1]["creds"] == {
        "caller": {
            "caps": {"effective": ["CAP_CHOWN"]},
            "threads": [{"caps": {"permitted": ["CAP_CHOWN"]}}],
        }
    }


# -- a failed send: the supervisor gone, the socket taken, or a passing failure ------------


class _Failing:
    """The ledger socket as a writer sees it, whose first sends fail as ``failures`` say
    (each an errno, or a callable run before raising EBADF); later sends go through."""

    def __init__(self, sock: socket.socket, failures: list) -> None:
        self.sock, self.failures = sock, failures

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> int:
        if self.failures:
            failure = self.failures.pop(0)
            if callable(failure):
                failure()
                failure = errno.EBADF
            raise OSError(failure, os.strerror(failure))
        return self.sock.send(data)


def _failing_writer(failures: list) -> tuple[socket.socket, socket.socket, LedgerWriter, list]:
    reader, sock = ledger_socketpair()
    writer = LedgerWriter(_Failing(sock, failures), "master")  # type: ignore[arg-type]
    lost: list[int | None] = []
    writer.on_lost = lambda exc: lost.append(exc.errno)
    return reader, sock, writer, lost


def _received(reader: socket.socket) -> list[str]:
    """The kinds of the events waiting at ``reader`` (to its peer's end, if it has one)."""
    kinds = []
    while True:
        try:
            data = reader.recv(MAX_EVENT, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return kinds
        if not data:
            return kinds
        kinds.append(json.loads(data)["kind"])


def test_a_send_failing_with_the_supervisor_gone_is_not_tried_again():
    reader, sock, writer, lost = _failing_writer([errno.EPIPE])
    with reader, sock:
        writer.emit("stage2_exec")
        assert (lost, _received(reader)) == ([], [])


def test_a_lost_looking_failure_of_the_ledger_socket_itself_is_sent_again():
    # EBADF while the number still holds the ledger socket: a passing failure, not a loss.
    reader, sock, writer, lost = _failing_writer([errno.EBADF])
    with reader, sock:
        writer.emit("stage2_exec")
        assert (lost, _received(reader)) == ([], ["stage2_exec"])


@pytest.mark.parametrize("again", [errno.EBADF, errno.ENOTSOCK])
def test_a_ledger_socket_that_fails_twice_is_lost_and_nothing_raises(again):
    reader, sock, writer, lost = _failing_writer([errno.EBADF, again])
    with reader, sock:
        writer.emit("stage2_exec")
        assert (lost, _received(reader)) == ([again], [])


def test_a_socket_put_under_the_ledgers_number_is_never_sent_to():
    # Engine code put a socket of its own under the ledger's number: the event must not go
    # to it; the ledger is lost.
    other, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader, sock, writer, lost = _failing_writer([])
    with reader, sock, other, theirs:
        writer.sock.failures.append(lambda: os.dup2(other.fileno(), sock.fileno()))
        writer.emit("stage2_exec")
        assert lost == [errno.EBADF]
        assert (_received(theirs), _received(reader)) == ([], [])
