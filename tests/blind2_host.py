"""Blind engines, round 2 (SPEC §7, §8, §11): the reference engine with one host bug each."""

# They change "the host" on purpose: run them only as root in the real backend, whose host
# sandbox takes the change (never in the fake backend outside a throwaway unshare).
#
# Measured (all five flows, real backend, as root): the suite of commit 796e56d caught 12
# of the 16; the hostname flipped by a thread, the domainname flipped by a child, SIGWINCH
# and SIGCHLD to pid 1 escaped (as did blind_host.SignalsHostInitEngine). With the real
# filter's watched calls (kit.run.seccomp.HOST_WATCH) all 16 are caught: HOST-009 (NS-010
# for the hostname) and HOST-008.

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time

from kit.contract import Context, SignalChannel, WaitStatus
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig
from reference_engines.minimal.engine import ReferenceConfig, ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC

_LIBC = ctypes.CDLL(None, use_errno=True)
_MS_REMOUNT = 0x20
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_PRIVATE = 1 << 18
_IPC_PRIVATE = 0
_IPC_CREAT = 0o1000


def _libc_call(name: str, *args: object) -> int:
    """Call libc ``name``; 0 or more on success, else -errno (the author checks nothing)."""
    result = int(getattr(_LIBC, name)(*args))
    return result if result >= 0 else -ctypes.get_errno()


def _cfg(engine: ReferenceEngine) -> ReferenceConfig:
    cfg = engine.common.engine_config
    assert isinstance(cfg, ReferenceConfig)
    return cfg


class TransientHostnameThreadEngine(ReferenceEngine):
    """SPEC §11: "a run changes nothing on the host that outlives it, and a few things
    (hostname, mount table: NS-010, NS-011) not even while it runs". monitor_container
    starts a helper thread that gives the master's uts namespace (the host's) the
    container's name for the blink of an eye, by libc's sethostname, so that a "name
    announcement" it runs reads the right name, then puts the old name back."""

    engine_name = "blind2-transient-hostname-thread"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        name = (_cfg(self).hostname or "container").encode()

        def announce() -> None:
            old = socket.gethostname().encode()
            if _libc_call("sethostname", name, len(name)) < 0:
                return  # no privilege in this flow
            _libc_call("sethostname", old, len(old))

        threading.Thread(target=announce, name="announce", daemon=True).start()
        return super().monitor_container(pid, signals)


class TransientDomainnameChildEngine(ReferenceEngine):
    """SPEC §11: "... hostname and domainname ..." of the host, and the hostname "not even
    while it runs". cleanup_container forks a child that sets the NIS domain name of the
    master's uts namespace (the host's) for its "teardown notification", then restores the
    old one before exiting."""

    engine_name = "blind2-transient-domainname-child"
    rpc_methods = ReferenceRPC

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        child = os.fork()
        if child == 0:
            try:
                with open("/proc/sys/kernel/domainname") as f:
                    old = f.read().strip()
                new = b"kit.container"
                if _libc_call("setdomainname", new, len(new)) == 0:
                    _libc_call("setdomainname", old.encode(), len(old.encode()))
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        super().cleanup_container(ctx, fatal, status)


class DevShmPrivateEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... mounts (and their options
    and propagation)". A helper thread of create_container makes /dev/shm a private mount,
    "so that nothing the container mounts there reaches the host", with libc's
    mount(MS_PRIVATE), from the master: that is the host's /dev/shm, and nothing sets it
    back."""

    engine_name = "blind2-devshm-private"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        def share() -> None:
            _libc_call("mount", None, b"/dev/shm", None, ctypes.c_ulong(_MS_PRIVATE), None)

        helper = threading.Thread(target=share, name="private-shm")
        helper.start()
        helper.join()
        super().create_container(ctx, pid, rpc_conn)


class RemountDevShmEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... mounts (and their options
    and propagation)". create_container "hardens the container's /dev/shm" by remounting
    it nosuid,nodev,noexec, from the master (the host's mount namespace), and never
    remounts it back."""

    engine_name = "blind2-remount-devshm"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        flags = _MS_REMOUNT | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        _libc_call("mount", None, b"/dev/shm", None, ctypes.c_ulong(flags), None)
        super().create_container(ctx, pid, rpc_conn)


class _ScratchRPC(ReferenceRPC):
    def scratch(self, target: str) -> bool:
        """Make ``target`` (a new directory) and mount a small tmpfs on it."""
        try:
            os.mkdir(target, 0o755)
        except PermissionError:
            return False  # no privilege over the host's directory in this flow
        self.system.mount("tmpfs", target, "tmpfs", ["nosuid", "nodev"], "size=64k")
        return True


class RemovedirsEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: files, ...". The RPC server makes
    a scratch directory /srv/blind2-<id> (on the container's root, the host's) and mounts a
    tmpfs there; cleanup_container removes it with os.removedirs, which also removes every
    parent that became empty: the host's /srv."""

    engine_name = "blind2-removedirs"
    rpc_methods = _ScratchRPC

    def _scratch(self) -> str:
        return f"/srv/blind2-{self.common.container_id}"

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        RPCClient(rpc_conn, self.common.engine_name).scratch(target=self._scratch())

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        try:
            os.removedirs(self._scratch())  # the mount died with the container's namespace
        except OSError:
            pass
        super().cleanup_container(ctx, fatal, status)


class RunPidDirEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: files, ...". create_container
    writes the container's pid to /run/blind2-engine/<id>.pid (the host's /run) and
    cleanup_container removes the pid file but not the directory it made."""

    engine_name = "blind2-run-pid-dir"
    rpc_methods = ReferenceRPC

    def _pidfile(self) -> str:
        return f"/run/blind2-engine/{self.common.container_id}.pid"

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        try:
            os.makedirs(os.path.dirname(self._pidfile()), exist_ok=True)
            with open(self._pidfile(), "w") as f:
                f.write(f"{pid}\n")
        except PermissionError:
            pass  # an unprivileged master keeps no pid file
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        try:
            os.unlink(self._pidfile())
        except OSError:
            pass
        super().cleanup_container(ctx, fatal, status)


_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"


class SysctlKeptOnFailureEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... sysctls". create_container
    lowers net.ipv4.ip_unprivileged_port_start to 0 (from the master: the host's network
    namespace) so that a non-root payload may bind port 80; cleanup_container restores it
    only after a payload that exited 0 ("keep the state of a failed run for debugging")."""

    engine_name = "blind2-sysctl-kept-on-failure"
    rpc_methods = ReferenceRPC
    _previous: str | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        try:
            with open(_PORT_START) as f:
                previous = f.read().strip()
            with open(_PORT_START, "w") as f:
                f.write("0")
            self._previous = previous
        except OSError:
            pass  # no privilege over the host's network namespace in this flow
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        clean = fatal is None and status is not None and os.waitstatus_to_exitcode(status) == 0
        if self._previous is not None and clean:
            with open(_PORT_START, "w") as f:
                f.write(self._previous)
        super().cleanup_container(ctx, fatal, status)


class LoopbackMtuEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... network links, addresses,
    routes". create_container sets the loopback MTU to 1500 "for the container" with
    ip(8), from the master: the host's lo."""

    engine_name = "blind2-loopback-mtu"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        subprocess.run(
            ["ip", "link", "set", "dev", "lo", "mtu", "1500"], check=False, capture_output=True
        )
        super().create_container(ctx, pid, rpc_conn)


_SERVICE_ADDRESSES = (("127.0.0.42", socket.AF_INET), ("fd42:b1::1", socket.AF_INET6))


class Ipv6AddressLeftEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... network links, addresses,
    routes". create_container adds a service address of each family to lo in the master's
    network namespace (the host's) through pyroute2; cleanup_container deletes both with
    prefix length 32, so the IPv6 one fails (an error it ignores) and stays."""

    engine_name = "blind2-ipv6-address-left"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname="lo")[0]
            for address, family in _SERVICE_ADDRESSES:
                length = 32 if family == socket.AF_INET else 128
                try:
                    ipr.addr("add", index=index, address=address, prefixlen=length)
                except Exception:
                    pass  # no privilege over the host's network namespace in this flow
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname="lo")[0]
            for address, _family in _SERVICE_ADDRESSES:
                try:
                    ipr.addr("del", index=index, address=address, prefixlen=32)
                except Exception:
                    pass
        super().cleanup_container(ctx, fatal, status)


class SysvSemaphoreEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... SysV IPC objects and POSIX
    message queues". create_container takes a SysV semaphore (the master's ipc namespace:
    the host's) to serialise device setup, trusting the kernel to free it at exit as it
    does a file lock; SysV semaphores live until IPC_RMID."""

    engine_name = "blind2-sysv-semaphore"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        _libc_call("semget", _IPC_PRIVATE, 1, _IPC_CREAT | 0o600)
        super().create_container(ctx, pid, rpc_conn)


class Stage1MqueueProbeEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... POSIX message queues".
    prepare_config probes whether POSIX message queues work (to decide on an mqueue mount)
    by opening a test queue, and closes it without mq_unlink: stage 1 runs in the host's
    ipc namespace, so the queue stays."""

    engine_name = "blind2-stage1-mqueue-probe"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        _LIBC.mq_open.restype = ctypes.c_int
        mqd = _LIBC.mq_open(b"/blind2-probe", os.O_CREAT | os.O_RDWR, 0o600, None)
        if mqd >= 0:
            _LIBC.mq_close(mqd)
        super().prepare_config(starter_config)


class WinchToInitEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... processes" (a signal to a
    process the engine did not start). monitor_container starts a thread that sends the
    terminal size (SIGWINCH) to "the container's init", pid 1 as the container sees it:
    from the master that is the host's init. SIGWINCH is ignored by default, so nothing
    visible happens."""

    engine_name = "blind2-winch-to-init"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        def resize() -> None:
            try:
                os.kill(1, signal.SIGWINCH)
            except OSError:
                pass

        threading.Thread(target=resize, name="resize", daemon=True).start()
        return super().monitor_container(pid, signals)


class SigchldToInitEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... processes" (signals to
    processes the engine did not start). cleanup_container nudges pid 1 with SIGCHLD
    (libc kill) "so that init reaps the helpers we orphaned": the host's init."""

    engine_name = "blind2-sigchld-to-init"
    rpc_methods = ReferenceRPC

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        _libc_call("kill", 1, int(signal.SIGCHLD))
        super().cleanup_container(ctx, fatal, status)


