"""Correct engines that differ from the reference in ways SPEC.md allows, loaded as
``blind_correct:NAME`` (``tests/`` on ``PYTHONPATH``): the suite must pass each of them in
every flow, so any failure is a false failure of a check.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from kit import system
from kit.contract import EngineConfig
from kit.rpc import RPCClient
from kit.rpc.methods import FileDescriptor, WithFds
from reference_engines.minimal.engine import (
    FORWARDED_SIGNALS,
    ReferenceConfig,
    ReferenceEngine,
    _host_bounding,
)
from reference_engines.minimal.rpc import ReferenceRPC


def _idle_thread(name: str, seconds: float = 30.0) -> threading.Thread:
    """A daemon thread that holds the process's own credentials and does nothing."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(seconds,), name=name, daemon=True)
    thread.start()
    return thread


class HelperThreadsEngine(ReferenceEngine):
    """SPEC §4: "Every rule of this table holds for every thread of the process, threads the
    engine started included" -- the helper threads here hold exactly the process's own
    credentials (they never change one), in stage 1, the master (a heartbeat thread that
    outlives create_container), the RPC server and stage 2 (killed by exec). Legal."""

    engine_name = "blind-helper-threads"

    def prepare_config(self, starter_config):
        _idle_thread("stage1-helper")
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        _idle_thread("master-heartbeat")
        super().create_container(ctx, pid, rpc_conn)

    def start_process(self, master_fd):
        _idle_thread("stage2-helper")
        super().start_process(master_fd)


class _HelperThreadRPC(ReferenceRPC):
    def __init__(self, engine) -> None:
        super().__init__(engine)
        _idle_thread("rpc-helper")


HelperThreadsEngine.rpc_methods = _HelperThreadRPC  # type: ignore[attr-defined]


class RPCFromWorkerEngine(ReferenceEngine):
    """SPEC §2: create_container "prepares the container ... through RPC calls to the RPC
    server" -- nothing says from which thread: here a worker thread makes the calls while
    create_container waits for it (and returns only once it is done). Legal."""

    engine_name = "blind-rpc-from-worker"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):
        errors: list[BaseException] = []

        def work() -> None:
            try:
                ReferenceEngine.create_container(self, ctx, pid, rpc_conn)
            except BaseException as exc:  # handed back to the hook's thread
                errors.append(exc)

        worker = threading.Thread(target=work, name="rpc-worker")
        worker.start()
        worker.join()
        if errors:
            raise errors[0]


class _TempCapsRPC(ReferenceRPC):
    """Raises a permitted capability on its own thread for the duration of the method."""

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        sysc = system.current()
        eff, prm, inh = sysc.capabilities()
        extra = prm & ~eff
        raised = extra & -extra  # the lowest permitted capability not yet effective
        if raised:
            sysc.set_capabilities(eff | raised, prm, inh)
        try:
            super().mount(source, target, fstype, flags, data)
        finally:
            if raised:
                sysc.set_capabilities(eff, prm, inh)


class TempCapsRPCEngine(ReferenceEngine):
    """SPEC §4, RPC server row: "a method may raise more on its own thread and must restore
    them" -- the mount method raises one permitted capability into the effective set of its
    own thread and restores the sets before it returns. Legal."""

    engine_name = "blind-temp-caps-rpc"
    rpc_methods = _TempCapsRPC


class TempCapsMasterEngine(ReferenceEngine):
    """SPEC §4, master row: "effective caps empty at entry and again at return; escalation
    possible" (contract: "a hook may raise them temporarily") -- post_start_process and
    cleanup_container raise one permitted capability on their own thread (never the
    process's uids) and drop it before they return. Legal."""

    engine_name = "blind-temp-caps-master"
    rpc_methods = ReferenceRPC

    @staticmethod
    def _briefly_raise() -> None:
        sysc = system.current()
        eff, prm, inh = sysc.capabilities()
        extra = prm & ~eff
        raised = extra & -extra
        if not raised:
            return
        sysc.set_capabilities(eff | raised, prm, inh)
        try:
            os.stat("/")
        finally:
            sysc.set_capabilities(eff, prm, inh)

    def post_start_process(self, ctx, pid):
        self._briefly_raise()

    def cleanup_container(self, ctx, fatal, status):
        self._briefly_raise()


