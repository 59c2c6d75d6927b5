"""The engine registry: registering engines, finding them by name, entry point or path."""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kit.contract import Engine, Operations
from kit.rpc.methods import RPCMethodError, check_method
from kit.rpc.server import serve

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

ENTRY_POINT_GROUP = "kit.engines"
#: The engines the kit ships, as its own ``kit.engines`` entry points (pyproject.toml) name
#: them: found by name without reading the metadata of every installed distribution, which
#: importing importlib.metadata and scanning costs a one-shot ``kit run`` about 15 ms.
BUILTIN_ENGINES = {
    "reference": "reference_engines.minimal:register",
    "reference-bind": "reference_engines.bind_rootfs:register",
}


class RegistryError(LookupError):
    """A registration or a lookup failed; the message names the engine or method.

    Unlike upstream, registering a name twice is an error, and an RPC method that cannot be served
    is an error at registration (not a silent skip).
    """


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
        raise RegistryError(
            f"invalid engine name {name!r}: a non-empty string without dots or surrounding spaces"
        )
    if name in _engines:
        raise RegistryError(f"engine {name!r} is already registered (by {_engines[name].origin})")
    if isinstance(operations, type) and issubclass(operations, Operations):
        if inspect.isabstract(operations):
            missing = ", ".join(sorted(operations.__abstractmethods__))
            raise RegistryError(
                f"engine {name!r}: {operations.__qualname__} does not implement {missing}"
            )
        factory: Callable[[], Operations] = operations
    elif isinstance(operations, Operations):
        factory = lambda: operations  # noqa: E731  (the very instance, in each process)
    else:
        raise RegistryError(
            f"engine {name!r}: expected an Operations subclass or instance, got {operations!r}"
        )
    _engines[name] = Registration(name, factory, _origin_of(operations))


def register_rpc_methods(name: str, methods: type) -> None:
    """Register the RPC methods the RPC server serves for engine ``name``.

    ``methods`` is a class; every public method (name not starting with ``_``) is served as
    ``"<name>.<method>"``. The class is instantiated in the RPC server process as
    ``methods(engine)``. Every public method's signature is checked now: a method that cannot
    be served (``*args``, missing or non-JSON annotations…) raises :class:`RegistryError`.
    """
    reg = _engines.get(name)
    if reg is None:
        raise RegistryError(
            f"register_rpc_methods: engine {name!r} is not registered "
            "(call register_operations first)"
        )
    if reg.rpc_methods is not None:
        raise RegistryError(
            f"RPC methods for engine {name!r} are already registered "
            f"({_origin_of(reg.rpc_methods)})"
        )
    if not isinstance(methods, type):
        raise RegistryError(f"register_rpc_methods({name!r}): expected a class, got {methods!r}")
    specs = {}
    for attr, func in inspect.getmembers(methods, inspect.isfunction):
        if attr.startswith("_"):
            continue
        # Served later as ``getattr(instance, attr)``: a static method takes no ``self``.
        static = isinstance(inspect.getattr_static(methods, attr), staticmethod)
        try:
            # A method is checked without ``self``; a static method as it is.
            specs[attr] = check_method(
                f"{name}.{attr}", func if static else functools.partial(func, None)
            )
        except RPCMethodError as exc:
            raise RegistryError(f"register_rpc_methods({name!r}): {exc}") from None
    if not specs:
        raise RegistryError(
            f"register_rpc_methods({name!r}): {methods.__qualname__} has no public methods to serve"
        )
    reg.rpc_methods = methods
    reg.rpc_specs = specs


def unregister(name: str) -> None:
    """Remove ``name`` (for tests of the registry itself), and the import paths that named
    it (their callables run again on the next lookup)."""
    _engines.pop(name, None)
    for spec in [spec for spec, registered in _registered_by.items() if registered == name]:
        del _registered_by[spec]


def registered() -> dict[str, Registration]:
    """Engines registered in this process, by name."""
    return dict(_engines)


_entry_points: dict[tuple[str, ...], tuple[EntryPoint, ...]] = {}


