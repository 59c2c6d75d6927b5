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
:mod:`.signals`, :mod:`.cleanup`, :mod:`.state`, :mod:`.join`, :mod:`.mechanisms` (rules a
first mutant breaks, broken by another mechanism: a helper thread, a raw system call, a nested
value, a symlink, another field), :mod:`.host` (changes of the host that outlive the run),
:mod:`.syscalls` (system calls the kit refuses) and :mod:`.gaps` (known survivors: bugs the
suite cannot see yet, with the reason).

:mod:`.starter` holds the starter mutants: the reference engine run by a kit with one bug, for
the rules only the starter can break. They have no entry point: ``--engine`` names their
registration function (:func:`engine_spec`), which mutates the kit of the process that calls
it.
"""

from __future__ import annotations

from reference_engines.mutants import (
    cleanup, gaps, host, join, lifecycle, mechanisms, namespaces, privileges, signals, starter,
    state, syscalls,
)
from reference_engines.mutants.base import Mutant, registered_name

__all__ = ["ENGINE_MUTANTS", "MUTANTS", "Mutant", "STARTER_MUTANTS", "by_name", "engine_spec",
           "register", "registered_name"]

#: Engine mutants, by area: registered by :func:`register` (one entry point each).
ENGINE_MUTANTS: tuple[type[Mutant], ...] = (
    *privileges.MUTANTS, *namespaces.MUTANTS, *lifecycle.MUTANTS, *signals.MUTANTS,
    *cleanup.MUTANTS, *state.MUTANTS, *join.MUTANTS, *gaps.MUTANTS, *mechanisms.MUTANTS,
    *host.MUTANTS, *syscalls.MUTANTS,
)
#: Starter mutants: each registered only through its own spec (:func:`engine_spec`).
STARTER_MUTANTS: tuple[type[Mutant], ...] = starter.MUTANTS
#: The whole zoo.
MUTANTS: tuple[type[Mutant], ...] = (*ENGINE_MUTANTS, *STARTER_MUTANTS)


def engine_spec(mutant: type[Mutant]) -> str:
    """What ``--engine`` takes to run ``mutant``: its registered name for an engine mutant,
    its registration function's ``module:attribute`` for a starter mutant."""
    if issubclass(mutant, starter.StarterMutant):
        return mutant.spec()
    return registered_name(mutant)


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
    """Register every engine mutant and its RPC methods (once per process); starter mutants
    are left out (registering one mutates the kit)."""
    from conformance.cooperation import cooperative
    from kit.registry import register_operations, register_rpc_methods, registered

    from reference_engines.minimal import register as register_reference

    register_reference()
    known = registered()
    for mutant in ENGINE_MUTANTS:
        name = registered_name(mutant)
        if name in known:
            continue
        register_operations(name, cooperative(mutant) if mutant.cooperative else mutant)
        register_rpc_methods(name, mutant.rpc)
