"""The kit's host sandbox (kit/run/sandbox.py): an engine that attacks the host, run through the
kit as root with no outer sandbox, leaves the real host as it was.

Each test makes its own host objects to attack (tmpfs mounts in a temporary directory, a
victim process) and removes them; everything else it checks is only read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fd_child, open_fds, wait_until
from kit_test_engines import DAEMON_NAME

from kit.run import sandbox
from kit.run.launcher import RunResult, run, start
from kit.system import linux

HOSTILE = "kit_test_engines:HostAttackEngine"
ALL_ACTS = ["write_etc", "mount_tmpfs", "hostname", "sysctl_net", "sysctl_vm", "daemon", "kill"]
SYSCTLS = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/vm/stat_interval")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the host sandbox needs root")


def _host_mounts() -> list[str]:
    """The host's mount table, every field that can change (ids, options, propagation)."""
    with open("/proc/self/mountinfo") as f:
        return sorted(f.read().splitlines())


def _processes_named(name: str) -> list[int]:
    """Processes called ``name`` in the host's pid namespace: one in the sandbox of another
    test running meanwhile (pytest -n) is that run's, and ends with its sandbox."""
    host = linux.ns_inode("pid", os.getpid())
    found = []
    for pid in linux.process_parents():
        try:
            if linux.process_name(pid) == name and linux.ns_inode("pid", pid) == host:
                found.append(pid)
        except OSError:  # gone meanwhile
            pass
    return found


def _in_namespace(kind: str, inode: int) -> list[int]:
    """Host processes in the namespace ``kind`` with that inode."""
    found = []
    for pid in linux.process_parents():
        try:
            if linux.ns_inode(kind, pid) == inode:
                found.append(pid)
        except OSError:
            pass
    return found


def _host_state() -> dict[str, Any]:
    # (Not /tmp/kit-sandbox-*: other sessions on the machine make and remove theirs.)
    state: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "mounts": _host_mounts(),
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else [],
    }
    for path in SYSCTLS:
        with open(path) as f:
            state[path] = f.read()
    return state


@pytest.fixture
def targets(shared_dir: str) -> Iterator[dict[str, Any]]:
    """Host objects for the engine to attack: a directory (to mount on), a victim process,
    a unique /etc name. (Host mounts to unmount: see test_mount_attacks_….)"""
    base = tempfile.mkdtemp(prefix="kit-sbtest-")
    mount_on = os.path.join(base, "mount_on")
    os.mkdir(mount_on)
    victim = subprocess.Popen(["/bin/sleep", "600"])
    unique = f"kit-sandbox-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        yield {
            "tmpfs_path": mount_on,
            "victim_pid": victim.pid,
            "unique": unique,
            "report_dir": shared_dir,
            "victim": victim,
        }
    finally:
        victim.kill()
        victim.wait()
        shutil.rmtree(base, ignore_errors=True)
        if os.path.exists(f"/etc/{unique}"):  # only if the sandbox failed
            os.unlink(f"/etc/{unique}")


def _attack(
    targets: dict[str, Any],
    acts: list[str],
    hook_timeout: float = 2.0,
    backend: str = "real",
    **config: Any,
) -> RunResult:
    engine_config = {k: v for k, v in targets.items() if k != "victim"}
    engine_config.update(acts=acts, **config)
    return run(
        HOSTILE,
        "root",
        ["/bin/true"],
        backend=backend,
        engine_config=engine_config,
        shared_dirs=[targets["report_dir"]],
        hook_timeout=hook_timeout,
    )


def _outcomes(targets: dict[str, Any], role: str, hook: str) -> dict[str, str]:
    with open(os.path.join(targets["report_dir"], f"{role}-{hook}.json")) as f:
        return json.load(f)


def _sandbox_namespaces(result: RunResult) -> dict[str, int]:
    """The namespaces the run saw as the host's (stage 1's first snapshot)."""
    for e in result.events:
        if e.get("role") == "stage1" and e.get("snapshot"):
            return e["snapshot"]["ns"]
    raise AssertionError("no stage 1 snapshot in the ledger")


def _assert_host_unchanged(
    before: dict[str, Any], targets: dict[str, Any], result: RunResult
) -> None:
    after = _host_state()
    assert not os.path.exists(f"/etc/{targets['unique']}")
    for key in before:
        assert after[key] == before[key], key
    assert targets["victim"].poll() is None, "the host process the engine killed is dead"
    assert _processes_named(DAEMON_NAME) == []
    assert not os.path.exists(result.ledger.events[0]["run_dir"])
    if result.ledger.first("run_start")["backend"] == "fake":
        return  # its snapshots show the model's namespaces, not the sandbox's
    ns = _sandbox_namespaces(result)
    host_ns = linux.ns_inodes()
    for kind in ("pid", "net", "mount", "uts", "ipc"):
        assert ns[kind] != host_ns[kind], f"the run was in the host's {kind} namespace"
        # Killed processes of a torn-down sandbox may take a moment to go on a loaded
        # machine; one still there after the deadline was left behind.
        wait_until(
            lambda kind=kind: _in_namespace(kind, ns[kind]) == [],
            what=f"no process left in the sandbox's {kind} namespace",
        )


def test_an_engine_that_attacks_the_host_changes_only_its_sandbox(targets):
    before = _host_state()
    result = _attack(targets, ALL_ACTS)
    _assert_host_unchanged(before, targets, result)

    # Each attack happened, in the sandbox (else an unchanged host proves nothing) ...
    outcomes = _outcomes(targets, "master", "create_container")
    assert outcomes == {**dict.fromkeys(ALL_ACTS, "done"), "sysctl_vm": "EROFS", "kill": "ESRCH"}
    # ... and what outlived the run is reported: the daemon (with its command line) and the
    # tmpfs mount, both in the sandbox.
    leaks = {(leak["what"], leak["detail"].split(":")[0].split(" (")[0]) for leak in result.leaks}
    assert ("mount", targets["tmpfs_path"]) in leaks
    assert any(what == "process" for what, _ in leaks)
    assert all(
        "python" in leak["detail"] or "kit" in leak["detail"]
        for leak in result.leaks
        if leak["what"] == "process"
    )


def test_in_the_fake_backend_as_root_an_attack_changes_only_the_sandbox_and_is_reported(targets):
    # SPEC §9, §11: engine code in a fake run is root too. The privileged calls it makes
    # around kit.system are refused (and recorded); what no filter can judge (a file, a
    # sysctl written through /proc, a signal, a daemon) lands in the sandbox and is reported.
    before = _host_state()
    result = _attack(targets, ALL_ACTS, backend="fake")
    _assert_host_unchanged(before, targets, result)
    assert _outcomes(targets, "master", "create_container") == {
        **dict.fromkeys(ALL_ACTS, "done"),
        "mount_tmpfs": "EPERM",
        "hostname": "EPERM",
        "sysctl_vm": "EROFS",
        "kill": "ESRCH",
    }
    refused = {
        (e["syscall"], e["process_role"], e["hook"])
        for e in result.ledger.events
        if e["kind"] == "syscall_refused"
    }
    assert {
        ("mount", "master", "create_container"),
        ("sethostname", "master", "create_container"),
    } <= refused
    changed = {(c["kind"], c["name"]) for c in result.host_changes}
    assert ("file", f"/etc/{targets['unique']}") in changed, result.host_changes
    assert ("sysctl", "net.ipv4.ip_forward") in changed, result.host_changes
    assert any(leak["what"] == "process" for leak in result.leaks), result.leaks


