"""The supervisor's own checks of the master (kit/run/master_watch.py), fed real children and
real sockets of this process: a reaped sentinel and a kept copy of the RPC connection are
reported; a zombie sentinel and the copies the kit keeps are not."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import require_flow

from kit.run.launcher import run
from kit.run.master_watch import MasterWatch
from kit.system import linux


@pytest.fixture
def zombie():
    """A child of this process that has exited and is not reaped (reaped at the end if the
    test did not)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    while linux.process_alive(pid):
        time.sleep(0.005)
    yield pid
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _end(hook, kind="hook_return", **extra):
    return {"kind": kind, "role": "master", "hook": hook, **extra}


def _watching(zombie):
    watch = MasterWatch()
    me = os.getpid()
    watch.note(
        me, "starter", {"kind": "container_start", "role": "starter", "sentinel_pid": zombie}
    )
    return watch, me


def test_a_zombie_sentinel_is_no_finding_and_a_reaped_one_is_found_once(zombie):
    watch, me = _watching(zombie)
    assert linux.child_numbered(me, zombie) == zombie
    for hook in ("create_container", "post_start_process", "monitor_container"):
        assert not watch.reaped_at(me, _end(hook), confirmed=True)
    os.waitpid(zombie, 0)  # the engine's waitpid(-1)
    assert linux.child_numbered(me, zombie) is None
    assert watch.reaped_at(me, _end("monitor_container", "hook_raise"), confirmed=True)
    assert not watch.reaped_at(me, _end("create_container"), confirmed=True)  # reported once


@pytest.mark.parametrize(
    "event, confirmed, why",
    [
        (_end("create_container"), False, "the master did not wait for the look"),
        (_end("cleanup_container"), True, "the kit reaps the sentinel before cleanup"),
        (_end("monitor_container", caller="engine"), True, "engine code's own hook call"),
        ({"kind": "hook_enter", "role": "master", "hook": "create_container"}, True, "an entry"),
        ({**_end("create_container"), "role": "rpc"}, True, "not the master's"),
    ],
)
def test_a_reaped_sentinel_is_not_held_against_ends_the_kit_may_reap_before(
    zombie, event, confirmed, why
):
    watch, me = _watching(zombie)
    os.waitpid(zombie, 0)
    assert not watch.reaped_at(me, event, confirmed), why


def test_after_a_fatal_error_only_the_hooks_the_kit_joins_first_count(zombie):
    # A failed run's master gives up on the monitor and may reap the sentinel before the
    # monitor's end arrives; create_container and post_start_process end before it reaps.
    watch, me = _watching(zombie)
    watch.note(me, "starter", {"kind": "fatal", "role": "master"})
    os.waitpid(zombie, 0)
    assert not watch.reaped_at(me, _end("monitor_container"), confirmed=True)
    assert watch.reaped_at(me, _end("post_start_process"), confirmed=True)


def test_only_the_starters_first_container_start_names_the_sentinel(zombie):
    watch, me = MasterWatch(), os.getpid()
    forged = {"kind": "container_start", "role": "starter", "sentinel_pid": 1}
    watch.note(me, "container", forged)  # not from the starter process
    assert watch.number is None
    watch.note(me, "starter", {**forged, "sentinel_pid": zombie})
    watch.note(me, "starter", forged)  # a second one: ignored
    assert (watch.master, watch.number) == (me, zombie)
    os.waitpid(zombie, 0)
    assert watch.reaped_at(me, _end("create_container"), confirmed=True)
    assert not MasterWatch().reaped_at(me, _end("create_container"), confirmed=True)


# -- copies of the RPC connection ---------------------------------------------------------------


@pytest.fixture
def rpc_pair():
    """A socket pair whose first end stands for the master's RPC connection (the engine's
    rpc_conn), with the kit's own two copies of it high up (the master's and its creation
    watch's)."""
    conn, server = socket.socketpair()
    base = linux.fd_base()
    kit_copy = linux.dup_high(conn.fileno(), base)
    watch_copy = linux.dup_high(conn.fileno(), base)
    yield conn, kit_copy, base
    for s in (conn, server):
        s.close()
    os.close(kit_copy)
    os.close(watch_copy)


def test_a_copy_moved_high_up_beside_the_kits_two_is_a_copy(rpc_pair):
    # The kit's copies are the master's two lowest from fd_base: one more up there (an
    # F_DUPFD above the kit's) is engine code's, hidden where the kit keeps its own.
    conn, _, base = rpc_pair
    watch, me = _rpc_watch(conn, base)
    high = fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, base + 100)
    try:
        found = watch.rpc_copies_at(me, CREATED, confirmed=True)
        assert found == [{"pid": me, "fd": high, "process": "master"}]
    finally:
        os.close(high)


