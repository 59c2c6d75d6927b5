"""``--kit-self-check``: the kit-injected runs in one flow of a session (the default), in every
flow, or in none; the kit requirements the other flows did not check say where they were."""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest
from suite_session import suite

from conformance import gate, plugin, render
from conformance.expectations import FLOWS
from conformance.outcomes import FAILED, NOT_CONFIGURED, PASSED
from conformance.runs import (
    SELF_CHECK_MODES,
    SELF_CHECK_ORDER,
    HarnessError,
    RunCache,
    SelfCheckPlan,
    self_check_flow,
)
from conformance.scenario import SCENARIOS
from mutants import matrix

INJECTED = sorted(n for n, s in SCENARIOS.items() if s.kit_self_check)
CREATE_FAILURE_IGNORED = "mutants.zoo.starter:register_starter_create_failure_ignored"

real = pytest.mark.skipif(os.geteuid() != 0, reason="real lifecycles in several flows")


# --- the plan ------------------------------------------------------------------------------------


def test_the_kit_injected_scenarios_are_those_the_kit_makes_fail():
    assert INJECTED and all(SCENARIOS[n].inject for n in INJECTED)
    assert "rpc-probe" in INJECTED and "default" not in INJECTED
    assert not any(SCENARIOS[n].kit_self_check for n in ("exec-failure", "fault:start_process"))


def test_one_flow_is_the_first_candidate_in_the_stated_order():
    assert SELF_CHECK_ORDER == FLOWS == ("root", "suid", "userns", "fakeroot", "hybrid")
    assert self_check_flow(["hybrid", "userns", "suid"]) == "suid"
    assert self_check_flow(["fakeroot", "hybrid"]) == "fakeroot"
    assert self_check_flow([]) is None


@pytest.mark.parametrize(
    "plan, runs_in, reason",
    [
        (SelfCheckPlan("all"), set(FLOWS), None),
        (
            SelfCheckPlan("one", "userns"),
            {"userns"},
            "checked in flow userns (--kit-self-check=all for every flow)",
        ),
        (SelfCheckPlan("off"), set(), "the kit's self-check was not run (--kit-self-check=off)"),
    ],
)
def test_a_plan_names_its_flows_and_what_the_others_say(plan, runs_in, reason):
    assert {f for f in FLOWS if plan.runs_in(f)} == runs_in
    injected, plain = SCENARIOS["inject:create_container"], SCENARIOS["default"]
    for flow in FLOWS:
        assert plan.excludes(flow, injected) == (flow not in runs_in)
        assert not plan.excludes(flow, plain)  # the engine's runs are made in every flow
    if reason is not None:
        assert plan.reason() == reason


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="--kit-self-check=some: unknown mode"):
        SelfCheckPlan("some")
    # the plugin's option (defined before conformance.runs is imported) knows the same modes
    assert plugin.SELF_CHECK_MODES == SELF_CHECK_MODES


def test_the_run_cache_refuses_a_run_its_plan_leaves_out():
    cache = RunCache("reference", "real", None, plan=SelfCheckPlan("one", "root"))
    try:
        with pytest.raises(HarnessError, match="suid/inject:create_container is not made"):
            cache.submit("suid", "inject:create_container")
        assert cache.finished() == []  # no lifecycle was started for it
    finally:
        cache.close()


# --- the self-check line -------------------------------------------------------------------------


def _doc(outcomes: dict[tuple[str, str], str], mode: str, flow: str | None) -> dict:
    flows = sorted({f for _, f in outcomes}, key=FLOWS.index)
    results = [
        {"requirement": req, "subject": "kit", "flow": f, "outcome": o, "message": ""}
        for (req, f), o in outcomes.items()
    ]
    return {
        "results": results,
        "environment": {
            "flows": {f: {"selected": True} for f in flows},
            "kit_self_check": {"mode": mode, "flow": flow},
        },
    }


