"""The starter's parent-death check fed a supervisor that died before the starter began."""

from __future__ import annotations

import os
import socket

from conftest import in_child, wait_until

from kit.ledger.record import decode
from kit.run.launcher import make_request
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