def entry_points() -> tuple[EntryPoint, ...]:
    """The ``kit.engines`` entry points of the distributions on ``sys.path``, read once per
    ``sys.path``: metadata only, no engine code. The zygote reads them (preload), so a run's
    starter finds the engine's without scanning every distribution again."""
    key = tuple(sys.path)
    if key not in _entry_points:
        # Imported here: a run of a built-in engine or of an import path never reads them.
        import importlib.metadata  # noqa: PLC0415

        _entry_points[key] = tuple(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    return _entry_points[key]


def entry_points_read() -> tuple[EntryPoint, ...] | None:
    """:func:`entry_points` if this process has read them for the current ``sys.path``
    (None: not read; nothing is read here)."""
    return _entry_points.get(tuple(sys.path))


def found_without_entry_points(spec: str) -> bool:
    """Whether :func:`find` finds ``spec`` without reading the entry points (nothing is
    imported to tell): an import path, or a built-in engine (:data:`BUILTIN_ENGINES`; were
    its package missing, find would read them after all)."""
    return ":" in spec or spec in BUILTIN_ENGINES


def available() -> dict[str, str]:
    """Every engine that can be found: registered ones and ``kit.engines`` entry points,
    name → origin."""
    found = {name: reg.origin for name, reg in _engines.items()}
    for ep in entry_points():
        found.setdefault(ep.name, f"entry point {ep.value}")
    return dict(sorted(found.items()))


def find(spec: str) -> Registration:
    """Find an engine by registered name, ``kit.engines`` entry point name, or import path
    ``module:attribute``, which names one of:

    - an Operations subclass or instance: registered under its ``engine_name`` attribute
      (else the attribute's name), with the RPC methods class of its ``rpc_methods``
      attribute, if any;
    - a callable that registers exactly one engine, or returns an Operations subclass or
      instance (registered as above).

    The spec travels as is to every process of a run, which resolves it again (the callable
    runs once per process). An unknown name or a bad import path raises
    :class:`RegistryError` saying what to change.
    """
    if spec in _engines:
        return _engines[spec]
    if ":" in spec:
        return _from_import_path(spec)
    builtin = _builtin_registrar(spec)
    if builtin is not None:
        return _registered_by_entry_point(spec, BUILTIN_ENGINES[spec], builtin)
    for ep in entry_points():
        if ep.name == spec:
            return _registered_by_entry_point(spec, ep.value, ep.load())
    # One registrar may register several engines under other names: try them all. A broken
    # third-party entry point is named as a warning; it never hides "unknown engine".
    broken: list[str] = []
    for ep in entry_points():
        try:
            _call_registrar(ep.load(), f"entry point {ep.name} = {ep.value}")
        except RegistryError:
            continue
        except Exception as exc:  # noqa: BLE001 the package's own import or registrar failed
            broken.append(
                f"entry point {ep.name} = {ep.value} is broken: {type(exc).__name__}: {exc}"
            )
            continue
        if spec in _engines:
            return _engines[spec]
    raise RegistryError(unknown_engine(spec, broken))


def _builtin_registrar(name: str) -> Any:
    """The registration function of the built-in engine ``name`` (None: not one, or its
    package is not installed here, so the entry points decide)."""
    path = BUILTIN_ENGINES.get(name)
    if path is None:
        return None
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            return None
        raise
    return getattr(module, attr)


def _registered_by_entry_point(name: str, value: str, registrar: Any) -> Registration:
    """Call the registrar of entry point ``name = value``, which must register ``name``."""
    _call_registrar(registrar, f"entry point {name} = {value}")
    if name in _engines:
        return _engines[name]
    raise RegistryError(f"entry point {name} = {value} did not register an engine named {name!r}")


def unknown_engine(spec: str, broken: list[str] | tuple[str, ...] = ()) -> str:
    """The "unknown engine" message: the engines one can use, then each broken entry point as
    a warning."""
    text = (
        f"unknown engine {spec!r}; known engines: {', '.join(available()) or 'none'}; "
        "or name one by import path, MODULE:ATTRIBUTE"
    )
    return text + "".join(f"\nwarning: {line}" for line in broken)


#: An import path: dotted module name, one colon, an attribute name.
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")


def _from_import_path(spec: str) -> Registration:
    """The engine an import path ``module:attribute`` names: an Operations subclass or
    instance, or a callable that registers exactly one engine or returns one."""
    if not _IMPORT_PATH.fullmatch(spec):
        raise RegistryError(
            f"engine {spec!r}: not an import path: write MODULE:ATTRIBUTE, "
            "e.g. mypkg.engine:register (a dotted module name, one colon, "
            "an attribute name)"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise RegistryError(
                f"cannot load engine {spec!r}: no module named {missing!r} on the import path: "
                "install the package that holds it, or add the directory that holds it to "
                "PYTHONPATH (python -m adds the current directory)"
            ) from None
        raise RegistryError(
            f"cannot load engine {spec!r}: importing {module_name} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    except Exception as exc:  # the engine's own module raised while it was imported
        raise RegistryError(
            f"cannot load engine {spec!r}: importing {module_name} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not hasattr(module, attr):
        offered = sorted(
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and callable(value)
            and getattr(value, "__module__", None) == module.__name__
        )
        hint = (
            f" (it defines: {', '.join(offered[:12])}{' …' if len(offered) > 12 else ''})"
            if offered
            else ""
        )
        raise RegistryError(
            f"cannot load engine {spec!r}: module {module_name} "
            f"({getattr(module, '__file__', None) or 'no file'}) has no "
            f"attribute {attr!r}{hint}"
        )
    target = getattr(module, attr)
    if _is_operations(target):
        return _register_returned(spec, attr, target)
    if spec in _registered_by:  # this callable already ran in this process
        return _engines[_registered_by[spec]]
    if not callable(target):
        raise RegistryError(
            f"engine {spec!r}: {target!r} is neither an Operations subclass "
            "nor a callable that registers or returns an engine"
        )
    before = set(_engines)
    try:
        returned = target()
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(
            f"engine {spec!r}: calling it raised {type(exc).__name__}: {exc}"
        ) from exc
    new = sorted(set(_engines) - before)
    if returned is not None:
        if not _is_operations(returned):
            raise RegistryError(
                f"engine {spec!r}: it returned {returned!r:.200}: return an "
                "Operations subclass or instance, or None after registering "
                "one engine"
            )
        if new:
            raise RegistryError(
                f"engine {spec!r}: it both registered {', '.join(new)} and "
                "returned an engine: do one of the two"
            )
        reg = _register_returned(spec, attr, returned)
        _registered_by[spec] = reg.name
        return reg
    if len(new) == 1:
        _registered_by[spec] = new[0]
        return _engines[new[0]]
    if not new:
        raise RegistryError(
            f"engine {spec!r}: it returned None and registered no engine: "
            "return an Operations subclass or instance, or call "
            "kit.registry.register_operations in it"
        )
    raise RegistryError(
        f"engine {spec!r}: it registered {len(new)} engines "
        f"({', '.join(new)}); name one of them instead"
    )


def _is_operations(obj: Any) -> bool:
    return (isinstance(obj, type) and issubclass(obj, Operations)) or isinstance(obj, Operations)


def _register_returned(spec: str, attr: str, target: Any) -> Registration:
    """Register an Operations subclass or instance named by an import path (or returned by
    one) under its ``engine_name`` attribute, else under the attribute's name, with the RPC
    methods class of its ``rpc_methods`` attribute, if any; once per process."""
    name = getattr(target, "engine_name", None) or attr
    if name in _engines:
        known = _engines[name]
        if known.origin != _origin_of(target):
            raise RegistryError(
                f"engine {spec!r}: the name {name!r} is already registered "
                f"by {known.origin}: give the class another engine_name"
            )
        return known
    register_operations(name, target)
    methods = getattr(target, "rpc_methods", None)
    if methods is not None:
        register_rpc_methods(name, methods)
    return _engines[name]


def _call_registrar(target: Any, where: str) -> None:
    if not callable(target):
        raise RegistryError(f"{where}: expected a callable that registers engines, got {target!r}")
    target()


def make_engine(name: str) -> Engine:
    """A fresh :class:`Engine` for ``name`` in this process."""
    reg = find(name)
    return Engine(name=reg.name, operations=reg.factory())


def serve_rpc_requests(
    engine: Engine,
    conn: socket.socket,
    on_call: Callable[[dict[str, Any]], None] | None = None,
    around: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    reserved_fds: tuple[int, ...] = (),
) -> int:
    """Serve ``engine``'s registered RPC methods on ``conn`` until the client closes it.

    Runs in the RPC server process. Returns the process exit status (0 when the client
    closed the connection cleanly). ``around`` wraps each method (keeping its signature,
    e.g. with ``functools.wraps``): the kit uses it to observe the server's credentials
    before and after every method. ``reserved_fds``: descriptors no method may return (the
    kit's ledger socket).
    """
    reg = find(engine.name)
    if reg.rpc_methods is None:
        methods: dict[str, Any] = {}
    else:
        instance = reg.rpc_methods(engine)
        methods = {f"{reg.name}.{attr}": getattr(instance, attr) for attr in reg.rpc_specs}
        if around is not None:
            methods = {name: around(method) for name, method in methods.items()}
    return serve(conn, methods, on_call=on_call, reserved_fds=reserved_fds)
