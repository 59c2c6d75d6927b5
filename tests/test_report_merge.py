"""``python -m conformance report --merge``: shard reports of one session make one report,
equal to the report of the unsharded session (with ``--kit-self-check=all``); shards that do
not belong together, or that overlap and disagree, are refused (exit 2) with a message naming
what differs. Shards of ``--kit-self-check=one`` merge too, each with its own self-check
flow."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import render, report
from conformance.outcomes import FAILED, NOT_CONFIGURED, PASSED, Results

#: The requirements the sessions run: a kit requirement decided in kit-only runs (ERR-006) and
#: engine requirements of several groups. Merging does not depend on which ones; the whole
#: suite in three flows per fixture cost the kit's CI two minutes for no more evidence.
SELECTED = " or ".join(
    ("ERR-006", "ORDER-001", "PRIV-MASTER-001", "NS-003", "HOST-001", "RPC-001", "SIG-003")
)


def _session(out: Path, flows: str, self_check: str = "all") -> Path:
    path = out / f"{flows.replace(',', '_')}.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--engine=reference",
            "--flow",
            flows,
            # with one, each shard checks the kit in its own first flow (suid in the second),
            # which one session of the same flows does in root only: the kit's results in
            # suid differ (passed there, not-configured in the session), so only all can
            # make shards equal to one session
            f"--kit-self-check={self_check}",
            "-k",
            SELECTED,
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


# --- shards of --kit-self-check=one --------------------------------------------------------------


@pytest.fixture(scope="module")
def one_mode(tmp_path_factory) -> dict[str, Path]:
    """Shards that each check the kit in their own first flow: two disjoint, one overlapping."""
    out = tmp_path_factory.mktemp("one")
    return {f: _session(out, f, "one") for f in ("root,suid", "userns,fakeroot", "suid,userns")}


def _by_key(doc: dict) -> dict[tuple[str, str], dict]:
    return {(e["requirement"], e["flow"]): e for e in doc["results"]}


def test_one_mode_shards_merge_and_name_each_self_check_flow(one_mode, tmp_path):
    proc = _merge(one_mode["root,suid"], one_mode["userns,fakeroot"], out=tmp_path / "m")
    assert proc.returncode == 0, proc.stderr
    merged = render.load(tmp_path / "m" / "conformance.json")
    assert report.validate(merged) == []
    assert merged["environment"]["kit_self_check"] == {
        "mode": "one",
        "flow": None,
        "flows": ["root", "userns"],
    }
    results = _by_key(merged)
    # ERR-006 reads a kit-only run: decided where each shard self-checked
    assert results[("ERR-006", "root")]["outcome"] == PASSED
    assert results[("ERR-006", "userns")]["outcome"] == PASSED
    assert results[("ERR-006", "suid")]["message"].startswith("checked in flow root")
    assert results[("ERR-006", "fakeroot")]["message"].startswith("checked in flow userns")
    line = "(kit-only runs in flows root, userns; --kit-self-check=all for every flow)"
    assert line in " ".join(proc.stdout.split())
    assert render.verdict(merged).code == 0


@pytest.mark.parametrize("order", [("root,suid", "suid,userns"), ("suid,userns", "root,suid")])
def test_overlapping_one_mode_shards_keep_the_kit_result_that_was_decided(
    one_mode, tmp_path, order
):
    # suid: the first shard leaves ERR-006 to root, the second decides it
    first, second = (
        json.loads(one_mode[name].read_text()) for name in ("root,suid", "suid,userns")
    )
    assert _by_key(first)[("ERR-006", "suid")]["outcome"] == NOT_CONFIGURED
    assert _by_key(second)[("ERR-006", "suid")]["outcome"] == PASSED
    proc = _merge(*(one_mode[name] for name in order), out=tmp_path / "m")
    assert proc.returncode == 0, proc.stderr
    merged = render.load(tmp_path / "m" / "conformance.json")
    assert report.validate(merged) == []
    decided = _by_key(merged)[("ERR-006", "suid")]
    assert decided["outcome"] == PASSED and decided["runs"], decided
    assert merged["environment"]["kit_self_check"]["flows"] == ["root", "suid"]

    # the engine's results: the union of both shards' (in suid both decided them, alike)
    def engine(doc: dict) -> dict:
        return {k: e["outcome"] for k, e in _by_key(doc).items() if e["subject"] == "engine"}

    assert engine(merged) == engine(first) | engine(second)


def test_shards_of_different_self_check_modes_are_refused(sessions, one_mode, tmp_path):
    proc = _merge(sessions["root"], one_mode["userns,fakeroot"], out=tmp_path / "m")
    _refused(proc, "differ in --kit-self-check ('one' against 'all')")


def test_the_mounts_left_out_of_any_run_are_named_once_and_kept_by_a_merge(sessions, tmp_path):
    def run(*left_out: str) -> dict:
        start = {"kind": "run_start", "sandbox_left_out": list(left_out)}
        return {"ledger": {"events": [{"kind": "process_start"}, start]}}

    runs = [run("/b", "/a"), run(), {"ledger": None}, run("/a"), {"error": "gone"}]
    assert report.sandbox_left_out(runs) == ["/a", "/b"]
    assert report.sandbox_left_out([run()]) == []
    shards = []
    for name, points in (("root", ["/b"]), ("suid,userns", ["/a", "/b"])):
        doc = json.loads(sessions[name].read_text())
        doc["environment"]["sandbox_left_out"] = points
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        shards.append(path)
    proc = _merge(*shards, out=tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr
    merged = render.load(tmp_path / "merged" / "conformance.json")
    assert report.validate(merged) == []
    assert merged["environment"]["sandbox_left_out"] == ["/a", "/b"]
    for page in ("summary.md", "report.html"):
        assert (
            "sandbox left out (empty read-only directories): /a, /b"
            in (tmp_path / "merged" / page).read_text()
        )