def test_an_engine_cannot_hide_its_changes_through_the_sandbox_init(targets):
    """Init built the upper layers on a scratch tmpfs: were a descriptor of it still open in
    init, root in the sandbox could reach it through /proc/1/fd and remove its own file from
    the upper layer, out of the host diff (the file stays in the run's view: the overlay
    caches it). No way through init's descriptors, root or cwd leads there."""
    before = _host_state()
    result = _attack(targets, ["write_etc", "hide_upper", "init_fds"])
    _assert_host_unchanged(before, targets, result)
    assert _outcomes(targets, "master", "create_container") == {
        "write_etc": "done",
        "hide_upper": "ENOENT",
        "init_fds": "done",
    }
    with open(os.path.join(targets["report_dir"], "init_fds")) as f:
        assert json.load(f) == ["0", "1", "2"]  # /dev/null each: the builder's are let go
    created = [c for c in result.host_changes if c["name"] == f"/etc/{targets['unique']}"]
    assert len(created) == 1 and created[0]["before"] is None, result.host_changes


@pytest.mark.parametrize("then", ["hang", "segv"])
def test_the_sandbox_ends_when_the_run_times_out_or_the_master_crashes(targets, then):
    before = _host_state()
    result = _attack(targets, ["write_etc", "mount_tmpfs", "hostname", "daemon"], then=then)
    assert result.exit_code == 255
    if then == "hang":
        assert result.timed_out and result.timed_out["hook"] == "create_container"
    else:
        assert "signal 11" in result.reason
    _assert_host_unchanged(before, targets, result)
    assert _outcomes(targets, "master", "create_container") == dict.fromkeys(
        ["write_etc", "mount_tmpfs", "hostname", "daemon"], "done"
    )


def test_stage_1_writing_the_host_is_contained_too(targets):
    before = _host_state()
    result = _attack(
        targets, ["write_etc", "hostname"], hostile_hook="prepare_config", hostile_role="stage1"
    )
    assert result.exit_code == 0, result
    _assert_host_unchanged(before, targets, result)
    assert _outcomes(targets, "stage1", "prepare_config") == {
        "write_etc": "done",
        "hostname": "done",
    }


def test_the_run_sees_a_fresh_proc_a_read_only_proc_sys_and_lo_up(shared_dir):
    out = os.path.join(shared_dir, "view")
    script = (
        f"cat /proc/self/mountinfo > {out}.mounts; ls /proc > {out}.proc; "
        f"cat /sys/class/net/lo/operstate /sys/class/net/lo/flags > {out}.lo; "
        f"(echo 1 > /proc/sys/vm/stat_interval) 2> {out}.vm; true"
    )
    result = run(
        "reference",
        "root",
        ["/bin/sh", "-c", script],
        shared_dirs=[shared_dir],
        engine_config={"mount_proc": False, "mount_tmp": False},
    )
    assert result.exit_code == 0, result
    pids = [int(n) for n in Path(out + ".proc").read_text().split() if n.isdigit()]
    assert 1 in pids and max(pids) < 1000, "the run sees processes outside its pid namespace"
    assert "Read-only" in Path(out + ".vm").read_text()
    assert int(Path(out + ".lo").read_text().split()[1], 16) & 1  # IFF_UP
    lines = Path(out + ".mounts").read_text().splitlines()
    mounts = {line.split()[4]: line.split()[5] for line in lines}
    assert mounts["/proc/sys"].startswith("ro") and mounts["/proc/sys/net"].startswith("rw")
    assert mounts["/sys"].startswith("ro")


def test_the_coverage_and_shared_directories_are_the_real_ones(shared_dir):
    marker = os.path.join(shared_dir, "written-in-the-sandbox")
    no_tmpfs = {"mount_tmp": False}  # the container sees the host's /tmp
    result = run(
        "reference",
        "root",
        ["/bin/sh", "-c", f"echo x > {marker}"],
        shared_dirs=[shared_dir],
        engine_config=no_tmpfs,
    )
    assert result.exit_code == 0, result
    assert Path(marker).read_text() == "x\n"
    not_shared = run(
        "reference", "root", ["/bin/sh", "-c", f"echo y > {marker}"], engine_config=no_tmpfs
    )
    assert not_shared.exit_code == 0
    assert Path(marker).read_text() == "x\n", "a directory not shared was written through"


def test_without_the_sandbox_the_run_is_in_the_host_namespaces():
    result = run("reference", "root", ["/bin/true"], sandbox=False)
    assert result.exit_code == 0, result
    ns = _sandbox_namespaces(result)
    assert ns["mount"] == linux.ns_inode("mount") and ns["net"] == linux.ns_inode("net")


def test_the_request_switch():
    from kit.run.launcher import make_request

    assert make_request("reference", "root", ["/bin/true"]).sandbox is True
    assert make_request("reference", "root", ["/bin/true"], backend="fake").sandbox is True
    assert make_request("reference", "root", ["/bin/true"], sandbox=False).sandbox is False
    fake_off = make_request("reference", "root", ["/bin/true"], backend="fake", sandbox=False)
    assert fake_off.sandbox is False


def test_no_path_in_the_sandbox_leads_into_a_host_namespace(targets):
    """Root in the sandbox tries setns on every namespace file it can find (/proc/*/ns,
    /proc/*/fd, /dev/**, and each one's owner and parent): it enters none of the host's
    mount, uts, ipc, net or pid namespaces. (The user, cgroup and time namespaces are the
    launch ones by design, SPEC §11.)"""
    result = _attack(targets, ["ns_escape"], hook_timeout=30.0)
    assert result.exit_code == 0, result
    with open(os.path.join(targets["report_dir"], "ns-escape.json")) as f:
        report = json.load(f)
    ns = _sandbox_namespaces(result)
    host = linux.ns_inodes()
    sandboxed = ("mount", "uts", "ipc", "net", "pid")
    assert {ns[k] for k in sandboxed} <= set(report["entered"]), "the probe entered nothing"
    assert set(report["entered"]).isdisjoint(host[k] for k in sandboxed), report


