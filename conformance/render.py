"""Readable reports from the JSON report (:mod:`conformance.report`), and its verdict."""

from __future__ import annotations

import html
import json
import re
import sys
import textwrap
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance import report as schema
from conformance import requirements, rootcause
from conformance.expectations import FLOWS
from conformance.outcomes import (
    BROKEN,
    FAILED,
    NOT_CONFIGURED,
    NOT_DECIDED,
    NOT_SUPPORTED,
    OUTCOMES,
    PASSED,
    STRICT_PREFIX,
    XFAIL,
    Results,
)

#: Exit codes of a verdict (and of the gate).
CONFORMANT, NOT_CONFORMANT, HARNESS_ERROR, NOTHING_RAN = 0, 1, 2, 3

SUMMARY_MD, REPORT_HTML = "summary.md", "report.html"

#: Outcome -> (symbol, short label) in tables.
SYMBOLS = {
    PASSED: ("✅", "pass"),
    FAILED: ("❌", "FAIL"),
    BROKEN: ("💥", "broken"),
    NOT_SUPPORTED: ("➖", "n/s"),
    NOT_CONFIGURED: ("⬜", "n/c"),
    XFAIL: ("⚠️", "xfail"),
    NOT_DECIDED: ("⛔", "n/d"),
}
#: The same in HTML, in characters every common font has (no emoji font needed).
HTML_SYMBOLS = {
    PASSED: ("✓", "pass"),
    FAILED: ("✗", "FAIL"),
    BROKEN: ("⚠", "broken"),
    NOT_SUPPORTED: ("–", "n/s"),
    NOT_CONFIGURED: ("○", "n/c"),
    XFAIL: ("!", "xfail"),
    NOT_DECIDED: ("⊘", "n/d"),
}
BAD = (FAILED, BROKEN, NOT_DECIDED)
LEVEL_RANK = {"MUST": 0, "SHOULD": 1, "MAY": 2}

#: Ledger roles drawn as lanes, left to right (the kit's process tree, roughly).
LANES = ("launcher", "supervisor", "starter", "stage1", "master", "container", "rpc", "stage2")
#: The lane a process is forked from.
PARENT = {
    "starter": "supervisor",
    "stage1": "starter",
    "container": "starter",
    "master": "starter",
    "rpc": "container",
    "stage2": "container",
}
FULL_MAP = [[0, 0, 4294967295]]


class ReportError(ValueError):
    """The file is not a readable conformance report of a known schema."""


