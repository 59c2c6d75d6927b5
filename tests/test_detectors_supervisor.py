"""The supervisor's detectors fed real violations: a leaked mount, named network namespace,
process and temporary file, hooks that hang, raise or return, the run timer, a starter that
crashes. The real Supervisor.run runs in a forked child of the test in a mount namespace of
its own (``/`` made private first), with a scripted starter in place of the kit's: whatever
the script leaks lives and dies in that sandbox, never on the host."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import in_child

from kit.ledger.record import LedgerWriter
from kit.run import seccomp, supervisor
from kit.run.launcher import make_request
from kit.system import linux

Script = Callable[[LedgerWriter], int]


def _enter_sandbox() -> None:
    """A mount namespace of this (forked, single-threaded) process, ``/`` private in it, so
    no mount made from here on reaches the host."""
    linux.unshare(linux.ns_flags(["mount"]))
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)


def _scripted_starter(script: Script, with_filter: bool = False) -> type:
    class ScriptedStarter:
        """Stands for :class:`kit.starter.stage1.Starter`: runs ``script``, exits with its code;
        ``with_filter``: under the real backend's filter first, as the kit's starter."""

        def __init__(
            self,
            request: Any,
            sock: Any,
            filter_channel: Any = None,
            parent: int | None = None,
            inherited: set[int] | None = None,
        ) -> None:
            self.ledger = LedgerWriter(sock, "starter")
            self.ledger.supervisor_pid = parent  # type: ignore[attr-defined]
            self.filter_channel = filter_channel
            # The supervisor waits (up to the run timeout) for the starter's seccomp filter
            # before it reads the ledger: say at once that there is none, or every timer
            # would start a run timeout late.
            if filter_channel is not None and not with_filter:
                filter_channel.sendall(
                    json.dumps(
                        {"filter": None, "reason": "a scripted starter installs none"}
                    ).encode()
                )
                filter_channel.close()

        def main(self) -> None:
            code = 70
            try:
                if with_filter:
                    refused = seccomp.install_for_run("real", self.filter_channel)
                    assert refused is None, refused
                code = script(self.ledger)
            finally:
                os._exit(code)

    return ScriptedStarter


def supervise(
    script: Script,
    setup: Callable[[], None] = lambda: None,
    *,
    with_filter: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Run the real supervisor over ``script`` in a sandboxed child; its result, the
    seconds the run took, and the descendants still alive after it. ``with_filter``: the
    script runs under the real backend's seccomp filter, its listener the supervisor's."""
    # the test's own sandbox (a mount namespace) stands for the host: not the kit's
    request = make_request("reference", "root", ["/bin/true"], **options)
    request.sandbox = False

    def child() -> dict[str, Any]:
        _enter_sandbox()
        setup()
        supervisor.Starter = _scripted_starter(script, with_filter)
        r, w = os.pipe()
        started = time.monotonic()
        sup = supervisor.Supervisor(request)
        result = sup.run(w)
        seconds = time.monotonic() - started
        # what the launcher gets: the result encoded with the datagrams spliced in as sent
        encoded_as_is = json.loads(sup.encode(result)) == json.loads(json.dumps(result))
        os.close(w)
        first = os.read(r, 4096).decode()
        # Alive as the kit's leak checks mean it: a process still in its exit is not.
        alive = [p for p in linux.descendants(os.getpid()) if linux.process_alive(p)]
        for pid in alive:  # what a broken supervisor left: never outlives the test
            os.kill(pid, signal.SIGKILL)
        with open("/proc/self/mountinfo") as f:  # mount point -> id, after the run
            mount_ids = {line.split()[4]: line.split()[0] for line in f}
        return {
            **result,
            "seconds": seconds,
            "alive": alive,
            "first_line": first,
            "mount_ids": mount_ids,
            "encoded_as_is": encoded_as_is,
        }

    out = in_child(child)
    assert "ok" in out, out
    assert out["ok"]["encoded_as_is"], "the encoded result is not the result"
    return out["ok"]


def finish(ledger: LedgerWriter, code: int = 0) -> int:
    ledger.emit("starter_exit", code=code)
    return code


def kinds(result: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in result["ledger"]["events"] if e["kind"] == kind]


# -- a clean run --------------------------------------------------------------------------------


def test_a_clean_run_has_no_leak_and_no_timeout():
    result = supervise(finish)
    assert (result["exit_code"], result["reason"]) == (0, "exited")
    assert result["leaks"] == [] and result["timed_out"] is None and result["alive"] == []
    assert result["first_line"].startswith("started ")
    kinds_seen = [e["kind"] for e in result["ledger"]["events"]]
    # As root the starter's first act is the host-global seccomp filter (recorded).
    assert [k for k in kinds_seen if k != "seccomp_filter"] == ["run_start", "starter_exit", "exit"]


# -- leaks --------------------------------------------------------------------------------------


def test_a_mount_left_in_the_host_mount_namespace_is_reported_naming_it(tmp_path):
    target = tmp_path / "leaked"
    target.mkdir()

    def leaks_a_mount(ledger: LedgerWriter) -> int:
        linux.mount("kit-leak", str(target), "tmpfs", 0, "size=64k")
        return finish(ledger)

    result = supervise(leaks_a_mount)
    assert [(leak["what"], leak["detail"].split(" (")[0]) for leak in result["leaks"]] == [
        ("mount", str(target))
    ]
    assert result["leaks"][0]["detail"].endswith(") in the host mount namespace")
    assert f"(mount id {result['mount_ids'][str(target)]})" in result["leaks"][0]["detail"]
    assert [e["detail"] for e in kinds(result, "leak")] == [result["leaks"][0]["detail"]]
    assert result["exit_code"] == 0  # a leak is reported, not turned into the exit code


def test_a_mount_removed_during_the_run_is_not_a_leak(tmp_path):
    target = tmp_path / "before"
    target.mkdir()

    def removes_a_mount(ledger: LedgerWriter) -> int:
        linux.umount(str(target))
        return finish(ledger)

    result = supervise(
        removes_a_mount, setup=lambda: linux.mount("kit-pre", str(target), "tmpfs", 0)
    )
    assert result["leaks"] == []


