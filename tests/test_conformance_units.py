"""The conformance suite's parts, without running any lifecycle: the catalogue, the
expectation tables, the checks on hand-made ledgers, known failures, outcomes, the report."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from conformance import capabilities, catalogue, checks, outcomes, report, requirements
from conformance import expectations as X
from conformance.capabilities import Capabilities
from conformance.runs import Run
from conformance.scenario import SCENARIOS, decode_signal_exit, fault_scenario
from kit.ledger import probe
from kit.ledger.record import LOST_EVENT, lost_event
from kit.starter.inject import RPC_PROBES

U, G = 999, 995
HOST_NS = {k: 4026531830 + i for i, k in enumerate(X.NAMESPACE_KINDS)}
CONTAINER_NS = {k: 4026532170 + i for i, k in enumerate(X.NAMESPACE_KINDS)}


# --- the catalogue ---------------------------------------------------------------------------


def test_the_catalogue_has_at_least_40_requirements_with_stable_ids_and_levels():
    assert len(requirements.CATALOGUE) >= 40
    for req in requirements.CATALOGUE.values():
        assert re.fullmatch(r"[A-Z]+(-[A-Z0-9]+)*-\d{3}", req.id)
        assert req.level in requirements.LEVELS
        assert req.section.startswith("§") and req.text.endswith(".")


def test_every_requirement_names_its_subject_and_an_unknown_one_is_refused():
    subjects = {r.subject for r in requirements.CATALOGUE.values()}
    assert subjects == set(requirements.SUBJECTS) == {"engine", "kit"}
    kit = {r.id for r in requirements.CATALOGUE.values() if r.subject == "kit"}
    # rules of the starter alone; engine-breakable ones (its hooks call hooks, its RPC
    # methods, its StarterConfig) stay the engine's
    assert {"ERR-001", "RPC-005", "SIG-001", "NS-009", "SC-001"} <= kit
    assert not kit & {"ORDER-001", "ORDER-003", "NS-002", "PRIV-STAGE2-004", "ERR-003"}
    with pytest.raises(ValueError, match="X-001: unknown subject 'harness'"):
        requirements.Requirement("X-001", "MUST", "t.", "§1", "order", subject="harness")
    assert requirements.subject_of("NO-SUCH-001") == "engine"  # nothing hidden from a verdict


def test_every_requirement_is_checked_by_a_test_or_says_why_not():
    index = catalogue.tests_by_requirement()
    for req in requirements.CATALOGUE.values():
        if req.unchecked:
            assert not index[req.id], f"{req.id} is marked unchecked but has tests"
        else:
            assert index[req.id], f"{req.id} has no test and no reason"


def _declared_in_source() -> dict[str, set[str]]:
    """requirement -> ``module.py::function`` of every suite test whose source carries
    ``@requirement(...)`` naming it: read from the files, not through the catalogue's import."""
    out: dict[str, set[str]] = {r: set() for r in requirements.CATALOGUE}
    for path in sorted((Path(catalogue.__file__).parent / "suite").glob("test_*.py")):
        for fn in ast.parse(path.read_text()).body:
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test_"):
                continue
            for deco in fn.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", "") == "requirement":
                    for arg in deco.args:
                        assert isinstance(arg, ast.Constant), f"{path.name}::{fn.name}"
                        out[arg.value].add(f"{path.name}::{fn.name}")
    return out


def test_every_catalogue_row_names_exactly_the_tests_the_suite_declares_for_it():
    rows = catalogue.checked_by()
    declared = _declared_in_source()
    assert set(rows) == set(requirements.CATALOGUE)
    for req in requirements.CATALOGUE.values():
        assert set(rows[req.id]) == declared[req.id], req.id
        assert len(rows[req.id]) == len(declared[req.id]), f"{req.id} names a test twice"
        assert bool(rows[req.id]) != bool(req.unchecked), req.id
    md = catalogue.markdown()
    for req_id, tests in rows.items():
        line = next(line for line in md.splitlines() if line.startswith(f"| {req_id} |"))
        for test in tests:
            assert f"`{test}`" in line, (req_id, test)


