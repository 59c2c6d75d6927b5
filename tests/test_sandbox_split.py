"""The host sandbox built in pieces (kit/run/sandbox.py ``_Layers._split``), launched as root
of a user namespace: what the skeleton holds, and what the run's processes can reach.

Each test makes its host objects in a directory of its own under /var/tmp, with a tmpfs
mounted in it in a mount namespace of a child of the test (so the directory is on the way
to a mount point: in the skeleton), builds a sandbox from inside a new user namespace and
looks at it from a process of the sandbox.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import in_child
from test_host_userns import ROOT, in_userns

from kit.system import linux

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the host sandbox needs root")

#: Run as root of the user namespace: build and adopt a sandbox, run the probe named by the
#: config, print its JSON result.
SCRIPT = r'''
import json, os, socket, stat, sys
from kit.run import hostdiff, sandbox
from kit.system import linux

config = json.loads(sys.argv[1])


def inside(box, fn):
    """fn() in a child in the sandbox's mount namespace (its pid namespace: adopted)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            linux.setns(box.ns_fds["mount"], linux.CLONE_NEWNS)
            os.chdir("/")
            out = {"ok": fn()}
        except BaseException as exc:
            out = {"error": repr(exc)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def attempt(fn):
    try:
        fn()
        return "done"
    except OSError as exc:
        return os.strerror(exc.errno)


def sockets(box):
    def look():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        return {
            "connect": attempt(lambda: s.connect(config["sock"])),
            "fifo": attempt(lambda: os.close(os.open(config["fifo"], os.O_WRONLY | os.O_NONBLOCK))),
            "kinds": [stat.S_IFMT(os.lstat(config[k]).st_mode) for k in ("sock", "fifo")],
            "big": open(config["big"], "rb").read().count(b"x"),
        }
    return inside(box, look)


def roots(box):
    def look():
        st = os.stat(config["piece"])
        return [stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns]
    seen = inside(box, look)
    watch = hostdiff.Inside(box.init_pid)
    before = hostdiff.snapshot(box, only=frozenset(), inside=watch)
    changed = inside(box, lambda: os.chmod(config["piece"], 0o700))
    after = hostdiff.snapshot(box, only=frozenset(), inside=watch)
    # The test's own piece only: other processes' directories come and go under /var/tmp
    # meanwhile. Not the files unread: the diff could not vouch for the piece then.
    piece = config["piece"]
    changes = [
        c.to_json()
        for c in hostdiff.diff(before, after)
        if (c.kind, c.name) == ("unreadable", "file")
        or (c.kind == "file" and (c.name == piece or c.name.startswith(piece + "/")))
    ]
    return {"seen": seen, "changed": changed, "changes": changes, "pieces": sorted(box.upper_dirs)}


def leftover(box, ready_w, seen_w, stop_r):
    """A process the run left behind, root in the sandbox: it looks for a way out through
    every other process of the sandbox's /proc until told to stop."""
    import select
    from pyroute2 import IPRoute

    linux.setns(box.ns_fds["mount"], linux.CLONE_NEWNS)
    linux.setns(box.ns_fds["net"], linux.CLONE_NEWNET)
    os.chdir("/")
    with IPRoute() as ipr:  # a change of the network: the diff compares with a fresh one
        ipr.addr("add", index=1, address="10.99.0.1", prefixlen=24)
    os.write(ready_w, b"r")
    own = os.stat("/")
    escaped = []
    while not select.select([stop_r], [], [], 0.001)[0]:
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in (1, os.getpid()):
                continue
            try:
                st = os.stat(f"/proc/{name}/root/")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino) and name not in escaped:
                escaped.append(name)
                os.write(seen_w, b"s")
    return escaped