def test_a_mount_over_a_mount_point_that_existed_is_reported(tmp_path):
    target = tmp_path / "stacked"
    target.mkdir()

    def stacks_a_mount(ledger: LedgerWriter) -> int:
        linux.mount("kit-leak", str(target), "tmpfs", 0)
        return finish(ledger)

    result = supervise(
        stacks_a_mount, setup=lambda: linux.mount("kit-pre", str(target), "tmpfs", 0)
    )
    assert [leak["detail"].split(" (")[0] for leak in result["leaks"]] == [str(target)]


def test_a_named_network_namespace_left_behind_is_reported_naming_it(tmp_path):
    netns_dir = tmp_path / "netns"
    netns_dir.mkdir()
    (netns_dir / "was-there").touch()

    def leaks_a_netns(ledger: LedgerWriter) -> int:
        # as `ip netns add` does: a new net namespace bound onto a file in the netns dir
        path = netns_dir / "kit-leaked"
        path.touch()
        linux.unshare(linux.ns_flags(["net"]))
        linux.mount("/proc/self/ns/net", str(path), None, linux.MS_BIND)
        return finish(ledger)

    def setup() -> None:
        supervisor.NETNS_DIR = str(netns_dir)

    result = supervise(leaks_a_netns, setup=setup)
    leaks = {leak["what"]: leak["detail"] for leak in result["leaks"]}
    assert leaks["netns"] == f"{netns_dir}/kit-leaked"
    assert leaks["mount"].startswith(f"{netns_dir}/kit-leaked (mount id ")
    assert len(result["leaks"]) == 2


def test_a_process_left_behind_is_reported_naming_it_and_killed():
    def leaks_a_process(ledger: LedgerWriter) -> int:
        pid = os.fork()
        if pid == 0:
            os.setsid()
            linux.set_name("kit-leaked")
            signal.pause()
            os._exit(0)
        return finish(ledger)

    result = supervise(leaks_a_process)
    [leak] = result["leaks"]
    assert leak["what"] == "process"
    assert leak["detail"].startswith("pid ") and ": " in leak["detail"]
    pid = int(leak["detail"].split()[1].rstrip(":"))
    assert leak["detail"].split(": ", 1)[1] not in ("", "?")
    assert result["alive"] == []  # killed and reaped by the supervisor
    assert not linux.process_alive(pid)  # dead, or still in the exit the kill began


def test_a_process_that_exited_unreaped_is_not_a_leak():
    def leaves_a_zombie(ledger: LedgerWriter) -> int:
        if os.fork() == 0:
            os._exit(0)
        return finish(ledger)

    result = supervise(leaves_a_zombie)
    assert result["leaks"] == [] and result["alive"] == []


