"""The mutant zoo (mutants/zoo) and its kill matrix (mutants/matrix.py).

Every mutant breaks one rule; the conformance suite must fail it with a requirement it
declares, in every flow it declares, while the reference engine passes everything. The
matrix is one test (one run of ~50 pytest sessions, about two minutes on two cores), so that
pytest-xdist never runs it twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from conformance import requirements
from kit import registry
from mutants import matrix as M
from mutants.zoo import (
    ENGINE_MUTANTS,
    MUTANTS,
    STARTER_MUTANTS,
    by_name,
    engine_spec,
    registered_name,
)

ENTRY_KEYS = {
    "mutant",
    "slug",
    "flow",
    "backend",
    "declared",
    "failed",
    "broken",
    "killed",
    "undecided_only",
    "status",
    "bug",
    "gap",
    "baseline",
    "mechanism",
    "seconds",
    "error",
    "messages",
}


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the kill matrix needs every flow (root, suid and hybrid need uid 0)")


def test_every_mutant_declares_known_requirements_checked_in_its_flows_and_a_bug():
    assert M.declaration_problems() == []


def test_the_zoo_has_at_least_30_mutants_and_one_for_every_group_of_the_catalogue():
    killable = [m for m in MUTANTS if not m.gap]
    assert len(killable) >= 30
    groups = {requirements.CATALOGUE[req].group for m in killable for req in m.killed_by}
    assert groups == {key for key, _ in requirements.GROUPS}


def test_no_mutant_is_an_entry_point_and_each_engine_mutant_has_its_own_import_path():
    """The zoo is not installed: each engine mutant is named by the import path of its own
    registration function, which registers it alone."""
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="kit.engines")}
    assert not [n for n in names if n.startswith("mutant-")]
    assert not [ep.value for ep in entry_points(group="kit.engines") if "mutants" in ep.value]
    assert all(registered_name(m).startswith("mutant-") for m in MUTANTS)
    before = set(registry.registered())
    try:
        for mutant in ENGINE_MUTANTS:
            spec = engine_spec(mutant)
            assert spec.startswith("mutants.zoo:register_"), spec
            assert registry.find(spec).name == registered_name(mutant)
            assert registry.find(spec) is registry.find(registered_name(mutant))
        assert (
            set(registry.registered()) - before
            == {registered_name(m) for m in ENGINE_MUTANTS} - before
        )
    finally:
        for name in set(registry.registered()) - before:
            registry.unregister(name)


def test_starter_mutants_have_no_entry_point_and_one_spec_each():
    """Registering a starter mutant mutates the kit of the registering process: it is named
    only by the import path of its own registration function, never looked up by name."""
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="kit.engines")}
    assert not {registered_name(m) for m in STARTER_MUTANTS} & names
    specs = [engine_spec(m) for m in STARTER_MUTANTS]
    assert len(set(specs)) == len(specs) == len(STARTER_MUTANTS) >= 25
    assert all(s.startswith("mutants.zoo.starter:register_") for s in specs)


_REGISTER_TWO = """
import sys
from kit import registry
from kit.starter import common
original = common.HookRunner.init_engine
reg = registry.find(sys.argv[1])
assert reg.name == "mutant-starter-config-twice", reg.name
assert common.HookRunner.init_engine is not original, "the kit was not mutated"
assert registry.find(sys.argv[1]) is reg  # the same registration, mutated once
try:
    registry.find(sys.argv[2])
except registry.RegistryError as exc:
    print("refused:", exc)
else:
    raise SystemExit("a second starter mutant was accepted")
