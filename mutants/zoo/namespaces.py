"""Mutants that get the namespaces wrong (SPEC §3, §4, §5): the user namespace and its maps,
the RPC server's namespaces, and work done in the host's namespaces instead of the
container's.

The mutants that change "the host" (its hostname, its mount namespace) refuse to run unless
the host is a sandbox (:func:`mutants.zoo.base.refuse_real_host`), and undo
what they did in cleanup_container, except the one whose bug is not to.
"""

from __future__ import annotations

import os
import socket
import tempfile

from kit.contract import Common, Context, WaitStatus
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig
from kit.system import current
from mutants.zoo.base import Mutant, process_role, refuse_real_host
from reference_engines.bind_rootfs import BindRootfsEngine, BindRootfsRPC
from reference_engines.minimal import ReferenceConfig


class RPCServerOwnMountNamespace(Mutant):
    slug = "rpc-server-own-mount-ns"
    bug = (
        "init_config, in the RPC server, unshares a mount namespace of its own 'to keep "
        "its mounts private': what the RPC methods mount never reaches the container"
    )
    killed_by = ("NS-001",)
    flows = ("root", "suid", "userns", "fakeroot", "hybrid")

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        if process_role() == "rpc":
            current().unshare(["mount"])


class UsernsMapsRoot(Mutant):
    slug = "userns-maps-root"
    bug = (
        "prepare_config maps container root to the invoking user in the userns flow (the "
        "fakeroot mapping) instead of mapping the user to itself"
    )
    killed_by = ("NS-006",)
    flows = ("userns",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        sc = starter_config
        if sc.flow == "userns":
            sc.uid_mappings.clear()
            sc.gid_mappings.clear()
            sc.add_uid_mappings([(0, sc.invoker_uid, 1)])
            sc.add_gid_mappings([(0, sc.invoker_gid, 1)])


class UsernsWithoutNamespaces(Mutant):
    slug = "userns-without-namespaces"
    bug = (
        "prepare_config asks for no namespace at all in the userns flow (no user namespace "
        "either): the container is the invoking user's plain process on the host"
    )
    killed_by = ("NS-007",)
    flows = ("userns",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        if sc.flow != "userns":
            super().prepare_config(sc)
            return
        cfg = self.reference_config()
        cfg.namespaces, cfg.hostname, cfg.mount_proc, cfg.mount_tmp = [], None, False, False
        super().prepare_config(sc)
        sc.set_ns_flags([])
        sc.uid_mappings.clear()
        sc.gid_mappings.clear()


class HybridMapTooWide(Mutant):
    slug = "hybrid-map-too-wide"
    bug = (
        "prepare_config (hybrid flow) maps 65536 container ids from the invoking user's "
        "uid and gid on, as if the user owned the host ids that follow theirs"
    )
    killed_by = ("NS-012",)
    flows = ("hybrid",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        sc = starter_config
        if sc.flow == "hybrid":
            sc.uid_mappings.clear()
            sc.gid_mappings.clear()
            sc.add_uid_mappings([(0, sc.invoker_uid, 65536)])
            sc.add_gid_mappings([(0, sc.invoker_gid, 65536)])


class HostnameInTheHostNamespace(Mutant):
    slug = "host-hostname"
    bug = (
        "create_container sets the hostname from the master, which is in the host's uts "
        "namespace, instead of through the RPC server (it restores it in cleanup)"
    )
    killed_by = ("NS-010",)
    flows = ("root",)

    def __init__(self) -> None:
        super().__init__()
        self._host_hostname: str | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg = self.reference_config()
        if cfg.hostname is not None:
            refuse_real_host(self.slug)
            previous = current().gethostname()
            current().sethostname(cfg.hostname)
            self._host_hostname = previous
            cfg.hostname = None  # done (in the wrong namespace)
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        previous, self._host_hostname = self._host_hostname, None
        if previous is not None:
            current().sethostname(previous)
        super().cleanup_container(ctx, fatal, status)


class MountInTheHostNamespace(Mutant):
    slug = "host-mount"
    bug = (
        "create_container mounts a tmpfs from the master, in the host's mount namespace, to "
        "stage files for the container (it unmounts it in cleanup)"
    )
    killed_by = ("NS-011",)
    flows = ("root",)
    unmount_in_cleanup = True

    def __init__(self) -> None:
        super().__init__()
        self._staging: str | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        refuse_real_host(self.slug)
        path = tempfile.mkdtemp(prefix="mutant-staging-")
        self._staging = path
        current().mount("tmpfs", path, "tmpfs", ["nosuid", "nodev"], "size=64k")
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        path, self._staging = self._staging, None
        if path is not None and self.unmount_in_cleanup:
            current().umount(path, detach=True)
            os.rmdir(path)
        super().cleanup_container(ctx, fatal, status)


class LeavesAMountInTheHostNamespace(MountInTheHostNamespace):
    slug = "leaks-host-mount"
    bug = (
        "create_container mounts a tmpfs in the host's mount namespace and cleanup_container "
        "forgets it: the mount outlives the run"
    )
    killed_by = ("CLEAN-001",)
    mechanism = "other-field"
    unmount_in_cleanup = False


class RPCFollowsDotDot(BindRootfsRPC):
    """mkdir without the bind example's checks: no '..' refusal, no normalisation."""

    def mkdir(self, path: str, mode: int) -> None:
        root = self._need_root("mkdir")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"mkdir: path must be absolute, got {path!r}")
        current().mkdir(os.path.join(root, path.lstrip("/")), mode)


#: The directory RPCMethodFollowsDotDot asks for, relative to the container's /tmp.
CACHE = "/tmp/../../mutant-cache"


class _CacheNextToTmp:
    """The RPC client of create_container, which also asks for a cache directory right after
    making /tmp (the root is pivoted later: then '..' would stop at the new root)."""

    def __init__(self, rpc: RPCClient) -> None:
        self._rpc = rpc

    def __getattr__(self, name: str):
        return getattr(self._rpc, name)

    def mkdir(self, path: str, mode: int) -> None:
        self._rpc.mkdir(path=path, mode=mode)
        if path == "/tmp":
            self._rpc.mkdir(path=CACHE, mode=0o755)


class RPCMethodFollowsDotDot(Mutant, BindRootfsEngine):
    slug = "rpc-follows-dotdot"
    bug = (
        "the RPC method mkdir does not refuse '..': the cache directory create_container "
        f"asks for as {CACHE} lands outside the container root, on the host"
    )
    killed_by = ("CLEAN-001",)
    flows = ("root",)
    rpc = RPCFollowsDotDot

    # The bind example: the engine with a container root to walk out of.
    def prepare_rootfs(self, rpc: RPCClient, cfg: ReferenceConfig) -> None:
        client = _CacheNextToTmp(rpc)
        super().prepare_rootfs(client, cfg)  # type: ignore[arg-type]  # duck-types RPCClient


MUTANTS = (
    RPCServerOwnMountNamespace,
    UsernsMapsRoot,
    UsernsWithoutNamespaces,
    HybridMapTooWide,
    HostnameInTheHostNamespace,
    MountInTheHostNamespace,
    LeavesAMountInTheHostNamespace,
    RPCMethodFollowsDotDot,
)
