"""The host: what a run changed on it, from the host diff of its sandbox (SPEC §11)."""

from conformance import requirement, scenarios
from conformance.checks import check_host
from conformance.scenario import SCENARIOS

#: Every scenario; those the engine or the flow cannot have are skipped.
ALL = tuple(SCENARIOS)


def _every_run(lifecycle, verify) -> None:
    for name in ALL:
        run = lifecycle.optional(name)
        if run is not None:
            check_host(verify, run)


@requirement("HOST-001")
@scenarios(*ALL)
def test_no_run_leaves_a_file_of_the_host_created_changed_or_deleted(lifecycle, verify):
    _every_run(lifecycle, verify)


@requirement("HOST-002")
@scenarios(*ALL)
def test_no_run_leaves_the_hosts_mount_table_changed(lifecycle, verify):
    _every_run(lifecycle, verify)


@requirement("HOST-003")
@scenarios(*ALL)
def test_no_run_leaves_the_hosts_hostname_or_domainname_changed(lifecycle, verify):
    _every_run(lifecycle, verify)


@requirement("HOST-004")
@scenarios(*ALL)
def test_no_run_leaves_a_writable_sysctl_changed(lifecycle, verify):
    _every_run(lifecycle, verify)


@requirement("HOST-005")
@scenarios(*ALL)
def test_no_run_leaves_a_network_link_address_or_route_changed(lifecycle, verify):
    _every_run(lifecycle, verify)


@requirement("HOST-006")
@scenarios(*ALL)
def test_no_run_leaves_a_named_network_namespace_added_or_removed(lifecycle, verify):
    _every_run(lifecycle, verify)


@requirement("HOST-007")
@scenarios(*ALL)
def test_no_run_leaves_a_sysv_ipc_object_or_message_queue_changed(lifecycle, verify):
    _every_run(lifecycle, verify)


@requirement("HOST-008")
@scenarios(*ALL)
def test_no_process_of_a_run_outlives_it_and_no_host_process_dies(lifecycle, verify):
    _every_run(lifecycle, verify)


@requirement("HOST-009")
@scenarios(*ALL)
def test_the_hosts_hostname_and_mount_table_never_change_while_a_run_lasts(lifecycle, verify):
    _every_run(lifecycle, verify)
