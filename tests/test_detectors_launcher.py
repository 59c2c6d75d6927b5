"""The launcher's and the zygote's error paths fed bad requests, a dead zygote and runs that
end without a result: each is reported naming what went wrong, nothing leaks, and the zygote
keeps serving."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import threading
import time
import traceback
from typing import Any

import pytest
from conftest import host_state, wait_until

from kit.run import launcher
from kit.run import zygote as zygote_module
from kit.run.launcher import LaunchError, RunHandle, Zygote, make_request, run, start
from kit.run.sandbox import INIT_NAME
from kit.run.zygote import FIXED_FDS
from kit.system import linux


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


def test_a_zygote_started_from_a_thread_outlives_it_and_leaves_nothing_at_exit(tmp_path):
    """The zygote's parent-death signal fires when the thread that forked it ends: started
    from a worker thread (the conformance plugin's pool), it was killed once the pool shut
    down, and the run directories it had made ahead stayed behind."""
    code = (
        "import json, os, threading, time\n"
        "from kit.run.launcher import Zygote, run\n"
        "codes = []\n"
        "t = threading.Thread(target=lambda: codes.append(run('reference', 'root', "
        "['/bin/true']).exit_code))\n"
        "t.start(); t.join(); time.sleep(0.3)\n"
        "print(json.dumps([codes, Zygote.get_existing().proc.poll()]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[0], None]  # the run passed; the zygote lives on
    assert os.listdir(tmp_path) == []  # and at exit it removed what it had made ahead


@pytest.mark.parametrize("owner", ["Zygote", "_LastingThread"])
def test_a_child_forked_while_a_thread_holds_a_launcher_lock_gets_it_unheld(owner):
    from conftest import in_child

    lock_of = lambda: getattr(launcher, owner)._lock  # noqa: E731  (read again in the child)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock_of():
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(10)
        out = in_child(lambda: lock_of().acquire(timeout=2))
    finally:
        release.set()
        thread.join()
    assert out == {"ok": True}  # not a copy held by a thread the child does not have


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


@pytest.fixture
def own_zygote(monkeypatch):
    """The launcher's runs go through a zygote of the test's own (one a test may break)."""
    zygote = Zygote()
    monkeypatch.setattr(Zygote, "_instance", zygote)
    yield zygote
    zygote.control.close()
    assert zygote.proc.wait(10) == 0


def _spare_inits(zygote: Zygote) -> list[int]:
    """The inits of the sandboxes ``zygote`` built ahead, once it is idle (every one built,
    waiting for its run; the init of a finished run gone)."""
    if not zygote_module.idle(zygote.proc.pid):
        return []
    return _inits(zygote)


def _inits(zygote: Zygote) -> list[int]:
    """Every sandbox init that is ``zygote``'s child (built or being built, adopted or not)."""
    parents = linux.process_parents()
    return [
        p
        for p, parent in parents.items()
        if parent == zygote.proc.pid and linux.process_name(p) == INIT_NAME
    ]


def _full_pool(zygote: Zygote, finished: RunHandle, what: str) -> list[int]:
    """The spares' inits once ``zygote`` holds :data:`~kit.run.zygote.SPARES` of them, the
    sandbox of the ``finished`` run gone."""
    assert finished.sandbox is not None
    adopted = finished.sandbox["sandbox_pid"]
    return wait_until(
        lambda: len(s := _spare_inits(zygote)) == zygote_module.SPARES and adopted not in s and s,
        what=what,
    )


def test_a_spare_sandbox_whose_init_died_is_rebuilt_and_the_zygote_serves_on(own_zygote):
    """The inits of the sandboxes built ahead die (and the zygote reaps them) before a run
    takes one: the run gets a sandbox of its own, the zygote lives on."""
    first = start("reference", "root", ["/bin/true"], sandbox=True)
    assert first.wait().exit_code == 0 and first.sandbox is not None
    inits = _full_pool(own_zygote, first, "the run's sandbox gone, the spares built ahead")
    for init in inits:
        pidfd = os.pidfd_open(init)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)
    wait_until(
        lambda: (
            not {
                p
                for p, parent in linux.process_parents().items()
                if p in inits and parent == own_zygote.proc.pid
            }
        ),
        what="the zygote to reap the spares' inits",
    )
    handle = start("reference", "root", ["/bin/true"], sandbox=True)
    assert handle.sandbox is not None and handle.sandbox["sandbox_pid"] not in inits
    assert handle.wait().exit_code == 0
    assert own_zygote.proc.poll() is None


