"""Engines named by import path (``--engine=import_path_engines:ATTRIBUTE``), for the tests of
the registry's import-path lookup: each attribute is one way to get it right or wrong."""

from __future__ import annotations

from kit.registry import register_operations, registered
from reference_engines.minimal import ReferenceEngine, ReferenceRPC


class Returned(ReferenceEngine):
    engine_name = "import-path-returned"
    rpc_methods = ReferenceRPC


class Unnamed(ReferenceEngine):
    """No ``engine_name``: registered under the attribute's name."""


def make_engine() -> type[ReferenceEngine]:
    """Returns the engine instead of registering it."""
    return Returned


def make_instance() -> ReferenceEngine:
    return Returned()


def registers_nothing() -> None:
    """Forgets both to register and to return."""


def returns_a_string() -> str:
    return "import-path-returned"


def registers_two() -> None:
    for name in ("import-path-one", "import-path-two"):
        if name not in registered():
            register_operations(name, ReferenceEngine)


def raises() -> None:
    raise OSError(2, "the engine's config file is missing")


NOT_CALLABLE = 42
