"""Correct engines of the third blind round (SPEC §5, §11, cleanup), loaded as
``blind3_host_correct:NAME`` (``tests/`` on ``PYTHONPATH``): the legal counterparts of
blind3_host's bugs; any failure is a false failure of a check (or a disputed reading, said in
the docstring)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

from kit import system
from kit.contract import Context, WaitStatus
from kit.starter.config import StarterConfig
from reference_engines.minimal.engine import ReferenceConfig, ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC

_LIBC = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_PING_RANGE = "/proc/sys/net/ipv4/ping_group_range"


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _cfg(engine: ReferenceEngine) -> ReferenceConfig:
    cfg = engine.common.engine_config
    assert isinstance(cfg, ReferenceConfig)
    return cfg


def _in_child(work: Callable[[], None]) -> int:
    """Run ``work`` in a forked (single-threaded) child of this process; its exit code."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:  # the helper reports by its exit code only
            pass
        os._exit(code)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def _render_in_private_namespace() -> None:
    _check(_LIBC.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # First of all, before any mount: nothing of this namespace propagates to the host's.
    _check(_LIBC.mount(None, b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None), "rprivate")
    flags = ctypes.c_ulong(_MS_NOSUID | _MS_NODEV)
    _check(_LIBC.mount(b"tmpfs", b"/srv", b"tmpfs", flags, b"size=64k,mode=0755"), "mount /srv")
    with open("/srv/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n::1 localhost\n")


def _ping_range_in_container_netns(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_LIBC.setns(fd, _CLONE_NEWNET), "setns(net)")
    finally:
        os.close(fd)
    with open(_PING_RANGE, "w") as f:  # the writer's network namespace: the container's
        f.write("0 2147483647\n")


class NamespaceHelpersEngine(ReferenceEngine):
    """The master's helper processes work in a private mount namespace and the container's netns.

    SPEC §11: "a run changes nothing on the host that outlives it, and a few things
    (hostname, mount table: NS-010, NS-011) not even while it runs"; "After a run the host is
    as it was before: ... mounts (and their options and propagation), ... sysctls".
    create_container (root flow, where the master is host root) forks two short-lived
    helpers and waits for them: one unshares a mount namespace, makes its / rprivate before
    anything else, and mounts a scratch tmpfs on /srv there (ENVIRONMENT.md: "After a new
    mount namespace, always make / recursively private ... before mounting"): the host's
    mount table never sees it; the other joins the container's network namespace and sets
    net.ipv4.ping_group_range there, the container's own sysctl, not the host's. §4: "the
    master shares none of pid/net/uts/ipc/cgroup with them" -- the second helper is a child
    process of the master, not one of its threads, and it is gone before create_container
    returns. The other flows skip the helpers. Legal."""

    engine_name = "blind3-ok-namespace-helpers"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        if not system.current().privileged():
            return
        _in_child(_render_in_private_namespace)
        if "net" in _cfg(self).namespaces:
            _in_child(lambda: _ping_range_in_container_netns(pid))


class Stage2FdHygieneEngine(ReferenceEngine):
    """start_process holds a close-on-exec descriptor of the host's /sys at its exec.

    SPEC §5: ``keep_file_descriptor`` is how a descriptor reaches the payload ("Keep fd open
    (inheritable) into stage 2 and the payload"); §1: start_process "becomes the payload:
    it must exec". prepare_config keeps stderr explicitly (fd 2, open in the starter).
    start_process opens the cgroup file system (or /sys) close-on-exec, moves it above 100
    with F_DUPFD_CLOEXEC, checks pids.max through it, and leaves it open: the exec closes
    it. Stage 2 holds one more descriptor than the payload at the exec; the payload has
    stdio only. Every flow. Legal."""

    engine_name = "blind3-ok-stage2-fd-hygiene"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        starter_config.keep_file_descriptor(2)

    def start_process(self, master_fd: int) -> None:
        base = "/sys/fs/cgroup" if os.path.isdir("/sys/fs/cgroup") else "/sys"
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)
        os.close(fd)
        try:
            limit = os.open("pids.max", os.O_RDONLY | os.O_CLOEXEC, dir_fd=high)
        except OSError:
            limit = -1  # no pids controller here
        if limit >= 0:
            try:
                value = os.read(limit, 32).decode().strip()
            finally:
                os.close(limit)
            if value == "0":
                raise OSError(errno.EAGAIN, "pids.max is 0: the payload could not fork")
        super().start_process(master_fd)


def _group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no process of group ``pgid`` is left (zombies reaped by their reaper)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


class ThoroughCleanupEngine(ReferenceEngine):
    """Host files, a socket and a process tree made during the run, all undone on every path.

    SPEC §11: "a run changes nothing on the host that outlives it" (files and processes may
    exist while it runs; only the hostname and the mount table may not even change then) and
    "After a run the host is as it was before: files, ... processes"; §1: cleanup_container
    "tears everything down; must tolerate partial setup". create_container records each
    object before it makes it: a state file and a listening control socket in /var/tmp, and
    a console relay, a shell pipeline in a session (process group) of its own.
    cleanup_container, whatever the fatal error and the wait status (nothing made included),
    SIGKILLs the relay's whole group (the hooks' blocked signal mask is inherited, so SIGTERM
    would not do), reaps the shell, waits until the group is gone, then closes the socket and
    unlinks its path, and removes the state file; each step tolerates a missing object and a
    second call. Every flow. Legal."""

    engine_name = "blind3-ok-thorough-cleanup"
    rpc_methods = ReferenceRPC

    def init_config(self, common, privileged_stage1):  # type: ignore[no-untyped-def]
        super().init_config(common, privileged_stage1)
        self._files: list[str] = []
        self._control: socket.socket | None = None
        self._relay: subprocess.Popen[bytes] | None = None

    def _path(self, suffix: str) -> str:
        tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.common.container_id)
        return f"/var/tmp/blind3-ok-{tag[:48]}.{suffix}"

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        state = self._path("state")
        self._files.append(state)
        fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{pid}\n")
        control = self._path("sock")
        self._files.append(control)
        self._control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._control.bind(control)
        self._control.listen(4)
        self._relay = subprocess.Popen(
            ["/bin/sh", "-c", "/bin/sleep 600 | /bin/cat >/dev/null"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        relay, self._relay = self._relay, None
        if relay is not None:
            try:
                os.killpg(relay.pid, signal.SIGKILL)  # its session: the shell and its children
            except ProcessLookupError:
                pass
            relay.wait()
            _group_gone(relay.pid, 2.0)
        control, self._control = self._control, None
        if control is not None:
            control.close()
        files, self._files = self._files, []
        for path in files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        super().cleanup_container(ctx, fatal, status)


ENGINES = (NamespaceHelpersEngine, Stage2FdHygieneEngine, ThoroughCleanupEngine)
