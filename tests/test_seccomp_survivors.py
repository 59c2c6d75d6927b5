"""Unit tests for the mutants of kit/run/seccomp.py that the first ci/mutation run left alive."""

from __future__ import annotations

import errno
import json
import struct
import sys
import threading
from typing import Any

import pytest

from kit.run import seccomp
from kit.system import linux

# --- the filter, run in a classic-BPF interpreter -------------------------------------------


def _seccomp_data(
    nr: int, args: tuple[int, ...] = (), arch: int = linux.AUDIT_ARCH_X86_64
) -> bytes:
    """struct seccomp_data as the kernel lays it out on x86-64: int nr, u32 arch, u64
    instruction_pointer, u64 args[6] (little-endian)."""
    full = (tuple(args) + (0,) * 6)[:6]
    return struct.pack("<iIQ6Q", nr, arch, 0, *(a & (1 << 64) - 1 for a in full))


def _run_filter(prog: list[tuple[int, int, int, int]], data: bytes) -> int:
    """The filter's return value for ``data``: the instructions build_program emits (LD ABS
    of a 32-bit word, ALU AND K, JEQ/JGE/JSET K, RET K), evaluated as the kernel does
    (32-bit unsigned accumulator, jumps relative to the next instruction)."""
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            (acc,) = struct.unpack_from("<I", data, k)
            pc += 1
        elif code == 0x54:  # BPF_ALU | BPF_AND | BPF_K
            acc &= k
            pc += 1
        elif code in (0x15, 0x35, 0x45):  # BPF_JMP | BPF_JEQ / BPF_JGE / BPF_JSET | BPF_K
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: acc & k != 0}[code]
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"instruction {code:#x} outside the interpreter")


def test_a_clone_without_a_namespace_flag_passes_whatever_its_other_arguments_hold() -> None:
    # Boundary of clone's rule: only arg 0's namespace bits decide. Its other arguments
    # (a stack, tid pointers, tls) are addresses that may look like another rule's values
    # (a device file type for mknod's arg 1, an interface ioctl, a syslog action): a clone
    # without a namespace flag still passes, one with a flag is refused.
    prog = seccomp.build_program(seccomp.FAKE_RULES, notify=True)
    clone = seccomp.SYSCALLS_X86_64["clone"]
    look_alikes = (0o020000, 0o060000, 0x7F00_2000, 0x8914, 4)
    for value in look_alikes:
        for index in range(1, 6):
            args = tuple(value if i == index else 0 for i in range(6))
            got = _run_filter(prog, _seccomp_data(clone, args))
            assert got == seccomp.RET_ALLOW, (hex(value), index, hex(got))
            flagged = (linux.CLONE_NEWNS, *args[1:])
            got = _run_filter(prog, _seccomp_data(clone, flagged))
            assert got == seccomp.RET_USER_NOTIF, (hex(value), index, hex(got))


# --- handle_notification, on notifications made up for it ------------------------------------


def _notify(
    monkeypatch: pytest.MonkeyPatch,
    nr: int,
    args: tuple[int, ...] = (0,) * 6,
    send: Any = None,
    memory: bytes | None = None,
    still_pending: bool | OSError = True,
    watching: bool = False,
    received: OSError | None = None,
) -> dict[str, Any] | None:
    """handle_notification of one notification of ``nr`` (``send``: an exception the answer
    raises, refusal or CONTINUE alike; ``memory``: what the caller's string arguments read
    as; ``still_pending``: the id's validity, or an exception its check raises;
    ``watching``: under the real backend's filter, no host to compare with; ``received``:
    an exception the read of the notification raises)."""
    notif = linux.SeccompNotif(id=7, pid=4242, nr=nr, arch=linux.AUDIT_ARCH_X86_64, args=args)

    def send_error(listener: int, notif_id: int, err: int) -> bool:
        assert (notif_id, err) == (7, errno.EPERM)
        if isinstance(send, BaseException):
            raise send
        return True

    def send_continue(listener: int, notif_id: int) -> bool:
        assert notif_id == 7
        if isinstance(send, BaseException):
            raise send
        return True

    def read_memory(pid: int, address: int, size: int) -> bytes:
        if memory is None:
            raise OSError(errno.EIO, "unreadable")
        return memory[:size]

    def recv(listener: int) -> linux.SeccompNotif:
        if received is not None:
            raise received
        return notif

    def id_valid(listener: int, notif_id: int) -> bool:
        if isinstance(still_pending, OSError):
            raise still_pending
        return still_pending

    monkeypatch.setattr(linux, "seccomp_notif_recv", recv)
    monkeypatch.setattr(linux, "seccomp_notif_send_error", send_error)
    monkeypatch.setattr(linux, "seccomp_notif_send_continue", send_continue)
    monkeypatch.setattr(linux, "seccomp_notif_id_valid", id_valid)
    monkeypatch.setattr(linux, "read_memory", read_memory)
    monkeypatch.setattr(seccomp, "_thread_ids", lambda tid: None)
    return seccomp.handle_notification(-1, watching=watching)