def load(path: str | Path) -> dict[str, Any]:
    """The report at ``path``, validated against its schema (:class:`ReportError` if not)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ReportError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ReportError(f"{path}: not a text file ({exc.reason})") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ReportError(f"{path}: not JSON ({exc})") from None
    except RecursionError:
        raise ReportError(
            f"{path}: not a conformance report (JSON nested too deeply to read)"
        ) from None
    return checked(doc, str(path))


def checked(doc: Any, where: str = "report") -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ReportError(f"{where}: not a conformance report (a JSON object is expected)")
    try:
        problems = schema.validate(doc)
    except (TypeError, KeyError, AttributeError, ValueError, RecursionError) as exc:
        problems = [f"malformed ({type(exc).__name__}: {exc})"]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ReportError(
            f"{where}: not a valid conformance report (schema "
            f"{schema.SCHEMA_VERSION}): {'; '.join(problems[:5])}{more}"
        )
    return doc


# --- the verdict ------------------------------------------------------------------------------


def environment_failure(entry: dict[str, Any]) -> bool:
    """A result that failed only because the environment could not run it (strict runs)."""
    return entry["outcome"] == FAILED and str(entry.get("message", "")).startswith(STRICT_PREFIX)


@dataclass
class Verdict:
    code: int
    title: str
    reasons: list[str] = field(default_factory=list)
    failing: list[dict[str, Any]] = field(default_factory=list)  # make it non-conformant
    broken: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)  # failed, not counted
    strict: bool = False
    root_causes: list[rootcause.Group] = field(default_factory=list)
    self_check: SelfCheck | None = None  # the kit requirements of the run

    @property
    def ok(self) -> bool:
        return self.code == CONFORMANT


# --- the two subjects: the engine's results, and the kit's self-check --------------------------


def subject_of(entry: dict[str, Any]) -> str:
    """``engine`` or ``kit`` of a result (a report older than schema 3 has no ``subject``:
    the catalogue's is used)."""
    subject = entry.get("subject")
    return (
        subject
        if isinstance(subject, str)
        else requirements.subject_of(str(entry.get("requirement")))
    )


def engine_view(doc: dict[str, Any]) -> dict[str, Any]:
    """The report as the engine's verdict and tables see it: engine results only, their
    counts recomputed (the kit's results stay in ``doc`` and the JSON)."""
    results = [e for e in doc["results"] if subject_of(e) == requirements.ENGINE]
    unchecked = [
        u
        for u in doc.get("unchecked") or []
        if requirements.subject_of(str(u.get("requirement"))) == requirements.ENGINE
    ]
    if len(results) == len(doc["results"]) and len(unchecked) == len(doc.get("unchecked") or []):
        return doc
    return {**doc, "results": results, "summary": Results.summary(results), "unchecked": unchecked}


@dataclass
class SelfCheck:
    """The kit requirements of an engine's run: the harness checking itself on this machine."""

    checked: list[str] = field(default_factory=list)  # decided in at least one flow
    failing: dict[str, list[str]] = field(default_factory=dict)  # requirement -> flows
    not_checked: int = 0  # kit requirements with results, none decided here
    entries: list[dict[str, Any]] = field(default_factory=list)  # the failing results
    #: --kit-self-check of the session (the report's environment): one, all or off
    mode: str = "all"
    #: mode one: the flow that ran the kit-only runs (a merged report's: each shard's)
    flows: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failing

    def line(self) -> str:
        if self.mode == "off" and not self.checked:
            return "harness self-check on this machine: not run (--kit-self-check=off)"
        if not self.checked:
            return (
                "harness self-check on this machine: no kit requirement could be checked "
                f"({self.not_checked} not decided here)"
            )
        text = (
            f"harness self-check on this machine: {len(self.checked) - len(self.failing)}"
            f"/{len(self.checked)} kit requirements hold"
        )
        if self.not_checked:
            text += f" ({self.not_checked} not checked here)"
        if self.failing:
            text += "; failing: " + ", ".join(
                f"{req} [{','.join(flows)}]" for req, flows in self.failing.items()
            )
        if self.mode == "one" and self.flows:
            text += (
                f" (kit-only runs in flow{'s' if len(self.flows) > 1 else ''} "
                f"{', '.join(self.flows)}; --kit-self-check=all for every flow)"
            )
        elif self.mode == "off":
            text += " (kit-only runs not made: --kit-self-check=off)"
        return text


def self_check(doc: dict[str, Any]) -> SelfCheck | None:
    """The kit requirements' results summed up (None when the run has none). A kit result
    that failed, broke or was excused as a known failure does not hold: no engine can break
    these rules, so an engine's known-failures file cannot excuse them either."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in doc["results"]:
        if subject_of(e) == requirements.KIT:
            groups.setdefault(e["requirement"], []).append(e)
    if not groups:
        return None
    env = doc.get("environment") or {}
    how = env.get("kit_self_check") or {}
    selected = [f for f, d in (env.get("flows") or {}).items() if (d or {}).get("selected")]
    flows = how.get("flows")
    if flows is None:
        flows = [how["flow"]] if how.get("flow") else []
    mode = str(how.get("mode") or "all")
    # with one flow selected, or all of them self-checked, "which flow" says nothing new
    check = SelfCheck(mode=mode, flows=list(flows) if mode == "one" and len(selected) > 1 else [])
    for req, group in groups.items():
        decided = [
            e
            for e in group
            if e["outcome"] in (PASSED, FAILED, BROKEN, XFAIL) and not environment_failure(e)
        ]
        if not decided:
            check.not_checked += 1
            continue
        check.checked.append(req)
        bad = [e for e in decided if e["outcome"] != PASSED]
        if bad:
            check.failing[req] = sorted({e["flow"] for e in bad}, key=_flow_key)
            check.entries += bad
    return check


def verdict(doc: dict[str, Any], strict: bool | None = None) -> Verdict:
    """What the report means for a pipeline: the engine's verdict (:func:`engine_verdict`,
    engine requirements only) with the kit's self-check line; a kit requirement that does not
    hold makes it a harness error (2), whatever the engine did, since the harness that judged
    the engine is broken on this machine.

    Exit statuses: conformant 0, not conformant 1, harness error 2, nothing could run here 3.
    """
    strict = bool(doc.get("environment", {}).get("strict")) if strict is None else strict
    v = engine_verdict(engine_view(doc), strict)
    check = self_check(doc)
    v.self_check = check
    if check is None:
        return v
    if check.ok:
        v.reasons.append(check.line())
        return v
    return Verdict(
        HARNESS_ERROR,
        "harness error",
        [
            check.line() + ": the kit itself broke a rule no engine can break, so this run "
            "cannot judge the engine; report it to the kit with conformance.json",
            *[f"engine: {v.title}: {r}" if i == 0 else r for i, r in enumerate(v.reasons)],
        ],
        v.failing,
        v.broken,
        v.warnings,
        strict,
        v.root_causes,
        check,
    )


def engine_verdict(doc: dict[str, Any], strict: bool) -> Verdict:
    """The engine's verdict from its own results.

    - 1, not conformant: a run failed early (its root cause leaves results not decided), or a
      MUST failed (with ``strict``: anything failed, or a MUST could not be checked: not
      configured or not supported);
    - 2, harness error: no results, or a result is broken (the harness could not decide it)
      and nothing failed;
    - 3, nothing ran: no result was decided because this environment could run none of it;
    - 0, conformant: otherwise (failed SHOULD/MAY results are listed as warnings).
    """
    results = doc["results"]
    if not results:
        return Verdict(
            HARNESS_ERROR,
            "harness error",
            ["the report has no engine results: no conformance test of an engine requirement ran"],
            strict=strict,
        )
    decided = [
        e
        for e in results
        if e["outcome"] in (PASSED, FAILED, BROKEN, XFAIL, NOT_DECIDED)
        and not environment_failure(e)
    ]
    skipped_env = [e for e in results if e["outcome"] == NOT_CONFIGURED or environment_failure(e)]
    if not decided:
        if skipped_env:
            flows = sorted({e["flow"] for e in skipped_env}, key=_flow_key)
            return Verdict(
                NOTHING_RAN,
                "nothing could run here",
                [
                    f"every result is not-configured (flows {', '.join(flows)}): this machine "
                    "cannot run them",
                    *_reasons_not_configured(doc, skipped_env),
                ],
                strict=strict,
            )
        return Verdict(
            HARNESS_ERROR,
            "harness error",
            ["no requirement was decided: every result is not-supported"],
            strict=strict,
        )
    failing: list[dict[str, Any]] = []
    warnings: list[dict[str, Any]] = []
    for e in results:
        if e["outcome"] == FAILED:
            (
                failing if strict or e["level"] == "MUST" or environment_failure(e) else warnings
            ).append(e)
        elif (
            strict
            and e["outcome"] in (NOT_CONFIGURED, NOT_SUPPORTED)
            and (e["outcome"] == NOT_CONFIGURED or e["level"] == "MUST")
        ):
            failing.append(e)
    failing.sort(key=lambda e: LEVEL_RANK.get(e["level"], 9))
    broken = [e for e in results if e["outcome"] == BROKEN]
    causes = rootcause.groups(results, doc.get("runs") or [])
    coverage = must_coverage(doc)
    if causes or failing:
        reasons = [
            f"{g.message.removeprefix('not decided: ')} ({len(g.results)} result"
            f"{'s' if len(g.results) != 1 else ''} not decided)"
            for g in causes
        ]
        failed = [e for e in failing if e["outcome"] == FAILED]
        unchecked = [e for e in failing if e["outcome"] != FAILED]
        if failed:
            reqs = len({e["requirement"] for e in failed})
            musts = sum(1 for e in failed if e["level"] == "MUST")
            what = (
                f"{len(failed)} failed result{'s' if len(failed) != 1 else ''} "
                f"({musts} MUST) in {reqs} requirement{'s' if reqs != 1 else ''}"
            )
            reasons.append(what + (" (strict: any failure counts)" if strict else ""))
        if unchecked:
            reasons.append(
                f"strict: {len(unchecked)} result(s) could not be checked "
                f"({sum(1 for e in unchecked if e['outcome'] == NOT_SUPPORTED)} "
                f"MUST not-supported, "
                f"{sum(1 for e in unchecked if e['outcome'] == NOT_CONFIGURED)} "
                "not-configured)"
            )
        if broken:
            reasons.append(
                f"{len(broken)} more result(s) broken: the harness could not decide them"
            )
        return Verdict(
            NOT_CONFORMANT,
            "NOT conformant",
            reasons + coverage,
            failing,
            broken,
            warnings,
            strict,
            causes,
        )
    if broken:
        reqs = len({e["requirement"] for e in broken})
        return Verdict(
            HARNESS_ERROR,
            "harness error",
            [
                f"{len(broken)} result(s) in {reqs} requirement(s) are broken: the harness could "
                "not decide them (see their messages)",
                *coverage,
            ],
            [],
            broken,
            warnings,
            strict,
        )
    reasons = [f"every MUST that ran passed ({len(decided)} results decided)", *coverage]
    if warnings:
        reasons.append(f"{len(warnings)} failed SHOULD/MAY result(s), not counted without --strict")
    if skipped_env:
        reasons.append(f"{len(skipped_env)} result(s) not configured on this machine")
    return Verdict(CONFORMANT, "conformant", reasons, [], [], warnings, strict)


_CAPABILITY = re.compile(r"does not declare capability (\w+)")


def must_coverage(doc: dict[str, Any]) -> list[str]:
    """How many MUST requirements each flow checked, and why the others were not (the
    capability to declare, the reason the machine cannot run them; flows with the same
    reasons share a line); then the flows that were not checked at all."""
    musts: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for e in doc["results"]:
        if e.get("level") == "MUST":
            musts.setdefault(e["flow"], {}).setdefault(e["outcome"], []).append(e)
    counts: list[str] = []
    why_flows: dict[str, list[str]] = {}
    for flow in sorted(musts, key=_flow_key):
        by = musts[flow]
        total = sum(len(v) for v in by.values())
        checked = sum(len(by.get(o, [])) for o in (PASSED, FAILED, XFAIL))
        counts.append(f"{flow} {checked} of {total}")
        missing = _missing(by)
        if missing:
            why_flows.setdefault(missing, []).append(flow)
    lines = ["MUST requirements checked: " + ", ".join(counts)] if counts else []
    lines += [f"not checked in {', '.join(flows)}: {why}" for why, flows in why_flows.items()]
    flows = doc.get("environment", {}).get("flows") or {}
    unselected = [f for f in sorted(flows, key=_flow_key) if not flows[f].get("selected", True)]
    if unselected:
        lines.append(f"flows not checked (not selected): {', '.join(unselected)}")
    return lines


def _missing(by: dict[str, list[dict[str, Any]]]) -> str:
    """Why a flow's unchecked MUST results were not checked, counted by reason."""
    missing = []
    if by.get(NOT_SUPPORTED):
        caps: dict[str, int] = {}
        other: list[str] = []
        for e in by[NOT_SUPPORTED]:
            found = _CAPABILITY.findall(str(e.get("message")))
            for cap in found:
                caps[cap] = caps.get(cap, 0) + 1
            if not found:
                other.append(f"{e['requirement']}: {first_lines(e.get('message'))[:80]}")
        why = (
            [f"declare capability {', '.join(f'{c} ({n})' for c, n in caps.items())}"]
            if caps
            else []
        ) + other
        missing.append(f"{len(by[NOT_SUPPORTED])} not-supported ({'; '.join(why)})")
    if by.get(NOT_CONFIGURED):
        why = sorted({first_lines(e.get("message"))[:120] for e in by[NOT_CONFIGURED]})
        missing.append(
            f"{len(by[NOT_CONFIGURED])} not-configured ({'; '.join(why[:3])}"
            + (f"; {len(why) - 3} more reasons" if len(why) > 3 else "")
            + ")"
        )
    for outcome, label in ((NOT_DECIDED, "not decided (the run failed early)"), (BROKEN, "broken")):
        if by.get(outcome):
            missing.append(f"{len(by[outcome])} {label}")
    return "; ".join(missing)


def _flow_key(flow: str) -> int:
    return FLOWS.index(flow) if flow in FLOWS else len(FLOWS)


def _reasons_not_configured(doc: dict[str, Any], entries: list[dict[str, Any]]) -> list[str]:
    flows = doc.get("environment", {}).get("flows", {})
    out = []
    for flow in sorted({e["flow"] for e in entries}, key=_flow_key):
        why = (flows.get(flow) or {}).get("reason")
        if why and not (flows.get(flow) or {}).get("runnable", True):
            out.append(f"{flow}: {why}")
    return out


