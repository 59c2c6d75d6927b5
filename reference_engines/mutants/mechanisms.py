"""Mutants that break a rule a first mutant already breaks, by another mechanism (issue 14).

A check that looks only where one known mutant acts (the hook's own thread, a library call,
the top level of a config, the path as spelled, the field the rule names) misses the same bug
taken another way. Each mutant here declares its :data:`~.base.MECHANISMS` key; the kill
matrix counts, per requirement, the mechanisms that kill it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kit import linux
from kit.rpc.client import RPCClient
from kit.starter_config import StarterConfig
from kit.system import current
from reference_engines.minimal import ReferenceConfig, ReferenceRPC
from reference_engines.mutants.base import (
    NOBODY, Mutant, on_helper_thread, process_role, thread_setresuid,
)


def _raise_permitted() -> None:
    """The calling thread's permitted capabilities, all made effective (capset acts on the
    calling thread only)."""
    _, permitted, inheritable = current().capabilities()
    current().set_capabilities(permitted, permitted, inheritable)


# --- every thread: helper threads and thread-local raw system calls --------------------------


class MasterHelperThreadCapabilities(Mutant):
    slug = "master-helper-thread-caps"
    bug = ("create_container (setuid master) starts a helper thread that raises every "
           "permitted capability into its effective set and keeps running")
    killed_by = ("PRIV-MASTER-002",)
    flows = ("suid", "hybrid")
    mechanism = "helper-thread"

    def create_container(self, ctx, pid, rpc_conn) -> None:  # type: ignore[override]
        on_helper_thread(_raise_permitted, "mount-helper")
        super().create_container(ctx, pid, rpc_conn)


class MasterHelperThreadRoot(Mutant):
    slug = "master-helper-thread-euid-root"
    bug = ("create_container (setuid master) starts a helper thread that regains effective "
           "uid 0 through the saved uid (raw setresuid, that thread only) and keeps running")
    killed_by = ("PRIV-MASTER-001",)
    flows = ("suid", "hybrid")
    mechanism = "helper-thread"

    def create_container(self, ctx, pid, rpc_conn) -> None:  # type: ignore[override]
        on_helper_thread(lambda: thread_setresuid(-1, 0, -1), "root-helper")
        super().create_container(ctx, pid, rpc_conn)


class MasterHookThreadRawRoot(Mutant):
    slug = "master-raw-setresuid-root"
    bug = ("create_container (setuid master) regains effective uid 0 on its own thread by the "
           "raw setresuid system call (glibc's wrapper would change every thread) and returns "
           "so")
    killed_by = ("PRIV-MASTER-001",)
    flows = ("suid", "hybrid")
    mechanism = "raw-syscall"

    def create_container(self, ctx, pid, rpc_conn) -> None:  # type: ignore[override]
        super().create_container(ctx, pid, rpc_conn)
        thread_setresuid(-1, 0, -1)


class MasterHelperThreadInContainerNet(Mutant):
    slug = "master-helper-thread-in-container-net"
    bug = ("create_container starts a helper thread that joins the container's network "
           "namespace (to configure it) and stays there: the master shares it")
    killed_by = ("NS-003",)
    flows = ("root",)
    mechanism = "helper-thread"

    def create_container(self, ctx, pid, rpc_conn) -> None:  # type: ignore[override]
        on_helper_thread(lambda: current().setns("net", f"/proc/{pid}/ns/net"), "net-helper")
        super().create_container(ctx, pid, rpc_conn)


class Stage1HelperThreadWithoutCapabilities(Mutant):
    slug = "stage1-helper-thread-drops-caps"
    bug = ("prepare_config (root flow) starts a worker thread that drops its effective "
           "capabilities 'for safety' and keeps running: stage 1 no longer has full "
           "capabilities on every thread")
    killed_by = ("PRIV-STAGE1-002",)
    flows = ("root",)
    mechanism = "helper-thread"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)

        def drop() -> None:
            _, permitted, inheritable = current().capabilities()
            current().set_capabilities(0, permitted, inheritable)
        on_helper_thread(drop, "stage1-worker")


class Stage1RawSetresuid(Mutant):
    slug = "stage1-raw-setresuid-nobody"
    bug = ("prepare_config (root flow) switches its own thread to nobody by the raw setresuid "
           "system call, keeping saved uid 0, and returns like that")
    killed_by = ("PRIV-STAGE1-001",)
    flows = ("root",)
    mechanism = "raw-syscall"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        thread_setresuid(NOBODY, NOBODY, 0)


class Stage2HelperThreadAsNobody(Mutant):
    slug = "stage2-helper-thread-nobody"
    bug = ("init_config, in stage 2 (root flow), starts a helper thread that switches itself "
           "to nobody (raw setresuid) and keeps running until the exec")
    killed_by = ("PRIV-STAGE2-001",)
    flows = ("root",)
    mechanism = "helper-thread"

    def init_config(self, common, privileged_stage1) -> None:  # type: ignore[override]
        super().init_config(common, privileged_stage1)
        if process_role() == "stage2" and current().getresuid()[1] == 0:
            on_helper_thread(lambda: thread_setresuid(NOBODY, NOBODY, NOBODY), "io-helper")


class Stage2DropsAPermittedCapability(Mutant):
    slug = "stage2-drops-a-permitted-cap"
    bug = ("init_config, in stage 2 (root flow), drops CAP_KILL from its effective and "
           "permitted sets: stage 2 no longer has exactly the configured capabilities")
    killed_by = ("PRIV-STAGE2-002",)
    flows = ("root",)
    mechanism = "other-field"

    def init_config(self, common, privileged_stage1) -> None:  # type: ignore[override]
        super().init_config(common, privileged_stage1)
        if process_role() == "stage2":
            effective, permitted, inheritable = current().capabilities()
            kill = linux.caps_to_mask(["CAP_KILL"])
            if permitted & kill:
                current().set_capabilities(effective & ~kill, permitted & ~kill, inheritable)


# --- RPC methods: every thread and the whole credential at method entry and return ----------


class HelperThreadRPC(ReferenceRPC):
    """sethostname starts a helper thread with every permitted capability effective."""

    def sethostname(self, name: str) -> None:
        on_helper_thread(_raise_permitted, "rpc-helper")
        super().sethostname(name)


class RPCMethodHelperThreadCapabilities(Mutant):
    slug = "rpc-method-helper-thread-caps"
    bug = ("the RPC method sethostname starts a helper thread that raises every permitted "
           "capability and keeps running: the RPC server has more than CAP_SYS_ADMIN "
           "effective")
    killed_by = ("PRIV-RPC-002",)
    flows = ("suid", "hybrid")
    mechanism = "helper-thread"
    rpc = HelperThreadRPC


class RawRootRPC(ReferenceRPC):
    """sethostname regains effective uid 0 on its thread (raw setresuid) and keeps it."""

    def sethostname(self, name: str) -> None:
        thread_setresuid(-1, 0, -1)
        super().sethostname(name)


class RPCMethodLeavesEffectiveRoot(Mutant):
    slug = "rpc-method-raw-setresuid-root"
    bug = ("the RPC method sethostname (setuid flow) regains effective uid 0 on its own "
           "thread by the raw setresuid system call and does not give it back")
    killed_by = ("PRIV-RPC-001", "PRIV-RPC-004")
    flows = ("suid",)
    mechanism = "raw-syscall"
    rpc = RawRootRPC


class GroupsRPC(ReferenceRPC):
    """sethostname adds a supplementary group to the server and leaves it there."""

    def sethostname(self, name: str) -> None:
        groups = os.getgroups()
        current().setgroups([*groups, NOBODY] if NOBODY not in groups else groups[:-1])
        super().sethostname(name)


class RPCMethodLeavesGroups(Mutant):
    slug = "rpc-method-leaves-groups"
    bug = ("the RPC method sethostname (root flow) changes the server's supplementary groups "
           "and does not restore them: a credential other than the capabilities")
    killed_by = ("PRIV-RPC-004",)
    flows = ("root",)
    mechanism = "other-field"
    rpc = GroupsRPC


# --- the payload: the whole credential start_process must not change -------------------------


class StartProcessAddsAGroup(Mutant):
    slug = "start-process-adds-group"
    bug = ("start_process (root flow) adds a supplementary group before the exec: the payload "
           "runs with a group stage 2 did not have")
    killed_by = ("PRIV-PAYLOAD-003",)
    flows = ("root",)
    mechanism = "other-field"

    def start_process(self, master_fd: int) -> None:
        groups = os.getgroups()
        try:
            current().setgroups([*groups, NOBODY] if NOBODY not in groups else groups[:-1])
        except PermissionError:
            pass  # not root here: nothing to add
        super().start_process(master_fd)


# --- state: nested values ----------------------------------------------------------------------

#: The list every NestedSharedConfig's ``mounts["binds"]`` is.
_SHARED_BINDS: list[str] = []


@dataclass
class NestedSharedConfig(ReferenceConfig):
    #: A fresh dict each time, whose list is the module's: shared one level down.
    mounts: dict[str, list[str]] = field(default_factory=lambda: {"binds": _SHARED_BINDS})


class SharedNestedList(Mutant):
    slug = "config-shared-nested-list"
    bug = ("config() returns a fresh config whose mounts dict is fresh too, but the list in "
           "it is the module's: every config shares it one level down")
    killed_by = ("STATE-001",)
    flows = ("root",)
    mechanism = "nested-value"

    def config(self) -> NestedSharedConfig:
        return NestedSharedConfig()


# --- paths: a symlink on the way ------------------------------------------------------------------


class FollowsSymlinksRPC(ReferenceRPC):
    """mkdir without the reference's walk: a symbolic link on the way is followed, as the host
    resolves it (before pivot_root an absolute link target is a host path)."""

    def mkdir(self, path: str, mode: int) -> None:
        root = self._need_root("mkdir")
        full = os.path.join(root, path.lstrip("/"))
        if os.path.lexists(full):
            raise FileExistsError(f"mkdir: {path!r} already exists")
        current().mkdir(full, mode)


#: Where RPCMethodFollowsSymlink's create_container asks for its cache directory.
CACHE_LINK = "/cache"


class _CacheThroughALink:
    """The RPC client of create_container, which also links /cache to the directory that
    holds the container root (made by then: the engine's ``_root_dir``) and makes a
    directory through that link right after /tmp."""

    def __init__(self, rpc: RPCClient, engine: Any) -> None:
        self._rpc = rpc
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rpc, name)

    def mkdir(self, path: str, mode: int) -> None:
        self._rpc.mkdir(path=path, mode=mode)
        if path == "/tmp":
            outside = os.path.dirname(self._engine._root_dir)
            self._rpc.symlink(target=outside, path=CACHE_LINK)
            self._rpc.mkdir(path=f"{CACHE_LINK}/mutant-cache", mode=0o755)


class RPCMethodFollowsSymlink(Mutant):
    slug = "rpc-follows-symlink"
    bug = ("the RPC method mkdir follows a symbolic link on the way: the cache directory "
           f"create_container asks for under {CACHE_LINK} (a link to a host directory) lands "
           "outside the container root, on the host")
    killed_by = ("CLEAN-001",)
    flows = ("root",)
    mechanism = "symlink"
    rpc = FollowsSymlinksRPC

    def config(self):  # type: ignore[override]
        cfg = super().config()
        cfg.rootfs = "bind"  # the mode with a container root to walk out of
        return cfg

    def _build_bind_root(self, rpc: RPCClient, cfg) -> None:  # type: ignore[override]
        super()._build_bind_root(_CacheThroughALink(rpc, self), cfg)  # type: ignore[arg-type]


MUTANTS = (MasterHelperThreadCapabilities, MasterHelperThreadRoot, MasterHookThreadRawRoot,
           MasterHelperThreadInContainerNet, Stage1HelperThreadWithoutCapabilities,
           Stage1RawSetresuid, Stage2HelperThreadAsNobody, Stage2DropsAPermittedCapability,
           RPCMethodHelperThreadCapabilities, RPCMethodLeavesEffectiveRoot,
           RPCMethodLeavesGroups, StartProcessAddsAGroup, SharedNestedList,
           RPCMethodFollowsSymlink)