def test_a_requirement_no_suite_test_decides_is_an_error_naming_it():
    tests = [d for d in catalogue.suite_tests() if "ORDER-003" not in d.requirements]
    with pytest.raises(catalogue.SuiteDeclarationError, match="ORDER-003 is decided by no"):
        catalogue.checked_by(tests)
    unchecked = next(r for r in requirements.CATALOGUE.values() if r.unchecked)
    claims = dataclasses.replace(catalogue.suite_tests()[0], requirements=(unchecked.id,))
    with pytest.raises(catalogue.SuiteDeclarationError, match=f"{unchecked.id} says no test"):
        catalogue.checked_by([*catalogue.suite_tests(), claims])


def test_every_suite_test_is_a_sentence_with_declared_scenarios():
    for decl in catalogue.suite_tests():
        assert decl.name.count("_") >= 5, decl.id
        assert decl.scenarios, f"{decl.id} declares no scenario"


def test_catalogue_groups_cover_every_requirement():
    grouped = [r.id for _, _, reqs in requirements.by_group() for r in reqs]
    assert sorted(grouped) == sorted(requirements.CATALOGUE)


# --- the expectation tables -------------------------------------------------------------------


def test_the_privilege_table_has_a_cell_for_every_role_and_flow():
    for role in X.ROLES:
        assert set(X.PRIVILEGES[role]) == set(X.FLOWS), role
        for cell in X.PRIVILEGES[role].values():
            assert cell, role
            for expect in cell:
                assert expect.requirement in requirements.CATALOGUE


def test_the_suid_master_keeps_saved_uid_0_so_escalation_is_possible():
    cell = X.PRIVILEGES["master"]["suid"]
    assert X.Expect("PRIV-MASTER-001", X.Uids(X.INVOKER, X.INVOKER, X.ZERO)) in cell
    assert any(e.aspect == X.Escalation(True) for e in cell)
    assert X.privilege_flows("PRIV-MASTER-002") == ("suid", "hybrid")


def test_order_rules_and_error_paths_refer_to_known_things():
    for rule in X.ORDER_RULES:
        assert rule.requirement in requirements.CATALOGUE
    for req, path in X.ERROR_PATHS.items():
        assert req in requirements.CATALOGUE
        assert path.fault in capabilities.FAULTS
        assert fault_scenario(req) in SCENARIOS


def test_the_signal_payload_reports_which_signals_it_missed():
    assert decode_signal_exit(42) == []
    assert decode_signal_exit(10 + 0b10111) == ["SIGUSR2"]
    assert decode_signal_exit(0) is None


# --- checks on hand-made ledgers ----------------------------------------------------------------


def snapshot(
    uid=(U, U, U, U),
    ns=HOST_NS,
    uid_map=((0, 0, 4294967295),),
    eff=(),
    prm=(),
    bnd=("CAP_CHOWN", "CAP_SYS_ADMIN"),
    tid=10,
    nnp=False,
):
    return {
        "threads": [
            {
                "tid": tid,
                "uid": list(uid),
                "gid": [G] * 4,
                "groups": [],
                "caps": {
                    "effective": list(eff),
                    "permitted": list(prm),
                    "inheritable": [],
                    "bounding": list(bnd),
                    "ambient": [],
                },
                "no_new_privs": nnp,
                "seccomp": 0,
            }
        ],
        "ns": dict(ns),
        "uid_map": [list(m) for m in uid_map],
        "gid_map": [],
        "securebits": 0,
        "dumpable": 1,
        "nspid": [tid],
    }


def make_run(flow, events, exit_code=0, scenario="default"):
    full = [{"kind": "run_start", "role": "supervisor", "invoker": {"uid": U, "gid": G}}]
    full += events
    for i, event in enumerate(full):
        event.setdefault("pid", 100)
        event.setdefault("tid", 100)
        event.setdefault("t", i * 1000)
        event["seq"] = i
    ledger = SimpleNamespace(events=full, document={"schema_version": 1, "events": full})
    result = SimpleNamespace(
        exit_code=exit_code,
        reason="exited",
        ledger=ledger,
        leaks=[],
        timed_out=None,
        stdout="",
        stderr="",
    )
    return Run(flow, SCENARIOS[scenario], "real", result=result)


