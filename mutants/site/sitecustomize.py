"""Puts a supervisor mutant into every interpreter of one kill-matrix session."""

# A starter mutant reaches a run's processes through the engine's registration, which the
# starter imports; the zygote and the supervisor never import the engine (SPEC §11), so a
# bug of the supervisor's is applied here instead: the matrix puts this directory first on
# PYTHONPATH and names the mutant in SUPERVISOR_MUTANT_ENV for that session only.

import importlib.machinery
import importlib.util
import os
import sys

SUPERVISOR_MUTANT_ENV = "KIT_SUPERVISOR_MUTANT"


def _run_the_shadowed_sitecustomize() -> None:
    """The sitecustomize this one hides on the path (the system's, if any) still runs."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _apply(slug: str) -> None:
    from mutants.zoo import starter

    (mutant,) = [m for m in starter.MUTANTS if m.slug == slug]
    mutant.mutate()


_run_the_shadowed_sitecustomize()
if os.environ.get(SUPERVISOR_MUTANT_ENV):
    _apply(os.environ[SUPERVISOR_MUTANT_ENV])
