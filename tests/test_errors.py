"""SPEC §2 error table, hook timeouts, crashes — and that nothing is left behind after any."""

from __future__ import annotations

import os

import pytest
from conftest import host_state

from kit.run.launcher import run

FAULT = "kit_test_engines:FaultEngine"


def fault_run(
    hook: str,
    action: str = "raise",
    role: str = "",
    flow: str = "root",
    argv: list[str] | None = None,
    **options,
):
    before = host_state()
    result = run(
        FAULT,
        flow,
        argv or ["/bin/sh", "-c", "exit 3"],
        engine_config={"fault_hook": hook, "fault_action": action, "fault_role": role},
        **options,
    )
    after = host_state()
    assert before == after, "the run changed the host"
    assert not os.path.exists(result.ledger.first("run_start")["run_dir"])
    return result


def hooks(result) -> list[tuple[str, str]]:
    return list(result.ledger.hooks())


def cleanup_args(result) -> dict:
    """The fatal and status the kit handed to cleanup_container (from the ledger)."""
    events = result.ledger.select("fatal")
    return {"fatal": [e["message"] for e in events]}


def test_prepare_config_raises_no_further_hook_exit_255():
    result = fault_run("prepare_config")
    assert result.exit_code == 255
    assert hooks(result) == [
        ("stage1", "config"),
        ("stage1", "init_config"),
        ("stage1", "prepare_config"),
    ]
    assert (
        result.ledger.first("hook_raise")["error"]["message"] == "injected fault in prepare_config"
    )
    assert result.leaks == []


def test_invalid_starter_config_rejected_before_any_namespace():
    # bounding set without the permitted caps: rejected with the setting's name.
    result = run("reference", "root", ["/bin/true"], engine_config={"capabilities": ["not_a_cap"]})
    assert result.exit_code == 255
    error = result.ledger.first("hook_raise")
    assert "unknown capability 'not_a_cap'" in error["error"]["message"]
    assert not result.ledger.select("namespaces")


def test_create_container_raises_cleanup_gets_creation_failed():
    result = fault_run("create_container")
    assert result.exit_code == 255
    fatal = result.ledger.select("fatal")
    assert fatal and fatal[0]["message"].startswith("container creation failed: RuntimeError")
    assert not [h for h in hooks(result) if h[0] == "stage2"], "stage 2 must never start"
    assert [h for h in hooks(result) if h[1] == "cleanup_container"] == [
        ("master", "cleanup_container")
    ]
    assert not result.ledger.select("hook_enter", hook="post_start_process")
    assert result.leaks == []


def test_start_process_raises_no_post_start_cleanup_without_fatal():
    result = fault_run("start_process")
    assert result.exit_code == 255
    failed = result.ledger.first("stage2_failed")
    assert "start_process failed: RuntimeError: injected fault" in failed["message"]
    assert not result.ledger.select("hook_enter", hook="post_start_process")
    assert not result.ledger.select("fatal")
    assert result.ledger.select("hook_enter", hook="cleanup_container")


def test_start_process_returning_is_a_failure():
    result = fault_run("start_process", "return")
    assert result.exit_code == 255
    assert "stage 2 returned" in result.ledger.first("stage2_failed")["message"]
    assert not result.ledger.select("hook_enter", hook="post_start_process")


@pytest.mark.parametrize("hook", ["post_start_process", "monitor_container"])
def test_master_hook_raises_cleanup_gets_error_exit_255(hook):
    result = fault_run(hook, argv=["/bin/sh", "-c", "sleep 0.3; exit 3"])
    assert result.exit_code == 255
    assert result.ledger.first("fatal")["message"] == f"injected fault in {hook}"
    cleanups = result.ledger.select("hook_enter", hook="cleanup_container")
    assert len(cleanups) == 1
    assert result.leaks == []


def test_cleanup_raises_is_reported_exit_code_unchanged():
    result = fault_run("cleanup_container")
    assert result.exit_code == 3
    assert result.ledger.first("hook_raise", hook="cleanup_container")