def hook(kind, role, name, snap, **extra):
    event = {"kind": kind, "role": role, "hook": name, "snapshot": snap}
    if kind == "hook_enter":
        event["escalation"] = extra.pop("escalation", {"host_escalation": False})
    event.update(extra)
    return event


def test_a_suid_master_hook_with_effective_capabilities_at_return_is_a_violation():
    good = snapshot(uid=(U, U, 0, U), prm=("CAP_SYS_ADMIN",))
    bad = snapshot(uid=(U, U, 0, U), eff=("CAP_SYS_ADMIN",), prm=("CAP_SYS_ADMIN",))
    run = make_run(
        "suid",
        [
            hook(
                "hook_enter",
                "master",
                "create_container",
                good,
                tid=10,
                escalation={"host_escalation": True},
            ),
            hook("hook_return", "master", "create_container", bad, tid=10),
        ],
    )
    verify = checks.Verifier("suid", ["PRIV-MASTER-002"], "t")
    checks.check_privileges(verify, run)
    assert verify.checks["PRIV-MASTER-002"] == 2
    (_violation,) = verify.violations["PRIV-MASTER-002"]
    text = verify.render("PRIV-MASTER-002")
    assert text.startswith("PRIV-MASTER-002 [MUST] SPEC §4: ")
    assert "flow: suid   role: master   hook: create_container" in text
    assert "expected: effective capabilities exactly none" in text
    assert "observed: thread 10: effective [CAP_SYS_ADMIN]" in text
    assert "ledger event: #2 hook_return role=master hook=create_container" in text


def _seen(snap, event=None, stage2=None, config=None):
    events = [hook("hook_enter", "master", "create_container", snapshot(uid=(U, U, 0, U)))]
    if config is not None:
        events.append({"kind": "starter_config", "role": "stage1", "config": {"requests": config}})
    run = make_run("suid", events)
    run.result.ledger.events[0]["host_userns"] = [0, HOST_NS["user"]]
    facts = checks.Facts(run)
    return checks.Seen(run, facts, snap, snap["threads"], event, stage2)


#: place, aspect, a snapshot the rule accepts, one it rejects (and the Seen extras).
_RULE_CASES = [
    ("hook", X.Uids(X.ZERO, X.ZERO, X.ZERO), snapshot(uid=(0, 0, 0, 0)), snapshot(), {}),
    (
        "hook",
        X.Caps("full"),
        snapshot(eff=("CAP_CHOWN", "CAP_SYS_ADMIN"), prm=("CAP_CHOWN", "CAP_SYS_ADMIN")),
        snapshot(),
        {},
    ),
    ("hook", X.Caps("none"), snapshot(), snapshot(prm=("CAP_CHOWN",)), {}),
    (
        "hook",
        X.Caps("effective", ("CAP_SYS_ADMIN",)),
        snapshot(eff=("CAP_SYS_ADMIN",)),
        snapshot(),
        {},
    ),
    (
        "hook",
        X.Caps("configured"),
        snapshot(bnd=("CAP_CHOWN",)),
        snapshot(),
        {"config": {"capabilities": {"bounding": ["CAP_CHOWN"]}}},
    ),
    ("hook", X.BoundingSmallerThan("master"), snapshot(bnd=("CAP_CHOWN",)), snapshot(), {}),
    ("hook", X.NoHostPrivilege(), snapshot(), snapshot(uid=(U, U, 0, U)), {}),
    ("hook", X.NoNewPrivs(True), snapshot(nnp=True), snapshot(), {}),
    ("payload", X.NoHostPrivilege(), snapshot(), snapshot(uid=(0, 0, 0, 0)), {}),
    (
        "payload",
        X.CapsWithinStage2(),
        snapshot(),
        snapshot(prm=("CAP_CHOWN",)),
        {"stage2": snapshot()["threads"][0]},
    ),
    (
        "payload",
        X.SameIdsAsStage2(),
        snapshot(),
        snapshot(uid=(0, 0, 0, 0)),
        {"stage2": snapshot(uid=(U, U, U, U))["threads"][0], "event": {"snapshot": snapshot()}},
    ),
]


