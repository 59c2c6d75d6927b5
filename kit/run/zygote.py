"""The zygote: a lean, pre-imported process that forks one supervisor per run."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import resource
import select
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Collection

from kit.run import bytecode, hostdiff, rundir
from kit.run import sandbox as host_sandbox
from kit.run.request import RunRequest
from kit.run.supervisor import (
    Ahead,
    finish_ahead,
    fits_ahead,
    preload,
    prepare_ahead,
    prepare_backend,
    run_supervised,
    start_ahead,
)
from kit.starter.common import default_signals
from kit.system import linux

MAX_MESSAGE = 1 << 20
FIXED_FDS = 4  # stdin, stdout, stderr, result
KEPT_STATUSES = 256

#: Wait statuses of the supervisors reaped, by pid (the newest KEPT_STATUSES).
exit_statuses: dict[int, int] = {}
#: A pidfd of the init of each host sandbox built here, by the pid of the supervisor that
#: took it: ended as soon as that supervisor is gone (its result does not wait for the
#: teardown), with SIGTERM (init saves its coverage data) or, after a supervisor that was
#: killed, SIGKILL.
sandbox_inits: dict[int, int] = {}
#: The zygote's own copies of the sysctl files handed to each supervisor, by its pid
#: (kit.run.hostdiff.ReadAhead.sysctls), when its limit leaves room for them beside the
#: spares': closed once that supervisor is gone, so the files' last close (about a
#: millisecond for half a thousand) is not the supervisor's, whose exit its launcher awaits.
kept_files: dict[int, list[int]] = {}


def reap() -> None:
    """Reap every exited child, keeping its wait status for the launcher's questions, and end
    the host sandbox of each supervisor reaped."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):  # a signal handler: nothing may escape it
            hostdiff.close_all(kept_files.pop(pid, []))
        init = sandbox_inits.pop(pid, None)
        if init is not None:
            try:
                signal.pidfd_send_signal(
                    init, signal.SIGKILL if os.WIFSIGNALED(status) else signal.SIGTERM
                )
            except ProcessLookupError:
                pass
            os.close(init)
        exit_statuses[pid] = status
        while len(exit_statuses) > KEPT_STATUSES:
            del exit_statuses[next(iter(exit_statuses))]


def place_fds(
    received: list[int],
    targets: list[int],
    extra: Collection[int] = (),
    kept: Collection[int] = (),
) -> tuple[int, dict[int, int]]:
    """In the run's child: stdio and pass-through fds at their numbers; returns the result
    fd and where each of ``extra`` and ``kept`` (the zygote's own, for the supervisor) now
    is. ``kept`` (a block of hundreds, each renumbered would cost the run's path) stay at
    their numbers, but those a number in play needs. Everything else the zygote had open is
    closed."""
    wanted = {0: received[0], 1: received[1], 2: received[2]}
    for target, fd in zip(targets, received[FIXED_FDS:], strict=True):
        wanted[target] = fd
    stay = set(kept).difference(wanted)
    extra = {*extra, *set(kept).intersection(wanted)}  # a target's number: moved first
    # Park every source above every number in play first, so no dup2 clobbers another source;
    # F_DUPFD takes the lowest free number from there (fixed numbers may pass the fd limit).
    floor = max([*received, *wanted, *extra, *stay]) + 1

    def park(fd: int) -> int:
        return fcntl.fcntl(fd, fcntl.F_DUPFD, floor)

    high = {target: park(fd) for target, fd in wanted.items()}
    result_high = park(received[3])
    extra_high = {fd: park(fd) for fd in sorted(extra)}
    linux.close_fds_except(set(high.values()) | {result_high, *extra_high.values(), *stay})
    for target, fd in high.items():
        os.dup2(fd, target)
        os.close(fd)
    result_fd = os.dup(result_high)
    os.close(result_high)
    os.set_inheritable(result_fd, False)
    moved = {fd: fd for fd in stay}
    for old, fd in extra_high.items():
        moved[old] = os.dup(fd)
        os.close(fd)
    return result_fd, moved


def settle() -> None:
    """After new imports, before the forks: make this process cheap to fork. Garbage goes
    and the heap's free pages go back to the kernel (fork copies the page table of every
    mapped page: ~0.1 ms less per fork with the reference engine); what is left is frozen
    (``gc.freeze``: a full collection in a run's process then never walks, and so never
    copies, the pages of the objects it shares with the zygote)."""
    gc.collect()
    gc.freeze()
    linux.release_free_memory()


#: The limit of open files the zygote was started with (soft, hard): each run gets it back.
_callers_fd_limit: tuple[int, int] | None = None