def _wait_for(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_killing_the_supervisor_ends_the_sandbox(targets):
    from kit.run.launcher import start

    before = _host_state()
    engine_config = {k: v for k, v in targets.items() if k != "victim"}
    engine_config.update(acts=["write_etc", "mount_tmpfs", "daemon"], then="hang")
    handle = start(
        HOSTILE,
        "root",
        ["/bin/true"],
        engine_config=engine_config,
        shared_dirs=[targets["report_dir"]],
        hook_timeout=30.0,
    )
    init = handle.sandbox["sandbox_pid"]
    pid_ns = linux.ns_inode("pid", init)
    init_fd = os.pidfd_open(init)
    try:
        report = os.path.join(targets["report_dir"], "master-create_container.json")
        assert _wait_for(lambda: os.path.exists(report), 20), "the attack never happened"
        handle.kill()
        import select

        assert select.select([init_fd], [], [], 10)[0], "the sandbox's init outlived its supervisor"
    finally:
        os.close(init_fd)
    assert _wait_for(lambda: not _in_namespace("pid", pid_ns), 10), "processes outlived it"
    assert _processes_named(DAEMON_NAME) == []
    after = _host_state()
    assert {k: after[k] for k in before} == before
    assert not os.path.exists(f"/etc/{targets['unique']}")
    assert not os.path.exists(handle.run_dir)


@pytest.mark.parametrize("flow", ["userns", "fakeroot", "hybrid"])
def test_a_user_namespace_can_mount_proc_in_the_sandbox(flow):
    """The sandbox's /proc has read-only binds over /proc/sys and friends; the kernel lets a
    user namespace mount proc only when a fully visible one exists (the sandbox keeps one,
    hidden under /dev): the reference engine mounts proc in its container."""
    from conftest import require_flow

    require_flow(flow)
    result = run("reference", flow, ["/bin/true"], engine_config={"mount_proc": True})
    assert result.exit_code == 0, result
    assert result.ledger.document["run"]["sandbox"] is True


def test_the_sandbox_is_on_by_default_as_root_of_another_user_namespace(monkeypatch):
    from conftest import in_child

    def as_root_of_a_child_user_namespace() -> list[bool]:
        linux.unshare(linux.CLONE_NEWUSER)
        linux.write_id_maps("self", [(0, 0, 1)], [(0, 0, 1)], deny_setgroups=True)
        on = sandbox.default_on()
        os.environ[sandbox.SWITCH_ENV] = "0"
        off = sandbox.default_on()
        return [os.geteuid() == 0, linux.in_initial_user_namespace(), on, off]

    monkeypatch.delenv(sandbox.SWITCH_ENV, raising=False)
    assert sandbox.default_on() and linux.in_initial_user_namespace()
    assert in_child(as_root_of_a_child_user_namespace) == {"ok": [True, False, True, False]}


def test_mount_attacks_on_host_mounts_change_only_the_sandbox(shared_dir):
    """The engine unmounts one host mount and remounts another read-only. The test's own
    mounts to attack are made in a private mount namespace of a child, which launches the
    kit from there: other tests running meanwhile never see them (the kit's sandbox copies
    the launcher's mount namespace, so for the run they are host mounts like any other)."""
    from conftest import in_child

    def attack_from_a_private_mount_namespace() -> dict[str, Any]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        base = tempfile.mkdtemp(prefix="kit-sbtest-")
        paths = {name: os.path.join(base, name) for name in ("umount", "remount")}
        for path in paths.values():
            os.mkdir(path)
            linux.mount("tmpfs", path, "tmpfs", linux.MS_NOSUID, "size=64k")
        try:
            before = _host_mounts()
            result = run(
                HOSTILE,
                "root",
                ["/bin/true"],
                shared_dirs=[shared_dir],
                engine_config={
                    "acts": ["umount", "remount_ro"],
                    "umount_path": paths["umount"],
                    "remount_path": paths["remount"],
                    "report_dir": shared_dir,
                },
            )
            return {
                "exit": result.exit_code,
                "unchanged": _host_mounts() == before,
                "outcomes": _outcomes({"report_dir": shared_dir}, "master", "create_container"),
            }
        finally:
            for path in paths.values():
                try:
                    linux.umount(path, linux.MNT_DETACH)
                except OSError:  # unmounted by the engine: the sandbox failed
                    pass
            shutil.rmtree(base, ignore_errors=True)

    before = _host_mounts()
    assert in_child(attack_from_a_private_mount_namespace) == {
        "ok": {"exit": 0, "unchanged": True, "outcomes": {"umount": "done", "remount_ro": "done"}}
    }
    assert _host_mounts() == before


def test_a_host_namespace_file_mounted_anywhere_is_not_in_the_sandbox(shared_dir):
    """A namespace file the host has mounted (``ip netns add`` leaves one under /run/netns;
    container runtimes keep them under /run too) would let root in the sandbox setns into a
    host namespace: the sandbox reproduces every other host mount, never these. Made in a
    private mount namespace of a child, which launches the kit from there."""
    from conftest import in_child

    def from_a_private_mount_namespace() -> dict[str, Any]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        base = tempfile.mkdtemp(prefix="kit-sbtest-")
        os.chmod(base, 0o755)  # the payload may run as U
        held = {kind: os.path.join(base, kind) for kind in ("net", "uts")}
        for kind, path in held.items():
            open(path, "w").close()
            linux.mount(f"/proc/self/ns/{kind}", path, None, linux.MS_BIND)
        try:
            script = "grep -c ' - nsfs ' /proc/self/mountinfo"
            result = run("reference", "root", ["/bin/sh", "-c", script], shared_dirs=[shared_dir])
            return {"exit": result.exit_code, "out": result.stdout.split()}
        finally:
            for path in held.values():
                linux.umount(path, linux.MNT_DETACH)
            shutil.rmtree(base, ignore_errors=True)

    got = in_child(from_a_private_mount_namespace)
    # No namespace file is mounted where the payload runs (grep exits 1 on a count of 0).
    assert got == {"ok": {"exit": 1, "out": ["0"]}}, got


SYSTEM_PYTHON = "/usr/bin/python3"


#: Where the host's listening socket is, made in the test child's mount namespace: in a
#: tmpfs under /var/tmp (a writable place); in a tmpfs on /mnt (outside them), read-write or
#: read-only; and mounted itself on a file in that tmpfs on /mnt (a container's docker.sock).
SOCKET_PLACES = ["var-tmp", "mnt", "mnt-read-only", "socket-file"]


@pytest.mark.parametrize("place", SOCKET_PLACES)
def test_a_host_socket_in_any_host_mount_is_dead_in_the_sandbox(shared_dir, place):
    """Every host directory mount is copy-on-write in the sandbox, with the host mount's
    flags: a read-only bind would leave its sockets reachable (a read-only mount does not
    stop connect(); a user's session bus under /run/user/N, a daemon's anywhere), through
    an overlay a socket is dead. A socket mounted on a file is not bound at all. The mounts
    and the listening socket are made in a private mount namespace of a child; the probe
    also writes a file next to the socket."""
    from conftest import in_child

    def from_a_private_mount_namespace() -> dict[str, Any]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        base = tempfile.mkdtemp(prefix="kit-sbtest-", dir="/var/tmp")
        os.chmod(base, 0o755)
        linux.mount("tmpfs", base, "tmpfs", linux.MS_NOSUID, "size=64k,mode=0755")
        where = base if place == "var-tmp" else "/mnt"
        if where == "/mnt":
            linux.mount("tmpfs", where, "tmpfs", linux.MS_NOSUID, "size=64k,mode=0755")
        path = os.path.join(where, "bus")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if place == "socket-file":
                server.bind(os.path.join(base, "bus"))
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
                linux.mount(os.path.join(base, "bus"), path, None, linux.MS_BIND)
            else:
                server.bind(path)
            os.chmod(path, 0o777)
            server.listen(1)
            if place.endswith("-read-only"):
                flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID
                linux.mount(None, where, None, flags)
            probe = (
                "import os, socket\n"
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                f"try:\n    s.connect({path!r})\n    print('connected')\n"
                "except OSError as e:\n    print(e.errno)\n"
                f"try:\n    os.close(os.open({where + '/written'!r}, os.O_WRONLY | os.O_CREAT))\n"
                "    print('written')\nexcept OSError as e:\n    print(e.errno)\n"
            )
            # The system's interpreter: the container may have a /tmp of its own, where the
            # test's interpreter can live (a CI checkout under /tmp).
            result = run(
                "reference",
                "root",
                [SYSTEM_PYTHON, "-c", probe],
                shared_dirs=[shared_dir],
            )
            return {"exit": result.exit_code, "out": result.stdout.split()}
        finally:
            server.close()
            linux.umount(base, linux.MNT_DETACH)
            shutil.rmtree(base, ignore_errors=True)

    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON} to run the probe in the container")
    got = in_child(from_a_private_mount_namespace)
    # A read-only host mount stays read-only: its view has the host mount's flags.
    written = str(errno.EROFS) if place.endswith("-read-only") else "written"
    assert got == {"ok": {"exit": 0, "out": [str(errno.ECONNREFUSED), written]}}, got


