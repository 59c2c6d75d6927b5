"""A one-shot run (kit.run.oneshot, ``kit run``): the engine's inspection and the run's host
sandbox are made side by side before the run is forked; what they make is the run's, or
gone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import in_child

from kit.run import hostdiff
from kit.system import linux

TESTS = Path(__file__).resolve().parent
HOSTILE = "kit_test_engines:HostAttackEngine"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the host sandbox needs root")


def _alive(pid: int) -> bool:
    return linux.process_state(pid) not in (None, "Z")


def test_a_one_shot_adopts_the_sandbox_built_while_its_engine_was_inspected():
    def scenario() -> dict[str, Any]:
        from kit.run.launcher import make_request
        from kit.run.oneshot import OneShot

        one_shot = OneShot(make_request("reference", "root", ["/bin/true"]))
        assert one_shot.ahead is not None and one_shot.ahead.building is not None
        init = one_shot.ahead.building.init_pid
        run_dir, scratch = one_shot.ahead.run_dir, one_shot.ahead.building.scratch
        # Both children were started before the verdict was asked for: the init is this
        # process's child, building meanwhile.
        parent_then = linux.process_parents().get(init)
        problems = one_shot.problems()
        handle = one_shot.start()
        adopted = handle.sandbox["sandbox_pid"] if handle.sandbox else None
        code = handle.wait().exit_code
        return {
            "parent": parent_then == os.getpid(),
            "problems": [str(p) for p in problems],
            "adopted": adopted == init,
            "code": code,
            "init_left": linux.process_state(init) is not None,
            "run_dir_left": os.path.exists(run_dir),
            "scratch_left": os.path.exists(scratch),
        }

    assert in_child(scenario) == {
        "ok": {
            "parent": True,
            "problems": [],
            "adopted": True,
            "code": 0,
            "init_left": False,
            "run_dir_left": False,
            "scratch_left": False,
        }
    }


def test_a_one_shot_whose_engine_has_problems_leaves_nothing_of_what_it_made():
    def scenario() -> dict[str, Any]:
        from kit.run.launcher import make_request
        from kit.run.oneshot import OneShot

        one_shot = OneShot(make_request("no-such-engine-of-kit-tests", "root", ["/bin/true"]))
        assert one_shot.ahead is not None and one_shot.ahead.building is not None
        init = one_shot.ahead.building.init_pid
        run_dir, scratch = one_shot.ahead.run_dir, one_shot.ahead.building.scratch
        problems = one_shot.problems()
        one_shot.cancel()
        one_shot.cancel()  # a second cancel has nothing left to do
        return {
            "hooks": [p.hook for p in problems],
            "init_left": linux.process_state(init) is not None,  # a zombie counts
            "run_dir_left": os.path.exists(run_dir),
            "scratch_left": os.path.exists(scratch),
        }

    assert in_child(scenario) == {
        "ok": {
            "hooks": ["registration"],
            "init_left": False,
            "run_dir_left": False,
            "scratch_left": False,
        }
    }


def test_a_sandbox_primes_the_fresh_state_as_a_new_network_namespace_would():
    # A one-shot run reads what a fresh sandbox has in the sandbox built for it (before its
    # run), not in a network namespace made for the purpose: both must read the same. The
    # host's own namespace (another link, other values) would not.
    def scenario() -> dict[str, Any]:
        from kit.run import supervisor

        ahead = supervisor.start_ahead()
        try:
            assert ahead.building is not None and ahead.building.pidfd is not None
            ahead.building.wait_ready()
            hostdiff._prime_in(ahead.building.pidfd)
            from_sandbox = (hostdiff._fresh_sysctls, hostdiff._fresh_layout)
        finally:
            ahead.drop()
        hostdiff._fresh_sysctls = hostdiff._fresh_layout = hostdiff._fresh_raw = None
        hostdiff.prime()
        assert from_sandbox[0] is not None and from_sandbox[1] is not None
        return {
            "sysctls": len(from_sandbox[0]) > 100 and from_sandbox[0] == hostdiff._fresh_sysctls,
            "layout": from_sandbox[1] == hostdiff._fresh_layout,
        }

    assert in_child(scenario) == {"ok": {"sysctls": True, "layout": True}}


def test_a_one_shot_reports_what_its_engine_changed_and_the_host_keeps_its_own(tmp_path):
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        forwarding = f.read()
    hostname = socket.gethostname()
    ledger = tmp_path / "ledger.json"
    config = {"acts": ["hostname", "sysctl_net"], "unique": f"one-shot-{os.getpid()}"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kit",
            "run",
            "--engine",
            HOSTILE,
            "--flow",
            "root",
            "--ledger",
            str(ledger),
            "--no-probes",
            "--config",
            json.dumps(config),
            "--",
            "/bin/true",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=TESTS,
    )
    assert proc.returncode == 0, proc.stderr
    changes = next(
        e["changes"]
        for e in json.loads(ledger.read_text())["events"]
        if e["kind"] == "host_changes"
    )
    changed = {(c["kind"], c["name"]): (c["before"], c["after"]) for c in changes}
    assert changed[("hostname", "hostname")] == (hostname, f"hostile-one-shot-{os.getpid()}")
    assert changed[("sysctl", "net.ipv4.ip_forward")][1] == "1"
    assert "kit run: host: sysctl net.ipv4.ip_forward" in proc.stderr
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read() == forwarding
    assert socket.gethostname() == hostname
