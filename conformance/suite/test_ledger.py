"""The ledger every check reads: valid, complete, with a snapshot at every hook (SPEC §8)."""

from conformance import requirement, scenarios
from conformance.checks import check_hook_pairs, check_ledger_schema, check_no_engine_fault
from conformance.scenario import SCENARIOS

ALL = tuple(SCENARIOS)


@requirement("LEDGER-001")
@scenarios(*ALL)
def test_every_runs_ledger_is_valid_against_the_versioned_schema(lifecycle, verify):
    for name in ALL:
        run = lifecycle.optional(name)
        if run is not None:
            check_ledger_schema(verify, run)


@requirement("LEDGER-002")
@scenarios(*ALL)
def test_every_hook_entry_has_a_snapshot_and_a_return_or_raise(lifecycle, verify):
    for name in ALL:
        run = lifecycle.optional(name)
        if run is not None:
            check_hook_pairs(verify, run)


@requirement("LEDGER-003")
@scenarios(*ALL)
def test_only_the_kits_processes_write_to_the_ledger(lifecycle, verify):
    for name in ALL:
        run = lifecycle.optional(name)
        if run is not None:
            check_no_engine_fault(verify, run)
