"""``python -m conformance diff old.json new.json``: which requirements changed outcome."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from conformance.outcomes import (
    BROKEN,
    FAILED,
    NOT_CONFIGURED,
    NOT_DECIDED,
    NOT_SUPPORTED,
    PASSED,
    XFAIL,
)
from conformance.render import (
    LEVEL_RANK,
    SYMBOLS,
    ReportError,
    load,
    md_span,
    md_text,
    shorten,
    violation_digest,
)

BAD = (FAILED, BROKEN, NOT_DECIDED)  # not decided: a run failed early, the engine's fault
GOOD = (PASSED, XFAIL)
UNDECIDED = (NOT_CONFIGURED, NOT_SUPPORTED, None)

#: (key, heading) in the order the Markdown lists them.
CLASSES = (
    ("regressions", "❌ Regressions"),
    ("fixed", "✅ Fixed"),
    ("undecided", "⬜ No longer decided"),
    ("decided", "➕ Newly decided"),
    ("other", "🔁 Other changes"),
)


@dataclass(frozen=True)
class Change:
    requirement: str
    level: str
    flow: str
    text: str
    old: str | None  # outcome, or None when the old report has no such result
    new: str | None
    message: str  # the failing side's message (else the new one's, else the old one's)

    @property
    def kind(self) -> str:
        if self.new in BAD and self.old not in BAD:
            return "regressions"
        if self.old in BAD and self.new in GOOD:
            return "fixed"
        if self.old == PASSED and self.new in UNDECIDED:
            return "undecided"
        if self.old in UNDECIDED and self.new == PASSED:
            return "decided"
        return "other"


def compare(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Change]]:
    """Changes by class; within a class MUST first, then the new report's order.

    Results are matched by (requirement, flow). Each change falls in one class, listed in this order
    (Markdown, for a pull-request comment):

    - **regressions** — now failed or broken, and not before (also a new result that fails);
    - **fixed** — failed or broken before, now passed or a declared known failure (xfail);
    - **no longer decided** — passed before, now not-configured, not-supported or absent;
    - **newly decided** — passes now, was not decided before;
    - **other changes** — e.g. failed → broken, passed → xfail, not-supported → not-configured.
    """
    before = {(e["requirement"], e["flow"]): e for e in old["results"]}
    after = {(e["requirement"], e["flow"]): e for e in new["results"]}
    keys = list(after) + [k for k in before if k not in after]
    out: dict[str, list[Change]] = {key: [] for key, _ in CLASSES}
    for key in keys:
        a, b = before.get(key), after.get(key)
        old_outcome = a["outcome"] if a else None
        new_outcome = b["outcome"] if b else None
        if old_outcome == new_outcome:
            continue
        ref = b or a
        assert ref is not None
        # the message that explains the change: the failing side's
        why = b if new_outcome in BAD else a if old_outcome in BAD else ref
        change = Change(
            key[0],
            ref["level"],
            key[1],
            ref["text"],
            old_outcome,
            new_outcome,
            str((why or ref).get("message") or ""),
        )
        out[change.kind].append(change)
    for changes in out.values():
        changes.sort(key=lambda c: LEVEL_RANK.get(c.level, 9))  # stable: keeps report order
    return out


def _outcome(outcome: str | None) -> str:
    if outcome is None:
        return "(absent)"
    return f"{SYMBOLS[outcome][0]} {outcome}" if outcome in SYMBOLS else outcome


def _cell(text: str) -> str:
    return md_text(text)


def _describe(doc: dict[str, Any]) -> str:
    eng = doc.get("engine", {})
    return (
        f"{md_span(eng.get('name'))} ({md_text(eng.get('origin'))}), suite "
        f"{md_text(doc.get('suite_version'))}, {md_text(doc.get('generated'))}, "
        f"{doc['summary'].get('total', 0)} results"
    )


def markdown(
    old: dict[str, Any], new: dict[str, Any], changes: dict[str, list[Change]] | None = None
) -> str:
    changes = compare(old, new) if changes is None else changes
    n = {key: len(items) for key, items in changes.items()}
    total = sum(n.values())
    verdict = (
        "❌ **{} regression{}**".format(n["regressions"], "s" if n["regressions"] != 1 else "")
        if n["regressions"]
        else "✅ no regression"
    )
    out = [
        "## Conformance diff",
        "",
        f"- old: {_describe(old)}",
        f"- new: {_describe(new)}",
        "",
        verdict
        + (
            f"; {total} requirement result{'s' if total != 1 else ''} changed outcome: "
            + ", ".join(
                f"{n[key]} {title.split(' ', 1)[1].lower()}" for key, title in CLASSES if n[key]
            )
            if total
            else "; no requirement changed outcome."
        ),
        "",
    ]
    for key, title in CLASSES:
        items = changes[key]
        if not items:
            continue
        out += [
            f"### {title} ({len(items)})",
            "",
            "| Requirement | Level | Flow | Old | New | Why |",
            "|---|---|---|---|---|---|",
        ]
        for c in items:
            why = violation_digest(c.message) if c.new in BAD or c.old in BAD else ""
            if why and c.kind == "fixed":
                why = "was: " + why
            why = why or shorten(c.text, 120)
            out.append(
                f"| {md_text(c.requirement)} | {md_text(c.level)} | {md_text(c.flow)} "
                f"| {_outcome(c.old)} | {_outcome(c.new)} | {_cell(shorten(why, 240))} |"
            )
        out.append("")
    return "\n".join(out) + "\n"


def diff_command(old_path: str, new_path: str) -> int:
    """``python -m conformance diff``: print the Markdown; 1 if there is a regression, 2 if a
    report cannot be read."""
    try:
        old, new = load(old_path), load(new_path)
    except ReportError as exc:
        print(f"conformance diff: {exc}", file=sys.stderr)
        return 2
    changes = compare(old, new)
    sys.stdout.write(markdown(old, new, changes))
    return 1 if changes["regressions"] else 0
