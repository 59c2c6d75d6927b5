"""The harness survives the engine: hostile ledger datagrams and RPC replies from engine code,
the death of the kit's own processes, and the run's temporary directories (issue 13)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from conformance import checks
from conformance.runs import Run
from conformance.scenario import SCENARIOS
from kit.ledger import record as L
from kit.ledger.senders import KitProcess, Senders
from kit.run.launcher import RunResult, run
from kit.system import linux

HOSTILE = "kit_test_engines:HostileEngine"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the real backend as root")


@pytest.fixture(autouse=True)
def _outside_the_host_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several engines here write reports to directories the kit's host sandbox does not
    share, and the supervisor-kill test looks for leftovers on the host. (Engine faults in
    the sandbox number their senders as the ledger does: tests/test_sandbox.py.)"""
    monkeypatch.setenv("KIT_SANDBOX", "0")


def hostile_run(flow: str = "root", **cfg) -> RunResult:
    result = run(
        HOSTILE, flow, ["/bin/true"], user="kit-test", engine_config={"leak_tempdir": True, **cfg}
    )
    # The supervisor survived and finished: the leak checks ran (they see the tempdir the
    # engine leaked on purpose) and the ledger ends with the run's exit.
    assert result.events[-1]["kind"] == "exit", result
    leaks = [e["detail"] for e in result.ledger.select("leak", what="tempdir")]
    assert any("hostile-" in d for d in leaks), result.leaks
    return result


def faults(result: RunResult) -> list[dict]:
    return result.ledger.select("engine_fault")


def kernel_pid(result: RunResult, role: str) -> int:
    """The kit process's pid as the supervisor sees it (its pid namespace's view)."""
    if role in ("starter", "master"):
        return result.ledger.first("process_start", role="starter")["pid"]
    if role == "stage1":
        return result.ledger.first("process_exit", child_role="stage1")["child_pid"]
    return result.ledger.first("container_start")["container_pid"]


def ledger_003(result: RunResult) -> str:
    """The LEDGER-003 failure message of this run, as the suite renders it."""
    verify = checks.Verifier("root", ["LEDGER-003"], "t")
    checks.check_no_engine_fault(verify, Run("root", SCENARIOS["default"], "real", result=result))
    assert verify.violations["LEDGER-003"], "LEDGER-003 passed a run with an engine fault"
    return verify.render("LEDGER-003")


# --- malformed datagrams, one test each ------------------------------------------------------