def test_call_numbers_at_and_past_the_x32_bit_are_refused_and_named_by_its_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The filter sends every number at or above 0x40000000 (compared unsigned) to the
    # supervisor; the kernel hands nr over as a signed int, so 0x80000000 arrives as
    # -2**31. A number with the x32 bit set is named as an x32 call (x32 read is 0x40000000
    # itself); one without it, however it got there, by its plain number.
    prog = seccomp.build_program(seccomp.FAKE_RULES, notify=True)
    x32 = 0x40000000
    cases = {
        x32: "x32 system call 0",
        x32 | 165: "x32 system call 165",
        -(2**31): "system call -2147483648",
        -(2**31) + 165: "system call -2147483483",
    }
    for nr, name in cases.items():
        assert _run_filter(prog, _seccomp_data(nr)) == seccomp.RET_USER_NOTIF, nr
        record = _notify(monkeypatch, nr)
        assert record is not None and (record["syscall"], record["nr"]) == (name, nr)
        assert record["answered"] is True


def test_an_answer_that_fails_is_recorded_unanswered_and_never_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The answer's ioctl fails with something other than a stale id (ENOENT, which
    # seccomp_notif_send_error reports as False): EINTR when a signal lands while the
    # supervisor waits for the listener's lock, EBADF for a listener gone. The same for a
    # watched call let run (CONTINUE) under the real backend's filter.
    for err in (errno.EINTR, errno.EBADF):
        record = _notify(monkeypatch, 170, send=OSError(err, "failed"))
        assert record is not None and record["syscall"] == "sethostname"
        assert record["answered"] is False and record["errno"] == "EPERM", err
        record = _notify(monkeypatch, 62, send=OSError(err, "failed"), watching=True)
        assert record is not None and record["syscall"] == "kill"
        assert record["answered"] is False and "errno" not in record, err
    record = _notify(monkeypatch, 62, watching=True)
    assert record is not None and record["answered"] is True
    # The notification gone before it is read (its thread killed): nothing to record.
    assert _notify(monkeypatch, 170, received=OSError(errno.ENOENT, "gone")) is None


def test_string_arguments_are_recorded_only_when_read_while_the_call_still_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = (0x1000, 3, 0, 0, 0, 0)  # sethostname("box", 3)
    record = _notify(monkeypatch, 170, args, memory=b"box\0rest")
    assert record is not None and record["strings"] == ["box"]
    # The caller went on meanwhile: its memory may be another's, nothing is kept.
    for gone in (False, OSError(errno.EBADF, "failed")):
        record = _notify(monkeypatch, 170, args, memory=b"box", still_pending=gone)
        assert record is not None and "strings" not in record, gone
    # A call without string arguments records none.
    record = _notify(monkeypatch, 117, memory=b"x")
    assert record is not None and "strings" not in record


# --- _thread_ids ------------------------------------------------------------------------------


def test_a_threads_ids_list_every_thread_of_its_process() -> None:
    # The siblings of a notifying thread identify its process in the ledger: the main
    # thread's ids list a thread it started (and itself).
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        ids = seccomp._thread_ids(threading.get_native_id())
    finally:
        stop.set()
        other.join()
    assert ids is not None
    assert {threading.get_native_id(), other.native_id} <= set(ids["ns_threads"]), ids


# --- attribute, on events as the supervisor decodes them --------------------------------------


def _decoded(value: Any) -> Any:
    """``value`` through JSON, as the supervisor decodes a datagram: its strings and large
    ints are new objects, equal to the literals but not the same."""
    return json.loads(json.dumps(value))


def _not_the_literal(value: Any) -> bool:
    return value is not sys.intern(value) if isinstance(value, str) else True


def _ids(tid: int, tgid: int, threads: list[int]) -> dict[str, Any]:
    ids: dict[str, Any] = _decoded(
        {"tgid": tgid, "ns_tid": tid, "ns_tgid": tgid, "ns_threads": threads}
    )
    return ids


def _enter(role: str, hook: str, tid: int) -> dict[str, Any]:
    return {"kind": "hook_enter", "role": role, "hook": hook, "tid": tid}


def test_a_notifying_thread_is_matched_to_its_events_by_value() -> None:
    # Thread numbers above 256 are separate int objects in the events (decoded) and in the
    # target (read from /proc): the thread's own open hook, not its process's.
    events = _decoded([_enter("master", "create_container", 1000), _enter("master", "x", 1001)])
    target = _ids(1000, 1000, [1000, 1001])
    assert events[0]["tid"] == target["ns_tid"] and events[0]["tid"] is not target["ns_tid"]
    assert seccomp.attribute(events, target) == ("master", "create_container")


