"""SPEC §7: the master turns signals into channel entries; forwarding; exit codes."""

from __future__ import annotations

import os
import select
import signal
import time

import pytest
from conftest import signal_taken, wait_until

from kit.run.launcher import start

# pid 1 of a pid namespace only gets signals it has a handler for: the payload traps them.
TRAP = (
    "trap 'exit 42' TERM; trap 'exit 43' USR1; trap 'exit 44' HUP; trap 'exit 45' INT; "
    "trap 'exit 46' USR2; touch {ready}; while :; do sleep 0.02; done"
)


def wait_for(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "signum,code",
    [
        (signal.SIGTERM, 42),
        (signal.SIGUSR1, 43),
        (signal.SIGHUP, 44),
        (signal.SIGINT, 45),
        (signal.SIGUSR2, 46),
    ],
)
def test_signal_to_the_run_reaches_the_payload(signum, code, shared_dir):
    ready = os.path.join(shared_dir, "ready")
    handle = start(
        "reference",
        "root",
        ["/bin/sh", "-c", TRAP.format(ready=ready)],
        shared_dirs=[shared_dir],
        engine_config={"mount_tmp": False},
    )
    wait_for(ready)
    handle.send_signal(signum)
    result = handle.wait()
    assert result.exit_code == code
    received = [e["signum"] for e in result.ledger.select("signal")]
    assert signum in received


def test_signals_in_the_setuid_flow_reach_the_payload(shared_dir):
    from conftest import require_flow

    require_flow("suid")
    ready = os.path.join(shared_dir, "ready")
    handle = start(
        "reference",
        "suid",
        ["/bin/sh", "-c", TRAP.format(ready=ready)],
        shared_dirs=[shared_dir],
        engine_config={"mount_tmp": False},
    )
    wait_for(ready)
    handle.send_signal(signal.SIGTERM)
    assert handle.wait().exit_code == 42


def test_killed_payload_exits_128_plus_signal():
    # Without a pid namespace the payload is not an init process and dies of the signal.
    result_handle = start(
        "reference",
        "root",
        ["/bin/sh", "-c", "kill -TERM $$; sleep 5"],
        engine_config={"namespaces": ["mount", "uts", "ipc", "net"], "mount_proc": False},
    )
    result = result_handle.wait()
    assert result.exit_code == 128 + signal.SIGTERM


def test_no_signal_is_dropped(shared_dir):
    ready = os.path.join(shared_dir, "ready")
    handle = start(
        "reference",
        "root",
        ["/bin/sh", "-c", TRAP.format(ready=ready)],
        shared_dirs=[shared_dir],
        engine_config={"mount_tmp": False},
    )
    wait_for(ready)
    # Distinct signals, each sent once the previous one was taken: every one must reach the
    # channel, in order (upstream's two-slot channel would drop some).
    sent = [
        signal.SIGWINCH,
        signal.SIGURG,
        signal.SIGCONT,
        signal.SIGALRM,
        signal.SIGVTALRM,
        signal.SIGPROF,
        signal.SIGTSTP,
    ]
    for signum in sent:
        handle.send_signal(signum)
        wait_until(
            lambda signum=signum: signal_taken(handle.starter_pid, signum),
            what=f"the master to take {signal.Signals(signum).name}",
        )
    handle.send_signal(signal.SIGTERM)
    result = handle.wait()
    assert result.exit_code == 42
    received = [
        e["signum"] for e in result.ledger.select("signal") if e["signum"] != signal.SIGCHLD
    ]
    assert received == [*sent, signal.SIGTERM]


def test_exit_code_of_payload_in_every_flow(flow):
    result = start("reference", flow, ["/bin/sh", "-c", "exit 9"]).wait()
    assert result.exit_code == 9


SLOW_CLEANUP = "kit_test_engines:SlowCleanupEngine"


