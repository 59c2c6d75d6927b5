"""Mutants from blind engines written against SPEC §2, §3 and §5 alone (processes and order,
flows, namespaces and StarterConfig): each escaped the suite before its check was fixed."""

from __future__ import annotations

import os
import threading
import time

from conformance.cooperation import cooperative
from kit import system
from kit.contract import Context, SignalChannel, WaitStatus
from kit.starter.config import StarterConfig
from mutants.zoo.base import Mutant


class CleanupFromMonitor(Mutant):
    slug = "ns-cleanup-from-monitor"
    bug = (
        "monitor_container calls cleanup_container itself when the container was killed by a "
        "signal, and the kit calls it again: two cleanups in one master run"
    )
    killed_by = ("ORDER-011",)
    mechanism = "other-hook"
    flows = ("root", "suid", "userns", "fakeroot", "hybrid")

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        status = super().monitor_container(pid, signals)
        if os.WIFSIGNALED(status):
            self.cleanup_container(Context(), None, status)
        return status


class PostStartAgainAfterSignal(Mutant):
    slug = "ns-post-start-again-after-signal"
    bug = (
        "monitor_container re-runs post_start_process (to re-arm its watchers) when the "
        "container died of a signal: a second post_start_process, in the monitor's thread"
    )
    killed_by = ("ORDER-009",)
    mechanism = "partial"
    flows = ("root", "suid", "userns", "fakeroot", "hybrid")

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        status = super().monitor_container(pid, signals)
        if os.WIFSIGNALED(status):
            self.post_start_process(Context(), pid)
        return status


class UsernsGidMapRoot(Mutant):
    slug = "ns-userns-gid-map-root"
    bug = (
        "in the userns flow the uid map is U to U, but the gid map, copied from the fakeroot "
        "branch, maps the container's gid 0 to U's gid"
    )
    killed_by = ("NS-006",)
    mechanism = "partial"
    flows = ("userns",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.flow == "userns":
            starter_config.gid_mappings[:] = [[0, starter_config.invoker_gid, 1]]


class RootFlowUserns(Mutant):
    slug = "ns-root-flow-userns"
    bug = (
        "a rootless-first engine asks for a user namespace in every flow, the root flow "
        "included (identity maps): the master and the container leave the host's"
    )
    killed_by = ("NS-004", "NS-007")
    flows = ("root",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.flow == "root":
            starter_config.set_ns_flags([*starter_config.ns_flags, "user"])
            starter_config.add_uid_mappings([(0, 0, 2**32 - 1)])
            starter_config.add_gid_mappings([(0, 0, 2**32 - 1)])
            starter_config.set_allow_setgroups()  # else stage 2's setgroups fails


class JoinSkipsNet(cooperative(Mutant)):  # type: ignore[misc]  # a class made at run time
    slug = "ns-join-skips-net"
    bug = (
        "asked to join namespaces, prepare_config leaves the network to a network plugin "
        "and drops the net join: stage 2 stays in the host's net namespace"
    )
    killed_by = ("JOIN-002",)
    mechanism = "other-field"
    flows = ("root", "suid")

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.namespace_join_only:
            starter_config.ns_paths.pop("net", None)


class _StartProcessUnshares(Mutant):
    """Stage 2 (root flow, given CAP_SYS_ADMIN for it) unshares ``kind`` before exec."""

    kind: str = ""
    flows = ("root",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        for caps in ("effective", "permitted", "bounding"):
            names = starter_config.capabilities[caps] or []
            starter_config.set_capabilities(caps, [*names, "CAP_SYS_ADMIN"])

    def start_process(self, master_fd: int) -> None:
        system.current().unshare([self.kind])
        super().start_process(master_fd)


class StartProcessOwnCgroupNs(_StartProcessUnshares):
    slug = "ns-start-process-own-cgroup-ns"
    bug = (
        "start_process creates the cgroup namespace itself, last, so that the payload sees "
        "its cgroup as /: the payload leaves the namespaces the RPC server prepared"
    )
    killed_by = ("NS-013",)
    kind = "cgroup"


class StartProcessOwnUtsNs(_StartProcessUnshares):
    slug = "ns-start-process-own-uts-ns"
    bug = (
        "start_process gives the payload a uts namespace of its own (so its hostname changes "
        "stay private): the payload leaves the one the RPC server set the hostname in"
    )
    killed_by = ("NS-013",)
    mechanism = "other-field"
    kind = "uts"


class LateNamespaceProbe(Mutant):
    slug = "ns-late-namespace-probe"
    bug = (
        "prepare_config probes cgroup-namespace support on a helper thread that adds 'cgroup' "
        "to the namespace flags after prepare_config returned: the request never reaches the "
        "starter, and the master shares the container's cgroup namespace"
    )
    killed_by = ("NS-003",)
    mechanism = "helper-thread"
    flows = ("root",)
    gap = (
        "NS-003 checks the namespaces the StarterConfig creates (conformance/README.md, known "
        "limits): SPEC §4 says the master shares none of pid/net/uts/ipc/cgroup, but an engine "
        "may choose to create fewer, and the ledger cannot tell a lost request from a choice"
    )

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        flags = [k for k in starter_config.ns_flags if k != "cgroup"]
        starter_config.set_ns_flags(flags)

        def probe() -> None:
            time.sleep(1.0)  # stage 1 has handed its StarterConfig over long before
            if os.path.exists("/proc/self/ns/cgroup"):
                starter_config.set_ns_flags([*flags, "cgroup"])

        threading.Thread(target=probe, daemon=True).start()


MUTANTS = (
    CleanupFromMonitor,
    PostStartAgainAfterSignal,
    UsernsGidMapRoot,
    RootFlowUserns,
    JoinSkipsNet,
    StartProcessOwnCgroupNs,
    StartProcessOwnUtsNs,
    LateNamespaceProbe,
)