@pytest.mark.parametrize("place, aspect, good, bad, extra", _RULE_CASES)
def test_each_privilege_rule_rejects_a_violation_and_describes_itself(
    place, aspect, good, bad, extra
):
    rule = checks.rule_for(place, aspect)
    assert rule.describe() == aspect.describe()
    assert rule.check(_seen(good, **extra)) is None
    problem = rule.check(_seen(bad, **extra))
    assert problem is not None and problem.expected and problem.observed


def test_escalation_rule_reads_the_probe_of_the_event_and_needs_it():
    rule = checks.rule_for("hook", X.Escalation(True))
    snap = snapshot(uid=(U, U, 0, U))
    assert rule.check(_seen(snap, {"escalation": {"host_escalation": True}})) is None
    problem = rule.check(_seen(snap, {"escalation": {"host_escalation": False}}))
    assert problem == checks.Problem(
        "escalation to host privilege possible", "escalation probe {'host_escalation': False}"
    )
    with pytest.raises(checks.HarnessError, match="no escalation probe result"):
        rule.check(_seen(snap, {"kind": "hook_enter"}))


def test_every_aspect_of_the_tables_has_a_rule_and_an_unknown_one_is_a_suite_error():
    for table in X.PRIVILEGES.values():
        for cell in table.values():
            for expect in cell:
                checks.rule_for("hook", expect.aspect)
    for cell in X.PAYLOAD.values():
        for expect in cell:
            checks.rule_for("payload", expect.aspect)
    with pytest.raises(checks.SuiteError, match="no hook rule for Caps"):
        checks.rule_for("hook", X.Caps("most"))
    with pytest.raises(checks.SuiteError, match="no payload rule for Uids"):
        checks.rule_for("payload", X.Uids(X.ZERO, None, None))


def test_escalation_must_be_possible_for_the_setuid_master_and_impossible_in_stage_1():
    master = snapshot(uid=(U, U, 0, U), prm=("CAP_SYS_ADMIN",))
    run = make_run(
        "suid",
        [
            hook(
                "hook_enter", "stage1", "config", snapshot(), escalation={"host_escalation": True}
            ),
            hook("hook_enter", "master", "config", master, escalation={"host_escalation": False}),
        ],
    )
    for req in ("PRIV-STAGE1-003", "PRIV-MASTER-003"):
        verify = checks.Verifier("suid", [req], "t")
        checks.check_privileges(verify, run)
        assert len(verify.violations[req]) == 1, req


def _enter(role, hook, tid=1):
    return {"kind": "hook_enter", "role": role, "hook": hook, "tid": tid}


#: an order rule, events it accepts, events that break it.
_ORDER_CASES = [
    (
        X.Before("T", X.enter("master", "a"), X.enter("master", "b")),
        [_enter("master", "a"), _enter("master", "b")],
        [_enter("master", "b"), _enter("master", "a")],
    ),
    (X.Count("T", X.enter("master", "a"), 1, 1), [_enter("master", "a")], []),
    (
        X.FirstHooks("T", "master", ("a", "b")),
        [_enter("master", "a"), _enter("master", "b")],
        [_enter("master", "b"), _enter("master", "a")],
    ),
    (
        X.DistinctThreads("T", "master", ("a", "b")),
        [_enter("master", "a", 1), _enter("master", "b", 2)],
        [_enter("master", "a", 1), _enter("master", "b", 1)],
    ),
]


@pytest.mark.parametrize("aspect, good, bad", _ORDER_CASES)
def test_each_order_rule_rejects_a_violation_and_describes_itself(aspect, good, bad):
    rule = checks.order_rule_for(aspect)
    assert rule.describe() == aspect.describe()
    for events in (good, bad):
        for i, event in enumerate(events):
            event["seq"] = i
    held = rule.check(good)
    assert held and all(f.problem is None for f in held)
    broken = [f.problem for f in rule.check(bad) if f.problem]
    assert broken and all(p.expected == aspect.describe() and p.observed for p in broken)
    with pytest.raises(checks.SuiteError, match="unknown rule"):
        checks.order_rule_for(X.enter("master", "a"))


