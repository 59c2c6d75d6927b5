"""Blind round 5, RPC area: correct engines in shapes the SPEC allows and the reference skips.

Each engine below extends the reference engine in a way SPEC.md permits for §1, §2 rules
1-3, §4's RPC-server rows, §6 (RPC) and §9 (the fake backend): an RPC method that raises a
capability on its own thread and restores it, helper threads that never touch credentials
(in the master and in the RPC server), extra JSON-visible config fields filled by stage 1,
descriptors riding along both ways, and work done through the system interface in another
order. They were written from SPEC.md and the reference engine alone, without reading the
conformance suite; any failure of them in the suite is a false failure.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from kit.contract import Common, ConfigError, Context, EngineConfig, WaitStatus
from kit.rpc import FileDescriptor, RPCClient, WithFds
from kit.starter.config import StarterConfig
from kit.system import linux
from reference_engines.minimal.engine import ReferenceConfig, ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC, hostname_error, refuse

# --- 1. an RPC method that raises a capability on its own thread and restores it ----------


class LinkUpRPC(ReferenceRPC):
    """The reference's methods plus ``link_up``."""

    def link_up(self, ifname: str) -> None:
        """Bring ``ifname`` up in the container's network namespace. The setuid server has
        CAP_NET_ADMIN permitted, not effective: raised on this thread for the call only."""
        cfg = self.engine.common.engine_config  # type: ignore[union-attr]
        if "net" not in cfg.namespaces:
            raise refuse("link_up: the container has no net namespace")
        if not isinstance(ifname, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", ifname):
            raise ValueError(f"link_up: invalid interface name {ifname!r}")
        eff, prm, inh = self.system.capabilities()
        wanted = linux.caps_to_mask(["CAP_NET_ADMIN"]) & prm
        raised = wanted & ~eff
        if raised:
            self.system.set_capabilities(eff | raised, prm, inh)
        try:
            self.system.link_up(ifname)
        finally:
            if raised:
                # Exactly the sets the method found, whatever happened in between.
                self.system.set_capabilities(eff, prm, inh)


class RaiseOnOwnThread(ReferenceEngine):
    """Brings ``lo`` up itself, through an RPC method that raises CAP_NET_ADMIN on its own
    thread for the duration of the call and restores the exact sets in ``finally``.

    SPEC §4, RPC server: "a method may raise more on its own thread and must restore them".
    Correct in every flow and backend (the raise matters in suid and hybrid).
    """

    engine_name = "blind5-rpc-ok-raise-on-own-thread"
    rpc_methods = LinkUpRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        starter_config.set_bring_loopback_interface(False)  # create_container does it

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg: ReferenceConfig = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        if "net" in cfg.namespaces:
            rpc.link_up(ifname="lo")
        if cfg.hostname is not None:
            rpc.sethostname(name=cfg.hostname)
        self.prepare_rootfs(rpc, cfg)


# --- 2. a worker thread in the master that never touches credentials ---------------------


class MasterWatchdogThread(ReferenceEngine):
    """create_container starts a master thread that samples the container's state from
    /proc/PID/stat until cleanup_container stops it; it never touches a credential.

    SPEC §4: the privilege rules hold "for every thread of the process, threads the engine
    started included" — and this thread has exactly the master's credentials. Correct in
    every flow and backend.
    """

    engine_name = "blind5-rpc-ok-master-watchdog-thread"
    rpc_methods = ReferenceRPC

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.states: list[str] = []  # the container's process states, as sampled

    def _sample(self, pid: int, ctx: Context) -> None:
        while not self._stop.wait(0.05):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue  # gone or reaped: the monitor reports it
            if not self.states or self.states[-1] != state:
                self.states.append(state)

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        self._thread = threading.Thread(
            target=self._sample, args=(pid, ctx), name="watchdog", daemon=True
        )
        self._thread.start()
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2)


# --- 3. extra JSON-visible config fields, filled by stage 1 ------------------------------


@dataclass
class TmpOptions(EngineConfig):
    """The container's /tmp (a nested config: crosses as a JSON object)."""

    size: str = "16m"
    mode: str = "1777"


