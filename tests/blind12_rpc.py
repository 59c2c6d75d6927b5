"""Blind12: six engines with one RPC bug each, built on the engines of blind12_rpc_correct.

Written from SPEC.md alone (§2, §4's RPC server row, §6, §11), without reading the conformance
suite, the mutants or any other engine. Every run completes and the payload runs; the bug
shows in the ledger, the host check or the payload's working directory.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

import blind12_rpc_correct as correct
from blind12_rpc_correct import (
    SCRATCH,
    BatchRPC,
    ErrRPC,
    FdRPC,
    _fsuid_now,
    _in_scratch,
    _read_all,
    _write_all,
)

from kit import system
from kit.rpc import FileDescriptor, RPCClient
from kit.system import linux

# --- 1. a raised capability left behind on the error path ------------------------------------


class LeakyErrRPC(ErrRPC):
    def guarded_mkdir(self, path: str, mode: int = 0o755) -> str:
        path = _in_scratch(path)
        sysif = system.current()
        eff, perm, inh = sysif.capabilities()
        sysif.set_capabilities(eff | (linux.caps_to_mask(["CAP_DAC_OVERRIDE"]) & perm), perm, inh)
        os.mkdir(path, mode)  # BUG: EEXIST skips the restore below
        sysif.set_capabilities(eff, perm, inh)
        return path


class Blind12CapLeakOnError(correct.Blind12TypedErrors):
    """§4 RPC row: a method's error path leaves CAP_DAC_OVERRIDE raised on the server."""

    engine_name = "blind12-rpc-capleak-err"
    rpc_methods = LeakyErrRPC


# --- 2. the shared cwd not restored ------------------------------------------------------------


class CwdRPC(BatchRPC):
    def populate(self, base: str, files: dict[str, str]) -> list[str]:
        base = _in_scratch(base)
        os.chdir(base)
        try:
            for name, text in files.items():
                if "/" in name or name in (".", ".."):
                    raise ValueError(f"not a plain file name: {name!r}")
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    _write_all(fd, text.encode())
                finally:
                    os.close(fd)
            return sorted(os.listdir("."))
        finally:
            # BUG: "back" to the parent of base, not to the cwd it found (CLONE_FS: the
            # container's cwd, from which stage 2 execs the payload).
            os.chdir(os.path.dirname(base))


class Blind12CwdLeft(correct.Blind12BatchCwd):
    """§2/§4: a method leaves the shared cwd (CLONE_FS) in the scratch; payload runs there."""

    engine_name = "blind12-rpc-cwd-left"
    escapes = (
        "no SPEC sentence names the payload's working directory: the RPC server shares "
        "root and cwd with the container on purpose (CLONE_FS, §2), which upstream's "
        "chroot and chdir methods rely on; where the payload starts is the engine's "
        "choice"
    )
    rpc_methods = CwdRPC


# --- 3. a worker thread left running with raised capabilities --------------------------------