def test_a_file_left_in_the_run_directory_is_reported_naming_it():
    run_dirs = []

    def leaks_files(ledger: LedgerWriter) -> int:
        tmp = os.environ["TMPDIR"]
        run_dirs.append(tmp)
        for name in ("b-left", "a-left"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write("x")
        return finish(ledger)

    result = supervise(leaks_files)
    assert result["leaks"] == [
        {"what": "tempdir", "detail": "left in the run's temporary directory: a-left, b-left"}
    ]
    run_dir = result["ledger"]["events"][0]["run_dir"]
    assert not os.path.exists(run_dir)  # removed after the check


def test_every_leak_kind_is_reported_in_one_run(tmp_path):
    target = tmp_path / "m"
    target.mkdir()

    def leaks_everything(ledger: LedgerWriter) -> int:
        linux.mount("kit-leak", str(target), "tmpfs", 0)
        open(os.path.join(os.environ["TMPDIR"], "f"), "w").close()
        if os.fork() == 0:
            signal.pause()
            os._exit(0)
        return finish(ledger)

    result = supervise(leaks_everything)
    assert sorted(leak["what"] for leak in result["leaks"]) == ["mount", "process", "tempdir"]
    assert result["alive"] == []


# -- the hook timer -----------------------------------------------------------------------------

T = 1.0  # hook timeout of the timer tests (seconds)


def opens(hook: str, role: str = "master") -> Script:
    def script(ledger: LedgerWriter) -> int:
        ledger.for_role(role).emit("hook_enter", hook=hook)
        signal.pause()
        return 0

    return script


def ends_then_hangs(hook: str, role: str = "master") -> Script:
    """A run whose ``hook`` entered and returned, then nothing more."""

    def script(ledger: LedgerWriter) -> int:
        writer = ledger.for_role(role)
        writer.emit("hook_enter", hook=hook)
        writer.emit("hook_return", hook=hook)
        signal.pause()
        return 0

    return script


def test_a_hung_hook_is_reported_naming_it_and_its_process_after_its_timeout():
    result = supervise(opens("create_container"), hook_timeout=T)
    timed_out = result["timed_out"]
    assert (timed_out["hook"], timed_out["hook_role"], timed_out["seconds"]) == (
        "create_container",
        "master",
        T,
    )
    assert timed_out["whole_run"] is False
    assert [h["hook"] for h in timed_out["open_hooks"]] == ["create_container"]
    assert result["seconds"] >= T
    assert result["exit_code"] == 255
    assert (
        result["reason"] == f"hook timeout: create_container in master did not return within {T} s"
    )
    [event] = kinds(result, "hook_timeout")
    assert event["hook"] == "create_container" and event["hook_role"] == "master"
    assert event["hook_pid"] > 0
    assert result["alive"] == [] and result["leaks"] == []


@pytest.mark.parametrize("closing", ["hook_raise", "hook_return"])
def test_a_hook_that_ends_after_a_while_is_no_timeout(closing):
    def ends_late(ledger: LedgerWriter) -> int:
        master = ledger.for_role("master")
        master.emit("hook_enter", hook="create_container")
        time.sleep(T * 0.3)  # the hook's own work, before it raises or returns
        master.emit(closing, hook="create_container")
        time.sleep(T * 1.2)  # the run goes on past the hook's deadline
        return finish(ledger)

    result = supervise(ends_late, hook_timeout=T)
    assert result["timed_out"] is None, result["timed_out"]
    assert (result["exit_code"], result["reason"]) == (0, "exited")
    assert result["seconds"] >= T * 1.5


@pytest.mark.parametrize("returns_first", [False, True])
def test_a_hook_entered_again_keeps_its_first_deadline(returns_first):
    """A hook that keeps sending hook_enter for itself (a forged datagram, or engine code
    calling its own hook), with a forged hook_return before each or not, must not restart
    its timer each time (blind round 6)."""

    def re_enters(ledger: LedgerWriter) -> int:
        master = ledger.for_role("master")
        for _ in range(int(T * 3 / 0.1)):
            if returns_first:
                master.emit("hook_return", hook="create_container")
            master.emit("hook_enter", hook="create_container")
            time.sleep(0.1)
        signal.pause()
        return 0

    result = supervise(re_enters, hook_timeout=T)
    assert result["timed_out"]["hook"] == "create_container"
    # It fired while the entries still came: before the last of them.
    assert len(kinds(result, "hook_enter")) < int(T * 3 / 0.1), result["seconds"]


def test_a_hook_ended_by_another_role_is_still_open():
    def wrong_role(ledger: LedgerWriter) -> int:
        ledger.for_role("master").emit("hook_enter", hook="create_container")
        ledger.for_role("rpc").emit("hook_return", hook="create_container")
        ledger.for_role("stage2").emit("hook_raise", hook="create_container")
        signal.pause()
        return 0

    result = supervise(wrong_role, hook_timeout=T)
    assert result["timed_out"]["hook"] == "create_container"
    assert result["timed_out"]["hook_role"] == "master"


def as_process(ledger: LedgerWriter, first_role: str, body: Callable[[], None]) -> int:
    """Fork a process of the run that writes as ``first_role`` (its first datagram registers
    it, as the kit's container and RPC server do: the supervisor attributes each datagram to
    the process the kernel says sent it) and then runs ``body``; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            ledger.for_role(first_role).emit(
                "process_start", ppid=os.getppid(), nspid=[os.getpid()]
            )
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_stage2_exec_ends_start_process_and_its_absence_is_a_timeout():
    def execs(ledger: LedgerWriter) -> int:
        def container() -> None:
            stage2 = ledger.for_role("stage2")
            stage2.emit("hook_enter", hook="start_process")
            stage2.emit("stage2_exec")

        os.waitpid(as_process(ledger, "container", container), 0)
        time.sleep(T * 1.3)  # past the hook's deadline: closed by stage2_exec, not open
        return finish(ledger)

    def hangs_in_start_process(ledger: LedgerWriter) -> int:
        def container() -> None:
            ledger.for_role("stage2").emit("hook_enter", hook="start_process")
            signal.pause()

        as_process(ledger, "container", container)
        signal.pause()
        return 0

    result = supervise(execs, hook_timeout=T)
    assert result["timed_out"] is None and kinds(result, "engine_fault") == [], result
    assert [e["kind"] for e in result["ledger"]["events"] if e["role"] == "stage2"] == [
        "hook_enter",
        "stage2_exec",
    ]
    result = supervise(hangs_in_start_process, hook_timeout=T)
    assert (result["timed_out"]["hook"], result["timed_out"]["hook_role"]) == (
        "start_process",
        "stage2",
    )
    assert result["alive"] == []


def test_stage2_failed_ends_start_process():
    def fails(ledger: LedgerWriter) -> int:
        stage2 = ledger.for_role("stage2")
        stage2.emit("hook_enter", hook="start_process")
        stage2.emit("stage2_failed", message="m")
        time.sleep(T * 1.3)
        return finish(ledger)

    assert supervise(fails, hook_timeout=T)["timed_out"] is None


def two_hung_hooks(rpc_first: bool) -> Script:
    """A script that opens two hooks that hang, 0.2 s apart: the master's
    ``create_container`` and the RPC server's ``init_config`` (in a process of its own, as
    in the kit), in that order or the other."""

    def two(ledger: LedgerWriter) -> int:
        entered_r, entered_w = os.pipe()

        def rpc_server() -> None:
            ledger.for_role("rpc").emit("hook_enter", hook="init_config")
            os.write(entered_w, b"e")
            signal.pause()

        def container() -> None:  # the RPC server is the container's child, as in the kit
            as_process(ledger, "rpc", rpc_server)
            signal.pause()

        def master() -> None:
            ledger.for_role("master").emit("hook_enter", hook="create_container")

        def rpc() -> None:
            as_process(ledger, "container", container)
            os.read(entered_r, 1)

        for step in (rpc, master) if rpc_first else (master, rpc):
            step()
            time.sleep(0.2)  # the second hook opens that much later
        signal.pause()
        return 0

    return two


@pytest.mark.parametrize("rpc_first", [False, True], ids=["master-first", "rpc-first"])
def test_the_oldest_of_two_hung_hooks_is_named_and_both_are_listed(rpc_first):
    # in both orders: the oldest is neither the lowest pid (the starter's) nor the first role
    # by name ("master")
    two = two_hung_hooks(rpc_first)
    result = supervise(two, hook_timeout=T)
    timed_out = result["timed_out"]
    order = [("master", "create_container"), ("rpc", "init_config")]
    if rpc_first:
        order.reverse()
    assert (timed_out["hook_role"], timed_out["hook"]) == order[0]
    assert [(h["role"], h["hook"]) for h in timed_out["open_hooks"]] == order
    first, second = timed_out["open_hooks"]
    assert first["open_for"] >= T and first["open_for"] > second["open_for"]
    assert all(round(h["open_for"], 3) == h["open_for"] for h in (first, second))  # ms
    [fired] = kinds(result, "hook_timeout")
    [enter] = [e for e in kinds(result, "hook_enter") if e["role"] == order[0][0]]
    assert fired["hook_pid"] == enter["pid"] > 0  # the process of the hook it names
    # How long each was open, as the supervisor counts it (from reading its hook_enter to
    # the timeout), is at most the time from its sending to the timeout's event
    # (CLOCK_MONOTONIC in every process; half a millisecond of rounding).
    for (role, _), hook in zip(order, (first, second), strict=True):
        [sent] = [e for e in kinds(result, "hook_enter") if e["role"] == role]
        assert 0 < hook["open_for"] <= (fired["t"] - sent["t"]) / 1e9 + 0.0005, (hook, sent)


def test_an_untimed_hook_runs_until_the_run_timeout_which_names_it():
    result = supervise(opens("monitor_container"), hook_timeout=0.2, run_timeout=T)
    timed_out = result["timed_out"]
    assert result["seconds"] >= T
    assert timed_out["whole_run"] is True and timed_out["seconds"] == T
    assert (timed_out["hook"], timed_out["hook_role"]) == ("monitor_container", "master")
    assert timed_out["open_hooks"] == []
    assert (
        result["reason"] == f"hook timeout: monitor_container in master did not return within {T} s"
    )


def test_a_run_with_no_open_hook_times_out_as_a_whole():
    def hangs(ledger: LedgerWriter) -> int:
        signal.pause()
        return 0

    result = supervise(hangs, run_timeout=T)
    assert result["timed_out"]["whole_run"] is True
    assert result["seconds"] >= T and result["alive"] == []
    assert result["exit_code"] == 255
    [fired] = kinds(result, "hook_timeout")
    # No hook is open: none is named (monitor_container once was, for a run stuck before
    # stage 2 as well, which sent engine authors to the wrong hook).
    assert (fired["hook"], fired["hook_role"], fired["hook_pid"]) == ("", "", 0)
    assert fired["open_hooks"] == []
    assert result["reason"] == (
        f"run timeout: the run did not end within {T} s, and no hook was open (none had "
        "run): kit code or engine code outside the hooks kept it from going on"
    )


def test_a_run_stuck_between_hooks_is_named_after_the_last_hook_that_ended():
    result = supervise(ends_then_hangs("create_container"), hook_timeout=0.2, run_timeout=T)
    assert result["timed_out"]["hook"] == ""
    assert "the last hook to end: create_container in master, returned" in result["reason"]


def test_an_untimed_hook_that_ended_is_not_named_by_the_run_timer():
    result = supervise(ends_then_hangs("monitor_container"), run_timeout=T)
    assert (result["timed_out"]["hook"], result["timed_out"]["hook_role"]) == ("", "")


def test_the_run_timer_names_a_hook_still_open():
    result = supervise(opens("post_start_process"), hook_timeout=30.0, run_timeout=T)
    timed_out = result["timed_out"]
    assert timed_out["whole_run"] is True and timed_out["seconds"] == T
    assert (timed_out["hook"], timed_out["hook_role"]) == ("post_start_process", "master")


@pytest.mark.parametrize("rpc_first", [False, True], ids=["master-first", "rpc-first"])
def test_the_run_timer_names_the_oldest_open_hook_not_the_first_by_name(rpc_first):
    # Both hooks are still open (their own timeout is far) when the run's time is up: the
    # run timer names the one open longest. By name, ("master", "create_container") sorts
    # first in both orders; by age, it is first only when the master's hook opened first.
    result = supervise(two_hung_hooks(rpc_first), hook_timeout=30.0, run_timeout=T)
    timed_out = result["timed_out"]
    order = [("master", "create_container"), ("rpc", "init_config")]
    if rpc_first:
        order.reverse()
    assert timed_out["whole_run"] is True and timed_out["seconds"] == T
    assert (timed_out["hook_role"], timed_out["hook"]) == order[0]
    assert [(h["role"], h["hook"]) for h in timed_out["open_hooks"]] == order
    [fired] = kinds(result, "hook_timeout")
    [enter] = [e for e in kinds(result, "hook_enter") if e["role"] == order[0][0]]
    assert fired["hook_pid"] == enter["pid"] > 0
    assert result["reason"] == (
        f"hook timeout: {order[0][1]} in {order[0][0]} did not return within {T} s"
    )
    assert result["alive"] == []


# -- how the starter ended ------------------------------------------------------------------------


def test_a_starter_exit_code_is_the_runs():
    result = supervise(lambda ledger: finish(ledger, 7))
    assert (result["exit_code"], result["reason"]) == (7, "exited")


def test_a_starter_that_exits_without_finishing_is_a_crash_naming_its_code():
    result = supervise(lambda ledger: 3)
    assert (result["exit_code"], result["reason"]) == (
        255,
        "master crashed: exited 3 without finishing the run",
    )


@pytest.mark.parametrize("code", [253, 254, 255])
def test_only_exit_254_without_finishing_is_said_to_be_the_lost_ledgers_code(code):
    # 254 is what the kit's processes exit with when their ledger socket is taken: said so
    # (and that engine code exiting 254 looks the same); its neighbours are plain crashes.
    result = supervise(lambda ledger: code)
    assert result["exit_code"] == 255
    if code == 254:
        assert result["reason"].startswith(
            "master crashed: exited 254 with nothing more recorded, as the kit's master does"
        ), result["reason"]
    else:
        assert result["reason"] == f"master crashed: exited {code} without finishing the run"


def test_a_starter_that_crashes_after_a_refused_call_is_still_a_crash():
    # Whether the run finished is read from the ledger: its starter_exit event, that kind
    # exactly. The supervisor's own syscall_refused (recorded while the starter waits in
    # the refused call) is not it, though it sorts after it.
    if seccomp.rules_for("real", seccomp._has_sys_admin()) is None:
        pytest.skip("the real backend installs no filter without CAP_SYS_ADMIN")
    libc = ctypes.CDLL(None, use_errno=True)

    def refused_then_crashes(ledger: LedgerWriter) -> int:
        timex = ctypes.create_string_buffer(512)  # modes 0: a read, were it not refused
        rc = libc.syscall(ctypes.c_long(seccomp.SYSCALLS_X86_64["adjtimex"]), timex)
        refused = rc == -1 and ctypes.get_errno() == errno.EPERM
        return 3 if refused else 4  # no starter_exit: the run did not finish

    result = supervise(refused_then_crashes, with_filter=True)
    [refusal] = kinds(result, "syscall_refused")
    assert (refusal["syscall"], refusal["errno"], refusal["answered"]) == (
        "adjtimex",
        "EPERM",
        True,
    )
    assert kinds(result, "starter_exit") == []
    assert (result["exit_code"], result["reason"]) == (
        255,
        "master crashed: exited 3 without finishing the run",
    )


def test_every_refused_call_is_answered_while_the_ledger_is_read():
    # The listener stays registered after a refusal: the second refused call waits in the
    # kernel until the supervisor answers it, so a supervisor that stopped listening after
    # the first would leave the starter blocked until the run timeout.
    if seccomp.rules_for("real", seccomp._has_sys_admin()) is None:
        pytest.skip("the real backend installs no filter without CAP_SYS_ADMIN")
    libc = ctypes.CDLL(None, use_errno=True)

    def refused_twice(ledger: LedgerWriter) -> int:
        timex = ctypes.create_string_buffer(512)
        for _ in range(2):
            rc = libc.syscall(ctypes.c_long(seccomp.SYSCALLS_X86_64["adjtimex"]), timex)
            if not (rc == -1 and ctypes.get_errno() == errno.EPERM):
                return 4
        return finish(ledger)

    result = supervise(refused_twice, with_filter=True, run_timeout=5.0)
    assert result["timed_out"] is None, result["timed_out"]
    assert (result["exit_code"], result["reason"]) == (0, "exited")
    assert [(r["syscall"], r["answered"]) for r in kinds(result, "syscall_refused")] == [
        ("adjtimex", True),
        ("adjtimex", True),
    ]


def test_a_refused_call_is_attributed_to_the_hook_entered_just_before_it():
    # The hook_enter sent just before a refused call may arrive after the poll that
    # answered with the listener alone: the supervisor reads the ledger before it attributes
    # the refusal, so the refusal names its hook. The poll here answers so, deterministically:
    # the first answer that holds the listener leaves out the ledger's reader.
    if seccomp.rules_for("real", seccomp._has_sys_admin()) is None:
        pytest.skip("the real backend installs no filter without CAP_SYS_ADMIN")
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        import select

        real_poll = select.poll

        class ReaderLookedAtFirst:
            """collect's poller: registers the reader, the pidfd, then the listener."""

            def __init__(self) -> None:
                self.poller = real_poll()
                self.order: list[int] = []
                self.hidden = False

            def register(self, fd: int, mask: int) -> None:
                self.order.append(fd)
                self.poller.register(fd, mask)

            def unregister(self, fd: int) -> None:
                self.poller.unregister(fd)

            def poll(self, timeout: int | None = None) -> list[tuple[int, int]]:
                ready = self.poller.poll(timeout)
                if len(self.order) == 3 and not self.hidden:
                    reader, _, listener = self.order
                    if any(fd == listener for fd, _ in ready):
                        self.hidden = True
                        ready = [(fd, ev) for fd, ev in ready if fd != reader]
                return ready

        select.poll = ReaderLookedAtFirst  # type: ignore[assignment]

    def refused_in_a_hook(ledger: LedgerWriter) -> int:
        master = ledger.for_role("master")
        master.emit("hook_enter", hook="create_container")
        timex = ctypes.create_string_buffer(512)
        libc.syscall(ctypes.c_long(seccomp.SYSCALLS_X86_64["adjtimex"]), timex)
        master.emit("hook_return", hook="create_container")
        return finish(ledger)

    result = supervise(refused_in_a_hook, setup=setup, with_filter=True, run_timeout=30.0)
    [refusal] = kinds(result, "syscall_refused")
    assert (refusal["process_role"], refusal["hook"]) == ("master", "create_container"), refusal
    assert (result["exit_code"], result["reason"]) == (0, "exited")