def _run_true() -> None:
    """A child that exits before the caller goes on (and is reaped by its own waitpid)."""
    subprocess.run(["/bin/true"], check=True, close_fds=True)


class _ChildRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        _run_true()
        super().sethostname(name)


class ChildProcessesEngine(ReferenceEngine):
    """SPEC §11: "a run changes nothing on the host that outlives it"; §7: monitor_container
    "reaps only the container pid" -- every hook (and an RPC method) runs a short child
    process that exits, and is reaped by the code that started it, before the hook returns.
    Legal."""

    engine_name = "blind-child-processes"
    rpc_methods = _ChildRPC

    def prepare_config(self, starter_config):
        _run_true()
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        _run_true()
        super().create_container(ctx, pid, rpc_conn)

    def post_start_process(self, ctx, pid):
        _run_true()

    def cleanup_container(self, ctx, fatal, status):
        _run_true()

    def start_process(self, master_fd):
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        super().start_process(master_fd)


class PollingMonitorEngine(ReferenceEngine):
    """SPEC §7: a conformant monitor_container "forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2
    to the container, reaps only the container pid, and returns its wait status" -- this one
    polls: it drains the channel without blocking, sleeps 20 ms, and uses waitid on the pid.
    Legal."""

    engine_name = "blind-polling-monitor"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):
        while True:
            while not signals.empty():
                sig = signals.get(timeout=0)
                if sig in FORWARDED_SIGNALS:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status
            time.sleep(0.02)


class _ExtraRPC(ReferenceRPC):
    """More methods than the engine calls, and methods that return values."""

    def ping(self, payload: dict[str, int]) -> dict[str, object]:
        return {"pong": payload, "pid": os.getpid()}

    def gethostname(self) -> str:
        return self.system.gethostname()

    def list_dir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def unused(self, a: int, b: int = 2) -> int:
        return a + b


class ExtraRPCEngine(ReferenceEngine):
    """SPEC §6: a request names "<engine>.<method>" and its arguments; the reply carries a
    result -- the engine registers extra methods (some never called) and calls read-only
    ones that return values before and after the reference's work. Legal."""

    engine_name = "blind-extra-rpc"
    rpc_methods = _ExtraRPC

    def create_container(self, ctx, pid, rpc_conn):
        cfg: ReferenceConfig = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        assert rpc.ping(payload={"n": 1})["pong"] == {"n": 1}
        rpc.list_dir(path="/")
        if cfg.hostname is not None:
            rpc.sethostname(name=cfg.hostname)
            assert rpc.gethostname() == cfg.hostname
        self.prepare_rootfs(rpc, cfg)
        rpc.ping(payload={"n": 2})


class UmaskChdirEngine(ReferenceEngine):
    """SPEC §4: the credential is uids/gids, groups, capabilities, securebits, no_new_privs,
    seccomp -- umask and the working directory are not part of it: stage 1, the master and
    stage 2 each set their own umask and working directory. Legal."""

    engine_name = "blind-umask-chdir"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        os.umask(0o077)
        os.chdir("/")
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        os.umask(0o027)
        os.chdir("/")
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(self, ctx, fatal, status):
        os.umask(0o022)

    def start_process(self, master_fd):
        os.umask(0o002)
        super().start_process(master_fd)


class SlowHooksEngine(ReferenceEngine):
    """SPEC §2: a hook that does not return "within its timeout" is the failure -- each hook
    here takes a while (create_container 2.5 s, others 0.5 s), well within the kit's 5 s
    default. Legal."""

    engine_name = "blind-slow-hooks"

    def prepare_config(self, starter_config):
        time.sleep(0.5)
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        time.sleep(2.5)
        super().create_container(ctx, pid, rpc_conn)

    def post_start_process(self, ctx, pid):
        time.sleep(0.5)

    def cleanup_container(self, ctx, fatal, status):
        time.sleep(0.5)

    def start_process(self, master_fd):
        time.sleep(0.5)
        super().start_process(master_fd)


class _SlowRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        time.sleep(0.5)
        super().sethostname(name)


SlowHooksEngine.rpc_methods = _SlowRPC  # type: ignore[attr-defined]


