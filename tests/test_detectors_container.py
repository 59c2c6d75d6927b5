"""The container process fed every control byte but the one it waits for, in a forked child."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest

from kit.run.launcher import run
from kit.starter.common import EXIT_FATAL
from kit.starter.container import Container
from kit.starter.control import Control


def _ledger() -> SimpleNamespace:
    ledger = SimpleNamespace(emit=lambda *args, **kwargs: None)
    ledger.for_role = lambda role: ledger
    return ledger


def _container(sock: socket.socket, rpc_sock: socket.socket) -> Container:
    """A container process with no namespace to set up and no RPC server (a join-only run);
    the stage 2 that would follow fails at once on its missing config and says so on the
    socket, so that the test sees whether it started."""
    container = Container.__new__(Container)
    container.sconf = SimpleNamespace(
        hybrid_workflow=False,
        namespace_join_only=True,
        ns_paths={},
        namespaces_created=list,
        bring_loopback_interface=False,
    )
    container.system = SimpleNamespace(getppid=os.getppid, getpid=os.getpid, ns_inode=lambda k: 0)
    container.ledger = _ledger()
    container.sock, container.rpc_sock = sock, rpc_sock
    return container


def run_container(first: bytes, second: bytes | None = None) -> tuple[int, bytes]:
    """Container.main in a forked child: the master's side sends ``first``, reads the
    container's READY and, with ``second``, sends it; then EOF (an empty one: EOF at once),
    so that a container that wrongly goes on never waits for more. The child's exit code and
    all the container said."""
    master, sock = socket.socketpair()
    rpc_master, rpc_sock = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            master.close()
            rpc_master.close()
            _container(sock, rpc_sock).main()
        finally:
            os._exit(1)  # main never returns
    sock.close()
    rpc_sock.close()
    said = b""
    with master, rpc_master:
        master.sendall(first)
        if second is not None:
            said = master.recv(1)
            master.sendall(second)
        master.shutdown(socket.SHUT_WR)
        while data := master.recv(4096):
            said += data
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), said


def test_the_container_goes_on_after_maps_written_and_go():
    # the fake setup goes through: the container reports READY, then stage 2 starts (and
    # fails at once on its fake config, as it says)
    code, said = run_container(b"M", b"G")
    assert code == EXIT_FATAL and said.startswith(b"R" + Control.STAGE2_FAILED.encode()), said


@pytest.mark.parametrize(
    "first",
    [
        Control.ABORT.encode(),  # the starter could not write the uid maps
        b"",  # the starter died
        Control.READY.encode(),  # out of order (and above "M")
    ],
)
def test_the_container_stops_at_once_without_maps_written(first):
    code, said = run_container(first)
    assert (code, said) == (EXIT_FATAL, b"")


@pytest.mark.parametrize(
    "second",
    [
        Control.ABORT.encode(),  # create_container failed
        b"",  # the master died
        Control.MAPS_WRITTEN.encode(),  # out of order (and above "G")
    ],
)
def test_stage_2_starts_only_on_go(second):
    code, said = run_container(Control.MAPS_WRITTEN.encode(), second)
    assert (code, said) == (EXIT_FATAL, Control.READY.encode())


def test_the_rpc_server_shares_its_umask_and_so_its_fs_state_with_the_container():
    # SPEC §5: the RPC server is cloned with CLONE_FS, so what an RPC method does to root,
    # cwd or umask (a chroot, a chdir) is the container process's, and the payload's.
    result = run(
        "kit_test_engines:HostileEngine",
        "root",
        ["/bin/sh", "-c", "umask"],
        engine_config={"rpc_calls": ["umask:0067"]},
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "0067", result.stdout
