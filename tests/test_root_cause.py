"""Root cause first and an honest verdict (issue 15): a run that fails early is one headline,
not dozens of failed requirements; the verdict says what was checked and what was not."""

from __future__ import annotations

import os
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from suite_session import suite

from conformance import render, rootcause

ROOT = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the real root flow needs root")


def section(stdout: str) -> str:
    """The plugin's terminal section, its wrapped lines joined (words are never cut)."""
    return " ".join(stdout.split("= conformance =", 1)[1].split())


@needs_root
def test_a_stage_1_exception_is_one_headline_and_no_failed_must(tmp_path):
    proc, doc = suite("author_engines:Stage1RaisesEngine", tmp_path, "--flow=root")
    assert proc.returncode == 1, proc.stdout[-3000:]
    failed_must = [e for e in doc["results"] if e["outcome"] == "failed" and e["level"] == "MUST"]
    assert failed_must == []
    undecided = [e for e in doc["results"] if e["outcome"] == "not-decided"]
    assert len(undecided) > 20
    headline = (
        "the run failed at prepare_config (stage1): RuntimeError: the author forgot to "
        "handle this flow"
    )
    assert {e["message"] for e in undecided} == {"not decided: " + headline}
    assert [c["headline"] for c in doc["root_causes"]] == [headline]
    out = section(proc.stdout)
    assert out.count("ROOT CAUSE:") == 1 and "ROOT CAUSE: " + headline in out
    assert "what to change: make prepare_config (stage1) not raise" in out
    # the full traceback, once, down to the engine's own line
    assert out.count("Traceback (most recent call last)") == 1
    assert out.count('raise RuntimeError(STAGE1_MESSAGE)') == 1
    assert "FAILED " not in out
    v = render.verdict(doc)
    assert v.code == render.NOT_CONFORMANT and v.reasons[0].startswith(headline)
    md = render.summary_markdown(doc, v)
    assert md.count("## Root causes") == 1 and md.count("raise RuntimeError(STAGE1_MESSAGE)") == 1
    assert "## Failures" not in md


@needs_root
def test_a_hook_returning_the_wrong_type_is_the_headline_of_what_it_breaks(tmp_path):
    proc, doc = suite("author_engines:MonitorReturnsNoneEngine", tmp_path, "--flow=root")
    assert proc.returncode == 1, proc.stdout[-3000:]
    headline = (
        "the run failed at monitor_container (master): TypeError: monitor_container "
        "returned None, not a wait status"
    )
    assert [c["headline"] for c in doc["root_causes"]] == [headline]
    assert not [e for e in doc["results"] if e["outcome"] == "failed"]
    by_req = {e["requirement"]: e for e in doc["results"]}
    assert by_req["EXIT-001"]["outcome"] == "not-decided"  # read from the failed runs
    assert by_req["PRIV-STAGE1-001"]["outcome"] == "passed"  # stage 1 went fine: still decided
    assert "what to change: make monitor_container (master) return what SPEC §1 asks" in section(
        proc.stdout
    )
    html = render.html_report(doc)
    assert html.count('class="failure root-cause"') == 1


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.ids += [v for k, v in attrs if k == "id" and v]


# --- rootcause.find on ledgers --------------------------------------------------------------


def ev(kind: str, **fields) -> dict:
    return {"kind": kind, "role": fields.pop("role", "master"), **fields}


def test_a_fault_scenario_failing_where_asked_has_no_root_cause():
    events = [
        ev("hook_enter", hook="create_container"),
        ev("hook_raise", hook="create_container", error={"type": "E", "message": "x"}),
        ev("fatal", message="container creation failed: x"),
    ]
    assert rootcause.find("fault:create_container", events) is None
    assert (
        rootcause.find("default", events).headline
        == "the run failed at create_container (master): E: x"
    )


