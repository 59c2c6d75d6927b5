"""The kit's own fault injection (RunRequest.inject): every fault kind, on the plain reference
engine, shows in the ledger as the kit's, and the engine's later hooks still run."""

from __future__ import annotations

import os
import re

import pytest
from suite_session import suite

from conformance import expectations as X
from conformance import rootcause
from conformance.capabilities import FAULTS
from conformance.requirements import KIT, subject_of
from conformance.scenario import SCENARIOS, fault_scenario
from kit.ledger.record import check_event
from kit.run import launcher
from kit.run.request import RunRequest
from kit.starter import inject

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="real lifecycles in the root flow")

#: What the engine's hook does in each kind: called or not, and how the hook ends.
RAISES = (
    "prepare_config",
    "create_container",
    "start_process",
    "post_start_process",
    "monitor_container",
    "cleanup_container",
)


def _run(fault: str) -> launcher.RunResult:
    timeout = 1.0 if fault.endswith(":hang") else 5.0
    return launcher.run(
        "reference",
        "root",
        ["/bin/sh", "-c", "exit 7"],
        inject=fault,
        hook_timeout=timeout,
        backend="real",
    )


def _events(result: launcher.RunResult, kind: str, **match: str) -> list[dict]:
    return [
        e
        for e in result.events
        if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())
    ]


def test_the_kit_knows_every_fault_of_the_engine_protocol_by_the_same_name():
    assert list(inject.INJECTIONS) == list(FAULTS)


def test_an_unknown_fault_is_refused_by_name_where_the_run_is_requested():
    with pytest.raises(
        ValueError,
        match=r"inject: unknown fault 'create_container:oops' "
        r"\(known: prepare_config, ",
    ):
        RunRequest(
            engine="reference",
            flow="root",
            argv=["/bin/true"],
            inject="create_container:oops",
            backend="fake",
        )


def test_the_ledger_schema_takes_the_kit_injected_event_and_only_its_keys():
    event = {
        "seq": 1,
        "t": 0,
        "kind": "kit_injected",
        "role": "master",
        "pid": 2,
        "tid": 2,
        "hook": "create_container",
        "fault": "create_container",
        "detail": "x",
    }
    assert check_event(event) is None
    assert "outside the schema" in str(check_event({**event, "engine": "mine"}))
    assert "a hook of the contract" in str(check_event({**event, "hook": "no_such_hook"}))
    assert "without 'fault'" in str(check_event({k: v for k, v in event.items() if k != "fault"}))


@pytest.mark.parametrize("fault", list(inject.INJECTIONS))
def test_each_fault_is_made_by_the_kit_and_recorded_as_the_kits(fault):
    result = _run(fault)
    hook = fault.split(":")[0]
    made = _events(result, "kit_injected", fault=fault)
    assert len(made) == 1, result.problems()
    assert made[0]["hook"] == hook and made[0]["detail"].startswith(inject.INJECTIONS[fault])
    entered = _events(result, "hook_enter", hook=hook)
    assert entered and entered[0]["seq"] < made[0]["seq"]  # inside the engine's hook record
    raised = _events(result, "hook_raise", hook=hook)
    if fault in RAISES:
        # the kit's exception type, never one an engine raises: nobody takes it for a bug
        assert [e["error"]["type"] for e in raised] == ["InjectedFault"]
        assert "injected by the kit" in raised[0]["error"]["message"]
    else:
        assert raised == []
    path = next((p for p in X.ERROR_PATHS.values() if p.fault == fault), None)
    if path is not None and path.exit_code is not None:
        assert result.exit_code == path.exit_code, (result.reason, result.problems())
    if path is not None and path.cleanup:
        # the engine's own later hook runs after the kit's failure, and returns
        assert _events(result, "hook_enter", hook="cleanup_container", role="master")
    if fault == "create_container:hang":
        assert (result.timed_out or {}).get("hook") == "create_container"
    if fault == "prepare_config:invalid":
        assert any(
            "set_capabilities" in e["message"]
            for e in _events(result, "starter_error", stage="starter_config")
        )
    if fault == "create_container:rpc-probe":
        calls = _events(result, "rpc_call")
        assert [c["ok"] for c in calls[: len(inject.RPC_PROBES)]] == [False] * 4
        assert result.exit_code == 7


