"""The privilege probes fed real credentials: a forked child takes a uid set, capabilities or a
user namespace of its own, and the test asserts what ``probe.snapshot`` + ``host_privilege``
and ``probe.escalation`` report for it (behaviour, not how the probes read it)."""

from __future__ import annotations

import dataclasses
import errno
import importlib
import os
import resource
import shutil
import signal
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import in_child

from kit.ledger import probe
from kit.system import linux

U = 1000  # an unprivileged uid (no such user needed)
CAP_SETUID = 7


def as_credentials(
    uids: tuple[int, int, int], keep_caps: bool = False, then: Callable[[], None] = lambda: None
) -> Callable[[], dict[str, Any]]:
    """In the child: setresuid to ``uids``, every capability dropped (or, with ``keep_caps``,
    the permitted set kept as the kernel leaves it), run ``then``; report host_privilege of
    its snapshot and its escalation verdict."""

    def child() -> dict[str, Any]:
        linux.set_keepcaps(keep_caps)
        os.setresgid(U, U, U)
        os.setresuid(*uids)
        if not keep_caps:
            # a uid 0 left in the set keeps the permitted capabilities: dropped, so that
            # only the uid can make the verdict
            linux.capset(0, 0, 0)
        then()
        snap = probe.snapshot()
        return {
            "privileged": probe.host_privilege(snap),
            "escalation": probe.escalation(),
            "uid": snap["threads"][0]["uid"],
            "permitted": snap["threads"][0]["caps"]["permitted"],
        }

    return child