def test_a_fault_scenario_failing_before_the_faulted_hook_names_the_earlier_failure():
    events = [
        ev("hook_enter", hook="prepare_config", role="stage1"),
        ev(
            "hook_raise",
            hook="prepare_config",
            role="stage1",
            error={"type": "KeyError", "message": "'flow'", "traceback": "Traceback …"},
        ),
        ev("starter_error", role="starter", stage="starter", message="stage 1 failed"),
    ]
    cause = rootcause.find("fault:create_container", events)
    assert cause is not None and cause.hook == "prepare_config" and cause.role == "stage1"
    assert cause.traceback == "Traceback …"
    assert cause.advice.startswith("make prepare_config (stage1) not raise")


def test_a_failure_after_the_requested_one_that_the_error_table_does_not_predict_is_a_cause():
    events = [
        ev("hook_enter", hook="start_process", role="stage2"),
        ev("stage2_failed", role="master", message="start_process failed"),
        ev(
            "fatal",
            message="monitor_container returned None, not a wait status",
            error={"type": "TypeError", "message": "…"},
        ),
    ]
    assert rootcause.find("exec-failure", events[:2]) is None
    cause = rootcause.find("exec-failure", events)
    assert cause is not None and cause.hook == "monitor_container"


def test_a_rejected_starter_config_tells_to_fix_prepare_config():
    events = [
        ev(
            "starter_error",
            role="starter",
            stage="starter_config",
            message="set_capabilities: effective CAP_X is not permitted",
        )
    ]
    cause = rootcause.find("default", events)
    assert cause.advice.startswith("fix the StarterConfig that prepare_config fills")
    assert "set_capabilities" in cause.headline


def test_a_hook_timeout_in_create_container_points_at_spec_rule_5():
    events = [
        ev(
            "hook_timeout",
            role="supervisor",
            hook="create_container",
            hook_role="master",
            seconds=5,
        )
    ]
    cause = rootcause.find("default", events)
    assert cause.role == "master" and "SPEC §2 rule 5" in cause.advice


def test_a_run_timeout_with_no_hook_open_names_no_hook():
    events = [ev("hook_timeout", role="supervisor", hook="", hook_role="", seconds=5)]
    cause = rootcause.find("default", events)
    assert cause.headline == (
        "the run failed between hooks: run timeout: no hook was open when the run's 5 s were up"
    )
    assert "RPC server that does not exit" in cause.advice
    assert render.describe(events[0]) == "run timeout after 5 s, no hook open"


# --- the honest verdict ------------------------------------------------------------------------


def _doc(entries, strict=False, selected=("root",)):
    from test_render import make_doc

    doc = make_doc(entries, strict=strict)
    for flow in ("root", "suid", "userns", "fakeroot", "hybrid"):
        doc["environment"]["flows"].setdefault(
            flow, {"runnable": True, "reason": "", "backend": "real"}
        )
        doc["environment"]["flows"][flow]["selected"] = flow in selected
    return doc


NS = "the engine does not declare capability fault_injection (it fails on request)"


def test_the_verdict_counts_must_requirements_checked_and_names_the_capability_to_declare():
    doc = _doc([("ORDER-001", "root", "passed", ""), ("ERR-003", "root", "not-supported", NS)])
    v = render.verdict(doc)
    assert v.code == render.CONFORMANT
    assert "MUST requirements checked: root 1 of 2" in v.reasons
    assert (
        "not checked in root: 1 not-supported (declare capability fault_injection (1))" in v.reasons
    )
    assert "flows not checked (not selected): suid, userns, fakeroot, hybrid" in v.reasons


def test_strict_fails_when_a_must_requirement_could_not_be_checked():
    doc = _doc([("ORDER-001", "root", "passed", ""), ("ERR-003", "root", "not-supported", NS)])
    v = render.verdict(doc, strict=True)
    assert v.code == render.NOT_CONFORMANT
    assert any("1 MUST not-supported" in r for r in v.reasons)
    should = [r for r in ("ORDER-001",)]  # a passing MUST alone: strict is fine
    assert render.verdict(_doc([(should[0], "root", "passed", "")]), strict=True).ok


# --- wrapping -----------------------------------------------------------------------------------

LONG_PATH = "/var/lib/engines/" + "very-long-directory-name/" * 5 + "payload"


