"""Mutants that make a system call the kit refuses (SPEC §11): kit/seccomp.py stops it, the
supervisor records it, and a HOST requirement names it."""

from __future__ import annotations

import ctypes

from reference_engines.mutants.base import Mutant

#: A swap file that does not exist: had the call reached the kernel, it would fail (ENOENT).
NO_SUCH_SWAP = b"/nonexistent-mutant-swap-file"


class MakesAHostGlobalCall(Mutant):
    slug = "host-global-call"
    bug = ("cleanup_container turns a swap file off (swapoff): a host-global call that no "
           "namespace confines")
    killed_by = ("HOST-051",)
    flows = ("root",)

    def cleanup_container(self, ctx, fatal, status) -> None:  # type: ignore[override]
        super().cleanup_container(ctx, fatal, status)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.swapoff(NO_SUCH_SWAP)  # refused with EPERM, ignored as a careless engine would


MUTANTS = (MakesAHostGlobalCall,)
