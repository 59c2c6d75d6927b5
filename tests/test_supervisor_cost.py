"""The supervisor's cheaper ways of admitting a datagram refuse what the old ways refused."""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kit.ledger import probe
from kit.ledger.record import MAX_EVENT, _no_constant, ledger_socketpair, parse_datagram
from kit.ledger.senders import _all_masks, check_snapshot, find_thread
from kit.run.launcher import make_request
from kit.run.supervisor import Supervisor
from kit.system import linux

ODD_DATAGRAMS = [
    b'{"kind": "x", "v": NaN}',  # a constant JSON does not have: refused
    b'{"kind": "x", "v": -Infinity}',
    b"\xef\xbb\xbf" + b'{"kind": "x"}',  # a UTF-8 BOM (json.loads reads past it)
    json.dumps({"kind": "x", "m": "é"}).encode("utf-16"),
    json.dumps({"kind": "x"}).encode("utf-32-le"),
    b'{"kind": "x", "s": "\\ud800"}',  # a lone surrogate escape
    b'{"kind": "x"} trailing',
    b"[" * 100_000,  # nested too deeply
    b"\xff\xfe not json",
    b"",
    b'{"kind": "x", "kind": "y"}',
]


@pytest.mark.parametrize("datagram", ODD_DATAGRAMS)
def test_a_datagram_decodes_as_json_loads_decodes_it(datagram: bytes) -> None:
    try:
        expected: Any = json.loads(datagram, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        expected = None
    event, problem = parse_datagram(datagram)
    if expected is None or not isinstance(expected, dict) or "kind" not in expected:
        assert event is None and problem
    else:
        assert problem is None and event == expected


def _supervisor() -> Supervisor:
    return Supervisor(make_request("reference", "root", ["/bin/true"]))


def test_the_receive_buffer_gives_each_datagram_its_sender_and_descriptors() -> None:
    reader, writer = ledger_socketpair()
    sup = _supervisor()
    r, w = os.pipe()
    try:
        writer.sendmsg([b"first"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
        writer.send(b"x" * 5000)
        writer.send(b"")
        data, sender, fds, cut = sup._receive(reader)
        assert (data, sender, cut) == (b"first", os.getpid(), False) and len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(w).st_ino
        os.close(fds[0])
        # A longer datagram after a short one: the buffer's old content never shows.
        assert sup._receive(reader)[:2] == (b"x" * 5000, os.getpid())
        assert sup._receive(reader)[:3] == (b"", os.getpid(), [])
        with pytest.raises(BlockingIOError):
            sup._receive(reader)
    finally:
        for fd in (r, w):
            os.close(fd)
        reader.close()
        writer.close()


def test_a_datagram_longer_than_the_buffer_is_cut_and_says_so() -> None:
    reader, writer = ledger_socketpair()
    sup = _supervisor()
    try:
        writer.send(b"y" * (MAX_EVENT + 10))
        data, _, _, cut = sup._receive(reader)
        assert cut and len(data) == MAX_EVENT
        # Five descriptors where four fit: cut too (MSG_CTRUNC), the ones that came kept.
        pipes = [os.pipe() for _ in range(3)]
        fds = [fd for pair in pipes for fd in pair][:5]
        writer.sendmsg([b"z"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data, _, got, cut = sup._receive(reader)
        assert data == b"z" and cut and len(got) == linux.MAX_PASSED_FDS
        for fd in got + [fd for pair in pipes for fd in pair]:
            os.close(fd)
    finally:
        reader.close()
        writer.close()


def _snapshot_event() -> dict[str, Any]:
    return {
        "t": 1,
        "kind": "hook_enter",
        "role": "master",
        "pid": os.getpid(),
        "tid": threading.get_native_id(),
        "hook": "config",
        "snapshot": probe.snapshot(masks=True),
    }


def _own(event: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in event["snapshot"]["threads"] if t["tid"] == event["tid"])


def test_a_true_snapshot_passes_with_masks_and_with_names() -> None:
    event = _snapshot_event()
    assert check_snapshot(os.getpid(), event, True) is None
    mine = _own(event)
    mine["caps"] = probe.named_caps(mine["caps"])
    assert check_snapshot(os.getpid(), event, True) is None


@pytest.mark.parametrize(
    "forge",
    [
        lambda caps: {**caps, "effective": caps["effective"] ^ 1},  # a mask off by one bit
        lambda caps: {**caps, "ambient": caps["ambient"] | 1 << 40},
        lambda caps: {**caps, "x": 0},
        lambda caps: {k: v for k, v in caps.items() if k != "inheritable"},
        lambda caps: {**probe.named_caps(caps), "permitted": ["CAP_NOT_A_CAP"]},
        lambda caps: None,
    ],
)
def test_a_forged_capability_set_is_refused_and_told_in_names(forge: Any) -> None:
    event = _snapshot_event()
    mine = _own(event)
    mine["caps"] = forge(mine["caps"])
    problem = check_snapshot(os.getpid(), event, True)
    assert problem is not None and problem.startswith("its snapshot says caps ")
    kernel = problem.split("the kernel says ", 1)[1]
    assert "'CAP_" in kernel or "[]" in kernel  # names, never a mask


def test_a_bool_is_not_a_mask() -> None:
    """True == 1: a set compared as an int would take a forged ``true`` for CAP_CHOWN."""
    assert _all_masks({"effective": 0, "permitted": 1 << 63})
    assert not _all_masks({"effective": True})
    assert not _all_masks({"effective": 1 << 64})
    assert not _all_masks({"effective": -1})
    assert not _all_masks({"effective": ["CAP_CHOWN"]})
    event = _snapshot_event()
    mine = _own(event)
    mine["caps"] = {**mine["caps"], "inheritable": True}
    assert check_snapshot(os.getpid(), event, True) is not None


def _task(found: tuple[int, dict[str, str]] | None) -> int | None:
    return None if found is None else found[0]


def test_a_thread_found_before_is_read_again_not_trusted() -> None:
    pid, me = os.getpid(), threading.get_native_id()
    tasks: dict[tuple[int, int], int] = {}
    assert _task(find_thread(pid, me, tasks)) == _task(linux.thread_status(pid, me)) == me
    assert tasks == {(pid, me): me}
    # Another thread where the cache says: the scan finds the right one and remembers it.
    other: list[int] = []
    ready, done = threading.Event(), threading.Event()

    def sibling() -> None:
        other.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=sibling)
    thread.start()
    try:
        ready.wait(10)
        tasks[(pid, me)] = other[0]
        found = find_thread(pid, me, tasks)
        assert found is not None and found[0] == me and tasks[(pid, me)] == me
        # A task that is gone, or never was: the scan again; a thread that is not there: None.
        tasks[(pid, me)] = 2**22 + 7
        assert _task(find_thread(pid, me, tasks)) == me
        assert find_thread(pid, 2**22 + 9, tasks) is None
    finally:
        done.set()
        thread.join()


def test_every_thread_is_found_as_the_full_scan_finds_it() -> None:
    pid = os.getpid()
    done = threading.Event()
    threads = [threading.Thread(target=done.wait, args=(10,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        tasks: dict[tuple[int, int], int] = {}
        for _ in range(2):  # without, then with, what was found before
            for tid in tids:
                found, scanned = find_thread(pid, tid, tasks), linux.thread_status(pid, tid)
                assert found is not None and scanned is not None and found[0] == scanned[0]
                stable = ("Name", "Uid", "Gid", "NSpid", "CapEff", "Seccomp")
                assert [found[1][k] for k in stable] == [scanned[1][k] for k in stable]
        assert find_thread(os.getpid(), 2**22 + 9) is None
        assert find_thread(2**22 + 11, tids[0]) is None  # no such process
    finally:
        done.set()
        for thread in threads:
            thread.join()


def test_a_thread_named_in_bytes_that_are_not_utf8_is_still_checked() -> None:
    """Engine code names its threads as it likes; the outside check must not fail on it."""
    libc = ctypes.CDLL(None, use_errno=True)
    seen: list[dict[str, Any]] = []
    problems: list[str | None] = []
    done = threading.Event()

    def named() -> None:
        # The snapshot first: the kit's own read of the name (linux.read_status) fails too.
        event = _snapshot_event()
        libc.prctl(15, ctypes.c_char_p(b"kit\xff\xfeodd"), 0, 0, 0)  # PR_SET_NAME
        problems.append(check_snapshot(os.getpid(), event, True))
        found = find_thread(os.getpid(), threading.get_native_id())
        if found is not None:
            seen.append(found[1])
        done.set()

    thread = threading.Thread(target=named)
    thread.start()
    thread.join()
    assert done.is_set() and problems == [None]
    assert seen and seen[0]["Name"].startswith("kit")


@contextlib.contextmanager
def _a_sibling_thread(lowered: int = 0) -> Iterator[int]:
    """A second thread of this process, idle for the block, with ``lowered`` taken out of
    its own effective capability set (per thread: no other changes); yields its id."""
    tids: list[int] = []
    ready, done = threading.Event(), threading.Event()

    def idle() -> None:
        eff, perm, inh = linux.capget()
        linux.capset(eff & ~lowered, perm, inh)
        tids.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    thread = threading.Thread(target=idle, name="sibling")
    thread.start()
    try:
        ready.wait(10)
        yield tids[0]
    finally:
        done.set()
        thread.join()


@pytest.mark.skipif(not linux.capget()[0] & 1, reason="needs CAP_CHOWN effective to lower")
def test_a_snapshot_that_leaves_out_or_dresses_up_another_thread_is_refused() -> None:
    """SPEC §4 speaks of every thread: the supervisor reads each one the kernel lists, not
    only the sender (engine code can hide a thread from the snapshot read inside). A thread
    left out that is, to the kernel, exactly as one shown hides nothing; this one is not."""
    with _a_sibling_thread(lowered=1) as sibling:  # CAP_CHOWN off its effective set
        event = _snapshot_event()
        assert check_snapshot(os.getpid(), event, True) is None
        threads = event["snapshot"]["threads"]
        other = next(t for t in threads if t["tid"] == sibling)
        event["snapshot"]["threads"] = [t for t in threads if t["tid"] != sibling]
        problem = check_snapshot(os.getpid(), event, True)
        assert problem is not None
        assert problem.startswith(f"its snapshot has no entry for thread {sibling}, which")
        event["snapshot"]["threads"] = threads
        other["caps"] = {**other["caps"], "effective": other["caps"]["effective"] ^ 1}
        problem = check_snapshot(os.getpid(), event, True)
        assert problem is not None and f"for thread {sibling}, the kernel" in problem
        other["caps"] = {**other["caps"], "effective": other["caps"]["effective"] ^ 1}
        other["ns"] = {**other["ns"], "net": 1}
        problem = check_snapshot(os.getpid(), event, True)
        net = linux.ns_inode("net")
        assert (
            problem
            == f"its snapshot says net namespace 1 for thread {sibling}, the kernel says {net}"
        )
        del other["ns"]
        problem = check_snapshot(os.getpid(), event, True)
        assert problem == f"its snapshot gives thread {sibling} no namespaces"


def test_a_thread_left_out_that_is_as_one_shown_hides_nothing() -> None:
    """Threads start between the snapshot and the supervisor's read (a timer, the master's
    hook threads): one the kernel shows exactly as a thread of the snapshot is no forgery."""
    with _a_sibling_thread() as sibling:
        event = _snapshot_event()
        threads = event["snapshot"]["threads"]
        event["snapshot"]["threads"] = [t for t in threads if t["tid"] != sibling]
        assert check_snapshot(os.getpid(), event, True) is None


def test_the_processs_own_namespaces_are_checked_too() -> None:
    event = _snapshot_event()
    event["snapshot"]["ns"] = {**event["snapshot"]["ns"], "uts": 7}
    problem = check_snapshot(os.getpid(), event, True)
    uts = linux.ns_inode("uts")
    assert problem == f"its snapshot says uts namespace 7 for the process, the kernel says {uts}"


def test_the_credentials_an_rpc_method_left_are_checked_as_a_snapshot() -> None:
    """An rpc_call's ``creds["after"]`` (every thread of the RPC server once the method
    returned) is confirmed from outside too: engine code in the server could dress it up."""
    snap = probe.snapshot(masks=True)
    me = threading.get_native_id()
    event = {
        "t": 1,
        "kind": "rpc_call",
        "role": "rpc",
        "pid": os.getpid(),
        "tid": me,
        "creds": {"before": None, "after": {**snap}},
    }
    assert check_snapshot(os.getpid(), event, True) is None
    assert check_snapshot(os.getpid(), event, False) is not None  # unconfirmed: refused
    mine = next(t for t in event["creds"]["after"]["threads"] if t["tid"] == me)
    mine["caps"] = {**mine["caps"], "effective": mine["caps"]["effective"] ^ 1}
    problem = check_snapshot(os.getpid(), event, True)
    assert problem is not None and problem.startswith("its snapshot says caps ")