def test_terminal_lines_are_wrapped_between_words_and_never_cut():
    from test_render import make_doc

    message = (
        "PRIV-MASTER-001 [MUST] text\n  flow: suid   role: master   hook: create_container\n"
        f"  expected: the payload {LONG_PATH} runs with the uids of the flow and nothing "
        "else, whatever the engine configured for it\n  observed: it ran elsewhere"
    )
    doc = make_doc([("PRIV-MASTER-001", "suid", "failed", message)])
    lines = render.terminal_summary(doc, render.verdict(doc), width=70)
    assert all(len(line) <= 70 or len(line.split()) == 1 for line in lines), lines
    words = " ".join(lines).split()
    assert LONG_PATH in words  # the long path is whole, on a line of its own
    digest = render.violation_digest(message).split()
    joined = " ".join(words)
    assert " ".join(digest) in joined  # every word, in order, none cut
    assert not any(line.endswith("…") for line in lines)


@needs_root
def test_a_starter_config_the_starter_refuses_is_one_headline_naming_prepare_config(tmp_path):
    # the root flow: preflight leaves its prepare_config (run as root) to the lifecycle
    proc, doc = suite("author_engines:EffectiveNotPermittedEngine", tmp_path, "--flow=root")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert not [e for e in doc["results"] if e["outcome"] == "failed" and e["level"] == "MUST"]
    (cause,) = doc["root_causes"]
    assert cause["headline"] == (
        "the run failed at starter_config (starter): starter error: "
        "set_capabilities: effective capabilities must be a subset of "
        "permitted; not permitted: CAP_CHOWN"
    )
    assert cause["advice"].startswith("fix the StarterConfig that prepare_config fills")
    assert section(proc.stdout).count("ROOT CAUSE:") == 1


@needs_root
def test_the_gate_shows_the_root_cause_once_and_exits_1(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run(
        [
            str(ROOT / "ci" / "gate"),
            "--engine",
            "author_engines:Stage1RaisesEngine",
            "--flow",
            "root",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    flat = " ".join(proc.stdout.split())
    assert (
        flat.count(
            "root cause: the run failed at prepare_config (stage1): RuntimeError: "
            "the author forgot to handle this flow"
        )
        == 1
    )
    assert "NOT CONFORMANT (exit 1): the run failed at prepare_config" in flat
    assert "failures, MUST first" not in flat
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md.count("raise RuntimeError(STAGE1_MESSAGE)") == 1
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count('class="failure root-cause"') == 1


@needs_root
def test_strict_fails_the_session_when_a_must_requirement_was_not_supported(tmp_path):
    """The reference engine does not declare every capability (join_only): some MUST
    requirements are never checked; --strict says so and fails, the plain run passes and
    still says it."""
    import re

    plain, doc = suite("reference", tmp_path, "--flow=root")
    assert plain.returncode == 0
    # the verdict counts the engine's MUST requirements only: the kit's are its self-check
    musts = [e for e in doc["results"] if e["level"] == "MUST" and e["subject"] == "engine"]
    unsupported = [e for e in musts if e["outcome"] == "not-supported"]
    assert unsupported, "the reference declares every capability"
    out = section(plain.stdout)
    checked = re.search(r"MUST requirements checked: root (\d+) of (\d+)", out)
    assert checked and int(checked.group(2)) == len(musts)
    assert int(checked.group(1)) == len(musts) - len(unsupported)
    assert f"not checked in root: {len(unsupported)} not-supported (declare capability " in out
    assert "flows not checked (not selected): suid, userns, fakeroot, hybrid" in out
    assert re.search(
        r"harness self-check on this machine: (\d+)/\1 kit requirements hold", " ".join(out.split())
    )
    strict, _ = suite("reference", tmp_path, "--flow=root", "--conformance-strict")
    assert strict.returncode == 1
    assert (
        f"NOT CONFORMANT: strict: {len(unsupported)} result(s) could not be checked "
        f"({len(unsupported)} MUST not-supported, 0 not-configured)"
    ) in section(strict.stdout)
