"""The report's TypedDicts and its published JSON Schema agree: keys, required keys, types."""

from __future__ import annotations

import types
import typing
from typing import Any

import pytest

from conformance import report, requirements, schema
from conformance.outcomes import OUTCOMES

SCHEMA = schema.report_schema()
DEFS = SCHEMA["$defs"]
PROPS = SCHEMA["properties"]

#: (TypedDict, its node in the schema, keys the TypedDict has that the schema does not list
#: yet: it allows any other key there, so they pass; listed here so that each one is a choice)
PAIRS = [
    (report.Report, SCHEMA, set()),
    (report.EngineInfo, PROPS["engine"], set()),
    (report.Environment, PROPS["environment"], set()),
    (report.FlowInfo, PROPS["environment"]["properties"]["flows"]["additionalProperties"], set()),
    (report.Invoker, PROPS["environment"]["properties"]["invoker"], set()),
    (report.ResultEntry, DEFS["result"], set()),
    (report.UncheckedEntry, PROPS["unchecked"]["items"], set()),
    (report.KnownFailureEntry, PROPS["known_failures"]["items"], set()),
    (report.RootCauseEntry, PROPS["root_causes"]["items"], set()),
    (report.RunEntry, DEFS["run"], set()),
    (report.LedgerDocument, DEFS["run"]["properties"]["ledger"], set()),
    (report.ShardInfo, PROPS["shards"]["items"], set()),
]


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return DEFS[ref.removeprefix("#/$defs/")] if ref else node


def _json_types(tp: Any) -> set[str]:
    """The JSON Schema types a value of annotation ``tp`` may have."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_json_types(a) for a in typing.get_args(tp)))
    if origin is typing.Literal:
        return {"string"} if all(isinstance(a, str) for a in typing.get_args(tp)) else {"?"}
    if tp is type(None):
        return {"null"}
    if origin is dict or typing.is_typeddict(tp):
        return {"object"}
    if origin is list:
        return {"array"}
    return {
        str: {"string"},
        int: {"integer"},
        float: {"number"},
        bool: {"boolean"},
    }.get(tp, {"?"})


def _schema_types(node: dict[str, Any]) -> set[str] | None:
    node = _resolve(node)
    if "enum" in node:
        return {"string" if isinstance(v, str) else "integer" for v in node["enum"]}
    t = node.get("type")
    if t is None:
        return None  # any value
    return {t} if isinstance(t, str) else set(t)


@pytest.mark.parametrize("cls,node,extra", PAIRS, ids=lambda p: getattr(p, "__name__", ""))
def test_each_typeddict_has_the_keys_and_required_keys_of_its_schema(cls, node, extra):
    hints = typing.get_type_hints(cls)
    props = node.get("properties", {})
    assert set(hints) - extra == set(props), cls.__name__
    assert extra.isdisjoint(props), "now in the schema: drop it from the extras"
    assert set(cls.__required_keys__) == set(node.get("required", ())), cls.__name__


@pytest.mark.parametrize("cls,node,extra", PAIRS, ids=lambda p: getattr(p, "__name__", ""))
def test_each_key_has_the_types_the_schema_allows(cls, node, extra):
    for key, tp in typing.get_type_hints(cls).items():
        if key in extra:
            continue
        allowed = _schema_types(node["properties"][key])
        if allowed is None or tp is Any:
            continue
        ours = _json_types(tp)
        assert ours == allowed, f"{cls.__name__}.{key}: {tp} is {ours}, the schema says {allowed}"


def test_the_literals_are_the_schemas_enums_and_the_suites_values():
    assert typing.get_args(report.Outcome) == tuple(DEFS["outcome"]["enum"]) == OUTCOMES
    assert list(typing.get_args(report.Level)) == DEFS["level"]["enum"]
    assert list(typing.get_args(report.Subject)) == DEFS["subject"]["enum"]
    assert {r.level for r in requirements.CATALOGUE.values()} <= set(typing.get_args(report.Level))
    assert {requirements.subject_of(r) for r in requirements.CATALOGUE} <= set(
        typing.get_args(report.Subject)
    )


def test_the_key_lists_come_from_the_typeddicts():
    assert tuple(DEFS["result"]["required"]) == report.RESULT_KEYS
    assert tuple(SCHEMA["required"]) == report.TOP_KEYS


def test_a_result_without_a_required_key_is_named():
    # the validator reads its key list from the TypedDict: a missing key fails the schema,
    # which names it, before any rule reads it
    entry = {k: None for k in report.RESULT_KEYS}
    del entry["checks"]
    doc = {k: {} for k in report.TOP_KEYS}
    doc.update(schema_version=3, suite_version="x", generated="x", results=[entry])
    doc.update(unchecked=[], known_failures=[], runs=[])
    assert "$.results[0]: missing key 'checks'" in report.validate(doc)


def _shard(backend: dict[str, str]) -> dict[str, Any]:
    env = {
        "kernel": "6",
        "python": "3.11",
        "uid": 0,
        "user_namespaces": True,
        "flows": {"root": {"runnable": True, "reason": "", "selected": True}},
        "backend": backend,
    }
    return {
        "schema_version": 3,
        "suite_version": "0",
        "generated": "now",
        "engine": {"name": "e", "origin": "o"},
        "environment": env,
        "summary": {"total": 0},
        "results": [],
        "unchecked": [],
        "known_failures": [],
        "runs": [],
    }


def test_a_merged_flow_whose_shards_name_no_backend_has_none_rather_than_null():
    # before: {"root": None}, which the merged report's own schema refuses
    merged = report.merge([("a", _shard({})), ("b", _shard({}))])
    assert merged["environment"]["backend"] == {}
    assert report.validate(merged) == []
    merged = report.merge([("a", _shard({"root": "real"})), ("b", _shard({}))])
    assert merged["environment"]["backend"] == {"root": "real"}
