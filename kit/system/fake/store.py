"""The shared part of the model: one document that every process of a run can reach."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import marshal
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

#: The name of a store's directory starts with it.
MODEL_PREFIX = "kit-fake-model-"

HEADER = struct.Struct("<QQ")  # generation, body length
#: The document's file name in the store's directory (its lock file adds ``.lock``).
DOCUMENT = "model.bin"
MARSHAL_VERSION = 4
#: Check every transaction (see :class:`Store`); read when the store is created.
CHECK_ENV = "KIT_FAKE_STORE_CHECK"


class StoreError(RuntimeError):
    """A transaction broke the store's rules (raised only when checking is on)."""


class Store:
    """Transactions over the shared document at ``path``.

    Namespaces (hostname, mount tables, id maps), the registry that maps real pids to their model
    namespaces, pids and credentials (for ``/proc/PID/ns/KIND`` paths and ``write_id_maps(PID)``)
    and the fs structs are shared by processes, so they live here, not in a process. The document is
    a small file in a private directory (created by the supervisor before it forks the starter,
    removed after the run), opened anew for every transaction: a process that closes every
    descriptor (stage 2 does, before ``start_process``) still reaches it, and nothing the payload
    inherits points at it.

    Locking: a thread lock (threads of one process) and, for the outermost transaction of a thread,
    ``lockf`` on a lock file beside the document (processes; released by the kernel if the holder
    dies, so a killed process never wedges the run). Transactions nest within a thread. After a
    fork the child starts with a fresh thread lock and no file lock (POSIX record locks are not
    inherited) — :meth:`after_fork_in_child` must be called there (:mod:`kit.system.fake.system`
    does it from ``os.register_at_fork``).

    Format: a 16-byte header — the *generation* (incremented by every write) and the length of the
    body, two little-endian unsigned 64-bit integers — then the body: the document as ``marshal``
    data (the file is private to one run, written and read by the same interpreter; ``marshal`` is
    several times cheaper than JSON either way). A write makes a new file and renames it over the
    document: a writer killed in the middle (the kit kills the processes of a run that failed, and
    the kernel stops a write between two pages for a fatal signal) leaves the last committed
    document whole, never a new header over half a body.

    Caching: each process keeps the document it last read or wrote, with its generation. A
    transaction locks the file and reads the header; only when another process wrote since (the
    generation moved) does it read and decode the body again. A transaction works on the cached
    document itself: the outermost level of a write transaction writes it back with the next
    generation; an aborted transaction (an exception escaped) drops the cache, so whatever it
    changed is gone and the next transaction decodes the file again. A read transaction must not
    change the document (set ``KIT_FAKE_STORE_CHECK=1`` to have every transaction checked: a read
    that changed it, or a write of anything but plain JSON data, raises).

    The document holds JSON data only (dicts with string keys, lists, strings, numbers, booleans,
    None), so that what a process reads back is what it wrote, whichever process wrote it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._state: dict[str, Any] | None = None
        self._write = False
        self._pid = os.getpid()
        # The document as of generation _generation (None: decode the file again).
        self._cache: dict[str, Any] | None = None
        self._generation = -1
        self._check = os.environ.get(CHECK_ENV, "") not in ("", "0")
        self._body = b""  # the body of _generation (kept only when checking)
        #: Called again and again while another process holds the file's lock, instead of
        #: one blocking wait (None: wait). The supervisor answers the run's refused system
        #: calls there: a process of the run may hold the lock while another of its threads
        #: is trapped in a direct call that keeps the GIL (``socket.sethostname``), waiting
        #: for the supervisor's answer; blocked here, the supervisor would never give it.
        self.waiting: Callable[[], None] | None = None

    # -- creation --------------------------------------------------------------------------
    @classmethod
    def create(cls, state: dict[str, Any], directory: str | None = None) -> Store:
        """A new store holding ``state``, in a fresh private directory."""
        base = tempfile.mkdtemp(prefix=MODEL_PREFIX, dir=directory)
        path = os.path.join(base, DOCUMENT)
        os.close(
            os.open(_lock_path(path), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        )
        _replace(path, 1, _encode(state))
        return cls(path)

    def files(self) -> list[str]:
        """Every file the store may keep, by path (the document, its lock, and the new
        document a writer killed half-way left)."""
        return [self.path, _lock_path(self.path), _new_path(self.path)]

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
        """A consistent copy of the document (the caller's own: it may keep or change it)."""
        with self.transaction(write=False) as state:
            copy: dict[str, Any] = marshal.loads(marshal.dumps(state, MARSHAL_VERSION))
            return copy

    @property
    def writing(self) -> bool:
        """Whether the calling thread is in a write transaction (a read transaction must
        leave the document as it is)."""
        return self._depth > 0 and self._write

    @property
    def generation(self) -> int:
        """The generation of the document this process last read or wrote (-1: none)."""
        return self._generation

    def begin(self, write: bool = True) -> dict[str, Any]:
        if self._pid != os.getpid():  # forked without the fork hooks
            self.after_fork_in_child()
        self._lock.acquire()
        try:
            if self._depth == 0:
                fd = os.open(_lock_path(self.path), os.O_RDWR | os.O_CLOEXEC)
                try:
                    self._lock_file(fd)
                    self._state = self._load()
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

    def _lock_file(self, fd: int) -> None:
        if self.waiting is None:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            return
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            self.waiting()

    def end(self, commit: bool = True, keep_locked: bool = False) -> None:
        """Leave one level; the outermost writes (when asked and ``commit``) and unlocks.
        ``keep_locked`` writes but stays in the transaction (for a fork in the middle).
        Without ``commit`` the cached document is dropped (the transaction may have changed
        it): the file, which still holds the last committed document, is read again."""
        try:
            if keep_locked:
                if commit and self._write:
                    self._save()
                elif not commit:
                    self._forget()
                return
            self._depth -= 1
            if self._depth == 0:
                fd = self._fd
                try:
                    if not commit:
                        self._forget()
                    elif self._write:
                        self._save()
                    elif self._check:
                        self._check_unchanged()
                finally:
                    self._fd = None
                    self._state = None
                    self._write = False
                    if fd is not None:
                        os.close(fd)  # releases the lockf lock
        finally:
            if not keep_locked:
                self._lock.release()

    # -- the cache ----------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        """The document (locked by the caller): the cached one when no other process wrote
        since, else the file's, decoded."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            generation, size = HEADER.unpack(_pread(fd, HEADER.size, 0))
            if self._cache is None or generation != self._generation:
                body = _pread(fd, size, HEADER.size)
                self._cache = _decode(body)
                self._generation = generation
                if self._check:
                    self._body = body
        finally:
            os.close(fd)
        return self._cache

    def _save(self) -> None:
        """Write the transaction's document with the next generation; it stays cached."""
        state = self._state
        if state is None or self._fd is None:
            return
        try:
            if self._check:
                _check_plain_json(state)
            body = _encode(state)
            generation = self._generation + 1
            _replace(self.path, generation, body)
        except BaseException:
            self._forget()
            raise
        self._cache = state
        self._generation = generation
        if self._check:
            self._body = body

    def _forget(self) -> None:
        self._cache = None
        self._generation = -1
        self._body = b""

    def _check_unchanged(self) -> None:
        if self._state is not None and self._state != _decode(self._body):
            self._forget()
            raise StoreError(
                "kit.system.fake: a read-only transaction changed the model's document"
            )

    # -- fork ---------------------------------------------------------------------------------
    def before_fork(self) -> None:
        self._lock.acquire()

    def after_fork_in_parent(self) -> None:
        self._lock.release()

    def after_fork_in_child(self) -> None:
        """The child holds no lock: forget the parent's transaction (its descriptor is a
        copy; closing it does not release the parent's lock). A child forked in the middle
        of a transaction also forgets the cached document (it may hold uncommitted
        changes); one forked between transactions keeps it (the generation tells whether it
        is still current)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        if self._depth:
            self._forget()
        self._fd = None
        self._state = None
        self._depth = 0
        self._write = False
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self.waiting = None  # the parent's (the supervisor's) is not the child's to call


def _encode(state: dict[str, Any]) -> bytes:
    return marshal.dumps(state, MARSHAL_VERSION)


def _decode(body: bytes) -> dict[str, Any]:
    try:
        state = marshal.loads(body)
    except (EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"kit.system.fake: the model store is corrupt ({exc})") from None
    if not isinstance(state, dict):
        raise ValueError("kit.system.fake: the model store does not hold a document")
    return state


def _check_plain_json(state: dict[str, Any]) -> None:
    """Raise unless ``state`` survives a JSON round trip unchanged (no tuples, sets,
    non-string keys…) and no list or dict appears in it twice: what other processes decode
    must equal what this one keeps, and behave alike when changed in place."""
    try:
        same = json.loads(json.dumps(state)) == state
    except (TypeError, ValueError) as exc:
        raise StoreError(f"kit.system.fake: the model's document is not JSON data: {exc}") from None
    if not same:
        raise StoreError(
            "kit.system.fake: the model's document is not plain JSON data (a tuple or "
            "a non-string key?)"
        )
    seen: set[int] = set()
    todo: list[Any] = [state]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            raise StoreError(
                f"kit.system.fake: the model's document holds one object in two "
                f"places: {obj!r:.200}"
            )
        seen.add(id(obj))
        todo.extend(
            v
            for v in (obj.values() if isinstance(obj, dict) else obj)
            if isinstance(v, (dict, list))
        )


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), offset + len(data))
        if not chunk:
            raise OSError(
                f"kit.system.fake: the model store is truncated ({len(data)}/{size} "
                f"bytes at offset {offset})"
            )
        data += chunk
    return data


def _lock_path(path: str) -> str:
    return path + ".lock"


def _new_path(path: str) -> str:
    return path + ".new"


def _replace(path: str, generation: int, body: bytes) -> None:
    """Write the document to a new file, then rename it over ``path`` (atomic: a reader,
    or a writer killed half-way, never leaves or sees a torn document). The caller holds
    the lock, so one fixed name for the new file serves every writer; O_TRUNC discards
    what a killed writer left in it."""
    new = _new_path(path)
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(HEADER.pack(generation, len(body)) + body)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.rename(new, path)
