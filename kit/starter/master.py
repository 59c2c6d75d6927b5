"""The master: create, start, monitor and clean up the container (SPEC §5)."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import queue
import resource
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kit import registry
from kit.contract import (
    Context,
    SignalChannel,
)
from kit.ledger import probe
from kit.starter.common import (
    EXIT_FATAL,
    PRE_EXEC_NAMES,
    ContainerCreationFailed,
    ControlProtocolError,
    HookRunner,
    _how_ended,
    _recv_control,
    _send,
    _status_to_code,
    _unwrap,
    describe_error,
    rpc_conn_kept,
)
from kit.starter.config import StarterConfig
from kit.starter.control import Control
from kit.system import current, linux
from kit.system.linux import dup_high, fd_base, move_high

#: ``os``'s wait family as the kit imported it: the master replaces it for engine code
#: (Master._hold_reaping), not for its own calls.
_waitpid, _wait4, _wait, _wait3, _waitid = os.waitpid, os.wait4, os.wait, os.wait3, os.waitid

if TYPE_CHECKING:
    from kit.starter.stage1 import Starter


#: Signals the master never blocks (synchronous faults, and the uncatchable ones).
_UNBLOCKABLE = {
    signal.SIGKILL,
    signal.SIGSTOP,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
    signal.SIGABRT,
}
MASTER_SIGNALS = {s for s in signal.valid_signals() if s not in _UNBLOCKABLE}

_libc = ctypes.CDLL(None, use_errno=True)
_SFD_NONBLOCK = os.O_NONBLOCK
_SFD_CLOEXEC = os.O_CLOEXEC
#: How often the master looks whether the container's SIGCHLD merged into another (seconds).
_MERGE_LOOK = 0.05
#: The longest the poll loop blocks (seconds).
_MAX_WAIT = 1.0
#: struct signalfd_siginfo: 128 bytes, ssi_signo at 0 and ssi_pid at 12.
_SIGINFO_SIZE = 128
#: How long a stage 2 whose control socket reached EOF may take to become a zombie: its
#: descriptors close on its way out, a moment before it has exited.
EXIT_GRACE = 0.05
_SIGINFO = struct.Struct("=I8xI")


def _shut_down(fd: int) -> None:
    """Shut the socket behind ``fd`` down both ways (for every descriptor of it)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the RPC server's end is gone already
    finally:
        sock.detach()


def _readable(fd: int, seconds: float) -> bool:
    """Whether ``fd`` is readable within ``seconds``. poll, not select: the descriptor is
    moved high (at least 768), at or above FD_SETSIZE (1024) when engine code holds many,
    where select raises ValueError."""
    waiting = select.poll()
    waiting.register(fd, select.POLLIN)
    return bool(waiting.poll(seconds * 1000))


class KitFdClosed(RuntimeError):
    """Engine code in the master closed a file descriptor of the kit's poll loop."""


class KitThreadFailed(RuntimeError):
    """A thread of the master failed in the kit's own code (around the engine's hooks): most
    likely engine code took something of the kit's from under it (a descriptor closed, the
    descriptor table full); the run is failed rather than left waiting for that thread."""


def open_signalfd(signals: set[signal.Signals]) -> int:
    """A non-blocking signalfd(2) for ``signals`` (blocked in every thread of the caller)."""
    sigset = ctypes.create_string_buffer(128)  # sigset_t
    _libc.sigemptyset(sigset)
    for sig in signals:
        _libc.sigaddset(sigset, int(sig))
    fd: int = _libc.signalfd(-1, sigset, _SFD_NONBLOCK | _SFD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"signalfd: {os.strerror(err)}")
    return fd


def control_abused(exc: ControlProtocolError) -> RuntimeError:
    """The fatal error of bytes on master_fd that are not the kit's."""
    return RuntimeError(
        f"engine code in stage 2 wrote to the master's control socket (master_fd): {exc}; "
        "start_process must leave master_fd alone (it closes on exec)"
    )


def is_wait_status(value: object) -> bool:
    """Whether ``value`` can be a wait status as waitpid(2) returns it: an int of 16 bits
    (not a bool, which is an int to Python but no status)."""
    return type(value) is int and 0 <= value < 1 << 16


