"""The host sandbox built in pieces (kit/run/sandbox.py ``_Layers._split``), launched as root
of a user namespace: what the skeleton holds, and what the run's processes can reach.

Each test makes its host objects in a directory of its own under /var/tmp, with a tmpfs
mounted in it in a mount namespace of a child of the test (so the directory is on the way
to a mount point: in the skeleton), builds a sandbox from inside a new user namespace and
looks at it from a process of the sandbox.
"""

from __future__ import annotations

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
    changes = [c.to_json() for c in hostdiff.diff(before, after) if c.kind == "file"]
    return {"seen": seen, "changed": changed, "changes": changes, "pieces": sorted(box.upper_dirs)}


PROBES = {"sockets": sockets, "roots": roots}
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
