"""Correct engines of blind round 12 (operations, their order and their state), loaded as
``blind12_order_correct:NAME`` with ``tests/`` on ``PYTHONPATH``.

Written from SPEC.md alone (§1, §2 and the error table), without reading the conformance
suite, the mutants or the other engines. Each engine keeps its cross-process state in its
own way; all three are meant to be conformant in the five flows.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kit import system
from kit.contract import ConfigError, Context, EngineConfig, Operations, SignalChannel
from kit.rpc import RPCClient

FORWARDED = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
)
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USERNS_FLOWS = ("userns", "fakeroot", "hybrid")
TMPFS_FLAGS = ("nosuid", "nodev", "noexec", "ro")
DEFAULT_MOUNT_TARGETS = ("/srv", "/media", "/mnt")


# --- helpers shared by the engines (private: plain functions, no state) -----------------------


def _plan_namespaces(sc: Any, extra: tuple[str, ...] = ()) -> list[str]:
    """The namespaces to create for the flow, with the id maps and flags they need."""
    kinds = ["mount", "pid", "uts", "ipc", "net", *extra]
    if sc.flow in USERNS_FLOWS:
        kinds.append("user")
        inside = sc.invoker_uid if sc.flow == "userns" else 0
        inside_gid = sc.invoker_gid if sc.flow == "userns" else 0
        sc.add_uid_mappings([(inside, sc.invoker_uid, 1)])
        sc.add_gid_mappings([(inside_gid, sc.invoker_gid, 1)])
    if sc.flow == "hybrid":
        sc.set_hybrid_workflow()
    sc.set_ns_flags(kinds)
    sc.set_bring_loopback_interface()
    sc.set_mount_propagation("rprivate")
    if sc.flow != "root":
        sc.set_no_new_privs()
    return kinds


def _monitor(pid: int, signals: SignalChannel, poll: float = 0.1) -> int:
    """Forward the forwarded signals to ``pid`` and reap ``pid`` only; its wait status."""
    while True:
        sig = signals.get(timeout=poll)
        while sig is not None:
            if sig in FORWARDED:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            sig = signals.get(timeout=0)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return status


def _check_hostname(name: Any, setting: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= 64 or "/" in name or " " in name:
        raise ConfigError(f"{setting}: invalid host or domain name {name!r}")
    return name


class OrderRPC:
    """RPC methods served in the container's namespaces (public methods only)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)

    def setdomainname(self, name: str) -> None:
        self.system.setdomainname(name)

    def gethostname(self) -> str:
        return str(self.system.gethostname())

    def mount_tmpfs(self, target: str, size_kb: int, flags: list[str], mode: str | None) -> None:
        data = f"size={size_kb}k" + (f",mode={mode}" if mode else "")
        self.system.mount("tmpfs", target, "tmpfs", flags, data)


# --- engine 1: a nested engine config that crosses by JSON ----------------------------------


@dataclass
class TmpfsMount(EngineConfig):
    """One tmpfs the container gets (nested config, a list element)."""

    target: str = ""
    size_kb: int = 4096
    flags: list[str] = field(default_factory=lambda: ["nosuid", "nodev"])
    mode: str | None = None


@dataclass
class UtsNames(EngineConfig):
    """Host and domain name (nested config, optional domain)."""

    hostname: str = "blind12-nested"
    domainname: str | None = None


@dataclass
class NestedConfig(EngineConfig):
    uts: UtsNames = field(default_factory=UtsNames)
    mounts: list[TmpfsMount] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # Filled by prepare_config in stage 1; read by the master and stage 2.
    resolved: UtsNames | None = None
    stage1_flow: str | None = None
    namespaces: list[str] = field(default_factory=list)