def report(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    out = in_child(fn)
    assert "ok" in out, out
    return out["ok"]


@pytest.fixture(autouse=True)
def no_setuid_binary() -> Iterator[None]:
    before = probe.setuid_binary()
    probe.configure(None, None)
    yield
    probe.configure(None, before)


# -- host_privilege: uid 0 in any of real, effective, saved; or a permitted capability --------


@pytest.mark.parametrize(
    "uids", [(U, U, 0), (U, 0, U), (0, U, U)], ids=["saved", "effective", "real"]
)
def test_a_uid_0_in_any_of_real_effective_saved_is_host_privilege(uids):
    r = report(as_credentials(uids))
    assert (r["uid"][:3], r["permitted"]) == (list(uids), [])
    assert r["privileged"] is True


def test_a_fully_dropped_process_has_no_host_privilege():
    r = report(as_credentials((U, U, U)))
    assert (r["uid"], r["permitted"]) == ([U] * 4, [])
    assert r["privileged"] is False


def test_a_permitted_capability_without_uid_0_is_host_privilege():
    r = report(as_credentials((U, U, U), keep_caps=True))
    assert r["uid"] == [U] * 4 and "cap_setuid" in [c.lower() for c in r["permitted"]]
    assert r["privileged"] is True


def test_fs_uid_0_alone_is_not_host_privilege():
    def fs_root_only() -> None:
        # with the permitted caps kept: CAP_SETUID effective to set fsuid 0, then every
        # capability dropped
        linux.capset(1 << CAP_SETUID, 1 << CAP_SETUID, 0)
        linux.thread_setfsuid(0)
        linux.capset(0, 0, 0)

    r = report(as_credentials((U, U, U), keep_caps=True, then=fs_root_only))
    assert (r["uid"], r["permitted"]) == ([U, U, U, 0], [])
    assert r["privileged"] is False


def test_a_privileged_second_thread_makes_the_process_privileged():
    # the main thread drops alone (raw syscall); the other thread keeps saved uid 0
    def child() -> dict[str, Any]:
        os.setresgid(U, U, U)
        os.setresuid(U, U, 0)  # every thread
        linux.capset(0, 0, 0)  # this thread, before the helper copies its credentials
        ready, done = threading.Event(), threading.Event()
        helper = threading.Thread(target=lambda: (ready.set(), done.wait(30)))
        helper.start()
        ready.wait(30)
        linux.thread_setresuid(U, U, U)  # this thread only
        snap = probe.snapshot()
        done.set()
        helper.join()
        return {
            "privileged": probe.host_privilege(snap),
            "uids": sorted(t["uid"][2] for t in snap["threads"]),
            "caps": [t["caps"]["permitted"] for t in snap["threads"]],
        }

    r = report(child)
    assert r["uids"] == [0, U] and r["caps"] == [[], []]
    assert r["privileged"] is True


def test_uid_0_in_a_user_namespace_of_its_own_is_no_host_privilege():
    def in_userns() -> dict[str, Any]:
        linux.unshare(linux.ns_flags(["user"]))
        for name, line in (("setgroups", "deny"), ("gid_map", f"0 {U} 1"), ("uid_map", f"0 {U} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(line)
        snap = probe.snapshot()
        return {
            "privileged": probe.host_privilege(snap),
            "uid": snap["threads"][0]["uid"],
            "permitted": bool(snap["threads"][0]["caps"]["permitted"]),
            "escalation": probe.escalation(),
        }

    def child() -> dict[str, Any]:
        os.setresgid(U, U, U)
        os.setresuid(U, U, U)
        linux.set_dumpable(True)  # a setresuid child may write its own maps again
        return in_userns()

    r = report(child)
    assert r["uid"] == [0] * 4 and r["permitted"] is True  # root in there, all caps
    assert r["privileged"] is False
    esc = r["escalation"]
    assert esc["host_userns"] is False and esc["host_escalation"] is False
    assert esc["setresuid_root"] is True  # it is uid 0 there: the way works, harmlessly


def test_a_snapshot_from_an_unknown_user_namespace_counts_as_the_hosts():
    snap = probe.snapshot()
    snap["ns"] = {**snap["ns"], "user": None}
    # this test process is root: unknown must not be taken for "another namespace"
    assert probe.host_privilege(snap) is True
    assert probe.host_privilege(snap, host=(0, -1)) is True
    snap["ns"]["user"] = 4026531837 + 12345
    assert probe.host_privilege(snap, host=(0, 4026531837 + 12345)) is True
    assert probe.host_privilege(snap, host=(0, 1)) is False
    # another namespace whatever the order of the inode numbers
    assert probe.host_privilege(snap, host=(0, 4026531837 + 12346)) is False


# -- escalation: each way back to privilege, on its own ---------------------------------------


def test_a_saved_uid_0_escalates_through_setresuid():
    esc = report(as_credentials((U, U, 0)))["escalation"]
    assert esc["host_userns"] is True
    assert (esc["setresuid_root"], esc["raise_caps"]) == (True, [])
    assert esc["host_escalation"] is True


def test_permitted_capabilities_escalate_by_raising_them():
    esc = report(as_credentials((U, U, U), keep_caps=True))["escalation"]
    # each way on its own: the raised capabilities are lowered before setresuid is tried
    assert esc["setresuid_root"] is False
    assert "cap_setuid" in [c.lower() for c in esc["raise_caps"]]
    assert esc["host_escalation"] is True


def test_only_the_permitted_capabilities_not_yet_effective_are_reported_raised():
    def one_effective() -> None:
        linux.capset(1 << CAP_SETUID, linux.capget()[1], 0)

    r = report(as_credentials((U, U, U), keep_caps=True, then=one_effective))
    raised = r["escalation"]["raise_caps"]
    assert raised and "CAP_SETUID" not in raised
    assert sorted([*raised, "CAP_SETUID"]) == sorted(r["permitted"])


def test_a_permitted_capability_outside_the_bounding_set_is_raised_too():
    """Raising touches the effective set only: the inheritable one may not grow past the
    bounding set, so a probe that also raised it would fail here and report nothing."""
    cap_sys_admin = 21

    def drop_from_bounding() -> None:
        _, permitted, _ = linux.capget()
        linux.capset(permitted, permitted, 0)  # CAP_SETPCAP effective, to drop
        linux.bounding_drop(cap_sys_admin)
        linux.capset(0, permitted, 0)

    r = report(as_credentials((U, U, U), keep_caps=True, then=drop_from_bounding))
    assert "CAP_SYS_ADMIN" in r["permitted"]
    assert r["escalation"]["raise_caps"] == r["permitted"]


def test_a_fully_dropped_process_cannot_escalate_and_says_why_setuid_was_untried():
    esc = report(as_credentials((U, U, U)))["escalation"]
    assert (esc["setresuid_root"], esc["raise_caps"], esc["setuid_exec"]) == (False, [], None)
    assert esc["setuid_exec_untried"] == probe.UNTRIED_NO_BINARY
    assert esc["host_escalation"] is False


@pytest.fixture
def setuid_binary() -> Iterator[probe.SetuidBinary]:
    directory = tempfile.mkdtemp(prefix="kit-probe-")
    os.chmod(directory, 0o755)  # the unprivileged child must reach the binary
    try:
        yield probe.provide_setuid_binary(directory)
    finally:
        shutil.rmtree(directory)


@pytest.mark.parametrize("nnp", [False, True], ids=["setuid-counts", "no-new-privs"])
def test_the_setuid_binary_escalates_unless_no_new_privs(setuid_binary, nnp):
    probe.configure(None, setuid_binary)
    then = (lambda: linux.set_no_new_privs()) if nnp else (lambda: None)
    esc = report(as_credentials((U, U, U), then=then))["escalation"]
    assert esc["setuid_exec_euid"] == (U if nnp else 0)
    assert esc["setuid_exec"] is (not nnp)
    assert "setuid_exec_untried" not in esc
    assert esc["host_escalation"] is (not nnp)


def test_a_setuid_binary_replaced_by_another_file_is_untried_naming_why(setuid_binary):
    for ino in (setuid_binary.ino + 1, setuid_binary.ino - 1):
        other = probe.SetuidBinary(setuid_binary.path, setuid_binary.dev, ino)
        probe.configure(None, other)
        esc = report(as_credentials((U, U, U)))["escalation"]
        assert esc["setuid_exec"] is None
        assert esc["setuid_exec_untried"] == f"{probe.UNTRIED_UNREACHABLE}:other-file"


# -- the setuid way's outcomes, each named: real programs in the binary's place -----------------


@pytest.fixture
def program_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="kit-probe-")
    os.chmod(directory, 0o755)  # the unprivileged child must reach what is in it
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def binary_at(path: str) -> probe.SetuidBinary:
    """``path`` as the run's binary: its identity is the file's own, so the probe execs it."""
    st = os.stat(path)
    return probe.SetuidBinary(path, st.st_dev, st.st_ino)


def script(directory: str, body: str, mode: int = 0o755) -> str:
    path = os.path.join(directory, "prog")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, mode)
    return path


def escalation_with(binary: probe.SetuidBinary | None) -> dict[str, Any]:
    probe.configure(None, binary)
    return report(as_credentials((U, U, U)))["escalation"]


WORDS = "no number here but words, and more of them than sixty characters in all"


def test_a_binary_that_prints_no_number_is_untried_quoting_its_output_on_stderr(program_dir):
    # stderr is read too (an exec'd loader's complaint lands there); the quote is cut at 60
    # characters and its spaces made underscores, so the verdict is one word
    esc = escalation_with(binary_at(script(program_dir, f"echo '{WORDS}' >&2\n")))
    assert esc["setuid_exec"] is None
    assert esc["setuid_exec_untried"] == "output:" + WORDS[:60].replace(" ", "_")
    assert esc["host_escalation"] is False


def test_a_binary_that_cannot_be_executed_is_untried_naming_the_errno(program_dir):
    esc = escalation_with(binary_at(script(program_dir, "id -u\n", mode=0o644)))
    assert (esc["setuid_exec"], esc["setuid_exec_untried"]) == (None, "exec:EACCES")


def test_a_binary_not_at_its_path_or_unavailable_is_untried_saying_why(program_dir):
    gone = probe.SetuidBinary(os.path.join(program_dir, "absent"), 1, 2)
    assert escalation_with(gone)["setuid_exec_untried"] == f"{probe.UNTRIED_UNREACHABLE}:ENOENT"
    nosuid = probe.SetuidBinary("/bin/true", unavailable="nosuid")
    assert escalation_with(nosuid)["setuid_exec_untried"] == f"{probe.UNTRIED_NO_BINARY}:nosuid"


def test_the_sigchld_of_a_probe_child_is_told_apart_once():
    """The master's signal loop asks :func:`probe.is_probe_child` for each SIGCHLD: yes for
    the setuid binary's exit (once: the pid is forgotten then), no for any other child."""

    def child() -> dict[str, Any]:
        probe.configure(None, binary_at("/bin/true"))  # prints nothing: untried, but spawned
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # the probe thread inherits it
        esc = probe.escalation()
        spawned = signal.sigwaitinfo([signal.SIGCHLD]).si_pid
        other = os.fork()
        if other == 0:
            os._exit(0)
        os.waitpid(other, 0)
        return {
            "untried": esc["setuid_exec_untried"],
            "first": probe.is_probe_child(spawned),
            "again": probe.is_probe_child(spawned),
            "other": probe.is_probe_child(other),
        }

    r = report(child)
    assert r == {"untried": "output:", "first": True, "again": False, "other": False}


def test_capabilities_are_read_from_the_threads_status_without_capget():
    """The probe reads its own sets from ``/proc/thread-self/status`` (cheaper than capget);
    with capget out of order the verdict is the same: every permitted capability raised."""

    def no_capget() -> None:
        def broken(tid: int = 0) -> tuple[int, int, int]:
            raise OSError(errno.ENOSYS, "capget is not to be called")

        linux.capget = broken  # in the child only

    r = report(as_credentials((U, U, U), keep_caps=True, then=no_capget))
    assert r["permitted"] and r["escalation"]["raise_caps"] == r["permitted"]


# -- the wait for the probe thread to leave /proc ---------------------------------------------


def lingering_thread(seconds: float) -> tuple[threading.Thread, int]:
    """A thread alive for ``seconds`` more, and its tid."""
    started = threading.Event()
    tid: list[int] = []

    def body() -> None:
        tid.append(threading.get_native_id())
        started.set()
        time.sleep(seconds)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    started.wait(10)
    return thread, tid[0]


def test_the_wait_for_a_probe_thread_returns_once_it_is_gone(monkeypatch):
    monkeypatch.setattr(probe, "PROBE_THREAD_EXIT_TIMEOUT", 2.0)
    thread, tid = lingering_thread(0.1)
    began = time.monotonic()
    probe._await_thread_gone(tid)
    assert not os.path.exists(f"/proc/self/task/{tid}")
    # it polls often: a probe runs at every hook, and its thread is usually gone at once
    assert 0.05 < time.monotonic() - began < 0.8
    thread.join()


def test_the_wait_for_a_probe_thread_gives_up_after_its_timeout(monkeypatch):
    monkeypatch.setattr(probe, "PROBE_THREAD_EXIT_TIMEOUT", 0.3)
    thread, tid = lingering_thread(3.0)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"thread {tid} was still in /proc/self/task/{tid} "):
        probe._await_thread_gone(tid)
    assert 0.3 <= time.monotonic() - began < 2.0
    thread.join()