def _raise_fd_limit() -> None:
    """Raise the zygote's soft limit of open files to the hard one: each spare holds half a
    thousand sysctl files (kit.run.hostdiff.ReadAhead), and with two, and the copies kept
    for the runs going on, the usual 1024 left the second without them (its run then opened
    them on its path)."""
    global _callers_fd_limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    _callers_fd_limit = (soft, hard)
    if hard != resource.RLIM_INFINITY and hard > soft:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _restore_fd_limit() -> None:
    """In a run's supervisor: the limit the zygote was started with (the run's processes,
    the engine's among them, see the caller's, as without a zygote). The descriptors it
    holds above it stay open."""
    if _callers_fd_limit is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, _callers_fd_limit)


#: How many host sandboxes the zygote keeps built ahead. Two: a run takes one and leaves one
#: for the next, so that the pool is topped up when no run goes on (a build during a run
#: competes with it for the CPU, and adds half its cost to the run's wall time on two cores;
#: a run that starts while one is built still does), and two runs at once each find one.
SPARES = 2


class Spares:
    """The host sandboxes built ahead for the next sandboxed runs (kit.run.supervisor.
    start_ahead): at most :data:`SPARES`, in the order they were started, each built by its
    init while the zygote serves on (finished when init reports, :meth:`finish`)."""

    def __init__(self) -> None:
        self.items: list[Ahead] = []
        #: Whether a request has taken one: none is built before (a zygote may serve only
        #: runs that build their own, or none).
        self.wanted = False

    def due(self, runs_going_on: bool) -> bool:
        """Whether a build is to start: up to :data:`SPARES` while no run goes on; during
        runs only when none is left (the next request would otherwise build one on its
        path). A built one whose init has died is dropped first."""
        for ahead in list(self.items):
            if ahead.finished and ahead.building is not None and ahead.building.init_exited():
                self.items.remove(ahead)
                ahead.drop()
        return self.wanted and len(self.items) < SPARES and (not runs_going_on or not self.items)

    def top_up(self, runs_going_on: bool) -> None:
        """Start the builds that are :meth:`due`, at a lower priority
        (:func:`_in_the_background`): a run may start while one goes on."""
        while self.due(runs_going_on):
            try:
                self.items.append(_in_the_background(start_ahead))
            except Exception:  # noqa: BLE001 the next sandboxed request builds its own
                self.wanted = False  # and asks again: no build loop meanwhile
                return

    def building(self) -> dict[int, Ahead]:
        """The sandboxes still being built, by the descriptor that says when (init's report
        pipe: readable once init has reported, or died)."""
        return {
            ahead.building.ready_fd: ahead
            for ahead in self.items
            if not ahead.finished and ahead.building is not None
        }

    def finish(self, ahead: Ahead) -> None:
        """Wait for ``ahead``'s init and read the sandbox ahead (a failure is kept, for the
        run that takes it to retry)."""
        i = self.items.index(ahead)
        try:
            self.items[i] = _in_the_background(lambda: finish_ahead(ahead))
        except BaseException as exc:
            del self.items[i]
            ahead.drop()  # unless finish_ahead did
            self.wanted = False  # the next request asks again: no build loop meanwhile
            if not isinstance(exc, Exception):
                raise

    def take(self) -> Ahead:
        """A sandbox made ahead: the oldest built one, else the oldest still being built,
        finished now; one made now if there is none or each failed: its build failed or its
        init has died since (reaped by :func:`reap` meanwhile, perhaps)."""
        self.wanted = True
        self.items.sort(key=lambda ahead: not ahead.finished)  # stable: oldest first
        while self.items:
            ahead = self.items.pop(0)
            try:
                ahead = finish_ahead(ahead)
            except Exception:  # noqa: BLE001 the next one
                ahead.drop()  # unless finish_ahead did
                continue
            if ahead.building is not None and not ahead.building.init_exited():
                return ahead
            ahead.drop()
        return prepare_ahead()

    def drop_all(self) -> None:
        items, self.items = self.items, []
        for ahead in items:
            ahead.drop()


def idle(zygote: int) -> bool:
    """Whether the zygote ``zygote`` waits for work with nothing under way (seen from
    outside, by a bench or a test): one thread (none reading a new sandbox ahead), asleep,
    every child asleep and every sandbox init of its own in its reaping loop (built: a
    build sleeps too)."""

    def quiet() -> bool:
        try:
            return len(linux.thread_ids(zygote)) == 1 and linux.process_state(zygote) == "S"
        except FileNotFoundError:  # gone
            return False

    if not quiet():
        return False
    for pid, parent in linux.process_parents().items():
        if parent != zygote:
            continue
        if linux.process_state(pid) != "S":
            return False
        if linux.process_name(pid) == host_sandbox.INIT_NAME and not host_sandbox.init_waits(pid):
            return False
    return quiet()  # still: an init that reported meanwhile has the zygote read it