class NestedStateEngine(Operations):
    """Correct: nested dataclass config (lists, optional fields) decided in stage 1, via JSON."""

    engine_name = "blind12-order-nested"
    rpc_methods = OrderRPC

    def config(self) -> NestedConfig:
        return NestedConfig()

    def init_config(self, common: Any, privileged_stage1: bool) -> None:
        self.common = common
        self._mounted: list[str] = []
        self._cleaned = 0

    def _cfg(self) -> NestedConfig:
        cfg = self.common.engine_config
        assert isinstance(cfg, NestedConfig)
        return cfg

    def _resolve_names(self, cfg: NestedConfig) -> UtsNames:
        host = _check_hostname(cfg.uts.hostname, "uts.hostname")
        dom = cfg.uts.domainname
        if dom is not None:
            _check_hostname(dom, "uts.domainname")
        return UtsNames(hostname=host, domainname=dom)

    def prepare_config(self, sc: Any) -> None:
        cfg = self._cfg()
        if not cfg.argv:
            raise ConfigError("argv: no payload given")
        cfg.resolved = self._resolve_names(cfg)
        for i, m in enumerate(cfg.mounts):
            if not m.target.startswith("/"):
                raise ConfigError(f"mounts[{i}].target: must be absolute, got {m.target!r}")
            if m.size_kb <= 0:
                raise ConfigError(f"mounts[{i}].size_kb: must be positive")
            bad = [f for f in m.flags if f not in TMPFS_FLAGS]
            if bad:
                raise ConfigError(f"mounts[{i}].flags: unknown {bad}")
        if not cfg.mounts:
            for target in DEFAULT_MOUNT_TARGETS:
                if os.path.isdir(target):
                    cfg.mounts.append(TmpfsMount(target=target, size_kb=1024, mode="0755"))
                    break
        cfg.stage1_flow = sc.flow
        cfg.namespaces = _plan_namespaces(sc)

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self._cfg()
        if cfg.resolved is None or cfg.stage1_flow is None:
            raise ConfigError("resolved: stage 1 did not fill the engine config")
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.sethostname(name=cfg.resolved.hostname)
        if cfg.resolved.domainname:
            rpc.setdomainname(name=cfg.resolved.domainname)
        for m in cfg.mounts:
            rpc.mount_tmpfs(target=m.target, size_kb=m.size_kb, flags=m.flags, mode=m.mode)
            self._mounted.append(m.target)

    def start_process(self, master_fd: int) -> None:
        cfg = self._cfg()
        env = {"PATH": BASE_PATH, "HOME": "/", **cfg.env}
        if cfg.resolved is not None:
            env["BLIND12_HOSTNAME"] = cfg.resolved.hostname
        env["BLIND12_MOUNTS"] = ":".join(m.target for m in cfg.mounts)
        argv = cfg.argv
        path = argv[0] if "/" in argv[0] else (shutil.which(argv[0], path=BASE_PATH) or argv[0])
        os.execve(path, argv, env)

    def monitor_container(self, pid: int, signals: SignalChannel) -> int:
        return _monitor(pid, signals)

    def cleanup_container(self, ctx: Context, fatal: BaseException | None, status: Any) -> None:
        # The mounts live in the container's mount namespace and go with it: nothing to
        # undo, whatever create_container reached (self._mounted may be empty).
        self._cleaned += 1
        self._mounted.clear()


# --- engine 2: values computed in prepare_config, argv and environment from the config ------


@dataclass
class PayloadPlan(EngineConfig):
    """What stage 1 computed for the later processes."""

    hostname: str = ""
    exe: str = ""
    env: dict[str, str] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    payload_uid: int = -1


@dataclass
class PrecomputeConfig(EngineConfig):
    hostname_prefix: str = "pc"
    extra_env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    plan: PayloadPlan | None = None


