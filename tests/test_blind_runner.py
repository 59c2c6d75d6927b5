"""``python -m mutants blind`` (mutants/blind.py): discovery, verdicts, exit status, shards."""

from __future__ import annotations

import ast
import glob
import os
import sys
from typing import Any

import pytest

from mutants import blind
from mutants.__main__ import main as mutants_main

TESTS = os.path.dirname(os.path.abspath(__file__))


def _declared_engines() -> dict[str, tuple[str, bool]]:
    """module:Class → (engine name, correct) for every class of tests/blind*.py whose body
    sets engine_name, read from the source (not by the runner's import-based discovery)."""
    out = {}
    for path in glob.glob(os.path.join(TESTS, "blind*.py")):
        module = os.path.basename(path)[:-3]
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and [getattr(t, "id", None) for t in stmt.targets] == ["engine_name"]
                    and isinstance(stmt.value, ast.Constant)
                ):
                    out[f"{module}:{node.name}"] = (
                        stmt.value.value,
                        module.endswith("_correct"),
                    )
    return out


def test_discovery_finds_every_engine_of_the_blind_modules_with_its_kind():
    engines = blind.discover()
    assert {e.spec: (e.name, e.correct) for e in engines} == _declared_engines()
    assert len({e.name for e in engines}) == len(engines)
    # the files the closing note counted: 61 buggy engines, the correct ones of blind_correct
    old = [e for e in engines if e.module in ("blind_priv", "blind_ns", "blind_rpc", "blind_host")]
    assert len(old) == 61 and not any(e.correct for e in old)
    assert all(e.correct for e in engines if e.module == "blind_correct")
    assert all(e.summary for e in engines)


