"""The run's temporary directory, locked by its supervisor so that a dead owner's is swept."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator

#: Every run directory's name starts with PREFIX; those made with the lock protocol with
#: LOCKED (a directory of an older kit, unlocked while its run lasts, is never judged).
PREFIX = "kit-run-"
LOCKED = PREFIX + "lk-"
#: A host sandbox's scratch directory (:func:`kit.run.sandbox.build`), made and locked as a
#: run directory is, by the sandbox's builder until init no longer needs it: a builder killed
#: meanwhile leaves it unheld, and it is swept with the run directories.
SCRATCH = "kit-sandbox-lk-"
#: A directory being made: locked, then renamed to LOCKED… or SCRATCH…; never swept (its
#: owner may be between the two steps).
NEW_PREFIX = "kit-new-"
#: The kit's own files in a fake run's directory (its model): the host sandbox shares the
#: run directory with the run, and nothing else of the supervisor's.
KIT_OWN = ".kit-own"


def kit_own(path: str) -> str:
    """A new private directory for the kit's own files in run directory ``path``."""
    own = os.path.join(path, KIT_OWN)
    os.mkdir(own, 0o700)
    return own


def leftovers(path: str, kit_files: Collection[str] = ()) -> list[str]:
    """What run directory ``path`` holds that the run left, by relative path: everything but
    ``kit_files`` (the kit's own, by path, kept in its :data:`KIT_OWN` directory) and the
    directories that hold them; inside those directories, each entry on its own."""
    kept = {os.path.relpath(f, path) for f in kit_files}
    holders = {d for f in kept for d in _parents(f)}
    left = []
    for directory in ("", *holders):
        try:
            names = os.listdir(os.path.join(path, directory))
        except OSError:
            continue
        rels = (os.path.join(directory, name) for name in names)
        left += [rel for rel in rels if rel not in kept and rel not in holders]
    return sorted(left)


def _parents(rel: str) -> Iterator[str]:
    """The directories above relative path ``rel`` (none above ``..``)."""
    d = os.path.dirname(rel)
    while d and not d.startswith(".."):
        yield d
        d = os.path.dirname(d)


def _lock(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def create(parent: str | None = None, prefix: str = LOCKED) -> tuple[str, int]:
    """A new run directory (``prefix``: :data:`SCRATCH`, a sandbox's scratch directory) and
    the descriptor that holds its lock (an ``flock`` on the directory itself: the kernel
    drops it when the last holder is gone, however it died). Keep the descriptor open for
    as long as the directory is in use, in this process only."""
    made = tempfile.mkdtemp(prefix=NEW_PREFIX, dir=parent)
    fd = _lock(made)
    path = os.path.join(os.path.dirname(made), prefix + os.path.basename(made)[len(NEW_PREFIX) :])
    os.rename(made, path)
    return path, fd


def remove(path: str, fd: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.close(fd)


def sweep(parent: str | None = None) -> list[str]:
    """Remove every run directory and sandbox scratch directory in ``parent`` (the temporary
    directory) whose lock nobody holds: its supervisor, or its sandbox's builder, died
    without removing it. Returns what was removed."""
    removed: list[str] = []
    for path, fd in _unheld(parent):
        try:
            shutil.rmtree(path, ignore_errors=True)  # not ours to remove: left alone
            if not os.path.exists(path):
                removed.append(path)
        finally:
            os.close(fd)
    return removed


def unheld(parent: str | None = None) -> list[str]:
    """The run and scratch directories in ``parent`` whose lock nobody holds (what
    :func:`sweep` would remove), left as they are."""
    found = []
    for path, fd in _unheld(parent):
        os.close(fd)
        found.append(path)
    return found


def _unheld(parent: str | None) -> Iterator[tuple[str, int]]:
    """Each run or scratch directory in ``parent`` whose lock nobody holds, with the
    descriptor that holds its lock now (the caller closes it)."""
    parent = parent or tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(parent) if n.startswith((LOCKED, SCRATCH))]
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        try:
            fd = _lock(path)
        except OSError:
            continue  # held: a run in progress (or not a directory of ours to judge)
        yield path, fd
