"""The conformance plugin, tested by running pytest on it (pytester).

Inner sessions run in this process (fast) except where xdist needs real subprocesses. Inner
runs are kept small: one flow, a few tests (``-k`` on requirement IDs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import kit.registry
import kit.run.environment
import kit.run.launcher
from conformance import report
from conformance.requirements import CATALOGUE

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


#: Plugins the inner sessions do without (hypothesis' costs a second per in-process session).
QUIET = ("-p", "no:hypothesispytest", "-p", "no:cacheprovider")


class InnerPytest:
    """pytester with the options every inner session of these tests uses."""

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.path = pytester.path

    def runpytest(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest(*QUIET, *args)

    def runpytest_subprocess(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess(*QUIET, *args)

    def __getattr__(self, name: str):
        return getattr(self.pytester, name)


@pytest.fixture
def tester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> InnerPytest:
    monkeypatch.delenv("CONFORMANCE_ENGINE", raising=False)
    pytester.syspathinsert()
    return InnerPytest(pytester)


def _report(path: Path) -> dict:
    doc = json.loads(path.read_text())
    assert report.validate(doc) == []
    return doc


def _results(doc: dict) -> dict[tuple[str, str], dict]:
    return {(r["requirement"], r["flow"]): r for r in doc["results"]}


def _mutant(tester: InnerPytest, module: str, name: str, body: str) -> str:
    """A module registering a variant of the reference engine; returns its engine spec."""
    source = "\n".join(
        [
            "from kit.registry import register_operations, register_rpc_methods, registered",
            "from reference_engines.minimal import ReferenceEngine, ReferenceRPC",
            "",
            "",
            "class Mutant(ReferenceEngine):",
            textwrap.indent(textwrap.dedent(body).strip(), "    "),
            "",
            "",
            "def register():",
            f"    if {name!r} not in registered():",
            f"        register_operations({name!r}, Mutant)",
            f"        register_rpc_methods({name!r}, ReferenceRPC)",
            "",
        ]
    )
    tester.makepyfile(**{module: source})
    return f"{module}:register"


WRONG_EXIT = """
def monitor_container(self, pid, signals):
    super().monitor_container(pid, signals)
    return 0