def test_a_host_mount_overlayfs_refuses_as_a_lower_layer_is_left_out(shared_dir):
    """A host mount that overlayfs will not take as a lower layer (here an overlay on an
    overlay on /mnt: a view would stack a third, the kernel allows two), of a file system
    that can hold sockets, is left out: an empty read-only directory stands in for it
    (named kit-left-out in the sandbox's mount table), rather than failing the build or
    binding it read-only, which would leave its listening socket connectable. Made in a
    private mount namespace."""
    from conftest import in_child

    def from_a_private_mount_namespace() -> dict[str, Any]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        base = tempfile.mkdtemp(prefix="kit-sbtest-", dir="/var/tmp")
        os.chmod(base, 0o755)
        linux.mount("tmpfs", base, "tmpfs", linux.MS_NOSUID, "size=64k,mode=0755")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for name in ("lower", "up1", "work1", "first", "up2", "work2"):
                os.mkdir(os.path.join(base, name))
            Path(base, "lower", "file").write_text("placed\n")
            layers = "lowerdir={}/lower,upperdir={}/up1,workdir={}/work1".format(*[base] * 3)
            linux.mount("overlay", f"{base}/first", "overlay", 0, layers)
            layers = "lowerdir={}/first,upperdir={}/up2,workdir={}/work2".format(*[base] * 3)
            linux.mount("overlay", "/mnt", "overlay", 0, layers)
            server.bind("/mnt/bus")
            os.chmod("/mnt/bus", 0o777)
            server.listen(1)
            probe = (
                "import os, socket\n"
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                "try:\n    s.connect('/mnt/bus')\n    print('connected')\n"
                "except OSError as e:\n    print(e.errno)\n"
                "print(sorted(os.listdir('/mnt')))\n"
                "try:\n    os.close(os.open('/mnt/new', os.O_WRONLY | os.O_CREAT))\n"
                "except OSError as e:\n    print(e.errno)\n"
                "for line in open('/proc/self/mountinfo'):\n"
                "    fields = line.split()\n"
                "    if fields[4] == '/mnt':\n"
                "        print(fields[fields.index('-') + 2])\n"
            )
            handle = start(
                "reference", "root", [SYSTEM_PYTHON, "-c", probe], shared_dirs=[shared_dir]
            )
            assert handle.sandbox is not None
            left_out = handle.sandbox["sandbox_left_out"]
            result = handle.wait()
            start_event = result.ledger.first("run_start")
            assert start_event is not None
            return {
                "exit": result.exit_code,
                "out": result.stdout.split(),
                "left": left_out,
                "ledger": start_event.get("sandbox_left_out"),
                "notes": result.notes(),
            }
        finally:
            server.close()
            linux.umount("/mnt", linux.MNT_DETACH)
            linux.umount(base, linux.MNT_DETACH)
            shutil.rmtree(base, ignore_errors=True)

    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON} to run the probe in the container")
    got = in_child(from_a_private_mount_namespace)
    out = [str(errno.ENOENT), "[]", str(errno.EROFS), "kit-left-out"]
    note = (
        "sandbox: host mount(s) not reproduced, an empty read-only directory in their place "
        "(overlayfs refused them): /mnt"
    )
    expected = {"exit": 0, "out": out, "left": ["/mnt"], "ledger": ["/mnt"], "notes": [note]}
    assert got == {"ok": expected}, got


@pytest.mark.parametrize("refused", [True, False], ids=["mount-refused", "other-error"])
def test_only_a_refused_overlay_mount_leaves_a_host_mount_out(refused, monkeypatch, tmp_path):
    """A view is left out only where the overlay mount(2) of the host mount fails; any
    other error (here EIO while its upper layer is prepared; ENOSPC or EMFILE alike) ends
    the build naming the mount point, not a silent stand-in."""

    def mount(*args: object) -> None:
        raise OSError(errno.EINVAL, "refused")

    def attributes(*args: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(sandbox.linux, "mount", mount)
    if not refused:
        monkeypatch.setattr(sandbox, "_same_attributes", attributes)
    lower, target = tmp_path / "lower", tmp_path / "target"
    lower.mkdir()
    target.mkdir()
    layers = sandbox._Layers(str(tmp_path), [])
    if refused:
        assert layers.view(str(lower), str(target), [], 0, required=False) is False
        assert layers.uppers == {}
    else:
        with pytest.raises(sandbox.SandboxError, match=f"{lower}.*I/O error"):
            layers.view(str(lower), str(target), [], 0, required=False)


def test_a_host_device_node_mounted_on_a_file_is_no_device_in_the_sandbox(shared_dir):
    """A device node bound on a file (here /dev/full on /mnt/full, in a tmpfs on /mnt) is
    bound read-only into the sandbox with nodev: a read-only mount alone still lets a
    write reach the host's device (ENOSPC from /dev/full). Made in a private mount
    namespace."""
    from conftest import in_child

    def from_a_private_mount_namespace() -> dict[str, Any]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        linux.mount("tmpfs", "/mnt", "tmpfs", linux.MS_NOSUID, "size=64k,mode=0755")
        try:
            os.close(os.open("/mnt/full", os.O_WRONLY | os.O_CREAT, 0o666))
            linux.mount("/dev/full", "/mnt/full", None, linux.MS_BIND)
            probe = (
                "import os\n"
                "try:\n    fd = os.open('/mnt/full', os.O_WRONLY)\n    os.write(fd, b'x')\n"
                "    print('written')\nexcept OSError as e:\n    print(e.errno)\n"
            )
            result = run(
                "reference", "root", [SYSTEM_PYTHON, "-c", probe], shared_dirs=[shared_dir]
            )
            return {"exit": result.exit_code, "out": result.stdout.split()}
        finally:
            linux.umount("/mnt", linux.MNT_DETACH)

    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"no {SYSTEM_PYTHON} to run the probe in the container")
    got = in_child(from_a_private_mount_namespace)
    assert got == {"ok": {"exit": 0, "out": [str(errno.EACCES)]}}, got


def test_only_a_file_system_with_no_socket_nor_fifo_is_bound_when_refused():
    """The read-only bind of a host mount overlayfs refuses is kept for the file systems
    that hold no socket nor FIFO (an EFI system partition's vfat, an exFAT stick), by the
    topmost mount's type; any other is left out: a CD's iso9660 (Rock Ridge) and udf store
    FIFOs, sockets and device nodes."""
    table = [
        linux.Mount(1, "/boot/efi", 0, "ext4"),
        linux.Mount(2, "/boot/efi", 0, "vfat"),
        linux.Mount(3, "/mnt", 0, "vfat"),
        linux.Mount(4, "/mnt", 0, "overlay"),
        linux.Mount(5, "/media/cd", 0, "iso9660"),
        linux.Mount(6, "/srv", 0, "fuse.sshfs"),
        linux.Mount(7, "/media/dvd", 0, "udf"),
        linux.Mount(8, "/media/stick", 0, "exfat"),
    ]
    points = ("/boot/efi", "/mnt", "/media/cd", "/srv", "/media/dvd", "/media/stick")
    got = {point: sandbox._channel_free(point, table) for point in points}
    assert got == {
        "/boot/efi": True,
        "/mnt": False,
        "/media/cd": False,
        "/srv": False,
        "/media/dvd": False,
        "/media/stick": True,
    }


