"""The host diff's deciding helpers fed what makes them decide: an upper layer with a symlink,
a whiteout and directories whose overlay xattr is not "opaque", snapshots where a link's
sysctl comes while the link stays, a /proc in the sandbox that another pid namespace's proc
covers, and mountinfo lines with stacked mounts and propagation tags."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import tempfile
from typing import Any

import pytest
from conftest import in_child

from kit.run import hostdiff
from kit.run.hostdiff import HostChange, HostState
from kit.system import linux

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (xattrs, namespaces)")


# --- files: an upper layer the test writes --------------------------------------------------


@needs_root
def test_an_upper_layer_names_symlinks_as_links_whiteouts_and_only_opaque_directories() -> None:
    with tempfile.TemporaryDirectory() as upper, tempfile.TemporaryDirectory() as lower:
        os.symlink("/etc/passwd", f"{upper}/link")
        os.symlink("/etc/passwd", f"{upper}/owned")
        os.symlink("/etc/passwd", f"{lower}/owned")
        os.lchown(f"{upper}/owned", 65534, 65534)  # the same link, given away
        os.mknod(f"{upper}/gone", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout
        os.mknod(f"{upper}/null", 0o600 | 0o020000, os.makedev(1, 3))  # a real chardev
        values = (("opaque", b"y"), ("xwhiteouts", b"x"), ("empty", b""), ("yes", b"yes"))
        for name, value in values:
            os.mkdir(f"{upper}/{name}")
            os.setxattr(f"{upper}/{name}", "trusted.overlay.opaque", value)
        os.mkdir(f"{upper}/user-opaque")
        os.setxattr(f"{upper}/user-opaque", "user.overlay.opaque", b"y")
        for name in ("opaque", "xwhiteouts", "empty", "yes", "user-opaque"):
            os.mkdir(f"{lower}/{name}")
        same, _ = hostdiff.read_files(upper, lower, "/p")
        os.chmod(upper, 0o755)  # the overlay's root then shows another mode than the lower's
        os.chmod(lower, 0o700)
        files, below = hostdiff.read_files(upper, lower, "/p")
    assert "/p" not in same
    assert files["/p"].startswith("dir 0755 ") and (below["/p"] or "").startswith("dir 0700 ")
    assert files["/p/link"] == "symlink 0:0 -> /etc/passwd"
    assert files["/p/owned"] == "symlink 65534:65534 -> /etc/passwd"
    assert below["/p/owned"] == "symlink 0:0 -> /etc/passwd"
    assert files["/p/gone"] == "whiteout"
    assert files["/p/null"].startswith("chardev 0600 0:0 1:3")
    assert files["/p/opaque"].startswith("opaque dir ")
    assert files["/p/user-opaque"].startswith("opaque dir ")
    # "x" marks a directory with whiteouts of the new kind, not an opaque one; an empty value
    # is no mark, nor is "yes" (overlayfs reads one byte): each is its mode and owner, the
    # same as below, so not listed
    assert "/p/xwhiteouts" not in files and "/p/empty" not in files and "/p/yes" not in files
    assert below["/p/link"] is None and below["/p/opaque"] is not None


def test_a_path_without_an_entry_below_has_nothing_there() -> None:
    with tempfile.TemporaryDirectory() as lower:
        os.mkdir(f"{lower}/d")
        assert hostdiff._lower("/d", lower) is not None
        assert hostdiff._lower("d", lower) == hostdiff._lower("/d", lower)
        assert hostdiff._lower("/missing", lower) is None


# --- the diff of two snapshots ------------------------------------------------------------


def _state(**objects: dict[str, str]) -> HostState:
    return HostState(objects={"file": {}, **objects})


def test_a_links_sysctl_is_named_unless_the_link_came_or_went() -> None:
    before = _state(link={"lo": "up", "eth0": "up"}, sysctl={"net.ipv4.ip_forward": "0"})
    # a change that sorts after the new link's own sysctls is named too
    before.objects["sysctl"]["net.ipv4.tcp_syncookies"] = "1"
    after = _state(
        link={"lo": "up", "eth0": "up", "kit0": "up"},
        sysctl={
            "net.ipv4.ip_forward": "0",
            "net.ipv4.conf.eth0.kit_new": "1",  # on a link that stayed: a change of its own
            "net.ipv4.conf.kit0.forwarding": "0",  # the new link's own: named by the link
            "net.ipv6.neigh.kit0.retrans": "1",
            "net.ipv4.tcp_syncookies": "0",
        },
    )
    # a mount whose point reads like the new link's sysctl is a mount all the same
    after.objects["mount"] = {"/mnt/x.y.conf.kit0.z": "tmpfs kit"}
    found = hostdiff.diff(before, after)
    assert found == [
        HostChange("mount", "/mnt/x.y.conf.kit0.z", None, "tmpfs kit"),
        HostChange("sysctl", "net.ipv4.conf.eth0.kit_new", None, "1"),
        HostChange("sysctl", "net.ipv4.tcp_syncookies", "1", "0"),
        HostChange("link", "kit0", None, "up"),
    ]
    del after.objects["mount"]
    # and when the link goes: the same, the other way
    assert hostdiff.diff(after, before) == [
        HostChange("sysctl", "net.ipv4.conf.eth0.kit_new", "1", None),
        HostChange("sysctl", "net.ipv4.tcp_syncookies", "0", "1"),
        HostChange("link", "kit0", "up", None),
    ]


def test_a_sysctl_of_a_link_is_a_per_device_one_of_that_link() -> None:
    links = {"kit0", "conf"}
    assert hostdiff._of_link("net.ipv4.conf.kit0.forwarding", links)
    assert hostdiff._of_link("net.ipv6.neigh.kit0.retrans_time", links)
    assert not hostdiff._of_link("net.ipv4.conf.eth0.forwarding", links)
    assert not hostdiff._of_link("net.ipv4.route.kit0.x", links)  # not a per-device table
    assert not hostdiff._of_link("net.ipv4.conf.kit0", links)  # too short to be one
    assert not hostdiff._of_link("net.ipv4.conf", links)
    assert not hostdiff._of_link("net.core", links)
    assert not hostdiff._of_link("net.core.conf.kit0.x", {"x"})


def test_a_kind_either_side_could_not_read_is_named_and_not_compared() -> None:
    before = _state(mount={"/": "a"}, hostname={"hostname": "h"})
    after = _state(mount={"/": "b"}, hostname={"hostname": "h2"})
    after.errors["mount"] = "EACCES"
    before.errors["hostname"] = "EIO"
    assert hostdiff.diff(before, after) == [
        HostChange("unreadable", "mount", None, "EACCES"),
        HostChange("unreadable", "hostname", "EIO", None),
    ]


def test_changes_come_in_kind_order_then_by_name_and_an_empty_name_is_its_kind() -> None:
    before = _state(process={"pid 2": "a"}, ipc={"": "x"})
    after = _state(process={"pid 10": "b"}, ipc={"": "y"}, mount={"/b": "m", "/a": "m"})
    assert [(c.kind, c.name) for c in hostdiff.diff(before, after)] == [
        ("mount", "/a"),
        ("mount", "/b"),
        ("ipc", "ipc"),
        ("process", "pid 10"),
        ("process", "pid 2"),
    ]


def test_a_file_is_what_the_overlay_shows_the_upper_entry_over_the_lower() -> None:
    lower = {"/etc/a": "file 0644 0:0 1 bytes aa", "/etc/d": "dir 0755 0:0"}
    before = HostState(objects={"file": {}}, lower=dict(lower))
    after = HostState(
        objects={
            "file": {
                "/etc/a": "whiteout",
                "/etc/d": "opaque dir 0755 0:0",
                "/etc/new": "file 0600 0:0 1 bytes bb",
            }
        },
        lower={**lower, "/etc/new": None},
    )
    assert hostdiff.diff(before, after) == [
        HostChange("file", "/etc/a", lower["/etc/a"], None),
        HostChange(
            "file", "/etc/d", "dir 0755 0:0", "dir 0755 0:0 (replaced: its old entries hidden)"
        ),
        HostChange("file", "/etc/new", None, "file 0600 0:0 1 bytes bb"),
    ]
    # an opaque directory made plain again, the same as before: its entries came back
    plain = HostState(objects={"file": {"/etc/d": "dir 0755 0:0"}}, lower=dict(lower))
    assert hostdiff.diff(after, plain)[1] == HostChange(
        "file", "/etc/d", "dir 0755 0:0", "dir 0755 0:0 (replaced: its old entries hidden)"
    )
    # a plain directory replaced by an opaque one of another mode: the mode is the change
    other = HostState(objects={"file": {"/etc/d": "opaque dir 0700 0:0"}}, lower=dict(lower))
    assert hostdiff.diff(plain, other) == [
        HostChange("file", "/etc/d", "dir 0755 0:0", "dir 0700 0:0")
    ]
    # the lower side is the one read last; a path the after snapshot no longer has keeps its own
    assert hostdiff._file_sides("/etc/a", after, before) == (None, lower["/etc/a"])
    assert hostdiff._file_sides("/etc/x", HostState({"file": {}}, {"/etc/x": "L"}), after) == (
        "L",
        "L",
    )


# --- mounts -------------------------------------------------------------------------------


def test_mountinfo_lines_are_named_by_point_stacked_ones_numbered_and_peers_by_group() -> None:
    text = (
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "\n"
        "23 22 0:22 / /mnt rw,nosuid shared:7 master:2 - tmpfs kit\\040a rw,size=4k\n"
        "24 23 0:23 /sub /mnt ro - tmpfs b rw\n"
        "25 23 0:23 / /mnt ro unbindable - tmpfs c rw\n"
        "26 22 0:24 / /odd rw - proc\n"
    )
    assert hostdiff.parse_mounts(text) == {
        "/": "ext4 /dev/sda1 root / rw,relatime (rw) shared:1",
        "/mnt": "tmpfs kit a root / rw,nosuid (rw,size=4k) master:2,shared:7",
        "/mnt [2]": "tmpfs b root /sub ro (rw) private",
        "/mnt [3]": "tmpfs c root / ro (rw) unbindable",
        "/odd": "proc  root / rw () private",
    }
    assert hostdiff._propagation([]) == "private"
    # One sandbox's table before and after its run: a new peer group is a change (the
    # mount left its old peers), though the kind is the same.
    assert hostdiff._propagation(["shared:1"]) != hostdiff._propagation(["shared:2"])


# --- processes ------------------------------------------------------------------------------


def test_the_processes_of_a_pid_namespace_are_named_as_it_numbers_them() -> None:
    found = hostdiff._processes_in(os.readlink("/proc/self/ns/pid"))
    status = linux.read_status("/proc/self/status")["NSpid"].split()
    assert f"pid {status[-1]}" in found
    assert hostdiff._processes_in("pid:[0]") == {}


def _pid_one(go: int, replies: int, own: str, other: str, second: bool) -> None:
    """pid 1 of a pid namespace of the test: mount this namespace's proc on ``other``/proc
    (the other namespace's root), chroot into ``own``, with ``second`` fork a pid 2. Then it
    waits for its SIGKILL, which ends the namespace."""
    os.read(go, 1)
    if second and os.fork() == 0:
        while True:
            signal.pause()
    linux.mount("proc", f"{other}/proc", "proc", 0)
    os.chroot(own)
    os.write(replies, b"k")
    while True:
        signal.pause()


def _namespace(go: int, replies: int, own: str, other: str, second: bool) -> int:
    """Fork a child that unshares a pid namespace and forks its pid 1 (:func:`_pid_one`);
    returns the child. Pid 1's pid, as the caller numbers it, arrives on ``replies``."""
    child = os.fork()
    if child == 0:
        try:
            linux.unshare(linux.CLONE_NEWPID)
            one = os.fork()
            if one == 0:
                _pid_one(go, replies, own, other, second)
            os.write(replies, one.to_bytes(4, "little"))
            os.waitpid(one, 0)
        finally:
            os._exit(0)
    return child


def _in_new_mounts(fn: Any) -> dict[str, Any]:
    """``fn(base)`` in a forked child with a mount namespace of its own and a tmpfs at base."""

    def run() -> Any:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        linux.mount("tmpfs", base, "tmpfs", 0, "mode=0755")
        return fn(base)

    # made here, so that it is removed from the host's file system (the tmpfs is the child's)
    with tempfile.TemporaryDirectory(prefix="kit-hostdiff-test-") as base:
        return in_child(run)


@needs_root
def test_a_sandbox_whose_proc_is_another_pid_namespaces_is_read_through_ours() -> None:
    # Two pid namespaces, each pid 1 chrooted where the other one's proc is mounted on /proc:
    # the first has pid 1 alone, the second pid 1 and 2. Each one's processes are its own
    # (whichever of the two namespaces' names sorts first), not those its /proc shows.
    def run(base: str) -> Any:
        for name in ("a", "b"):
            os.makedirs(f"{base}/{name}/proc")
        go, replies = os.pipe(), [os.pipe(), os.pipe()]
        children = [
            _namespace(go[0], replies[0][1], f"{base}/a", f"{base}/b", False),
            _namespace(go[0], replies[1][1], f"{base}/b", f"{base}/a", True),
        ]
        ones = [int.from_bytes(os.read(r, 4), "little") for r, _ in replies]
        try:
            os.write(go[1], b"gg")
            assert [os.read(r, 1) for r, _ in replies] == [b"k", b"k"]
            with open("/proc/self/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            return {"found": [hostdiff.read_processes(one) for one in ones], "argv": argv}
        finally:
            for one in ones:
                os.kill(one, signal.SIGKILL)
            for child in children:
                os.waitpid(child, 0)

    out = _in_new_mounts(run)
    assert "ok" in out, out
    argv = out["ok"]["argv"]
    assert out["ok"]["found"] == [{"pid 1": argv}, {"pid 1": argv, "pid 2": argv}]


@needs_root
def test_a_sandbox_without_a_proc_is_read_through_ours() -> None:
    def run(base: str) -> Any:
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.chroot(base)  # an empty tmpfs: no /proc at all
            os.write(w, b"k")
            while True:
                signal.pause()
        try:
            assert os.read(r, 1) == b"k"
            return sorted(hostdiff.read_processes(child))
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)

    out = _in_new_mounts(run)
    assert "ok" in out, out
    # the pid namespace of the test's: its processes, this one's among them
    own = linux.read_status("/proc/self/status")["NSpid"].split()[-1]
    assert f"pid {own}" in out["ok"]


def _fake_process(proc: str, pid: int, cmdline: bytes | None) -> None:
    os.makedirs(f"{proc}/{pid}/task/{pid}")
    with open(f"{proc}/{pid}/task/{pid}/stat", "w") as f:
        f.write(f"{pid} (x) S 1 1 1 0 -1 4194560 0 0 0 0\n")  # alive: sleeping, not exiting
    if cmdline is not None:
        with open(f"{proc}/{pid}/cmdline", "wb") as f:
            f.write(cmdline)


@needs_root
def test_a_process_gone_between_its_state_and_its_command_line_is_not_named() -> None:
    # The sandbox's /proc read the fast way: its pid 1 says the sandbox's pid namespace. Pid 2
    # was alive when its state was read, and gone (no cmdline) when its command line was.
    def run(base: str) -> Any:
        own = os.readlink("/proc/self/ns/pid")  # the child's below: forked, same namespace
        _fake_process(f"{base}/proc", 1, b"init\0")
        os.makedirs(f"{base}/proc/1/ns")
        os.symlink(own, f"{base}/proc/1/ns/pid")
        _fake_process(f"{base}/proc", 2, None)
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.chroot(base)
            os.write(w, b"k")
            while True:
                signal.pause()
        try:
            assert os.read(r, 1) == b"k"
            # (init's settings, read through the host's /proc, are the test's own concern)
            got = hostdiff.read_processes(child)
            return {name: got[name] for name in got if not name.startswith("pid 1 ")}
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)

    assert _in_new_mounts(run) == {"ok": {"pid 1": "init"}}


