"""Blind engines that change the host (written from SPEC.md alone, not from the suite).

Each class is ``blind7_host_correct.ScratchHostEngine`` (a small correct engine written
from scratch) with ONE honest mistake that leaves a trace on "the host" (SPEC §11: its
namespaces, its file system, its processes) or puts the container in the wrong namespace
(SPEC §5). The resources are ones a host check can forget: per-network-namespace sysctls,
the NIS domain name, SysV and POSIX IPC objects, an extended attribute, files in
``/dev/shm`` and ``/run``, mounts that arrive by propagation or were made before the
container's mount namespace existed, an address on the host's ``lo``, a named network
namespace, a daemon that outlives the run. A kit that is right fails every one in the
flows its docstring names, and passes ``blind7_host_correct``'s engines.

Loaded as ``blind7_host:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here runs at
import time: every bug starts inside a hook. Every engine acts on host state only inside
the kit's host sandbox: stage 1 checks it (``ScratchConfig.armed``) and the master checks
it again (:func:`blind7_host_correct.inside_kit_sandbox`); outside it each engine behaves
as the correct base does.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from blind7_host_correct import (
    ScratchConfig,
    ScratchHostEngine,
    ScratchHostRPC,
    effective,
    inside_kit_sandbox,
    mq_close,
    mq_create,
    read_sysctl,
    safe_name,
    sandbox_announced,
    sem_create,
    write_sysctl,
)

from kit import system as kit_system
from kit.contract import Context, WaitStatus
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig

#: The longest a leftover daemon of :class:`DaemonKeepsPipe` lives, whatever the kit does.
DAEMON_MAX_LIFE = 30.0


# --- helpers ---------------------------------------------------------------------------------

NETLINK_ROUTE = 0
RTM_NEWADDR = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
RT_SCOPE_HOST = 254


def _rtattr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def add_ipv4_address(ifname: str, address: str, prefix: int, label: str) -> None:
    """``ip addr add ADDRESS/PREFIX dev IFNAME label LABEL`` over rtnetlink, in the calling
    thread's network namespace (needs CAP_NET_ADMIN over it when the socket is opened)."""
    index = socket.if_nametoindex(ifname)
    raw = socket.inet_aton(address)
    body = struct.pack("=BBBBI", socket.AF_INET, prefix, 0, RT_SCOPE_HOST, index)
    body += _rtattr(IFA_LOCAL, raw) + _rtattr(IFA_ADDRESS, raw)
    body += _rtattr(IFA_LABEL, label.encode() + b"\0")
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    header = struct.pack("=IHHII", 16 + len(body), RTM_NEWADDR, flags, 1, 0)
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
    ) as sock:
        sock.bind((0, 0))
        sock.send(header + body)
        reply = sock.recv(65536)
    _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, 16)
        if code:
            raise OSError(
                -code, f"RTM_NEWADDR {address}/{prefix} on {ifname}: {os.strerror(-code)}"
            )


# --- 1. sysctls of the host's network namespace ----------------------------------------------


class MasterSysctls(ScratchHostEngine):
    """Sets the container's net.* sysctls from the master, in the host's network namespace.

    The author moved the sysctls from ``create_container``'s RPC call to
    ``post_start_process`` "so they are set once the container runs", writing
    ``/proc/sys/net/...`` from the master, with CAP_NET_ADMIN raised where it is permitted.
    ``/proc/sys/net`` is the network namespace of the process that opens it: the master is
    in the host's, so ``net.ipv4.ping_group_range`` and
    ``net.ipv4.ip_unprivileged_port_start`` of the host change, and stay changed.

    Breaks SPEC §11: "After a run the host is as it was before: files, mounts (...),
    hostname and domainname, sysctls, network links, ..." (and SPEC §4: "the master shares
    none of pid/net/uts/ipc/cgroup with them"). Shows in root, suid and hybrid (a master
    with host privilege); in userns and fakeroot the write is refused and skipped.
    """

    engine_name = "blind7-host-master-sysctls"
    shows_in = ("root", "suid", "hybrid")

    def sysctls(self, rpc: RPCClient, cfg: ScratchConfig, armed: bool) -> None:
        pass  # moved to post_start_process

    def post_start_process(self, ctx: Context, pid: int) -> None:
        if not self.armed():
            return
        with effective(["CAP_NET_ADMIN"]):
            for key, value in self.cfg().sysctls.items():
                with contextlib.suppress(PermissionError):
                    write_sysctl(key, value)


