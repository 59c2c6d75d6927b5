"""Blind12: three conformant engines that each use the RPC server differently.

Written from SPEC.md alone (§2, §4's RPC server row, §6), without reading the conformance
suite, the mutants or any other engine.

- :class:`Blind12FdPassing`: methods that receive descriptors (a pipe's read end to drain,
  a pipe's write end to fill) and one that returns a descriptor (a file it opened).
- :class:`Blind12TypedErrors`: methods that fail on purpose (EEXIST, ENOENT, a ValueError);
  ``create_container`` expects each typed error and carries on. One method raises a
  capability on its own thread for the duration of the call and restores it.
- :class:`Blind12BatchCwd`: many small calls, then one batched call that changes the shared
  cwd (CLONE_FS) to work with relative paths and puts it back through a saved descriptor.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from typing import Any, ClassVar

from kit import system
from kit.contract import EngineConfig, Operations
from kit.rpc import FileDescriptor, RPCClient, WithFds
from kit.system import linux

FORWARDED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}

#: Where each engine mounts its scratch tmpfs, in the container's own mount namespace.
SCRATCH = "/media"


@dataclass
class Blind12Config(EngineConfig):
    hostname: str = "blind12"


# --- helpers used by the RPC methods (run in the RPC server) ---------------------------------


class RaisedCaps:
    """Raise capabilities ``names`` into the effective set of the calling thread, where
    they are permitted, and put the thread's sets back as they were on exit (§4: a method
    may raise more on its own thread and must restore them)."""

    def __init__(self, names: list[str]) -> None:
        self.mask = linux.caps_to_mask(names)
        self.saved: tuple[int, int, int] | None = None

    def __enter__(self) -> RaisedCaps:
        sysif = system.current()
        eff, perm, inh = sysif.capabilities()
        self.saved = (eff, perm, inh)
        wanted = eff | (self.mask & perm)
        if wanted != eff:
            sysif.set_capabilities(wanted, perm, inh)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.saved is not None
        eff, perm, inh = self.saved
        if system.current().capabilities() != self.saved:
            system.current().set_capabilities(eff, perm, inh)


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _in_scratch(path: str) -> str:
    """``path`` normalised; refuses anything outside the scratch mount."""
    norm = os.path.normpath(path)
    if norm != SCRATCH and not norm.startswith(SCRATCH + "/"):
        raise ValueError(f"path {path!r} is outside the scratch directory {SCRATCH}")
    return norm


class _ScratchRPC:
    """Methods every engine of this module serves (with the RPC server's privileges)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.system = system.current()

    def mount_scratch(self, size_kib: int = 1024) -> str:
        """A private tmpfs at SCRATCH in the container's mount namespace."""
        self.system.mount("tmpfs", SCRATCH, "tmpfs", ["nosuid", "nodev"], f"size={size_kib}k")
        return SCRATCH

    def sethostname(self, name: str) -> str:
        self.system.sethostname(name)
        return self.system.gethostname()


# --- the lifecycle every engine here shares (not an Operations subclass on its own) ----------


class _Lifecycle:
    """prepare_config, start_process, monitor_container and cleanup_container, as in the
    README's example: the engines differ only in their RPC use."""

    common: Any

    def config(self) -> Blind12Config:
        return Blind12Config()

    def prepare_config(self, sc: Any) -> None:
        namespaces = ["mount", "pid", "uts", "ipc", "net"]
        if sc.flow in ("userns", "fakeroot", "hybrid"):
            namespaces.append("user")
            uid, gid = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
            sc.add_uid_mappings([(uid, sc.invoker_uid, 1)])
            sc.add_gid_mappings([(gid, sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_ns_flags(namespaces)
        sc.set_bring_loopback_interface()
        sc.set_mount_propagation("rprivate")
        if sc.flow != "root":
            sc.set_no_new_privs()

    def client(self, rpc_conn: Any) -> RPCClient:
        return RPCClient(rpc_conn, self.common.engine_name)

    def start_process(self, master_fd: int) -> None:
        argv = self.common.engine_config.argv
        os.execve(argv[0], argv, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})

    def monitor_container(self, pid: int, signals: Any) -> int:
        while True:
            sig = signals.get(timeout=0.1)
            if sig in FORWARDED:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status

    def cleanup_container(self, ctx: Any, fatal: BaseException | None, status: int | None) -> None:
        pass  # everything lives in the container's namespaces and dies with them


# --- 1. descriptors both ways ----------------------------------------------------------------


class FdRPC(_ScratchRPC):
    def store(self, name: str, source: FileDescriptor) -> int:
        """Drain ``source`` (a pipe's read end from the master) into SCRATCH/name."""
        try:
            data = _read_all(source)
        finally:
            os.close(source)
        path = _in_scratch(os.path.join(SCRATCH, name))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            return _write_all(fd, data)
        finally:
            os.close(fd)

    def open_file(self, path: str) -> WithFds:
        """A read-only descriptor of a scratch file, for the master to read."""
        fd = os.open(_in_scratch(path), os.O_RDONLY | os.O_CLOEXEC)
        return WithFds({"size": os.fstat(fd).st_size}, [fd])

    def fill(self, sink: FileDescriptor, text: str) -> int:
        """Write ``text`` into ``sink`` (a pipe's write end from the master), then close it."""
        try:
            return _write_all(sink, text.encode())
        finally:
            os.close(sink)


class Blind12FdPassing(_Lifecycle, Operations):
    """Correct: RPC methods take pipe ends from the master and return an open file's fd."""

    engine_name = "blind12-rpc-fds"
    rpc_methods = FdRPC

    NOTE = b"note written by the master, stored by the RPC server\n"

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        rpc = self.client(rpc_conn)
        try:
            self.exchange(rpc)
            rpc.sethostname(name=self.common.engine_config.hostname)
        finally:
            rpc.close()

    def exchange(self, rpc: RPCClient) -> None:
        rpc.mount_scratch()
        # master -> server: a pipe's read end, already filled and its write end closed.
        r, w = os.pipe()
        try:
            _write_all(w, self.NOTE)
            os.close(w)
            w = -1
            stored = rpc.store(name="note", source=FileDescriptor(r))
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        if stored != len(self.NOTE):
            raise RuntimeError(f"store wrote {stored} bytes, expected {len(self.NOTE)}")
        # server -> master: a descriptor of the stored file.
        info, fds = rpc.open_file(path=f"{SCRATCH}/note")
        try:
            back = _read_all(fds[0])
        finally:
            for fd in fds:
                os.close(fd)
        if back != self.NOTE or info["size"] != len(self.NOTE):
            raise RuntimeError(f"read back {back!r} ({info}), expected {self.NOTE!r}")
        # master -> server: a pipe's write end for the server to fill.
        r, w = os.pipe()
        try:
            try:
                rpc.fill(sink=FileDescriptor(w), text="hello from the RPC server")
            finally:
                os.close(w)
            got = _read_all(r)
        finally:
            os.close(r)
        if got != b"hello from the RPC server":
            raise RuntimeError(f"fill gave {got!r}")


# --- 2. typed errors ---------------------------------------------------------------------------


class ErrRPC(_ScratchRPC):
    def checked_hostname(self, name: str) -> str:
        """Set the hostname; ValueError (no errno) for a name that is not a hostname."""
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-." for c in name):
            raise ValueError(f"not a valid hostname: {name!r}")
        return self.sethostname(name)

    def guarded_mkdir(self, path: str, mode: int = 0o755) -> str:
        """mkdir with CAP_DAC_OVERRIDE raised on this thread for the call only; EEXIST
        (FileExistsError, errno kept) when it is there already."""
        path = _in_scratch(path)
        with RaisedCaps(["CAP_DAC_OVERRIDE"]):
            os.mkdir(path, mode)
        return path

    def lookup(self, path: str) -> dict[str, int]:
        """stat of a scratch path; ENOENT when missing."""
        st = os.stat(_in_scratch(path))
        return {"mode": st.st_mode, "size": st.st_size}


class Blind12TypedErrors(_Lifecycle, Operations):
    """Correct: methods fail on purpose (EEXIST, ENOENT, ValueError); each error is handled."""

    engine_name = "blind12-rpc-errors"
    rpc_methods = ErrRPC

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        rpc = self.client(rpc_conn)
        try:
            self.prepare(rpc)
        finally:
            rpc.close()

    def prepare(self, rpc: RPCClient) -> None:
        rpc.mount_scratch()
        rpc.guarded_mkdir(path=f"{SCRATCH}/etc")
        try:
            rpc.guarded_mkdir(path=f"{SCRATCH}/etc")
        except FileExistsError as exc:  # typed: errno and message survive
            if exc.errno != errno.EEXIST:
                raise
        else:
            raise RuntimeError("a second mkdir of the same path did not fail")
        try:
            rpc.lookup(path=f"{SCRATCH}/etc/missing")
        except FileNotFoundError as exc:
            if exc.errno != errno.ENOENT:
                raise
        else:
            raise RuntimeError("lookup of a missing path did not fail")
        try:
            rpc.checked_hostname(name="not a hostname!")
        except ValueError:
            pass
        else:
            raise RuntimeError("an invalid hostname was accepted")
        got = rpc.checked_hostname(name=self.common.engine_config.hostname)
        if got != self.common.engine_config.hostname:
            raise RuntimeError(f"hostname is {got!r}")
        if not rpc.lookup(path=f"{SCRATCH}/etc")["mode"] & 0o40000:
            raise RuntimeError("etc is not a directory")


# --- 3. small calls, one batch, the shared cwd -------------------------------------------------


def _fsuid_now() -> int:
    """The calling thread's fs uid (setfsuid with an invalid id changes nothing)."""
    return linux.thread_setfsuid(-1)


class BatchRPC(_ScratchRPC):
    def mkdir(self, path: str) -> None:
        os.mkdir(_in_scratch(path), 0o755)

    def touch(self, path: str, as_root: bool = False) -> int:
        """Create an empty file (idempotent) and return its owner. ``as_root``: create it
        with fs uid 0 where this server may take it (the saved uid of the setuid flows),
        for the call only."""
        path = _in_scratch(path)
        before = _fsuid_now()
        if as_root and before != 0:
            linux.thread_setfsuid(0)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)
            return os.stat(path).st_uid
        finally:
            if _fsuid_now() != before:
                linux.thread_setfsuid(before)

    def populate(self, base: str, files: dict[str, str]) -> list[str]:
        """One call for many files: chdir into ``base`` (the cwd shared with the container,
        CLONE_FS) to write relative names, then return to the cwd it found."""
        base = _in_scratch(base)
        here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.chdir(base)
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
            os.fchdir(here)
            os.close(here)

    def listing(self, path: str) -> list[str]:
        return sorted(os.listdir(_in_scratch(path)))


class Blind12BatchCwd(_Lifecycle, Operations):
    """Correct: many small RPC calls, then one batch that chdirs and restores the shared cwd."""

    engine_name = "blind12-rpc-batch"
    rpc_methods = BatchRPC

    SMALL: ClassVar[list[str]] = [f"f{i:02d}" for i in range(16)]
    BATCH: ClassVar[dict[str, str]] = {f"b{i:02d}": f"content {i}\n" for i in range(24)}

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        rpc = self.client(rpc_conn)
        try:
            self.build(rpc)
        finally:
            rpc.close()

    def build(self, rpc: RPCClient) -> None:
        rpc.mount_scratch()
        rpc.mkdir(path=f"{SCRATCH}/small")
        rpc.mkdir(path=f"{SCRATCH}/batch")
        for name in self.SMALL:  # many small calls
            rpc.touch(path=f"{SCRATCH}/small/{name}")
        rpc.touch(path=f"{SCRATCH}/small/.stamp", as_root=True)
        rpc.touch(path=f"{SCRATCH}/small/.stamp", as_root=True)  # idempotent
        made = rpc.populate(base=f"{SCRATCH}/batch", files=self.BATCH)  # one batched call
        if made != sorted(self.BATCH):
            raise RuntimeError(f"populate made {made}")
        listed = rpc.listing(path=f"{SCRATCH}/small")
        if listed != sorted([*self.SMALL, ".stamp"]):
            raise RuntimeError(f"small files: {listed}")
        rpc.sethostname(name=self.common.engine_config.hostname)