@needs_root
def test_the_named_network_namespaces_are_the_sandboxs_and_none_without_a_run_netns() -> None:
    def run(base: str) -> Any:
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.chroot(base)
            os.write(w, b"k")
            while True:
                signal.pause()
        try:
            assert os.read(r, 1) == b"k"
            none = hostdiff.read_netns(child)
            os.makedirs(f"{base}/run/netns")
            open(f"{base}/run/netns/kit-a", "w").close()
            return {"none": none, "some": hostdiff.read_netns(child)}
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)

    assert _in_new_mounts(run) == {"ok": {"none": {}, "some": {"kit-a": "netns"}}}


def test_every_kind_of_sysctl_is_reported_as_a_sysctl() -> None:
    before = _state(
        sysctl={"net.ipv4.ip_forward": "0"},
        ipc_sysctl={"kernel.msgmnb": "16384"},
        machine_sysctl={"vm.swappiness": "60"},
    )
    after = _state(
        sysctl={"net.ipv4.ip_forward": "0"},
        ipc_sysctl={"kernel.msgmnb": "32768"},
        machine_sysctl={"vm.swappiness": "10"},
    )
    assert hostdiff.diff(before, after) == [
        HostChange("sysctl", "kernel.msgmnb", "16384", "32768"),
        HostChange("sysctl", "vm.swappiness", "60", "10"),
    ]


