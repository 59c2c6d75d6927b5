"""Shared fixtures of the kit's own tests.

Guard: no thread of the pytest process may change credentials or namespaces; the kit must
do that only in the lean supervisor's children. Forked children of the pytest process (the
RPC tests' servers, probes) are not the pytest process and are let through.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kit.run import bytecode, environment, rundir
from kit.run.sandbox import INIT_NAME
from kit.system import linux

PYTEST_PID = os.getpid()


def _a_temporary_directory_per_worker() -> None:
    """Under xdist: this worker's own temporary directory (TMPDIR, for its zygote and every
    run too), removed at its exit. The leftover check (:func:`_no_run_directory_left`) then
    sees only the run and scratch directories of this worker's runs: with one directory
    shared, a leak of the other worker's was blamed on whatever test ran here meanwhile.
    Each is locked while its worker lives; one whose worker died (killed: no exit handler
    ran) is removed by the next worker that starts."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    parent = tempfile.gettempdir()
    for name in os.listdir(parent):
        if name.startswith(_WORKER_DIR_PREFIX):
            stale = os.path.join(parent, name)
            with contextlib.suppress(OSError):
                fd = os.open(stale, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its worker is gone
                    shutil.rmtree(stale, ignore_errors=True)
                finally:
                    os.close(fd)
    # Made under a name no sweep reads, locked, then named: another worker starting at the
    # same time never finds it unlocked.
    made = tempfile.mkdtemp(prefix=f".{_WORKER_DIR_PREFIX}new-")
    os.chmod(made, 0o1777)  # as /tmp: runs as the unprivileged user make theirs in it too
    lock = os.open(made, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held until this worker is gone
    suffix = os.path.basename(made).removeprefix(f".{_WORKER_DIR_PREFIX}new-")
    path = os.path.join(parent, f"{_WORKER_DIR_PREFIX}{worker}-{suffix}")
    os.rename(made, path)
    os.environ["TMPDIR"] = path
    tempfile.tempdir = None
    # Registered before the zygote's own exit handler, so run after it (last in, first out):
    # the zygote removes what it made ahead, then this goes.
    owner = os.getpid()  # a forked child that exits normally must not remove it
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))


_WORKER_DIR_PREFIX = "kit-tests-"
_a_temporary_directory_per_worker()