class PrecomputeEngine(Operations):
    """Correct: computes hostname, exe path, env in prepare_config and passes them via config."""

    engine_name = "blind12-order-precompute"
    rpc_methods = OrderRPC

    def config(self) -> PrecomputeConfig:
        return PrecomputeConfig()

    def _cfg(self) -> PrecomputeConfig:
        cfg = self.common.engine_config
        assert isinstance(cfg, PrecomputeConfig)
        return cfg

    def _compute_plan(self, sc: Any) -> PayloadPlan:
        cfg = self._cfg()
        if not cfg.argv:
            raise ConfigError("argv: no payload given")
        digest = hashlib.sha256(self.common.container_id.encode()).hexdigest()[:8]
        hostname = _check_hostname(f"{cfg.hostname_prefix}-{digest}", "hostname_prefix")
        exe = cfg.argv[0]
        if "/" not in exe:
            found = shutil.which(exe, path=BASE_PATH)
            if found is None:
                raise ConfigError(f"argv[0]: {exe!r} not found in {BASE_PATH}")
            exe = found
        if not cfg.workdir.startswith("/"):
            raise ConfigError(f"workdir: must be absolute, got {cfg.workdir!r}")
        payload_uid = sc.invoker_uid if sc.flow in ("userns", "suid") else 0
        env = {
            "PATH": BASE_PATH,
            "HOME": "/",
            "BLIND12_ENGINE": self.common.engine_name,
            "BLIND12_CONTAINER": self.common.container_id,
            "BLIND12_FLOW": sc.flow,
            "BLIND12_UID": str(payload_uid),
            **cfg.extra_env,
        }
        return PayloadPlan(
            hostname=hostname, exe=exe, env=env, namespaces=[], payload_uid=payload_uid
        )

    def prepare_config(self, sc: Any) -> None:
        cfg = self._cfg()
        plan = self._compute_plan(sc)
        plan.namespaces = _plan_namespaces(sc)
        cfg.plan = plan

    def _plan(self) -> PayloadPlan:
        plan = self._cfg().plan
        if plan is None or not plan.exe:
            raise ConfigError("plan: missing, prepare_config's result did not arrive")
        return plan

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        plan = self._plan()
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.sethostname(name=plan.hostname)

    def start_process(self, master_fd: int) -> None:
        cfg = self._cfg()
        plan = self._plan()
        os.chdir(cfg.workdir)
        os.execve(plan.exe, cfg.argv, plan.env)

    def monitor_container(self, pid: int, signals: SignalChannel) -> int:
        return _monitor(pid, signals, poll=0.05)

    def cleanup_container(self, ctx: Context, fatal: BaseException | None, status: Any) -> None:
        pass


# --- engine 3: slow but legal work in create_container and post_start_process -------------


@dataclass
class SlowConfig(EngineConfig):
    hostname: str = "blind12-slow"
    steps: int = 4
    step_seconds: float = 0.1
    post_start_seconds: float = 0.3
    cleanup_seconds: float = 0.1


class SlowEngine(Operations):
    """Correct: slow RPC steps in create_container, a slow post_start_process and cleanup."""

    engine_name = "blind12-order-slow"
    rpc_methods = OrderRPC

    def config(self) -> SlowConfig:
        return SlowConfig()

    def init_config(self, common: Any, privileged_stage1: bool) -> None:
        self.common = common
        self._lock = threading.Lock()
        self._steps_done = 0
        self._post_started_at: float | None = None
        self._cleaned = False

    def _cfg(self) -> SlowConfig:
        cfg = self.common.engine_config
        assert isinstance(cfg, SlowConfig)
        return cfg

    def prepare_config(self, sc: Any) -> None:
        cfg = self._cfg()
        _check_hostname(cfg.hostname, "hostname")
        if not 0 <= cfg.steps <= 10:
            raise ConfigError("steps: between 0 and 10")
        for name in ("step_seconds", "post_start_seconds", "cleanup_seconds"):
            value = getattr(cfg, name)
            if not 0 <= value <= 0.5:
                raise ConfigError(f"{name}: between 0 and 0.5 seconds")
        if cfg.steps * cfg.step_seconds > 2.5:
            raise ConfigError("steps, step_seconds: more than 2.5 s in create_container")
        if not cfg.argv:
            raise ConfigError("argv: no payload given")
        _plan_namespaces(sc)

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self._cfg()
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        for step in range(cfg.steps):
            # Slow, but never waiting for the container: only for time (or cancellation).
            if ctx.wait(cfg.step_seconds):
                raise RuntimeError(f"cancelled at step {step}: {ctx.reason}")
            rpc.sethostname(name=f"{cfg.hostname}-{step}")
            with self._lock:
                self._steps_done += 1
        rpc.sethostname(name=cfg.hostname)
        if rpc.gethostname() != cfg.hostname:
            raise RuntimeError("the container's hostname did not stick")

    def start_process(self, master_fd: int) -> None:
        argv = self._cfg().argv
        os.execve(argv[0], argv, {"PATH": BASE_PATH, "BLIND12_SLOW": "1"})

    def post_start_process(self, ctx: Context, pid: int) -> None:
        with self._lock:
            self._post_started_at = time.monotonic()
        ctx.wait(self._cfg().post_start_seconds)
        try:  # the payload may be gone (and reaped) already: that is fine
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                f.read()
        except OSError:
            pass

    def monitor_container(self, pid: int, signals: SignalChannel) -> int:
        return _monitor(pid, signals, poll=0.1)

    def cleanup_container(self, ctx: Context, fatal: BaseException | None, status: Any) -> None:
        with self._lock:
            if self._cleaned:
                return
            self._cleaned = True
        time.sleep(self._cfg().cleanup_seconds)