# --- 2. the host's NIS domain name: no uts namespace without a hostname ----------------------


@dataclass
class OptionalHostnameConfig(ScratchConfig):
    hostname: str = ""


class UtsOnlyWithHostname(ScratchHostEngine):
    """Creates a uts namespace only when a hostname is asked for, yet sets the domainname.

    Like Apptainer's ``--hostname``, the engine adds ``uts`` to ``set_ns_flags`` only when
    its config names a hostname (empty by default here), but its RPC server sets the NIS
    domain name whenever one is configured (``blind7.invalid`` by default). Without a uts
    namespace of its own, the container's uts namespace is the host's: ``setdomainname``
    renames the host's NIS domain, and nothing puts it back.

    Breaks SPEC §5: "Each is either created (a flag) or joined (a path such as
    ``/proc/PID/ns/net``)" — the engine relies on a namespace it neither creates nor
    joins — and SPEC §11: "After a run the host is as it was before: ... hostname and
    domainname". Shows in root and suid (no user
    namespace: the RPC server holds CAP_SYS_ADMIN over the host's uts namespace); in the
    user-namespace flows ``setdomainname`` is refused and skipped.
    """

    engine_name = "blind7-host-uts-only-with-hostname"
    shows_in = ("root", "suid")

    def config(self) -> OptionalHostnameConfig:
        return OptionalHostnameConfig()

    def namespaces(self, sc: StarterConfig) -> list[str]:
        namespaces = super().namespaces(sc)
        if not self.cfg().hostname and inside_kit_sandbox():
            namespaces.remove("uts")
        return namespaces

    def set_names(self, rpc: RPCClient, cfg: ScratchConfig) -> None:
        with contextlib.suppress(PermissionError):  # cosmetic: best effort
            rpc.set_names(hostname=cfg.hostname, domainname=cfg.domainname)


# --- 3. a SysV semaphore set in the host's ipc namespace (fakeroot only) ---------------------


class SemaphoreRPC(ScratchHostRPC):
    def payload_semaphore(self, armed: bool) -> int:
        """A SysV semaphore set for the payload, never removed: "it goes with the container's
        ipc namespace". Returns its id (-1 when not armed)."""
        if not (armed and sandbox_announced()):
            return -1
        return sem_create()


class FakerootWithoutIpc(ScratchHostEngine):
    """The fakeroot flow's namespace list forgets ``ipc``; a SysV semaphore set then leaks.

    The engine keeps one namespace list per flow; the fakeroot one was written as
    ``mount, pid, uts, net`` (``ipc`` missing). Its RPC server makes a SysV semaphore set for
    the payload in every flow and never removes it, counting on the container's ipc
    namespace to take it away. In fakeroot the container shares the host's ipc namespace,
    so the set outlives the run on the host.

    Breaks SPEC §5: "Each is either created (a flag) or joined (a path such as
    ``/proc/PID/ns/net``)" (the container uses the host's ipc namespace in one flow) and
    SPEC §11: "After a run the host is as it was before: ... SysV IPC objects and POSIX
    message queues". Shows in fakeroot only.
    """

    engine_name = "blind7-host-fakeroot-without-ipc"
    rpc_methods: type = SemaphoreRPC
    shows_in = ("fakeroot",)

    def namespaces(self, sc: StarterConfig) -> list[str]:
        if sc.flow == "fakeroot" and inside_kit_sandbox():
            return ["mount", "pid", "uts", "net"]
        return super().namespaces(sc)

    def more(self, rpc: RPCClient, armed: bool) -> None:
        rpc.payload_semaphore(armed=armed)


