"""The master survives what engine code does to its descriptors, signals and channels."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from kit.run.launcher import RunResult, run
from kit.starter.common import EXIT_FATAL

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the real backend as root")

FAULT = "kit_test_engines:FaultEngine"
#: Small limits: every run here must end by itself well before them.
LIMITS = {"hook_timeout": 5, "run_timeout": 20}


def fault_run(engine: str = FAULT, argv: list[str] | None = None, **cfg: object) -> RunResult:
    result = run(
        engine,
        "root",
        argv or ["/bin/true"],
        engine_config={"mount_tmp": False, **cfg},
        **LIMITS,
    )
    assert result.timed_out is None, result
    assert result.events[-1]["kind"] == "exit", result
    return result


@pytest.mark.parametrize("action", ["exit", "segv"])
def test_stage2_dying_in_init_config_is_no_exec(action):
    # Stage 2 is still named kit-container when its init_config runs: a death there is a
    # death before exec, not a payload that ran.
    result = fault_run(fault_hook="init_config", fault_role="stage2", fault_action=action)
    assert not result.ledger.select("stage2_exec"), result
    (failed,) = result.ledger.select("stage2_failed")
    assert failed["message"] == "stage 2 died before exec"
    assert not result.ledger.select("hook_enter", hook="post_start_process")


ABUSE = "kit_test_engines:AbuseEngine"


def test_engine_code_closing_the_rpc_descriptor_fails_the_run_by_name():
    result = fault_run(ABUSE, abuse="close_rpc_fd")
    assert result.exit_code == EXIT_FATAL, result
    (fatal,) = result.ledger.select("fatal")
    assert "the RPC connection to the container" in fatal["message"]
    assert fatal["error"]["type"] == "KitFdClosed"
    assert not result.ledger.select("stage2_exec")
    assert result.leaks == []
    # the cleanup still ran, told why
    assert result.ledger.select("hook_enter", hook="cleanup_container")


def test_engine_code_replacing_the_rpc_descriptor_fails_the_run_and_keeps_its_socket():
    result = fault_run(ABUSE, abuse="dup2_over_rpc")
    assert result.exit_code == EXIT_FATAL, result
    (fatal,) = result.ledger.select("fatal")
    assert "or put another file under its number" in fatal["message"]
    assert "the RPC connection to the container" in fatal["message"]
    assert fatal["error"]["type"] == "KitFdClosed"
    assert not result.ledger.select("stage2_exec")
    assert result.leaks == []


@pytest.mark.parametrize("abuse", ["fork_keeps_rpc", "dup_keeps_rpc"])
def test_a_copy_of_the_rpc_connection_kept_by_engine_code_does_not_stall_the_run(abuse):
    # The RPC server exits when the master is done with the connection, and only then does
    # stage 2 start: a copy of the connection held elsewhere must not keep it waiting (it
    # used to, until the run's timeout, named a monitor_container that never returned).
    result = fault_run(ABUSE, ["/bin/sh", "-c", "exit 3"], abuse=abuse)
    assert result.exit_code == 3, result
    assert result.ledger.select("stage2_exec"), result
    rpc_exit = [e for e in result.ledger.select("process_exit") if e.get("child_role") == "rpc"]
    assert [e["status"] for e in rpc_exit] == [0], rpc_exit


def test_a_creation_watch_that_cannot_be_set_up_leaks_no_pidfd(monkeypatch):
    # The descriptor table full (EMFILE) when the RPC connection is duplicated: the thread
    # fails (a fatal error, see _waking) and the pidfd opened just before is closed.
    import errno
    import socket

    from kit.starter import master as m

    def full(fd: int, base: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(m, "dup_high", full)
    a, b = socket.socketpair()
    me = object.__new__(m.Master)
    me.pid, me.rpc_sock, me.fd_base = os.getpid(), a, 3
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        me._watch_creation()
    assert set(os.listdir("/proc/self/fd")) <= before
    a.close()
    b.close()


def test_engine_code_closing_the_control_socket_fails_the_run_by_name():
    result = fault_run(ABUSE, abuse="close_control_fd")
    assert result.exit_code == EXIT_FATAL, result
    fatal = result.ledger.select("fatal")
    assert fatal and "the control socket to the container" in fatal[0]["message"], fatal
    assert not result.ledger.select("stage2_exec")
    assert result.leaks == []


def test_a_thread_failing_in_the_kits_code_is_a_fatal_error_naming_it():
    import errno
    import queue
    import threading

    from kit.starter import master as m

    me = object.__new__(m.Master)
    me.events, me.wake_w = queue.Queue(), -1

    def fails() -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    ended = threading.Event()
    thread = threading.Thread(target=me._waking(fails, ended), name="kit-create")
    thread.start()
    thread.join()
    assert ended.is_set()
    kind, error = me.events.get_nowait()
    assert kind == "fatal" and isinstance(error, m.KitThreadFailed)
    assert str(error).startswith("the master's kit-create thread failed in the kit's code")


def test_a_real_time_signal_to_the_master_is_recorded_by_a_name_of_its_own():
    import signal

    result = fault_run(ABUSE, abuse="rt_signal")
    assert result.exit_code == 0, result
    (rt,) = result.ledger.select("signal", signum=signal.SIGRTMIN + 1)
    assert rt["name"] == "SIGRTMIN+1"
    assert result.ledger.select("hook_return", hook="cleanup_container")


@pytest.mark.parametrize("abuse,shown", [("status_huge", str(1 << 40)), ("status_true", "True")])
def test_a_monitor_returning_no_wait_status_is_a_named_fatal_error(abuse, shown):
    result = fault_run(ABUSE, abuse=abuse)
    assert result.exit_code == EXIT_FATAL, result
    (fatal,) = result.ledger.select("fatal")
    assert fatal["message"] == f"monitor_container returned {shown}, not a wait status"
    assert result.ledger.select("hook_return", hook="cleanup_container")
    assert result.leaks == []


def test_signal_names_cover_the_real_time_signals():
    import signal

    from kit.system import linux

    assert linux.signal_name(signal.SIGTERM) == "SIGTERM"
    assert linux.signal_name(signal.SIGRTMIN) == "SIGRTMIN"
    assert linux.signal_name(signal.SIGRTMIN + 5) == "SIGRTMIN+5"
    assert linux.signal_name(signal.SIGRTMAX) == "SIGRTMAX"


@pytest.mark.parametrize(
    "abuse,detail",
    [
        ("high_byte", "b'\\xff' is no control message of the kit's here"),
        ("ready_byte", "b'R' is no control message of the kit's here"),
        ("flood", "a failure message longer than 65536 bytes"),
    ],
)
def test_bytes_engine_code_writes_to_master_fd_are_a_named_fatal_error(abuse, detail):
    result = fault_run(ABUSE, ["/bin/sleep", "0.2"], abuse=abuse)
    assert result.exit_code == EXIT_FATAL, result
    fatal = result.ledger.select("fatal")
    assert fatal, result
    assert fatal[0]["message"].startswith("engine code in stage 2 wrote to the master's control")
    assert detail in fatal[0]["message"]
    assert not result.ledger.select("stage2_exec")
    assert not result.ledger.select("stage2_failed")
    assert result.leaks == []


def test_the_kits_own_failure_message_fits_the_cap():
    from kit.starter.common import MAX_CONTROL_MESSAGE, _failure
    from kit.starter.control import Control

    sent = _failure(Control.STAGE2_FAILED, "\U0001f600" * MAX_CONTROL_MESSAGE)
    assert len(sent.encode()) - 1 <= MAX_CONTROL_MESSAGE
    assert sent.endswith("…")


def test_stage2_closing_master_fd_and_then_exec_ing_runs_the_payload():
    # master_fd is the kit's way to see the exec (it closes on exec). Engine code that
    # closes it early is not a death: the exec that follows is seen by the name.
    result = fault_run(ABUSE, ["/bin/sh", "-c", "exit 3"], abuse="close_master_fd")
    assert result.exit_code == 3, result
    assert result.ledger.select("stage2_exec")
    assert not result.ledger.select("stage2_failed")
    assert result.ledger.select("hook_enter", hook="post_start_process")
    # ... and the early EOF is recorded: a starter that trusts it would have run
    # post_start_process before the exec (ORDER-009 fails for it).
    (early,) = result.ledger.select("master_fd_closed_early")
    assert "before it exec'd" in early["detail"]


def test_stage2_moving_master_fd_to_another_number_is_no_early_close():
    result = fault_run(ABUSE, ["/bin/sh", "-c", "exit 3"], abuse="move_master_fd")
    assert result.exit_code == 3, result
    assert result.ledger.select("stage2_exec")
    assert not result.ledger.select("master_fd_closed_early")


def test_stage2_closing_master_fd_and_then_dying_is_named():
    result = fault_run(ABUSE, abuse="close_master_fd_then_fail")
    assert not result.ledger.select("stage2_exec"), result
    (failed,) = result.ledger.select("stage2_failed")
    assert failed["message"].startswith("stage 2 died before exec, after engine code closed")
    # start_process may exit instead of exec: no EOF was taken for an exec here.
    assert not result.ledger.select("master_fd_closed_early")
    assert not result.ledger.select("hook_enter", hook="post_start_process")
    assert result.leaks == []


def test_a_helper_holding_master_fd_open_is_start_process_not_returning():
    # The kit tells exec by master_fd's close-on-exec: a child forked by start_process that
    # keeps it open hides the exec, and start_process stays open until its hook timeout.
    result = run(
        ABUSE,
        "root",
        ["/bin/sleep", "30"],
        engine_config={"mount_tmp": False, "abuse": "fork_holder"},
        hook_timeout=2,
        run_timeout=20,
    )
    assert result.timed_out is not None, result
    assert (result.timed_out["hook"], result.timed_out["hook_role"]) == ("start_process", "stage2")
    assert not result.ledger.select("stage2_exec")
    assert result.leaks == []


def forged_siginfo(path: str) -> None:
    """A file of two signalfd_siginfo records: SIGTERM and SIGUSR1 from pid 4242."""
    import signal
    import struct

    with open(path, "wb") as f:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            f.write(struct.pack("=I8xI", sig, 4242).ljust(128, b"\0"))


@pytest.mark.parametrize("abuse", ["devnull_over_signalfd", "file_over_signalfd"])
@pytest.mark.parametrize("hook", ["create_container", "cleanup_container"])
def test_another_file_under_the_signalfds_number_is_a_lost_descriptor(abuse, hook, tmp_path):
    path = str(tmp_path / "siginfo")
    forged_siginfo(path)
    os.chmod(tmp_path, 0o755)
    result = fault_run(ABUSE, abuse=abuse, abuse_hook=hook, path=path)
    assert result.exit_code == EXIT_FATAL, result
    fatal = result.ledger.select("fatal")
    assert fatal, result
    assert "put another file under its number" in fatal[0]["message"]
    assert "signalfd" in fatal[0]["message"]
    assert not [e for e in result.ledger.select("signal") if e.get("sender") == 4242]
    assert result.leaks == []


def test_a_hook_closing_a_range_of_low_descriptors_fails_the_run_by_name():
    # The ledger socket sits high, as the loop's descriptors: the kit's own fatal error and
    # the rest of the run's events still reach the supervisor.
    result = fault_run(ABUSE, abuse="closerange")
    assert result.exit_code == EXIT_FATAL, result
    fatal = result.ledger.select("fatal")
    assert fatal and "engine code closed a file descriptor of the kit" in fatal[0]["message"]
    assert result.ledger.select("hook_return", hook="create_container")
    assert result.ledger.select("hook_return", hook="cleanup_container")
    assert result.leaks == []


def test_a_hook_putting_dev_null_over_every_descriptor_is_named_by_the_supervisor():
    result = fault_run(ABUSE, abuse="devnull_over_all")
    assert result.exit_code == EXIT_FATAL, result
    # The interpreter's own descriptors go too (libffi's closure mapping, say): the master
    # may die of a signal before it notices the ledger gone. Either way the run fails as a
    # crash of the master, named, and nothing is left behind.
    lost = "master crashed: exited 254 with nothing more"
    assert (
        result.reason.startswith(lost)
        and "when engine code closed its ledger socket" in result.reason
    ) or re.fullmatch(r"master crashed: killed by signal \d+", result.reason), result
    assert result.leaks == []


def test_a_hook_exiting_254_itself_is_not_said_to_have_closed_the_ledger():
    result = fault_run(ABUSE, abuse="exit_254")
    assert result.exit_code == EXIT_FATAL, result
    assert result.reason.startswith("master crashed: exited 254 with nothing more"), result
    assert "engine code exiting 254 itself looks the same" in result.reason
    assert result.leaks == []


def test_stage2_losing_the_ledger_tells_the_master():
    result = fault_run(ABUSE, abuse="close_ledger")
    assert result.exit_code == EXIT_FATAL, result
    (failed,) = result.ledger.select("stage2_failed")
    assert failed["message"].startswith("engine code closed the ledger socket in stage 2")
    # How start_process ended, which the ledger could not hear, is told with it (ERR-012).
    assert failed["message"].endswith(
        "; the event it could not record: hook_raise of start_process "
        "(RuntimeError: start_process fails after closing the ledger socket)"
    ), failed
    assert not result.ledger.select("stage2_exec")


def test_stage2_exiting_through_posix_exit_is_told_as_an_exit_not_an_exec():
    """posix._exit is os._exit's other name: an engine that exits through it (after its
    exec failed, say) must not have the master take the EOF for the exec (ERR-012, §2 rule 6:
    no post_start_process)."""
    result = fault_run(ABUSE, abuse="posix_exit")
    (failed,) = result.ledger.select("stage2_failed")
    assert failed["message"] == "start_process exited with code 3 instead of exec", failed
    assert not result.ledger.select("stage2_exec")
    assert not [e for e in result.events if e.get("hook") == "post_start_process"]


def _writer_pair():  # type: ignore[no-untyped-def]
    import socket

    from kit.ledger.record import LedgerWriter

    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ledger = LedgerWriter(writer, "master")
    lost: list[int | None] = []
    ledger.on_lost = lambda exc: lost.append(exc.errno)
    return reader, writer, ledger, lost


def test_a_ledger_socket_closed_under_the_writer_is_lost():
    import errno

    reader, writer, ledger, lost = _writer_pair()
    os.close(writer.fileno())
    ledger.emit("stage2_exec")
    assert lost == [errno.EBADF]
    writer.detach()
    reader.close()


def test_another_file_under_the_ledger_sockets_number_is_lost():
    import errno

    reader, writer, ledger, lost = _writer_pair()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, writer.fileno())
    os.close(null)
    ledger.emit("stage2_exec")
    assert lost == [errno.ENOTSOCK]
    assert ledger.for_role("stage2").on_lost is ledger.on_lost
    writer.close()
    reader.close()


def test_a_supervisor_gone_is_not_a_lost_ledger():
    reader, writer, ledger, lost = _writer_pair()
    reader.close()
    ledger.emit("stage2_exec")
    assert lost == []
    writer.close()


def test_a_confirmation_pipe_lost_before_the_send_sends_the_event_unconfirmed(monkeypatch):
    import errno

    from kit.ledger import record

    reader, writer, ledger, lost = _writer_pair()
    ledger.confirm = True

    def pipe_closed(sock, data):  # type: ignore[no-untyped-def]
        raise OSError(errno.EBADF, "Bad file descriptor")  # as sendmsg with a closed pipe end

    monkeypatch.setattr(record, "confirm_send", pipe_closed)
    ledger.emit("hook_enter", hook="config", snapshot={"threads": []})
    assert lost == []
    assert record.decode(reader.recv(1 << 16))["kind"] == "hook_enter"
    writer.close()
    reader.close()


def test_the_creation_watch_tells_a_dead_container_by_a_pidfd_above_fd_setsize():
    """The watch's pidfd is moved high, past 1024 when engine code holds many descriptors:
    select() cannot wait for it there (ValueError), poll() can. The container process here
    is a child that has exited, its pidfd at 1500."""
    import resource

    from kit.starter.master import Master

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1501:
        pytest.skip("the descriptor limit does not reach 1501")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1501), hard))
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    pidfd = os.pidfd_open(pid)
    high = os.dup2(pidfd, 1500)
    os.close(pidfd)
    import select

    exited = select.poll()  # the watch fires for an exited container: wait until it is
    exited.register(high, select.POLLIN)
    assert exited.poll(30_000), "the child did not exit"
    reasons: list[str] = []
    # The loop's copy of the RPC connection: the watch shuts the connection down through it
    # (never through rpc_sock's number, which engine code may have reused).
    kit_end, server_end = socket.socketpair()
    rpc_fd = kit_end.fileno()
    fake = _watching_master(high, rpc_fd, pid, reasons)
    try:
        Master._creation_watch_fired(fake)  # type: ignore[arg-type]
        server_end.settimeout(5)
        assert server_end.recv(1) == b""  # EOF: shut down
        assert kit_end.fileno() == rpc_fd  # not closed by the watch (the loop closes its copy)
    finally:
        os.close(high)
        os.waitpid(pid, 0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        kit_end.close()
        server_end.close()
    assert reasons == [f"the container process (pid {pid}) died: exit code 3"], reasons
    assert fake.watching is None and fake._unwatched == [(high, rpc_fd)]


def _watching_master(pidfd: int, rpc_fd: int, pid: int, reasons: list[str]) -> Any:
    """What ``Master._creation_watch_fired`` uses of a master that watches ``pidfd`` and its
    copy ``rpc_fd`` of the RPC connection (identities as they are now)."""
    import threading
    import types

    from kit.starter.master import Master
    from kit.system import linux

    fake = types.SimpleNamespace(
        watch_lock=threading.Lock(),
        watching=(pidfd, rpc_fd),
        pid=pid,
        ctx=types.SimpleNamespace(cancel=reasons.append),
        rpc_sock=None,
        fd_ids={fd: linux.fd_identity(fd) for fd in (pidfd, rpc_fd)},
        lost=[],
        _unwatched=[],
        _close_unwatched=lambda: None,
    )
    fake._intact = lambda fd: Master._intact(fake, fd)  # type: ignore[arg-type]
    fake._lost = fake.lost.append
    return fake


@pytest.fixture
def watched() -> Iterator[tuple[int, int, socket.socket]]:
    """What the creation watch holds: an exited child of the test, its pidfd, and the
    kit's end of an RPC connection (closed after the test, whatever is under the numbers)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    pidfd = os.pidfd_open(pid)
    kit_end, server_end = socket.socketpair()
    try:
        yield pid, pidfd, kit_end
    finally:
        os.waitpid(pid, 0)
        os.close(pidfd)
        kit_end.close()
        server_end.close()


