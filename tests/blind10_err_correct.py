"""Correct blind engines for the error paths (written from SPEC.md alone, not from the suite).

:class:`ScratchErrEngine` is a small engine written from scratch against ``kit.contract``:
conformant in all five flows (root, suid, userns, fakeroot, hybrid). ``blind10_err`` derives
its buggy engines from it, one mistake each. :class:`ScratchErrPidfdEngine` is correct but
unusual: it makes no RPC call, waits on a pidfd, and lets slave propagation in.

Loaded as ``blind10_err_correct:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here
runs at import time.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import tempfile
from dataclasses import dataclass
from typing import Any

from kit import system
from kit.contract import (
    Common,
    ConfigError,
    Context,
    EngineConfig,
    Operations,
    SignalChannel,
    WaitStatus,
)
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig

#: The signals a conformant monitor_container forwards to the container (SPEC §7).
FORWARDED = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
)
#: How long monitor_container waits on the signal channel between two reaping attempts.
POLL = 0.05
#: The payload's environment.
PAYLOAD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
#: Namespaces created in every flow (SPEC §4: the master shares none of pid/net/uts/ipc/cgroup
#: with the container).
BASE_NAMESPACES = ("mount", "pid", "net", "uts", "ipc", "cgroup")
#: The environment variable the kit's host sandbox sets: "MNT:UTS" inode numbers.
SANDBOX_ENV = "KIT_HOST_SANDBOX"


def inside_kit_sandbox() -> bool:
    """Whether this process is in the kit's host sandbox (its mount and uts namespaces, as
    the sandbox announces them): engines that touch "the host" act only there."""
    try:
        mnt, uts = (int(x) for x in os.environ.get(SANDBOX_ENV, "").split(":"))
        return (
            os.stat("/proc/self/ns/mnt").st_ino == mnt
            and os.stat("/proc/self/ns/uts").st_ino == uts
        )
    except (ValueError, OSError):
        return False


@dataclass
class ErrConfig(EngineConfig):
    """The engine config: only these fields cross from stage 1 (as JSON)."""

    hostname: str = "blind10"
    #: A directory the RPC server mounts a tmpfs on, in the container; "" for none.
    scratch_mount: str = ""


class ErrRPC:
    """RPC methods, served as ``<engine>.<method>`` by the RPC server."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)

    def mount_tmpfs(self, target: str) -> None:
        self.system.mount("tmpfs", target, "tmpfs", (), "size=64k")


class ScratchErrEngine(Operations):
    """A small conformant engine: hostname via RPC, a master scratch directory, signals
    forwarded, the raw wait status returned, an idempotent cleanup."""

    engine_name = "blind10-err-scratch"
    rpc_methods = ErrRPC

    # -- every process ----------------------------------------------------------------------
    def config(self) -> ErrConfig:
        return ErrConfig()

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        self.common = common

    @property
    def cfg(self) -> ErrConfig:
        cfg = self.common.engine_config
        assert isinstance(cfg, ErrConfig)
        return cfg

    # -- stage 1 ----------------------------------------------------------------------------
    def namespaces(self, sc: StarterConfig) -> list[str]:
        kinds = list(BASE_NAMESPACES)
        if sc.flow in ("userns", "fakeroot", "hybrid"):
            kinds.append("user")
        return kinds

    def propagation(self, sc: StarterConfig) -> str:
        return "rprivate"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        if not self.cfg.argv:
            raise ConfigError("argv: no payload to run")
        if sc.flow in ("userns", "fakeroot", "hybrid"):
            inner = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
            sc.add_uid_mappings([(inner[0], sc.invoker_uid, 1)])
            sc.add_gid_mappings([(inner[1], sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_ns_flags(self.namespaces(sc))
        sc.set_bring_loopback_interface()
        sc.set_mount_propagation(self.propagation(sc))
        if sc.flow != "root":
            sc.set_no_new_privs()

    # -- master -----------------------------------------------------------------------------
    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        self.scratch = tempfile.mkdtemp(prefix="blind10-")
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.sethostname(name=self.cfg.hostname)
        if self.cfg.scratch_mount:
            rpc.mount_tmpfs(target=self.cfg.scratch_mount)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        pass

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=POLL)
            if sig in FORWARDED:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return self.wait_status(status)

    def wait_status(self, status: int) -> WaitStatus:
        """What monitor_container returns for the raw status ``os.waitpid`` gave."""
        return status

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        scratch = getattr(self, "scratch", None)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
            self.scratch = None

    # -- stage 2 ----------------------------------------------------------------------------
    def exec_path(self) -> str:
        return self.cfg.argv[0]

    def start_process(self, master_fd: int) -> None:
        argv = self.cfg.argv
        os.execve(self.exec_path(), argv, PAYLOAD_ENV)


class ScratchErrPidfdEngine(ScratchErrEngine):
    """Correct but unusual: no RPC call at all (create_container only checks the
    connection), a pidfd-driven monitor using waitid, rslave propagation (host mounts come
    in, none go out), and a cleanup that is a no-op by design."""

    engine_name = "blind10-err-pidfd"

    def propagation(self, sc: StarterConfig) -> str:
        return "rslave"

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        rpc_conn.fileno()  # nothing to prepare: the kit closes the connection on return

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        pidfd = os.pidfd_open(pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while True:
                sig = signals.get(timeout=0)
                while sig is not None:
                    if sig in FORWARDED:
                        signal.pidfd_send_signal(pidfd, sig)
                    sig = signals.get(timeout=0)
                if poller.poll(int(POLL * 1000)):
                    done, status = os.waitpid(pid, 0)
                    if done == pid:
                        return status
        finally:
            os.close(pidfd)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pass
