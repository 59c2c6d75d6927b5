"""The event TypedDicts and the datagram validator agree, kind by kind, and both fail loudly."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

import pytest

from kit.ledger import events as E
from kit.ledger import record
from kit.ledger.record import SUPERVISOR_KINDS, Ledger, check_event

COMMON: dict[str, Any] = {"t": 7, "role": "master", "pid": 3, "tid": 3}

#: A valid event of every kind, written out by hand (not derived from the annotations the
#: validator is derived from), with every key the kind has.
EXAMPLES: dict[str, dict[str, Any]] = {
    "run_start": {
        "engine": "reference",
        "flow": "root",
        "backend": "real",
        "invoker": {"uid": 0, "gid": 0, "name": "root"},
        "probes": True,
        "hook_timeout": 10.0,
        "run_dir": "/tmp/run",
        "host_userns": None,
        "sandbox_left_out": ["/mnt"],
    },
    "process_start": {"ppid": 2, "nspid": [3, 1]},
    "hook_enter": {
        "hook": "create_container",
        "snapshot": {"threads": []},
        "escalation": None,
        "args": {"pid": 4},
        "caller": "kit",
    },
    "hook_return": {
        "hook": "config",
        "snapshot": None,
        "result": [1, "anything"],
        "caller": "engine",
    },
    "hook_raise": {
        "hook": "prepare_config",
        "snapshot": None,
        "error": {"type": "ValueError"},
        "caller": "engine",
    },
    "rpc_call": {
        "method": "engine.mount",
        "args": {"src": "/"},
        "ok": False,
        "error": {"type": "OSError"},
        "duration_ms": 0.25,
        "creds": None,
    },
    "signal": {"signum": 15, "name": "SIGTERM", "sender": 0, "merged": True},
    "container_start": {
        "container_pid": 4,
        "created": ["pid", "mnt"],
        "joined": [],
        "sentinel_pid": 3,
        "rpc_conn": {"inode": 9, "fd": 5, "fd_base": 768},
    },
    "namespaces": {
        "created": ["mnt"],
        "joined": {},
        "order": ["mnt"],
        "propagation": "private",
        "ns": {"mnt": "mnt:[4026531841]"},
    },
    "starter_config": {"config": {"namespaces": []}},
    "stage2_exec": {},
    "stage2_failed": {"message": "exec failed"},
    "fatal": {"message": "boom", "error": None},
    "starter_error": {"stage": "namespaces", "message": "unshare: EPERM"},
    "hook_timeout": {
        "hook": "create_container",
        "hook_role": "master",
        "hook_pid": 3,
        "seconds": 10.0,
        "open_hooks": [],
    },
    "process_exit": {"child_role": "container", "child_pid": 4, "status": 0},
    "leak": {"what": "mount", "detail": "/mnt"},
    "model_limit": {"reason": "fake backend"},
    "host_changes": {"changes": [], "omitted": 0, "errors": [], "looks": 2, "cost_ms": 1.5},
    "foreign_reap": {"child_pid": 9, "detail": "not ours"},
    "rpc_conn_kept": {
        "holders": [{"pid": 9, "fd": 7, "process": "the master"}],
        "shut_down": True,
        "detail": "fd 7 of the master still open when create_container returned",
    },
    "master_fd_closed_early": {"detail": "stage 2 closed master_fd before it exec'd"},
    "starter_exit": {"code": 0},
    "seccomp_filter": {"filter": "kit", "syscalls": ["mount"], "error": None, "reason": None},
    "syscall_refused": {
        "syscall": "mount",
        "nr": 165,
        "args": [0, 0],
        "category": "mount",
        "errno": 1,
        "answered": True,
        "target_tid": 4,
        "target": 4,
        "process_role": "container",
        "hook": None,
        "strings": [],
    },
    "syscalls_unrecorded": {"count": 3},
    "exit": {"code": 0, "reason": "exited 0"},
    "kit_injected": {"hook": "create_container", "fault": "raise", "detail": "injected"},
    "engine_fault": {
        "fault": "malformed",
        "sender_pid": None,
        "sender_role": None,
        "open_hooks": ["master create_container"],
        "detail": "not JSON",
        "excerpt": "{",
    },
}

#: For each checked type, a JSON value that is not of it.
WRONG: dict[str, Any] = {
    "an integer": "1",
    "a number": "1.0",
    "a boolean": 1,
    "a string": 1,
    "an object": [],
    "a list": {},
}

RUN_KINDS = [k for k in E.EVENT_KINDS if k not in SUPERVISOR_KINDS]


def example(kind: str, **changes: Any) -> dict[str, Any]:
    return {**COMMON, "kind": kind, **EXAMPLES[kind], **changes}


def test_every_kind_has_an_example_with_exactly_its_keys():
    assert list(EXAMPLES) == list(E.EVENT_KINDS)
    for kind, fields in EXAMPLES.items():
        assert tuple(fields) == E.EVENT_KINDS[kind], kind


def test_the_union_and_the_kinds_are_the_same_typeddicts():
    members = typing.get_args(E.Event)
    assert [E.kind_of(cls) for cls in members] == list(E.EVENT_KINDS)
    assert all(typing.is_typeddict(cls) for cls in members)
    assert E.COMMON_KEYS == ("seq", "t", "kind", "role", "pid", "tid")


@pytest.mark.parametrize("kind", RUN_KINDS)
def test_a_valid_event_of_every_kind_a_run_may_send_passes(kind):
    assert check_event(example(kind)) is None
    # the supervisor numbers events: a seq a sender wrote is replaced, never checked
    assert check_event(example(kind, seq="forged")) is None


@pytest.mark.parametrize("kind", sorted(SUPERVISOR_KINDS))
def test_a_valid_event_of_a_supervisor_kind_is_a_forgery(kind):
    assert check_event(example(kind)) == f"a {kind!r} event, which only the supervisor writes"


@pytest.mark.parametrize("kind", RUN_KINDS)
def test_each_missing_required_key_of_every_kind_is_named(kind):
    hints = typing.get_type_hints(E.EVENT_TYPES[kind])
    required = E.EVENT_TYPES[kind].__required_keys__
    for key in ("t", "role", "pid", "tid", *E.REQUIRED[kind]):
        assert key in required and key in hints
        event = example(kind)
        del event[key]
        assert check_event(event) == f"{kind} event without {key!r}"
    for key in E.EVENT_KINDS[kind]:
        if key not in E.REQUIRED[kind]:
            assert key not in required
            event = example(kind)
            del event[key]
            assert check_event(event) is None, key
    # a kit event cut by its writer keeps its required keys and drops the others
    cut = {**COMMON, "kind": kind, "truncated": 1 << 21}
    cut.update({k: v for k, v in example(kind).items() if k in E.REQUIRED[kind]})
    assert check_event(cut) is None
    if E.REQUIRED[kind]:
        assert "without" in (check_event({**COMMON, "kind": kind, "truncated": 1 << 21}) or "")


@pytest.mark.parametrize("kind", RUN_KINDS)
def test_a_wrongly_typed_field_of_every_kind_is_rejected_naming_it(kind):
    checked = 0
    for key, field in E.FIELDS[kind].items():
        if key in ("kind", "seq"):
            continue
        bad = next((v for what, v in WRONG.items() if field.what.startswith(what)), None)
        if field.what.startswith(("a name", "a text", "a hook", "kit or", "one of", "a role")):
            bad = 5
        elif field.what in ("a pid", "a thread id", "a wait status", "a list of pids"):
            bad = "5" if field.what != "a list of pids" else ["5"]
        if bad is None:
            # unchecked today (any JSON value): the annotation must say so
            assert typing.get_type_hints(E.EVENT_TYPES[kind])[key] is Any, key
            assert check_event(example(kind, **{key: object()})) is None
            continue
        problem = check_event(example(kind, **{key: bad}))
        assert problem == f"{kind} event: {key} must be {field.what}, not {bad!r}", key
        checked += 1
    assert checked >= 5  # the common keys at least


def test_an_unknown_key_is_outside_the_schema_for_every_kind():
    for kind in RUN_KINDS:
        assert check_event(example(kind, engine_said="x")) == (
            f"{kind} event with keys outside the schema: ['engine_said']"
        )


@pytest.mark.parametrize("role", [[], {}, ["master"]])
def test_an_unhashable_role_is_rejected_not_a_crash(role):
    # the supervisor calls this on every datagram: a TypeError here would end the run
    assert "role must be one of" in str(check_event(example("stage2_exec", role=role)))


def test_the_value_rules_bound_names_texts_pids_roles_and_hooks():
    assert "hook must be a hook of the contract" in str(
        check_event(example("hook_enter", hook="not_a_hook"))
    )
    assert "child_role must be a role" in str(check_event(example("process_exit", child_role="x")))
    assert "role must be one of" in str(check_event(example("signal", role="supervisor")))
    assert "tid must be a thread id" in str(check_event(example("signal", tid=-1)))
    # a pid other than the sender's own may be negative (as before: only typed)
    assert check_event(example("signal", sender=-1)) is None
    assert check_event(example("starter_error", stage="s" * E.MAX_NAME)) is None
    assert "stage must be a name" in str(
        check_event(example("starter_error", stage="s" * (E.MAX_NAME + 1)))
    )
    assert "propagation must be a name" in str(
        check_event(example("namespaces", propagation="p" * (E.MAX_NAME + 1)))
    )
    assert check_event(example("namespaces", propagation=None)) is None
    assert "duration_ms must be a number" in str(
        check_event(example("rpc_call", duration_ms=float("nan")))
    )


def test_an_annotation_without_a_check_fails_at_definition():
    with pytest.raises(TypeError, match="no datagram check"):
        E.checker(set[int])
    with pytest.raises(TypeError, match=r"only X \| None unions"):
        E.checker(int | str)


def test_the_typed_queries_name_the_typeddict_of_every_kind():
    # what mypy sees: select/first of a literal kind give that kind's TypedDict
    for method, wrap in (
        (Ledger.select, lambda t: list[t]),
        (Ledger.first, lambda t: t | None),
    ):
        overloads = typing.get_overloads(method)
        by_kind = {}
        for fn in overloads:
            hints = typing.get_type_hints(fn, globalns=vars(record))
            args = typing.get_args(hints["kind"])
            if typing.get_origin(hints["kind"]) is typing.Literal:
                by_kind[args[0]] = hints["return"]
        assert list(by_kind) == list(E.EVENT_KINDS), method
        for kind, returned in by_kind.items():
            assert returned == wrap(E.EVENT_TYPES[kind]), kind
        # and one for any other kind, set of kinds or none, giving the union
        assert len(overloads) == len(by_kind) + 1


def refused(kind: str, key: str, what: str, value: Any) -> str:
    """The exact verdict on a field of the wrong value (its repr cut at 80 characters)."""
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return f"{kind} event: {key} must be {what}, not {shown}"


def test_a_name_is_at_most_256_characters_and_a_text_at_most_64_kib():
    # the bounds written out, not read from the module: a changed limit is a changed contract
    assert check_event(example("signal", name="n" * 256)) is None
    assert check_event(example("signal", name="n" * 257)) == refused(
        "signal", "name", "a name", "n" * 257
    )
    assert check_event(example("stage2_failed", message="m" * 65536)) is None
    assert check_event(example("stage2_failed", message="m" * 65537)) == refused(
        "stage2_failed", "message", "a text", "m" * 65537
    )
    assert check_event(example("fatal", message="")) is None


def test_the_sender_pid_and_tid_are_refused_below_zero_and_taken_from_zero():
    # the rule is "not negative": 0 is its lowest accepted value (the supervisor then checks
    # the claimed pid against the sender's NSpid), -1 its highest refused one
    for key, what in (("pid", "a pid"), ("tid", "a thread id")):
        assert check_event(example("stage2_exec", **{key: 0})) is None, key
        assert check_event(example("stage2_exec", **{key: 1})) is None, key
        assert check_event(example("stage2_exec", **{key: -1})) == refused(
            "stage2_exec", key, what, -1
        )


def test_an_infinite_number_is_refused_as_json_can_carry_one():
    # 1e999 is valid JSON and decodes to inf (no NaN/Infinity constant needed)
    for text in ("1e999", "-1e999"):
        event, problem = record.parse_datagram(
            json.dumps(example("rpc_call"))
            .replace('"duration_ms": 0.25', '"duration_ms": ' + text)
            .encode()
        )
        assert problem is None and event is not None
        assert check_event(event) == refused("rpc_call", "duration_ms", "a number", float(text))
    assert check_event(example("rpc_call", duration_ms=10**400)) is None
    assert check_event(example("rpc_call", duration_ms=-(10**400))) is None
    assert check_event(example("rpc_call", duration_ms=-1.5e308)) is None


def test_a_union_of_two_types_or_null_fails_at_definition():
    # only X | None is read: with a second type the check would take the first and refuse
    # valid values of the other
    for tp in (int | str | None, None | str | float, dict[str, Any] | list[int] | None):
        with pytest.raises(TypeError, match=r"only X \| None unions"):
            E.checker(tp)
    check, what = E.checker(int | None)
    assert what == "an integer or null"
    assert (check(None), check(3), check("3")) == (True, True, False)


def test_the_schema_fields_are_read_only():
    # FIELDS is the validator of every datagram: nothing may loosen it after import
    field = E.FIELDS["signal"]["signum"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        field.required = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        field.check = lambda v: True


def test_a_shared_annotation_is_derived_once_for_every_kind():
    # the import cost (commit "derive the event checks at half the import cost"): a common
    # key's or a shared alias's annotated rule is derived once, whatever number of kinds
    # carries it (a plain int or str shares its check anyway)
    for key in ("role", "pid", "tid"):
        assert len({id(fields[key].check) for fields in E.FIELDS.values()}) == 1, key
    assert E.FIELDS["signal"]["name"].check is E.FIELDS["starter_error"]["stage"].check