class RootTargetUserEngine(ReferenceEngine):
    """SPEC §4, stage 2 row, root column: "r=e=s=target uid (default 0); caps exactly as
    configured" -- in the root flow the engine runs the payload as uid/gid 1000 with one
    supplementary group, keeping its default capabilities configured. Legal."""

    engine_name = "blind-root-target-user"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        if starter_config.flow == "root":
            starter_config.set_target_uid(1000)
            starter_config.set_target_gids([1000, 100])


class RootAmbientEngine(ReferenceEngine):
    """SPEC §5: set_capabilities for effective/permitted/inheritable/bounding/ambient; §4:
    stage 2 "caps exactly as configured" and the payload "as the kernel derives" -- in the
    root flow the payload runs as uid 1000 with CAP_NET_BIND_SERVICE ambient (and so
    inheritable, permitted and bounding). Legal."""

    engine_name = "blind-root-ambient"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        if starter_config.flow == "root":
            cap = ["CAP_NET_BIND_SERVICE"]
            starter_config.set_target_uid(1000)
            starter_config.set_target_gids([1000])
            for kind in ("effective", "permitted", "inheritable", "bounding", "ambient"):
                starter_config.set_capabilities(kind, cap)


class RslavePropagationEngine(ReferenceEngine):
    """SPEC §5: set_mount_propagation is the engine's choice; §11: nothing of the run may
    reach the host's mount table -- rslave lets host mounts in, none out. Legal."""

    engine_name = "blind-rslave"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        if "mount" in starter_config.ns_flags:
            starter_config.set_mount_propagation("rslave")


class ExplicitStarterConfigEngine(ReferenceEngine):
    """SPEC §5: "A capability set the StarterConfig leaves unset is empty" -- this engine sets
    every set explicitly instead (empty inheritable and ambient), refuses setgroups
    explicitly, and asks for no_new_privs in the root flow too. Legal."""

    engine_name = "blind-explicit-starter-config"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        starter_config.set_capabilities("inheritable", [])
        starter_config.set_capabilities("ambient", [])
        starter_config.set_allow_setgroups(False)
        starter_config.set_no_new_privs()


class SelfConfigCallEngine(ReferenceEngine):
    """SPEC §2 rule 1: "Each process calls config then init_config exactly once, before its
    own hook" (the starter's calls) and §1: config "returns a fresh, empty engine-config
    object" -- so the engine may call its own config() to get the defaults: prepare_config
    and create_container compare the user's config with a fresh default one. Legal."""

    engine_name = "blind-self-config-call"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        defaults = self.config()
        changed = [
            k for k, v in self.common.engine_config.to_json().items() if defaults.to_json()[k] != v
        ]
        del changed  # an engine would log them
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        assert self.config().hostname == "kit-container"
        super().create_container(ctx, pid, rpc_conn)


@dataclass
class _Limits(EngineConfig):
    memory_mb: float = 64.0
    pids: int | None = None
    tags: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _NestedConfig(ReferenceConfig):
    limits: _Limits = field(default_factory=_Limits)
    state: dict[str, int] = field(default_factory=dict)  # the master's own bookkeeping


class NestedConfigEngine(ReferenceEngine):
    """SPEC §2 rule 3: "Only JSON-visible fields of the engine config cross from stage 1 to
    later processes" -- the config has a nested dataclass, a float, an optional int and a dict
    of lists; prepare_config fills nested fields, and the master records its own bookkeeping
    in its copy of the config (the container pid) in create_container. Legal."""

    engine_name = "blind-nested-config"
    rpc_methods = ReferenceRPC

    def config(self) -> _NestedConfig:
        return _NestedConfig()

    def prepare_config(self, starter_config):
        cfg: _NestedConfig = self.common.engine_config
        cfg.limits.tags["flow"] = [len(starter_config.flow)]
        cfg.limits.pids = 512
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        cfg: _NestedConfig = self.common.engine_config
        cfg.state["container_pid"] = pid
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(self, ctx, fatal, status):
        cfg: _NestedConfig = self.common.engine_config
        cfg.state.clear()