def test_start_process_before_create_container_returned_breaks_order_007():
    stage2 = snapshot(ns=CONTAINER_NS)
    run = make_run(
        "root",
        [
            hook("hook_enter", "master", "create_container", snapshot()),
            hook("hook_enter", "stage2", "start_process", stage2),
            hook("hook_return", "master", "create_container", snapshot()),
            {"kind": "process_exit", "role": "container", "child_role": "rpc", "status": 0},
        ],
    )
    verify = checks.Verifier("root", ["ORDER-007"], "t")
    checks.check_rules(verify, run)
    messages = [v.observed for v in verify.violations["ORDER-007"]]
    assert len(messages) == 2
    assert "only at #3" in messages[0]
    assert "the first process_exit role=container child_role=rpc only at #4" in messages[1]


def test_the_master_sharing_the_containers_net_namespace_breaks_ns_003():
    starter_config = {
        "kind": "starter_config",
        "role": "starter",
        "config": {"requests": {"ns_flags": ["pid", "net"], "ns_paths": {}}},
    }
    shared = dict(HOST_NS, net=CONTAINER_NS["net"])
    run = make_run(
        "root",
        [
            starter_config,
            hook("hook_enter", "master", "monitor_container", snapshot(ns=shared)),
            hook("hook_enter", "stage2", "start_process", snapshot(ns=CONTAINER_NS)),
        ],
    )
    verify = checks.Verifier("root", ["NS-003"], "t")
    checks.check_master_not_shared(verify, run)
    (violation,) = verify.violations["NS-003"]
    assert violation.observed.startswith("shares net with stage 2")


def test_master_hooks_given_another_pid_than_the_containers_break_pid_001():
    run = make_run(
        "root",
        [
            {"kind": "container_start", "role": "starter", "container_pid": 4242, "created": []},
            hook("hook_enter", "master", "create_container", snapshot(), args={"pid": 4242}),
            hook("hook_enter", "master", "monitor_container", snapshot(), args={"pid": 1}),
        ],
    )
    verify = checks.Verifier("root", ["PID-001"], "t")
    checks.check_master_pids(verify, run)
    (violation,) = verify.violations["PID-001"]
    assert violation.event["hook"] == "monitor_container" and violation.observed == "pid 1"


def _stage2_lost(kind: str | None) -> dict:
    """The master's stage2_failed event when engine code closed the ledger socket before
    stage 2 could send ``kind`` of start_process (None: before any hook event)."""
    message = "engine code closed the ledger socket in stage 2: Socket operation on non-socket"
    if kind is not None:
        event = {"kind": kind, "hook": "start_process"}
        if kind == "hook_raise":
            event["error"] = {"type": "FileNotFoundError", "message": "no /nonexistent"}
        message += f"; {LOST_EVENT} {lost_event(json.dumps(event).encode())}"
    return {"kind": "stage2_failed", "role": "master", "message": message}


@pytest.mark.parametrize(
    ("lost", "violated"),
    [("hook_raise", False), ("hook_return", True), ("hook_enter", True), (None, True)],
)
def test_err_012_reads_how_start_process_ended_when_its_ledger_socket_was_closed(lost, violated):
    """An engine may close every descriptor it does not know before its exec (the kit's
    ledger socket too): when the exec fails, stage 2 tells the master the hook event it
    could not record, and ERR-012 judges start_process by it."""
    run = make_run(
        "root",
        [
            hook("hook_enter", "stage2", "start_process", snapshot(ns=CONTAINER_NS)),
            _stage2_lost(lost),
        ],
        exit_code=255,
        scenario="exec-failure",
    )
    verify = checks.Verifier("root", ["ERR-012"], "t")
    checks.check_start_process_never_returns(verify, run)
    assert bool(verify.violations.get("ERR-012")) is violated