def test_a_run_is_never_given_the_hosts_own_namespaces_or_a_mount_one():
    from kit.run.launcher import LaunchError, make_request

    with pytest.raises(ValueError, match="mount cannot be given to a run"):
        make_request(
            "reference", "root", ["/bin/true"], join_namespaces={"mount": "/proc/self/ns/mnt"}
        )
    with pytest.raises(LaunchError, match="the host's own uts namespace"):
        run("reference", "root", ["/bin/true"], join_namespaces={"uts": "/proc/self/ns/uts"})
    with pytest.raises(LaunchError, match="is not a ipc namespace"):
        run("reference", "root", ["/bin/true"], join_namespaces={"ipc": "/proc/self/ns/net"})


def test_every_process_of_the_sandbox_is_under_the_host_global_filter(shared_dir):
    """The starter's filter covers the run (its descendants); init, which root in the
    sandbox could ptrace, carries its own."""
    from kit.run.launcher import start

    out = os.path.join(shared_dir, "status")
    handle = start(
        "reference",
        "root",
        ["/bin/sh", "-c", f"cat /proc/self/status > {out}; exec sleep 60"],
        shared_dirs=[shared_dir],
        engine_config={"mount_tmp": False},
    )
    init = handle.sandbox["sandbox_pid"]
    try:
        assert wait_until(
            lambda: os.path.exists(out) and "Seccomp:" in Path(out).read_text(),
            what="the payload's status",
        )
        init_status = linux.read_status(f"/proc/{init}/status")
    finally:
        handle.kill()
    assert init_status["Seccomp"] == "2" and init_status["NoNewPrivs"] == "0"
    assert linux.read_status(out)["Seccomp"] == "2"


def test_engine_faults_and_refusals_number_processes_as_the_ledger_does():
    """In the sandbox the kit's processes number themselves in its pid namespace; the
    supervisor's records of a forged datagram's sender and of a refused call's thread use
    the same numbers, not the host's."""
    result = run(
        "kit_test_engines:HostileEngine",
        "root",
        ["/bin/true"],
        engine_config={"hostile_hook": "create_container", "datagram": "not_json"},
    )
    master = result.ledger.first("process_start", role="starter")["pid"]
    (fault,) = result.ledger.select("engine_fault")
    assert fault["sender_pid"] == master and fault["sender_role"] == "starter"

    result = run("kit_test_engines:HostGlobalEngine", "root", ["/bin/true"])
    enter = result.ledger.first("hook_enter", role="master", hook="create_container")
    (refusal,) = [
        e for e in result.ledger.select("syscall_refused") if e["process_role"] == "master"
    ]
    assert refusal["target_tid"] == enter["tid"]
    assert refusal["target"]["tgid"] == enter["pid"] == refusal["target"]["ns_tgid"]


def _sandboxes_built_ahead() -> tuple[int, list[int]]:
    """After a run through the zygote: its pid and the inits of the sandboxes it built
    ahead, once they wait for their run. Not the init of the run just finished: the zygote
    holds it too, until it ends it (its pid is gone at any moment)."""
    from conftest import _zygote_pid, zygotes_sandbox

    from kit.run.launcher import start
    from kit.run.zygote import SPARES, idle

    handle = start("reference", "root", ["/bin/true"])
    assert handle.sandbox is not None
    adopted = handle.sandbox["sandbox_pid"]
    assert handle.wait().exit_code == 0
    zygote = _zygote_pid()
    assert zygote is not None

    def spares() -> list[int]:
        return [
            p
            for p in linux.descendants(zygote)
            if p != adopted and zygotes_sandbox(p) and sandbox.init_waits(p)
        ]

    built = wait_until(
        lambda: idle(zygote) and len(s := spares()) == SPARES and s,
        what="the sandboxes built ahead",
    )
    return zygote, built


def test_an_init_waits_in_its_reaping_loop_and_a_process_asleep_elsewhere_does_not():
    """sandbox.init_waits, which zygote.idle and the bench trust: asleep in sigwaitinfo, as
    a built init is, yes; asleep anywhere else (a build waits on pipes and mounts), no;
    gone, no."""
    waiting = subprocess.Popen(
        [sys.executable, "-c", "import signal; signal.sigwaitinfo({signal.SIGUSR1})"]
    )
    elsewhere = subprocess.Popen(["sleep", "30"])
    try:
        wait_until(
            lambda: all(linux.process_state(p.pid) == "S" for p in (waiting, elsewhere)),
            what="both asleep",
        )
        wait_until(lambda: sandbox.init_waits(waiting.pid), what="asleep in sigwaitinfo")
        assert not sandbox.init_waits(elsewhere.pid)
    finally:
        for proc in (waiting, elsewhere):
            proc.kill()
            proc.wait()
    assert not sandbox.init_waits(waiting.pid)


def test_a_run_through_the_zygote_adopts_a_sandbox_built_ahead():
    """A sandboxed run through the zygote adopts a sandbox built ahead (the zygote's child,
    running before the run was asked for); a run with directories to share builds its own."""
    from kit.run.launcher import start

    zygote, spares = _sandboxes_built_ahead()
    handle = start("reference", "root", ["/bin/true"])
    assert handle.sandbox["sandbox_pid"] in spares
    assert handle.wait().exit_code == 0
    with tempfile.TemporaryDirectory() as shared:
        handle = start("reference", "root", ["/bin/true"], shared_dirs=[shared])
        assert linux.process_parents().get(handle.sandbox["sandbox_pid"]) != zygote
        assert handle.wait().exit_code == 0


def test_the_diff_lists_message_queues_through_inits_fd_even_once_unmounted():
    """The sandbox's POSIX message queues are listed through init's fd of its ipc namespace's
    mqueue root (no mount of the diff's own on the run's path): a queue made after /dev/mqueue
    was unmounted in the sandbox is still named."""
    import ctypes

    from conftest import in_child

    from kit.run import hostdiff

    def body() -> dict[str, Any]:
        box = sandbox.adopt(sandbox.build([]))  # our children: in the sandbox's pid namespace
        try:
            assert box.mqueue_dir, "init reported no mqueue root"
            watch = hostdiff.HostWatch(box)
            watch.start()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    linux.setns(box.ns_fds["ipc"], linux.CLONE_NEWIPC)
                    linux.setns(box.ns_fds["mount"], linux.CLONE_NEWNS)
                    linux.umount("/dev/mqueue", linux.MNT_DETACH)
                    libc = ctypes.CDLL(None, use_errno=True)
                    name, flags = b"/kit-sbtest-queue", os.O_CREAT | os.O_RDWR
                    code = 0 if libc.mq_open(name, flags, 0o600, None) >= 0 else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert status == 0, status
            return {"listed": hostdiff.read_mqueues(box.mqueue_dir), "diff": watch.finish()}
        finally:
            sandbox.end(box)

    out = in_child(body)
    assert "ok" in out, out
    assert out["ok"]["listed"] == {"/kit-sbtest-queue": "0600 0:0"}
    changes = {(c["kind"], c["name"]): c["after"] for c in out["ok"]["diff"]["changes"]}
    assert changes[("mqueue", "/kit-sbtest-queue")] == "0600 0:0"
    assert ("mount", "/dev/mqueue") in changes


