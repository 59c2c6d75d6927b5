"""Lifecycle order and counts: which hook runs where, when, and how often (SPEC §1, §2)."""

from conformance import requirement, scenarios
from conformance.checks import (
    check_hook_roles,
    check_init_flag,
    check_master_pids,
    check_pid_one,
    check_rules,
)
from conformance.expectations import CLEANUP_AFTER_FAILURE, UNFAILING_SCENARIOS, Count
from conformance.scenario import fault_scenario

#: Successful runs every order rule is checked on: all of them (SPEC §2's rules hold in every
#: run; an engine may break one only when, say, the container dies of a signal).
SUCCESSFUL = UNFAILING_SCENARIOS


def _successful(lifecycle):
    """The successful runs: the first one required, the others as the engine's capabilities
    allow."""
    first, *others = SUCCESSFUL
    runs = [lifecycle(first)]
    return runs + [r for r in map(lifecycle.optional, others) if r is not None]


def _rules(lifecycle, verify):
    for run in _successful(lifecycle):
        check_rules(verify, run)


@requirement("ORDER-001")
@scenarios(*SUCCESSFUL)
def test_each_process_calls_config_then_init_config_once_before_any_other_hook(lifecycle, verify):
    _rules(lifecycle, verify)


@requirement("ORDER-002")
@scenarios(*SUCCESSFUL)
def test_init_config_is_told_privileged_stage1_only_in_stage_1_of_the_setuid_flows(
    lifecycle, verify
):
    for run in _successful(lifecycle):
        check_init_flag(verify, run)


@requirement("ORDER-003")
@scenarios(*SUCCESSFUL)
def test_prepare_config_runs_exactly_once_in_stage_1(lifecycle, verify):
    _rules(lifecycle, verify)


@requirement("ORDER-004")
@scenarios(*SUCCESSFUL)
def test_prepare_config_returns_before_any_container_namespace_exists(lifecycle, verify):
    _rules(lifecycle, verify)


@requirement("ORDER-005")
@scenarios(*SUCCESSFUL)
def test_master_hooks_start_only_after_the_namespaces_are_ready(lifecycle, verify):
    _rules(lifecycle, verify)


@requirement("ORDER-006")
@scenarios(*SUCCESSFUL)
def test_create_container_start_waiter_and_monitor_each_run_in_their_own_thread(lifecycle, verify):
    _rules(lifecycle, verify)


@requirement("ORDER-007")
@scenarios(*SUCCESSFUL)
def test_start_process_begins_after_create_container_returned_and_the_rpc_server_exited(
    lifecycle, verify
):
    _rules(lifecycle, verify)


@requirement("ORDER-009")
@scenarios(*UNFAILING_SCENARIOS, *(fault_scenario(p) for p in CLEANUP_AFTER_FAILURE))
def test_post_start_process_runs_at_most_once_and_only_after_the_exec(lifecycle, verify):
    # SPEC §2 rule 6 holds in every master run, failed ones included (a call the engine makes
    # itself counts).
    _rules(lifecycle, verify)
    for path in CLEANUP_AFTER_FAILURE:
        run = lifecycle.optional(fault_scenario(path))
        if run is not None:
            check_rules(verify, run)


@requirement("ORDER-011")
@scenarios(*UNFAILING_SCENARIOS, *(fault_scenario(p) for p in CLEANUP_AFTER_FAILURE))
def test_cleanup_container_runs_once_after_every_other_master_hook(lifecycle, verify):
    # SPEC §2 rule 7: once per master run, whatever the run did; a call the engine makes
    # itself counts (e.g. a monitor that cleans up when the container was killed).
    _rules(lifecycle, verify)
    for path in CLEANUP_AFTER_FAILURE:  # some master hooks never ran: the count only
        run = lifecycle.optional(fault_scenario(path))
        if run is not None:
            check_rules(verify, run, only=(Count,))


@requirement("ORDER-013")
@scenarios(*SUCCESSFUL)
def test_create_container_monitor_container_and_start_process_each_run_once(lifecycle, verify):
    _rules(lifecycle, verify)


@requirement("ORDER-014")
@scenarios(*SUCCESSFUL)
def test_each_hook_runs_only_in_the_process_the_contract_assigns_to_it(lifecycle, verify):
    for run in _successful(lifecycle):
        check_hook_roles(verify, run)


@requirement("PID-001")
@scenarios(*SUCCESSFUL)
def test_master_hooks_get_the_containers_pid_as_the_master_sees_it(lifecycle, verify):
    for run in _successful(lifecycle):
        check_master_pids(verify, run)


@requirement("PID-002")
@scenarios("default")
def test_stage_2_sees_itself_as_pid_1_of_its_new_pid_namespace(lifecycle, verify):
    check_pid_one(verify, lifecycle("default"))