class ShellWrapperEngine(ReferenceEngine):
    """SPEC §1: start_process "becomes the payload: it must exec or exit" -- like Apptainer's
    action scripts, it execs /bin/sh, which execs the payload (a second exec, same
    credentials). Legal."""

    engine_name = "blind-shell-wrapper"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd):
        cfg: ReferenceConfig = self.common.engine_config
        os.chdir(cfg.cwd)
        if not os.path.exists(cfg.argv[0]):
            raise FileNotFoundError(errno.ENOENT, f"payload {cfg.argv[0]!r} not found")
        os.execve("/bin/sh", ["/bin/sh", "-c", 'exec "$@"', "sh", *cfg.argv], cfg.env)


class _MinimalNsConfig(ReferenceConfig):
    pass


class MountOnlyEngine(ReferenceEngine):
    """SPEC §5: each namespace "is either created (a flag) or joined" at the engine's choice;
    README: "a namespace your engine does not ask for is not required to be separate" --
    like Apptainer's default, only mount and pid namespaces (plus the flow's user namespace),
    the inherited hostname. Legal (but see SPEC §4's "the master shares none of
    pid/net/uts/ipc/cgroup with them")."""

    engine_name = "blind-mount-only"
    rpc_methods = ReferenceRPC

    def config(self) -> ReferenceConfig:
        return ReferenceConfig(namespaces=["mount", "pid"], hostname=None)


class DumpableEngine(ReferenceEngine):
    """SPEC §4 lists dumpable in the snapshot but no rule on it: like Apptainer's starter,
    the master and the RPC server make themselves non-dumpable (no core dumps, no ptrace
    by the invoking user). Legal."""

    engine_name = "blind-non-dumpable"

    def create_container(self, ctx, pid, rpc_conn):
        system.current().set_dumpable(False)
        super().create_container(ctx, pid, rpc_conn)


class _DumpableRPC(ReferenceRPC):
    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.system.set_dumpable(False)


DumpableEngine.rpc_methods = _DumpableRPC  # type: ignore[attr-defined]


class _MoreMountsRPC(ReferenceRPC):
    def setdomainname(self, name: str) -> None:
        self._need_namespace("uts", "setdomainname")
        raw = name.encode()
        if ctypes.CDLL(None, use_errno=True).setdomainname(raw, len(raw)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setdomainname: {os.strerror(err)}")


class MoreMountsEngine(ReferenceEngine):
    """SPEC §2: create_container "prepares the container (mounts, network...)"; §11: the
    host's hostname, domainname and mounts never change -- these are the container's own:
    tmpfs on /mnt and /dev/shm, an mqueue on /dev/mqueue, and a domainname in its uts
    namespace. Legal."""

    engine_name = "blind-more-mounts"
    rpc_methods = _MoreMountsRPC

    def create_container(self, ctx, pid, rpc_conn):
        super().create_container(ctx, pid, rpc_conn)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.setdomainname(name="kit-domain")
        for target, fstype in (("/mnt", "tmpfs"), ("/dev/shm", "tmpfs"), ("/dev/mqueue", "mqueue")):
            if os.path.isdir(target):
                rpc.mount(source=fstype, target=target, fstype=fstype, flags=["nosuid"], data=None)


class CloseFdsEngine(ReferenceEngine):
    """SPEC §1: start_process "becomes the payload" -- like runc, it closes every inherited
    descriptor above 2 but master_fd (close-on-exec) before exec. Legal."""

    engine_name = "blind-close-fds"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd):
        os.closerange(3, master_fd)
        os.closerange(master_fd + 1, 65536)
        super().start_process(master_fd)


class _FdRPC(ReferenceRPC):
    def open_root(self) -> WithFds:
        return WithFds(True, [os.open("/", os.O_RDONLY | os.O_DIRECTORY)])

    def fstat_mode(self, fd: FileDescriptor) -> int:
        try:
            return os.fstat(fd).st_mode
        finally:
            os.close(fd)


class FdPassingEngine(ReferenceEngine):
    """SPEC §6: "File descriptors may ride along (SCM_RIGHTS)" -- create_container gets a
    descriptor of the container's root from the RPC server and sends one of its own; it
    closes what it got before returning. Legal."""

    engine_name = "blind-fd-passing"
    rpc_methods = _FdRPC

    def create_container(self, ctx, pid, rpc_conn):
        super().create_container(ctx, pid, rpc_conn)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        _, fds = rpc.open_root()
        for fd in fds:
            os.close(fd)
        r, w = os.pipe()
        try:
            rpc.fstat_mode(fd=FileDescriptor(r))
        finally:
            os.close(r)
            os.close(w)