def test_the_engine_hook_runs_before_an_injected_raise_but_not_in_create_container():
    posted = _run("post_start_process")
    assert _events(posted, "stage2_exec")  # the payload ran: post_start_process was reached
    # create_container fails before any setup (what cleanup_container must cope with), and
    # a hang blocks in its place: the reference's create_container makes no call in either.
    for fault in ("create_container", "create_container:hang"):
        assert not _events(_run(fault), "rpc_call"), fault


def test_kit_requirements_use_the_kits_injection_and_need_no_capability():
    for req, path in X.ERROR_PATHS.items():
        scenario = SCENARIOS[fault_scenario(req)]
        if subject_of(req) == KIT:
            assert scenario.inject == path.fault and "fault_injection" not in scenario.requires
            assert scenario.config() == {}
        else:  # the engine's own failure: its cooperation
            assert scenario.inject is None and "fault_injection" in scenario.requires
    assert SCENARIOS["rpc-probe"].inject == "create_container:rpc-probe"
    assert "fault_injection" not in SCENARIOS["rpc-probe"].requires


def test_an_engine_hook_failing_before_the_kit_injects_is_the_engines_root_cause():
    enter = {"kind": "hook_enter", "role": "stage1", "hook": "prepare_config"}
    own = {
        "kind": "hook_raise",
        "role": "stage1",
        "hook": "prepare_config",
        "error": {"type": "RuntimeError", "message": "the engine's own bug"},
    }
    cause = rootcause.find("inject:prepare_config:invalid", [enter, own])
    assert cause is not None and "the engine's own bug" in cause.error
    made = {
        "kind": "kit_injected",
        "role": "stage1",
        "hook": "prepare_config",
        "fault": "prepare_config:invalid",
    }
    refused = {
        "kind": "starter_error",
        "role": "starter",
        "stage": "starter_config",
        "message": "set_capabilities: effective capabilities must be a subset",
    }
    assert rootcause.find("inject:prepare_config:invalid", [enter, made, refused]) is None
    kit_raise = {**own, "error": {"type": "InjectedFault", "message": "injected by the kit"}}
    assert rootcause.find("inject:prepare_config", [enter, made, kit_raise]) is None


# --- the suite: the kit's self-check needs no cooperation ------------------------------------


#: The kit requirements whose error paths only the kit's injection makes on a plain engine.
INJECTED = (
    "ERR-002",
    "ERR-004",
    "ERR-005",
    "ERR-006",
    "ERR-007",
    "ERR-008",
    "ORDER-008",
    "SC-001",
    "EXIT-003",
    "RPC-005",
    "RPC-006",
)


def test_the_plain_reference_checks_every_kit_requirement_of_its_flow(tmp_path):
    proc, doc = suite("reference", tmp_path, "--flow=root")
    assert proc.returncode == 0, proc.stdout[-3000:]
    screen = " ".join(proc.stdout.split())
    found = re.search(
        r"harness self-check on this machine: (\d+)/(\d+) kit requirements "
        r"hold(?: \((\d+) not checked here\))?",
        screen,
    )
    assert found, screen[-3000:]
    held, checked, unchecked = found.groups()
    # every kit requirement that applies to the root flow (RPC-007 is the kit's own tests')
    assert held == checked and unchecked is None, found.group(0)
    outcome = {e["requirement"]: e["outcome"] for e in doc["results"]}
    assert {req: outcome.get(req) for req in INJECTED} == dict.fromkeys(INJECTED, "passed")
    assert doc["engine"]["capabilities"]["fault_injection"] is False  # no cooperation
    kit_runs = {r["scenario"] for r in doc["runs"] if r["scenario"].startswith("inject:")}
    assert len(kit_runs) == 8 and all(
        not r["engine_config"] for r in doc["runs"] if r["scenario"] in kit_runs
    )


def test_a_starter_mutant_on_the_error_paths_is_caught_without_cooperation(tmp_path):
    spec = "mutants.zoo.starter:register_starter_create_failure_ignored"
    proc, doc = suite(spec, tmp_path, "--flow=root", "-k", "create_container_raising")
    failed = {e["requirement"] for e in doc["results"] if e["outcome"] == "failed"}
    assert "ERR-002" in failed, proc.stdout[-3000:]
    assert doc["engine"]["capabilities"]["fault_injection"] is False  # the plain reference
    assert (
        "harness self-check on this machine: 0/1 kit requirements hold; failing: "
        "ERR-002 [root]" in " ".join(proc.stdout.split())
    )
