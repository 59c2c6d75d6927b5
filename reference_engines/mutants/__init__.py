"""The mutant zoo: variants of the reference engine that each break one rule of ``SPEC.md``.

Each mutant is registered as ``mutant-<slug>`` (entry points ``kit.engines``, all pointing to
:func:`register`) and declares the requirement IDs that must catch it, the flows where its bug
shows and a one-line description (:mod:`reference_engines.mutants.base`). The kill matrix
(``python -m conformance mutants``, :mod:`conformance.mutants`) runs the conformance suite
against every one of them and checks that each is killed by a requirement it declares:

    pytest --engine=mutant-master-keeps-euid-root --flow suid    # one by hand
    python -m conformance mutants --json matrix.json -j 2          # all of them

Areas: :mod:`.privileges` (stage 1, master, RPC server, stage 2, payload),
:mod:`.namespaces`, :mod:`.lifecycle` (hangs, crashes, errors, the RPC connection),
:mod:`.signals`, :mod:`.cleanup`, :mod:`.state`, :mod:`.join`, and :mod:`.gaps` (known
survivors: bugs the suite cannot see yet, with the reason).
"""

from __future__ import annotations

from reference_engines.mutants import (
    cleanup, gaps, join, lifecycle, namespaces, privileges, signals, state,
)
from reference_engines.mutants.base import Mutant, registered_name

__all__ = ["MUTANTS", "Mutant", "by_name", "register", "registered_name"]

#: Every mutant, by area.
MUTANTS: tuple[type[Mutant], ...] = (
    *privileges.MUTANTS, *namespaces.MUTANTS, *lifecycle.MUTANTS, *signals.MUTANTS,
    *cleanup.MUTANTS, *state.MUTANTS, *join.MUTANTS, *gaps.MUTANTS,
)


def by_name() -> dict[str, type[Mutant]]:
    """Registered name (``mutant-<slug>``) → mutant class."""
    out: dict[str, type[Mutant]] = {}
    for mutant in MUTANTS:
        name = registered_name(mutant)
        if name in out:
            raise ValueError(f"two mutants are named {name}")
        out[name] = mutant
    return out


def register() -> None:
    """Register every mutant and its RPC methods (once per process)."""
    from conformance.cooperation import cooperative
    from kit.registry import register_operations, register_rpc_methods, registered

    from reference_engines.minimal import register as register_reference

    register_reference()
    known = registered()
    for name, mutant in by_name().items():
        if name in known:
            continue
        register_operations(name, cooperative(mutant) if mutant.cooperative else mutant)
        register_rpc_methods(name, mutant.rpc)
