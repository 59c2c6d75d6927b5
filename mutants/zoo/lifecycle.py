"""Mutants that break the lifecycle (SPEC §2, §6): hooks that hang, crash their process, raise
or return when they must not, and create_container misusing the RPC connection.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from kit.contract import Context
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig
from mutants.zoo.base import Mutant
from reference_engines.minimal import ReferenceRPC

#: Hook timeout (seconds) the matrix uses for the mutants that hang on purpose.
HANG_TIMEOUT = 2.0


class CreateWaitsForTheContainer(Mutant):
    slug = "create-waits-for-container"
    bug = (
        "create_container waits until the container runs its payload before returning; "
        "stage 2 only starts once it returned: a deadlock"
    )
    killed_by = ("ERR-009", "ORDER-013")
    flows = ("root",)
    hook_timeout = HANG_TIMEOUT

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        while not ctx.wait(0.01):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() not in ("kit-container", "kit-stage2"):
                        return  # the payload runs (it never does: stage 2 waits for us)
            except OSError:
                return


class PostStartHangs(Mutant):
    slug = "post-start-hangs"
    bug = "post_start_process waits for a readiness notification that nothing ever sends"
    killed_by = ("ERR-009",)
    mechanism = "other-hook"
    flows = ("root",)
    hook_timeout = HANG_TIMEOUT

    def post_start_process(self, ctx: Context, pid: int) -> None:
        threading.Event().wait()


class PostStartKillsTheMaster(Mutant):
    slug = "post-start-kills-master"
    bug = (
        "post_start_process kills its own process (a stand-in for a crash in native code): "
        "the master never runs cleanup_container"
    )
    killed_by = ("ERR-010", "ORDER-011", "LEDGER-002")
    flows = ("root",)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class PrepareConfigExits(Mutant):
    slug = "prepare-config-exits"
    bug = (
        "prepare_config ends stage 1 itself (os._exit(0)) once the StarterConfig is filled: "
        "the starter never gets it"
    )
    killed_by = ("ERR-010", "LEDGER-002")
    mechanism = "other-hook"
    flows = ("root",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        os._exit(0)


class StartProcessReturns(Mutant):
    slug = "start-process-returns"
    bug = "start_process prepares the payload (cwd, checks) and returns instead of exec'ing it"
    killed_by = ("ERR-011",)
    flows = ("root",)

    def start_process(self, master_fd: int) -> None:
        cfg = self.reference_config()
        os.chdir(cfg.cwd)
        if not os.path.exists(cfg.argv[0]):
            raise FileNotFoundError(cfg.argv[0])


class ClosesTheRPCConnectionEarly(Mutant):
    slug = "closes-rpc-early"
    bug = (
        "create_container closes the RPC connection once the hostname is set, before its "
        "mounts: the remaining calls fail"
    )
    killed_by = ("ERR-011",)
    mechanism = "other-hook"
    flows = ("root",)

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg = self.reference_config()
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        if cfg.hostname is not None:
            rpc.sethostname(name=cfg.hostname)
        rpc_conn.close()  # "the privileged part is done"
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
                data="mode=1777,size=16m",
            )


class ExitingRPC(ReferenceRPC):
    """The server ends itself after the last call it expects (the /tmp mount)."""

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        super().mount(source, target, fstype, flags, data)
        if target == "/tmp":
            # Not sys.exit: the kit's server answers SystemExit with an error reply and goes
            # on; ending the process is still in a method's power.
            os._exit(1)


class RPCMethodEndsTheServer(Mutant):
    slug = "rpc-method-exits"
    bug = (
        "the RPC method that mounts /tmp, the last call it expects, ends the RPC server "
        "(os._exit) instead of returning"
    )
    killed_by = ("RPC-003",)
    flows = ("root",)
    rpc = ExitingRPC


class WrongRPCPrefix(Mutant):
    slug = "rpc-wrong-engine-name"
    bug = (
        "create_container builds its RPC client with the name 'reference' (copied from the "
        "reference engine) instead of its own engine name"
    )
    killed_by = ("RPC-002",)
    flows = ("root",)

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg = self.reference_config()
        rpc = RPCClient(rpc_conn, "reference")
        if cfg.hostname is not None:
            rpc.sethostname(name=cfg.hostname)


class RPCCallsAfterCreateReturned(Mutant):
    slug = "rpc-calls-after-create"
    bug = (
        "create_container hands a duplicate of the RPC connection to a thread that mounts "
        "/tmp after create_container returned"
    )
    killed_by = ("RPC-001",)
    flows = ("root",)

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        cfg = self.reference_config()
        mount_tmp, cfg.mount_tmp = cfg.mount_tmp, False
        super().create_container(ctx, pid, rpc_conn)
        if not mount_tmp:
            return
        conn = rpc_conn.dup()
        name = self.common.engine_name

        def later() -> None:
            time.sleep(0.2)  # create_container has long returned
            try:
                RPCClient(conn, name).mount(
                    source="tmpfs",
                    target="/tmp",
                    fstype="tmpfs",
                    flags=["nosuid", "nodev"],
                    data="mode=1777",
                )
            finally:
                conn.close()

        threading.Thread(target=later, name="mutant-late-mount", daemon=True).start()


class StartProcessClosesMasterFd(Mutant):
    slug = "start-process-closes-master-fd"
    bug = (
        "start_process closes master_fd before the exec ('it is close-on-exec anyway'): the "
        "start waiter sees EOF while stage 2 still runs, and a starter that takes the EOF "
        "for the exec runs post_start_process before the payload exists"
    )
    killed_by = ("ORDER-009",)
    flows = ("root", "suid", "userns", "fakeroot", "hybrid")

    def start_process(self, master_fd: int) -> None:
        os.close(master_fd)
        time.sleep(0.2)  # the payload's set-up before the exec, in an engine that has one
        super().start_process(master_fd)


class StartProcessNullsItsDescriptors(Mutant):
    slug = "start-process-nulls-its-descriptors"
    bug = (
        "start_process points every inherited descriptor above 2 at /dev/null before the "
        "exec ('no fd leaks into the payload'), master_fd included: its end of the master "
        "socket is gone before the exec"
    )
    killed_by = ("ORDER-009",)
    flows = ("root", "suid", "userns", "fakeroot", "hybrid")
    mechanism = "other-field"

    def start_process(self, master_fd: int) -> None:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        os.dup2(null, master_fd, inheritable=False)
        os.close(null)
        time.sleep(0.2)
        super().start_process(master_fd)


class StartProcessSwallowsExecError(Mutant):
    slug = "start-process-swallows-exec-error"
    bug = (
        "start_process catches the exec's OSError, prints it and returns: a payload that "
        "cannot be exec'd makes the hook return instead of raising"
    )
    killed_by = ("ERR-012",)
    flows = ("root",)

    def start_process(self, master_fd: int) -> None:
        try:
            super().start_process(master_fd)
        except OSError as exc:
            print(f"cannot start the payload: {exc}", file=sys.stderr)


class StartProcessWaitsWhenExecFails(Mutant):
    slug = "start-process-waits-when-exec-fails"
    bug = (
        "start_process catches the exec's OSError and waits to be killed (\"the supervisor "
        "will clean up\"): it neither raises nor exits"
    )
    killed_by = ("ERR-012",)
    flows = ("root",)
    hook_timeout = HANG_TIMEOUT

    def start_process(self, master_fd: int) -> None:
        try:
            super().start_process(master_fd)
        except OSError:
            threading.Event().wait()


class StartProcessClosesItsFdsAndSwallowsExecError(Mutant):
    slug = "start-process-closes-fds-swallows-exec-error"
    bug = (
        "start_process closes every descriptor but stdio and master_fd before the exec (the "
        "kit's ledger socket too), then catches the exec's OSError and returns: its "
        "hook_return never reaches the ledger"
    )
    killed_by = ("ERR-012",)
    mechanism = "other-field"
    flows = ("root",)

    def start_process(self, master_fd: int) -> None:
        os.closerange(3, master_fd)
        os.closerange(master_fd + 1, 1 << 16)
        try:
            super().start_process(master_fd)
        except OSError as exc:
            print(f"cannot start the payload: {exc}", file=sys.stderr)


class StartProcessExecsOnAThread(Mutant):
    slug = "start-process-execs-on-a-thread"
    bug = (
        "start_process execs the payload from a worker thread and waits for it: when the "
        "exec fails, the thread ends with the error and start_process returns"
    )
    killed_by = ("ERR-012",)
    mechanism = "helper-thread"
    flows = ("root",)

    def start_process(self, master_fd: int) -> None:
        failed: list[BaseException] = []

        def execs() -> None:
            try:
                super(StartProcessExecsOnAThread, self).start_process(master_fd)
            except BaseException as exc:  # noqa: BLE001 kept, never raised: the bug
                failed.append(exc)

        worker = threading.Thread(target=execs, name="exec")
        worker.start()
        worker.join()


MUTANTS = (
    CreateWaitsForTheContainer,
    PostStartHangs,
    PostStartKillsTheMaster,
    PrepareConfigExits,
    StartProcessReturns,
    StartProcessSwallowsExecError,
    StartProcessClosesItsFdsAndSwallowsExecError,
    StartProcessExecsOnAThread,
    StartProcessWaitsWhenExecFails,
    ClosesTheRPCConnectionEarly,
    RPCMethodEndsTheServer,
    WrongRPCPrefix,
    RPCCallsAfterCreateReturned,
    StartProcessClosesMasterFd,
    StartProcessNullsItsDescriptors,
)
