"""The launcher: starts a lifecycle run from any process (pytest, the CLI) and collects it."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

from kit.ledger.record import Ledger
from kit.run.request import DEFAULT_HOOK_TIMEOUT, DEFAULT_RUN_TIMEOUT, Invoker, RunRequest
from kit.system import linux

if TYPE_CHECKING:
    import subprocess

    from kit.run.supervisor import Ahead


class LaunchError(RuntimeError):
    """The supervisor could not run at all (not an engine failure)."""


def machine_note(change: dict[str, Any]) -> str:
    """What a change of one of the machine's own sysctls (marked ``machine``) adds to its
    description: it outlives the sandbox, and how to put it back; else nothing."""
    if not change.get("machine"):
        return ""
    return (
        " (the machine's own setting, which no sandbox can hold a copy of: it stays after the "
        f"run; sysctl -w {change.get('name')}={change.get('before')!r} puts it back)"
    )


@dataclass
class RunResult:
    """What one run produced."""

    exit_code: int
    reason: str
    ledger: Ledger
    leaks: list[dict[str, Any]] = field(default_factory=list)
    timed_out: dict[str, Any] | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.ledger.events

    @property
    def host_changes(self) -> list[dict[str, Any]] | None:
        """What the run changed on its host (SPEC §11, ``kit.run.hostdiff``): None when the run
        had no host sandbox to diff."""
        for e in self.ledger.events:
            if e["kind"] == "host_changes":
                return list(e["changes"])
        return None

    def problems(self) -> list[str]:
        """Every error the ledger records, one line each (for messages and the CLI)."""
        lines = []
        for e in self.ledger.events:
            kind = e["kind"]
            if kind == "starter_error":
                lines.append(f"{e['stage']}: {e['message']}")
            elif kind == "hook_raise":
                err = e["error"]
                lines.append(f"{e['role']}: {e['hook']} raised {err['type']}: {err['message']}")
            elif kind == "stage2_failed":
                lines.append(f"stage 2: {e['message']}")
            elif kind == "fatal":
                lines.append(f"fatal: {e['message']}")
            elif kind == "hook_timeout":
                lines.append(f"hook timeout: {e['hook']} in {e['hook_role']}")
            elif kind == "engine_fault":
                lines.append(
                    f"engine fault: {e['fault']} ledger datagram from pid "
                    f"{e['sender_pid']} ({e['sender_role'] or 'not a kit process'}"
                    f"{', in ' + ', '.join(e['open_hooks']) if e['open_hooks'] else ''}"
                    f"): {e['detail']}"
                )
            elif kind == "leak":
                lines.append(f"leak: {e['what']}: {e['detail']}")
            elif kind == "host_changes":
                lines += [
                    f"host: {c['kind']} {c['name']}: {c['before']!r} -> {c['after']!r}"
                    + machine_note(c)
                    for c in e["changes"]
                ]
        if not lines and self.exit_code == 255:
            lines.append(self.reason)
        return lines

    def notes(self) -> list[str]:
        """What the run's author should know that is no error, one line each: the host
        mounts the host sandbox did not reproduce (an empty read-only directory instead)."""
        start = next((e for e in self.ledger.events if e["kind"] == "run_start"), None)
        left_out = [] if start is None else start.get("sandbox_left_out", [])
        if not left_out:
            return []
        return [
            "sandbox: host mount(s) not reproduced, an empty read-only directory in their "
            f"place (overlayfs refused them): {', '.join(left_out)}"
        ]

    def __str__(self) -> str:
        head = f"exit code {self.exit_code} ({self.reason})"
        return "; ".join([head, *self.problems()])


#: How long the zygote may take to answer a request, in seconds: a run's request waits for
#: the engine's first inspection (kit.preflight.INSPECT_TIMEOUT, 60 s, and the kill's grace
#: after it: an import that hangs is named by the inspection, not taken for a hung zygote),
#: and perhaps for a host sandbox built then. Past it the zygote is taken for hung, killed
#: and replaced. (Not imported from kit.preflight: the launcher stays light to import.)
ZYGOTE_ANSWER_TIMEOUT = 180.0
#: Seconds the launcher waits, at its exit, for its zygote to clean up and end.
ZYGOTE_EXIT_WAIT = 5.0


T = TypeVar("T")


class _LastingThread:
    """A thread that lasts as long as the process, to fork the zygote from. The zygote's
    parent-death signal fires when the *thread* that forked it ends (prctl(2)), not the
    process: forked from a worker thread (the conformance plugin runs lifecycles in a pool),
    it was SIGKILLed when the pool shut down, before the launcher's exit could end it
    cleanly, and the run directories it had made ahead stayed behind."""

    _lock = threading.Lock()
    _instance: _LastingThread | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        #: (what to call, where to put (True, its result) or (False, its exception)).
        self.calls: queue.SimpleQueue[tuple[Callable[[], Any], queue.SimpleQueue[Any]]] = (
            queue.SimpleQueue()
        )
        threading.Thread(target=self._serve, name="kit-zygote-forker", daemon=True).start()

    def _serve(self) -> None:
        while True:
            call, reply = self.calls.get()
            try:
                reply.put((True, call()))
            except BaseException as exc:  # noqa: BLE001 handed to the caller, raised there
                reply.put((False, exc))

    @classmethod
    def get(cls) -> _LastingThread:
        with cls._lock:
            if cls._instance is None or cls._instance.pid != os.getpid():
                cls._instance = cls()
            return cls._instance


def environment(**changes: str) -> dict[str, str]:
    """A copy of ``os.environ`` with ``changes``, for a child's ``env``. Copying reads one key
    at a time, so a change another thread makes meanwhile raises RuntimeError (the dict
    changed size) or KeyError (a listed key went): pytest sets and removes
    PYTEST_CURRENT_TEST at every phase of every test while a conformance session's runs start
    on other threads. Such a copy is made again."""
    while True:
        try:
            return {**os.environ, **changes}
        except (RuntimeError, KeyError):
            continue


def _from_a_lasting_thread(call: Callable[[], T]) -> T:
    """``call()`` in a thread that lasts until the process exits (the main thread does)."""
    if threading.current_thread() is threading.main_thread():
        return call()
    reply: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
    _LastingThread.get().calls.put((call, reply))
    ok, value = reply.get()
    if not ok:
        raise value
    return cast(T, value)


class Zygote:
    """The launcher's handle on its zygote process (:mod:`kit.run.zygote`), started on first use.

    One per launcher process; thread-safe. Set ``KIT_ZYGOTE=0`` to start every run in a
    fresh interpreter instead (slower; useful when debugging imports).
    """

    _lock = threading.Lock()
    _instance: Zygote | None = None

    def __init__(self) -> None:
        import subprocess  # noqa: PLC0415  (with locale, 1.5 ms a one-shot CLI never needs)

        self.control, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = _from_a_lasting_thread(
                lambda: subprocess.Popen(
                    [sys.executable, "-m", "kit.run.zygote", str(child_end.fileno())],
                    pass_fds=(child_end.fileno(),),
                    stdin=subprocess.DEVNULL,
                    cwd="/",
                    start_new_session=True,
                    env=environment(PYTHONPATH=os.pathsep.join(_import_path())),
                )
            )
        finally:
            child_end.close()
        self.pid = os.getpid()
        atexit.register(self._end_at_exit)
        # One exchange at a time (replies come in the order of the requests); not the class's
        # lock, which get() takes: a zygote that hangs holds up its own exchanges alone.
        self._talk = threading.Lock()
        #: Why this zygote was killed, if the launcher killed it.
        self.killed_because: str | None = None

    def _end_at_exit(self) -> None:
        """At the launcher's exit: EOF on the control socket, then a short wait while the
        zygote removes the run directories and the sandboxes it made ahead. Without the wait,
        the launcher's death killed it (its parent-death signal) in the middle, and the
        directory stayed until the next zygote's sweep."""
        if self.pid != os.getpid() or self.proc.poll() is not None:
            return
        import subprocess  # noqa: PLC0415  (imported by __init__ already)

        self.control.close()
        try:
            self.proc.wait(ZYGOTE_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            pass  # it dies with us all the same

    @classmethod
    def get_existing(cls) -> Zygote | None:
        """This process's zygote if it has one (never starts one)."""
        z = cls._instance
        return z if z is not None and z.pid == os.getpid() else None

    @classmethod
    def get(cls) -> Zygote:
        with cls._lock:
            z = cls._instance
            if z is None or z.pid != os.getpid() or z.proc.poll() is not None:
                z = cls._instance = cls()
            return z

    def spawn(self, request: RunRequest, fds: list[int], targets: list[int]) -> int:
        """Start a supervised run; returns the supervisor's pid."""
        message = json.dumps({"request": request.to_json(), "targets": targets}).encode()
        reply = self._exchange(
            message, fds, f"importing the engine {request.engine!r} or preparing its run"
        )
        if not reply:
            raise LaunchError(self.death_notice())
        answer = json.loads(reply)
        if "error" in answer:
            raise LaunchError(answer["error"])
        return int(answer["pid"])

    def _exchange(self, message: bytes, fds: list[int], doing: str) -> bytes:
        """Send ``message`` (with ``fds``) and return the reply, b"" when the zygote is gone.
        A zygote that does not answer within :data:`ZYGOTE_ANSWER_TIMEOUT` (``doing`` what)
        is killed (its late reply would be taken for the next request's): :meth:`get` then
        starts another."""
        with self._talk:
            try:
                if fds:
                    socket.send_fds(self.control, [message], fds)
                else:
                    self.control.send(message)
                poller = select.poll()
                poller.register(self.control, select.POLLIN)
                if not poller.poll(ZYGOTE_ANSWER_TIMEOUT * 1000):
                    self.killed_because = (
                        f"it did not answer within {ZYGOTE_ANSWER_TIMEOUT:g} s, {doing}"
                    )
                    self.proc.kill()
                    self.proc.wait()
                    return b""
                return self.control.recv(1 << 16)
            except OSError:  # EPIPE, ECONNRESET: it is gone
                return b""

    def death_notice(self) -> str:
        """Why the zygote is gone (it is our child: its exit status is ours to read)."""
        if self.killed_because is not None:
            return (
                f"the kit's zygote process (pid {self.proc.pid}) was killed: {self.killed_because}"
            )
        import subprocess  # noqa: PLC0415  (imported by __init__ already)

        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return f"the kit's zygote process (pid {self.proc.pid}) stopped answering"
        return f"the kit's zygote process (pid {self.proc.pid}) died: {_returncode(code)}"

    def exit_status(self, pid: int) -> int | None:
        """The wait status of a supervisor that has exited (None: unknown). Raises
        LaunchError, with the zygote's own death notice, when the zygote is gone."""
        reply = self._exchange(
            json.dumps({"status_of": pid}).encode(), [], "asking how a supervisor ended"
        )
        if not reply:
            raise LaunchError(self.death_notice())
        status: int | None = json.loads(reply).get("status")
        return status


def _unheld_locks_in_child() -> None:
    """A child forked while another thread held one of the class locks would wait for ever
    on its copy the first time it launches a run (its zygote and forker are its own)."""
    _LastingThread._lock = threading.Lock()
    Zygote._lock = threading.Lock()


os.register_at_fork(after_in_child=_unheld_locks_in_child)


def _returncode(code: int) -> str:
    """A subprocess return code in words."""
    if code < 0:
        return f"killed by signal {-code} ({linux.signal_name(-code)})"
    return f"exit code {code}"


def describe_status(status: int) -> str:
    """A wait status in words."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by signal {sig} ({linux.signal_name(sig)})"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


class _PidFD:
    """A pidfd (``pidfd_open``): readable once the process has exited; unlike a pid, it
    cannot come to name another process. Closed with the object."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    @classmethod
    def open(cls, pid: int) -> _PidFD | None:
        """None when the process is already gone (or pidfds are unavailable)."""
        try:
            return cls(os.pidfd_open(pid))
        except (OSError, AttributeError):
            return None

    def fileno(self) -> int:
        assert self.fd is not None
        return self.fd

    def exited(self) -> bool:
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)  # readable once the process exited
        return bool(poller.poll(0))

    def send(self, signum: int) -> None:
        """Signal the process; a no-op once it is gone."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.fileno(), signum)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def _first_line(fd: int) -> tuple[bytes, bytes]:
    """The first line read from ``fd`` (with its newline; all there was at EOF) and what
    came after it in the same reads."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return data, b""
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line + b"\n", rest


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _import_path() -> list[str]:
    return [os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)]


