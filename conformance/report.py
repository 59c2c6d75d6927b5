"""The machine-readable report (``--conformance-report PATH``) and its schema."""

# No ``from __future__ import annotations``: the TypedDicts below need their Required and
# NotRequired wrappers evaluated to know their required keys (Python 3.11).

import datetime
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict, cast, get_type_hints

import pytest

from conformance import SUITE_VERSION, requirements, rootcause, schema
from conformance.catalogue import checked_by, suite_tests, tests_by_requirement
from conformance.expectations import FLOWS
from conformance.outcomes import (
    NOT_CONFIGURED,
    NOT_DECIDED,
    NOT_SUPPORTED,
    OUTCOMES,
    Results,
)

#: 2: the not-decided outcome and root_causes; 3: every result's subject (engine or kit).
#: Versions 1 and 2 are read too (their results are given the catalogue's subject).
SCHEMA_VERSION = 3

# -- the document, as TypedDicts (published as JSON Schema: conformance/report.schema.json; a
# test keeps the two in agreement). A report is typed once: when this module builds it, or when
# it passed :func:`validate` (:func:`parse`).

JsonObject = dict[str, Any]
Level = Literal["MUST", "SHOULD", "MAY"]
Subject = Literal["engine", "kit"]
Outcome = Literal[
    "passed", "failed", "broken", "not-supported", "not-configured", "xfail", "not-decided"
]


class EngineInfo(TypedDict):
    spec: NotRequired[str]
    name: str
    source: NotRequired[str]
    origin: str
    capabilities: NotRequired[dict[str, bool]]
    capabilities_source: NotRequired[str]


class FlowInfo(TypedDict, total=False):
    runnable: bool
    reason: str
    selected: bool
    backend: str


class KitSelfCheck(TypedDict):
    """--kit-self-check: the flows that ran the kit-only runs (``flow``: mode one's;
    ``flows``, in a merged report: every flow a shard ran them in)."""

    mode: Literal["one", "all", "off"]
    flow: str | None
    flows: NotRequired[list[str]]


class Invoker(TypedDict, total=False):
    name: str
    uid: int


class Environment(TypedDict):
    kernel: str
    machine: NotRequired[str]
    python: str
    pytest: NotRequired[str]
    uid: int
    euid: NotRequired[int]
    user_namespaces: bool
    user_namespaces_reason: NotRequired[str]
    invoker: NotRequired[Invoker | None]
    flows: dict[str, FlowInfo]
    backend: dict[str, str]
    backend_requested: NotRequired[str]
    xdist_workers: NotRequired[int]
    strict: NotRequired[bool]
    kit_self_check: NotRequired[KitSelfCheck]
    #: Host mount points the host sandbox did not reproduce in any run (overlayfs refused
    #: them): the engine saw an empty read-only directory there.
    sandbox_left_out: NotRequired[list[str]]


class ResultEntry(TypedDict):
    """One requirement in one flow as the session decided it."""

    requirement: str
    #: Who can break the requirement (version 3; the catalogue's for older reports).
    subject: NotRequired[Subject]
    level: Level
    section: str
    text: str
    flow: str
    backend: str
    outcome: Outcome
    #: The test whose outcome is reported; ``tests``: every test that decided it.
    test: str
    tests: list[str]
    #: The suite tests whose ``@requirement`` marks name it, whatever ran.
    checked_by: NotRequired[list[str]]
    message: str | None
    runs: list[str]
    #: How many individual checks were made.
    checks: int


class UncheckedEntry(TypedDict):
    requirement: str
    subject: NotRequired[Subject]
    level: Level
    section: NotRequired[str]
    text: str
    reason: str


class KnownFailureEntry(TypedDict):
    requirement: str
    flows: list[str]
    reason: str
    where: str


class RootCauseEntry(TypedDict):
    """A run that failed early, and how many results it left undecided."""

    headline: str
    hook: NotRequired[str]
    role: NotRequired[str]
    error: NotRequired[str]
    advice: NotRequired[str]
    traceback: NotRequired[str]
    run: NotRequired[str]
    results: NotRequired[int]
    flows: NotRequired[list[str]]
    runs: NotRequired[list[str]]


class LedgerDocument(TypedDict, total=False):
    """A run's ledger (:class:`kit.ledger.record.Ledger`); its events as stored JSON (the
    report's schema types only what a renderer reads of them)."""

    schema_version: int
    run: JsonObject
    events: list[JsonObject]