def serve(control: socket.socket) -> int:
    # The next sandboxed runs' directories and host sandboxes, made between runs: a run then
    # only adopts them (kit.run.supervisor.prepare_ahead).
    spares = Spares()
    try:
        return _serve(control, spares)
    finally:
        spares.drop_all()


#: How long the zygote waits, after the last run, for a request before it builds spares.
TOP_UP_PAUSE = 0.02


def _readable(sock: socket.socket, seconds: float) -> bool:
    """Whether ``sock`` has something to read within ``seconds``."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(seconds * 1000))


def _wait(control: socket.socket, spares: Spares, running: dict[int, int]) -> bool:
    """Block until a message comes, a supervisor exits or a spare's init reports; finish
    the spares whose init did, forget the supervisors that exited. Whether a message is
    there to read."""
    building = spares.building()
    poller = select.poll()
    for fd in [control.fileno(), *running.values(), *building]:
        poller.register(fd, select.POLLIN)
    ready = {fd for fd, _ in poller.poll()}
    if control.fileno() not in ready:  # a request goes first: the pipe stays readable
        for fd in ready.intersection(building):
            spares.finish(building[fd])
    for pid, pidfd in list(running.items()):
        if pidfd in ready:
            os.close(pidfd)
            del running[pid]
    return control.fileno() in ready


def _serve(control: socket.socket, spares: Spares) -> int:
    """Answer the launcher's messages on the control socket until EOF.

    Protocol (``SOCK_SEQPACKET``, one datagram per message): launcher → zygote: ``{"request":
    RunRequest JSON, "targets": [fd numbers]}`` with the file descriptors attached in this order:
    stdin, stdout, stderr, the result pipe's write end, then one per entry of ``targets`` (each
    lands under that number in the run). Zygote → launcher: ``{"pid": supervisor pid}`` or
    ``{"error": message}``. ``{"status_of": pid}`` asks how a supervisor that has exited ended:
    ``{"status": wait status}``, null when unknown (the zygote reaps its children and keeps the last
    statuses). EOF on the control socket ends the zygote.
    """
    # Each supervisor forked and not gone yet, by pid: a pidfd, which wakes the wait when it
    # exits (the spares are topped up then).
    running: dict[int, int] = {}
    while True:
        reap()
        # Between runs, a request that comes at once (the next of a series) goes first: its
        # run takes a spare built, and the build waits for a pause, or for the pool to be
        # empty (then during that run, as it would be anyway).
        if spares.due(runs_going_on=bool(running)) and (
            running or not _readable(control, TOP_UP_PAUSE)
        ):
            spares.top_up(runs_going_on=bool(running))
        if not _wait(control, spares, running):
            continue
        try:
            data, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 64)
        except InterruptedError:
            continue
        if not data:
            return 0
        try:
            message = json.loads(data)
            if "status_of" in message:
                reap()
                control.send(
                    json.dumps(
                        {"status": exit_statuses.pop(int(message["status_of"]), None)}
                    ).encode()
                )
                continue
            request = RunRequest.from_json(message["request"])
            targets = [int(t) for t in message.get("targets", [])]
            if len(fds) != FIXED_FDS + len(targets):
                raise ValueError(f"expected {FIXED_FDS + len(targets)} fds, got {len(fds)}")
            if preload(request):
                settle()
            # Here the code is warm and the pages our own: what the supervisor would compute
            # first, cold, right after the fork, costs a fraction of it.
            prepared = prepare_backend(request)
            ahead = spares.take() if fits_ahead(request) else None
        except Exception as exc:  # noqa: BLE001 engine imports may raise anything
            for fd in fds:
                os.close(fd)
            control.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            continue
        watch = ahead.watch if ahead is not None else None
        keep_files = watch is not None and watch.room_to_keep
        # Until the new supervisor is in sandbox_inits: reap() must not see it go before.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN, ENOMEM: this request fails, the zygote serves on
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            for fd in fds:
                os.close(fd)
            if ahead is not None:
                ahead.drop()
            control.send(json.dumps({"error": f"forking the supervisor: {exc}"}).encode())
            continue
        if pid == 0:
            code = 1
            try:
                control.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                os.setsid()
                result_fd, moved = place_fds(
                    fds, targets, ahead.fds() if ahead else set(), ahead.files() if ahead else []
                )
                _restore_fd_limit()
                # What place_fds left for the run: stdio and the pass-through fds.
                inherited = {0, 1, 2, *targets}
                run_supervised(
                    request,
                    result_fd,
                    prepared,
                    ahead.moved(moved) if ahead else None,
                    inherited,
                )
                code = 0
            finally:
                os._exit(code)
        prepared = None
        for fd in fds:
            os.close(fd)
        building = ahead.building if ahead is not None else None
        if building is not None and building.pidfd is not None:
            # Held since the build: init's pid may have been reaped and reused meanwhile.
            sandbox_inits[pid], building.pidfd = building.pidfd, None
        if keep_files and watch is not None:
            kept_files[pid], watch.sysctls = watch.files(), None
        stale = running.pop(pid, None)  # a pid reused before the wait saw its first owner go
        if stale is not None:
            os.close(stale)
        # Not reaped yet: SIGCHLD is still blocked. Without a pidfd (EMFILE) the run is not
        # counted as going on: the spares may then be topped up during it.
        with contextlib.suppress(OSError):
            running[pid] = os.pidfd_open(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        if ahead is not None:
            ahead.discard()  # the supervisor's now: its lock is the supervisor's alone
        control.send(json.dumps({"pid": pid}).encode())
        # After the answer, off the run's way (a walk of the engine's package and a fork,
        # once per engine); reaped by reap(), as every child of ours.
        bytecode.start(request.engine, request.sys_path)


#: How much less the zygote and the init it forks weigh (nice) while they build a sandbox
#: ahead during a run: that work must not slow down the run going on, and on an idle core it
#: makes no difference.
AHEAD_NICE = 10


def _in_the_background(make: Callable[[], Ahead]) -> Ahead:
    """``make()`` at a lower priority (:data:`AHEAD_NICE`): the sandbox's init, forked
    meanwhile, goes back to ours once built (before it reports ready)."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if not _may_raise_priority():
        return make()  # we could not go back: the next supervisors would inherit it
    os.setpriority(os.PRIO_PROCESS, 0, min(base + AHEAD_NICE, 19))
    host_sandbox.priority_when_ready = base
    try:
        return make()
    finally:
        host_sandbox.priority_when_ready = None
        os.setpriority(os.PRIO_PROCESS, 0, base)  # before the next fork: supervisors inherit it


