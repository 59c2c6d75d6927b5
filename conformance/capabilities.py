"""Engine capabilities: what an engine can do beyond the mandatory contract."""

from __future__ import annotations

import inspect
from typing import Any

#: Engine-config field naming the hook to fail (``fault_injection``).
FAULT_FIELD = "conformance_fault"
#: Engine-config field mapping namespace kind to path (``join_only``).
JOIN_FIELD = "conformance_join"

#: Values of FAULT_FIELD, and what the engine must do for each. The suite asks an engine for
#: the faults of its own requirements only (``fault:*`` scenarios, today start_process); the
#: kit makes every other one itself (kit.starter.inject, the same names, ``inject:*`` scenarios).
FAULTS = {
    "prepare_config": "raise an exception in prepare_config",
    "prepare_config:invalid": "request an invalid StarterConfig in prepare_config: effective "
    "capabilities not a subset of permitted",
    "create_container": "raise an exception in create_container",
    "create_container:hang": "block in create_container (never return)",
    "create_container:rpc-probe": "before its own RPC calls, send the RPC server what it must "
    "refuse and survive, and after them a frame too large to "
    "read: kit.starter.inject.probe_rpc_server does both",
    "start_process": "raise an exception in start_process",
    "start_process:return": "return from start_process without exec'ing",
    "post_start_process": "raise an exception in post_start_process",
    "monitor_container": "raise an exception in monitor_container (before waiting)",
    "cleanup_container": "do the normal cleanup, then raise an exception",
}


class Capabilities:
    """Optional features of an engine. Override a property to return True to declare it.

    Modelled on SQLAlchemy's ``testing/requirements.py``: every capability is one property with a
    one-line docstring, so this class reads as the catalogue of optional features. An engine
    declares what it supports by subclassing this class and overriding properties, and attaching the
    class (or an instance) either as ``conformance_capabilities`` on its
    :class:`kit.contract.Operations` class, or with :func:`register_capabilities` (e.g. from the
    function that registers the engine).

    A test that needs a capability says so with ``@requires("name")``; when the engine does not
    declare it, the test's requirements are reported **not-supported** (never passed). Unknown names
    are an error at collection (a closed vocabulary, as runc's ``requires``).

    The cooperation protocols (what an engine must do when it declares ``fault_injection`` or
    ``join_only``) are described on the properties; :mod:`conformance.cooperation` implements both
    for any engine.
    """

    @property
    def host_payloads(self) -> bool:
        """The payload runs with the host's filesystem: /bin/sh, /bin/cat and
        /usr/bin/python3 can be exec'd in the container."""
        return True

    @property
    def fault_injection(self) -> bool:
        """The engine config accepts ``conformance_fault`` (a key of FAULTS) and the engine
        then fails in that hook as FAULTS says (needed only for the error paths of engine
        requirements: the kit injects the others itself)."""
        return False

    @property
    def join_only(self) -> bool:
        """The engine config accepts ``conformance_join`` (namespace kind -> path); the engine
        then requests only those joins and ``set_namespace_join_only()``."""
        return False

    # -- introspection ------------------------------------------------------------------------
    @classmethod
    def names(cls) -> list[str]:
        """Every capability name, in declaration order."""
        return [name for name, value in vars(Capabilities).items() if isinstance(value, property)]

    @classmethod
    def describe(cls, name: str) -> str:
        prop = getattr(Capabilities, name, None)
        if not isinstance(prop, property):
            raise UnknownCapability(name)
        return " ".join((inspect.getdoc(prop) or "").split())

    def as_dict(self) -> dict[str, bool]:
        out = {}
        for name in self.names():
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(
                    f"capability {name} of {type(self).__qualname__} is {value!r}, not a bool"
                )
            out[name] = value
        return out


class UnknownCapability(KeyError):
    def __str__(self) -> str:
        return f"unknown capability {self.args[0]!r} (known: {', '.join(Capabilities.names())})"


_registered: dict[str, Capabilities] = {}


def register_capabilities(
    engine_name: str, capabilities: type[Capabilities] | Capabilities
) -> None:
    """Declare the capabilities of ``engine_name`` (a Capabilities subclass or instance)."""
    _registered[engine_name] = _instance(capabilities, f"register_capabilities({engine_name!r})")


def _instance(value: Any, where: str) -> Capabilities:
    if isinstance(value, type) and issubclass(value, Capabilities):
        value = value()
    if not isinstance(value, Capabilities):
        raise TypeError(
            f"{where}: expected a conformance.Capabilities subclass or instance, got {value!r}"
        )
    value.as_dict()  # every property must be a bool
    return value


def for_engine(registration: Any) -> tuple[Capabilities, str]:
    """The capabilities of a :class:`kit.registry.Registration`, and where they came from."""
    if registration.name in _registered:
        return _registered[registration.name], "register_capabilities"
    factory = registration.factory
    target = factory if isinstance(factory, type) else type(factory())
    declared = getattr(target, "conformance_capabilities", None)
    if declared is not None:
        return (
            _instance(declared, f"{target.__qualname__}.conformance_capabilities"),
            f"{target.__qualname__}.conformance_capabilities",
        )
    return Capabilities(), "defaults (none declared)"


#: The shape of what :func:`collect` returns (kit.preflight.Shape).
COLLECTED = ({"capabilities": {str: bool}, "source": str}, {"error": str})


def collect(registration: Any) -> dict[str, Any]:
    """In an engine's inspection child (kit.preflight.inspect): its declared capabilities as
    JSON, ``{"capabilities": {name: bool}, "source": where}``, or ``{"error": message}``."""
    try:
        capabilities, source = for_engine(registration)
        return {"capabilities": capabilities.as_dict(), "source": source}
    except (TypeError, UnknownCapability) as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 a property of the engine's own may raise anything
        return {"error": f"reading its capabilities raised {type(exc).__name__}: {exc}"}
