"""The RPC server and the RPC calls of create_container (SPEC §2, §4, §6)."""

from conformance import flows, requirement, scenarios
from conformance.checks import (
    PRIVILEGE_SCENARIOS,
    check_privileges_in_every_run,
    check_rpc_calls_during_create,
    check_rpc_method_names,
    check_rpc_methods_restore_credentials,
    check_rpc_probes,
    check_rpc_sequential,
    check_rpc_server_exit,
    privilege_runs,
)
from conformance.expectations import privilege_flows


@requirement("PRIV-RPC-001")
@flows(*privilege_flows("PRIV-RPC-001"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_rpc_server_runs_with_the_uids_of_the_flow(lifecycle, verify):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-RPC-002")
@flows(*privilege_flows("PRIV-RPC-002"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_setuid_rpc_server_has_only_cap_sys_admin_effective_and_a_small_bounding_set(
    lifecycle, verify
):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-RPC-003")
@flows(*privilege_flows("PRIV-RPC-003"))
@scenarios(*PRIVILEGE_SCENARIOS)
def test_rpc_server_of_the_user_namespace_flows_has_no_host_privilege(lifecycle, verify):
    check_privileges_in_every_run(verify, lifecycle)


@requirement("PRIV-RPC-004")
@scenarios(*PRIVILEGE_SCENARIOS)
def test_an_rpc_method_restores_the_capabilities_it_raised_before_it_returns(lifecycle, verify):
    # SPEC §4: at every RPC method return of every run (a method may fail, and restore
    # nothing, only when the payload is missing).
    for run in privilege_runs(lifecycle):
        check_rpc_methods_restore_credentials(verify, run)


@requirement("RPC-001")
@scenarios("default")
def test_every_rpc_call_is_served_and_recorded_while_create_container_runs(lifecycle, verify):
    check_rpc_calls_during_create(verify, lifecycle("default"))


@requirement("RPC-002")
@scenarios("default")
def test_rpc_requests_name_a_method_of_the_engine_under_test(lifecycle, verify, engine_name):
    check_rpc_method_names(verify, lifecycle("default"), engine_name)


@requirement("RPC-003")
@scenarios("default")
def test_rpc_server_exits_0_when_the_client_closes(lifecycle, verify):
    check_rpc_server_exit(verify, lifecycle("default"))


@requirement("RPC-004")
@scenarios("default")
def test_rpc_server_handles_one_request_at_a_time(lifecycle, verify):
    check_rpc_sequential(verify, lifecycle("default"))


@requirement("RPC-005", "RPC-006")
@scenarios("rpc-probe")
def test_rpc_server_answers_bad_frames_with_errors_and_keeps_serving(lifecycle, verify):
    """The kit sends, from create_container's side of the connection, an unknown method, an
    unknown argument, malformed JSON and a pickle, then the engine makes its own calls, then
    the kit sends a header announcing an oversized frame."""
    check_rpc_probes(verify, lifecycle("rpc-probe"))