def test_the_witness_keeps_a_peer_of_every_shared_mount_and_a_re_share_shows():
    """A mount namespace copied from the sandbox's, held by the adopter (the witness), is
    a peer of each of its shared mounts, as a host's services' namespaces are: / made
    private and shared again joins a new peer group, and the host diff names the change
    although the kind reads as before (without a peer the old number came back)."""
    from conftest import exit_code_in_child, in_child

    from kit.run import hostdiff

    def group(mountinfo: str) -> str:
        for line in mountinfo.splitlines():
            fields = line.split()
            if fields[4] == "/":
                return ",".join(fields[6 : fields.index("-")])
        raise AssertionError("no / in the mount table")

    def body() -> dict[str, Any]:
        box = sandbox.adopt(sandbox.build([]))  # our children: in the sandbox's pid namespace
        try:
            witness = [
                fd for fd in box.held_fds if os.readlink(f"/proc/self/fd/{fd}").startswith("mnt:")
            ]
            assert len(witness) == 1, box.held_fds
            seen: dict[str, str] = {}

            def witness_group() -> str:  # what the witness's / is a peer of, from inside it
                linux.setns(witness[0], linux.CLONE_NEWNS)
                with open("/proc/self/mountinfo") as f:
                    return group(f.read())

            def re_share() -> int:
                linux.setns(box.ns_fds["mount"], linux.CLONE_NEWNS)
                linux.mount(None, "/", None, linux.MS_PRIVATE)
                linux.mount(None, "/", None, linux.MS_SHARED)
                return 0

            inside = in_child(witness_group)
            assert "ok" in inside, inside
            seen["witness"] = inside["ok"]
            with open(f"/proc/{box.init_pid}/mountinfo") as f:
                seen["before"] = group(f.read())
            watch = hostdiff.HostWatch(box)
            watch.start()
            assert exit_code_in_child(re_share) == 0
            with open(f"/proc/{box.init_pid}/mountinfo") as f:
                seen["after"] = group(f.read())
            return {**seen, "diff": watch.finish()}
        finally:
            sandbox.end(box)

    out = in_child(body)
    assert "ok" in out, out
    seen = out["ok"]
    assert seen["before"].startswith("shared:") and seen["witness"] == seen["before"], seen
    assert seen["after"].startswith("shared:") and seen["after"] != seen["before"], seen
    (root,) = [c for c in seen["diff"]["changes"] if c["kind"] == "mount"]
    assert root["name"] == "/" and not root["transient"], root
    assert root["before"].endswith(seen["before"]) and root["after"].endswith(seen["after"])


def test_the_cached_host_mount_table_sees_a_mount_and_a_remount():
    """The zygote reads the host's mount table for each sandbox only when it changed: a
    mount, an unmount and a read-only remount after a first read are in the next one."""
    from conftest import in_child

    def body() -> list[Any]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        base = tempfile.mkdtemp(prefix="kit-sbtest-table-")
        seen = []
        try:

            def flags_of(point: str) -> int | None:
                found = [m.flags for m in sandbox.host_mount_table() if m.point == point]
                return found[-1] if found else None

            seen.append(flags_of(base))
            linux.mount("tmpfs", base, "tmpfs", 0, "size=64k")
            seen.append(flags_of(base) is not None)
            linux.mount(None, base, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY)
            seen.append(bool((flags_of(base) or 0) & linux.MS_RDONLY))
            linux.umount(base, 0)
            seen.append(flags_of(base))
        finally:
            os.rmdir(base)
        return seen

    assert in_child(body) == {"ok": [None, True, True, None]}


def test_the_cached_host_mount_table_is_read_again_when_its_fd_was_closed():
    """A closed descriptor (POLLNVAL) says nothing changed: the cache must not trust it."""
    from conftest import in_child

    def body() -> bool:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        base = tempfile.mkdtemp(prefix="kit-sbtest-table-")
        try:
            sandbox.host_mount_table()
            assert sandbox._table_cache is not None
            os.close(sandbox._table_cache[1])  # closed behind the cache's back
            linux.mount("tmpfs", base, "tmpfs", 0, "size=64k")
            seen = any(m.point == base for m in sandbox.host_mount_table())
            linux.umount(base, 0)
            return seen
        finally:
            os.rmdir(base)

    assert in_child(body) == {"ok": True}


def test_a_forked_child_does_not_inherit_the_cached_host_mount_table():
    from conftest import in_child

    def body() -> list[bool]:
        sandbox.host_mount_table()  # this child's cache (the test process keeps none)
        cached = sandbox._table_cache is not None
        pid = os.fork()
        if pid == 0:
            os._exit(0 if sandbox._table_cache is None else 1)
        _, status = os.waitpid(pid, 0)
        return [cached, os.waitstatus_to_exitcode(status) == 0]

    assert in_child(body) == {"ok": [True, True]}


def _nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19 of proc(5)


def test_the_sandboxes_built_ahead_are_back_at_the_zygotes_priority():
    """The zygote builds sandboxes ahead niced (a run may start meanwhile, which the build
    must not slow down); once built, init and the zygote are back at the zygote's priority,
    which the next supervisors inherit."""
    from kit.run import zygote as zygote_module

    zygote, spares = _sandboxes_built_ahead()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert zygote_module.AHEAD_NICE > 0
    assert [_nice(p) for p in spares] == [base] * len(spares)
    assert _nice(zygote) == base


def test_as_root_of_another_user_namespace_the_next_sandbox_is_built_at_the_same_priority():
    """There CAP_SYS_NICE does not let a process lower its nice value again (the kernel
    checks it in the initial user namespace): the zygote builds ahead without niceing."""
    from conftest import in_child

    from kit.run import zygote as zygote_module

    def build_ahead_as_root_of_a_child_user_namespace() -> list[int]:
        linux.unshare(linux.CLONE_NEWUSER)
        linux.write_id_maps("self", [(0, 0, 1)], [(0, 0, 1)], deny_setgroups=True)
        base = os.getpriority(os.PRIO_PROCESS, 0)
        during = zygote_module._in_the_background(
            lambda: os.getpriority(os.PRIO_PROCESS, 0)  # type: ignore[arg-type,return-value]
        )
        return [base, during, os.getpriority(os.PRIO_PROCESS, 0)]

    out = in_child(build_ahead_as_root_of_a_child_user_namespace)
    assert "ok" in out, out
    base, during, after = out["ok"]
    assert during == after == base


def test_a_build_whose_pidfd_cannot_be_opened_leaves_no_init_nor_descriptor():
    """pidfd_open failing after the fork (EMFILE): init is killed by pid and reaped while
    SIGCHLD is still blocked, and both ends of its pipe are closed."""
    import errno
    import signal

    from conftest import in_child

    def refuse(pid: int, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, "refused by the test")

    def body() -> dict[str, Any]:
        sandbox.host_mount_table()  # its cache holds a descriptor of its own: open it first
        before = sorted(os.listdir("/proc/self/fd"))
        os.pidfd_open = refuse  # in this forked child only
        try:
            sandbox.build([])
        except OSError as exc:
            raised = exc.errno
        else:
            raised = 0
        left = linux.descendants(os.getpid())
        for pid in left:  # what the old code left running: ended here, not by the test's host
            os.kill(pid, signal.SIGKILL)
        return {
            "raised": raised,
            "left": left,
            "fds": sorted(os.listdir("/proc/self/fd")) == before,
        }

    out = in_child(body)
    assert out.get("ok") == {"raised": errno.EMFILE, "left": [], "fds": True}, out


