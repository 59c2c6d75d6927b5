"""The benchmarks keep their output contract (a smoke run with tiny samples: no timing is
asserted here; timings are for `python -m bench.lifecycle` itself)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest


def test_kit_bench_writes_the_medians_and_ratios_it_promises(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the bench runs the root flow and util-linux unshare")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.lifecycle",
            "--samples",
            "2",
            "--warmup",
            "0",
            "--json",
            str(out),
            # A test fetches nothing (auto may fetch Debian's runc): an installed runc or none.
            *("--runc", shutil.which("runc") or "off"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    cases = {
        "unshare",
        "ctypes_minimal",
        "process_model",
        "full",
        "no_sandbox",
        "no_probes",
        "fake",
        "userns",
    }
    if "skipped" not in doc["runc"]:
        cases.add("runc")
    assert set(doc["medians"]) == cases
    assert set(doc["cpu_ms"]) == cases
    assert all(v > 0 for v in doc["medians"].values())
    assert all(v >= 0 for v in doc["cpu_ms"].values())
    assert set(doc["ratios"]) == {
        "full_vs_runc",
        "no_probes_vs_runc",
        "full_vs_unshare",
        "full_vs_minimal",
        "process_model_vs_runc",
        "no_probes_vs_process_model",
        "no_probes_vs_unshare",
        "fake_vs_full",
        "sandbox_vs_no_sandbox",
        "sandbox_overhead",
        "cpu_full_vs_runc",
        "cpu_no_probes_vs_runc",
        "cli_vs_python",
    }
    assert doc["cli"]["cli_ms"] > doc["cli"]["python_ms"] > 0
    assert doc["ratios"]["cli_vs_python"] == doc["cli"]["ratio"]
    if "runc" in cases:
        assert doc["ratios"]["full_vs_runc"] == pytest.approx(
            doc["medians"]["full"] / doc["medians"]["runc"], abs=0.01
        )
        assert doc["runc"]["version"].startswith("runc version")
    else:
        assert doc["ratios"]["full_vs_runc"] is None and doc["runc"]["skipped"]
    assert doc["ratios"]["no_probes_vs_process_model"] == pytest.approx(
        doc["medians"]["no_probes"] / doc["medians"]["process_model"], abs=0.01
    )
    assert doc["ratios"]["sandbox_overhead"] == pytest.approx(
        doc["sandbox_cost_ms"] / doc["medians"]["full"], abs=1e-3
    )
    assert doc["sandbox_cost_ms"] == pytest.approx(
        doc["medians"]["full"] - doc["medians"]["no_sandbox"], abs=1e-3
    )
    assert "host sandbox:" in proc.stdout
    assert doc["breakdown"]["marks_ms"]["payload exec'd"] is not None
    assert "prepare_config" in " ".join(doc["breakdown"]["hooks_ms"])
    assert "where a full lifecycle's time goes" in proc.stdout
    assert doc["seccomp"]["install_ms"] > 0 and "per_syscall_ns" in doc["seccomp"]


def test_the_cli_case_alone_times_the_one_shot_cli_and_nothing_else(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the bench runs the root flow")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench.lifecycle", "--samples", "2", "--warmup", "0"),
            *("--cases", "cli", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["medians"] == {} and "seccomp" not in doc
    assert doc["cli"]["cli_ms"] > doc["cli"]["python_ms"] > 0
    assert doc["ratios"]["cli_vs_python"] == doc["cli"]["ratio"]
    assert "one-shot CLI" in proc.stdout


def test_static_true_exits_zero_without_a_libc(tmp_path):
    from bench import lifecycle as bench

    binary = bench.static_true()
    if binary is None:
        pytest.skip(f"the bench has no static true for {os.uname().machine}")
    path = tmp_path / "true"
    path.write_bytes(binary)
    path.chmod(0o755)
    assert subprocess.run([str(path)]).returncode == 0
    assert b"ld-linux" not in binary  # static: no interpreter for a bundle without /lib


def test_runc_case_is_skipped_with_the_reason_when_runc_is_missing(monkeypatch):
    from bench import lifecycle as bench

    if bench.static_true() is None:
        pytest.skip(f"the bench has no static true for {os.uname().machine}")
    monkeypatch.setenv("PATH", "/nonexistent")  # no runc, nor apt-get to fetch one
    case, info = bench.RuncCase.setup()
    assert case is None
    assert "runc is not installed and could not be fetched" in info["skipped"]
    assert "no apt-get" in info["skipped"]


def test_a_failed_fetch_of_runc_is_the_reason_it_is_skipped(monkeypatch, tmp_path):
    from bench import lifecycle as bench

    if bench.static_true() is None:
        pytest.skip(f"the bench has no static true for {os.uname().machine}")
    for tool, script in (
        ("apt-get", "echo 'E: no network here' >&2; exit 100"),
        ("dpkg-deb", "exit 0"),
    ):
        (tmp_path / tool).write_text(f"#!/bin/sh\n{script}\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))  # no runc; an apt-get that cannot download
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("kit-bench-runc-")}
    case, info = bench.RuncCase.setup()
    assert case is None
    assert "could not be fetched (apt-get download: E: no network here)" in info["skipped"]
    after = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("kit-bench-runc-")}
    assert after <= before  # its temporary directory is gone


def test_runc_case_names_a_given_runc_that_does_not_work(tmp_path):
    from bench import lifecycle as bench

    if bench.static_true() is None:
        pytest.skip(f"the bench has no static true for {os.uname().machine}")
    case, info = bench.RuncCase.setup("/bin/false")
    assert case is None and "runc (/bin/false) cannot run" in info["skipped"]
    assert bench.RuncCase.setup("off") == (None, {"skipped": "--runc off"})


def test_rpc_bench_compares_mock_and_socketpair(tmp_path):
    out = tmp_path / "rpc.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.rpc",
            "--samples",
            "30",
            "--calls",
            "5",
            "--warmup",
            "5",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    text = json.dumps(doc)
    assert "mock" in text and "real" in text