class RunEntry(TypedDict):
    """One lifecycle run (:meth:`conformance.runs.Run.to_json`)."""

    id: str
    flow: str
    scenario: str
    backend: NotRequired[str]
    argv: NotRequired[list[str]]
    engine_config: NotRequired[JsonObject]
    worker: NotRequired[str]
    seconds: NotRequired[float | None]
    notes: NotRequired[JsonObject]
    error: NotRequired[str | None]
    not_configured: NotRequired[str | None]
    exit_code: NotRequired[int | None]
    reason: NotRequired[str | None]
    leaks: NotRequired[list[Any]]
    #: Not in the published schema yet (any value is allowed there).
    timed_out: NotRequired[JsonObject | None]
    stdout: NotRequired[str]
    stderr: NotRequired[str]
    ledger: NotRequired[LedgerDocument | None]


class ShardInfo(TypedDict):
    """One shard of a merged report, as :func:`merge` describes it."""

    report: str
    generated: str
    environment: Environment
    flows: list[str]
    results: int
    runs: list[str]


class Report(TypedDict):
    schema_version: int
    suite_version: str
    generated: str
    engine: EngineInfo
    environment: Environment
    #: outcome -> count, and ``total``.
    summary: dict[str, int]
    results: list[ResultEntry]
    unchecked: list[UncheckedEntry]
    known_failures: list[KnownFailureEntry]
    runs: list[RunEntry]
    root_causes: NotRequired[list[RootCauseEntry]]
    #: Only in a merged report; not in the published schema yet.
    shards: NotRequired[list[ShardInfo]]


def _required(cls: type) -> tuple[str, ...]:
    keys: frozenset[str] = cls.__required_keys__  # type: ignore[attr-defined]
    return tuple(k for k in get_type_hints(cls) if k in keys)


RESULT_KEYS = _required(ResultEntry)
TOP_KEYS = _required(Report)


def _json(value: object) -> Any:
    """``value`` for the modules that still read a report as untyped JSON (render,
    rootcause, outcomes)."""
    return value


