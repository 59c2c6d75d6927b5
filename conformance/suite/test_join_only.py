"""Join-only runs: only join namespaces and start the process (SPEC §5)."""

from conformance import flows, requirement, requires, scenarios
from conformance.checks import check_join_only_hooks, check_requested_namespaces


# Needs the engine's cooperation (capability join_only) and the privilege to join namespaces, which
# only the root and setuid flows have.
@requirement("JOIN-001")
@requires("join_only")
@flows("root", "suid")
@scenarios("join")
def test_a_join_only_run_calls_only_config_init_config_prepare_config_and_start_process(
    lifecycle, verify
):
    check_join_only_hooks(verify, lifecycle("join"))


@requirement("JOIN-002")
@requires("join_only")
@flows("root", "suid")
@scenarios("join")
def test_a_join_only_run_puts_stage_2_in_the_namespaces_given_by_path(lifecycle, verify):
    check_requested_namespaces(verify, lifecycle("join"))
