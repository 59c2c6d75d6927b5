"""Three correct engines about the master's life, written from SPEC.md alone.

Each engine implements the whole contract (SPEC §1-§7) in every flow (root, suid, userns,
fakeroot, hybrid) with the same StarterConfig and the same stage-2 exec; they differ in how
the master waits for the container, forwards signals and cleans up:

- :class:`WaitidLoop` loops on the signal channel and polls ``os.waitid(P_PID, pid,
  WEXITED | WNOHANG)``, turning the siginfo into a raw wait status itself;
- :class:`PidfdPoll` opens a pidfd on the container, ``poll``\\ s it, forwards with
  ``pidfd_send_signal`` and reaps with ``waitpid`` once the pidfd is readable; the cleanup
  closes a pidfd a failed monitor left open;
- :class:`ThreadedWait` lets a helper thread block in ``os.wait4(pid, 0)`` while the hook's
  own thread drains the signal channel; the cleanup makes sure the helper is gone.

The payload is the engine config's ``argv`` (``kit run -- CMD``); ``hostname`` is set in the
container's uts namespace through an RPC method in ``create_container``.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import threading
from dataclasses import dataclass

from kit import system
from kit.contract import ConfigError, EngineConfig, Operations

#: The signals a conformant monitor forwards to the container (SPEC §7).
FORWARDED = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
)

PAYLOAD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


@dataclass
class MasterConfig(EngineConfig):
    """The engine config: the payload's argv (from the launcher) and a hostname."""

    hostname: str = "blind11"


class MasterRPC:
    """RPC methods, served by the RPC server inside the container's namespaces."""

    def __init__(self, engine: object) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)

    def gethostname(self) -> str:
        return self.system.gethostname()


def status_from_siginfo(info: os.waitid_result) -> int:
    """The raw wait status (as ``waitpid`` returns it) that ``waitid``'s siginfo describes."""
    code = info.si_code
    if code == os.CLD_EXITED:
        return (info.si_status & 0xFF) << 8
    if code == os.CLD_KILLED:
        return info.si_status & 0x7F
    if code == os.CLD_DUMPED:
        return (info.si_status & 0x7F) | 0x80
    raise RuntimeError(f"unexpected waitid si_code {code} for pid {info.si_pid}")


class _Base:
    """What the three engines share (a mixin, not an engine): config, prepare_config,
    create_container, start_process."""

    rpc_methods = MasterRPC

    def config(self) -> MasterConfig:
        return MasterConfig()

    def prepare_config(self, starter_config) -> None:
        cfg = self.common.engine_config
        if not cfg.argv:
            raise ConfigError("argv: no payload given (kit run -- CMD)")
        if not cfg.hostname:
            raise ConfigError("hostname: must not be empty")
        sc = starter_config
        kinds = ["mount", "pid", "net", "uts", "ipc"]
        if sc.flow in ("userns", "fakeroot", "hybrid"):
            kinds.append("user")
            inside = sc.invoker_uid if sc.flow == "userns" else 0
            inside_gid = sc.invoker_gid if sc.flow == "userns" else 0
            sc.add_uid_mappings([(inside, sc.invoker_uid, 1)])
            sc.add_gid_mappings([(inside_gid, sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_ns_flags(kinds)
        sc.set_mount_propagation("rprivate")
        sc.set_bring_loopback_interface()
        if sc.flow != "root":
            sc.set_no_new_privs()
        # No capabilities configured: every set is empty at exec (SPEC §5).

    def create_container(self, ctx, pid, rpc_conn) -> None:
        from kit.rpc import RPCClient

        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.sethostname(name=self.common.engine_config.hostname)

    def start_process(self, master_fd: int) -> None:
        argv = list(self.common.engine_config.argv)
        # master_fd is close-on-exec: left alone, it closes exactly at exec.
        if "/" in argv[0]:
            os.execve(argv[0], argv, PAYLOAD_ENV)
        os.execvpe(argv[0], argv, PAYLOAD_ENV)

    @staticmethod
    def _forward(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # already gone (a zombie still takes signals; a reaped pid does not)


class WaitidLoop(_Base, Operations):
    """Monitor loops on the signal channel and polls waitid(P_PID, pid, WEXITED|WNOHANG)."""

    engine_name = "blind11-master-waitid"

    _status_from_siginfo = staticmethod(status_from_siginfo)

    def monitor_container(self, pid, signals):
        while True:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
            if info is not None and info.si_pid == pid:
                return self._status_from_siginfo(info)
            sig = signals.get(timeout=0.05)
            while sig is not None:
                if sig in FORWARDED:
                    self._forward(pid, sig)
                sig = signals.get(timeout=0)

    def cleanup_container(self, ctx, fatal, status) -> None:
        # Nothing outlives the container here (the hostname lives in its uts namespace);
        # guarded so that a second call would be a no-op.
        if getattr(self, "_cleaned", False):
            return
        self._cleaned = True


class PidfdPoll(_Base, Operations):
    """Monitor polls a pidfd of the container, forwards with pidfd_send_signal, then reaps."""

    engine_name = "blind11-master-pidfd"

    POLL_MS = 50

    def _pidfd_lock(self) -> threading.Lock:
        lock = self.__dict__.get("_lock")
        if lock is None:
            lock = self.__dict__.setdefault("_lock", threading.Lock())
        return lock

    def _close_pidfd(self) -> None:
        with self._pidfd_lock():
            fd = getattr(self, "_pidfd", -1)
            self._pidfd = -1
        if fd >= 0:
            os.close(fd)

    def _send(self, fd: int, pid: int, sig: int) -> None:
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            pass

    def monitor_container(self, pid, signals):
        fd = os.pidfd_open(pid)
        with self._pidfd_lock():
            self._pidfd = fd
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            sig = signals.get(timeout=0)
            while sig is not None:
                if sig in FORWARDED:
                    self._send(fd, pid, sig)
                sig = signals.get(timeout=0)
            if poller.poll(self.POLL_MS):
                break
        _, status = os.waitpid(pid, 0)
        self._close_pidfd()
        return status

    def cleanup_container(self, ctx, fatal, status) -> None:
        # A monitor that raised may have left its pidfd open: close it (idempotent).
        self._close_pidfd()


class ThreadedWait(_Base, Operations):
    """A helper thread blocks in os.wait4(pid, 0) while the hook thread forwards signals."""

    engine_name = "blind11-master-thread"

    def _reaper(self, pid: int, box: queue.SimpleQueue) -> None:
        try:
            _, status, _ = os.wait4(pid, 0)
            box.put(("status", status))
        except BaseException as exc:
            box.put(("error", exc))

    def monitor_container(self, pid, signals):
        box: queue.SimpleQueue = queue.SimpleQueue()
        helper = threading.Thread(
            target=self._reaper, args=(pid, box), name="blind11-reaper", daemon=True
        )
        self._helper = helper
        helper.start()
        while True:
            try:
                kind, value = box.get_nowait()
            except queue.Empty:
                pass
            else:
                helper.join()
                if kind == "error":
                    raise value
                return value
            sig = signals.get(timeout=0.05)
            if sig is not None and sig in FORWARDED:
                self._forward(pid, sig)

    def cleanup_container(self, ctx, fatal, status) -> None:
        # The helper ends with the container: after a fatal error the kit has killed and
        # reaped it, so the helper's wait returns (ECHILD at worst); do not leave it behind.
        helper = getattr(self, "_helper", None)
        if helper is not None and helper.is_alive():
            helper.join(timeout=2.0)
