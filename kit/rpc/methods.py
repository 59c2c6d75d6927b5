"""What an RPC method may look like, checked once at registration; binding per call."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "FileDescriptor",
    "MethodSpec",
    "Param",
    "RPCMethodError",
    "WithFds",
    "check_method",
]


class FileDescriptor(int):
    """Marker type for a parameter that receives a file descriptor via ``SCM_RIGHTS``.

    It is an ``int`` (usable with ``os.read``, ``os.close``…). On the client side, passing a
    ``FileDescriptor(fd)`` as an argument attaches *fd* to the request."""

    def __repr__(self) -> str:
        return f"FileDescriptor({int(self)})"


class WithFds(NamedTuple):
    """A result together with descriptors.

    A method returns ``WithFds(value, fds=[...])`` to send descriptors back; the server closes
    its copies once sent. :meth:`kit.rpc.client.RPCClient.call` returns a ``WithFds`` when the
    reply carries descriptors; the caller then owns them. Unpacks as ``value, fds = ...``."""

    value: Any
    fds: Sequence[int] = ()


class RPCMethodError(TypeError):
    """A callable cannot be served as an RPC method (raised at registration)."""


_JSON_NAMES = {
    str: "str",
    int: "int",
    float: "float",
    bool: "bool",
    type(None): "None",
    list: "list",
    dict: "dict",
}


def _json_type_name(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _type_name(tp: Any) -> str:
    if tp is type(None) or tp is None:
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return repr(tp).replace("typing.", "").replace("kit.rpc.methods.", "")


# A checker returns None when the value matches, else a description of the mismatch
# relative to *path* (e.g. "argument 'xs'[2] must be int, got str").
_Checker = Callable[[Any, str], "str | None"]


class _Unsupported(Exception):
    pass


def _scalar(expected: type, name: str) -> _Checker:
    def check(value: Any, path: str) -> str | None:
        if expected is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected is type(None):
            ok = value is None
        else:
            ok = isinstance(value, expected)
        return None if ok else f"{path} must be {name}, got {_json_type_name(value)}"

    return check


def _compile(tp: Any) -> _Checker:
    """Turn an annotation into a checker; raises _Unsupported for anything else."""
    if tp is None:
        tp = type(None)
    if tp is FileDescriptor:
        raise _Unsupported(
            "FileDescriptor is only allowed as a parameter's whole annotation (or with | None)"
        )
    if tp in (str, int, float, bool, type(None), list, dict):
        return _scalar(tp, _type_name(tp))
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is list:
        if not args:
            return _scalar(list, "list")
        item = _compile(args[0])

        def check_list(value: Any, path: str) -> str | None:
            if not isinstance(value, list):
                return f"{path} must be {_type_name(tp)}, got {_json_type_name(value)}"
            for i, v in enumerate(value):
                err = item(v, f"{path}[{i}]")
                if err:
                    return err
            return None

        return check_list
    if origin is dict:
        if not args:
            return _scalar(dict, "dict")
        if args[0] is not str:
            raise _Unsupported(
                f"dict keys must be str (JSON object keys), not {_type_name(args[0])}"
            )
        val = _compile(args[1])

        def check_dict(value: Any, path: str) -> str | None:
            if not isinstance(value, dict):
                return f"{path} must be {_type_name(tp)}, got {_json_type_name(value)}"
            for k, v in value.items():
                if not isinstance(k, str):
                    return f"{path} keys must be str, got {_json_type_name(k)}"
                err = val(v, f"{path}[{k!r}]")
                if err:
                    return err
            return None

        return check_dict
    if origin is typing.Union or origin is types.UnionType:
        alts = [_compile(a) for a in args]
        # For Optional[X] the mismatch detail of X is the useful message (e.g. "[1] must be int").
        not_none = [c for a, c in zip(args, alts, strict=True) if a is not type(None)]

        def check_union(value: Any, path: str) -> str | None:
            errors = [a(value, path) for a in alts]
            if None in errors:
                return None
            if len(not_none) == 1 and value is not None:
                err = not_none[0](value, path)
                if err and not err.startswith(f"{path} must be "):
                    return err  # the mismatch is inside the value: report where
            return f"{path} must be {_type_name(tp)}, got {_json_type_name(value)}"

        return check_union
    raise _Unsupported(f"unsupported type {_type_name(tp)}")


def _fd_annotation(tp: Any) -> tuple[bool, bool]:
    """(is a FileDescriptor parameter, None allowed)."""
    if tp is FileDescriptor:
        return True, False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if FileDescriptor in args:
            rest = [a for a in args if a is not FileDescriptor]
            if rest == [type(None)]:
                return True, True
            raise _Unsupported("FileDescriptor may only be combined with None")
    return False, False


@dataclass(frozen=True)
class Param:
    """One parameter of a servable method."""

    name: str
    annotation: Any
    required: bool
    is_fd: bool
    optional_fd: bool
    check: _Checker


@dataclass(frozen=True)
class MethodSpec:
    """A callable validated by :func:`check_method`; calling the spec calls the function."""

    name: str
    func: Callable[..., Any]
    params: tuple[Param, ...]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def bind(self, args: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        """Check wire arguments against the signature and return the keyword arguments.

        *args* are JSON values as received; *fds* the descriptors attached to the request.
        ``FileDescriptor`` parameters receive ``FileDescriptor(fds[index])``. Raises
        ``TypeError`` naming the method and the argument for an unknown or missing argument,
        a value of the wrong type (``bool`` is not an ``int``; an ``int`` is accepted for
        ``float``), a bad or reused descriptor index, or a descriptor no argument uses.
        Never closes *fds*: on error the caller still owns them.

        On the wire a ``FileDescriptor`` argument is the index of its descriptor in the list
        attached to the request; this substitutes the descriptor, and every attached descriptor must
        be used by exactly one such argument. The method then owns the descriptors it receives (it
        must close them, or keep them on purpose).
        """
        where = f"method {self.name!r}"
        if not isinstance(args, dict):
            raise TypeError(f"{where}: arguments must be an object, got {_json_type_name(args)}")
        by_name = {p.name: p for p in self.params}
        for key in args:
            if key not in by_name:
                raise TypeError(f"{where}: unexpected argument {key!r:.80}")
        kwargs: dict[str, Any] = {}
        used: set[int] = set()
        for p in self.params:
            if p.name not in args:
                if p.required:
                    raise TypeError(f"{where}: missing required argument {p.name!r}")
                continue
            value = args[p.name]
            if p.is_fd:
                if value is None and p.optional_fd:
                    kwargs[p.name] = None
                    continue
                if isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError(
                        f"{where}: argument {p.name!r} is a FileDescriptor and must be the "
                        f"index of an attached descriptor, got {_json_type_name(value)}"
                    )
                if not 0 <= value < len(fds):
                    raise TypeError(
                        f"{where}: argument {p.name!r} refers to descriptor #{value}, "
                        f"but {len(fds)} descriptor(s) were attached"
                    )
                if value in used:
                    raise TypeError(f"{where}: argument {p.name!r} reuses descriptor #{value}")
                used.add(value)
                kwargs[p.name] = FileDescriptor(fds[value])
                continue
            err = p.check(value, f"argument {p.name!r}")
            if err:
                raise TypeError(f"{where}: {err}")
            kwargs[p.name] = value
        if len(used) != len(fds):
            unused = len(fds) - len(used)
            raise TypeError(
                f"{where}: {unused} file descriptor(s) attached but not used by any "
                "FileDescriptor argument"
            )
        return kwargs


def _namespace_target(func: Callable[..., Any]) -> Any:
    """The function whose globals string annotations of *func* are evaluated in."""
    target: Any = func
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        # The class's __call__ function, for its signature; not a test of callability.
        call = getattr(type(target), "__call__", None)  # noqa: B004
        if inspect.isfunction(call):
            target = call
    return target


def _resolve(name: str, param: str, annotation: Any, target: Any) -> Any:
    """Resolve one parameter annotation with ``typing.get_type_hints`` (strings are evaluated
    in *target*'s module). Parameters are resolved one by one so that an unresolvable return
    annotation (e.g. a name imported only under TYPE_CHECKING) does not matter, and an error
    names the parameter."""

    def shim() -> None:  # carries one annotation; get_type_hints takes globals via __wrapped__
        pass

    shim.__annotations__ = {param: annotation}
    shim.__wrapped__ = target  # type: ignore[attr-defined]
    try:
        return typing.get_type_hints(shim)[param]
    except Exception as exc:  # noqa: BLE001 NameError, SyntaxError, TypeError from a bad annotation
        raise RPCMethodError(
            f"RPC method {name!r}, parameter {param!r}: cannot resolve the annotation "
            f"{annotation!r}: {exc}"
        ) from None


def check_method(name: str, func: Callable[..., Any]) -> MethodSpec:
    """Validate that *func* can be served as RPC method *name* and return its spec.

    *name* is the method name (or ``"<engine>.<method>"``); its last component must be a
    public identifier. Raises :class:`RPCMethodError` naming the method and, where relevant,
    the offending parameter.

    A servable method is a callable whose every parameter

    - is positional-or-keyword or keyword-only (no ``*args``/``**kwargs``, no positional-only),
    - has a type annotation made of: ``str``, ``int``, ``float``, ``bool``, ``list``, ``dict``,
      ``None``, ``list[X]``, ``dict[str, X]``, unions of those (``X | None``, ``Optional[X]``), or
      :class:`FileDescriptor` / ``FileDescriptor | None`` (top level only).

    String annotations (``from __future__ import annotations``) are resolved with
    ``typing.get_type_hints``. The return value must be JSON-serialisable, or a :class:`WithFds` to
    send descriptors back. Names starting with ``_`` are never servable.
    """
    if not isinstance(name, str):
        raise RPCMethodError(f"RPC method name must be a string, got {type(name).__name__}")
    short = name.rpartition(".")[2]
    if not short.isidentifier():
        raise RPCMethodError(f"RPC method {name!r}: name is not an identifier")
    if short.startswith("_"):
        raise RPCMethodError(f"RPC method {name!r}: names starting with '_' are never servable")
    if not callable(func):
        raise RPCMethodError(f"RPC method {name!r}: {type(func).__name__} object is not callable")
    if inspect.isclass(func):
        raise RPCMethodError(f"RPC method {name!r}: a class is not servable; register a function")
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise RPCMethodError(f"RPC method {name!r}: no inspectable signature: {exc}") from None
    target = _namespace_target(func)
    params: list[Param] = []
    for p in sig.parameters.values():
        where = f"RPC method {name!r}, parameter {p.name!r}"
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            raise RPCMethodError(f"{where}: *args is not servable")
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            raise RPCMethodError(f"{where}: **kwargs is not servable")
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise RPCMethodError(f"{where}: positional-only parameters are not servable")
        if p.annotation is inspect.Parameter.empty:
            raise RPCMethodError(f"{where}: missing type annotation")
        tp = _resolve(name, p.name, p.annotation, target)
        try:
            is_fd, optional_fd = _fd_annotation(tp)
            check = _scalar(int, "int") if is_fd else _compile(tp)
        except _Unsupported as exc:
            raise RPCMethodError(f"{where}: {exc}") from None
        params.append(
            Param(
                name=p.name,
                annotation=tp,
                required=p.default is inspect.Parameter.empty,
                is_fd=is_fd,
                optional_fd=optional_fd,
                check=check,
            )
        )
    return MethodSpec(name=name, func=func, params=tuple(params))