def answering_in_the_first_read(then: Callable[[], None] = lambda: None) -> Callable[[], None]:
    """A supervise() setup: reading the starter's first event (starter_config) waits for a
    refused call and answers it from there, as the fake backend's supervisor does while it
    waits for the model's lock (Store.waiting); then runs ``then`` and reads that event on."""

    def setup() -> None:
        import select

        real_admit = supervisor.Supervisor.admit

        def admit(self: Any, data: bytes, *args: Any, **kwargs: Any) -> bytes:
            if b'"starter_config"' in data:
                assert self.listener is not None
                poller = select.poll()
                poller.register(self.listener, select.POLLIN)
                assert poller.poll(10_000), "the scripted call never came"
                self._answer_while_the_model_is_locked()
                then()
            return real_admit(self, data, *args, **kwargs)

        supervisor.Supervisor.admit = admit  # type: ignore[method-assign]

    return setup


def test_a_call_answered_while_an_event_is_read_is_attributed_to_its_hook_when_it_was_made():
    # In the fake backend the supervisor answers refused calls while it waits for the model's
    # lock in the middle of reading an event (Store.waiting): the hook_enter sent before the
    # call is still queued then, and the hook_return sent after its answer may be read
    # before the refusal is recorded. Both are stood for here: reading the first event waits
    # for the call and answers it from there.
    if seccomp.rules_for("real", seccomp._has_sys_admin()) is None:
        pytest.skip("the real backend installs no filter without CAP_SYS_ADMIN")
    libc = ctypes.CDLL(None, use_errno=True)

    def refused_in_a_hook(ledger: LedgerWriter) -> int:
        ledger.emit("starter_config", config={})
        master = ledger.for_role("master")
        master.emit("hook_enter", hook="create_container")
        timex = ctypes.create_string_buffer(512)
        libc.syscall(ctypes.c_long(seccomp.SYSCALLS_X86_64["adjtimex"]), timex)
        master.emit("hook_return", hook="create_container")
        return finish(ledger)

    setup = answering_in_the_first_read()
    result = supervise(refused_in_a_hook, setup=setup, with_filter=True, run_timeout=30.0)
    [refusal] = kinds(result, "syscall_refused")
    assert (refusal["process_role"], refusal["hook"]) == ("master", "create_container"), refusal
    assert (result["exit_code"], result["reason"]) == (0, "exited")


