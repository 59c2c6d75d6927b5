"""The starter (stage 1 and the join-only master) fed what it must tell apart: each flow's ids
in each of its processes, a stage 1 and a stage 2 that end without their result, a join-only
payload still running, an unforeseen error in the starter, another module's config class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import wait_until

from kit.contract import FIELD_TYPES, EngineConfig
from kit.run.launcher import run, start
from kit.run.request import Invoker
from kit.starter.stage1 import resolve_config_types
from kit.system import linux
from reference_engines.minimal.engine import ReferenceEngine

JOIN = "kit_test_engines:JoinEngine"
FAULT = "kit_test_engines:FaultEngine"
#: a join-only run that joins the container process's own uts namespace: no target needed
JOIN_OWN = {"join": {"uts": "/proc/self/ns/uts"}}


def _ids(result, role: str, hook: str) -> tuple[list[int], list[int]]:
    thread = result.ledger.first("hook_enter", role=role, hook=hook)["snapshot"]["threads"][0]
    return thread["uid"], thread["gid"]


def test_each_process_of_the_starter_has_the_ids_of_its_flow(flow):
    """SPEC §3: stage 1 runs as U but in the root flow; the master is root (root), the
    setuid starter with r=e=U and saved uid 0 (suid, hybrid), U (userns) or root inside the
    user namespace it entered (fakeroot). The real, effective, saved and fs ids."""
    result = run("reference", flow, ["/bin/true"])
    assert result.exit_code == 0, result.reason
    u = Invoker.resolve()
    me = ([u.uid] * 4, [u.gid] * 4)
    root = ([0] * 4, [0] * 4)
    stage1, master = {
        "root": (root, root),
        "suid": (me, ([u.uid, u.uid, 0, u.uid], [u.gid] * 4)),
        "hybrid": (me, ([u.uid, u.uid, 0, u.uid], [u.gid] * 4)),
        "userns": (me, me),
        "fakeroot": (me, root),
    }[flow]
    assert _ids(result, "stage1", "prepare_config") == stage1
    assert _ids(result, "master", "create_container") == master
    invoker = [0, 0] if flow == "root" else [u.uid, u.gid]
    assert result.ledger.first("starter_config")["config"]["invoker"] == invoker


def test_a_stage_1_that_exits_0_without_its_config_fails_the_run_by_name():
    result = run(
        FAULT,
        "root",
        ["/bin/true"],
        engine_config={"fault_hook": "prepare_config", "fault_action": "exit0"},
    )
    assert result.exit_code == 255
    errors = [(e["stage"], e["message"]) for e in result.ledger.select("starter_error")]
    assert errors == [("starter", "stage 1 failed (exit code 0)")], errors


def test_a_bad_engine_config_is_reported_by_stage_1_and_the_starter_exits_once():
    result = run("reference", "root", ["/bin/true"], engine_config={"hostname": 5})
    assert result.exit_code == 255
    stages = [e["stage"] for e in result.ledger.select("starter_error")]
    assert stages == ["engine_config", "stage1", "starter"], stages
    assert [e["role"] for e in result.ledger.select("starter_exit")] == ["starter"]


def test_an_unforeseen_error_in_the_starter_is_reported_and_the_starter_exits():
    result = run("kit_test_engines:BrokenConfigEngine", "root", ["/bin/true"])
    assert result.exit_code == 255
    error = result.ledger.first("starter_error")
    assert error["stage"] == "starter" and "TypeError" in error["message"], error
    assert result.ledger.first("starter_exit")["code"] == 255


def test_a_join_only_run_records_the_exec():
    result = run(JOIN, "root", ["/bin/sh", "-c", "exit 6"], engine_config=JOIN_OWN)
    assert result.exit_code == 6 and result.leaks == [], result.reason
    assert result.ledger.select("stage2_failed") == [] and result.ledger.select("stage2_exec")


def test_a_join_only_start_process_that_exits_gives_its_code_and_is_named():
    result = run(JOIN, "root", ["/bin/true"], engine_config={**JOIN_OWN, "start_exit": 3})
    assert result.exit_code == 3, result.reason
    assert result.ledger.select("stage2_exec") == []
    assert result.ledger.first("stage2_failed")["message"] == (
        "start_process exited with code 3 instead of exec"
    )


def _waiting_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read() == "do_wait" or linux.process_state(pid) in (None, "Z")
    except FileNotFoundError:
        return True


def test_a_join_only_starter_waits_for_its_payload_to_end():
    r, w = os.pipe()
    try:
        handle = start(
            JOIN, "root", ["/bin/sh", "-c", "read line; exit 5"], stdin=r, engine_config=JOIN_OWN
        )
    finally:
        os.close(r)
    try:
        starter = handle.starter_pid
        assert starter is not None
        # The payload blocks on its stdin until the starter is past the exec and waiting
        # (or, wrongly, gone): a status read without waiting would find it running.
        wait_until(
            lambda: any(linux.process_name(p) == "sh" for p in linux.descendants(starter)),
            what="the payload",
        )
        wait_until(lambda: _waiting_or_gone(starter), what="the starter waiting")
        os.write(w, b"go\n")
    finally:
        os.close(w)
    result = handle.wait()
    assert result.exit_code == 5, result.reason


@dataclass
class ZzzConfig(EngineConfig):
    """A config class of this module, whose name sorts after the engine's module."""

    depth: int = 0