def test_a_change_of_the_machines_own_sysctl_is_marked_and_no_other() -> None:
    before = _state(ipc_sysctl={"kernel.msgmnb": "1"}, machine_sysctl={"vm.swappiness": "60"})
    machine = {"kind": "sysctl", "name": "vm.swappiness", "before": "60", "after": "10"}
    assert hostdiff._machine_marked(machine, before) == {**machine, "machine": True}
    for other in (
        {"kind": "sysctl", "name": "kernel.msgmnb", "before": "1", "after": "2"},
        {"kind": "file", "name": "vm.swappiness", "before": None, "after": "file"},
    ):
        assert hostdiff._machine_marked(other, before) == other


def test_the_sysctls_outside_net_are_split_by_namespace_less_those_that_change_alone() -> None:
    machine, ipc = hostdiff.read_machine_sysctls(), hostdiff.read_ipc_sysctls()
    assert machine and ipc and not machine.keys() & ipc.keys()
    assert "vm.swappiness" in machine and "fs.file-max" in machine
    assert {"kernel.msgmnb", "kernel.shmmax", "fs.mqueue.msg_max"} <= ipc.keys()
    assert all(hostdiff.is_ipc_sysctl(name) for name in ipc)
    every = machine.keys() | ipc.keys()
    assert not any(name.startswith("net.") for name in every)
    assert not every & {"kernel.ns_last_pid", "kernel.hostname", "vm.stat_refresh"}
    # none of them write-only (vm.drop_caches): what it reads is no state
    assert not any(v.startswith("unreadable") for v in [*machine.values(), *ipc.values()])


