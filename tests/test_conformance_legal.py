"""Legal engine behaviours that SPEC.md allows pass their checks; their illegal neighbours
still fail (the false failures found by the blind correct engines, tests/blind_correct.py
and tests/blind2_correct.py)."""

from __future__ import annotations

import os

import pytest
from test_conformance_units import hook, make_run, snapshot

from conformance import checks
from conformance import expectations as X
from conformance.runs import Run
from conformance.scenario import SCENARIOS
from kit.run.launcher import run
from kit.starter.inject import PROBE_METHOD


def _setup_events(extra_stage1=()):
    """Every role's config and init_config as the kit calls them, plus ``extra_stage1``
    events after stage 1's init_config."""
    events = []
    for role in X.ROLES:
        for name in ("config", "init_config"):
            events.append(hook("hook_enter", role, name, snapshot()))
            events.append(hook("hook_return", role, name, snapshot()))
        if role == "stage1":
            events.extend(extra_stage1)
    return events


def _order_001(events):
    verify = checks.Verifier("root", ["ORDER-001"], "t")
    checks.check_rules(verify, make_run("root", events))
    return verify.violations.get("ORDER-001", [])


def test_an_engine_calling_its_own_config_factory_keeps_order_001():
    # SPEC §1: config returns a fresh, empty config object; an engine may call it itself for
    # the defaults (recorded with caller "engine"): rule 1 counts the starter's calls.
    own = [
        hook("hook_enter", "stage1", "config", snapshot(), caller="engine"),
        hook("hook_return", "stage1", "config", snapshot()),
    ]
    assert _order_001(_setup_events(own)) == []


def test_the_starter_calling_config_twice_still_breaks_order_001():
    again = [
        hook("hook_enter", "stage1", "config", snapshot()),
        hook("hook_return", "stage1", "config", snapshot()),
    ]
    (violation,) = _order_001(_setup_events(again))
    assert "called by the kit" in violation.expected and "2 recorded" in violation.observed


def _probe_records(method, unknown_argument_reply):
    """The RPC server's records of the rpc-probe scenario: the four probes (the second sent
    to ``method`` and answered with ``unknown_argument_reply``), then the oversized frame."""

    def refused(name, error, message="refused"):
        return {
            "kind": "rpc_call",
            "role": "rpc",
            "ok": False,
            "method": name,
            "error": {"type": error, "errno": None, "message": message},
        }

    probe = f"e.{PROBE_METHOD}"
    return [
        refused(probe, "UnknownMethodError"),
        {"kind": "rpc_call", "role": "rpc", "method": method, **unknown_argument_reply},
        refused("", "ProtocolError"),
        refused("", "ProtocolError"),
        refused("", "ProtocolError", "frame of 1048577 bytes exceeds the maximum of 1048576"),
    ]


def _rpc_006(records):
    verify = checks.Verifier("root", ["RPC-005", "RPC-006"], "t")
    checks.check_rpc_probes(verify, make_run("root", records, scenario="rpc-probe"))
    assert verify.violations["RPC-005"] == []
    return verify.violations["RPC-006"]


_UNKNOWN = {"ok": False, "error": {"type": "UnknownMethodError", "errno": None, "message": "no"}}


def test_an_engine_serving_no_method_answers_the_bad_argument_probe_as_unknown():
    # SPEC §6: the server answers "an unknown method ... or bad arguments with an error
    # reply"; with no method to give bad arguments to, the kit sends them to an unknown
    # method, and the unknown-method error is the right answer (blind2-ok-minimal).
    assert _rpc_006(_probe_records(f"e.{PROBE_METHOD}", _UNKNOWN)) == []


def test_the_bad_argument_probe_served_or_misanswered_still_breaks_rpc_006():
    served = {"ok": True}
    (violation,) = _rpc_006(_probe_records(f"e.{PROBE_METHOD}", served))
    assert "UnknownMethodError" in violation.expected
    # A method the engine serves must refuse an argument it does not take with TypeError.
    (violation,) = _rpc_006(_probe_records("e.mount", _UNKNOWN))
    assert "TypeError" in violation.expected and "UnknownMethodError" in violation.observed


@pytest.mark.skipif(os.geteuid() != 0, reason="the real backend as root")
def test_the_rpc_probes_of_an_engine_without_rpc_methods_pass_in_a_real_run():
    result = run(
        "blind2_correct:MinimalEngine",
        "root",
        ["/bin/true"],
        inject=SCENARIOS["rpc-probe"].inject,
        hook_timeout=5,
    )
    verify = checks.Verifier("root", ["RPC-005", "RPC-006"], "t")
    checks.check_rpc_probes(verify, Run("root", SCENARIOS["rpc-probe"], "real", result=result))
    assert verify.violations == {"RPC-005": [], "RPC-006": []}, verify.violations


@pytest.mark.skipif(os.geteuid() != 0, reason="the real backend as root")
def test_an_engine_with_static_rpc_methods_registers_and_calls_them_in_a_real_run():
    # SPEC §1: only an RPC method whose signature cannot be served is an error at
    # registration; blind2-ok-rpc-signatures has two static methods, which its
    # create_container calls (an assertion there fails the run with exit 255).
    result = run("blind2_correct:RPCSignaturesEngine", "root", ["/bin/true"], hook_timeout=5)
    assert result.exit_code == 0, result
    calls = result.ledger.select("rpc_call", role="rpc")
    served = {c["method"].rpartition(".")[2] for c in calls if c.get("ok")}
    assert {"version", "add", "configure"} <= served, calls


@pytest.mark.skipif(os.geteuid() != 0, reason="the real backend as root")
@pytest.mark.parametrize(
    "engine",
    [
        "kit_test_engines:ClosesItsRPCClientEngine",
        "kit_test_engines:ClosesItsRPCClientThenForksEngine",
        "blind2_correct:DupFdsEngine",
    ],
)
def test_an_engine_that_closes_rpc_conn_itself_runs_whole(engine):
    # SPEC §1: rpc_conn is the engine's, to build its RPC client from; the kit's client owns
    # the socket and closes it (its close, a with block). The kit used to fail the run with
    # KitFdClosed "fd -1" (blind2-ok-dup-fds, every requirement of every flow undecided).
    result = run(engine, "root", ["/bin/true"], hook_timeout=5)
    assert result.exit_code == 0, result
    assert not result.ledger.select("fatal")
    assert result.ledger.select("stage2_exec")
    assert not result.ledger.select("rpc_conn_kept")
