"""The reference engine: the smallest engine that follows the whole contract.

Read it hook by hook, in the order the starter calls them (``SPEC.md`` §2; the README next
to this file says which process runs each hook, with which privileges). Every privileged
action goes through the RPC server (methods in :mod:`reference_engines.minimal.rpc`) and the
kit's system interface, never through ctypes.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import stat
import tempfile
from dataclasses import dataclass, field

from kit import system
from kit.contract import (
    ConfigError,
    Context,
    EngineConfig,
    Operations,
    SignalChannel,
    WaitStatus,
)
from kit.linux import CAP_NUMBERS, NAMESPACES
from kit.rpc import RPCClient
from kit.starter_config import StarterConfig, normalize_capability
from reference_engines.minimal.rpc import (
    HOST_BIND_DIRS,
    ROOT_PREFIX,
    hostname_error,
    path_error,
)

#: Capabilities stage 2 keeps in the root flow unless the config says otherwise: Docker's
#: default set without CAP_NET_RAW. Non-root callers keep none.
ROOT_DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                     "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                     "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP"]
#: Signals monitor_container forwards to the container.
FORWARDED_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
                               signal.SIGUSR2})
#: Namespaces created unless the config says otherwise; ``user`` is added by the flow.
DEFAULT_NAMESPACES = ["mount", "pid", "uts", "ipc", "net", "cgroup"]
#: Namespaces the RPC methods change (mounts, the hostname): never while they are the host's.
GUARDED_NAMESPACES = ("mount", "uts")
ROOTFS_MODES = ("host", "bind")
#: Flows whose caller is unprivileged and that get a user namespace.
USERNS_FLOWS = ("userns", "fakeroot", "hybrid")
#: Device nodes bound into the minimal /dev of ``rootfs: "bind"``.
BIND_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
#: Symbolic links of the minimal /dev.
DEV_LINKS = {"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
             "/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2"}
#: How often monitor_container checks the container without a signal (a safety net: SIGCHLD
#: already wakes it up).
MONITOR_POLL = 0.25
MAX_ID = 2**32 - 2


@dataclass
class ReferenceConfig(EngineConfig):
    """User options of the reference engine. Every field crosses processes as JSON (the
    round trip is exact); ``argv`` (inherited) is the payload's command line."""

    #: The payload's environment (exactly this: nothing is inherited from the starter).
    env: dict[str, str] = field(default_factory=lambda: {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/"})
    #: The payload's working directory, inside the container.
    cwd: str = "/"
    #: The container's hostname (needs the uts namespace); None keeps the inherited one.
    hostname: str | None = "kit-container"
    #: ``host``: the host's root with a new /proc and /tmp; ``bind``: a tmpfs root with
    #: read-only binds of the host's /bin, /usr, /lib*, /etc, a minimal /dev, pivot_root.
    rootfs: str = "host"
    #: Namespaces to create (``user`` is decided by the flow, not here).
    namespaces: list[str] = field(default_factory=lambda: list(DEFAULT_NAMESPACES))
    #: Capabilities stage 2 keeps; None = ROOT_DEFAULT_CAPS for root, none otherwise.
    capabilities: list[str] | None = None
    #: uid and gids (primary first) of the payload; root caller only.
    target_uid: int | None = None
    target_gids: list[int] = field(default_factory=list)
    #: Mount a new /proc (needs the pid and mount namespaces).
    mount_proc: bool = True
    #: Mount a tmpfs on /tmp (needs the mount namespace).
    mount_tmp: bool = True
    #: Not a user option: prepare_config records here the inodes of the namespaces stage 1
    #: runs in (the host's), and the RPC methods refuse to change a namespace that is still
    #: the host's, whatever the starter did with the StarterConfig.
    host_namespaces: dict[str, int] = field(default_factory=dict)


def validate_config(cfg: ReferenceConfig, sc: StarterConfig) -> list[str]:
    """Check the user's config against the flow; return the capabilities stage 2 keeps.

    Raises :class:`ConfigError` whose message starts with the offending field.
    """
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
    why = path_error(cfg.cwd)
    if why is not None:
        raise ConfigError(f"cwd: {why}")
    if cfg.rootfs not in ROOTFS_MODES:
        raise ConfigError(f"rootfs: unknown mode {cfg.rootfs!r} "
                          f"(known: {', '.join(ROOTFS_MODES)})")

    seen: set[str] = set()
    for kind in cfg.namespaces:
        if kind not in NAMESPACES:
            raise ConfigError(f"namespaces: unknown namespace {kind!r} "
                              f"(known: {', '.join(k for k in NAMESPACES if k != 'user')})")
        if kind == "user":
            raise ConfigError("namespaces: 'user' is chosen by the flow (userns, fakeroot, "
                              "hybrid), not by the config")
        if kind in seen:
            raise ConfigError(f"namespaces: {kind!r} is listed twice")
        seen.add(kind)
    if cfg.hostname is not None:
        why = hostname_error(cfg.hostname)
        if why is not None:
            raise ConfigError(f"hostname: {why}")
        if "uts" not in seen:
            raise ConfigError("hostname: setting one needs the 'uts' namespace (or set "
                              "hostname to null)")
    if cfg.rootfs == "bind" and "mount" not in seen:
        raise ConfigError("rootfs: 'bind' needs the 'mount' namespace")
    if cfg.mount_proc and not {"mount", "pid"} <= seen:
        raise ConfigError("mount_proc: a new /proc needs the 'mount' and 'pid' namespaces "
                          "(or set mount_proc to false)")
    if cfg.mount_tmp and "mount" not in seen:
        raise ConfigError("mount_tmp: a tmpfs /tmp needs the 'mount' namespace (or set "
                          "mount_tmp to false)")

    if cfg.capabilities is None:
        # The default set, minus what this host cannot grant (never an error).
        caps = [c for c in ROOT_DEFAULT_CAPS if c in _host_bounding()] if root else []
    else:
        caps = [normalize_capability(c, "capabilities") for c in cfg.capabilities]
        if caps and not root:
            raise ConfigError(f"capabilities: a non-root caller (flow {sc.flow}) keeps no "
                              f"capabilities; got {', '.join(caps)}")
        missing = [c for c in caps if c not in _host_bounding()]
        if missing:
            raise ConfigError(f"capabilities: {', '.join(missing)} not in this host's "
                              "bounding set")

    if (cfg.target_uid is not None or cfg.target_gids) and not root:
        raise ConfigError("target_uid/target_gids: only a root caller can choose the "
                          f"container's ids (flow {sc.flow})")
    if cfg.target_uid is not None and not 0 <= cfg.target_uid <= MAX_ID:
        raise ConfigError(f"target_uid: {cfg.target_uid} is not a valid uid")
    for gid in cfg.target_gids:
        if not 0 <= gid <= MAX_ID:
            raise ConfigError(f"target_gids: {gid} is not a valid gid")
    return caps


def _host_bounding() -> set[str]:
    """Capability names in this process's bounding set (root's stage 1: the host's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                mask = int(line.split()[1], 16)
                return {name for name, bit in CAP_NUMBERS.items() if mask >> bit & 1}
    return set()


class ReferenceEngine(Operations):
    """Hooks of the reference engine, in call order."""

    def __init__(self) -> None:
        # Master-only state: the directory create_container made for the bind rootfs.
        self._root_dir: str | None = None

    # -- every process ------------------------------------------------------------------------
    def config(self) -> ReferenceConfig:
        return ReferenceConfig()  # a fresh object every time

    # init_config: the default (store Common on self.common) is all this engine needs.

    # -- stage 1 ------------------------------------------------------------------------------
    def prepare_config(self, starter_config: StarterConfig) -> None:
        """Validate, then ask the starter for namespaces, ids, capabilities and flags."""
        cfg: ReferenceConfig = self.common.engine_config
        sc = starter_config
        caps = validate_config(cfg, sc)
        host = system.current()
        cfg.host_namespaces = {kind: host.ns_inode(kind) for kind in GUARDED_NAMESPACES}

        namespaces = list(cfg.namespaces)
        if sc.flow in USERNS_FLOWS:
            namespaces.append("user")
            # userns maps U to itself; fakeroot and hybrid map container root to U.
            inside_uid = sc.invoker_uid if sc.flow == "userns" else 0
            inside_gid = sc.invoker_gid if sc.flow == "userns" else 0
            sc.add_uid_mappings([(inside_uid, sc.invoker_uid, 1)])
            sc.add_gid_mappings([(inside_gid, sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_ns_flags(namespaces)
        if "net" in namespaces:
            sc.set_bring_loopback_interface()
        if "mount" in namespaces:
            # Nothing the container mounts propagates back to the host, and nothing the host
            # mounts later appears in the container.
            sc.set_mount_propagation("rprivate")
        if cfg.target_uid is not None:
            sc.set_target_uid(cfg.target_uid)
        if cfg.target_gids:
            sc.set_target_gids(cfg.target_gids)
        for kind in ("effective", "permitted", "bounding"):
            sc.set_capabilities(kind, caps)
        if sc.flow != "root":
            sc.set_no_new_privs()  # no setuid binary or file capability can raise privilege

    # -- master ---------------------------------------------------------------------------------
    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        """Prepare the container through the RPC server; never wait for the container."""
        cfg: ReferenceConfig = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        if cfg.hostname is not None:
            rpc.sethostname(name=cfg.hostname)
        if cfg.rootfs == "bind":
            self._build_bind_root(rpc, cfg)
            return
        if cfg.mount_proc:
            rpc.mount(source="proc", target="/proc", fstype="proc",
                      flags=["nosuid", "nodev", "noexec"], data=None)
        if cfg.mount_tmp:
            rpc.mount(source="tmpfs", target="/tmp", fstype="tmpfs",
                      flags=["nosuid", "nodev"], data="mode=1777,size=16m")
        # The kit closes rpc_conn when this returns; the RPC server then exits.

    def _build_bind_root(self, rpc: RPCClient, cfg: ReferenceConfig) -> None:
        # The directory is made here, in the master (the host's mount namespace, as the
        # invoking user), so that cleanup_container, also in the master, can remove it.
        self._root_dir = tempfile.mkdtemp(prefix=ROOT_PREFIX)
        rpc.make_root(path=self._root_dir)
        for path in HOST_BIND_DIRS:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):  # /bin -> usr/bin on merged-/usr systems
                rpc.symlink(target=os.readlink(path), path=path)
            elif stat.S_ISDIR(st.st_mode):
                rpc.mkdir(path=path, mode=0o755)
                rpc.mount(source=path, target=path, fstype=None,
                          flags=["bind", "ro", "nosuid", "nodev"], data=None)
        for path, mode in (("/proc", 0o555), ("/tmp", 0o1777), ("/dev", 0o755)):
            rpc.mkdir(path=path, mode=mode)
        if cfg.mount_proc:
            rpc.mount(source="proc", target="/proc", fstype="proc",
                      flags=["nosuid", "nodev", "noexec"], data=None)
        if cfg.mount_tmp:
            rpc.mount(source="tmpfs", target="/tmp", fstype="tmpfs",
                      flags=["nosuid", "nodev"], data="mode=1777,size=16m")
        rpc.mount(source="tmpfs", target="/dev", fstype="tmpfs",
                  flags=["nosuid", "noexec"], data="mode=0755,size=64k,nr_inodes=64")
        for device in BIND_DEVICES:
            if not os.path.exists(device):
                continue
            rpc.create_file(path=device, mode=0o666)
            rpc.mount(source=device, target=device, fstype=None,
                      flags=["bind", "nosuid", "noexec"], data=None)
        for link, target in DEV_LINKS.items():
            rpc.symlink(target=target, path=link)
        # Built: from now on the root and /dev are read-only (/tmp stays writable).
        rpc.mount(source=None, target="/dev", fstype=None, flags=["bind", "remount", "ro"],
                  data=None)
        rpc.mount(source=None, target="/", fstype=None, flags=["bind", "remount", "ro"],
                  data=None)
        rpc.pivot_root(new_root=self._root_dir)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        pass  # nothing to do once the payload runs

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        """Forward the usual signals to the container; return its wait status."""
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass  # already gone; waitpid below collects it
            # SIGCHLD (or the periodic wake-up): is *our* container done? Reap only it,
            # never waitpid(-1): other children of the master are the kit's.
            try:
                wpid, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                raise ChildProcessError(errno.ECHILD, f"container process {pid} was reaped "
                                        "by someone else") from None
            if wpid == pid:
                return status

    def cleanup_container(self, ctx: Context, fatal: BaseException | None,
                          status: WaitStatus | None) -> None:
        """Remove what create_container made on the host: the bind rootfs directory.

        Mounts need no work: they live in the container's mount namespace and die with it.
        Idempotent and safe after any partial setup (the directory may not exist at all).
        """
        path, self._root_dir = self._root_dir, None
        if path is None:
            return
        try:
            os.rmdir(path)  # empty on the host: the tmpfs was mounted in the container only
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY or os.path.ismount(path):
                raise
            shutil.rmtree(path)  # on the host's filesystem (not a mount point here)

    # -- stage 2 --------------------------------------------------------------------------------
    def start_process(self, master_fd: int) -> None:
        """Exec the payload with the configured environment and working directory."""
        cfg: ReferenceConfig = self.common.engine_config
        try:
            os.chdir(cfg.cwd)
        except OSError as exc:
            raise type(exc)(exc.errno, f"cwd: cannot enter {cfg.cwd!r} in the container: "
                            f"{exc.strerror}") from None
        path = cfg.argv[0]
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, f"payload {path!r} not found in the "
                                    f"container (rootfs {cfg.rootfs!r})")
        try:
            os.execve(path, cfg.argv, cfg.env)
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot execute payload {path!r}: "
                            f"{exc.strerror}") from None
