"""Blind round 5, RPC area: engines with one RPC, config-crossing or fake-backend mistake each.

Each engine below is the reference engine (or a small extension of it) with one mistake an
engine author could plausibly make in SPEC §1, §2 rules 1-3, §4's RPC-server rows, §6 (RPC)
or §9 (the fake backend). They were written from SPEC.md and the reference engine alone,
without reading the conformance suite. Several show only in some flows (the setuid RPC
server holds CAP_SYS_ADMIN alone, the root one everything), on one code path, or only in
one backend. Run one with
``PYTHONPATH=tests python -m kit run --engine blind5_rpc:NAME --flow FLOW -- /bin/true``.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from kit import system as kit_system
from kit.contract import Common, Context, WaitStatus
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig
from kit.system import linux
from reference_engines.minimal.engine import ReferenceConfig, ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC, check_path, hostname_error, refuse


def _mask(*names: str) -> int:
    return linux.caps_to_mask(names)


# --- 1. capabilities raised by an RPC method and left raised on its error path -------------


class HandOverRPC(ReferenceRPC):
    """The reference's methods plus ``hand_over``."""

    def hand_over(self, path: str, uid: int, gid: int) -> None:
        """Give container path ``path`` to the payload's user (CHOWN and FOWNER raised on
        this thread for the change; the setuid server has them permitted only)."""
        check_path(path, "hand_over")
        eff, prm, inh = self.system.capabilities()
        self.system.set_capabilities(eff | (_mask("CAP_CHOWN", "CAP_FOWNER") & prm), prm, inh)
        # BUG: lstat raises FileNotFoundError (an optional path that is absent) before the
        # capabilities are put back: no try/finally around the privileged section.
        os.lstat(path)
        os.chown(path, uid, gid, follow_symlinks=False)
        self.system.set_capabilities(eff, prm, inh)


class CapsLeakOnErrorPath(ReferenceEngine):
    """An RPC method raises CAP_CHOWN/CAP_FOWNER and restores them only on its success path,
    so the expected ENOENT of an optional path leaves them raised in the RPC server.

    SPEC §4, RPC server: "a method may raise more on its own thread and must restore them"
    (held "at every RPC method entry and return"). Shows in suid and hybrid (the RPC server
    has only CAP_SYS_ADMIN effective there; in root, userns and fakeroot it already holds
    them), on both backends, at the return of ``hand_over`` and the entry of every later
    method; the run itself exits 0.
    """

    engine_name = "blind5-rpc-caps-leak-on-error-path"
    rpc_methods = HandOverRPC
    #: Shared with the payload when the host provides it (it usually does not).
    SHARED_DIR = "/run/kit-shared"

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg: ReferenceConfig = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        try:
            rpc.hand_over(path=self.SHARED_DIR, uid=0, gid=0)
        except FileNotFoundError:
            pass  # optional: errno ENOENT survives the RPC, so this is how "absent" looks
        if cfg.hostname is not None:
            rpc.sethostname(name=cfg.hostname)
        self.prepare_rootfs(rpc, cfg)


# --- 2. a helper thread started while the serving thread had capabilities raised ---------