"""


# --- activation and options ------------------------------------------------------------------


def test_without_an_engine_the_plugin_does_nothing(tester):
    tester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = tester.runpytest()
    result.assert_outcomes(passed=1)
    assert "conformance" not in result.stdout.str()


def test_an_engine_collects_the_installed_suite_from_any_directory(tester):
    result = tester.runpytest("--engine=reference", "--co", "-q")
    assert result.ret == 0
    collected = [line for line in result.stdout.lines if "::test_" in line]
    assert len(collected) > 200
    assert all("[" in line for line in collected)
    assert any(line.endswith("[hybrid]") for line in collected)


def test_explicit_paths_are_respected(tester):
    tester.makepyfile(test_mine="def test_mine():\n    pass\n")
    result = tester.runpytest("--engine=reference", "test_mine.py")
    result.assert_outcomes(passed=1)


def test_the_command_line_wins_over_the_ini_option_and_the_environment(tester, monkeypatch):
    monkeypatch.setenv("CONFORMANCE_ENGINE", "nope-from-env")
    tester.makeini("[pytest]\nengine = nope-from-ini\n")
    result = tester.runpytest("--engine=reference", "--co")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["conformance: engine 'reference' from the command line*"])


def test_the_ini_option_wins_over_the_environment(tester, monkeypatch):
    monkeypatch.setenv("CONFORMANCE_ENGINE", "nope-from-env")
    tester.makeini("[pytest]\nengine = reference\n")
    result = tester.runpytest("--co")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["conformance: engine 'reference' from the ini option 'engine'*"])


def test_the_environment_variable_is_used_last(tester, monkeypatch):
    monkeypatch.setenv("CONFORMANCE_ENGINE", "reference")
    result = tester.runpytest("--co")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        ["conformance: engine 'reference' from the environment variable CONFORMANCE_ENGINE*"]
    )


def test_an_unknown_engine_fails_at_once_listing_the_known_ones(tester):
    result = tester.runpytest("--engine=no-such-engine")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown engine 'no-such-engine'; known engines: *reference*"])
    assert "collected" not in result.stdout.str()


def test_an_unknown_backend_is_a_usage_error_naming_the_known_ones(tester):
    result = tester.runpytest("--engine=reference", "--backend=bogus")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--backend bogus: unknown backend (known: real, fake, auto)*"])


def test_the_fake_backend_runs_every_flow_and_says_so(tester):
    result = tester.runpytest(
        "--engine=reference", "--backend=fake", "-k", "ORDER-003", "--conformance-report=r.json"
    )
    assert result.ret == 0
    results = _results(_report(tester.path / "r.json"))
    assert {flow for (_, flow) in results} == {"root", "suid", "userns", "fakeroot", "hybrid"}
    assert {r["backend"] for r in results.values()} == {"fake"}
    assert {r["outcome"] for r in results.values()} == {"passed"}


def test_auto_uses_the_fake_backend_for_a_flow_the_machine_cannot_run(tester, monkeypatch):
    _not_runnable(monkeypatch, "userns")
    result = tester.runpytest(
        "--engine=reference", "--flow=root,userns", "-k", "ORDER-003", "--conformance-report=r.json"
    )
    assert result.ret == 0
    results = _results(_report(tester.path / "r.json"))
    assert results[("ORDER-003", "root")]["backend"] == "real"
    assert results[("ORDER-003", "userns")]["backend"] == "fake"
    assert results[("ORDER-003", "userns")]["outcome"] == "passed"


def test_flows_are_given_repeated_or_comma_separated(tester):
    result = tester.runpytest(
        "--engine=reference", "--co", "-q", "--flow", "root,suid", "--flow=userns"
    )
    lines = [line for line in result.stdout.lines if "::test_" in line]
    flows = {line.rsplit("[", 1)[1].rstrip("]") for line in lines}
    assert flows == {"root", "suid", "userns"}
    assert "deselected" in result.stdout.str()


def test_an_unknown_flow_is_a_usage_error(tester):
    result = tester.runpytest("--engine=reference", "--flow=root,rootless")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--flow: unknown flow(s) rootless*"])


def test_requirement_ids_select_tests_with_k(tester):
    result = tester.runpytest("--engine=reference", "--co", "-q", "-k", "PRIV-MASTER-002")
    lines = [line for line in result.stdout.lines if "::test_" in line]
    assert len(lines) == 2  # suid and hybrid only: the privilege table says so
    assert all("no_effective_capabilities" in line for line in lines)


# --- outcomes -----------------------------------------------------------------------------------


def _not_runnable(monkeypatch, flow: str) -> None:
    flows = dict(kit.run.environment.flows())
    flows[flow] = (False, "pretend: no user namespaces here")
    monkeypatch.setattr(kit.run.environment, "flows", lambda: flows)


def test_a_flow_the_machine_cannot_run_is_not_configured_with_its_reason(tester, monkeypatch):
    _not_runnable(monkeypatch, "userns")
    result = tester.runpytest(
        "--engine=reference",
        "--backend=real",
        "--flow=userns",
        "-k",
        "ORDER-003",
        "--conformance-report=r.json",
    )
    assert result.ret == 0
    result.assert_outcomes(skipped=1)
    entry = _results(_report(tester.path / "r.json"))[("ORDER-003", "userns")]
    assert entry["outcome"] == "not-configured"
    assert "pretend: no user namespaces here" in entry["message"]


@pytest.mark.parametrize("option", ["--strict", "--conformance-strict"])
def test_strict_mode_turns_an_environment_skip_into_a_failure(tester, monkeypatch, option):
    _not_runnable(monkeypatch, "userns")
    result = tester.runpytest(
        "--engine=reference",
        "--backend=real",
        "--flow=userns",
        "-k",
        "ORDER-003",
        option,
        "--conformance-report=r.json",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*strict on*"])
    entry = _results(_report(tester.path / "r.json"))[("ORDER-003", "userns")]
    assert entry["outcome"] == "failed"
    assert entry["message"].startswith("not-configured (strict): ")


def test_a_missing_capability_is_not_supported_never_passed(tester):
    result = tester.runpytest(
        "--engine=reference",
        "--flow=root",
        "-k",
        "ERR-002 or JOIN-001",
        "--conformance-report=r.json",
    )
    assert result.ret == 0
    results = _results(_report(tester.path / "r.json"))
    assert results[("JOIN-001", "root")]["outcome"] == "not-supported"
    assert "does not declare capability" in results[("JOIN-001", "root")]["message"]
    # a kit requirement's error path is the kit's own injection: no capability needed
    assert results[("ERR-002", "root")]["outcome"] == "passed"


def test_a_harness_error_is_broken_not_failed(tester, monkeypatch):
    def launch_fails(*args, **kwargs):
        raise kit.run.launcher.LaunchError("pretend: the supervisor could not start")

    monkeypatch.setattr(kit.run.launcher, "run", launch_fails)
    result = tester.runpytest(
        "--engine=reference", "--flow=root", "-k", "ORDER-003", "--conformance-report=r.json"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    entry = _results(_report(tester.path / "r.json"))[("ORDER-003", "root")]
    assert entry["outcome"] == "broken"
    assert "pretend: the supervisor could not start" in entry["message"]


def test_a_failure_names_requirement_expected_observed_flow_role_and_event(tester):
    spec = _mutant(tester, "mutant_exit_a", "wrong-exit-a", WRONG_EXIT)
    result = tester.runpytest(
        f"--engine={spec}", "--flow=root", "-k", "EXIT-001", "--conformance-report=r.json"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "EXIT-001 [[]MUST] SPEC §2 rule 8, §7: The run's exit code equals the payload's exit"
            " code.",
            "  flow: root   role: master",
            "  expected: exit code 7 (a payload that exits 7)",
            "  observed: exit code 0 (exited)",
            "  ledger event: #* exit role=supervisor pid=* tid=*",
            "  run: root/exit-code: exit 0 (exited)",
        ]
    )
    entry = _results(_report(tester.path / "r.json"))[("EXIT-001", "root")]
    assert entry["outcome"] == "failed"
    assert "expected: exit code 7" in entry["message"]
    assert "root/exit-code" in entry["runs"]


def test_a_cooperating_engine_gets_its_error_paths_checked(tester):
    result = tester.runpytest(
        "--engine=conformance.cooperation:register_reference",
        "--flow=root",
        "-k",
        "ERR-003 or ERR-006 or JOIN-002",
        "--conformance-report=r.json",
    )
    assert result.ret == 0, result.stdout.str()
    doc = _report(tester.path / "r.json")
    results = _results(doc)
    for req in ("ERR-003", "ERR-006", "JOIN-002"):
        assert results[(req, "root")]["outcome"] == "passed", results[(req, "root")]
    # the engine fails on request only for its own requirement (ERR-003); the kit's
    # (ERR-006) is the kit's injection even when the engine could cooperate
    scenarios = {run["scenario"]: run["engine_config"] for run in doc["runs"]}
    assert scenarios["fault:start_process"] == {"conformance_fault": "start_process"}
    assert scenarios["inject:cleanup_container"] == {}


# --- known failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        ("EXIT-001[root]\n", "*every known failure needs a reason*"),
        ("EXIT-001[root]:   \n", "*every known failure needs a reason*"),
        ("EXIT-999: whatever\n", "*unknown requirement 'EXIT-999'*"),
        ("EXIT-001[rootless]: whatever\n", "*unknown flow(s) rootless*"),
        ("RPC-007: no test can decide it\n", "*RPC-007[[]root] matches no test of the suite*"),
        (
            "JOIN-001[userns]: join-only runs exist in root and suid only\n",
            "*JOIN-001[[]userns] matches no test*",
        ),
        ("EXIT-001: a\nEXIT-001[root]: b\n", "*EXIT-001[[]root] is already listed at line 1*"),
        ("this is not an entry\n", "*cannot parse*"),
    ],
)
def test_an_invalid_known_failures_file_is_a_usage_error(tester, content, message):
    tester.path.joinpath("known.txt").write_text(content)
    result = tester.runpytest("--engine=reference", "--known-failures=known.txt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_known_failure_that_fails_is_xfail_with_its_reason(tester):
    spec = _mutant(tester, "mutant_exit_b", "wrong-exit-b", WRONG_EXIT)
    tester.path.joinpath("known.txt").write_text(
        "# known failures of wrong-exit-b\nEXIT-001[root]: monitor_container returns 0\n"
    )
    result = tester.runpytest(
        f"--engine={spec}",
        "--flow=root",
        "-k",
        "EXIT-001",
        "--known-failures=known.txt",
        "--conformance-report=r.json",
    )
    assert result.ret == 0
    result.assert_outcomes(xfailed=1)
    doc = _report(tester.path / "r.json")
    entry = _results(doc)[("EXIT-001", "root")]
    assert entry["outcome"] == "xfail"
    assert "known failure (known.txt:2): monitor_container returns 0" in entry["message"]
    assert doc["known_failures"][0]["where"] == "known.txt:2"


def test_a_known_failure_that_passes_is_reported(tester):
    tester.path.joinpath("known.txt").write_text("ORDER-003: pretend it fails\n")
    result = tester.runpytest(
        "--engine=reference",
        "--flow=root",
        "-k",
        "ORDER-003",
        "--known-failures=known.txt",
        "--conformance-report=r.json",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*ORDER-003: unexpected pass*remove the entry*"])
    entry = _results(_report(tester.path / "r.json"))[("ORDER-003", "root")]
    assert entry["outcome"] == "failed"


# --- the report ---------------------------------------------------------------------------------


def test_the_json_report_follows_its_schema(tester):
    result = tester.runpytest(
        "--engine=reference", "--flow=root", "--conformance-report=out/report.json"
    )
    assert result.ret == 0, result.stdout.str()
    doc = _report(tester.path / "out" / "report.json")
    assert doc["schema_version"] == report.SCHEMA_VERSION
    assert doc["engine"]["name"] == "reference"
    assert doc["engine"]["source"] == "the command line (--engine)"
    env = doc["environment"]
    assert env["uid"] == os.getuid() and env["kernel"] and env["python"]
    assert env["backend"] == {flow: "real" for flow in env["flows"]}
    assert isinstance(env["user_namespaces"], bool)
    assert {r["flow"] for r in doc["results"]} == {"root"}
    assert all(r["requirement"] in CATALOGUE and r["level"] == "MUST" for r in doc["results"])
    # every result names its subject, the catalogue's: the verdict counts the engine's only
    assert all(r["subject"] == CATALOGUE[r["requirement"]].subject for r in doc["results"])
    assert {r["subject"] for r in doc["results"]} == {"engine", "kit"}
    assert report.validate(doc) == []
    assert doc["summary"]["broken"] == 0
    assert doc["summary"]["passed"] > 40
    runs = {r["id"]: r for r in doc["runs"]}
    assert "root/default" in runs and runs["root/default"]["ledger"]["events"]
    assert {u["requirement"] for u in doc["unchecked"]} == {"RPC-007"}
    assert "report: out/report.json" in result.stdout.str()


def test_junit_xml_carries_the_requirement_ids(tester):
    result = tester.runpytest(
        "--engine=reference", "--flow=root", "-k", "ORDER-003 or NS-001", "--junitxml=junit.xml"
    )
    assert result.ret == 0
    cases = ET.parse(tester.path / "junit.xml").getroot().iter("testcase")
    properties = {}
    for case in cases:
        for prop in case.iter("property"):
            properties.setdefault(case.get("name"), []).append(
                (prop.get("name"), prop.get("value"))
            )
    assert len(properties) == 2
    for name, props in properties.items():
        assert ("flow", "root") in props and ("backend", "real") in props
        req = "ORDER-003" if "prepare_config" in name else "NS-001"
        assert ("requirement", req) in props
        assert ("conformance_outcome", f"{req}: passed") in props


def test_xdist_gives_the_same_results_as_one_process(tester):
    args = ["--engine=reference", "--flow=root,userns"]
    tester.runpytest_subprocess(*args, "--conformance-report=one.json")
    tester.runpytest_subprocess(*args, "-n", "2", "--conformance-report=two.json")
    docs = [_report(tester.path / name) for name in ("one.json", "two.json")]
    keys = [
        {(r["requirement"], r["flow"], r["test"]): r["outcome"] for r in d["results"]} for d in docs
    ]
    assert keys[0] == keys[1]
    # each lifecycle ran once, on one worker, and its ledger reached the controller
    ids = [r["id"] for r in docs[1]["runs"]]
    assert sorted(ids) == sorted({r["id"] for r in docs[0]["runs"]})
    assert {r["worker"] for r in docs[1]["runs"]} <= {"gw0", "gw1"}


# --- the catalogue -------------------------------------------------------------------------------


def test_the_catalogue_command_prints_every_requirement_with_its_tests():
    out = subprocess.run(
        [sys.executable, "-m", "conformance", "catalogue"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for req in CATALOGUE.values():
        assert f"| {req.id} | {req.level} | {req.subject} | {req.text} |" in out
    assert "## Lifecycle order and counts" in out
    assert (
        "`test_lifecycle_order.py::test_each_process_calls_config_then_init_config_once"
        "_before_any_other_hook`" in out
    )
    assert "not checked: a property of the kit's RPC transport" in out
