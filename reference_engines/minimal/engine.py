"""The reference engine's hooks, in the order the starter calls them (SPEC §2)."""

from __future__ import annotations

import errno
import os
import signal
import socket
from dataclasses import dataclass, field

from kit import system
from kit.contract import ConfigError, Context, EngineConfig, Operations, SignalChannel, WaitStatus
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig, normalize_capability
from kit.system.linux import NAMESPACES, mask_to_caps, read_status
from reference_engines.minimal.rpc import hostname_error, path_error

#: What stage 2 keeps in the root flow unless configured: Docker's default without NET_RAW.
ROOT_DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
]
FORWARDED_SIGNALS = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
)
#: Created unless configured otherwise; the flow adds ``user``.
DEFAULT_NAMESPACES = ["mount", "pid", "uts", "ipc", "net", "cgroup"]
#: The namespaces the RPC methods change: never while they are still the host's.
GUARDED_NAMESPACES = ("mount", "uts")
#: Flows of an unprivileged caller: the container gets a user namespace.
USERNS_FLOWS = ("userns", "fakeroot", "hybrid")
#: Seconds between monitor_container's checks when no signal comes (SIGCHLD wakes it).
MONITOR_POLL = 0.25
MAX_ID = 2**32 - 2


@dataclass
class ReferenceConfig(EngineConfig):
    """User options; every field crosses processes as JSON. ``argv`` is inherited."""

    env: dict[str, str] = field(
        default_factory=lambda: {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/",
        }
    )  # exactly the payload's environment
    cwd: str = "/"
    hostname: str | None = "kit-container"  # None keeps the inherited one
    namespaces: list[str] = field(default_factory=lambda: list(DEFAULT_NAMESPACES))
    capabilities: list[str] | None = None  # None: ROOT_DEFAULT_CAPS for root, else none
    target_uid: int | None = None  # root caller only
    target_gids: list[int] = field(default_factory=list)  # primary first; root only
    mount_proc: bool = True  # a new /proc (needs mount and pid namespaces)
    mount_tmp: bool = True  # a tmpfs /tmp (needs the mount namespace)
    #: Not an option: prepare_config records the host's namespace inodes here, and the RPC
    #: methods refuse to change a namespace still the host's, whatever the starter did.
    host_namespaces: dict[str, int] = field(default_factory=dict)


def validate_config(cfg: ReferenceConfig, sc: StarterConfig) -> list[str]:
    """Check ``cfg`` against the flow and return the capabilities stage 2 keeps; a
    ConfigError's message starts with the offending field."""
    root = sc.flow == "root"
    if cfg.host_namespaces:
        raise ConfigError("host_namespaces: recorded by the engine itself, not a user option")
    if not cfg.argv:
        raise ConfigError("argv: the payload command line is empty")
    for i, arg in enumerate(cfg.argv):
        if "\0" in arg:
            raise ConfigError(f"argv[{i}]: contains a NUL byte")
    if not cfg.argv[0].startswith("/"):
        raise ConfigError(f"argv[0]: the payload path must be absolute, got {cfg.argv[0]!r}")
    for key, value in cfg.env.items():
        if not key or "=" in key or "\0" in key:
            raise ConfigError(f"env: invalid variable name {key!r}")
        if "\0" in value:
            raise ConfigError(f"env.{key}: the value contains a NUL byte")
    if (why := path_error(cfg.cwd)) is not None:
        raise ConfigError(f"cwd: {why}")
    seen: set[str] = set()
    for kind in cfg.namespaces:
        if kind not in NAMESPACES:
            raise ConfigError(
                f"namespaces: unknown namespace {kind!r} "
                f"(known: {', '.join(k for k in NAMESPACES if k != 'user')})"
            )
        if kind == "user":
            raise ConfigError(
                "namespaces: 'user' is chosen by the flow (userns, fakeroot, "
                "hybrid), not by the config"
            )
        if kind in seen:
            raise ConfigError(f"namespaces: {kind!r} is listed twice")
        seen.add(kind)
    if cfg.hostname is not None:
        if (why := hostname_error(cfg.hostname)) is not None:
            raise ConfigError(f"hostname: {why}")
        if "uts" not in seen:
            raise ConfigError(
                "hostname: setting one needs the 'uts' namespace (or set hostname to null)"
            )
    if cfg.mount_proc and not {"mount", "pid"} <= seen:
        raise ConfigError(
            "mount_proc: a new /proc needs the 'mount' and 'pid' namespaces "
            "(or set mount_proc to false)"
        )
    if cfg.mount_tmp and "mount" not in seen:
        raise ConfigError(
            "mount_tmp: a tmpfs /tmp needs the 'mount' namespace (or set mount_tmp to false)"
        )
    if cfg.capabilities is None:  # the default, minus what this host cannot grant
        caps = [c for c in ROOT_DEFAULT_CAPS if c in _host_bounding()] if root else []
    else:
        caps = [normalize_capability(c, "capabilities") for c in cfg.capabilities]
        if caps and not root:
            raise ConfigError(
                f"capabilities: a non-root caller (flow {sc.flow}) keeps no "
                f"capabilities; got {', '.join(caps)}"
            )
        if missing := [c for c in caps if c not in _host_bounding()]:
            raise ConfigError(f"capabilities: {', '.join(missing)} not in this host's bounding set")
    if (cfg.target_uid is not None or cfg.target_gids) and not root:
        raise ConfigError(
            "target_uid/target_gids: only a root caller can choose the "
            f"container's ids (flow {sc.flow})"
        )
    if cfg.target_uid is not None and not 0 <= cfg.target_uid <= MAX_ID:
        raise ConfigError(f"target_uid: {cfg.target_uid} is not a valid uid")
    for gid in cfg.target_gids:
        if not 0 <= gid <= MAX_ID:
            raise ConfigError(f"target_gids: {gid} is not a valid gid")
    return caps


