"""``python -m kit``: run, flows, engines."""

from __future__ import annotations

import json
import subprocess
import sys


def kit(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kit", *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_run_exits_with_the_payloads_code_and_writes_the_ledger(flow, tmp_path):
    ledger = tmp_path / "ledger.json"
    proc = kit("run", "--engine", "reference", "--flow", flow, "--ledger", str(ledger), "--",
               "/bin/sh", "-c", "exit 7")
    assert proc.returncode == 7, proc.stderr
    doc = json.loads(ledger.read_text())
    hooks = [(e["role"], e["hook"]) for e in doc["events"] if e["kind"] == "hook_enter"]
    assert ("stage1", "prepare_config") in hooks and ("stage2", "start_process") in hooks
    assert len({h for _, h in hooks}) == 8


def test_run_reports_engine_errors_on_stderr():
    proc = kit("run", "--engine", "reference", "--flow", "root", "--config",
               '{"hostname": ""}', "--", "/bin/true")
    assert proc.returncode == 255
    assert "prepare_config raised ConfigError: hostname" in proc.stderr


def test_run_rejects_unknown_engine_and_bad_config():
    proc = kit("run", "--engine", "nope", "--flow", "root", "--", "/bin/true")
    assert proc.returncode == 2 and "unknown engine 'nope'" in proc.stderr
    proc = kit("run", "--engine", "reference", "--flow", "root", "--config", "[1]", "--",
               "/bin/true")
    assert proc.returncode == 2 and "--config" in proc.stderr


def test_flows_lists_every_flow_with_a_reason():
    proc = kit("flows")
    assert proc.returncode == 0
    lines = proc.stdout.split("\n\n")[0].splitlines()  # then a user namespace note, if any
    assert [line.split()[0] for line in lines] == ["root", "suid", "hybrid", "userns",
                                                   "fakeroot"]
    assert all(len(line.split(None, 2)) == 3 for line in lines)


def test_engines_lists_name_then_origin():
    proc = kit("engines")
    assert proc.returncode == 0
    rows = dict(line.split("\t") for line in proc.stdout.splitlines())
    assert "reference" in rows and "reference_engines.minimal" in rows["reference"]


def test_help_names_the_subcommands():
    proc = kit("--help")
    assert proc.returncode == 0
    for word in ("run", "flows", "engines"):
        assert word in proc.stdout