# --- 4. a POSIX message queue closed, never unlinked -----------------------------------------


class MqueueClosedNotUnlinked(ScratchHostEngine):
    """Closes its POSIX message queue in cleanup but never unlinks it.

    The master opens a POSIX message queue (``mq_open(O_CREAT)``) in ``create_container``
    to pass events between its hook threads, and ``cleanup_container`` closes the
    descriptor, the author believing that a queue goes away with its last descriptor, as a
    pipe does. A named queue lives until ``mq_unlink``; the master is in the host's ipc
    namespace in every flow, so the queue stays on the host.

    Breaks SPEC §11: "After a run the host is as it was before: ... SysV IPC objects and
    POSIX message queues". Shows in all five flows.
    """

    engine_name = "blind7-host-mqueue-closed-not-unlinked"
    shows_in = ("root", "suid", "userns", "fakeroot", "hybrid")

    def __init__(self) -> None:
        self.mqd: int | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        if self.armed():
            self.mqd = mq_create(f"/blind7-events-{safe_name(self.common.container_id)}")

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        if self.mqd is not None:
            with contextlib.suppress(OSError):
                mq_close(self.mqd)
            self.mqd = None


# --- 5. an extended attribute on the host's root directory -----------------------------------

STAMP_XATTR = "trusted.blind7.container"


class StampRPC(ScratchHostRPC):
    def stamp_root(self, container_id: str, armed: bool) -> bool:
        """Mark the container's root file system as in use (``trusted.*``: only
        CAP_SYS_ADMIN of the initial user namespace may). False when it cannot."""
        if not (armed and sandbox_announced()):
            return False
        with effective(["CAP_SYS_ADMIN"]):
            try:
                os.setxattr("/", STAMP_XATTR, container_id.encode())
            except PermissionError:
                return False
        return True


class XattrStampLeft(ScratchHostEngine):
    """Stamps the root directory with a trusted.* xattr and removes it where it cannot.

    The RPC server marks the container's root file system "in use" with a
    ``trusted.blind7.container`` extended attribute; ``cleanup_container`` removes it from
    the master, ignoring errors. The container's root here is the host's ``/``. In the
    setuid flow the RPC server holds CAP_SYS_ADMIN (the stamp is set) but the master has no
    effective capability in cleanup (``removexattr`` fails with EPERM, swallowed): the
    attribute stays on the host's root directory.

    Breaks SPEC §11: "After a run the host is as it was before: files, ..." (a change of a
    file's extended attributes). Shows in suid only (root removes it; in the
    user-namespace flows the stamp is refused).
    """

    engine_name = "blind7-host-xattr-stamp-left"
    rpc_methods: type = StampRPC
    shows_in = ("suid",)

    def more(self, rpc: RPCClient, armed: bool) -> None:
        rpc.stamp_root(container_id=self.common.container_id, armed=armed)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        if self.armed():
            with contextlib.suppress(OSError):
                os.removexattr("/", STAMP_XATTR)


# --- 6. a file in the host's /dev/shm --------------------------------------------------------


class ShmWithoutTmpfs(ScratchHostEngine):
    """Writes its marker to /dev/shm without a tmpfs of its own there.

    The author skipped the private tmpfs on ``/dev/shm`` believing that the container's new
    ipc namespace isolates POSIX shared memory. It does not: ``/dev/shm`` is a file system,
    and the container's mount namespace shares the host's tmpfs there, so the RPC server's
    readiness marker is a file of the host's ``/dev/shm``, and nothing removes it.

    Breaks SPEC §11: "a run changes nothing on the host that outlives it" ("files").
    Shows in all five flows.
    """

    engine_name = "blind7-host-shm-without-tmpfs"
    shows_in = ("root", "suid", "userns", "fakeroot", "hybrid")

    def shm(self, rpc: RPCClient) -> None:
        if not self.armed():
            super().shm(rpc)


