"""``python -m mutants blind``: which blind engines of ``tests/blind*.py`` the suite catches."""

from __future__ import annotations

import argparse
import fnmatch
import glob
import importlib
import inspect
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from conformance import requirements
from conformance.expectations import FLOWS
from conformance.outcomes import PREFLIGHT_REFUSED
from mutants import matrix

#: Where the blind engines live, and the modules that hold them.
TESTS = os.path.join(matrix.ROOT, "tests")
MODULE_GLOB = "blind*.py"
#: A module whose name ends so holds correct engines; every other one, buggy engines.
CORRECT_SUFFIX = "_correct"
#: Outcomes of an engine requirement that fail it: ``not-decided`` is a result a run the
#: engine made fail early left open (the run's root cause is the engine's, as in the matrix).
FAILING = ("failed", "not-decided")
VERDICTS = ("caught", "escaped", "passed", "false-failure", "error")


@dataclass(frozen=True)
class BlindEngine:
    """One engine class of a ``tests/blind*.py`` module."""

    module: str
    cls: str
    name: str  # its engine_name
    correct: bool
    #: The reason of its ``escapes`` (buggy) or ``false_failure`` (correct) mark, if any.
    known: str = ""
    summary: str = ""  # the first line of its docstring
    hook_timeout: float | None = None
    #: The backend its session runs in: its class's ``blind_backend``, for a bug that only
    #: one backend can show (a direct privileged call, which only the fake backend refuses).
    backend: str = "real"

    @property
    def spec(self) -> str:
        return f"{self.module}:{self.cls}"

    @property
    def kind(self) -> str:
        return "correct" if self.correct else "buggy"

    def target(
        self, flows: Sequence[str] = FLOWS, self_check: str = "one", directory: str = TESTS
    ) -> matrix.Target:
        """The session that judges it: every flow (or ``flows``), the blind modules'
        directory on the import path."""
        return matrix.Target(
            self.name,
            self.spec,
            flows=tuple(flows),
            bug=self.summary,
            hook_timeout=self.hook_timeout,
            pythonpath=(directory,),
            kit_self_check=self_check,
        )


def _engine_classes(module: Any) -> list[type]:
    """The classes defined in ``module`` (not imported into it) that have an engine name, in
    the order they are defined."""
    # A module's namespace keeps the order its names were bound in.
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and obj.__module__ == module.__name__
        and isinstance(getattr(obj, "engine_name", None), str)
        and getattr(obj, "engine_name", "")
    ]


def discover(directory: str = TESTS) -> list[BlindEngine]:
    """Every engine of the ``blind*.py`` modules of ``directory``, by module name, then in
    the order they are defined; a ValueError for a module that does not import, a duplicate
    engine name or a mark of the wrong kind."""
    if directory not in sys.path:
        sys.path.insert(0, directory)  # the modules import as the sessions import them
    out: list[BlindEngine] = []
    seen: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(directory, MODULE_GLOB))):
        name = os.path.basename(path)[: -len(".py")]
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 (any error of a module being written: named)
            raise ValueError(f"{path}: does not import: {type(exc).__name__}: {exc}") from None
        correct = name.endswith(CORRECT_SUFFIX)
        for cls in _engine_classes(module):
            engine = _engine(name, cls, correct)
            if engine.name in seen:
                raise ValueError(
                    f"{engine.spec}: engine_name {engine.name!r} is also {seen[engine.name]}'s"
                )
            seen[engine.name] = engine.spec
            out.append(engine)
    return out


def _engine(module: str, cls: type, correct: bool) -> BlindEngine:
    # A mark is the class's own: it explains one engine's verdict, and a buggy engine that
    # subclasses a correct one marked false_failure is not a false failure.
    escapes = vars(cls).get("escapes", "") or ""
    false_failure = vars(cls).get("false_failure", "") or ""
    where = f"{module}:{cls.__name__}"
    if correct and escapes:
        raise ValueError(f"{where}: a correct engine has no escapes mark (false_failure?)")
    if not correct and false_failure:
        raise ValueError(f"{where}: a buggy engine has no false_failure mark (escapes?)")
    for mark in (escapes, false_failure):
        if not isinstance(mark, str):
            raise ValueError(f"{where}: its mark is {mark!r}, not a reason (a string)")
    doc = inspect.getdoc(cls) or ""
    timeout = getattr(cls, "hook_timeout", None)
    backend = getattr(cls, "blind_backend", "real")
    if backend not in matrix.BACKENDS:
        raise ValueError(
            f"{where}: blind_backend {backend!r} is not one of {', '.join(matrix.BACKENDS)}"
        )
    return BlindEngine(
        module,
        cls.__name__,
        cls.engine_name,  # type: ignore[attr-defined]  # _engine_classes checked it
        correct,
        escapes or false_failure,
        " ".join(doc.split("\n\n")[0].split()),
        float(timeout) if isinstance(timeout, int | float) and timeout > 0 else None,
        backend,
    )