def test_an_rpc_refusal_answered_while_an_event_is_read_is_named_after_its_own_method(tmp_path):
    # The same wait, for a call of the RPC server: its method returns after the answer and
    # its rpc_call is read before the refusal is recorded (so it comes before the refusal in
    # the ledger). The method named is still the one the call was made in: not the one
    # served before it, nor the next one, nor none.
    if seccomp.rules_for("real", seccomp._has_sys_admin()) is None:
        pytest.skip("the real backend installs no filter without CAP_SYS_ADMIN")
    libc = ctypes.CDLL(None, use_errno=True)
    returned = tmp_path / "returned"

    def until_the_method_returned() -> None:  # its rpc_call is queued then
        deadline = time.monotonic() + 10
        while not returned.exists():
            assert time.monotonic() < deadline, "the scripted method never returned"
            time.sleep(0.005)

    def method_refused(ledger: LedgerWriter) -> int:
        ledger.emit("starter_config", config={})

        def serve() -> None:
            rpc = ledger.for_role("rpc")
            rpc.emit("hook_enter", hook="init_config")
            rpc.emit("hook_return", hook="init_config")
            rpc.emit("rpc_call", method="e.earlier", ok=True)  # returned before the call
            timex = ctypes.create_string_buffer(512)
            libc.syscall(ctypes.c_long(seccomp.SYSCALLS_X86_64["adjtimex"]), timex)
            rpc.emit("rpc_call", method="e.refused", ok=True)
            returned.touch()
            rpc.emit("rpc_call", method="e.next", ok=True)

        def container() -> None:  # the RPC server is the container's child, as in the kit
            os.waitpid(as_process(ledger, "rpc", serve), 0)

        os.waitpid(as_process(ledger, "container", container), 0)
        return finish(ledger)

    setup = answering_in_the_first_read(until_the_method_returned)
    result = supervise(method_refused, setup=setup, with_filter=True, run_timeout=30.0)
    [refusal] = kinds(result, "syscall_refused")
    assert (refusal["process_role"], refusal["hook"]) == ("rpc", "RPC method e.refused"), refusal


