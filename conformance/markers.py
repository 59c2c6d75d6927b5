"""Decorators that tie a conformance test to what it checks (plain pytest marks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

MARKERS = {
    "requirement": "requirement(*ids): conformance requirement IDs the test checks",
    "scenarios": "scenarios(*names): lifecycle scenarios whose runs the test reads",
    "flows": "flows(*names): flows the conformance test applies to (default: all)",
    "requires": "requires(*capabilities): engine capabilities the test needs",
}


def _mark(name: str, args: tuple[str, ...]) -> pytest.MarkDecorator:
    # Here, not at import: engines import conformance.cooperation at run time, without pytest.
    import pytest  # noqa: PLC0415

    return getattr(pytest.mark, name)(*args)


def requirement(*ids: str) -> pytest.MarkDecorator:
    if not ids:
        raise TypeError("requirement() needs at least one requirement ID")
    return _mark("requirement", ids)


def scenarios(*names: str) -> pytest.MarkDecorator:
    return _mark("scenarios", names)


def flows(*names: str) -> pytest.MarkDecorator:
    if not names:
        raise TypeError("flows() needs at least one flow")
    return _mark("flows", names)


def requires(*capabilities: str) -> pytest.MarkDecorator:
    return _mark("requires", capabilities)


def declared(obj: Any, name: str) -> list[str]:
    """The arguments of every ``name`` mark on a test function (or item), in order."""
    out: list[str] = []
    if hasattr(obj, "iter_markers"):
        marks = list(obj.iter_markers(name))
    else:
        marks = [m for m in getattr(obj, "pytestmark", []) if m.name == name]
    for mark in marks:
        for arg in mark.args:
            if arg not in out:
                out.append(arg)
    return out