# --- 7. a mount propagated into the host's mount namespace -----------------------------------


class RsharedPropagation(ScratchHostEngine):
    """Asks for rshared propagation on the container's /: its tmpfs reaches the host.

    The author wanted mounts made on the host later to show up in the container and chose
    ``set_mount_propagation("rshared")`` (``rslave`` does that; ``rshared`` propagates both
    ways). Where the container's mount namespace belongs to the host's user namespace, its
    ``/dev/shm`` is a peer of the host's: the RPC server's tmpfs on ``/dev/shm`` (and the
    marker in it) is mounted on the host's ``/dev/shm`` too, and stays after the container's
    mount namespace is gone.

    Breaks SPEC §11: "a run changes nothing on the host that outlives it, and a few things
    (hostname, mount table: NS-010, NS-011) not even while it runs" ("mounts (and their
    options and propagation)"). Shows in root and suid; in the user-namespace flows the
    container's copies are slaves and nothing propagates back.
    """

    engine_name = "blind7-host-rshared-propagation"
    shows_in = ("root", "suid")

    def propagation(self, sc: StarterConfig) -> str:
        return "rshared" if inside_kit_sandbox() else "rprivate"


# --- 8. a bind mount made in stage 1, before the container's mount namespace -----------------

STAGING_ROOT = "/run/blind7-staging"


class StagingRPC(ScratchHostRPC):
    def drop_staging(self, path: str) -> bool:
        """Unmount the staging bind "now that the container has it" (in the container's
        mount namespace, the only one this process sees)."""
        if not path.startswith(STAGING_ROOT + "/"):
            return False
        try:
            self.system.umount(path, detach=True)
        except OSError:
            return False
        return True


@dataclass
class StagingConfig(ScratchConfig):
    staging: str = ""


class StageOneBind(ScratchHostEngine):
    """Makes its staging bind mount in prepare_config, before the container's mount ns.

    In the root flow stage 1 runs as root, and the author prepares the container's
    read-only ``/etc`` staging bind there (``/run/blind7-staging/ID``), "so that it is in
    place before the namespaces are made", and has the RPC server unmount it once the
    container's mount namespace has its copy. That unmount happens in the container's
    mount namespace only: the bind made in stage 1 is in the host's mount namespace and
    stays there, with its directory under ``/run``.

    Breaks SPEC §2 rule 2: "prepare_config runs once, in stage 1, before any container
    namespace exists" (§1: it "validates the config and fills the StarterConfig"), and SPEC
    §11: "a run changes nothing on the host that outlives it, and a few things (hostname,
    mount table: NS-010, NS-011) not even while it runs". Shows in root only (the only flow
    whose stage 1 may mount).
    """

    engine_name = "blind7-host-stage-one-bind"
    rpc_methods: type = StagingRPC
    shows_in = ("root",)

    def config(self) -> StagingConfig:
        return StagingConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        cfg = self.common.engine_config
        assert isinstance(cfg, StagingConfig)
        if not (cfg.armed and os.geteuid() == 0):
            return
        target = f"{STAGING_ROOT}/{safe_name(self.common.container_id)}"
        try:
            os.makedirs(target, 0o755, exist_ok=True)
            kit_system.current().mount("/etc", target, None, ["bind"])
            kit_system.current().mount(None, target, None, ["remount", "bind", "ro"])
        except OSError:
            return
        cfg.staging = target

    def more(self, rpc: RPCClient, armed: bool) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, StagingConfig)
        if cfg.staging:
            rpc.drop_staging(path=cfg.staging)


# --- 9. an address on the host's loopback interface ------------------------------------------


