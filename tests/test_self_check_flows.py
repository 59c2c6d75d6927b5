"""``--kit-self-check``: the kit-only runs in one flow of a session (the default), in every
flow, or in none; the kit requirements the other flows did not check say where they were, and
no engine check reads fewer runs for it."""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest
from suite_session import suite

from conformance import gate, plugin, render, report
from conformance.catalogue import TestDeclaration as Declaration
from conformance.catalogue import suite_tests
from conformance.expectations import FLOWS
from conformance.outcomes import FAILED, NOT_CONFIGURED, NOT_SUPPORTED, PASSED
from conformance.runs import (
    SELF_CHECK_MODES,
    SELF_CHECK_ORDER,
    HarnessError,
    RunCache,
    SelfCheckPlan,
    one_flow_scenarios,
    self_check_flow,
)
from conformance.scenario import SCENARIOS
from mutants import matrix

INJECTED = sorted(n for n, s in SCENARIOS.items() if s.kit_self_check)
#: The kit-only runs: kit-injected, and no engine test reads them by name.
KIT_ONLY = {
    "inject:cleanup_container",
    "inject:create_container:hang",
    "inject:prepare_config",
    "inject:prepare_config:invalid",
    "rpc-probe",
}
#: Kit-injected runs that engine checks read (CLEAN-002, ORDER-010): made in every flow.
ENGINE_READ = set(INJECTED) - KIT_ONLY
CREATE_FAILURE_IGNORED = "mutants.zoo.starter:register_starter_create_failure_ignored"
CLEANUP_FAILURE_FATAL = "mutants.zoo.starter:register_starter_cleanup_failure_is_fatal"
#: tests/self_check_engines.py: cleanup_container breaks after a failure outside root only
CLEANUP_BREAKS_OUTSIDE_ROOT = "self_check_engines:register"

real = pytest.mark.skipif(os.geteuid() != 0, reason="real lifecycles in several flows")


# --- the plan ------------------------------------------------------------------------------------


def test_the_kit_injected_scenarios_are_those_the_kit_makes_fail():
    assert INJECTED and all(SCENARIOS[n].inject for n in INJECTED)
    assert "rpc-probe" in INJECTED and "default" not in INJECTED
    assert not any(SCENARIOS[n].kit_self_check for n in ("exec-failure", "fault:start_process"))


def test_the_kit_only_scenarios_are_those_no_engine_test_reads_by_name():
    assert one_flow_scenarios() == one_flow_scenarios(suite_tests()) == KIT_ONLY
    assert {
        "inject:create_container",
        "inject:monitor_container",
        "inject:post_start_process",
        "inject:start_process:return",
    } == ENGINE_READ
    reads = {d.requirements: set(d.scenarios) for d in suite_tests()}
    assert reads[("CLEAN-002",)] >= ENGINE_READ
    assert "inject:start_process:return" in reads[("ORDER-010",)]


def _decl(reqs: tuple[str, ...], names: tuple[str, ...]) -> Declaration:
    return Declaration("test_x", "test_x", reqs, FLOWS, names, ())


def test_the_kit_only_scenarios_follow_the_declarations():
    every = tuple(SCENARIOS)
    # an engine test that names a kit-injected run takes it out of the kit-only ones
    tests = [_decl(("CLEAN-002",), ("inject:cleanup_container",))]
    assert one_flow_scenarios(tests) == set(INJECTED) - {"inject:cleanup_container"}
    # a check of every run (HOST-001) and a kit test (ERR-006) take nothing out
    tests = [_decl(("HOST-001",), every), _decl(("ERR-006",), ("inject:cleanup_container",))]
    assert one_flow_scenarios(tests) == set(INJECTED)
    # a test of an engine and a kit requirement is an engine test
    tests = [_decl(("ERR-006", "CLEAN-002"), ("inject:cleanup_container",))]
    assert "inject:cleanup_container" not in one_flow_scenarios(tests)


def test_one_flow_is_the_first_candidate_in_the_stated_order():
    assert SELF_CHECK_ORDER == FLOWS == ("root", "suid", "userns", "fakeroot", "hybrid")
    assert self_check_flow(["hybrid", "userns", "suid"]) == "suid"
    assert self_check_flow(["fakeroot", "hybrid"]) == "fakeroot"
    assert self_check_flow([]) is None