class WatchedMountRPC(ReferenceRPC):
    """``mount`` with CAP_DAC_OVERRIDE raised (targets under 0700 directories) and a thread
    that watches the mount table for the engine's log."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self._watcher: threading.Thread | None = None
        self.mount_log: list[int] = []

    def _watch_mounts(self) -> None:
        """Record the size of the mount table whenever it changes, until the server exits."""
        last = -1
        stop = threading.Event()
        while not stop.wait(0.2):
            try:
                with open("/proc/self/mountinfo") as f:
                    count = sum(1 for _ in f)
            except OSError:
                continue
            if count != last:
                self.mount_log.append(count)
                last = count

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        eff, prm, inh = self.system.capabilities()
        self.system.set_capabilities(eff | (_mask("CAP_DAC_OVERRIDE") & prm), prm, inh)
        try:
            if self._watcher is None:
                # BUG: started inside the raised section, the thread inherits this thread's
                # capability sets and keeps CAP_DAC_OVERRIDE effective for its whole life;
                # the finally below restores the serving thread only.
                self._watcher = threading.Thread(
                    target=self._watch_mounts, name="mount-watch", daemon=True
                )
                self._watcher.start()
            super().mount(source, target, fstype, flags, data)
        finally:
            self.system.set_capabilities(eff, prm, inh)


class WatcherThreadInheritsCaps(ReferenceEngine):
    """The RPC server starts a long-lived watcher thread from inside a method while that
    method's thread has CAP_DAC_OVERRIDE raised, so the watcher keeps it.

    SPEC §4: "Every rule of this table holds for every thread of the process, threads the
    engine started included, at every hook entry and return and at every RPC method entry
    and return"; the RPC server in suid has "only CAP_SYS_ADMIN effective". Shows in suid and
    hybrid (real and fake) from the first ``mount`` call's return on; the serving thread
    itself is restored correctly.
    """

    engine_name = "blind5-rpc-watcher-thread-inherits-caps"
    rpc_methods = WatchedMountRPC


# --- 3. the serving thread's fsuid switched to 0 and never back ---------------------------


class PayloadCheckRPC(ReferenceRPC):
    """The reference's methods plus ``check_payload``."""

    def check_payload(self, path: str) -> bool:
        """Whether the payload can be opened, looked at as root: an image directory may be
        0700 root, which would hide it from the setuid server's uid."""
        check_path(path, "check_payload")
        # BUG: the setuid server's saved uid 0 lets it set fsuid 0 without any capability,
        # and the kernel then raises the file-system capabilities into the effective set.
        # Nothing puts fsuid back; and the call bypasses the system interface.
        linux.thread_setfsuid(0)
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return False
        return True


class FsuidNeverRestored(ReferenceEngine):
    """An RPC method switches its thread's fs uid to 0 (legal with the setuid server's saved
    uid 0) to look at the payload as root, and never switches it back.

    SPEC §4, RPC server: "a method may raise more on its own thread and must restore them";
    §9: "A privileged call that bypasses the system interface is refused and reported".
    Shows in suid on the real backend (fs uid 0 with CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER,
    CAP_MKNOD effective at the method's return); on the fake backend in every flow (setfsuid
    is a direct system call, refused). root/fakeroot/hybrid already have fs uid 0 in their
    namespace and userns cannot map 0: no change there.
    """

    engine_name = "blind5-rpc-fsuid-never-restored"
    rpc_methods = PayloadCheckRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg: ReferenceConfig = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        if cfg.hostname is not None:
            rpc.sethostname(name=cfg.hostname)
        self.prepare_rootfs(rpc, cfg)
        if not rpc.check_payload(path=cfg.argv[0]):
            raise FileNotFoundError(errno.ENOENT, f"payload {cfg.argv[0]!r} cannot be opened")


# --- 4. inheritable capability left raised after running a helper with ambient caps -------


@dataclass
class DomainConfig(ReferenceConfig):
    """The reference's config plus the container's NIS domain name."""

    domainname: str | None = "kit.local"


class DomainHelperRPC(ReferenceRPC):
    """The reference's methods plus ``set_domainname`` through the distribution's tool."""

    def set_domainname(self, name: str) -> None:
        """Run ``domainname NAME`` in the container's uts namespace. The helper runs as the
        server's uid; it gets CAP_SYS_ADMIN through the ambient set."""
        self._need_namespace("uts", "set_domainname")
        want = _mask("CAP_SYS_ADMIN")
        eff, prm, inh = self.system.capabilities()
        # An ambient capability must be permitted and inheritable.
        self.system.set_capabilities(eff, prm, inh | (want & prm))
        self.system.set_ambient(want & prm)
        try:
            done = subprocess.run(
                ["domainname", name], capture_output=True, text=True, timeout=5, check=False
            )
        finally:
            # BUG: clears the ambient set but not the inheritable bit raised above.
            self.system.set_ambient(0)
        if done.returncode != 0:
            raise PermissionError(errno.EPERM, f"domainname: {done.stderr.strip()}")