def _may_raise_priority() -> bool:
    """Whether this process may lower its nice value again: CAP_SYS_NICE, which the kernel
    honours in the initial user namespace only (root of another one gets EACCES)."""
    nice = linux.caps_to_mask(["CAP_SYS_NICE"])
    return linux.in_initial_user_namespace() and bool(linux.capget()[0] & nice)


def main(argv: list[str]) -> int:
    """Run the zygote on the control socket ``argv[0]`` until EOF.

    Starting a fresh interpreter and importing the kit costs far more than a whole lifecycle; the
    zygote pays it once per launcher process. It never imports the engine (untrusted code, SPEC
    §11): each run's starter does, in the run's sandbox. Its main thread never changes its
    credentials or namespaces (building a host sandbox, it sets the pid namespace of one child,
    init's, and restores its own at once; a short-lived thread joins the new sandbox's uts, net
    and ipc namespaces to read it ahead, and ends, before the next fork): each run happens in a
    forked child that becomes the run's supervisor (:mod:`kit.run.supervisor`), in its own
    session.

    Every process of a run is forked from it, directly or not, so it is kept cheap to fork: after
    new imports it collects, freezes (``gc.freeze``) and returns its free heap pages to the kernel;
    the kit itself does not import pyroute2 (``lo`` goes up with an ioctl); and what a supervisor
    would first compute cold, right after the fork, it computes here, warm (the fake backend's
    initial model; the temporary directory). For the host sandbox it goes further: once asked for
    a sandboxed run, it keeps :data:`SPARES` run directories and host sandboxes made ahead, each
    read before any run (:class:`Spares`), built between runs (during one only when none is left),
    while it serves on; a supervisor only adopts one. Their init is the zygote's child: the zygote
    ends it once the supervisor that adopted it is gone, off the path of the run's result.
    """
    control = socket.socket(fileno=int(argv[0]))
    default_signals()  # before our own SIGCHLD handler: the launcher's shell may ignore some
    # Reap finished supervisors at once (the handler runs between retries of poll).
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: reap())
    linux.set_parent_death_signal(signal.SIGKILL)
    linux.set_name("kit-zygote")
    os.chdir("/")
    _raise_fd_limit()
    tempfile.gettempdir()  # found once here (it tries writing a file), not in every run
    rundir.sweep()  # what supervisors and sandbox builders that died left
    return serve(control)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
