"""Correct engines of blind round 8 (flows), written from SPEC.md alone (not from the suite).

:class:`ScratchFlowEngine` is a small engine written from scratch (it imports nothing of
``reference_engines``), conformant in all five flows: stage 1 fills the StarterConfig and the
engine config, the master keeps a state directory of its own in the run's ``TMPDIR`` and sets
the container up through two RPC methods (the hostname, a tmpfs), stage 2 execs the payload,
the monitor forwards the five signals of SPEC §7 and reaps the container, the cleanup removes
the state directory and tolerates any partial setup. ``tests/blind8_flow.py`` builds its
twelve buggy engines on it.

Two more engines are correct but unusual:

- :class:`JoinOnlyFlowEngine` runs join-only (SPEC §5) where the starter may join: in the
  root and suid flows, inside the kit's host sandbox, it joins the uts, ipc and net
  namespaces of the sandbox's pid 1 by path and creates nothing, so only ``config``,
  ``init_config``, ``prepare_config`` and ``start_process`` run; elsewhere it is the base.
- :class:`TargetIdentityFlowEngine` gives the payload a target uid and gids in the root
  flow (nobody, with a supplementary group) and one capability in every set of the root
  flow's stage 2, and, as SPEC §4 requires of a non-root caller, no target elsewhere.

Loaded as ``blind8_flow_correct:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here
runs at import time.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from kit import system
from kit.contract import (
    ConfigError,
    Context,
    EngineConfig,
    Operations,
    SignalChannel,
    WaitStatus,
)
from kit.rpc import RPCClient

if TYPE_CHECKING:
    from kit.starter.config import StarterConfig

#: The signals a monitor forwards to the container (SPEC §7), by name.
FORWARDED: tuple[str, ...] = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
#: How long the monitor waits for a signal before it looks at the container again.
MONITOR_POLL = 0.05
#: The payload's PATH (its whole environment is built by start_process).
PAYLOAD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The environment variable the kit's host sandbox sets: "MNT:UTS" inode numbers.
SANDBOX_ENV = "KIT_HOST_SANDBOX"
#: A hostname the engine accepts (a conservative subset of RFC 1123).
HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,62})")
#: Flows whose invoking user is not root and who needs a user namespace of its own.
USERNS_FLOWS = ("userns", "fakeroot", "hybrid")


def inside_kit_sandbox() -> bool:
    """Whether this process is in the kit's host sandbox (its mount and uts namespaces are
    the ones the sandbox announces): what would touch "the host" is done only there."""
    try:
        mnt, uts = (int(x) for x in os.environ.get(SANDBOX_ENV, "").split(":"))
        return (
            os.stat("/proc/self/ns/mnt").st_ino == mnt
            and os.stat("/proc/self/ns/uts").st_ino == uts
        )
    except (ValueError, OSError):
        return False


@dataclass
class ScratchFlowConfig(EngineConfig):
    """The engine config. Every value a later process needs is a dataclass field: only those
    cross from stage 1 (SPEC §2 rule 3)."""

    #: The container's hostname; empty: "sf-" and the start of the container id.
    hostname: str = ""
    #: Where the RPC server mounts a small tmpfs in the container's mount namespace.
    scratch: str = "/mnt"
    #: Filled by prepare_config: the master's state directory.
    state_dir: str = ""
    #: Filled by prepare_config: the names of the signals the monitor forwards.
    forward: list[str] = field(default_factory=list)
    #: Filled by prepare_config: uid and gid that own the tmpfs, as the RPC server's user
    #: namespace numbers them (None: root's).
    scratch_owner: list[int] | None = None


class ScratchFlowRPC:
    """The RPC methods, served by the RPC server with its privileges (SPEC §4, §6)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        """Set the container's hostname (the RPC server is in its uts namespace)."""
        self.system.sethostname(name)

    def mount_tmpfs(self, target: str, owner: list[int] | None = None) -> str:
        """Mount a small tmpfs on ``target``; return the mount data used."""
        if not os.path.isabs(target):
            raise ValueError(f"mount_tmpfs: target must be absolute, got {target!r}")
        options = ["mode=0755", "size=1m"]
        if owner is not None:
            if len(owner) != 2:
                raise ValueError(f"mount_tmpfs: owner must be [uid, gid], got {owner!r}")
            options += [f"uid={owner[0]}", f"gid={owner[1]}"]
        data = ",".join(options)
        self.system.mount("tmpfs", target, "tmpfs", ["nosuid", "nodev"], data)
        return data