@dataclass
class AaaConfig(EngineConfig):
    """A config class of a module whose name sorts before the engine's (set below: the
    dataclass decorator needs the real one)."""

    depth: int = 0


AaaConfig.__module__ = "aaa_engine"


@dataclass
class UnresolvableConfig(EngineConfig):
    """A config class whose annotation names nothing: resolving it raises NameError."""

    depth: NoSuchType = 0  # type: ignore[name-defined]  # noqa: F821


class UnresolvableEngine(ReferenceEngine):
    engine_name = "test-unresolvable"


def test_a_config_class_that_cannot_be_resolved_ahead_is_left_to_the_engines_processes():
    # Its own processes report the error where they use the config; resolving ahead goes
    # on with the other classes of the module.
    for cls in (UnresolvableConfig, ZzzConfig):
        FIELD_TYPES.pop(cls, None)
    resolve_config_types(f"{__name__}:UnresolvableEngine")
    assert UnresolvableConfig not in FIELD_TYPES and ZzzConfig in FIELD_TYPES


def test_only_the_engines_own_config_classes_are_resolved_ahead():
    from reference_engines.minimal.engine import ReferenceConfig

    assert AaaConfig.__module__ < ReferenceConfig.__module__ < ZzzConfig.__module__
    for cls in (AaaConfig, ReferenceConfig, ZzzConfig):
        FIELD_TYPES.pop(cls, None)
    resolve_config_types("reference")
    assert ReferenceConfig in FIELD_TYPES
    assert AaaConfig not in FIELD_TYPES and ZzzConfig not in FIELD_TYPES


def test_an_unprivileged_starter_refuses_a_map_it_cannot_write_by_name():
    # The kernel refuses these too (EPERM): the starter says why before it tries.
    u = Invoker.resolve()
    wrong = [[u.uid, u.uid, 2], [u.uid, u.uid + 1, 1], [u.uid, u.uid - 1, 1]]
    for uid_map in (*([m] for m in wrong), [[0, u.uid, 1], [1, 1, 1]]):
        result = run(
            "kit_test_engines:MapsEngine",
            "userns",
            ["/bin/true"],
            engine_config={"uid_map": uid_map},
        )
        assert result.exit_code == 255 and result.leaks == []  # the container is killed
        errors = [(e["stage"], e["message"]) for e in result.ledger.select("starter_error")]
        assert errors == [
            (
                "user_namespace",
                f"add_uid_mappings: {uid_map} needs privilege (an unprivileged starter can "
                f"map only its own id {u.uid}, size 1)",
            )
        ]


