"""The master hooks' privileges in each flow (SPEC §4)."""

from conformance import flows, requirement, scenarios
from conformance.checks import PRIVILEGE_SCENARIOS, check_privileges_in_every_run
from conformance.expectations import privilege_flows


@requirement("PRIV-MASTER-001")
@flows(*privilege_flows("PRIV-MASTER-001"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_master_hooks_run_with_the_uids_of_the_flow(lifecycle, verify):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-MASTER-002")
@flows(*privilege_flows("PRIV-MASTER-002"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_setuid_master_hooks_have_no_effective_capabilities_at_entry_and_return(lifecycle, verify):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-MASTER-003")
@flows(*privilege_flows("PRIV-MASTER-003"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_escalation_from_the_master_is_possible_with_saved_uid_0_and_impossible_in_userns(
    lifecycle, verify
):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-MASTER-004")
@flows(*privilege_flows("PRIV-MASTER-004"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_master_of_the_user_namespace_flows_has_no_host_privilege(lifecycle, verify):
    check_privileges_in_every_run(verify, lifecycle)
