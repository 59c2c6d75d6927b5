"""A ready-made implementation of the suite's cooperation protocols, for any engine."""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

from conformance.capabilities import FAULT_FIELD, FAULTS, JOIN_FIELD, Capabilities
from kit.registry import register_operations, register_rpc_methods, registered
from kit.starter.inject import PROBE_METHOD, RPC_PROBES, probe_rpc_server

# The RPC probes are the kit's (kit.starter.inject): re-exported for engines that implement the
# fault-injection protocol themselves and call them from their own create_container.
__all__ = [
    "PROBE_METHOD",
    "REFERENCE_NAME",
    "RPC_PROBES",
    "FaultInjected",
    "cooperative",
    "probe_rpc_server",
    "register_reference",
]

REFERENCE_NAME = "reference-cooperative"


class FaultInjected(RuntimeError):
    """Raised by a hook because the suite asked for it (``conformance_fault``)."""


@functools.cache
def _extended(base: type) -> type:
    """``base`` (an EngineConfig dataclass) plus the two cooperation fields."""
    return dataclasses.make_dataclass(
        f"Cooperative{base.__name__}",
        [
            (FAULT_FIELD, str | None, dataclasses.field(default=None)),
            (JOIN_FIELD, dict[str, str], dataclasses.field(default_factory=dict)),
        ],
        bases=(base,),
    )


def cooperative(ops: type, *, faults: bool = True, join: bool = True) -> type:
    """A subclass of the Operations class ``ops`` that fails, hangs or joins on request.

    The error paths of the engine's own requirements (start_process raising) and the join-only tests
    need the engine to fail or join on request (SPEC §2 error table, §5); the error paths of the
    kit's requirements are made by the kit itself (:mod:`kit.starter.inject`) and need nothing. The
    subclass honours the two engine-config fields of :mod:`conformance.capabilities` and declares
    the capabilities ``fault_injection`` and ``join_only``::

        from conformance.cooperation import cooperative
        register_operations("myengine-under-test", cooperative(MyEngine))
        register_rpc_methods("myengine-under-test", MyRPC)

    Everything else is the engine's own code, so the suite still checks the engine's hooks on those
    paths (cleanup_container after a failure, the privileges of a join-only run…).
    """
    declared = getattr(ops, "conformance_capabilities", None) or Capabilities
    base_caps = declared if isinstance(declared, type) else type(declared)

    class CooperativeCapabilities(base_caps):  # type: ignore[misc, valid-type]
        @property
        def fault_injection(self) -> bool:
            """See Capabilities.fault_injection."""
            return faults

        @property
        def join_only(self) -> bool:
            """See Capabilities.join_only."""
            return join

    class Cooperative(ops):
        conformance_capabilities = CooperativeCapabilities

        def config(self) -> Any:
            base = super().config()
            cls: type = type(base)
            cfg = _extended(cls)()
            for f in dataclasses.fields(base):
                setattr(cfg, f.name, getattr(base, f.name))
            return cfg

        def _fault(self, hook: str) -> str | None:
            fault = getattr(self.common.engine_config, FAULT_FIELD, None)
            if fault is not None and fault not in FAULTS:
                raise ValueError(
                    f"{FAULT_FIELD}: unknown fault {fault!r} (known: {', '.join(FAULTS)})"
                )
            if fault is not None and fault.split(":")[0] == hook:
                return fault
            return None

        def prepare_config(self, starter_config: Any) -> None:
            fault = self._fault("prepare_config")
            if fault == "prepare_config":
                raise FaultInjected("prepare_config fails on request")
            super().prepare_config(starter_config)
            paths = getattr(self.common.engine_config, JOIN_FIELD, None) or {}
            if paths:
                starter_config.set_ns_flags([])
                for kind, path in paths.items():
                    starter_config.set_ns_path(kind, path)
                starter_config.set_namespace_join_only()
                starter_config.set_bring_loopback_interface(False)
            if fault == "prepare_config:invalid":
                starter_config.set_capabilities("permitted", [])
                starter_config.set_capabilities("effective", ["CAP_SYS_ADMIN"])

        def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
            fault = self._fault("create_container")
            if fault == "create_container":
                raise FaultInjected("create_container fails on request")
            if fault == "create_container:hang":
                threading.Event().wait()  # until the kit's hook timeout kills the run
            if fault == "create_container:rpc-probe":
                probe_rpc_server(rpc_conn, self.common.engine_name, "before")
            super().create_container(ctx, pid, rpc_conn)
            if fault == "create_container:rpc-probe":
                probe_rpc_server(rpc_conn, self.common.engine_name, "after")

        def start_process(self, master_fd: int) -> None:
            fault = self._fault("start_process")
            if fault == "start_process":
                raise FaultInjected("start_process fails on request")
            if fault == "start_process:return":
                return None
            super().start_process(master_fd)

        def post_start_process(self, ctx: Any, pid: int) -> None:
            if self._fault("post_start_process"):
                raise FaultInjected("post_start_process fails on request")
            super().post_start_process(ctx, pid)

        def monitor_container(self, pid: int, signals: Any) -> Any:
            if self._fault("monitor_container"):
                raise FaultInjected("monitor_container fails on request")
            return super().monitor_container(pid, signals)

        def cleanup_container(self, ctx: Any, fatal: Any, status: Any) -> None:
            super().cleanup_container(ctx, fatal, status)
            if self._fault("cleanup_container"):
                raise FaultInjected("cleanup_container fails on request")

    Cooperative.__name__ = Cooperative.__qualname__ = f"Cooperative{ops.__name__}"
    return Cooperative


def register_reference() -> None:
    """Register the reference engine with both protocols as ``reference-cooperative``.

    Use it as ``pytest --engine=conformance.cooperation:register_reference``.
    """
    # Engines import this module at run time: only this registrar loads the reference engine.
    from reference_engines.minimal import ReferenceEngine, ReferenceRPC  # noqa: PLC0415

    if REFERENCE_NAME not in registered():
        register_operations(REFERENCE_NAME, cooperative(ReferenceEngine))
        register_rpc_methods(REFERENCE_NAME, ReferenceRPC)
