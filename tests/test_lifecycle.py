"""The whole lifecycle, for real, in every flow: order, processes, exit code, namespaces."""

from __future__ import annotations

import os

import pytest
from conftest import host_state

from kit.ledger.record import validate
from kit.run.launcher import run

#: (role, hook) in the order SPEC §2 has them, for the reference engine.
STAGE1 = [("stage1", "config"), ("stage1", "init_config"), ("stage1", "prepare_config")]
MASTER_INIT = [("master", "config"), ("master", "init_config")]
STAGE2 = [("stage2", "config"), ("stage2", "init_config"), ("stage2", "start_process")]


@pytest.fixture(scope="module")
def runs() -> dict[str, object]:
    return {}


def lifecycle(flow: str, cache: dict) -> object:
    if flow not in cache:
        cache[flow] = run("reference", flow, ["/bin/sh", "-c", "exit 7"])
    return cache[flow]


def test_exit_code_is_the_payloads(flow, runs):
    result = lifecycle(flow, runs)
    assert result.exit_code == 7, str(result)
    assert result.reason == "exited"
    assert result.leaks == []


def test_ledger_matches_schema(flow, runs):
    result = lifecycle(flow, runs)
    assert validate(result.ledger.document) == []


def test_every_hook_runs_in_its_process_in_order(flow, runs):
    result = lifecycle(flow, runs)
    hooks = list(result.ledger.hooks())
    # Stage 1 strictly first, then the master's config/init_config.
    assert hooks[:3] == STAGE1
    assert [h for h in hooks if h[0] == "master"][:2] == MASTER_INIT
    assert [h for h in hooks if h[0] == "stage2"] == STAGE2
    assert [h for h in hooks if h[0] == "rpc"] == [("rpc", "config"), ("rpc", "init_config")]
    master = [h[1] for h in hooks if h[0] == "master"]
    assert sorted(master[2:]) == sorted(
        ["create_container", "monitor_container", "post_start_process", "cleanup_container"]
    )
    assert master[-1] == "cleanup_container"
    # Each of the eight hooks appears.
    assert {h for _, h in hooks} == {
        "config",
        "init_config",
        "prepare_config",
        "create_container",
        "start_process",
        "post_start_process",
        "monitor_container",
        "cleanup_container",
    }


def test_every_hook_entry_has_a_snapshot(flow, runs):
    result = lifecycle(flow, runs)
    for event in result.ledger.select("hook_enter"):
        snap = event["snapshot"]
        assert snap["threads"], event
        assert set(snap["ns"]) == {"user", "pid", "net", "uts", "ipc", "cgroup", "mount"}
        assert event["escalation"] is not None


def test_stage2_starts_after_create_container_returned_and_rpc_closed(flow, runs):
    events = lifecycle(flow, runs).ledger.events
    seq = {(e["role"], e["kind"], e.get("hook")): e["seq"] for e in events}
    cc_return = seq[("master", "hook_return", "create_container")]
    rpc_exit = next(
        e["seq"] for e in events if e["kind"] == "process_exit" and e.get("child_role") == "rpc"
    )
    stage2_first = min(e["seq"] for e in events if e["role"] == "stage2")
    assert cc_return < rpc_exit < stage2_first


def test_post_start_only_after_exec(flow, runs):
    events = lifecycle(flow, runs).ledger.events
    exec_seq = next(e["seq"] for e in events if e["kind"] == "stage2_exec")
    posts = [e for e in events if e["kind"] == "hook_enter" and e["hook"] == "post_start_process"]
    assert len(posts) == 1 and posts[0]["seq"] > exec_seq


def test_container_pid_namespace_and_pid_one(flow, runs):
    ledger = lifecycle(flow, runs).ledger
    stage2 = ledger.first("hook_enter", role="stage2", hook="start_process")
    master = ledger.first("hook_enter", role="master", hook="create_container")
    rpc = ledger.first("hook_enter", role="rpc", hook="config")
    assert stage2["pid"] == 1
    for kind in ("pid", "net", "uts", "ipc", "cgroup", "mount", "user"):
        assert stage2["snapshot"]["ns"][kind] == rpc["snapshot"]["ns"][kind], kind
    for kind in ("pid", "net", "uts", "ipc", "cgroup", "mount"):
        assert master["snapshot"]["ns"][kind] != stage2["snapshot"]["ns"][kind], kind
    same_user = master["snapshot"]["ns"]["user"] == stage2["snapshot"]["ns"]["user"]
    # root, suid: no user namespace at all; userns, fakeroot: shared; hybrid: container only.
    assert same_user == (flow != "hybrid"), flow


def test_namespaces_are_entered_in_order_with_private_propagation(flow, runs):
    """SPEC §5: user and pid by the clone in the starter, then one kind at a time in the
    container process; / of the new mount namespace private, as the StarterConfig asks."""
    ledger = lifecycle(flow, runs).ledger
    started = ledger.first("container_start")
    setup = ledger.first("namespaces")
    assert (
        started["created"] == (["user", "pid"] if flow != "root" and flow != "suid" else ["pid"])
        and started["joined"] == []
    )
    assert setup["order"] == [
        ["unshare", kind]
        for kind in ("net", "uts", "ipc", "cgroup", "mount")
        if kind in setup["created"]
    ]
    assert setup["propagation"] == "private"
    first_call = ledger.first("rpc_call")
    assert first_call is None or first_call["seq"] > setup["seq"]


def test_mount_propagation_is_read_from_mountinfo(tmp_path):
    from kit.system import linux

    assert linux.propagation_type(["shared:3", "master:1"]) == "shared"
    assert linux.propagation_type(["master:1"]) == "slave"
    assert linux.propagation_type(["unbindable"]) == "unbindable"
    assert linux.propagation_type([]) == "private"
    assert linux.mount_propagation("/") in ("shared", "slave", "private", "unbindable")
    assert linux.mount_propagation(str(tmp_path / "not-a-mount-point")) is None
    assert linux.unescape_mountinfo("/a\\040b") == "/a b"


def test_nothing_left_on_the_host():
    before = host_state()
    result = run("reference", "root", ["/bin/true"])
    after = host_state()
    assert result.exit_code == 0 and result.leaks == []
    assert before == after
    assert not os.path.exists(result.ledger.first("run_start")["run_dir"])


def test_payload_output_and_hostname(flow):
    result = run("reference", flow, ["/bin/sh", "-c", "hostname; id -u; ls /proc"])
    lines = result.stdout.split()
    assert result.exit_code == 0, (str(result), result.stderr)
    assert lines[0] == "kit-container"
    expected_uid = {"root": "0", "suid": None, "userns": None, "fakeroot": "0", "hybrid": "0"}
    uid = expected_uid[flow] or str(result.ledger.first("run_start")["invoker"]["uid"])
    assert lines[1] == uid
    assert "1" in lines[2:]  # the new /proc shows the container's own pid 1
