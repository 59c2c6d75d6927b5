"""Bytecode of an engine's modules, compiled outside its runs so no run's starter compiles them."""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import stat
import sys
from importlib.machinery import PathFinder

from kit import registry
from kit.system import linux

#: At most this many source files are compiled for one engine; a package larger than that is
#: more than an engine, and each run's starter compiles what it imports of the rest, as it
#: would without this module.
MAX_FILES = 500
#: Larger source files are left to the starters (the compiler's memory grows with them).
MAX_SOURCE_BYTES = 1 << 20
#: CPU seconds the compiling child may use before the kernel ends it.
CPU_LIMIT_S = 20
#: Scheduling priority (nice) of the compiling child: runs go first.
NICE = 10
#: The compiling child's name (``comm``).
PROCESS_NAME = "kit-bytecode"

#: (engine spec, import path) pairs compiled (or being compiled) by this process.
_started: set[tuple[str, tuple[str, ...]]] = set()


#: Set to 0, nothing is compiled ahead (each run's starter compiles what it imports).
SWITCH_ENV = "KIT_BYTECODE"


def engine_module(spec: str) -> str | None:
    """The module an engine spec names, found without importing anything: an import path's
    module, a built-in engine's, or a ``kit.engines`` entry point's when this process has
    read them already (the zygote has: reading them here would cost a one-shot run more
    than the bytecode saves); None otherwise."""
    if ":" in spec:
        return spec.partition(":")[0].strip() or None
    builtin = registry.BUILTIN_ENGINES.get(spec)
    if builtin is not None:
        return builtin.partition(":")[0]
    for ep in registry.entry_points_read() or ():
        if ep.name == spec:
            return ep.value.partition(":")[0].strip() or None
    return None


def sources(module: str, path: list[str]) -> list[str]:
    """The source files compiled ahead for ``module``: every ``.py`` file of its top-level
    package (an engine's modules import their siblings), or the module's own file when it
    is in no package. Found by the path finder alone, which executes nothing (not even a
    package's ``__init__``). Regular files only (no symbolic link is followed), none over
    :data:`MAX_SOURCE_BYTES`, at most :data:`MAX_FILES`."""
    spec = PathFinder.find_spec(module.partition(".")[0], path)
    if spec is None:
        return []
    roots = list(spec.submodule_search_locations or [])
    if not roots:
        origin = spec.origin or ""
        return [origin] if origin.endswith(".py") and _compilable(origin) else []
    found: list[str] = []
    for root in roots:
        if os.path.islink(root):
            continue  # the package itself lies elsewhere: not walked as root
        for where, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            for name in sorted(files):
                full = os.path.join(where, name)
                if name.endswith(".py") and _compilable(full):
                    found.append(full)
                    if len(found) >= MAX_FILES:
                        return found
    return found


def _compilable(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size <= MAX_SOURCE_BYTES


def start(spec: str, path: list[str]) -> int | None:
    """Fork a child that compiles the modules of the engine ``spec`` (found on ``path``) into
    the ``__pycache__`` directories beside them, as their owner, once per spec and path in
    this process; its pid (the caller reaps it), or None: already started here, nothing to
    compile, no fork possible (the bytecode is a saving, never a failure), or no bytecode
    wanted (``sys.dont_write_bytecode``: ``PYTHONDONTWRITEBYTECODE``, ``python -B``; or
    ``KIT_BYTECODE=0``).

    Why: the engine is imported in each run's starter (never in the kit's trusted processes,
    SPEC §11), which writes no bytecode (in the host sandbox a new ``__pycache__`` would be a
    change of the run's); without bytecode there, every run compiled the engine from source
    (2-3 ms of a 40 ms lifecycle for the reference engine). Compiling executes none of the
    engine's code: the files are found here by the path finder, and the child, whose import
    path is the standard library's alone (a ``compileall.py`` of the engine's is never
    imported), reads them and writes bytecode files as ``python -m compileall`` would, with
    the rights of their directory's owner, at a low priority, limited in CPU time, dying
    with its parent. The starter's import checks each bytecode file against its source (its
    time and size) and compiles from source whatever is missing or stale."""
    key = (spec, tuple(path))
    if key in _started or sys.dont_write_bytecode or os.environ.get(SWITCH_ENV) == "0":
        return None
    _started.add(key)
    module = engine_module(spec)
    files = sources(module, path) if module else []
    if not files:
        return None
    parent = os.getpid()
    # Born with its name: whoever lists this process's children (a test of leftovers)
    # knows it from its first instant.
    name = linux.get_name()
    linux.set_name(PROCESS_NAME)
    try:
        pid = os.fork()
    except OSError:
        return None
    finally:
        if os.getpid() == parent:
            linux.set_name(name)
    if pid == 0:  # pragma: no cover - the child; what it does is seen in the files it writes
        code = 1
        try:
            _compile_here(files, parent)
            code = 0
        finally:
            os._exit(code)
    return pid


def _compile_here(files: list[str], parent: int) -> None:
    """In the child: alone, low, limited, importing from the standard library only; then as
    the owner of the first file's directory (a package's root, or a module's directory);
    then each file whose directory that owner owns."""
    linux.set_parent_death_signal(signal.SIGKILL)
    linux.set_name(PROCESS_NAME)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    os.closerange(3, 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20))
    os.nice(NICE)
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S))
    stdlib = os.path.dirname(os.__file__)
    sys.path[:] = [stdlib, os.path.join(stdlib, "lib-dynload")]
    sys.path_importer_cache.clear()
    import compileall  # noqa: PLC0415  (the standard library's: see the path above)

    owner = os.stat(os.path.dirname(files[0]))
    if os.geteuid() == 0 and owner.st_uid != 0:
        os.setgroups([])
        os.setresgid(owner.st_gid, owner.st_gid, owner.st_gid)
        os.setresuid(owner.st_uid, owner.st_uid, owner.st_uid)
        # The change of credentials cleared the parent-death signal: again, and the parent
        # may have gone meanwhile.
        linux.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent:
            return
    for source in files:
        if _writable_here(os.path.dirname(source)):
            # Skips a file whose bytecode is up to date; a file that does not compile is
            # left to the starter, whose import reports its error as the engine's.
            compileall.compile_file(source, quiet=2)


def _writable_here(directory: str) -> bool:
    """Whether this process may write ``directory``'s bytecode: the directory, and its
    ``__pycache__`` if there is one, are real directories (no link) of this process's
    uid, and, for root, writable by no one else (no other user can swap an entry for a
    link to where root would then write)."""
    me = os.geteuid()
    for path in (directory, os.path.join(directory, "__pycache__")):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # no __pycache__ yet: made by the compile, in a directory checked
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != me:
            return False
        if me == 0 and st.st_mode & 0o022:
            return False
    return True


def wait(pid: int, timeout: float) -> None:
    """Reap the compiling child ``pid`` (:func:`start`), killed if it has not ended within
    ``timeout`` seconds (a bytecode file is written whole and renamed into place: none is
    left half written)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = None
    try:
        if pidfd is not None:
            poller = select.poll()  # the descriptor's number may be beyond select's limit
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(timeout * 1000):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except BaseException:  # interrupted (kit run's signal): the child goes all the same
        if pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        raise
    finally:
        if pidfd is not None:
            os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