def _rpc_watch(conn, base, container=None):
    watch, me = MasterWatch(), os.getpid()
    start = {
        "kind": "container_start",
        "role": "starter",
        "rpc_conn": {"inode": os.fstat(conn.fileno()).st_ino, "fd": conn.fileno(), "fd_base": base},
    }
    if container is not None:
        start["container_pid"] = container
    watch.note(me, "starter", start)
    return watch, me


CREATED = {"kind": "hook_return", "role": "master", "hook": "create_container"}


def test_the_engines_rpc_conn_and_the_kits_copies_are_no_copies(rpc_pair):
    conn, _, base = rpc_pair
    watch, me = _rpc_watch(conn, base)
    assert watch.rpc_copies_at(me, CREATED, confirmed=True) == []


def test_a_dup_in_the_master_is_a_copy_and_only_at_create_containers_return(rpc_pair):
    conn, _, base = rpc_pair
    watch, me = _rpc_watch(conn, base)
    dup = os.dup(conn.fileno())
    try:
        found = watch.rpc_copies_at(me, CREATED, confirmed=True)
        assert found == [{"pid": me, "fd": dup, "process": "master"}]
        for event, confirmed in (
            (CREATED, False),  # the master did not wait for the look
            ({**CREATED, "kind": "hook_raise"}, True),  # a failed create: the kit closes it
            ({**CREATED, "hook": "post_start_process"}, True),
            ({**CREATED, "caller": "engine"}, True),
        ):
            assert watch.rpc_copies_at(me, event, confirmed) == [], event
    finally:
        os.close(dup)


def test_a_child_holding_the_connection_is_a_copy_unless_it_is_the_container(rpc_pair):
    conn, _, base = rpc_pair
    stop_r, stop_w = os.pipe()
    child = os.fork()
    if child == 0:  # holds every inherited descriptor until the pipe closes
        os.close(stop_w)
        os.read(stop_r, 1)
        os._exit(0)
    os.close(stop_r)
    try:
        watch, me = _rpc_watch(conn, base)
        # the child's copy at the engine's number; the kit's copy it inherited is not one
        assert watch.rpc_copies_at(me, CREATED, confirmed=True) == [
            {"pid": child, "fd": conn.fileno(), "process": "child"}
        ]
        container, me = _rpc_watch(conn, base, container=child)
        assert container.rpc_copies_at(me, CREATED, confirmed=True) == []
    finally:
        os.close(stop_w)
        os.waitpid(child, 0)


def test_without_the_connection_named_by_the_starter_nothing_is_checked(rpc_pair):
    conn = rpc_pair[0]
    dup = os.dup(conn.fileno())
    try:
        watch, me = MasterWatch(), os.getpid()
        watch.note(me, "rpc", {"kind": "container_start", "role": "starter", "rpc_conn": {}})
        assert watch.rpc_copies_at(me, CREATED, confirmed=True) == []
    finally:
        os.close(dup)


