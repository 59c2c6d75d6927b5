"""kit.system.linux: the calls that replaced heavier ones (an ioctl for pyroute2's netlink, link
targets for stat, one read for a text file) answer exactly as before.

Namespace changes happen in forked children of the pytest process, never in it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import socket
import subprocess
import sys
import time

import pytest
from conftest import fd_child, in_child, open_fds

from kit import system as kit_system
from kit.ledger import probe
from kit.system import linux


def errno_of(fn, *args) -> str:
    try:
        fn(*args)
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def test_link_up_brings_loopback_up_in_a_new_network_namespace():
    if os.geteuid() != 0:
        return  # creating a network namespace needs root here (or a user namespace)

    def scenario() -> dict:
        linux.unshare(linux.CLONE_NEWNET)
        before = linux.link_flags("lo") & linux.IFF_UP
        linux.link_up("lo")
        after = linux.link_flags("lo") & linux.IFF_UP
        again = errno_of(linux.link_up, "lo")  # already up: fine
        missing = errno_of(linux.link_up, "nosuchif0")
        too_long = errno_of(linux.link_up, "x" * 20)
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        return {
            "before": before,
            "after": after,
            "again": again,
            "missing": missing,
            "too_long": too_long,
            "unprivileged": errno_of(linux.link_up, "lo"),
        }

    out = in_child(scenario)
    assert out == {
        "ok": {
            "before": 0,
            "after": linux.IFF_UP,
            "again": "ok",
            "missing": "ENODEV",
            "too_long": "ENODEV",
            "unprivileged": "EPERM",
        }
    }


def test_link_flags_of_the_host_loopback_match_sysfs():
    with open("/sys/class/net/lo/flags") as f:
        sysfs = int(f.read(), 16)
    up_loopback = linux.IFF_UP | 0x8  # IFF_LOOPBACK; SIOCGIFFLAGS adds IFF_RUNNING
    assert linux.link_flags("lo") & up_loopback == sysfs & up_loopback == up_loopback


def test_ns_inodes_are_the_inodes_stat_reports():
    by_stat = {
        kind: os.stat(f"/proc/self/ns/{name}").st_ino
        for kind, (_, name) in linux.NAMESPACES.items()
    }
    assert linux.ns_inodes() == by_stat
    tid = linux.proc_tid()
    assert linux.ns_inodes(f"/proc/self/task/{tid}/ns") == by_stat
    assert linux.ns_inodes("/proc/self/no-such-dir") == dict.fromkeys(linux.NAMESPACES)


def test_snapshot_namespaces_match_stat_in_every_thread():
    snap = probe.snapshot()
    for kind in linux.NAMESPACES:
        assert snap["ns"][kind] == linux.ns_inode(kind)
    for thread in snap["threads"]:
        assert thread["ns"] == snap["ns"]


def test_read_status_parses_like_a_text_read():
    with open("/proc/self/status") as f:
        expected = {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
    got = linux.read_status()
    for key in ("Name", "Uid", "Gid", "CapEff", "CapBnd", "NoNewPrivs"):
        assert got[key] == expected[key]


def test_mask_to_caps_hands_out_a_fresh_list_each_time():
    first = linux.mask_to_caps(0b101)
    first.append("CAP_MINE")
    assert linux.mask_to_caps(0b101) == ["CAP_CHOWN", "CAP_DAC_READ_SEARCH"]
    assert linux.mask_to_caps(1 << 45) == ["CAP_45"]


def test_the_kit_itself_does_not_import_pyroute2():
    """pyroute2 stays installed for engines that use it (the supervisor warms it up when an
    engine imports it); the kit brings lo up with an ioctl, so a real run's zygote and
    supervisor do not carry its ~100 modules."""
    code = (
        "import sys\n"
        "from kit.run.launcher import make_request\n"
        "from kit.run.supervisor import preload\n"
        "preload(make_request('reference', 'root', ['/bin/true'], backend='real'))\n"
        "preload(make_request('reference', 'root', ['/bin/true'], backend='fake'))\n"
        "print('pyroute2' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_the_escalation_child_reads_its_capabilities_like_capget():
    if os.geteuid() != 0:
        return

    def scenario() -> dict:
        keep = linux.caps_to_mask(["CAP_SETUID", "CAP_NET_ADMIN"])
        os.setresgid(65534, 65534, 65534)
        linux.set_keepcaps(True)
        os.setresuid(65534, 65534, 65534)  # permitted kept, effective cleared
        linux.capset(0, keep, 0)
        return {
            "same": list(probe._own_capabilities()) == list(linux.capget()),
            "caps": list(probe._own_capabilities()),
            "escalation": probe.escalation(),
        }

    out = in_child(scenario)["ok"]
    keep = linux.caps_to_mask(["CAP_SETUID", "CAP_NET_ADMIN"])
    assert out["same"] and out["caps"] == [0, keep, 0]
    # The throwaway child may raise its permitted set into effective: CAP_SETUID does it.
    assert out["escalation"]["raise_caps"] == ["CAP_SETUID", "CAP_NET_ADMIN"]
    assert out["escalation"]["setresuid_root"] is False


# --- process_alive: what counts as a process left behind -----------------------------------


def _wait_state(pid: int, state: str) -> None:
    for _ in range(2000):
        if linux.process_state(pid) == state:
            return
        os.sched_yield()
        subprocess.run(["true"])  # a short pause that never sleeps on a timer
    raise AssertionError(f"pid {pid} never reached state {state}")


def test_process_alive_is_true_for_a_living_child_and_false_for_a_zombie_or_none():
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert linux.process_alive(child.pid)
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped
        assert linux.process_state(child.pid) == "Z"
        assert not linux.process_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not linux.process_alive(child.pid)


def test_process_alive_sees_the_threads_of_a_process_whose_main_thread_exited_alone():
    # The thread group leader shows "Z" while the other threads run: a daemon that hides
    # this way is still alive, and the leak checks must say so.
    exit_nr = {"x86_64": 60, "aarch64": 93}[os.uname().machine]
    code = (
        "import ctypes, os, threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "os.write(1, b'x')\n"
        f"ctypes.CDLL(None, use_errno=True).syscall({exit_nr}, 0)  # exit(2): this thread only\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.read(1) == b"x"
        _wait_state(child.pid, "Z")  # the leader's state
        assert linux.process_alive(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_thread_named_with_bytes_that_are_not_utf8_is_still_read():
    # Engine code may name its threads anything (PR_SET_NAME): the kit's snapshot of the
    # process and the supervisor's reads of its status must not fail on it.
    def body() -> list[str]:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(15, ctypes.c_char_p(b"kit-\xff\xfe"), 0, 0, 0) == 0  # PR_SET_NAME
        names = [t["name"] for t in probe.snapshot()["threads"]]
        status = linux.read_status(f"/proc/self/task/{linux.proc_tid()}/status")
        return [*names, status["Name"]]

    out = in_child(body)
    assert "ok" in out, out
    assert all(name == "kit-\ufffd\ufffd" for name in out["ok"]), out


def test_the_libc_functions_are_looked_up_at_import_not_in_each_forked_process() -> None:
    # A lookup is a dlsym plus the pages it writes: paid once by the zygote, not by every
    # process of every run (a sandbox's init looked up mount and umount2 at each build).
    found = {name for name in linux._LIBC_FUNCTIONS if name in vars(linux._libc)}
    assert found == set(linux._LIBC_FUNCTIONS)
    assert {"mount", "umount2", "prctl"} <= found


def test_a_name_is_set_through_one_buffer_size_whatever_its_length() -> None:
    sizes: list[int] = []
    real = ctypes.create_string_buffer

    def recording(init: bytes, size: int | None = None) -> ctypes.Array[ctypes.c_char]:
        buf = real(init, size) if size is not None else real(init)
        sizes.append(len(buf))
        return buf

    def run() -> list[str]:
        ctypes.create_string_buffer = recording
        names = []
        for name in ("kit-x", "kit-sandbox", "a-name-longer-than-fifteen"):
            linux.set_name(name)
            with open("/proc/thread-self/comm") as f:
                names.append(f.read().strip())
        return [*names, *map(str, sizes)]

    out = in_child(run)
    assert out == {"ok": ["kit-x", "kit-sandbox", "a-name-longer-t", "16", "16", "16"]}


def test_get_name_reads_the_calling_threads_name_from_the_kernel():
    def run() -> list[str]:
        names = []
        for name in ("kit-x", "a-name-longer-than-fifteen"):
            linux.set_name(name)
            names.append(linux.get_name())
        return names

    assert in_child(run) == {"ok": ["kit-x", "a-name-longer-t"]}


#: A seccomp filter (x86-64 numbers) for a child of the test: close_range(2) fails with the
#: errno put in its fourth instruction, and close(2) of a number from 2**20 up kills the
#: process: a fallback that tries every number (CPython's os.closerange) dies at once,
#: instead of spending minutes on 2**31 calls.
_NO_CLOSE_RANGE = [
    (0x20, 0, 0, 0),  # the call's number
    (0x15, 0, 1, 436),  # close_range?
    (0x06, 0, 0, 0x00050000),  # RET_ERRNO | (the errno, added)
    (0x15, 0, 2, 3),  # close?
    (0x20, 0, 0, 16),  # its first argument, low 32 bits
    (0x35, 1, 0, 1 << 20),  # at or above 2**20: killed
    (0x06, 0, 0, 0x7FFF0000),  # RET_ALLOW
    (0x06, 0, 0, 0x80000000),  # RET_KILL_PROCESS
]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filter has x86-64 numbers")
@pytest.mark.parametrize(
    "refusal", ["ENOSYS", "EPERM", "EACCES", "ENOSYS-no-proc", "ENOSYS-fake-proc"]
)
def test_close_fds_except_without_close_range_closes_what_proc_lists(refusal):
    """Where close_range(2) fails (an old kernel: ENOSYS; a seccomp profile: ENOSYS, EPERM
    or any errno it chose), every descriptor /proc/self/fd lists is closed but the kept
    ones; without a /proc to list (a tmpfs over it, in the child's own mount namespace),
    or with one that is not procfs (a tmpfs whose self/fd holds made-up names), the call
    fails naming both reasons, instead of leaving descriptors open."""

    def body(w: int) -> bytes:
        if refusal.endswith(("-no-proc", "-fake-proc")):
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            linux.mount("tmpfs", "/proc", "tmpfs", 0, "size=4k")
        if refusal.endswith("-fake-proc"):
            os.makedirs("/proc/self/fd")
            for name in ("12", "x"):
                os.close(os.open(f"/proc/self/fd/{name}", os.O_WRONLY | os.O_CREAT))
        for at in (10, 11, 12, 40, 19999):
            os.dup2(w, at)
        prog = list(_NO_CLOSE_RANGE)
        prog[2] = (0x06, 0, 0, 0x00050000 | getattr(errno, refusal.split("-")[0]))
        linux.set_no_new_privs()
        linux.seccomp_install_filter(prog, listener=False)
        try:
            linux.close_fds_except([40, 11, w, 40])
        except OSError as exc:
            return f"error {exc}".encode()
        return " ".join(map(str, open_fds())).encode()

    code, data, w = fd_child(body)
    out = data.decode()
    assert code == 0, (code, out)  # -SIGSYS: a close >= 2**20
    if refusal.endswith("-no-proc"):
        assert out.startswith("error ") and "close_range failed" in out, out
        assert "/proc/self/fd cannot be listed" in out, out
    elif refusal.endswith("-fake-proc"):
        assert out.startswith("error ") and "cannot be listed (not procfs)" in out, out
    else:
        assert [int(x) for x in out.split()] == sorted({0, 11, 40, w}), out


def test_close_fds_except_closes_every_fd_but_the_kept_ones_the_standard_ones_too():
    def body(w: int) -> bytes:
        for at in (10, 11, 12, 40, 19999):
            os.dup2(w, at)  # inheritable: the closing must not rely on close-on-exec
        linux.close_fds_except([40, 11, w, 40])  # unsorted, a duplicate, no 0-2
        return " ".join(map(str, open_fds())).encode()

    code, data, w = fd_child(body)
    left = [int(x) for x in data.split()]
    assert code == 0
    # 0, the lowest number, is the fd that listed /proc/self/fd: stdin was closed before it
    assert left == sorted({0, 11, 40, w}), left


def test_the_real_domainname_is_set_in_the_callers_uts_namespace_only():
    if os.geteuid() != 0:
        pytest.skip("setdomainname needs CAP_SYS_ADMIN")
    host = linux.getdomainname()

    def body() -> dict[str, str]:
        linux.unshare(linux.ns_flags(["uts"]))
        before = kit_system.RealSystem().getdomainname()
        kit_system.RealSystem().setdomainname("kit-test.example")
        return {"before": before, "after": kit_system.RealSystem().getdomainname()}

    out = in_child(body)
    assert out == {"ok": {"before": host, "after": "kit-test.example"}}, out
    assert linux.getdomainname() == host


def test_grow_fd_table_makes_room_above_the_highest_fd_and_leaves_nothing_open():
    def scenario() -> dict:
        def fd_size() -> int:
            return int(linux.read_status()["FDSize"])

        before, opened = fd_size(), sorted(open_fds())
        count = before * 4  # far beyond the table's size now, within the usual 1024
        linux.grow_fd_table(count)
        grown = fd_size()
        # A second grow within the room made costs nothing and changes nothing.
        linux.grow_fd_table(count)
        return {
            "room": grown > max(opened) + count - 1,
            "again": fd_size() == grown,
            "left_open": sorted(open_fds()) != opened,
        }

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 4096:
        pytest.skip("a soft limit of open files too low to show the growth")
    assert in_child(scenario) == {"ok": {"room": True, "again": True, "left_open": False}}


def test_grow_fd_table_grows_up_to_the_soft_limit_when_asked_for_more():
    def scenario() -> list:
        size = int(linux.read_status()["FDSize"])
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        soft = min(size * 4, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        opened = sorted(open_fds())
        linux.grow_fd_table(soft * 10)  # more than the limit allows: as much as it does
        return [int(linux.read_status()["FDSize"]) >= soft > size, sorted(open_fds()) == opened]

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 4096:
        pytest.skip("a hard limit of open files too low to raise the soft one past the table")
    assert in_child(scenario) == {"ok": [True, True]}


def test_children_and_descendants_read_the_tree_with_or_without_children_files(monkeypatch):
    # A kernel built without CONFIG_PROC_CHILDREN has no /proc/PID/task/TID/children: the
    # process table tells the same, and descendants (kill_tree, the master watch) still work.
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # a child with a grandchild, both waiting for the pipe to close
        os.close(w)
        if os.fork() == 0:
            os.read(r, 1)
            os._exit(0)
        os.read(r, 1)
        os.wait()
        os._exit(0)
    os.close(r)
    try:
        while not linux.children(child):
            time.sleep(0.005)
        (grandchild,) = linux.children(child)
        with_files = (linux.children(os.getpid()), linux.descendants(os.getpid()))
        assert child in with_files[0] and grandchild not in with_files[0]
        assert with_files[1].index(child) < with_files[1].index(grandchild)  # parents first
        assert linux.descendants(os.getpid(), skip={child}) == [
            p for p in with_files[1] if p not in (child, grandchild)
        ]
        real_open = open

        def no_children_files(path, *args, **kwargs):
            if str(path).endswith("/children"):
                raise FileNotFoundError(path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(linux, "open", no_children_files, raising=False)
        assert sorted(linux.children(os.getpid())) == sorted(with_files[0])
        assert linux.children(child) == [grandchild]
        assert set(linux.descendants(os.getpid())) == set(with_files[1])
    finally:
        os.close(w)
        os.waitpid(child, 0)


def _sent(fds: list[int], data: bytes = b"{}") -> socket.socket:
    """The receiving end of a socket pair on which ``fds`` and ``data`` were sent, the
    sending end closed."""
    ours, theirs = socket.socketpair()
    with theirs:
        linux.send_with_fds(theirs, data, fds)
    return ours


def test_descriptors_and_data_cross_in_order_beyond_one_message():
    r, w = os.pipe()
    try:
        with _sent([r, w] * 200, b'{"kept": true}') as ours:
            data, fds = linux.recv_with_fds(ours, max_fds=400)
        assert data == b'{"kept": true}' and len(fds) == 400
        idents = [linux.fd_identity(fd) for fd in fds]
        assert idents == [linux.fd_identity(r), linux.fd_identity(w)] * 200
        assert all(not os.get_inheritable(fd) for fd in fds)
        for fd in fds:
            os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_more_descriptors_than_allowed_are_refused_and_closed():
    r, w = os.pipe()
    try:
        before = open_fds()
        with _sent([r] * 300) as ours, pytest.raises(ValueError, match="more than 299"):
            linux.recv_with_fds(ours, max_fds=299)
        assert open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_the_sending_end_itself_is_refused_instead_of_waiting_for_ever():
    before = open_fds()
    ours, theirs = socket.socketpair()
    peer = linux.fd_identity(theirs.fileno())
    linux.send_with_fds(theirs, b"{}", [theirs.fileno()])
    theirs.close()  # the copy in flight keeps the pair open: no EOF would ever come
    ours.settimeout(5)
    with ours, pytest.raises(ValueError, match="the sending end itself"):
        linux.recv_with_fds(ours, max_fds=10, peer=peer)
    assert open_fds() == before


def test_descriptors_the_table_has_no_room_for_are_a_named_error():
    def receive() -> str:
        r, _w = os.pipe()
        ours = _sent([r] * 50)
        resource.setrlimit(resource.RLIMIT_NOFILE, (20, 20))
        try:
            linux.recv_with_fds(ours, max_fds=100)
        except ValueError as exc:
            return str(exc)
        return "received"

    assert in_child(receive) == {"ok": "descriptors were dropped on the way (MSG_CTRUNC)"}
