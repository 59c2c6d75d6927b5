"""The starter's parent-death check fed a supervisor that died before the starter began."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from conftest import in_child, wait_until

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
