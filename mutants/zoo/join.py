"""Mutants of the join-only protocol (SPEC §5), built on the suite's cooperating reference
engine (:func:`conformance.cooperation.cooperative`): the bug is in how they answer the
suite's ``conformance_join`` request."""

from __future__ import annotations

from conformance.cooperation import cooperative
from kit.starter.config import StarterConfig
from mutants.zoo.base import Mutant


class _CooperativeMutant(cooperative(Mutant)):  # type: ignore[misc]  # a class made at run time
    """A mutant that already speaks both cooperation protocols (not wrapped again)."""


class JoinOnlyNotRequested(_CooperativeMutant):
    slug = "join-only-not-requested"
    bug = (
        "asked to join namespaces, prepare_config sets the paths but not "
        "set_namespace_join_only: the kit runs create_container and the other master hooks"
    )
    killed_by = ("JOIN-001",)
    flows = ("root", "suid")

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg = self.common.engine_config
        if cfg.conformance_join:
            # Nothing for create_container to do in namespaces it did not create.
            cfg.namespaces, cfg.hostname, cfg.mount_proc, cfg.mount_tmp = [], None, False, False
        super().prepare_config(starter_config)
        starter_config.set_namespace_join_only(False)


class JoinDropsANamespace(_CooperativeMutant):
    slug = "join-drops-a-namespace"
    bug = (
        "asked to join namespaces, prepare_config joins the uts namespace but forgets the "
        "ipc one: stage 2 stays in the host's"
    )
    killed_by = ("JOIN-002",)
    flows = ("root", "suid")

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.namespace_join_only:
            starter_config.ns_paths.pop("ipc", None)


class JoinForgetsNoNewPrivs(_CooperativeMutant):
    slug = "join-forgets-no-new-privs"
    bug = (
        "its join-only branch (joining an instance) takes the instance's settings and "
        "leaves no_new_privs unset: in suid the joined payload may gain privilege by exec"
    )
    killed_by = ("PRIV-STAGE2-003",)
    flows = ("suid",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.namespace_join_only:
            starter_config.set_no_new_privs(False)


class JoinPayloadKeepsAmbient(_CooperativeMutant):
    slug = "join-payload-keeps-ambient"
    bug = (
        "its join-only branch copies the instance's capabilities into the StarterConfig, "
        "ambient set included: the joined payload has CAP_NET_BIND_SERVICE in suid"
    )
    killed_by = ("PRIV-PAYLOAD-001",)
    flows = ("suid",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.namespace_join_only:
            for kind in ("permitted", "inheritable", "ambient"):
                starter_config.set_capabilities(kind, ["CAP_NET_BIND_SERVICE"])


MUTANTS = (
    JoinOnlyNotRequested,
    JoinDropsANamespace,
    JoinForgetsNoNewPrivs,
    JoinPayloadKeepsAmbient,
)
