"""Mutants found by writing engines blind, round 2, from SPEC §1, §2, §6, §7 and §8: the order
of hooks, the RPC connection, signals and the wait status (tests/blind2_order.py)."""

from __future__ import annotations

import os

from kit.contract import SignalChannel, WaitStatus
from mutants.zoo.base import Mutant


class MonitorShellStatus(Mutant):
    slug = "monitor-shell-status"
    bug = (
        "monitor_container returns a container killed by signal N as the wait status of one "
        "that exited 128+N (the shell's convention): the run's exit code is the same number, "
        "but the status is not the container's and its signal cannot be re-raised"
    )
    killed_by = ("SIG-003",)
    mechanism = "other-field"
    flows = ("root", "userns")

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        status = super().monitor_container(pid, signals)
        if os.WIFSIGNALED(status):
            return ((128 + os.WTERMSIG(status)) & 0xFF) << 8
        return status


MUTANTS: tuple[type[Mutant], ...] = (MonitorShellStatus,)