class InitConfigEngine(ReferenceEngine):
    """SPEC §1: init_config "stores the decoded Common" -- this one also remembers the flag
    and, in stage 1 of a privileged flow, checks the config's argv early. Legal."""

    engine_name = "blind-init-config"
    rpc_methods = ReferenceRPC

    def init_config(self, common, privileged_stage1):
        super().init_config(common, privileged_stage1)
        self.privileged_stage1 = privileged_stage1
        self.role = "stage1" if privileged_stage1 else "unknown"


class AllSignalsMonitorEngine(ReferenceEngine):
    """SPEC §7: a conformant monitor_container "forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/
    SIGUSR2 to the container" (not "only those") -- like Apptainer, this one forwards every
    signal it gets but SIGCHLD (and the job-control/window ones it cannot sensibly pass).
    Legal."""

    engine_name = "blind-all-signals-monitor"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):
        skip = {signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG, signal.SIGPIPE}
        while True:
            sig = signals.get(timeout=0.25)
            if sig is not None and sig not in skip:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class _DaemonRPC(ReferenceRPC):
    def start_daemon(self) -> int:
        """A helper process inside the container's namespaces (a FUSE daemon, a DNS stub),
        which lives as long as the container's pid namespace."""
        child = os.fork()
        if child == 0:
            try:
                os.setsid()
                if os.fork() == 0:
                    signal.pthread_sigmask(signal.SIG_SETMASK, set())
                    time.sleep(3600)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        return 0


class ContainerDaemonEngine(ReferenceEngine):
    """SPEC §2: create_container prepares the container "through RPC calls to the RPC
    server"; §11: nothing outlives the run -- the RPC server starts a daemon in the
    container's namespaces; it dies with the container's pid namespace. Legal (only with a
    pid namespace, which this engine always asks for)."""

    engine_name = "blind-container-daemon"
    rpc_methods = _DaemonRPC

    def create_container(self, ctx, pid, rpc_conn):
        super().create_container(ctx, pid, rpc_conn)
        RPCClient(rpc_conn, self.common.engine_name).start_daemon()


class MasterHelperProcessEngine(ReferenceEngine):
    """SPEC §11: "a run changes nothing on the host that outlives it"; §7: monitor_container
    reaps only the container -- create_container starts a helper process in the master (a log
    forwarder), cleanup_container stops and reaps it. Legal."""

    engine_name = "blind-master-helper-process"
    rpc_methods = ReferenceRPC
    helper: subprocess.Popen[bytes] | None = None

    def create_container(self, ctx, pid, rpc_conn):
        self.helper = subprocess.Popen(
            ["/bin/sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(self, ctx, fatal, status):
        if self.helper is not None:
            self.helper.kill()  # SIGTERM is blocked: the master's mask is inherited
            self.helper.wait()


class _ChdirRPC(ReferenceRPC):
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        os.chdir("/tmp" if os.path.isdir("/tmp") else "/")  # works relative to its cwd
        super().mount(source, target, fstype, flags, data)


class RPCChdirEngine(ReferenceEngine):
    """SPEC §2: the RPC server shares root/cwd with the container side (CLONE_FS); stage 2
    enters its configured cwd in start_process anyway -- so an RPC method may change the
    shared working directory. Legal."""

    engine_name = "blind-rpc-chdir"
    rpc_methods = _ChdirRPC


class FexecveEngine(ReferenceEngine):
    """SPEC §1: start_process must exec -- it opens the payload and execs it by descriptor
    (fexecve, a close-on-exec O_PATH-less descriptor). Legal."""

    engine_name = "blind-fexecve"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd):
        cfg: ReferenceConfig = self.common.engine_config
        os.chdir(cfg.cwd)
        try:
            fd = os.open(cfg.argv[0], os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"payload {cfg.argv[0]!r} not found") from None
        os.execve(fd, cfg.argv, cfg.env)


class WideBoundingEngine(ReferenceEngine):
    """SPEC §5: "A capability set the StarterConfig leaves unset is empty ..., the bounding set
    included" and §4: stage 2 caps "exactly as configured" -- this engine configures its
    bounding set on purpose: in the root flow the host's whole bounding set (permitted stays
    the default), elsewhere CAP_CHOWN alone (nothing permitted: no privilege, no_new_privs).
    Disputed: in the root flow this is the zoo's bounding-left-full mutant (PRIV-PAYLOAD-002:
    a root payload regains every bounding capability at exec)."""

    engine_name = "blind-wide-bounding"
    false_failure = (
        "disputed (see the docstring): in the root flow the host's whole bounding set is the "
        "zoo's bounding-left-full mutant (PRIV-PAYLOAD-002). (Its fakeroot and hybrid "
        "failures were the check's: exec under no_new_privs gains nothing stage 2 has not "
        "permitted, which PRIV-PAYLOAD-003's model now knows.)"
    )
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        if starter_config.flow == "root":
            starter_config.set_capabilities("bounding", sorted(_host_bounding()))
        else:
            starter_config.set_capabilities("bounding", ["CAP_CHOWN"])


class ThreadedMonitorEngine(ReferenceEngine):
    """SPEC §7: monitor_container forwards the signals and reaps only the container -- this one
    blocks in waitpid(pid) on its own thread while a helper thread (same credentials) forwards
    the signals. Legal."""

    engine_name = "blind-threaded-monitor"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):
        done = threading.Event()

        def forward() -> None:
            while not done.is_set():
                sig = signals.get(timeout=0.1)
                if sig in FORWARDED_SIGNALS:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass

        forwarder = threading.Thread(target=forward, name="signal-forwarder", daemon=True)
        forwarder.start()
        try:
            return os.waitpid(pid, 0)[1]
        finally:
            done.set()
            forwarder.join()