def _host_bounding() -> set[str]:
    """Capability names in this process's bounding set (root's stage 1: the host's)."""
    return set(mask_to_caps(int(read_status()["CapBnd"], 16)))


class ReferenceEngine(Operations):
    """The host-rootfs reference engine. Privileges per flow are SPEC §4's."""

    def config(self) -> ReferenceConfig:
        """Every process, first, with that process's privileges: a fresh config each time."""
        return ReferenceConfig()

    # init_config: the default (store Common on self.common), in every process.

    def prepare_config(self, starter_config: StarterConfig) -> None:
        """Stage 1, before any container namespace exists. root: uid 0, full capabilities;
        suid, hybrid: r=e=s=U, no capabilities; userns, fakeroot: U. Validate, then tell the
        starter what to set up; keep nothing in globals (stage 1 exits)."""
        cfg: ReferenceConfig = self.common.engine_config
        sc = starter_config
        caps = validate_config(cfg, sc)
        host = system.current()
        cfg.host_namespaces = {kind: host.ns_inode(kind) for kind in GUARDED_NAMESPACES}
        namespaces = list(cfg.namespaces)
        if sc.flow in USERNS_FLOWS:
            namespaces.append("user")
            # userns maps U to itself; fakeroot and hybrid map the container's root to U.
            inside = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
            sc.add_uid_mappings([(inside[0], sc.invoker_uid, 1)])
            sc.add_gid_mappings([(inside[1], sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_ns_flags(namespaces)
        if "net" in namespaces:
            sc.set_bring_loopback_interface()
        if "mount" in namespaces:
            sc.set_mount_propagation("rprivate")  # no mount crosses to or from the host
        if cfg.target_uid is not None:
            sc.set_target_uid(cfg.target_uid)
        if cfg.target_gids:
            sc.set_target_gids(cfg.target_gids)
        for kind in ("effective", "permitted", "bounding"):
            sc.set_capabilities(kind, caps)
        if sc.flow != "root":
            sc.set_no_new_privs()  # no setuid binary or file capability raises the payload

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        """Master, while the container process waits. root: uid 0; suid, hybrid: r=e=U,
        saved uid 0, no effective capabilities; userns, fakeroot: in the container's user
        namespace, no host privilege. Privileged work goes through the RPC server only;
        return promptly (stage 2 starts once the kit closes ``rpc_conn``)."""
        cfg: ReferenceConfig = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        if cfg.hostname is not None:
            rpc.sethostname(name=cfg.hostname)
        self.prepare_rootfs(rpc, cfg)

    def prepare_rootfs(self, rpc: RPCClient, cfg: ReferenceConfig) -> None:
        """Master, from create_container: the root the payload sees. Here the host's, with a
        new /proc and a tmpfs /tmp in the container's mount namespace only."""
        if cfg.mount_proc:
            rpc.mount(
                source="proc",
                target="/proc",
                fstype="proc",
                flags=["nosuid", "nodev", "noexec"],
                data=None,
            )
        if cfg.mount_tmp:
            rpc.mount(
                source="tmpfs",
                target="/tmp",
                fstype="tmpfs",
                flags=["nosuid", "nodev"],
                data="mode=1777,size=16m",
            )

    def start_process(self, master_fd: int) -> None:
        """Stage 2, the container process, as the kit left it. root: the target ids (default
        0) and the configured capabilities; suid, userns: U; fakeroot, hybrid: root of the
        user namespace (U on the host); non-root: no capabilities, no_new_privs. Exec the
        payload; never return."""
        cfg: ReferenceConfig = self.common.engine_config
        try:
            os.chdir(cfg.cwd)
        except OSError as exc:
            raise type(exc)(
                exc.errno, f"cwd: cannot enter {cfg.cwd!r} in the container: {exc.strerror}"
            ) from None
        path = cfg.argv[0]
        if not os.path.exists(path):  # a clearer message than execve's bare ENOENT
            raise FileNotFoundError(
                errno.ENOENT, f"payload {path!r} not found in the container's root file system"
            )
        try:
            os.execve(path, cfg.argv, cfg.env)
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot execute payload {path!r}: {exc.strerror}") from None

    def post_start_process(self, ctx: Context, pid: int) -> None:
        """Master, once the payload was exec'd; privileges as create_container."""
        pass  # nothing to do (a statement, so that coverage can see the hook ran)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        """Master, concurrently with create_container; privileges as create_container.
        Forward the usual signals, reap only the container, return its wait status."""
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass  # already gone: waitpid below collects it
            # Never waitpid(-1): the master's other children are the kit's.
            try:
                wpid, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                raise ChildProcessError(
                    errno.ECHILD, f"container process {pid} was reaped by someone else"
                ) from None
            if wpid == pid:
                return status

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        """Master, exactly once, after any partial setup; privileges as create_container."""
        pass  # nothing to undo: the mounts and hostname die with the container's namespaces