def test_only_stage2_after_its_exec_is_the_payload() -> None:
    # stage2 after a stage2_exec is the payload; a role ordered after "stage2" (the starter)
    # is not, nor is stage2 before its exec while events of kinds ordered after
    # "stage2_exec" are there (the starter's starter_config, an earlier refusal).
    execd = _decoded(
        [
            _enter("stage2", "start_process", 1),
            {"kind": "stage2_exec", "role": "master", "tid": 51},
        ]
    )
    assert _not_the_literal(execd[0]["role"]) and _not_the_literal(execd[1]["kind"])
    assert seccomp.attribute(execd, _ids(1, 1, [1])) == ("stage2", "the payload (after exec)")
    starter = _decoded([_enter("starter", "config", 7), execd[1]])
    assert seccomp.attribute(starter, _ids(7, 7, [7])) == ("starter", "config")
    before = _decoded(
        [
            {"kind": "starter_config", "role": "starter", "tid": 7},
            _enter("stage2", "start_process", 1),
            {"kind": "syscall_refused", "role": "supervisor", "tid": 3, "hook": "x"},
        ]
    )
    assert seccomp.attribute(before, _ids(1, 1, [1])) == ("stage2", "start_process")


def test_a_process_hooks_are_those_of_its_latest_role_only() -> None:
    # The master and the container side can share thread numbers (two pid namespaces): a
    # thread with no events of its own gets the hooks open under its process's latest role
    # (here master: both of them), not those of a role ordered before it (container) or
    # after it (stage2).
    events = _decoded(
        [
            _enter("container", "config", 1),
            _enter("stage2", "start_process", 1),
            _enter("master", "create_container", 1),
            _enter("master", "monitor_container", 1),
        ]
    )
    assert events[2]["role"] is not events[3]["role"]
    assert seccomp.attribute(events, _ids(5, 1, [1, 5])) == (
        "master",
        "monitor_container or create_container",
    )


# --- _open_hook -------------------------------------------------------------------------------


def test_only_hook_enter_events_open_a_hook() -> None:
    # Kinds ordered before "hook_enter" (container_start, exit, fatal...) open nothing.
    events = [
        _enter("container", "config", 1),
        {"kind": "container_start", "role": "container", "tid": 1},
        {"kind": "exit", "role": "supervisor", "tid": 1},
    ]
    assert seccomp._open_hook(events) == "config"


def test_a_return_closes_its_hook_however_deep_and_alone_closes_nothing() -> None:
    deep = [_enter("master", h, 1) for h in "abc"]
    close_c = {"kind": "hook_return", "role": "master", "hook": "c", "tid": 1}
    assert seccomp._open_hook([*deep, close_c]) == "b or a"
    # A return whose entry is not among the events (nothing open): no hook, no error.
    assert seccomp._open_hook([close_c]) is None


# --- resolve_rpc_methods ----------------------------------------------------------------------


def _refused(target: Any, role: str | None = "rpc", tid: int = 30) -> dict[str, Any]:
    return {
        "kind": "syscall_refused",
        "role": "supervisor",
        "tid": tid,
        "process_role": role,
        "hook": None,
        "target": target,
    }


def _call(tid: int, method: str) -> dict[str, Any]:
    return {"kind": "rpc_call", "role": "rpc", "tid": tid, "method": method}


def test_rpc_methods_are_named_on_a_ledger_decoded_from_json() -> None:
    # A ledger's events read back (no string interned): the refusal still gets its method.
    events = _decoded([_refused(_ids(2, 2, [2])), _call(2, "e.bind")])
    assert all(_not_the_literal(events[i][k]) for i, k in ((0, "kind"), (0, "process_role")))
    assert _not_the_literal(events[1]["kind"])
    seccomp.resolve_rpc_methods(events)
    assert events[0]["hook"] == "RPC method e.bind"


def test_only_rpc_server_refusals_are_named_and_unattributed_ones_are_skipped() -> None:
    # A refusal of no known process (process_role None) or of a role ordered after "rpc"
    # (stage2, the starter) is not the RPC server's.
    others = [_refused(None, role) for role in (None, "stage2", "starter", "stage1")]
    events = [*others, _call(2, "e.bind")]
    seccomp.resolve_rpc_methods(events)
    assert [e["hook"] for e in others] == [None] * len(others)


def test_a_refusal_is_named_by_an_rpc_call_after_it_only() -> None:
    # A call returned before the refusal (two events before it) is not its method; nor is
    # another kind of event after it (ordered after "rpc_call": a later refusal, a signal).
    early = _refused(_ids(2, 2, [2]))
    seccomp.resolve_rpc_methods([_call(2, "e.before"), _call(2, "e.too"), early])
    assert early["hook"] is None
    unread = _refused(None)  # its thread died before it was read: any thread's next call
    events = [unread, _refused(None, "master", tid=31), _call(9, "e.next")]
    seccomp.resolve_rpc_methods(events)
    assert unread["hook"] == "RPC method e.next"