class LateEOFEngine(ThreadedMonitorEngine):
    """The reaping race made certain (for a test of the kit): no pid namespace, and a child
    of stage 2 holds a copy of master_fd for 0.5 s, so the master's start waiter sees EOF
    only after the payload exited and the monitor reaped it."""

    engine_name = "blind-late-eof"

    def config(self) -> ReferenceConfig:
        return ReferenceConfig(namespaces=["mount", "uts"], mount_proc=False, mount_tmp=False)

    def start_process(self, master_fd):
        if os.fork() == 0:
            time.sleep(0.5)  # holds the inherited master_fd
            os._exit(0)
        super().start_process(master_fd)


class ClosesRPCWhenDoneEngine(ReferenceEngine):
    """SPEC §2: create_container gets a connected socket and "on success" the kit closes it;
    nothing forbids the hook closing its own socket object once all its calls are done (a
    `with` block around the client). Legal."""

    engine_name = "blind-closes-rpc-when-done"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):
        with rpc_conn:
            super().create_container(ctx, pid, rpc_conn)


class HandlesRPCErrorsEngine(ReferenceEngine):
    """SPEC §6: "the reply carries a result or a typed error (errno and message survive)"
    and the server "answers an unknown method ... with an error reply and keeps serving" --
    create_container probes an optional method the server lacks and tries a mount the policy
    refuses, handles both errors, and goes on. Legal."""

    engine_name = "blind-handles-rpc-errors"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        try:
            rpc.call("features")
        except Exception:  # an older server: no optional features
            pass
        try:
            rpc.mount(source="sysfs", target="/sys", fstype="sysfs", flags=["rw"], data=None)
        except (PermissionError, ValueError):
            pass  # sysfs is optional
        super().create_container(ctx, pid, rpc_conn)


class RootGroupsOnlyEngine(ReferenceEngine):
    """SPEC §5: set_target_gids is its own setter ("primary gid first, then supplementary") --
    in the root flow the payload keeps uid 0 but runs with gid 100 and groups 100, 1000.
    Legal."""

    engine_name = "blind-root-groups-only"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        if starter_config.flow == "root":
            starter_config.set_target_gids([100, 1000])


class HybridSetgroupsEngine(ReferenceEngine):
    """SPEC §5: set_allow_setgroups is the engine's choice -- in the hybrid flow the master
    writes the maps with its privilege, so the container's user namespace may allow
    setgroups. Legal."""

    engine_name = "blind-hybrid-setgroups"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        super().prepare_config(starter_config)
        if starter_config.flow == "hybrid":
            starter_config.set_allow_setgroups(True)