def test_the_spares_are_topped_up_between_runs_not_during_one(own_zygote):
    """A run takes one of the sandboxes built ahead and leaves the other: none is built
    while it goes on (a build then competes with it for the CPU), the pool is full again
    once it is over."""
    first = start("reference", "root", ["/bin/true"], sandbox=True)
    assert first.wait().exit_code == 0
    spares = _full_pool(own_zygote, first, "the spares built after the first run")
    handle = start("reference", "root", ["/bin/sleep", "0.3"], sandbox=True)
    assert handle.sandbox is not None and handle.sandbox["sandbox_pid"] in spares
    seen: set[int] = set()
    while True:  # every sandbox init the zygote has while the run goes on
        now = _inits(own_zygote)  # listed before the poll: the run was still going on
        if handle.poll() is not None:
            break
        seen.update(now)
        time.sleep(0.005)
    assert seen <= set(spares), "a sandbox was built while the run went on"
    assert handle.wait().exit_code == 0
    after = _full_pool(own_zygote, handle, "the pool topped up after the run")
    assert set(after) - set(spares)  # built after the run


def test_a_build_ahead_that_fails_stops_the_pool_until_a_request_asks_again(monkeypatch):
    """A spare that cannot be started, or read once built, is dropped and no other is built
    until a request takes one (not one build after the other, each failing)."""
    from kit.run.supervisor import Ahead

    started: list[int] = []

    def cannot_start() -> Ahead:
        started.append(1)
        raise OSError("no room for a sandbox")

    monkeypatch.setattr(zygote_module, "start_ahead", cannot_start)
    spares = zygote_module.Spares()
    spares.wanted = True
    spares.top_up(runs_going_on=False)
    spares.top_up(runs_going_on=False)
    assert (started, spares.items, spares.wanted) == ([1], [], False)

    dropped: list[Ahead] = []
    monkeypatch.setattr(Ahead, "drop", lambda ahead: dropped.append(ahead))

    def cannot_read(ahead: Ahead) -> Ahead:
        raise OSError("no thread for the read ahead")

    monkeypatch.setattr(zygote_module, "finish_ahead", cannot_read)
    pending = Ahead("/nowhere", 7, None)
    spares.items, spares.wanted = [pending], True
    spares.finish(pending)
    assert (spares.items, dropped, spares.wanted) == ([], [pending], False)


def test_under_the_usual_fd_limit_both_spares_hold_their_sysctl_files_and_runs_keep_it():
    """Started with a soft limit of 1024 open files, the zygote raises its own to the hard
    one (two spares hold half a thousand sysctl files each), and a run's processes, the
    payload's too, get the 1024 back."""
    from conftest import in_child

    def body() -> dict[str, Any]:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard < 4096:
            return {"skip": f"a hard limit of {hard} open files leaves nothing to raise"}
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        zygote = Zygote()
        launcher.Zygote._instance = zygote
        try:
            first = run("reference", "root", ["/bin/sh", "-c", "ulimit -n"], sandbox=True)
            handle = start("reference", "root", ["/bin/true"], sandbox=True)
            assert handle.wait().exit_code == 0
            _full_pool(zygote, handle, "two spares under the raised limit")
            with open(f"/proc/{zygote.proc.pid}/limits") as f:
                limit = next(line.split()[3] for line in f if line.startswith("Max open files"))
            return {
                "payload": first.stdout.strip(),
                "zygote": int(limit),
                "hard": hard,
                "fds": len(os.listdir(f"/proc/{zygote.proc.pid}/fd")),
            }
        finally:
            zygote.control.close()
            zygote.proc.wait(10)

    out = in_child(body)
    assert "ok" in out, out
    if "skip" in out["ok"]:
        pytest.skip(out["ok"]["skip"])
    assert out["ok"]["payload"] == "1024"
    assert out["ok"]["zygote"] == out["ok"]["hard"]
    assert out["ok"]["fds"] > 1024  # both spares' sysctl files held