def test_inits_settings_are_compared_while_it_lives_and_named_with_it_when_gone() -> None:
    init = {"pid 1": "kit-sandbox", "pid 1 limit open files": "1024/4096", "pid 1 nice": "0"}
    lowered = {**init, "pid 1 limit open files": "64/64"}
    assert hostdiff.diff(_state(process=init), _state(process=lowered)) == [
        HostChange("process", "pid 1 limit open files", "1024/4096", "64/64")
    ]
    assert hostdiff.diff(_state(process=init), _state(process={})) == [
        HostChange("process", "pid 1", "kit-sandbox", None)
    ]


@needs_root
def test_inits_limits_scheduling_and_oom_adjustment_are_read_from_outside() -> None:
    def child() -> dict[str, str]:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setpriority(os.PRIO_PROCESS, 0, 7)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("123")
        got = hostdiff._init_attributes(os.getpid())
        return {k: v for k, v in got.items() if k.endswith(("core file size", "scheduling", "adj"))}

    got = in_child(child)["ok"]
    assert got["pid 1 limit core file size"] == "0/0"
    assert got["pid 1 scheduling"].startswith("nice 7, policy 0, real-time priority 0, cpus ")
    assert got["pid 1 oom_score_adj"] == "123"
    assert hostdiff._init_attributes(2**22 + 1) == {}  # gone: nothing to compare


def test_the_machines_sysctls_read_through_held_files_as_opened_anew() -> None:
    held = hostdiff.open_machine_sysctls()
    assert held is not None
    try:
        assert hostdiff.read_machine_sysctls(held) == hostdiff.read_machine_sysctls()
        assert hostdiff.read_machine_sysctls(held) == hostdiff.read_machine_sysctls(held)
    finally:
        hostdiff.close_all([fd for _, fd in held])


def test_no_room_to_hold_the_machines_sysctls_holds_none_and_reads_them_one_by_one() -> None:
    def child() -> list[Any]:
        hostdiff._outside_net_layout()
        limit = max(int(n) for n in os.listdir("/proc/self/fd")) + 30
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        fillers = []
        with contextlib.suppress(OSError):  # EMFILE: the table is full
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        for fd in fillers[:10]:  # room for ten, not two hundred
            os.close(fd)
        before = sorted(int(n) for n in os.listdir("/proc/self/fd"))
        held = hostdiff.open_machine_sysctls()
        after = sorted(int(n) for n in os.listdir("/proc/self/fd"))
        values = hostdiff.read_machine_sysctls()
        return [held, after == before, len(values) > 100]

    assert in_child(child) == {"ok": [None, True, True]}
