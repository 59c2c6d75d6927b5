"""Mutants that make a system call the kit refuses (SPEC §11): kit/run/seccomp.py stops it, the
supervisor records it, and a HOST requirement names it."""

from __future__ import annotations

import ctypes
import os
import socket

from kit.contract import Context, WaitStatus
from mutants.zoo.base import Mutant

#: A swap file that does not exist: had the call reached the kernel, it would fail (ENOENT).
NO_SUCH_SWAP = b"/nonexistent-mutant-swap-file"


class MakesAHostGlobalCall(Mutant):
    slug = "host-global-call"
    bug = (
        "cleanup_container turns a swap file off (swapoff): a host-global call that no "
        "namespace confines"
    )
    killed_by = ("HOST-051",)
    flows = ("root",)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        super().cleanup_container(ctx, fatal, status)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.swapoff(NO_SUCH_SWAP)  # refused with EPERM, ignored as a careless engine would


class MakesAHostGlobalCallInAChild(Mutant):
    slug = "host-global-call-in-a-child"
    bug = (
        "create_container forks a helper process that tries to unload a kernel module "
        "(delete_module): a host-global call, from a process the engine started"
    )
    killed_by = ("HOST-051",)
    flows = ("root",)
    mechanism = "child-process"

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        child = os.fork()
        if child == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            # A module that does not exist: had the call reached the kernel, ENOENT.
            libc.syscall(ctypes.c_long(176), b"mutant_no_such_module", ctypes.c_uint(os.O_NONBLOCK))
            os._exit(0)
        os.waitpid(child, 0)
        super().create_container(ctx, pid, rpc_conn)


MUTANTS = (MakesAHostGlobalCall, MakesAHostGlobalCallInAChild)
