"""Stage 2 credentials as configured: target ids, the five capability sets, no_new_privs,
loopback, mount propagation — checked in the ledger and in the payload's own /proc."""

from __future__ import annotations

import pytest
from conftest import require_flow

from kit.run.launcher import run

CAPS = "kit_test_engines:CapsEngine"
STATUS = ["/bin/sh", "-c", "grep -E '^(Uid|Gid|Groups|Cap|NoNewPrivs)' /proc/self/status"]


def status_of(stdout: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in stdout.splitlines())}


def test_target_uid_and_gids_in_the_root_flow():
    result = run(
        "reference", "root", STATUS, engine_config={"target_uid": 1234, "target_gids": [2345, 77]}
    )
    assert result.exit_code == 0, result.stderr
    status = status_of(result.stdout)
    assert status["Uid"].split() == ["1234"] * 4
    assert status["Gid"].split() == ["2345"] * 4
    assert status["Groups"].split() == ["77"]
    snap = result.ledger.first("hook_enter", hook="start_process")["snapshot"]["threads"][0]
    assert snap["uid"] == [1234] * 4 and snap["gid"] == [2345] * 4


def test_five_capability_sets_applied_exactly():
    caps = {
        "bounding": ["CAP_CHOWN", "CAP_NET_RAW", "CAP_KILL"],
        "permitted": ["CAP_CHOWN", "CAP_NET_RAW"],
        "effective": ["CAP_CHOWN"],
        "inheritable": ["CAP_NET_RAW"],
        "ambient": ["CAP_NET_RAW"],
    }
    result = run(
        CAPS,
        "root",
        STATUS,
        engine_config={"caps": caps, "target_uid": 1234, "target_gids": [1234]},
    )
    assert result.exit_code == 0, result.stderr
    snap = result.ledger.first("hook_enter", hook="start_process")["snapshot"]["threads"][0]
    for kind, names in caps.items():
        assert snap["caps"][kind] == sorted(names), kind
    # After exec as uid 1234 the kernel keeps only what ambient carries (cap 13 = NET_RAW).
    status = status_of(result.stdout)
    assert int(status["CapEff"], 16) == 1 << 13
    assert int(status["CapAmb"], 16) == 1 << 13
    assert int(status["CapBnd"], 16) == (1 << 0) | (1 << 13) | (1 << 5)


def test_non_root_flows_have_no_caps_and_no_new_privs(flow):
    result = run("reference", flow, STATUS)
    assert result.exit_code == 0, result.stderr
    status = status_of(result.stdout)
    if flow != "root":
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        assert status["NoNewPrivs"] == "1"
        assert "0" not in status["Uid"].split() or flow in ("fakeroot", "hybrid")


def test_loopback_is_up_in_the_new_network_namespace():
    result = run("reference", "root", ["/bin/sh", "-c", "cat /proc/net/if_inet6 /proc/net/dev"])
    assert result.exit_code == 0, result.stderr
    # An interface that is up has its IPv6 loopback address; only lo exists in the new netns.
    assert "lo" in result.stdout and "eth" not in result.stdout
    assert "00000000000000000000000000000001" in result.stdout


@pytest.mark.parametrize("propagation,tag", [("rprivate", None), ("rshared", "shared:")])
def test_mount_propagation_of_the_container_root(propagation, tag):
    result = run(
        CAPS,
        "root",
        ["/bin/sh", "-c", "grep ' / / ' /proc/self/mountinfo"],
        engine_config={"propagation": propagation},
    )
    assert result.exit_code == 0, result.stderr
    line = result.stdout.strip()
    if tag is None:
        assert "shared:" not in line and "master:" not in line
    else:
        assert tag in line


def test_an_rpc_server_left_in_the_host_user_namespace_in_hybrid_gets_no_host_root():
    # The hybrid RPC server becomes the root its user namespace maps U to. An engine that
    # asks for no user namespace in the hybrid flow leaves it in the host user namespace,
    # with the setuid starter's effective uid 0: it must then drop as in suid (e=U), not
    # become host root with CAP_SYS_ADMIN (engine code serves RPC methods there).
    require_flow("hybrid")
    result = run("kit_test_engines:HybridAsSuidEngine", "hybrid", ["/bin/true"])
    calls = [e for e in result.ledger.events if e["kind"] == "rpc_call"]
    assert calls, result.reason
    for call in calls:
        for creds in (call["creds"]["before"], call["creds"]["after"]):
            ruid, euid, _, fsuid = creds["uid"]
            assert 0 not in (ruid, euid, fsuid), (call["method"], creds["uid"])


@pytest.mark.parametrize("flow", ["suid", "userns"])
def test_requests_refused_before_a_method_ran_carry_the_servers_credentials_too(flow):
    # PRIV-RPC-004 holds a call without them for a record engine code took out; a refused
    # request's is the server's state as it found and left it.
    require_flow(flow)
    result = run("kit_test_engines:RefusedCallsEngine", flow, ["/bin/true"])
    calls = [e for e in result.ledger.events if e["kind"] == "rpc_call"]
    refused = [e for e in calls if not e["ok"]]
    assert len(refused) == 2 and len(calls) > 2, result.reason
    for call in calls:
        before, after = call["creds"]["before"], call["creds"]["after"]
        assert isinstance(before, dict) and isinstance(after, dict), call["method"]
        assert before["threads"] and after["threads"]
    for call in refused:
        assert call["creds"]["before"] == call["creds"]["after"]
