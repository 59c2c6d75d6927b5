"""The bind-rootfs example engine, registered as ``reference-bind`` (entry point)."""

from __future__ import annotations

from kit.registry import register_operations, register_rpc_methods, registered
from reference_engines.bind_rootfs.engine import BindRootfsEngine
from reference_engines.bind_rootfs.rpc import BindRootfsRPC

NAME = "reference-bind"
__all__ = ["NAME", "BindRootfsEngine", "BindRootfsRPC", "register"]


def register() -> None:
    """Register the engine and its RPC methods (once per process)."""
    if NAME not in registered():
        register_operations(NAME, BindRootfsEngine)
        register_rpc_methods(NAME, BindRootfsRPC)