def fresh(box):
    """The host diff's end while a leftover process lives (its network changed)."""
    import select

    watch = hostdiff.HostWatch(box)
    ready_r, ready_w = os.pipe()
    seen_r, seen_w = os.pipe()
    stop_r, stop_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(out_w, json.dumps(leftover(box, ready_w, seen_w, stop_r)).encode())
        except BaseException as exc:
            os.write(out_w, json.dumps(repr(exc)).encode())
        finally:
            os._exit(0)
    os.close(out_w)
    os.close(ready_w)  # EOF once the leftover process is gone
    if not select.select([ready_r], [], [], 30)[0] or not os.read(ready_r, 1):
        raise AssertionError(f"the leftover process failed: {os.read(out_r, 4096)}")

    def slow_reader():  # the fresh namespace's reader, if forked: until the leftover saw it
        select.select([seen_r], [], [], 10)
        return {"link": {}, "address": {}, "route": {}}

    hostdiff.read_network = slow_reader
    fields = watch.finish()
    os.write(stop_w, b"x")
    with os.fdopen(out_r, "rb") as f:
        escaped = json.loads(f.read() or b'"died"')
    os.waitpid(pid, 0)
    changes = [(c["kind"], c["name"]) for c in fields["changes"]]
    return {"escaped": escaped, "changes": changes, "errors": fields["errors"]}


def uncover(box):
    """Root in the sandbox unmounts the view of /var/tmp, then writes there."""
    def look():
        linux.umount("/var/tmp", linux.MNT_DETACH)
        return attempt(lambda: os.close(os.open(config["write"], os.O_WRONLY | os.O_CREAT)))
    return inside(box, look)


def names(box):
    """What the sandbox shows of a piece named in bytes, or of a directory it cannot list."""
    def look():
        if "odd" in config:
            return os.path.isdir(config["odd"])
        write = config["inner"] + "/w"
        return [
            os.listdir(config["inner"]),
            attempt(lambda: os.close(os.open(write, os.O_WRONLY | os.O_CREAT))),
        ]
    return {"inside": inside(box, look), "pieces": sorted(box.upper_dirs)}


def fds(box):
    """How many descriptors init and the adopter hold, and whether the pieces are readable."""
    readable = all(os.path.isdir(path) for path in box.upper_dirs.values())
    init = len(os.listdir(f"/proc/{box.init_pid}/fd"))
    return {"pieces": len(box.upper_dirs), "init": init, "held": len(box.held_fds), "ok": readable}


PROBES = {
    "sockets": sockets,
    "roots": roots,
    "fresh": fresh,
    "uncover": uncover,
    "names": names,
    "fds": fds,
}
if config["probe"] == "fresh":
    hostdiff.prime()  # as a supervisor does before it adopts its sandbox (preload)
box = sandbox.adopt(sandbox.build([]))
try:
    out = PROBES[config["probe"]](box)
finally:
    sandbox.end(box)
