"""The whole lifecycle on the fake backend, in every flow: exit code, order, processes,
privilege snapshots from the model, the error table — and the backend selection (CLI,
``auto``).

The fake backend needs no namespace and no privilege, so none of these tests depends on
what this machine allows (tests/test_fake_unprivileged.py runs them as an unprivileged user
where namespaces are denied).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ALL_FLOWS, host_state

from kit.ledger import probe
from kit.ledger.record import validate
from kit.run import environment
from kit.run.launcher import make_request, run

FAULT = "kit_test_engines:FaultEngine"
JOIN = "kit_test_engines:JoinEngine"
STAGE1 = [("stage1", "config"), ("stage1", "init_config"), ("stage1", "prepare_config")]
MASTER_INIT = [("master", "config"), ("master", "init_config")]
STAGE2 = [("stage2", "config"), ("stage2", "init_config"), ("stage2", "start_process")]
NS_KINDS = ("user", "pid", "net", "uts", "ipc", "cgroup", "mount")


@pytest.fixture(params=ALL_FLOWS)
def fflow(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def runs() -> dict[str, object]:
    return {}


def lifecycle(flow: str, cache: dict) -> object:
    if flow not in cache:
        before = host_state()
        cache[flow] = run("reference", flow, ["/bin/sh", "-c", "exit 7"], backend="fake")
        cache[flow].host_unchanged = before == host_state()
    return cache[flow]


def hook(result, role: str, name: str) -> dict:
    event = result.ledger.first("hook_enter", role=role, hook=name)
    assert event is not None, (role, name)
    return event


def thread0(event: dict) -> dict:
    return event["snapshot"]["threads"][0]


# --- the lifecycle ------------------------------------------------------------------------


def test_exit_code_backend_and_no_leaks(fflow, runs):
    result = lifecycle(fflow, runs)
    assert result.exit_code == 7, str(result)
    assert result.reason == "exited"
    assert result.leaks == []
    assert result.host_unchanged
    assert result.ledger.first("run_start")["backend"] == "fake"
    assert validate(result.ledger.document) == []


def test_hook_order(fflow, runs):
    result = lifecycle(fflow, runs)
    hooks = list(result.ledger.hooks())
    assert hooks[:3] == STAGE1
    assert [h for h in hooks if h[0] == "master"][:2] == MASTER_INIT
    assert [h for h in hooks if h[0] == "stage2"] == STAGE2
    assert [h for h in hooks if h[0] == "rpc"] == [("rpc", "config"), ("rpc", "init_config")]
    master = [h[1] for h in hooks if h[0] == "master"]
    assert sorted(master[2:]) == sorted(
        ["create_container", "monitor_container", "post_start_process", "cleanup_container"]
    )
    assert master[-1] == "cleanup_container"
    events = result.ledger.events
    seq = {(e["role"], e["kind"], e.get("hook")): e["seq"] for e in events}
    rpc_exit = next(
        e["seq"] for e in events if e["kind"] == "process_exit" and e.get("child_role") == "rpc"
    )
    stage2_first = min(e["seq"] for e in events if e["role"] == "stage2")
    assert seq[("master", "hook_return", "create_container")] < rpc_exit < stage2_first
    exec_seq = next(e["seq"] for e in events if e["kind"] == "stage2_exec")
    assert seq[("master", "hook_enter", "post_start_process")] > exec_seq


def test_rpc_calls_reached_the_model(fflow, runs):
    calls = lifecycle(fflow, runs).ledger.select("rpc_call")
    assert [(c["method"], c["ok"]) for c in calls] == [
        ("reference.sethostname", True),
        ("reference.mount", True),
        ("reference.mount", True),
    ]


def test_pids_and_namespaces(fflow, runs):
    result = lifecycle(fflow, runs)
    stage2 = hook(result, "stage2", "start_process")
    master = hook(result, "master", "create_container")
    rpc = hook(result, "rpc", "config")
    stage1 = hook(result, "stage1", "prepare_config")
    assert stage2["pid"] == 1 and stage2["snapshot"]["nspid"] == [1]  # the container's /proc
    assert rpc["pid"] == 2 and rpc["snapshot"]["nspid"][1:] == [2]  # before /proc is mounted
    assert master["pid"] == master["snapshot"]["nspid"][0] > 1  # 2 in the host sandbox
    for kind in NS_KINDS:
        assert stage2["snapshot"]["ns"][kind] == rpc["snapshot"]["ns"][kind], kind
    for kind in ("pid", "net", "uts", "ipc", "cgroup", "mount"):
        assert master["snapshot"]["ns"][kind] != stage2["snapshot"]["ns"][kind], kind
        assert master["snapshot"]["ns"][kind] == stage1["snapshot"]["ns"][kind], kind
    same_user = master["snapshot"]["ns"]["user"] == stage2["snapshot"]["ns"]["user"]
    assert same_user == (fflow != "hybrid")
    host_user = stage1["snapshot"]["ns"]["user"] == os.stat("/proc/self/ns/user").st_ino
    assert host_user  # the model's initial namespaces are the real ones
    created = result.ledger.first("namespaces")
    assert (
        created["ns"] == stage2["snapshot"]["ns"]
        or created["ns"]["pid"] == stage2["snapshot"]["ns"]["pid"]
    )


def test_privileges_per_flow(fflow, runs):
    """SPEC §4, read from the model."""
    result = lifecycle(fflow, runs)
    u = result.ledger.first("run_start")["invoker"]
    stage1, stage2 = (
        hook(result, "stage1", "prepare_config"),
        hook(result, "stage2", "start_process"),
    )
    master, rpc = hook(result, "master", "create_container"), hook(result, "rpc", "config")
    s1, s2, m, r = (thread0(e) for e in (stage1, stage2, master, rpc))
    if fflow == "root":
        assert s1["uid"] == [0] * 4 and s1["caps"]["permitted"]
        assert m["uid"] == [0] * 4 and s2["uid"] == [0] * 4
        assert "CAP_SYS_ADMIN" not in s2["caps"]["effective"]  # Docker's default set
        assert "CAP_CHOWN" in s2["caps"]["effective"]
        return
    assert s2["no_new_privs"] is True
    assert s2["caps"]["permitted"] == s2["caps"]["effective"] == []
    assert s2["caps"]["bounding"] == []
    if fflow in ("suid", "hybrid"):
        assert s1["uid"] == [u["uid"]] * 4 and s1["caps"]["permitted"] == []
        assert s1["no_new_privs"] is True
        # The setuid master: r=e=U, saved uid 0, no effective capabilities.
        assert m["uid"][:3] == [u["uid"], u["uid"], 0]
        assert m["caps"]["effective"] == [] and m["caps"]["permitted"]
        assert master["escalation"]["setresuid_root"] is True
        assert master["escalation"]["host_escalation"] is True
        assert master["snapshot"]["uid_map"] == probe.FULL_MAP
        ret = result.ledger.first("hook_return", role="master", hook="create_container")
        assert ret["snapshot"]["threads"][0]["caps"]["effective"] == []
    if fflow == "suid":
        assert r["uid"][1] == u["uid"] and r["caps"]["effective"] == ["CAP_SYS_ADMIN"]
        assert len(r["caps"]["bounding"]) == 10
        assert s2["uid"] == [u["uid"]] * 4 and 0 not in s2["uid"]
    if fflow == "userns":
        assert m["uid"] == [u["uid"]] * 4 and s2["uid"] == [u["uid"]] * 4
        assert master["snapshot"]["uid_map"] == [[u["uid"], u["uid"], 1]]
        assert master["escalation"]["host_userns"] is False
    if fflow in ("fakeroot", "hybrid"):
        assert s2["uid"] == [0] * 4  # uid 0 in the namespace ...
        assert stage2["snapshot"]["uid_map"] == [[0, u["uid"], 1]]  # ... which is U
        assert r["uid"] == [0] * 4
    if fflow == "fakeroot":
        assert m["uid"] == [0] * 4 and master["escalation"]["host_escalation"] is False
    assert stage2["escalation"]["host_escalation"] is False
    if fflow in ("suid", "hybrid"):
        assert stage1["escalation"]["host_escalation"] is False
    if fflow in ("userns", "fakeroot"):
        assert not probe.host_privilege(stage1["snapshot"])
        assert not probe.host_privilege(master["snapshot"])
        assert stage1["escalation"]["setuid_exec"] is True  # plain U: a setuid binary


def test_every_hook_has_a_snapshot_of_every_thread(fflow, runs):
    result = lifecycle(fflow, runs)
    for event in result.ledger.select("hook_enter"):
        snap = event["snapshot"]
        assert set(snap) == set(probe.SNAPSHOT_KEYS)
        assert set(snap["ns"]) == set(NS_KINDS)
        assert snap["threads"] and event["escalation"] is not None
        assert set(event["escalation"]) >= {
            "setresuid_root",
            "raise_caps",
            "setuid_exec",
            "host_userns",
            "host_escalation",
        }
    post = hook(result, "master", "post_start_process")
    tids = {t["tid"] for t in post["snapshot"]["threads"]}  # by real tid
    assert post["tid"] != post["pid"] and {post["tid"], post["pid"]} <= tids, tids


# --- the error table in fake mode -----------------------------------------------------------


def fault(hook_name: str, action: str = "raise", role: str = "", flow: str = "root", **options):
    before = host_state()
    result = run(
        FAULT,
        flow,
        ["/bin/sh", "-c", "exit 3"],
        backend="fake",
        engine_config={"fault_hook": hook_name, "fault_action": action, "fault_role": role},
        **options,
    )
    assert before == host_state()
    assert result.leaks == []
    return result


def test_prepare_config_raises():
    result = fault("prepare_config")
    assert result.exit_code == 255 and list(result.ledger.hooks()) == STAGE1


@pytest.mark.parametrize("flow", ["root", "suid", "fakeroot"])
def test_create_container_raises(flow):
    result = fault("create_container", flow=flow)
    assert result.exit_code == 255
    assert result.ledger.first("fatal")["message"].startswith("container creation failed")
    assert not [h for h in result.ledger.hooks() if h[0] == "stage2"]
    assert len(result.ledger.select("hook_enter", hook="cleanup_container")) == 1


def test_start_process_raises():
    result = fault("start_process")
    assert result.exit_code == 255
    assert "injected fault" in result.ledger.first("stage2_failed")["message"]
    assert not result.ledger.select("hook_enter", hook="post_start_process")


def test_cleanup_raises_exit_code_unchanged():
    assert fault("cleanup_container").exit_code == 3


@pytest.mark.parametrize("flow", ["suid", "hybrid"])
def test_hung_hook_is_killed_and_named(flow):
    result = fault("start_process", "hang", role="stage2", flow=flow, hook_timeout=1.0)
    assert result.exit_code == 255
    assert result.timed_out["hook"] == "start_process"


def test_join_only_run_joins_by_path():
    # A process outside the run (not in the model's registry): the model resolves its
    # namespaces by their real inode numbers (here the host's, the model's initial ones).
    # Outside the host sandbox, where the host's processes can be named by path.
    other = subprocess.Popen(["sleep", "60"])
    try:
        result = run(
            JOIN,
            "root",
            ["/bin/true"],
            backend="fake",
            sandbox=False,
            engine_config={
                "join": {"uts": f"/proc/{other.pid}/ns/uts", "net": f"/proc/{other.pid}/ns/net"}
            },
        )
    finally:
        other.kill()
        other.wait()
    assert result.exit_code == 0, str(result)
    assert [h for h in result.ledger.hooks()] == STAGE1 + STAGE2
    stage2 = hook(result, "stage2", "start_process")
    assert stage2["snapshot"]["ns"]["uts"] == os.stat("/proc/self/ns/uts").st_ino
    result = run(
        JOIN,
        "root",
        ["/bin/true"],
        backend="fake",
        sandbox=False,
        engine_config={"join": {"uts": "/proc/999999999/ns/uts"}},
    )
    assert result.exit_code == 255
    assert "999999999" in result.ledger.first("starter_error")["message"]


def test_unprivileged_user_cannot_set_the_host_hostname_through_the_model():
    # userns flow without a uts namespace of its own: the host's hostname is refused.
    result = run(
        "reference",
        "userns",
        ["/bin/true"],
        backend="fake",
        engine_config={"namespaces": ["mount", "pid", "net", "ipc", "cgroup"], "hostname": None},
    )
    assert result.exit_code == 0, str(result)
    result = run(
        "reference",
        "suid",
        ["/bin/true"],
        backend="fake",
        engine_config={"namespaces": ["mount", "pid"], "hostname": None, "mount_tmp": False},
    )
    assert result.exit_code == 0, str(result)


# --- backend selection ------------------------------------------------------------------------


def test_auto_resolves_per_flow():
    for flow in ALL_FLOWS:
        backend, why = environment.backend_for(flow)
        ok, _real_why = environment.flows()[flow]
        assert backend == ("real" if ok else "fake") and why
        assert make_request("reference", flow, ["/bin/true"], backend="auto").backend == backend
    with pytest.raises(ValueError):
        make_request("reference", "root", ["/bin/true"], backend="magic")


def kit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kit", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_run_with_the_fake_backend(tmp_path):
    ledger = tmp_path / "ledger.json"
    proc = kit_cli(
        "run",
        "--backend",
        "fake",
        "--engine",
        "reference",
        "--flow",
        "hybrid",
        "--ledger",
        str(ledger),
        "--",
        "/bin/sh",
        "-c",
        "exit 7",
    )
    assert proc.returncode == 7, proc.stderr
    doc = json.loads(ledger.read_text())
    assert doc["events"][0]["backend"] == "fake" and doc["run"]["backend"] == "fake"


def test_cli_flows_shows_the_choice_and_the_reason():
    proc = kit_cli("flows")
    assert proc.returncode == 0
    for line in proc.stdout.splitlines():
        flow, backend, why = line.split(None, 2)
        assert backend in ("real", "fake") and why
        assert (backend, why) == environment.backend_for(flow)


def test_cli_rejects_an_unknown_backend():
    proc = kit_cli(
        "run", "--backend", "magic", "--engine", "reference", "--flow", "root", "--", "/bin/true"
    )
    assert proc.returncode == 2 and "--backend" in proc.stderr


@pytest.mark.parametrize("flow", ALL_FLOWS)
def test_a_daemon_in_the_containers_pid_namespace_dies_with_its_init(flow):
    # As the kernel does: when the container (init of its pid namespace) exits, the rest of
    # the namespace is killed. A daemon the RPC server left there is no leak of the engine's.
    result = run("blind_correct:ContainerDaemonEngine", flow, ["/bin/true"], backend="fake")
    assert result.exit_code == 0, str(result)
    assert result.leaks == [], result.leaks
    processes = [c for c in result.host_changes if c.get("kind") == "process"]
    assert processes == [], processes


def test_a_file_written_under_a_modelled_mount_makes_the_run_beyond_the_model():
    # The reference's /tmp is a tmpfs only the model mounts: the payload's file lands on the
    # sandbox's /tmp, where the host diff sees it as it would an engine's write to the host.
    # SPEC §9: not-configured (a model_limit), never failed. A file elsewhere is judged.
    if os.geteuid() != 0:
        pytest.skip("its payload writes files: only the host sandbox (as root) keeps them")
    script = "echo x > /tmp/kit-fake-model-file; echo y > /var/tmp/kit-fake-host-file"
    result = run("reference", "root", ["/bin/sh", "-c", script], backend="fake")
    assert result.exit_code == 0, result.reason
    (limit,) = result.ledger.select("model_limit")
    assert "/tmp/kit-fake-model-file" in limit["reason"]
    assert "/var/tmp" not in limit["reason"]
    changed = {c["name"] for c in result.ledger.first("host_changes")["changes"]}
    assert {"/tmp/kit-fake-model-file", "/var/tmp/kit-fake-host-file"} <= changed
    assert not os.path.exists("/tmp/kit-fake-model-file")  # the sandbox's, gone with it
    # without the file under the modelled mount, nothing is beyond the model
    clean = run(
        "reference", "root", ["/bin/sh", "-c", "echo y > /var/tmp/kit-fake-h"], backend="fake"
    )
    assert clean.ledger.select("model_limit") == []