def test_a_starter_killed_by_a_signal_is_a_crash_naming_the_signal():
    def killed(ledger: LedgerWriter) -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    result = supervise(killed)
    assert (result["exit_code"], result["reason"]) == (
        255,
        f"master crashed: killed by signal {signal.SIGKILL.value}",
    )


def test_a_datagram_with_whitespace_around_its_object_is_encoded_again_not_spliced():
    # json.loads takes whitespace around an object; the result's splice (the datagram as
    # sent, its last byte replaced by ',"seq":N}') must not, or the result is not JSON
    def sends_padded(ledger: LedgerWriter) -> int:
        master = ledger.for_role("master")
        for kind, pad_before, pad_after in (("hook_enter", b"", b"\n"), ("hook_return", b" ", b"")):
            event = {
                "t": time.monotonic_ns(),
                "kind": kind,
                "role": "master",
                "pid": os.getpid(),
                "tid": threading.get_native_id(),
                "hook": "create_container",
            }
            master.sock.send(pad_before + json.dumps(event).encode() + pad_after)
        return finish(ledger)

    result = supervise(sends_padded)  # asserts the encoded result decodes to the result
    padded = [e["kind"] for e in result["ledger"]["events"] if e["role"] == "master"]
    assert padded == ["hook_enter", "hook_return"], result["ledger"]["events"]
    assert kinds(result, "engine_fault") == []


def _unread(sock: Any) -> int:
    """Bytes this socket sent that the peer has not read yet (SIOCOUTQ)."""
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.sock, termios.TIOCOUTQ, b"\0" * 4))[0]


def test_a_hook_that_returned_in_time_is_no_timeout_when_the_supervisor_was_late():
    # The supervisor is stopped (not scheduled, as on a loaded machine) past the hook's
    # deadline, while the hook's return waits in its socket: the return was in time. The
    # starter cannot stop it (the run's seccomp filter refuses signals to the supervisor): a
    # process forked before the run, outside the filter, does, when the script asks.
    from conftest import wait_until

    pipes: dict[str, int] = {}

    def stopper(supervisor_pid: int) -> None:
        os.read(pipes["ask"], 1)
        # stopped while it waits in poll for the next datagram, the hook's return
        wait_until(
            lambda: linux.process_state(supervisor_pid) == "S",
            what="the supervisor to wait for the next datagram",
        )
        os.kill(supervisor_pid, signal.SIGSTOP)
        wait_until(
            lambda: linux.process_state(supervisor_pid) == "T", what="the supervisor to stop"
        )
        os.write(pipes["stopped_w"], b"s")
        os.read(pipes["ask"], 1)  # the hook returned meanwhile
        time.sleep(T * 1.5)  # the supervisor misses the hook's deadline
        os.kill(supervisor_pid, signal.SIGCONT)

    def setup() -> None:
        pipes["ask"], pipes["ask_w"] = os.pipe()
        pipes["stopped"], pipes["stopped_w"] = os.pipe()
        supervisor_pid = os.getpid()
        if os.fork() == 0:
            code = 70
            try:
                stopper(supervisor_pid)
                code = 0
            finally:
                os._exit(code)

    def returns_while_supervisor_stopped(ledger: LedgerWriter) -> int:
        master = ledger.for_role("master")
        master.emit("hook_enter", hook="create_container")
        wait_until(lambda: _unread(master) == 0, what="the supervisor to read hook_enter")
        os.write(pipes["ask_w"], b"1")
        os.read(pipes["stopped"], 1)
        master.emit("hook_return", hook="create_container")
        os.write(pipes["ask_w"], b"2")
        return finish(ledger)

    result = supervise(returns_while_supervisor_stopped, setup=setup, hook_timeout=T)
    assert result["timed_out"] is None, result["timed_out"]
    assert (result["exit_code"], result["reason"]) == (0, "exited"), (
        result["reason"],
        [(e["kind"], e.get("detail")) for e in result["ledger"]["events"]],
    )
    [enter] = kinds(result, "hook_enter")
    [exited] = kinds(result, "starter_exit")
    assert (exited["t"] - enter["t"]) / 1e9 < T  # the hook ended in time, the reading did not
    assert result["seconds"] >= T * 1.5  # the supervisor really was stopped past it


def test_what_is_queued_when_the_starter_exits_is_read_to_its_end():
    # The starter sends more than two read batches and exits before the supervisor reads
    # any: the loop reads a batch per wake-up, finds the starter gone, and what is still
    # queued (its starter_exit last) is read after it, not lost.
    pairs = supervisor.READ_BATCH  # 2 * READ_BATCH events, then starter_exit
    pipes: dict[str, int] = {}

    def setup() -> None:
        collect = supervisor.Supervisor.collect
        read_events = supervisor.Supervisor._read_events

        def noting_the_starter(self: Any, reader: Any, starter_pid: int) -> Any:
            pipes["starter"] = starter_pid
            return collect(self, reader, starter_pid)

        def after_the_exit(self: Any, reader: Any, batch: int | None = supervisor.READ_BATCH):
            if "exited" not in pipes:  # the first read only: the starter is reaped later
                os.waitid(os.P_PID, pipes["starter"], os.WEXITED | os.WNOWAIT)
                pipes["exited"] = 1
            return read_events(self, reader, batch)

        supervisor.Supervisor.collect = noting_the_starter  # type: ignore[method-assign]
        supervisor.Supervisor._read_events = after_the_exit  # type: ignore[method-assign]

    def floods(ledger: LedgerWriter) -> int:
        master = ledger.for_role("master")
        for _ in range(pairs):
            master.emit("hook_enter", hook="create_container")
            master.emit("hook_return", hook="create_container")
        return finish(ledger)

    result = supervise(floods, setup=setup)
    assert (result["exit_code"], result["reason"]) == (0, "exited")
    assert len(kinds(result, "hook_return")) == pairs
    assert kinds(result, "engine_fault") == []


