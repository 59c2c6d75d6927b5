"""The launcher's and the zygote's error paths fed bad requests, a dead zygote and runs that
end without a result: each is reported naming what went wrong, nothing leaks, and the zygote
keeps serving."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import host_state, wait_until

from kit.run import launcher
from kit.run.launcher import LaunchError, RunHandle, Zygote, make_request, run, start
from kit.run.zygote import FIXED_FDS


@pytest.fixture
def zygote():
    """A zygote of the test's own (not the session's): its control socket and process."""
    control, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kit.run.zygote", str(child_end.fileno())],
        pass_fds=(child_end.fileno(),),
        stdin=subprocess.DEVNULL,
        cwd="/",
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    child_end.close()
    yield control, proc
    control.close()
    assert proc.wait(10) == 0  # the zygote exits 0 when its control socket closes


def ask(control: socket.socket, message: bytes, nfds: int) -> dict:
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
    try:
        socket.send_fds(control, [message], fds)
    finally:
        for fd in fds:
            os.close(fd)
    return json.loads(control.recv(1 << 16))


def zygote_fds(proc: subprocess.Popen) -> int:
    return len(os.listdir(f"/proc/{proc.pid}/fd"))


def request_json(engine: str = "reference") -> dict:
    return make_request(engine, "root", ["/bin/true"]).to_json()


@pytest.mark.parametrize(
    "message,nfds,error",
    [
        (b"not json", FIXED_FDS, "JSONDecodeError: Expecting value"),
        (b'{"targets": []}', FIXED_FDS, "KeyError: 'request'"),
        (
            json.dumps({"request": request_json(), "targets": [9]}).encode(),
            FIXED_FDS,
            f"ValueError: expected {FIXED_FDS + 1} fds, got {FIXED_FDS}",
        ),
        (
            json.dumps({"request": request_json()}).encode(),
            FIXED_FDS - 1,
            f"ValueError: expected {FIXED_FDS} fds, got {FIXED_FDS - 1}",
        ),
        (
            json.dumps({"request": request_json()}).encode(),
            FIXED_FDS + 1,
            f"ValueError: expected {FIXED_FDS} fds, got {FIXED_FDS + 1}",
        ),
        (
            json.dumps({"request": request_json("no-such-engine")}).encode(),
            FIXED_FDS,
            "no-such-engine",
        ),
        (
            json.dumps({"request": {**request_json(), "flow": "rootless"}}).encode(),
            FIXED_FDS,
            "unknown flow 'rootless'",
        ),
    ],
)
def test_a_bad_request_is_answered_with_an_error_naming_it_and_the_fds_closed(
    zygote, message, nfds, error
):
    control, proc = zygote
    assert ask(
        control, json.dumps({"request": request_json(), "targets": "x"}).encode(), FIXED_FDS
    )["error"].startswith("ValueError")  # warm: imports done
    before = zygote_fds(proc)
    answer = ask(control, message, nfds)
    assert set(answer) == {"error"} and error in answer["error"], answer
    assert zygote_fds(proc) == before  # what came with the bad request was closed
    assert proc.poll() is None  # and the zygote serves on


def test_a_zygote_that_died_is_reported_and_replaced():
    zygote = Zygote()
    zygote.proc.kill()
    zygote.proc.wait()
    with pytest.raises(LaunchError, match=r"the kit's zygote process \(pid \d+\) died"):
        zygote.spawn(make_request("reference", "root", ["/bin/true"]), [], [])
    zygote.control.close()
    saved = Zygote._instance
    Zygote._instance = zygote
    try:
        fresh = Zygote.get()
        assert fresh is not zygote and fresh.proc.poll() is None
    finally:
        Zygote._instance = saved
        fresh.control.close()
        fresh.proc.wait(10)


def test_a_run_of_an_unknown_engine_is_a_launch_error_naming_it():
    before = host_state()
    with pytest.raises(LaunchError, match="no-such-engine"):
        run("no-such-engine", "root", ["/bin/true"])
    wait_until(lambda: host_state() == before, timeout=5, what="the host as it was")


def test_a_supervisor_that_ends_without_a_result_is_a_launch_error(monkeypatch, tmp_path):
    # a "supervisor" that reads its request (argv: -m kit.run.supervisor REQUEST_FD RESULT_FD)
    # and exits without a word
    fake = tmp_path / "supervisor"
    fake.write_text('#!/bin/sh\nexec cat "/proc/self/fd/$3" >/dev/null\n')
    fake.chmod(0o755)
    monkeypatch.setenv("KIT_ZYGOTE", "0")
    monkeypatch.setattr(launcher.sys, "executable", str(fake))
    handle = start("reference", "root", ["/bin/true"])
    assert handle.starter_pid is None and handle.run_dir is None
    with pytest.raises(LaunchError, match="the run has no starter process"):
        handle.send_signal(15)
    with pytest.raises(
        LaunchError,
        match=r"the run's supervisor \(pid \d+\) ended without writing the run's result",
    ):
        handle.wait()


def test_a_result_without_a_ledger_is_a_launch_error_with_its_reason():
    # a request the supervisor cannot carry out: the engine is not importable there
    request = make_request("reference", "root", ["/bin/true"])
    request.engine = "kit_test_engines_missing:Nothing"
    with pytest.raises(LaunchError) as info:
        RunHandle(request).wait()
    assert "kit_test_engines_missing" in str(info.value)