def select(engines: Sequence[BlindEngine], patterns: Sequence[str]) -> list[BlindEngine]:
    """The engines any of ``patterns`` matches (all without patterns): a shell pattern
    (``*``, ``?``, ``[…]``) matched against the engine name, ``module:Class`` and the module;
    a pattern without one of those matches where it occurs in them. A ValueError names a
    pattern that matches no engine."""
    if not patterns:
        return list(engines)
    chosen: set[str] = set()
    for pattern in patterns:
        glob_pattern = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        hits = [
            e.spec
            for e in engines
            if any(fnmatch.fnmatchcase(text, glob_pattern) for text in (e.name, e.spec, e.module))
        ]
        if not hits:
            raise ValueError(
                f"--only {pattern!r} matches no engine (engine names such as "
                f"{engines[0].name if engines else 'blind-x'!r}, or module:Class)"
            )
        chosen.update(hits)
    return [e for e in engines if e.spec in chosen]


def classify(engine: BlindEngine, doc: dict[str, Any]) -> dict[str, Any]:
    """The verdict on ``engine`` from its session's report (:func:`matrix.run_session`'s
    document), as one JSON entry; ``ok`` says whether it leaves the run passing and
    ``problem`` why not. Only ENGINE-subject requirements count:

    - a buggy engine is **caught** when one of them failed (or was left undecided by a run
      the engine made fail early: the suite's verdict is then NOT conformant too), and
      **escaped** otherwise: a kit requirement or a harness error alone catches nothing;
    - a correct engine **passed** when none of them failed, else it is a **false failure**;
    - the preflight refused the engine (a usage error naming the hook and what to change:
      an invalid StarterConfig in one flow, say): every lifecycle is refused with it, so
      the engine is judged by that (``failed`` lists ``preflight``);
    - **error**: the session wrote no report otherwise, or decided nothing: nothing was
      judged.

    A class attribute ``escapes = "reason"`` (buggy) or ``false_failure = "reason"``
    (correct) makes the escape or false failure known: ok. An unmarked one, an error, or a
    mark on an engine that was caught or passed (stale) is not."""
    failing: dict[str, set[str]] = {}
    messages: dict[str, str] = {}  # the first message of each failing engine requirement
    decided: set[str] = set()
    kit_failed: set[str] = set()
    broken: set[str] = set()
    counts: dict[str, int] = {}
    for r in doc.get("results") or []:
        req = r.get("requirement", "?")
        entry = requirements.CATALOGUE.get(req)
        subject = r.get("subject") or (entry.subject if entry else requirements.ENGINE)
        outcome = r.get("outcome")
        counts[str(outcome)] = counts.get(str(outcome), 0) + 1
        if outcome == "broken":
            broken.add(req)
        elif outcome in FAILING and subject != requirements.ENGINE:
            kit_failed.add(req)
        elif outcome in FAILING:
            failing.setdefault(req, set()).add(str(r.get("flow", "?")))
            messages.setdefault(req, str(r.get("message") or "")[:600])
            if outcome == "failed":
                decided.add(req)
    error = doc.get("error")
    if error and PREFLIGHT_REFUSED in str(error) and "preflight of engine" in str(error):
        named = {f for f in FLOWS if re.search(rf"\b{f}\b", str(error))}
        failing["preflight"] = named or set(FLOWS)  # the flows its message names
        messages["preflight"] = str(error)[:600]
        decided.add("preflight")
        error = None
    if not error and not counts.get("passed") and not failing:
        # Every result skipped (no flow configured here, say): a correct engine would
        # "pass" and a buggy one "escape" without one check having run.
        error = f"the session decided nothing: {counts or 'no results'}"
    if error:
        verdict = "error"
    elif engine.correct:
        verdict = "false-failure" if failing else "passed"
    else:
        verdict = "caught" if failing else "escaped"
    problem = None
    if verdict == "error":
        problem = f"no verdict: {str(error)[:300]}"
    elif verdict in ("escaped", "false-failure") and not engine.known:
        mark = "escapes" if verdict == "escaped" else "false_failure"
        problem = f"{verdict}, not marked (fix the check, or give the class {mark} = 'why')"
    elif verdict in ("caught", "passed") and engine.known:
        mark = "escapes" if verdict == "caught" else "false_failure"
        problem = f"{verdict}, but marked {mark}: the mark is stale, remove it"
    order = {flow: i for i, flow in enumerate(FLOWS)}
    return {
        "engine": engine.name,
        "spec": engine.spec,
        "module": engine.module,
        "kind": engine.kind,
        "backend": engine.backend,
        "verdict": verdict,
        "known": engine.known or None,
        "ok": problem is None,
        "problem": problem,
        "failed": {
            req: sorted(flows, key=lambda f: order.get(f, 99))
            for req, flows in sorted(failing.items())
        },
        "messages": dict(sorted(messages.items())),
        "undecided_only": bool(failing) and not decided,
        "kit_failed": sorted(kit_failed),
        "broken": sorted(broken),
        "outcomes": dict(sorted(counts.items())),
        "seconds": round(float(doc.get("seconds", 0.0)), 1),
        "error": error,
        "summary": engine.summary,
    }


