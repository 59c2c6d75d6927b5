"""Correct engines of the fourth blind round (namespaces and identity), loaded as
``blind4_ns_correct:NAME`` (``tests/`` on ``PYTHONPATH``): shapes SPEC.md allows that the
reference does not take; any failure is a false failure of a check (or a disputed reading,
said in the docstring)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

from kit import system
from kit.system import linux
from reference_engines.bind_rootfs.engine import BindRootfsEngine
from reference_engines.bind_rootfs.rpc import BindRootfsRPC
from reference_engines.minimal.engine import ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC, check_path, refuse

SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")


@contextlib.contextmanager
def _raised(*names: str) -> Iterator[None]:
    """Raise ``names`` from the calling thread's permitted set into its effective set for
    the block when they are not effective already, and put the three sets back after."""
    eff, perm, inh = linux.capget()
    want = linux.caps_to_mask(names) & perm & ~eff
    if want:
        linux.capset(eff | want, perm, inh)
    try:
        yield
    finally:
        if want:
            linux.capset(eff, perm, inh)


class _ChrootRPC(BindRootfsRPC):
    def pivot_root(self, new_root: str) -> None:
        """Enter the container root made by make_root with chroot(2): the container
        process shares this process's root (CLONE_FS), so it is the payload's root too."""
        what = "pivot_root"
        check_path(new_root, what)
        self._need_namespace("mount", what)
        if self.pivoted:
            raise refuse(f"{what}: already done")
        if self.root is None or new_root != self.root:
            raise refuse(
                f"{what}: {new_root!r} is not the container root made by make_root ({self.root!r})"
            )
        self.system.chdir(new_root)
        with _raised("CAP_SYS_CHROOT"):  # suid, hybrid: permitted, not effective; restored
            self.system.chroot(".")
        self.system.chdir("/")
        self.root = "/"
        self.pivoted = True


class ChrootRootEngine(BindRootfsEngine):
    """The bind-rootfs example entered with chroot in the RPC server, shared by CLONE_FS.

    SPEC §2: the container side "forks RPC server sharing its root/cwd (CLONE_FS)"; §4:
    "stage 2 and the RPC server share all seven namespace inodes and their root directory";
    §9: the kit offers "pivot_root/chroot". Like Apptainer where pivot_root is not possible,
    the RPC server builds the root as the bind-rootfs example does and enters it with
    chroot(2) (raising CAP_SYS_CHROOT on its own thread in the setuid flows and restoring the
    sets) instead of pivot_root(2). chroot changes the root of the fs_struct the RPC server
    shares with the container process, so stage 2 starts in the same root as the RPC server
    ends in, and the payload runs there. The host's root stays mounted, out of sight, in the
    container's mount namespace; no SPEC sentence asks for it to be detached. Legal."""

    engine_name = "blind4-ns-ok-chroot-root"
    rpc_methods = _ChrootRPC


def _link_flags(sock: socket.socket, ifname: str) -> int:
    raw = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, _IFREQ.pack(ifname.encode(), 0))
    return int(_IFREQ.unpack(raw)[1])


def _socket_in_netns(pid: int) -> socket.socket | None:
    """A datagram socket made in process ``pid``'s network namespace by a short-lived child
    of this process, handed back over a socketpair (SCM_RIGHTS); the child raises what it
    needs in its own credentials (the setuid master's permitted set) and is reaped here.
    None when the child could not."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        code = 1
        try:
            ours.close()
            eff, perm, inh = linux.capget()
            want = linux.caps_to_mask(["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]) & perm
            if want & ~eff:
                linux.capset(eff | want, perm, inh)  # this child only
            system.current().setns("net", linux.ns_path("net", pid))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                socket.send_fds(theirs, [b"s"], [sock.fileno()])
            code = 0
        except BaseException:
            pass  # the parent gets no descriptor: that says it
        finally:
            os._exit(code)
    theirs.close()
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
    except OSError:
        fds = []
    finally:
        ours.close()
        os.waitpid(child, 0)
    return socket.socket(fileno=fds[0]) if fds else None


class LoopbackCheckChildEngine(ReferenceEngine):
    """The master checks the container's lo through a socket a helper child made in its netns.

    SPEC §4: "the master shares none of pid/net/uts/ipc/cgroup with them", a rule for "every
    thread of the process, threads the engine started included"; §11: a run leaves no
    process behind. create_container wants to know that the starter brought the container's
    lo up. Its threads never setns: a forked child joins the container's network namespace,
    makes a socket there, passes it back over SCM_RIGHTS and exits; create_container reaps
    it by pid and reads lo's flags through the socket (a socket stays bound to the
    namespace it was made in), then closes it. The child is not the master process, lives
    only inside create_container, and raises CAP_SYS_ADMIN in its own credentials only (the
    setuid flows). Legal."""

    engine_name = "blind4-ns-ok-loopback-check-child"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        self.loopback_up: bool | None = None
        if "net" not in self.common.engine_config.namespaces:
            return
        sock = _socket_in_netns(pid)
        if sock is None:
            return
        with sock:
            try:
                self.loopback_up = bool(_link_flags(sock, "lo") & IFF_UP)
            except OSError:
                self.loopback_up = None


class MountViewThreadEngine(ReferenceEngine):
    """A master thread joins the container's mount namespace for the run (mount is not listed).

    SPEC §4: "the master shares none of pid/net/uts/ipc/cgroup with them" -- mount and user
    are not in that list (§5 even has set_master_propagate_mount) -- and "Every rule of this
    table holds for every thread". create_container starts a thread that unshares its
    fs_struct and setns'es into the container's mount namespace, to see the container's
    files as the payload does (here: it checks that the container's /tmp is a mount of its
    own); it stays there until cleanup_container stops and joins it. Its credentials are the
    master's, its other namespaces the master's; nothing changes on the host. Where the master holds
    CAP_SYS_ADMIN and CAP_SYS_CHROOT effective already (root; the container's user namespace
    in userns and fakeroot) -- not in the setuid flows, which would have to raise them on a
    thread while other hooks run. Real backend only. Legal."""

    engine_name = "blind4-ns-ok-mount-view-thread"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        super().__init__()
        self._stop = threading.Event()
        self._viewer: threading.Thread | None = None
        self.tmp_mounted: bool | None = None

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        if system.current().name != "real" or "mount" not in self.common.engine_config.namespaces:
            return
        needed = linux.caps_to_mask(["CAP_SYS_ADMIN", "CAP_SYS_CHROOT"])
        if linux.capget()[0] & needed != needed:
            return  # the setuid flows: not without raising capabilities
        ready = threading.Event()
        self._viewer = threading.Thread(
            target=self._view, args=(pid, ready), name="blind4-mount-view", daemon=True
        )
        self._viewer.start()
        ready.wait(5)

    def _view(self, pid: int, ready: threading.Event) -> None:
        try:
            linux.unshare(linux.CLONE_FS)  # setns to a mount namespace needs its own fs
            system.current().setns("mount", linux.ns_path("mount", pid))
            # Paths now resolve in the container's mount namespace (its /proc too, which
            # does not show this thread): /tmp is the container's own mount.
            self.tmp_mounted = os.path.ismount("/tmp")
        except OSError:
            return
        finally:
            ready.set()
        self._stop.wait()

    def cleanup_container(self, ctx: Any, fatal: Any, status: Any) -> None:
        self._stop.set()
        if self._viewer is not None:
            self._viewer.join(5)
            self._viewer = None
        super().cleanup_container(ctx, fatal, status)