UNPRIVILEGED_RUNS = """
import json
from kit.run.launcher import run
out = {}
for flow in ("root", "suid", "hybrid"):
    r = run("reference", flow, ["/bin/true"], backend="real", sandbox=False)
    errors = [[e["stage"], e["message"]] for e in r.ledger.select("starter_error")]
    out[flow] = [r.exit_code, errors]
print(json.dumps(out))
"""


def test_a_starter_without_root_refuses_the_flows_that_need_it_by_name():
    # Launched by U itself, as on a machine without sudo: the real backend's starter says
    # which flow needs root instead of failing on the first privileged call.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    # The zygote is root's: the run must be U's own, its request read from JSON by an
    # exec'd supervisor (as the CLI's, not a string object shared through fork).
    env["KIT_ZYGOTE"] = "0"
    proc = subprocess.run(
        ["runuser", "-u", Invoker.resolve().name, "--", sys.executable, "-c", UNPRIVILEGED_RUNS],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    setuid = "needs root to emulate the setuid starter"
    assert json.loads(proc.stdout) == {
        "root": [255, [["starter", "flow root: needs uid 0"]]],
        "suid": [255, [["starter", f"flow suid: {setuid}"]]],
        "hybrid": [255, [["starter", f"flow hybrid: {setuid}"]]],
    }


def test_a_pid_namespace_given_by_path_is_joined_by_the_starter():
    # user and pid are joined in the starter, before the fork: its children are then in the
    # namespace. Outside the host sandbox, which gives a run no pid namespace to join.
    target = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "/bin/sh",
            "-c",
            "echo ready; exec sleep 60",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert target.stdout is not None and target.stdout.readline().strip() == "ready"
        inner = linux.descendants(target.pid)[0]
        path = f"/proc/{inner}/ns/pid"
        result = run(
            JOIN, "root", ["/bin/true"], sandbox=False, engine_config={"join": {"pid": path}}
        )
        assert result.exit_code == 0, result.reason
        stage2 = result.ledger.first("hook_enter", hook="start_process")["snapshot"]["ns"]
        assert stage2["pid"] == os.stat(path).st_ino
    finally:
        target.kill()
        target.wait()
        target.stdout.close()


def test_a_hook_that_raises_in_stage_1_is_reported_once_by_its_hook_raise():
    result = run(FAULT, "root", ["/bin/true"], engine_config={"fault_hook": "prepare_config"})
    assert result.exit_code == 255
    assert result.ledger.first("hook_raise", role="stage1")["hook"] == "prepare_config"
    errors = [(e["stage"], e["message"]) for e in result.ledger.select("starter_error")]
    assert errors == [("starter", "stage 1 failed (exit code 255)")], errors


def test_a_uid_map_the_kernel_refuses_fails_the_run_at_the_user_namespace():
    # A privileged (hybrid) starter writes what it is given: two ranges onto one host id
    # pass the config checks and the kernel says EINVAL; the container is killed, not leaked.
    u = Invoker.resolve()
    result = run(
        "kit_test_engines:MapsEngine",
        "hybrid",
        ["/bin/true"],
        engine_config={"uid_map": [[0, u.uid, 1], [1, u.uid, 1]]},
    )
    assert result.exit_code == 255 and result.leaks == []
    errors = [(e["stage"], e["message"]) for e in result.ledger.select("starter_error")]
    assert errors == [("user_namespace", "[Errno 22] Invalid argument")], errors


def test_a_starter_config_that_fails_its_check_is_named_at_the_check():
    result = run(
        "kit_test_engines:MapsEngine", "userns", ["/bin/true"], engine_config={"uid_map": []}
    )
    assert result.exit_code == 255 and result.leaks == []
    errors = [(e["stage"], e["message"]) for e in result.ledger.select("starter_error")]
    assert errors == [
        ("starter_config", "add_uid_mappings: a new user namespace needs a uid mapping")
    ], errors


def test_the_starter_waits_for_stage_1_to_exit_before_reading_its_status():
    # Stage 1 closes its result pipe (EOF for the starter) and exits 7 only once the starter
    # sleeps in its wait: a status read without waiting would be 0 ("exit code 0").
    result = run(
        FAULT,
        "root",
        ["/bin/true"],
        engine_config={"fault_hook": "prepare_config", "fault_action": "close_pipes_exit_waited"},
    )
    assert result.exit_code == 255 and result.leaks == []
    errors = [(e["stage"], e["message"]) for e in result.ledger.select("starter_error")]
    assert errors == [("starter", "stage 1 failed (exit code 7)")], errors


def test_an_engine_whose_import_fails_in_the_starter_is_named_by_the_starter():
    # The launcher's inspection imports the engine as U; this one fails as root only, so the
    # starter's own import is the first to fail, and it names the engine and the exception,
    # not a traceback of the kit's.
    spec = "import_as_root_broken:RootShyEngine"
    result = run(spec, "root", ["/bin/true"])
    assert result.exit_code == 255
    errors = [(e["stage"], e["message"]) for e in result.ledger.select("starter_error")]
    assert len(errors) == 1 and errors[0][0] == "starter", errors
    assert errors[0][1].startswith(f"importing engine {spec}: RegistryError: "), errors
    assert errors[0][1].endswith("this engine refuses to be imported as root"), errors


#: A fresh interpreter loads an engine as the starter does, then says which netlink modules
#: it holds (pyroute2 imports its message classes lazily, on the first round trip).
LOAD = (
    "import json, sys\n"
    "from kit.starter.stage1 import load_engine\n"
    "load_engine(sys.argv[1])\n"
    "print(json.dumps({'pyroute2': 'pyroute2' in sys.modules,"
    " 'ifinfmsg': 'pyroute2.netlink.rtnl.ifinfmsg' in sys.modules,"
    " 'bytecode': sys.dont_write_bytecode}))\n"
)


def _loaded(engine: str) -> dict[str, bool]:
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, engine],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_starter_loads_pyroute2_only_for_an_engine_that_uses_it():
    # An engine that imports pyroute2 gets its lazily imported modules while the starter can
    # still read them; one that does not is spared the ~110 ms. Bytecode is never written.
    assert _loaded("reference") == {"pyroute2": False, "ifinfmsg": False, "bytecode": True}
    assert _loaded("pyroute2_engine:NetlinkEngine") == {
        "pyroute2": True,
        "ifinfmsg": True,
        "bytecode": True,
    }