class WorkerFdRPC(FdRPC):
    """store() hands the write to a worker thread, kept for later calls."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.jobs: queue.SimpleQueue[tuple[str, bytes, queue.SimpleQueue[Any]]] = (
            queue.SimpleQueue()
        )
        self.worker: threading.Thread | None = None

    def _work(self) -> None:
        sysif = system.current()
        eff, perm, inh = sysif.capabilities()
        # BUG: raised on the worker's own thread for its writes, and never lowered: the
        # thread outlives the method that started it.
        wanted = linux.caps_to_mask(["CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_CHOWN"]) & perm
        sysif.set_capabilities(eff | wanted, perm, inh)
        while True:
            path, data, done = self.jobs.get()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    done.put(_write_all(fd, data))
                finally:
                    os.close(fd)
            except OSError as exc:
                done.put(exc)

    def store(self, name: str, source: FileDescriptor) -> int:
        try:
            data = _read_all(source)
        finally:
            os.close(source)
        if self.worker is None:
            self.worker = threading.Thread(target=self._work, name="blind12-writer", daemon=True)
            self.worker.start()
        done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.jobs.put((_in_scratch(os.path.join(SCRATCH, name)), data, done))
        result = done.get(timeout=2)
        if isinstance(result, BaseException):
            raise result
        return int(result)


class Blind12LingeringThread(correct.Blind12FdPassing):
    """§4: a method starts a thread that keeps raised capabilities after the method returns."""

    engine_name = "blind12-rpc-thread-caps"
    rpc_methods = WorkerFdRPC


# --- 4. fs uid 0 left on the server by an early return ----------------------------------------


class FsuidRPC(BatchRPC):
    def touch(self, path: str, as_root: bool = False) -> int:
        path = _in_scratch(path)
        before = _fsuid_now()
        if as_root and before != 0:
            linux.thread_setfsuid(0)
        if os.path.exists(path):
            return os.stat(path).st_uid  # BUG: returns with fs uid 0 still set
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)
            return os.stat(path).st_uid
        finally:
            if _fsuid_now() != before:
                linux.thread_setfsuid(before)


class Blind12FsuidLeft(correct.Blind12BatchCwd):
    """§4 RPC row: touch() of an existing file returns with fs uid 0 (host root) still set."""

    engine_name = "blind12-rpc-fsuid-left"
    rpc_methods = FsuidRPC


# --- 5. a mount made in the master's (the host's) mount namespace -----------------------------


class SharedNoteRPC(FdRPC):
    def share_note(self, mntns: FileDescriptor, text: str) -> bool:
        """Publish a note where the master can read it without RPC: a helper joins the mount
        namespace the master sent, mounts a tmpfs at SCRATCH there and writes the note."""
        try:
            child = os.fork()
            if child == 0:
                code = 1
                try:
                    sysif = system.current()
                    eff, perm, inh = sysif.capabilities()
                    more = linux.caps_to_mask(["CAP_SYS_ADMIN", "CAP_SYS_CHROOT"]) & perm
                    sysif.set_capabilities(eff | more, perm, inh)
                    # BUG: the master's mount namespace is the host's in root/suid/hybrid.
                    linux.setns(mntns, linux.CLONE_NEWNS)
                    sysif.mount("tmpfs", SCRATCH, "tmpfs", ["nosuid", "nodev"], "size=64k")
                    fd = os.open(f"{SCRATCH}/note", os.O_WRONLY | os.O_CREAT, 0o644)
                    _write_all(fd, text.encode())
                    os.close(fd)
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(child, 0)
            return os.waitstatus_to_exitcode(status) == 0
        finally:
            os.close(mntns)


class Blind12MountInMasterNs(correct.Blind12FdPassing):
    """§4/§11: a method mounts a tmpfs in the master's mount namespace (the host's)."""

    engine_name = "blind12-rpc-wrong-mntns"
    rpc_methods = SharedNoteRPC

    def exchange(self, rpc: RPCClient) -> None:
        super().exchange(rpc)
        ns = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            shared = rpc.share_note(mntns=FileDescriptor(ns), text="published")
        finally:
            os.close(ns)
        if shared:
            try:
                with open(f"{SCRATCH}/note") as f:
                    f.read()
            except OSError:
                pass


# --- 6. a duplicate of the RPC connection kept after create_container returns -----------------


class Blind12ConnKept(correct.Blind12TypedErrors):
    """§2 rule 5: create_container leaves a dup of rpc_conn to a thread that calls later."""

    engine_name = "blind12-rpc-conn-kept"
    rpc_methods = ErrRPC

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        late = rpc_conn.dup()  # BUG: outlives create_container (and the kit's close)
        super().create_container(ctx, pid, rpc_conn)

        def confirm() -> None:
            time.sleep(0.2)
            client = RPCClient(late, self.common.engine_name)
            try:
                client.lookup(path=f"{SCRATCH}/etc")
            except (OSError, EOFError):
                pass
            finally:
                client.close()

        threading.Thread(target=confirm, name="blind12-late-rpc", daemon=True).start()
