"""Broken engines for the CI gate's tests, loaded as ``gate_engines:NAME`` (``tests/`` on
``PYTHONPATH``). Each is the reference engine with one rule of ``SPEC.md`` broken, so the gate
has something to reject and the reports something to show.

- :class:`SloppyMasterEngine` — in the setuid flows (suid, hybrid) ``create_container`` takes
  effective uid 0 back from the saved uid "to mount something" and never drops it again: the
  master's later hooks run with effective uid 0 and every permitted capability effective
  (PRIV-MASTER-001/002 fail there; the other flows pass).
- :class:`WrongExitEngine` — ``monitor_container`` reaps the container but reports a clean
  exit whatever the payload did: the run exits 0 instead of the payload's code (EXIT-001,
  EXIT-002 fail in every flow).
- :func:`broken_kit` — the reference engine, unchanged, run by a kit whose starter is broken:
  it tells init_config ``privileged_stage1=True`` in every process (ORDER-002, a rule no
  engine can break, fails): the gate must call that a harness error, not blame the engine.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import kit.starter.common
from kit.registry import register_operations, register_rpc_methods, registered
from reference_engines.minimal.engine import ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC


class SloppyMasterEngine(ReferenceEngine):
    engine_name = "gate-sloppy-master"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[override]
        super().create_container(ctx, pid, rpc_conn)
        ruid, _euid, suid = os.getresuid()
        if ruid != 0 and suid == 0:
            os.seteuid(0)  # the bug: privilege regained and kept for the rest of the run


class WrongExitEngine(ReferenceEngine):
    engine_name = "gate-wrong-exit"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[override]
        super().monitor_container(pid, signals)
        return 0  # the bug: "exited 0", whatever the payload's status was


def broken_kit() -> None:
    """Register ``gate-broken-kit`` (the reference engine) and break the kit's starter in this
    process and the processes it starts (the registrar runs wherever the engine is found)."""
    runner = kit.starter.common.HookRunner
    if not getattr(runner.init_engine, "broken_by_gate_engines", False):
        original = runner.init_engine

        @functools.wraps(original)
        def init_engine(
            self: Any, engine: Any, config_json: Any, container_id: str, privileged_stage1: bool
        ) -> Any:
            return original(self, engine, config_json, container_id, True)

        init_engine.broken_by_gate_engines = True  # type: ignore[attr-defined]
        runner.init_engine = init_engine  # type: ignore[method-assign]
    if "gate-broken-kit" not in registered():
        register_operations("gate-broken-kit", ReferenceEngine)
        register_rpc_methods("gate-broken-kit", ReferenceRPC)