class HostLoAlias(ScratchHostEngine):
    """Adds the container's loopback alias from the master: it lands on the host's lo.

    The engine gives the container's ``lo`` a service alias (``127.0.0.77/8``, label
    ``lo:b7``) with its own rtnetlink socket, opened in ``create_container``, in the master,
    rather than through its RPC server. The master is in the host's network namespace:
    the host's ``lo`` gets the address, and nothing removes it (the author counts on the
    container's network namespace going away).

    Breaks SPEC §11: "After a run the host is as it was before: ... network links,
    addresses and routes" (and SPEC §4: "the master shares none of pid/net/uts/ipc/cgroup
    with them"). Shows in root, suid and hybrid (a master that may raise CAP_NET_ADMIN in
    the host's user namespace); in userns and fakeroot the netlink request is refused and
    skipped.
    """

    engine_name = "blind7-host-lo-alias"
    shows_in = ("root", "suid", "hybrid")

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        if not self.armed():
            return
        with effective(["CAP_NET_ADMIN"]), contextlib.suppress(PermissionError):
            add_ipv4_address("lo", "127.0.0.77", 8, "lo:b7")


# --- 10. a named network namespace, unlinked but not unmounted -------------------------------

NETNS_DIR = "/run/netns"


class NamedNetnsLeft(ScratchHostEngine):
    """Names the container's network namespace under /run/netns; cleanup forgets umount.

    For ``ip netns exec`` debugging the master binds ``/proc/PID/ns/net`` of the container
    onto ``/run/netns/blind7-ID`` (as ``ip netns attach`` does). ``cleanup_container``
    only unlinks the file, ignoring errors: unlinking a mount point of one's own mount
    namespace fails with EBUSY, so the mount, the file, ``/run/netns`` and the container's
    network namespace itself all outlive the run.

    Breaks SPEC §11: "After a run the host is as it was before: ... named network
    namespaces" (and "a few things (hostname, mount table: NS-010, NS-011) not even while
    it runs"). Shows in root, suid and hybrid (a master with host privilege to raise).
    """

    engine_name = "blind7-host-named-netns-left"
    shows_in = ("root", "suid", "hybrid")

    def __init__(self) -> None:
        self.netns_file: str | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        if not self.armed():
            return
        target = f"{NETNS_DIR}/blind7-{safe_name(self.common.container_id)}"
        caps = ["CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_SYS_PTRACE"]
        with effective(caps):
            try:
                os.makedirs(NETNS_DIR, 0o755, exist_ok=True)
                os.close(os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))
            except OSError:
                return
            self.netns_file = target
            try:
                kit_system.current().mount(f"/proc/{pid}/ns/net", target, None, ["bind"])
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(target)
                self.netns_file = None

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        if self.netns_file is None:
            return
        with effective(["CAP_DAC_OVERRIDE"]), contextlib.suppress(OSError):
            os.unlink(self.netns_file)  # EBUSY: still mounted
        self.netns_file = None


# --- 11. a daemon that keeps its own pipe's write end ----------------------------------------


def _daemon(read_fd: int, write_fd: int) -> None:
    """The helper's body (in the grandchild): detach, then live until EOF on ``read_fd``.
    Bounded by :data:`DAEMON_MAX_LIFE` whatever happens."""
    os.setsid()
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    keep = sorted({0, 1, 2, read_fd, write_fd})  # the bug: write_fd kept too
    for low, high in zip(keep, [*keep[1:], 1 << 20], strict=True):
        if high > low + 1:
            os.closerange(low + 1, high)
    os.chdir("/")
    deadline = time.monotonic() + DAEMON_MAX_LIFE
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([read_fd], [], [], min(left, 1.0))
        if ready and not os.read(read_fd, 512):
            break


