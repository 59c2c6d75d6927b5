"""Stage 1 (config, init_config, prepare_config): its privileges in each flow (SPEC §4)."""

from conformance import flows, requirement, scenarios
from conformance.checks import PRIVILEGE_SCENARIOS, check_privileges_in_every_run
from conformance.expectations import privilege_flows


@requirement("PRIV-STAGE1-001")
@flows(*privilege_flows("PRIV-STAGE1-001"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_stage_1_runs_as_root_in_the_root_flow_and_as_the_invoking_user_elsewhere(
    lifecycle, verify
):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-STAGE1-002")
@flows(*privilege_flows("PRIV-STAGE1-002"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_stage_1_has_full_capabilities_as_root_and_none_through_the_setuid_starter(
    lifecycle, verify
):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-STAGE1-003")
@flows(*privilege_flows("PRIV-STAGE1-003"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_escalation_from_stage_1_of_the_setuid_starter_is_impossible(lifecycle, verify):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-STAGE1-004")
@flows(*privilege_flows("PRIV-STAGE1-004"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_stage_1_of_the_user_namespace_flows_has_no_host_privilege(lifecycle, verify):
    check_privileges_in_every_run(verify, lifecycle)