# --- helpers on results -----------------------------------------------------------------------


def by_requirement(entries: Iterable[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(requirement, its entries) in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(e["requirement"], []).append(e)
    return list(groups.items())


def flows_of(doc: dict[str, Any]) -> list[str]:
    """Flows that have results, in the contract's order."""
    seen = {e["flow"] for e in doc["results"]}
    return [f for f in FLOWS if f in seen] + sorted(seen - set(FLOWS))


def matrix_rows(doc: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, dict[str, Any]]]]:
    """(first entry, {flow: entry}) per requirement: failing or broken ones first, then the
    rest in catalogue order."""
    rows = [
        (entries[0], {e["flow"]: e for e in entries})
        for _, entries in by_requirement(doc["results"])
    ]
    return sorted(rows, key=lambda row: not any(e["outcome"] in BAD for e in row[1].values()))


def per_flow_counts(doc: dict[str, Any]) -> dict[str, dict[str, int]]:
    out = {f: {o: 0 for o in OUTCOMES} for f in flows_of(doc)}
    for e in doc["results"]:
        out[e["flow"]][e["outcome"]] += 1
    return out


_EVENT_REF = re.compile(r"ledger event: #(\d+)[^\n]*(?:\n\s*run: ([^\s:]+))?")


def event_refs(entry: dict[str, Any]) -> list[tuple[str | None, int]]:
    """(run id, seq) of every ledger event a result's message quotes, in order."""
    out: list[tuple[str | None, int]] = []
    default = entry["runs"][0] if len(entry.get("runs") or []) == 1 else None
    for match in _EVENT_REF.finditer(str(entry.get("message") or "")):
        ref = (match.group(2) or default, int(match.group(1)))
        if ref not in out:
            out.append(ref)
    return out


def first_lines(message: Any, n: int = 1) -> str:
    lines = [line.strip() for line in str(message or "").splitlines() if line.strip()]
    return " / ".join(lines[:n])


def violation_digest(message: str) -> str:
    """``role hook: expected …; observed …`` of a message's first violation (or its first
    line when it has none)."""
    where = expected = observed = ""
    for line in str(message or "").splitlines():
        text = line.strip()
        if text.startswith("flow:") and not where:
            parts = dict(p.split(": ", 1) for p in re.split(r"\s{2,}", text) if ": " in p)
            where = " ".join(parts[k] for k in ("role", "hook") if k in parts)
        elif text.startswith("expected:") and not expected:
            expected = text
        elif text.startswith("observed:") and not observed:
            observed = text
    if expected or observed:
        return f"{where + ': ' if where else ''}{expected}; {observed}"
    lines = [line.strip() for line in str(message or "").splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else "")


def shorten(text: Any, width: int) -> str:
    """``text`` (any value, as str() shows it) on one line (runs of white space collapsed,
    leading indentation kept), at most ``width`` characters."""
    text = str(text)
    indent = text[: len(text) - len(text.lstrip(" "))]
    text = indent + " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def find_run(doc: dict[str, Any], run_id: str | None) -> dict[str, Any] | None:
    for run in doc["runs"]:
        if run.get("id") == run_id:
            return run
    return None


def run_events(run: dict[str, Any] | None) -> list[dict[str, Any]]:
    ledger = (run or {}).get("ledger") or {}
    events = ledger.get("events")
    return events if isinstance(events, list) else []


def find_event(doc: dict[str, Any], run_id: str | None, seq: int) -> dict[str, Any] | None:
    for event in run_events(find_run(doc, run_id)):
        if event.get("seq") == seq:
            return event
    return None


# --- privilege state of an event ---------------------------------------------------------------


def hooked_thread(event: dict[str, Any]) -> dict[str, Any] | None:
    snap = event.get("snapshot") or {}
    threads = snap.get("threads") or []
    for thread in threads:
        if thread.get("tid") == event.get("tid"):
            return thread
    return threads[0] if threads else None


def _caps(names: list[str] | None, limit: int = 3) -> str:
    names = list(names or [])
    if not names:
        return "none"
    if len(names) <= limit:
        return ",".join(n.removeprefix("CAP_") for n in names)
    return f"{len(names)}"


def userns_text(snap: dict[str, Any]) -> str:
    umap = snap.get("uid_map")
    if umap is None:
        return "userns ?"
    if umap == FULL_MAP:
        return "host userns"
    return "userns " + ",".join(
        f"{inside}→{outside}" + (f"+{count - 1}" if count > 1 else "")
        for inside, outside, count in umap
    )


def privilege_level(event: dict[str, Any]) -> str:
    """``host``: effective host privilege (euid 0 or effective caps in the initial user
    namespace); ``latent``: regainable (saved uid 0 or permitted caps there); ``ns``: uid 0
    or caps inside a user namespace only; ``none``; ``unknown`` without a snapshot."""
    thread = hooked_thread(event)
    snap = event.get("snapshot") or {}
    if thread is None:
        return "unknown"
    uid = thread.get("uid") or [None] * 4
    caps = thread.get("caps") or {}
    host = snap.get("uid_map") == FULL_MAP
    if host:
        if uid[1] == 0 or caps.get("effective"):
            return "host"
        if 0 in uid[:3] or caps.get("permitted"):
            return "latent"
        return "none"
    if 0 in uid[:3] or caps.get("effective") or caps.get("permitted"):
        return "ns"
    return "none"


def privilege_text(event: dict[str, Any]) -> str:
    """``uid 999/999/0 · eff caps none (prm 40) · nnp 0 · host userns`` of the hooked
    thread."""
    thread = hooked_thread(event)
    if thread is None:
        return ""
    uid = thread.get("uid") or []
    caps = thread.get("caps") or {}
    ids = "/".join(str(u) for u in uid[:3])
    if len(uid) > 3 and uid[3] != uid[1]:
        ids += f" fs {uid[3]}"
    text = f"uid {ids} · eff caps {_caps(caps.get('effective'))}"
    if caps.get("permitted") != caps.get("effective"):
        text += f" (prm {_caps(caps.get('permitted'))})"
    text += f" · nnp {1 if thread.get('no_new_privs') else 0}"
    return f"{text} · {userns_text(event.get('snapshot') or {})}"


def _arg_text(args: Any) -> str:
    if not isinstance(args, dict):
        return ""
    parts = []
    for name, value in args.items():
        if isinstance(value, (bool, int, float)) or value is None:
            parts.append(f"{name}={value}")
        elif isinstance(value, str):
            parts.append(f"{name}={shorten(repr(value), 24)}")
        else:
            parts.append(name)
    return ", ".join(parts)


def describe(event: dict[str, Any]) -> str:
    """One line for an event of the ledger (the text column of the diagram)."""
    kind = event.get("kind")
    if kind == "hook_enter":
        text = f"{event.get('hook')}({_arg_text(event.get('args'))})"
        esc = event.get("escalation") or {}
        if esc.get("host_escalation") and privilege_level(event) != "host":
            text += " · escalation possible"
        return text
    if kind == "hook_return":
        result = event.get("result")
        shown = (
            ""
            if result is None
            else f" → {shorten(json.dumps(result), 30)}"
            if not isinstance(result, dict)
            else f" → {result.get('type', 'object')}"
        )
        return f"{event.get('hook')} returned{shown}"
    if kind == "hook_raise":
        raw_err = event.get("error")
        err = raw_err if isinstance(raw_err, dict) else {}
        return f"{event.get('hook')} raised {err.get('type')}: {shorten(err.get('message'), 60)}"
    if kind == "process_start":
        return f"started (pid {event.get('pid')}, ppid {event.get('ppid')})"
    if kind == "process_exit":
        return (
            f"{event.get('child_role')} (pid {event.get('child_pid')}) exited, status "
            f"{event.get('status')}"
        )
    if kind == "rpc_call":
        status = "ok" if event.get("ok") else f"error {shorten(event.get('error'), 50)}"
        raw_args = event.get("args")
        args = raw_args if isinstance(raw_args, dict) else {}
        brief = ", ".join(f"{k}={shorten(json.dumps(v), 18)}" for k, v in list(args.items())[:2])
        return f"{event.get('method')}({brief}) {status}"
    if kind == "signal":
        return f"signal {event.get('name')} from pid {event.get('sender')}"
    if kind == "container_start":
        return (
            f"container pid {event.get('container_pid')}, created "
            f"{','.join(event.get('created') or []) or 'no namespace'}"
        )
    if kind == "namespaces":
        joined = event.get("joined") or {}
        return f"namespaces created {','.join(event.get('created') or []) or '-'}" + (
            f"; joined {','.join(joined)}" if joined else ""
        )
    if kind == "starter_config":
        return "StarterConfig received from stage 1"
    if kind == "stage2_exec":
        return "stage 2 exec'd the payload (EOF on the master socket)"
    if kind in ("stage2_failed", "fatal"):
        return f"{kind}: {shorten(event.get('message'), 80)}"
    if kind == "starter_error":
        return f"starter error ({event.get('stage')}): {shorten(event.get('message'), 70)}"
    if kind == "hook_timeout" and not event.get("hook"):
        return f"run timeout after {event.get('seconds')} s, no hook open"
    if kind == "hook_timeout":
        return (
            f"hook timeout: {event.get('hook_role')} {event.get('hook')} after "
            f"{event.get('seconds')} s"
        )
    if kind == "leak":
        return f"leak: {event.get('what')} {shorten(event.get('detail'), 60)}"
    if kind == "host_changes":
        return f"host diff: {len(event.get('changes') or [])} change(s)"
    if kind == "starter_exit":
        return f"starter exits {event.get('code')}"
    if kind == "exit":
        return f"run exit code {event.get('code')} ({event.get('reason')})"
    if kind == "run_start":
        return (
            f"run of {event.get('engine')}, flow {event.get('flow')}, "
            f"{event.get('backend')} backend"
        )
    return str(kind)