def test_init_config_told_privileged_outside_stage_1_breaks_order_002():
    common = {"engine_name": "e", "container_id": "c"}
    run = make_run(
        "suid",
        [
            hook(
                "hook_enter",
                "stage1",
                "init_config",
                snapshot(),
                args={"common": common, "privileged_stage1": True},
            ),
            hook(
                "hook_enter",
                "master",
                "init_config",
                snapshot(),
                args={"common": common, "privileged_stage1": True},
            ),
        ],
    )
    verify = checks.Verifier("suid", ["ORDER-002"], "t")
    checks.check_init_flag(verify, run)
    (violation,) = verify.violations["ORDER-002"]
    assert violation.event["role"] == "master"
    assert violation.expected == "privileged_stage1=False"


def test_a_check_of_an_undeclared_requirement_is_a_suite_error():
    verify = checks.Verifier("root", ["ORDER-001"], "t")
    with pytest.raises(checks.SuiteError, match="declares only ORDER-001"):
        verify.check("ORDER-003", True, expected="", observed="")


def test_a_check_of_one_requirement_takes_it_from_a_test_that_declares_exactly_one():
    run = make_run("root", [{"kind": "process_exit", "role": "container", "child_role": "rpc"}])
    verify = checks.Verifier("root", ["RPC-003"], "t")
    checks.check_rpc_server_exit(verify, run)
    (violation,) = verify.violations["RPC-003"]
    assert violation.observed == "status None"
    for declared in (["RPC-003", "RPC-004"], []):
        verify = checks.Verifier("root", declared, "t")
        with pytest.raises(checks.SuiteError, match="needs a test that declares exactly one"):
            checks.check_rpc_server_exit(verify, run)


def _probe_reply(ok, error="ProtocolError", message="refused"):
    if ok:
        return {"kind": "rpc_call", "role": "rpc", "ok": True, "method": "e.m"}
    return {
        "kind": "rpc_call",
        "role": "rpc",
        "ok": False,
        "method": "e.m",
        "error": {"type": error, "errno": 22, "message": message},
    }


def _probe_verdicts(served=()):
    """The violations of RPC-005 and RPC-006 when the probes named in ``served`` are served
    instead of refused."""
    errors = {
        "unknown-method": "UnknownMethodError",
        "unknown-argument": "TypeError",
        "malformed-json": "ProtocolError",
        "pickle": "ProtocolError",
    }
    calls = [_probe_reply(name in served, errors[name]) for name in RPC_PROBES]
    calls += [_probe_reply(True), _probe_reply(False, message="frame of 9 bytes exceeds 8")]
    verify = checks.Verifier("root", ["RPC-005", "RPC-006"], "t")
    checks.check_rpc_probes(verify, make_run("root", calls, scenario="rpc-probe"))
    return {req: len(found) for req, found in verify.violations.items()}


def test_the_rpc_probes_attribute_each_verdict_to_its_own_requirement():
    assert _probe_verdicts() == {"RPC-005": 0, "RPC-006": 0}
    assert _probe_verdicts({"pickle"}) == {"RPC-005": 1, "RPC-006": 0}
    assert _probe_verdicts({"unknown-method", "malformed-json"}) == {"RPC-005": 0, "RPC-006": 2}


def _failed_run(*events, exit_code=255):
    return make_run("root", list(events), exit_code=exit_code, scenario="exec-failure")


def test_post_start_process_after_a_stage_2_failure_breaks_order_010():
    verify = checks.Verifier("root", ["ORDER-010"], "t")
    checks.check_no_post_start_after_stage2_failure(
        verify, _failed_run(hook("hook_enter", "master", "post_start_process", snapshot()))
    )
    missing, ran = verify.violations["ORDER-010"]
    assert missing.observed == "no stage-2 failure recorded"
    assert ran.observed == "post_start_process ran" and ran.event["hook"] == "post_start_process"


def test_cleanup_container_after_a_stage_1_failure_breaks_order_012():
    verify = checks.Verifier("root", ["ORDER-012"], "t")
    checks.check_no_cleanup_after_stage1_failure(
        verify, _failed_run(hook("hook_enter", "master", "cleanup_container", snapshot()))
    )
    (violation,) = verify.violations["ORDER-012"]
    assert violation.event["hook"] == "cleanup_container"


