"""The CI gate (``ci/gate``) and coverage across processes (``ci/coverage``), run as a pipeline
would run them: as scripts, in subprocesses, checking exit codes and the files they write."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conformance import kitcov, render

ROOT = Path(__file__).resolve().parent.parent
GATE = ROOT / "ci" / "gate"
COVERAGE = ROOT / "ci" / "coverage"
FOUR = ("junit.xml", "conformance.json", "summary.md", "report.html")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the gate's real flows need root")


def gate(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``ci/gate ARGS`` executed directly (its shebang finds the checkout's venv)."""
    full = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), **(env or {})}
    return subprocess.run(
        [str(GATE), *args], capture_output=True, text=True, env=full, cwd=ROOT, timeout=timeout
    )


def explain(proc: subprocess.CompletedProcess) -> str:
    return (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
        f"{proc.stderr[-4000:]}"
    )


def test_gate_passes_the_reference_engine_and_writes_the_four_files(tmp_path):
    out = tmp_path / "out"
    proc = gate("--engine", "reference", "--out", str(out))
    assert proc.returncode == 0, explain(proc)
    for name in FOUR:
        assert (out / name).stat().st_size > 0, name
    doc = render.load(out / "conformance.json")  # a valid schema-1 report
    assert doc["summary"]["failed"] == doc["summary"]["broken"] == 0
    suite = ET.parse(out / "junit.xml").getroot()
    assert int(suite.find("testsuite").get("tests")) > 100
    assert (
        (out / "summary.md")
        .read_text()
        .startswith("# ✅ Conformance of `reference`: conformant (exit 0)")
    )
    assert 'data-exit="0"' in (out / "report.html").read_text()
    assert "CONFORMANT (exit 0)" in proc.stdout and "took " in proc.stdout
    assert len(proc.stdout.splitlines()) <= 25  # one screen


def test_gate_rejects_a_broken_engine_and_names_the_failing_requirement_first(tmp_path):
    out = tmp_path / "out"
    proc = gate(
        "--engine", "gate_engines:SloppyMasterEngine", "--flow", "root,suid", "--out", str(out)
    )
    assert proc.returncode == 1, explain(proc)
    summary = (out / "summary.md").read_text()
    headings = [line for line in summary.splitlines() if line.startswith("### ")]
    assert headings[0] == "### ❌ PRIV-MASTER-001 [MUST] failed in suid", summary[:2000]
    rows = [
        line
        for line in summary.splitlines()
        if line.startswith("| PRIV") or line.startswith("| ORDER")
    ]
    assert rows[0].startswith("| PRIV-MASTER-001 | MUST |")
    assert "effective uid U (999)" in summary and "ledger event: #" in summary
    assert "NOT CONFORMANT (exit 1)" in proc.stdout
    assert proc.stdout.index("PRIV-MASTER-001") < proc.stdout.index("PRIV-MASTER-002")
    cases = ET.parse(out / "junit.xml").getroot().iter("testcase")
    assert any(c.find("failure") is not None for c in cases)


def test_gate_rejects_a_mutant_of_the_zoo_named_by_import_path(tmp_path):
    out = tmp_path / "out"
    # The zoo is not installed: its directory goes on the import path, as for any engine.
    proc = gate(
        "--engine",
        "mutants.zoo:register_master_keeps_euid_root",
        "--flow",
        "suid",
        "--out",
        str(out),
        env={"PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"},
    )
    assert proc.returncode == 1, explain(proc)
    assert "ci/gate: engine mutant-master-keeps-euid-root (" in proc.stdout
    headings = [
        line for line in (out / "summary.md").read_text().splitlines() if line.startswith("### ")
    ]
    assert headings[0] == "### ❌ PRIV-MASTER-001 [MUST] failed in suid"


