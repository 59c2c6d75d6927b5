"""An engine whose cleanup breaks after a kit-made failure outside the root flow only."""

from __future__ import annotations

import os

from conformance.cooperation import cooperative
from kit.contract import Context, WaitStatus
from kit.registry import register_operations, register_rpc_methods, registered
from mutants.zoo.cleanup import CleanupNeedsAFullSetup
from reference_engines.minimal import ReferenceRPC

NAME = "mutant-cleanup-needs-full-setup-outside-root"


def _in_the_root_flow() -> bool:
    """The master of the root flow is uid 0 in the initial user namespace; every other
    flow's master is not (suid, hybrid: real uid U; userns, fakeroot: a user namespace)."""
    with open("/proc/self/uid_map") as f:
        identity = f.read().split() == ["0", "0", "4294967295"]
    return identity and os.getresuid() == (0, 0, 0)


class CleanupNeedsAFullSetupOutsideRoot(CleanupNeedsAFullSetup):
    slug = "cleanup-needs-full-setup-outside-root"
    flows = ("userns",)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        if _in_the_root_flow() and not hasattr(self, "_scratch"):
            # in root it copes with a create_container that set nothing up
            super(CleanupNeedsAFullSetup, self).cleanup_container(ctx, fatal, status)
            return
        super().cleanup_container(ctx, fatal, status)


def register() -> None:
    """Register the engine (``--engine=self_check_engines:register``)."""
    if NAME not in registered():
        register_operations(NAME, cooperative(CleanupNeedsAFullSetupOutsideRoot))
        register_rpc_methods(NAME, ReferenceRPC)
