"""The shared part of the model: one JSON document that every process of a run can reach.

Namespaces (hostname, mount tables, id maps), the pid registry and the fs structs are shared
by processes, so they live here, not in a process. The document is a small file in a private
directory (created by the supervisor before it forks the starter, removed after the run),
opened anew for every transaction: a process that closes every descriptor (stage 2 does,
before ``start_process``) still reaches it, and nothing the payload inherits points at it.

Locking: a thread lock (threads of one process) and, for the outermost transaction of a
thread, ``lockf`` on the file (processes; released by the kernel if the holder dies, so a
killed process never wedges the run). Transactions nest within a thread. After a fork the
child starts with a fresh thread lock and no file lock (POSIX record locks are not inherited)
— :meth:`Store.after_fork_in_child` must be called there (:mod:`kit.fake.system` does it
from ``os.register_at_fork``).

Format: 16 ASCII digits (the JSON's length), then the JSON (UTF-8).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Iterator

HEADER = 16


class Store:
    """Transactions over the shared document at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._state: dict[str, Any] | None = None
        self._write = False
        self._pid = os.getpid()

    # -- creation --------------------------------------------------------------------------
    @classmethod
    def create(cls, state: dict[str, Any], directory: str | None = None) -> Store:
        """A new store holding ``state``, in a fresh private directory."""
        base = tempfile.mkdtemp(prefix="kit-fake-model-", dir=directory)
        path = os.path.join(base, "model.json")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write(fd, state)
        finally:
            os.close(fd)
        return cls(path)

    def remove(self) -> None:
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)

    # -- transactions ------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[dict[str, Any]]:
        """The document, locked; written back at the end of the outermost transaction if
        any level asked to write and no exception escaped."""
        self.begin(write)
        try:
            state = self._state
            assert state is not None
            yield state
        except BaseException:
            self.end(commit=False)
            raise
        self.end(commit=True)

    def read(self) -> dict[str, Any]:
        """A consistent copy of the document (for read-only use)."""
        with self.transaction(write=False) as state:
            return state

    def begin(self, write: bool = True) -> dict[str, Any]:
        if self._pid != os.getpid():  # forked without the fork hooks
            self.after_fork_in_child()
        self._lock.acquire()
        try:
            if self._depth == 0:
                fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX)
                    self._state = _read(fd)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
                self._write = False
            self._depth += 1
            self._write = self._write or write
        except BaseException:
            self._lock.release()
            raise
        assert self._state is not None
        return self._state

    def end(self, commit: bool = True, keep_locked: bool = False) -> None:
        """Leave one level; the outermost writes (when asked and ``commit``) and unlocks.
        ``keep_locked`` writes but stays in the transaction (for a fork in the middle)."""
        try:
            if keep_locked:
                if commit and self._write and self._fd is not None and self._state is not None:
                    _write(self._fd, self._state)
                return
            self._depth -= 1
            if self._depth == 0:
                fd, self._fd = self._fd, None
                try:
                    if commit and self._write and fd is not None and self._state is not None:
                        _write(fd, self._state)
                finally:
                    self._state = None
                    self._write = False
                    if fd is not None:
                        os.close(fd)  # releases the lockf lock
        finally:
            if not keep_locked:
                self._lock.release()

    # -- fork ---------------------------------------------------------------------------------
    def before_fork(self) -> None:
        self._lock.acquire()

    def after_fork_in_parent(self) -> None:
        self._lock.release()

    def after_fork_in_child(self) -> None:
        """The child holds no lock: forget the parent's transaction (its descriptor is a
        copy; closing it does not release the parent's lock)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None
        self._state = None
        self._depth = 0
        self._write = False
        self._lock = threading.RLock()
        self._pid = os.getpid()


def _read(fd: int) -> dict[str, Any]:
    head = os.pread(fd, HEADER, 0)
    size = int(head)
    data = b""
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), HEADER + len(data))
        if not chunk:
            raise OSError(f"kit.fake: the model store is truncated ({len(data)}/{size})")
        data += chunk
    return json.loads(data)


def _write(fd: int, state: dict[str, Any]) -> None:
    body = json.dumps(state, separators=(",", ":")).encode()
    data = f"{len(body):0{HEADER}d}".encode() + body
    view = memoryview(data)
    offset = 0
    while offset < len(data):
        offset += os.pwrite(fd, view[offset:], offset)