def test_one_flow_is_a_real_backend_flow_when_the_session_has_one():
    # non-root with --backend=auto: root on the fake model, userns real
    backends = {"root": "fake", "suid": "fake", "userns": "real", "fakeroot": "real"}
    assert self_check_flow(["root", "suid", "userns", "fakeroot"], backends) == "userns"
    assert self_check_flow(["root", "fakeroot"], backends) == "fakeroot"
    # only fake flows selected: the first of them
    assert self_check_flow(["suid", "root"], backends) == "root"
    assert self_check_flow(["root", "userns"], {"root": "real", "userns": "real"}) == "root"


@pytest.mark.parametrize(
    "plan, runs_in, reason",
    [
        (SelfCheckPlan("all"), set(FLOWS), None),
        (
            SelfCheckPlan("one", "userns"),
            {"userns"},
            "checked in flow userns (--kit-self-check=all for every flow)",
        ),
        (SelfCheckPlan("off"), set(), "its kit-only runs were not made (--kit-self-check=off)"),
    ],
)
def test_a_plan_names_its_flows_and_what_the_others_say(plan, runs_in, reason):
    assert plan.scenarios == KIT_ONLY
    assert {f for f in FLOWS if plan.runs_in(f)} == runs_in
    for flow in FLOWS:
        for name in KIT_ONLY:
            assert plan.excludes(flow, SCENARIOS[name]) == (flow not in runs_in)
        # the engine's runs, and the kit-injected runs engine checks read: in every flow
        for name in ENGINE_READ | {"default", "exec-failure"}:
            assert not plan.excludes(flow, SCENARIOS[name])
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
        with pytest.raises(HarnessError, match="suid/inject:cleanup_container is not made"):
            cache.submit("suid", "inject:cleanup_container")
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
        "harness self-check on this machine: 1/1 kit requirements hold (kit-only runs in "
        "flow root; --kit-self-check=all for every flow)"
    )


def test_the_self_check_line_of_a_merged_report_names_each_shards_flow():
    doc = _doc(
        {("ERR-006", "root"): PASSED, ("ERR-006", "userns"): PASSED, ("ERR-006", "suid"): PASSED},
        "one",
        None,
    )
    doc["environment"]["kit_self_check"]["flows"] = ["root", "userns"]
    check = render.self_check(doc)
    assert check is not None and check.line().endswith(
        "(kit-only runs in flows root, userns; --kit-self-check=all for every flow)"
    )


def test_a_kit_failure_in_the_self_check_flow_still_breaks_the_harness():
    doc = _doc({("ERR-002", "root"): FAILED, ("ERR-002", "suid"): NOT_CONFIGURED}, "one", "root")
    check = render.self_check(doc)
    assert check is not None and not check.ok and check.failing == {"ERR-002": ["root"]}


def test_the_self_check_line_says_when_it_was_not_run():
    check = render.self_check(
        _doc(
            {("ERR-006", "root"): NOT_CONFIGURED, ("ERR-006", "suid"): NOT_CONFIGURED}, "off", None
        )
    )
    assert check is not None and check.ok
    assert check.line() == "harness self-check on this machine: not run (--kit-self-check=off)"


def test_off_still_counts_the_kit_requirements_that_read_runs_made_anyway():
    check = render.self_check(
        _doc({("ERR-006", "root"): NOT_CONFIGURED, ("ERR-002", "root"): PASSED}, "off", None)
    )
    assert check is not None and check.ok
    assert check.line() == (
        "harness self-check on this machine: 1/1 kit requirements hold (1 not checked here) "
        "(kit-only runs not made: --kit-self-check=off)"
    )


# --- what a flow outside the plan says --------------------------------------------------------


def _entry(req: str, flow: str, outcome: str, message: str) -> dict:
    return {"requirement": req, "flow": flow, "outcome": outcome, "message": message}


