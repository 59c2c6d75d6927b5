"""The reference engine, registered as ``reference`` (entry point ``kit.engines``)."""

from __future__ import annotations

from kit.registry import register_operations, register_rpc_methods, registered
from reference_engines.minimal.engine import ReferenceConfig, ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC

NAME = "reference"
__all__ = ["NAME", "ReferenceConfig", "ReferenceEngine", "ReferenceRPC", "register"]


def register() -> None:
    """Register the reference engine and its RPC methods (once per process)."""
    if NAME not in registered():
        register_operations(NAME, ReferenceEngine)
        register_rpc_methods(NAME, ReferenceRPC)