def test_a_creation_watch_whose_descriptor_engine_code_replaced_touches_nothing(watched):
    """Engine code in the master put its own socket under the number of the loop's copy of
    the RPC connection: the watch reports a lost descriptor and neither cancels the
    creation nor shuts the engine's socket down."""
    from kit.starter.master import Master

    pid, pidfd, kit_end = watched
    engines, peer = socket.socketpair()
    reasons: list[str] = []
    try:
        fake = _watching_master(pidfd, kit_end.fileno(), pid, reasons)
        os.dup2(engines.fileno(), kit_end.fileno())  # engine code's dup2 over the kit's copy
        Master._creation_watch_fired(fake)  # type: ignore[arg-type]
        assert fake.lost == [kit_end.fileno()] and reasons == []
        peer.sendall(b"still open")
        assert kit_end.recv(64) == b"still open"  # the engine's socket was not shut down
        assert fake.watching == (pidfd, kit_end.fileno())  # _lost (stubbed here) forgets it
    finally:
        engines.close()
        peer.close()


def test_a_lost_watch_descriptor_never_closes_the_other_one_engine_code_replaced_too(watched):
    """Engine code replaced both descriptors of the creation watch (closerange, then two
    files of its own under their numbers): the master forgets both and closes neither, for
    both numbers are engine code's files now."""
    import select
    import types

    from kit.starter.master import Master

    pid, pidfd, kit_end = watched
    fake = _watching_master(pidfd, kit_end.fileno(), pid, [])
    fake.poller = select.poll()
    fake.fd_lost = None
    fake.events = []
    fake.ledger = types.SimpleNamespace(emit=lambda *args, **kwargs: None)
    fake._put = fake.events.append
    fake._forget = lambda fd, close=False: Master._forget(fake, fd, close)  # type: ignore[arg-type]
    fake.sigfd = fake.wake_r = fake.wake_w = -1
    engines = [socket.socketpair() for _ in range(2)]
    try:
        os.dup2(engines[0][0].fileno(), pidfd)  # engine code's files under both numbers
        os.dup2(engines[1][0].fileno(), kit_end.fileno())
        Master._lost(fake, pidfd)  # type: ignore[arg-type]
        assert fake.watching is None and fake.fd_ids == {}
        os.fstat(pidfd)  # both still open: engine code's
        os.fstat(kit_end.fileno())
        assert [kind for kind, _ in fake.events] == ["fd_lost"]
    finally:
        for sock in (s for pair in engines for s in pair):
            sock.close()


