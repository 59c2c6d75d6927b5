"""The mutant zoo (reference_engines/mutants) and its kill matrix (conformance/mutants.py).

Every mutant breaks one rule; the conformance suite must fail it with a requirement it
declares, in every flow it declares, while the reference engine passes everything. The
matrix is one test (one run of ~50 pytest sessions, about two minutes on two cores), so that
pytest-xdist never runs it twice.
"""

from __future__ import annotations

import json
import os

import pytest

from conformance import mutants as M
from conformance import requirements
from reference_engines.mutants import MUTANTS, by_name, registered_name

ENTRY_KEYS = {"mutant", "slug", "flow", "backend", "declared", "failed", "broken", "killed",
              "status", "bug", "gap", "baseline", "seconds", "error"}


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


def test_every_mutant_is_registered_under_its_name_with_an_entry_point():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="kit.engines")}
    assert set(by_name()) <= names
    assert all(registered_name(m).startswith("mutant-") for m in MUTANTS)


def test_every_must_requirement_is_killed_by_a_mutant_or_the_table_says_why_not():
    assert M.uncovered() == []
    assert M.stale_exceptions() == []


#: Sessions at a time: most of a session's time is spent waiting (hooks that hang until
#: their timeout, payloads that wait for signals), so twice the CPUs keeps them busy.
JOBS = min(6, 2 * (os.cpu_count() or 1))


def test_the_kill_matrix_kills_every_mutant_and_passes_the_reference(tmp_path,
                                                                     record_property):
    """The real backend must kill every mutant but the known survivors; the fake backend
    (when the suite accepts it) runs too, and the fraction it kills is recorded."""
    _needs_root()
    fake, _ = M.backend_available("fake")
    matrix = M.run_matrix("both" if fake else "real", jobs=JOBS)
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

    survivors = [f"{e['mutant']}[{e['flow']}]: failed {e['failed']}, broken {e['broken']}, "
                 f"error {e['error']}" for e in real
                 if not e["baseline"] and not e["gap"] and e["status"] != "killed"]
    assert survivors == []
    killable = len([m for m in MUTANTS if not m.gap])
    assert matrix.killed_fraction("real") == (killable, killable, killable)
    known = [e for e in real if e["gap"]]  # known survivors (none at the moment)
    assert all(e["status"] == "survived" for e in known)
    assert matrix.verdict() == []

    if fake:
        killed, decidable, total = matrix.killed_fraction("fake")
        record_property("fake_backend_killed", f"{killed}/{total} ({decidable} decidable)")
        assert total == killable