# -- what a snapshot says about namespaces and maps --------------------------------------------


def test_the_initial_user_namespace_shows_the_full_map():
    if not linux.in_initial_user_namespace():
        pytest.skip("the full identity map is the initial user namespace's")
    snap = probe.snapshot()
    assert snap["uid_map"] == snap["gid_map"] == probe.FULL_MAP


def test_the_process_namespaces_are_the_leaders_whatever_another_thread_joined():
    """A thread may unshare a namespace of its own (a net ns): it is listed with it, and the
    process's namespaces stay the thread group leader's (``/proc/self/ns``)."""

    def child() -> dict[str, Any]:
        ready, done = threading.Event(), threading.Event()

        def own_net() -> None:
            linux.unshare(linux.ns_flags(["net"]))  # this thread only
            ready.set()
            done.wait(30)

        helper = threading.Thread(target=own_net)
        helper.start()
        ready.wait(30)
        snap = probe.snapshot()
        done.set()
        helper.join()
        leader = os.getpid()
        return {
            "process": snap["ns"]["net"],
            "leader": os.stat("/proc/self/ns/net").st_ino,
            "threads": {t["tid"] == leader: t["ns"]["net"] for t in snap["threads"]},
        }

    r = report(child)
    assert r["process"] == r["leader"] == r["threads"]["true"]
    assert r["threads"]["false"] not in (None, r["leader"])