class Master:
    """The master process: create_container ‖ start waiter ‖ monitor_container, then
    cleanup_container (SPEC §2)."""

    def __init__(
        self,
        starter: Starter,
        common_json: dict[str, Any],
        sconf: StarterConfig,
        pid: int,
        master_sock: socket.socket,
        rpc_sock: socket.socket,
    ) -> None:
        self.starter = starter
        self.common_json = common_json
        self.sconf = sconf
        self.pid = pid
        self.sock = master_sock
        self.rpc_sock = rpc_sock
        #: What rpc_sock's descriptor is: engine code may close it, or put another file
        #: under its number, behind the socket object's back.
        self.rpc_identity = linux.fd_identity(rpc_sock.fileno())
        self.ledger = starter.ledger.for_role("master")
        self.hooks = HookRunner(self.ledger, starter.system, starter.req.probes)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.go_sent = threading.Event()
        self.exec_checked = threading.Event()
        self.signals = SignalChannel()
        self.ctx = Context()
        self.container_sigchld = threading.Event()
        # The master's one poll loop (main thread): signals, the creation watch, and wake-ups
        # from the hook threads (an event, exec checked, a thread done). One thread instead
        # of a signal thread and a watch thread handing the GIL around.
        self.poller = select.poll()
        # Opened after init_config (engine code in this process could close them before),
        # high up (see fd_base).
        self.fd_base = fd_base()
        self.wake_r = self.wake_w = -1
        self.sigfd = -1
        #: A descriptor of the loop that engine code closed (reported; the run is failed).
        self.fd_lost: KitFdClosed | None = None
        #: What each descriptor of the loop refers to when opened: engine code may put
        #: another file under the number (dup2), which poll cannot tell from ours.
        self.fd_ids: dict[int, tuple[int, int] | None] = {}
        #: The container's SIGCHLD, held (and the signals after it unread) until the start
        #: waiter has told exec from exit, or until the deadline.
        self.held: tuple[signal.struct_siginfo, float] | None = None
        self._pending: list[tuple[int, int]] = []  # read after the held one
        self.watch_lock = threading.Lock()
        self.watching: tuple[int, int] | None = None  # (pidfd, rpc dup) while creating
        self._unwatched: list[tuple[int, int]] = []  # to close, in the loop's thread
        self.rpc_watch_fd = -1  # the loop's own copy of the RPC connection (_watch_creation)
        #: The kit's own copy of the RPC connection (:meth:`_hold_rpc`): it is what
        #: rpc_identity names, as long as engine code leaves its number alone.
        self.rpc_kit_fd = -1

    def main(self) -> int:
        linux.set_name("kit-master")
        signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        kind, message = _recv_control(self.sock)
        if kind != Control.READY:
            self.ledger.emit(
                "starter_error",
                stage="namespaces",
                message=message or "container process died during setup",
            )
            self.sock.close()
            self.rpc_sock.close()
            _, wstatus = os.waitpid(self.pid, 0)
            self.ledger.emit(
                "process_exit", child_role="container", child_pid=self.pid, status=wstatus
            )
            return EXIT_FATAL
        engine = registry.make_engine(self.starter.req.engine)
        try:
            self.hooks.init_engine(
                engine, self.common_json["engine_config"], self.common_json["container_id"], False
            )
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            self.ledger.emit("fatal", message=f"master initialisation failed: {_unwrap(exc)}")
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            return EXIT_FATAL
        self.engine = engine
        self._hold_reaping()
        self._open_wake_pipe()
        self._open_signalfd()
        ended = [threading.Event() for _ in range(3)]
        threads = [
            threading.Thread(target=self._waking(fn, end), name=name, daemon=True)
            for fn, name, end in (
                (self._create, "kit-create", ended[0]),
                (self._start_waiter, "kit-start-waiter", ended[1]),
                (self._monitor, "kit-monitor", ended[2]),
            )
        ]
        for t in threads:
            t.start()

        fatal: BaseException | None = None
        status: int | None = None
        value: Any
        kind, value = self._next_event(None) or ("timeout", None)  # None: no timeout
        if kind in ("fatal", "fd_lost"):
            fatal = value
            if kind == "fatal":  # fd_lost: recorded as it was found
                self.ledger.emit("fatal", message=str(fatal), error=describe_error(fatal))
            self._kill_container()
            status = self._await_status()
        else:
            status = value
        if status is not None:
            self._await_container_sigchld()
        self._serve(lambda: ended[0].is_set() and ended[1].is_set())
        threads[0].join()
        threads[1].join()
        self._check_sentinel()
        fatal = self._late_fatal(fatal)  # a fatal error of post_start after the status
        self.ctx.cancel()
        # On a thread of its own, as the other hooks: the loop goes on reading signals while
        # the cleanup runs (unread, two of a kind would merge in the kernel, and a cleanup
        # that hangs until the tree is killed would take those signals along unrecorded).
        cleaned = threading.Event()
        cleanup = threading.Thread(
            target=self._waking(functools.partial(self._cleanup, fatal, status), cleaned),
            name="kit-cleanup",
            daemon=True,
        )
        cleanup.start()
        self._serve(cleaned.is_set)
        cleanup.join()
        # What arrived as the cleanup ended, before the exit.
        self._release_held(force=True)
        self._read_signals()
        fatal = self._late_fatal(fatal)  # a descriptor lost during the cleanup
        if fatal is not None or self.fd_lost is not None or status is None:
            return EXIT_FATAL
        return _status_to_code(status)

    def _cleanup(self, fatal: BaseException | None, status: int | None) -> None:
        try:
            self.hooks.call(
                "cleanup_container",
                self.engine.operations.cleanup_container,
                self.ctx,
                fatal,
                status,
            )
        except BaseException:  # noqa: BLE001 engine code may raise anything
            pass  # recorded by the hook runner; the exit code is unchanged

    def _late_fatal(self, fatal: BaseException | None) -> BaseException | None:
        """``fatal``, or the first fatal error the hook threads or the loop reported since
        the first event (recorded here unless the loop did)."""
        while not self.events.empty():
            kind, value = self.events.get_nowait()
            if kind in ("fatal", "fd_lost") and fatal is None:
                fatal = value
                if kind == "fatal":
                    self.ledger.emit("fatal", message=str(fatal), error=describe_error(fatal))
        return fatal

    def _check_sentinel(self) -> None:
        """Reap the starter's sentinel child; record it if someone else (the engine) did."""
        sentinel = getattr(self.starter, "sentinel", None)
        if not sentinel:
            return
        try:
            _waitpid(sentinel, 0)
        except ChildProcessError:
            self.ledger.emit(
                "foreign_reap",
                child_pid=sentinel,
                detail=(
                    "a child of the master that is not the container (the kit's sentinel) was "
                    "reaped by the engine: monitor_container must reap only the container's pid"
                ),
            )

    def _await_container_sigchld(self) -> None:
        """Hold the master until the loop has recorded the container's SIGCHLD.

        A monitor that waits on a pidfd reaps the container as soon as it exits, possibly
        before the loop has taken the SIGCHLD off the pending set: without this
        wait the master could finish and exit with the SIGCHLD never recorded (SIG-005).
        When SIGCHLD is ignored (an engine's doing) the kernel sends none: nothing to wait for.
        """
        if linux.signal_ignored(signal.SIGCHLD):
            return
        deadline = time.monotonic() + self.starter.req.hook_timeout
        while not self._serve(self.container_sigchld.is_set, _MERGE_LOOK):
            if time.monotonic() >= deadline:
                return
            if self.held is None and not self._pending and not linux.signal_pending(signal.SIGCHLD):
                # Standard signals do not queue: a SIGCHLD pending when the container exited
                # (another child of the master's: an engine helper) took its place, and the
                # container's is not coming. Recorded as the container's, said merged.
                info = signal.struct_siginfo((signal.SIGCHLD, 0, 0, self.pid, 0, 0, 0))
                self._record(info, merged=True)
                return

    def _kill_container(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _await_status(self) -> int | None:
        """After a fatal error: the container's status from the monitor, or our own wait."""
        while True:
            event = self._next_event(self.starter.req.hook_timeout)
            if event is None:
                break
            kind, value = event
            if kind == "status":
                status: int | None = value
                return status
            if kind == "monitor_failed":
                break
        try:
            _, status = _waitpid(self.pid, 0)  # the kit's own: not held (_hold_reaping)
            return status
        except ChildProcessError:
            return None

    # -- the poll loop ---------------------------------------------------------------------
    def _open_wake_pipe(self) -> None:
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.wake_r, self.wake_w = move_high(r, self.fd_base), move_high(w, self.fd_base)
        self._remember(self.wake_r, self.wake_w)
        self.poller.register(self.wake_r, select.POLLIN)

    def _open_signalfd(self) -> None:
        self.sigfd = move_high(open_signalfd(MASTER_SIGNALS), self.fd_base)
        self._remember(self.sigfd)
        if self.held is None:
            self.poller.register(self.sigfd, select.POLLIN)

    def _remember(self, *fds: int) -> None:
        for fd in fds:
            self.fd_ids[fd] = linux.fd_identity(fd)

    def _check_fds(self) -> None:
        """Every descriptor of the loop still the file it was opened as: another one under
        its number (engine code's dup2: /dev/null always reads as ready and empty, a regular
        file as forged signals) is a lost descriptor."""
        for fd, known in list(self.fd_ids.items()):
            if self.fd_ids.get(fd) == known and linux.fd_identity(fd) != known:
                self._lost(fd)

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass  # full: the loop wakes anyway
        except OSError:
            pass  # the pipe was closed by engine code: the loop finds it on its next round

    def _waking(self, fn: Callable[[], None], ended: threading.Event) -> Callable[[], None]:
        """``fn``, then ``ended`` set and the loop woken (it may wait for the end: a thread
        is still alive for a moment after its function returned)."""

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 a dead thread would hang the run
                what = threading.current_thread().name
                self._put(
                    (
                        "fatal",
                        KitThreadFailed(
                            f"the master's {what} thread failed in the kit's code: "
                            f"{type(exc).__name__}: {exc}"
                        ),
                    )
                )
            finally:
                ended.set()
                self._wake()

        return run

    def _put(self, event: tuple[str, Any]) -> None:
        self.events.put(event)
        self._wake()

    def _next_event(self, timeout: float | None) -> tuple[str, Any] | None:
        """The next event of the hook threads, serving the loop meanwhile; None after
        ``timeout`` seconds without one."""
        if not self._serve(lambda: not self.events.empty(), timeout):
            return None
        return self.events.get_nowait()

    def _serve(self, done: Callable[[], bool], timeout: float | None = None) -> bool:
        """Record signals and watch the creation until ``done()``; False when ``timeout``
        seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # First, even when ``done()`` already holds: what the hook threads left to the
            # loop (a watch to close, a held SIGCHLD to record) is not left for later.
            self._close_unwatched()
            self._check_fds()
            self._release_held()
            if done():
                return True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            # At most a second: a descriptor closed under a blocking poll does not wake it.
            wait = _MAX_WAIT if deadline is None else min(_MAX_WAIT, deadline - now)
            if self.held is not None:
                wait = min(wait, self.held[1] - now)
            ready = self.poller.poll(max(1, int(max(0.0, wait) * 1000) + 1))
            for fd, events in ready:
                if events & select.POLLNVAL:
                    self._lost(fd)
                elif fd == self.wake_r:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    if events & select.POLLHUP:
                        self._lost(self.wake_w)  # the only writer: it was closed
                elif fd == self.sigfd:
                    self._read_signals()
                else:
                    self._creation_watch_fired()

    def _lost(self, fd: int) -> None:
        """A descriptor of the loop was closed behind its back (engine code in this process:
        only the kit's threads and the engine's run here): record it as a fatal error, make
        the loop whole again (the signals are still pending: a new signalfd reads them) and
        fail the run."""
        if fd == self.sigfd:
            what = "the master's signalfd (signals are read from it)"
            self._forget(fd)
            self._open_signalfd()
        elif fd in (self.wake_r, self.wake_w):
            what = "the master's wake-up pipe (the hook threads wake its poll loop)"
            for end in (self.wake_r, self.wake_w):
                self._forget(end, close=end != fd)
            self._open_wake_pipe()
        else:
            what = "the creation watch (the container's pidfd or the RPC connection)"
            with self.watch_lock:
                pairs = [p for p in (self.watching, *self._unwatched) if p and fd in p]
                if self.watching is not None and fd in self.watching:
                    self.watching = None
                self._unwatched = [p for p in self._unwatched if fd not in p]
            for end in {end for pair in pairs for end in pair} | {fd}:
                # The pair's other end too, unless engine code replaced it as well (then
                # the number is its file now: forgotten, never closed).
                self._forget(end, close=end != fd and self._intact(end))
        error = KitFdClosed(
            f"engine code closed a file descriptor of the kit (or put another file under its "
            f"number): fd {fd}, {what}; a hook of the master must close only the "
            "descriptors it opened"
        )
        self.ledger.emit("fatal", message=str(error), error=describe_error(error))
        if self.fd_lost is None:
            self.fd_lost = error
            self._put(("fd_lost", error))

    def _forget(self, fd: int, close: bool = False) -> None:
        self.fd_ids.pop(fd, None)
        try:
            self.poller.unregister(fd)
        except KeyError:
            pass
        if close:
            try:
                os.close(fd)
            except OSError:
                pass  # closed already (by engine code): nothing of ours to close

    def _read_signals(self) -> None:
        """Record every signal pending on the signalfd, in order, up to one to hold."""
        while not self._holding():
            try:
                data = os.read(self.sigfd, _SIGINFO_SIZE * 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
                self._lost(self.sigfd)
                continue
            if not data or len(data) % _SIGINFO_SIZE or not self._intact(self.sigfd):
                # Not a signalfd's reads (checked after the read: a dup2 can come between).
                self._lost(self.sigfd)
                continue
            self._pending.extend(
                _SIGINFO.unpack_from(data, offset)
                for offset in range(0, len(data) - _SIGINFO_SIZE + 1, _SIGINFO_SIZE)
            )
            self._record_pending()

    def _intact(self, fd: int) -> bool:
        return linux.fd_identity(fd) == self.fd_ids.get(fd)

    def _holding(self) -> bool:
        return self.held is not None

    def _record_pending(self) -> None:
        """Record the signals read, in arrival order, up to one to hold (the rest wait)."""
        while self._pending and not self._holding():
            signo, sender = self._pending.pop(0)
            self._on_signal(signo, sender)

    def _on_signal(self, signo: int, sender: int) -> None:
        if signo == signal.SIGCHLD and sender != self.pid and probe.is_probe_child(sender):
            # The exit of one of the kit's own probe children: not the engine's business,
            # unless the container's SIGCHLD was merged into it (standard signals
            # coalesce): peek, without reaping, whether the container has exited.
            if not self._container_exited():
                return
            sender = self.pid
        info = signal.struct_siginfo((signo, 0, 0, sender, 0, 0, 0))
        if signo == signal.SIGCHLD and sender == self.pid and not self.exec_checked.is_set():
            # Let the start waiter tell exec from exit before anyone can reap the
            # container: a monitor reaps it when it sees this SIGCHLD. Until then no signal
            # after it is read either (arrival order).
            self.held = (info, time.monotonic() + self.starter.req.hook_timeout)
            self.poller.unregister(self.sigfd)
            return
        self._record(info)

    def _release_held(self, force: bool = False) -> None:
        """Record the held SIGCHLD once exec is checked (or its wait is over), then the
        signals read after it; the signalfd is read again."""
        if self.held is None:
            return
        info, deadline = self.held
        if not (force or self.exec_checked.is_set() or time.monotonic() >= deadline):
            return
        self.held = None
        self._record(info)
        self.poller.register(self.sigfd, select.POLLIN)
        self._record_pending()
        self._read_signals()

    def _record(self, info: signal.struct_siginfo, merged: bool = False) -> None:
        fields: dict[str, Any] = {"merged": True} if merged else {}
        self.ledger.emit(
            "signal",
            signum=info.si_signo,
            name=linux.signal_name(info.si_signo),
            sender=info.si_pid,
            **fields,
        )
        self.signals.put(info.si_signo)
        if info.si_signo == signal.SIGCHLD and info.si_pid == self.pid:
            self.container_sigchld.set()
            if self._container_exited():  # not a stop or a continue
                # The kernel ends the rest of the container's pid namespace with its init;
                # the fake backend's model does it now (the real one has nothing to do).
                current().pid_namespace_init_exited(self.pid)

    def _hold_reaping(self) -> None:
        """Until the start waiter has told exec from death, a call of ``os``'s wait family
        that could reap the exited container waits for it (a hook timeout at most).

        The start waiter tells them apart by the container's name, which a reaped process no
        longer has: a monitor polling ``waitpid(pid, WNOHANG)`` (the reference's) on a loaded
        machine reaped a payload that had exited at once, and the run said stage 2 died
        before exec and skipped post_start_process. The held SIGCHLD (``_on_signal``) covers
        only monitors that wait for the signal. The master process ends with the run, so
        the replaced functions are never put back."""

        until: list[float] = []  # one deadline for every held call, from the first

        def hold(could_reap_it: bool) -> None:
            if not could_reap_it or self.exec_checked.is_set():
                return
            if self._exit_unreaped():  # else running, or reaped: nothing to hold
                if not until:
                    until.append(time.monotonic() + self.starter.req.hook_timeout / 2)
                self.exec_checked.wait(max(0.0, until[0] - time.monotonic()))

        def its(pid: int) -> bool:  # this pid, any child, or a process group
            return pid == self.pid or pid <= 0

        def waitpid(pid: int, options: int, /) -> tuple[int, int]:
            hold(its(pid))
            return _waitpid(pid, options)

        def wait4(pid: int, options: int) -> tuple[int, int, resource.struct_rusage]:
            hold(its(pid))
            return _wait4(pid, options)

        def wait() -> tuple[int, int]:
            hold(True)
            return _wait()

        def wait3(options: int) -> tuple[int, int, resource.struct_rusage]:
            hold(True)
            return _wait3(options)

        def waitid(idtype: int, ident: int, options: int, /) -> os.waitid_result | None:
            reaps = not options & os.WNOWAIT
            hold(reaps and (idtype != os.P_PID or ident == self.pid))
            return _waitid(idtype, ident, options)

        os.waitpid, os.wait4, os.wait, os.wait3 = waitpid, wait4, wait, wait3
        os.waitid = waitid

    def _exit_unreaped(self) -> bool:
        """Whether the container has exited and nobody has reaped it yet (a peek: it stays
        a zombie)."""
        try:
            found = _waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return found is not None

    def _container_exited(self) -> bool:
        try:
            found = _waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # already reaped by the engine
        return found is not None

    def _create(self) -> None:
        self._watch_creation()
        self._hold_rpc()  # after the watch, which may raise: the copy is closed in _close_rpc
        stop_watch = self._stop_watch
        try:
            self.hooks.call(
                "create_container",
                self.engine.operations.create_container,
                self.ctx,
                self.pid,
                self.rpc_sock,
            )
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            stop_watch()
            self._close_rpc()
            _send(self.sock, Control.ABORT)
            err = _unwrap(exc)
            self._put(
                (
                    "fatal",
                    ContainerCreationFailed(
                        f"container creation failed: {type(err).__name__}: {err}"
                    ),
                )
            )
            return
        stop_watch()
        self._record_rpc_copies()
        if not self._close_rpc():  # the RPC server exits; then stage 2 may start
            _send(self.sock, Control.ABORT)
            return
        self.go_sent.set()
        try:
            self.sock.sendall(Control.GO.encode())
        except OSError as exc:
            # Stage 2 waits for this byte: unsent, the run would wait for its timeout.
            self._put(("fatal", self._control_lost(exc)))

    def _control_lost(self, exc: OSError) -> KitFdClosed | OSError:
        """What a failed call on the control socket to the container is: engine code that
        closed the kit's descriptor (EBADF), or a plain error."""
        if exc.errno not in (errno.EBADF, errno.ENOTSOCK):
            return exc
        return KitFdClosed(
            f"engine code closed a file descriptor of the kit: the control socket to the "
            f"container ({exc.strerror}); a hook of the master must close only the "
            "descriptors it opened"
        )

    def _rpc_copies(self, inode: int) -> list[dict[str, Any]]:
        """Descriptors of the RPC connection (socket ``inode``) open in the master or in its
        children other than the container and the kit's probes, besides the kit's own two."""
        me = os.getpid()
        with probe.probe_children_lock:
            skip = {self.pid, *probe.probe_children}
        own = {self.rpc_sock.fileno(), self.rpc_watch_fd, self.rpc_kit_fd}
        # The kit's two copies are close-on-exec: at their numbers in a child, they came
        # with a fork of the master, not from engine code keeping rpc_conn (which a child
        # holds at the engine's number, or at one of its own).
        inherited = {self.rpc_watch_fd, self.rpc_kit_fd} - {-1}
        found: list[dict[str, Any]] = []
        for pid in [me, *linux.descendants(me, skip)]:
            for fd in linux.socket_fds(pid, inode):  # none: gone, or not ours to read
                if fd in (own if pid == me else inherited):
                    continue
                where = "the master" if pid == me else f"child {pid} of the master"
                found.append({"pid": pid, "fd": fd, "process": where})
        return found

    def _hold_rpc(self) -> None:
        """Before create_container: a copy of the RPC connection of the kit's own, high up.
        ``rpc_conn`` is the engine's (SPEC §1: the RPC client it builds owns it, and closes
        it), so the kit shuts the connection down through this copy, whatever became of
        the engine's socket object."""
        self.rpc_kit_fd = dup_high(self.rpc_sock.fileno(), self.fd_base)  # EMFILE: fatal

    def _rpc_conn_lost(self) -> bool:
        """Whether engine code closed ``rpc_conn``'s descriptor behind the socket object's
        back, or put another file under its number. Closed through the object's own API
        (its client's ``close``, a ``with`` block) it has no descriptor any more: legal."""
        fd = self.rpc_sock.fileno()
        return fd != -1 and linux.fd_identity(fd) != self.rpc_identity

    def _record_rpc_copies(self) -> None:
        """Once create_container returned: the RPC server exits when the connection closes
        and stage 2 starts after it (SPEC §2 rule 5). A copy engine code keeps open (a dup,
        ``socket.fromfd``, a forked helper) would hold both back; :meth:`_close_rpc` shuts the
        connection down for every copy, so the run goes on, and this records them (RPC-001)."""
        if self.rpc_identity is None or self._rpc_conn_lost():
            return  # closed behind the object's back, or replaced: _close_rpc reports that
        copies = self._rpc_copies(self.rpc_identity[1])
        if copies:
            self.ledger.emit("rpc_conn_kept", **rpc_conn_kept(copies))

    def _close_rpc(self) -> bool:
        """Close the RPC connection; False (and a fatal error) when engine code had closed
        a descriptor of it behind its socket object's back (``os.close`` of its number, a
        ``dup2`` over it): the number may be another file's by now. Shut down first, through
        the kit's own copy: a copy that engine code kept (a dup, a helper child) must not
        keep the RPC server waiting for an EOF, and stage 2 with it, until the run's
        timeout. The engine's socket object closed through its own API is no fault."""
        fd = self.rpc_sock.fileno()
        kit_fd, self.rpc_kit_fd = self.rpc_kit_fd, -1
        kit_copy_ok = kit_fd >= 0 and linux.fd_identity(kit_fd) == self.rpc_identity
        lost = None
        if self._rpc_conn_lost():
            self.rpc_sock.detach()  # not ours to shut down or close any more
            lost = (
                f"fd {fd}, the RPC connection to the container; create_container may close "
                "rpc_conn (or its RPC client), not its descriptor behind the socket's back"
            )
        elif kit_fd >= 0 and not kit_copy_ok:
            lost = f"fd {kit_fd}, the kit's own copy of the RPC connection"
        # Shut down for every copy (the engine's included), through the kit's own if it can.
        via = kit_fd if kit_copy_ok else self.rpc_sock.fileno()
        if via >= 0:
            _shut_down(via)
        if kit_copy_ok:
            os.close(kit_fd)
        self.rpc_sock.close()  # a no-op once engine code closed it, or it was detached
        if lost is not None:
            self._put(
                (
                    "fatal",
                    KitFdClosed(
                        "engine code closed a file descriptor of the kit, or put another file "
                        f"under its number: {lost}"
                    ),
                )
            )
            return False
        return True

    def _watch_creation(self) -> None:
        """Until :meth:`_stop_watch`: if the container process dies (its pidfd) or the RPC
        server does (its end of the connection hangs up), cancel ``ctx`` with the reason
        and shut the RPC connection down, so that create_container learns it at once
        instead of after a wait or a timeout (the loop polls both)."""
        try:
            pidfd = move_high(os.pidfd_open(self.pid), self.fd_base)
        except OSError:
            return
        # A descriptor of the loop's own: the create thread closes rpc_sock when done, and
        # its number could be reused while the loop still polls it.
        try:
            rpc = dup_high(self.rpc_sock.fileno(), self.fd_base)
        except OSError:
            os.close(pidfd)  # the thread fails (a fatal error); the pidfd must not leak
            raise
        # From the create thread: a poll object may be changed while another thread polls
        # it (the change counts from its next poll, which the wake-up starts).
        self._remember(pidfd, rpc)
        self.rpc_watch_fd = rpc
        with self.watch_lock:
            self.watching = (pidfd, rpc)
            self.poller.register(pidfd, select.POLLIN)
            self.poller.register(rpc, select.POLLRDHUP)
        self._wake()

    def _stop_watch(self) -> None:
        """From the create thread: the watch fires no more once this returns."""
        with self.watch_lock:
            watched, self.watching = self.watching, None
        if watched is not None:
            self._unwatched.append(watched)
            self._wake()

    def _creation_watch_fired(self) -> None:
        with self.watch_lock:
            watched = self.watching
        replaced = [fd for fd in watched or () if not self._intact(fd)]
        if replaced:
            # Engine code put another file under a watch descriptor's number since the
            # loop last looked: neither a reason to cancel nor a socket of ours to shut down.
            self._lost(replaced[0])
            self._close_unwatched()
            return
        with self.watch_lock:
            if self.watching is not None:
                pidfd, _ = self.watching
                if _readable(pidfd, 0.05):
                    # The container's death takes its RPC server along, which may hang up
                    # first: the container's end is the reason worth giving.
                    what = f"the container process (pid {self.pid}) died{_how_ended(self.pid)}"
                else:
                    what = "the RPC server ended (its end of the connection was closed)"
                self.ctx.cancel(what)
                # Through the loop's own copy: rpc_sock's number may be engine code's now.
                _shut_down(self.watching[1])
                self._unwatched.append(self.watching)
                self.watching = None
        self._close_unwatched()

    def _close_unwatched(self) -> None:
        """Unregister and close what no longer is watched (in the loop's thread only)."""
        while self._unwatched:
            for fd in self._unwatched.pop():
                self._forget(fd, close=True)

    def _start_waiter(self) -> None:
        try:
            exec_seen = self._wait_for_exec()
        finally:
            self.exec_checked.set()
            self._wake()
        if not exec_seen:
            return
        self.ledger.emit("stage2_exec")
        try:
            self.hooks.call(
                "post_start_process", self.engine.operations.post_start_process, self.ctx, self.pid
            )
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            self._put(("fatal", _unwrap(exc)))

    def _wait_for_exec(self) -> bool:
        """True once the payload was exec'd; False when stage 2 failed or never started."""
        try:
            # Stage 2 sends a failure or nothing: its end of the socket is master_fd, which
            # engine code holds and may write to.
            kind, message = _recv_control(self.sock, Control.STAGE2_FAILED)
        except ControlProtocolError as exc:
            self._put(("fatal", control_abused(exc)))
            return False
        except OSError as exc:  # its descriptor closed or replaced by engine code meanwhile
            self._put(("fatal", self._control_lost(exc)))
            return False
        finally:
            try:
                self.sock.close()
            except OSError as exc:
                self._put(("fatal", self._control_lost(exc)))
        if kind == Control.STAGE2_FAILED:
            self.ledger.emit("stage2_failed", message=message)
            return False
        if not self.go_sent.is_set():
            return False  # create_container failed: the container never started stage 2
        # EOF: the close-on-exec end went away, by exec or by death. A dead stage 2 still
        # carries a name of the kit's (exec renames it): the container's until its hooks
        # config and init_config have run, stage 2's after.
        name, closed_early = self._after_eof()
        exec_d = name not in PRE_EXEC_NAMES and (name is not None or self.starter.exec_mark[0])
        # By time only when an exec followed: a stage 2 that exits may take long to become
        # a zombie after its descriptors closed (init of a pid namespace waits for its
        # members), and exiting is allowed.
        if (closed_early and exec_d) or self.starter.exec_mark[1]:
            # SPEC §2: the start waiter takes the EOF for the exec. Here it came before: a
            # starter that trusts it (upstream's) would run post_start_process too early.
            self.ledger.emit(
                "master_fd_closed_early",
                detail="stage 2 closed master_fd (its end of the master socket) before it "
                "exec'd the payload: the start waiter saw EOF while start_process still ran",
            )
        # Gone already: a monitor may reap the payload the moment it exits (SPEC §7 lets
        # it), so a reaped container died before exec only if stage 2 never called exec.
        if name in PRE_EXEC_NAMES or (name is None and not self.starter.exec_mark[0]):
            message = "stage 2 died before exec"
            if closed_early:
                message += (
                    ", after engine code closed master_fd (start_process must leave it "
                    "open: it closes on exec)"
                )
            self.ledger.emit("stage2_failed", message=message)
            return False
        return True

    def _after_eof(self) -> tuple[str | None, bool]:
        """The container's name once the EOF on the control socket is explained, and
        whether engine code closed master_fd early: a stage 2 still alive under a kit
        name (past a short grace, which covers a process whose descriptors are closed on
        its way out) closed its end itself; the exec or the death that follows decides."""
        grace = time.monotonic() + EXIT_GRACE
        closed_early = False
        while True:
            # Exited first, then the name: the name read after is the one it exited under
            # (a zombie keeps it; the reap hold keeps the zombie), never a stale one read
            # before an exec and an exit that both came in between.
            exited = self._container_exited()
            name = linux.process_name(self.pid)
            if exited or name not in PRE_EXEC_NAMES:
                return name, closed_early
            if time.monotonic() >= grace:
                closed_early = True
            time.sleep(0.005)

    def _monitor(self) -> None:
        try:
            status = self.hooks.call(
                "monitor_container",
                self.engine.operations.monitor_container,
                self.pid,
                self.signals,
            )
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            self._put(("fatal", _unwrap(exc)))
            self._put(("monitor_failed", None))
            return
        if not is_wait_status(status):
            self._put(
                ("fatal", TypeError(f"monitor_container returned {status!r}, not a wait status"))
            )
            self._put(("monitor_failed", None))
            return
        self._reap_if_left()
        self._put(("status", status))

    def _reap_if_left(self) -> None:
        """A monitor must reap the container (SPEC §7): one that returned a status and left
        the zombie (a waitid with WNOWAIT) has it reaped here, recorded as the master's
        ``process_exit`` of the container after monitor_container returned (SIG-004). The
        kit's own wait calls: never held (_hold_reaping)."""
        if not self._exit_unreaped():
            # reaped by the monitor, as it should be; or still running: the status did not
            # come from it (SIG-003's to judge)
            return
        try:
            _, wstatus = _waitpid(self.pid, 0)
        except ChildProcessError:
            return
        self.ledger.emit("process_exit", child_role="container", child_pid=self.pid, status=wstatus)