def test_a_starter_whose_pidfd_is_a_high_descriptor_is_seen_to_exit():
    # A process with many files open (an engine's launcher, say) gives the supervisor high
    # descriptor numbers: the starter's pidfd among them is still found in poll's answer.
    def setup() -> None:
        while os.open("/dev/null", os.O_RDONLY) < 300:
            pass

    result = supervise(finish, setup=setup, run_timeout=5.0)
    assert result["timed_out"] is None, result["timed_out"]
    assert (result["exit_code"], result["reason"]) == (0, "exited")


def test_the_ledger_is_read_as_it_arrives_when_the_pidfd_is_numbered_below_it():
    # A descriptor freed below the ledger's reader before collecting begins (a temporary
    # file of the run closed) gives the starter's pidfd the lower number: the supervisor
    # still reads each datagram as it comes, not only once the starter has exited.
    from conftest import wait_until

    def setup() -> None:
        low = os.open("/dev/null", os.O_RDONLY)  # below every descriptor the run opens
        collect = supervisor.Supervisor.collect

        def freeing_a_low_descriptor(self: Any, reader: Any, starter_pid: int) -> Any:
            os.close(low)
            return collect(self, reader, starter_pid)

        supervisor.Supervisor.collect = freeing_a_low_descriptor  # type: ignore[method-assign]

    def waits_to_be_read(ledger: LedgerWriter) -> int:
        master = ledger.for_role("master")
        master.emit("hook_enter", hook="create_container")
        wait_until(lambda: _unread(master) == 0, what="the supervisor to read hook_enter")
        master.emit("hook_return", hook="create_container")
        # and reads on: a ready reader is not taken for the starter's exit
        wait_until(lambda: _unread(master) == 0, what="the supervisor to read hook_return")
        return finish(ledger)

    result = supervise(waits_to_be_read, setup=setup, run_timeout=30.0)
    assert result["timed_out"] is None, result["timed_out"]
    assert (result["exit_code"], result["reason"]) == (0, "exited")


# 50 ms: a poll that waited in the wrong unit (a second and more) would be late past the bound
@pytest.mark.parametrize("timeout", [2.0, 0.05])
def test_a_hung_hook_is_reported_at_its_timeout_not_later(timeout):
    result = supervise(opens("create_container"), hook_timeout=timeout)
    [enter] = kinds(result, "hook_enter")
    [fired] = kinds(result, "hook_timeout")
    waited = (fired["t"] - enter["t"]) / 1e9  # CLOCK_MONOTONIC in both processes
    # at the timeout, with room for a loaded machine's scheduling, far from twice it
    assert timeout <= waited < timeout + 0.9, waited


@pytest.mark.parametrize("timer", ["hook", "run"])
def test_an_end_queued_when_the_supervisor_finds_its_deadline_passed_is_in_time(timer):
    # The supervisor reads the hook's hook_enter, then is late (descheduled, as on a loaded
    # machine, between reading a batch and looking at its timers) past a deadline, while
    # what ends the wait has arrived in time and waits in its queue: the hook's return (its
    # own timeout), the starter's exit (the run's). It reads what is queued before it times
    # anything out. The lateness is the test's: the real supervisor, its read of the batch
    # that holds hook_enter wrapped (in its own forked process) to block there until the
    # end is queued, then sleep past the deadline.
    hook = "create_container" if timer == "hook" else "monitor_container"  # the latter untimed
    pipes: dict[str, int] = {}

    def setup() -> None:
        pipes["go"], pipes["go_w"] = os.pipe()
        pipes["sent"], pipes["sent_w"] = os.pipe()
        collect = supervisor.Supervisor.collect
        read_events = supervisor.Supervisor._read_events

        def noting_the_starter(self: Any, reader: Any, starter_pid: int) -> Any:
            pipes["starter"] = starter_pid
            return collect(self, reader, starter_pid)

        def late_read(self: Any, reader: Any, batch: int | None = supervisor.READ_BATCH) -> bool:
            # from here on, the run's deadline (set when collecting began) is before this
            run_deadline = time.monotonic() + self.req.run_timeout
            more = read_events(self, reader, batch)
            if "late" in pipes or not kinds({"ledger": {"events": self.events}}, "hook_enter"):
                return more
            pipes["late"] = 1
            os.write(pipes["go_w"], b"g")
            os.read(pipes["sent"], 1)  # the end is queued: hook_return, starter_exit
            if timer == "hook":
                deadline = self.open_hooks[("master", hook)][0]
            else:
                os.waitid(os.P_PID, pipes["starter"], os.WEXITED | os.WNOWAIT)  # exited
                deadline = run_deadline
            while (left := deadline - time.monotonic()) >= 0:
                time.sleep(left + 0.01)
            return more

        supervisor.Supervisor.collect = noting_the_starter  # type: ignore[method-assign]
        supervisor.Supervisor._read_events = late_read  # type: ignore[method-assign]

    def ends_in_time(ledger: LedgerWriter) -> int:
        master = ledger.for_role("master")
        master.emit("hook_enter", hook=hook)
        os.read(pipes["go"], 1)
        master.emit("hook_return", hook=hook)
        ledger.emit("starter_exit", code=0)
        os.write(pipes["sent_w"], b"s")
        return 0

    options = {"hook_timeout": T} if timer == "hook" else {"run_timeout": T}
    result = supervise(ends_in_time, setup=setup, **options)
    assert result["timed_out"] is None, result["timed_out"]
    assert (result["exit_code"], result["reason"]) == (0, "exited")
    assert [e["kind"] for e in result["ledger"]["events"] if e["role"] != "supervisor"] == [
        "hook_enter",
        "hook_return",
        "starter_exit",
    ]
    assert result["seconds"] >= T  # the supervisor really was late past the deadline


#: How much of a rejected datagram an engine fault quotes (the event's documented field).
QUOTED = 200