class InheritableLeftRaised(ReferenceEngine):
    """An RPC method raises CAP_SYS_ADMIN into the inheritable and ambient sets to run a
    helper binary, then clears the ambient set but leaves the inheritable one raised.

    SPEC §4: a method "must restore" what it raised, and a credential is compared whole:
    "uids and gids (r/e/s/fs), supplementary groups, the five capability sets…". Shows in
    every flow on both backends (the inheritable set is empty before the call in all of
    them); on the fake backend the helper's own setdomainname also bypasses the system
    interface and is refused and recorded (the engine tolerates the failure: the domain
    name is cosmetic), so the run exits 0 everywhere.
    """

    engine_name = "blind5-rpc-inheritable-left-raised"
    rpc_methods = DomainHelperRPC

    def config(self) -> DomainConfig:
        return DomainConfig()

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        cfg: DomainConfig = self.common.engine_config
        if cfg.domainname is not None and "uts" in cfg.namespaces:
            rpc = RPCClient(rpc_conn, self.common.engine_name)
            try:
                rpc.set_domainname(name=cfg.domainname)
            except OSError:
                pass  # cosmetic: a container without a domain name still works


# --- 5. helper thread of the master that keeps a capability raised -----------------------


class MasterWatcherKeepsCaps(ReferenceEngine):
    """create_container starts a master thread that raises CAP_SYS_PTRACE on itself to watch
    the container's /proc entries, and keeps it raised until cleanup_container stops it.

    SPEC §4, master: "effective caps empty at entry and again at return", and "Every rule of
    this table holds for every thread of the process, threads the engine started included".
    Shows in suid and hybrid (real and fake) at the entries and returns of
    post_start_process, monitor_container and cleanup_container; root, userns and fakeroot
    masters already have the capability (in their own user namespace).
    """

    engine_name = "blind5-rpc-master-watcher-keeps-caps"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.container_ns: dict[str, str] = {}

    def _watch(self, pid: int) -> None:
        system = kit_system.current()
        try:
            eff, prm, inh = system.capabilities()
            # BUG: raised once for the thread's whole life ("it is only this thread").
            system.set_capabilities(eff | (_mask("CAP_SYS_PTRACE") & prm), prm, inh)
        except OSError:
            pass  # cannot raise it here: the links below may still be readable
        while not self._stop.wait(0.1):
            for kind in ("mnt", "net", "uts"):
                try:
                    self.container_ns[kind] = os.readlink(f"/proc/{pid}/ns/{kind}")
                except OSError:
                    pass

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        self._watcher = threading.Thread(
            target=self._watch, args=(pid,), name="ns-watch", daemon=True
        )
        self._watcher.start()

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2)


# --- 6. process-wide euid 0, put back on the calling thread only ---------------------------


class EuidBackOnOneThread(ReferenceEngine):
    """The setuid master becomes euid 0 process-wide (setresuid, which glibc applies to every
    thread) to open the container's net namespace, then goes back to U with the kit's
    per-thread setresuid, so the master's other threads stay euid 0.

    SPEC §4, master in suid/hybrid: "r=e=U, saved uid 0, effective caps empty at entry and
    again at return", for every thread. Shows in suid and hybrid on the real backend: the
    monitor and start-waiter threads run monitor_container and post_start_process with euid
    0 and full effective capabilities. On the fake backend the per-thread call is a direct
    system call, refused: create_container fails there.
    """

    engine_name = "blind5-rpc-euid-back-on-one-thread"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        self.netns_fd: int | None = None  # for a veth set up later (master only)

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        system = kit_system.current()
        _, euid, suid = system.getresuid()
        setuid_master = euid != 0 and suid == 0
        if setuid_master:
            # /proc/PID/ns needs ptrace access to the container: root's.
            system.setresuid(-1, 0, -1)
        try:
            self.netns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            if setuid_master:
                # BUG: only this thread goes back to U; the raise above was process-wide.
                linux.thread_setresuid(-1, euid, -1)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        fd, self.netns_fd = self.netns_fd, None
        if fd is not None:
            os.close(fd)


