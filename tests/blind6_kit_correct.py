"""Correct blind engines that do unusual but allowed things near the places the engines of
``blind6_kit`` attack: a private /proc with options, threads with kit-like names that never
touch credentials, and a start_process that closes every descriptor it does not know.

Each follows the whole contract (SPEC.md) in every flow: failing one is a false failure.
Loaded as ``blind6_kit_correct:ClassName`` with ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import resource
import socket
import threading

from kit.contract import Context, WaitStatus
from kit.rpc import RPCClient
from kit.system import linux
from reference_engines.minimal.engine import ReferenceConfig, ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC


class PrivateProcOptions(ReferenceEngine):
    """The container gets a private /proc mounted with ``hidepid=invisible`` (other users'
    processes hidden) and a read-only sysfs on /sys, both through the reference RPC server's
    allowed types and options.

    Allowed: SPEC §4/§5 put no rule on what the container's own mount namespace holds; the
    RPC methods refuse nothing here (proc option ``hidepid``, fstype ``sysfs``, flag ``ro``
    are on their allow-lists), and every mount dies with the container's mount namespace
    (§11: nothing changes on the host). The kit's probes in the RPC server and stage 2 read
    this /proc, as the stage-2 uid (other users' processes hidden from it): a kit that needs
    to see more of it fails a correct engine.
    """

    engine_name = "blind6-kit-correct-private-proc-options"
    rpc_methods = ReferenceRPC
    proc_options = "hidepid=invisible"

    def prepare_rootfs(self, rpc: RPCClient, cfg: ReferenceConfig) -> None:
        if cfg.mount_proc:
            rpc.mount(
                source="proc",
                target="/proc",
                fstype="proc",
                flags=["nosuid", "nodev", "noexec"],
                data=self.proc_options,
            )
        if "net" in cfg.namespaces:
            # sysfs shows the network namespace of its mounter: only with a net namespace.
            rpc.mount(
                source="sysfs",
                target="/sys",
                fstype="sysfs",
                flags=["ro", "nosuid", "nodev", "noexec"],
                data=None,
            )
        if cfg.mount_tmp:
            rpc.mount(
                source="tmpfs",
                target="/tmp",
                fstype="tmpfs",
                flags=["nosuid", "nodev"],
                data="mode=1777,size=16m",
            )


class ProcSubsetPid(PrivateProcOptions):
    """The container's /proc is mounted with ``subset=pid``: only the process directories,
    no /proc/sys (allowed by the reference RPC server, as ``hidepid``).

    Allowed, as PrivateProcOptions. The kit's stage 2 read /proc/sys/kernel/cap_last_cap
    once this /proc was mounted, and failed the run as "start_process failed"; it reads it
    before any namespace now.
    """

    engine_name = "blind6-kit-correct-proc-subset-pid"
    proc_options = "subset=pid"


class _Watcher:
    """A thread that never touches credentials, named ``comm`` (the name /proc shows), alive
    until :meth:`finish` (or its process's end)."""

    def __init__(self, comm: str) -> None:
        self.comm = comm
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=comm, daemon=True)

    def start(self) -> _Watcher:
        self.thread.start()
        self.ready.wait(5)
        return self

    def _run(self) -> None:
        linux.set_name(self.comm)
        self.ready.set()
        self.stop.wait()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(5)


class _WatchedRPC(ReferenceRPC):
    """The reference RPC methods, plus a thread named like the kit's probe thread started by
    the first call and left running (it only waits) until the RPC server exits."""

    watcher: _Watcher | None = None

    def sethostname(self, name: str) -> None:
        if _WatchedRPC.watcher is None:
            _WatchedRPC.watcher = _Watcher("kit-probe").start()
        super().sethostname(name)


class KitNamedIdleThreads(ReferenceEngine):
    """The master runs a helper thread named ``kit-probe`` (and the RPC server one too) from
    create_container to cleanup_container; the threads only wait and never change a
    credential.

    Allowed: SPEC §4 asks every thread of a process, "threads the engine started
    included", to follow the privilege table at every hook and RPC method, and these do:
    they have exactly the credentials of the thread that started them. A thread's name is
    the engine's to choose; a kit that takes a thread for its own probe by name, or treats
    an unknown thread as a fault, fails a correct engine.
    """

    engine_name = "blind6-kit-correct-kit-named-idle-threads"
    rpc_methods = _WatchedRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        self.watcher = _Watcher("kit-probe").start()
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        try:
            super().cleanup_container(ctx, fatal, status)
        finally:
            watcher = getattr(self, "watcher", None)
            if watcher is not None:
                watcher.finish()


class ClosesStrangerFds(ReferenceEngine):
    """start_process closes every descriptor it does not know (all but stdin, stdout,
    stderr and master_fd) right before the exec, the kit's ledger socket included.

    Allowed: SPEC §1/§2 ask start_process to exec the payload (master_fd closes on exec and
    that tells the master); the kit's other descriptors are close-on-exec anyway, so
    closing them first changes nothing the payload or the master can see once the exec
    succeeds. The engine leaves master_fd alone until the exec and writes nothing to any
    kit descriptor. A kit that needs its ledger socket in stage 2 after start_process
    began, on the success path, fails a correct engine.
    """

    engine_name = "blind6-kit-correct-closes-stranger-fds"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd: int) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        top = 1 << 20 if soft == resource.RLIM_INFINITY else soft
        # Two ranges around master_fd (close_range(2) under the hood: no loop over numbers).
        os.closerange(3, master_fd)
        os.closerange(master_fd + 1, top)
        super().start_process(master_fd)


__all__ = ["ClosesStrangerFds", "KitNamedIdleThreads", "PrivateProcOptions", "ProcSubsetPid"]