@dataclass
class ExtraFieldsConfig(ReferenceConfig):
    """The reference's fields plus nested /tmp options, labels, and what stage 1 worked out
    (fields too, so that they reach the master and the RPC server)."""

    tmp: TmpOptions = field(default_factory=TmpOptions)
    labels: dict[str, str] = field(default_factory=dict)
    name_from_id: bool = True  # hostname derived from the container id
    #: Filled by prepare_config; not user options.
    resolved_hostname: str | None = None
    stage1_flow: str | None = None


class ExtraConfigFields(ReferenceEngine):
    """Adds config fields (a nested dataclass, a dict, a bool) and has prepare_config store
    what it works out (the hostname, the flow) in fields, which the master then uses.

    SPEC §2 rule 3: "Only JSON-visible fields of the engine config cross from stage 1 to
    later processes" — which is what this engine relies on. Correct in every flow and
    backend.
    """

    engine_name = "blind5-rpc-ok-extra-config-fields"
    rpc_methods = ReferenceRPC

    def config(self) -> ExtraFieldsConfig:
        return ExtraFieldsConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg: ExtraFieldsConfig = self.common.engine_config
        if cfg.resolved_hostname is not None or cfg.stage1_flow is not None:
            raise ConfigError("resolved_hostname/stage1_flow: set by the engine, not options")
        if not re.fullmatch(r"[0-9]+[kmg]?", cfg.tmp.size):
            raise ConfigError(f"tmp.size: {cfg.tmp.size!r} is not a tmpfs size")
        if not re.fullmatch(r"[0-7]{3,4}", cfg.tmp.mode):
            raise ConfigError(f"tmp.mode: {cfg.tmp.mode!r} is not an octal mode")
        super().prepare_config(starter_config)
        if cfg.hostname is not None and cfg.name_from_id:
            named = re.sub(r"[^a-z0-9-]", "-", self.common.container_id.lower())[:63].strip("-")
            if hostname_error(named) is None:
                cfg.resolved_hostname = named
        cfg.stage1_flow = starter_config.flow

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg: ExtraFieldsConfig = self.common.engine_config
        if cfg.stage1_flow is None:
            raise RuntimeError("stage 1's fields did not reach the master")
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        name = cfg.resolved_hostname or cfg.hostname
        if name is not None:
            rpc.sethostname(name=name)
        if cfg.mount_proc:
            rpc.mount(
                source="proc",
                target="/proc",
                fstype="proc",
                flags=["nosuid", "nodev", "noexec"],
                data=None,
            )
        if cfg.mount_tmp:
            rpc.mount(
                source="tmpfs",
                target="/tmp",
                fstype="tmpfs",
                flags=["nosuid", "nodev"],
                data=f"mode={cfg.tmp.mode},size={cfg.tmp.size}",
            )


# --- 4. descriptors riding along both ways; the system interface in another order --------