# --- 7. a direct mount(2) on one code path of an RPC method ------------------------------


class DirectTmpfsRPC(ReferenceRPC):
    """``mount`` that mounts tmpfs itself with mount(2), everything else as the reference."""

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        if fstype != "tmpfs":
            super().mount(source, target, fstype, flags, data)
            return
        # The reference's checks, then the tmpfs with its size and mode in one call.
        self._need_namespace("mount", "mount")
        full = self._host_path(target, "mount target")
        if target == "/":
            raise refuse("mount: refusing to mount over the container root")
        mask = 0
        for name in flags:
            if name not in ("ro", "nosuid", "nodev", "noexec"):
                raise refuse(f"mount: flag {name!r} is not allowed")
            mask |= linux.MOUNT_FLAGS[name]
        # BUG: straight to the kernel instead of self.system.mount.
        linux.mount("tmpfs", full, "tmpfs", mask, data)


class DirectTmpfsMount(ReferenceEngine):
    """The RPC server mounts the container's /tmp with a direct mount(2) instead of the
    kit's system interface (the /proc mount and the hostname still go through it).

    SPEC §9: "Engines that do their privileged work through the kit's system interface … are
    fully checkable in fake mode"; "A privileged call that bypasses the system interface is
    refused and reported". Shows only on the fake backend, in every flow (the mount is
    refused with EPERM there, so create_container fails); the real backend behaves exactly
    like the reference.
    """

    engine_name = "blind5-rpc-direct-tmpfs-mount"
    # Only the fake backend refuses a call that bypasses the system interface (HOST-050).
    blind_backend = "fake"
    rpc_methods = DirectTmpfsRPC


# --- 8. a defensive direct umount(2) in cleanup_container, errors swallowed --------------


class StateDirDirectUmount(ReferenceEngine):
    """cleanup_container unmounts its state directory with a direct umount2 "in case it is
    still mounted" and swallows the error, bypassing the system interface.

    SPEC §9: "A privileged call that bypasses the system interface is refused and
    reported" and §11: "In the fake backend, a privileged system call that an engine makes
    directly … never reaches the kernel: it is refused with EPERM, and the ledger records
    the call, the process role and the hook". Shows only on the fake backend, every flow,
    in the master's cleanup_container; the run still exits 0 (the engine ignores the
    error), and on the real backend the call fails harmlessly (EINVAL/EPERM).
    """

    engine_name = "blind5-rpc-state-dir-direct-umount"
    # Only the fake backend refuses a call that bypasses the system interface (HOST-050).
    blind_backend = "fake"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        self.state_dir: str | None = None  # master only, like runc's state directory

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        self.state_dir = tempfile.mkdtemp(prefix="blind5-state-")
        with open(os.path.join(self.state_dir, "pid"), "w") as f:
            f.write(f"{pid}\n")
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        path, self.state_dir = self.state_dir, None
        if path is None:
            return
        try:
            # BUG: a direct umount2 (not through the system interface), defensive only.
            linux.umount(path, linux.MNT_DETACH)
        except OSError:
            pass  # not mounted: the usual case
        try:
            os.unlink(os.path.join(path, "pid"))
        except FileNotFoundError:
            pass
        os.rmdir(path)


# --- 9. the mount plan kept in a module global by stage 1 --------------------------------

#: The RPC calls create_container makes, worked out by prepare_config (BUG: a global).
_PLAN: list[tuple[str, dict[str, Any]]] = []


