"""Error paths: what the run looks like when a hook fails (SPEC §2 error table, §5)."""

from conformance import requirement, scenarios
from conformance.checks import (
    check_cleanup_returned,
    check_error_path,
    check_fatal_exit,
    check_no_cleanup_after_stage1_failure,
    check_no_crash,
    check_no_failure,
    check_no_hang,
    check_no_post_start_after_stage2_failure,
    check_start_process_never_returns,
    error_runs,
)
from conformance.expectations import (
    CLEANUP_AFTER_FAILURE,
    FATAL_PATHS,
    STAGE1_FAILURE_PATHS,
    STAGE2_FAILURE_PATHS,
    UNFAILING_SCENARIOS,
)
from conformance.scenario import fault_scenario


# SPEC §2 error table, rules 5–8, 10; §5 StarterConfig validation. The error paths of kit
# requirements are made by the kit itself (RunRequest.inject, the inject:* scenarios), in every
# engine's run; the engine's own hooks after the injected failure (cleanup_container) still run and
# are checked. Only an engine requirement's own failure (start_process raising) needs the engine's
# cooperation (capability fault_injection); a payload that does not exist makes start_process (or an
# engine that checks it early, prepare_config) fail without any, so those paths are also checked
# when an engine takes them.
def _faults(*paths):
    return tuple(fault_scenario(p) for p in paths)


def _error_path(lifecycle, verify):
    for run, path in error_runs(verify, lifecycle, (verify.requirement,)):
        check_error_path(verify, run, path)


@requirement("ERR-001")
@scenarios(*_faults("ERR-001"), "exec-failure")
def test_prepare_config_raising_stops_the_run_with_exit_255_and_no_further_hook(lifecycle, verify):
    _error_path(lifecycle, verify)


@requirement("ERR-002")
@scenarios(*_faults("ERR-002"))
def test_create_container_raising_cleans_up_with_container_creation_failed_and_exits_255(
    lifecycle, verify
):
    _error_path(lifecycle, verify)


@requirement("ERR-003")
@scenarios(*_faults("ERR-003"), "exec-failure")
def test_start_process_raising_is_a_stage_2_failure_without_post_start_process(lifecycle, verify):
    _error_path(lifecycle, verify)


@requirement("ERR-004")
@scenarios(*_faults("ERR-004"))
def test_post_start_process_raising_cleans_up_with_the_error_and_exits_255(lifecycle, verify):
    _error_path(lifecycle, verify)


@requirement("ERR-005")
@scenarios(*_faults("ERR-005"))
def test_monitor_container_raising_cleans_up_with_the_error_and_exits_255(lifecycle, verify):
    _error_path(lifecycle, verify)


@requirement("ERR-006")
@scenarios(*_faults("ERR-006"))
def test_cleanup_container_raising_is_reported_and_keeps_the_exit_code(lifecycle, verify):
    _error_path(lifecycle, verify)


@requirement("ERR-007")
@scenarios(*_faults("ERR-007"))
def test_a_hook_that_hangs_gets_the_process_tree_killed_and_is_named(lifecycle, verify):
    _error_path(lifecycle, verify)


@requirement("ORDER-008")
@scenarios(*_faults("ORDER-008"))
def test_create_container_waiting_for_the_container_is_reported_as_its_hook_timeout(
    lifecycle, verify
):
    _error_path(lifecycle, verify)


@requirement("ERR-008")
@scenarios(*_faults("ERR-008"))
def test_start_process_returning_instead_of_exec_is_a_stage_2_failure(lifecycle, verify):
    _error_path(lifecycle, verify)


@requirement("SC-001")
@scenarios(*_faults("SC-001"))
def test_an_invalid_starter_config_is_rejected_before_any_namespace_exists(lifecycle, verify):
    _error_path(lifecycle, verify)


@requirement("ORDER-010")
@scenarios(*_faults(*STAGE2_FAILURE_PATHS), "exec-failure")
def test_post_start_process_does_not_run_after_a_stage_2_failure(lifecycle, verify):
    for run, _ in error_runs(verify, lifecycle, STAGE2_FAILURE_PATHS):
        check_no_post_start_after_stage2_failure(verify, run)


@requirement("ORDER-012")
@scenarios(*_faults(*STAGE1_FAILURE_PATHS), "exec-failure")
def test_cleanup_container_does_not_run_when_stage_1_failed(lifecycle, verify):
    for run, _ in error_runs(verify, lifecycle, STAGE1_FAILURE_PATHS):
        check_no_cleanup_after_stage1_failure(verify, run)


@requirement("EXIT-003")
@scenarios(*_faults(*FATAL_PATHS))
def test_a_fatal_error_makes_the_run_exit_255(lifecycle, verify):
    for run, _ in error_runs(verify, lifecycle, FATAL_PATHS):
        check_fatal_exit(verify, run)


@requirement("CLEAN-002")
@scenarios(*_faults(*CLEANUP_AFTER_FAILURE), "exec-failure")
def test_cleanup_container_copes_with_partial_setup_after_a_failure(lifecycle, verify):
    for run, _ in error_runs(verify, lifecycle, CLEANUP_AFTER_FAILURE):
        check_cleanup_returned(verify, run)


def _unfailing(lifecycle, verify, check):
    for name in UNFAILING_SCENARIOS:
        run = lifecycle.optional(name)
        if run is not None:
            check(verify, run)


@requirement("ERR-009")
@scenarios(*UNFAILING_SCENARIOS)
def test_no_hook_hangs_in_a_run_that_nothing_asks_to_fail(lifecycle, verify):
    _unfailing(lifecycle, verify, check_no_hang)


@requirement("ERR-010")
@scenarios(*UNFAILING_SCENARIOS)
def test_no_hook_ends_its_process_in_a_run_that_nothing_asks_to_fail(lifecycle, verify):
    _unfailing(lifecycle, verify, check_no_crash)


@requirement("ERR-011")
@scenarios(*UNFAILING_SCENARIOS)
def test_no_hook_raises_and_the_payload_is_execd_in_a_run_that_nothing_asks_to_fail(
    lifecycle, verify
):
    _unfailing(lifecycle, verify, check_no_failure)


@requirement("ERR-012")
@scenarios("exec-failure")
def test_start_process_raises_or_exits_when_the_payload_cannot_be_execd(lifecycle, verify):
    check_start_process_never_returns(verify, lifecycle("exec-failure"))
