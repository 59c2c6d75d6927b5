"""Blind engines for SPEC §2, §3 and §5: the reference engine with one namespace/order bug each."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from conformance.cooperation import cooperative
from kit import system
from kit.contract import Context
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig
from mutants.zoo import ns as zoo_ns
from reference_engines.minimal.engine import (
    GUARDED_NAMESPACES,
    USERNS_FLOWS,
    ReferenceConfig,
    ReferenceEngine,
    validate_config,
)
from reference_engines.minimal.rpc import ReferenceRPC


def _prepare(
    engine: ReferenceEngine,
    sc: StarterConfig,
    *,
    gid_inside: int | None = None,
    user_in_root: bool = False,
    drop: tuple[str, ...] = (),
    propagation: str = "rprivate",
) -> list[str]:
    """The reference prepare_config with the knobs the engines below turn; returns the
    namespaces it asked for."""
    cfg: ReferenceConfig = engine.common.engine_config
    caps = validate_config(cfg, sc)
    host = system.current()
    cfg.host_namespaces = {kind: host.ns_inode(kind) for kind in GUARDED_NAMESPACES}
    namespaces = [k for k in cfg.namespaces if k not in drop]
    if sc.flow in USERNS_FLOWS:
        namespaces.append("user")
        inside = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
        sc.add_uid_mappings([(inside[0], sc.invoker_uid, 1)])
        sc.add_gid_mappings([(inside[1] if gid_inside is None else gid_inside, sc.invoker_gid, 1)])
    elif user_in_root and sc.flow == "root":
        namespaces.append("user")
        sc.add_uid_mappings([(0, 0, 2**32 - 1)])
        sc.add_gid_mappings([(0, 0, 2**32 - 1)])
        sc.set_allow_setgroups()  # else the kit's setgroups in stage 2 fails
    if sc.flow == "hybrid":
        sc.set_hybrid_workflow()
    sc.set_ns_flags(namespaces)
    if "net" in namespaces:
        sc.set_bring_loopback_interface()
    if "mount" in namespaces:
        sc.set_mount_propagation(propagation)
    if cfg.target_uid is not None:
        sc.set_target_uid(cfg.target_uid)
    if cfg.target_gids:
        sc.set_target_gids(cfg.target_gids)
    for kind in ("effective", "permitted", "bounding"):
        sc.set_capabilities(kind, caps)
    if sc.flow != "root":
        sc.set_no_new_privs()
    return namespaces


class RootFlowUserns(ReferenceEngine):
    """SPEC §3 (flow table, root: "user namespace: none") and §4 ("the master's user ns is
    the host's in root/suid/hybrid"): a "rootless-first" engine that always asks for a user
    namespace, with an identity map in the root flow."""

    engine_name = "blind-root-flow-userns"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        _prepare(self, starter_config, user_in_root=True)


class UsernsGidMapRoot(ReferenceEngine):
    """SPEC §3 (userns: "map U→U"): the uid map is U→U but the gid map, copied from the
    fakeroot branch, maps the container's gid 0 to U's gid."""

    engine_name = "blind-userns-gid-map-root"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        _prepare(self, starter_config, gid_inside=0)


class StartProcessUnsharesCgroup(ReferenceEngine):
    """SPEC §5 ("cgroup ... created in the container side", in order before mount) and §4
    ("stage 2 and the RPC server share all seven namespace inodes"): stage 2 makes its own
    cgroup namespace just before exec (so the payload sees its cgroup as /), best effort."""

    engine_name = "blind-start-process-unshares-cgroup"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.flow == "root":  # stage 2 needs CAP_SYS_ADMIN for the unshare
            for kind in ("effective", "permitted", "bounding"):
                caps = starter_config.capabilities[kind] or []
                starter_config.set_capabilities(kind, [*caps, "CAP_SYS_ADMIN"])

    def start_process(self, master_fd: int) -> None:
        try:
            system.current().unshare(["cgroup"])
        except OSError:
            pass  # without CAP_SYS_ADMIN: keep the starter's
        super().start_process(master_fd)


class StateInConfigAttribute(ReferenceEngine):
    """SPEC §2 rule 3 ("Only JSON-visible fields of the engine config cross from stage 1 to
    later processes"): prepare_config records a decision in a non-field attribute of the
    config, create_container reads it with a default, so the hostname is never set."""

    engine_name = "blind-state-in-config-attribute"
    escapes = (
        "the lost decision only skips the engine's own sethostname: which hostname the engine "
        "meant to set is its own config, of which no requirement speaks, and rule 3 itself is "
        "kept (the attribute does not cross)"
    )
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        cfg = self.common.engine_config
        cfg._set_hostname = cfg.hostname is not None  # type: ignore[attr-defined]

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg: ReferenceConfig = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        if getattr(cfg, "_set_hostname", False) and cfg.hostname is not None:
            rpc.sethostname(name=cfg.hostname)
        self.prepare_rootfs(rpc, cfg)


class CleanupFromMonitor(zoo_ns.CleanupFromMonitor):
    """SPEC §2 rule 7 ("cleanup_container runs exactly once per master run"): the monitor
    cleans up itself when the container was killed by a signal, then the kit does again."""

    engine_name = "blind-cleanup-from-monitor"
    rpc_methods = ReferenceRPC


class StartProcessForksPayload(ReferenceEngine):
    """SPEC §1/§2 ("start_process ... becomes the payload: it must exec or exit"; rule 6
    "post_start_process runs ... only after a successful exec"; rule 9 the container's pid):
    a tini-like stage 2 that forks the payload and waits for it as pid 1."""

    engine_name = "blind-start-process-forks-payload"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd: int) -> None:
        child = os.fork()
        if child == 0:
            try:
                super().start_process(master_fd)
            finally:
                os._exit(127)
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


class LateNamespaceProbe(ReferenceEngine):
    """SPEC §5 ("Each is either created (a flag) or joined") with §4 ("the master shares none
    of pid/net/uts/ipc/cgroup with them"): prepare_config probes cgroup-namespace support on a
    helper thread that adds the flag after prepare_config returned: the request is lost."""

    engine_name = "blind-late-namespace-probe"
    escapes = (
        "NS-003 checks the namespaces the StarterConfig creates: a request lost after "
        "prepare_config returned looks like a choice to create fewer (the zoo's known survivor "
        "ns-late-namespace-probe gives the reason)"
    )
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        namespaces = _prepare(self, starter_config, drop=("cgroup",))

        def probe() -> None:
            time.sleep(0.2)
            if os.path.exists("/proc/self/ns/cgroup"):
                starter_config.set_ns_flags([*namespaces, "cgroup"])

        threading.Thread(target=probe, daemon=True).start()


_JOINABLE = ("mount", "net", "uts", "ipc")


class JoinKnownKindsOnly(cooperative(ReferenceEngine, faults=False)):  # type: ignore[misc]
    """SPEC §5 ("Each is either created (a flag) or joined (a path)" over all seven kinds):
    a join-only engine that honours only the kinds it knows how to join (mount, net, uts,
    ipc) and silently drops pid, user and cgroup joins."""

    engine_name = "blind-join-known-kinds-only"
    escapes = (
        "the join scenario asks to join uts, ipc and net only (the kinds the kit's host sandbox "
        "lets a run join): pid, user and cgroup joins, the ones this engine drops, are never "
        "asked for"
    )
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        ReferenceEngine.prepare_config(self, starter_config)
        paths = getattr(self.common.engine_config, "conformance_join", None) or {}
        if paths:
            starter_config.set_ns_flags([])
            for kind, path in paths.items():
                if kind in _JOINABLE:
                    starter_config.set_ns_path(kind, path)
            starter_config.set_namespace_join_only()
            starter_config.set_bring_loopback_interface(False)


class PrivateNotRecursive(ReferenceEngine):
    """SPEC §5 (set_mount_propagation) with §11 ("mounts (and their options and propagation)"
    of the host unchanged, mount table not even while it runs): "private" instead of
    "rprivate", so submounts of / stay shared with the host."""

    engine_name = "blind-private-not-recursive"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        _prepare(self, starter_config, propagation="private")


class JoinSkipsNet(cooperative(ReferenceEngine, faults=False)):  # type: ignore[misc]
    """SPEC §5 ("Each is either created (a flag) or joined (a path)"): a join-only engine
    that leaves the network to a (missing) network plugin and drops a net join."""

    engine_name = "blind-join-skips-net"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        starter_config.ns_paths.pop("net", None)


class StartWaiterAgainAfterSignal(zoo_ns.PostStartAgainAfterSignal):
    """SPEC §2 rule 6 ("post_start_process runs at most once"): the monitor re-runs the
    post-start work when the container died of a signal (to re-arm its watchers)."""

    engine_name = "blind-post-start-again-after-signal"
    rpc_methods = ReferenceRPC


class MonitorWaitsForCreate(ReferenceEngine):
    """SPEC §2 rule 4 ("create_container, the start waiter and monitor_container ... run
    concurrently"): monitor_container waits until create_container finished its work before
    it starts watching (to read state create_container sets up)."""

    engine_name = "blind-monitor-waits-for-create"
    rpc_methods = ReferenceRPC

    def init_config(self, common: Any, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        self._created = threading.Event()

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        self._created.set()

    def monitor_container(self, pid: int, signals: Any) -> int:
        self._created.wait()
        return super().monitor_container(pid, signals)


class SharedPropagation(ReferenceEngine):
    """SPEC §5 (set_mount_propagation) with §11 (the host's mount table unchanged while a run
    lasts): "rshared", so that mounts made later on the host reach the container."""

    engine_name = "blind-shared-propagation"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        _prepare(self, starter_config, propagation="rshared")
