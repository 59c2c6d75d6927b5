"""Checks fed the bugs found by engines written blind from SPEC §2's error paths, §6–§8."""

from __future__ import annotations

from test_conformance_units import hook, make_run, snapshot

from conformance import checks


def _monitor_run(*after_return):
    snap = snapshot(uid=(0, 0, 0, 0))
    events = [
        hook("hook_enter", "master", "monitor_container", snap, tid=12),
        hook("hook_return", "master", "monitor_container", snap, tid=12, result=0),
        *after_return,
    ]
    return make_run("root", events)


def test_a_container_the_monitor_left_unreaped_breaks_sig_004():
    """SPEC §7 "reaps only the container pid, and returns its wait status": the master reaps
    what the monitor left and records it after monitor_container returned."""
    left = {"kind": "process_exit", "role": "master", "child_role": "container", "child_pid": 7}
    verify = checks.Verifier("root", ["SIG-004"], "t")
    checks.check_only_the_container_reaped(verify, _monitor_run(dict(left, status=0)))
    (violation,) = verify.violations["SIG-004"]
    assert "left unreaped" in violation.observed and violation.hook == "monitor_container"
    verify = checks.Verifier("root", ["SIG-004"], "t")
    checks.check_only_the_container_reaped(verify, _monitor_run())
    assert verify.violations["SIG-004"] == [] and verify.checks["SIG-004"] == 2
