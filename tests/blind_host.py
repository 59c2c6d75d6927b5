"""Engines of a blind author (SPEC §9, §11): the reference engine with one host bug each."""

# They change "the host" on purpose: run them as root in the real backend (the kit's host
# sandbox takes the change), or inside throwaway namespaces (unshare) for the fake backend,
# which as root runs them on the real host.

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import subprocess
import time

from kit import system
from reference_engines.minimal.engine import ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC

_LIBC = ctypes.CDLL(None, use_errno=True)


class ShmLockEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: files, ...". create_container
    serialises container setup with a lock file in /dev/shm (the host's: the master stays
    in the host's mount namespace in every flow) and never removes it."""

    engine_name = "blind-shm-lock"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        path = f"/dev/shm/blind-host-{self.common.container_id}.lock"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            super().create_container(ctx, pid, rpc_conn)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)  # the bug: the lock file is never unlinked


class TransientHostnameEngine(ReferenceEngine):
    """SPEC §11: "a few things (hostname, mount table: NS-010, NS-011) not even while it
    runs". post_start_process sets the hostname of the master's uts namespace (the host's)
    for a moment, to run a hook that reads it, and puts the old one back at once."""

    engine_name = "blind-transient-hostname"
    rpc_methods = ReferenceRPC

    def post_start_process(self, ctx, pid):  # type: ignore[no-untyped-def]
        sysi = system.current()
        old = sysi.gethostname()
        try:
            sysi.sethostname("blind-transient")
        except PermissionError:
            return  # no privilege in this flow: nothing happens
        try:
            time.sleep(0.001)  # "the hook" that wanted the container's name
        finally:
            sysi.sethostname(old)


class _XattrRPC(ReferenceRPC):
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        # Label the mount point for the container (an SELinux-style relabel) before
        # mounting on it: the engine's root is the host's, so this labels the host's
        # directory.
        try:
            os.setxattr(target, "user.blind.label", b"container_t")
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EACCES, errno.ENOTSUP):
                raise
        super().mount(source, target, fstype, flags, data)


class XattrLabelEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: files, ...". An RPC method
    labels each mount point with an extended attribute; the container's root is the host's,
    so the host's directory keeps the attribute."""

    engine_name = "blind-xattr-label"
    rpc_methods = _XattrRPC


class TableRouteEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... network links, addresses,
    routes ...". create_container (master: the host's network namespace in every flow)
    adds a policy route for the container subnet in routing table 100 and
    cleanup_container never deletes it."""

    engine_name = "blind-table-route"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        super().create_container(ctx, pid, rpc_conn)
        subprocess.run(
            ["ip", "route", "replace", "10.213.0.0/24", "dev", "lo", "table", "100"],
            check=False,
            capture_output=True,
        )


def _mq_create(name: bytes) -> int:
    """mq_open(name, O_CREAT|O_RDWR, 0600, NULL): a descriptor or -errno."""
    _LIBC.mq_open.restype = ctypes.c_int
    fd = _LIBC.mq_open(name, os.O_CREAT | os.O_RDWR, 0o600, None)
    return fd if fd >= 0 else -ctypes.get_errno()


class MqueueChildEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... SysV IPC objects and POSIX
    message queues ...". cleanup_container forks a notifier that posts "container gone" on
    a POSIX message queue in the master's ipc namespace (the host's) and exits; the queue
    stays."""

    engine_name = "blind-mqueue-child"
    rpc_methods = ReferenceRPC

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        child = os.fork()
        if child == 0:
            try:
                _mq_create(b"/blind-host-events")
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        super().cleanup_container(ctx, fatal, status)


class SignalsHostInitEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... processes". Wrong pid
    namespace: post_start_process tells "the container's init" to reopen its logs with
    SIGHUP at pid 1, the pid the container sees, which in the master's pid namespace is the
    host's init."""

    engine_name = "blind-signals-host-init"
    rpc_methods = ReferenceRPC

    def post_start_process(self, ctx, pid):  # type: ignore[no-untyped-def]
        try:
            os.kill(1, signal.SIGHUP)
        except OSError:
            pass


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


class _IoctlLinkRPC(ReferenceRPC):
    def link_up(self, ifname: str = "lo") -> None:
        """Bring a link up with SIOCSIFFLAGS, not through the kit's system interface."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            req = struct.pack("16sH14x", ifname.encode(), 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, req))[1]
            fcntl.ioctl(
                sock, _SIOCSIFFLAGS, struct.pack("16sH14x", ifname.encode(), flags | _IFF_UP)
            )


class IoctlLinkUpEngine(ReferenceEngine):
    """SPEC §9: "A privileged call that bypasses the system interface is refused and
    reported (§11)"; §11: "a privileged system call that an engine makes directly ... is
    refused with EPERM, and the ledger records the call". create_container brings the
    container's loopback up itself, through an RPC method that calls ioctl(SIOCSIFFLAGS)
    instead of kit.system's link_up."""

    engine_name = "blind-ioctl-link-up"
    rpc_methods = _IoctlLinkRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        from kit.rpc import RPCClient

        super().create_container(ctx, pid, rpc_conn)
        RPCClient(rpc_conn, self.common.engine_name).link_up(ifname="lo")


class _ProcHostnameRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        """Set the hostname by writing /proc/sys/kernel/hostname (no sethostname call)."""
        self._need_namespace("uts", "sethostname")
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write(name)


class ProcHostnameEngine(ReferenceEngine):
    """SPEC §9 ("A privileged call that bypasses the system interface is refused and
    reported") and §11 (the hostname): the RPC server sets the container's hostname by
    writing /proc/sys/kernel/hostname instead of calling kit.system's sethostname."""

    engine_name = "blind-proc-hostname"
    rpc_methods = _ProcHostnameRPC


class DaemonEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... processes". post_start_process
    starts a log shipper in a session of its own (the master's pid namespace: the host's)
    that nobody stops."""

    engine_name = "blind-daemon"
    rpc_methods = ReferenceRPC

    def post_start_process(self, ctx, pid):  # type: ignore[no-untyped-def]
        subprocess.Popen(
            ["/bin/sleep", "300"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )


class _ChmodRPC(ReferenceRPC):
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        if target == "/tmp":
            # "the payload's HOME must be enterable": on the host's root file system
            os.chmod("/root", 0o755)
        super().mount(source, target, fstype, flags, data)


class ChmodHomeEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: files, ...". An RPC method
    opens /root (mode) for the payload; the container's root is the host's."""

    engine_name = "blind-chmod-home"
    rpc_methods = _ChmodRPC


class DomainnameEngine(ReferenceEngine):
    """SPEC §11: "... hostname and domainname ...". cleanup_container clears the NIS
    domain name "it set" in the container, but the master is in the host's uts namespace."""

    engine_name = "blind-domainname"
    rpc_methods = ReferenceRPC

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        name = b"kit.local"
        _LIBC.setdomainname(name, len(name))
        super().cleanup_container(ctx, fatal, status)


class TransientMountEngine(ReferenceEngine):
    """SPEC §11: "a few things (hostname, mount table: NS-010, NS-011) not even while it
    runs". create_container stages the container's /tmp in a scratch tmpfs it mounts in the
    master's mount namespace (the host's) and unmounts at once."""

    engine_name = "blind-transient-mount"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        sysi = system.current()
        try:
            sysi.mount("tmpfs", "/mnt", "tmpfs", ["nosuid", "nodev"], "size=64k")
        except PermissionError:
            pass  # no privilege in this flow
        else:
            sysi.umount("/mnt")
        super().create_container(ctx, pid, rpc_conn)
