"""Signals (monitor_container) and the run's exit code (SPEC §2 rule 8, §7, §10)."""

from conformance import requirement, scenarios
from conformance.checks import (
    check_exit_code,
    check_monitor_status,
    check_only_the_container_reaped,
    check_sigchld_recorded,
    check_signals_forwarded,
    check_signals_recorded,
)


@requirement("SIG-001")
@scenarios("signals")
def test_every_signal_the_master_receives_is_recorded(lifecycle, verify):
    check_signals_recorded(verify, lifecycle("signals"))


@requirement("SIG-002")
@scenarios("signals")
def test_monitor_container_forwards_hup_int_usr1_usr2_term_to_the_container(lifecycle, verify):
    check_signals_forwarded(verify, lifecycle("signals"))


@requirement("SIG-003")
@scenarios("default", "exit-code", "signal-death")
def test_monitor_container_returns_the_containers_wait_status(lifecycle, verify):
    for name in ("default", "exit-code", "signal-death"):
        check_monitor_status(verify, lifecycle(name))


#: SIG-004: every run whose monitor_container returns a status (SPEC §7 in every run).
REAPING_RUNS = ("default", "exit-code", "signals", "signal-death")


@requirement("SIG-004")
@scenarios(*REAPING_RUNS)
def test_monitor_container_reaps_only_the_container(lifecycle, verify):
    for name in REAPING_RUNS:
        check_only_the_container_reaped(verify, lifecycle(name))


@requirement("SIG-005")
@scenarios("default", "exit-code")
def test_the_containers_exit_reaches_the_master_as_a_recorded_sigchld(lifecycle, verify):
    for name in ("default", "exit-code"):
        check_sigchld_recorded(verify, lifecycle(name))


@requirement("EXIT-001")
@scenarios("default", "exit-code")
def test_the_run_exits_with_the_payloads_exit_code(lifecycle, verify):
    for name in ("default", "exit-code"):
        check_exit_code(verify, lifecycle(name))


@requirement("EXIT-002")
@scenarios("signal-death")
def test_a_payload_killed_by_a_signal_makes_the_run_exit_128_plus_the_signal(lifecycle, verify):
    check_exit_code(verify, lifecycle("signal-death"))