def test_a_kit_requirement_failing_is_a_harness_error_not_an_engine_failure(tmp_path):
    out = tmp_path / "out"
    proc = gate("--engine", "gate_engines:broken_kit", "--flow", "root", "--out", str(out))
    assert proc.returncode == 2, explain(proc)
    line = "harness self-check on this machine: "
    screen = " ".join(proc.stdout.split())
    assert re.search(
        r"HARNESS ERROR \(exit 2\): harness self-check on this machine: "
        r"(\d+)/\1?\d* kit requirements hold",
        screen,
    ), screen
    assert "failing: ORDER-002 [root]" in screen and "NOT CONFORMANT" not in screen
    assert "engine: conformant: every MUST that ran passed" in screen
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# 💥 Conformance of `gate-broken-kit`: harness error (exit 2)")
    assert summary.count(line) == 1 and "ORDER-002 \\[root\\]" in summary
    assert "### " not in summary.split("## Requirements × flows")[0]  # no engine failure
    assert "| ORDER-002 |" not in summary
    assert (out / "report.html").read_text().count(line) == 1
    doc = render.load(out / "conformance.json")  # every result names its subject
    results = {r["requirement"]: r for r in doc["results"]}
    assert results["ORDER-002"]["outcome"] == "failed"
    assert results["ORDER-002"]["subject"] == "kit"
    assert {r["subject"] for r in doc["results"]} == {"engine", "kit"}
    assert not [
        r
        for r in doc["results"]
        if r["subject"] == "engine" and r["outcome"] in ("failed", "broken")
    ]


