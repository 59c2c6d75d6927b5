"""Preflight: what can be checked about an engine before any lifecycle, without privilege."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import time
from dataclasses import dataclass
from typing import Any

from kit import registry
from kit.contract import Common, ConfigError, Engine, EngineConfig
from kit.starter.config import StarterConfig
from kit.system import linux


@dataclass(frozen=True)
class Problem:
    """One thing to change before a lifecycle can be run."""

    engine: str
    hook: str  # the hook or step at fault: "registration", "config", "rpc_methods"
    message: str  # what to change first, then what was found

    def __str__(self) -> str:
        return f"engine {self.engine}: {self.hook}: {self.message}"


def check(spec: str, engine_config: dict[str, Any] | None = None) -> list[Problem]:
    """Every problem preflight finds for the engine ``spec`` (empty: go ahead).

    What it checks:

    - the engine is found and registers (a name, an entry point or ``module:attribute``);
    - ``config()`` returns an :class:`~kit.contract.EngineConfig` dataclass, and its JSON survives
      the round trip from stage 1 to the later processes (SPEC §2 rule 3); with an engine config
      given (``kit run --config``) every field of it is known and of the right type;
    - the RPC methods are servable: the class the RPC server instantiates can be built and every
      registered method is a callable attribute of it.
    """
    try:
        reg = registry.find(spec)
    except registry.RegistryError as exc:
        return [Problem(spec, "registration", str(exc))]
    except Exception as exc:  # noqa: BLE001 the engine's module failed to import or to register
        return [Problem(spec, "registration", f"loading it raised {type(exc).__name__}: {exc}")]
    try:
        operations = reg.factory()
    except Exception as exc:  # noqa: BLE001 the engine's constructor may raise anything
        return [
            Problem(
                reg.name,
                "registration",
                f"make the operations class constructible "
                f"without arguments: creating it raised {type(exc).__name__}: {exc}",
            )
        ]
    problems = _config(reg.name, operations, engine_config)
    problems += _rpc_methods(reg, operations)
    return problems


def _config(name: str, operations: Any, engine_config: dict[str, Any] | None) -> list[Problem]:
    try:
        cfg = operations.config()
    except Exception as exc:  # noqa: BLE001 the engine's config() may raise anything
        return [
            Problem(
                name,
                "config",
                f"make config() return a fresh EngineConfig without "
                f"raising: it raised {type(exc).__name__}: {exc}",
            )
        ]
    if not isinstance(cfg, EngineConfig) or not dataclasses.is_dataclass(cfg):
        return [
            Problem(
                name,
                "config",
                "return an instance of a @dataclass subclass of "
                "kit.EngineConfig from config() (every process calls it): it returned "
                f"{type(cfg).__name__} {_short(cfg)}",
            )
        ]
    try:
        data = cfg.to_json()
        text = json.dumps(data)
        again = type(cfg).from_json(json.loads(text)).to_json()
    except (ConfigError, TypeError, ValueError) as exc:
        return [
            Problem(
                name,
                "config",
                "make every field of the engine config a JSON value "
                "or a nested EngineConfig (only JSON crosses from stage 1 to the "
                f"later processes): {exc}",
            )
        ]
    if again != data:
        return [
            Problem(
                name,
                "config",
                "make the engine config survive the JSON round trip "
                f"from stage 1 to the later processes: {_short(data)} came back as "
                f"{_short(again)}",
            )
        ]
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
    except Exception as exc:  # noqa: BLE001 the engine's RPC methods class may raise anything
        return [
            Problem(
                reg.name,
                "rpc_methods",
                f"make {reg.rpc_methods.__qualname__}(engine) "
                f"constructible as the RPC server builds it: it raised "
                f"{type(exc).__name__}: {exc}",
            )
        ]
    missing = [m for m in reg.rpc_specs if not callable(getattr(instance, m, None))]
    if missing:
        return [
            Problem(
                reg.name,
                "rpc_methods",
                f"make {', '.join(missing)} callable methods "
                f"of {reg.rpc_methods.__qualname__} instances (the RPC server serves "
                "them from one)",
            )
        ]
    return []


def _short(value: Any, width: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


#: Flows whose stage 1 runs as U without privilege (preflight may run prepare_config there).
UNPRIVILEGED_FLOWS = ("suid", "userns", "fakeroot", "hybrid")
#: Seconds prepare_config may take in preflight before its child is killed (no verdict then).
PREPARE_TIMEOUT = 10.0


def starter_configs(
    spec: str, flows: list[str] | tuple[str, ...], uid: int, gid: int, groups: list[int]
) -> list[Problem]:
    """Problems of the StarterConfig ``prepare_config`` fills in each unprivileged flow of
    ``flows``, found by running stage 1's hooks as U (``uid``/``gid``) in a forked child.
    Only a StarterConfig that the starter would reject is a problem here.

    The flows are suid, userns, fakeroot and hybrid (SPEC §5's combinations). Stage 1 runs there as
    the invoking user U without any privilege, so preflight does the same: the child drops to U
    (groups, gids, uids) with no_new_privs before the engine's code runs, and only the
    StarterConfig's validation is judged (a hook that raises there may depend on what the starter
    sets up; the lifecycle reports it as its root cause).

    Not run here: ``prepare_config`` of the root flow, which runs as uid 0 with every capability and
    may touch the system; in the caller (a pytest process, as root) it would have privileges and
    side effects outside any run's sandbox. The starter validates that StarterConfig before any
    namespace exists and the suite reports a rejection as the run's root cause.
    """
    if os.geteuid() == 0 and uid == 0:
        return []  # U must be unprivileged: never run engine code as root here
    by_reason: dict[str, list[str]] = {}
    for flow in flows:
        if flow in UNPRIVILEGED_FLOWS:
            reason = _stage1_in_child(spec, flow, uid, gid, groups)
            if reason:
                by_reason.setdefault(reason, []).append(flow)
    return [
        Problem(
            spec,
            "prepare_config",
            f"fix the StarterConfig that prepare_config fills "
            f"in the {', '.join(fl)} flow{'s' if len(fl) > 1 else ''} (stage 1, run "
            f"as the invoking user): the starter would refuse it: {reason}",
        )
        for reason, fl in by_reason.items()
    ]


def _stage1_in_child(spec: str, flow: str, uid: int, gid: int, groups: list[int]) -> str | None:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is its own process
        os.close(rfd)
        code = 0
        try:
            os.write(wfd, (_child(spec, flow, uid, gid, groups) or "").encode()[:65536])
        except BaseException:  # noqa: BLE001 a forked child must reach os._exit
            code = 1
        os._exit(code)
    os.close(wfd)
    data = b""
    deadline = time.monotonic() + PREPARE_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                os.kill(pid, 9)  # no verdict: the lifecycle will show what hangs
                break
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    return data.decode(errors="replace") or None


def _child(spec: str, flow: str, uid: int, gid: int, groups: list[int]) -> str | None:
    """In the forked child: become U, run config, init_config and prepare_config as stage 1
    of ``flow`` does, and return why the StarterConfig is invalid (None when it is valid, or
    when something else than its validation failed)."""
    if os.geteuid() == 0:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    linux.set_no_new_privs()
    try:
        engine = registry.make_engine(spec)
        ops = engine.operations
        cfg = ops.config()
        cfg.update_from_json({"argv": ["/bin/true"]})  # as the launcher fills it for a run
        ops.init_config(Common(engine.name, "kit-preflight", cfg), flow in ("suid", "hybrid"))
        sconf = StarterConfig(flow, uid, gid)
        ops.prepare_config(sconf)
    except Exception:  # noqa: BLE001 engine code; not a StarterConfig problem
        return None  # not a StarterConfig problem: the lifecycle names it as root cause
    try:
        sconf.validate()
    except ConfigError as exc:
        return str(exc)
    return None