class ScratchFlowEngine(Operations):
    """A small engine written from scratch, conformant in all five flows."""

    engine_name = "blind8-flow-scratch"
    rpc_methods: type = ScratchFlowRPC

    # -- helpers ------------------------------------------------------------------------------
    @property
    def cfg(self) -> ScratchFlowConfig:
        return cast(ScratchFlowConfig, self.common.engine_config)

    def namespaces(self, sc: StarterConfig) -> list[str]:
        """The namespaces the container gets."""
        kinds = ["mount", "pid", "uts", "ipc", "net"]
        if sc.flow in USERNS_FLOWS:
            kinds.append("user")
        return kinds

    def fill_starter_config(self, sc: StarterConfig) -> None:
        """Namespaces, id maps and flags for the flow (SPEC §3, §5)."""
        sc.set_ns_flags(self.namespaces(sc))
        if sc.flow in USERNS_FLOWS:
            inside = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
            sc.add_uid_mappings([(inside[0], sc.invoker_uid, 1)])
            sc.add_gid_mappings([(inside[1], sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_bring_loopback_interface()
        sc.set_mount_propagation("rprivate")
        if sc.flow != "root":
            sc.set_no_new_privs()

    def scratch_owner(self, sc: StarterConfig) -> list[int] | None:
        """Who owns the tmpfs, in the RPC server's user namespace: the payload's ids where
        the payload is not root there (suid: U on the host; userns: U mapped to itself)."""
        if sc.flow in ("suid", "userns"):
            return [sc.invoker_uid, sc.invoker_gid]
        return None

    def signals_to_forward(self) -> set[int]:
        return {signal.Signals[name] for name in self.cfg.forward or FORWARDED}

    def forward_signal(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # exited meanwhile: its status comes next

    def reserve_state_dir(self) -> None:
        """Stage 1: name the master's state directory (in the run's TMPDIR) in the config."""
        tmp = os.environ.get("TMPDIR") or "/tmp"
        self.cfg.state_dir = os.path.join(tmp, f"scratch-flow-{self.common.container_id}")

    def state_dir(self) -> str | None:
        """The master's state directory, as stage 1 named it."""
        return self.cfg.state_dir or None

    def make_state_dir(self, pid: int) -> None:
        """The master's own bookkeeping: a directory in the run's TMPDIR, the pid in it."""
        path = self.state_dir()
        if path is None:
            raise RuntimeError("state_dir: prepare_config named no state directory")
        os.mkdir(path, 0o700)
        with open(os.path.join(path, "pid"), "w") as f:
            f.write(f"{pid}\n")

    def note_started(self, pid: int) -> None:
        path = self.state_dir()
        if path is not None:
            with open(os.path.join(path, "started"), "w") as f:
                f.write(f"{pid}\n")

    def remove_state_dir(self) -> None:
        """Whatever ran before: the directory may be missing, partial or already gone."""
        path = self.state_dir()
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def set_hostname(self, rpc: RPCClient) -> None:
        rpc.sethostname(name=self.cfg.hostname)

    def mount_scratch(self, rpc: RPCClient) -> None:
        rpc.mount_tmpfs(target=self.cfg.scratch, owner=self.cfg.scratch_owner)

    def payload_env(self) -> dict[str, str]:
        return {"PATH": PAYLOAD_PATH, "HOSTNAME": self.cfg.hostname, "SCRATCH": self.cfg.scratch}

    # -- the operations -----------------------------------------------------------------------
    def config(self) -> EngineConfig:
        return ScratchFlowConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc, cfg = starter_config, self.cfg
        if not cfg.argv:
            raise ConfigError("argv: no payload to run")
        if not cfg.hostname:
            cid = re.sub(r"[^a-z0-9]", "", self.common.container_id.lower())
            cfg.hostname = f"sf-{cid[:12] or 'box'}"
        if not HOSTNAME_RE.fullmatch(cfg.hostname):
            raise ConfigError(f"hostname: {cfg.hostname!r} is not a valid hostname")
        if not os.path.isabs(cfg.scratch):
            raise ConfigError(f"scratch: must be an absolute path, got {cfg.scratch!r}")
        self.reserve_state_dir()
        cfg.forward = list(FORWARDED)
        cfg.scratch_owner = self.scratch_owner(sc)
        self.fill_starter_config(sc)

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        self.make_state_dir(pid)
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        self.set_hostname(rpc)
        self.mount_scratch(rpc)

    def start_process(self, master_fd: int) -> None:
        argv = self.cfg.argv
        os.execvpe(argv[0], argv, self.payload_env())

    def post_start_process(self, ctx: Context, pid: int) -> None:
        self.note_started(pid)

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        forward = self.signals_to_forward()
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            while sig is not None:
                if sig in forward:
                    self.forward_signal(pid, sig)
                sig = signals.get(timeout=0)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        self.remove_state_dir()


# --- correct but unusual ------------------------------------------------------------------------

#: The namespaces the join-only engine joins, by path (those of the sandbox's pid 1).
JOINED = ("uts", "ipc", "net")


class JoinOnlyFlowEngine(ScratchFlowEngine):
    """Join-only where the starter may join: root and suid, inside the kit's host sandbox.

    There it creates no namespace and joins the uts, ipc and net namespaces of the
    sandbox's pid 1 by path (``/proc/1/ns/KIND``), with ``set_namespace_join_only``: SPEC §5
    says such a run calls only ``config``/``init_config``, ``prepare_config`` and
    ``start_process``, so the master hooks must not matter (they are the base's anyway).
    The payload gets no capability and no_new_privs in suid, so it cannot change what it
    shares. In userns, fakeroot and hybrid, where an unprivileged starter can join no
    namespace of the host, and outside the sandbox, it is the base engine. A join-only run
    has no monitor_container: passing a signal to the payload is the starter's job there.
    """

    engine_name = "blind8-flow-join-only"
    false_failure = (
        "disputed: every run of root and suid is join-only, so no master or RPC server "
        "runs, and the rules about them (ORDER-013: a successful run calls "
        "create_container, monitor_container and start_process once each) cannot hold; "
        "counting them not-supported would let any engine skip them by joining"
    )

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        if sc.flow not in ("root", "suid") or not inside_kit_sandbox():
            super().prepare_config(sc)
            return
        if not self.cfg.argv:
            raise ConfigError("argv: no payload to run")
        for kind in JOINED:
            sc.set_ns_path(kind, f"/proc/1/ns/{kind}")
        sc.set_namespace_join_only()
        if sc.flow != "root":
            sc.set_no_new_privs()

    def payload_env(self) -> dict[str, str]:
        return {"PATH": PAYLOAD_PATH}


#: The root flow's payload identity of :class:`TargetIdentityFlowEngine`.
TARGET_UID = 65534
TARGET_GIDS = (65534, 100)
#: The one capability that payload keeps (every set, ambient included).
TARGET_CAP = "CAP_NET_BIND_SERVICE"


class TargetIdentityFlowEngine(ScratchFlowEngine):
    """A target uid and gids for the payload in the root flow, with one capability.

    Root flow: target uid 65534, gids [65534, 100] (primary first), CAP_NET_BIND_SERVICE in
    the effective, permitted, inheritable, ambient and bounding sets (a consistent request:
    effective and ambient within permitted, ambient within inheritable, all within bounding),
    so that the payload, not root, may still bind a low port. The tmpfs belongs to the
    payload. Other flows: no target (SPEC §4: a target uid is ignored for a non-root caller)
    and no capability, as the base.
    """

    engine_name = "blind8-flow-target-ids"

    def scratch_owner(self, sc: StarterConfig) -> list[int] | None:
        if sc.flow == "root":
            return [TARGET_UID, TARGET_GIDS[0]]
        return super().scratch_owner(sc)

    def fill_starter_config(self, sc: StarterConfig) -> None:
        super().fill_starter_config(sc)
        if sc.flow == "root":
            sc.set_target_uid(TARGET_UID)
            sc.set_target_gids(TARGET_GIDS)
            for kind in ("effective", "permitted", "inheritable", "ambient", "bounding"):
                sc.set_capabilities(kind, [TARGET_CAP])
