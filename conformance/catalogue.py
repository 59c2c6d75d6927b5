"""The suite's index (which test checks which requirement, in which flows) and its catalogue."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass

from conformance import requirements
from conformance.capabilities import Capabilities
from conformance.expectations import FLOWS
from conformance.markers import declared
from conformance.scenario import SCENARIOS

SUITE_PACKAGE = "conformance.suite"


@dataclass(frozen=True)
class TestDeclaration:
    module: str  # e.g. test_lifecycle_order
    name: str  # the function name
    requirements: tuple[str, ...]
    flows: tuple[str, ...]
    scenarios: tuple[str, ...]
    requires: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.module}.py::{self.name}"


class SuiteDeclarationError(ValueError):
    """A suite module declares something unknown (requirement, flow, scenario, capability)."""


def suite_modules() -> list[str]:
    package = importlib.import_module(SUITE_PACKAGE)
    return sorted(
        m.name for m in pkgutil.iter_modules(package.__path__) if m.name.startswith("test_")
    )


def suite_tests() -> list[TestDeclaration]:
    """Every conformance test of the installed suite, with what it declares.

    Read by importing the suite modules and reading the marks of their test functions, so the
    index is the same whether or not pytest runs, whatever ``-k``, ``--flow`` or xdist."""
    out = []
    for name in suite_modules():
        module = importlib.import_module(f"{SUITE_PACKAGE}.{name}")
        for attr, fn in vars(module).items():
            if not attr.startswith("test_") or not inspect.isfunction(fn):
                continue
            decl = TestDeclaration(
                name,
                attr,
                tuple(declared(fn, "requirement")),
                tuple(declared(fn, "flows")) or FLOWS,
                tuple(declared(fn, "scenarios")),
                tuple(declared(fn, "requires")),
            )
            validate(decl)
            out.append(decl)
    return out


def validate(decl: TestDeclaration) -> None:
    if not decl.requirements:
        raise SuiteDeclarationError(f"{decl.id} declares no requirement")
    for req in decl.requirements:
        if req not in requirements.CATALOGUE:
            raise SuiteDeclarationError(f"{decl.id}: unknown requirement {req!r}")
    for flow in decl.flows:
        if flow not in FLOWS:
            raise SuiteDeclarationError(f"{decl.id}: unknown flow {flow!r}")
    for scenario in decl.scenarios:
        if scenario not in SCENARIOS:
            raise SuiteDeclarationError(f"{decl.id}: unknown scenario {scenario!r}")
    known = Capabilities.names()
    for cap in decl.requires:
        if cap not in known:
            raise SuiteDeclarationError(
                f"{decl.id}: unknown capability {cap!r} (known: {', '.join(known)})"
            )


def tests_by_requirement(
    tests: list[TestDeclaration] | None = None,
) -> dict[str, list[TestDeclaration]]:
    tests = suite_tests() if tests is None else tests
    out: dict[str, list[TestDeclaration]] = {r: [] for r in requirements.CATALOGUE}
    for decl in tests:
        for req in decl.requirements:
            out[req].append(decl)
    return out


def checked_by(
    tests: list[TestDeclaration] | None = None,
) -> dict[str, tuple[str, ...]]:
    """requirement ID -> the suite tests (``module.py::function``) that decide it, read from
    their ``@requirement`` marks; every requirement of the catalogue is a key.

    A requirement with no test must say why (``unchecked``), and one with a reason must have
    no test: either mismatch means the catalogue and the suite disagree, so it is an error,
    not an empty cell."""
    index = tests_by_requirement(tests)
    problems = []
    for req in requirements.CATALOGUE.values():
        if not index[req.id] and not req.unchecked:
            problems.append(
                f"{req.id} is decided by no suite test: add @requirement({req.id!r}) to "
                "the test that decides it, or give the catalogue entry an 'unchecked' reason"
            )
        elif index[req.id] and req.unchecked:
            problems.append(
                f"{req.id} says no test can decide it ({req.unchecked!r}) but "
                f"{', '.join(d.id for d in index[req.id])} declares it: drop one of the two"
            )
    if problems:
        raise SuiteDeclarationError("; ".join(problems))
    return {req: tuple(d.id for d in decls) for req, decls in index.items()}


def markdown() -> str:
    """The catalogue as Markdown, grouped by hook or concern, with the tests that decide
    each requirement (``python -m conformance catalogue`` prints it)."""
    tests = suite_tests()
    index = tests_by_requirement(tests)
    checked_by(tests)  # the catalogue and the suite must agree before it is printed
    total = len(requirements.CATALOGUE)
    checked = sum(1 for r in requirements.CATALOGUE if index[r])
    kit = sum(1 for r in requirements.CATALOGUE.values() if r.subject == requirements.KIT)
    lines = [
        "# Conformance requirements",
        "",
        f"{total} requirements from SPEC.md §1–§8; {checked} are checked by "
        f"{len(tests)} tests of the suite, {total - checked} cannot be decided from a "
        "lifecycle run (the reason is given).",
        "",
        "Levels follow RFC 2119. Each test runs once per flow it applies to; the report "
        "has one result per requirement and flow.",
        "",
        f"Subject: who can break the requirement. {total - kit} are the engine's: the "
        f"engine's verdict counts these only. {kit} are the kit's (no engine code can "
        "break them): in an engine's run they are the harness's self-check on that "
        "machine, one line of the summary; a failing one is a harness error (exit 2).",
        "",
    ]
    for _, title, reqs in requirements.by_group():
        if not reqs:
            continue
        lines += [
            f"## {title}",
            "",
            "| ID | Level | Subject | Requirement | SPEC | Checked by |",
            "|---|---|---|---|---|---|",
        ]
        for req in reqs:
            decls = index[req.id]
            if decls:
                cell = "<br>".join(
                    f"`{d.id}`"
                    + ("" if d.flows == FLOWS else f" ({', '.join(d.flows)})")
                    + (f" needs {', '.join(d.requires)}" if d.requires else "")
                    for d in decls
                )
            else:
                cell = f"not checked: {req.unchecked or 'no test yet'}"
            lines.append(
                f"| {req.id} | {req.level} | {req.subject} | {req.text} | {req.section} | {cell} |"
            )
        lines.append("")
    lines += [
        "## Engine capabilities",
        "",
        "Tests that need a capability the engine does not declare are reported not-supported.",
        "",
        "| Capability | Default | Meaning |",
        "|---|---|---|",
    ]
    defaults = Capabilities().as_dict()
    for name in Capabilities.names():
        lines.append(
            f"| `{name}` | {'yes' if defaults[name] else 'no'} | {Capabilities.describe(name)} |"
        )
    lines += ["", "## Scenarios", "", "| Scenario | Payload | Needs |", "|---|---|---|"]
    for scenario in SCENARIOS.values():
        lines.append(
            f"| `{scenario.name}` | {scenario.description} | "
            f"{', '.join(scenario.requires) or '-'} |"
        )
    return "\n".join(lines) + "\n"