def test_a_fatal_error_without_exit_255_breaks_exit_003():
    fatal = {"kind": "fatal", "role": "master", "message": "boom"}
    verify = checks.Verifier("root", ["EXIT-003"], "t")
    checks.check_fatal_exit(verify, _failed_run(fatal, exit_code=0))
    (violation,) = verify.violations["EXIT-003"]
    assert violation.observed == "exit code 0 (exited)" and violation.event["kind"] == "fatal"
    verify = checks.Verifier("root", ["EXIT-003"], "t")
    checks.check_fatal_exit(verify, _failed_run())
    (violation,) = verify.violations["EXIT-003"]
    assert violation.observed == "none"


@pytest.mark.parametrize(
    "hook, role, observed",
    [
        ("create_container", "master", "create_container in the master did not return within"),
        ("", "", "the run did not end within 5 s with no hook open (stuck between hooks)"),
    ],
)
def test_a_timed_out_run_breaks_err_009_naming_the_hook_or_none(hook, role, observed):
    timeout = {"kind": "hook_timeout", "role": "supervisor", "hook": hook, "hook_role": role}
    run = make_run("root", [timeout], exit_code=255)
    run.result.timed_out = {"hook": hook, "hook_role": role, "seconds": 5, "open_hooks": []}
    verify = checks.Verifier("root", ["ERR-009"], "t")
    checks.check_no_hang(verify, run)
    (violation,) = verify.violations["ERR-009"]
    assert violation.observed.startswith(observed), violation.observed


def test_no_suite_test_body_names_a_requirement_id():
    # A body takes its requirement from ``verify`` (the test's @requirement marker); an ID
    # written again in the body could disagree with the marker.
    for path in sorted((Path(catalogue.__file__).parent / "suite").glob("test_*.py")):
        for fn in ast.parse(path.read_text()).body:
            if isinstance(fn, ast.FunctionDef):
                named = [
                    node.value
                    for stmt in fn.body
                    for node in ast.walk(stmt)
                    if isinstance(node, ast.Constant) and node.value in requirements.CATALOGUE
                ]
                assert not named, f"{path.name}::{fn.name} names {named}"


def test_the_payloads_own_status_is_read_from_its_output():
    out = (
        "Name:\tcat\nPid:\t7\nUid:\t999\t999\t999\t999\nGid:\t995\t995\t995\t995\n"
        "CapInh:\t0000000000000000\nCapPrm:\t0000000000200000\nCapEff:\t0000000000200000\n"
        "CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n"
        "         0          0 4294967295\n"
    )
    snap = checks.parse_payload_status(out)
    assert snap["threads"][0]["caps"]["permitted"] == ["CAP_SYS_ADMIN"]
    host = probe.host_userns()
    assert probe.host_privilege(dict(snap, ns={"user": host[1]}), host)
    # the payload's user namespace decides, not its uid_map (which maps the full range)
    assert not probe.host_privilege(dict(snap, ns={"user": host[1] + 1}), host)
    assert checks.parse_payload_status("garbage") is None


# --- capabilities --------------------------------------------------------------------------------


def test_capabilities_are_properties_with_one_line_docstrings():
    assert Capabilities.names() == ["host_payloads", "fault_injection", "join_only"]
    for name in Capabilities.names():
        assert "\n" not in Capabilities.describe(name)
    with pytest.raises(capabilities.UnknownCapability, match="known: host_payloads"):
        Capabilities.describe("teleport")


def test_an_engine_declares_capabilities_on_its_operations_class_or_by_registration():
    class Faulty(Capabilities):
        @property
        def fault_injection(self) -> bool:
            return True

    class Ops:
        conformance_capabilities = Faulty

    reg = SimpleNamespace(name="unit-engine", factory=Ops)
    caps, source = capabilities.for_engine(reg)
    assert caps.as_dict()["fault_injection"] and source.endswith("conformance_capabilities")
    capabilities.register_capabilities("unit-engine", Capabilities)
    try:
        caps, source = capabilities.for_engine(reg)
        assert not caps.fault_injection and source == "register_capabilities"
    finally:
        capabilities._registered.pop("unit-engine")
    with pytest.raises(TypeError):
        capabilities.register_capabilities("unit-engine", object())


# --- known failures, outcomes, report ------------------------------------------------------------