def test_the_process_namespaces_are_the_leaders_when_a_thread_has_a_lower_tid():
    """After pid numbers wrap, a thread's tid may be below its leader's: the process's
    namespaces are still the leader's, not those of the thread listed first. Made real in a
    pid namespace of its own, whose next pid is set (``ns_last_pid``) between the fork of the
    leader and the start of its threads (one of them ending mid-snapshot)."""

    def leader() -> dict[str, Any]:  # pid 1001 of the new namespace
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write("10")
        ready, done = threading.Event(), threading.Event()

        def own_net() -> None:
            linux.unshare(linux.ns_flags(["net"]))
            ready.set()
            done.wait(30)

        helper = threading.Thread(target=own_net)
        helper.start()
        ready.wait(30)
        # tid 12, below the leader's too, ends between its status and its namespaces
        stop = threading.Event()
        ending = threading.Thread(target=stop.wait, args=(30,))
        ending.start()
        real = linux.read_status

        def read_status(path: str = "/proc/self/status") -> dict[str, str]:
            status = real(path)
            if path == f"/proc/self/task/{ending.native_id}/status":
                stop.set()
                ending.join()
                while os.path.exists(f"/proc/self/task/{ending.native_id}"):
                    time.sleep(0.001)
            return status

        linux.read_status = read_status  # in this child only
        snap = probe.snapshot()
        done.set()
        helper.join()
        return {
            "ending": ending.native_id,
            "tids": [t["tid"] for t in snap["threads"]],
            "leader": os.getpid(),
            "process": snap["ns"]["net"],
            "own": os.stat("/proc/self/ns/net").st_ino,
        }

    def init() -> dict[str, Any]:  # pid 1: its own /proc, then the leader at pid 1001
        linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write("1000")
        return report(leader)

    def new_pid_namespace() -> dict[str, Any]:
        linux.unshare(linux.ns_flags(["pid"]))
        return report(init)

    def child() -> dict[str, Any]:
        linux.unshare(linux.ns_flags(["mount"]))
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        return report(new_pid_namespace)

    r = report(child)
    assert r["leader"] == 1001 and r["ending"] == 12 and r["tids"] == [11, 1001]
    assert r["process"] == r["own"]


