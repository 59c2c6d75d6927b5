"""Mutants that leave things behind or cannot clean up after a partial setup (SPEC §1
cleanup_container, §2 rule 7). What they leave is the kit's to find (the supervisor is the
run's subreaper and checks the run's temporary directory), and the kit removes it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile

from kit.contract import Context, WaitStatus
from mutants.zoo.base import Mutant


class LeavesAProcess(Mutant):
    slug = "leaks-process"
    bug = (
        "post_start_process starts a helper daemon (in a session of its own) and nothing "
        "ever stops it"
    )
    killed_by = ("CLEAN-001",)
    mechanism = "child-process"
    flows = ("root", "userns")

    def post_start_process(self, ctx: Context, pid: int) -> None:
        subprocess.Popen(
            ["/bin/sleep", "30"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


class LeavesATemporaryDirectory(Mutant):
    slug = "leaks-tempdir"
    bug = "create_container makes a scratch directory that cleanup_container never removes"
    killed_by = ("CLEAN-001",)
    flows = ("root", "suid")

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        tempfile.mkdtemp(prefix="mutant-scratch-")
        super().create_container(ctx, pid, rpc_conn)


class CleanupNeedsAFullSetup(Mutant):
    slug = "cleanup-needs-full-setup"
    bug = (
        "cleanup_container removes the scratch directory create_container made at its end, "
        "without checking it got that far: after a failed create_container it raises "
        "(it is neither idempotent nor tolerant of partial setup)"
    )
    killed_by = ("CLEAN-002",)
    flows = ("root",)
    cooperative = True

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        self._scratch = tempfile.mkdtemp(prefix="mutant-scratch-")

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        super().cleanup_container(ctx, fatal, status)
        os.rmdir(self._scratch)
        del self._scratch


MUTANTS = (LeavesAProcess, LeavesATemporaryDirectory, CleanupNeedsAFullSetup)
