"""Mutants that break a rule a first mutant already breaks, by another mechanism (issue 14).

A check that looks only where one known mutant acts (the hook's own thread, a library call,
the top level of a config, the path as spelled, the field the rule names) misses the same bug
taken another way. Each mutant here declares its :data:`~.base.MECHANISMS` key; the kill
matrix counts, per requirement, the mechanisms that kill it.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from kit.contract import Common, Context, SignalChannel, WaitStatus
from kit.rpc.client import RPCClient
from kit.starter.config import StarterConfig
from kit.system import current, linux
from mutants.zoo.base import (
    NOBODY,
    Mutant,
    on_helper_thread,
    process_role,
    refuse_real_host,
    thread_setfsuid,
    thread_setresuid,
)
from reference_engines.bind_rootfs import BindRootfsEngine, BindRootfsRPC
from reference_engines.minimal import ReferenceConfig, ReferenceRPC
from reference_engines.minimal.engine import FORWARDED_SIGNALS, MONITOR_POLL


def _raise_permitted() -> None:
    """The calling thread's permitted capabilities, all made effective (capset acts on the
    calling thread only)."""
    _, permitted, inheritable = current().capabilities()
    current().set_capabilities(permitted, permitted, inheritable)


# --- every thread: helper threads and thread-local raw system calls --------------------------


class MasterHelperThreadCapabilities(Mutant):
    slug = "master-helper-thread-caps"
    bug = (
        "create_container (setuid master) starts a helper thread that raises every "
        "permitted capability into its effective set and keeps running"
    )
    killed_by = ("PRIV-MASTER-002",)
    flows = ("suid", "hybrid")
    mechanism = "helper-thread"

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        on_helper_thread(_raise_permitted, "mount-helper")
        super().create_container(ctx, pid, rpc_conn)


class MasterHelperThreadRoot(Mutant):
    slug = "master-helper-thread-euid-root"
    bug = (
        "create_container (setuid master) starts a helper thread that regains effective "
        "uid 0 through the saved uid (raw setresuid, that thread only) and keeps running"
    )
    killed_by = ("PRIV-MASTER-001",)
    flows = ("suid", "hybrid")
    mechanism = "helper-thread"

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        on_helper_thread(lambda: thread_setresuid(-1, 0, -1), "root-helper")
        super().create_container(ctx, pid, rpc_conn)


class MasterHookThreadRawRoot(Mutant):
    slug = "master-raw-setresuid-root"
    bug = (
        "create_container (setuid master) regains effective uid 0 on its own thread by the "
        "raw setresuid system call (glibc's wrapper would change every thread) and returns "
        "so"
    )
    killed_by = ("PRIV-MASTER-001",)
    flows = ("suid", "hybrid")
    mechanism = "raw-syscall"

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        thread_setresuid(-1, 0, -1)


class MasterHelperThreadInContainerNet(Mutant):
    slug = "master-helper-thread-in-container-net"
    bug = (
        "create_container starts a helper thread that joins the container's network "
        "namespace (to configure it) and stays there: the master shares it"
    )
    killed_by = ("NS-003",)
    flows = ("root",)
    mechanism = "helper-thread"

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        on_helper_thread(lambda: current().setns("net", f"/proc/{pid}/ns/net"), "net-helper")
        super().create_container(ctx, pid, rpc_conn)


class _JoinsTheContainersNetOnASignal:
    """The monitor's signal channel, seen through a diagnostic step: on the first forwarded
    signal, the monitor's thread joins the container's network namespace (to look at its
    links) and stays there."""

    def __init__(self, signals: SignalChannel, pid: int) -> None:
        self._signals, self._pid, self._joined = signals, pid, False

    def get(self, *args: Any, **kwargs: Any) -> Any:
        sig = self._signals.get(*args, **kwargs)
        if sig in FORWARDED_SIGNALS and not self._joined:
            self._joined = True
            current().setns("net", f"/proc/{self._pid}/ns/net")
        return sig

    def __getattr__(self, name: str) -> Any:
        return getattr(self._signals, name)


class MonitorJoinsTheContainersNetOnASignal(Mutant):
    slug = "monitor-joins-container-net-on-a-signal"
    bug = (
        "monitor_container, before forwarding a signal, joins the container's network "
        "namespace on its own thread to look at its links, and stays there: the master "
        "shares it, in runs that forward a signal only"
    )
    killed_by = ("NS-003",)
    flows = ("root",)
    mechanism = "partial"

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        seen = _JoinsTheContainersNetOnASignal(signals, pid)
        return super().monitor_container(pid, seen)  # type: ignore[arg-type]


class Stage1HelperThreadWithoutCapabilities(Mutant):
    slug = "stage1-helper-thread-drops-caps"
    bug = (
        "prepare_config (root flow) starts a worker thread that drops its effective "
        "capabilities 'for safety' and keeps running: stage 1 no longer has full "
        "capabilities on every thread"
    )
    killed_by = ("PRIV-STAGE1-002",)
    flows = ("root",)
    mechanism = "helper-thread"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)

        def drop() -> None:
            _, permitted, inheritable = current().capabilities()
            current().set_capabilities(0, permitted, inheritable)

        on_helper_thread(drop, "stage1-worker")


class Stage1RawSetresuid(Mutant):
    slug = "stage1-raw-setresuid-nobody"
    bug = (
        "prepare_config (root flow) switches its own thread to nobody by the raw setresuid "
        "system call, keeping saved uid 0, and returns like that"
    )
    killed_by = ("PRIV-STAGE1-001",)
    flows = ("root",)
    mechanism = "raw-syscall"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        thread_setresuid(NOBODY, NOBODY, 0)


class Stage1FsUidNobody(Mutant):
    slug = "stage1-fsuid-nobody"
    bug = (
        "prepare_config (root flow) reads the user's files with fs uid nobody (setfsuid) "
        "and returns without switching back: stage 1 is no longer uid 0 in every way"
    )
    killed_by = ("PRIV-STAGE1-001",)
    flows = ("root",)
    mechanism = "other-field"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        thread_setfsuid(NOBODY)


class Stage2HelperThreadAsNobody(Mutant):
    slug = "stage2-helper-thread-nobody"
    bug = (
        "init_config, in stage 2 (root flow), starts a helper thread that switches itself "
        "to nobody (raw setresuid) and keeps running until the exec"
    )
    killed_by = ("PRIV-STAGE2-001",)
    flows = ("root",)
    mechanism = "helper-thread"

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        if process_role() == "stage2" and current().getresuid()[1] == 0:
            on_helper_thread(lambda: thread_setresuid(NOBODY, NOBODY, NOBODY), "io-helper")


class Stage2DropsAPermittedCapability(Mutant):
    slug = "stage2-drops-a-permitted-cap"
    bug = (
        "init_config, in stage 2 (root flow), drops CAP_KILL from its effective and "
        "permitted sets: stage 2 no longer has exactly the configured capabilities"
    )
    killed_by = ("PRIV-STAGE2-002",)
    flows = ("root",)
    mechanism = "other-field"

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        if process_role() == "stage2":
            effective, permitted, inheritable = current().capabilities()
            kill = linux.caps_to_mask(["CAP_KILL"])
            if permitted & kill:
                current().set_capabilities(effective & ~kill, permitted & ~kill, inheritable)


# --- RPC methods: every thread and the whole credential at method entry and return ----------


class HelperThreadRPC(ReferenceRPC):
    """sethostname starts a helper thread with every permitted capability effective."""

    def sethostname(self, name: str) -> None:
        on_helper_thread(_raise_permitted, "rpc-helper")
        super().sethostname(name)


class RPCMethodHelperThreadCapabilities(Mutant):
    slug = "rpc-method-helper-thread-caps"
    bug = (
        "the RPC method sethostname starts a helper thread that raises every permitted "
        "capability and keeps running: the RPC server has more than CAP_SYS_ADMIN "
        "effective"
    )
    killed_by = ("PRIV-RPC-002",)
    flows = ("suid", "hybrid")
    mechanism = "helper-thread"
    rpc = HelperThreadRPC


def _permitted_into_inheritable() -> None:
    """The calling thread's permitted capabilities made inheritable, its effective set left
    as it was (so that helpers it execs later could keep them)."""
    effective, permitted, inheritable = current().capabilities()
    current().set_capabilities(effective, permitted, inheritable | permitted)


class InheritableHelperRPC(ReferenceRPC):
    """sethostname starts a worker thread with every permitted capability inheritable."""

    def sethostname(self, name: str) -> None:
        on_helper_thread(_permitted_into_inheritable, "rpc-worker")
        super().sethostname(name)


class RPCMethodWorkerInheritsCapabilities(Mutant):
    slug = "rpc-method-worker-inheritable-caps"
    bug = (
        "the RPC method sethostname starts a worker thread (for the helpers it will exec) "
        "whose inheritable set holds every permitted capability, and leaves it running; "
        "its effective set stays the row's"
    )
    killed_by = ("PRIV-RPC-004",)
    flows = ("suid", "hybrid")
    mechanism = "helper-thread"
    rpc = InheritableHelperRPC


class RawRootRPC(ReferenceRPC):
    """sethostname regains effective uid 0 on its thread (raw setresuid) and keeps it."""

    def sethostname(self, name: str) -> None:
        thread_setresuid(-1, 0, -1)
        super().sethostname(name)


class RPCMethodLeavesEffectiveRoot(Mutant):
    slug = "rpc-method-raw-setresuid-root"
    bug = (
        "the RPC method sethostname (setuid flow) regains effective uid 0 on its own "
        "thread by the raw setresuid system call and does not give it back"
    )
    killed_by = ("PRIV-RPC-001", "PRIV-RPC-004")
    flows = ("suid",)
    mechanism = "raw-syscall"
    rpc = RawRootRPC


class FsRootRPC(ReferenceRPC):
    """sethostname takes fs uid 0 (allowed: 0 is the saved uid) and keeps it."""

    def sethostname(self, name: str) -> None:
        thread_setfsuid(0)
        super().sethostname(name)


class RPCMethodLeavesFsUidRoot(Mutant):
    slug = "rpc-method-fsuid-root"
    bug = (
        "the RPC method sethostname (setuid flow) switches its fs uid to 0 through the "
        "saved uid to reach root's files and does not switch back"
    )
    killed_by = ("PRIV-RPC-001", "PRIV-RPC-004")
    flows = ("suid",)
    mechanism = "other-field"
    rpc = FsRootRPC


class GroupsRPC(ReferenceRPC):
    """sethostname adds a supplementary group to the server and leaves it there."""

    def sethostname(self, name: str) -> None:
        groups = os.getgroups()
        current().setgroups([*groups, NOBODY] if NOBODY not in groups else groups[:-1])
        super().sethostname(name)


class RPCMethodLeavesGroups(Mutant):
    slug = "rpc-method-leaves-groups"
    bug = (
        "the RPC method sethostname (root flow) changes the server's supplementary groups "
        "and does not restore them: a credential other than the capabilities"
    )
    killed_by = ("PRIV-RPC-004",)
    flows = ("root",)
    mechanism = "other-field"
    rpc = GroupsRPC


# --- the payload: the whole credential start_process must not change -------------------------


class StartProcessAddsAGroup(Mutant):
    slug = "start-process-adds-group"
    bug = (
        "start_process (root flow) adds a supplementary group before the exec: the payload "
        "runs with a group stage 2 did not have"
    )
    killed_by = ("PRIV-PAYLOAD-003",)
    flows = ("root",)
    mechanism = "other-field"

    def start_process(self, master_fd: int) -> None:
        groups = os.getgroups()
        try:
            current().setgroups([*groups, NOBODY] if NOBODY not in groups else groups[:-1])
        except PermissionError:
            pass  # not root here: nothing to add
        super().start_process(master_fd)


# --- state: nested values ----------------------------------------------------------------------

#: The list every NestedSharedConfig's ``mounts["binds"]`` is.
_SHARED_BINDS: list[str] = []


@dataclass
class NestedSharedConfig(ReferenceConfig):
    #: A fresh dict each time, whose list is the module's: shared one level down.
    mounts: dict[str, list[str]] = field(default_factory=lambda: {"binds": _SHARED_BINDS})


class SharedNestedList(Mutant):
    slug = "config-shared-nested-list"
    bug = (
        "config() returns a fresh config whose mounts dict is fresh too, but the list in "
        "it is the module's: every config shares it one level down"
    )
    killed_by = ("STATE-001",)
    flows = ("root",)
    mechanism = "nested-value"

    def config(self) -> NestedSharedConfig:
        return NestedSharedConfig()


class ConfigCountsItsCalls(Mutant):
    slug = "config-counts-calls"
    bug = (
        "config() names the container after how many configs this process made: the first "
        "call in every process gives the same config, the next ones do not"
    )
    killed_by = ("STATE-001",)
    flows = ("root",)

    def __init__(self) -> None:
        super().__init__()
        self._made = 0

    def config(self) -> ReferenceConfig:
        cfg = super().config()
        if self._made:
            cfg.hostname = f"{cfg.hostname}-{self._made}"
        self._made += 1
        return cfg


# --- paths: a symlink on the way ------------------------------------------------------------------


class FollowsSymlinksRPC(BindRootfsRPC):
    """mkdir without the bind example's walk: a symbolic link on the way is followed, as the
    host resolves it (before pivot_root an absolute link target is a host path)."""

    def mkdir(self, path: str, mode: int) -> None:
        root = self._need_root("mkdir")
        full = os.path.join(root, path.lstrip("/"))
        if os.path.lexists(full):
            raise FileExistsError(f"mkdir: {path!r} already exists")
        current().mkdir(full, mode)


#: Where RPCMethodFollowsSymlink's create_container asks for its cache directory.
CACHE_LINK = "/cache"


class _CacheThroughALink:
    """The RPC client of create_container, which also links /cache to the directory that
    holds the container root (made by then: the engine's ``_root_dir``) and makes a
    directory through that link right after /tmp."""

    def __init__(self, rpc: RPCClient, engine: Any) -> None:
        self._rpc = rpc
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rpc, name)

    def mkdir(self, path: str, mode: int) -> None:
        self._rpc.mkdir(path=path, mode=mode)
        if path == "/tmp":
            outside = os.path.dirname(self._engine._root_dir)
            self._rpc.symlink(target=outside, path=CACHE_LINK)
            self._rpc.mkdir(path=f"{CACHE_LINK}/mutant-cache", mode=0o755)


class RPCMethodFollowsSymlink(Mutant, BindRootfsEngine):
    slug = "rpc-follows-symlink"
    bug = (
        "the RPC method mkdir follows a symbolic link on the way: the cache directory "
        f"create_container asks for under {CACHE_LINK} (a link to a host directory) lands "
        "outside the container root, on the host"
    )
    killed_by = ("CLEAN-001",)
    flows = ("root",)
    mechanism = "symlink"
    rpc = FollowsSymlinksRPC

    # The bind example: the engine with a container root to walk out of.
    def prepare_rootfs(self, rpc: RPCClient, cfg: ReferenceConfig) -> None:
        client = _CacheThroughALink(rpc, self)
        super().prepare_rootfs(client, cfg)  # type: ignore[arg-type]  # duck-types RPCClient


# --- part of the domain, another hook, a child process ----------------------------------------


class UnsharingHelperRPC(ReferenceRPC):
    """sethostname starts a helper thread that unshares a uts namespace of its own."""

    def sethostname(self, name: str) -> None:
        super().sethostname(name)
        on_helper_thread(lambda: current().unshare(["uts"]), "uts-helper")


class RPCHelperThreadOwnUts(Mutant):
    slug = "rpc-helper-thread-own-uts"
    bug = (
        "the RPC method sethostname starts a helper thread that unshares a uts namespace "
        "of its own (to try names out) and keeps running in it"
    )
    killed_by = ("NS-001",)
    flows = ("root",)
    mechanism = "helper-thread"
    rpc = UnsharingHelperRPC


class PayloadCheckingRPC(ReferenceRPC):
    """payload_exists: for a payload that is not there, the serving thread unshares a uts
    namespace of its own (to look for it under another name) and stays in it."""

    def payload_exists(self, path: str) -> bool:
        if os.path.exists(path):
            return True
        current().unshare(["uts"])
        return False


class RPCServerLeavesOnAMissingPayload(Mutant):
    slug = "rpc-server-leaves-on-a-missing-payload"
    bug = (
        "create_container first asks the RPC server whether the payload exists; when it "
        "does not, the server unshares a uts namespace of its own and serves on in it: "
        "only runs whose payload is missing show it"
    )
    killed_by = ("NS-001",)
    flows = ("root",)
    mechanism = "partial"
    rpc = PayloadCheckingRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        client = RPCClient(rpc_conn, self.common.engine_name)
        client.payload_exists(path=self.reference_config().argv[0])
        super().create_container(ctx, pid, rpc_conn)


class HybridGidMapTooWide(Mutant):
    slug = "hybrid-gid-map-too-wide"
    bug = (
        "prepare_config (hybrid flow) maps the uid right but 65536 gids from the invoking "
        "user's gid on, as if the user owned the host gids that follow theirs"
    )
    killed_by = ("NS-012",)
    flows = ("hybrid",)
    mechanism = "partial"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        sc = starter_config
        if sc.flow == "hybrid":
            sc.gid_mappings.clear()
            sc.add_gid_mappings([(0, sc.invoker_gid, 65536)])


class StartProcessLeaksTheMasterFd(Mutant):
    slug = "start-process-leaks-master-fd"
    bug = (
        "start_process makes the descriptor the starter hands it (master_fd) inheritable "
        "'for the payload's supervisor': the payload gets a descriptor nobody kept"
    )
    killed_by = ("FD-001",)
    flows = ("root",)
    mechanism = "other-field"

    def start_process(self, master_fd: int) -> None:
        if master_fd >= 0:
            os.set_inheritable(master_fd, True)
        super().start_process(master_fd)


class StartProcessRaisesAmbient(Mutant):
    slug = "start-process-raises-ambient"
    bug = (
        "the setuid flow configures CAP_NET_BIND_SERVICE permitted and inheritable but not "
        "ambient, and start_process raises it into the ambient set before the exec: the "
        "unprivileged payload keeps it"
    )
    killed_by = ("PRIV-PAYLOAD-001", "PRIV-PAYLOAD-003")
    flows = ("suid",)
    mechanism = "other-hook"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.flow == "suid":
            for kind in ("effective", "permitted", "inheritable", "bounding"):
                starter_config.set_capabilities(kind, ["CAP_NET_BIND_SERVICE"])

    def start_process(self, master_fd: int) -> None:
        try:
            current().set_ambient(linux.caps_to_mask(["CAP_NET_BIND_SERVICE"]))
        except OSError:
            pass  # not configured in this flow
        super().start_process(master_fd)


class MonitorHelperThreadReaps(Mutant):
    slug = "monitor-helper-thread-reaps"
    bug = (
        "monitor_container leaves reaping to a helper thread that waits for any child "
        "(waitpid(-1)) and hands over the container's status when it sees it"
    )
    killed_by = ("SIG-004",)
    flows = ("root",)
    mechanism = "helper-thread"

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        statuses: queue.Queue[int] = queue.Queue()

        def reap() -> None:
            while True:
                try:
                    found, status = os.waitpid(-1, 0)
                except ChildProcessError:
                    return
                if found == pid:
                    statuses.put(status)
                    return

        threading.Thread(target=reap, name="reaper", daemon=True).start()
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                return statuses.get_nowait()
            except queue.Empty:
                pass


class HostnameByAChildProcess(Mutant):
    slug = "host-hostname-child-process"
    bug = (
        "create_container runs hostname(1) from the master, in the host's uts namespace, "
        "instead of asking the RPC server (it restores the name in cleanup)"
    )
    killed_by = ("NS-010",)
    flows = ("root",)
    mechanism = "child-process"

    def __init__(self) -> None:
        super().__init__()
        self._previous: str | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg = self.reference_config()
        if cfg.hostname is not None:
            refuse_real_host(self.slug)
            self._previous = current().gethostname()
            _host_command(["hostname", cfg.hostname], lambda: current().sethostname(cfg.hostname))
            cfg.hostname = None  # done (in the wrong namespace)
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        previous, self._previous = self._previous, None
        if previous is not None:
            _host_command(["hostname", previous], lambda: current().sethostname(previous))
        super().cleanup_container(ctx, fatal, status)


class MountByAChildProcess(Mutant):
    slug = "host-mount-child-process"
    bug = (
        "create_container runs mount(8) from the master to stage files on a tmpfs: the "
        "mount is made in the host's mount namespace (it is unmounted in cleanup)"
    )
    killed_by = ("NS-011",)
    flows = ("root",)
    mechanism = "child-process"

    def __init__(self) -> None:
        super().__init__()
        self._staging: str | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        refuse_real_host(self.slug)
        path = self._staging = tempfile.mkdtemp(prefix="mutant-staging-")
        _host_command(
            ["mount", "-t", "tmpfs", "-o", "size=64k,nosuid,nodev", "tmpfs", path],
            lambda: current().mount("tmpfs", path, "tmpfs", ["nosuid", "nodev"], "size=64k"),
        )
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        path, self._staging = self._staging, None
        if path is not None:
            _host_command(["umount", "-l", path], lambda: current().umount(path, detach=True))
            os.rmdir(path)
        super().cleanup_container(ctx, fatal, status)


class HostPropagationChanged(Mutant):
    slug = "host-propagation-changed"
    bug = (
        "create_container changes the propagation of / (private to shared, anything else to "
        "private) from the master, in the host's mount namespace (meaning the container's, "
        "which it never entered), and sets it back in cleanup"
    )
    killed_by = ("NS-011",)
    flows = ("root",)
    mechanism = "other-field"

    def __init__(self) -> None:
        super().__init__()
        self._previous: str | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        refuse_real_host(self.slug)
        previous = current().propagation("/")
        if previous is not None:
            # Whatever "/" was, it changes: a sandbox whose root is private already (the
            # kit's host sandbox may make it so) would otherwise see no change at all.
            self._previous = previous
            current().set_propagation("/", "shared" if previous == "private" else "private")
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        previous, self._previous = self._previous, None
        if previous is not None:
            current().set_propagation("/", previous)
        super().cleanup_container(ctx, fatal, status)


class HostPeerGroupRenewed(Mutant):
    slug = "host-peer-group-renewed"
    bug = (
        "post_start_process makes the host's / private and at once shared again, from the "
        "master: the same propagation kind, in a new peer group (its old peers, the mount's "
        "copies in other namespaces, receive nothing from it any more)"
    )
    killed_by = ("HOST-002", "NS-011")
    flows = ("root",)
    mechanism = "other-field"

    def post_start_process(self, ctx: Context, pid: int) -> None:
        refuse_real_host(self.slug)
        previous = current().propagation("/")
        if previous == "shared":  # the kit's host sandbox makes its / shared, as most hosts
            # Back to back, within one hook: the kernel flags no look for a propagation
            # change, and the kind reads as before.
            current().set_propagation("/", "private")
            current().set_propagation("/", "shared")
        super().post_start_process(ctx, pid)


def _host_command(argv: list[str], modelled: Any) -> None:
    """Run ``argv`` as a child process in the real backend (only ever inside the kill
    matrix's sandbox: :func:`refuse_real_host` ran first); in the fake backend a child would
    act on the real host, so the model gets the same change (``modelled``) instead."""
    if current().name == "real":
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    else:
        modelled()


MUTANTS = (
    RPCServerLeavesOnAMissingPayload,
    RPCMethodWorkerInheritsCapabilities,
    MonitorJoinsTheContainersNetOnASignal,
    MasterHelperThreadCapabilities,
    MasterHelperThreadRoot,
    MasterHookThreadRawRoot,
    MasterHelperThreadInContainerNet,
    Stage1HelperThreadWithoutCapabilities,
    Stage1RawSetresuid,
    Stage1FsUidNobody,
    Stage2HelperThreadAsNobody,
    Stage2DropsAPermittedCapability,
    RPCMethodHelperThreadCapabilities,
    RPCMethodLeavesEffectiveRoot,
    RPCMethodLeavesFsUidRoot,
    RPCMethodLeavesGroups,
    StartProcessAddsAGroup,
    SharedNestedList,
    ConfigCountsItsCalls,
    RPCMethodFollowsSymlink,
    RPCHelperThreadOwnUts,
    HybridGidMapTooWide,
    StartProcessLeaksTheMasterFd,
    StartProcessRaisesAmbient,
    MonitorHelperThreadReaps,
    HostnameByAChildProcess,
    MountByAChildProcess,
    HostPropagationChanged,
    HostPeerGroupRenewed,
)