print(json.dumps(out))
'''


@pytest.fixture
def base() -> Iterator[str]:
    """A directory of the test's own under /var/tmp (every uid of the map may enter it)."""
    path = tempfile.mkdtemp(prefix="kit-splittest-", dir="/var/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _in_sandbox(base: str, config: dict[str, Any], setup: Callable[[], None]) -> Any:
    """:data:`SCRIPT` as root of a user namespace mapping ``0 0 65536``, launched from a
    mount namespace of a child of the test where a tmpfs is mounted in ``base`` (after
    ``setup()``, in that child)."""

    def launch() -> dict[str, Any]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        mounted = os.path.join(base, "mounted")
        os.mkdir(mounted)
        linux.mount("tmpfs", mounted, "tmpfs", linux.MS_NOSUID, "size=64k")
        setup()
        env = f"PYTHONPATH={ROOT}"
        proc = in_userns(65536, ["env", env, sys.executable, "-c", SCRIPT, json.dumps(config)])
        return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-3000:]}

    proc = in_child(launch)
    assert "ok" in proc and proc["ok"]["rc"] == 0, proc
    return json.loads(proc["ok"]["stdout"].splitlines()[-1])


def test_a_hosts_socket_or_fifo_in_the_skeleton_is_not_reachable(base):
    """A socket and a FIFO of the host in a directory of the skeleton: the sandbox has a
    socket and a FIFO there, its own (a read-only bind of the host's would still connect
    and open: the host's /run/docker.sock would be the engine's). A large regular file is
    the host's, bound."""
    sock_path, fifo = os.path.join(base, "sock"), os.path.join(base, "fifo")
    big = os.path.join(base, "big")  # too large to copy: still the host's, bound read-only
    config = {"probe": "sockets", "sock": sock_path, "fifo": fifo, "big": big}
    with open(big, "wb") as f:
        f.write(b"x" * (1 << 20))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = None
    try:
        listener.bind(sock_path)
        listener.listen(8)
        os.mkfifo(fifo, 0o666)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a host writer would succeed
        out = _in_sandbox(base, config, lambda: None)
    finally:
        listener.close()
        if reader is not None:
            os.close(reader)
    assert out == {
        "ok": {
            "connect": os.strerror(111),  # ECONNREFUSED: nobody listens on the sandbox's
            "fifo": os.strerror(6),  # ENXIO: nobody reads the sandbox's
            "kinds": [0o140000, 0o010000],
            "big": 1 << 20,
        }
    }, out


def test_no_process_of_the_kit_joins_a_sandbox_whose_run_left_processes(base):
    """The host diff ends while a process the run left behind lives in the sandbox, and
    the network changed (compared with a fresh sandbox's): no process of the kit appears in
    the sandbox's pid namespace meanwhile (a child forked there to read a fresh network
    namespace had the kit's root, namespaces and descriptors, all under /proc/PID). The
    change is still in the diff: the fresh network was read before the sandbox was
    adopted."""
    out = _in_sandbox(base, {"probe": "fresh"}, lambda: None)
    assert out["escaped"] == [], out
    assert ["address", "lo 10.99.0.1/24"] in out["changes"], out
    assert out["errors"] == {}, out


def test_a_pieces_root_is_the_hosts_directory_and_a_change_of_it_is_in_the_diff(base):
    """A directory with no mount under it, an overlay of its own: its root shows the host
    directory's mode, owner and mtime (not its upper layer's: 0755, root's), and a chmod of
    it in the sandbox is in the host diff."""
    piece = os.path.join(base, "piece")

    def setup() -> None:
        os.mkdir(piece)
        os.chown(piece, 1234, 4321)
        os.chmod(piece, 0o1750)
        os.utime(piece, ns=(10**18, 10**18))

    out = _in_sandbox(base, {"probe": "roots", "piece": piece}, setup)
    assert piece in out["pieces"], out
    assert out["seen"] == {"ok": [0o1750, 1234, 4321, 10**18]}, out
    assert out["changed"] == {"ok": None}, out
    assert out["changes"] == [
        {
            "kind": "file",
            "name": piece,
            "before": "dir 1750 1234:4321",
            "after": "dir 0700 1234:4321",
        }
    ], out


def test_a_writable_mount_under_a_split_view_uncovers_no_host_directory(base):
    """/var, a host mount with a locked one under it, is a copy-on-write view in pieces;
    /var/tmp one on it: unmounting that view in the sandbox uncovers the skeleton's empty
    directory, never the host's /var/tmp (a write there would be the real host's)."""
    written = os.path.join(base, "escaped")

    def setup() -> None:  # in the test's own mount namespace: /var/tmp a mount under /var
        linux.mount("/var", "/var", None, linux.MS_BIND | linux.MS_REC)
        linux.mount("/var/tmp", "/var/tmp", None, linux.MS_BIND | linux.MS_REC)

    out = _in_sandbox(base, {"probe": "uncover", "write": written}, setup)
    assert not os.path.exists(written)
    assert out == {"ok": os.strerror(2)}, out  # ENOENT: the test's directory is not there


def test_a_piece_named_in_bytes_gets_its_overlay(base):
    """A directory whose name is not UTF-8 gets its overlay like any other (its mount point
    goes through init's report as the bytes it is)."""
    odd = os.path.join(base, os.fsdecode(b"piece-\xff"))
    out = _in_sandbox(base, {"probe": "names", "odd": odd}, lambda: os.mkdir(odd))
    assert odd in out["pieces"], out
    assert out["inside"] == {"ok": True}, out


def test_a_directory_root_cannot_list_is_the_hosts_read_only(base):
    """A directory on the way to a mount point that root of the user namespace may enter
    but not list (its owner is not mapped there) is the host's, bound read-only with the
    mount under it."""
    locked = os.path.join(base, "locked")
    inner = os.path.join(locked, "inner")

    def setup() -> None:
        os.mkdir(locked)
        os.mkdir(inner)
        os.chown(locked, 100000, 100000)  # above the map (0 0 65536)
        os.chmod(locked, 0o711)
        linux.mount("tmpfs", inner, "tmpfs", 0, "size=64k")
        with open(os.path.join(inner, "placed"), "w"):
            pass

    out = _in_sandbox(base, {"probe": "names", "inner": inner}, setup)
    assert out["inside"] == {"ok": [["placed"], os.strerror(30)]}, out


@pytest.mark.parametrize("initial", [True, False], ids=["initial", "other"])
def test_a_refused_bind_of_a_shared_directory_is_an_error_in_the_initial_namespace(
    monkeypatch, initial
):
    """Only in a user namespace that is not the initial one may the kernel refuse to clear
    a shared directory's locked flags: the bind is then kept with them. In the initial one
    the refusal is a real failure, raised."""
    from kit.run import sandbox

    def refused(source: str, target: str, flags: int) -> bool:
        raise PermissionError(1, "Operation not permitted")

    remounts: list[tuple[str, int]] = []
    monkeypatch.setattr(sandbox, "_bind", refused)
    monkeypatch.setattr(sandbox, "_remount", lambda target, flags: remounts.append((target, flags)))
    monkeypatch.setattr(linux, "in_initial_user_namespace", lambda: initial)
    table = [linux.Mount(1, "/", linux.MS_NOSUID | linux.MS_RDONLY, "ext4")]
    if initial:
        with pytest.raises(PermissionError):
            sandbox._bind_shared("/srv/shared", "/new/srv/shared", table)
        assert remounts == []
    else:
        sandbox._bind_shared("/srv/shared", "/new/srv/shared", table)
        assert remounts == [("/new/srv/shared", linux.MS_NOSUID)]


def test_init_and_the_supervisor_hold_a_few_descriptors_however_many_pieces(base):
    """A split root of many pieces: one descriptor of the scratch tmpfs holds every upper
    layer, in init and in the process that adopts the sandbox (not one per piece); the
    adopter holds that one, the message queues' root and the witness mount namespace."""

    def setup() -> None:
        for i in range(60):
            os.mkdir(os.path.join(base, f"piece-{i}"))

    out = _in_sandbox(base, {"probe": "fds"}, setup)
    assert out["pieces"] > 60 and out["ok"] is True, out
    assert out["init"] <= 8 and out["held"] <= 3, out


def test_a_file_swapped_after_the_listing_is_not_copied_into_the_skeleton(tmp_path):
    """The skeleton copies a small regular file as listed: if another file (a device, here)
    took its name since, nothing is read from it."""
    from kit.run import sandbox

    listed = tmp_path / "listed"
    listed.write_bytes(b"small\n")
    dst = tmp_path / "copy"
    assert sandbox._copied("/dev/zero", str(dst), os.lstat(listed)) is False
    assert not dst.exists()
    assert sandbox._copied(str(listed), str(dst), os.lstat(listed)) is True
    assert dst.read_bytes() == b"small\n"


class _Listed(list[os.DirEntry[str]]):
    """A directory's listing, read whole: what ``os.scandir`` returns in its place."""

    def __enter__(self) -> Iterator[os.DirEntry[str]]:
        return iter(self)

    def __exit__(self, *exc: object) -> None:
        return None


def _gone_after_listing(monkeypatch: pytest.MonkeyPatch, listed: str, gone: list[str]) -> None:
    """Once ``listed`` is listed (each entry's lstat read, as the skeleton reads it), the
    directories ``gone`` (children first) are removed: the host changed between a listing
    and the use of what it named."""
    real = os.scandir

    def scandir(path: str) -> _Listed:
        with real(path) as entries:
            listing = _Listed(entries)
        if path == listed:
            for entry in listing:
                entry.stat(follow_symlinks=False)
            for directory in gone:
                os.rmdir(directory)
        return listing

    monkeypatch.setattr(os, "scandir", scandir)


def _split_without_mounting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, point: str, mounts: list[str]
) -> tuple[Any, list[str]]:
    """``_Layers._split`` of ``point`` with the mounts only recorded (their targets)."""
    from kit.run import sandbox

    made: list[str] = []
    monkeypatch.setattr(linux, "mount", lambda source, target, *rest: made.append(target))
    scratch, target = tmp_path / "scratch", tmp_path / "target"
    scratch.mkdir()
    target.mkdir()
    layers = sandbox._Layers(str(scratch), [])
    layers._split(point, str(target), mounts, 0)
    return layers, made


@pytest.mark.parametrize("gone", ["piece", "on-the-way"])
def test_a_directory_the_host_removes_after_the_listing_is_not_there(tmp_path, monkeypatch, gone):
    """A directory of the host listed for the skeleton, removed before its use (a busy
    /var/tmp): a piece gets no overlay, a directory on the way to a mount point is not
    listed; each is left as the skeleton's empty directory, and the build goes on."""
    host = tmp_path / "host"
    for name in ("piece", "kept", "way", "way/mount"):
        (host / name).mkdir(parents=True)
    victims = [host / "piece"] if gone == "piece" else [host / "way/mount", host / "way"]
    _gone_after_listing(monkeypatch, str(host), [str(v) for v in victims])
    layers, made = _split_without_mounting(
        monkeypatch, tmp_path, str(host), [str(host / "way/mount")]
    )
    pieces = {str(host), str(host / "kept")} | ({str(host / "piece")} if gone != "piece" else set())
    assert set(layers.uppers) == pieces
    assert len(made) == len(pieces)  # one overlay each, none for what is gone
    skeleton = tmp_path / "scratch/cow/1/skeleton"
    assert sorted(os.listdir(skeleton)) == ["kept", "piece", "way"]
    assert os.listdir(skeleton / "piece") == []
    assert os.listdir(skeleton / "way") == (["mount"] if gone == "piece" else [])


def test_a_piece_the_host_still_has_that_cannot_be_mounted_is_an_error(tmp_path, monkeypatch):
    """Only the host's directory being gone is tolerated: ENOENT from a piece's mount
    while the host still has it is a real failure, raised."""
    host = tmp_path / "host"
    for name in ("piece", "way/mount"):
        (host / name).mkdir(parents=True)

    def mount(source: str | None, target: str, *rest: object) -> None:
        if target.endswith("/piece"):
            raise FileNotFoundError(2, "No such file or directory")

    from kit.run import sandbox

    monkeypatch.setattr(linux, "mount", mount)
    (tmp_path / "scratch").mkdir()
    layers = sandbox._Layers(str(tmp_path / "scratch"), [])
    with pytest.raises(OSError) as raised:
        layers._split(str(host), str(tmp_path), [str(host / "way/mount")], 0)
    assert raised.value.errno == errno.ENOENT