class FdRPC(ReferenceRPC):
    """The reference's methods plus two that take or give a descriptor."""

    def apply_plan(self, plan: FileDescriptor) -> int:
        """Read a JSON mount plan from ``plan`` (a pipe the master wrote and closed), close
        it, and apply it: /tmp, then /proc, then the hostname. Returns the steps done."""
        try:
            chunks = []
            while chunk := os.read(plan, 65536):
                chunks.append(chunk)
                if sum(map(len, chunks)) > 1 << 16:
                    raise ValueError("apply_plan: the plan is larger than 64 KiB")
        finally:
            os.close(plan)  # the method owns the descriptors it receives
        steps = json.loads(b"".join(chunks))
        if not isinstance(steps, dict):
            raise ValueError("apply_plan: the plan must be a JSON object")
        done = 0
        if steps.get("tmp"):
            self.mount("tmpfs", "/tmp", "tmpfs", ["nosuid", "nodev"], "mode=1777,size=8m")
            done += 1
        if steps.get("proc"):
            self.mount("proc", "/proc", "proc", ["nosuid", "nodev", "noexec"], None)
            done += 1
        hostname = steps.get("hostname")
        if hostname is not None:
            self.sethostname(hostname)
            done += 1
        return done

    def uts_handle(self) -> WithFds:
        """A descriptor of this process's uts namespace, for the master to record which one
        the container got (the server closes its copy once sent)."""
        fd = os.open("/proc/self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
        return WithFds(value="uts", fds=[fd])


class FdRideAlong(ReferenceEngine):
    """Sends the RPC server its plan through a pipe (a FileDescriptor argument) and gets a
    descriptor back (WithFds), closing every descriptor on both sides; the server mounts
    /tmp before /proc and sets the hostname last, all through the system interface.

    SPEC §6: "File descriptors may ride along (SCM_RIGHTS)"; §9: work through the system
    interface is "fully checkable in fake mode". Correct in every flow and backend.
    """

    engine_name = "blind5-rpc-ok-fd-ride-along"
    rpc_methods = FdRPC

    def __init__(self) -> None:
        self.container_uts: tuple[int, int] | None = None  # (dev, ino), master only

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg: ReferenceConfig = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        plan = {"tmp": cfg.mount_tmp, "proc": cfg.mount_proc, "hostname": cfg.hostname}
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            with os.fdopen(w, "wb") as f:
                f.write(json.dumps(plan).encode())
            rpc.apply_plan(plan=FileDescriptor(r))
        finally:
            os.close(r)  # the caller keeps ownership of what it sends
        reply = rpc.uts_handle()
        if not isinstance(reply, WithFds) or len(reply.fds) != 1:
            raise RuntimeError(f"uts_handle: expected one descriptor, got {reply!r}")
        (fd,) = reply.fds
        try:
            st = os.fstat(fd)
            self.container_uts = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)


# --- 5. per-process state set once in init_config; a quiet thread in the RPC server ------


class CountingRPC(ReferenceRPC):
    """The reference's methods, counted; a thread of the RPC server, started by the first
    call, only waits."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self._calls: list[str] = []
        self._wake = threading.Event()
        self._reporter: threading.Thread | None = None  # started by the first call

    def _report(self) -> None:
        """Wakes on every call; keeps the count for a debugger. No credential involved."""
        while True:
            self._wake.wait()
            self._wake.clear()

    def _note(self, what: str) -> None:
        if self._reporter is None:
            # Started inside a method, with nothing raised: it has the server's credentials.
            self._reporter = threading.Thread(target=self._report, name="rpc-stats", daemon=True)
            self._reporter.start()
        self._calls.append(what)
        self._wake.set()

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        self._note(f"mount {target}")
        super().mount(source, target, fstype, flags, data)

    def sethostname(self, name: str) -> None:
        self._note("sethostname")
        super().sethostname(name)

    def calls(self) -> list[str]:
        """What this server did so far."""
        return list(self._calls)


class InitOnceQuietRPCThread(ReferenceEngine):
    """Overrides init_config to derive per-process state once (and to note the
    privileged_stage1 flag for stage 1 only), and runs an RPC server helper thread that
    never touches a credential.

    SPEC §1/§2 rule 1: init_config runs once in every process, before its hook, and
    "privileged_stage1 is true only in stage 1 of suid and hybrid"; §4: rules hold for the
    engine's threads too (this one has the server's credentials). Correct in every flow and
    backend.
    """

    engine_name = "blind5-rpc-ok-init-once-quiet-rpc-thread"
    rpc_methods = CountingRPC

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        cfg: ReferenceConfig = common.engine_config
        # Derived here, once per process, from JSON-visible fields only.
        self.wants_mounts = bool(cfg.mount_proc or cfg.mount_tmp)
        self.setuid_stage1 = privileged_stage1  # meaningful in stage 1 only

    def prepare_config(self, starter_config: StarterConfig) -> None:
        if self.setuid_stage1 != starter_config.is_suid:
            raise ConfigError(
                f"privileged_stage1={self.setuid_stage1} in flow {starter_config.flow}"
            )
        super().prepare_config(starter_config)

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        done = rpc.calls()
        if self.wants_mounts and not any(c.startswith("mount") for c in done):
            raise OSError(errno.EIO, f"the RPC server made no mount: {done}")