def test_the_sentinel_is_found_in_a_pid_namespace_below_its_parents():
    # fork returns the child's number in the parent's pid namespace; a child in a namespace
    # the parent joined or created below (the starter joins a pid namespace by path before
    # it makes the sentinel) has that number at the parent's depth of its NSpid, not last.
    code = (
        "import os\n"
        "from kit.system import linux\n"
        "linux.unshare(linux.CLONE_NEWPID)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0)\n"
        "while linux.process_alive(pid):\n"
        "    pass\n"
        "print(linux.child_numbered(os.getpid(), pid) == pid, linux.process_ids(pid)[1])\n"
        "os.waitpid(pid, 0)\n"
        "print(linux.child_numbered(os.getpid(), pid))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    found, nspid = proc.stdout.splitlines()[0].split(" ", 1)
    assert found == "True", (proc.stdout, proc.stderr)
    assert nspid.endswith(", 1]")  # pid 1 of its own namespace, found by its parent's number
    assert proc.stdout.splitlines()[1] == "None"  # reaped


def test_an_engines_own_call_of_a_hook_after_the_kits_reap_is_no_foreign_reap():
    # cleanup_container calls post_start_process itself, after the master reaped the
    # sentinel: the hook's end says it was the engine's call, and is not held against it.
    require_flow("root")
    result = run("kit_test_engines:CleanupCallsPostStartEngine", "root", ["/bin/true"], probes=True)
    ends = [
        e
        for e in result.ledger.events
        if e["kind"] == "hook_return" and e.get("hook") == "post_start_process"
    ]
    assert [e.get("caller") for e in ends] == [None, "engine"], result.reason
    assert [e for e in result.ledger.events if e["kind"] == "foreign_reap"] == []


# -- what container_start names, checked against the kernel -------------------------------------


def _start(zombie, conn, base, **changed):
    rpc = {"inode": os.fstat(conn.fileno()).st_ino, "fd": conn.fileno(), "fd_base": base}
    event = {"kind": "container_start", "role": "starter", "sentinel_pid": zombie, "rpc_conn": rpc}
    for key, value in changed.items():
        if key in rpc:
            rpc[key] = value
        else:
            event[key] = value
    return event


def _checked(event):
    watch, me = MasterWatch(), os.getpid()
    watch.note(me, "starter", event)
    return watch.check_start(me, event)


def test_a_container_start_the_kernel_agrees_with_passes(zombie, rpc_pair):
    conn, _, base = rpc_pair
    assert _checked(_start(zombie, conn, base)) is None


def test_a_container_start_naming_what_the_kernel_does_not_show_is_refused(zombie, rpc_pair):
    # Import-time engine code runs in the starter before it sends container_start.
    conn, _, base = rpc_pair
    for changed, why in (
        ({"sentinel_pid": os.getpid()}, "is not a child of the master"),
        ({"fd": 2}, "is not the RPC connection it names"),  # stderr
        ({"inode": 1}, "is not the RPC connection it names"),
        ({"fd_base": 3}, "its fd_base 3 is not the master's"),
        ({"rpc_conn": None}, "does not name the sentinel and the RPC connection"),
        ({"sentinel_pid": None}, "does not name the sentinel and the RPC connection"),
    ):
        problem = _checked(_start(zombie, conn, base, **changed))
        assert problem is not None and why in problem, (changed, problem)


def test_a_join_only_run_is_not_held_to_it(zombie, rpc_pair):
    # Its starter reaps the sentinel and closes the connection without waiting for anyone.
    watch, me = MasterWatch(), os.getpid()
    config = {"kind": "starter_config", "config": {"requests": {"namespace_join_only": True}}}
    watch.note(me, "starter", config)
    event = _start(zombie, rpc_pair[0], rpc_pair[2], sentinel_pid=None)
    watch.note(me, "starter", event)
    assert watch.check_start(me, event) is None


def test_a_helper_orphaned_away_from_the_master_is_still_looked_at(rpc_pair):
    # A double-forked helper goes to a reaper when its parent exits: not below the master
    # any more, it is among the run's processes the supervisor hands over.
    conn, _, base = rpc_pair
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    child = os.fork()
    if child == 0:
        if os.fork() == 0:  # the helper: holds what it inherited until the pipe closes
            os.close(stop_w)
            os.write(ready_w, str(os.getpid()).encode())
            os.read(stop_r, 1)
        os._exit(0)
    os.close(stop_r)
    os.close(ready_w)
    helper = int(os.read(ready_r, 32))
    os.close(ready_r)
    os.waitpid(child, 0)
    try:
        watch, me = _rpc_watch(conn, base)
        assert watch.rpc_copies_at(me, CREATED, confirmed=True) == []  # not below us
        found = watch.rpc_copies_at(me, CREATED, True, orphans=lambda: [me, helper])
        assert found == [{"pid": helper, "fd": conn.fileno(), "process": "orphan"}]
    finally:
        os.close(stop_w)
        while linux.process_alive(helper):
            time.sleep(0.005)


@pytest.mark.parametrize("probes", [True, False])
def test_a_kept_copy_is_found_by_the_supervisor_and_by_the_master_itself(probes):
    # With probes on the master waits for the supervisor, which reads its tree from outside;
    # without, only the master's own look runs. Both name the engine's copy.
    require_flow("root")
    result = run("mutants.zoo:register_create_keeps_rpc_dup", "root", ["/bin/true"], probes=probes)
    kept = {e["role"]: e for e in result.ledger.events if e["kind"] == "rpc_conn_kept"}
    assert set(kept) == ({"master", "supervisor"} if probes else {"master"}), result.reason
    for event in kept.values():
        assert event["shut_down"] and event["holders"], event
        assert "still open when create_container returned" in event["detail"]
    if probes:
        assert kept["supervisor"]["detail"].endswith("; seen from the supervisor)")
