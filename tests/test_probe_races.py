"""Probes read /proc while the hooked process's threads come and go: never an error."""

from __future__ import annotations

import threading
import time

from conftest import exit_code_in_child

from kit.ledger import probe


def test_snapshot_survives_threads_exiting_while_it_reads():
    def short() -> None:
        time.sleep(0.0002)

    deadline = time.monotonic() + 1.5
    count = 0
    while time.monotonic() < deadline:
        threads = [threading.Thread(target=short) for _ in range(4)]
        for t in threads:
            t.start()
        snap = probe.snapshot()  # raised ProcessLookupError (ESRCH) before the fix
        assert snap["threads"]
        for t in threads:
            t.join()
        count += 1
    assert count > 50


def test_a_thread_that_ends_while_its_namespaces_are_read_is_left_out(monkeypatch):
    # Its status was read, then some of its namespace links were gone: no thread state with
    # a namespace the process has as unreadable (the fake model, which has them all, could
    # never agree with it). Left out only when the kernel says it is ending: a live thread
    # is never hidden. A namespace kind the kernel lacks stays in every thread's state.
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        read = probe._thread_ns

        def half_read(tid: int) -> dict[str, int | None]:
            got = read(tid)
            if tid == other.native_id:
                got["net"] = None  # as if read after it ended
            return got

        def tids() -> list[int]:
            return [t["tid"] for t in probe.snapshot()["threads"]]

        monkeypatch.setattr(probe, "_thread_ns", half_read)
        assert other.native_id in tids()  # alive: kept, its unreadable namespace shown
        ending = probe.linux.thread_ending
        monkeypatch.setattr(probe.linux, "thread_ending", lambda tid: tid == other.native_id)
        assert other.native_id not in tids() and threading.get_native_id() in tids()
        monkeypatch.setattr(probe.linux, "thread_ending", ending)

        def lacking(tid: int) -> dict[str, int | None]:  # a kernel without time namespaces
            return {**read(tid), "time": None}

        inodes = probe.linux.ns_inodes
        monkeypatch.setattr(probe, "_thread_ns", lacking)
        monkeypatch.setattr(probe.linux, "ns_inodes", lambda *a: {**inodes(*a), "time": None})
        monkeypatch.setattr(probe.linux, "thread_ending", lambda tid: True)
        assert other.native_id in tids()
    finally:
        release.set()
        other.join()


def test_a_live_thread_is_not_ending_and_a_gone_one_is():
    from kit.system import linux

    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    alive = linux.thread_ending(other.native_id)
    release.set()
    other.join()
    assert alive is False and linux.thread_ending(threading.get_native_id()) is False
    assert linux.thread_ending(2**22 + 7)  # no such thread


def test_the_escalation_probe_thread_is_gone_when_it_returns():
    import os

    # Only threads that appeared count: one an earlier test left may end meanwhile.
    before = set(os.listdir("/proc/self/task"))
    result = probe.escalation()
    assert set(os.listdir("/proc/self/task")) - before == set()
    assert "host_escalation" in result


def test_a_concurrent_snapshot_never_sees_a_probe_thread_with_raised_credentials():
    """The master runs hooks in threads at once: one hook's probe thread (raising the
    permitted capabilities, regaining uid 0) must not show in another's snapshot."""
    import os

    from kit.system import linux

    def scenario() -> int:
        # A setuid master's state: saved uid 0, nothing effective, all permitted.
        os.setresgid(65534, 65534, 0)
        linux.set_keepcaps(True)
        os.setresuid(65534, 65534, 0)
        linux.capset(0, linux.capget()[1], 0)
        stop = threading.Event()
        seen: list[dict] = []

        def snapshots() -> None:
            while not stop.is_set():
                for t in probe.snapshot()["threads"]:
                    if t["caps"]["effective"] or 0 in t["uid"][:2]:
                        seen.append(t)

        watcher = threading.Thread(target=snapshots)
        watcher.start()
        results = [probe.escalation() for _ in range(40)]
        stop.set()
        watcher.join()
        assert all(r["setresuid_root"] and r["raise_caps"] for r in results), results[0]
        assert seen == [], seen[:1]
        return 0

    if os.geteuid() != 0:
        import pytest

        pytest.skip("needs root to reach a setuid master's credentials")
    assert exit_code_in_child(scenario) == 0