class RunHandle:
    """A run in progress: :meth:`send_signal` to the master, :meth:`wait` for the result.

    ``fork_here``: fork the supervisor from this process instead of asking the zygote (a
    one-shot caller such as the CLI, which would otherwise pay for a second interpreter and
    its imports). This process must be single-threaded and is the supervisor's parent: it
    preloads the kit as the zygote would (never the engine: an inspection child finds it) and
    reaps the supervisor in :meth:`wait`.
    """

    def __init__(
        self,
        request: RunRequest,
        *,
        capture: bool = True,
        stdin: int | IO[Any] | None = None,
        pass_fds: tuple[int, ...] = (),
        fork_here: bool = False,
        ahead: Ahead | None = None,
    ) -> None:
        self.request = request
        self.capture = capture
        #: ``fork_here``: the supervisor is this process's child, reaped here; its wait status.
        self._own_child = False
        self._status: int | None = None
        #: ``fork_here`` with ``ahead``: the init of the run's host sandbox, built by this
        #: process, ended here once the supervisor is gone (as the zygote ends those it built).
        self._sandbox_init: tuple[int, int] | None = None
        # Closed by wait(), after the run wrote them: they outlive this method.
        self._out = tempfile.TemporaryFile() if capture else None  # noqa: SIM115
        self._err = tempfile.TemporaryFile() if capture else None  # noqa: SIM115
        res_r, res_w = os.pipe()
        try:
            if fork_here:
                self.supervisor_pid = self._fork_here(request, stdin, res_w, pass_fds, ahead)
            elif ahead is not None:
                raise ValueError("a sandbox made ahead is handed over by fork_here alone")
            elif os.environ.get("KIT_ZYGOTE", "1") == "0":
                self.supervisor_pid = self._exec_supervisor(request, stdin, res_w, pass_fds)
            else:
                self.supervisor_pid = self._fork_supervisor(request, stdin, res_w, pass_fds)
        except BaseException:
            os.close(res_r)
            self._close_capture()
            raise
        finally:
            os.close(res_w)
        self._supervisor_fd = (
            None
            if getattr(self, "_popen", None) is not None or self._own_child
            else _PidFD.open(self.supervisor_pid)
        )
        # The raw fd alone, never a buffered reader: bytes a buffer took past the first line
        # would come back after those poll() reads from the fd.
        self._result_fd: int | None = res_r
        line, self._first = _first_line(res_r)
        words = line.split(maxsplit=3)
        started = line.startswith(b"started") and len(words) >= 3
        self.starter_pid: int | None = int(words[1]) if started else None
        self.run_dir: str | None = os.fsdecode(words[2]) if started else None
        #: A run in the host sandbox (:mod:`kit.run.sandbox`): ``{"sandbox_pid": its init's pid,
        #: "sandbox_mounts": [[mount id, mount point]…] before the starter was forked,
        #: "sandbox_left_out": [host mount point…] not reproduced in it}``.
        self.sandbox: dict[str, Any] | None = (
            json.loads(words[3]) if started and len(words) > 3 else None
        )
        if not started:
            self._first = line + self._first
        # The starter's pid names it only while it lives: signals go through a pidfd.
        self._starter_fd = self._hold_starter() if self.starter_pid is not None else None
        self._done = False
        self._final: RunResult | None = None

    def __del__(self) -> None:
        fd = getattr(self, "_result_fd", None)  # a handle dropped unwaited (killed, say)
        if fd is not None:
            os.close(fd)

    def _hold_starter(self) -> _PidFD | None:
        """A pidfd of the run's starter, a child of the supervisor; None once it is gone
        (then its pid may already name another process: the parent is read while the
        pidfd shows it alive)."""
        assert self.starter_pid is not None
        pidfd = _PidFD.open(self.starter_pid)
        if pidfd is None:
            return None
        try:
            parent = int(linux.read_status(f"/proc/{self.starter_pid}/status")["PPid"])
        except (OSError, KeyError, ValueError):
            parent = None
        if parent != self.supervisor_pid or pidfd.exited():
            pidfd.close()
            return None
        return pidfd

    def _stdio(self, stdin: int | IO[Any] | None) -> tuple[int, int, int, list[int]]:
        opened = []
        if stdin is None:
            in_fd = os.open(os.devnull, os.O_RDONLY)
            opened.append(in_fd)
        else:
            in_fd = stdin if isinstance(stdin, int) else stdin.fileno()
        out_fd = self._out.fileno() if self._out is not None else 1
        err_fd = self._err.fileno() if self._err is not None else 2
        return in_fd, out_fd, err_fd, opened

    def _fork_supervisor(
        self,
        request: RunRequest,
        stdin: int | IO[Any] | None,
        res_w: int,
        pass_fds: tuple[int, ...],
    ) -> int:
        in_fd, out_fd, err_fd, opened = self._stdio(stdin)
        try:
            return Zygote.get().spawn(
                request, [in_fd, out_fd, err_fd, res_w, *pass_fds], list(pass_fds)
            )
        finally:
            for fd in opened:
                os.close(fd)

    def _fork_here(
        self,
        request: RunRequest,
        stdin: int | IO[Any] | None,
        res_w: int,
        pass_fds: tuple[int, ...],
        ahead: Ahead | None = None,
    ) -> int:
        """Fork the supervisor from this process, which does what the zygote would first;
        ``ahead``: the run directory and host sandbox this process started making for the
        run (:func:`kit.run.supervisor.start_ahead`), handed over to the supervisor, or
        dropped (its init reaped here) if the fork does not happen."""
        try:
            return self._fork_supervisor_here(request, stdin, res_w, pass_fds, ahead)
        except BaseException:
            if ahead is not None:
                ahead.drop(reap=True)  # a no-op once handed over
            raise

    def _fork_supervisor_here(
        self,
        request: RunRequest,
        stdin: int | IO[Any] | None,
        res_w: int,
        pass_fds: tuple[int, ...],
        ahead: Ahead | None,
    ) -> int:
        threads = threading.active_count()
        if threads != 1:  # a fork would copy locks that other threads hold
            raise LaunchError(
                f"fork_here needs a single-threaded launcher, this process has "
                f"{threads} threads: start the run without fork_here (the zygote "
                "forks it)"
            )
        # Imported here: the zygote's modules are only needed by a launcher that forks.
        from kit.run import rundir, supervisor, zygote  # noqa: PLC0415
        from kit.starter.common import default_signals  # noqa: PLC0415

        try:  # what the zygote would answer with {"error": ...}
            if supervisor.preload(request):
                zygote.settle()
            prepared = supervisor.prepare_backend(request)
            if ahead is not None:
                ahead = supervisor.finish_ahead(ahead)
        except Exception as exc:
            raise LaunchError(f"{type(exc).__name__}: {exc}") from exc
        in_fd, out_fd, err_fd, opened = self._stdio(stdin)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the supervisor; its result goes through res_w
                code = 1
                try:
                    default_signals()
                    os.setsid()
                    result_fd, moved = zygote.place_fds(
                        [in_fd, out_fd, err_fd, res_w, *pass_fds],
                        list(pass_fds),
                        ahead.fds() if ahead else set(),
                        ahead.files() if ahead else [],
                    )
                    rundir.sweep()  # what supervisors and sandbox builders that died left
                    supervisor.run_supervised(
                        request,
                        result_fd,
                        prepared,
                        ahead.moved(moved) if ahead else None,
                        {0, 1, 2, *pass_fds},  # what place_fds left for the run
                    )
                    code = 0
                finally:
                    os._exit(code)
        finally:
            for fd in opened:
                os.close(fd)
        self._own_child = True
        if ahead is not None:
            building = ahead.building
            if building is not None and building.pidfd is not None:
                self._sandbox_init = (building.init_pid, building.pidfd)
                building.pidfd = None
            ahead.discard()  # the supervisor's now
        return pid

    def _reap(self) -> int:
        """Reap the supervisor this process forked; its wait status. The init of a sandbox
        built here is asked to go first (the supervisor is done with it: the run's result
        came, or the supervisor died), so its teardown overlaps the supervisor's exit."""
        if self._status is None:
            init = self._sandbox_init
            if init is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(init[1], signal.SIGTERM)
            _, self._status = os.waitpid(self.supervisor_pid, 0)
            if init is not None:
                from kit.run.sandbox import stop_built  # noqa: PLC0415  (see _fork_here)

                self._sandbox_init = None
                # After a supervisor that was killed, SIGKILL: as the zygote ends those.
                stop_built(
                    *init, signal.SIGKILL if os.WIFSIGNALED(self._status) else signal.SIGTERM
                )
        return self._status

    def _exec_supervisor(
        self,
        request: RunRequest,
        stdin: int | IO[Any] | None,
        res_w: int,
        pass_fds: tuple[int, ...],
    ) -> int:
        import subprocess  # noqa: PLC0415  (KIT_ZYGOTE=0 only: see Zygote.__init__)

        req_r, req_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kit.run.supervisor", str(req_r), str(res_w)],
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=self._out,
                stderr=self._err,
                pass_fds=(req_r, res_w, *pass_fds),
                cwd="/",
                start_new_session=True,
                env=environment(PYTHONPATH=os.pathsep.join(request.sys_path)),
            )
        finally:
            os.close(req_r)
        try:
            with os.fdopen(req_w, "wb") as f:
                f.write(json.dumps(request.to_json()).encode())
        except BrokenPipeError:
            raise LaunchError(
                f"the run's supervisor exited ({proc.wait()}) before it read the request"
            ) from None
        self._popen = proc
        return proc.pid

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the master (the starter process) of the run; a no-op once the
        master is gone (its pid may name another process by then)."""
        if self.starter_pid is None:
            raise LaunchError("the run has no starter process")
        if self._starter_fd is not None:
            self._starter_fd.send(signum)

    def poll(self) -> int | None:
        """None while the run is in progress, else its exit code (never blocks: the result
        is read as it arrives, so a large one cannot stall the supervisor)."""
        if self._done:
            return self._code
        fd = self._result_fd
        assert fd is not None
        os.set_blocking(fd, False)
        try:
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    return None
                if not chunk:
                    break
                self._first += chunk
        finally:
            os.set_blocking(fd, True)
        return self.wait().exit_code

    def _close_capture(self) -> None:
        for f in (self._out, self._err):
            if f is not None:
                f.close()

    def wait(self) -> RunResult:
        if self._done:
            if self._final is None:
                raise LaunchError("wait(): the run's result was already found unreadable")
            return self._final
        try:
            return self._collect()
        finally:
            if self._starter_fd is not None:  # the run is over: nothing left to signal
                self._starter_fd.close()
                self._starter_fd = None

    def _collect(self) -> RunResult:
        fd, self._result_fd = self._result_fd, None
        assert fd is not None
        try:
            data = self._first + _read_all(fd)
        finally:
            os.close(fd)
        if getattr(self, "_popen", None) is not None:
            self._popen.wait()
        elif self._own_child:
            self._reap()
        else:  # the zygote reaps it; it exits right after closing the result pipe
            self._await_supervisor_exit()
        stdout = stderr = ""
        if self._out is not None and self._err is not None:
            for f in (self._out, self._err):
                f.seek(0)
            stdout = self._out.read().decode(errors="replace")
            stderr = self._err.read().decode(errors="replace")
        self._close_capture()
        self._done = True
        try:
            doc = json.loads(data)
        except ValueError:
            raise LaunchError(
                f"{self._death_notice()}; stderr: {stderr[-2000:] or '(empty)'}"
            ) from None
        if doc.get("ledger") is None:
            raise LaunchError(f"{doc.get('reason')}; stderr: {stderr[-2000:]}")
        self._final = RunResult(
            doc["exit_code"],
            doc["reason"],
            Ledger(doc["ledger"]),
            doc["leaks"],
            doc["timed_out"],
            stdout,
            stderr,
        )
        self._code = self._final.exit_code
        return self._final

    def _death_notice(self) -> str:
        """Why the supervisor ended without a result, and what it left behind (removed or
        killed now, when it is ours to remove)."""
        who = f"the run's supervisor (pid {self.supervisor_pid})"
        try:
            if getattr(self, "_popen", None) is not None:
                how = _returncode(self._popen.wait())
            elif self._own_child:
                how = describe_status(self._reap())
            else:
                zygote = Zygote.get_existing()
                status = zygote.exit_status(self.supervisor_pid) if zygote else None
                how = "ended" if status is None else describe_status(status)
        except LaunchError as exc:  # the zygote died, and its supervisors with it
            how = f"died with its parent: {exc}"
        left = self._leftovers()
        return (
            f"{who} ended without writing the run's result: {how}"
            f"{'; left behind: ' + '; '.join(left) if left else '; nothing left behind'}"
        )

    def _leftovers(self) -> list[str]:
        """What the dead supervisor could not clean up; removed (killed) here."""
        left = []
        if (
            self.starter_pid is not None
            and linux.process_state(self.starter_pid) not in (None, "Z")
            and linux.process_name(self.starter_pid) in ("kit-starter", "kit-master")
        ):
            left.append(f"the starter/master (pid {self.starter_pid}), killed now")
            if self._starter_fd is not None:
                self._starter_fd.send(signal.SIGKILL)
        if (
            self.run_dir
            and os.path.basename(self.run_dir).startswith("kit-run-")
            and os.path.isdir(self.run_dir)
        ):
            left.append(f"the run directory {self.run_dir}, removed now")
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return left

    def _await_supervisor_exit(self, timeout: float = 5.0) -> None:
        """Wait (briefly) until the supervisor, a child of the zygote, is gone (without a
        pidfd it was gone already: its pid may name another process by now)."""
        pidfd = getattr(self, "_supervisor_fd", None)
        if pidfd is not None:
            poller = select.poll()
            poller.register(pidfd.fileno(), select.POLLIN)  # readable once it has exited
            if poller.poll(int(timeout * 1000)):
                pidfd.close()  # else kept: kill() may yet need it
                self._supervisor_fd = None

    def kill(self) -> None:
        """Kill the run's supervisor; the run dies with it (parent-death signals), and the
        run's temporary directory, which the supervisor can no longer remove, goes too."""
        # Never by pid once the zygote may have reaped it: that pid may name another process.
        popen: subprocess.Popen[bytes] | None = getattr(self, "_popen", None)
        if self._supervisor_fd is not None:
            self._supervisor_fd.send(signal.SIGKILL)
        elif popen is not None:
            popen.kill()  # a no-op once it is reaped
        elif self._own_child and self._status is None:  # ours, not reaped: the pid is its
            os.kill(self.supervisor_pid, signal.SIGKILL)
        if self._own_child:
            self._reap()
        else:
            self._await_supervisor_exit()
        if self.run_dir and os.path.basename(self.run_dir).startswith("kit-run-"):
            shutil.rmtree(self.run_dir, ignore_errors=True)