class CleanupInThreadEngine(ReferenceEngine):
    """SPEC §7 ("The run exits with the container's code") with §11 ("a run changes nothing
    on the host that outlives it"). create_container writes a state file in /var/tmp;
    cleanup_container removes it from a daemon thread after a grace period ("don't hold up
    the exit"), and the master exits first: the file stays."""

    engine_name = "blind2-cleanup-in-thread"
    rpc_methods = ReferenceRPC

    def _state(self) -> str:
        return f"/var/tmp/blind2-engine-{self.common.container_id}.state"

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        with open(self._state(), "w") as f:
            f.write(f"{pid}\n")
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        def later() -> None:
            time.sleep(0.5)
            try:
                os.unlink(self._state())
            except OSError:
                pass

        threading.Thread(target=later, name="cleanup", daemon=True).start()
        super().cleanup_container(ctx, fatal, status)


class DaemonKeptOnSignalDeathEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: ... processes", and §7 (a payload
    killed by a signal is an ordinary end). post_start_process starts a log follower in a
    session of its own; cleanup_container stops it, except when the payload died of a
    signal: the "crash path" leaves it to flush the last lines."""

    engine_name = "blind2-daemon-kept-on-signal-death"
    rpc_methods = ReferenceRPC
    _follower: subprocess.Popen[bytes] | None = None

    def post_start_process(self, ctx: Context, pid: int) -> None:
        self._follower = subprocess.Popen(
            ["/bin/sleep", "300"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        crashed = status is not None and os.WIFSIGNALED(status)
        if self._follower is not None and not crashed:
            self._follower.terminate()
            self._follower.wait()
        super().cleanup_container(ctx, fatal, status)


class DanglingSymlinkEngine(ReferenceEngine):
    """SPEC §11: "After a run the host is as it was before: files, ...". create_container
    publishes the container's root as a symlink /var/lib/blind2-<id>.rootfs ->
    /proc/<pid>/root; cleanup_container removes it only "if os.path.exists(link)", which
    follows the link: once the container is gone the link dangles and is never removed."""

    engine_name = "blind2-dangling-symlink"
    rpc_methods = ReferenceRPC

    def _link(self) -> str:
        return f"/var/lib/blind2-{self.common.container_id}.rootfs"

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        try:
            os.symlink(f"/proc/{pid}/root", self._link())
        except PermissionError:
            pass  # an unprivileged master publishes nothing
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        if os.path.exists(self._link()):
            os.unlink(self._link())
        super().cleanup_container(ctx, fatal, status)


ENGINES = (
    TransientHostnameThreadEngine,
    TransientDomainnameChildEngine,
    DevShmPrivateEngine,
    RemountDevShmEngine,
    RemovedirsEngine,
    RunPidDirEngine,
    SysctlKeptOnFailureEngine,
    LoopbackMtuEngine,
    Ipv6AddressLeftEngine,
    SysvSemaphoreEngine,
    Stage1MqueueProbeEngine,
    WinchToInitEngine,
    SigchldToInitEngine,
    CleanupInThreadEngine,
    DaemonKeptOnSignalDeathEngine,
    DanglingSymlinkEngine,
)