def build(state: Any, results: Results, runs: Sequence[Mapping[str, Any]]) -> Report:
    """The report of a session (:class:`Report`, schema version 3).

    ``results`` has one entry per requirement × flow that the session decided;
    ``root_causes`` lists the runs that failed early; ``runs`` holds the full ledger of every
    lifecycle run the results refer to. ``subject`` (version 3) is ``engine`` or ``kit``: who
    can break the requirement (:mod:`conformance.requirements`); the verdict counts engine
    results only.
    """
    tests = suite_tests()
    index = tests_by_requirement(tests)
    deciders = checked_by(tests)
    # each result names the suite tests that decide its requirement, whatever ran this time
    # The session's own results and runs: typed here, once (they are not read from a file).
    entries = cast(
        list[ResultEntry],
        [{**e, "checked_by": list(deciders[e["requirement"]])} for e in results.merged()],
    )
    _where_self_checked(entries, state.plan())
    run_entries = cast(list[RunEntry], list(runs))
    env = state.environment
    user = state.invoker
    return {
        "schema_version": SCHEMA_VERSION,
        "suite_version": SUITE_VERSION,
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "engine": {
            "spec": state.engine,
            "name": state.engine_name,
            "source": state.engine_source,
            "origin": state.origin,
            "capabilities": state.capabilities,
            "capabilities_source": state.capabilities_source,
        },
        "environment": {
            "kernel": platform.release(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "pytest": pytest.__version__,
            "uid": os.getuid(),
            "euid": os.geteuid(),
            "user_namespaces": bool(env.get("userns", (False, ""))[0]),
            "user_namespaces_reason": env.get("userns", (False, ""))[1],
            "invoker": user,
            "flows": {
                flow: {
                    "runnable": ok,
                    "reason": why,
                    "selected": flow in state.flows,
                    "backend": state.backends.get(flow, state.backend),
                }
                for flow, (ok, why) in env.items()
            },
            "backend": {flow: state.backends.get(flow, state.backend) for flow in env},
            "backend_requested": state.backend,
            "xdist_workers": state.xdist_workers,
            "strict": state.strict,
            # --kit-self-check: the flow(s) that ran the kit-only runs
            "kit_self_check": state.plan().to_json(),
            "sandbox_left_out": sandbox_left_out(run_entries),
        },
        "summary": Results.summary(_json(entries)),
        "results": entries,
        "unchecked": [
            {
                "requirement": r.id,
                # the catalogue's own values, which its tests keep within these literals
                "subject": cast(Subject, r.subject),
                "level": cast(Level, r.level),
                "section": r.section,
                "text": r.text,
                "reason": r.unchecked or "no test yet",
            }
            for r in requirements.CATALOGUE.values()
            if not index[r.id]
        ],
        "known_failures": [
            {
                "requirement": k.requirement,
                "flows": list(k.flows),
                "reason": k.reason,
                "where": k.where(),
            }
            for k in state.known
        ],
        "runs": sorted(
            run_entries,
            key=lambda r: (r.get("flow", ""), r.get("scenario", ""), r.get("worker", "")),
        ),
        "root_causes": _root_causes(entries, run_entries),
    }


def _where_self_checked(entries: list[ResultEntry], plan: Any) -> None:
    """A kit result that says "checked in flow X" (--kit-self-check=one) when X did not
    decide it either says what happened there instead: its test did not run in X, or it
    was not-supported or not-configured there too."""
    if plan.mode != "one" or plan.flow is None:
        return
    said = plan.reason()
    there = {(e["requirement"], e["flow"]): e for e in entries}
    for entry in entries:
        if entry["outcome"] != NOT_CONFIGURED or entry["message"] != said:
            continue
        other = there.get((entry["requirement"], plan.flow))
        if other is None:
            entry["message"] = (
                f"not checked in this session: its kit-only runs are made in flow {plan.flow} "
                "only, where its test did not run (--kit-self-check=all for every flow)"
            )
        elif other["outcome"] in (NOT_SUPPORTED, NOT_CONFIGURED):
            entry["message"] = (
                f"not checked here, nor in flow {plan.flow} where its kit-only runs are made: "
                f"{other['outcome']} there ({other['message']})"
            )


def _root_causes(entries: list[ResultEntry], runs: list[RunEntry]) -> list[RootCauseEntry]:
    causes: list[RootCauseEntry] = []
    for g in rootcause.groups(_json(entries), _json(runs)):
        headline = g.message.removeprefix("not decided: ")
        cause = cast(RootCauseEntry, g.cause or {"headline": headline})
        causes.append({**cause, "results": len(g.results), "flows": g.flows, "runs": g.runs})
    return causes


def validate(doc: object) -> list[str]:
    """Problems of a report (empty when valid): first against the published JSON Schema
    (every type a renderer relies on), then what a schema cannot say (known requirements and
    levels, summary counts, run references)."""
    if schema.too_deep(doc):
        return [f"nested deeper than {schema.MAX_DEPTH} levels"]
    problems = schema.validate(doc)
    if problems:
        return problems
    # Every type the schema describes holds from here: what is left are the rules it cannot say.
    report = cast(Report, doc)
    version = report["schema_version"]
    counts = {o: 0 for o in OUTCOMES}
    seen = set()
    run_ids = {r.get("id") for r in report["runs"]}
    for i, entry in enumerate(report["results"]):
        missing = [k for k in RESULT_KEYS if k not in entry]
        if missing:
            problems.append(f"results[{i}] lacks {missing}")
            continue
        if entry["requirement"] not in requirements.CATALOGUE:
            problems.append(f"results[{i}]: unknown requirement {entry['requirement']!r}")
        elif entry["level"] != requirements.CATALOGUE[entry["requirement"]].level:
            problems.append(
                f"results[{i}]: level {entry['level']!r} of {entry['requirement']} is wrong"
            )
        elif version >= 3 and entry.get("subject") != requirements.subject_of(entry["requirement"]):
            # a verdict reads the subject: a result moved to the other side would hide or
            # blame wrongly
            problems.append(
                f"results[{i}]: subject {entry.get('subject')!r} of "
                f"{entry['requirement']} is wrong (the catalogue says "
                f"{requirements.subject_of(entry['requirement'])!r})"
            )
        if entry["outcome"] not in counts:
            problems.append(f"results[{i}]: unknown outcome {entry['outcome']!r}")
        else:
            counts[entry["outcome"]] += 1
        key = (entry["requirement"], entry["flow"])
        if key in seen:
            problems.append(f"results[{i}]: second entry for {key}")
        seen.add(key)
        for run_id in entry["runs"]:
            if run_id not in run_ids:
                problems.append(f"results[{i}] refers to run {run_id!r} that is not in runs")
    for outcome, n in counts.items():
        if report["summary"].get(outcome, 0 if outcome == NOT_DECIDED else None) != n:
            problems.append(
                f"summary[{outcome!r}] = {report['summary'].get(outcome)!r}, results have {n}"
            )
    if report["summary"].get("total") != len(report["results"]):
        problems.append("summary total != number of results")
    for i, run in enumerate(report["runs"]):
        if run.get("error") is None and "ledger" not in run:
            problems.append(f"runs[{i}] ({run.get('id')}) has no ledger")
    return problems


# --- merging shard reports ----------------------------------------------------------------------


class MergeError(ValueError):
    """Shard reports that cannot make one report; the message names the shards and what
    differs."""


#: What every shard of one session shares: (what, how to read it from a report).
_SAME: tuple[tuple[str, Callable[[Report], object]], ...] = (
    ("schema version", lambda d: d["schema_version"]),
    ("suite version", lambda d: d["suite_version"]),
    ("engine", lambda d: f"{d['engine'].get('name')} ({d['engine'].get('origin')})"),
    ("engine capabilities", lambda d: d["engine"].get("capabilities")),
    ("--strict", lambda d: bool(d["environment"].get("strict"))),
    ("--kit-self-check", lambda d: _self_check_of(d["environment"])["mode"]),
)


def _self_check_of(env: Environment) -> KitSelfCheck:
    # a report from before --kit-self-check ran the kit's runs in every flow
    return env.get("kit_self_check") or {"mode": "all", "flow": None}


def _self_checked_flows(env: Environment) -> list[str]:
    """The flows in which a shard made the kit-only runs (--kit-self-check)."""
    how = _self_check_of(env)
    if "flows" in how:
        return list(how["flows"])
    if how["mode"] == "all":
        return [f for f, info in env["flows"].items() if info.get("selected")]
    return [how["flow"]] if how["mode"] == "one" and how["flow"] else []


def _left_to_another_flow(entry: ResultEntry, env: Environment) -> bool:
    """Whether ``entry`` is a kit result its shard left not-configured because the shard
    made its kit-only runs in another flow (or none): nothing was decided there, so a shard
    that decided it is not contradicted."""
    subject = entry.get("subject") or requirements.subject_of(entry["requirement"])
    return (
        subject == requirements.KIT
        and entry["outcome"] == NOT_CONFIGURED
        and entry["flow"] not in _self_checked_flows(env)
    )


def _result_key(entry: ResultEntry) -> tuple[Any, ...]:
    # A subject, where results have one, is part of what a result is about.
    return entry["requirement"], entry["flow"], entry.get("subject")


def merge(shards: Sequence[tuple[str, Report]]) -> Report:
    """One report from the reports of one session's shards (``(name, report)`` each, e.g. one
    per flow or per runner), as if one session had run them all.

    Results are united; a result two shards both decided (a flow run on two runners) is kept
    once, with both shards' runs, when they agree on its outcome and backend. A run id two
    shards share (the same flow and scenario) gets ``@shardN`` on the later shard's.
    ``environment`` is the first shard's, with each flow described by the shard that ran it;
    ``shards`` keeps every shard's own environment. A kit result one shard left
    not-configured because it made its kit-only runs in another flow (--kit-self-check=one)
    is not contradicted by a shard that decided it: the decided one is kept. Raises
    :class:`MergeError` for shards of different engines, schema or suite versions,
    strictness or --kit-self-check, and for overlapping results that disagree.
    """
    if len(shards) < 2:
        raise MergeError(f"give two or more shard reports to merge, got {len(shards)}")
    first_name, first = shards[0]
    for name, doc in shards[1:]:
        for what, read in _SAME:
            if read(doc) != read(first):
                raise MergeError(
                    f"{name} and {first_name} differ in {what} ({read(doc)!r} "
                    f"against {read(first)!r}): merge only the shards of one "
                    "session (one engine, one kit version, the same options)"
                )
    merged: dict[tuple[Any, ...], ResultEntry] = {}
    decided_by: dict[tuple[Any, ...], str] = {}
    runs: list[RunEntry] = []
    taken: set[str] = set()
    described: list[ShardInfo] = []
    known: dict[tuple[Any, ...], KnownFailureEntry] = {}
    envs = {name: doc["environment"] for name, doc in shards}
    for index, (name, doc) in enumerate(shards, 1):
        renamed: dict[str, str] = {}
        for run in doc["runs"]:
            new_id = run["id"] if run["id"] not in taken else f"{run['id']}@shard{index}"
            renamed[run["id"]] = new_id
            taken.add(new_id)
            runs.append({**run, "id": new_id})
        for entry in doc["results"]:
            entry = {**entry, "runs": [renamed.get(r, r) for r in entry["runs"]]}
            key = _result_key(entry)
            have = merged.get(key)
            if have is None or (
                _left_to_another_flow(have, envs[decided_by[key]])
                and not _left_to_another_flow(entry, doc["environment"])
            ):  # the first shard to say, or the first to decide a kit result
                merged[key] = entry
                decided_by[key] = name
            elif _left_to_another_flow(entry, doc["environment"]):
                continue  # this shard did not check it: another one did
            elif (have["outcome"], have["backend"]) != (entry["outcome"], entry["backend"]):
                raise MergeError(
                    f"{entry['requirement']} in flow {entry['flow']}: {decided_by[key]} says "
                    f"{have['outcome']} ({have['backend']} backend), {name} says "
                    f"{entry['outcome']} ({entry['backend']} backend): shards that overlap "
                    "must agree; look at the two runners' environments, or shard without "
                    "overlap"
                )
            else:
                have["runs"] = sorted(set(have["runs"]) | set(entry["runs"]))
        for k in doc["known_failures"]:
            known.setdefault((k["requirement"], tuple(k["flows"]), k["reason"]), k)
        env = doc["environment"]
        described.append(
            ShardInfo(
                report=name,
                generated=doc["generated"],
                environment=env,
                flows=[f for f, info in env["flows"].items() if info.get("selected")],
                results=len(doc["results"]),
                runs=[renamed[r["id"]] for r in doc["runs"]],
            )
        )
    order = {r: i for i, r in enumerate(requirements.CATALOGUE)}
    entries = sorted(
        merged.values(),
        key=lambda e: (
            order.get(e["requirement"], len(order)),
            FLOWS.index(e["flow"]) if e["flow"] in FLOWS else len(FLOWS),
            str(e.get("subject")),
        ),
    )
    runs.sort(
        key=lambda r: (r.get("flow", ""), r.get("scenario", ""), r.get("worker", ""), r["id"])
    )
    return {
        **first,
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": _merged_environment([doc["environment"] for _, doc in shards]),
        "summary": Results.summary(_json(entries)),
        "results": entries,
        "known_failures": list(known.values()),
        "runs": runs,
        "root_causes": _root_causes(entries, runs),
        "shards": described,
    }


def sandbox_left_out(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The host mount points that some run's host sandbox left out (its ``run_start``)."""
    points: set[str] = set()
    for run in runs:
        for event in (run.get("ledger") or {}).get("events") or []:
            if event.get("kind") == "run_start":
                points.update(p for p in event.get("sandbox_left_out") or [] if isinstance(p, str))
    return sorted(points)


def _merged_environment(envs: list[Environment]) -> Environment:
    """The first shard's environment, each flow as the shard that selected it saw it, and
    the flows each shard made its kit-only runs in."""
    out: Environment = {**envs[0], "flows": {}, "backend": {}}
    if any("kit_self_check" in env for env in envs):
        flows = {f for env in envs for f in _self_checked_flows(env)}
        ordered = [f for f in FLOWS if f in flows]
        mode = _self_check_of(envs[0])["mode"]
        out["kit_self_check"] = {
            "mode": mode,
            "flow": ordered[0] if mode == "one" and len(ordered) == 1 else None,
            "flows": ordered,
        }
    left_out = sorted({p for env in envs for p in env.get("sandbox_left_out", [])})
    if left_out:
        out["sandbox_left_out"] = left_out
    for flow in dict.fromkeys(f for env in envs for f in env["flows"]):
        seen = [env for env in envs if flow in env["flows"]]
        env = next((e for e in seen if e["flows"][flow].get("selected")), seen[0])
        out["flows"][flow] = env["flows"][flow]
        backend = env["backend"].get(flow, env["flows"][flow].get("backend"))
        if backend is not None:  # a null one would fail the schema (and the renderer's sort)
            out["backend"][flow] = backend
    return out


def merge_command(paths: list[str], out_dir: str | None, strict: bool | None = None) -> int:
    """``python -m conformance report --merge A.json B.json … --out DIR``: write the merged
    ``conformance.json``, ``summary.md`` and ``report.html`` into DIR; the exit status is the
    merged verdict, 2 when the shards cannot be merged (the message says why)."""
    from conformance import render  # noqa: PLC0415  (render imports this module)

    if not out_dir:
        print(
            "conformance report --merge: give --out DIR (where the merged report goes)",
            file=sys.stderr,
        )
        return render.HARNESS_ERROR
    try:
        # render.load validated each shard: it is a Report from here
        doc = merge([(path, cast(Report, render.load(path))) for path in paths])
    except (render.ReportError, MergeError) as exc:
        print(f"conformance report --merge: {exc}", file=sys.stderr)
        return render.HARNESS_ERROR
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        merged_path = Path(out_dir) / "conformance.json"
        merged_path.write_text(json.dumps(doc))
        v, written = render.write(_json(doc), out_dir, strict)
    except OSError as exc:
        print(
            f"conformance report --merge: cannot write into {out_dir}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return render.HARNESS_ERROR
    for line in render.terminal_summary(_json(doc), v):
        print(line)
    print(f"merged {len(paths)} shards: {merged_path} {written['summary']} {written['html']}")
    return v.code