class StageOneGlobalPlan(ReferenceEngine):
    """prepare_config works out the RPC calls of create_container and keeps them in a module
    global, which is empty in the master: the container gets no hostname, /proc or /tmp.

    SPEC §2 rule 3: "Only JSON-visible fields of the engine config cross from stage 1 to
    later processes; state kept in Python globals in stage 1 is gone later". Shows in every
    flow and backend (a unit test calling prepare_config then create_container in one
    process, with the mock transport, passes); the run exits 0 with no RPC call made.
    """

    engine_name = "blind5-rpc-stage-one-global-plan"
    escapes = (
        "the engine loses its own features (hostname, /proc, /tmp), nothing of the "
        "contract: no SPEC rule says what a container must have mounted or be named"
    )
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        cfg: ReferenceConfig = self.common.engine_config
        plan: list[tuple[str, dict[str, Any]]] = []
        if cfg.hostname is not None:
            plan.append(("sethostname", {"name": cfg.hostname}))
        if cfg.mount_proc:
            plan.append(
                (
                    "mount",
                    {
                        "source": "proc",
                        "target": "/proc",
                        "fstype": "proc",
                        "flags": ["nosuid", "nodev", "noexec"],
                        "data": None,
                    },
                )
            )
        if cfg.mount_tmp:
            plan.append(
                (
                    "mount",
                    {
                        "source": "tmpfs",
                        "target": "/tmp",
                        "fstype": "tmpfs",
                        "flags": ["nosuid", "nodev"],
                        "data": "mode=1777,size=16m",
                    },
                )
            )
        _PLAN[:] = plan

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        for method, args in _PLAN:
            rpc.call(method, **args)


# --- 10. config() called again from a hook to learn the defaults ---------------------------


class ConfigCalledForDefaults(ReferenceEngine):
    """create_container calls the engine's own config() hook again to compare the user's
    options with the defaults, so the master runs config twice, the second time late.

    SPEC §2 rule 1: "Each process calls config then init_config exactly once, before its own
    hook". Shows in the master in every flow and backend (an engine-made call of config after
    create_container's entry); the run exits 0.
    """

    engine_name = "blind5-rpc-config-called-for-defaults"
    escapes = (
        "disputed: config() is a pure factory (SPEC §1: 'returns a fresh, empty "
        "engine-config object'); ORDER-001 counts the starter's calls, as an engine may "
        "call it itself for the defaults"
    )
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg: ReferenceConfig = self.common.engine_config
        defaults = self.config()  # BUG: the hook itself, not ReferenceConfig()
        named = self.common.container_id[:63]
        # Left at the default: the container is named after its id.
        if cfg.hostname == defaults.hostname and hostname_error(named) is None:
            cfg.hostname = named
        super().create_container(ctx, pid, rpc_conn)


# --- 11. the RPC methods initialise the engine again in the RPC server --------------------


class ReinitialisingRPC(ReferenceRPC):
    """The reference's methods, built on an engine it initialises itself."""

    def __init__(self, engine: Any) -> None:
        # BUG: the kit already called config and init_config in this process; the author
        # believed the RPC server gets a bare engine.
        engine.operations.init_config(engine.common, False)
        super().__init__(engine)


class RPCReinitialisesEngine(ReferenceEngine):
    """The RPC methods' constructor calls the engine's init_config again, so the RPC server
    process runs init_config twice.

    SPEC §2 rule 1: "Each process calls config then init_config exactly once, before its own
    hook" (and §1: init_config runs in every process, "right after config"). Shows only in
    the RPC server process, in every flow and backend; the run exits 0.
    """

    engine_name = "blind5-rpc-rpc-reinitialises-engine"
    rpc_methods = ReinitialisingRPC


# --- 12. privileged_stage1 taken for "the starter confines the container itself" ----------