class Stage2ProcessStateEngine(ReferenceEngine):
    """SPEC §4: the credential is uids/gids, groups, caps, securebits, no_new_privs, seccomp
    -- stage 2 changes only what is not: its name, its session, a resource limit and its
    parent-death signal, before the exec. Legal."""

    engine_name = "blind-stage2-process-state"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd):
        import resource

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, b"engine-stage2", 0, 0, 0)  # PR_SET_NAME
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        try:
            os.setsid()
        except PermissionError:
            pass  # already a process group leader
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
        super().start_process(master_fd)


class _LeastPrivilegeRPC(ReferenceRPC):
    """Keeps only the capabilities its methods need (CAP_SYS_ADMIN), in every flow: the
    others leave the permitted and effective sets when the methods object is built."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        keep = 1 << 21  # CAP_SYS_ADMIN
        eff, prm, inh = self.system.capabilities()
        self.system.set_capabilities(eff & keep, prm & keep, inh & keep)


class LeastPrivilegeRPCEngine(ReferenceEngine):
    """SPEC §4, RPC server row: root "uid 0, container namespaces"; suid "e=U, only
    CAP_SYS_ADMIN effective and a small bounding set"; userns/fakeroot "in the ns, no host
    privilege" -- the server drops every capability its methods do not need before serving
    (the uids stay). Legal."""

    engine_name = "blind-least-privilege-rpc"
    rpc_methods = _LeastPrivilegeRPC


class NoPidNamespaceEngine(ReferenceEngine):
    """SPEC §5: each namespace is created at the engine's choice; §2 rule 9: "with a new pid
    namespace, stage 2 sees itself as pid 1" (so one is optional) -- like Apptainer's
    default, no pid namespace (and so no new /proc). Legal."""

    engine_name = "blind-no-pid-namespace"
    rpc_methods = ReferenceRPC

    def config(self) -> ReferenceConfig:
        return ReferenceConfig(
            namespaces=["mount", "uts", "ipc", "net", "cgroup"], mount_proc=False
        )


class NoNamespacesEngine(ReferenceEngine):
    """SPEC §5: the namespaces are the engine's choice (the flow adds only the user
    namespace) -- this engine asks for none: the container is the host's in root and suid,
    only a user namespace in the others; no hostname, no mounts, no RPC call. Legal."""

    engine_name = "blind-no-namespaces"
    rpc_methods = ReferenceRPC

    def config(self) -> ReferenceConfig:
        return ReferenceConfig(namespaces=[], hostname=None, mount_proc=False, mount_tmp=False)


def _log(stream: str, text: str) -> None:
    """One line to stdout or stderr, flushed: what a chatty engine does."""
    fd = 1 if stream == "out" else 2
    os.write(fd, f"[engine] {text}\n".encode())


class VerboseStderrEngine(ReferenceEngine):
    """Nothing in SPEC.md keeps an engine from logging -- this one writes a line to stderr
    in every hook of every process (stage 2 included, before the exec). Legal."""

    engine_name = "blind-verbose-stderr"

    def prepare_config(self, starter_config):
        _log("err", f"prepare_config in flow {starter_config.flow}")
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        _log("err", f"create_container for pid {pid}")
        super().create_container(ctx, pid, rpc_conn)

    def post_start_process(self, ctx, pid):
        _log("err", "payload started")

    def monitor_container(self, pid, signals):
        status = super().monitor_container(pid, signals)
        _log("err", f"container exited: status {status}")
        return status

    def cleanup_container(self, ctx, fatal, status):
        _log("err", f"cleanup: fatal={fatal!r}")

    def start_process(self, master_fd):
        _log("err", "exec of the payload")
        super().start_process(master_fd)


class _VerboseRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        _log("err", f"sethostname {name}")
        super().sethostname(name)


VerboseStderrEngine.rpc_methods = _VerboseRPC  # type: ignore[attr-defined]


class VerboseStdoutEngine(ReferenceEngine):
    """Like :class:`VerboseStderrEngine`, but the starter-side processes (stage 1 and the
    master) log to stdout, never stage 2 (whose stdout is the payload's). Legal."""

    engine_name = "blind-verbose-stdout"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):
        _log("out", "prepare_config")
        super().prepare_config(starter_config)

    def create_container(self, ctx, pid, rpc_conn):
        _log("out", "create_container")
        super().create_container(ctx, pid, rpc_conn)

    def post_start_process(self, ctx, pid):
        _log("out", "payload started")

    def cleanup_container(self, ctx, fatal, status):
        _log("out", "cleanup")