def test_the_self_check_line_names_the_flow_that_ran_it():
    check = render.self_check(
        _doc({("ERR-002", "root"): PASSED, ("ERR-002", "suid"): NOT_CONFIGURED}, "one", "root")
    )
    assert check is not None and check.ok
    assert check.line() == (
        "harness self-check on this machine: 1/1 kit requirements hold (kit-injected runs in "
        "flow root; --kit-self-check=all for every flow)"
    )


def test_a_kit_failure_in_the_self_check_flow_still_breaks_the_harness():
    doc = _doc({("ERR-002", "root"): FAILED, ("ERR-002", "suid"): NOT_CONFIGURED}, "one", "root")
    check = render.self_check(doc)
    assert check is not None and not check.ok and check.failing == {"ERR-002": ["root"]}


def test_the_self_check_line_says_when_it_was_not_run():
    check = render.self_check(
        _doc(
            {("ERR-002", "root"): NOT_CONFIGURED, ("ERR-002", "suid"): NOT_CONFIGURED}, "off", None
        )
    )
    assert check is not None and check.ok
    assert check.line() == "harness self-check on this machine: not run (--kit-self-check=off)"


# --- the gate and the kill matrix ----------------------------------------------------------------


@pytest.mark.parametrize("extra, mode", [([], "one"), (["--kit-self-check", "all"], "all")])
def test_the_gate_passes_the_option_through(tmp_path, extra, mode):
    cmd = gate.pytest_command(gate.parse(["--engine", "reference", *extra]), tmp_path)
    assert [a for a in cmd if a.startswith("--kit-self-check")] == [f"--kit-self-check={mode}"]


def test_the_kill_matrix_checks_the_kit_in_every_flow(tmp_path):
    target = matrix.Target("mutant-x", "mutants.zoo:register_x", ("ERR-002",), ("root", "suid"))
    cmd = matrix.session_command(target, "real", str(tmp_path / "r.json"), focus=True)
    assert "--kit-self-check=all" in cmd


# --- sessions (real lifecycles) ------------------------------------------------------------------


def _results(doc: dict) -> dict[tuple[str, str], dict]:
    return {(e["requirement"], e["flow"]): e for e in doc["results"]}


