"""The master: create, start, monitor and clean up the container (SPEC §5)."""

from __future__ import annotations

import os
import queue
import select
import signal
import socket
import threading
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
    STAGE2_NAME,
    ContainerCreationFailed,
    HookRunner,
    _how_ended,
    _recv_control,
    _send,
    _status_to_code,
    _unwrap,
    describe_error,
)
from kit.starter.config import StarterConfig
from kit.starter.control import Control
from kit.system import linux

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
        self.ledger = starter.ledger.for_role("master")
        self.hooks = HookRunner(self.ledger, starter.system, starter.req.probes)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.go_sent = threading.Event()
        self.exec_checked = threading.Event()
        self.signals = SignalChannel()
        self.ctx = Context()
        self.container_sigchld = threading.Event()

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
        threading.Thread(target=self._signal_loop, name="kit-signals", daemon=True).start()
        threads = [
            threading.Thread(target=fn, name=name, daemon=True)
            for fn, name in (
                (self._create, "kit-create"),
                (self._start_waiter, "kit-start-waiter"),
                (self._monitor, "kit-monitor"),
            )
        ]
        for t in threads:
            t.start()

        fatal: BaseException | None = None
        status: int | None = None
        kind, value = self.events.get()
        if kind == "fatal":
            fatal = value
            self.ledger.emit("fatal", message=str(fatal), error=describe_error(fatal))
            self._kill_container()
            status = self._await_status()
        else:
            status = value
        if status is not None:
            self._await_container_sigchld()
        threads[0].join()
        threads[1].join()
        self._check_sentinel()
        while not self.events.empty():  # a fatal error of post_start after the status
            kind, value = self.events.get_nowait()
            if kind == "fatal" and fatal is None:
                fatal = value
                self.ledger.emit("fatal", message=str(fatal), error=describe_error(fatal))
        self.ctx.cancel()
        try:
            self.hooks.call(
                "cleanup_container", engine.operations.cleanup_container, self.ctx, fatal, status
            )
        except BaseException:  # noqa: BLE001 engine code may raise anything
            pass  # recorded by the hook runner; the exit code is unchanged
        if fatal is not None or status is None:
            return EXIT_FATAL
        return _status_to_code(status)

    def _check_sentinel(self) -> None:
        """Reap the starter's sentinel child; record it if someone else (the engine) did."""
        sentinel = getattr(self.starter, "sentinel", None)
        if not sentinel:
            return
        try:
            os.waitpid(sentinel, 0)
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
        """Hold the master until the signal thread has recorded the container's SIGCHLD.

        A monitor that waits on a pidfd reaps the container as soon as it exits, possibly
        before the signal thread has taken the SIGCHLD off the pending set: without this
        wait the master could finish and exit with the SIGCHLD never recorded (SIG-005).
        When SIGCHLD is ignored (an engine's doing) the kernel sends none: nothing to wait for.
        """
        if not linux.signal_ignored(signal.SIGCHLD):
            self.container_sigchld.wait(self.starter.req.hook_timeout)

    def _kill_container(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _await_status(self) -> int | None:
        """After a fatal error: the container's status from the monitor, or our own wait."""
        while True:
            try:
                kind, value = self.events.get(timeout=self.starter.req.hook_timeout)
            except queue.Empty:
                break
            if kind == "status":
                status: int | None = value
                return status
            if kind == "monitor_failed":
                break
        try:
            _, status = os.waitpid(self.pid, 0)
            return status
        except ChildProcessError:
            return None

    def _signal_loop(self) -> None:
        while True:
            info = signal.sigwaitinfo(MASTER_SIGNALS)
            if (
                info.si_signo == signal.SIGCHLD
                and info.si_pid != self.pid
                and probe.is_probe_child(info.si_pid)
            ):
                # The exit of one of the kit's own probe children: not the engine's business,
                # unless the container's SIGCHLD was merged into it (standard signals
                # coalesce): peek, without reaping, whether the container has exited.
                if not self._container_exited():
                    continue
                info = signal.struct_siginfo((signal.SIGCHLD, 0, 0, self.pid, 0, 0, 0))
            if info.si_signo == signal.SIGCHLD and info.si_pid == self.pid:
                # Let the start waiter tell exec from exit before anyone can reap the
                # container: a monitor reaps it when it sees this SIGCHLD.
                self.exec_checked.wait(self.starter.req.hook_timeout)
            self.ledger.emit(
                "signal",
                signum=info.si_signo,
                name=signal.Signals(info.si_signo).name,
                sender=info.si_pid,
            )
            self.signals.put(info.si_signo)
            if info.si_signo == signal.SIGCHLD and info.si_pid == self.pid:
                self.container_sigchld.set()

    def _container_exited(self) -> bool:
        try:
            found = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # already reaped by the engine
        return found is not None

    def _create(self) -> None:
        stop_watch = self._watch_creation()
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
            self.rpc_sock.close()
            _send(self.sock, Control.ABORT)
            err = _unwrap(exc)
            self.events.put(
                (
                    "fatal",
                    ContainerCreationFailed(
                        f"container creation failed: {type(err).__name__}: {err}"
                    ),
                )
            )
            return
        stop_watch()
        self.rpc_sock.close()  # the RPC server exits; then stage 2 may start
        self.go_sent.set()
        _send(self.sock, Control.GO)

    def _watch_creation(self) -> Callable[[], None]:
        """Until the returned function is called: if the container process dies (its
        pidfd) or the RPC server does (its end of the connection hangs up), cancel ``ctx``
        with the reason and shut the RPC connection down, so that create_container learns it
        at once instead of after a wait or a timeout."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            return lambda: None
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(self.rpc_sock.fileno(), select.POLLRDHUP)
        poller.register(wake_r, select.POLLIN)

        def watch() -> None:
            ready = dict(poller.poll())
            if wake_r in ready:
                return
            if pidfd not in ready and select.select([pidfd], [], [], 0.05)[0]:
                # The container's death takes its RPC server along, which may hang up
                # first: the container's end is the reason worth giving.
                ready[pidfd] = select.POLLIN
            if pidfd in ready:
                what = f"the container process (pid {self.pid}) died{_how_ended(self.pid)}"
            else:
                what = "the RPC server ended (its end of the connection was closed)"
            self.ctx.cancel(what)
            try:
                self.rpc_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        watcher = threading.Thread(target=watch, name="kit-create-watch", daemon=True)
        watcher.start()

        def stop() -> None:
            os.write(wake_w, b"x")
            watcher.join()
            for fd in (pidfd, wake_r, wake_w):
                os.close(fd)

        return stop

    def _start_waiter(self) -> None:
        try:
            exec_seen = self._wait_for_exec()
        finally:
            self.exec_checked.set()
        if not exec_seen:
            return
        self.ledger.emit("stage2_exec")
        try:
            self.hooks.call(
                "post_start_process", self.engine.operations.post_start_process, self.ctx, self.pid
            )
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            self.events.put(("fatal", _unwrap(exc)))

    def _wait_for_exec(self) -> bool:
        """True once the payload was exec'd; False when stage 2 failed or never started."""
        kind, message = _recv_control(self.sock)
        self.sock.close()
        if kind == Control.STAGE2_FAILED:
            self.ledger.emit("stage2_failed", message=message)
            return False
        if not self.go_sent.is_set():
            return False  # create_container failed: the container never started stage 2
        # EOF: the close-on-exec end went away, by exec or by death. A dead stage 2 still
        # carries the kit's process name (exec renames it).
        if linux.process_name(self.pid) in (STAGE2_NAME, None):
            self.ledger.emit("stage2_failed", message="stage 2 died before exec")
            return False
        return True

    def _monitor(self) -> None:
        try:
            status = self.hooks.call(
                "monitor_container",
                self.engine.operations.monitor_container,
                self.pid,
                self.signals,
            )
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            self.events.put(("fatal", _unwrap(exc)))
            self.events.put(("monitor_failed", None))
            return
        if not isinstance(status, int):
            self.events.put(
                ("fatal", TypeError(f"monitor_container returned {status!r}, not a wait status"))
            )
            self.events.put(("monitor_failed", None))
            return
        self.events.put(("status", status))