def test_a_sandbox_built_ahead_reaches_its_supervisor_with_the_pidfd_of_its_init():
    """The zygote hands the supervisor init's pidfd with the rest (kept by place_fds,
    renumbered): adopting by pid, the supervisor checks through it that the pid is still
    init's (kit.run.sandbox.adopt)."""
    from kit.run.sandbox import Building
    from kit.run.supervisor import Ahead

    building = Building(init_pid=1234, ready_fd=5, scratch="/nowhere", builder=1, pidfd=6)
    ahead = Ahead("/nowhere", 4, building)
    assert ahead.fds() == {4, 5, 6}
    moved = ahead.moved({4: 40, 5: 50, 6: 60})
    assert moved.building is not None
    assert (moved.lock_fd, moved.building.ready_fd, moved.building.pidfd) == (40, 50, 60)


def test_a_sandbox_that_fails_to_build_ahead_is_dropped_and_its_reason_kept(tmp_path):
    """The init of the sandbox built ahead fails: it is gone, its scratch directory too, and
    init's own words are kept for the run that takes that Ahead."""
    from conftest import in_child

    from kit.run import rundir, supervisor
    from kit.run import sandbox as host_sandbox

    def body() -> dict:
        def broken(*_args: object) -> dict:
            raise OSError("no root for this sandbox")

        host_sandbox._build_root = broken  # init, forked here, has it too
        tempfile.tempdir = str(tmp_path)  # the run and scratch directories: ours alone
        ahead = supervisor.prepare_ahead()
        rundir.remove(ahead.run_dir, ahead.lock_fd)
        inits = []
        while True:
            try:
                inits.append(os.wait())
            except ChildProcessError:
                break
        return {
            "dropped": ahead.building is None,
            "error": ahead.error,
            "inits": len(inits),
            "left": os.listdir(tmp_path),
        }

    out = in_child(body)
    assert out["ok"]["dropped"], out
    assert "no root for this sandbox" in out["ok"]["error"]
    assert out["ok"]["inits"] == 1  # init exited, reaped here
    assert out["ok"]["left"] == []


@pytest.mark.parametrize("sandbox", [False, True])
def test_runs_go_on_under_a_low_soft_fd_limit(sandbox):
    """A launcher whose soft limit on open files is low (``ulimit -n 512``): its zygote's
    supervisors still place the run's descriptors (none parked out of reach)."""
    from conftest import exit_code_in_child

    def body() -> int:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))  # the zygote inherits it
        try:
            result = run("reference", "root", ["/bin/sh", "-c", "echo low"], sandbox=sandbox)
        finally:
            zygote = Zygote.get_existing()  # this child's own
            if zygote is not None:
                zygote.control.close()
                zygote.proc.wait(10)
        return 0 if (result.exit_code, result.stdout) == (0, "low\n") else 10

    assert exit_code_in_child(body) == 0


def test_a_pass_through_target_above_1000_lands_and_spares_the_result_fd():
    """place_fds with a target at 1004: every descriptor lands where it is asked, the result
    fd is the result pipe's, nothing else stays open."""
    from conftest import exit_code_in_child

    from kit.run.zygote import place_fds

    def body() -> int:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (1100, max(hard, 1100)))
        fds = [os.pipe()[0] for _ in range(FIXED_FDS + 1)]  # each a file of its own
        files = [os.fstat(fd)[:2] for fd in fds]
        result_fd, _ = place_fds(fds, [1004])
        landed = {n: os.fstat(n)[:2] for n in (0, 1, 2, 1004, result_fd)}
        order = (0, 1, 2, result_fd, 1004)
        wrong = [n for n, f in zip(order, files, strict=True) if landed[n] != f]
        left = {int(n) for n in os.listdir("/proc/self/fd")} - set(landed)
        return 10 * bool(wrong) + 20 * (len(left) > 1)  # 1: raised; listdir's own fd is left

    assert exit_code_in_child(body) == 0


