"""``python -m conformance report --merge``: shard reports of one session make one report,
equal to the report of the unsharded session; shards that do not belong together, or that
overlap and disagree, are refused (exit 2) with a message naming what differs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import render, report
from conformance.outcomes import FAILED, PASSED, Results


def _session(out: Path, flows: str) -> Path:
    path = out / f"{flows.replace(',', '_')}.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--engine=reference",
            "--flow",
            flows,
            # each shard would otherwise check the kit in its own first flow (suid in the
            # second), which one session of the same flows does in root only
            "--kit-self-check=all",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--conformance-report={path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return path


@pytest.fixture(scope="module")
def sessions(tmp_path_factory) -> dict[str, Path]:
    """Two shards (root; suid and userns) and the unsharded session of the same flows."""
    out = tmp_path_factory.mktemp("shards")
    return {flows: _session(out, flows) for flows in ("root", "suid,userns", "root,suid,userns")}


def _merge(*paths: Path | str, out: Path | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "conformance", "report", "--merge", *map(str, paths)]
    if out is not None:
        args += ["--out", str(out)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_merged_shards_equal_the_unsharded_session(sessions, tmp_path):
    proc = _merge(sessions["root"], sessions["suid,userns"], out=tmp_path / "merged")
    whole = render.load(sessions["root,suid,userns"])
    assert proc.returncode == render.verdict(whole).code == 0, proc.stderr
    merged = render.load(tmp_path / "merged" / "conformance.json")
    assert report.validate(merged) == []

    # Same entries, same order, same outcomes and messages; ``checks`` (how many individual
    # checks a result's ledgers gave) varies from one session to the next, sharded or not.
    def without_checks(results: list[dict]) -> list[dict]:
        return [{k: v for k, v in entry.items() if k != "checks"} for entry in results]

    assert without_checks(merged["results"]) == without_checks(whole["results"])
    assert merged["summary"] == whole["summary"]
    assert render.verdict(merged) == render.verdict(whole)
    assert sorted(r["id"] for r in merged["runs"]) == sorted(r["id"] for r in whole["runs"])
    assert merged["environment"]["flows"] == whole["environment"]["flows"]
    assert merged["environment"]["backend"] == whole["environment"]["backend"]
    # each shard's own environment is kept, with what it ran
    shards = merged["shards"]
    assert [s["report"] for s in shards] == [str(sessions["root"]), str(sessions["suid,userns"])]
    assert [s["flows"] for s in shards] == [["root"], ["suid", "userns"]]
    for shard, path in zip(shards, (sessions["root"], sessions["suid,userns"]), strict=True):
        assert shard["environment"] == json.loads(path.read_text())["environment"]
    assert "conformant (exit 0)" in (tmp_path / "merged" / "summary.md").read_text()
    assert "<html" in (tmp_path / "merged" / "report.html").read_text()


def _write(tmp_path: Path, name: str, doc: dict) -> Path:
    assert report.validate(doc) == []
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def test_shards_of_different_engines_are_refused(sessions, tmp_path):
    other = json.loads(sessions["suid,userns"].read_text())
    other["engine"]["name"] = "another"
    proc = _merge(sessions["root"], _write(tmp_path, "other.json", other), out=tmp_path / "m")
    _refused(proc, "differ in engine", "another", "reference")
    assert not (tmp_path / "m").exists()


def test_shards_of_different_schema_versions_are_refused(sessions, tmp_path):
    old = json.loads(sessions["suid,userns"].read_text())
    old["schema_version"] = 1
    old.pop("root_causes")
    proc = _merge(sessions["root"], _write(tmp_path, "old.json", old), out=tmp_path / "m")
    _refused(proc, f"differ in schema version (1 against {report.SCHEMA_VERSION})")


def test_overlapping_shards_that_disagree_are_refused(sessions, tmp_path):
    doc = json.loads(sessions["root"].read_text())
    changed = copy.deepcopy(doc)
    entry = next(e for e in changed["results"] if e["outcome"] == PASSED)
    entry["outcome"], entry["message"] = FAILED, "pretend: another kernel"
    changed["summary"] = Results.summary(changed["results"])
    proc = _merge(
        sessions["root"], _write(tmp_path, "other-runner.json", changed), out=tmp_path / "m"
    )
    _refused(
        proc,
        f"{entry['requirement']} in flow {entry['flow']}",
        "says passed",
        "says failed",
        "must agree",
    )


def test_overlapping_shards_that_agree_merge_into_one_result_each(sessions, tmp_path):
    proc = _merge(sessions["root"], sessions["root"], out=tmp_path / "m")
    assert proc.returncode == 0, proc.stderr
    merged = render.load(tmp_path / "m" / "conformance.json")
    alone = render.load(sessions["root"])
    assert len(merged["results"]) == len(alone["results"])
    assert merged["summary"] == alone["summary"]
    ids = {r["id"] for r in merged["runs"]}
    assert len(merged["runs"]) == 2 * len(alone["runs"]) == len(ids)  # none lost, none clash
    first = merged["results"][0]
    assert any(run.endswith("@shard2") for run in first["runs"]) and set(first["runs"]) <= ids


@pytest.mark.parametrize(
    "args,message",
    [
        (("--merge", "ONE"), "give two or more shard reports"),
        (("--merge", "ONE", "ONE"), "give --out DIR"),
        (("ONE", "ONE"), "to merge shard reports, add --merge"),
    ],
)
def test_merge_usage_errors_exit_2(sessions, tmp_path, args, message):
    args = tuple(str(sessions["root"]) if a == "ONE" else a for a in args)
    if message != "give --out DIR":
        args += ("--out", str(tmp_path / "m"))
    proc = subprocess.run(
        [sys.executable, "-m", "conformance", "report", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _refused(proc, message)


def test_a_file_that_is_not_a_report_is_refused_by_name(sessions, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    _refused(_merge(sessions["root"], bad, out=tmp_path / "m"), str(bad))
