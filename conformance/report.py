"""The machine-readable report (``--conformance-report PATH``) and its schema.

Schema version 3 (published as JSON Schema: ``conformance/report.schema.json``)::

    {
      "schema_version": 3,
      "suite_version": "0.1.0",
      "generated": "2025-01-01T00:00:00+00:00",
      "engine": {"spec", "name", "source", "origin", "capabilities": {name: bool},
                 "capabilities_source"},
      "environment": {"kernel", "machine", "python", "pytest", "uid", "euid",
                      "user_namespaces": bool, "user_namespaces_reason", "invoker",
                      "flows": {flow: {"runnable", "reason", "selected", "backend"}},
                      "backend": {flow: backend}, "xdist_workers", "strict"},
      "summary": {outcome: count, ..., "total"},
      "results": [{"requirement", "subject", "level", "section", "text", "flow", "backend",
                   "outcome", "test", "tests", "message", "runs", "checks"}],
      "unchecked": [{"requirement", "subject", "level", "section", "text", "reason"}],
      "known_failures": [{"requirement", "flows", "reason", "where"}],
      "root_causes": [{"headline", "hook", "role", "error", "advice", "traceback", "run",
                       "results", "flows", "runs"}],   (optional: runs that failed early)
      "runs": [{"id", "flow", "scenario", "backend", "argv", "engine_config", "worker",
                "seconds", "notes", "error", "exit_code", "reason", "leaks", "timed_out",
                "stdout", "stderr", "ledger"}]
    }

``results`` has one entry per requirement × flow that the session decided (``checks``: how many
individual checks were made; ``tests``: every test that decided it, ``test`` the one whose
outcome is reported); ``runs`` holds the full ledger of every lifecycle run the results refer
to. ``subject`` (version 3) is ``engine`` or ``kit``: who can break the requirement
(:mod:`conformance.requirements`); the verdict counts engine results only.
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import pytest

from conformance import SUITE_VERSION, requirements, rootcause, schema
from conformance.catalogue import tests_by_requirement
from conformance.outcomes import NOT_DECIDED, OUTCOMES, Results

#: 2: the not-decided outcome and root_causes; 3: every result's subject (engine or kit).
#: Versions 1 and 2 are read too (their results are given the catalogue's subject).
SCHEMA_VERSION = 3

RESULT_KEYS = ("requirement", "level", "section", "text", "flow", "backend", "outcome", "test",
               "tests", "message", "runs", "checks")
TOP_KEYS = ("schema_version", "suite_version", "generated", "engine", "environment",
            "summary", "results", "unchecked", "known_failures", "runs")


def build(state: Any, results: Results, runs: list[dict[str, Any]]) -> dict[str, Any]:
    entries = results.merged()
    env = state.environment
    index = tests_by_requirement()
    user = state.invoker
    return {
        "schema_version": SCHEMA_VERSION,
        "suite_version": SUITE_VERSION,
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "engine": {"spec": state.engine, "name": state.engine_name, "source": state.engine_source,
                   "origin": state.origin, "capabilities": state.capabilities,
                   "capabilities_source": state.capabilities_source},
        "environment": {
            "kernel": platform.release(), "machine": platform.machine(),
            "python": platform.python_version(), "pytest": pytest.__version__,
            "uid": os.getuid(), "euid": os.geteuid(),
            "user_namespaces": bool(env.get("userns", (False, ""))[0]),
            "user_namespaces_reason": env.get("userns", (False, ""))[1],
            "invoker": user,
            "flows": {flow: {"runnable": ok, "reason": why, "selected": flow in state.flows,
                             "backend": state.backends.get(flow, state.backend)}
                      for flow, (ok, why) in env.items()},
            "backend": {flow: state.backends.get(flow, state.backend) for flow in env},
            "backend_requested": state.backend,
            "xdist_workers": state.xdist_workers,
            "strict": state.strict,
        },
        "summary": Results.summary(entries),
        "results": entries,
        "unchecked": [{"requirement": r.id, "subject": r.subject, "level": r.level,
                       "section": r.section, "text": r.text, "reason": r.unchecked or "no test yet"}
                      for r in requirements.CATALOGUE.values() if not index[r.id]],
        "known_failures": [{"requirement": k.requirement, "flows": list(k.flows),
                            "reason": k.reason, "where": k.where()} for k in state.known],
        "runs": sorted(runs, key=lambda r: (r.get("flow", ""), r.get("scenario", ""),
                                            r.get("worker", ""))),
        "root_causes": [{**(g.cause or {"headline": g.message.removeprefix("not decided: ")}),
                         "results": len(g.results), "flows": g.flows, "runs": g.runs}
                        for g in rootcause.groups(entries, runs)],
    }


def validate(doc: Any) -> list[str]:
    """Problems of a report (empty when valid): first against the published JSON Schema
    (every type a renderer relies on), then what a schema cannot say (known requirements and
    levels, summary counts, run references)."""
    if schema.too_deep(doc):
        return [f"nested deeper than {schema.MAX_DEPTH} levels"]
    problems = schema.validate(doc)
    if problems:
        return problems
    version = doc["schema_version"]
    counts = {o: 0 for o in OUTCOMES}
    seen = set()
    run_ids = {r.get("id") for r in doc["runs"]}
    for i, entry in enumerate(doc["results"]):
        missing = [k for k in RESULT_KEYS if k not in entry]
        if missing:
            problems.append(f"results[{i}] lacks {missing}")
            continue
        if entry["requirement"] not in requirements.CATALOGUE:
            problems.append(f"results[{i}]: unknown requirement {entry['requirement']!r}")
        elif entry["level"] != requirements.CATALOGUE[entry["requirement"]].level:
            problems.append(f"results[{i}]: level {entry['level']!r} of "
                            f"{entry['requirement']} is wrong")
        elif version >= 3 and entry.get("subject") != requirements.subject_of(
                entry["requirement"]):
            # a verdict reads the subject: a result moved to the other side would hide or
            # blame wrongly
            problems.append(f"results[{i}]: subject {entry.get('subject')!r} of "
                            f"{entry['requirement']} is wrong (the catalogue says "
                            f"{requirements.subject_of(entry['requirement'])!r})")
        if entry["outcome"] not in counts:
            problems.append(f"results[{i}]: unknown outcome {entry['outcome']!r}")
        else:
            counts[entry["outcome"]] += 1
        key = (entry["requirement"], entry["flow"])
        if key in seen:
            problems.append(f"results[{i}]: second entry for {key}")
        seen.add(key)
        for run in entry["runs"]:
            if run not in run_ids:
                problems.append(f"results[{i}] refers to run {run!r} that is not in runs")
    for outcome, n in counts.items():
        if doc["summary"].get(outcome, 0 if outcome == NOT_DECIDED else None) != n:
            problems.append(f"summary[{outcome!r}] = {doc['summary'].get(outcome)!r}, "
                            f"results have {n}")
    if doc["summary"].get("total") != len(doc["results"]):
        problems.append("summary total != number of results")
    for i, run in enumerate(doc["runs"]):
        if run.get("error") is None and "ledger" not in run:
            problems.append(f"runs[{i}] ({run.get('id')}) has no ledger")
    return problems
