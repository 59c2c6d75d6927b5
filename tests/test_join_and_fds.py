"""Join-only runs (SPEC §5) and file descriptors kept into the payload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from test_signals import TRAP, wait_for

from kit.run.launcher import run, start
from kit.run.sandbox import join_path

JOIN = "kit_test_engines:JoinEngine"


@pytest.fixture
def target_namespaces():
    """A process in its own uts+net namespaces (made by util-linux, not by pytest)."""
    proc = subprocess.Popen(
        [
            "unshare",
            "--uts",
            "--net",
            "/bin/sh",
            "-c",
            "hostname joined-ns; echo ready; exec sleep 60",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    yield proc.pid
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_join_only_run_calls_only_the_join_hooks(target_namespaces):
    pid = target_namespaces
    # As root the run is in the kit's host sandbox, which reaches no host process's
    # namespaces: the request gives it these two, and the sandbox shows them elsewhere.
    given = {kind: f"/proc/{pid}/ns/{kind}" for kind in ("uts", "net")}
    sandboxed = os.geteuid() == 0
    result = run(
        JOIN,
        "root",
        ["/bin/hostname"],
        join_namespaces=given,
        engine_config={"join": {k: join_path(k, p, sandboxed) for k, p in given.items()}},
    )
    assert result.exit_code == 0, result.reason
    assert result.stdout.strip() == "joined-ns"
    hooks = list(result.ledger.hooks())
    assert hooks == [
        ("stage1", "config"),
        ("stage1", "init_config"),
        ("stage1", "prepare_config"),
        ("stage2", "config"),
        ("stage2", "init_config"),
        ("stage2", "start_process"),
    ]
    stage2 = result.ledger.first("hook_enter", hook="start_process")
    assert stage2["snapshot"]["ns"]["uts"] == os.stat(f"/proc/{pid}/ns/uts").st_ino
    assert stage2["snapshot"]["ns"]["net"] == os.stat(f"/proc/{pid}/ns/net").st_ino
    run_host = result.ledger.first("hook_enter", hook="prepare_config")["snapshot"]["ns"]
    assert stage2["snapshot"]["ns"]["pid"] == run_host["pid"]  # no pid namespace of its own
    assert result.leaks == []


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 42), (signal.SIGUSR2, 46)])
def test_a_signal_to_a_join_only_run_is_forwarded_to_its_container(
    target_namespaces, shared_dir, signum, code
):
    # No monitor runs in a join-only run: the starter forwards SPEC §7's signals itself,
    # and the run ends with the container (it once died of the signal and left it behind).
    pid = target_namespaces
    given = {kind: f"/proc/{pid}/ns/{kind}" for kind in ("uts", "net")}
    sandboxed = os.geteuid() == 0
    ready = os.path.join(shared_dir, "ready")
    handle = start(
        JOIN,
        "root",
        ["/bin/sh", "-c", TRAP.format(ready=ready)],
        join_namespaces=given,
        shared_dirs=[shared_dir],
        engine_config={"join": {k: join_path(k, p, sandboxed) for k, p in given.items()}},
    )
    wait_for(ready)
    handle.send_signal(signum)
    result = handle.wait()
    assert (result.exit_code, result.leaks) == (code, []), result.reason


def _lo_up(pid: int) -> bool:
    """Whether ``lo`` is up in the network namespace of ``pid`` (read by the kit's
    SIOCGIFFLAGS reader in a child that joined it: no ip(8) needed)."""
    code = (
        "import os; from kit.system import linux; "
        f"linux.setns(os.open('/proc/{pid}/ns/net', os.O_RDONLY)); "
        "print(linux.link_flags('lo') & 1)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return out.strip() == "1"


def test_a_joined_network_namespace_keeps_its_loopback_as_it_was(target_namespaces):
    # set_bring_loopback_interface brings lo up in a network namespace the run creates; a
    # joined one belongs to someone else (SPEC §11: its links are as they were).
    pid = target_namespaces
    assert not _lo_up(pid)
    given = {"net": f"/proc/{pid}/ns/net"}
    sandboxed = os.geteuid() == 0
    result = run(
        JOIN,
        "root",
        ["/bin/true"],
        join_namespaces=given,
        engine_config={
            "join": {k: join_path(k, p, sandboxed) for k, p in given.items()},
            "loopback": True,
        },
    )
    assert result.exit_code == 0, result.reason
    assert not _lo_up(pid)


def test_keeping_the_kits_ledger_socket_is_rejected():
    # The payload would hold a socket to the run's ledger; the starter refuses the setting
    # before any namespace exists, naming it.
    result = run("kit_test_engines:KeepsTheLedgerSocketEngine", "root", ["/bin/true"], probes=False)
    assert result.exit_code == 255
    error = result.ledger.first("starter_error")
    assert error["stage"] == "starter_config"
    assert "is the kit's ledger socket" in error["message"], error
    assert not result.ledger.select("stage2_exec")


def test_keeping_a_descriptor_of_the_supervisor_is_rejected():
    # Unsandboxed, the starter still holds the supervisor's result pipe: not one the run
    # inherits, so no payload may hold it (the kit reads its run's result from it).
    result = run("kit_test_engines:KeepsEveryPipeEngine", "root", ["/bin/true"], sandbox=False)
    assert result.exit_code == 255
    error = result.ledger.first("starter_error")
    assert error["stage"] == "starter_config"
    assert "is the kit's own descriptor" in error["message"], error


def test_joining_a_missing_namespace_fails_cleanly():
    result = run(
        JOIN, "root", ["/bin/true"], engine_config={"join": {"uts": "/proc/999999999/ns/uts"}}
    )
    assert result.exit_code == 255
    error = result.ledger.first("starter_error")
    assert "namespace setup failed" in error["message"] and "999999999" in error["message"]
    assert result.leaks == []


def test_kept_fd_reaches_the_payload_and_others_do_not():
    read_end, write_end = os.pipe()
    try:
        result = run(
            JOIN,
            "root",
            ["/bin/sh", "-c", f"echo kept > /proc/self/fd/{write_end}; ls /proc/self/fd"],
            engine_config={"keep_fds": [write_end]},
            pass_fds=(write_end,),
        )
        os.close(write_end)
        write_end = -1
        assert result.exit_code == 0, result.stderr
        assert os.read(read_end, 100) == b"kept\n"
        fds = sorted(int(x) for x in result.stdout.split())
        # 0-2, the kept fd, and the fd ls itself opened on /proc/self/fd.
        assert len(fds) == 5 and fds[3] == min(x for x in fds if x > 2)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_a_descriptor_stage_1_opens_and_keeps_reaches_the_payload():
    # Upstream's stage 1 shares the starter's descriptor table (CLONE_FILES); the kit's
    # stage 1 hands what it keeps over. Numbers low enough that the descriptors handed over
    # land on numbers still to be filled, and one far up.
    numbers = [3, 4, 5, 600]
    result = run(
        JOIN,
        "root",
        ["/bin/sh", "-c", "cat " + " ".join(f"/proc/self/fd/{n}" for n in numbers)],
        engine_config={"stage1_pipes": numbers},
    )
    assert result.exit_code == 0, result.reason
    assert result.stdout.split() == [str(n) for n in numbers]
    assert result.leaks == []


def test_a_kept_descriptor_stage_1_closed_is_closed_for_the_payload():
    read_end, write_end = os.pipe()
    try:
        result = run(
            JOIN,
            "root",
            ["/bin/true"],
            engine_config={"keep_fds": [write_end], "stage1_closes": [write_end]},
            pass_fds=(write_end,),
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.exit_code == 255
    message = result.ledger.first("starter_error")["message"]
    assert message == f"keep_file_descriptor: fd {write_end} is not open in the starter"


def test_keeping_an_fd_that_is_not_open_is_rejected():
    result = run(JOIN, "root", ["/bin/true"], engine_config={"keep_fds": [250]})
    assert result.exit_code == 255
    assert (
        "keep_file_descriptor: fd 250 is not open"
        in result.ledger.first("starter_error")["message"]
    )


def test_bytes_on_master_fd_in_a_join_only_run_are_a_named_fatal_error(target_namespaces):
    given = {"uts": f"/proc/{target_namespaces}/ns/uts"}
    sandboxed = os.geteuid() == 0
    result = run(
        "kit_test_engines:JoinAbuseEngine",
        "root",
        ["/bin/sleep", "0.2"],
        join_namespaces=given,
        engine_config={
            "join": {k: join_path(k, p, sandboxed) for k, p in given.items()},
            "abuse": "high_byte",
        },
        hook_timeout=5,
        run_timeout=20,
    )
    assert result.exit_code == 255, result
    (fatal,) = result.ledger.select("fatal")
    assert fatal["message"].startswith("engine code in stage 2 wrote to the master's control")
    assert not result.ledger.select("stage2_exec")
    assert result.leaks == []


def test_keeping_a_copy_of_the_kits_ledger_socket_under_another_number_is_rejected():
    # Stage 1 hands what it keeps over: the starter knows the kit's descriptors by what they
    # are, not only by their numbers.
    result = run(
        "kit_test_engines:KeepsACopyOfTheLedgerSocketEngine", "root", ["/bin/true"], probes=False
    )
    assert result.exit_code == 255
    messages = [e["message"] for e in result.ledger.select("starter_error")]
    assert any("is a copy of one of the kit's own descriptors" in m for m in messages), messages
    assert not result.ledger.select("stage2_exec")
    assert result.leaks == []
