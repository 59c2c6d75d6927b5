"""Cleanup: nothing is left behind after any run (SPEC §1 cleanup_container, §2)."""

from conformance import requirement, scenarios
from conformance.checks import check_no_leaks
from conformance.scenario import SCENARIOS

#: Every scenario; those the engine or the flow cannot have are skipped.
ALL = tuple(SCENARIOS)


@requirement("CLEAN-001")
@scenarios(*ALL)
def test_nothing_is_left_behind_after_any_run(lifecycle, verify):
    for name in ALL:
        run = lifecycle.optional(name)
        if run is not None:
            check_no_leaks(verify, run)
