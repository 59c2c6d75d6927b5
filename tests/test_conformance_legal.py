"""Legal engine behaviours that SPEC.md allows pass their checks; their illegal neighbours
still fail (the false failures found by the blind correct engines, tests/blind_correct.py)."""

from __future__ import annotations

from test_conformance_units import hook, make_run, snapshot

from conformance import checks
from conformance import expectations as X


def _setup_events(extra_stage1=()):
    """Every role's config and init_config as the kit calls them, plus ``extra_stage1``
    events after stage 1's init_config."""
    events = []
    for role in X.ROLES:
        for name in ("config", "init_config"):
            events.append(hook("hook_enter", role, name, snapshot()))
            events.append(hook("hook_return", role, name, snapshot()))
        if role == "stage1":
            events.extend(extra_stage1)
    return events


def _order_001(events):
    verify = checks.Verifier("root", ["ORDER-001"], "t")
    checks.check_rules(verify, make_run("root", events))
    return verify.violations.get("ORDER-001", [])


def test_an_engine_calling_its_own_config_factory_keeps_order_001():
    # SPEC §1: config returns a fresh, empty config object; an engine may call it itself for
    # the defaults (recorded with caller "engine"): rule 1 counts the starter's calls.
    own = [
        hook("hook_enter", "stage1", "config", snapshot(), caller="engine"),
        hook("hook_return", "stage1", "config", snapshot()),
    ]
    assert _order_001(_setup_events(own)) == []


def test_the_starter_calling_config_twice_still_breaks_order_001():
    again = [
        hook("hook_enter", "stage1", "config", snapshot()),
        hook("hook_return", "stage1", "config", snapshot()),
    ]
    (violation,) = _order_001(_setup_events(again))
    assert "called by the kit" in violation.expected and "2 recorded" in violation.observed