def make_request(
    engine: str,
    flow: str,
    argv: list[str],
    *,
    engine_config: dict[str, Any] | None = None,
    user: str | int | None = None,
    backend: str = "real",
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT,
    run_timeout: float = DEFAULT_RUN_TIMEOUT,
    probes: bool = True,
    container_id: str | None = None,
    sandbox: bool | None = None,
    shared_dirs: list[str] | None = None,
    join_namespaces: dict[str, str] | None = None,
    inject: str | None = None,
) -> RunRequest:
    try:
        invoker = Invoker.resolve(user)
    except ValueError:
        if flow != "root":
            raise
        invoker = Invoker(os.getuid(), os.getgid(), [], "root")  # the root flow has no U
    return RunRequest(
        engine=engine,
        flow=flow,
        argv=list(argv),
        engine_config=dict(engine_config or {}),
        invoker=invoker.__dict__,
        backend=backend,
        # 48 random bits, as uuid4().hex[:12] gave them, without importing uuid (and platform).
        container_id=container_id or f"kit-{os.urandom(6).hex()}",
        hook_timeout=hook_timeout,
        run_timeout=run_timeout,
        probes=probes,
        sys_path=_import_path(),
        sandbox=sandbox,
        shared_dirs=list(shared_dirs or []),
        join_namespaces=dict(join_namespaces or {}),
        inject=inject,
    )