def test_place_fds_keeps_a_block_where_it_is_but_a_number_a_target_needs():
    """The zygote's block of sysctl files stays at its numbers, one a target needs is moved
    (and said where), each still its file; nothing else stays open."""
    from conftest import exit_code_in_child

    from kit.run.zygote import place_fds

    def body() -> int:
        fds = [os.pipe()[0] for _ in range(FIXED_FDS + 1)]
        block = [os.pipe()[0] for _ in range(20)]
        files = {fd: os.fstat(fd)[:2] for fd in block}
        target = block[7]  # the launcher passes one fd under this number
        passed = os.fstat(fds[FIXED_FDS])[:2]
        result_fd, moved = place_fds(fds, [target], kept=block)
        ok = sorted(moved) == sorted(block)
        ok &= all(moved[fd] == fd for fd in block if fd != target)
        ok &= moved[target] != target and os.fstat(moved[target])[:2] == files[target]
        ok &= all(os.fstat(moved[fd])[:2] == files[fd] for fd in block)
        ok &= os.fstat(target)[:2] == passed
        left = {int(n) for n in os.listdir("/proc/self/fd")}
        left -= {0, 1, 2, target, result_fd, *moved.values()}
        return 0 if ok and len(left) <= 1 else 1  # listdir's own fd is left

    assert exit_code_in_child(body) == 0


def test_a_result_already_in_the_pipe_with_the_started_line_is_read_in_order(monkeypatch):
    """The launcher reads the ``started`` line only once much of the result is in the pipe
    too (a short run on a busy machine): polled to the end, the result is the run's."""
    spawn = RunHandle._fork_supervisor

    def late(self: RunHandle, request, stdin, res_w: int, pass_fds) -> int:
        pid = spawn(self, request, stdin, res_w, pass_fds)
        pidfd = os.pidfd_open(pid)
        try:
            wait_until(
                lambda: _in_pipe(res_w) > 16384 or select.select([pidfd], [], [], 0)[0],
                what="the result in the pipe",
            )
        finally:
            os.close(pidfd)
        return pid

    monkeypatch.setattr(RunHandle, "_fork_supervisor", late)
    handle = start("reference", "root", ["/bin/true"])
    assert handle.starter_pid is not None
    code = wait_until(lambda: handle.poll() is not None and [handle.poll()], what="the end")
    assert code == [0] and handle.wait().exit_code == 0


