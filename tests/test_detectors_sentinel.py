"""The supervisor's watch of the master's sentinel child (kit/run/sentinel.py), fed real
children of this process: reaped, it is reported; a zombie, it is not."""

from __future__ import annotations

import os
import time

import pytest

from kit.run.sentinel import SentinelWatch
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
    watch = SentinelWatch()
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
    watch, me = SentinelWatch(), os.getpid()
    forged = {"kind": "container_start", "role": "starter", "sentinel_pid": 1}
    watch.note(me, "container", forged)  # not from the starter process
    assert watch.number is None
    watch.note(me, "starter", {**forged, "sentinel_pid": zombie})
    watch.note(me, "starter", forged)  # a second one: ignored
    assert (watch.master, watch.number) == (me, zombie)
    os.waitpid(zombie, 0)
    assert watch.reaped_at(me, _end("create_container"), confirmed=True)
    assert not SentinelWatch().reaped_at(me, _end("create_container"), confirmed=True)
