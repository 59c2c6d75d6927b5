"""The mutant zoo: variants of the reference engine that each break one rule of ``SPEC.md``.

Each mutant is registered as ``mutant-<slug>`` by a registration function of its own, named
by import path (:func:`engine_spec`; the zoo is not installed, so it has no ``kit.engines``
entry point) and declares the requirement IDs that must catch it, the flows where its bug
shows and a one-line description (:mod:`mutants.zoo.base`). The kill matrix
(``python -m mutants``, :mod:`mutants.matrix`) runs the conformance suite against every one
of them and checks that each is killed by a requirement it declares. From the repository's
root:

    python -m pytest --engine=mutants.zoo:register_master_keeps_euid_root --flow suid
    python -m mutants --json matrix.json -j 2                  # all of them

Areas: :mod:`.privileges` (stage 1, master, RPC server, stage 2, payload),
:mod:`.namespaces`, :mod:`.lifecycle` (hangs, crashes, errors, the RPC connection),
:mod:`.signals`, :mod:`.cleanup`, :mod:`.state`, :mod:`.join`, :mod:`.mechanisms` (rules a
first mutant breaks, broken by another mechanism: a helper thread, a raw system call, a nested
value, a symlink, another field), :mod:`.host` (changes of the host that outlive the run),
:mod:`.syscalls` (system calls the kit refuses), :mod:`.priv` (privilege bugs on an error
path, a forwarded signal or at exec), :mod:`.priv2` (securebits a second round of blind
engines left on the payload), :mod:`.ns` (bugs of blind engines in namespaces, order
and flows), :mod:`.rpc` (blind engines' bugs of signals, exit and error paths), :mod:`.order`
(round 2 of the blind engines: hook order, the RPC connection, the wait status), :mod:`.forgery`
(a privilege hidden from the snapshots a process reads of itself: round 6) and
:mod:`.gaps` (known survivors: bugs the suite cannot see yet, with the reason).

:mod:`.starter` holds the starter mutants: the reference engine run by a kit with one bug, for
the rules only the starter can break. Their registration functions live there and mutate the
kit of the process that calls them.
"""

from __future__ import annotations

from collections.abc import Callable

from conformance.cooperation import cooperative
from kit.registry import register_operations, register_rpc_methods, registered
from mutants.zoo import (
    cleanup,
    forgery,
    gaps,
    host,
    join,
    lifecycle,
    mechanisms,
    namespaces,
    ns,
    order,
    priv,
    priv2,
    privileges,
    rpc,
    signals,
    starter,
    state,
    syscalls,
)
from mutants.zoo.base import Mutant, registered_name

__all__ = [
    "ENGINE_MUTANTS",
    "MUTANTS",
    "STARTER_MUTANTS",
    "Mutant",
    "by_name",
    "engine_spec",
    "registered_name",
    "registrar_name",
]

#: Engine mutants, by area: each registered by its own function (:func:`engine_spec`).
ENGINE_MUTANTS: tuple[type[Mutant], ...] = (
    *privileges.MUTANTS,
    *namespaces.MUTANTS,
    *lifecycle.MUTANTS,
    *signals.MUTANTS,
    *cleanup.MUTANTS,
    *state.MUTANTS,
    *join.MUTANTS,
    *gaps.MUTANTS,
    *mechanisms.MUTANTS,
    *host.MUTANTS,
    *syscalls.MUTANTS,
    *priv.MUTANTS,
    *priv2.MUTANTS,
    *ns.MUTANTS,
    *rpc.MUTANTS,
    *order.MUTANTS,
    *forgery.MUTANTS,
)
#: Starter mutants: each registered only through its own spec (:func:`engine_spec`).
STARTER_MUTANTS: tuple[type[Mutant], ...] = starter.MUTANTS
#: The whole zoo.
MUTANTS: tuple[type[Mutant], ...] = (*ENGINE_MUTANTS, *STARTER_MUTANTS)


def registrar_name(mutant: type[Mutant]) -> str:
    """The name of the function that registers ``mutant``: ``register_<slug>``, dashes as
    underscores."""
    return "register_" + mutant.slug.replace("-", "_")


def engine_spec(mutant: type[Mutant]) -> str:
    """What ``--engine`` takes to run ``mutant``: the import path of its registration
    function (in this module for an engine mutant, in :mod:`.starter` for a starter
    mutant)."""
    if issubclass(mutant, starter.StarterMutant):
        return mutant.spec()
    return f"{__name__}:{registrar_name(mutant)}"


def by_name() -> dict[str, type[Mutant]]:
    """Registered name (``mutant-<slug>``) → mutant class."""
    out: dict[str, type[Mutant]] = {}
    for mutant in MUTANTS:
        name = registered_name(mutant)
        if name in out:
            raise ValueError(f"two mutants are named {name}")
        out[name] = mutant
    return out


def _register(mutant: type[Mutant]) -> None:
    name = registered_name(mutant)
    if name not in registered():
        register_operations(name, cooperative(mutant) if mutant.cooperative else mutant)
        register_rpc_methods(name, mutant.rpc)


def _registrar(mutant: type[Mutant]) -> Callable[[], None]:
    def register() -> None:
        _register(mutant)

    register.__name__ = register.__qualname__ = registrar_name(mutant)
    register.__doc__ = f"Register {registered_name(mutant)}: {mutant.bug}."
    return register


for _mutant in ENGINE_MUTANTS:
    globals()[registrar_name(_mutant)] = _registrar(_mutant)