def _in_pipe(fd: int) -> int:
    """How many bytes wait in the pipe of ``fd`` (either end)."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


def test_an_engine_whose_import_hangs_is_a_launch_error_and_the_zygote_replaced(
    monkeypatch, tmp_path
):
    """The zygote imports a run's engine before it answers: an import that never ends is
    a LaunchError naming it once the zygote's answer is overdue (not a launcher that hangs),
    that zygote is killed and the next run gets another."""
    (tmp_path / "kit_hanging_engine.py").write_text("import time\n\ntime.sleep(3600)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(launcher, "ZYGOTE_ANSWER_TIMEOUT", 1.0, raising=False)
    hung = Zygote()
    monkeypatch.setattr(Zygote, "_instance", hung)
    errors: list[str] = []

    def hanging_run() -> None:
        try:
            run("kit_hanging_engine:Engine", "root", ["/bin/true"])
        except LaunchError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=hanging_run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: not thread.is_alive(), timeout=30, what="the run's LaunchError")
    finally:
        if thread.is_alive():
            hung.proc.kill()  # lets the thread go
        thread.join(10)
        hung.control.close()
    assert hung.proc.wait(10) == -signal.SIGKILL
    (error,) = errors
    assert "did not answer" in error and "kit_hanging_engine:Engine" in error, error
    fresh = Zygote.get()
    try:
        assert fresh is not hung
        assert run("reference", "root", ["/bin/true"]).exit_code == 0
    finally:
        fresh.control.close()
        fresh.proc.wait(10)


def _with_pid(pid: int) -> int:
    """A sleeping child of ours that has pid ``pid`` (free now) in our pid namespace, of
    which we are pid 1: the kernel hands out the number after ns_last_pid."""
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    child = os.fork()
    if child == 0:
        os.execv("/bin/sleep", ["sleep", "600"])
    return child


def _signals_after_the_run_in_a_pid_namespace() -> int:
    """pid 1 of a pid namespace (and a mount namespace with its /proc): a run's supervisor
    and starter are gone, and their pids name other processes; kill() and send_signal() of
    the finished run must not reach those. 0: they did not."""
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount("proc", "/proc", "proc", 0)
    Zygote._instance = None  # ours, in this namespace
    try:
        handle = start("reference", "root", ["/bin/true"], sandbox=False)
        assert handle.wait().exit_code == 0 and handle.starter_pid is not None
        wait_until(lambda: linux.process_state(handle.supervisor_pid) is None, what="reaped")
        others = [_with_pid(handle.supervisor_pid), _with_pid(handle.starter_pid)]
        if others != [handle.supervisor_pid, handle.starter_pid]:
            return 3  # the pids were not reused: the test shows nothing
        handle.kill()
        handle.send_signal(signal.SIGKILL)
        # Ours now: a SIGKILL already sent wins over it (a group exit starts at the kill).
        for p in others:
            os.kill(p, signal.SIGUSR1)
        ends = [os.WTERMSIG(os.waitpid(p, 0)[1]) for p in others]
        return 10 * (ends[0] != signal.SIGUSR1) + 20 * (ends[1] != signal.SIGUSR1)
    finally:
        zygote = Zygote.get_existing()
        if zygote is not None:
            zygote.control.close()
            zygote.proc.wait(10)


def test_kill_and_send_signal_after_the_run_reach_no_process_that_took_its_pids():
    from conftest import exit_code_in_child

    def body() -> int:
        linux.unshare(linux.CLONE_NEWPID | linux.CLONE_NEWNS)
        init = os.fork()  # pid 1 of the new namespace
        if init == 0:
            code = 1
            try:
                code = _signals_after_the_run_in_a_pid_namespace()
            except BaseException:
                traceback.print_exc()  # shown with the failure
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(init, 0)[1])

    assert exit_code_in_child(body) == 0


def test_a_childs_environment_is_copied_whole_while_another_thread_changes_it():
    """pytest adds and removes PYTEST_CURRENT_TEST at every test phase while a conformance
    session's runs start their children on other threads: launcher.environment() must
    still hand each child a whole copy, where a plain ``{**os.environ}`` raises
    RuntimeError or KeyError (counted in the same loop: the race must show here)."""
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            os.environ["KIT_TEST_CHURN"] = "1"
            del os.environ["KIT_TEST_CHURN"]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as the interpreter can
    churner = threading.Thread(target=churn, name="kit-test-churn")
    churner.start()
    copies, torn = [], 0
    try:
        for _ in range(20000):
            copies.append(launcher.environment(PYTHONPATH="/nowhere"))
            try:
                _ = {**os.environ}  # the plain copy, for comparison
            except (RuntimeError, KeyError):
                torn += 1
            if torn >= 3 and len(copies) >= 2000:
                break
    finally:
        stop.set()
        churner.join()
        sys.setswitchinterval(interval)
        os.environ.pop("KIT_TEST_CHURN", None)
    if not torn:
        pytest.skip("a plain copy was never torn here: the race did not show")
    path = os.environ.get("PATH")
    assert all(c["PYTHONPATH"] == "/nowhere" and c.get("PATH") == path for c in copies)
