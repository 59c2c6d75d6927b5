"""Buggy engines for the StarterConfig/namespaces theme (SPEC §3, §4, §5).

Written blind, from /work/shared/SPEC.md and the kit's public API alone (not from the
conformance checks, the mutants or any other engine). Each engine subclasses one of the
correct engines of ``blind12_ns_correct`` and breaks exactly one rule; every run still
completes and the payload runs.
"""

from __future__ import annotations

import os

from blind12_ns_correct import NsCapsPerFlow, NsFdConfig, NsTargetIds


class BugSuidNoNoNewPrivs(NsTargetIds):
    """suid stage 2 lacks no_new_privs (§4): only user-namespace flows set it.

    The engine reasons that no_new_privs only matters inside a user namespace and sets it
    there alone; in the suid flow the payload (r=e=s=U in the host user namespace) can
    exec a setuid-root binary and regain uid 0. Shows in suid only (root needs none; the
    three user-namespace flows still set it).
    """

    engine_name = "blind12-ns-suid-no-nnp"

    def prepare_config(self, sc) -> None:
        super().prepare_config(sc)
        if sc.flow == "suid":
            sc.set_no_new_privs(False)


class BugSuidAmbientCap(NsCapsPerFlow):
    """suid payload gets an ambient capability in the host user ns: host privilege (§4/§5).

    The engine treats every flow whose payload runs as U alike and gives the suid payload
    the same ambient CAP_NET_BIND_SERVICE (with inheritable, permitted, bounding) as the
    userns payload; in suid that capability survives the exec in the host user namespace,
    so the payload holds host privilege. Shows in suid only.
    """

    engine_name = "blind12-ns-suid-ambient"

    def _caps_for(self, sc) -> dict[str, list[str]]:
        caps = list(self.common.engine_config.capabilities)
        if sc.flow in ("suid", "userns"):
            return {
                k: caps for k in ("bounding", "permitted", "effective", "inheritable", "ambient")
            }
        return super()._caps_for(sc)


class BugHybridUidMapTooWide(NsTargetIds):
    """hybrid uid map is 0→U with size 2, so host uid U+1 is mapped too (§3 fakeroot map).

    An off-by-one in the map size: the privileged hybrid master writes ``0 U 2`` instead
    of ``0 U 1``, handing the container uid 1 = host uid U+1, a uid that is neither U nor
    one of U's subordinate ids. The gid map stays right. Shows in hybrid only (an
    unprivileged fakeroot starter cannot write such a map, so it keeps size 1 there).
    """

    engine_name = "blind12-ns-hybrid-wide-uidmap"

    def _user_namespace_maps(self, sc) -> tuple[list, list]:
        uids, gids = super()._user_namespace_maps(sc)
        if sc.flow == "hybrid":
            inside, outside, size = uids[0]
            uids[0] = (inside, outside, size + 1)
        return uids, gids


class BugUsernsForgetsIpc(NsFdConfig):
    """userns/fakeroot create no ipc namespace: the master shares the container's (§4).

    The namespace list is rebuilt for the user-namespace flows and ``ipc`` is left out, so
    the container keeps the ipc namespace it was started in, the master's (the host's). The
    hybrid flow still gets one. Shows in userns and fakeroot.
    """

    engine_name = "blind12-ns-userns-no-ipc"

    def _namespaces(self, sc) -> list[str]:
        kinds = super()._namespaces(sc)
        if sc.flow in ("userns", "fakeroot"):
            kinds = [k for k in kinds if k != "ipc"]
        return kinds


class BugSharedPropagation(NsFdConfig):
    """Mount propagation rshared lets the container's tmpfs reach the host's mounts (§5/§11).

    The engine asks ``rshared`` instead of ``rslave`` for / of its new mount namespace;
    where / of the host is a shared mount, the tmpfs create_container mounts on the scratch
    directory propagates back into the host's mount namespace while the run lasts. Shows in
    the flows whose mount namespace is owned by the host user namespace (root, suid) when
    the host's / is shared; the user-namespace flows' copies are reduced to slaves.
    """

    engine_name = "blind12-ns-rshared"
    propagation = "rshared"


class BugJoinsMasterNet(NsTargetIds):
    """Joins the master's network namespace by path: the master shares net with it (§4).

    A "host networking" shortcut: in the flows whose container side is privileged in the
    host user namespace (root, suid) stage 1 asks set_ns_path("net",
    /proc/<starter>/ns/net), the starter that becomes the master; join wins over create,
    so stage 2 and the RPC server share the master's net namespace. Shows in root and suid.
    """

    engine_name = "blind12-ns-join-master-net"
    escapes = (
        "joining the master's network namespace shares it exactly as an engine that asks "
        "for no network namespace does (upstream's default, host networking), which "
        "NS-003 allows: it reads §4's \"the master shares none of pid/net/uts/ipc/cgroup "
        "with them\" for the kinds created for the container, else the reference engine "
        "(no cgroup namespace) and every engine sharing the host's network would fail too"
    )

    def prepare_config(self, sc) -> None:
        super().prepare_config(sc)
        if sc.flow in ("root", "suid"):
            sc.set_ns_path("net", f"/proc/{os.getppid()}/ns/net")
