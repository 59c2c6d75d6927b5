"""The pytest plugin the gate loads (``-p conformance.gate_progress``) for its progress line."""

from __future__ import annotations

import json
import os
from typing import IO, Any

import pytest

ENV = "KIT_GATE_PROGRESS_FD"
# On the controller (never in a pytest-xdist worker) it writes one JSON object per line to the file
# descriptor named by $KIT_GATE_PROGRESS_FD: {"total": N} once the tests are known, then {"nodeid",
# "outcome", "failed"} per finished test (failed: how many of its requirement results failed or
# broke). Without the variable it does nothing.
_out: IO[str] | None = None
_total_sent = False


def _send(**message: Any) -> None:
    global _out
    if _out is None:
        return
    try:
        _out.write(json.dumps(message) + "\n")
        _out.flush()
    except (OSError, ValueError):
        _out = None  # the gate stopped listening; the run goes on


def pytest_configure(config: pytest.Config) -> None:
    global _out
    fd = os.environ.get(ENV)
    if not fd or hasattr(config, "workerinput"):
        return
    try:
        _out = os.fdopen(int(fd), "w", buffering=1, closefd=True)
    except (OSError, ValueError):
        _out = None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _total_sent
    if session.items and not _total_sent:
        _total_sent = True
        _send(total=len(session.items))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    global _total_sent
    if not _total_sent:
        _total_sent = True
        _send(total=len(ids))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    finished = report.when == "call" or (report.when == "setup" and not report.passed)
    if not finished:
        return
    entries = getattr(report, "conformance", None) or []
    bad = sum(
        1 for e in entries if isinstance(e, dict) and e.get("outcome") in ("failed", "broken")
    )
    _send(nodeid=report.nodeid, outcome=report.outcome, failed=bad)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _out
    if _out is not None and not hasattr(config, "workerinput"):
        try:
            _out.close()
        except OSError:
            pass
        _out = None
