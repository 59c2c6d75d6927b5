"""Privilege mutants (SPEC §4) from the second round of blind engines: payload securebits."""

from __future__ import annotations

from kit.system import linux
from mutants.zoo.base import Mutant

#: prctl(2) PR_SET_SECUREBITS and the bits below: each survives exec (only KEEP_CAPS does not).
PR_SET_SECUREBITS = 28
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_KEEP_CAPS = 1 << 4
SECBIT_KEEP_CAPS_LOCKED = 1 << 5


def _add_securebits(bits: int) -> None:
    """Set ``bits`` on the calling thread, if it may (CAP_SETPCAP)."""
    try:
        linux.prctl(PR_SET_SECUREBITS, linux.get_securebits() | bits)
    except OSError:
        pass  # no CAP_SETPCAP (the unprivileged flows, the fake backend): nothing set


class StartProcessNoSetuidFixup(Mutant):
    slug = "start-process-no-setuid-fixup"
    bug = (
        "start_process (root flow) sets SECBIT_NO_SETUID_FIXUP before the exec so that a "
        "payload that drops to a user keeps its capabilities: no capability set changes at "
        "exec, the payload's securebits do"
    )
    killed_by = ("PRIV-PAYLOAD-003",)
    flows = ("root",)
    mechanism = "other-field"

    def start_process(self, master_fd: int) -> None:
        _add_securebits(SECBIT_NO_SETUID_FIXUP)
        super().start_process(master_fd)


class StartProcessLocksKeepCaps(Mutant):
    slug = "start-process-locks-keep-caps"
    bug = (
        "start_process (root flow) sets and locks SECBIT_KEEP_CAPS before the exec: exec "
        "clears KEEP_CAPS, but the lock bit stays on the payload"
    )
    killed_by = ("PRIV-PAYLOAD-003",)
    flows = ("root",)
    mechanism = "other-field"

    def start_process(self, master_fd: int) -> None:
        _add_securebits(SECBIT_KEEP_CAPS | SECBIT_KEEP_CAPS_LOCKED)
        super().start_process(master_fd)


MUTANTS: tuple[type[Mutant], ...] = (StartProcessNoSetuidFixup, StartProcessLocksKeepCaps)