def test_a_thread_gone_between_its_status_and_its_namespaces_is_left_out(monkeypatch):
    """A thread that ends after the snapshot read its status has no namespace links left: it
    is no longer part of the process and is not listed (a list of None inodes is no state)."""
    stop, later = threading.Event(), threading.Event()
    victim = threading.Thread(target=stop.wait, args=(30,), daemon=True)
    victim.start()
    tid = victim.native_id
    # a thread listed after the one that ends: the snapshot goes on past the gap
    bystander = threading.Thread(target=later.wait, args=(30,), daemon=True)
    bystander.start()
    real = linux.read_status

    def read_status(path: str = "/proc/self/status") -> dict[str, str]:
        status = real(path)
        if path == f"/proc/self/task/{tid}/status":
            # the thread ends right here, and leaves /proc, as one may at any moment
            stop.set()
            victim.join()
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
                time.sleep(0.001)
        return status

    monkeypatch.setattr(linux, "read_status", read_status)
    snap = probe.snapshot()
    later.set()
    bystander.join()
    assert bystander.native_id is not None and bystander.native_id > tid
    tids = [t["tid"] for t in snap["threads"]]
    assert tid not in tids and {os.getpid(), bystander.native_id} <= set(tids)
    assert all(any(i is not None for i in t["ns"].values()) for t in snap["threads"])