def event_title(event: dict[str, Any] | None) -> str:
    if event is None:
        return "(event not in the report)"
    parts = [f"#{event.get('seq')} {event.get('kind')}", f"role={event.get('role')}"]
    for key in ("hook", "method", "name", "child_role"):
        if event.get(key) is not None:
            parts.append(f"{key}={event[key]}")
    parts.append(f"pid={event.get('pid')} tid={event.get('tid')}")
    return " ".join(parts)


# --- summary.md -------------------------------------------------------------------------------

_CONTROL = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e"
    r"\u2066-\u2069\ufeff]"
)
#: Markdown punctuation that opens an inline construct anywhere (code, emphasis, link, table
#: cell, strike-through, escape); escaped with a backslash outside code blocks.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
#: What opens a block only at the start of a line (heading, list, quote, rule, setext).
_MD_LEADING = re.compile(r"^(\s*)([#+\-=>]|\d+[.)])")


def clean(text: Any) -> str:
    """``text`` without control characters (tabs and newlines kept), so that nothing the
    engine prints can move the cursor, hide text or reorder it in a reader."""
    return _CONTROL.sub("\N{REPLACEMENT CHARACTER}", str(text).replace("\r\n", "\n"))


def md_text(text: Any) -> str:
    """``text`` as inert Markdown on one line: every construct escaped, HTML as entities,
    no line break (a string the engine controls cannot start a block or an element)."""
    one = " ".join(clean(text).split())
    one = one.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    one = _MD_SPECIAL.sub(r"\\\1", one)
    one = _MD_LEADING.sub(
        lambda m: (
            m.group(1)
            + (
                m.group(2)[:-1] + "\\" + m.group(2)[-1]
                if m.group(2)[0].isdigit()
                else "\\" + m.group(2)
            )
        ),
        one,
    )
    # GitHub links a bare "www." or "scheme://" by itself: break both with an entity
    return re.sub(r"(?i)www\.", "www&#46;", one).replace("://", "&#58;//")


def md_code(text: Any, lang: str = "text") -> list[str]:
    """A fenced code block holding ``text`` verbatim: the fence is longer than any run of
    backticks in it, so the text cannot close the block."""
    body = clean(text)
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + lang, *body.splitlines(), fence]