#: In a fresh interpreter with every descriptor taken: the ledger socket cannot be moved high,
#: and stays where it is (the run goes on with it there) instead of failing the starter.
NO_ROOM = (
    "import json, os, resource, socket\n"
    "from kit.starter.stage1 import _moved_high\n"
    "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
    "a, b = socket.socketpair()\n"
    "number = a.fileno()\n"
    "held = []\n"
    "try:\n"
    "    while True:\n"
    "        held.append(os.dup(0))\n"
    "except OSError:\n"
    "    pass\n"
    "s = _moved_high(a)\n"
    "print(json.dumps({'same': s is a, 'number': s.fileno() == number, 'full': len(held) > 0}))\n"
)


def test_a_ledger_socket_with_no_room_above_stays_where_it_is():
    proc = subprocess.run(
        [sys.executable, "-c", NO_ROOM],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"same": True, "number": True, "full": True}


@pytest.mark.parametrize(
    ("abuse", "message"),
    [
        ("self", "stage 1's channel: the sending end itself came as a descriptor"),
        ("unkept", "stage 1 sent 1 descriptors numbered []: not those keep_file_descriptor"),
    ],
)
def test_engine_code_writing_on_stage_1s_channel_fails_the_run_by_name(abuse, message):
    result = run(
        "kit_test_engines:Stage1ChannelAbuseEngine",
        "root",
        ["/bin/true"],
        engine_config={"abuse": abuse},
        run_timeout=20,
    )
    assert result.exit_code == 255, result.reason
    errors = [e["message"] for e in result.ledger.select("starter_error")]
    assert any(m.startswith(message) for m in errors), errors
    assert not result.ledger.select("container_start")
    assert result.leaks == []