def test_checked_in_flow_x_is_said_only_when_x_decided_it():
    plan = SelfCheckPlan("one", "root")
    said = plan.reason()
    entries = [
        _entry("ERR-006", "root", PASSED, ""),
        _entry("ERR-006", "userns", NOT_CONFIGURED, said),
        _entry("RPC-005", "root", NOT_SUPPORTED, "the engine does not declare capability x"),
        _entry("RPC-005", "userns", NOT_CONFIGURED, said),
        _entry("ERR-007", "userns", NOT_CONFIGURED, said),  # its test did not run in root
    ]
    report._where_self_checked(entries, plan)
    assert [entries[i]["message"] for i in (1, 3, 4)] == [
        said,
        "not checked here, nor in flow root where its kit-only runs are made: not-supported "
        "there (the engine does not declare capability x)",
        "not checked in this session: its kit-only runs are made in flow root only, where its "
        "test did not run (--kit-self-check=all for every flow)",
    ]


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
def test_one_flow_runs_the_kit_only_scenarios_and_engine_results_do_not_change(tmp_path):
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
    # userns: the kit-injected runs engine checks read, none of the kit-only ones
    assert ran["userns"] & set(INJECTED) == ENGINE_READ
    assert set(INJECTED) <= _scenarios_by_flow(every)["userns"]

    # the engine's results: the same outcomes, messages and runs, but for the kit-only runs
    # that the checks of every run (HOST-*, LEDGER-*, CLEAN-001) read in root only
    def engine(doc: dict) -> dict:
        return {
            k: (
                e["outcome"],
                e["message"],
                sorted(r for r in e["runs"] if r.partition("/")[2] not in KIT_ONLY),
            )
            for k, e in _results(doc).items()
            if e["subject"] == "engine"
        }

    assert engine(one) == engine(every)
    assert render.verdict(one).code == render.verdict(every).code == 0
    # CLEAN-002 and ORDER-010 read their kit-injected runs in every flow
    for flow in ("root", "userns"):
        clean = _results(one)[("CLEAN-002", flow)]
        assert {f"{flow}/{n}" for n in ENGINE_READ} <= set(clean["runs"]), clean["runs"]
        order = _results(one)[("ORDER-010", flow)]
        assert f"{flow}/inject:start_process:return" in order["runs"], order["runs"]
    # the kit's in userns: passed where a run made anyway decided them, else not-configured
    # with the flow that checked them, never failed
    kit_userns = [e for e in one["results"] if e["subject"] == "kit" and e["flow"] == "userns"]
    outcomes = Counter(e["outcome"] for e in kit_userns)
    assert set(outcomes) == {PASSED, NOT_CONFIGURED}, outcomes
    why = "checked in flow root (--kit-self-check=all for every flow)"
    assert {e["message"] for e in kit_userns if e["outcome"] == NOT_CONFIGURED} == {why}
    assert _results(one)[("ERR-006", "userns")]["outcome"] == NOT_CONFIGURED
    assert _results(one)[("ERR-006", "root")]["outcome"] == PASSED
    assert _results(every)[("ERR-006", "userns")]["outcome"] == PASSED
    # a kit test that reads a run made anyway is checked there at no cost
    assert _results(one)[("ERR-002", "userns")]["outcome"] == PASSED
    screen = " ".join(proc.stdout.split())
    assert re.search(
        r"harness self-check on this machine: (\d+)/\1 kit requirements hold \(kit-only runs "
        r"in flow root; --kit-self-check=all for every flow\)",
        screen,
    ), screen[-2000:]


@real
def test_a_cleanup_that_breaks_after_a_failure_outside_root_is_caught_with_one(tmp_path):
    proc, doc = suite(CLEANUP_BREAKS_OUTSIDE_ROOT, tmp_path, "--flow=root,userns", "-k", "CLEAN")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert doc["environment"]["kit_self_check"]["mode"] == "one"
    results = _results(doc)
    assert results[("CLEAN-002", "root")]["outcome"] == PASSED
    failed = results[("CLEAN-002", "userns")]
    assert failed["outcome"] == FAILED, failed
    assert "userns/inject:create_container" in failed["runs"]


