"""Blind engines, round 3 (SPEC §5, §9, §11, and what §2/§7 leave to cleanup): the reference
engine with one namespace, host or leak bug each, loaded as ``blind3_host:NAME`` (``tests/``
on ``PYTHONPATH``)."""

# They change "the host" on purpose: run them only as root in the real backend, whose host
# sandbox takes the change. Every change of a mount, a propagation, a sysctl, a network link or
# a named network namespace below is made only where the process's mount namespace is the one
# the kit's sandbox names in KIT_HOST_SANDBOX (as the kill matrix's mutants check): without the
# sandbox those engines change nothing. The names are obviously ours: /srv (an empty
# directory), /run/blind3-*, /var/tmp/blind3-*, links b3*, the network namespace blind3-*.

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kit import system
from kit.contract import ConfigError, Context, WaitStatus
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig, normalize_capability
from kit.system import linux
from reference_engines.minimal.engine import ReferenceConfig, ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC, check_path

_LIBC = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOSYMFOLLOW = 0x100
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_SANDBOX_ENV = "KIT_HOST_SANDBOX"
_SCRATCH = "/srv"
_PING_RANGE = "/proc/sys/net/ipv4/ping_group_range"
_IP = next(
    (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip") if os.path.exists(p)),
    "ip",
)


def _libc_call(name: str, *args: object) -> int:
    """Call libc ``name``; 0 or more on success, else -errno."""
    result = int(getattr(_LIBC, name)(*args))
    return result if result >= 0 else -ctypes.get_errno()


def _b(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _in_host_sandbox() -> bool:
    """Whether this process's mount namespace is the kit's host sandbox: the guard of every
    change below of a mount, a propagation, a sysctl or a network object."""
    mark = os.environ.get(_SANDBOX_ENV, "")
    try:
        return bool(mark) and mark.split(":")[0] == str(os.stat("/proc/self/ns/mnt").st_ino)
    except OSError:
        return False


def _host_root() -> bool:
    """The master may act as host root (root flow), inside the kit's host sandbox."""
    return system.current().privileged() and _in_host_sandbox()


def _tag(engine: ReferenceEngine) -> str:
    """The container id, safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", engine.common.container_id)[:48] or "run"


def _cfg(engine: ReferenceEngine) -> ReferenceConfig:
    cfg = engine.common.engine_config
    assert isinstance(cfg, ReferenceConfig)
    return cfg


def _in_child(work: Callable[[], None]) -> int:
    """Run ``work`` in a forked (single-threaded) child of this process; its exit code."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:  # the helper reports by its exit code only
            pass
        os._exit(code)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def _scratch_tmpfs(target: str) -> None:
    """Mount a small tmpfs on ``target`` and render the container's extra files there."""
    flags = ctypes.c_ulong(_MS_NOSUID | _MS_NODEV)
    if _libc_call("mount", b"tmpfs", _b(target), b"tmpfs", flags, b"size=64k,mode=0755") < 0:
        raise OSError(ctypes.get_errno(), f"mount tmpfs on {target}")
    with open(os.path.join(target, "hosts"), "w") as f:
        f.write("127.0.0.1 localhost\n::1 localhost\n")


def _ip(*args: str) -> int:
    return subprocess.run([_IP, *args], check=False, capture_output=True).returncode


# --- mounts and propagation -----------------------------------------------------------------


def _render_in_unshared_namespace() -> None:
    if _libc_call("unshare", _CLONE_NEWNS) < 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    # The bug: no mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) between the unshare and
    # the mount: a new namespace's mounts keep the propagation of the ones they copy.
    _scratch_tmpfs(_SCRATCH)


class UnsharedScratchSharedEngine(ReferenceEngine):
    """A helper unshares a mount namespace and mounts in it before making it private.

    SPEC §11: "a run changes nothing on the host that outlives it, and a few things
    (hostname, mount table: NS-010, NS-011) not even while it runs"; "After a run the host is
    as it was before: ... mounts (and their options and propagation)". create_container
    renders the container's extra /etc files in a scratch tmpfs "in a mount namespace of its
    own": a forked helper unshares CLONE_NEWNS and mounts a tmpfs on /srv, trusting the
    namespace to take the mount along when the helper exits. It never makes its copy of /
    private first (ENVIRONMENT.md: "on most hosts it is shared ... always make / recursively
    private ... before mounting"): on a host whose / is shared, as the kit's sandbox's is, the
    new / is a peer of the host's, so the tmpfs propagates to the host's /srv and outlives the
    helper and the run. Root flow (the master is host root), every scenario that reaches
    create_container; elsewhere the helper cannot unshare, or (fakeroot) gets a namespace of
    a less privileged owner, whose mounts the kernel keeps from propagating back."""

    engine_name = "blind3-unshared-scratch-shared"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        if _host_root():
            _in_child(_render_in_unshared_namespace)
        super().create_container(ctx, pid, rpc_conn)


@dataclass
class _StagingConfig(ReferenceConfig):
    #: Not an option: where prepare_config staged the container's files (root flow).
    staging: str | None = None


class _StagingRPC(ReferenceRPC):
    def adopt_staging(self, path: str) -> int:
        """Read the staged files in the container's mount namespace, then unmount the
        staging tmpfs there ("consumed"); the size read."""
        check_path(path, "adopt_staging")
        self._need_namespace("mount", "adopt_staging")
        if not os.path.ismount(path):
            return 0
        with open(os.path.join(path, "hosts"), "rb") as f:
            size = len(f.read())
        self.system.umount(path)
        return size


class Stage1StagingMountEngine(ReferenceEngine):
    """prepare_config mounts a staging tmpfs before the mount namespace exists.

    SPEC §11: "a few things (hostname, mount table: NS-010, NS-011) not even while it runs"
    and "After a run the host is as it was before: files, mounts ..."; §2 rule 2:
    prepare_config "runs once, in stage 1, before any container namespace exists". To have
    the container's files ready "before the namespaces are made, so the container inherits
    them", prepare_config (root flow: stage 1 is full root) makes /run/blind3-stage-<id> and
    mounts a tmpfs there through the kit's system interface, in stage 1's mount namespace:
    the host's. The container's mount namespace copies it at the unshare; an RPC method reads
    it and unmounts that copy, and cleanup_container removes the directory, ignoring the
    EBUSY that the host's mount, still there, gives it. The host keeps the tmpfs and the
    directory. Root flow (real and fake backends: the mount goes through kit.system),
    every scenario whose prepare_config runs; the other flows' stage 1 cannot mount."""

    engine_name = "blind3-stage1-staging-mount"
    rpc_methods = _StagingRPC

    def config(self) -> _StagingConfig:
        return _StagingConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        cfg = self.common.engine_config
        assert isinstance(cfg, _StagingConfig)
        if starter_config.flow != "root" or "mount" not in cfg.namespaces:
            return
        if not _in_host_sandbox():
            return
        path = f"/run/blind3-stage-{_tag(self)}"
        os.makedirs(path, exist_ok=True)
        system.current().mount("tmpfs", path, "tmpfs", ["nosuid", "nodev"], "size=64k,mode=0755")
        with open(os.path.join(path, "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n::1 localhost\n")
        cfg.staging = path

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        staging = getattr(self.common.engine_config, "staging", None)
        if staging:
            RPCClient(rpc_conn, self.common.engine_name).adopt_staging(path=staging)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        staging = getattr(self.common.engine_config, "staging", None)
        if staging:
            try:
                os.rmdir(staging)  # "the tmpfs went with the container's mount namespace"
            except OSError:
                pass
        super().cleanup_container(ctx, fatal, status)


def _collect_in_private_namespace() -> None:
    # The bug: the propagation change comes before the unshare, so it is made in the
    # namespace the helper still shares with the master: the host's.
    if _libc_call("mount", None, b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None) < 0:
        raise OSError(ctypes.get_errno(), "make / rprivate")
    if _libc_call("unshare", _CLONE_NEWNS) < 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    _scratch_tmpfs(_SCRATCH)


class PrivateBeforeUnshareEngine(ReferenceEngine):
    """A helper makes / rprivate before it unshares its mount namespace, not after.

    SPEC §11: "After a run the host is as it was before: ... mounts (and their options and
    propagation)". cleanup_container collects the container's logs in a scratch tmpfs of a
    private mount namespace: a forked helper runs mount(MS_REC|MS_PRIVATE) on / and then
    unshare(CLONE_NEWNS) -- the two steps in the wrong order. The scratch mount stays in the
    helper's namespace, but every mount of the host (the master's namespace) has become
    private: its peer groups are gone for good. Root flow, every scenario in which the master
    runs cleanup_container; the other flows' helper has no privilege over the host's mounts."""

    engine_name = "blind3-private-before-unshare"
    rpc_methods = ReferenceRPC

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        if _host_root():
            _in_child(_collect_in_private_namespace)
        super().cleanup_container(ctx, fatal, status)


# --- sysctls and network --------------------------------------------------------------------


def _ping_range_through_container_proc(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc_call("setns", fd, _CLONE_NEWNS) < 0:
            raise OSError(ctypes.get_errno(), "setns(mnt)")
    finally:
        os.close(fd)
    # The bug: /proc/sys/net belongs to the writer's network namespace, not to the /proc
    # mount it is reached through; the helper joined the container's mount namespace only.
    with open(_PING_RANGE, "w") as f:
        f.write("0 2147483647\n")


class SysctlThroughContainerProcEngine(ReferenceEngine):
    """A helper writes a net sysctl after joining the container's mount namespace only.

    SPEC §11: "After a run the host is as it was before: ... sysctls". So that an unprivileged
    payload may ping, create_container sets net.ipv4.ping_group_range "in the container": a
    forked helper enters the container's mount namespace (whose /proc is the container's
    own, mounted by the RPC server) and writes /proc/sys/net/ipv4/ping_group_range there. A
    net sysctl is the writer's network namespace's, whatever /proc it is reached through,
    and the helper is still in the master's: the host's range changes and is never put back.
    Root flow with the default config (a new /proc), every scenario that reaches
    create_container; elsewhere the helper cannot enter the namespace or write the file."""

    engine_name = "blind3-sysctl-through-container-proc"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        if _cfg(self).mount_proc and _host_root():
            _in_child(lambda: _ping_range_through_container_proc(pid))


class NetnsNameKeptEngine(ReferenceEngine):
    """The container's network namespace gets a name that only a fatal end removes.

    SPEC §11: "After a run the host is as it was before: ... network links, addresses, routes
    and named network namespaces". So that operators can run ``ip netns exec``,
    create_container names the container's network namespace with ``ip netns attach
    blind3-<id> PID`` (in the master's, the host's, /run/netns). cleanup_container deletes
    the name only after a fatal error, "when the container may still be running"; after a
    normal end the author expects the name to go with the namespace, but the name is a bind
    mount that keeps the namespace alive: it stays on the host. Root flow with a network
    namespace, every scenario in which create_container runs and the run ends without a
    fatal error (a payload's exit, whatever its code, or its death by a signal)."""

    engine_name = "blind3-netns-name-kept"
    rpc_methods = ReferenceRPC
    _named: str | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        if "net" in _cfg(self).namespaces and _host_root():
            name = f"blind3-{_tag(self)}"
            if _ip("netns", "attach", name, str(pid)) == 0:
                self._named = name

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        name, self._named = self._named, None
        if name is not None and fatal is not None:
            _ip("netns", "delete", name)
        super().cleanup_container(ctx, fatal, status)


_BRIDGE = "b3br0"


class BridgeLeftEngine(ReferenceEngine):
    """The container's veth is cleaned up, the bridge it was plugged into is not.

    SPEC §11: "After a run the host is as it was before: ... network links". create_container
    gives the container a network the CNI-bridge way: it makes the bridge b3br0 if missing,
    a veth pair b3h<n>/b3c<n>, moves b3c<n> into the container's network namespace and plugs
    b3h<n> into the bridge, all with ip(8) in the master's (the host's) namespace.
    cleanup_container deletes b3h<n> (gone already when the container's namespace went) and
    leaves the bridge "shared by every container, like docker0": a link the run added stays.
    Root flow with a network namespace, every scenario that reaches create_container."""

    engine_name = "blind3-bridge-left"
    rpc_methods = ReferenceRPC
    _host_end: str | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        if "net" not in _cfg(self).namespaces or not _host_root():
            return
        n = format(pid % 0xFFFFFF, "x")
        host_end, container_end = f"b3h{n}", f"b3c{n}"
        _ip("link", "add", _BRIDGE, "type", "bridge")  # EEXIST when another container made it
        _ip("link", "set", _BRIDGE, "up")
        if _ip("link", "add", host_end, "type", "veth", "peer", "name", container_end) != 0:
            return
        self._host_end = host_end
        _ip("link", "set", container_end, "netns", str(pid))
        _ip("link", "set", host_end, "master", _BRIDGE, "up")

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        host_end, self._host_end = self._host_end, None
        if host_end is not None:
            _ip("link", "del", host_end)  # the container's end goes with it
        super().cleanup_container(ctx, fatal, status)


# --- processes, files and descriptors -------------------------------------------------------


class ShellRelayGrandchildEngine(ReferenceEngine):
    """cleanup_container kills its helper shell but not the processes the shell started.

    SPEC §11: "After a run the host is as it was before: ... processes"; §1:
    cleanup_container "tears everything down". create_container starts a console relay, a
    shell pipeline (``sleep | cat`` stands for ``tail -F LOG | logger``), before the payload
    so that no line is lost. cleanup_container stops it as the contract says (SIGKILL, since
    the hooks' blocked signal mask is inherited) and reaps it -- the shell only: its two
    children, the master's grandchildren, are orphaned and run on. Every flow, every
    scenario that reaches create_container."""

    engine_name = "blind3-shell-relay-grandchild"
    rpc_methods = ReferenceRPC
    _relay: subprocess.Popen[bytes] | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        self._relay = subprocess.Popen(
            ["/bin/sh", "-c", "/bin/sleep 600 | /bin/cat >/dev/null"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.kill()
            relay.wait()
        super().cleanup_container(ctx, fatal, status)


class SigtermIgnoredHelperEngine(ReferenceEngine):
    """cleanup_container asks its helper to stop with SIGTERM, which the helper has blocked.

    SPEC §11: "After a run the host is as it was before: ... processes". post_start_process
    starts a watcher process; cleanup_container stops it with terminate() and waits a second,
    then moves on ("it is on its way out"). The master's hooks run with every signal blocked
    and a child inherits that mask across exec (the contract's Operations docstring says so):
    the watcher never sees the SIGTERM and outlives the run. Every flow, every scenario in
    which post_start_process runs (a successful exec)."""

    engine_name = "blind3-sigterm-ignored-helper"
    rpc_methods = ReferenceRPC
    _watcher: subprocess.Popen[bytes] | None = None

    def post_start_process(self, ctx: Context, pid: int) -> None:
        self._watcher = subprocess.Popen(
            ["/bin/sleep", "600"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.terminate()
            try:
                watcher.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        super().cleanup_container(ctx, fatal, status)


class ControlSocketLeftEngine(ReferenceEngine):
    """cleanup_container closes its listening unix socket but never unlinks its path.

    SPEC §11: "After a run the host is as it was before: files, ...". create_container binds
    a control socket (for "attach" and "status" requests) at /var/tmp/blind3-<id>.sock and
    listens; cleanup_container closes it, which leaves the socket file of a bound AF_UNIX
    socket on the file system. Every flow (/var/tmp is writable by U), every scenario that
    reaches create_container."""

    engine_name = "blind3-control-socket-left"
    rpc_methods = ReferenceRPC
    _control: socket.socket | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"/var/tmp/blind3-{_tag(self)}.sock")
            sock.listen(4)
        except OSError:
            sock.close()
        else:
            self._control = sock
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        sock, self._control = self._control, None
        if sock is not None:
            sock.close()
        super().cleanup_container(ctx, fatal, status)


class Stage2CgroupFdEngine(ReferenceEngine):
    """start_process moves a host directory's descriptor with F_DUPFD: the payload inherits it.

    SPEC §5: ``keep_file_descriptor`` is the setter by which a descriptor reaches stage 2
    and the payload ("Keep fd open (inheritable) into stage 2 and the payload"): the payload
    gets those and stdio, no others. As runc did (CVE-2024-21626), stage 2 opens the cgroup
    file system (/sys/fs/cgroup, or /sys where it is not mounted) to check pids.max before the
    exec, and moves the descriptor "out of the payload's way" with fcntl(F_DUPFD, 100) -- not
    F_DUPFD_CLOEXEC -- then reads through it and forgets it: the payload holds an open
    directory of the host's /sys. Every flow, every scenario with a successful exec."""

    engine_name = "blind3-stage2-cgroup-fd"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd: int) -> None:
        base = "/sys/fs/cgroup" if os.path.isdir("/sys/fs/cgroup") else "/sys"
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 100)
        os.close(fd)
        try:
            limit = os.open("pids.max", os.O_RDONLY, dir_fd=high)
        except OSError:
            limit = -1  # no pids controller here
        if limit >= 0:
            try:
                value = os.read(limit, 32).decode().strip()
            finally:
                os.close(limit)
            if value == "0":
                raise OSError(errno.EAGAIN, "pids.max is 0: the payload could not fork")
        super().start_process(master_fd)


# --- the system interface (fake backend) ----------------------------------------------------


class _RawMountFirst:
    """The RPC server's system interface, with mount(2) tried directly first (a tmpfs gets
    MS_NOSYMFOLLOW, which kit.system has no name for); the interface when that fails."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None = None,
        flags: Any = (),
        data: str | None = None,
    ) -> None:
        mask = _MS_NOSYMFOLLOW if fstype == "tmpfs" else 0  # no symlink games in /tmp
        for name in flags:
            mask |= linux.MOUNT_FLAGS[name]
        if _libc_call("mount", _b(source), _b(target), _b(fstype), ctypes.c_ulong(mask), _b(data)):
            self._inner.mount(source, target, fstype, flags, data)  # e.g. EPERM: plain mount


class _RawMountRPC(ReferenceRPC):
    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.system = _RawMountFirst(self.system)


class RawMountNosymfollowEngine(ReferenceEngine):
    """The RPC server's mounts call mount(2) directly, falling back to kit.system on error.

    SPEC §9: "Engines that do their privileged work through the kit's system interface ...
    are fully checkable in fake mode ... A privileged call that bypasses the system interface
    is refused and reported (§11)"; §11: "In the fake backend, a privileged system call that
    an engine makes directly ... is refused with EPERM, and the ledger records the call". To
    mount the container's world-writable /tmp with MS_NOSYMFOLLOW, for which kit.system has
    no flag name, the RPC server's mounts call libc's mount(2) themselves and use
    kit.system's mount only if that fails. In the real backend the direct call works (the
    container's own mounts, one flag more); in the fake backend it is refused, the fallback
    succeeds, and the run looks clean but for the recorded direct call. Every flow, fake
    backend only, every scenario that reaches create_container."""

    engine_name = "blind3-raw-mount-nosymfollow"
    # In the real backend the direct call is legal; only the fake backend refuses it.
    blind_backend = "fake"
    rpc_methods = _RawMountRPC


# --- StarterConfig validation ---------------------------------------------------------------


@dataclass
class _DeferredCapsConfig(ReferenceConfig):
    #: Not an option: the capability names prepare_config left to start_process.
    deferred_capabilities: list[str] = field(default_factory=list)


class DeferredCapabilityCheckEngine(ReferenceEngine):
    """Unknown capability names are rejected in start_process, after the namespaces exist.

    SPEC §5: "Invalid combinations (...; an unknown namespace or capability name) are rejected
    before any namespace exists, with a message that names the setting". prepare_config
    hands the starter only the capability names the kit knows and leaves the others to
    start_process, "where capabilities are applied": there the run does fail (exit 255,
    "capabilities: unknown capability ..."), but only in stage 2, after every namespace was
    created and create_container ran. Every flow, the scenarios whose config names an unknown
    capability (a known one keeps the reference's checks)."""

    engine_name = "blind3-deferred-capability-check"
    escapes: str = (
        "no run can show it: only the engine's own config names its capabilities, and "
        "the suite cannot write an engine's config; SC-001 checks the invalid "
        "StarterConfig the engine makes on request (prepare_config:invalid), which this "
        "engine inherits"
    )
    rpc_methods = ReferenceRPC

    def config(self) -> _DeferredCapsConfig:
        return _DeferredCapsConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg = self.common.engine_config
        assert isinstance(cfg, _DeferredCapsConfig)
        if cfg.capabilities is not None:
            known: list[str] = []
            for name in cfg.capabilities:
                try:
                    normalize_capability(name, "capabilities")
                except ConfigError:
                    cfg.deferred_capabilities.append(str(name))
                else:
                    known.append(name)
            cfg.capabilities = known
        super().prepare_config(starter_config)

    def start_process(self, master_fd: int) -> None:
        cfg = self.common.engine_config
        for name in getattr(cfg, "deferred_capabilities", []):
            normalize_capability(name, "capabilities")  # "capabilities: unknown capability ..."
        super().start_process(master_fd)


ENGINES = (
    UnsharedScratchSharedEngine,
    Stage1StagingMountEngine,
    PrivateBeforeUnshareEngine,
    SysctlThroughContainerProcEngine,
    NetnsNameKeptEngine,
    BridgeLeftEngine,
    ShellRelayGrandchildEngine,
    SigtermIgnoredHelperEngine,
    ControlSocketLeftEngine,
    Stage2CgroupFdEngine,
    RawMountNosymfollowEngine,
    DeferredCapabilityCheckEngine,
)
