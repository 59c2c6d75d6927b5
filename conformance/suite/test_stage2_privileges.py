"""Stage 2 (start_process) and the payload: privileges in each flow (SPEC §4)."""

from conformance import flows, requirement, scenarios
from conformance.checks import (
    OPTIONAL_PAYLOAD_CREDENTIAL_RUNS,
    PAYLOAD_CREDENTIAL_RUNS,
    PRIVILEGE_SCENARIOS,
    check_payload,
    check_payload_fds,
    check_privileges_in_every_run,
    payload_credential_runs,
)
from conformance.expectations import privilege_flows


@requirement("PRIV-STAGE2-001")
@flows(*privilege_flows("PRIV-STAGE2-001"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_stage_2_runs_with_the_target_ids_of_the_flow(lifecycle, verify):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-STAGE2-002")
@flows(*privilege_flows("PRIV-STAGE2-002"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_stage_2_has_exactly_the_configured_capabilities(lifecycle, verify):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-STAGE2-003")
@flows(*privilege_flows("PRIV-STAGE2-003"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_setuid_stage_2_has_no_new_privs_set(lifecycle, verify):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-STAGE2-004")
@flows(*privilege_flows("PRIV-STAGE2-004"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_stage_2_of_the_user_namespace_flows_has_no_host_privilege(lifecycle, verify):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-PAYLOAD-001")
@flows(*privilege_flows("PRIV-PAYLOAD-001"))
@scenarios(*PAYLOAD_CREDENTIAL_RUNS, *OPTIONAL_PAYLOAD_CREDENTIAL_RUNS)
def test_the_payload_has_no_host_privilege_in_every_flow_but_root(lifecycle, verify):
    for run in payload_credential_runs(lifecycle):
        check_payload(verify, run)


@requirement("PRIV-PAYLOAD-002")
@flows(*privilege_flows("PRIV-PAYLOAD-002"))
@scenarios(*PAYLOAD_CREDENTIAL_RUNS, *OPTIONAL_PAYLOAD_CREDENTIAL_RUNS)
def test_the_payload_has_no_capability_stage_2_did_not_have_permitted(lifecycle, verify):
    for run in payload_credential_runs(lifecycle):
        check_payload(verify, run)


@requirement("PRIV-PAYLOAD-003")
@flows(*privilege_flows("PRIV-PAYLOAD-003"))
@scenarios(*PAYLOAD_CREDENTIAL_RUNS, *OPTIONAL_PAYLOAD_CREDENTIAL_RUNS)
def test_the_payload_runs_with_the_credential_exec_derives_from_stage_2(lifecycle, verify):
    for run in payload_credential_runs(lifecycle):
        check_payload(verify, run)


@requirement("FD-001")
@scenarios("fds")
def test_the_payload_inherits_only_the_standard_and_the_kept_file_descriptors(lifecycle, verify):
    check_payload_fds(verify, lifecycle("fds"))