def exit_status(entries: Sequence[dict[str, Any]]) -> int:
    """1 when an entry leaves the run failing (an unmarked escape or false failure, an
    error, a stale mark), else 0."""
    return 0 if all(e["ok"] for e in entries) else 1


def line(entry: dict[str, Any]) -> str:
    """An entry as one progress line."""
    verdict = entry["verdict"]
    if verdict in ("caught", "false-failure"):
        shown = [f"{req} ({','.join(flows)})" for req, flows in entry["failed"].items()]
        what = ("caught by " if verdict == "caught" else "FALSE FAILURE: ") + ", ".join(shown[:4])
        what += " …" if len(shown) > 4 else ""
        what += " (undecided only)" if entry["undecided_only"] else ""
    elif verdict == "escaped":
        what = "ESCAPED" if not entry["known"] else "escaped (known)"
        extra = entry["kit_failed"] + entry["broken"]
        what += f"; kit/harness only: {', '.join(extra[:4])}" if extra else ""
    elif verdict == "error":
        what = f"ERROR: {str(entry['error'])[:160]}"
    else:
        what = "passed"
    stale = " STALE MARK" if verdict in ("caught", "passed") and entry["known"] else ""
    passed = entry["outcomes"].get("passed", 0)
    results = sum(entry["outcomes"].values())
    backend = entry.get("backend", "real")
    where = "" if backend == "real" else f" ({backend} backend)"
    return (
        f"{entry['spec']:<58} {entry['kind']:<7} {what}{stale}{where}  "
        f"[{passed}/{results} passed] {entry['seconds']:.0f}s"
    )