def _scenarios_by_flow(doc: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for run in doc["runs"]:
        out.setdefault(run["flow"], set()).add(run["scenario"])
    return out


@real
def test_one_flow_runs_the_kit_injected_scenarios_and_engine_results_do_not_change(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "all").mkdir()
    args = ("--flow=root,userns", "-p", "no:randomly")
    proc, one = suite("reference", tmp_path / "one", *args)
    assert proc.returncode == 0, proc.stdout[-3000:]
    _, every = suite("reference", tmp_path / "all", *args, "--kit-self-check=all")
    assert one["environment"]["kit_self_check"] == {"mode": "one", "flow": "root"}
    assert every["environment"]["kit_self_check"] == {"mode": "all", "flow": None}

    ran = _scenarios_by_flow(one)
    assert set(INJECTED) <= ran["root"]
    assert not ran["userns"] & set(INJECTED)
    assert set(INJECTED) <= _scenarios_by_flow(every)["userns"]

    # the engine's results: the same outcomes and messages (they read fewer runs in userns)
    def engine(doc: dict) -> dict:
        return {
            k: (e["outcome"], e["message"])
            for k, e in _results(doc).items()
            if e["subject"] == "engine"
        }

    assert engine(one) == engine(every)
    assert render.verdict(one).code == render.verdict(every).code == 0
    # the kit's in userns: passed where a run of the engine's decided them, else not-configured
    # with the flow that checked them, never failed
    kit_userns = [e for e in one["results"] if e["subject"] == "kit" and e["flow"] == "userns"]
    outcomes = Counter(e["outcome"] for e in kit_userns)
    assert set(outcomes) == {PASSED, NOT_CONFIGURED}, outcomes
    why = "checked in flow root (--kit-self-check=all for every flow)"
    assert {e["message"] for e in kit_userns if e["outcome"] == NOT_CONFIGURED} == {why}
    assert _results(one)[("ERR-002", "userns")]["outcome"] == NOT_CONFIGURED
    assert _results(one)[("ERR-002", "root")]["outcome"] == PASSED
    assert _results(every)[("ERR-002", "userns")]["outcome"] == PASSED
    screen = " ".join(proc.stdout.split())
    assert re.search(
        r"harness self-check on this machine: (\d+)/\1 kit requirements hold \(kit-injected "
        r"runs in flow root; --kit-self-check=all for every flow\)",
        screen,
    ), screen[-2000:]


@real
def test_off_runs_no_kit_injected_scenario_and_says_so(tmp_path):
    proc, doc = suite(
        "reference", tmp_path, "--flow=root", "--kit-self-check=off", "-k", "ERR-002 or EXIT-001"
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert not {r["scenario"] for r in doc["runs"]} & set(INJECTED)
    results = _results(doc)
    assert results[("EXIT-001", "root")]["outcome"] == PASSED
    assert results[("ERR-002", "root")]["outcome"] == NOT_CONFIGURED
    assert "harness self-check on this machine: not run (--kit-self-check=off)" in " ".join(
        proc.stdout.split()
    )


@real
def test_the_flow_is_chosen_among_the_tests_left_after_deselection(tmp_path):
    # -k leaves ERR-002 in userns only: userns is the flow that checks the kit
    proc, doc = suite("reference", tmp_path, "--flow=root,userns", "-k", "ERR-002 and userns")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert doc["environment"]["kit_self_check"] == {"mode": "one", "flow": "userns"}
    assert _results(doc)[("ERR-002", "userns")]["outcome"] == PASSED
    assert [r["id"] for r in doc["runs"]] == ["userns/inject:create_container"]


@real
def test_xdist_workers_tell_the_controller_which_flow_checked_the_kit(tmp_path):
    proc, doc = suite(
        "reference", tmp_path, "--flow=root,userns", "-k", "ERR-002", "-p", "xdist", "-n", "2"
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert doc["environment"]["xdist_workers"] == 2
    assert doc["environment"]["kit_self_check"] == {"mode": "one", "flow": "root"}
    assert [r["id"] for r in doc["runs"]] == ["root/inject:create_container"]
    assert _results(doc)[("ERR-002", "userns")]["outcome"] == NOT_CONFIGURED


@real
@pytest.mark.parametrize("mode, failed_in", [("one", ["root"]), ("all", ["root", "userns"])])
def test_a_starter_mutant_fails_the_kit_where_the_kit_checks_itself(tmp_path, mode, failed_in):
    proc, doc = suite(
        CREATE_FAILURE_IGNORED,
        tmp_path,
        "--flow=root,userns",
        f"--kit-self-check={mode}",
        "-k",
        "create_container_raising",
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    failed = sorted(
        (
            e["flow"]
            for e in doc["results"]
            if e["requirement"] == "ERR-002" and e["outcome"] == FAILED
        ),
        key=FLOWS.index,
    )
    assert failed == failed_in
    check = render.verdict(doc).self_check
    assert check is not None and check.failing == {"ERR-002": failed_in}
    assert render.verdict(doc).code == render.HARNESS_ERROR


@real
def test_strict_does_not_turn_the_flows_that_did_not_check_the_kit_into_failures(tmp_path):
    proc, doc = suite(
        "reference",
        tmp_path,
        "--flow=root,userns",
        "--conformance-strict",
        "-k",
        "ERR-002 or EXIT-001",  # an engine requirement too: a verdict needs one
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _results(doc)[("ERR-002", "userns")]["outcome"] == NOT_CONFIGURED
    assert render.verdict(doc).code == render.CONFORMANT