@pytest.mark.parametrize("shape", ["", "Wait4", "Waitid"])
def test_a_monitor_reaping_before_the_start_waiter_looks_does_not_hide_the_exec(shape):
    # The monitor keeps the GIL while it polls: without the master holding its reap until
    # the exec is told from a death, the payload's quick exit was reaped first and the run
    # said "stage 2 died before exec", without post_start_process.
    result = run(f"kit_test_engines:Greedy{shape}ReaperEngine", "root", ["/bin/sh", "-c", "exit 7"])
    assert result.exit_code == 7, result
    assert not result.ledger.select("stage2_failed"), result.ledger.select("stage2_failed")
    assert result.ledger.select("stage2_exec")
    assert result.ledger.select("hook_return", hook="post_start_process")


def test_engine_code_cannot_reap_the_exited_container_before_its_exec_is_checked():
    # Master._hold_reaping, fed the race it is for: the container has exited (a zombie)
    # and the start waiter has not looked at it yet. Every call of the wait family that
    # could reap it waits until the exec is checked; calls that cannot (another pid,
    # WNOWAIT) and calls after the check go through at once.
    import threading
    from types import SimpleNamespace

    from conftest import in_child

    from kit.starter import master as m

    class Watched(threading.Event):
        """exec_checked, telling when a call waits for it."""

        def __init__(self) -> None:
            super().__init__()
            self.waiting = threading.Event()

        def wait(self, timeout: float | None = None) -> bool:
            self.waiting.set()
            return super().wait(timeout)

    def zombie() -> int:
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        return pid

    def body() -> dict:
        me = object.__new__(m.Master)
        me.pid = zombie()
        me.exec_checked = Watched()
        me.starter = SimpleNamespace(req=SimpleNamespace(hook_timeout=30.0))
        me._hold_reaping()
        other = zombie()
        out: dict = {"other": os.waitpid(other, os.WNOHANG)[1] >> 8}
        out["peek"] = os.waitid(os.P_PID, me.pid, os.WEXITED | os.WNOWAIT).si_pid == me.pid
        calls = {
            "waitpid": lambda: os.waitpid(me.pid, os.WNOHANG)[1],
            "waitpid_any": lambda: os.waitpid(-1, os.WNOHANG)[1],
            "wait4": lambda: os.wait4(me.pid, os.WNOHANG)[1],
            "wait": lambda: os.wait()[1],
            "wait3": lambda: os.wait3(os.WNOHANG)[1],
            "waitid": lambda: os.waitid(os.P_PID, me.pid, os.WEXITED | os.WNOHANG).si_status << 8,
            "waitid_all": lambda: os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG).si_status << 8,
        }
        for name, call in calls.items():
            me.exec_checked.clear()
            me.exec_checked.waiting.clear()
            got: list[int] = []
            thread = threading.Thread(target=lambda c=call, g=got: g.append(c()))
            thread.start()
            # held: the call waits for the check (and has reaped nothing meanwhile)
            held = me.exec_checked.waiting.wait(10) and not got
            me.exec_checked.set()
            thread.join(30)
            out[name] = (held, got[0] >> 8 if got else None)
            me.pid = zombie()  # the next call's own container
        os.waitpid(me.pid, 0)
        return out

    out = in_child(body)
    assert "ok" in out, out
    got = out["ok"]
    assert (got.pop("other"), got.pop("peek")) == (7, True)
    assert got == {name: [True, 7] for name in got}, got