def tally(entries: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per module (and ``total``): engines, and the count of each verdict, known ones apart."""
    out: dict[str, dict[str, int]] = {}
    for e in entries:
        for key in (e["module"], "total"):
            row = out.setdefault(key, {"engines": 0, "known": 0, **dict.fromkeys(VERDICTS, 0)})
            row["engines"] += 1
            row[e["verdict"]] += 1
            row["known"] += bool(e["known"]) and e["verdict"] in ("escaped", "false-failure")
    total = out.pop("total", None)
    return {**dict(sorted(out.items())), **({"total": total} if total else {})}


def table(entries: Sequence[dict[str, Any]], seconds: float) -> str:
    """The summary: a row per module, the totals, and every escape and false failure with
    its mark."""
    rows = tally(entries)
    head = f"{'module':<18} {'engines':>7} {'caught':>7} {'escaped':>8} {'passed':>7} "
    head += f"{'false f.':>8} {'known':>6} {'errors':>6}"
    lines = [head]
    for name, row in rows.items():
        lines.append(
            f"{name:<18} {row['engines']:>7} {row['caught']:>7} {row['escaped']:>8} "
            f"{row['passed']:>7} {row['false-failure']:>8} {row['known']:>6} {row['error']:>6}"
        )
    buggy = [e for e in entries if e["kind"] == "buggy"]
    correct = [e for e in entries if e["kind"] == "correct"]

    def count(group: Sequence[dict[str, Any]], verdict: str, known: bool | None = None) -> int:
        return sum(
            1
            for e in group
            if e["verdict"] == verdict and (known is None or bool(e["known"]) == known)
        )

    if buggy:
        lines.append(
            f"buggy engines: caught {count(buggy, 'caught')} of {len(buggy)}; escaped "
            f"{count(buggy, 'escaped')} ({count(buggy, 'escaped', True)} known)"
        )
        early = [e["spec"] for e in buggy if e["verdict"] == "caught" and e["undecided_only"]]
        if early:
            # The suite's verdict too (NOT conformant by its root causes), but no check
            # named the bug: a reader judges whether the runs failed for it.
            lines.append(
                f"  caught only by runs the engine made fail early ({len(early)}): "
                + ", ".join(early)
            )
    if correct:
        lines.append(
            f"correct engines: passed {count(correct, 'passed')} of {len(correct)}; false "
            f"failures {count(correct, 'false-failure')} "
            f"({count(correct, 'false-failure', True)} known)"
        )
    errors = count(entries, "error")
    if errors:
        lines.append(f"sessions without a report (nothing judged): {errors}")
    for e in entries:
        if e["verdict"] in ("escaped", "false-failure"):
            why = f"known: {e['known']}" if e["known"] else "NOT MARKED"
            lines.append(f"  {e['verdict']}: {e['spec']} ({why})")
    lines.append(f"{len(entries)} sessions in {seconds:.0f} s")
    return "\n".join(lines)


def run(
    engines: Sequence[BlindEngine],
    flows: Sequence[str] = FLOWS,
    self_check: str = "one",
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One session per engine (in its backend: the real one unless it says), ``jobs`` at a
    time; the entries in the order of ``engines``."""
    done = [0]

    def one(root: str, index: int, engine: BlindEngine) -> dict[str, Any]:
        doc = matrix.session_in(root, index, engine.target(flows, self_check), engine.backend)
        entry = classify(engine, doc)
        if progress is not None:
            done[0] += 1  # the GIL makes the count exact; the order is the finishing one
            progress(f"[{done[0]}/{len(engines)}] {line(entry)}")
        return entry

    return matrix.in_sessions(engines, one, jobs)


def shard(engines: Sequence[BlindEngine], index: int, count: int) -> list[BlindEngine]:
    """The ``index``-th of ``count`` disjoint parts of ``engines`` (the matrix's
    :func:`matrix.shard`, every session costing the same)."""
    chosen = {t.label for t in matrix.shard([e.target() for e in engines], index, count)}
    return [e for e in engines if e.name in chosen]


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(
        prog="python -m mutants blind",
        description="run the conformance suite (real backend unless an engine's class "
        "says blind_backend = 'fake'; as root, every run in the kit's host sandbox) against "
        "every engine of tests/blind*.py and say which buggy "
        "engines it caught (an ENGINE requirement failed), which escaped, and which correct "
        f"engines (modules ending in {CORRECT_SUFFIX}) failed falsely. Exit 1 when an "
        "engine escapes or fails falsely without an `escapes`/`false_failure` mark giving "
        "the reason, a session writes no report, or a mark is stale; 2 for a bad argument",
    )
    out.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only the engines whose name, module:Class or module this shell pattern "
        "matches (a pattern without *?[ matches where it occurs); repeatable",
    )
    out.add_argument(
        "--shard",
        metavar="K/N",
        help="only the K-th of N disjoint parts of the engines (the same on every machine)",
    )
    out.add_argument("--out", metavar="FILE", help="write the entries and the tally there (JSON)")
    out.add_argument(
        "--flow",
        metavar="FLOW[,FLOW…]",
        help=f"only these flows (default: all: {', '.join(FLOWS)})",
    )
    out.add_argument(
        "--kit-self-check",
        choices=("one", "all"),
        default="one",
        help="passed to each session: the suite's default (one) is what an engine's author "
        "runs; the kill matrix uses all",
    )
    out.add_argument("-j", "--jobs", type=int, default=1, help="sessions at a time (default: 1)")
    out.add_argument(
        "--list", action="store_true", help="list the engines that would run; run nothing"
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mutants blind``."""
    args = parser().parse_args(argv)
    prog = "python -m mutants blind"
    try:
        flows = _flows(args.flow)
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: at least 1")
        engines = select(discover(), args.only)
        if args.shard is not None:
            engines = shard(engines, *matrix.parse_shard(args.shard))
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for e in engines:
            mark = f"  [known: {e.known}]" if e.known else ""
            print(f"{e.spec:<58} {e.kind:<7} {e.name}{mark}")
        print(f"{len(engines)} engines")
        return 0
    if not engines:
        print(f"{prog}: this shard holds no engine", file=sys.stderr)
        return 0
    start = time.monotonic()
    entries = run(engines, flows, args.kit_self_check, args.jobs, lambda s: print(s, flush=True))
    seconds = time.monotonic() - start
    print()
    print(table(entries, seconds))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"entries": entries, "tally": tally(entries), "seconds": round(seconds, 1)},
                f,
                indent=1,
            )
        print(f"entries: {args.out}")
    problems = [f"  {e['spec']}: {e['problem']}" for e in entries if not e["ok"]]
    if problems:
        print("\nthe blind run fails:")
        print("\n".join(problems))
        return 1
    print("\nevery buggy engine was caught or is a known escape; every correct one passed")
    return 0


def _flows(text: str | None) -> tuple[str, ...]:
    if text is None:
        return FLOWS
    flows = tuple(f.strip() for f in text.split(",") if f.strip())
    unknown = [f for f in flows if f not in FLOWS]
    if not flows or unknown:
        raise ValueError(f"--flow {text!r}: flows are {', '.join(FLOWS)}")
    return flows
