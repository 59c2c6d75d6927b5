"""The engine registry: ``register_operations``, ``register_rpc_methods``,
``serve_rpc_requests``, and finding engines by name, entry point or ``module:attribute``.

Unlike upstream, registering a name twice is an error, and an RPC method that cannot be
served is an error at registration (not a silent skip).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from kit.contract import Engine, Operations

ENTRY_POINT_GROUP = "kit.engines"


class RegistryError(LookupError):
    """A registration or a lookup failed; the message names the engine or method."""


@dataclass
class Registration:
    name: str
    factory: Callable[[], Operations]
    origin: str
    rpc_methods: type | None = None
    rpc_specs: dict[str, Any] = field(default_factory=dict)


_engines: dict[str, Registration] = {}
_registered_by: dict[str, str] = {}  # "module:function" registrar -> the engine it registered


def _origin_of(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    qual = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}:{qual}"


def register_operations(name: str, operations: type[Operations] | Operations) -> None:
    """Register an engine's operations under ``name``.

    ``operations`` is an :class:`Operations` subclass (instantiated once in every process of
    a run) or an instance. Registering a name twice raises :class:`RegistryError`.
    """
    if not isinstance(name, str) or not name or name.strip() != name or "." in name:
        raise RegistryError(f"invalid engine name {name!r}: a non-empty string without dots "
                            "or surrounding spaces")
    if name in _engines:
        raise RegistryError(f"engine {name!r} is already registered "
                            f"(by {_engines[name].origin})")
    if isinstance(operations, type) and issubclass(operations, Operations):
        if inspect.isabstract(operations):
            missing = ", ".join(sorted(operations.__abstractmethods__))
            raise RegistryError(f"engine {name!r}: {operations.__qualname__} does not "
                                f"implement {missing}")
        factory: Callable[[], Operations] = operations
    elif isinstance(operations, Operations):
        factory = lambda: operations  # noqa: E731  (the very instance, in each process)
    else:
        raise RegistryError(f"engine {name!r}: expected an Operations subclass or instance, "
                            f"got {operations!r}")
    _engines[name] = Registration(name, factory, _origin_of(operations))


def register_rpc_methods(name: str, methods: type) -> None:
    """Register the RPC methods the RPC server serves for engine ``name``.

    ``methods`` is a class; every public method (name not starting with ``_``) is served as
    ``"<name>.<method>"``. The class is instantiated in the RPC server process as
    ``methods(engine)``. Every public method's signature is checked now: a method that cannot
    be served (``*args``, missing or non-JSON annotations…) raises :class:`RegistryError`.
    """
    from kit.rpc.methods import RPCMethodError, check_method

    reg = _engines.get(name)
    if reg is None:
        raise RegistryError(f"register_rpc_methods: engine {name!r} is not registered "
                            "(call register_operations first)")
    if reg.rpc_methods is not None:
        raise RegistryError(f"RPC methods for engine {name!r} are already registered "
                            f"({_origin_of(reg.rpc_methods)})")
    if not isinstance(methods, type):
        raise RegistryError(f"register_rpc_methods({name!r}): expected a class, got {methods!r}")
    specs = {}
    for attr, func in inspect.getmembers(methods, inspect.isfunction):
        if attr.startswith("_"):
            continue
        try:
            # Checked without ``self``; served later as the bound method of an instance.
            specs[attr] = check_method(f"{name}.{attr}", functools.partial(func, None))
        except RPCMethodError as exc:
            raise RegistryError(f"register_rpc_methods({name!r}): {exc}") from None
    if not specs:
        raise RegistryError(f"register_rpc_methods({name!r}): {methods.__qualname__} has no "
                            "public methods to serve")
    reg.rpc_methods = methods
    reg.rpc_specs = specs


def unregister(name: str) -> None:
    """Remove ``name`` (for tests of the registry itself)."""
    _engines.pop(name, None)


def registered() -> dict[str, Registration]:
    """Engines registered in this process, by name."""
    return dict(_engines)


def available() -> dict[str, str]:
    """Every engine that can be found: registered ones and ``kit.engines`` entry points,
    name → origin."""
    found = {name: reg.origin for name, reg in _engines.items()}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, f"entry point {ep.value}")
    return dict(sorted(found.items()))


def find(spec: str) -> Registration:
    """Find an engine by registered name, ``kit.engines`` entry point name, or
    ``module:attribute`` (an Operations subclass, registered under its ``engine_name`` class
    attribute with the RPC methods class in its ``rpc_methods`` attribute, if any; or a
    function that registers engines).

    An unknown name raises :class:`RegistryError` listing the known ones.
    """
    if spec in _engines:
        return _engines[spec]
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == spec:
            _call_registrar(ep.load(), f"entry point {ep.name} = {ep.value}")
            if spec in _engines:
                return _engines[spec]
            raise RegistryError(f"entry point {ep.name} = {ep.value} did not register an "
                                f"engine named {spec!r}")
    # One registrar may register several engines under other names: try them all. A broken
    # third-party entry point is named as a warning; it never hides "unknown engine".
    broken: list[str] = []
    if ":" not in spec:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                _call_registrar(ep.load(), f"entry point {ep.name} = {ep.value}")
            except RegistryError:
                continue
            except Exception as exc:  # the package's own import or registrar failed
                broken.append(f"entry point {ep.name} = {ep.value} is broken: "
                              f"{type(exc).__name__}: {exc}")
                continue
            if spec in _engines:
                return _engines[spec]
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
            target = getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise RegistryError(f"cannot load engine {spec!r}: {exc}") from None
        if isinstance(target, type) and issubclass(target, Operations):
            # The class may name itself (``engine_name``) and its RPC methods
            # (``rpc_methods``); both are registered on first use.
            name = getattr(target, "engine_name", None) or spec
            if name not in _engines:
                register_operations(name, target)
                methods = getattr(target, "rpc_methods", None)
                if methods is not None:
                    register_rpc_methods(name, methods)
            return _engines[name]
        if spec in _registered_by:  # this registrar already ran in this process
            return _engines[_registered_by[spec]]
        before = set(_engines)
        _call_registrar(target, spec)
        new = sorted(set(_engines) - before)
        if len(new) == 1:
            _registered_by[spec] = new[0]
            return _engines[new[0]]
        raise RegistryError(f"{spec} registered {len(new)} engines ({', '.join(new) or 'none'});"
                            " name one of them instead")
    raise RegistryError(unknown_engine(spec, broken))


#: Names of the mutant zoo (reference_engines/mutants): broken on purpose, never suggested.
MUTANT_PREFIX = "mutant-"


def unknown_engine(spec: str, broken: list[str] | tuple[str, ...] = ()) -> str:
    """The "unknown engine" message: the engines one can use (the mutant zoo only counted),
    then each broken entry point as a warning."""
    names = list(available())
    usable = [n for n in names if not n.startswith(MUTANT_PREFIX)]
    mutants = len(names) - len(usable)
    text = f"unknown engine {spec!r}; known engines: {', '.join(usable) or 'none'}"
    if mutants:
        text += (f" (and {mutants} mutants of the zoo, broken on purpose: python -m "
                 "conformance mutants --list)")
    return text + "".join(f"\nwarning: {line}" for line in broken)


def _call_registrar(target: Any, where: str) -> None:
    if not callable(target):
        raise RegistryError(f"{where}: expected a callable that registers engines, got "
                            f"{target!r}")
    target()


def make_engine(name: str) -> Engine:
    """A fresh :class:`Engine` for ``name`` in this process."""
    reg = find(name)
    return Engine(name=reg.name, operations=reg.factory())


def serve_rpc_requests(engine: Engine, conn: socket.socket,
                       on_call: Callable[[dict[str, Any]], None] | None = None,
                       around: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
                       reserved_fds: tuple[int, ...] = ()) -> int:
    """Serve ``engine``'s registered RPC methods on ``conn`` until the client closes it.

    Runs in the RPC server process. Returns the process exit status (0 when the client
    closed the connection cleanly). ``around`` wraps each method (keeping its signature,
    e.g. with ``functools.wraps``): the kit uses it to observe the server's credentials
    before and after every method. ``reserved_fds``: descriptors no method may return (the
    kit's ledger socket).
    """
    from kit.rpc.server import serve

    reg = find(engine.name)
    if reg.rpc_methods is None:
        methods: dict[str, Any] = {}
    else:
        instance = reg.rpc_methods(engine)
        methods = {f"{reg.name}.{attr}": getattr(instance, attr) for attr in reg.rpc_specs}
        if around is not None:
            methods = {name: around(method) for name, method in methods.items()}
    return serve(conn, methods, on_call=on_call, reserved_fds=reserved_fds)
