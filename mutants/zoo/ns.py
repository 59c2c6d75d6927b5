"""Mutants from blind engines written against SPEC §2, §3 and §5 alone (processes and order,
flows, namespaces and StarterConfig): each escaped the suite before its check was fixed."""

from __future__ import annotations

import os

from kit.contract import Context, SignalChannel, WaitStatus
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


MUTANTS = (CleanupFromMonitor,)