def test_the_gate_is_a_command_of_the_package_and_ci_gate_a_thin_wrapper(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "conformance",
            "gate",
            "--engine",
            "",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, explain(proc)
    assert proc.stderr.startswith("python -m conformance gate: --engine is empty")
    code = [
        line
        for line in GATE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(code) <= 30 and "from conformance.gate import main" in GATE.read_text()


def test_gate_exits_3_when_nothing_can_run_here(tmp_path):
    out = tmp_path / "out"
    proc = gate(
        "--engine",
        "reference",
        "--backend",
        "real",
        "--flow",
        "suid,userns",
        "--out",
        str(out),
        env={"KIT_TEST_USER": "no-such-user-of-the-kit"},
    )
    assert proc.returncode == 3, explain(proc)
    assert "NOTHING COULD RUN HERE (exit 3)" in proc.stdout
    assert "no such user" in proc.stdout
    assert all((out / name).exists() for name in FOUR)


def test_gate_as_an_ordinary_user_runs_the_user_namespace_flows_and_strict_fails_the_rest():
    # As on a hosted runner without sudo: root (and suid, hybrid) cannot run for real.
    out = Path(tempfile.mkdtemp(prefix="kit-gate-user-", dir="/var/tmp"))
    os.chmod(out, 0o777)
    as_user = [
        "runuser",
        "-u",
        "kit-test",
        "--",
        str(GATE),
        "--engine",
        "reference",
        "--backend",
        "real",
        "--flow",
        "root,userns",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    env.pop("KIT_TEST_USER", None)
    try:
        proc = subprocess.run(
            [*as_user, "--out", str(out / "lenient")],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            timeout=600,
        )
        assert proc.returncode == 0, explain(proc)
        assert "not configured on this machine" in proc.stdout
        assert "needs uid 0" in (out / "lenient" / "summary.md").read_text()
        proc = subprocess.run(
            [*as_user, "--strict", "--out", str(out / "strict")],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            timeout=600,
        )
        assert proc.returncode == 1, explain(proc)
        summary = (out / "strict" / "summary.md").read_text()
        assert "(strict: any failure counts)" in summary
        assert "not-configured (strict): flow root cannot run here: needs uid 0" in summary
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_progress_plugin_reports_the_total_then_each_finished_test():
    rfd, wfd = os.pipe()
    env = {**os.environ, "KIT_GATE_PROGRESS_FD": str(wfd)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "conformance.gate_progress",
            "-p",
            "no:cacheprovider",
            "--engine=reference",
            "--flow=root",
            "-k",
            "ORDER-001 or PRIV-STAGE1-001",
        ],
        cwd=ROOT,
        env=env,
        pass_fds=(wfd,),
        stdout=subprocess.DEVNULL,
    )
    os.close(wfd)
    with os.fdopen(rfd) as pipe:
        messages = [json.loads(line) for line in pipe]
    assert proc.wait() == 0
    assert messages[0] == {"total": 2}
    assert [m["outcome"] for m in messages[1:]] == ["passed", "passed"]
    assert all(m["failed"] == 0 and m["nodeid"].endswith("[root]") for m in messages[1:])


@pytest.mark.parametrize(
    "args, message",
    [
        (("--engine", "no-such-engine"), "unknown engine 'no-such-engine'"),
        (("--engine", "gate_engines:NoSuchClass"), "--engine gate_engines:NoSuchClass"),
        (("--engine", "reference", "--flow", "nosuchflow"), "unknown flow(s) nosuchflow"),
        (("--engine", "reference", "--known-failures", "/nonexistent/kf"), "--known-failures"),
        (("--flow", "root"), "the following arguments are required: --engine"),
        (("--engine", "reference", "--", "--no-such-pytest-option"), "pytest usage error (exit 4)"),
    ],
)
def test_gate_usage_errors_exit_2(tmp_path, args, message):
    proc = gate("--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2, explain(proc)
    assert message in proc.stderr, explain(proc)


def test_gate_coverage_measures_the_engine_in_every_process(tmp_path):
    out = tmp_path / "out"
    data = Path(tempfile.mkdtemp(prefix="kit-gate-test-", dir="/var/tmp"))
    try:
        proc = gate(
            "--engine",
            "reference",
            "--flow",
            "suid,fakeroot",
            "--coverage",
            "--cov-data",
            str(data),
            "--cov-fail-under",
            "10",
            "--out",
            str(out),
        )
    finally:
        shutil.rmtree(data, ignore_errors=True)
    assert proc.returncode == 0, explain(proc)
    text = (out / "coverage.txt").read_text()
    assert "reference_engines/minimal/engine.py" in text
    assert ET.parse(out / "coverage.xml").getroot().tag == "coverage"
    line = next(line for line in proc.stdout.splitlines() if "forked processes" in line)
    for hook in (
        "ReferenceEngine.prepare_config (stage1) ok",
        "ReferenceEngine.create_container (master) ok",
        "ReferenceRPC.mount (rpc) ok",
        "ReferenceEngine.start_process (stage2) ok",
    ):
        assert hook in line, line


def test_gate_runs_from_a_bare_environment_through_its_shebang(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [str(GATE), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, explain(proc)
    assert "Exit 0 conformant, 1 not conformant, 2 harness or usage error, 3 nothing" in " ".join(
        proc.stdout.split()
    )
    proc = subprocess.run([sys.executable, str(GATE), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, explain(proc)


# --- ci/coverage ---------------------------------------------------------------------------------


def coverage_config(tmp: Path, patches: bool) -> Path:
    """A config like pyproject's, with its own data directory (never the outer run's)."""
    data = Path(tempfile.mkdtemp(prefix="kit-cov-test-", dir="/var/tmp"))
    patch = "patch =\n    _exit\n    subprocess\n    execv\n" if patches else ""
    rc = tmp / "coveragerc"
    rc.write_text(
        f"[run]\nparallel = true\n{patch}source =\n    kit\ndata_file = {data}/.coverage\n"
    )
    return rc


def run_coverage(rc: Path, *command: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [str(COVERAGE), "--config", str(rc), "--fail-under", "0", "--", *command],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
        )
    finally:
        data = next(
            line.split("=", 1)[1].strip()
            for line in rc.read_text().splitlines()
            if line.startswith("data_file")
        )
        shutil.rmtree(Path(data).parent, ignore_errors=True)


LIFECYCLE = (
    str(ROOT / ".venv/bin/python"),
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:cacheprovider",
    "tests/test_lifecycle.py",
    "-k",
    "every_hook_runs_in_its_process_in_order",
)


def test_coverage_sees_code_that_only_runs_in_forked_children(tmp_path):
    proc = run_coverage(coverage_config(tmp_path, patches=True), *LIFECYCLE)
    assert proc.returncode == 0, explain(proc)
    for name in (
        "Starter._stage1_child",
        "Container.setup_namespaces",
        "Stage2.main",
        "RPCServerProcess.main",
        "Supervisor.run",
    ):
        assert any(
            line.startswith("  ok ") and name in line for line in proc.stdout.splitlines()
        ), (name, proc.stdout[-3000:])
    assert re.match(r"\d+ passed.* in [\d.]+s", proc.stdout.splitlines()[-1])


def test_coverage_fails_when_forked_code_shows_as_unexecuted(tmp_path):
    # Without the _exit and execv patches, children that leave through os._exit or exec
    # never save their data: exactly the loss the check exists to catch.
    proc = run_coverage(coverage_config(tmp_path, patches=False), *LIFECYCLE)
    assert proc.returncode == 1, explain(proc)
    assert (
        "ci/coverage: FAILED: forked code shows as unexecuted: kit/starter/stage2.py::Stage2.main"
        in proc.stdout
    )
    assert re.match(r"\d+ passed.* in [\d.]+s", proc.stdout.splitlines()[-1])  # still last


def test_coverage_passes_on_the_commands_failure_and_no_tests(tmp_path):
    proc = run_coverage(
        coverage_config(tmp_path, patches=True),
        str(ROOT / ".venv/bin/python"),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_gate.py",
        "-k",
        "no_test_matches_this",
    )
    assert proc.returncode == 5, explain(proc)  # pytest's "no tests ran" is a failure
    assert "(pytest: no tests ran)" in proc.stdout


def test_kitcov_sets_aside_corrupt_data_files(tmp_path):

    data = Path(tempfile.mkdtemp(prefix="kit-cov-test-", dir="/var/tmp"))
    try:
        rc = kitcov.write_config(tmp_path / "rc", data / ".coverage", ["kit"])
        kitcov.prepare(data)
        assert oct(data.stat().st_mode & 0o7777) == "0o1777"
        (data / ".coverage.host.pid1.XyZ").write_bytes(b"")  # SIGKILLed before saving
        (data / ".coverage.host.pid2.XyZ").write_bytes(b"SQLite format 3\0garbage")
        env = kitcov.child_environment(rc, {"COVERAGE_PROCESS_CONFIG": "outer"})
        assert "COVERAGE_PROCESS_CONFIG" not in env
        subprocess.run([sys.executable, "-c", "import kit.system.linux"], env=env, check=True)
        combined = kitcov.combine(rc, data / ".coverage")
        assert combined.files == 1 and len(combined.corrupt) == 2
        assert sorted(p.name for p in (data / "corrupt").iterdir()) == [
            ".coverage.host.pid1.XyZ",
            ".coverage.host.pid2.XyZ",
        ]
        cov = kitcov.load(rc, data / ".coverage")
        assert kitcov.percent(cov, [str(ROOT / "kit" / "system" / "linux.py")]) > 0
        missing = kitcov.unexecuted(
            cov,
            [
                (str(ROOT / "kit/starter/stage2.py"), "Stage2.main"),
                (str(ROOT / "kit/system/linux.py"), "no_such_function"),
            ],
        )
        assert [fc.ok for fc in missing] == [False, False]
        assert "no such function" in missing[1].describe()
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_ci_run_is_valid_bash_and_ends_with_the_test_command():
    text = (ROOT / ".ci" / "run").read_text()
    subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], check=True)
    assert "KIT_WITH_BROWSER=1 ci/setup" in text
    assert "ci/gate --engine reference --out" in text
    assert text.rstrip().splitlines()[-1].startswith("exit")
    assert "ci/coverage --no-clean -- .venv/bin/pytest tests -n 2" in text


def test_templates_run_the_gate_and_keep_the_artifacts():
    github = (ROOT / "kit/templates/ci/github-actions.yml").read_text()
    gitlab = (ROOT / "kit/templates/ci/gitlab-ci.yml").read_text()
    for text in (github, gitlab):
        # the packaged gate: an engine's repository has the kit installed, not checked out
        assert "/bin/python -m conformance gate --engine" in text and "conformance-out" in text
        assert "ci/gate" not in text
        assert "apparmor_restrict_unprivileged_userns" in text
    assert "actions/upload-artifact" in github and "if: always()" in github
    assert "artifacts:" in gitlab and "when: always" in gitlab
    assert "junit: conformance-out/junit.xml" in gitlab
    try:
        import yaml  # optional: only when PyYAML happens to be installed
    except ImportError:
        return
    assert yaml.safe_load(github)["jobs"] and yaml.safe_load(gitlab)


@pytest.mark.parametrize(
    ("statements", "executed", "ok"), [(0, 0, True), (3, 0, False), (3, 1, True)]
)
def test_kitcov_a_docstring_only_hook_is_not_reported_unexecuted(statements, executed, ok):
    fc = kitcov.FunctionCoverage("engine.py", "Engine.post_start_process", statements, executed)
    assert fc.ok is ok
    assert ("NOT EXECUTED" in fc.describe()) is (not ok)