class TrustsPrivilegedStage1(ReferenceEngine):
    """With privileged_stage1 true (the setuid starter) the engine leaves no_new_privs off
    for stage 2, believing the setuid starter already imposes it on the container.

    SPEC §1: "the flag is true only in stage 1 of the setuid flows" (it says nothing about
    what the starter does for later stages); §4, stage 2 in suid: "no_new_privs set". Shows
    in suid and hybrid on both backends (stage 2 runs without no_new_privs); in suid the
    payload can regain host root by exec of any setuid-root binary (the kit's own probe
    binary is under the /tmp the engine covers with a tmpfs, so its setuid-exec probe only
    reports it with mount_tmp=false). root, userns and fakeroot are unchanged.
    """

    engine_name = "blind5-rpc-trusts-privileged-stage1"
    rpc_methods = ReferenceRPC

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        self.setuid_starter = privileged_stage1

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if self.setuid_starter:
            # BUG: stage 1 of the setuid starter runs with no_new_privs set by the kit, and
            # the author took that for the container's too: left off so that ping & co.
            # keep working in the container.
            starter_config.set_no_new_privs(False)


# --- 13. a duplicate of rpc_conn kept open after create_container --------------------------


class KeptRPCConnectionCopy(ReferenceEngine):
    """create_container gives its RPC client a duplicate of rpc_conn (so that "the kit's
    socket stays the kit's") and never closes the client, so the copy outlives the hook.

    SPEC §2: the RPC server "exits when the conn closes; container side waits for it", and
    rule 5: "start_process begins only after create_container returned and the RPC
    connection closed" (a copy keeps it open). Shows in every flow and backend as an RPC
    connection still held by the master when create_container returned (the kit shuts it
    down, so the run goes on and exits 0).
    """

    engine_name = "blind5-rpc-kept-rpc-connection-copy"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg: ReferenceConfig = self.common.engine_config
        # BUG: socket.fromfd dups the descriptor, and nothing closes this client.
        own = socket.fromfd(rpc_conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        self.rpc = RPCClient(own, self.common.engine_name)
        if cfg.hostname is not None:
            self.rpc.sethostname(name=cfg.hostname)
        self.prepare_rootfs(self.rpc, cfg)


# --- 14. errno dropped by an RPC method, so the caller cannot tolerate EPERM ---------------


class LinkUpRPC(ReferenceRPC):
    """The reference's methods plus ``link_up``."""

    def link_up(self, ifname: str) -> None:
        """Bring interface ``ifname`` up in the container's network namespace."""
        self._need_namespace_net()
        try:
            self.system.link_up(ifname)
        except OSError as exc:
            # BUG: a message-only OSError: errno is None on the master's side.
            raise OSError(f"link_up {ifname}: {exc.strerror}") from exc

    def _need_namespace_net(self) -> None:
        cfg = self.engine.common.engine_config  # type: ignore[union-attr]
        if "net" not in cfg.namespaces:
            raise refuse("link_up: the container has no net namespace")


class ErrnoDroppedByMethod(ReferenceEngine):
    """The engine brings lo up through its own RPC method, best effort on EPERM, but the
    method re-raises errors without their errno, so EPERM is not recognised and
    create_container fails.

    SPEC §6: "the reply carries a result or a typed error (errno and message survive)" — only
    if the method raises one. Shows in suid and hybrid (the RPC server lacks CAP_NET_ADMIN
    there) on both backends: "container creation failed", exit 255; root, userns and
    fakeroot run normally.
    """

    engine_name = "blind5-rpc-errno-dropped-by-method"
    rpc_methods = LinkUpRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        starter_config.set_bring_loopback_interface(False)  # done by create_container

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        cfg: ReferenceConfig = self.common.engine_config
        if "net" in cfg.namespaces:
            rpc = RPCClient(rpc_conn, self.common.engine_name)
            try:
                rpc.link_up(ifname="lo")
            except OSError as exc:
                if exc.errno != errno.EPERM:
                    raise
                # no CAP_NET_ADMIN (the setuid RPC server): the container keeps lo down
