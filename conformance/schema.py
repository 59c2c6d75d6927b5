"""The report's JSON Schema (``report.schema.json``) and a validator for the subset it uses."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).resolve().parent / "report.schema.json"
#: Deeper than any report the suite writes (a ledger event is about 6 levels down).
MAX_DEPTH = 64
#: At most this many problems are collected.
MAX_PROBLEMS = 50

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


@lru_cache(maxsize=1)
def report_schema() -> dict[str, Any]:
    """The published schema of the report (a file of the package)."""
    return json.loads(SCHEMA_FILE.read_text())


def too_deep(doc: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``doc`` nests containers more than ``limit`` levels (checked without
    recursion, so a hostile file cannot exhaust the stack)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return False


def validate(doc: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Problems of ``doc`` against ``schema`` (default: the report's), each with its JSON
    path, e.g. ``$.runs[0].ledger.events[3].seq: expected integer, got string``.

    The subset: ``type``, ``enum``, ``properties``, ``required``, ``additionalProperties``,
    ``items``, ``minItems``, ``maxItems``, ``minimum`` and local ``$ref`` (no dependency needed).
    Validation descends only where the schema does, so its depth is bounded by the schema's;
    :func:`too_deep` bounds the document itself before anything walks it.
    """
    root = report_schema() if schema is None else schema
    problems: list[str] = []
    _check(doc, root, root, "$", problems)
    return problems


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    if not ref.startswith("#/"):
        raise ValueError(f"unsupported $ref {ref!r} (only local references)")
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part]
    return target


def _type_name(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPES[name](value):
            return name
    return type(value).__name__


def _check(
    value: Any, schema: dict[str, Any], root: dict[str, Any], path: str, problems: list[str]
) -> None:
    if len(problems) >= MAX_PROBLEMS:
        return
    schema = _resolve(schema, root)
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {_short(value)} is not one of {schema['enum']}")
        return
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[name](value) for name in names):
            problems.append(f"{path}: expected {' or '.join(names)}, got {_type_name(value)}")
            return
    if isinstance(value, dict):
        _check_object(value, schema, root, path, problems)
    elif isinstance(value, list):
        _check_array(value, schema, root, path, problems)
    elif "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        problems.append(f"{path}: {value} is below the minimum {schema['minimum']}")


def _check_object(
    value: dict[str, Any],
    schema: dict[str, Any],
    root: dict[str, Any],
    path: str,
    problems: list[str],
) -> None:
    for key in schema.get("required", ()):
        if key not in value:
            problems.append(f"{path}: missing key {key!r}")
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        where = f"{path}.{key}" if str(key).isidentifier() else f"{path}[{json.dumps(key)}]"
        if key in props:
            _check(item, props[key], root, where, problems)
        elif extra is False:
            problems.append(f"{path}: unexpected key {_short(key)}")
        elif isinstance(extra, dict):
            _check(item, extra, root, where, problems)


def _check_array(
    value: list[Any], schema: dict[str, Any], root: dict[str, Any], path: str, problems: list[str]
) -> None:
    if len(value) < schema.get("minItems", 0):
        problems.append(f"{path}: {len(value)} items, at least {schema['minItems']} expected")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        problems.append(f"{path}: {len(value)} items, at most {schema['maxItems']} expected")
    items = schema.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            _check(item, items, root, f"{path}[{i}]", problems)
            if len(problems) >= MAX_PROBLEMS:
                return


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"