"""


def test_a_starter_mutant_mutates_only_the_process_that_registers_it(tmp_path):
    import subprocess
    import sys

    from kit.starter import common
    from mutants.zoo import starter as starter_mutants

    original = common.HookRunner.init_engine
    script = tmp_path / "register_two.py"
    script.write_text(_REGISTER_TWO)
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            starter_mutants.ConfigTwice.spec(),
            starter_mutants.PrepareConfigTwice.spec(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": M.ROOT},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "calling it raised RuntimeError: mutant-starter-prepare-config-twice: this "
        "process's kit is already mutated by mutant-starter-config-twice" in done.stdout
    )
    assert common.HookRunner.init_engine is original  # importing the module changed nothing


def test_no_engine_mutant_breaks_a_kit_requirement():
    # a rule an engine can break is the engine's: its verdict must count it
    kit = {r.id for r in requirements.CATALOGUE.values() if r.subject == requirements.KIT}
    broken_by_engines = {(m.slug, req) for m in ENGINE_MUTANTS for req in m.killed_by if req in kit}
    assert broken_by_engines == set()
    starter = {req for m in STARTER_MUTANTS for req in m.killed_by}
    assert kit - starter == {"RPC-007"}  # unchecked: the kit's transport, its own unit tests


def test_every_must_requirement_is_killed_by_a_mutant_or_the_table_says_why_not():
    assert M.uncovered() == []
    assert M.stale_exceptions() == []


def test_every_must_requirement_has_two_mechanisms_or_the_table_says_why_not():
    assert [req for req, why in M.one_mechanism().items() if not why] == []
    assert M.stale_mechanism_exceptions() == []
    declared = M.declared_mechanisms()
    # The rules issue 14 names: every thread, the whole credential, every depth, resolved paths.
    for req in (
        "PRIV-MASTER-001",
        "PRIV-MASTER-002",
        "PRIV-RPC-002",
        "PRIV-STAGE1-002",
        "PRIV-STAGE2-001",
        "NS-001",
        "NS-003",
        "SIG-004",
    ):
        assert "helper-thread" in declared[req], req
    for req in ("PRIV-MASTER-001", "PRIV-RPC-001", "PRIV-STAGE1-001"):
        assert "raw-syscall" in declared[req], req
    assert (
        "other-field" in declared["PRIV-RPC-004"] and "other-field" in declared["PRIV-PAYLOAD-003"]
    )
    assert "nested-value" in declared["STATE-001"] and "symlink" in declared["CLEAN-001"]


def test_an_unknown_mechanism_is_a_declaration_problem(monkeypatch):
    from mutants.zoo.base import MECHANISMS
    from mutants.zoo.mechanisms import SharedNestedList

    monkeypatch.setattr(SharedNestedList, "mechanism", "telepathy")
    assert [p for p in M.declaration_problems() if "telepathy" in p] == [
        "mutant-config-shared-nested-list: unknown mechanism 'telepathy' (known: "
        + ", ".join(MECHANISMS)
        + ")"
    ]


def _entry(mutant, mechanism, declared, failed, backend="real", baseline=False, gap=None):
    return {
        "mutant": mutant,
        "slug": mutant,
        "flow": "root",
        "backend": backend,
        "declared": declared,
        "failed": failed,
        "broken": [],
        "killed": bool(set(declared) & set(failed)),
        "status": "killed",
        "bug": "",
        "gap": gap,
        "baseline": baseline,
        "mechanism": mechanism,
        "seconds": 0.0,
        "error": None,
        "messages": {},
    }


def test_the_matrix_counts_a_mechanism_only_where_a_declared_requirement_failed():
    matrix = M.Matrix(
        entries=[
            _entry("a", "direct", ["R-1"], ["R-1", "R-2"]),  # R-2 failed but is not declared
            _entry("b", "helper-thread", ["R-1", "R-3"], ["R-1"]),  # R-3 declared, not failed
            _entry("c", "symlink", ["R-1"], ["R-1"], backend="fake"),  # fake: not counted
            _entry("d", "raw-syscall", ["R-1"], ["R-1"], gap="a known survivor"),
            _entry("reference", "", [], ["R-1"], baseline=True),
        ]
    )
    assert matrix.mechanisms() == {"R-1": ["direct", "helper-thread"]}


def test_a_kill_by_undecided_results_only_is_flagged_and_listed():
    target = M.Target("mutant-crashy", "x:y", declared=("R-1",), flows=("root",))

    def doc(outcome: str) -> dict:
        return {
            "results": [
                {"requirement": "R-1", "flow": "root", "outcome": outcome},
                {"requirement": "R-9", "flow": "root", "outcome": "not-decided"},
            ]
        }

    (by_crash,) = M.entries_for(target, "real", doc("not-decided"))
    (by_verdict,) = M.entries_for(target, "real", doc("failed"))
    assert by_crash["killed"] and by_crash["undecided_only"]
    assert by_verdict["killed"] and not by_verdict["undecided_only"]
    listed = M.table(M.Matrix(entries=[by_crash]))
    assert "killed only by results a failed run left undecided" in listed
    assert listed.split("left undecided", 1)[1].rstrip().splitlines()[0].endswith(": 1: crashy")
    assert "left undecided" not in M.table(M.Matrix(entries=[by_verdict]))


def test_a_failed_baseline_keeps_what_each_failed_requirement_said():
    target = M.Target("reference", "reference", baseline=True, flows=("suid",))
    doc = {
        "results": [
            {"requirement": "LEDGER-003", "flow": "suid", "outcome": "failed", "message": "first"},
            {"requirement": "LEDGER-003", "flow": "suid", "outcome": "failed", "message": "2nd"},
            {"requirement": "CLEAN-001", "flow": "suid", "outcome": "broken", "message": "oops"},
            {"requirement": "ORDER-001", "flow": "suid", "outcome": "passed", "message": None},
        ]
    }
    (entry,) = M.entries_for(target, "fake", doc)
    assert entry["status"] == "failed"
    assert entry["messages"] == {"CLEAN-001": "oops", "LEDGER-003": "first"}
    (problem,) = M.Matrix(entries=[entry]).verdict(whole=False)
    assert "the baseline failed in suid" in problem
    assert "\n    LEDGER-003: first" in problem and "\n    CLEAN-001: oops" in problem
    passing = {**doc, "results": doc["results"][3:]}
    assert M.entries_for(target, "fake", passing)[0]["messages"] == {}


#: Sessions at a time: most of a session's time is spent waiting (hooks that hang until
#: their timeout, payloads that wait for signals), so twice the CPUs keeps them busy.
JOBS = min(6, 2 * (os.cpu_count() or 1))


def test_the_kill_matrix_kills_every_mutant_and_passes_the_reference(tmp_path):
    """The real backend must kill every mutant but the known survivors; the baselines pass
    in the fake backend too (when the suite accepts it). The fake backend's kills are a
    measure, not a verdict (``python -m mutants --backend both`` gives them): its 151
    mutant sessions cost half of the matrix and asserted nothing. Each mutant session runs
    only its declared requirements' tests (``--focus``: the same verdicts, measured on the
    whole zoo; four sessions took 9.6 s instead of 16.2 s), the baselines everything."""
    _needs_root()
    fake, _ = M.backend_available("fake")
    matrix = M.run_matrix(
        "both" if fake else "real", jobs=JOBS, focus=M.BACKENDS, mutant_backends=("real",)
    )
    path = tmp_path / "matrix.json"
    path.write_text(json.dumps(matrix.entries))
    print("\n" + M.table(matrix))

    entries = json.loads(path.read_text())
    assert entries and all(set(e) == ENTRY_KEYS for e in entries)
    real = [e for e in entries if e["backend"] == "real"]
    assert {e["mutant"] for e in real} == {label for label, _ in M.BASELINES} | set(by_name())
    for mutant in MUTANTS:  # one entry per flow it declares
        mine = [e for e in real if e["mutant"] == registered_name(mutant)]
        assert sorted(e["flow"] for e in mine) == sorted(mutant.flows)

    baselines = [e for e in entries if e["baseline"]]
    assert {e["flow"] for e in baselines} == set(M.FLOWS)
    assert [e for e in baselines if e["status"] not in ("passed", "not-configured")] == []
    assert all(e["status"] == "passed" for e in baselines if e["backend"] == "real")

    survivors = [
        f"{e['mutant']}[{e['flow']}]: failed {e['failed']}, broken {e['broken']}, "
        f"error {e['error']}"
        for e in real
        if not e["baseline"] and not e["gap"] and e["status"] != "killed"
    ]
    assert survivors == []
    killable = len([m for m in MUTANTS if not m.gap])
    assert matrix.killed_fraction("real") == (killable, killable, killable)
    known = [e for e in real if e["gap"]]  # known survivors (none at the moment)
    assert all(e["status"] == "survived" for e in known)
    assert matrix.verdict() == []
    assert matrix.unproven() == []  # every declared requirement failed for one of its mutants
    shown = {req for e in real for req in set(e["declared"]) & set(e["failed"])}
    # every MUST has a mutant that it kills, or the table says why no real one can
    assert set(M.must_requirements()) <= shown | set(M.EXCEPTIONS)
    mechanisms = matrix.mechanisms()  # a MUST declared by two mechanisms kills by two
    assert [
        req
        for req, found in M.declared_mechanisms().items()
        if req in M.must_requirements() and len(found) >= 2 and len(mechanisms.get(req, [])) < 2
    ] == []
    if fake:  # the fake baselines ran, and only they
        assert {e["mutant"] for e in entries if e["backend"] == "fake"} == {
            label for label, _ in M.BASELINES
        }


def test_the_listing_names_every_mutant_and_how_to_run_it():
    text = M.listing()
    for mutant in MUTANTS:
        assert f"`{registered_name(mutant)}` (`--engine={engine_spec(mutant)}`)" in text


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_the_shards_partition_the_sessions_the_same_way_every_time(count):
    targets = M.baseline_targets() + M.mutant_targets()
    parts = [M.shard(targets, k, count) for k in range(1, count + 1)]
    labels = [t.label for part in parts for t in part]
    assert sorted(labels) == sorted(t.label for t in targets)  # each exactly once
    assert len(labels) == len(set(labels))
    assert parts == [
        M.shard(list(reversed(targets)), k, count)[::-1] for k in range(1, count + 1)
    ]  # the order given does not matter
    costs = [sum(t.cost for t in part) for part in parts]
    heaviest = max(t.cost for t in targets)
    assert max(costs) - min(costs) <= heaviest  # balanced by cost


@pytest.mark.parametrize("text", ["0/2", "3/2", "2", "a/b", "1/0", "-1/2", "1/2/3"])
def test_a_bad_shard_is_refused_with_the_form_to_write(text):
    with pytest.raises(ValueError, match=r"--shard .*: write K/N with 1 <= K <= N"):
        M.parse_shard(text)


def test_python_m_mutants_refuses_a_bad_shard_and_a_bad_combine_file(tmp_path):
    import subprocess
    import sys

    def mutants(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mutants", *args],
            capture_output=True,
            text=True,
            cwd=M.ROOT,
            timeout=120,
        )

    proc = mutants("--shard", "5/4")
    assert proc.returncode == 2 and "--shard '5/4': write K/N" in proc.stderr
    bad = tmp_path / "shard.json"
    bad.write_text('{"not": "a list"}')
    proc = mutants("--combine", str(bad))
    assert proc.returncode == 2
    assert f"--combine {bad}: not a matrix" in proc.stderr and "Traceback" not in proc.stderr


def test_a_shard_leaves_the_unproven_requirements_to_the_combined_verdict():
    # Mutant b declares R-2 and failed only R-1: R-2 is unproven over the whole matrix,
    # but in one shard another shard's mutant may have proven it.
    matrix = M.Matrix(
        entries=[
            _entry("a", "direct", ["R-1"], ["R-1"]),
            _entry("b", "direct", ["R-1", "R-2"], ["R-1"]),
        ]
    )
    assert matrix.verdict(whole=False) == []
    assert matrix.verdict() == ["R-2: declared by mutants, failed for none of them"]


def test_combined_shards_must_cover_every_target():
    targets = M.baseline_targets() + M.mutant_targets()
    entries = [{"mutant": t.label} for t in targets]
    assert M.missing_targets(entries) == []
    first_two = [e for e in entries if e["mutant"] in {t.label for t in targets[:2]}]
    assert M.missing_targets(entries[2:]) == [
        f"2 targets ran in none of the combined shards (is one missing?): "
        f"{targets[0].label}, {targets[1].label}"
    ]
    assert first_two and M.missing_targets(first_two)[0].startswith(
        f"{len(targets) - 2} targets ran in none"
    )


def test_reference_config_types_the_engine_config_and_refuses_another_class():
    from conformance.cooperation import cooperative
    from kit.contract import Common, EngineConfig
    from mutants.zoo.base import Mutant
    from reference_engines.minimal import ReferenceConfig

    mutant = Mutant()
    mutant.init_config(Common("mutant-x", "c1", mutant.config()), False)
    assert type(mutant.reference_config()) is ReferenceConfig
    wrapped = cooperative(Mutant)()  # its config() is a subclass made at run time
    wrapped.init_config(Common("mutant-x", "c1", wrapped.config()), False)
    assert isinstance(wrapped.reference_config(), ReferenceConfig)
    mutant.init_config(Common("mutant-x", "c1", EngineConfig()), False)
    with pytest.raises(
        TypeError, match="engine config is of class EngineConfig, not ReferenceConfig"
    ):
        mutant.reference_config()


#: A kill-matrix run whose sessions never end on their own (``sleep``), two at a time, a
#: third waiting; it prints its work directory once both have started. Ctrl-C's handler is
#: set again: a job a non-interactive shell started in the background (a CI runner's) has
#: SIGINT ignored, and Python keeps an ignored SIGINT ignored.
INTERRUPTED_RUN = """
import os, signal, sys, time
from mutants import matrix
signal.signal(signal.SIGINT, signal.default_int_handler)
matrix.interruptible()
started = []
def session(root, index, item):
    started.append(index)
    if len(started) == 2:
        print(root, flush=True)
    return matrix._session_process(["sleep", "600"], root, dict(os.environ))
matrix.in_sessions([0, 1, 2], session, 2)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_an_interrupted_matrix_kills_its_sessions_and_removes_its_directory(signum):
    import subprocess
    import sys

    from conftest import wait_until

    from kit.system import linux

    root = ""
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_RUN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    sessions: list[int] = []
    try:
        assert proc.stdout is not None
        root = proc.stdout.readline().strip()
        assert root and os.path.isdir(root), proc.stderr.read() if proc.stderr else ""
        sessions = wait_until(
            lambda: len(s := linux.children(proc.pid)) == 2 and s, what="two sessions"
        )
        proc.send_signal(signum)
        assert proc.wait(timeout=30) != 0
    finally:
        proc.kill()
        proc.wait()
        survivors = [p for p in sessions if linux.process_alive(p)]
        left = bool(root) and os.path.exists(root)
        for pid in survivors:  # judged below; a failed test leaves nothing behind either
            os.kill(pid, signal.SIGKILL)
        if left:
            shutil.rmtree(root, ignore_errors=True)
    assert survivors == []
    assert not left
