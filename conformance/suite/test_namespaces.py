"""Namespaces: shared, not shared, created, mapped (SPEC §3, §4, §5)."""

from conformance import flows, requirement, scenarios
from conformance.checks import (
    check_host_view,
    check_master_not_shared,
    check_master_user_ns,
    check_mount_propagation,
    check_namespace_order,
    check_new_user_ns,
    check_payload_namespaces,
    check_requested_namespaces,
    check_rpc_shares_namespaces,
    check_shared_root,
    check_user_ns_host_ids,
    check_user_ns_map,
    reached,
)
from conformance.expectations import MAPPABLE_HOST_IDS, UNFAILING_SCENARIOS, USER_NS_MAP

#: The runs that nothing asks to fail, and the one whose payload is missing: a thread may
#: change its namespace on a rarer path only (a signal forwarded, a payload not found).
_EVERY_CONTAINER_RUN = (*UNFAILING_SCENARIOS, "exec-failure")


def _every_container_run(lifecycle, verify, check, roles):
    """``check`` on the default run, and on each other one where ``roles`` all ran (a run
    that ended early is ERR-009's, ERR-010's or ERR-011's to judge, not a namespace's)."""
    for name in _EVERY_CONTAINER_RUN:
        run = lifecycle.optional(name)
        if run is not None and (name == "default" or reached(run, *roles)):
            check(verify, run)


@requirement("NS-001")
@scenarios(*_EVERY_CONTAINER_RUN)
def test_stage_2_and_the_rpc_server_share_all_seven_namespaces(lifecycle, verify):
    _every_container_run(lifecycle, verify, check_rpc_shares_namespaces, ("stage2", "rpc"))


@requirement("NS-002")
@scenarios("default")
def test_stage_2_starts_in_the_root_directory_the_rpc_server_left(lifecycle, verify):
    check_shared_root(verify, lifecycle("default"))


@requirement("NS-003")
@scenarios(*_EVERY_CONTAINER_RUN)
def test_the_master_shares_none_of_the_containers_pid_net_uts_ipc_cgroup_namespaces(
    lifecycle, verify
):
    _every_container_run(lifecycle, verify, check_master_not_shared, ("stage2", "master"))


@requirement("NS-004")
@scenarios("default")
def test_the_masters_user_namespace_is_the_hosts_or_the_containers_as_the_flow_says(
    lifecycle, verify
):
    check_master_user_ns(verify, lifecycle("default"))


@requirement("NS-005")
@scenarios("default")
def test_every_namespace_the_starter_config_asks_for_is_new_for_the_container(lifecycle, verify):
    check_requested_namespaces(verify, lifecycle("default"))


@requirement("NS-006")
@flows(*USER_NS_MAP)
@scenarios("default")
def test_the_containers_user_namespace_maps_the_invoking_user_as_the_flow_says(lifecycle, verify):
    check_user_ns_map(verify, lifecycle("default"))


@requirement("NS-007")
@scenarios("default")
def test_the_container_gets_a_new_user_namespace_exactly_in_the_user_namespace_flows(
    lifecycle, verify
):
    check_new_user_ns(verify, lifecycle("default"))


@requirement("NS-008")
@scenarios("default")
def test_a_new_mount_namespace_gets_the_configured_propagation_before_any_mount(lifecycle, verify):
    check_mount_propagation(verify, lifecycle("default"))


@requirement("NS-009")
@scenarios("default")
def test_namespaces_are_entered_user_pid_then_net_uts_ipc_cgroup_mount(lifecycle, verify):
    check_namespace_order(verify, lifecycle("default"))


@requirement("NS-010")
@scenarios("host-view")
def test_the_hosts_hostname_is_the_same_while_the_run_lasts_and_after(lifecycle, verify):
    check_host_view(verify, lifecycle("host-view"), "hostname")


@requirement("NS-011")
@scenarios("host-view")
def test_the_hosts_mount_namespace_gets_no_mount_while_the_run_lasts(lifecycle, verify):
    check_host_view(verify, lifecycle("host-view"), "mounts")


@requirement("NS-012")
@flows(*MAPPABLE_HOST_IDS)
@scenarios("default")
def test_the_containers_user_namespace_maps_no_host_id_but_the_invoking_users(lifecycle, verify):
    check_user_ns_host_ids(verify, lifecycle("default"))


@requirement("NS-013")
@scenarios("fds")
def test_the_payload_runs_in_the_namespaces_stage_2_entered_start_process_with(lifecycle, verify):
    check_payload_namespaces(verify, lifecycle("fds"))
