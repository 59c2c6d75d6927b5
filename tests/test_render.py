"""Readable reports (conformance.render, conformance.diff): the verdict of a report, summary.md,
report.html — checked on hand-made reports, and on a real one in headless Chromium with no
network (Debian's chromium; KIT_WITH_BROWSER=1 ci/setup installs it; with
KIT_REQUIRE_BROWSER=1 a missing browser is a failure, not a skip)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conformance import diff, render
from conformance import report as schema
from conformance.outcomes import STRICT_PREFIX, Results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "ci"))
import browser  # noqa: E402

U = 999
ALL_CAPS = ["CAP_CHOWN", "CAP_SETUID", "CAP_SETGID", "CAP_SYS_ADMIN"]
HOST_MAP = [[0, 0, 4294967295]]


# --- hand-made reports ---------------------------------------------------------------------------


def snapshot(
    tid: int,
    uid: list[int],
    eff: list[str],
    prm: list[str],
    nnp: bool = False,
    uid_map: list[list[int]] | None = None,
) -> dict:
    return {
        "threads": [
            {
                "tid": tid,
                "uid": uid,
                "gid": uid,
                "groups": [],
                "caps": {
                    "effective": eff,
                    "permitted": prm,
                    "inheritable": [],
                    "bounding": ALL_CAPS,
                    "ambient": [],
                },
                "no_new_privs": nnp,
                "seccomp": 0,
            }
        ],
        "securebits": 0,
        "dumpable": 1,
        "ns": {},
        "uid_map": uid_map or HOST_MAP,
        "gid_map": uid_map or HOST_MAP,
        "nspid": [tid],
    }


def ledger(flow: str, leak_euid: bool = False) -> dict:
    """A small suid-like lifecycle: stage 1, master (two threads), RPC server, stage 2."""
    events: list[dict] = []

    def ev(kind: str, role: str, pid: int, tid: int | None = None, **fields: object) -> None:
        events.append(
            {
                "seq": len(events),
                "t": len(events),
                "kind": kind,
                "role": role,
                "pid": pid,
                "tid": tid or pid,
                **fields,
            }
        )

    master = snapshot(10, [U, U, 0, U], [], ALL_CAPS)
    leaked = snapshot(11, [U, 0, 0, 0], ALL_CAPS, ALL_CAPS)
    ev("run_start", "supervisor", 1, engine="e", flow=flow, backend="real")
    ev("process_start", "starter", 10, ppid=1)
    ev("process_start", "stage1", 20, ppid=10)
    ev(
        "hook_enter",
        "stage1",
        20,
        hook="prepare_config",
        args={"starter_config": {}},
        snapshot=snapshot(20, [U] * 4, [], [], nnp=True),
        escalation={"host_escalation": False},
    )
    ev(
        "hook_return",
        "stage1",
        20,
        hook="prepare_config",
        result=None,
        snapshot=snapshot(20, [U] * 4, [], [], nnp=True),
    )
    ev("process_exit", "starter", 10, child_role="stage1", child_pid=20, status=0)
    ev("process_start", "container", 1, ppid=0)
    ev(
        "hook_enter",
        "master",
        10,
        11,
        hook="create_container",
        args={"pid": 30},
        snapshot=snapshot(11, [U, U, 0, U], [], ALL_CAPS),
        escalation={"host_escalation": True},
    )
    ev(
        "hook_enter",
        "master",
        10,
        12,
        hook="monitor_container",
        args={"pid": 30},
        snapshot=master,
        escalation={"host_escalation": True},
    )
    ev("process_start", "rpc", 2, ppid=1)
    ev("rpc_call", "rpc", 2, method="e.mount", args={"target": "/proc"}, ok=True)
    ev(
        "hook_return",
        "master",
        10,
        11,
        hook="create_container",
        result=None,
        snapshot=leaked if leak_euid else snapshot(11, [U, U, 0, U], [], ALL_CAPS),
    )
    ev("process_exit", "container", 1, child_role="rpc", child_pid=2, status=0)
    ev("process_start", "stage2", 1, ppid=0)
    ev(
        "hook_enter",
        "stage2",
        1,
        hook="start_process",
        args={"master_fd": 5},
        snapshot=snapshot(1, [0, 0, 0, 0], [], [], nnp=True, uid_map=[[0, U, 1]]),
        escalation={"host_escalation": False},
    )
    ev("stage2_exec", "master", 10, 13)
    ev("signal", "master", 10, name="SIGCHLD", signum=17, sender=30)
    ev("hook_return", "master", 10, 12, hook="monitor_container", result=0, snapshot=master)
    ev("exit", "supervisor", 1, code=0, reason="exited")
    return {"schema_version": 1, "run": {"flow": flow}, "events": events}


def make_doc(
    entries: list[tuple[str, str, str, str]],
    strict: bool = False,
    runnable: dict[str, bool] | None = None,
    leak_euid: bool = False,
) -> dict:
    """A valid schema-1 report; ``entries``: (requirement, flow, outcome, message)."""
    from conformance import requirements

    results = Results()
    for i, (req, flow, outcome, message) in enumerate(entries):
        entry = {
            "requirement": req,
            "subject": requirements.get(req).subject,
            "level": requirements.get(req).level,
            "section": requirements.get(req).section,
            "text": requirements.get(req).text,
            "flow": flow,
            "backend": "real",
            "outcome": outcome,
            "test": f"test_x.py::test_{i}[{flow}]",
            "message": message,
            "runs": [f"{flow}/default"],
            "checks": 1,
        }
        results.add(f"n{i}", "call", [entry])
    merged = results.merged()
    flows = sorted({e[1] for e in entries})
    runnable = runnable or {}
    doc = {
        "schema_version": schema.SCHEMA_VERSION,
        "suite_version": "0.1.0",
        "generated": "2025-01-01T00:00:00+00:00",
        "engine": {
            "spec": "e",
            "name": "e",
            "source": "test",
            "origin": "m:E",
            "capabilities": {},
            "capabilities_source": "defaults",
        },
        "environment": {
            "kernel": "6",
            "machine": "x86_64",
            "python": "3.11",
            "pytest": "9",
            "uid": 0,
            "euid": 0,
            "user_namespaces": True,
            "user_namespaces_reason": "",
            "invoker": {"name": "u", "uid": U},
            "flows": {
                f: {
                    "runnable": runnable.get(f, True),
                    "reason": f"why {f}",
                    "selected": True,
                    "backend": "real",
                }
                for f in flows
            },
            "backend": {f: "real" for f in flows},
            "xdist_workers": 0,
            "strict": strict,
        },
        "summary": Results.summary(merged),
        "results": merged,
        "unchecked": [],
        "known_failures": [],
        "runs": [
            {
                "id": f"{f}/default",
                "flow": f,
                "scenario": "default",
                "backend": "real",
                "argv": ["/bin/true"],
                "engine_config": {},
                "worker": "main",
                "seconds": 0.1,
                "notes": {},
                "error": None,
                "exit_code": 0,
                "reason": "exited",
                "leaks": [],
                "timed_out": None,
                "stdout": "",
                "stderr": "",
                "ledger": ledger(f, leak_euid and f == "suid"),
            }
            for f in flows
        ],
    }
    assert schema.validate(doc) == [], schema.validate(doc)
    return doc


VIOLATION = (
    "PRIV-MASTER-001 [MUST] SPEC §4: …\n"
    "  flow: suid   role: master   hook: create_container\n"
    "  expected: real uid U (999), effective uid U (999), saved uid 0\n"
    "  observed: thread 11: uid real/effective/saved/fs [999, 0, 0, 0]\n"
    "  ledger event: #11 hook_return role=master hook=create_container pid=10 tid=11\n"
    "  run: suid/default: exit 0 (exited)"
)


# --- the verdict ---------------------------------------------------------------------------------


def test_every_must_passing_is_conformant():
    v = render.verdict(
        make_doc([("ORDER-001", "root", "passed", ""), ("ORDER-001", "suid", "passed", "")])
    )
    assert (v.code, v.failing, v.broken) == (render.CONFORMANT, [], [])


def engine_may(doc: dict) -> dict:
    """``doc`` with RPC-007, the catalogue's only MAY (a kit requirement), standing in for a
    MAY of the engine."""
    for e in doc["results"]:
        if e["requirement"] == "RPC-007":
            e["subject"] = "engine"
    return doc


def test_a_failed_must_is_non_conformant_and_listed_first():
    doc = engine_may(
        make_doc(
            [
                ("RPC-007", "root", "failed", "may"),
                ("ORDER-001", "root", "passed", ""),
                ("PRIV-MASTER-001", "suid", "failed", VIOLATION),
            ]
        )
    )
    v = render.verdict(doc)
    assert v.code == render.NOT_CONFORMANT
    assert [e["requirement"] for e in v.failing] == ["PRIV-MASTER-001"]
    assert [e["requirement"] for e in v.warnings] == ["RPC-007"]  # a MAY: not counted


def test_strict_counts_any_failure_and_anything_not_configured():
    doc = engine_may(
        make_doc([("RPC-007", "root", "failed", "may"), ("ORDER-001", "root", "passed", "")])
    )
    assert render.verdict(doc).code == render.CONFORMANT
    assert render.verdict(doc, strict=True).code == render.NOT_CONFORMANT
    doc = make_doc(
        [("ORDER-001", "root", "passed", ""), ("ORDER-001", "suid", "not-configured", "no user")]
    )
    assert render.verdict(doc).code == render.CONFORMANT
    assert render.verdict(doc, strict=True).code == render.NOT_CONFORMANT
    strict_doc = make_doc(
        [("ORDER-001", "root", "passed", ""), ("ORDER-001", "suid", "not-configured", "x")],
        strict=True,
    )
    assert render.verdict(strict_doc).code == render.NOT_CONFORMANT  # the report's own flag


def test_broken_results_are_a_harness_error_unless_something_failed():
    doc = make_doc([("ORDER-001", "root", "passed", ""), ("ORDER-003", "root", "broken", "x")])
    assert render.verdict(doc).code == render.HARNESS_ERROR
    doc = make_doc([("ORDER-001", "root", "failed", "y"), ("ORDER-003", "root", "broken", "x")])
    assert render.verdict(doc).code == render.NOT_CONFORMANT


def test_nothing_that_could_run_here_is_exit_3():
    doc = make_doc(
        [
            ("ORDER-001", "userns", "not-configured", "no userns"),
            ("ORDER-008", "userns", "not-supported", "no fault injection"),
        ],
        runnable={"userns": False},
    )
    v = render.verdict(doc)
    assert v.code == render.NOTHING_RAN
    assert any("userns: why userns" in r for r in v.reasons)
    env_failed = make_doc(
        [("ORDER-001", "userns", "failed", STRICT_PREFIX + "flow userns cannot run here")],
        strict=True,
    )
    assert render.verdict(env_failed).code == render.NOTHING_RAN


def test_no_results_or_nothing_decided_is_a_harness_error():
    assert render.verdict(make_doc([])).code == render.HARNESS_ERROR
    doc = make_doc([("ORDER-008", "root", "not-supported", "no fault injection")])
    assert render.verdict(doc).code == render.HARNESS_ERROR


# --- two subjects: the engine's verdict, the kit's self-check ---------------------------------

SELF_CHECK = "harness self-check on this machine: "


def test_a_failing_kit_requirement_is_a_harness_error_in_one_self_check_line(tmp_path):
    doc = make_doc(
        [
            ("ORDER-001", "root", "passed", ""),
            ("PRIV-MASTER-001", "suid", "passed", ""),
            ("ORDER-007", "root", "failed", VIOLATION),
            ("ORDER-007", "suid", "failed", VIOLATION),
            ("SIG-001", "root", "passed", ""),
        ]
    )
    v = render.verdict(doc)
    line = SELF_CHECK + "1/2 kit requirements hold; failing: ORDER-007 [root,suid]"
    assert (v.code, v.title, v.failing) == (render.HARNESS_ERROR, "harness error", [])
    assert v.reasons[0].startswith(line)
    assert v.reasons[1].startswith("engine: conformant: every MUST that ran passed")
    term = render.terminal_summary(doc, v, width=120)
    assert term[1].startswith("HARNESS ERROR (exit 2): " + line)
    assert sum(SELF_CHECK in t for t in term) == 1 and "failures" not in "".join(term)
    assert "2 results: 2 passed" in "\n".join(term)  # the engine's results only
    v, paths = render.write(doc, tmp_path)
    md = paths["summary"].read_text()
    assert md.startswith("# 💥 Conformance of `e`: harness error (exit 2)")
    assert md.count(SELF_CHECK) == 1 and "ORDER-007 \\[root,suid\\]" in md
    assert "| ORDER-007 |" not in md and "| SIG-001 |" not in md and "| ORDER-001 |" in md
    assert "**2 results: 2 passed" in md
    page = paths["html"].read_text()
    assert page.count(SELF_CHECK) == 1 and 'data-exit="2"' in page
    assert 'data-requirement="ORDER-007"' not in page


def test_the_verdict_counts_engine_musts_only_and_adds_the_self_check_line():
    doc = make_doc(
        [
            ("ORDER-001", "root", "passed", ""),
            ("PRIV-MASTER-001", "root", "failed", VIOLATION),
            ("ORDER-004", "root", "passed", ""),
            ("SIG-001", "root", "passed", ""),
            ("ORDER-008", "root", "not-supported", "does not declare capability fault_injection"),
        ]
    )
    v = render.verdict(doc)
    assert v.code == render.NOT_CONFORMANT
    assert [e["requirement"] for e in v.failing] == ["PRIV-MASTER-001"]
    assert "1 failed result (1 MUST) in 1 requirement" in v.reasons
    assert "MUST requirements checked: root 2 of 2" in v.reasons  # ORDER-004/8, SIG-001: kit
    assert v.reasons[-1] == SELF_CHECK + "2/2 kit requirements hold (1 not checked here)"
    ok = make_doc([("ORDER-001", "root", "passed", ""), ("SIG-001", "root", "passed", "")])
    v = render.verdict(ok)
    assert v.code == render.CONFORMANT
    assert v.reasons[0] == "every MUST that ran passed (1 results decided)"
    assert v.reasons[-1] == SELF_CHECK + "1/1 kit requirements hold"


def test_a_kit_requirement_excused_as_a_known_failure_still_fails_the_self_check():
    v = render.verdict(
        make_doc(
            [
                ("ORDER-001", "root", "passed", ""),
                ("SIG-001", "root", "xfail", "known failure: ours"),
            ]
        )
    )
    assert v.code == render.HARNESS_ERROR
    assert v.reasons[0].startswith(SELF_CHECK + "0/1 kit requirements hold; failing: SIG-001")


def test_a_schema_3_report_names_every_results_subject_and_the_catalogues():
    doc = make_doc([("ORDER-001", "root", "passed", ""), ("SIG-001", "root", "passed", "")])
    assert [e["subject"] for e in doc["results"]] == ["engine", "kit"]
    assert schema.validate(doc) == []
    del doc["results"][0]["subject"]
    doc["results"][1]["subject"] = "engine"
    assert schema.validate(doc) == [
        "results[0]: subject None of ORDER-001 is wrong (the catalogue says 'engine')",
        "results[1]: subject 'engine' of SIG-001 is wrong (the catalogue says 'kit')",
    ]
    doc["results"][1]["subject"] = "harness"
    assert "$.results[1].subject: 'harness' is not one of ['engine', 'kit']" in schema.validate(doc)
    old = make_doc([("ORDER-001", "root", "passed", ""), ("SIG-001", "root", "failed", "x")])
    for e in old["results"]:
        del e["subject"]
    old["schema_version"] = 2  # read too: the catalogue gives each result its subject
    assert schema.validate(old) == []
    assert render.verdict(old).code == render.HARNESS_ERROR


def test_load_rejects_what_is_not_a_report(tmp_path):
    bad = tmp_path / "bad.json"
    for text, why in (
        ("{", "not JSON"),
        ("[]", "JSON object"),
        ('{"schema_version": 1}', "missing key"),
    ):
        bad.write_text(text)
        with pytest.raises(render.ReportError, match=why):
            render.load(bad)
    with pytest.raises(render.ReportError, match="No such file"):
        render.load(tmp_path / "missing.json")


# --- summary.md and the terminal summary ---------------------------------------------------


def test_summary_md_names_the_failing_requirement_first_with_its_message():
    doc = make_doc(
        [
            ("ORDER-001", "root", "passed", ""),
            ("ORDER-001", "suid", "passed", ""),
            ("PRIV-MASTER-001", "suid", "failed", VIOLATION),
            ("PRIV-MASTER-001", "root", "passed", ""),
        ]
    )
    md = render.summary_markdown(doc)
    assert md.startswith("# ❌ Conformance of `e`: NOT conformant (exit 1)")
    headings = [line for line in md.splitlines() if line.startswith("### ")]
    assert headings[0].startswith("### ❌ PRIV-MASTER-001 [MUST] failed in suid")
    assert "observed: thread 11: uid real/effective/saved/fs [999, 0, 0, 0]" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "MUST" in line]
    assert rows[0].startswith("| PRIV-MASTER-001 | MUST | ✅ | ❌ |")  # failing rows first
    assert rows[1].startswith("| ORDER-001 | MUST | ✅ | ✅ |")


def test_summary_md_names_the_tests_that_decide_each_requirement():
    doc = make_doc([("ORDER-001", "root", "passed", "")])
    doc["results"][0]["checked_by"] = ["test_lifecycle_order.py::test_a", "test_b.py::test_b"]
    md = render.summary_markdown(doc)
    assert "| Text | Checked by |" in md
    row = next(line for line in md.splitlines() if line.startswith("| ORDER-001 |"))
    assert row.endswith("| `test_lifecycle_order.py::test_a`<br>`test_b.py::test_b` |")


def test_report_html_names_the_tests_that_decide_each_requirement():
    doc = make_doc([("ORDER-001", "root", "passed", ""), ("ORDER-003", "root", "passed", "")])
    (order1,) = [e for e in doc["results"] if e["requirement"] == "ORDER-001"]
    order1["checked_by"] = ["test_lifecycle_order.py::test_a", "test_b.py::<x>"]
    # ORDER-003 has none, as in a report from before results named their tests
    text = render.html_report(doc)
    assert "<th>Text</th><th>Checked by</th></tr>" in text
    row = re.search(r'<tr data-requirement="ORDER-001">.*?</tr>', text, re.S)
    assert row, "ORDER-001 has a row"
    assert row.group(0).endswith(
        '<td class="checked-by"><code>test_lifecycle_order.py::test_a</code><br>'
        "<code>test_b.py::&lt;x&gt;</code></td></tr>"
    )
    row = re.search(r'<tr data-requirement="ORDER-003">.*?</tr>', text, re.S)
    assert row and row.group(0).endswith('<td class="checked-by"></td></tr>')


def test_terminal_summary_fits_one_screen():
    entries = [
        (r, f, "failed", VIOLATION)
        for r in (
            "ORDER-001",
            "ORDER-003",
            "ORDER-009",
            "ORDER-010",
            "ORDER-011",
            "ORDER-013",
            "ORDER-014",
            "PRIV-MASTER-001",
            "PRIV-MASTER-002",
            "PRIV-MASTER-003",
        )
        for f in ("root", "suid", "userns", "fakeroot", "hybrid")
    ]
    doc = make_doc(entries)
    lines = render.terminal_summary(doc, render.verdict(doc), width=100)
    assert len(lines) <= 30 and max(map(len, lines)) <= 100
    assert lines[1].startswith("NOT CONFORMANT (exit 1)")
    more = re.search(r"… and (\d+) more requirement\(s\)", lines[-1])
    listed = sum(1 for line in lines if re.match(r"  [A-Z-]+-\d+ \[MUST\]", line))
    assert more and listed >= 3 and listed + int(more.group(1)) == 10


# --- report.html --------------------------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_html_is_self_contained():
    doc = make_doc(
        [("PRIV-MASTER-001", "suid", "failed", VIOLATION), ("ORDER-001", "root", "passed", "")],
        leak_euid=True,
    )
    text = render.html_report(doc)
    parser = _Tags()
    parser.feed(text)
    csp = [a for t, a in parser.tags if t == "meta" and a.get("http-equiv")]
    assert csp and "default-src 'none'" in csp[0]["content"]
    for tag, attrs in parser.tags:
        assert tag not in ("script", "link", "img", "iframe", "object"), tag
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not value or value.startswith("#"), (tag, name, value)
    assert not re.search(r"url\(|@import", text)


def test_report_html_expands_a_failure_to_its_ledger_event_and_draws_the_lifecycle():
    doc = make_doc(
        [("PRIV-MASTER-001", "suid", "failed", VIOLATION), ("ORDER-001", "root", "passed", "")],
        leak_euid=True,
    )
    text = render.html_report(doc)
    failure = re.search(
        r'<details class="failure" id="f-PRIV-MASTER-001-suid".*?</details>\s*'
        r"</div>\s*</details>",
        text,
        re.S,
    )
    assert failure, "the failure is expandable"
    block = failure.group(0)
    assert "#11 hook_return role=master hook=create_container" in block
    assert 'href="#ev-suid-default-11"' in block  # to the row in the sequence diagram
    assert "uid 999/0/0 · eff caps 4 · nnp 0 · host userns" in block
    svgs = re.findall(r'<svg class="sequence".*?</svg>', text, re.S)
    assert len(svgs) == 2  # one lifecycle per flow
    suid = next(s for s in svgs if 'data-run="suid/default"' in s)
    lanes = re.findall(r'class="lane-head"[^>]*>([^<]+)<', suid)
    assert lanes == ["supervisor", "starter", "stage1", "master", "container", "rpc", "stage2"]
    assert 'id="ev-suid-default-11"' in suid and 'class="hl"' in suid
    assert "changed: uid 999/0/0 · eff caps 4" in suid  # the leak, at return
    assert "uid 999/999/0 · eff caps none (prm 4) · nnp 0 · host userns" in suid
    assert "uid 0/0/0 · eff caps none · nnp 1 · userns 0→999" in suid  # stage 2
    assert suid.count('class="bar lv-') == 4  # four hooks, each a bar


# --- diff ---------------------------------------------------------------------------------------


def test_diff_lists_regressions_first_and_exits_1(tmp_path):
    old = make_doc(
        [
            ("ORDER-001", "root", "passed", ""),
            ("ORDER-003", "root", "failed", "x"),
            ("ORDER-004", "root", "passed", ""),
            ("ORDER-005", "root", "passed", ""),
            ("ORDER-006", "root", "not-configured", "n"),
        ]
    )
    new = make_doc(
        [
            ("ORDER-001", "root", "failed", VIOLATION),
            ("ORDER-003", "root", "passed", ""),
            ("ORDER-004", "root", "not-configured", "n"),
            ("ORDER-006", "root", "passed", ""),
            ("ORDER-007", "root", "broken", "b"),
        ]
    )
    changes = diff.compare(old, new)
    assert [c.requirement for c in changes["regressions"]] == ["ORDER-001", "ORDER-007"]
    assert [c.requirement for c in changes["fixed"]] == ["ORDER-003"]
    assert {c.requirement for c in changes["undecided"]} == {"ORDER-004", "ORDER-005"}
    assert [c.requirement for c in changes["decided"]] == ["ORDER-006"]
    md = diff.markdown(old, new, changes)
    assert md.index("### ❌ Regressions (2)") < md.index("### ✅ Fixed (1)")
    assert (
        "| ORDER-001 | MUST | root | ✅ passed | ❌ failed | master create\\_container: "
        "expected: real uid U (999)" in md
    )  # engine-controlled text is escaped
    assert "| ORDER-007 | MUST | root | (absent) | 💥 broken |" in md
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    cli = [sys.executable, "-m", "conformance", "diff"]
    proc = subprocess.run(
        [*cli, str(tmp_path / "old.json"), str(tmp_path / "new.json")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "❌ **2 regressions**" in proc.stdout
    proc = subprocess.run(
        [*cli, str(tmp_path / "new.json"), str(tmp_path / "new.json")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "no requirement changed outcome" in proc.stdout
    proc = subprocess.run(
        [*cli, str(tmp_path / "old.json"), str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "nope.json" in proc.stderr


def test_report_subcommand_renders_a_saved_report_and_exits_with_its_verdict(tmp_path):
    doc = make_doc([("PRIV-MASTER-001", "suid", "failed", VIOLATION)])
    saved = tmp_path / "conformance.json"
    saved.write_text(json.dumps(doc))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "conformance", "report", str(saved), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert "NOT CONFORMANT (exit 1)" in proc.stdout
    assert (out / "summary.md").read_text().startswith("# ❌")
    assert "<svg class=\"sequence\"" in (out / "report.html").read_text()
    saved.write_text(json.dumps({**doc, "summary": {}}))
    proc = subprocess.run(
        [sys.executable, "-m", "conformance", "report", str(saved)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "not a valid conformance report" in proc.stderr


# --- a real report in headless Chromium -----------------------------------------------------


def _need_browser() -> None:
    if browser.find() is None:
        if os.environ.get("KIT_REQUIRE_BROWSER") == "1":
            pytest.fail(
                "KIT_REQUIRE_BROWSER=1 but no chromium is installed "
                "(KIT_WITH_BROWSER=1 ci/setup installs it)"
            )
        pytest.skip("no chromium (KIT_WITH_BROWSER=1 ci/setup installs it)")


@pytest.fixture(scope="module")
def real_report(tmp_path_factory) -> Path:
    """A real report of a broken engine (two flows), rendered to report.html."""
    out = tmp_path_factory.mktemp("real-report")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "--engine=gate_engines:SloppyMasterEngine",
            "--flow=root,suid",
            f"--conformance-report={out / 'conformance.json'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    render.write(render.load(out / "conformance.json"), out)
    return out


def test_report_html_renders_in_headless_chromium_without_network(real_report):
    _need_browser()
    dom = browser.dump_dom(real_report / "report.html")
    assert re.search(r'id="verdict"[^>]*data-exit="1"', dom)
    rows = re.findall(r'<tr data-requirement="([^"]+)"', dom)
    assert rows[0] == "PRIV-MASTER-001" and len(rows) > 40  # failing first, then the rest
    assert len(re.findall(r'<td class="o o-failed"', dom)) == 2  # PRIV-MASTER-001/002 in suid
    failures = re.findall(r'<details class="failure" id="([^"]+)"', dom)
    assert failures[:2] == ["f-PRIV-MASTER-001-suid", "f-PRIV-MASTER-002-suid"]
    assert "ledger event</b> <code>#" in dom
    svgs = re.findall(r'<svg class="sequence"[^>]*data-run="([^"]+)"', dom)
    assert svgs[:2] == ["root/default", "suid/default"]
    assert dom.count('class="lane-head"') >= 14  # lanes of both diagrams
    assert "changed: uid 999/0/0 · eff caps 40" in dom  # the engine's leak, in the suid diagram
    png = browser.screenshot(real_report / "report.html", real_report / "report.png", 1200, 900)
    assert browser.png_size(png) == (1200, 900)
    assert png.stat().st_size > 20_000  # a rendered page, not a blank one