def start(
    engine: str,
    flow: str,
    argv: list[str],
    *,
    capture: bool = True,
    stdin: int | IO[Any] | None = None,
    pass_fds: tuple[int, ...] = (),
    fork_here: bool = False,
    **options: Any,
) -> RunHandle:
    """Start a run without waiting; see :func:`run` for the options and :class:`RunHandle`
    for ``fork_here``."""
    return RunHandle(
        make_request(engine, flow, argv, **options),
        capture=capture,
        stdin=stdin,
        pass_fds=tuple(pass_fds),
        fork_here=fork_here,
    )


def run(
    engine: str,
    flow: str,
    argv: list[str],
    *,
    capture: bool = True,
    stdin: int | IO[Any] | None = None,
    pass_fds: tuple[int, ...] = (),
    **options: Any,
) -> RunResult:
    """Run one lifecycle of ``engine`` in ``flow`` with payload ``argv`` and wait for it.

    Options: ``engine_config`` (dict merged into the engine config), ``user`` (the invoking
    user U), ``backend``, ``hook_timeout``, ``run_timeout``, ``probes``, ``container_id``,
    ``sandbox`` (the host sandbox, :mod:`kit.run.sandbox`; default: on as root in the real
    backend), ``shared_dirs`` (host directories a sandboxed run may write),
    ``join_namespaces`` (namespaces made for the run to join: ``kit.run.sandbox.join_path``),
    ``inject`` (a fault the kit injects around the engine's hooks,
    :data:`kit.starter.inject.INJECTIONS`).
    ``capture`` collects the payload's stdout/stderr into the result (else inherited).
    ``pass_fds`` are open in the starter under the same numbers (for
    ``StarterConfig.keep_file_descriptor``).

    The run itself happens in a fresh, lean supervisor process (:mod:`kit.run.supervisor`), never in
    the caller: no thread of the caller ever calls unshare, setns or setresuid.

    >>> result = run("reference", "root", ["/bin/sh", "-c", "exit 7"]) >>> result.exit_code 7
    """
    return start(
        engine, flow, argv, capture=capture, stdin=stdin, pass_fds=pass_fds, **options
    ).wait()