def outside_procs_pid_namespace(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run where ``/proc`` is a pid namespace's that the process is not in (a
    child's, mounted over the host's): no ``/proc/self``, ``/proc/thread-self`` there."""

    def mount_proc() -> None:  # pid 1 of the new pid namespace
        linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)

    def new_pid_namespace() -> None:
        # a process that unshared its children's pid namespace can start no thread: this one
        # only forks the namespace's pid 1, in the mount namespace it shares with the prober
        linux.unshare(linux.ns_flags(["pid"]))
        out = in_child(mount_proc)
        assert "ok" in out, out

    def child() -> Any:
        linux.unshare(linux.ns_flags(["mount"]))
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        out = in_child(new_pid_namespace)
        assert "ok" in out, out
        assert not os.path.exists("/proc/self") and not os.path.exists("/proc/thread-self")
        return fn()

    return child


def test_the_escalation_probe_works_outside_procs_pid_namespace():
    """There the probe thread cannot read its own status (capget tells its capabilities)
    and has no ``/proc`` entry to wait for: it reports as anywhere else."""

    def probe_without_effective_caps() -> dict[str, Any]:
        _, permitted, _ = linux.capget()
        linux.capset(0, permitted, 0)
        return {"escalation": probe.escalation(), "permitted": linux.mask_to_caps(permitted)}

    r = report(outside_procs_pid_namespace(probe_without_effective_caps))
    esc = r["escalation"]
    assert esc["setresuid_root"] is True and esc["host_escalation"] is True
    assert esc["raise_caps"] == r["permitted"] != []


def test_the_probes_import_where_the_user_namespace_cannot_be_read():
    """The host user namespace read at import may be unknown (no ``/proc/self``): the
    import does not fail, and an unknown namespace counts as the host's."""

    def reimport() -> bool:
        importlib.reload(probe)
        return probe.in_host_userns()

    assert report(outside_procs_pid_namespace(reimport)) is True


# -- the setuid binary the kit makes -----------------------------------------------------------


def test_the_kits_own_id_program_is_a_well_formed_elf_executable():
    """The kernel's loader checks little of an ELF header, other loaders (an emulator, a
    user-space kernel) check it all: every field as the ELF-64 and x86-64 ABIs define it."""
    program = probe.euid_program()
    if os.uname().machine != "x86_64":
        assert program is None  # then ``id`` is copied
        return
    assert program is not None
    ident = program[:16]
    assert ident[:4] == b"\x7fELF"
    assert (ident[4], ident[5], ident[6]) == (2, 1, 1)  # ELFCLASS64, little endian, EV_CURRENT
    assert ident[7:] == bytes(9)  # the System V ABI, its version 0, padding
    (e_type, machine, version, entry, phoff, shoff, flags, ehsize, phentsize, phnum, *sh) = (
        struct.unpack_from("<HHIQQQIHHHHHH", program, 16)
    )
    assert (e_type, machine, version, flags) == (2, 0x3E, 1, 0)  # ET_EXEC, x86-64
    assert (ehsize, phentsize, phnum, phoff) == (64, 56, 1, 64)
    assert (shoff, *sh) == (0, 0, 0, 0)  # no section headers
    p_type, p_flags, offset, vaddr, paddr, filesz, memsz, align = struct.unpack_from(
        "<IIQQQQQQ", program, phoff
    )
    assert (p_type, p_flags) == (1, 5)  # PT_LOAD, readable and executable, not writable
    assert offset == 0 and vaddr == paddr and filesz == memsz == len(program)
    assert align >= 4096 and align & (align - 1) == 0 and vaddr % align == offset % align
    # the entry point is the first byte after the headers, inside the loaded segment
    assert entry == vaddr + ehsize + phentsize * phnum < vaddr + filesz


