"""Unit tests of kit.rpc.messages (wire schema) and kit.rpc.methods (registration, binding)."""

import functools
import os
from typing import Any, Dict, List, Optional, Union

import pytest

from kit.rpc import (
    FileDescriptor,
    MethodSpec,
    ProtocolError,
    RPCMethodError,
    check_method,
    make_error,
    make_request,
    make_result,
    parse_reply,
    parse_request,
)
from kit.rpc.client import exception_from_error
from kit.rpc.messages import MAX_MESSAGE, ErrorInfo, error_info

# --------------------------------------------------------------------------- messages


def test_request_round_trip() -> None:
    obj = make_request(1, "eng.mount", {"source": "/a", "n": [1]}, 2)
    assert obj == {"id": 1, "method": "eng.mount", "args": {"source": "/a", "n": [1]}, "fds": 2}
    req = parse_request(obj)
    assert (req.id, req.method, req.engine, req.name, req.args, req.fds) == (
        1,
        "eng.mount",
        "eng",
        "mount",
        {"source": "/a", "n": [1]},
        2,
    )
    assert parse_request(make_request(0, "my-engine.v2.do_it", {})).engine == "my-engine.v2"


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ([], "request must be an object"),
        ({"id": 1, "method": "e.m", "args": {}}, "missing field 'fds'"),
        ({"id": 1, "method": "e.m", "args": {}, "fds": 0, "x": 1}, "unknown field 'x'"),
        ({"id": 1.0, "method": "e.m", "args": {}, "fds": 0}, "'id' must be an integer"),
        ({"id": False, "method": "e.m", "args": {}, "fds": 0}, "'id' must be an integer"),
        ({"id": 2**63, "method": "e.m", "args": {}, "fds": 0}, "'id' must be an integer"),
        ({"id": 1, "method": "e._m", "args": {}, "fds": 0}, "private method '_m'"),
        ({"id": 1, "method": "e.__del__", "args": {}, "fds": 0}, "private method '__del__'"),
        ({"id": 1, "method": ".m", "args": {}, "fds": 0}, "'method' must have the form"),
        ({"id": 1, "method": "e.m", "args": None, "fds": 0}, "'args' must be an object"),
        ({"id": 1, "method": "e.m", "args": {"1x": 1}, "fds": 0}, "invalid argument name '1x'"),
        ({"id": 1, "method": "e.m", "args": {}, "fds": True}, "'fds' must be an integer"),
        ({"id": 1, "method": "e.m", "args": {}, "fds": 17}, "'fds' must be an integer in [0, 16]"),
    ],
)
def test_parse_request_rejects(obj: Any, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(obj)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_replies() -> None:
    ok = parse_reply(make_result(3, {"x": 1}))
    assert ok.ok and ok.id == 3 and ok.result == {"x": 1} and ok.fds == 0
    assert make_result(3, None, 2) == {"id": 3, "result": None, "fds": 2}
    assert parse_reply(make_result(3, None, 2)).fds == 2
    err = parse_reply(make_error(4, FileNotFoundError(2, "No such file or directory", "/x")))
    assert not err.ok
    assert err.error == ErrorInfo("FileNotFoundError", 2, "No such file or directory: '/x'")
    assert parse_reply(make_error(None, ValueError("v"))).id is None
    with pytest.raises(ProtocolError, match="'id'"):
        make_result(None, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ("x", "reply must be an object"),
        ({"id": 1}, "missing field 'result'"),
        ({"id": 1, "result": 1, "more": 1}, "unknown field 'more'"),
        ({"id": None, "result": 1}, "'id' must be an integer"),
        ({"id": 1, "result": 1, "fds": -1}, "'fds'"),
        ({"id": 1, "error": "x"}, "'error' must be an object"),
        ({"id": 1, "error": {"type": "T", "errno": None}}, "missing field 'message'"),
        (
            {"id": 1, "error": {"type": "T", "errno": None, "message": "", "x": 1}},
            "unknown field 'x'",
        ),
        ({"id": 1, "error": {"type": "", "errno": None, "message": ""}}, "'error.type'"),
        ({"id": 1, "error": {"type": "T", "errno": True, "message": ""}}, "'error.errno'"),
        ({"id": 1, "error": {"type": "T", "errno": None, "message": 5}}, "'error.message'"),
        (
            {"id": 1, "error": {"type": "T", "errno": None, "message": ""}, "fds": 1},
            "unknown field 'fds'",
        ),
    ],
)
def test_parse_reply_rejects(obj: Any, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_reply(obj)
    assert fragment in str(info.value)


def test_error_info_edge_cases() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert error_info(Unprintable()).message == "<unprintable Unprintable object>"
    assert error_info(KeyError("k")).message == "k"
    assert error_info(OSError("plain")) == ErrorInfo("OSError", None, "plain")
    long = error_info(ValueError("x" * (MAX_MESSAGE + 10))).message
    assert len(long) < MAX_MESSAGE + 100 and long.endswith("(truncated)")


def test_exception_from_error_mapping() -> None:
    exc = exception_from_error(ErrorInfo("FileExistsError", 17, "File exists"))
    assert type(exc) is FileExistsError and exc.errno == 17
    exc = exception_from_error(ErrorInfo("SomeCustomOSError", 13, "denied"))
    assert type(exc) is PermissionError and exc.remote_type == "SomeCustomOSError"
    assert (
        type(exception_from_error(ErrorInfo("NotImplementedError", None, "m")))
        is NotImplementedError
    )
    assert type(exception_from_error(ErrorInfo("LookupError", None, "m"))) is LookupError
    # Names outside the whitelist never instantiate arbitrary builtins.
    for name in (
        "SystemExit",
        "KeyboardInterrupt",
        "StopIteration",
        "GeneratorExit",
        "eval",
        "__import__",
    ):
        exc = exception_from_error(ErrorInfo(name, None, "m"))
        assert type(exc).__name__ == "RemoteError" and exc.remote_type == name


# --------------------------------------------------------------------------- check_method


def good(
    a: str,
    b: int,
    c: float,
    d: bool,
    e: list,
    f: dict,
    g: None,
    h: List[int],
    i: Dict[str, List[Optional[str]]],
    j: Optional[int] = None,
    k: Union[int, str] = 0,
    fd: FileDescriptor = None,  # type: ignore[assignment]
    ofd: Optional[FileDescriptor] = None,
    *,
    kw: "list[dict[str, float]] | None" = None,
) -> None:
    pass


def test_check_method_accepts_supported_annotations() -> None:
    spec = check_method("good", good)
    assert isinstance(spec, MethodSpec)
    assert [p.name for p in spec.params if p.required] == list("abcdefghi")
    assert [p.name for p in spec.params if p.is_fd] == ["fd", "ofd"]
    assert spec(a="x", b=1, c=1.0, d=True, e=[], f={}, g=None, h=[], i={}) is None


def _varargs(*args: int) -> None: ...
def _varkw(**kw: int) -> None: ...
def _posonly(a: int, /) -> None: ...
def _unannotated(a) -> None: ...
def _tuple(a: tuple) -> None: ...
def _set(a: "set[int]") -> None: ...
def _intkeys(a: Dict[int, str]) -> None: ...
def _any(a: Any) -> None: ...
def _fd_in_list(a: List[FileDescriptor]) -> None: ...
def _fd_union(a: Union[FileDescriptor, int]) -> None: ...
def _unresolvable(a: "NoSuchType") -> None: ...  # noqa: F821
def _bytes(a: bytes) -> None: ...
def _nested_bad(a: List[Dict[str, bytes]]) -> None: ...


@pytest.mark.parametrize(
    "func, fragment",
    [
        (_varargs, "parameter 'args': *args is not servable"),
        (_varkw, "parameter 'kw': **kwargs is not servable"),
        (_posonly, "parameter 'a': positional-only"),
        (_unannotated, "parameter 'a': missing type annotation"),
        (_tuple, "parameter 'a': unsupported type tuple"),
        (_set, "parameter 'a': unsupported type set[int]"),
        (_intkeys, "parameter 'a': dict keys must be str"),
        (_any, "parameter 'a': unsupported type Any"),
        (_fd_in_list, "parameter 'a': FileDescriptor is only allowed"),
        (_fd_union, "parameter 'a': FileDescriptor may only be combined with None"),
        (_unresolvable, "parameter 'a': cannot resolve the annotation 'NoSuchType'"),
        (_bytes, "parameter 'a': unsupported type bytes"),
        (_nested_bad, "parameter 'a': unsupported type bytes"),
        (42, "int object is not callable"),
        (dict, "a class is not servable"),
        (getattr, "no inspectable signature"),
        (print, "parameter 'args': *args is not servable"),
    ],
)
def test_check_method_rejects(func: Any, fragment: str) -> None:
    with pytest.raises(RPCMethodError) as info:
        check_method("eng.meth", func)
    assert fragment in str(info.value)
    assert "'eng.meth'" in str(info.value)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("name", ["_hidden", "__init__", "eng._x", "eng.__call__", "not-ident", ""])
def test_check_method_rejects_names(name: str) -> None:
    with pytest.raises(RPCMethodError, match=r"never servable|not an identifier"):
        check_method(name, good)


def _bad_return(a: "int") -> "NotImportedHere":  # noqa: F821
    return a


def test_unresolvable_return_annotation_is_irrelevant() -> None:
    assert check_method("r", _bad_return).bind({"a": 1}) == {"a": 1}


class Thing:
    prefix = ">"

    def method(self, text: str) -> str:
        return self.prefix + text

    def __call__(self, n: int) -> int:
        return n + 1


def test_check_method_on_other_callables() -> None:
    assert check_method("m", Thing().method).bind({"text": "x"}) == {"text": "x"}
    assert check_method("c", Thing()).bind({"n": 1}) == {"n": 1}

    def base(a: int, b: str) -> str:
        return b * a

    spec = check_method("p", functools.partial(base, 2))
    assert [p.name for p in spec.params] == ["b"]
    assert spec(**spec.bind({"b": "ab"})) == "abab"

    @functools.wraps(base)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return base(*args, **kwargs)

    assert [p.name for p in check_method("w", wrapper).params] == ["a", "b"]


# --------------------------------------------------------------------------- bind


def test_bind_types_and_fds() -> None:
    spec = check_method("eng.good", good)
    base = {
        "a": "x",
        "b": 1,
        "c": 2,
        "d": False,
        "e": [1, "x"],
        "f": {"k": None},
        "g": None,
        "h": [1],
        "i": {"k": [None, "s"]},
    }
    assert spec.bind(base) == base
    r, w = os.pipe()
    try:
        bound = spec.bind({**base, "fd": 1, "ofd": 0, "k": "s"}, [r, w])
        assert bound["fd"] == w and bound["ofd"] == r and isinstance(bound["fd"], FileDescriptor)
        assert repr(bound["fd"]) == f"FileDescriptor({w})"
        assert spec.bind({**base, "ofd": None}, [])["ofd"] is None
        with pytest.raises(
            TypeError, match=r"method 'eng.good': argument 'fd' refers to descriptor #2"
        ):
            spec.bind({**base, "fd": 2}, [r, w])
        with pytest.raises(TypeError, match="argument 'fd' is a FileDescriptor"):
            spec.bind({**base, "fd": True}, [r])
        with pytest.raises(TypeError, match="2 file descriptor\\(s\\) attached but not used"):
            spec.bind(base, [r, w])
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"b": True}, "argument 'b' must be int, got bool"),
        ({"c": True}, "argument 'c' must be float, got bool"),
        ({"c": "1"}, "argument 'c' must be float, got str"),
        ({"g": 0}, "argument 'g' must be None, got int"),
        ({"h": [1, 2.5]}, "argument 'h'[1] must be int, got float"),
        ({"i": {"k": [1]}}, "argument 'i'['k'][0] must be Optional[str], got int"),
        ({"i": []}, "argument 'i' must be Dict[str, List[Optional[str]]], got list"),
        ({"j": "1"}, "argument 'j' must be Optional[int], got str"),
        ({"k": None}, "argument 'k' must be Union[int, str], got None"),
        ({"kw": [{"x": "1"}]}, "argument 'kw'[0]['x'] must be float, got str"),
        ({"zzz": 1}, "unexpected argument 'zzz'"),
        ({"a": None}, "argument 'a' must be str, got None"),
    ],
)
def test_bind_rejects(change: dict, fragment: str) -> None:
    spec = check_method("eng.good", good)
    base = {"a": "x", "b": 1, "c": 2, "d": False, "e": [], "f": {}, "g": None, "h": [], "i": {}}
    with pytest.raises(TypeError) as info:
        spec.bind({**base, **change})
    assert str(info.value).startswith("method 'eng.good': ")
    assert fragment in str(info.value)


def test_bind_missing_and_not_a_dict() -> None:
    spec = check_method("eng.good", good)
    with pytest.raises(TypeError, match=r"method 'eng.good': missing required argument 'a'"):
        spec.bind({})
    with pytest.raises(TypeError, match="arguments must be an object, got list"):
        spec.bind([])  # type: ignore[arg-type]
