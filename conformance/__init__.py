"""The conformance suite: ``pytest --engine=NAME`` checks an engine against the contract.

The suite is installed with the kit and registered as a pytest plugin (entry point
``pytest11: conformance``). It drives the named engine through one lifecycle per flow and
scenario, and checks the ledger of each run against ``SPEC.md``:

- :mod:`conformance.requirements` — every rule as a requirement with an ID and a level;
- :mod:`conformance.expectations` — the privilege table, the order rules and the error table
  as data;
- :mod:`conformance.checks` — generic checks that read that data and the ledger;
- :mod:`conformance.capabilities` — optional engine features (fault injection, join-only…);
- :mod:`conformance.suite` — the test modules, one per hook or concern.

Engine authors use :func:`requirement` only when they add tests of their own, and
:class:`Capabilities` to declare what their engine supports.
"""

from __future__ import annotations

SUITE_VERSION = "0.1.0"

from conformance.capabilities import Capabilities, register_capabilities  # noqa: E402
from conformance.markers import flows, requirement, requires, scenarios  # noqa: E402

__all__ = [
    "SUITE_VERSION",
    "Capabilities",
    "flows",
    "register_capabilities",
    "requirement",
    "requires",
    "scenarios",
]
