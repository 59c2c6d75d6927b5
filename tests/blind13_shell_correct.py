"""Blind round 13, theme ``shell``: correct engines that do their work through helper programs.

Written from ``SPEC.md`` alone (and the kit's public API), in the style of runtimes that shell
out to ``mount``, ``hostname``, ``sysctl``, ``nsenter``, ``ip`` and ``sh`` instead of making
the system calls themselves. Every helper runs in the process and the namespaces the SPEC gives
the work to (the RPC server for the container's own set-up, the master only with ``nsenter``
into the container), is waited for (or killed with SIGKILL and reaped), gets a clean
environment and no descriptor of the engine's, and a helper that fails makes the hook fail.
Where a flow gives the hooked process no privilege that survives an ``exec`` (a non-root uid
drops its capabilities at exec), the engine does the step natively through ``kit.system`` or
does without it, never fails the flow.

- ``ShellRPCEngine`` (``blind13-shell-rpc``): the RPC server runs ``hostname``, ``mount -n -t
  tmpfs … /dev/shm`` and ``sysctl -w net.ipv4.ip_unprivileged_port_start`` where it is root in
  its user namespace (root, fakeroot, hybrid); as a non-root uid (suid, userns) it uses
  ``kit.system`` for the hostname and the mount and skips the sysctl unless it already holds
  CAP_NET_ADMIN.
- ``ShellWrapperEngine`` (``blind13-shell-wrapper``): the same set-up, and ``start_process``
  execs the payload through a small ``/bin/sh`` wrapper (core dumps off, soft open-files limit)
  after checking in Python that the payload can be exec'd, so an exec failure is still raised by
  ``start_process`` and not hidden inside the shell.
- ``ShellMasterEngine`` (``blind13-shell-master``): hostname and ``/dev/shm`` through the RPC
  server as above, then, CNI style, the master configures the container's network from outside
  with ``nsenter --target PID --net sysctl …``, and keeps a namespace holder (``nsenter …
  sleep infinity``, dropped to the invoking uid) until ``cleanup_container``, which reads
  ``lo``'s counters through it and then SIGKILLs and reaps it.
  In suid and hybrid it raises its effective uid on its own thread only (the saved uid 0 of the
  setuid master) around the helpers, once ``monitor_container`` has entered, and puts it back;
  in userns, where no helper it execs can hold a capability, it does none of this.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass

from kit import system
from kit.contract import ConfigError, EngineConfig, Operations
from kit.rpc import RPCClient
from kit.system import linux

#: Helpers get this environment, not the hook's (which is the launcher's, whatever it holds).
HELPER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
#: The payload's environment.
PAYLOAD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/"}
#: Seconds a helper may take (under the kit's 5 s hook timeout).
HELPER_TIMEOUT = 3.0

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
CAP_NET_ADMIN = linux.CAP_NUMBERS["CAP_NET_ADMIN"]

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_SIZE = re.compile(r"^[1-9][0-9]*[kmg]?$")


class HelperError(RuntimeError):
    """A helper program failed; the message has its command, exit status and stderr."""


def run_helper(argv: list[str], *, check: bool = True) -> str:
    """Run ``argv`` to completion with a clean environment, stdin on /dev/null and no
    descriptor of ours (``close_fds``); return its stdout. A non-zero exit is a
    :class:`HelperError` unless ``check`` is false; a helper that outlives
    :data:`HELPER_TIMEOUT` is killed (SIGKILL) and reaped by ``subprocess``."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=HELPER_ENV,
            close_fds=True,
            timeout=HELPER_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise HelperError(f"{' '.join(argv)}: no answer within {HELPER_TIMEOUT} s") from None
    if check and proc.returncode != 0:
        raise HelperError(f"{' '.join(argv)}: exit status {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class ShellConfig(EngineConfig):
    hostname: str = "shellbox"
    #: size of the container's private /dev/shm (tmpfs ``size=``)
    shm_size: str = "64m"
    #: net.ipv4.ip_unprivileged_port_start in the container (-1: leave the kernel's default)
    unprivileged_port_start: int = 0


# --- the RPC server's side ---------------------------------------------------------------------


class ShellRPC:
    """Served by the RPC server, in the container's namespaces. Each method shells out when
    this process is root in its user namespace (a helper it execs keeps the capabilities);
    otherwise it does the step itself through ``kit.system`` with the capabilities the server
    holds, or reports that it skipped it."""

    def __init__(self, engine: Operations) -> None:
        self.engine = engine
        self.system = system.current()

    @staticmethod
    def _helpers_keep_privilege() -> bool:
        return os.geteuid() == 0

    @staticmethod
    def _effective(cap: int) -> bool:
        return bool(linux.capget()[0] >> cap & 1)

    def set_hostname(self, name: str) -> str:
        if self._helpers_keep_privilege():
            run_helper(["hostname", name])
            return "hostname(1)"
        self.system.sethostname(name)
        return "sethostname(2)"

    def mount_shm(self, size: str) -> str:
        options = f"mode=1777,size={size}"
        if self._helpers_keep_privilege():
            # -n: no /run/mount/utab entry (that file is the host's, not the container's)
            run_helper(
                ["mount", "-n", "-t", "tmpfs", "-o", f"nosuid,nodev,{options}", "shm", "/dev/shm"]
            )
            return "mount(8)"
        self.system.mount("shm", "/dev/shm", "tmpfs", ["nosuid", "nodev"], options)
        return "mount(2)"

    def set_sysctl(self, key: str, value: str) -> str:
        if self._helpers_keep_privilege():
            run_helper(["sysctl", "-q", "-w", f"{key}={value}"])
            return "sysctl(8)"
        if self._effective(CAP_NET_ADMIN):  # userns: the network namespace is ours
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
            return "procfs"
        return "skipped"


# --- engines -----------------------------------------------------------------------------------


class _ShellBase(Operations):
    """config, prepare_config and monitor_container shared by the engines of this module."""

    def config(self) -> ShellConfig:
        return ShellConfig()

    def prepare_config(self, sc) -> None:
        cfg = self.common.engine_config
        if not _HOSTNAME.match(cfg.hostname):
            raise ConfigError(f"hostname: invalid host name {cfg.hostname!r}")
        if not _SIZE.match(cfg.shm_size):
            raise ConfigError(f"shm_size: expected a size such as 64m, got {cfg.shm_size!r}")
        if not -1 <= cfg.unprivileged_port_start <= 65535:
            raise ConfigError(
                f"unprivileged_port_start: out of range: {cfg.unprivileged_port_start}"
            )
        namespaces = ["mount", "pid", "uts", "ipc", "net"]
        if sc.flow in ("userns", "fakeroot", "hybrid"):
            namespaces.append("user")
            inside_uid, inside_gid = (
                (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
            )
            sc.add_uid_mappings([(inside_uid, sc.invoker_uid, 1)])
            sc.add_gid_mappings([(inside_gid, sc.invoker_gid, 1)])
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_ns_flags(namespaces)
        sc.set_bring_loopback_interface()
        sc.set_mount_propagation("rprivate")
        if sc.flow != "root":
            sc.set_no_new_privs()

    def _set_up_container(self, rpc: RPCClient) -> None:
        cfg = self.common.engine_config
        rpc.set_hostname(name=cfg.hostname)
        rpc.mount_shm(size=cfg.shm_size)
        if cfg.unprivileged_port_start >= 0:
            rpc.set_sysctl(
                key="net.ipv4.ip_unprivileged_port_start",
                value=str(cfg.unprivileged_port_start),
            )

    def start_process(self, master_fd: int) -> None:
        argv = self.common.engine_config.argv
        os.execve(argv[0], argv, PAYLOAD_ENV)

    def monitor_container(self, pid: int, signals) -> int:
        while True:
            sig = signals.get(timeout=0.1)
            if sig in FORWARDED:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status


class ShellRPCEngine(_ShellBase):
    """Container set-up by helpers run in the RPC server."""

    engine_name = "blind13-shell-rpc"
    rpc_methods = ShellRPC

    def create_container(self, ctx, pid: int, rpc_conn) -> None:
        self._set_up_container(RPCClient(rpc_conn, self.common.engine_name))

    def cleanup_container(self, ctx, fatal, status) -> None:
        # Everything this engine set up lives in the container's namespaces and goes with
        # them: nothing to undo from the master.
        pass


class ShellWrapperEngine(ShellRPCEngine):
    """The payload is exec'd through a /bin/sh wrapper that sets its resource limits."""

    engine_name = "blind13-shell-wrapper"
    rpc_methods = ShellRPC

    #: The wrapper: the limits are best effort (quiet), the real stderr is kept on fd 3 while
    #: they are set and put back, fd 3 closed, before the payload is exec'd.
    WRAPPER = "exec 3>&2 2>/dev/null\nulimit -c 0\nulimit -S -n 1024\nexec 2>&3 3>&-\nexec \"$@\"\n"

    @staticmethod
    def _resolve(name: str) -> str:
        """The file the payload's argv[0] names, checked as execve would check it, so that
        a payload that cannot be exec'd fails here, in start_process, and not later inside
        the shell (which would only print an error and exit 127)."""
        if "/" in name:
            candidates = [name]
        else:
            candidates = [os.path.join(d or ".", name) for d in PAYLOAD_ENV["PATH"].split(":")]
        for path in candidates:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EACCES, "payload is a directory", path)
            if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
                raise PermissionError(errno.EACCES, "payload is not executable", path)
            try:
                with open(path, "rb") as f:
                    head = f.read(4)
            except PermissionError:
                return path  # execute-only: execve may still run it
            if head != b"\x7fELF" and not head.startswith(b"#!"):
                raise OSError(errno.ENOEXEC, "payload is not an executable format", path)
            return path
        raise FileNotFoundError(errno.ENOENT, "payload not found", name)

    def start_process(self, master_fd: int) -> None:
        argv = list(self.common.engine_config.argv)
        argv[0] = self._resolve(argv[0])
        os.execve("/bin/sh", ["sh", "-c", self.WRAPPER, "sh", *argv], PAYLOAD_ENV)


class ShellMasterEngine(_ShellBase):
    """Configures the container's network from the master with nsenter, CNI style."""

    engine_name = "blind13-shell-master"
    rpc_methods = ShellRPC

    def __init__(self) -> None:
        super().__init__()
        self._monitor_up = threading.Event()
        self._holder: subprocess.Popen[bytes] | None = None

    # -- privilege -------------------------------------------------------------------------
    @staticmethod
    def _helpers_possible() -> bool:
        """Whether a helper this master execs can act on the container: as root (root
        flow; fakeroot, where the master is root of the container's user namespace) or
        through the saved uid 0 of the setuid master (suid, hybrid). In userns a helper
        runs as U with no capability at all."""
        _, euid, suid = os.getresuid()
        return euid == 0 or suid == 0

    @contextlib.contextmanager
    def _escalated(self):
        """Effective uid 0 for the calling thread only (the raw syscall, not glibc's
        all-threads wrapper), put back on the way out; a no-op when already root."""
        euid = os.geteuid()
        if euid == 0:
            yield
            return
        linux.thread_setresuid(-1, 0, -1)
        try:
            yield
        finally:
            linux.thread_setresuid(-1, euid, -1)

    def _wait_for_monitor(self, ctx) -> None:
        """SPEC §4 holds for every thread at every hook entry: raise nothing while
        monitor_container, which starts beside this hook, may still be entering."""
        for _ in range(100):
            if self._monitor_up.wait(0.02) or ctx.cancelled:
                return

    @staticmethod
    def _nsenter(pid: int, *kinds: str) -> list[str]:
        return ["nsenter", f"--target={pid}", *(f"--{k}" for k in kinds), "--"]

    def _spawn_holder(self, pid: int) -> subprocess.Popen[bytes]:
        """A process in the container's network namespace that keeps it alive until
        cleanup_container, dropped to the invoking uid once inside."""
        ruid, rgid = os.getuid(), os.getgid()
        drop = [f"--setuid={ruid}", f"--setgid={rgid}"] if ruid != 0 else []
        argv = ["nsenter", f"--target={pid}", "--net", *drop, "--", "sleep", "infinity"]
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=HELPER_ENV,
            close_fds=True,
        )

    # -- hooks -----------------------------------------------------------------------------
    def _configure_from_master(self, pid: int) -> None:
        """The privileged helpers, run while escalated."""
        cfg = self.common.engine_config
        if cfg.unprivileged_port_start >= 0:
            run_helper(
                [
                    *self._nsenter(pid, "net"),
                    "sysctl",
                    "-q",
                    "-w",
                    f"net.ipv4.ip_unprivileged_port_start={cfg.unprivileged_port_start}",
                ]
            )
        self._holder = self._spawn_holder(pid)

    def create_container(self, ctx, pid: int, rpc_conn) -> None:
        cfg = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.set_hostname(name=cfg.hostname)
        rpc.mount_shm(size=cfg.shm_size)
        if not self._helpers_possible():
            return  # userns: nothing a helper of ours could do
        self._wait_for_monitor(ctx)
        with self._escalated():
            self._configure_from_master(pid)

    def monitor_container(self, pid: int, signals) -> int:
        self._monitor_up.set()
        return super().monitor_container(pid, signals)

    def _report_counters(self, holder_pid: int) -> None:
        """Log the container's loopback traffic, read through the holder (the container
        itself is gone by now)."""
        argv = [*self._nsenter(holder_pid, "net"), "ip", "-j", "-s", "link", "show", "lo"]
        try:
            with self._escalated():
                out = run_helper(argv)
            stats = json.loads(out)[0]["stats64"]
            rx, tx = stats["rx"]["bytes"], stats["tx"]["bytes"]
        except (OSError, HelperError, ValueError, LookupError) as exc:
            sys.stderr.write(f"{self.engine_name}: no counters: {exc}\n")
            return
        sys.stderr.write(f"{self.engine_name}: container lo: rx {rx} B, tx {tx} B\n")

    def _stop_holder(self, holder: subprocess.Popen[bytes]) -> None:
        # The master's hooks run with every signal blocked and the holder inherited that
        # mask: only SIGKILL stops it.
        holder.kill()
        holder.wait()

    def cleanup_container(self, ctx, fatal, status) -> None:
        holder, self._holder = self._holder, None
        if holder is None:
            return
        try:
            if holder.poll() is None:
                self._report_counters(holder.pid)
        finally:
            self._stop_holder(holder)
