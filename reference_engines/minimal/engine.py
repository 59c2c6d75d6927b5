"""The reference engine: the smallest engine that follows the whole contract.

Read it hook by hook, in the order the starter calls them (``SPEC.md`` §2). Every privileged
action goes through the RPC server (methods in :mod:`reference_engines.minimal.rpc`) and the
kit's system interface, never through ctypes.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass, field

from kit.contract import (
    ConfigError, Context, EngineConfig, Operations, SignalChannel, WaitStatus,
)
from kit.rpc import RPCClient
from kit.starter_config import StarterConfig, normalize_capability

#: Capabilities stage 2 keeps in the root flow unless the config says otherwise.
ROOT_DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                     "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                     "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP"]
#: Signals monitor_container forwards to the container.
FORWARDED_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
                     signal.SIGUSR2}
DEFAULT_NAMESPACES = ["mount", "pid", "uts", "ipc", "net", "cgroup"]
HOSTNAME_MAX = 64


@dataclass
class ReferenceConfig(EngineConfig):
    """User options of the reference engine (every field crosses processes as JSON)."""

    env: dict[str, str] = field(default_factory=lambda: {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/"})
    cwd: str = "/"
    hostname: str = "kit-container"
    namespaces: list[str] = field(default_factory=lambda: list(DEFAULT_NAMESPACES))
    #: Capabilities stage 2 keeps; None = none for a non-root caller, ROOT_DEFAULT_CAPS for root.
    capabilities: list[str] | None = None
    target_uid: int | None = None
    target_gids: list[int] = field(default_factory=list)
    mount_proc: bool = True
    mount_tmp: bool = True


class ReferenceEngine(Operations):
    """Hooks of the reference engine, in call order."""

    # -- every process ------------------------------------------------------------------------
    def config(self) -> ReferenceConfig:
        return ReferenceConfig()  # a fresh object every time

    # init_config: the default (store Common on self.common) is all this engine needs.

    # -- stage 1 ------------------------------------------------------------------------------
    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg: ReferenceConfig = self.common.engine_config
        sc = starter_config
        if not cfg.argv:
            raise ConfigError("argv: the payload command line is empty")
        if not cfg.argv[0].startswith("/"):
            raise ConfigError(f"argv[0]: the payload path must be absolute, got {cfg.argv[0]!r}")
        if not cfg.cwd.startswith("/"):
            raise ConfigError(f"cwd: must be an absolute path, got {cfg.cwd!r}")
        if not 0 < len(cfg.hostname) <= HOSTNAME_MAX:
            raise ConfigError(f"hostname: must be 1 to {HOSTNAME_MAX} characters, got "
                              f"{len(cfg.hostname)}")
        for kind in cfg.namespaces:
            if kind == "user":
                raise ConfigError("namespaces: 'user' is chosen by the flow, not the config")
        caps = cfg.capabilities
        if caps is None:
            caps = ROOT_DEFAULT_CAPS if sc.flow == "root" else []
        caps = [normalize_capability(c, "capabilities") for c in caps]
        if (cfg.target_uid is not None or cfg.target_gids) and sc.flow != "root":
            raise ConfigError("target_uid/target_gids: only a root caller can choose the "
                              f"container's ids (flow {sc.flow})")

        namespaces = list(cfg.namespaces)
        if sc.flow in ("userns", "fakeroot", "hybrid"):
            namespaces.append("user")
            inside = sc.invoker_uid if sc.flow == "userns" else 0
            inside_gid = sc.invoker_gid if sc.flow == "userns" else 0
            sc.add_uid_mappings([(inside, sc.invoker_uid, 1)])
            sc.add_gid_mappings([(inside_gid, sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_ns_flags(namespaces)
        if "net" in namespaces:
            sc.set_bring_loopback_interface()
        sc.set_mount_propagation("rprivate")
        if cfg.target_uid is not None:
            sc.set_target_uid(cfg.target_uid)
        if cfg.target_gids:
            sc.set_target_gids(cfg.target_gids)
        for kind in ("effective", "permitted", "bounding"):
            sc.set_capabilities(kind, caps)
        if sc.flow != "root":
            sc.set_no_new_privs()

    # -- master ---------------------------------------------------------------------------------
    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg: ReferenceConfig = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        if "uts" in cfg.namespaces:
            rpc.sethostname(name=cfg.hostname)
        if "mount" in cfg.namespaces:
            if cfg.mount_proc and "pid" in cfg.namespaces:
                rpc.mount(source="proc", target="/proc", fstype="proc",
                          flags=["nosuid", "nodev", "noexec"], data=None)
            if cfg.mount_tmp:
                rpc.mount(source="tmpfs", target="/tmp", fstype="tmpfs",
                          flags=["nosuid", "nodev"], data="mode=1777,size=16m")
        # The kit closes rpc_conn when this returns; never wait for the container here.

    def post_start_process(self, ctx: Context, pid: int) -> None:
        pass  # nothing to do once the payload runs

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=0.5)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            # SIGCHLD (or the periodic wake-up) → is *our* container done? Reap only it.
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status

    def cleanup_container(self, ctx: Context, fatal: BaseException | None,
                          status: WaitStatus | None) -> None:
        pass  # every mount lives in the container's mount namespace and dies with it

    # -- stage 2 --------------------------------------------------------------------------------
    def start_process(self, master_fd: int) -> None:
        cfg: ReferenceConfig = self.common.engine_config
        os.chdir(cfg.cwd)
        os.execve(cfg.argv[0], cfg.argv, cfg.env)
