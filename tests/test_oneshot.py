"""A one-shot run (kit.run.oneshot, ``kit run``): the engine's inspection and the run's host
sandbox are made side by side before the run is forked; what they make is the run's, or
gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import in_child, open_fds

from kit.run import hostdiff, sandbox
from kit.system import linux

TESTS = Path(__file__).resolve().parent
HOSTILE = "kit_test_engines:HostAttackEngine"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the host sandbox needs root")


def _unprimed() -> None:
    """Forget what this process (pytest's, forked) knows of a fresh sandbox: the one-shot
    path then primes from its own sandbox, as a new ``kit run`` does."""
    hostdiff._fresh_sysctls = hostdiff._fresh_layout = hostdiff._fresh_raw = None


def _one_shot(spec: str) -> tuple[Any, int, str]:
    """A one-shot run of ``spec`` started, with its sandbox's init and its run directory."""
    from kit.run.launcher import make_request
    from kit.run.oneshot import OneShot

    one_shot = OneShot(make_request(spec, "root", ["/bin/true"]))
    assert one_shot.ahead is not None and one_shot.ahead.building is not None
    return one_shot, one_shot.ahead.building.init_pid, one_shot.ahead.run_dir


def test_a_one_shot_adopts_the_sandbox_built_while_its_engine_was_inspected():
    def scenario() -> dict[str, Any]:
        _unprimed()
        sandbox.host_mount_table()  # cached, held open by design: in the baseline
        fds = open_fds()
        one_shot, init, run_dir = _one_shot("reference")
        # Both children were started before the verdict was asked for: the init is this
        # process's child, and what a fresh sandbox has was read in it.
        parent_then = linux.process_parents().get(init)
        primed = hostdiff._fresh_sysctls is not None
        problems = one_shot.problems()
        handle = one_shot.start()
        adopted = handle.sandbox["sandbox_pid"] if handle.sandbox else None
        code = handle.wait().exit_code
        return {
            "parent": parent_then == os.getpid(),
            "primed": primed,
            "problems": [str(p) for p in problems],
            "adopted": adopted == init,
            "code": code,
            "init_left": linux.process_state(init) is not None,  # a zombie counts
            "run_dir_left": os.path.exists(run_dir),
            "fds_left": sorted(set(open_fds()) - set(fds)),
        }

    assert in_child(scenario) == {
        "ok": {
            "parent": True,
            "primed": True,
            "problems": [],
            "adopted": True,
            "code": 0,
            "init_left": False,
            "run_dir_left": False,
            "fds_left": [],
        }
    }


def test_a_one_shot_whose_engine_has_problems_leaves_nothing_of_what_it_made():
    def scenario() -> dict[str, Any]:
        from kit.run.launcher import LaunchError

        sandbox.host_mount_table()  # cached, held open by design: in the baseline
        fds = open_fds()
        one_shot, init, run_dir = _one_shot("no-such-engine-of-kit-tests")
        problems = one_shot.problems()
        one_shot.cancel()
        one_shot.cancel()  # a second cancel has nothing left to do
        return {
            "hooks": [p.hook for p in problems],
            "init_left": linux.process_state(init) is not None,  # a zombie counts
            "run_dir_left": os.path.exists(run_dir),
            "fds_left": sorted(set(open_fds()) - set(fds)),
            "start": _raised(one_shot.start, LaunchError),
        }

    assert in_child(scenario) == {
        "ok": {
            "hooks": ["registration"],
            "init_left": False,
            "run_dir_left": False,
            "fds_left": [],
            "start": True,
        }
    }


def test_a_one_shot_never_starts_the_run_of_an_engine_with_problems_unasked():
    # start() without problems() first: the verdict is waited for all the same, and a
    # problem ends the one-shot instead of forking the run. (The engine loads: only
    # preflight, not the preload, would stop its run.)
    def scenario() -> dict[str, Any]:
        from kit.run.launcher import LaunchError

        one_shot, init, _ = _one_shot("author_engines:UnservableRPCEngine")
        try:
            one_shot.start().wait()
            refused = ""
        except LaunchError as exc:
            refused = str(exc)
        return {
            "refused": refused.startswith("engine author-unservable-rpc: rpc_methods:"),
            "init_left": linux.process_state(init) is not None,
            "children": linux.descendants(os.getpid()),
        }

    assert in_child(scenario) == {"ok": {"refused": True, "init_left": False, "children": []}}


def test_a_sandbox_built_by_a_process_with_a_terminal_has_no_terminal():
    # The CLI builds the run's sandbox itself: its init must not share the CLI's session,
    # whose controlling terminal (the user's shell) engine code could reach from there.
    def scenario() -> dict[str, Any]:
        import fcntl
        import termios

        from kit.run import supervisor

        # The terminal's hangup, when its last descriptor closes, must not end this child.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        leader, follower = os.openpty()
        os.setsid()
        fcntl.ioctl(follower, termios.TIOCSCTTY, 0)  # this process: the terminal's session
        ahead = supervisor.start_ahead()
        try:
            assert ahead.building is not None
            ahead.building.wait_ready()
            init = ahead.building.init_pid
            with open(f"/proc/{init}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
            return {
                "builder_tty": int(own[4]) != 0,  # the scenario holds: we have one
                "init_tty": int(fields[4]),
                "init_session_is_its_own": int(fields[3]) == init,
            }
        finally:
            ahead.drop(reap=True)
            os.close(leader)
            os.close(follower)

    assert in_child(scenario) == {
        "ok": {"builder_tty": True, "init_tty": 0, "init_session_is_its_own": True}
    }


def _raised(call: Any, kind: type[BaseException]) -> bool:
    try:
        call()
    except kind:
        return True
    return False


def test_a_sandbox_primes_the_fresh_state_as_a_new_network_namespace_would():
    # A one-shot run reads what a fresh sandbox has in the sandbox built for it (before its
    # run), not in a network namespace made for the purpose: both must read the same. The
    # host's own namespace (another link, other values) would not.
    def scenario() -> dict[str, Any]:
        from kit.run import supervisor

        _unprimed()
        ahead = supervisor.start_ahead()
        try:
            assert ahead.building is not None and ahead.building.pidfd is not None
            ahead.building.wait_ready()
            hostdiff._prime_in(ahead.building.pidfd)
            from_sandbox = (hostdiff._fresh_sysctls, hostdiff._fresh_layout)
        finally:
            ahead.drop(reap=True)
        _unprimed()
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
