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
"""

from __future__ import annotations

import os

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
