"""Engines that make the mistakes a new engine author makes, loaded as
``author_engines:NAME`` (``tests/`` on ``PYTHONPATH``): each is the reference engine with one
early failure, so the suite has a root cause to report once instead of dozens of failures.

- :class:`Stage1RaisesEngine` — ``prepare_config`` raises in every run (a stage-1 exception).
- :class:`MonitorReturnsNoneEngine` — ``monitor_container`` waits for the container and then
  returns None instead of its wait status (a hook returning the wrong type).
- :class:`DictConfigEngine`, :class:`SetConfigEngine`, :class:`UnservableRPCEngine` — what
  preflight stops before any lifecycle.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from kit.contract import EngineConfig
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


class DictConfigEngine(ReferenceEngine):
    """``config()`` returns a plain dict (preflight: not an EngineConfig dataclass)."""

    engine_name = "author-dict-config"
    rpc_methods = ReferenceRPC

    def config(self):  # type: ignore[override]
        return {}


@dataclass
class _SetConfig(EngineConfig):
    tags: set = field(default_factory=lambda: {"a"})  # not JSON: a set


class SetConfigEngine(ReferenceEngine):
    """``config()`` has a field whose value JSON cannot carry (a set)."""

    engine_name = "author-set-config"
    rpc_methods = ReferenceRPC

    def config(self):  # type: ignore[override]
        return _SetConfig()


class _RPCNeedsMore(ReferenceRPC):
    def __init__(self, engine, extra):  # type: ignore[no-untyped-def]
        super().__init__(engine)


class UnservableRPCEngine(ReferenceEngine):
    """Its RPC methods class cannot be built the way the RPC server builds it."""

    engine_name = "author-unservable-rpc"
    rpc_methods = _RPCNeedsMore


class UnservableSlowStage1Engine(UnservableRPCEngine):
    """:class:`UnservableRPCEngine` whose stage-1 ``prepare_config`` takes a minute: the
    inspection's problem is known long before the StarterConfig check could answer."""

    engine_name = "author-unservable-slow-stage1"

    def prepare_config(self, starter_config):  # type: ignore[override]
        time.sleep(60)
        super().prepare_config(starter_config)


class EffectiveNotPermittedEngine(ReferenceEngine):
    """``prepare_config`` asks for an effective capability it does not permit, in every flow
    (the StarterConfig the starter refuses)."""

    engine_name = "author-effective-not-permitted"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[override]
        super().prepare_config(starter_config)
        starter_config.set_capabilities("permitted", [])
        starter_config.set_capabilities("effective", ["CAP_CHOWN"])


class InvalidUnlessPrivilegedEngine(ReferenceEngine):
    """``prepare_config`` fills an invalid StarterConfig exactly when it runs as a non-root
    uid with no_new_privs: preflight reports it only if it really dropped to U."""

    engine_name = "author-invalid-unless-privileged"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[override]
        from kit.system import linux

        super().prepare_config(starter_config)
        if os.geteuid() != 0 and linux.get_no_new_privs():
            starter_config.set_capabilities("permitted", [])
            starter_config.set_capabilities("effective", ["CAP_CHOWN"])


#: The capability each flow's invalid StarterConfig makes effective without permitting it.
_WRONG_CAP = {"suid": "CAP_CHOWN", "fakeroot": "CAP_KILL", "hybrid": "CAP_FOWNER"}


class HangsInUsernsEngine(ReferenceEngine):
    """``prepare_config`` never returns in the userns flow, and fills an invalid
    StarterConfig naming a capability of the flow's own in the others: preflight's verdicts
    of the other flows must not wait for it, nor land on another flow."""

    engine_name = "author-hangs-in-userns"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[override]
        if starter_config.flow == "userns":
            threading.Event().wait()
        super().prepare_config(starter_config)
        starter_config.set_capabilities("permitted", [])
        starter_config.set_capabilities("effective", [_WRONG_CAP[starter_config.flow]])


class HangingPrepareEngine(ReferenceEngine):
    """``prepare_config`` never returns (only used by preflight's unit test)."""

    engine_name = "author-hanging-prepare"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[override]
        threading.Event().wait()