def test_a_mark_of_the_wrong_kind_or_a_module_that_does_not_import_is_refused(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(sys, "path", list(sys.path))  # discover() puts tmp_path on it
    (tmp_path / "blind_zz_correct.py").write_text(
        "class Engine:\n    engine_name = 'blind-zz'\n    escapes = 'wrong: a correct engine'\n"
    )
    with pytest.raises(ValueError, match="correct engine has no escapes mark"):
        blind.discover(str(tmp_path))
    # A mark is the class's own: a buggy subclass of a correct engine marked false_failure
    # is an ordinary buggy engine, neither refused nor known to fail falsely.
    (tmp_path / "blind_zz_correct.py").unlink()
    (tmp_path / "blind_zy_correct.py").write_text(
        "class Engine:\n    engine_name = 'blind-zy'\n    false_failure = 'disputed'\n"
    )
    (tmp_path / "blind_zy.py").write_text(
        "from blind_zy_correct import Engine\n"
        "class Buggy(Engine):\n    engine_name = 'blind-zy-buggy'\n"
    )
    found = {e.spec: e for e in blind.discover(str(tmp_path))}
    assert found["blind_zy_correct:Engine"].known == "disputed"
    assert found["blind_zy:Buggy"].known == "" and not found["blind_zy:Buggy"].correct
    (tmp_path / "blind_zy.py").unlink()
    (tmp_path / "blind_zy_correct.py").unlink()
    (tmp_path / "blind_zz_broken.py").write_text("import no_such_module_at_all\n")
    with pytest.raises(ValueError, match=r"blind_zz_broken\.py: does not import"):
        blind.discover(str(tmp_path))


def _engine(correct: bool = False, known: str = "") -> blind.BlindEngine:
    return blind.BlindEngine("blind_x", "Engine", "blind-x", correct, known, "one bug")


def _result(req: str, outcome: str, subject: str = "engine", flow: str = "root") -> dict:
    message = f"{req} {outcome} in {flow}"
    return {
        "requirement": req,
        "outcome": outcome,
        "subject": subject,
        "flow": flow,
        "message": message,
    }


def _doc(*results: dict[str, Any], error: str | None = None) -> dict[str, Any]:
    base = [_result("ORDER-001", "passed")]
    return {"results": [*base, *results], "seconds": 3.0, **({"error": error} if error else {})}


def test_a_buggy_engine_is_caught_only_by_an_engine_requirement():
    caught = blind.classify(
        _engine(),
        _doc(_result("SIG-002", "failed"), _result("SIG-002", "failed", flow="suid")),
    )
    assert (caught["verdict"], caught["ok"], caught["failed"]) == (
        "caught",
        True,
        {"SIG-002": ["root", "suid"]},
    )
    assert caught["messages"] == {"SIG-002": "SIG-002 failed in root"}  # the first one
    # a kit requirement and a harness error alone catch nothing
    kit_only = blind.classify(
        _engine(), _doc(_result("ERR-002", "failed", subject="kit"), _result("NS-001", "broken"))
    )
    assert (kit_only["verdict"], kit_only["ok"]) == ("escaped", False)
    assert kit_only["kit_failed"] == ["ERR-002"] and kit_only["broken"] == ["NS-001"]
    assert "not marked" in kit_only["problem"]
    # a result a failed-early run left open catches it, flagged as such
    undecided = blind.classify(_engine(), _doc(_result("SIG-004", "not-decided")))
    assert (undecided["verdict"], undecided["undecided_only"]) == ("caught", True)


def test_known_escapes_and_false_failures_pass_and_stale_marks_fail():
    known = blind.classify(_engine(known="the suite cannot see it"), _doc())
    assert (known["verdict"], known["ok"], known["known"]) == (
        "escaped",
        True,
        "the suite cannot see it",
    )
    stale = blind.classify(_engine(known="old"), _doc(_result("SIG-002", "failed")))
    assert (stale["verdict"], stale["ok"]) == ("caught", False) and "stale" in stale["problem"]
    false = blind.classify(_engine(correct=True), _doc(_result("PRIV-RPC-004", "failed")))
    assert (false["verdict"], false["ok"]) == ("false-failure", False)
    marked = blind.classify(
        _engine(correct=True, known="SPEC question"), _doc(_result("PRIV-RPC-004", "failed"))
    )
    assert (marked["verdict"], marked["ok"]) == ("false-failure", True)
    kit = blind.classify(_engine(correct=True), _doc(_result("ERR-002", "failed", subject="kit")))
    assert (kit["verdict"], kit["ok"]) == ("passed", True)
    stale_ff = blind.classify(_engine(correct=True, known="old"), _doc())
    assert (stale_ff["verdict"], stale_ff["ok"]) == ("passed", False)


def test_an_engine_the_preflight_refuses_is_judged_by_the_refusal():
    # The session stops before any lifecycle with a usage error that names the engine's hook
    # (an invalid StarterConfig in one flow): a buggy engine is caught, a correct one fails.
    refusal = (
        "no report (pytest exit 4): ERROR: conformance: preflight of engine 'm:E' (from the "
        "command line (--engine)) failed, no lifecycle was run:\n  engine m:E: "
        "prepare_config: fix the StarterConfig that prepare_config fills in the suid flow"
    )
    caught = blind.classify(_engine(), {"error": refusal, "seconds": 1.0})
    assert (caught["verdict"], caught["ok"], caught["failed"]) == (
        "caught",
        True,
        {"preflight": ["suid"]},  # the flow the refusal names
    )
    assert "fix the StarterConfig" in caught["messages"]["preflight"]
    false = blind.classify(_engine(correct=True), {"error": refusal, "seconds": 1.0})
    assert (false["verdict"], false["ok"]) == ("false-failure", False)
    # Any other usage error (the engine cannot be imported, a bad option) judges nothing.
    other = blind.classify(_engine(), {"error": "no report (pytest exit 4): ERROR: --flow: x"})
    assert (other["verdict"], other["ok"]) == ("error", False)


def test_a_session_without_a_report_or_without_a_decided_result_is_an_error():
    crashed = blind.classify(_engine(correct=True), _doc(error="no report (pytest exit 3)"))
    assert (crashed["verdict"], crashed["ok"]) == ("error", False)
    skipped = {"results": [_result("ORDER-001", "not-configured")], "seconds": 1.0}
    nothing = blind.classify(_engine(known="escapes anyway"), skipped)
    assert (nothing["verdict"], nothing["ok"]) == ("error", False)


def test_the_exit_status_is_1_for_any_entry_that_is_not_ok_and_the_table_counts():
    entries = [
        blind.classify(_engine(), _doc(_result("SIG-002", "failed"))),
        blind.classify(_engine(known="why"), _doc()),
        blind.classify(_engine(correct=True), _doc()),
    ]
    assert blind.exit_status(entries) == 0
    text = blind.table(entries, 12.0)
    assert "buggy engines: caught 1 of 2; escaped 1 (1 known)" in text
    assert "correct engines: passed 1 of 1; false failures 0 (0 known)" in text
    assert blind.tally(entries)["blind_x"]["known"] == 1
    entries.append(blind.classify(_engine(), _doc()))  # an unmarked escape
    assert blind.exit_status(entries) == 1
    assert "escaped: blind_x:Engine (NOT MARKED)" in blind.table(entries, 12.0)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_the_shards_partition_the_engines_the_same_way_every_time(count):
    engines = blind.discover()
    parts = [blind.shard(engines, k, count) for k in range(1, count + 1)]
    specs = [e.spec for part in parts for e in part]
    assert sorted(specs) == sorted(e.spec for e in engines)  # each exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # every session costs the same
    assert parts == [blind.shard(engines, k, count) for k in range(1, count + 1)]


def test_only_patterns_select_by_name_spec_or_module_and_a_bad_one_is_refused():
    engines = blind.discover()
    assert [e.spec for e in blind.select(engines, ["blind-monitor-drops-sighup"])] == [
        "blind_rpc:MonitorDropsSighup"
    ]
    in_ns = blind.select(engines, ["blind_ns:*"])
    assert in_ns and {e.module for e in in_ns} == {"blind_ns"}
    correct = {e.module for e in engines if e.module.endswith("_correct")}
    assert {e.module for e in blind.select(engines, ["_correct"])} == correct
    with pytest.raises(ValueError, match="matches no engine"):
        blind.select(engines, ["no-such-engine"])


@pytest.mark.parametrize(
    "args",
    [["--only", "no-such-engine"], ["--shard", "3/2"], ["--flow", "nowhere"], ["-j", "0"]],
)
def test_python_m_mutants_blind_refuses_bad_arguments_with_status_2(args, capsys):
    assert mutants_main(["blind", *args]) == 2
    assert "python -m mutants blind: " in capsys.readouterr().err


def test_the_listing_runs_nothing(capsys):
    assert mutants_main(["blind", "--only", "blind_rpc:Monitor*", "--list"]) == 0
    out = capsys.readouterr().out
    assert "blind_rpc:MonitorDropsSighup" in out and "blind_priv" not in out


def test_one_buggy_and_one_correct_engine_judged_by_real_sessions():
    if os.geteuid() != 0:
        pytest.skip("the root flow needs uid 0")
    engines = blind.select(
        blind.discover(), ["blind_rpc:MonitorDropsSighup", "blind_correct:HelperThreadsEngine"]
    )
    lines: list[str] = []
    entries = blind.run(engines, flows=("root",), progress=lines.append)
    by_spec = {e["spec"]: e for e in entries}
    buggy = by_spec["blind_rpc:MonitorDropsSighup"]
    assert (buggy["verdict"], buggy["failed"]) == ("caught", {"SIG-002": ["root"]}), buggy
    correct = by_spec["blind_correct:HelperThreadsEngine"]
    assert (correct["verdict"], correct["failed"]) == ("passed", {}), correct
    assert blind.exit_status(entries) == 0 and len(lines) == 2


def test_an_engine_names_the_backend_that_shows_its_bug_and_a_bad_one_is_refused(
    tmp_path, monkeypatch
):
    engines = {e.spec: e for e in blind.discover()}
    assert engines["blind5_rpc:DirectTmpfsMount"].backend == "fake"
    assert engines["blind5_rpc:CapsLeakOnErrorPath"].backend == "real"  # the default
    entry = blind.classify(
        engines["blind5_rpc:DirectTmpfsMount"], _doc(_result("HOST-050", "failed"))
    )
    assert entry["backend"] == "fake" and "(fake backend)" in blind.line(entry)
    monkeypatch.setattr(sys, "path", list(sys.path))  # discover() puts tmp_path on it
    (tmp_path / "blind_zz.py").write_text(
        "class Engine:\n    engine_name = 'blind-zz'\n    blind_backend = 'kernel'\n"
    )
    with pytest.raises(ValueError, match="blind_backend 'kernel' is not one of real, fake"):
        blind.discover(str(tmp_path))