def md_span(text: Any) -> str:
    """``text`` as an inline code span on one line (its backticks cannot end the span; a
    table's pipe is escaped, as GitHub splits cells before it parses spans)."""
    one = " ".join(clean(text).split()).replace("|", "\\|")
    longest = max((len(m) for m in re.findall(r"`+", one)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if one.startswith("`") or one.endswith("`") or not one.strip() else ""
    return f"{ticks}{pad}{one}{pad}{ticks}"


def _md_cell(text: str) -> str:
    return md_text(text)


def _engine_line(doc: dict[str, Any]) -> str:
    eng = doc.get("engine", {})
    env = doc.get("environment", {})
    backends = sorted(set((env.get("backend") or {}).values())) or ["?"]
    return (
        f"engine {md_span(eng.get('name'))} ({md_text(eng.get('origin'))}) · suite "
        f"{md_text(doc.get('suite_version'))} · {md_text(doc.get('generated'))} · kernel "
        f"{md_text(env.get('kernel'))} · Python {md_text(env.get('python'))} · backend "
        f"{md_text(', '.join(map(str, backends)))}"
        + (" · strict" if env.get("strict") else "")
        + (
            " · host mounts the sandbox left out (empty read-only directories): "
            + md_text(", ".join(map(str, env["sandbox_left_out"])))
            if env.get("sandbox_left_out")
            else ""
        )
    )


def _counts_line(summary: dict[str, int]) -> str:
    return f"{summary.get('total', 0)} results: " + ", ".join(
        f"{summary.get(o, 0)} {o}" for o in OUTCOMES
    )


def _md_root_causes(groups: list[rootcause.Group]) -> list[str]:
    out = [
        "## Root causes: runs that failed early",
        "",
        "Each result below was read from a run that failed before it could show anything "
        "else: fix the cause, and they are decided again.",
        "",
    ]
    for g in groups:
        cause = g.cause or {}
        out += [
            f"### {SYMBOLS[NOT_DECIDED][0]} {md_text(g.message.removeprefix('not decided: '))}",
            "",
        ]
        if cause.get("advice"):
            out += [f"**What to change:** {md_text(cause['advice'])}", ""]
        reqs = [req for req, _ in by_requirement(g.results)]
        out += [
            f"{len(g.results)} result(s) in {len(reqs)} requirement(s) not decided, in "
            f"{md_text(', '.join(sorted(g.flows, key=_flow_key)))}: " + md_text(", ".join(reqs)),
            "",
            f"runs: {md_text(', '.join(g.runs))}",
            "",
        ]
        if "Traceback" in str(cause.get("traceback")):
            out += [
                f"Traceback (run {md_text(cause.get('run'))}):",
                "",
                *md_code(cause["traceback"]),
                "",
            ]
    return out


def summary_markdown(
    doc: dict[str, Any], v: Verdict | None = None, max_message_lines: int = 30
) -> str:
    """``summary.md``: the verdict, the failures first with their messages, then the table of
    requirements × flows (Markdown, for PR comments and CI step summaries).
    """
    v = v or verdict(doc)
    doc = engine_view(doc)  # the kit's results are the one self-check line of the reasons
    icon = {CONFORMANT: "✅", NOT_CONFORMANT: "❌", HARNESS_ERROR: "💥", NOTHING_RAN: "⬜"}[v.code]
    eng = doc["engine"].get("name")
    out = [
        f"# {icon} Conformance of {md_span(eng)}: {v.title} (exit {v.code})",
        "",
        _engine_line(doc),
        "",
        f"**{_counts_line(doc['summary'])}**",
        "",
    ]
    out += [f"- {md_text(reason)}" for reason in v.reasons] + [""]
    if v.root_causes:
        out += _md_root_causes(v.root_causes)

    def section(title: str, entries: list[dict[str, Any]]) -> None:
        if not entries:
            return
        out.extend([f"## {title}", ""])
        for req, group in by_requirement(entries):
            first = group[0]
            flows = ", ".join(e["flow"] for e in group)
            outcome = first["outcome"]
            out.extend(
                [
                    f"### {SYMBOLS.get(outcome, ('?',))[0]} {md_text(req)} "
                    f"[{md_text(first['level'])}] {md_text(outcome)} in "
                    f"{md_text(flows)}",
                    "",
                    f"> {md_text(first['text'])} (SPEC {md_text(first['section'])})",
                    "",
                ]
            )
            for e in group:
                lines = clean(e["message"] or "(no message)").splitlines()
                if len(lines) > max_message_lines:
                    lines = [
                        *lines[:max_message_lines],
                        f"… {len(lines) - max_message_lines} more lines in report.html",
                    ]
                out.extend(
                    [
                        f"**{md_text(e['flow'])}** ({md_span(e['test'])}, backend "
                        f"{md_text(e['backend'])}):",
                        "",
                        *md_code("\n".join(lines)),
                        "",
                    ]
                )

    section("Failures", v.failing)
    section("Broken: the harness could not decide these", v.broken)
    section("Warnings: failed, but not counted without --strict", v.warnings)

    flows = flows_of(doc)
    legend = " · ".join(f"{sym} {o}" for o, (sym, _) in SYMBOLS.items())
    out += [
        "## Requirements × flows",
        "",
        f"Failing requirements first, then the catalogue's order. {legend} · "
        "blank: the requirement does not apply to the flow, or the flow was not selected.",
        "",
        "| Requirement | Level | "
        + " | ".join(md_text(f) for f in flows)
        + " | Text | Checked by |",
        "|---|---|" + "---|" * len(flows) + "---|---|",
    ]
    for first, cells in matrix_rows(doc):
        marks = [SYMBOLS.get(cells[f]["outcome"], ("?",))[0] if f in cells else "" for f in flows]
        out.append(
            f"| {md_text(first['requirement'])} | {md_text(first['level'])} | "
            + " | ".join(marks)
            + f" | {_md_cell(first['text'])} | "
            # reports written before results named their tests have no checked_by
            + "<br>".join(md_span(t) for t in first.get("checked_by", []))
            + " |"
        )
    out.append("")

    env = doc["environment"]
    out += [
        "## Flows on the machine that ran the suite",
        "",
        "| flow | selected | runs here | backend | " + " | ".join(OUTCOMES) + " | reason |",
        "|---|---|---|---|" + "---|" * len(OUTCOMES) + "---|",
    ]
    counts = per_flow_counts(doc)
    for flow, info in sorted((env.get("flows") or {}).items(), key=lambda kv: _flow_key(kv[0])):
        c = counts.get(flow, {})
        out.append(
            f"| {md_text(flow)} | {'yes' if info.get('selected') else 'no'} | "
            f"{'yes' if info.get('runnable') else 'no'} | "
            f"{md_text((env.get('backend') or {}).get(flow, info.get('backend', '')))} | "
            + " | ".join(str(c.get(o, 0)) for o in OUTCOMES)
            + f" | {_md_cell(info.get('reason', ''))} |"
        )
    out.append("")
    if doc.get("unchecked"):
        out += [
            "<details><summary>Requirements no lifecycle run can decide "
            f"({len(doc['unchecked'])})</summary>",
            "",
        ]
        out += [
            f"- **{md_text(u['requirement'])}** [{md_text(u['level'])}] "
            f"{md_text(u['text'])} — *{md_text(u['reason'])}*"
            for u in doc["unchecked"]
        ]
        out += ["", "</details>", ""]
    if doc.get("known_failures"):
        out += ["## Known failures declared by the engine", ""]
        out += [
            f"- {md_text(k['requirement'])}[{md_text(','.join(map(str, k['flows'])))}"
            f"]: {md_text(k['reason'])} ({md_text(k['where'])})"
            for k in doc["known_failures"]
        ]
        out.append("")
    runs = doc["runs"]
    seconds = sum(float(r.get("seconds") or 0) for r in runs)
    out.append(
        f"{len(runs)} lifecycle runs ({seconds:.1f} s of lifecycle time). "
        "report.html has every failure's ledger events and a sequence diagram per flow."
    )
    return "\n".join(out) + "\n"


# --- the one-screen terminal summary -------------------------------------------------------------


def wrap(text: Any, width: int, indent: str = "", subsequent: str | None = None) -> list[str]:
    """``text`` on lines of at most ``width`` columns, broken between words only (a single
    word longer than a line, such as a long path, gets a line of its own, uncut)."""
    sub = indent + "    " if subsequent is None else subsequent
    one = " ".join(clean(text).split())
    return textwrap.wrap(
        one,
        width=max(width, len(sub) + 20),
        initial_indent=indent,
        subsequent_indent=sub,
        break_on_hyphens=False,
        break_long_words=False,
    ) or [indent.rstrip()]


def terminal_summary(
    doc: dict[str, Any], v: Verdict, width: int = 100, max_failures: int = 8, max_lines: int = 30
) -> list[str]:
    """The one-screen summary the gate prints."""
    doc = engine_view(doc)
    eng = doc["engine"]
    lines = wrap(
        f"engine {eng.get('name')} ({eng.get('origin')}), suite {doc.get('suite_version')}", width
    )
    lines += wrap(
        f"{v.title.upper()} (exit {v.code}): " + (v.reasons[0] if v.reasons else ""), width
    )
    for reason in v.reasons[1:]:
        lines += wrap(reason, width, "  ")
    lines += wrap(_counts_line(doc["summary"]), width)
    counts = per_flow_counts(doc)
    header = f"  {'flow':<9}{'backend':<8}" + "".join(f"{SYMBOLS[o][1]:>7}" for o in OUTCOMES)
    lines.append(header)
    flows_env = doc["environment"].get("flows") or {}
    for flow, c in counts.items():
        backend = (doc["environment"].get("backend") or {}).get(flow, "")
        row = f"  {flow:<9}{backend:<8}" + "".join(f"{c[o]:>7}" for o in OUTCOMES)
        info = flows_env.get(flow) or {}
        lines.append(row)
        if not info.get("runnable", True):
            lines += wrap(f"not runnable here: {info.get('reason', '')}", width, " " * 4)
    for g in v.root_causes:
        cause = g.cause or {}
        lines += wrap(f"root cause: {g.message.removeprefix('not decided: ')}", width)
        if cause.get("advice"):
            lines += wrap(f"what to change: {cause['advice']}", width, "  ")
        lines += wrap(
            f"{len(g.results)} result(s) not decided in "
            f"{', '.join(sorted(g.flows, key=_flow_key))}: see summary.md for the "
            "traceback",
            width,
            "  ",
        )
    shown = v.failing or v.broken
    if shown:
        lines.append("failures, MUST first:" if v.failing else "broken results:")
        groups = by_requirement(shown)
        listed = 0
        for req, group in groups[:max_failures]:
            first = group[0]
            flows = ",".join(e["flow"] for e in group)
            more = wrap(
                f"{req} [{first['level']}] {flows}: {first['text']}", width, "  ", " " * 6
            ) + wrap(violation_digest(first["message"]), width, " " * 6)
            if listed and len(lines) + len(more) + 2 > max_lines:
                break  # one screen: the rest is in summary.md
            lines += more
            listed += 1
        if len(groups) > listed:
            lines.append(f"  … and {len(groups) - listed} more requirement(s): see summary.md")
    if v.warnings:
        lines += wrap(
            "warnings (not counted): "
            + ", ".join(
                f"{req}[{','.join(e['flow'] for e in g)}]" for req, g in by_requirement(v.warnings)
            ),
            width,
        )
    return lines


# --- report.html ------------------------------------------------------------------------------


def _e(text: Any) -> str:
    """``text`` as inert HTML text or attribute value, control characters replaced."""
    return html.escape(clean(text), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")


def event_anchor(run_id: str, seq: Any) -> str:
    # both parts slugged: an id must never carry what a (schema-less) report put there
    return f"ev-{_slug(str(run_id))}-{_slug(str(seq))}"


CSS = """
:root { --pass:#1a7f37; --fail:#cf222e; --broken:#8250df; --ns:#6e7781; --nc:#afb8c1;
  --xfail:#9a6700; --ink:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
  color: var(--ink); margin: 0 auto; max-width: 1400px; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 4px 0 6px; } h2 { font-size: 18px; margin: 28px 0 8px;
  border-bottom: 1px solid var(--line); padding-bottom: 4px; }
code, pre, .mono { font-family: "DejaVu Sans Mono", ui-monospace, Menlo, Consolas, monospace;
  font-size: 12px; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px;
  padding: 8px 10px; overflow-x: auto; white-space: pre-wrap; margin: 6px 0; }
.meta { color: var(--muted); }
.verdict { display: inline-block; padding: 3px 12px; border-radius: 14px; color: #fff;
  font-weight: 600; }
.v0 { background: var(--pass); } .v1 { background: var(--fail); }
.v2 { background: var(--broken); } .v3 { background: var(--ns); }
.pills span { display: inline-block; margin: 2px 6px 2px 0; padding: 1px 9px;
  border-radius: 10px; background: var(--bg); border: 1px solid var(--line); }
.pills span.o-failed { color: var(--fail); background: #ffebe9; font-weight: 600; }
.pills span.o-broken { color: var(--broken); background: #fbefff; font-weight: 600; }
.pills span.zero { color: var(--muted); background: var(--bg); font-weight: 400; }
h1 code { font-size: 20px; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid var(--line); padding: 3px 7px; vertical-align: top; }
th { background: var(--bg); text-align: left; }
table.matrix td.o { text-align: center; white-space: nowrap; font-weight: 600; width: 74px; }
table.matrix td.text { color: var(--muted); font-size: 12.5px; }
table.matrix td.checked-by { font-size: 12px; white-space: nowrap; }
table.matrix tr.group th { background: #eaeef2; font-weight: 600; }
td.o a { color: inherit; text-decoration: none; }
.o-passed { color: var(--pass); background: #dafbe1; }
.o-failed { color: #fff; background: var(--fail); }
.o-broken { color: #fff; background: var(--broken); }
.o-not-supported { color: var(--ns); background: #f6f8fa; }
.o-not-configured { color: var(--ns); background: #eef1f4; }
.o-xfail { color: var(--xfail); background: #fff8c5; }
.o-not-decided { color: #fff; background: #953800; }
.o-none { background: #fff; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px;
  font-weight: 600; }
details.failure { border: 1px solid var(--line); border-left: 5px solid var(--fail);
  border-radius: 6px; margin: 6px 0; padding: 4px 10px; }
details.failure.broken { border-left-color: var(--broken); }
details.failure.warning { border-left-color: var(--xfail); }
details.failure.root-cause { border-left-color: #953800; }
details.failure > summary { cursor: pointer; }
details.failure[open] > summary { margin-bottom: 6px; }
.event { border-top: 1px dashed var(--line); padding-top: 4px; margin-top: 6px; }
.priv { font-family: "DejaVu Sans Mono", ui-monospace, monospace; font-size: 12px; }
details.flow { margin: 8px 0; } details.flow > summary { cursor: pointer; font-weight: 600; }
div.scroll { overflow-x: auto; }
svg.sequence { display: block; background: #fff; border: 1px solid var(--line);
  border-radius: 6px; margin: 6px 0; }
svg.sequence text { font-family: "DejaVu Sans Mono", ui-monospace, monospace; font-size: 11px;
  fill: var(--ink); }
svg.sequence .lane-head { font-weight: 700; font-size: 11px; }
svg.sequence .pid { fill: var(--muted); font-size: 10px; }
svg.sequence .lifeline { stroke: #8c959f; stroke-dasharray: 3 3; }
svg.sequence .arrow { stroke: #57606a; stroke-width: 1.2; fill: none; }
svg.sequence .arrow.rpc { stroke: #0969da; }
svg.sequence .arrow.exit { stroke-dasharray: 4 2; }
svg.sequence .bar { stroke: #24292f; stroke-width: .6; }
svg.sequence .lv-host { fill: #cf222e; } svg.sequence .lv-latent { fill: #d4a72c; }
svg.sequence .lv-ns { fill: #218bff; } svg.sequence .lv-none { fill: #8ddb8c; }
svg.sequence .lv-unknown { fill: #d0d7de; }
svg.sequence text.t-host { fill: #a40e26; font-weight: 700; }
svg.sequence text.t-changed { fill: #a40e26; }
svg.sequence text.t-muted { fill: #6e7781; }
svg.sequence rect.hl { fill: #ffebe9; }
svg.sequence rect.stripe { fill: #f6f8fa; }
svg.sequence .marker { fill: #57606a; } svg.sequence .marker.bad { fill: #cf222e; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 11px; height: 11px; border: 1px solid #24292f;
  vertical-align: -1px; margin-right: 4px; }
"""


def _badge(outcome: str) -> str:
    return f'<span class="badge o-{outcome}">{_e(outcome)}</span>'


class _Diagrams:
    """Which runs get a diagram, and the anchors of their rows."""

    def __init__(
        self, doc: dict[str, Any], refs: set[tuple[str | None, int]], max_extra: int = 6
    ) -> None:
        self.per_flow: list[dict[str, Any]] = []
        for flow in flows_of(doc) or list(FLOWS):
            runs = [r for r in doc["runs"] if r.get("flow") == flow and run_events(r)]
            runs.sort(key=lambda r: (r.get("scenario") != "default", r.get("scenario", "")))
            if runs:
                self.per_flow.append(runs[0])
        drawn = {r.get("id") for r in self.per_flow}
        self.extra: list[dict[str, Any]] = []
        for run_id, _ in sorted(refs, key=lambda ref: (str(ref[0]), ref[1])):
            if run_id in drawn or len(self.extra) >= max_extra:
                continue
            run = find_run(doc, run_id)
            if run is not None and run_events(run):
                self.extra.append(run)
                drawn.add(run_id)
        self.drawn = drawn
        self.highlight: dict[str, set[int]] = {}
        for run_id, seq in refs:
            self.highlight.setdefault(str(run_id), set()).add(seq)


def sequence_svg(run: dict[str, Any], highlight: set[int] | None = None) -> str:
    """The run's ledger as a sequence diagram: one lane per process role, one row per event;
    hooks are activation bars coloured by the privilege state at entry, with the state as
    text on the right; arrows for forks, RPC calls, the exec notice and exits."""
    highlight = highlight or set()
    events = sorted(
        run_events(run), key=lambda e: e["seq"] if isinstance(e.get("seq"), int) else -1
    )
    run_id = str(run.get("id"))
    roles = [r for r in LANES if any(e.get("role") == r for e in events)]
    roles += sorted({str(e.get("role")) for e in events} - set(roles))
    lane_w, row_h, head_h, left = 76, 21, 46, 6
    x_of = {role: left + i * lane_w + lane_w // 2 for i, role in enumerate(roles)}
    text_x = left + len(roles) * lane_w + 12
    state_x = text_x + 384
    width = state_x + 400
    height = head_h + len(events) * row_h + 12

    def y_of(i: int) -> int:
        return head_h + i * row_h + row_h // 2

    parts: list[str] = []
    # stripes and highlights behind everything
    for i, event in enumerate(events):
        y = head_h + i * row_h
        if event.get("seq") in highlight:
            parts.append(f'<rect class="hl" x="0" y="{y}" width="{width}" height="{row_h}"/>')
        elif i % 2:
            parts.append(f'<rect class="stripe" x="0" y="{y}" width="{width}" height="{row_h}"/>')
    # lanes: header and lifeline over the role's lifetime
    for role in roles:
        rows = [i for i, e in enumerate(events) if e.get("role") == role]
        first = next(e for e in events if e.get("role") == role)
        x = x_of[role]
        parts.append(
            f'<text class="lane-head" x="{x}" y="16" text-anchor="middle">{_e(role)}</text>'
        )
        parts.append(
            f'<text class="pid" x="{x}" y="30" text-anchor="middle">pid '
            f'{_e(first.get("pid"))}</text>'
        )
        parts.append(
            f'<line class="lifeline" x1="{x}" y1="{y_of(rows[0]) - 8}" x2="{x}" '
            f'y2="{y_of(rows[-1]) + 8}"/>'
        )
    # activation bars
    open_bars: dict[tuple[Any, Any, Any], tuple[int, int, str]] = {}
    depth_used: dict[str, set[int]] = {}
    bars: list[tuple[str, int, int, int, str, bool]] = []
    for i, event in enumerate(events):
        key = (event.get("role"), event.get("tid"), event.get("hook"))
        if event.get("kind") == "hook_enter":
            used = depth_used.setdefault(str(event.get("role")), set())
            depth = min(d for d in range(len(used) + 1) if d not in used)
            used.add(depth)
            open_bars[key] = (i, depth, privilege_level(event))
        elif event.get("kind") in ("hook_return", "hook_raise") and key in open_bars:
            start, depth, level = open_bars.pop(key)
            depth_used[str(event.get("role"))].discard(depth)
            bars.append((str(event.get("role")), start, i, depth, level, True))
        elif event.get("kind") in ("stage2_exec", "stage2_failed"):
            # start_process never returns: it ends where the master learns of the exec
            for okey in [k for k in open_bars if k[0] == "stage2" and k[2] == "start_process"]:
                start, depth, level = open_bars.pop(okey)
                depth_used.get("stage2", set()).discard(depth)
                bars.append(("stage2", start, i, depth, level, True))
    for (role, _, _), (start, depth, level) in open_bars.items():
        bars.append((str(role), start, len(events) - 1, depth, level, False))
    for role, start, end, depth, level, closed in bars:
        x = x_of.get(role, 0) - 5 + depth * 7
        y1 = y_of(start) - 7
        y2 = y_of(end) + 7
        dash = "" if closed else ' stroke-dasharray="3 2"'
        parts.append(
            f'<rect class="bar lv-{level}" x="{x}" y="{y1}" width="10" height="{y2 - y1}"{dash}/>'
        )
    # arrows and markers, and the text column
    enter_text: dict[tuple[Any, Any, Any], str] = {}

    def arrow(src: str, dst: str, y: int, cls: str, label: str) -> None:
        if src not in x_of or dst not in x_of or src == dst:
            return
        x1, x2 = x_of[src], x_of[dst]
        step = 6 if x2 > x1 else -6
        parts.append(f'<line class="arrow {cls}" x1="{x1}" y1="{y}" x2="{x2 - step}" y2="{y}"/>')
        parts.append(
            f'<path class="marker" d="M{x2} {y} L{x2 - step} {y - 4} L{x2 - step} {y + 4} Z"/>'
        )
        if label:
            parts.append(
                f'<text class="pid" x="{(x1 + x2) // 2}" y="{y - 3}" '
                f'text-anchor="middle">{_e(label)}</text>'
            )

    for i, event in enumerate(events):
        y = y_of(i)
        kind, role = event.get("kind"), str(event.get("role"))
        cls = ""
        if kind == "process_start":
            arrow(PARENT.get(role, ""), role, y, "", "becomes" if role == "stage2" else "fork")
        elif kind == "rpc_call":
            arrow("master", role, y, "rpc", str(event.get("method", "")).split(".")[-1])
        elif kind == "stage2_exec":
            arrow("stage2", role, y, "", "exec")
        elif kind == "process_exit":
            arrow(str(event.get("child_role")), role, y, "exit", f"exit {event.get('status')}")
        elif kind in (
            "signal",
            "exit",
            "starter_exit",
            "container_start",
            "namespaces",
            "starter_config",
            "run_start",
            "leak",
            "fatal",
            "stage2_failed",
            "starter_error",
            "hook_timeout",
        ):
            bad = kind in ("leak", "fatal", "stage2_failed", "starter_error", "hook_timeout")
            x = x_of.get(role, 0)
            parts.append(
                f'<circle class="marker{" bad" if bad else ""}" cx="{x}" cy="{y}" r="3.5"/>'
            )
            if bad:
                cls = "t-host"
        text = describe(event)
        state = ""
        if kind in ("hook_enter", "hook_return", "hook_raise") and event.get("snapshot"):
            state = privilege_text(event)
            key = (event.get("role"), event.get("tid"), event.get("hook"))
            if kind == "hook_enter":
                enter_text[key] = state
            elif enter_text.get(key) == state:
                state = "(unchanged)"
            else:
                cls = cls or "t-changed"
                state = "changed: " + state
        level = privilege_level(event) if kind == "hook_enter" else ""
        if level == "host":
            cls = "t-host"
        arrowhead = {"hook_enter": "▶", "hook_return": "◀", "hook_raise": "✖"}.get(str(kind), " ")
        seq = event.get("seq")
        label = f"#{seq:<3} {role:<10}{arrowhead} {text}"
        parts.append(
            f'<g id="{event_anchor(run_id, seq)}"><title>{_e(event_title(event))}'
            f'</title><text x="{text_x}" y="{y + 4}"'
            f'{f" class={chr(34)}{cls}{chr(34)}" if cls else ""}>'
            f'{_e(shorten(label, 56))}</text>'
        )
        if state:
            parts.append(
                f'<text x="{state_x}" y="{y + 4}" class="'
                f'{"t-muted" if state == "(unchanged)" else cls or "t-muted"}">'
                f'{_e(shorten(state, 60))}</text>'
            )
        parts.append("</g>")
    parts.append(
        f'<text class="pid" x="{text_x}" y="16">event</text>'
        f'<text class="pid" x="{state_x}" y="16">privilege state of the hooked '
        'thread: uid real/effective/saved</text>'
    )
    return (
        f'<svg class="sequence" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="sequence diagram of run {_e(run_id)}" data-run="{_e(run_id)}">'
        + "".join(parts)
        + "</svg>"
    )


LEGEND = (
    '<div class="legend meta"><span><i class="lv" style="background:#cf222e"></i>host '
    'privilege effective (euid 0 or effective caps, host user ns)</span>'
    '<span><i style="background:#d4a72c"></i>regainable (saved uid 0 or permitted caps, '
    'host user ns)</span><span><i style="background:#218bff"></i>privileged only inside '
    'a user namespace</span><span><i style="background:#8ddb8c"></i>unprivileged</span>'
    '<span>bars: a hook from entry to return (dashed: never returned); text on the right: '
    'uid real/effective/saved, effective (permitted) capabilities, no_new_privs, user '
    'namespace</span></div>'
)


def _event_block(
    doc: dict[str, Any], run_id: str | None, seq: int, drawn: Container[str | None]
) -> str:
    event = find_event(doc, run_id, seq)
    out = [
        f'<div class="event"><div><b>ledger event</b> <code>{_e(event_title(event))}</code>'
        f' in run <code>{_e(run_id)}</code>'
    ]
    if event is not None and run_id in drawn:
        out.append(f' · <a href="#{event_anchor(str(run_id), seq)}">in the sequence diagram</a>')
    out.append("</div>")
    if event is not None:
        out.append(f'<div>{_e(describe(event))}</div>')
        if event.get("snapshot"):
            out.append(f'<div class="priv">{_e(privilege_text(event))}</div>')
        out.append(
            "<details><summary>raw event (JSON)</summary><pre>"
            f"{_e(json.dumps(event, indent=1))}</pre></details>"
        )
    out.append("</div>")
    return "".join(out)


def html_report(doc: dict[str, Any], v: Verdict | None = None) -> str:
    """``report.html``: one self-contained page.

    No script, no external asset; a Content-Security-Policy forbids any fetch. The same table as
    :func:`summary_markdown`, every failure expandable to the ledger events it quotes, and a
    sequence diagram of one lifecycle per flow drawn from its ledger — processes as lanes, hooks in
    order, the privilege state at each hook.
    """
    v = v or verdict(doc)
    doc = engine_view(doc)
    eng = doc["engine"]
    env = doc["environment"]
    shown = (
        [(e, "") for e in v.failing]
        + [(e, " broken") for e in v.broken]
        + [(e, " warning") for e in v.warnings]
    )
    refs = {ref for e, _ in shown for ref in event_refs(e)}
    diagrams = _Diagrams(doc, refs)
    title = f"Conformance of {eng.get('name')}: {v.title}"
    out = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        'style-src \'unsafe-inline\'; img-src data:">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f'<h1>Conformance of <code>{_e(eng.get("name"))}</code> '
        f'<span id="verdict" class="verdict v{v.code}" data-exit="{v.code}">'
        f'{_e(v.title)} (exit {v.code})</span></h1>',
        f'<p class="meta">{_e(_engine_line(doc).replace("`", ""))}</p>',
        '<p class="pills" id="counts">'
        + "".join(
            f'<span class="o-{o}{" zero" if not doc["summary"].get(o) else ""}">'
            f'{doc["summary"].get(o, 0)} {_e(o)}</span>'
            for o in OUTCOMES
        )
        + f'<span>{doc["summary"].get("total", 0)} results</span></p>',
        "<ul>" + "".join(f"<li>{_e(r)}</li>" for r in v.reasons) + "</ul>",
    ]

    if v.root_causes:
        out.append('<h2 id="root-causes">Root causes: runs that failed early</h2>')
        for i, g in enumerate(v.root_causes):
            cause = g.cause or {}
            reqs = [req for req, _ in by_requirement(g.results)]
            out.append(
                f'<details class="failure root-cause" id="root-cause-{i}" open><summary>'
                f'{_badge(NOT_DECIDED)} <b>{_e(g.message.removeprefix("not decided: "))}'
                f'</b></summary>'
            )
            if cause.get("advice"):
                out.append(f'<p><b>What to change:</b> {_e(cause["advice"])}</p>')
            out.append(
                f'<div class="meta">{len(g.results)} result(s) in {len(reqs)} '
                f'requirement(s) not decided, in {_e(", ".join(g.flows))}: '
                f'{_e(", ".join(reqs))} · runs {_e(", ".join(g.runs))}</div>'
            )
            if "Traceback" in str(cause.get("traceback")):
                out.append(f'<pre class="traceback">{_e(cause["traceback"])}</pre>')
            out.append("</details>")
    if shown:
        out.append(
            f'<h2 id="failures">Failures ({len(v.failing)})'
            + (f", broken ({len(v.broken)})" if v.broken else "")
            + (f", warnings ({len(v.warnings)})" if v.warnings else "")
            + "</h2>"
        )
        for e, cls in shown:
            anchor = f"f-{_slug(e['requirement'])}-{_slug(e['flow'])}"
            out.append(
                f'<details class="failure{cls}" id="{anchor}" '
                f'data-requirement="{_e(e["requirement"])}" data-flow="{_e(e["flow"])}">'
                f'<summary>{_badge(e["outcome"])} <b>{_e(e["requirement"])}</b> '
                f'[{_e(e["level"])}] in <b>{_e(e["flow"])}</b> — {_e(e["text"])}'
                '</summary>'
            )
            out.append(
                f'<div class="meta">test <code>{_e(e["test"])}</code> · backend '
                f'{_e(e["backend"])} · SPEC {_e(e["section"])} · runs '
                f'{_e(", ".join(e.get("runs") or []) or "-")}</div>'
            )
            out.append(f'<pre class="message">{_e(e["message"] or "(no message)")}</pre>')
            for run_id, seq in event_refs(e)[:6]:
                out.append(_event_block(doc, run_id, seq, diagrams.drawn))
            out.append("</details>")

    flows = flows_of(doc)
    out.append(
        '<h2 id="matrix">Requirements × flows</h2><p class="meta">Failing '
        "requirements first, then the catalogue's order; hover a cell for its message, "
        "click a failure to jump to it.</p>"
    )
    out.append(
        '<table class="matrix" id="results"><thead><tr><th>Requirement</th>'
        "<th>Level</th>"
        + "".join(f"<th>{_e(f)}</th>" for f in flows)
        + "<th>Text</th><th>Checked by</th></tr></thead><tbody>"
    )
    rows = matrix_rows(doc)
    failing_rows = sum(1 for _, cells in rows if any(c["outcome"] in BAD for c in cells.values()))
    for i, (first, cells) in enumerate(rows):
        if i == 0 and failing_rows:
            out.append(
                f'<tr class="group"><th colspan="{len(flows) + 4}">Failing or broken '
                f"({failing_rows})</th></tr>"
            )
        if i == failing_rows and failing_rows:
            out.append(
                f'<tr class="group"><th colspan="{len(flows) + 4}">Everything else</th></tr>'
            )
        tds = []
        for flow in flows:
            entry = cells.get(flow)
            if entry is None:
                tds.append('<td class="o o-none"></td>')
                continue
            sym, label = HTML_SYMBOLS[entry["outcome"]]
            cell = f"{sym} {_e(label)}"
            if entry["outcome"] in BAD or entry in v.warnings:
                cell = f'<a href="#f-{_slug(entry["requirement"])}-{_slug(flow)}">{cell}</a>'
            tip = first_lines(entry["message"], 2) or entry["outcome"]
            tds.append(
                f'<td class="o o-{entry["outcome"]}" data-outcome="{entry["outcome"]}" '
                f'title="{_e(shorten(tip, 300))}">{cell}</td>'
            )
        out.append(
            f'<tr data-requirement="{_e(first["requirement"])}"><td><b>'
            f'{_e(first["requirement"])}</b></td><td>{_e(first["level"])}</td>'
            + "".join(tds)
            + f'<td class="text">{_e(first["text"])}</td><td class="checked-by">'
            # reports written before results named their tests have no checked_by
            + "<br>".join(f"<code>{_e(t)}</code>" for t in first.get("checked_by", []))
            + "</td></tr>"
        )
    out.append("</tbody></table>")

    out.append(
        '<h2 id="sequence">Lifecycles: one sequence diagram per flow</h2>'
        '<p class="meta">Drawn from each run\'s ledger: the processes of the run as '
        "lanes, every event in the order the supervisor received it.</p>" + LEGEND
    )
    first_open = True
    for run in diagrams.per_flow + diagrams.extra:
        rid = str(run.get("id"))
        hl = diagrams.highlight.get(rid, set())
        is_open = first_open or bool(hl)
        first_open = False
        extra = "" if run in diagrams.per_flow else " (quoted by a failure)"
        out.append(
            f'<details class="flow" id="run-{_slug(rid)}" data-flow='
            f'"{_e(run.get("flow"))}"{" open" if is_open else ""}><summary>'
            f'{_e(run.get("flow"))}: run <code>{_e(rid)}</code>{extra} — exit '
            f'{_e(run.get("exit_code"))} ({_e(run.get("reason"))}), '
            f'{len(run_events(run))} events, {_e(run.get("seconds"))} s</summary>'
        )
        out.append(f'<div class="scroll">{sequence_svg(run, hl)}</div>')
        out.append("</details>")

    out.append(
        '<h2 id="environment">Environment</h2><table><thead><tr><th>flow</th>'
        "<th>selected</th><th>runs here</th><th>backend</th><th>reason</th></tr></thead>"
        "<tbody>"
    )
    for flow, info in sorted((env.get("flows") or {}).items(), key=lambda kv: _flow_key(kv[0])):
        out.append(
            f"<tr><td>{_e(flow)}</td><td>{'yes' if info.get('selected') else 'no'}</td>"
            f"<td>{'yes' if info.get('runnable') else 'no'}</td><td>"
            f"{_e((env.get('backend') or {}).get(flow, info.get('backend', '')))}</td>"
            f"<td>{_e(info.get('reason', ''))}</td></tr>"
        )
    out.append("</tbody></table>")
    invoker = env.get("invoker") or {}
    caps = ", ".join(
        f"{k}={'yes' if val else 'no'}" for k, val in (eng.get("capabilities") or {}).items()
    )
    out.append(
        f'<p class="meta">kernel {_e(env.get("kernel"))} {_e(env.get("machine"))} · '
        f'Python {_e(env.get("python"))} · pytest {_e(env.get("pytest"))} · uid '
        f'{_e(env.get("uid"))} · invoking user U {_e(invoker.get("name"))} '
        f'({_e(invoker.get("uid"))}) · engine capabilities '
        f'({_e(eng.get("capabilities_source"))}): {_e(caps)} · engine from '
        f'{_e(eng.get("source"))}</p>'
    )
    if doc.get("known_failures"):
        out.append(
            "<h2>Known failures declared by the engine</h2><ul>"
            + "".join(
                f"<li><b>{_e(k['requirement'])}</b>[{_e(','.join(k['flows']))}]: {_e(k['reason'])}"
                f" <span class=meta>({_e(k['where'])})</span></li>"
                for k in doc["known_failures"]
            )
            + "</ul>"
        )
    if doc.get("unchecked"):
        out.append(
            f"<details><summary>Requirements no lifecycle run can decide "
            f"({len(doc['unchecked'])})</summary><ul>"
            + "".join(
                f"<li><b>{_e(u['requirement'])}</b> [{_e(u['level'])}] {_e(u['text'])}"
                f" — <i>{_e(u['reason'])}</i></li>"
                for u in doc["unchecked"]
            )
            + "</ul></details>"
        )
    out.append(
        f'<p class="meta">Rendered from the JSON report (schema '
        f'{_e(doc.get("schema_version"))}) by conformance.render; '
        f'{len(doc["runs"])} lifecycle runs.</p></body></html>'
    )
    return "\n".join(out) + "\n"


# --- writing ----------------------------------------------------------------------------------


def write(
    doc: dict[str, Any], out_dir: str | Path, strict: bool | None = None
) -> tuple[Verdict, dict[str, Path]]:
    """Write ``summary.md`` and ``report.html`` into ``out_dir``; return the verdict and the
    paths."""
    v = verdict(doc, strict)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / SUMMARY_MD, "html": out / REPORT_HTML}
    paths["summary"].write_text(summary_markdown(doc, v))
    paths["html"].write_text(html_report(doc, v))
    return v, paths


def report_command(path: str, out_dir: str | None, strict: bool | None = None) -> int:
    """``python -m conformance report``: render a saved report; the exit status is its
    verdict (2 when the file is not a readable report, or the reports cannot be written).

    ``python -m conformance report conformance.json --out DIR`` writes both files; the gate
    (:mod:`conformance.gate`) writes them after its run.
    """
    try:
        doc = load(path)
    except ReportError as exc:
        print(f"conformance report: {exc}", file=sys.stderr)
        return HARNESS_ERROR
    try:
        v, paths = write(doc, out_dir or Path(path).resolve().parent, strict)
    except OSError as exc:
        print(
            f"conformance report: cannot write into {out_dir}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return HARNESS_ERROR
    for line in terminal_summary(doc, v):
        print(line)
    print(f"written: {paths['summary']} {paths['html']}")
    return v.code
