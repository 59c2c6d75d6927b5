"""State crossing from stage 1: only JSON reaches the later processes (SPEC §1, §2 rule 3)."""

from conformance import requirement, scenarios
from conformance.checks import (
    check_config_calls,
    check_distinct_processes,
    check_fresh_config,
    check_rules,
)


@requirement("STATE-001")
@scenarios("default")
def test_config_returns_the_same_fresh_empty_config_in_every_process(lifecycle, verify):
    check_fresh_config(verify, lifecycle("default"))


@requirement("STATE-001")
@scenarios("default")
def test_config_returns_a_new_object_on_every_call(lifecycle, verify, engine_spec):
    check_config_calls(verify, lifecycle("default"), engine_spec)


@requirement("STATE-002")
@scenarios("default")
def test_stage_1_is_a_separate_process_gone_before_any_later_hook(lifecycle, verify):
    run = lifecycle("default")
    check_distinct_processes(verify, run)
    check_rules(verify, run)


@requirement("STATE-003")
@scenarios("default")
def test_stage_1_hands_over_a_json_starter_config_before_any_namespace_exists(lifecycle, verify):
    check_rules(verify, lifecycle("default"))
