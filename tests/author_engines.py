"""Engines that make the mistakes a new engine author makes, loaded as
``author_engines:NAME`` (``tests/`` on ``PYTHONPATH``): each is the reference engine with one
early failure, so the suite has a root cause to report once instead of dozens of failures.

- :class:`Stage1RaisesEngine` — ``prepare_config`` raises in every run (a stage-1 exception).
- :class:`MonitorReturnsNoneEngine` — ``monitor_container`` waits for the container and then
  returns None instead of its wait status (a hook returning the wrong type).
"""

from __future__ import annotations

from reference_engines.minimal.engine import ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC

STAGE1_MESSAGE = "the author forgot to handle this flow"


class Stage1RaisesEngine(ReferenceEngine):
    engine_name = "author-stage1-raises"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[override]
        raise RuntimeError(STAGE1_MESSAGE)


class MonitorReturnsNoneEngine(ReferenceEngine):
    engine_name = "author-monitor-returns-none"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[override]
        super().monitor_container(pid, signals)
        return None  # the mistake: the wait status is dropped