def test_a_sandboxs_init_bears_its_name_from_its_fork_on():
    """Built ahead at a low priority on a busy machine, init may not run a line for
    seconds: a listing of the builder's children must know it from the start (a leftover
    check once took such an init for a leaked process). Here init never runs a line of its
    own: its name is the one it was forked with; the builder keeps its name."""
    import signal

    from conftest import in_child

    def body() -> dict[str, Any]:
        linux.set_name("kit-builder")
        sandbox._init_main = lambda *args: signal.pause()  # in this forked child only
        building = sandbox.build([])
        try:
            return {
                "init": linux.process_name(building.init_pid),
                "builder": linux.process_name(),
            }
        finally:
            os.kill(building.init_pid, signal.SIGKILL)
            os.waitpid(building.init_pid, 0)
            os.close(building.pidfd)
            os.close(building.ready_fd)
            os.rmdir(building.scratch)

    out = in_child(body)
    assert out.get("ok") == {"init": sandbox.INIT_NAME, "builder": "kit-builder"}, out


def test_a_sandbox_whose_init_died_and_whose_pid_names_another_process_is_not_adopted():
    """Init is the zygote's child: once dead and reaped, its pid may be given to another
    process before a supervisor adopts it by pid. Adoption checks through the pidfd of
    init that the pid was still init's: here init is killed and reaped, and the building's
    pid replaced by the one of a live process that holds directories at init's numbers
    (what the old code opened: it adopted that process's namespaces, the host's)."""
    import dataclasses
    import signal

    from conftest import in_child

    def body() -> dict[str, Any]:
        building = sandbox.build([])
        building.wait_ready()
        r, w = os.pipe()
        ready_r, ready_w = os.pipe()
        impostor = os.fork()
        if impostor == 0:  # the process the pid would name now
            os.close(w)
            here = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
            for at in (building.scratch_fd, building.mqueue):
                if at is not None:
                    os.dup2(here, at)
            os.write(ready_w, b"r")
            os.read(r, 1)  # until the test is done
            os._exit(0)
        os.close(r)
        os.close(ready_w)
        os.read(ready_r, 1)  # its directories are in place
        os.close(ready_r)
        assert building.pidfd is not None
        signal.pidfd_send_signal(building.pidfd, signal.SIGKILL)
        os.waitpid(building.init_pid, 0)  # reaped: its pid is free
        reused = dataclasses.replace(building, init_pid=impostor, builder=0)  # not ours
        try:
            sandbox.adopt(reused)
        except sandbox.SandboxError as exc:
            outcome = str(exc)
        else:
            outcome = "adopted"
        finally:
            os.close(w)
            os.waitpid(impostor, 0)
        return {"outcome": outcome}

    out = in_child(body)
    assert "init exited before the run adopted it" in out.get("ok", {}).get("outcome", ""), out


def test_the_sandboxs_init_keeps_only_the_standard_fds_and_its_ready_pipe():
    def body(w: int) -> bytes:
        for at in (w - 1, w + 1, 19999):  # inheritable: init execs nothing, closes all
            os.dup2(w, at)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # 19999 stays open
        sandbox._close_other_fds({w})
        return json.dumps(open_fds()).encode()

    code, data, w = fd_child(body)
    left = json.loads(data)
    assert code == 0
    # the one more is the fd that listed /proc/self/fd, the lowest free one: 3
    assert w > 4 and left == [0, 1, 2, 3, w], (left, w)


def test_a_building_without_the_pidfd_of_its_init_is_not_adopted():
    """Adoption goes by pid, checked through init's pidfd: a building that came without one
    (its pid alone proves nothing) is refused, not adopted unchecked."""
    from conftest import in_child

    def body() -> dict[str, Any]:
        building = sandbox.build([])
        pidfd, building.pidfd = building.pidfd, None
        try:
            sandbox.adopt(building)
        except sandbox.SandboxError as exc:
            outcome = str(exc)
        else:
            outcome = "adopted"
        finally:
            assert pidfd is not None
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(building.init_pid, 0)
            os.close(pidfd)
        return {"outcome": outcome}

    out = in_child(body)
    assert "came without a pidfd" in out.get("ok", {}).get("outcome", ""), out


def test_no_child_of_a_pid_that_init_no_longer_holds_is_one_of_the_run():
    """The supervisor finds the run's processes in the sandbox as init's descendants, by
    pid: once init has exited and been reaped, that pid may name another process, whose
    children must never be signalled (kill_tree). Here the sandbox's init_pid names a live
    process with a child, and its pidfd is of a process that exited: neither is listed."""
    from kit.run.supervisor import Supervisor

    r, w = os.pipe()
    told_r, told_w = os.pipe()
    middle = os.fork()
    if middle == 0:  # leaves it orphaned: none of the test's descendants
        os.close(w)
        if os.fork() == 0:  # the process the pid names now, with a child of its own
            if os.fork() == 0:
                os.read(r, 1)
                os._exit(0)
            os.write(told_w, str(os.getpid()).encode())
            os.read(r, 1)
            os._exit(0)
        os._exit(0)
    os.close(r)
    os.close(told_w)
    os.waitpid(middle, 0)
    other = int(os.read(told_r, 32))
    os.close(told_r)
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    pidfd = os.pidfd_open(gone)
    os.waitpid(gone, 0)
    try:
        wait_until(lambda: len(linux.descendants(other)) == 1)
        supervisor = object.__new__(Supervisor)
        supervisor.sandbox = sandbox.HostSandbox(init_pid=other, upper_dir="", init_pidfd=pidfd)
        found = supervisor._run_processes()
        assert set(found) & {other, *linux.descendants(other)} == set(), found
        assert sandbox.processes(supervisor.sandbox) == {}
    finally:
        os.close(pidfd)
        os.close(w)  # both end: reaped by whoever took them over


def test_init_s_report_is_read_from_a_pipe_above_fd_setsize():
    """A builder (the zygote, a supervisor) holding many descriptors gets the report pipe
    at a number select() cannot wait for (ValueError at 1024 and above); poll() can."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1501:
        pytest.skip("the descriptor limit does not reach 1501")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1501), hard))
    r, w = os.pipe()
    high = os.dup2(r, 1500)
    os.close(r)
    try:
        os.write(w, b"ready /=cow/1/upper\0scratch=3\0\0")
        assert sandbox._await_ready(high) == {"/": "cow/1/upper", "scratch": "3"}
    finally:
        os.close(w)
        os.close(high)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _pending(pid: int) -> int:
    """The signals pending for ``pid``, to the thread or to the process, as a mask."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)


def _forge(signum: int) -> None:
    """rt_sigqueueinfo(2) to pid 1: SI_QUEUE with si_pid 0, as if sent from outside."""
    nr = {"x86_64": 129, "aarch64": 138}[os.uname().machine]
    info = (ctypes.c_int * 32)()  # siginfo_t: 128 bytes
    info[0], info[2], info[4] = signum, -1, 0  # si_signo, si_code SI_QUEUE, si_pid
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(ctypes.c_long(nr), ctypes.c_int(1), ctypes.c_int(signum), info) != 0:
        raise OSError(ctypes.get_errno(), "rt_sigqueueinfo")


