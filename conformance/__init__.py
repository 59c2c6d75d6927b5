"""The conformance suite: ``pytest --engine=NAME`` checks an engine against the contract."""

from __future__ import annotations

SUITE_VERSION = "0.1.0"

# What engine authors import: Capabilities to declare what their engine supports; requirement (and
# the other markers) only when they add tests of their own.
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
