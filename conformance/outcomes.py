"""Outcomes of requirements, known failures, and the per-requirement results of a session."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from conformance import requirements
from conformance.expectations import FLOWS

# Outcome classes, one per requirement, flow and test. passed: every check of the requirement held.
# failed: a check did not hold (the engine or the kit breaks the contract), or a known failure
# passed unexpectedly, or (with --strict) the environment could not run it. broken: the harness
# failed (the run could not be made, a suite error). not-supported: the engine does not declare a
# capability the check needs. not-configured: this machine cannot run the flow or scenario (the
# reason is given). xfail: listed in the engine's known-failures file, with its reason, and failed.
# not-decided: the run it reads failed early (a hook raised or hung, the starter failed); the run's
# root cause is reported once instead (conformance.rootcause).
PASSED, FAILED, BROKEN = "passed", "failed", "broken"
NOT_SUPPORTED, NOT_CONFIGURED, XFAIL = "not-supported", "not-configured", "xfail"
NOT_DECIDED = "not-decided"
OUTCOMES = (PASSED, FAILED, BROKEN, NOT_SUPPORTED, NOT_CONFIGURED, XFAIL, NOT_DECIDED)
#: When several tests decide the same requirement in the same flow, the worst outcome wins.
SEVERITY = {
    FAILED: 6,
    NOT_DECIDED: 5,
    BROKEN: 4,
    XFAIL: 3,
    NOT_CONFIGURED: 2,
    NOT_SUPPORTED: 1,
    PASSED: 0,
}

NOT_SUPPORTED_PREFIX = "not-supported: "
NOT_CONFIGURED_PREFIX = "not-configured: "
STRICT_PREFIX = "not-configured (strict): "
#: How the preflight's refusal of an engine reads (the session's usage error): the engine
#: itself is at fault, as ``python -m mutants blind`` counts it.
PREFLIGHT_REFUSED = "failed, no lifecycle was run"


def skip_outcome(reason: str) -> tuple[str, str]:
    """(outcome, message) of a skipped test from its skip reason."""
    if reason.startswith("Skipped: "):
        reason = reason[len("Skipped: ") :]
    if reason.startswith(NOT_SUPPORTED_PREFIX):
        return NOT_SUPPORTED, reason[len(NOT_SUPPORTED_PREFIX) :]
    if reason.startswith(NOT_CONFIGURED_PREFIX):
        return NOT_CONFIGURED, reason[len(NOT_CONFIGURED_PREFIX) :]
    return NOT_CONFIGURED, reason


# --- known failures --------------------------------------------------------------------------


class KnownFailuresError(ValueError):
    """The known-failures file is invalid (a usage error)."""


@dataclass(frozen=True)
class KnownFailure:
    requirement: str
    flows: tuple[str, ...]
    reason: str
    source: str
    line: int

    def where(self) -> str:
        return f"{self.source}:{self.line}"


_ENTRY = re.compile(
    r"^(?P<req>[A-Z][A-Z0-9]*(?:-[A-Z0-9]+)+)\s*(?:\[(?P<flows>[^\]]*)\])?"
    r"\s*(?::\s*(?P<reason>.*))?$"
)


def parse_known_failures(
    text: str, source: str, tests_by_requirement: dict[str, list[Any]]
) -> list[KnownFailure]:
    """Entries of a known-failures file, one per line::

        # comment
        PRIV-MASTER-002[suid,hybrid]: our master keeps CAP_SETUID effective (upstream model)
        EXIT-002: signals are re-raised, not mapped to 128+n

    Every entry needs a reason; an unknown requirement or flow, a duplicate, and an entry that
    matches no test of the suite are errors.
    """
    entries: list[KnownFailure] = []
    seen: dict[tuple[str, str], int] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENTRY.match(line)
        if not match:
            problems.append(
                f"{source}:{number}: cannot parse {raw.strip()!r} (expected "
                "'REQUIREMENT[flow,…]: reason')"
            )
            continue
        req, reason = match["req"], (match["reason"] or "").strip()
        flows = tuple(f.strip() for f in (match["flows"] or "").split(",") if f.strip())
        if not reason:
            problems.append(
                f"{source}:{number}: {req}: every known failure needs a reason "
                "(write 'REQUIREMENT[flows]: reason')"
            )
            continue
        if req not in requirements.CATALOGUE:
            problems.append(f"{source}:{number}: unknown requirement {req!r}")
            continue
        unknown = [f for f in flows if f not in FLOWS]
        if unknown:
            problems.append(
                f"{source}:{number}: unknown flow(s) {', '.join(unknown)} (known: "
                f"{', '.join(FLOWS)})"
            )
            continue
        flows = flows or FLOWS
        tests = tests_by_requirement.get(req) or []
        for flow in flows:
            if (req, flow) in seen:
                problems.append(
                    f"{source}:{number}: {req}[{flow}] is already listed at line "
                    f"{seen[(req, flow)]}"
                )
            elif not any(flow in t.flows for t in tests):
                why = requirements.get(req).unchecked
                problems.append(
                    f"{source}:{number}: {req}[{flow}] matches no test of the "
                    "suite" + (f" ({why})" if why and not tests else "")
                )
            seen[(req, flow)] = number
        entries.append(KnownFailure(req, flows, reason, source, number))
    if problems:
        raise KnownFailuresError("invalid known-failures file:\n  " + "\n  ".join(problems))
    return entries


def known_failure(
    entries: Iterable[KnownFailure], requirement: str, flow: str
) -> KnownFailure | None:
    for entry in entries:
        if entry.requirement == requirement and flow in entry.flows:
            return entry
    return None


# --- results of a session --------------------------------------------------------------------


def result(
    requirement: str,
    flow: str,
    backend: str,
    outcome: str,
    test: str,
    message: str,
    runs: Iterable[str] = (),
    checks: int = 0,
) -> dict[str, Any]:
    req = requirements.get(requirement)
    return {
        "requirement": requirement,
        "subject": req.subject,
        "level": req.level,
        "section": req.section,
        "text": req.text,
        "flow": flow,
        "backend": backend,
        "outcome": outcome,
        "test": test,
        "message": message,
        "runs": list(runs),
        "checks": checks,
    }


class Results:
    """Per-test results as reported (setup, call, teardown), merged per requirement × flow."""

    def __init__(self) -> None:
        self._by_test: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def add(self, nodeid: str, when: str, entries: list[dict[str, Any]]) -> None:
        if entries:
            self._by_test.setdefault(nodeid, {})[when] = entries

    def per_test(self) -> list[dict[str, Any]]:
        out = []
        for phases in self._by_test.values():
            if "teardown" in phases:  # a teardown error makes the test broken
                out += phases["teardown"]
            elif "call" in phases:
                out += phases["call"]
            else:
                out += phases.get("setup", [])
        return out

    def merged(self) -> list[dict[str, Any]]:
        """One entry per (requirement, flow), the worst outcome winning, in catalogue order."""
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for entry in self.per_test():
            key = (entry["requirement"], entry["flow"])
            if key not in merged:
                merged[key] = {**entry, "tests": [entry["test"]]}
                continue
            have = merged[key]
            have["tests"].append(entry["test"])
            have["runs"] = sorted(set(have["runs"]) | set(entry["runs"]))
            have["checks"] += entry["checks"]
            if SEVERITY[entry["outcome"]] > SEVERITY[have["outcome"]]:
                have.update(outcome=entry["outcome"], test=entry["test"], message=entry["message"])
        order = {r: i for i, r in enumerate(requirements.CATALOGUE)}
        return sorted(
            merged.values(),
            key=lambda e: (
                order[e["requirement"]],
                FLOWS.index(e["flow"]) if e["flow"] in FLOWS else 99,
            ),
        )

    @staticmethod
    def summary(entries: list[dict[str, Any]]) -> dict[str, int]:
        counts = {o: 0 for o in OUTCOMES}
        for entry in entries:
            counts[entry["outcome"]] += 1
        counts["total"] = len(entries)
        return counts