def _signal_from_inside(init_pid: int, *signums: int, forged: bool = False) -> None:
    """Send init ``signums`` from a process of its pid namespace (pid 1 as seen there): by
    kill(2), or ``forged`` (:func:`_forge`)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(linux.ns_path("pid", init_pid), os.O_RDONLY)
            linux.setns(fd, linux.CLONE_NEWPID)
            inner = os.fork()  # born in init's pid namespace
            if inner == 0:
                try:
                    for signum in signums:
                        if forged:
                            _forge(signum)
                        else:
                            os.kill(1, signum)
                finally:
                    os._exit(0)
            os.waitpid(inner, 0)
            code = 0
        finally:
            os._exit(code)
    assert os.waitid(os.P_PID, pid, os.WEXITED).si_status == 0


def test_a_sigint_to_init_never_unwinds_it_into_its_builders_code(tmp_path):
    """Init is a fork of its builder, which has Python signal handlers (the interpreter's
    SIGINT one raises KeyboardInterrupt): one run in init would unwind pid 1 out of
    sigwaitinfo back into build()'s caller, going on inside the sandbox. SIGINT from a
    process of the sandbox and from the host (Ctrl-C reaches init's process group): init
    runs none of the builder's code, and the sandbox still works."""
    from conftest import in_child

    marker = tmp_path / "unwound"  # bound into the sandbox: seen where init writes it

    def body() -> dict[str, Any]:
        builder = os.getpid()
        signal.signal(signal.SIGUSR2, lambda *_: None)  # another Python handler
        try:
            building = sandbox.build([str(tmp_path)])
        except BaseException as exc:
            if os.getpid() != builder:
                marker.write_text(f"raised {type(exc).__name__}")
                os._exit(0)
            raise
        if os.getpid() != builder:
            marker.write_text("returned")
            os._exit(0)
        building.wait_ready()
        _signal_from_inside(building.init_pid, signal.SIGINT, signal.SIGUSR2)
        os.kill(building.init_pid, signal.SIGINT)
        adopted = sandbox.adopt(building)  # init still answers the release
        alive = not adopted.init_exited()
        sandbox.end(adopted)
        return {"alive": alive}

    out = in_child(body)
    assert not marker.exists(), marker.read_text()
    assert out == {"ok": {"alive": True}}, out


def test_a_signal_forged_from_inside_as_the_hosts_is_ignored_by_init():
    """rt_sigqueueinfo lets a process of the sandbox say si_pid 0 (the host's, as init
    sees it) with si_code SI_QUEUE: a SIGTERM so forged ended init, a SIGUSR1 made it let
    go of its descriptors. Both are ignored; the kit's own release and stop still work."""
    from conftest import in_child

    def body() -> dict[str, Any]:
        building = sandbox.build([])
        building.wait_ready()
        _signal_from_inside(building.init_pid, signal.SIGUSR1, signal.SIGTERM, forged=True)
        # Taken by init before the release is sent: a second SIGUSR1 pending is dropped.
        wait_until(lambda: _pending(building.init_pid) == 0, what="init took the signals")
        adopted = sandbox.adopt(building)
        alive = not adopted.init_exited()
        init = adopted.init_pid
        sandbox.end(adopted)
        return {"alive": alive, "stopped": not os.path.exists(f"/proc/{init}")}

    assert in_child(body) == {"ok": {"alive": True, "stopped": True}}


def test_init_dying_during_the_release_is_no_completed_release(monkeypatch):
    """The end of init's report pipe says it let go of its descriptors, or that it died:
    an init killed while the run adopts it is refused, not taken as released."""
    from conftest import in_child

    release = sandbox._release

    def dying(box: sandbox.HostSandbox, ready_fd: int) -> None:
        assert box.init_pidfd is not None
        signal.pidfd_send_signal(box.init_pidfd, signal.SIGKILL)
        assert sandbox._exited_within(box.init_pidfd, 10.0)
        release(box, ready_fd)

    monkeypatch.setattr(sandbox, "_release", dying)

    def body() -> dict[str, Any]:
        building = sandbox.build([])
        try:
            adopted = sandbox.adopt(building)
        except sandbox.SandboxError as exc:
            return {"outcome": str(exc)}
        sandbox.end(adopted)
        return {"outcome": "adopted"}

    out = in_child(body)
    assert "exited while the run adopted it" in out.get("ok", {}).get("outcome", ""), out


def test_a_builder_killed_before_init_reported_leaves_its_scratch_to_the_sweep(tmp_path):
    """The scratch directory is locked by the sandbox's builder until init no longer needs
    it: one killed meanwhile (a zygote building a spare, say) leaves it unheld, and the next
    sweep removes it; a build in progress is never swept. (In a directory of the test's
    own: a sweep of the shared one could hide another test's leftovers.)"""
    from conftest import in_child

    from kit.run import rundir

    parent = str(tmp_path)

    def in_progress() -> list[bool]:
        tempfile.tempdir = parent
        building = sandbox.build([])
        try:
            held = building.scratch not in rundir.unheld(parent) + rundir.sweep(parent)
        finally:
            building.abandon()
        return [held, os.path.exists(building.scratch), building.scratch_lock]

    assert in_child(in_progress) == {"ok": [True, False, -1]}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a builder killed before init reports
        try:
            os.close(r)
            tempfile.tempdir = parent
            os.write(w, sandbox.build([]).scratch.encode())
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        scratch = f.read().decode()
    os.waitpid(pid, 0)
    assert scratch.startswith(os.path.join(parent, rundir.SCRATCH)) and os.path.isdir(scratch)
    # Unheld once init, which inherited the lock at its fork, has closed it or died too.
    wait_until(lambda: scratch in rundir.unheld(parent), what="the scratch directory unheld")
    assert rundir.sweep(parent) == [scratch]
    assert not os.path.exists(scratch)


def test_an_init_whose_builder_died_before_its_death_signal_was_armed_exits_at_once(tmp_path):
    """Init arms its parent-death signal first thing; a builder gone before then never
    sends it. Init sees that through its pidfd of the builder and exits before it builds
    anything, instead of building on as an orphan and waiting for a run forever."""
    from conftest import in_child

    def scenario() -> dict[str, Any]:
        linux.set_child_subreaper()  # the orphaned init comes back to us, to be reaped
        scratch = str(tmp_path / "scratch")
        os.mkdir(scratch)
        table = sandbox.host_mount_table()
        r, w = os.pipe()
        gone, go = os.pipe()
        builder = os.fork()
        if builder == 0:  # the builder: forks init, then dies before init runs a line
            code = 1
            try:
                builder_pid = os.getpid()
                builder_fd = os.pidfd_open(builder_pid)
                init = os.fork()
                if init == 0:
                    os.close(r)
                    os.close(go)
                    os.read(gone, 1)  # EOF: the builder is exiting
                    while os.getppid() == builder_pid:  # until we are reparented: gone
                        time.sleep(0.001)
                    sandbox._init_main(scratch, [], w, table, builder_fd)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        os.close(gone)
        os.close(go)  # the builder holds the other copy until it exits
        os.waitpid(builder, 0)
        poller = select.poll()
        poller.register(r, select.POLLIN)
        reported = os.read(r, 4096) if poller.poll(10_000) else b"(nothing in 10 s)"
        os.close(r)
        # The orphan, reparented to this subreaper: ended, or (built on) killed now.
        for pid in linux.descendants(os.getpid()) if reported else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.wait()
        exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        return {"reported": reported.decode(errors="replace")[:80], "exit": exit_code}

    assert in_child(scenario) == {"ok": {"reported": "", "exit": 1}}