def test_known_failures_need_a_reason_and_a_matching_test():
    index = catalogue.tests_by_requirement()
    entries = outcomes.parse_known_failures(
        "# comment\n\nPRIV-MASTER-002[suid]: upstream keeps CAP_SETUID\nEXIT-002: why\n",
        "k.txt",
        index,
    )
    assert [(e.requirement, e.flows, e.line) for e in entries] == [
        ("PRIV-MASTER-002", ("suid",), 3),
        ("EXIT-002", X.FLOWS, 4),
    ]
    assert outcomes.known_failure(entries, "PRIV-MASTER-002", "hybrid") is None
    with pytest.raises(outcomes.KnownFailuresError, match="matches no test"):
        outcomes.parse_known_failures("PRIV-MASTER-002[root]: no such cell\n", "k.txt", index)


def test_several_tests_of_one_requirement_and_flow_merge_into_the_worst_outcome():
    results = outcomes.Results()
    results.add("a", "call", [outcomes.result("EXIT-001", "root", "real", "passed", "a", "")])
    results.add(
        "b", "setup", [outcomes.result("EXIT-001", "root", "real", "not-configured", "b", "why")]
    )
    results.add("c", "call", [outcomes.result("EXIT-001", "suid", "real", "passed", "c", "")])
    results.add(
        "c",
        "teardown",
        [outcomes.result("EXIT-001", "suid", "real", "broken", "c", "teardown error")],
    )
    merged = {(e["requirement"], e["flow"]): e for e in results.merged()}
    assert merged[("EXIT-001", "root")]["outcome"] == "not-configured"
    assert merged[("EXIT-001", "root")]["tests"] == ["a", "b"]
    assert merged[("EXIT-001", "suid")]["outcome"] == "broken"


def test_the_report_validator_finds_inconsistencies():
    entry = outcomes.result("EXIT-001", "root", "real", "passed", "t", "", ["root/x"])
    entry["tests"] = ["t"]
    doc = {key: {} for key in report.TOP_KEYS}
    doc.update(
        schema_version=1,
        results=[entry, dict(entry)],
        runs=[],
        unchecked=[],
        known_failures=[],
        summary={"passed": 1, "total": 1},
        environment={
            "kernel": "",
            "python": "",
            "uid": 0,
            "user_namespaces": True,
            "flows": {},
            "backend": {},
        },
        suite_version="0",
        generated="now",
        engine={"name": "e", "origin": "o"},
    )
    problems = report.validate(doc)
    assert any("second entry" in p for p in problems)
    assert any("refers to run 'root/x'" in p for p in problems)
    assert any("summary['passed']" in p for p in problems)


def test_order_001_counts_the_starters_init_config_calls_not_the_engines_own() -> None:
    from conformance import expectations

    (rule,) = (
        r
        for r in expectations.ORDER_RULES
        if isinstance(r, expectations.Count)
        and r.requirement == "ORDER-001"
        and (r.point.role, r.point.hook) == ("master", "init_config")
    )

    def problems(*callers: str | None) -> list[object]:
        events = [
            {"seq": i, "kind": "hook_enter", "role": "master", "hook": "init_config"}
            | ({"caller": c} if c else {})
            for i, c in enumerate(callers)
        ]
        return [f.problem for f in checks.order_rule_for(rule).check(events) if f.problem]

    assert problems(None) == []
    assert problems(None, "engine") == []  # the engine calling its own hook again
    assert problems(None, None)  # the starter calling it twice
    assert problems()  # or never


def test_a_snapshot_the_kit_could_not_read_decides_no_privilege_rule() -> None:
    # A failed read has no threads: every rule over "every thread" would pass on none.
    failed = {"probe_error": "FileNotFoundError: /proc/self/status"}
    run = make_run(
        "suid",
        [
            hook("hook_enter", "stage2", "start_process", failed),
            hook("hook_return", "stage2", "start_process", failed),
        ],
    )
    verify = checks.Verifier("suid", ["PRIV-STAGE2-003"], "t")
    with pytest.raises(checks.HarnessError, match="could not read the process's privileges"):
        checks.check_privileges(verify, run)
