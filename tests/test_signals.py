"""SPEC §7: the master turns signals into channel entries; forwarding; exit codes."""

from __future__ import annotations

import os
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