MALFORMED = {
    "list_hook": "hook_enter event without 't'",  # the datagram, verbatim
    "list_hook_full": "hook must be a hook of the contract, not ['x']",
    "not_json": "not JSON",
    "deep": "not JSON (maximum recursion depth",
    "empty": "not JSON",
    "oversized": f"a truncated datagram (longer than {L.MAX_EVENT} bytes",
    "nan": "not JSON (NaN is not JSON)",
    "unknown_kind": "unknown event kind 'coffee'",
    "supervisor_kind": "a 'exit' event, which only the supervisor writes",
    "forged_host_changes": "a 'host_changes' event, which only the supervisor writes",
    "forged_seccomp_filter": "a 'seccomp_filter' event, which only the supervisor writes",
    "forged_syscall_refused": "a 'syscall_refused' event, which only the supervisor writes",
    "forged_syscalls_unrecorded": "a 'syscalls_unrecorded' event, which only the supervisor",
    "extra_key": "stage2_exec event with keys outside the schema: ['bogus']",
    "bad_type": "process_exit event: child_pid must be a pid, not '1'",
    "bare_hook": None,  # well-formed, from the master as itself: not detectable (see README)
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_datagram_from_create_container_is_an_engine_fault(name):
    result = hostile_run(hostile_hook="create_container", datagram=name)
    assert result.exit_code == 0, result
    found = faults(result)
    if MALFORMED[name] is None:
        assert not found
        return
    assert len(found) == 1, found
    fault = found[0]
    assert fault["fault"] == "malformed"
    assert MALFORMED[name] in fault["detail"]
    assert fault["sender_pid"] == kernel_pid(result, "master")
    assert fault["sender_role"] == "starter"
    assert fault["open_hooks"] == ["master create_container"]
    message = ledger_003(result)
    assert f"pid {fault['sender_pid']} (the starter process)" in message
    assert "in master create_container" in message


def test_a_flood_of_bad_datagrams_is_recorded_up_to_a_limit_and_counted():
    from kit.run.supervisor import MAX_FAULTS

    result = hostile_run(hostile_hook="create_container", datagram="flood")
    found = faults(result)
    assert len(found) == MAX_FAULTS + 1
    assert found[-1]["fault"] == "flood"
    assert found[-1]["detail"].startswith(f"{150 - MAX_FAULTS} more datagrams were not recorded")
    verify = checks.Verifier("root", ["LEDGER-003"], "t")
    checks.check_no_engine_fault(verify, Run("root", SCENARIOS["default"], "real", result=result))
    assert len(verify.violations["LEDGER-003"]) == MAX_FAULTS + 1
    assert verify.violations["LEDGER-003"][-1].observed.startswith(
        "a flood datagram from the run's processes, in no hook open: 50 more datagrams"
    )


def test_descriptors_sent_with_a_datagram_never_block_the_supervisor():
    """Two descriptors of a full pipe: not a confirmation; closed, never written to."""
    result = hostile_run(hostile_hook="create_container", datagram="full_pipe")
    assert result.exit_code == 0 and result.timed_out is None
    assert not faults(result)  # a well-formed event without snapshot, from the master


# --- forged datagrams ------------------------------------------------------------------------


def test_a_datagram_naming_another_pid_is_a_forgery_named_by_the_kernels_pid():
    result = hostile_run(hostile_hook="create_container", datagram="other_pid")
    (fault,) = faults(result)
    master = kernel_pid(result, "master")
    assert fault["fault"] == "forged"
    assert fault["detail"] == f"it claims pid {master + 7} but its sender is pid {master}"
    assert "master create_container" in ledger_003(result)


def test_a_datagram_naming_another_role_is_a_forgery():
    result = hostile_run(hostile_hook="create_container", datagram="other_role")
    (fault,) = faults(result)
    assert fault["fault"] == "forged"
    assert fault["detail"] == (
        "it claims role rpc but comes from the starter process "
        f"(pid {kernel_pid(result, 'master')})"
    )


@pytest.mark.parametrize("claimed", ["rpc", "stage1", "container"])
def test_a_child_of_engine_code_posing_as_a_kit_process_is_a_forgery(claimed):
    result = hostile_run(hostile_hook="create_container", datagram=f"helper_{claimed}")
    (fault,) = faults(result)
    assert fault["fault"] == "forged"
    assert fault["sender_role"] is None
    assert f"it claims role {claimed}" in fault["detail"]
    assert f"a child of the starter process, pid {kernel_pid(result, 'master')}" in fault["detail"]
    assert fault["open_hooks"] == ["master create_container"]
    message = ledger_003(result)
    assert f"pid {fault['sender_pid']} (no process of the kit)" in message


@pytest.mark.parametrize(
    "hook,role,datagram,fault_kind",
    [
        ("prepare_config", "stage1", "not_json", "malformed"),
        ("init_config", "stage1", "other_pid", "forged"),
        ("start_process", "stage2", "list_hook_full", "malformed"),
        ("post_start_process", "master", "supervisor_kind", "malformed"),
        ("cleanup_container", "master", "oversized", "malformed"),
    ],
)
def test_hostile_datagrams_from_other_hooks_and_processes_name_the_process(
    hook, role, datagram, fault_kind
):
    result = hostile_run(hostile_hook=hook, hostile_role=role, datagram=datagram)
    (fault,) = faults(result)
    assert fault["fault"] == fault_kind
    assert fault["sender_pid"] == kernel_pid(result, role)
    assert fault["open_hooks"] == [f"{role} {hook}"]
    assert result.exit_code == 0


def test_a_hostile_datagram_from_an_rpc_method_names_the_rpc_server():
    result = hostile_run(rpc_calls=["hostile_send:other_role"])
    (fault,) = faults(result)
    assert fault["sender_role"] == "rpc"
    assert fault["sender_pid"] not in (
        kernel_pid(result, "master"),
        kernel_pid(result, "container"),
    )
    assert fault["open_hooks"] == ["master create_container"]


@pytest.mark.parametrize("flow", ["suid", "userns", "hybrid"])
def test_forgeries_are_caught_in_the_unprivileged_flows_too(flow):
    result = hostile_run(flow, hostile_hook="start_process", datagram="other_pid")
    (fault,) = faults(result)
    assert fault["fault"] == "forged" and fault["sender_role"] == "container"
    assert fault["open_hooks"] == ["stage2 start_process"]


def test_the_fake_backend_attributes_datagrams_too():
    result = run(
        HOSTILE,
        "userns",
        ["/bin/true"],
        user="kit-test",
        backend="fake",
        engine_config={"hostile_hook": "start_process", "datagram": "other_pid"},
    )
    (fault,) = faults(result)
    assert fault["fault"] == "forged" and fault["sender_role"] == "container"


# --- hostile RPC replies, one test each ------------------------------------------------------

RPC_REPLIES = {
    "exits": "RemoteError: SystemExit: 3",
    "interrupted": "RemoteError: KeyboardInterrupt",
    "own_connection": "PermissionError: method 'test-hostile.own_connection' returned file "
    "descriptor(s)",
    "ledger_dup": "PermissionError: method 'test-hostile.ledger_dup' returned file descriptor(s)",
    "int_keys": "TypeError: method 'test-hostile.int_keys' returned an unsendable result: "
    "not JSON-serialisable: object key 1 (int) is not a string",
}


@pytest.mark.parametrize("method", sorted(RPC_REPLIES))
def test_a_hostile_rpc_reply_is_an_error_reply_and_the_server_goes_on(method, tmp_path):
    out = tmp_path / "replies"
    result = hostile_run(rpc_calls=[method, method], out=str(out))
    assert result.exit_code == 0, result
    lines = out.read_text().splitlines()
    assert len(lines) == 4, lines  # two calls, each answered and followed by a live server
    for reply, alive in zip(lines[::2], lines[1::2], strict=False):
        assert reply.startswith(f"{method}: {RPC_REPLIES[method]}"), reply
        assert alive == "alive: yes"
    calls = result.ledger.select("rpc_call", method=f"test-hostile.{method}")
    assert len(calls) == 2 and not any(c["ok"] for c in calls)
    assert result.ledger.first("process_exit", child_role="rpc")["status"] == 0
    assert not faults(result)


# --- the schema checks on their own: boundaries ----------------------------------------------


def _valid(**fields) -> dict:
    return {
        "t": 1,
        "kind": "stage2_failed",
        "role": "stage2",
        "pid": 1,
        "tid": 1,
        "message": "m",
        **fields,
    }


def test_check_event_bounds_names_and_texts():
    assert L.check_event(_valid(message="x" * L.MAX_TEXT)) is None
    assert "message must be a text" in L.check_event(_valid(message="x" * (L.MAX_TEXT + 1)))
    rpc = {**_valid(), "kind": "rpc_call", "ok": True}
    del rpc["message"]
    assert L.check_event({**rpc, "method": "m" * L.MAX_NAME}) is None
    assert "method must be a name" in L.check_event({**rpc, "method": "m" * (L.MAX_NAME + 1)})


def test_check_event_refuses_booleans_for_integers_and_missing_common_keys():
    assert "pid must be a pid, not True" in L.check_event(_valid(pid=True))
    assert "pid must be a pid, not -1" in L.check_event(_valid(pid=-1))
    event = _valid()
    del event["tid"]
    assert L.check_event(event) == "stage2_failed event without 'tid'"
    assert "not an event object" in L.check_event(["kind"])


def test_a_kit_event_truncated_by_its_writer_is_still_valid():
    event = {
        "t": 1,
        "kind": "hook_enter",
        "role": "master",
        "pid": 1,
        "tid": 1,
        "hook": "create_container",
        "truncated": 5 << 20,
    }
    assert L.check_event(event) is None
    del event["hook"]  # a cut event still says which hook it was
    assert L.check_event(event) == "hook_enter event without 'hook'"


def test_senders_refuse_a_second_claimant_of_a_role_and_a_role_of_another_process():
    senders = Senders()
    me = os.getpid()
    senders.processes[os.getppid()] = KitProcess("starter", None)
    ok = {"role": "stage1", "pid": me}
    assert senders.check(me, ok) is None
    assert senders.check(me, {"role": "rpc", "pid": me}) == (
        f"it claims role rpc but comes from the stage1 process (pid {me})"
    )
    assert "the stage1 process is another" in senders.check(1 << 23, ok)  # no such pid
    assert senders.check(None, ok) == "the kernel gave no credentials with it"
    assert "outside the supervisor's pid namespace" in senders.check(0, ok)


def test_an_rpc_server_whose_container_died_is_still_the_kits_but_only_then():
    # The container clones the RPC server and may die (a failing run) before the supervisor
    # reads the RPC server's first datagram: by then the RPC server's parent is the reaper.
    senders = Senders()
    senders.processes[os.getpid()] = KitProcess("starter", None)
    to_rpc, from_test = os.pipe()  # the "RPC server" waits on it until the test is done
    die_r, die_w = os.pipe()  # the "container" waits on it before it dies
    told_r, told_w = os.pipe()

    def wait_for_eof(fd: int, keep: int = -1) -> None:
        # A child keeps only what it reads (and writes): EOF must reach every reader.
        for other in (to_rpc, from_test, die_r, die_w, told_r, told_w):
            if other not in (fd, keep):
                os.close(other)
        os.read(fd, 1)
        os._exit(0)

    container = os.fork()
    if container == 0:
        rpc = os.fork()
        if rpc == 0:
            wait_for_eof(to_rpc)
        os.write(told_w, str(rpc).encode().ljust(16))
        wait_for_eof(die_r)
    other_child = os.fork()  # a child of the starter that is not the container's
    if other_child == 0:
        wait_for_eof(to_rpc)
    for fd in (to_rpc, die_r, told_w):
        os.close(fd)
    rpc = int(os.read(told_r, 16))
    try:
        assert senders.check(container, {"role": "container", "pid": container}) is None
        # While the container lives, a process it did not fork is no RPC server of the kit
        # (here: another child of the starter).
        impostor = {"role": "rpc", "pid": other_child}
        assert "is not the container process" in senders.check(other_child, impostor)
        os.close(die_w)  # the container dies
        os.waitpid(container, 0)
        wait_until(
            lambda: (linux.process_ids(rpc) or [container])[0] != container,
            "the RPC server reparented",
        )
        assert senders.check(rpc, {"role": "rpc", "pid": rpc}) is None
        assert "the rpc process is another" in senders.check(other_child, impostor)
    finally:
        os.close(from_test)
        os.close(told_r)
        os.waitpid(other_child, 0)
        try:
            os.waitpid(rpc, 0)  # when this process is its reaper (a subreaper)
        except ChildProcessError:
            wait_until(lambda: linux.process_state(rpc) in (None, "Z"), "the RPC server's end")


def test_a_zero_length_datagram_is_not_mistaken_for_the_end_of_the_ledger():
    from kit.system import linux

    reader, writer = L.ledger_socketpair()
    with reader, writer:
        writer.send(b"")
        data, sender, _, _ = linux.recv_with_sender(reader, 100, socket.MSG_DONTWAIT)
        assert (data, sender) == (b"", os.getpid())
        writer.close()
        data, sender, _, _ = linux.recv_with_sender(reader, 100, socket.MSG_DONTWAIT)
        assert (data, sender) == (b"", None)


# --- the master's hook learns of a death at once ---------------------------------------------


@pytest.mark.parametrize("flow", ["root", "suid"])
@pytest.mark.parametrize(
    "die,reason",
    [
        ("container", "the container process (pid {pid}) died"),  # ": killed by signal 9"
        # follows unless the engine's monitor reaped it first
        ("rpc", "the RPC server ended (its end of the connection was closed)"),
    ],
)
def test_create_container_learns_at_once_that_the_container_or_rpc_server_died(
    die, reason, flow, shared_dir
):
    out = Path(shared_dir) / "seen"  # the suid master writes it as U
    result = run(
        HOSTILE,
        flow,
        ["/bin/true"],
        user="kit-test",
        hook_timeout=20,
        engine_config={"die": die, "out": str(out)},
    )
    line, seen_reason = out.read_text().splitlines()
    cancelled, waited, call_took, call = line.split()
    assert cancelled == "True", "ctx.wait(30) returned without the cancellation"
    # Without the kit's watch the hook waits 30 s and the 20 s hook timeout ends it; with it,
    # at once: half the timeout tells the two apart on a loaded machine too (2 s did not).
    assert float(waited) < 10.0 and float(call_took) < 10.0
    # ConnectionError itself: the server closed the connection before replying (the
    # client's own message); its subclasses when the kernel refused the send or read first.
    assert call in ("BrokenPipeError", "ConnectionResetError", "ConnectionError", "EOFError")
    pid = result.ledger.first("container_start")["container_pid"]
    assert seen_reason.removesuffix(": killed by signal 9") == reason.format(pid=pid)
    assert result.exit_code == 255 and result.timed_out is None
    assert f"creation interrupted: {seen_reason}" in str(result)


# --- death notices: the zygote and the supervisor ---------------------------------------------

FAULT = "kit_test_engines:FaultEngine"


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def hanging_run():
    from kit.run import launcher
    from kit.system import linux

    handle = launcher.start(
        FAULT,
        "root",
        ["/bin/true"],
        hook_timeout=60,
        engine_config={"fault_hook": "create_container", "fault_action": "hang"},
    )
    wait_until(lambda: linux.process_name(handle.starter_pid) == "kit-master", "the master")
    return handle


def gone(pid: int) -> bool:
    from kit.system import linux

    return linux.process_state(pid) in (None, "Z")


@pytest.fixture
def own_zygote():
    """A zygote of this test's own (the session's stays untouched)."""
    from kit.run.launcher import Zygote

    saved = Zygote._instance
    Zygote._instance = Zygote()
    yield Zygote._instance
    z, Zygote._instance = Zygote._instance, saved
    z.control.close()
    z.proc.wait(timeout=10)


def test_a_killed_supervisor_is_named_with_its_signal_and_what_it_left(own_zygote):
    import signal as signals

    from kit.run.launcher import LaunchError

    handle = hanging_run()
    os.kill(handle.supervisor_pid, signals.SIGKILL)
    with pytest.raises(LaunchError) as err:
        handle.wait()
    assert str(err.value).startswith(
        f"the run's supervisor (pid {handle.supervisor_pid}) ended without writing the "
        f"run's result: killed by signal 9 (SIGKILL); left behind: the run directory "
        f"{handle.run_dir}, removed now"
    )
    assert not os.path.exists(handle.run_dir)
    wait_until(lambda: gone(handle.starter_pid), "the starter's end (parent-death signal)")


def test_a_killed_zygote_is_named_for_the_runs_it_took_along(own_zygote):
    import signal as signals

    from kit.run.launcher import LaunchError

    handle = hanging_run()
    os.kill(own_zygote.proc.pid, signals.SIGKILL)
    with pytest.raises(LaunchError) as err:
        handle.wait()
    assert (
        f"the run's supervisor (pid {handle.supervisor_pid}) ended without writing the "
        f"run's result: died with its parent: the kit's zygote process "
        f"(pid {own_zygote.proc.pid}) died: killed by signal 9 (SIGKILL)"
    ) in str(err.value)
    assert not os.path.exists(handle.run_dir)
    with pytest.raises(
        LaunchError,
        match=rf"zygote process \(pid {own_zygote.proc.pid}\) "
        r"died: killed by signal 9",
    ):
        own_zygote.spawn(handle.request, [0, 1, 2, 2], [])


# --- the run's temporary directory outlives no owner -------------------------------------------

LAUNCHER = """
import sys, time
sys.path.insert(0, {tests!r})
from kit.run import launcher
from kit.system import linux
h = launcher.start({engine!r}, "root", ["/bin/true"], hook_timeout=60,
                   engine_config={{"fault_hook": "create_container", "fault_action": "hang"}})
while linux.process_name(h.starter_pid) != "kit-master":
    time.sleep(0.01)
print(h.run_dir, h.supervisor_pid, h.starter_pid, flush=True)
time.sleep(120)
"""


def test_the_run_directory_goes_when_the_launcher_is_killed():
    import signal as signals
    import subprocess
    import sys

    code = LAUNCHER.format(tests=os.path.dirname(__file__), engine=FAULT)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        run_dir, supervisor, starter = proc.stdout.readline().split()
        assert os.path.isdir(run_dir)
    finally:
        proc.send_signal(signals.SIGKILL)
        proc.wait()
        proc.stdout.close()
    wait_until(lambda: not os.path.exists(run_dir), f"{run_dir} to go")
    wait_until(lambda: gone(int(supervisor)) and gone(int(starter)), "the run's processes")


def test_a_dead_owners_run_directory_is_swept_and_a_live_ones_is_kept(tmp_path):
    from kit.run import rundir

    live, live_fd = rundir.create(str(tmp_path))
    dead, dead_fd = rundir.create(str(tmp_path))
    os.close(dead_fd)  # its owner is gone: nobody holds the lock
    old_style = tmp_path / "kit-run-abcdefgh"  # an older kit's: no lock protocol, not judged
    old_style.mkdir()
    (tmp_path / "kit-run-lk-file").write_text("")  # not a directory
    try:
        assert rundir.sweep(str(tmp_path)) == [dead]
        assert os.path.isdir(live) and old_style.is_dir()
    finally:
        rundir.remove(live, live_fd)
    assert rundir.sweep(str(tmp_path)) == []


# --- a snapshot engine code fakes from inside its process ------------------------------------


def test_a_snapshot_faked_in_the_process_is_contradicted_by_the_supervisors_own_read():
    result = hostile_run(fake_probe="caps")
    found = faults(result)
    assert found, "a snapshot claiming no capabilities in the root master passed"
    # The master's hooks run in threads at once: monitor_container's entry may come after
    # create_container installed the lie, so its fault may be the first.
    fault = next((f for f in found if '"hook":"create_container"' in f["excerpt"]), found[0])
    assert fault["fault"] == "forged" and fault["sender_role"] == "starter"
    assert fault["detail"].startswith("its snapshot says caps {'effective': [], ")
    assert "the kernel says {'effective': ['CAP_CHOWN'" in fault["detail"]
    assert '"hook":"create_container"' in fault["excerpt"]
    assert "master create_container" in ledger_003(result)


def test_a_snapshot_that_disagrees_once_is_read_again_not_called_forged():
    # Another thread's process-wide credential change (glibc's set*id reaches every thread)
    # can fall between a snapshot and the supervisor's read: the sender reads it again.
    result = hostile_run(fake_probe="caps-once")
    assert not faults(result), faults(result)
    returned = [
        e
        for e in result.ledger.select("hook_return", role="master")
        if e["hook"] == "create_container"
    ]
    assert returned and any(t["caps"]["effective"] for t in returned[0]["snapshot"]["threads"])


def test_a_snapshot_sent_without_waiting_for_the_outside_check_is_refused():
    result = hostile_run(fake_probe="unconfirmed")
    fault = faults(result)[0]
    assert fault["detail"] == (
        "its snapshot came without waiting for the supervisor's outside check"
    )
    assert fault["sender_pid"] == kernel_pid(result, "master")


@pytest.mark.parametrize("flow", ["fakeroot", "hybrid"])
def test_snapshots_in_a_user_namespace_agree_with_the_outside_read(flow):
    """Ids read from outside a user namespace (U) are translated by its maps into what the
    process sees (0): no false alarm."""
    result = run("reference", flow, ["/bin/true"], user="kit-test")
    assert result.exit_code == 0 and not faults(result)
    assert any(
        t["uid"][0] == 0
        for e in result.ledger.select("hook_enter", role="rpc")
        for t in e["snapshot"]["threads"]
    )