def _guarded(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    def guard(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() == PYTEST_PID:
            raise AssertionError(f"{name} called in the pytest process")
        return func(*args, **kwargs)

    return guard


@pytest.fixture(autouse=True, scope="session")
def _no_privileged_calls_in_pytest() -> Iterator[None]:
    patched = [
        (linux, "unshare"),
        (linux, "setns"),
        (linux, "clone"),
        (os, "setresuid"),
        (os, "setresgid"),
        (os, "setuid"),
        (os, "seteuid"),
        (os, "setgroups"),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name in patched]
    for mod, name, func in saved:
        setattr(mod, name, _guarded(f"{mod.__name__}.{name}", func))
    yield
    for mod, name, func in saved:
        setattr(mod, name, func)


@pytest.fixture(autouse=True, scope="session")
def _zygote_started_first() -> None:
    """The launcher's zygote (and its control socket) lives for the whole session: start it
    before any test measures the process's fds and children."""
    from kit.run.launcher import Zygote

    if os.environ.get("KIT_ZYGOTE", "1") != "0":
        Zygote.get()


def require_flow(flow: str) -> None:
    ok, why = environment.flows()[flow]
    if not ok:
        pytest.skip(f"flow {flow} cannot run here: {why}")


ALL_FLOWS = ("root", "suid", "userns", "fakeroot", "hybrid")


@pytest.fixture(autouse=True)
def _no_run_directory_left() -> Iterator[None]:
    """No run directory or sandbox scratch directory that nobody holds (its supervisor or
    its sandbox's builder died without removing it; the next zygote sweeps them) may be
    left by a test."""
    before = set(rundir.unheld())
    yield
    left = set(rundir.unheld()) - before
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
    # Under xdist each worker has a temporary directory of its own: the blame is exact.
    assert not left, (
        f"run or scratch directories left behind by this test, nobody holding them: {sorted(left)}"
    )


@pytest.fixture(params=ALL_FLOWS)
def flow(request: pytest.FixtureRequest) -> str:
    require_flow(request.param)
    return request.param


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A temp dir every uid of a run can write (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="kit-test-", dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _zygote_pid() -> int | None:
    from kit.run.launcher import Zygote

    return Zygote._instance.proc.pid if Zygote._instance is not None else None


def zygotes_sandbox(pid: int) -> bool:
    """Whether ``pid`` is the init of a host sandbox the launcher's zygote holds (or, while
    that sandbox is built, the witness its init clones for a moment: kit.run.sandbox), or the
    zygote's short-lived child compiling an engine's bytecode (kit.run.bytecode)."""
    parents = linux.process_parents()
    parent, zygote = parents.get(pid), _zygote_pid()
    name = linux.process_name(pid)
    if parent == zygote:
        return name in (INIT_NAME, bytecode.PROCESS_NAME)
    return (
        name == INIT_NAME
        and parent is not None
        and parents.get(parent) == zygote
        and linux.process_name(parent) == INIT_NAME
    )


def host_state() -> dict[str, Any]:
    """What a run must not change on the host, as seen from the pytest process."""
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f)
    return {
        "fds": sorted(os.listdir("/proc/self/fd")),
        "mounts": mounts,
        # Living descendants, but the launcher's long-lived zygote and the host sandboxes it
        # holds (the spares, built ahead; a finished run's, ending as it is asked).
        # A process gone between the listing and the reading of its name (a finished
        # sandbox's init, reaped by the zygote meanwhile) is no leftover, nor one that the
        # kit killed and that is still exiting (a loaded machine takes its time).
        "children": [
            f"{p} {name}"
            for p in linux.descendants(os.getpid())
            if linux.process_alive(p)
            and p != _zygote_pid()
            and not zygotes_sandbox(p)
            and (name := linux.process_name(p)) is not None
        ],
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else [],
    }


def exit_code_in_child(fn: Callable[[], int]) -> int:
    """Run ``fn`` in a forked child (what it changes of the process stays there: signal
    state, credentials); the child's exit code, ``fn``'s result (1 when it raises)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def wait_until(
    condition: Callable[[], Any], timeout: float = 10.0, what: str = "the condition"
) -> Any:
    """Poll ``condition()`` until it is true (returned) or ``timeout`` seconds pass (an
    assertion naming ``what``): a test waits for what it needs, never for a fixed time that
    a loaded machine may not honour."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.002)
    return value


def signal_taken(pid: int, signum: int) -> bool:
    """Whether ``signum`` is no longer pending for process ``pid`` (taken, or never sent)."""
    status = linux.read_status(f"/proc/{pid}/status")
    return not any(int(status.get(k, "0"), 16) >> (signum - 1) & 1 for k in ("ShdPnd", "SigPnd"))


def fd_child(body: Callable[[int], bytes]) -> tuple[int, bytes, int]:
    """Run ``body(w)`` in a forked child that may close any descriptor but ``w``, the write
    end of a pipe to this process: (the child's exit code, 1 when ``body`` raised; the bytes
    ``body`` returned, written to ``w``; ``w``'s number)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, body(w))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), data, w


def open_fds() -> list[int]:
    """The calling process's open descriptors, as /proc/self/fd lists them (the listing's
    own descriptor among them: the lowest free number)."""
    return sorted(int(x) for x in os.listdir("/proc/self/fd"))


def in_child(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn()`` in a forked child: ``{"ok": its JSON-able result}`` or ``{"error":
    "Type: message"}`` (for what must not change the test process: namespaces, ids…)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            out = {"ok": fn()}
        except BaseException as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)
