"""The host sandbox's deciding helpers fed what makes them decide: join kinds that lead back to
the host, mount points one character off another, stacked mounts, namespace files among the
host's mounts, writable mounts under a bound one (in a mount namespace the test makes), left
processes and a process list that empties between scans."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import tempfile
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import in_child

from kit.run import sandbox
from kit.system import linux

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces)")


def _m(point: str, flags: int = 0, fstype: str = "ext4", mount_id: int = 0) -> linux.Mount:
    return linux.Mount(mount_id, point, flags, fstype)


# --- which namespaces a run may join --------------------------------------------------------


def test_each_kind_that_leads_back_to_the_host_is_refused_by_name() -> None:
    sandbox.check_join_kinds({k: f"/proc/1/ns/{k}" for k in sandbox.JOIN_KINDS})
    sandbox.check_join_kinds({})
    for kind in ("mount", "pid", "user", "cgroup", "time"):
        with pytest.raises(ValueError, match=f"join_namespaces: {kind} cannot be given"):
            sandbox.check_join_kinds({"net": "/x", kind: "/y"})
    with pytest.raises(ValueError) as raised:
        sandbox.check_join_kinds({"user": "/a", "uts": "/b", "mount": "/c"})
    # every refused kind, sorted, and only those; the allowed ones are listed after
    assert str(raised.value).startswith("join_namespaces: mount, user cannot be given to a run")
    assert "(only uts, ipc, net:" in str(raised.value)


# --- paths under mount points ---------------------------------------------------------------


def test_a_path_is_under_a_point_only_at_a_slash_not_at_a_common_prefix() -> None:
    assert sandbox._under("/var/tmp", ("/var/tmp",))
    assert sandbox._under("/var/tmp/x", ("/var/tmp",))
    assert sandbox._under("/var/tmp/x", ("/var/tmp/",))  # a point given with its slash
    assert sandbox._under("/var/tmp/x", ["/opt", "/var"])  # any of them
    assert sandbox._under("/x", ("/",))
    assert not sandbox._under("/var/tmpx", ("/var/tmp",))
    assert not sandbox._under("/var", ("/var/tmp",))
    assert not sandbox._under("/var/tmp", ())
    assert not sandbox._under("/opt/tmp", ("/var/tmp", "/tmp"))


def test_below_is_strictly_below() -> None:
    assert sandbox._below("/var/tmp/x", "/var/tmp")
    assert sandbox._below("/var/tmp/x/y", "/var")
    assert not sandbox._below("/var/tmp", "/var/tmp")
    assert not sandbox._below("/var/tmpx", "/var/tmp")
    assert not sandbox._below("/var", "/var/tmp")


def test_the_nearest_point_is_the_longest_at_or_over_the_path() -> None:
    points = ["/", "/var", "/var/tmp", "/var/tmpx", "/opt"]
    assert sandbox._nearest("/var/tmp/a", points) == "/var/tmp"
    assert sandbox._nearest("/var/tmp", points) == "/var/tmp"
    assert sandbox._nearest("/var/tmpy", points) == "/var"
    assert sandbox._nearest("/etc", points) == "/"
    assert sandbox._nearest("/etc", ["/var"]) is None


def test_the_flags_at_a_path_are_the_topmost_mount_on_the_nearest_point() -> None:
    table = [
        _m("/", 0),
        _m("/var", linux.MS_NOSUID),
        _m("/var/tmp", linux.MS_NODEV),
        _m("/var/tmp", linux.MS_NOEXEC),  # stacked on the one before: it is what shows
        _m("/var/tmpx", linux.MS_RDONLY),
        _m("/var", linux.MS_RDONLY),  # stacked on /var later: not over /var/tmp's
    ]
    assert sandbox._flags_at("/var/tmp/a", table) == linux.MS_NOEXEC
    assert sandbox._flags_at("/var/tmp", table) == linux.MS_NOEXEC
    assert sandbox._flags_at("/var/lib", table) == linux.MS_RDONLY
    assert sandbox._flags_at("/etc", table) == 0
    assert sandbox._flags_at("/etc", table[1:]) == 0  # under no mount at all
    assert sandbox._flags_at("/var/tmpy", table[:3]) == linux.MS_NOSUID


# --- the host's mounts a sandbox reproduces ------------------------------------------------


def test_the_reproduced_mounts_leave_out_the_root_the_recreated_and_the_sandboxs_own() -> None:
    scratch = "/tmp/kit-sandbox-x"
    table = [
        _m("/"),
        _m("/proc"),
        _m("/proc/sys/fs/binfmt_misc"),
        _m("/sys/fs/cgroup"),
        _m("/dev/pts"),
        _m("/devx"),
        _m(scratch),
        _m(f"{scratch}/root"),
        _m("/tmp"),
        _m("/home", linux.MS_NOSUID),
    ]
    kept = [m.point for m in sandbox._reproducible(scratch, table)]
    assert kept == ["/devx", "/tmp", "/home"]


def test_a_namespace_file_is_one_where_the_topmost_mount_is_nsfs() -> None:
    scratch = "/tmp/kit-sandbox-x"
    table = [
        _m("/"),
        _m("/run", fstype="tmpfs"),
        _m("/run/netns/a", fstype="nsfs"),
        _m("/run/netns/b", fstype="nsfs"),
        _m("/run/netns/b", fstype="tmpfs"),  # covered: what shows there is no namespace file
        _m("/run/c", fstype="tmpfs"),
        _m("/run/c", fstype="nsfs"),  # stacked over a tmpfs: it is
        _m("/proc/1/ns/net", fstype="nsfs"),  # recreated: never bound
        _m(f"{scratch}/ns", fstype="nsfs"),  # the sandbox's own
    ]
    assert sandbox._namespace_files(scratch, table) == ["/run/netns/a", "/run/c"]
    # reproduced: the topmost flags per point, parents first, never a namespace file
    table[5] = _m("/run/c", linux.MS_NOEXEC, "tmpfs")
    table.insert(2, _m("/run", linux.MS_NODEV, "tmpfs"))
    assert sandbox._host_submounts(scratch, table) == [
        ("/run", linux.MS_NODEV),
        ("/run/netns/b", 0),
    ]


def test_a_point_stacked_again_after_its_children_comes_after_them() -> None:
    # The later mount on /a hides its children: it is reproduced after them (in table order
    # of its topmost mount), so that what the sandbox shows there is the topmost one.
    table = [_m("/a", 1), _m("/a/b", 2), _m("/a", 4)]
    assert sandbox._host_submounts("/s", table) == [("/a/b", 2), ("/a", 4)]


# --- the sandbox's processes --------------------------------------------------------------


def test_a_scan_names_living_processes_but_pid_1_and_a_zombie() -> None:
    sleeper = subprocess.Popen(["sleep", "600"])
    zombie = subprocess.Popen(["true"])
    try:
        # the zombie is one once its exit shows: wait for that, not for a time
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)
        found = sandbox._scan("/proc")
        assert found[sleeper.pid] == "sleep 600"
        assert zombie.pid not in found
        assert 1 not in found
        assert os.getpid() in found
        assert all(isinstance(pid, int) for pid in found)
        assert sandbox._scan("/nonexistent-proc") == {}
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()


def _fake_process(proc: str, pid: int, cmdline: bytes | None, state: str = "S") -> None:
    """A process in a directory laid out as /proc: its state (and that of its one thread) and,
    unless None, its command line."""
    os.makedirs(f"{proc}/{pid}/task/{pid}")
    for stat in (f"{proc}/{pid}/stat", f"{proc}/{pid}/task/{pid}/stat"):
        with open(stat, "w") as f:
            f.write(f"{pid} (kit-{pid}) {state} 1 1 1 0 -1 4194560 0 0 0 0\n")
    if cmdline is not None:
        with open(f"{proc}/{pid}/cmdline", "wb") as f:
            f.write(cmdline)


def test_a_scan_skips_a_process_gone_meanwhile_and_names_one_exiting_by_comm() -> None:
    with tempfile.TemporaryDirectory() as proc:
        # listed in either order, some of the others come after the one gone meanwhile
        for pid in range(3, 10):
            _fake_process(proc, pid, f"p{pid}\0x\0".encode())
        _fake_process(proc, 2, None)  # alive when looked at, no command line when read
        for pid in range(10, 17):
            _fake_process(proc, pid, f"p{pid}\0".encode())
        _fake_process(proc, 20, b"")  # its memory gone, the process still alive
        _fake_process(proc, 21, b"", state="Z")  # exited
        os.mkdir(f"{proc}/self")
        found = sandbox._scan(proc)
    assert found == {
        **{pid: f"p{pid} x" for pid in range(3, 10)},
        **{pid: f"p{pid}" for pid in range(10, 17)},
        20: "[kit-20]",
    }


def test_no_process_is_only_said_after_every_scan_found_none(monkeypatch: Any) -> None:
    results = [{}, {}, {7: "daemon"}, {}]
    calls: list[str] = []

    def scan(proc: str) -> dict[int, str]:
        calls.append(proc)
        return results[len(calls) - 1]

    monkeypatch.setattr(sandbox, "_scan", scan)
    box: Any = SimpleNamespace(init_pid=4242, init_exited=lambda: False)
    assert sandbox.processes(box) == {7: "daemon"}
    assert calls == ["/proc/4242/root/proc"] * 3
    calls.clear()
    assert sandbox.processes(box, scans=2) == {}
    assert len(calls) == 2
    calls.clear()
    results[:3] = [{}, {}, {}]
    assert sandbox.processes(box) == {}
    assert len(calls) == 3  # three scans by default, no more


def test_open_fds_are_the_open_ones_without_the_listings_own() -> None:
    # os.listdir of a descriptor lists through a duplicate of it, closed when it returns: a
    # number the run would "inherit" that the supervisor's next open file then takes.
    before = sandbox.open_fds()
    for fd in before:
        fcntl.fcntl(fd, fcntl.F_GETFD)  # each one open
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        after = sandbox.open_fds()
        assert after == before | {fd}
        assert {0, 1, 2} <= after
    finally:
        os.close(fd)
    assert sandbox.open_fds() == before


# --- binds and remounts, in a mount namespace of the test --------------------------------


#: The per-mount flags the sandbox sets (the kernel adds its atime ones).
FLAGS = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC


def _flags_of(point: str) -> int:
    return [m.flags & FLAGS for m in linux.mount_table() if m.point == point][-1]


def _in_mount_namespace(fn: Any) -> dict[str, Any]:
    def run() -> Any:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        linux.mount("tmpfs", base, "tmpfs", 0, "mode=0700")
        return fn(base)

    # made here, so that it is removed from the host's file system (the tmpfs is the child's)
    with tempfile.TemporaryDirectory(prefix="kit-sandbox-test-") as base:
        return in_child(run)


@needs_root
def test_a_bind_applies_the_flags_and_a_hidden_source_is_nothing_to_show() -> None:
    def run(base: str) -> Any:
        for name in ("src", "dst", "dst2"):
            os.mkdir(f"{base}/{name}")
        linux.mount("tmpfs", f"{base}/src", "tmpfs", 0)
        os.mkdir(f"{base}/src/sub")
        linux.mount("tmpfs", f"{base}/src/sub", "tmpfs", 0)
        recursive = sandbox._bind(f"{base}/src", f"{base}/dst", linux.MS_RDONLY | linux.MS_NODEV)
        gone = sandbox._bind(f"{base}/nonexistent", f"{base}/dst2", linux.MS_RDONLY)
        points = [m.point for m in linux.mount_table()]
        return {
            "recursive": recursive,
            "flags": _flags_of(f"{base}/dst"),
            "sub_bound": f"{base}/dst/sub" in points,
            "gone": gone,
            "dst2_bound": f"{base}/dst2" in points,
        }

    out = _in_mount_namespace(run)
    assert out == {
        "ok": {
            "recursive": False,
            "flags": linux.MS_RDONLY | linux.MS_NODEV,
            "sub_bound": False,  # one mount, not its submounts
            "gone": False,
            "dst2_bound": False,
        }
    }


@needs_root
def test_a_bind_refused_in_the_initial_user_namespace_is_an_error() -> None:
    def run(base: str) -> Any:
        os.mkdir(f"{base}/src")
        os.mkdir(f"{base}/dst")
        linux.mount("tmpfs", f"{base}/src", "tmpfs", 0)
        linux.mount(None, f"{base}/src", None, linux.MS_UNBINDABLE)
        try:
            sandbox._bind(f"{base}/src", f"{base}/dst", 0)
        except OSError as exc:
            return exc.errno
        return None

    assert _in_mount_namespace(run) == {"ok": errno.EINVAL}  # raised, not swallowed


@needs_root
def test_every_mount_below_a_bound_view_is_made_read_only_and_a_namespace_file_left_out() -> None:
    def run(base: str) -> Any:
        for name in ("view", "view/w", "view/w/deeper", "view/ns", "viewx"):
            os.makedirs(f"{base}/{name}", exist_ok=True)
        linux.mount("tmpfs", f"{base}/view", "tmpfs", 0)
        for name in ("w", "w/deeper"):
            os.makedirs(f"{base}/view/{name}", exist_ok=True)
        linux.mount("tmpfs", f"{base}/view/w", "tmpfs", linux.MS_NOSUID)
        os.mkdir(f"{base}/view/w/deeper")
        linux.mount("tmpfs", f"{base}/view/w/deeper", "tmpfs", 0)
        open(f"{base}/view/nsfile", "w").close()
        linux.mount("/proc/self/ns/net", f"{base}/view/nsfile", None, linux.MS_BIND)
        linux.mount("tmpfs", f"{base}/viewx", "tmpfs", 0)
        os.mkdir(f"{base}/view/ro")  # read-only on the host already: it stays so
        linux.mount("tmpfs", f"{base}/view/ro", "tmpfs", linux.MS_RDONLY | linux.MS_NODEV)
        os.mkdir(f"{base}/view/mq")  # a file system whose name sorts before nsfs
        linux.mount("mqueue", f"{base}/view/mq", "mqueue", linux.MS_NOEXEC)
        # a mount hidden under another one stacked on its parent: no path reaches it
        os.makedirs(f"{base}/view/hid")
        linux.mount("tmpfs", f"{base}/view/hid", "tmpfs", 0)
        os.makedirs(f"{base}/view/hid/den")
        linux.mount("tmpfs", f"{base}/view/hid/den", "tmpfs", 0)
        linux.mount("tmpfs", f"{base}/view/hid", "tmpfs", 0)
        sandbox._read_only_below(f"{base}/view")
        table = {m.point: m.flags & FLAGS for m in linux.mount_table()}
        return {
            "view": table[f"{base}/view"],
            "w": table[f"{base}/view/w"],
            "deeper": table[f"{base}/view/w/deeper"],
            "viewx": table[f"{base}/viewx"],
            "mq": table.get(f"{base}/view/mq"),
            "ro": table[f"{base}/view/ro"],
            "nsfile": f"{base}/view/nsfile" in table,
        }

    out = _in_mount_namespace(run)
    ro = linux.MS_RDONLY
    assert out == {
        "ok": {
            "view": 0,  # the view itself is its caller's to remount
            "w": ro | linux.MS_NOSUID,  # its host flags kept, read-only added
            "deeper": ro,
            "viewx": 0,  # beside it, not below
            "mq": ro | linux.MS_NOEXEC,  # no namespace file: made read-only, not left out
            "ro": ro | linux.MS_NODEV,
            "nsfile": False,
        }
    }


@needs_root
def test_a_namespace_file_that_cannot_be_left_out_ends_the_build_naming_it() -> None:
    def run(base: str) -> Any:
        try:
            sandbox._leave_out(f"{base}/not-a-mount", f"{base}/view")
        except sandbox.SandboxError as exc:
            return str(exc)
        return None

    out = _in_mount_namespace(run)
    assert out.get("ok"), out
    assert "not-a-mount" in out["ok"] and "/view'" in out["ok"]
    assert "cannot be left out of the sandbox" in out["ok"]
