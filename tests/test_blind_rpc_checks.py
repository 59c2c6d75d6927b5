"""Checks fed the bugs found by engines written blind from SPEC §2's error paths, §6–§8."""

from __future__ import annotations

from test_conformance_units import U, hook, make_run, snapshot

from conformance import checks
from conformance import expectations as X
from conformance.scenario import (
    ALL_SIGNALS_ARRIVED,
    SECOND_ROUND_MASK_BASE,
    SIGNAL_MASK_BASE,
    decode_signal_exit,
)


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


def _signals_run(exit_code, rounds=2):
    sent = [name for _ in range(rounds) for name in X.FORWARDED_SIGNALS]
    # The master records each signal it receives as it puts it on the channel.
    received = [{"kind": "signal", "role": "master", "name": name} for name in sent]
    run = make_run("root", received, exit_code=exit_code, scenario="signals")
    run.notes = {"sent": sent, "payload_pid": 7}
    return run


def test_a_signal_forwarded_once_but_not_twice_breaks_sig_002():
    """SPEC §7 forwards every signal (§10: none lost): the suite sends each one twice."""
    assert decode_signal_exit(SECOND_ROUND_MASK_BASE + 0b01111) == ["SIGTERM (again)"]
    assert decode_signal_exit(SIGNAL_MASK_BASE + 0b10111) == ["SIGUSR2"]
    verify = checks.Verifier("root", ["SIG-002"], "t")
    checks.check_signals_forwarded(verify, _signals_run(SECOND_ROUND_MASK_BASE))
    (violation,) = verify.violations["SIG-002"]
    assert "SIGHUP (again)" in violation.observed and "SIGTERM (again)" in violation.observed


def test_a_first_round_that_did_not_arrive_is_judged_without_the_second():
    """The second round is sent only once the payload marked the first received."""
    verify = checks.Verifier("root", ["SIG-002"], "t")
    checks.check_signals_forwarded(verify, _signals_run(SIGNAL_MASK_BASE + 0b11110, rounds=1))
    (violation,) = verify.violations["SIG-002"]
    assert violation.observed.endswith("did not receive SIGHUP")
    verify = checks.Verifier("root", ["SIG-002"], "t")
    checks.check_signals_forwarded(verify, _signals_run(ALL_SIGNALS_ARRIVED))
    assert verify.violations["SIG-002"] == []


def test_a_second_round_the_suite_could_not_send_is_not_the_engines_failure():
    """The payload marks its first round in by ignoring SIGURG; started with it ignored, or
    marking it too late, the second round is not sent (the scenario says why in its notes):
    the first round alone decides. With the second round sent, a missing one still fails."""
    run = _signals_run(SECOND_ROUND_MASK_BASE, rounds=1)
    run.notes["second_round"] = "not sent: the payload started with SIGURG ignored"
    verify = checks.Verifier("root", ["SIG-002"], "t")
    checks.check_signals_forwarded(verify, run)
    # two checks: the payload's signals, and that none bypassed the channel
    assert verify.violations["SIG-002"] == [] and verify.checks["SIG-002"] == 2
    # not sent, and the first round incomplete: still the engine's failure
    run = _signals_run(SIGNAL_MASK_BASE + 0b11110, rounds=1)
    run.notes["second_round"] = "not sent: the payload did not mark its first round in time"
    verify = checks.Verifier("root", ["SIG-002"], "t")
    checks.check_signals_forwarded(verify, run)
    (violation,) = verify.violations["SIG-002"]
    assert violation.observed.endswith("did not receive SIGHUP")
    # sent (no note), yet not received again: the engine's
    verify = checks.Verifier("root", ["SIG-002"], "t")
    checks.check_signals_forwarded(verify, _signals_run(SECOND_ROUND_MASK_BASE, rounds=2))
    assert len(verify.violations["SIG-002"]) == 1


class _Lifecycle:
    """The suite's ``lifecycle`` fixture over made-up runs (a missing one: not supported)."""

    def __init__(self, runs):
        self.runs = runs

    def __call__(self, name):
        return self.runs[name]

    def optional(self, name):
        return self.runs.get(name)


def test_an_rpc_method_that_keeps_capabilities_only_without_a_payload_breaks_priv_rpc_004():
    """SPEC §4 "at every RPC method entry and return": the exec-failure run counts too."""
    from test_conformance_power import _creds, _rpc_call

    from conformance.suite import test_rpc_server as rpc_suite

    server = snapshot(uid=(U, U, 0, U), eff=("CAP_SYS_ADMIN",), prm=("CAP_SYS_ADMIN", "CAP_CHOWN"))
    raised = snapshot(
        uid=(U, U, 0, U), eff=("CAP_SYS_ADMIN", "CAP_CHOWN"), prm=("CAP_SYS_ADMIN", "CAP_CHOWN")
    )

    def run(scenario, after):
        call = _rpc_call(_creds(server), _creds(after), method="reference.payload_exists")
        return make_run("suid", [call], scenario=scenario)

    runs = {"default": run("default", server), "exec-failure": run("exec-failure", raised)}
    verify = checks.Verifier("suid", ["PRIV-RPC-004"], "t")
    rpc_suite.test_an_rpc_method_restores_the_capabilities_it_raised_before_it_returns(
        _Lifecycle(runs), verify
    )
    (violation,) = verify.violations["PRIV-RPC-004"]
    assert violation.run.scenario.name == "exec-failure"
    assert "caps.effective" in violation.observed
