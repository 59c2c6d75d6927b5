"""Bad input from an engine author (issue 15): each is one short message, printed once, and a
non-zero exit; nothing starts a lifecycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GATE = ROOT / "ci" / "gate"
PYTEST_USAGE_ERROR = 4  # pytest.ExitCode.USAGE_ERROR
GATE_USAGE_ERROR = 2
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the real root flow needs root")


def run(
    *argv: str, cwd: Path, pythonpath: str = str(ROOT / "tests")
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    env.pop("CONFORMANCE_ENGINE", None)
    return subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def pytest_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", *args]


def one_screen(text: str) -> bool:
    return len(text.splitlines()) <= 25 and "Traceback" not in text


def test_an_empty_engine_option_is_a_usage_error(tmp_path):
    proc = run(*pytest_cmd("--engine="), cwd=tmp_path)
    assert proc.returncode == PYTEST_USAGE_ERROR, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert out.count("--engine is empty: name the engine to check") == 1
    assert one_screen(out)


def test_the_gate_refuses_an_empty_engine(tmp_path):
    proc = run(str(GATE), "--engine=", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == GATE_USAGE_ERROR
    flat = " ".join(proc.stderr.split())  # wrapped between words to the screen
    assert flat.count("--engine is empty") == 1 and one_screen(proc.stderr)
    assert not (tmp_path / "out").exists()


@needs_root
def test_an_ini_engine_adds_the_suite_to_the_repositorys_own_tests(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nengine = reference\n")
    (tmp_path / "test_own.py").write_text("def test_mine():\n    assert 1 + 1 == 2\n")
    proc = run(*pytest_cmd("--flow=root", "-rA"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "PASSED test_own.py::test_mine" in proc.stdout
    flat = " ".join(proc.stdout.split())
    assert "the conformance suite ran too (engine reference from the ini option 'engine'" in flat
    assert "CONFORMANT" in flat
    # naming the repository's own tests runs them alone, and says the suite did not run
    proc = run(*pytest_cmd("--flow=root", "test_own.py"), cwd=tmp_path)
    assert proc.returncode == 0 and "1 passed" in proc.stdout
    assert "the conformance suite did not run (engine reference from the ini option" in " ".join(
        proc.stdout.split()
    )


def _broken_entry_point(where: Path) -> str:
    """A third-party distribution whose kit.engines entry point cannot be imported."""
    info = where / "broken_engine_pkg-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-engine-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[kit.engines]\nbroken-thing = no_such_module_for_kit_tests:register\n"
    )
    return f"{where}{os.pathsep}{ROOT / 'tests'}"


def test_a_broken_entry_point_is_a_warning_after_the_unknown_engine_error(tmp_path):
    path = _broken_entry_point(tmp_path / "site")
    proc = run(
        sys.executable,
        "-m",
        "kit",
        "run",
        "--engine",
        "nosuch",
        "--flow",
        "root",
        "--",
        "/bin/true",
        cwd=tmp_path,
        pythonpath=path,
    )
    assert proc.returncode == 2
    err = proc.stderr
    assert err.startswith(
        "kit run: engine nosuch: registration: unknown engine 'nosuch'; known engines: "
    )
    assert err.count("unknown engine 'nosuch'") == 1
    assert (
        "warning: entry point broken-thing = no_such_module_for_kit_tests:register is "
        "broken: ModuleNotFoundError"
    ) in err
    known = err.split("known engines: ", 1)[1].split("\n", 1)[0]
    assert "reference" in known and "mutant-" not in known
    assert one_screen(err)
    proc = run(*pytest_cmd("--engine=nosuch"), cwd=tmp_path, pythonpath=path)
    assert proc.returncode == PYTEST_USAGE_ERROR
    out = proc.stdout + proc.stderr
    assert out.count("unknown engine 'nosuch'") == 1 and "is broken: ModuleNotFoundError" in out


def test_kit_run_refuses_an_unknown_engine_config_field_before_any_process(tmp_path):
    proc = run(
        sys.executable,
        "-m",
        "kit",
        "run",
        "--engine",
        "reference",
        "--flow",
        "root",
        "--config",
        '{"nope": 1}',
        "--",
        "/bin/true",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("unknown field 'nope'") == 1, proc.stderr
    assert proc.stderr.startswith("kit run: engine reference: config: fix the engine config")
    assert one_screen(proc.stderr) and "stage 1" not in proc.stderr


@pytest.mark.parametrize(
    "engine, hook, text",
    [
        (
            "DictConfigEngine",
            "config",
            "return an instance of a @dataclass subclass of "
            "kit.EngineConfig from config() (every process calls it): it returned dict {}",
        ),
        ("SetConfigEngine", "config", "make every field of the engine config a JSON value"),
        ("UnservableRPCEngine", "rpc_methods", "make _RPCNeedsMore(engine) constructible"),
        (
            "EffectiveNotPermittedEngine",
            "prepare_config",
            "fix the StarterConfig that "
            "prepare_config fills in the suid, userns, fakeroot, hybrid flows (stage 1, run as the "
            "invoking user): the starter would refuse it: set_capabilities: effective capabilities "
            "must be a subset of permitted",
        ),
    ],
)
def test_preflight_stops_the_session_with_one_error_naming_engine_and_hook(
    tmp_path, engine, hook, text
):
    proc = run(*pytest_cmd(f"--engine=author_engines:{engine}"), cwd=tmp_path)
    assert proc.returncode == PYTEST_USAGE_ERROR
    out = " ".join((proc.stdout + proc.stderr).split())
    assert out.count("preflight of engine") == 1 and "no lifecycle was run" in out
    assert f": {hook}: {text}" in out
    assert "FAILED" not in out and "lifecycles" not in out
    gate = run(
        str(GATE), f"--engine=author_engines:{engine}", "--out", str(tmp_path / "o"), cwd=tmp_path
    )
    flat = " ".join(gate.stderr.split())
    assert gate.returncode == GATE_USAGE_ERROR and flat.count("preflight failed") == 1
    assert f": {hook}: {text}" in flat


# --- preflight of the StarterConfig (kit.preflight.starter_configs) -----------------------------


def _u():
    from kit.run.request import Invoker

    try:
        return Invoker.resolve()
    except ValueError:
        pytest.skip("no unprivileged invoking user here")


def test_preflight_runs_prepare_config_as_the_invoking_user_with_no_new_privs(monkeypatch):
    from kit import preflight

    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    u = _u()
    spec = "author_engines:InvalidUnlessPrivilegedEngine"
    problems = preflight.starter_configs(spec, ["suid", "userns"], u.uid, u.gid, u.groups)
    assert [p.hook for p in problems] == ["prepare_config"]
    assert "in the suid, userns flows" in problems[0].message
    assert str(problems[0]).startswith(f"engine {spec}: prepare_config: fix the StarterConfig")
    # the root flow's prepare_config is never run here (it would run as root)
    assert preflight.starter_configs(spec, ["root"], u.uid, u.gid, u.groups) == []
    assert (
        preflight.starter_configs(
            "reference", list(preflight.UNPRIVILEGED_FLOWS), u.uid, u.gid, u.groups
        )
        == []
    )


def test_preflight_gives_no_verdict_on_a_prepare_config_that_hangs(monkeypatch):
    import time

    from kit import preflight

    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    monkeypatch.setattr(preflight, "PREPARE_TIMEOUT", 0.5)
    u = _u()
    start = time.monotonic()
    assert (
        preflight.starter_configs(
            "author_engines:HangingPrepareEngine", ["userns"], u.uid, u.gid, u.groups
        )
        == []
    )
    assert time.monotonic() - start < 5  # the child was killed at the deadline


def test_preflight_keeps_the_verdicts_of_the_flows_that_did_not_hang(monkeypatch):
    from kit import preflight

    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    monkeypatch.setattr(preflight, "PREPARE_TIMEOUT", 3.0)
    u = _u()
    flows = ["suid", "userns", "fakeroot"]
    problems = preflight.starter_configs(
        "author_engines:HangsInUsernsEngine", flows, u.uid, u.gid, u.groups
    )
    # One preflight child for every flow: the hang in userns costs the others nothing, and
    # each verdict is its own flow's.
    messages = sorted(p.message for p in problems)
    assert len(messages) == 2 and all(p.hook == "prepare_config" for p in problems)
    assert "in the fakeroot flow " in messages[0] and messages[0].endswith(
        "not permitted: CAP_KILL"
    )
    assert "in the suid flow " in messages[1] and messages[1].endswith("not permitted: CAP_CHOWN")


def test_a_preflight_read_after_its_deadline_keeps_what_came_in_time(monkeypatch):
    import time

    from kit import preflight

    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    monkeypatch.setattr(preflight, "PREPARE_TIMEOUT", 1.0)
    u = _u()
    # Started, then read late (the session's start did other work first): the verdict sent
    # well before the deadline must not be lost because nobody read it in time.
    check = preflight.StarterConfigCheck(
        "author_engines:InvalidUnlessPrivilegedEngine", ["suid"], u.uid, u.gid, u.groups
    )
    time.sleep(2.0)
    (problem,) = check.problems()
    assert "in the suid flow " in problem.message


def test_a_started_preflight_that_is_cancelled_ends_its_child_at_once(monkeypatch):
    import time

    from kit import preflight

    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    u = _u()
    start = time.monotonic()
    # Started, then not wanted (the inspection beside it found a problem): a hanging
    # prepare_config must not hold the caller for PREPARE_TIMEOUT (10 s).
    check = preflight.StarterConfigCheck(
        "author_engines:HangingPrepareEngine", ["userns"], u.uid, u.gid, u.groups
    )
    check.cancel()
    assert time.monotonic() - start < 5
    assert check.child is not None and check.child.ended is not None
    assert not check.child.ended.in_time and check.child.ended.status is not None
    assert check.problems() == []  # no verdict, and no second wait


# --- engines named by import path (MODULE:ATTRIBUTE) ------------------------------------------


def _front_end(which: str, spec: str, tmp_path: Path) -> tuple[list[str], int]:
    """The command that checks or runs engine ``spec``, and its usage-error exit code."""
    if which == "kit run":
        return [
            sys.executable,
            "-m",
            "kit",
            "run",
            "--engine",
            spec,
            "--flow",
            "root",
            "--",
            "/bin/true",
        ], 2
    if which == "pytest":
        return pytest_cmd(f"--engine={spec}", "--flow=root"), PYTEST_USAGE_ERROR
    return [
        str(GATE),
        "--engine",
        spec,
        "--flow",
        "root",
        "--out",
        str(tmp_path / "out"),
    ], GATE_USAGE_ERROR


@pytest.mark.parametrize("which", ["kit run", "pytest", "ci/gate"])
@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "no_such_module_of_kit_tests:register",
            "no module named 'no_such_module_of_kit_tests' on the import path",
        ),
        ("import_path_engines:regster", "has no attribute 'regster'"),
        ("import_path_engines:registers_nothing", "it returned None and registered no engine"),
    ],
)
def test_a_bad_import_path_is_one_message_in_every_front_end(tmp_path, which, spec, message):
    command, usage_error = _front_end(which, spec, tmp_path)
    proc = run(*command, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == usage_error, out[-3000:]
    assert " ".join(out.split()).count(message) == 1, out[-3000:]
    assert one_screen(out), out
    assert not (tmp_path / "out").exists()


@needs_root
def test_an_import_path_engine_is_resolved_in_every_process_of_a_run(tmp_path):
    """The spec travels to the zygote and every process forked from it (stage 1, master,
    RPC server, container), each of which resolves it again: the callable returns the
    engine, no process has it registered beforehand."""
    ledger = tmp_path / "ledger.json"
    proc = run(
        sys.executable,
        "-m",
        "kit",
        "run",
        "--engine",
        "import_path_engines:make_engine",
        "--flow",
        "suid",
        "--ledger",
        str(ledger),
        "--",
        "/bin/sh",
        "-c",
        "exit 7",
        cwd=tmp_path,
    )
    assert proc.returncode == 7, proc.stderr
    doc = json.loads(ledger.read_text())
    roles = {e["role"] for e in doc["events"] if e["kind"] == "hook_enter"}
    assert {"stage1", "master", "stage2"} <= roles
    assert any(
        e["kind"] == "rpc_call" and e.get("method") == "import-path-returned.sethostname"
        for e in doc["events"]
    ), sorted({e["kind"] for e in doc["events"]})


# --- what preflight started and no longer wants is ended at once ------------------------------

#: After the call, this process's living descendants (one line of JSON), and the call's value.
_DESCENDANTS_AFTER = """
import json, os, sys
from kit.system import linux
{call}
print(json.dumps({{"value": value, "left": linux.descendants(os.getpid())}}))
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.parametrize(
    "call",
    [
        "import pytest\n"
        "value = int(pytest.main(['-p', 'no:cacheprovider', '-p', 'no:xdist', '-q', "
        "'--engine=author_engines:UnservableSlowStage1Engine']))",
        "from conformance.gate import main\n"
        "value = main(['--engine=author_engines:UnservableSlowStage1Engine', '--out', 'o'])",
    ],
    ids=["plugin", "gate"],
)
def test_a_preflight_problem_ends_the_starter_config_check_still_running(tmp_path, call):
    # The inspection finds a problem at once; the StarterConfig check, started beside it,
    # is in a stage-1 hook that takes a minute. Once the session (or the gate) has said why
    # it stops, nothing of its preflight runs on in the process that asked.
    _u()
    proc = run(sys.executable, "-c", _DESCENDANTS_AFTER.format(call=call), cwd=tmp_path)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["value"] in (PYTEST_USAGE_ERROR, GATE_USAGE_ERROR), proc.stdout + proc.stderr
    assert "rpc_methods" in proc.stdout + proc.stderr
    assert out["left"] == []