def test_signals_during_a_long_cleanup_are_each_recorded_while_it_runs(shared_dir):
    # The loop reads signals while cleanup_container runs (on a thread of its own): two
    # SIGUSR1, the second sent once the first was taken, are two entries, each recorded
    # while the cleanup is open (read only after it, they would have merged into one).
    marker, release = os.path.join(shared_dir, "cleanup"), os.path.join(shared_dir, "release")
    handle = start(
        SLOW_CLEANUP,
        "root",
        ["/bin/true"],
        shared_dirs=[shared_dir],
        engine_config={"mount_tmp": False, "marker": marker, "release": release},
    )
    try:
        wait_for(marker)
        for _ in range(2):
            handle.send_signal(signal.SIGUSR1)
            wait_until(
                lambda: signal_taken(handle.starter_pid, signal.SIGUSR1),
                what="the master to take SIGUSR1 while cleanup_container runs",
            )
    finally:
        open(release, "w").close()
    result = handle.wait()
    assert result.exit_code == 0
    events = result.ledger.events
    enter, ret = (
        next(e["seq"] for e in events if e.get("hook") == "cleanup_container" and e["kind"] == k)
        for k in ("hook_enter", "hook_return")
    )
    usr1 = [e["seq"] for e in result.ledger.select("signal") if e["signum"] == signal.SIGUSR1]
    assert len(usr1) == 2
    assert all(enter < seq < ret for seq in usr1)


def test_the_last_round_of_the_loop_runs_even_when_its_work_is_done():
    # The master's final wait for its hook threads may find them all ended at once: the
    # watch they left to close and the SIGCHLD held for the start waiter must still be
    # dealt with before the cleanup, not after it.
    import socket
    import threading
    from types import SimpleNamespace

    from kit.ledger.record import LedgerWriter, decode
    from kit.starter.master import MASTER_SIGNALS, Master, open_signalfd

    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a, b = socket.socketpair()
    starter = SimpleNamespace(
        ledger=LedgerWriter(writer, "starter"),
        system=None,
        req=SimpleNamespace(probes=False, hook_timeout=10.0),
    )
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
    master = Master(starter, {}, None, 4242, a, b)  # type: ignore[arg-type]
    try:
        master.sigfd = open_signalfd(MASTER_SIGNALS)
        watch_r, watch_w = os.pipe()
        master.poller.register(watch_r, select.POLLIN)
        master.poller.register(watch_w, select.POLLERR)
        master._unwatched.append((watch_r, watch_w))
        info = signal.struct_siginfo((signal.SIGCHLD, 0, 0, 4242, 0, 0, 0))
        master.held = (info, time.monotonic() + 60)
        master.exec_checked.set()
        done = threading.Event()
        done.set()
        assert master._serve(done.is_set)
        for fd in (watch_r, watch_w):
            with pytest.raises(OSError):
                os.fstat(fd)
        assert master.container_sigchld.is_set()
        recorded = decode(reader.recv(65536))
        assert recorded["kind"] == "signal" and recorded["sender"] == 4242
    finally:
        for fd in (master.sigfd, master.wake_r, master.wake_w):
            if fd >= 0:
                os.close(fd)
        for s in (reader, writer, a, b):
            s.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def test_the_containers_sigchld_merged_into_another_childs_is_recorded_merged(shared_dir):
    # Standard signals do not queue: the container's exit, while a helper's SIGCHLD waits
    # unread, sends none of its own. The master, which waits for the container's SIGCHLD,
    # records it as merged once none is pending (it once waited a hook timeout for it).
    ready = os.path.join(shared_dir, "ready")
    handle = start(
        "kit_test_engines:MergedSigchldEngine",
        "root",
        ["/bin/sh", "-c", f"trap 'exit 5' USR1; touch {ready}; while :; do sleep 0.01; done"],
        shared_dirs=[shared_dir],
        engine_config={"mount_tmp": False},
    )
    result = handle.wait()
    assert result.exit_code == 5, result.reason
    container = result.ledger.first("container_start")["container_pid"]
    chld = [e for e in result.ledger.select("signal") if e.get("name") == "SIGCHLD"]
    assert [e["sender"] for e in chld if e.get("merged")] == [container], chld
    assert container not in [e["sender"] for e in chld if not e.get("merged")], chld