class EmptyEnvironmentEngine(ReferenceEngine):
    """SPEC.md says nothing of the payload's environment -- this engine gives it none at all
    (no PATH, no HOME) and starts it in /tmp. Legal."""

    engine_name = "blind-empty-environment"
    rpc_methods = ReferenceRPC

    def config(self) -> ReferenceConfig:
        return ReferenceConfig(env={}, cwd="/tmp")


class TempCapsCreateEngine(ReferenceEngine):
    """SPEC §4, master row: "effective caps empty at entry and again at return"; contract
    (create_container): "a hook may raise them temporarily" -- create_container raises one
    permitted capability on its own thread for 0.2 s at its start, while monitor_container
    may be entering on another thread. Disputed: §4 also makes the rule hold for every
    thread at every hook entry."""

    engine_name = "blind-temp-caps-create"
    false_failure = (
        "disputed (see the docstring): the contract lets create_container raise a capability "
        "temporarily, while SPEC §4 makes the master's rule hold for every thread at every hook "
        "entry; PRIV-MASTER-002 reads the monitor's entry during the raise (suid, hybrid)"
    )
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):
        sysc = system.current()
        eff, prm, inh = sysc.capabilities()
        raised = (prm & ~eff) & -(prm & ~eff)
        if raised:
            sysc.set_capabilities(eff | raised, prm, inh)
            try:
                time.sleep(0.2)
            finally:
                sysc.set_capabilities(eff, prm, inh)
        super().create_container(ctx, pid, rpc_conn)


class CleanupReapsOwnChildrenEngine(ReferenceEngine):
    """SPEC §7: "A conformant monitor_container ... reaps only the container pid" (a rule of
    monitor_container) -- this engine leaves its helper children to cleanup_container, which
    reaps whatever zombies it finds (waitpid(-1, WNOHANG)) after the container is gone.
    Disputed: the master's other children are the kit's."""

    engine_name = "blind-cleanup-reaps-children"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):
        subprocess.Popen(["/bin/true"], stdin=subprocess.DEVNULL)
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(self, ctx, fatal, status):
        time.sleep(0.05)
        while True:
            try:
                wpid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if wpid == 0:
                return


class InitConfigNormalizesEngine(ReferenceEngine):
    """SPEC §1: init_config "stores the decoded Common"; §2 rule 3: only JSON-visible fields
    cross -- this engine also fills a default into the decoded config in init_config, the
    same way in every process (a PATH for the payload when the user gave none). Legal."""

    engine_name = "blind-init-config-normalizes"
    rpc_methods = ReferenceRPC

    def config(self) -> ReferenceConfig:
        return ReferenceConfig(env={})

    def init_config(self, common, privileged_stage1):
        super().init_config(common, privileged_stage1)
        cfg: ReferenceConfig = common.engine_config
        cfg.env.setdefault("PATH", "/usr/bin:/bin")


class LazyMonitorEngine(ReferenceEngine):
    """SPEC §7 sets no latency for monitor_container -- this one wakes once a second: it
    forwards what arrived meanwhile and looks whether the container exited. Legal."""

    engine_name = "blind-lazy-monitor"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):
        while True:
            time.sleep(1.0)
            while (sig := signals.get(timeout=0)) is not None:
                if sig in FORWARDED_SIGNALS:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                return status


class ManyRPCCallsEngine(ReferenceEngine):
    """SPEC §6 sets no limit on the number of requests -- create_container makes 1500 small
    calls (one per file it would copy, say) before the reference's work. Legal."""

    engine_name = "blind-many-rpc-calls"
    rpc_methods = _ExtraRPC

    def create_container(self, ctx, pid, rpc_conn):
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        for n in range(1500):
            rpc.ping(payload={"n": n})
        super().create_container(ctx, pid, rpc_conn)
