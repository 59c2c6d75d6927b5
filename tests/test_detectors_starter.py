"""The starter fed what it must refuse: a supervisor that died before the starter began, a
parent other than the given one or a hung-up socket to it, control bytes of no message and
failure messages one byte too long."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from conftest import exit_code_in_child, in_child, wait_until

from kit.ledger.record import decode
from kit.run.launcher import make_request, start
from kit.starter.common import EXIT_FATAL
from kit.starter.stage1 import Starter
from kit.system import linux


def _starter_outliving(flow: str) -> dict:
    """In a sandboxed child (a subreaper): a stand-in supervisor forks the starter and dies
    before the starter's main begins; the starter's exit code and its ledger events."""
    request = make_request("reference", flow, ["/bin/true"], user="kit-test")

    def child() -> dict:
        linux.set_child_subreaper()
        reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        go_r, go_w = os.pipe()
        supervisor = os.fork()
        if supervisor == 0:
            me = os.getpid()
            if os.fork() == 0:
                os.read(go_r, 1)  # the supervisor is gone (the test said so)
                Starter(request, writer, parent=me).main()
            os._exit(0)
        os.waitpid(supervisor, 0)  # the supervisor died; its starter is ours now
        starter = wait_until(
            lambda: [p for p in linux.descendants(os.getpid())], what="the starter"
        )[0]
        os.write(go_w, b"g")
        _, status = os.waitpid(starter, 0)
        writer.close()
        events = []
        while data := reader.recv(1 << 20):  # every writer is closed: ends at EOF
            events.append(decode(data)["kind"])
        return {"code": os.waitstatus_to_exitcode(status), "events": events}

    out = in_child(child)
    assert "ok" in out, out
    return out["ok"]


def test_a_starter_whose_supervisor_died_before_it_began_exits_at_once():
    for flow in ("root", "suid"):
        result = _starter_outliving(flow)
        assert result == {"code": EXIT_FATAL, "events": []}, (flow, result)


@pytest.mark.parametrize("hook", ["create_container", "cleanup_container"])
def test_engine_code_that_closes_the_masters_signalfd_fails_the_run_by_name(hook):
    # The master's poll loop reads signals from a signalfd of its own: engine code that
    # closes it (a blanket close of descriptors in a hook) is named in the ledger as a fatal
    # error, the run fails, and the signals go on being recorded from a new signalfd.
    result = start(
        "kit_test_engines:FdCloserEngine",
        "root",
        ["/bin/sh", "-c", "sleep 0.2"],
        engine_config={"mount_tmp": False, "close_in": hook},
    ).wait()
    assert result.exit_code == EXIT_FATAL
    fatal = result.ledger.select("fatal")
    assert fatal, result.reason
    assert "engine code closed a file descriptor of the kit" in fatal[0]["message"]
    assert "signalfd" in fatal[0]["message"]
    assert not result.ledger.select("starter_error")
    sigchld = [
        e
        for e in result.ledger.select("signal")
        if e["signum"] == signal.SIGCHLD
        and e["sender"] == result.ledger.first("container_start")["container_pid"]
    ]
    assert sigchld, "the container's SIGCHLD was not recorded (SIG-005)"


# -- the parent-death re-arm and the control protocol, fed what they must refuse -----------


def _exit_code_of(fn) -> int:  # type: ignore[no-untyped-def]
    """``fn()`` in a forked child: its exit code (0 when it returns, 1 when it raises)."""
    return exit_code_in_child(lambda: (fn(), 0)[1])


def test_a_process_whose_parent_is_not_the_one_it_was_given_exits_fatal():
    from kit.starter.common import rearm_parent_death

    me = os.getpid()  # the child's parent
    assert _exit_code_of(lambda: rearm_parent_death(me)) == 0
    # a lower pid and a higher one than the real parent's: both are another process
    assert _exit_code_of(lambda: rearm_parent_death(1)) == EXIT_FATAL
    assert _exit_code_of(lambda: rearm_parent_death(me + 1)) == EXIT_FATAL


def test_a_process_whose_socket_to_its_parent_hung_up_exits_fatal():
    from kit.starter.common import rearm_parent_death

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        with theirs:
            assert _exit_code_of(lambda: (theirs.close(), rearm_parent_death(None, ours))) == 0
        # the other end closed everywhere: hung up
        assert _exit_code_of(lambda: rearm_parent_death(None, ours)) == EXIT_FATAL


def test_a_socket_whose_descriptor_is_gone_is_not_taken_for_the_parents_death():
    # poll answers POLLNVAL for a closed descriptor (engine code closed it): that says
    # nothing of the parent, whose death is a hang-up or an error on a socket still open.
    from kit.starter.common import rearm_parent_death

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        assert _exit_code_of(lambda: (os.close(ours.fileno()), rearm_parent_death(None, ours))) == 0


def _received_control(data: bytes, expected: str | None = None) -> tuple[str, str]:
    import threading

    from kit.starter.common import _recv_control

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def send() -> None:
        with theirs:
            theirs.sendall(data)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        with ours:
            return _recv_control(ours, expected)
    finally:
        sender.join(10)


def test_a_failure_message_of_the_maximum_length_is_received_and_one_byte_more_is_refused():
    from kit.starter.common import MAX_CONTROL_MESSAGE, ControlProtocolError

    assert MAX_CONTROL_MESSAGE == 1 << 16
    kind, message = _received_control(b"F" + b"m" * MAX_CONTROL_MESSAGE)
    assert (kind, len(message)) == ("F", MAX_CONTROL_MESSAGE)
    with pytest.raises(ControlProtocolError, match="longer than 65536 bytes"):
        _received_control(b"E" + b"m" * (MAX_CONTROL_MESSAGE + 1))


@pytest.mark.parametrize("expected", [None, "F"])
def test_a_byte_that_is_no_control_message_is_refused_naming_it(expected):
    from kit.starter.common import ControlProtocolError

    with pytest.raises(ControlProtocolError, match=r"b'Z' is no control message"):
        _received_control(b"Z", expected)
    assert _received_control(b"", expected) == ("", "")  # EOF: the other end exec'd or died


def test_a_clone_that_fails_raises_naming_it_and_returns_no_pid(monkeypatch):
    # A pid of -1 handed back would make the caller's waitpid reap any child of its own.
    import ctypes
    import errno

    from kit.starter import common

    class Refusing:
        def clone(self, *args: object) -> int:
            ctypes.set_errno(errno.EAGAIN)
            return -1

    monkeypatch.setattr(common, "_libc", Refusing())
    with pytest.raises(OSError, match="clone: ") as failed:
        common.exiting_child()
    assert failed.value.errno == errno.EAGAIN
