"""Privilege mutants (SPEC §4) the suite let through: error paths, signals, exec, stage 1."""

from __future__ import annotations

import os

from kit.contract import Context, SignalChannel, WaitStatus
from kit.starter.config import StarterConfig
from kit.system import current, linux
from mutants.zoo.base import Mutant, raise_effective
from reference_engines.minimal.engine import FORWARDED_SIGNALS, MONITOR_POLL

#: prctl(2) PR_SET_SECUREBITS, and the bit that makes exec ignore uid 0 for capabilities.
PR_SET_SECUREBITS = 28
SECBIT_NOROOT = 1 << 0


def _setuid_master() -> bool:
    """The master of the setuid flows (suid, hybrid): an effective uid U and saved uid 0."""
    _ruid, euid, suid = current().getresuid()
    return euid != 0 and suid == 0


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
            raise_effective("CAP_DAC_OVERRIDE")
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
                    raise_effective("CAP_KILL")
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class StartProcessSetsNoRoot(Mutant):
    slug = "start-process-noroot"
    bug = (
        "start_process (root flow) 'hardens' the payload with SECBIT_NOROOT before the exec: "
        "the uid-0 payload gets none of the capabilities stage 2 was configured with"
    )
    killed_by = ("PRIV-PAYLOAD-003",)
    flows = ("root",)
    mechanism = "other-field"

    def start_process(self, master_fd: int) -> None:
        try:
            linux.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT)
        except OSError:
            pass  # no CAP_SETPCAP (or the fake backend): nothing to harden
        super().start_process(master_fd)


class StartProcessDropsBounding(Mutant):
    slug = "start-process-drops-bounding"
    bug = (
        "start_process (root flow) drops CAP_MKNOD from the bounding set before the exec: the "
        "payload lacks a capability stage 2 was configured with"
    )
    killed_by = ("PRIV-PAYLOAD-003",)
    flows = ("root",)
    mechanism = "direct"

    def start_process(self, master_fd: int) -> None:
        try:
            linux.bounding_drop(linux.CAP_NUMBERS["CAP_MKNOD"])
        except OSError:
            pass  # no CAP_SETPCAP (or the fake backend): nothing to drop
        super().start_process(master_fd)


class Stage1DropsCapabilityEverywhere(Mutant):
    slug = "stage1-drops-cap-everywhere"
    bug = (
        "prepare_config (root flow) drops CAP_NET_RAW 'early' from its bounding, permitted and "
        "effective sets alike: the sets still agree, but stage 1 no longer has full capabilities"
    )
    killed_by = ("PRIV-STAGE1-002",)
    flows = ("root",)
    mechanism = "other-field"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.flow == "root":
            drop = 1 << linux.CAP_NUMBERS["CAP_NET_RAW"]
            current().limit_bounding(~drop & (1 << linux.cap_last() + 1) - 1)
            effective, permitted, inheritable = current().capabilities()
            current().set_capabilities(effective & ~drop, permitted & ~drop, inheritable & ~drop)


MUTANTS: tuple[type[Mutant], ...] = (
    CleanupAfterFailureKeepsCapability,
    MonitorForwardingKeepsCapability,
    StartProcessSetsNoRoot,
    StartProcessDropsBounding,
    Stage1DropsCapabilityEverywhere,
)