class DaemonKeepsPipe(ScratchHostEngine):
    """Starts a daemon that should exit with the container, but it holds its own pipe open.

    In ``create_container`` the master double-forks a detached helper (a log shipper) that
    is to exit when it reads EOF on a pipe; the master keeps the write end and closes it in
    ``cleanup_container``. The helper, daemonizing, closes every descriptor but stdio and
    "the pipe", both ends of it: it holds a write end itself, never sees EOF, and lives on
    in the host's pid namespace (it was never in the container's: the master forked it).

    Breaks SPEC §11: "After a run the host is as it was before: ... processes" ("a run
    changes nothing on the host that outlives it"). Shows in all five flows. (The helper
    exits on its own after 30 s whatever the kit does.)
    """

    engine_name = "blind7-host-daemon-keeps-pipe"
    shows_in = ("root", "suid", "userns", "fakeroot", "hybrid")

    def __init__(self) -> None:
        self.pipe_w: int | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        if not self.armed():
            return
        read_fd, write_fd = os.pipe()
        child = os.fork()
        if child == 0:
            code = 0
            try:
                if os.fork() == 0:
                    _daemon(read_fd, write_fd)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(read_fd)
        os.waitpid(child, 0)
        self.pipe_w = write_fd

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        if self.pipe_w is not None:
            os.close(self.pipe_w)
            self.pipe_w = None


# --- 12. the RPC server left in the host's network namespace ---------------------------------


class HostCheckRPC(ScratchHostRPC):
    def host_forwarding(self, master_pid: int, armed: bool) -> str:
        """Read ``net.ipv4.ip_forward`` of the host's network namespace (the master's):
        enter it, read, and go back... to ``/proc/self/ns/net``, which by then names the
        namespace just entered. "" when it cannot enter."""
        if not (armed and sandbox_announced()):
            return ""
        try:
            self.system.setns("net", f"/proc/{master_pid}/ns/net")
        except OSError:
            return ""
        try:
            return read_sysctl("net.ipv4.ip_forward")
        finally:
            self.system.setns("net", "/proc/self/ns/net")  # the bug: self is now the host's


class NetnsLeftAfterHostCheck(ScratchHostEngine):
    """Its RPC server enters the host's net namespace and "returns" via /proc/self/ns/net.

    Before enabling forwarding in the container (``net.ipv4.ip_forward=1``) the engine
    checks the host's setting: its RPC server ``setns``es into the master's network
    namespace, reads the sysctl, and goes back with ``setns`` on ``/proc/self/ns/net``,
    which at that point is the namespace it just entered. The RPC server stays in the
    host's network namespace, no longer the one stage 2 gets, and its next method turns on
    forwarding of the host.

    Breaks SPEC §5: "Each is either created (a flag) or joined (a path such as
    ``/proc/PID/ns/net``)" (the RPC server leaves the network namespace the StarterConfig
    asked for; SPEC §4: "stage 2 and the RPC server share all seven namespace inodes") and
    SPEC §11: "After a run the host is as it
    was before: ... sysctls". Shows in root only (elsewhere the RPC server may not enter
    the host's network namespace and skips the check).
    """

    engine_name = "blind7-host-netns-left-after-check"
    rpc_methods: type = HostCheckRPC
    shows_in = ("root",)

    def config(self) -> ScratchConfig:
        return ScratchConfig(sysctls={"net.ipv4.ip_forward": "1"})

    def sysctls(self, rpc: RPCClient, cfg: ScratchConfig, armed: bool) -> None:
        rpc.host_forwarding(master_pid=os.getpid(), armed=armed)
        super().sysctls(rpc, cfg, armed)


__all__ = [
    "DaemonKeepsPipe",
    "FakerootWithoutIpc",
    "HostLoAlias",
    "MasterSysctls",
    "MqueueClosedNotUnlinked",
    "NamedNetnsLeft",
    "NetnsLeftAfterHostCheck",
    "RsharedPropagation",
    "ShmWithoutTmpfs",
    "StageOneBind",
    "UtsOnlyWithHostname",
    "XattrStampLeft",
]
