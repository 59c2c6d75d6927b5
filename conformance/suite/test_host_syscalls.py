"""The host (SPEC §9, §11): system calls that the kit's seccomp filter refuses, in any run."""

from conformance import requirement, scenarios
from conformance.checks import check_refused_calls
from conformance.scenario import SCENARIOS

#: Every scenario; those the engine or the flow cannot have are skipped.
ALL = tuple(SCENARIOS)


@requirement("HOST-050")
@scenarios(*ALL)
def test_no_privileged_call_bypasses_the_system_interface(lifecycle, verify):
    for name in ALL:
        run = lifecycle.optional(name)
        if run is not None:
            check_refused_calls(verify, run, "system-interface")


@requirement("HOST-051")
@scenarios(*ALL)
def test_no_host_global_system_call(lifecycle, verify):
    for name in ALL:
        run = lifecycle.optional(name)
        if run is not None:
            check_refused_calls(verify, run, "host-global")
