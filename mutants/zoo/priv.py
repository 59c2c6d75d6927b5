"""Privilege mutants (SPEC §4) wrong only on an error path or when a signal is forwarded."""

from __future__ import annotations

import os

from kit.contract import Context, SignalChannel, WaitStatus
from kit.system import current, linux
from mutants.zoo.base import Mutant
from reference_engines.minimal.engine import FORWARDED_SIGNALS, MONITOR_POLL


def _setuid_master() -> bool:
    """The master of the setuid flows (suid, hybrid): an effective uid U and saved uid 0."""
    _ruid, euid, suid = current().getresuid()
    return euid != 0 and suid == 0


def _raise_effective(name: str) -> None:
    """Raise the permitted capability ``name`` into the calling thread's effective set."""
    effective, permitted, inheritable = current().capabilities()
    current().set_capabilities(
        effective | (1 << linux.CAP_NUMBERS[name] & permitted), permitted, inheritable
    )


class CleanupAfterFailureKeepsCapability(Mutant):
    slug = "cleanup-after-failure-keeps-cap"
    bug = (
        "cleanup_container (setuid master) raises CAP_DAC_OVERRIDE to remove a partial setup "
        "only after a fatal error, and returns with it still effective"
    )
    killed_by = ("PRIV-MASTER-002",)
    flows = ("suid", "hybrid")
    mechanism = "other-hook"

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        if fatal is not None and _setuid_master():
            _raise_effective("CAP_DAC_OVERRIDE")
        super().cleanup_container(ctx, fatal, status)


class MonitorForwardingKeepsCapability(Mutant):
    slug = "monitor-forwarding-keeps-cap-kill"
    bug = (
        "monitor_container (setuid master) raises CAP_KILL to forward a signal to the "
        "container and never lowers it: wrong only in a run that forwards a signal"
    )
    killed_by = ("PRIV-MASTER-002",)
    flows = ("suid", "hybrid")
    mechanism = "partial"

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:  # the reference's loop, raising CAP_KILL before it forwards
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                if _setuid_master():
                    _raise_effective("CAP_KILL")
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


MUTANTS: tuple[type[Mutant], ...] = (
    CleanupAfterFailureKeepsCapability,
    MonitorForwardingKeepsCapability,
)
