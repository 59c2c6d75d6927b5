"""Mutants that change the host and leave it changed (SPEC §11), one per kind of object the
host diff compares: a file under /etc (one labelled by an extended attribute, one in the
tmpfs /dev/shm), a mount (one undone at once), the domainname, a sysctl (and two of the ipc
namespace, through a proc of the run's own), a network link, a
named network namespace, a SysV shared memory segment, a daemon.

They run only inside the kit's own host sandbox (``kit.run.sandbox``: an overlay root and new
uts, net, ipc namespaces), where their damage is thrown away with the sandbox; anywhere else
(the real host, the fake backend) they refuse.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import subprocess
import threading

from kit.contract import Context, SignalChannel, WaitStatus
from kit.run import sandbox
from kit.system import linux
from mutants.zoo.base import HostDamageRefused, Mutant


def in_kit_sandbox() -> bool:
    """True when this process's mount and uts namespaces are a kit host sandbox's (the sandbox
    records their inodes in its processes' environment)."""
    try:
        here = ":".join(str(os.stat(f"/proc/self/ns/{kind}").st_ino) for kind in ("mnt", "uts"))
    except OSError:
        return False
    return os.environ.get(sandbox.SANDBOX_ENV) == here


def refuse_outside_kit_sandbox(slug: str) -> None:
    if not in_kit_sandbox():
        raise HostDamageRefused(
            f"mutant-{slug} changes the host and leaves it changed: it runs "
            "only in the kit's host sandbox (real backend, as root)"
        )


class HostMutant(Mutant):
    """create_container (master, in the host's namespaces) does :meth:`damage`, never undone."""

    def damage(self) -> None:
        raise NotImplementedError

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        refuse_outside_kit_sandbox(self.slug)
        self.damage()
        super().create_container(ctx, pid, rpc_conn)


class FileUnderEtc(HostMutant):
    slug = "host-file-etc"
    bug = "create_container writes a state file under the host's /etc and never removes it"
    killed_by = ("HOST-001",)

    def damage(self) -> None:
        with open("/etc/kit-mutant-state", "w") as f:
            f.write("container state\n")


class HostSymlinkGivenAway(HostMutant):
    slug = "host-symlink-given-away"
    bug = (
        "create_container hands the container's user the host's /etc/localtime (to let it "
        "set its own time zone) with lchown: the link's owner changes, not its target"
    )
    killed_by = ("HOST-001",)
    mechanism = "other-field"

    def damage(self) -> None:
        # The first of these links the host has (each Debian and Ubuntu host has one).
        links = ("/etc/localtime", "/etc/os-release", "/etc/mtab")
        os.lchown(next(p for p in links if os.path.islink(p)), 65534, 65534)


class HostSysctl(HostMutant):
    slug = "host-sysctl"
    bug = "create_container turns on net.ipv4.ip_forward in the host's network namespace"
    killed_by = ("HOST-004",)

    def damage(self) -> None:
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1\n")


class HostIpcSysctlFreshProc(HostMutant):
    slug = "host-ipc-sysctl-fresh-proc"
    bug = (
        "create_container raises kernel.msgmnb for the container through a proc it mounts "
        "in a private mount namespace of a child: the child is still in the host's ipc "
        "namespace, whose limit it changes"
    )
    killed_by = ("HOST-004",)
    flows = ("root",)  # /proc/sys is global root's to write
    mechanism = "child-process"

    def damage(self) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                linux.unshare(linux.CLONE_NEWNS)
                linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
                linux.mount("proc", "/mnt", "proc", 0)
                with open("/mnt/sys/kernel/msgmnb", "r+") as f:
                    doubled = str(int(f.read()) * 2)
                    f.seek(0)  # a write past the start of a sysctl is ignored
                    f.write(doubled)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status:
            raise OSError(f"the child writing kernel.msgmnb ended with status {status}")


class HostIpcSysctlContainerProc(HostMutant):
    slug = "host-ipc-sysctl-container-proc"
    bug = (
        "post_start_process sets fs.mqueue.msg_max through the container's /proc from the "
        "master: a sysctl file shows the namespace of whoever opens it, the host's here"
    )
    killed_by = ("HOST-004",)
    flows = ("root",)  # /proc/sys is global root's to write

    def damage(self) -> None:
        pass  # later, once the container's /proc is mounted

    def post_start_process(self, ctx: Context, pid: int) -> None:
        refuse_outside_kit_sandbox(self.slug)
        with open(f"/proc/{pid}/root/proc/sys/fs/mqueue/msg_max", "w") as f:
            f.write("42\n")
        super().post_start_process(ctx, pid)


class HostInitLimitLowered(HostMutant):
    slug = "host-init-limit-lowered"
    bug = (
        "create_container lowers the core file limit of 'the container's init' with "
        "prlimit(1, …), from the master: pid 1 there is the host's init"
    )
    killed_by = ("HOST-008",)
    flows = ("root",)  # the master is root as init is: allowed without CAP_SYS_RESOURCE

    def damage(self) -> None:
        resource.prlimit(1, resource.RLIMIT_CORE, (0, 0))


class HostInitOomAdjusted(HostMutant):
    slug = "host-init-oom-adjusted"
    bug = (
        "create_container's helper process makes 'the container's init' the OOM killer's "
        "first choice through /proc/1/oom_score_adj: the host's init, seen from the master"
    )
    killed_by = ("HOST-008",)
    flows = ("root",)
    mechanism = "child-process"

    def damage(self) -> None:
        subprocess.run(
            ["sh", "-c", "echo 1000 > /proc/1/oom_score_adj"],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )


class HostDomainname(HostMutant):
    slug = "host-domainname"
    bug = "create_container sets the domainname in the master, in the host's uts namespace"
    killed_by = ("HOST-003", "HOST-009")

    def damage(self) -> None:
        name = b"mutant.example"
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setdomainname(name, len(name)) < 0:
            raise OSError(ctypes.get_errno(), "setdomainname")


class HostLink(HostMutant):
    slug = "host-link"
    bug = "create_container adds a bridge to the host's network namespace and leaves it there"
    killed_by = ("HOST-005",)
    mechanism = "child-process"

    def damage(self) -> None:
        subprocess.run(
            ["ip", "link", "add", "kit-mutant0", "type", "bridge"],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )


class HostMountLeft(HostMutant):
    slug = "host-mount-left"
    bug = "create_container mounts a tmpfs on the host's /mnt from the master and leaves it"
    killed_by = ("HOST-002", "HOST-009")

    def damage(self) -> None:
        from kit.system import current

        current().mount("tmpfs", "/mnt", "tmpfs", ["nosuid", "nodev"], "size=64k")


class HostMountUndone(HostMutant):
    slug = "host-mount-undone"
    bug = (
        "create_container stages files in a scratch tmpfs it mounts on the host's /mnt from "
        "the master and unmounts at once, before the watch looks again"
    )
    killed_by = ("HOST-009", "NS-011")

    def damage(self) -> None:
        from kit.system import current

        current().mount("tmpfs", "/mnt", "tmpfs", ["nosuid", "nodev"], "size=64k")
        current().umount("/mnt")


class HostNamedNetns(HostMutant):
    slug = "host-named-netns"
    bug = "create_container creates a named network namespace on the host (ip netns add)"
    killed_by = ("HOST-006", "HOST-002", "HOST-009")
    mechanism = "child-process"

    def damage(self) -> None:
        subprocess.run(
            ["ip", "netns", "add", "kit-mutant"],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )


class HostSharedMemory(HostMutant):
    slug = "host-sysv-shm"
    bug = "create_container creates a SysV shared memory segment on the host and never removes it"
    killed_by = ("HOST-007",)

    def damage(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.shmget(0x6B6D7574, 4096, 0o1600) < 0:  # IPC_CREAT | 0600
            raise OSError(ctypes.get_errno(), "shmget")


class HostDaemon(HostMutant):
    slug = "host-daemon"
    bug = "create_container starts a helper daemon on the host that outlives the run"
    killed_by = ("HOST-008", "CLEAN-001")
    mechanism = "child-process"

    def damage(self) -> None:
        subprocess.Popen(
            ["setsid", "sleep", "3600"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


class HostFileXattr(HostMutant):
    slug = "host-file-xattr"
    bug = (
        "create_container labels the host's /tmp with an extended attribute (a relabel of "
        "the container's root, which is the host's) and leaves it"
    )
    killed_by = ("HOST-001",)
    mechanism = "other-field"

    def damage(self) -> None:
        os.setxattr("/tmp", "user.kit-mutant.label", b"container_t")


class HostDevShmLock(HostMutant):
    slug = "host-dev-shm-lock"
    bug = (
        "create_container has a child take a lock file in the host's /dev/shm (a tmpfs, no "
        "copy-on-write layer) and never removes it"
    )
    killed_by = ("HOST-001",)
    flows = ("root", "userns")
    mechanism = "child-process"

    def damage(self) -> None:
        subprocess.run(
            ["sh", "-c", "exec 9>/dev/shm/kit-mutant.lock && flock 9"],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )


_LIBC = ctypes.CDLL(None, use_errno=True)


class HostHostnameFlippedInAThread(Mutant):
    slug = "host-hostname-flipped-in-a-thread"
    bug = (
        "monitor_container has a helper thread give the host's uts namespace the container's "
        "hostname (libc sethostname) and put the old one back at once"
    )
    killed_by = ("HOST-009", "NS-010")
    mechanism = "helper-thread"

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        refuse_outside_kit_sandbox(self.slug)
        name = (self.reference_config().hostname or "kit-mutant").encode()

        def flip() -> None:
            old = socket.gethostname().encode()
            if _LIBC.sethostname(name, len(name)) < 0:
                raise OSError(ctypes.get_errno(), "sethostname")
            _LIBC.sethostname(old, len(old))

        helper = threading.Thread(target=flip, name="kit-mutant-flip")
        helper.start()
        helper.join()
        return super().monitor_container(pid, signals)


class HostDomainnameFlippedInAChild(Mutant):
    slug = "host-domainname-flipped-in-a-child"
    bug = (
        "cleanup_container forks a child that sets the host's domainname and puts the old "
        "one back before it exits"
    )
    killed_by = ("HOST-009",)
    mechanism = "child-process"

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        refuse_outside_kit_sandbox(self.slug)
        child = os.fork()
        if child == 0:
            code = 1
            try:
                with open("/proc/sys/kernel/domainname", "rb") as f:
                    old = f.read().rstrip(b"\n")
                new = b"mutant.example"
                if _LIBC.setdomainname(new, len(new)) == 0:
                    code = 0 if _LIBC.setdomainname(old, len(old)) == 0 else 2
            finally:
                os._exit(code)
        _, raw = os.waitpid(child, 0)
        if os.waitstatus_to_exitcode(raw) != 0:
            raise OSError("the child could not set the domainname")
        super().cleanup_container(ctx, fatal, status)


class HostInitSignalled(Mutant):
    slug = "host-init-signalled"
    bug = (
        "post_start_process sends SIGWINCH to pid 1, meaning the container's init: from the "
        "master that is the host's (ignored, so nothing shows)"
    )
    killed_by = ("HOST-008",)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        refuse_outside_kit_sandbox(self.slug)
        os.kill(1, signal.SIGWINCH)


class HostInitSignalledByPidfd(Mutant):
    slug = "host-init-signalled-by-pidfd"
    bug = (
        "cleanup_container nudges pid 1 with SIGCHLD through a pidfd, to have init reap "
        "what the engine orphaned: the host's init"
    )
    killed_by = ("HOST-008",)
    mechanism = "other-hook"

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        refuse_outside_kit_sandbox(self.slug)
        pidfd = os.pidfd_open(1)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGCHLD)
        finally:
            os.close(pidfd)
        super().cleanup_container(ctx, fatal, status)


MUTANTS = (
    FileUnderEtc,
    HostFileXattr,
    HostSymlinkGivenAway,
    HostDevShmLock,
    HostMountLeft,
    HostMountUndone,
    HostDomainname,
    HostSysctl,
    HostIpcSysctlFreshProc,
    HostIpcSysctlContainerProc,
    HostLink,
    HostNamedNetns,
    HostSharedMemory,
    HostDaemon,
    HostInitLimitLowered,
    HostInitOomAdjusted,
    HostHostnameFlippedInAThread,
    HostDomainnameFlippedInAChild,
    HostInitSignalled,
    HostInitSignalledByPidfd,
)