@pytest.mark.parametrize(
    "hook,role",
    [
        ("prepare_config", "stage1"),
        ("create_container", "master"),
        ("post_start_process", "master"),
        ("cleanup_container", "master"),
        ("start_process", "stage2"),
        ("init_config", "rpc"),
    ],
)
def test_hung_hook_is_killed_and_named(hook, role):
    result = fault_run(hook, "hang", role=role, hook_timeout=1.0)
    assert result.exit_code == 255
    event = result.ledger.first("hook_timeout")
    assert {"role": role, "hook": hook} in [
        {"role": h["role"], "hook": h["hook"]} for h in event["open_hooks"]
    ]
    if role == "rpc":  # create_container, blocked on the RPC server, may expire first
        assert (event["hook_role"], event["hook"]) in (("master", "create_container"), (role, hook))
    else:
        assert (event["hook_role"], event["hook"]) == (role, hook)
        assert f"hook timeout: {hook} in {role}" in result.reason
    assert result.timed_out["hook"] == event["hook"]
    assert result.leaks == []


def test_create_container_waiting_for_the_container_is_a_named_timeout(shared_dir):
    marker = os.path.join(shared_dir, "payload-started")
    result = run(
        FAULT,
        "root",
        ["/bin/sh", "-c", f"touch {marker}"],
        hook_timeout=1.0,
        shared_dirs=[shared_dir],
        engine_config={
            "fault_hook": "create_container",
            "fault_action": "wait_container",
            "marker": marker,
            "mount_tmp": False,
        },
    )
    assert result.timed_out["hook"] == "create_container"
    assert not os.path.exists(marker), "stage 2 must not start before create_container returns"


@pytest.mark.parametrize("action", ["exit", "segv"])
@pytest.mark.parametrize(
    "hook,role",
    [("create_container", "master"), ("prepare_config", "stage1"), ("start_process", "stage2")],
)
def test_crashing_hook_leaves_nothing_behind(hook, role, action):
    result = fault_run(hook, action, role=role)
    if role == "stage2":
        # start_process may exit instead of exec'ing: its code is the container's.
        assert result.exit_code == (3 if action == "exit" else 128 + 11)
        assert result.ledger.first("stage2_failed")["message"] == (
            "start_process exited with code 3 instead of exec"
            if action == "exit"
            else "stage 2 died before exec"
        )
    else:
        assert result.exit_code == 255
        assert result.reason.startswith("master crashed") or role == "stage1"
    assert result.leaks == []
    assert not result.ledger.select("hook_enter", hook="post_start_process")


def test_leaked_process_is_reported_and_killed():
    result = fault_run("cleanup_container", "leak_process")
    assert [leak["what"] for leak in result.leaks] == ["process"]
    assert result.ledger.first("leak")["what"] == "process"


def test_leaked_temp_dir_is_reported_and_removed():
    result = fault_run("cleanup_container", "leak_tempdir")
    assert [leak["what"] for leak in result.leaks] == ["tempdir"]
    assert "leaked-" in result.leaks[0]["detail"]


@pytest.mark.parametrize("flow", ["suid", "userns", "fakeroot", "hybrid"])
def test_error_rows_hold_in_unprivileged_flows(flow):
    from conftest import require_flow

    require_flow(flow)
    result = fault_run("create_container", flow=flow)
    assert result.exit_code == 255
    assert result.ledger.first("fatal")["message"].startswith("container creation failed")
    result = fault_run("start_process", "hang", role="stage2", flow=flow, hook_timeout=1.0)
    assert result.timed_out["hook"] == "start_process"


def test_killing_the_supervisor_takes_the_whole_run_down(flow):
    import time

    from kit.run.launcher import start
    from kit.system import linux

    handle = start(
        FAULT,
        flow,
        ["/bin/true"],
        hook_timeout=30,
        engine_config={"fault_hook": "cleanup_container", "fault_action": "hang"},
    )
    deadline = time.monotonic() + 10
    # The master is in cleanup_container (hanging) once the container has gone.
    while linux.process_state(handle.starter_pid) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    handle.kill()
    deadline = time.monotonic() + 5
    while linux.process_state(handle.starter_pid) not in (None, "Z"):
        assert time.monotonic() < deadline, "the master survived its supervisor"
        time.sleep(0.01)
