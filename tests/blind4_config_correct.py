"""Blind engines, round 4: legal StarterConfig choices of SPEC §5 (``blind4_config_correct:X``).

Each engine fills the StarterConfig differently from the reference, within what SPEC.md
allows: capabilities inside the container's own user namespace, a capability set left unset
on purpose, a descriptor kept for the payload.
"""

from __future__ import annotations

import os

from kit import system
from kit.starter.config import StarterConfig
from reference_engines.minimal.engine import (
    GUARDED_NAMESPACES,
    ROOT_DEFAULT_CAPS,
    USERNS_FLOWS,
    ReferenceConfig,
    ReferenceEngine,
    validate_config,
)
from reference_engines.minimal.rpc import ReferenceRPC

#: The payload's log descriptor: opened once when the starter imports the engine (before it
#: forks stage 1, so the starter holds it too), close-on-exec until the StarterConfig keeps it.
_LOG_FD = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
LOG_FD_VARIABLE = "BLIND4_LOG_FD"
#: What stage 2 of the root flow holds for itself, and the payload never gets.
STAGE2_ONLY_CAPS = ["CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH"]
NET_BIND = "CAP_NET_BIND_SERVICE"


class RootlessNsCapsEngine(ReferenceEngine):
    """Rootless payloads get capabilities inside their own user namespace, like rootless podman.

    SPEC §5: set_capabilities(kind, names) "for effective/permitted/inheritable/bounding/
    ambient" is the engine's choice; §4 stage 2: fakeroot "uid 0 in ns = U on the host",
    hybrid "as fakeroot", userns "r=e=s=U mapped; no host privilege" (no capability rule);
    the payload: "no host privilege in every flow but root", where "Host privilege means a
    uid 0 ... or any permitted capability while in the host user namespace". In fakeroot and
    hybrid the StarterConfig asks for Docker's default set (effective, permitted, bounding),
    so the container's root keeps them across exec; in userns the payload (U, not root in
    its namespace) gets CAP_NET_BIND_SERVICE through the ambient set (with permitted,
    inheritable, effective and bounding, as the kit's validation requires). Every one of
    these capabilities is over the container's user namespace, never the host's. Legal."""

    engine_name = "blind4-ok-rootless-ns-caps"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        sc = starter_config
        cfg: ReferenceConfig = self.common.engine_config  # type: ignore[assignment]
        if sc.flow not in USERNS_FLOWS or cfg.capabilities is not None:
            return
        if sc.flow == "userns":
            for kind in ("effective", "permitted", "inheritable", "ambient", "bounding"):
                sc.set_capabilities(kind, [NET_BIND])
        else:
            for kind in ("effective", "permitted", "bounding"):
                sc.set_capabilities(kind, ROOT_DEFAULT_CAPS)


class RootStage2OnlyCapsEngine(ReferenceEngine):
    """Root stage 2 holds two capabilities; the bounding set is left unset, so the payload has none.

    SPEC §5: "A capability set the StarterConfig leaves unset is empty when stage 2 execs the
    payload, the bounding set included"; §4 stage 2, root: "caps exactly as configured"; the
    payload: "as the kernel derives from stage 2". In the root flow the engine configures
    effective and permitted (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, for stage 2's own reads
    of the payload whatever its modes) and no bounding, inheritable or ambient set: stage 2
    runs with exactly those, and the kernel gives the uid-0 payload nothing at exec (its
    permitted set comes from the empty bounding set), like ``--cap-drop=ALL``. The other
    flows are the reference's. Legal."""

    engine_name = "blind4-ok-root-stage2-only-caps"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        if sc.flow != "root":
            super().prepare_config(sc)
            return
        # The reference body for the root flow, with its own capability request.
        cfg: ReferenceConfig = self.common.engine_config  # type: ignore[assignment]
        validate_config(cfg, sc)
        host = system.current()
        cfg.host_namespaces = {kind: host.ns_inode(kind) for kind in GUARDED_NAMESPACES}
        namespaces = list(cfg.namespaces)
        sc.set_ns_flags(namespaces)
        if "net" in namespaces:
            sc.set_bring_loopback_interface()
        if "mount" in namespaces:
            sc.set_mount_propagation("rprivate")
        if cfg.target_uid is not None:
            sc.set_target_uid(cfg.target_uid)
        if cfg.target_gids:
            sc.set_target_gids(cfg.target_gids)
        sc.set_capabilities("effective", STAGE2_ONLY_CAPS)
        sc.set_capabilities("permitted", STAGE2_ONLY_CAPS)
        # bounding, inheritable, ambient: unset, so empty at exec (SPEC §5).


class KeptLogFdEngine(ReferenceEngine):
    """The payload inherits a log descriptor the starter opened, through keep_file_descriptor.

    SPEC §5: keep_file_descriptor is one of the setters ("Keep fd open (inheritable) into
    stage 2 and the payload", the kit's docstring), and the starter checks the descriptor
    is open in the starter. Like Apptainer's starter, which opens the container image and
    keeps its descriptor for stage 2, this engine opens a log sink (/dev/null here) when the
    starter imports it, close-on-exec, keeps that descriptor in every flow and tells the
    payload its number in the environment (BLIND4_LOG_FD). The payload holds one more
    descriptor than the reference's: the one the StarterConfig keeps. Legal."""

    engine_name = "blind4-ok-kept-log-fd"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        cfg: ReferenceConfig = self.common.engine_config  # type: ignore[assignment]
        starter_config.keep_file_descriptor(_LOG_FD)
        cfg.env = {**cfg.env, LOG_FD_VARIABLE: str(_LOG_FD)}
