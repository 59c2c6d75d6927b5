"""The fake backend's shared store: generations, the per-process cache, aborted
transactions, forks, dead lock holders, and the checks of ``KIT_FAKE_STORE_CHECK``.

Scenarios that need a second process fork the pytest process (the children only use the
store and leave with ``os._exit``).
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import in_child

from kit.system.fake import store as store_mod
from kit.system.fake.store import HEADER, Store, StoreError


@pytest.fixture
def store(tmp_path):
    s = Store.create({"n": 0, "items": [], "ns": {"1": {"kind": "uts"}}}, str(tmp_path))
    yield s
    s.remove()


def file_generation(store: Store) -> int:
    with open(store.path, "rb") as f:
        return HEADER.unpack(f.read(HEADER.size))[0]


def test_a_write_in_one_process_is_seen_by_another(store):
    assert store.read()["n"] == 0
    before = store.generation

    def child() -> int:
        with store.transaction() as st:
            st["n"] = 41
            st["items"].append("from the child")
        return store.generation

    out = in_child(child)
    assert out == {"ok": before + 1}
    with store.transaction(write=False) as st:
        assert st["n"] == 41 and st["items"] == ["from the child"]
    assert store.generation == file_generation(store) == before + 1
    # And back: the child sees what this process writes.
    with store.transaction() as st:
        st["n"] += 1
    assert in_child(lambda: store.read()["n"]) == {"ok": 42}


def test_an_unchanged_generation_reuses_the_cached_document(store, monkeypatch):
    decoded = []
    real_decode = store_mod._decode
    monkeypatch.setattr(store_mod, "_decode", lambda body: decoded.append(1) or real_decode(body))
    with store.transaction(write=False) as first:
        pass
    with store.transaction(write=False) as second:
        pass
    with store.transaction() as third:
        third["n"] = 5  # a write keeps the written document cached
    with store.transaction(write=False) as fourth:
        assert fourth["n"] == 5
    assert first is second is third is fourth
    assert len(decoded) == 1

    def write_elsewhere() -> None:
        with store.transaction() as st:
            st["n"] = 6

    in_child(write_elsewhere)
    with store.transaction(write=False) as fifth:
        assert fifth["n"] == 6
    assert len(decoded) == 2  # the other process's write is read from the file


def test_an_aborted_transaction_leaves_no_trace(store):
    store.read()
    generation = store.generation
    with pytest.raises(RuntimeError), store.transaction() as st:
        st["n"] = 99
        st["ns"]["1"]["hostname"] = "changed in place"
        st["items"].append("lost")
        raise RuntimeError("abort")
    with store.transaction(write=False) as st:
        assert st == {"n": 0, "items": [], "ns": {"1": {"kind": "uts"}}}
    assert in_child(store.read) == {"ok": {"n": 0, "items": [], "ns": {"1": {"kind": "uts"}}}}
    assert store.generation == file_generation(store) == generation  # nothing written


def test_nested_transactions_write_once_at_the_outermost_level(store):
    generation = file_generation(store)
    with store.transaction(write=False) as outer:
        with store.transaction() as inner:
            inner["n"] = 7
        assert outer["n"] == 7
        assert file_generation(store) == generation  # not yet written
    assert file_generation(store) == generation + 1
    assert in_child(lambda: store.read()["n"]) == {"ok": 7}


def test_read_returns_a_copy_the_caller_owns(store):
    copy = store.read()
    copy["n"] = 1000
    copy["items"].append("mine")
    assert store.read() == {"n": 0, "items": [], "ns": {"1": {"kind": "uts"}}}


def test_a_child_forked_inside_a_transaction_forgets_its_uncommitted_changes(store):
    st = store.begin()
    st["n"] = 123  # not committed
    store.before_fork()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            store.after_fork_in_child()
            with store.transaction(write=False) as child_st:  # waits for the parent's lock
                os.write(w, json.dumps(child_st["n"]).encode())
            code = 0
        finally:
            os._exit(code)
    store.after_fork_in_parent()
    os.close(w)
    store.end(commit=False)
    seen = json.loads(os.read(r, 100))
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and seen == 0


def test_a_killed_lock_holder_neither_wedges_the_store_nor_leaves_its_changes(store):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        st = store.begin()
        st["n"] = 666
        os.write(w, b"x")  # holds the lock, changed the document, never ends
        signal.pause()
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with store.transaction() as st:  # the kernel released its lockf lock
        assert st["n"] == 0
        st["n"] = 1
    assert store.read()["n"] == 1


def test_a_writer_killed_half_way_through_its_write_leaves_the_last_document_whole(store):
    # The kit SIGKILLs the processes of a failed run, and the kernel ends a write to a file
    # between two pages for a fatal signal: the header of the new document must never
    # stand over half of its body (the model store was once left "truncated" that way).
    with store.transaction() as st:
        st["items"] = [f"{i:0100}" for i in range(100)]  # a body of several pages
    committed = store.read()

    real_write, real_pwrite = os.write, os.pwrite

    def die_half_way(fd, data, *offset):
        half = memoryview(data)[: len(data) // 2]
        (real_pwrite(fd, half, *offset) if offset else real_write(fd, half))
        os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()
    if pid == 0:
        try:
            store_mod.os.write = lambda fd, data: die_half_way(fd, data)
            store_mod.os.pwrite = lambda fd, data, offset: die_half_way(fd, data, offset)
            with store.transaction() as st:
                st["items"] = [f"{i:0100}" for i in range(200)]
        finally:
            os._exit(3)  # not reached: the write above kills this process
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert Store(store.path).read() == committed
    with store.transaction() as st:  # and the store goes on
        st["n"] = 2
    assert in_child(lambda: store.read()["n"]) == {"ok": 2}


def test_a_truncated_store_is_an_error(store):
    with open(store.path, "r+b") as f:
        f.truncate(HEADER.size + 3)
    fresh = Store(store.path)
    with pytest.raises(OSError, match="truncated"):
        fresh.read()


def test_checking_catches_a_read_only_transaction_that_changes_the_document(store, monkeypatch):
    monkeypatch.setenv(store_mod.CHECK_ENV, "1")
    checked = Store(store.path)
    with (
        pytest.raises(StoreError, match="read-only transaction changed"),
        checked.transaction(write=False) as st,
    ):
        st["n"] = 5
    assert checked.read()["n"] == 0  # and the change is gone


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda st: st.__setitem__("t", (1, 2)), "not plain JSON"),
        (lambda st: st.__setitem__(3, "x"), "not plain JSON"),
        (lambda st: st.__setitem__("s", {1, 2}), "not JSON data"),
        (lambda st: st.__setitem__("alias", st["items"]), "one object in two places"),
    ],
)
def test_checking_catches_a_write_of_anything_but_plain_json(store, monkeypatch, bad, message):
    monkeypatch.setenv(store_mod.CHECK_ENV, "1")
    checked = Store(store.path)
    with pytest.raises(StoreError, match=message), checked.transaction() as st:
        bad(st)
    assert checked.read() == {"n": 0, "items": [], "ns": {"1": {"kind": "uts"}}}


def test_every_flow_keeps_the_stores_rules():
    """Whole fake lifecycles, every transaction checked (in a fresh launcher, so that its
    zygote and every process of the runs have KIT_FAKE_STORE_CHECK set)."""
    import subprocess
    import sys

    code = (
        "import json\n"
        "from kit.run.launcher import run\n"
        "out = {}\n"
        "for flow in ('root', 'suid', 'userns', 'fakeroot', 'hybrid'):\n"
        "    r = run('reference', flow, ['/bin/true'], backend='fake',\n"
        "            engine_config={'namespaces': ['mount', 'pid', 'uts', 'ipc', 'net']})\n"
        "    out[flow] = [r.exit_code, r.problems()]\n"
        "print(json.dumps(out))\n"
    )
    env = {
        **os.environ,
        store_mod.CHECK_ENV: "1",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/", env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        flow: [0, []] for flow in ("root", "suid", "userns", "fakeroot", "hybrid")
    }


def test_a_waiting_caller_is_called_back_while_another_process_holds_the_lock(store):
    # The supervisor answers refused system calls there: the lock's holder may be a process
    # one of whose threads waits, trapped, for that answer (the deadlock of a direct
    # socket.sethostname, which keeps the GIL, beside a thread inside a transaction).
    import select

    locked_r, locked_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        with store.transaction():
            os.write(locked_w, b"l")
            # hold the lock until told, or 10 s at most: a caller that waits blocked (the
            # old way) must not hang the test for ever, only fail it
            select.select([go_r], [], [], 10)
        os._exit(0)
    calls: list[int] = []

    def answer() -> None:
        calls.append(1)
        if len(calls) == 3:
            os.write(go_w, b"g")  # the holder's trapped thread answered: it lets go

    try:
        assert os.read(locked_r, 1) == b"l"
        store.waiting = answer
        with store.transaction() as st:
            st["n"] = 7
        assert len(calls) >= 3
        store.waiting = None
    finally:
        os.waitpid(pid, 0)
        for fd in (locked_r, locked_w, go_r, go_w):
            os.close(fd)
    assert store.read()["n"] == 7


def test_a_forked_child_does_not_call_its_parents_waiting_caller(store):
    def child() -> bool:
        store.read()  # the first transaction after a fork forgets the parent's state
        return store.waiting is None

    store.waiting = lambda: None
    try:
        assert in_child(child) == {"ok": True}
    finally:
        store.waiting = None