def test_the_setuid_binary_is_root_owned_in_a_root_owned_directory(program_dir):
    """Nobody but root may replace the binary: its directory is root's and not writable by
    others, the binary root's with the set-user-ID bit."""
    binary = probe.provide_setuid_binary(program_dir)
    directory = os.stat(os.path.dirname(binary.path))
    st = os.stat(binary.path)
    assert (directory.st_uid, directory.st_gid, directory.st_mode & 0o7777) == (0, 0, 0o755)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o4755)
    assert (binary.dev, binary.ino, binary.unavailable) == (st.st_dev, st.st_ino, "")
    probe.remove_setuid_binary(program_dir)
    assert os.listdir(program_dir) == []
    probe.remove_setuid_binary(program_dir)  # nothing left to remove: no error either


def test_the_setuid_binary_is_roots_group_in_a_set_group_id_directory(program_dir):
    """In a directory whose set-group-ID bit hands its group to what is made in it, the
    binary and its directory still get root's group."""
    os.chown(program_dir, 0, 100)
    os.chmod(program_dir, 0o2755)
    binary = probe.provide_setuid_binary(program_dir)
    gids = [os.stat(p).st_gid for p in (os.path.dirname(binary.path), binary.path)]
    assert gids == [0, 0]
    probe.remove_setuid_binary(program_dir)


def test_the_setuid_binary_is_roots_group_when_made_by_root_with_another_group(program_dir):
    def child() -> list[int]:
        os.setresgid(100, 100, 100)  # root (e.g. under ``sudo -g``) with a group of another
        binary = probe.provide_setuid_binary(program_dir)
        return [os.stat(p).st_gid for p in (os.path.dirname(binary.path), binary.path)]

    assert report(child) == [0, 0]


def test_the_setuid_binary_is_root_owned_when_made_by_root_with_another_fs_uid(program_dir):
    def child() -> list[int]:
        # files are made with the fs uid: another one, every capability kept effective
        linux.thread_setfsuid(100)
        _, permitted, _ = linux.capget()
        linux.capset(permitted, permitted, 0)
        binary = probe.provide_setuid_binary(program_dir)
        return [os.stat(p).st_uid for p in (os.path.dirname(binary.path), binary.path)]

    assert report(child) == [0, 0]


def test_named_caps_turns_only_64_bit_masks_into_names():
    top = 1 << 63
    assert probe.named_caps({"a": top, "b": 1 << 64, "c": 0, "d": 1 << 65}) == {
        "a": ["CAP_63"],
        "b": 1 << 64,  # no capability set is that wide: not a mask
        "c": [],
        "d": 1 << 65,
    }
    assert probe.named_caps(["CAP_KILL"]) == ["CAP_KILL"]


def test_a_failing_probe_thread_fails_the_escalation_naming_why():
    """The probe thread's error is the caller's (a hook's probe error in the ledger), never
    an empty verdict: here no descriptor is left for the setuid binary's output pipe."""

    def child() -> dict[str, Any]:
        probe.configure(None, binary_at("/bin/true"))
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, highest + 1))
        try:
            while True:  # every free descriptor below the limit taken too
                os.open("/dev/null", os.O_RDONLY)
        except OSError as exc:
            assert exc.errno == errno.EMFILE
        try:
            probe.escalation()
        except RuntimeError as exc:
            return {"error": str(exc), "cause": type(exc.__cause__).__name__}
        return {}

    r = report(child)
    assert r == {
        "error": "the escalation probe thread failed: OSError: [Errno 24] Too many open files",
        "cause": "OSError",
    }


def test_the_snapshot_names_the_process_in_each_pid_namespace():
    snap = probe.snapshot()
    status = linux.read_status()
    assert snap["nspid"] == [int(p) for p in status["NSpid"].split()]
    assert snap["nspid"][-1] == os.getpid()


