"""Preflight: what can be checked about an engine before any lifecycle, without privilege.

- the engine is found and registers (a name, an entry point or ``module:attribute``);
- ``config()`` returns an :class:`~kit.contract.EngineConfig` dataclass, and its JSON survives
  the round trip from stage 1 to the later processes (SPEC §2 rule 3); with an engine config
  given (``kit run --config``) every field of it is known and of the right type;
- the RPC methods are servable: the class the RPC server instantiates can be built and every
  registered method is a callable attribute of it.

Not checked here: the StarterConfig that ``prepare_config`` fills. That hook runs in stage 1
with the flow's privileges (uid 0 and every capability in the root flow) and may touch the
system; running it in the caller (a pytest process, as root) would give the engine's code
privileges and side effects that no flow gives it. The starter validates the StarterConfig
before any namespace exists (SPEC §5) and the suite reports a rejection as the run's root
cause, naming ``prepare_config`` and the setting.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from kit import registry
from kit.contract import ConfigError, Engine, EngineConfig


@dataclass(frozen=True)
class Problem:
    """One thing to change before a lifecycle can be run."""

    engine: str
    hook: str  # the hook or step at fault: "registration", "config", "rpc_methods"
    message: str  # what to change first, then what was found

    def __str__(self) -> str:
        return f"engine {self.engine}: {self.hook}: {self.message}"


def check(spec: str, engine_config: dict[str, Any] | None = None) -> list[Problem]:
    """Every problem preflight finds for the engine ``spec`` (empty: go ahead)."""
    try:
        reg = registry.find(spec)
    except registry.RegistryError as exc:
        return [Problem(spec, "registration", str(exc))]
    except Exception as exc:  # the engine's module failed to import or to register
        return [Problem(spec, "registration", f"loading it raised {type(exc).__name__}: {exc}")]
    try:
        operations = reg.factory()
    except Exception as exc:
        return [Problem(reg.name, "registration", f"make the operations class constructible "
                        f"without arguments: creating it raised {type(exc).__name__}: {exc}")]
    problems = _config(reg.name, operations, engine_config)
    problems += _rpc_methods(reg, operations)
    return problems


def _config(name: str, operations: Any, engine_config: dict[str, Any] | None
            ) -> list[Problem]:
    try:
        cfg = operations.config()
    except Exception as exc:
        return [Problem(name, "config", f"make config() return a fresh EngineConfig without "
                        f"raising: it raised {type(exc).__name__}: {exc}")]
    if not isinstance(cfg, EngineConfig) or not dataclasses.is_dataclass(cfg):
        return [Problem(name, "config", "return an instance of a @dataclass subclass of "
                        "kit.EngineConfig from config() (every process calls it): it returned "
                        f"{type(cfg).__name__} {_short(cfg)}")]
    try:
        data = cfg.to_json()
        text = json.dumps(data)
        again = type(cfg).from_json(json.loads(text)).to_json()
    except (ConfigError, TypeError, ValueError) as exc:
        return [Problem(name, "config", "make every field of the engine config a JSON value "
                        "or a nested EngineConfig (only JSON crosses from stage 1 to the "
                        f"later processes): {exc}")]
    if again != data:
        return [Problem(name, "config", "make the engine config survive the JSON round trip "
                        f"from stage 1 to the later processes: {_short(data)} came back as "
                        f"{_short(again)}")]
    if engine_config is not None:
        try:
            type(cfg).from_json(engine_config)
        except ConfigError as exc:
            return [Problem(name, "config", f"fix the engine config given: {exc}")]
    return []


def _rpc_methods(reg: registry.Registration, operations: Any) -> list[Problem]:
    if reg.rpc_methods is None:
        return []
    try:
        instance = reg.rpc_methods(Engine(name=reg.name, operations=operations))
    except Exception as exc:
        return [Problem(reg.name, "rpc_methods", f"make {reg.rpc_methods.__qualname__}(engine) "
                        f"constructible as the RPC server builds it: it raised "
                        f"{type(exc).__name__}: {exc}")]
    missing = [m for m in reg.rpc_specs if not callable(getattr(instance, m, None))]
    if missing:
        return [Problem(reg.name, "rpc_methods", f"make {', '.join(missing)} callable methods "
                        f"of {reg.rpc_methods.__qualname__} instances (the RPC server serves "
                        "them from one)")]
    return []


def _short(value: Any, width: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 1] + "…"
