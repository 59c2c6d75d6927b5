"""Checks fed the bugs found by engines written blind, round 2, from SPEC §1, §2, §6-§8."""

from __future__ import annotations

import signal

from test_conformance_units import hook, make_run, snapshot

from conformance import checks


def _monitor_returned(status: int, scenario: str):  # type: ignore[no-untyped-def]
    snap = snapshot(uid=(0, 0, 0, 0))
    events = [
        hook("hook_enter", "master", "monitor_container", snap, tid=12),
        hook("hook_return", "master", "monitor_container", snap, tid=12, result=status),
    ]
    return make_run("root", events, exit_code=128 + signal.SIGSEGV, scenario=scenario)


def _sig_003(status: int, scenario: str) -> list[checks.Violation]:
    verify = checks.Verifier("root", ["SIG-003"], "t")
    checks.check_monitor_status(verify, _monitor_returned(status, scenario))
    assert verify.checks["SIG-003"] == 1
    return verify.violations["SIG-003"]


def test_a_signal_death_returned_as_exit_128_plus_n_breaks_sig_003() -> None:
    """SPEC §7: monitor_container "returns its wait status"; "the run exits with the
    container's code, or re-raises its signal". Exit 139 maps to the same exit code as a
    death by SIGSEGV, but it is not the container's wait status."""
    (violation,) = _sig_003((128 + signal.SIGSEGV) << 8, "signal-death")
    assert "exited 139" in violation.observed and "killed by signal 11" in violation.expected
    assert _sig_003(signal.SIGSEGV, "signal-death") == []
    assert _sig_003(signal.SIGSEGV | 0x80, "signal-death") == []  # with a core dump


def test_an_exit_returned_as_a_signal_death_breaks_sig_003() -> None:
    """The other way round: exit 7 returned as the wait status of a death by signal 7."""
    (violation,) = _sig_003(7, "exit-code")
    assert "killed by signal 7" in violation.observed
    assert _sig_003(7 << 8, "exit-code") == []


def _create_run(*between):  # type: ignore[no-untyped-def]
    snap = snapshot(uid=(0, 0, 0, 0))
    return make_run(
        "root",
        [
            hook("hook_enter", "master", "create_container", snap, tid=13),
            {"kind": "rpc_call", "role": "rpc", "method": "e.mount"},
            hook("hook_return", "master", "create_container", snap, tid=13, result=None),
            *between,
        ],
    )


def _rpc_001(run) -> list[checks.Violation]:  # type: ignore[no-untyped-def]
    verify = checks.Verifier("root", ["RPC-001"], "t")
    checks.check_rpc_calls_during_create(verify, run)
    return verify.violations["RPC-001"]


def test_a_copy_of_the_rpc_connection_kept_after_create_container_breaks_rpc_001() -> None:
    """SPEC §2 rule 5: "start_process begins only after create_container returned and the
    RPC connection closed". A copy kept open (socket.fromfd, a dup, a forked helper) holds
    the RPC server and the container back, whether or not a call is made on it."""
    kept = {
        "kind": "rpc_conn_kept",
        "role": "master",
        "holders": [{"pid": 2, "fd": 4, "process": "the master"}],
        "shut_down": True,
        "detail": "fd 4 of the master still open when create_container returned",
    }
    (violation,) = _rpc_001(_create_run(kept))
    assert "fd 4 of the master" in violation.observed and violation.hook == "create_container"
    assert _rpc_001(_create_run()) == []


def test_an_engine_calling_its_own_hook_elsewhere_does_not_take_the_kits_fault(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    """The kit injects a fault around its own call of a hook: start_process calling
    post_start_process in stage 2 (ORDER-014, the engine's bug) must not fire the master's
    post_start_process fault there, where the suite then blamed the kit (ERR-004)."""
    from kit.starter import inject

    monkeypatch.setattr(inject, "_armed", "post_start_process")
    made: list[str] = []
    ledger = type("L", (), {"emit": lambda self, kind, **_: made.append(kind)})()
    kit_calls = [False]
    hook = inject.wrap("post_start_process", lambda: "ran", ledger, lambda: kit_calls[0])
    assert hook() == "ran" and made == []  # the engine's own call
    kit_calls[0] = True
    try:
        hook()
    except inject.InjectedFault:
        pass
    else:
        raise AssertionError("the kit's call did not get the fault")
    assert made == ["kit_injected"]


def test_a_signal_the_container_got_but_the_master_never_recorded_breaks_sig_002() -> None:
    """SPEC §7: "The master turns every signal it receives into an entry on the signals
    channel"; monitor_container forwards from it. A monitor that takes the signals itself
    (sigtimedwait) forwards them all, but none passes the channel or the ledger: the engine's
    failure (SIG-002), not the kit's (SIG-001)."""
    from conformance import expectations as X
    from conformance.scenario import ALL_SIGNALS_ARRIVED

    sent = [name for _ in range(2) for name in X.FORWARDED_SIGNALS]
    run = make_run("root", [], exit_code=ALL_SIGNALS_ARRIVED, scenario="signals")
    run.notes = {"sent": sent, "payload_pid": 7}
    verify = checks.Verifier("root", ["SIG-002"], "t")
    checks.check_signals_forwarded(verify, run)
    (violation,) = verify.violations["SIG-002"]
    assert "SIGHUP, SIGINT, SIGUSR1, SIGUSR2, SIGTERM reached the container" in (violation.observed)
    kit = checks.Verifier("root", ["SIG-001"], "t")
    checks.check_signals_recorded(kit, run)
    assert kit.violations["SIG-001"] == [] and kit.checks["SIG-001"] == len(sent)