def test_a_binary_identity_is_fixed_once_made():
    binary = probe.SetuidBinary("/bin/true", 1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        binary.path = "/bin/false"  # type: ignore[misc]
    assert {binary, probe.SetuidBinary("/bin/true", 1, 2)} == {binary}


@pytest.mark.parametrize("offset", [1, -1], ids=["above", "below"])
def test_another_user_namespace_than_the_hosts_is_told_by_its_identity(offset):
    """The host user namespace is known by (device, inode): any other, whichever way its
    inode compares, is not the host's."""

    def child() -> bool:
        dev, ino = linux.userns_identity()
        probe.configure((dev, ino + offset), None)
        return bool(probe.escalation()["host_userns"])

    assert report(child) is False


def test_a_nosuid_directory_gives_an_unavailable_binary(program_dir):
    def child() -> dict[str, Any]:
        linux.unshare(linux.ns_flags(["mount"]))
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        linux.mount("tmpfs", program_dir, "tmpfs", linux.MS_NOSUID, "size=1m,mode=755")
        binary = probe.provide_setuid_binary(program_dir)
        return {"unavailable": binary.unavailable, "made": os.listdir(program_dir)}

    assert report(child) == {"unavailable": "nosuid", "made": []}


def test_the_map_of_a_process_gone_is_empty():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert probe._read_map(f"/proc/{pid}/uid_map") == []


def test_the_setuid_binary_is_reaped_by_the_probe(program_dir):
    """No zombie is left for the engine's own waitpid(-1) to find, even from a binary that
    closes its output before it exits."""
    path = script(program_dir, "echo 0\nexec >&- 2>&-\nsleep 0.3\n")

    def child() -> str:
        probe.configure(None, binary_at(path))
        probe.escalation()
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            return "no child left"
        return f"child {pid} left"

    assert report(child) == "no child left"


def test_a_binary_reaped_by_another_waiter_is_no_error(program_dir):
    """An engine's thread may reap every child (waitpid(-1)) before the probe waits for its
    own: here the binary exits at once while a child of its own keeps the output open."""
    path = script(program_dir, "(sleep 1) &\necho 0\n")

    def child() -> dict[str, Any]:
        probe.configure(None, binary_at(path))
        stop = threading.Event()
        reaped: list[int] = []

        def reaper() -> None:
            while not stop.is_set():
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    pid = 0
                if pid:
                    reaped.append(pid)
                time.sleep(0.002)

        thread = threading.Thread(target=reaper)
        thread.start()
        try:
            esc = probe.escalation()
        finally:
            stop.set()
            thread.join()
        return {"euid": esc["setuid_exec_euid"], "reaped": len(reaped)}

    assert report(child) == {"euid": 0, "reaped": 1}


def test_a_refused_capset_is_no_escalation_and_no_error():
    """A seccomp filter that refuses capset: the permitted capabilities cannot be raised."""
    if os.uname().machine != "x86_64":
        pytest.skip("the filter below names x86-64's capset")
    capset_nr, allow, eperm = 126, 0x7FFF0000, 0x00050000 | errno.EPERM
    program = [
        (0x20, 0, 0, 4),  # load the architecture
        (0x15, 1, 0, linux.AUDIT_ARCH_X86_64),
        (0x06, 0, 0, allow),
        (0x20, 0, 0, 0),  # load the system call number
        (0x15, 0, 1, capset_nr),
        (0x06, 0, 0, eperm),
        (0x06, 0, 0, allow),
    ]

    def refuse_capset() -> None:
        linux.set_no_new_privs()
        linux.seccomp_install_filter(program, listener=False)

    r = report(as_credentials((U, U, U), keep_caps=True, then=refuse_capset))
    assert r["permitted"] and r["escalation"]["raise_caps"] == []
    assert r["escalation"]["setresuid_root"] is False


def test_a_kit_launched_without_root_gives_an_unavailable_binary(program_dir):
    def child() -> dict[str, Any]:
        os.setresgid(U, U, U)
        os.setresuid(U, U, U)
        binary = probe.provide_setuid_binary(program_dir)
        return {"unavailable": binary.unavailable, "made": os.listdir(program_dir)}

    assert report(child) == {"unavailable": "launched-without-root", "made": []}