@pytest.mark.parametrize("size", [QUOTED - 1, QUOTED, QUOTED + 1, 4 * QUOTED])
def test_a_rejected_datagram_is_quoted_up_to_200_bytes_and_no_further(size):
    # An engine fault quotes the datagram that caused it: all of a short one, and the first
    # 200 bytes of a longer one (the rest could be anything, at any length).
    junk = bytes(ord("a") + i % 26 for i in range(size))

    def sends_junk(ledger: LedgerWriter) -> int:
        ledger.for_role("master").sock.send(junk)
        return finish(ledger)

    result = supervise(sends_junk)
    (fault,) = kinds(result, "engine_fault")
    assert fault["excerpt"] == junk[:QUOTED].decode(), fault
    assert len(fault["excerpt"]) == min(size, QUOTED)


# -- the supervisor's parts, fed directly --------------------------------------------------------


def _bare_supervisor() -> supervisor.Supervisor:
    return supervisor.Supervisor(make_request("reference", "root", ["/bin/true"]))


def test_a_process_gone_between_the_listing_and_the_kill_is_no_error():
    # A leaked process may exit on its own after kill_tree listed it and before its SIGKILL:
    # the kill finds no such process, and the sweep goes on.
    def child() -> list[int]:
        sup = _bare_supervisor()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)  # gone, and reaped: its pid names no process
        rounds = iter([True, False])
        sup._run_alive = lambda: next(rounds)  # type: ignore[method-assign]
        sup._run_processes = lambda: [pid]  # type: ignore[method-assign]
        sup.kill_tree()
        return list(rounds)

    assert in_child(child) == {"ok": []}


def _queued(*datagrams: bytes) -> tuple[Any, Any]:
    """A ledger socket pair with ``datagrams`` queued on its reader."""
    from kit.ledger.record import ledger_socketpair

    reader, writer = ledger_socketpair()
    for datagram in datagrams:
        writer.send(datagram)
    return reader, writer


def test_a_batch_reads_at_most_its_count_and_none_reads_all():
    reader, writer = _queued(b"1", b"2", b"3", b"4")
    sup = _bare_supervisor()
    try:
        assert sup._read_events(reader, batch=2) is True
        # what the batch left waits in the queue, in order: the third datagram first
        assert sup._receive(reader)[0] == b"3"
        writer.send(b"5")
        assert sup._read_events(reader, batch=None) is True  # "4", "5", then nothing queued
        assert [e["excerpt"] for e in sup.events if e["kind"] == "engine_fault"] == [
            "1",
            "2",
            "4",
            "5",
        ]
        with pytest.raises(BlockingIOError):
            sup._receive(reader)
    finally:
        reader.close()
        writer.close()


def test_a_read_ends_at_the_closed_writer_not_at_an_empty_datagram():
    # An empty datagram still has its sender's credentials: it is a malformed event, and the
    # ledger goes on. The end of the ledger (every writer closed) has none.
    reader, writer = _queued(b"")
    sup = _bare_supervisor()
    try:
        assert sup._read_events(reader, batch=1) is True
        [fault] = [e for e in sup.events if e["kind"] == "engine_fault"]
        assert (fault["fault"], fault["excerpt"]) == ("malformed", "")
        writer.close()
        assert sup._read_events(reader) is False
    finally:
        reader.close()


def test_the_host_is_looked_at_after_each_batch_read_to_its_end():
    class Watch:
        looks = 0

        def look(self) -> None:
            Watch.looks += 1

        def note(self, event: dict[str, Any]) -> None:
            pass

    reader, writer = _queued(b"1")
    sup = _bare_supervisor()
    sup.host = Watch()
    try:
        assert sup._read_events(reader, batch=1) is True  # the batch is full: no look yet
        assert Watch.looks == 0
        assert sup._read_events(reader) is True  # nothing more queued: the hooks looked at
        assert Watch.looks == 1
    finally:
        reader.close()
        writer.close()


def _sent_with(writer: Any, datagram: bytes, fds: list[int]) -> None:
    import array
    import socket

    writer.sendmsg([datagram], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("past", [0, 1], ids=["at-the-limit", "past-it"])
def test_a_datagram_past_the_event_limit_is_dropped_and_its_sender_still_answered(past):
    # past it: the supervisor's own events are recorded beyond the limit
    from kit.ledger.record import CONFIRMED

    reader, writer = _queued()
    sup = _bare_supervisor()
    sup.events = [{}] * (supervisor.MAX_EVENTS + past)
    r, w = os.pipe()
    before = set(os.listdir("/proc/self/fd"))
    try:
        _sent_with(writer, b'{"kind": "x"}', [w])
        assert sup._read_events(reader) is True
        assert (len(sup.events), sup.dropped) == (supervisor.MAX_EVENTS + past, 1)
        os.set_blocking(r, False)  # unanswered: an error here, not a hung test
        assert os.read(r, 16) == CONFIRMED  # the sender waits for it: never left waiting
        assert set(os.listdir("/proc/self/fd")) == before  # the passed descriptor closed
    finally:
        os.close(r)
        os.close(w)
        reader.close()
        writer.close()


def test_a_confirmation_pipe_is_answered_and_other_descriptors_only_closed():
    from kit.ledger.record import CONFIRMED

    reader, writer = _queued()
    sup = _bare_supervisor()
    pipes = [os.pipe() for _ in range(3)]
    before = set(os.listdir("/proc/self/fd"))
    try:
        # one pipe: a confirmation pipe; two pipes, or one that is not a pipe: not one
        _sent_with(writer, b"a", [pipes[0][1]])
        _sent_with(writer, b"b", [pipes[1][1], pipes[2][1]])
        _sent_with(writer, b"c", [reader.fileno()])
        assert sup._read_events(reader) is True
        assert set(os.listdir("/proc/self/fd")) == before
        for r, _ in pipes:  # unanswered: an error here, not a hung test
            os.set_blocking(r, False)
        assert os.read(pipes[0][0], 16) == CONFIRMED
        for r, _ in pipes[1:]:
            with pytest.raises(BlockingIOError):
                os.read(r, 16)
        assert [e["excerpt"] for e in sup.events if e["kind"] == "engine_fault"] == ["a", "b", "c"]
    finally:
        for pair in pipes:
            for fd in pair:
                os.close(fd)
        reader.close()
        writer.close()


def test_a_descriptor_closed_already_is_no_pipe_and_no_error():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert supervisor._is_pipe([w]) is False
    supervisor._release([w], pipe=True)  # the answer and the close both fail quietly
    assert not _is_open(w)