@real
def test_off_makes_no_kit_only_run_and_says_so(tmp_path):
    proc, doc = suite(
        "reference",
        tmp_path,
        "--flow=root",
        "--kit-self-check=off",
        "-k",
        "ERR-002 or ERR-006 or EXIT-001 or CLEAN-002",
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    made = {r["scenario"] for r in doc["runs"]}
    assert not made & KIT_ONLY
    assert made >= ENGINE_READ  # CLEAN-002 reads them, off or not
    results = _results(doc)
    assert results[("EXIT-001", "root")]["outcome"] == PASSED
    assert results[("CLEAN-002", "root")]["outcome"] == PASSED
    # ERR-002 reads a run made anyway: checked; ERR-006 reads only a kit-only one: not
    assert results[("ERR-002", "root")]["outcome"] == PASSED
    assert results[("ERR-006", "root")]["outcome"] == NOT_CONFIGURED
    assert results[("ERR-006", "root")]["message"] == (
        "its kit-only runs were not made (--kit-self-check=off)"
    )
    assert (
        "harness self-check on this machine: 1/1 kit requirements hold (1 not checked here) "
        "(kit-only runs not made: --kit-self-check=off)"
    ) in " ".join(proc.stdout.split())


@real
def test_the_flow_is_chosen_among_the_tests_left_after_deselection(tmp_path):
    # -k leaves ERR-006 in userns only: userns is the flow that checks the kit
    proc, doc = suite("reference", tmp_path, "--flow=root,userns", "-k", "ERR-006 and userns")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert doc["environment"]["kit_self_check"] == {"mode": "one", "flow": "userns"}
    assert _results(doc)[("ERR-006", "userns")]["outcome"] == PASSED
    assert [r["id"] for r in doc["runs"]] == ["userns/inject:cleanup_container"]


@real
def test_xdist_workers_tell_the_controller_which_flow_checked_the_kit(tmp_path):
    proc, doc = suite(
        "reference", tmp_path, "--flow=root,userns", "-k", "ERR-006", "-p", "xdist", "-n", "2"
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert doc["environment"]["xdist_workers"] == 2
    assert doc["environment"]["kit_self_check"] == {"mode": "one", "flow": "root"}
    assert [r["id"] for r in doc["runs"]] == ["root/inject:cleanup_container"]
    assert _results(doc)[("ERR-006", "userns")]["outcome"] == NOT_CONFIGURED


def _failed_flows(doc: dict, req: str) -> list[str]:
    return sorted(
        (e["flow"] for e in doc["results"] if e["requirement"] == req and e["outcome"] == FAILED),
        key=FLOWS.index,
    )


@real
@pytest.mark.parametrize(
    "engine, k, req, mode, failed_in",
    [
        # ERR-006 reads a kit-only run: one checks it in the self-check flow only
        (CLEANUP_FAILURE_FATAL, "cleanup_container_raising", "ERR-006", "one", ["root"]),
        (CLEANUP_FAILURE_FATAL, "cleanup_container_raising", "ERR-006", "all", ["root", "userns"]),
        # ERR-002 reads a run CLEAN-002 reads too: made, and checked, in every flow
        (CREATE_FAILURE_IGNORED, "create_container_raising", "ERR-002", "one", ["root", "userns"]),
    ],
)
def test_a_starter_mutant_fails_the_kit_where_the_kit_checks_itself(
    tmp_path, engine, k, req, mode, failed_in
):
    proc, doc = suite(engine, tmp_path, "--flow=root,userns", f"--kit-self-check={mode}", "-k", k)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert _failed_flows(doc, req) == failed_in
    check = render.verdict(doc).self_check
    assert check is not None and check.failing == {req: failed_in}
    assert render.verdict(doc).code == render.HARNESS_ERROR


@real
def test_strict_does_not_turn_the_flows_that_did_not_check_the_kit_into_failures(tmp_path):
    proc, doc = suite(
        "reference",
        tmp_path,
        "--flow=root,userns",
        "--conformance-strict",
        "-k",
        "ERR-006 or EXIT-001",  # an engine requirement too: a verdict needs one
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _results(doc)[("ERR-006", "userns")]["outcome"] == NOT_CONFIGURED
    assert render.verdict(doc).code == render.CONFORMANT
