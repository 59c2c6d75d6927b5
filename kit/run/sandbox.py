"""The per-run host sandbox: the host a real-backend run sees when launched as root."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import stat
import time
from dataclasses import dataclass, field
from typing import NoReturn

from kit.run import rundir, seccomp
from kit.system import linux

#: Set in the environment of a sandboxed run's processes: ``MNT:UTS``, the inode numbers of
#: the sandbox's mount and uts namespaces (code that changes "the host" on purpose, such as
#: the kill matrix's mutants, checks it is in there).
SANDBOX_ENV = "KIT_HOST_SANDBOX"
#: ``KIT_SANDBOX=0`` turns the default host sandbox off (debugging, comparisons).
SWITCH_ENV = "KIT_SANDBOX"
#: The name (``comm``) of every sandbox's init, from its fork on.
INIT_NAME = "kit-sandbox"
#: Where a run legitimately writes: when the host has a separate mount there, the sandbox
#: gets a copy-on-write view of it, even on a directory bound whole from the host (every
#: other directory mount gets one where nothing is bound over it).
WRITABLE = ("/tmp", "/var/tmp", "/run", "/var/run")
#: Made afresh for the sandbox, never bound from the host.
RECREATED = ("/proc", "/sys", "/dev")
#: The file system of namespace files (/proc/PID/ns/*), wherever one is bound.
NAMESPACE_FS = "nsfs"
#: Device nodes made like the host's (a container runtime's default set).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}
#: Under /proc: host-global knobs that stay read-only (``/proc/sys/net`` is per network
#: namespace, so writable again).
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
NS_KINDS = ("mount", "uts", "ipc", "net")
#: Where a sandboxed run finds the namespaces its request gives it to join
#: (``RunRequest.join_namespaces``): ``/dev/kit-join/<kind>``, bound there before the run.
#: Nothing of the host's /proc is in the sandbox: from a host process's ``ns/*`` root would
#: setns into the host's namespaces.
JOIN_DIR = "/dev/kit-join"
#: The kinds a run may be given to join: none leads back to the host (a mount namespace
#: holds the host's file systems; pid and user namespaces have the host's as ancestors).
JOIN_KINDS = ("uts", "ipc", "net")
#: In init's report, the items that are not an upper layer (each a mount point, a path
#: relative to the scratch tmpfs): its fd of the root of the sandbox's POSIX message queue
#: file system, and its fd of the root of the scratch tmpfs, which holds every upper layer.
_MQUEUE_ITEM = "mqueue"
_SCRATCH_ITEM = "scratch"
#: And init's fd of the witness, a mount namespace copied from the sandbox's (:func:`_witness`).
_WITNESS_ITEM = "witness"
#: ioctl_ns(2) NS_GET_NSTYPE: the CLONE_NEW* kind of a namespace file.
_NS_GET_NSTYPE = 0xB703
_READY_TIMEOUT = 10.0
#: What the supervisor sends init once it holds what it needs of init's (:func:`_release`).
_RELEASE_SIGNAL = signal.SIGUSR1
_STOP_GRACE = 2.0
#: siginfo's si_code of a signal sent by kill(2) (or pidfd_send_signal(2) without info).
_SI_USER = 0


#: The scheduling priority (nice) init takes once built, when its builder lowered its own
#: while building (init inherits it at the fork): None, init keeps it.
priority_when_ready: int | None = None


class SandboxError(RuntimeError):
    """The sandbox could not be built (the run does not start)."""


@dataclass
class HostSandbox:
    """One run's sandbox, as the supervisor holds it (the host diff reads it).

    ``init_pid``: the host pid of the sandbox's pid 1 (its ``/proc/PID/root``, ``ns/*`` and
    ``mountinfo`` are the sandbox's). ``upper_dir``: a path, valid in the supervisor, of the
    root overlay's upper layer (every path the run created, changed or deleted); the
    supervisor holds it open, so it stays readable after init is gone. ``upper_dirs``: the
    same for every copy-on-write mount, by mount point (``"/"`` included).

    The engine under test runs as root; without a sandbox a buggy one changes the real machine. Each
    run therefore happens inside new mount, uts, ipc, net (``lo`` up) and pid namespaces of the
    launch user namespace (so credentials, capabilities and the flows mean what they mean on the
    host), over a copy-on-write view of the root file system (SPEC §11):

    - ``/`` is an overlay: the real root file system as its lower layer, an upper layer on a tmpfs
      that only the sandbox has; each of the host's other directory mounts is copy-on-write too,
      with the host mount's flags (through an overlay, the host's sockets are dead: a read-only
      bind does not stop connect()); file mounts are bound in read-only (a device node with
      nodev), but a socket or FIFO (left out); the directories the kit shares with the run
      (its temporary directory, the coverage directory) are the host's, read-write. In a user
      namespace that is not the initial one, where the kernel refuses that overlay, ``/`` is
      built in pieces (``_Layers._split``);
    - ``/proc`` is a fresh proc of the new pid namespace with ``/proc/sys`` (but ``net.*``) and the
      host-global knobs read-only; ``/sys`` a fresh read-only sysfs; ``/dev`` a tmpfs with the
      harmless devices, a fresh devpts, ``/dev/shm`` and ``/dev/mqueue``;
    - ``/`` is made shared (a peer group of the sandbox's own), as on most hosts, and so is
      every mount below it; a copy of the mount namespace (the witness, :func:`_witness`)
      holds a peer of each, as the namespaces of a host's services do.

    Pid 1 of the sandbox is a small init that builds all this, then only reaps orphans. It is forked
    (:func:`build`) by the zygote, which keeps sandboxes built ahead for the next runs, or by a
    supervisor that builds its own. The supervisor, which keeps the host's namespaces and ``/proc``,
    takes it over (:func:`adopt`) and forks the starter into the sandbox's pid namespace; the
    starter enters init's other namespaces (:func:`enter`). When init ends (asked by its parent with
    SIGTERM, so that it saves its coverage data, else SIGKILLed; it dies with its parent), the
    kernel ends every process of the run; the namespaces, mounts and the tmpfs go with their last
    reference (:func:`end`).

    This protects the host from mistakes, not from a hostile root: a process that is root in the
    launch user namespace may still undo the sandbox's read-only mounts, mount a new proc, or use
    raw devices. The host-global system calls (clock, modules, reboot, swap…) are refused by
    :mod:`kit.run.seccomp`'s filter, installed in one place for both backends, sandboxed or not: the
    starter, first thing (``seccomp.install_for_run``); every process of the run descends from it.
    Init, which runs no engine code but which root in the sandbox could ptrace, gets the same rules
    on itself (:func:`_confine_init`).
    """

    init_pid: int
    upper_dir: str
    upper_dirs: dict[str, str] = field(default_factory=dict)
    scratch: str = ""
    ns_fds: dict[str, int] = field(default_factory=dict)
    held_fds: list[int] = field(default_factory=list)
    #: Init is this process's child (:func:`end` stops and reaps it); else its builder's (the
    #: zygote ends it once the supervisor that adopted it is gone: kit.run.zygote).
    own_init: bool = True
    #: A path, valid in the supervisor, of the root of the sandbox's POSIX message queue file
    #: system (its ipc namespace's one instance), held open like the upper layers: the host
    #: diff lists it from outside, neither joining the namespace nor mounting one ("" when
    #: unknown: the diff then mounts its own).
    mqueue_dir: str = ""
    #: The sandbox's own fresh file systems that its processes share as the host's and no
    #: upper layer records (its tmpfs ``/dev`` and ``/dev/shm``), by mount point: paths valid
    #: in the supervisor while init lives (:func:`fresh_dirs`); the host diff lists them.
    fresh_dirs: dict[str, str] = field(default_factory=dict)
    #: The host's mount points the sandbox does not reproduce: an empty read-only directory
    #: stands in for each (overlayfs refused it as a lower layer; see ``_stand_in_dir``).
    left_out: list[str] = field(default_factory=list)
    #: A pidfd of init (:func:`adopt` takes the builder's): unlike ``init_pid`` it never
    #: names another process. The supervisor checks through it (:meth:`init_exited`) that
    #: init still lives before it signals init's descendants, found by pid.
    init_pidfd: int | None = None

    def init_exited(self) -> bool:
        """Whether init has exited (reaped or not), or cannot be told apart (no pidfd):
        then ``init_pid`` may name another process, whose children are none of the run's."""
        return _exited(self.init_pidfd)


def init_waits(pid: int) -> bool:
    """Whether the sandbox init ``pid`` is in its reaping loop (sigwaitinfo: built and
    reported; asleep is not enough, a build sleeps too). Where the kernel names no wait
    channel ("0", no kallsyms), asleep is all that can be known: True."""
    chan = linux.wait_channel(pid)
    return chan is not None and (chan == "0" or "sigtimedwait" in chan)


def _exited(pidfd: int | None) -> bool:
    return pidfd is None or _exited_within(pidfd, 0)


def _exited_within(pidfd: int, seconds: float) -> bool:
    # poll, not select: a descriptor number may be at or above FD_SETSIZE (1024).
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)  # readable once the process exited
    return bool(poller.poll(seconds * 1000))


def default_on() -> bool:
    """Whether a run is sandboxed when its request does not say: as root (of any user
    namespace), unless ``KIT_SANDBOX=0``. In both backends: engine code in a fake run is as
    much root as in a real one (SPEC §9, §11: the fake backend never changes the host)."""
    return os.geteuid() == 0 and os.environ.get(SWITCH_ENV, "1") != "0"


def join_path(kind: str, path: str, sandboxed: bool) -> str:
    """Where a run finds the ``kind`` namespace at ``path`` (as the launcher sees it) that
    its request gives it to join (``join_namespaces``): the path itself, or in the host
    sandbox :data:`JOIN_DIR`/``kind``."""
    return f"{JOIN_DIR}/{kind}" if sandboxed else path


def check_join_kinds(namespaces: dict[str, str]) -> None:
    """Raise ValueError for a kind a run may not be given to join (where it is requested)."""
    bad = sorted(set(namespaces) - set(JOIN_KINDS))
    if bad:
        raise ValueError(
            f"join_namespaces: {', '.join(bad)} cannot be given to a run (only "
            f"{', '.join(JOIN_KINDS)}: the others lead back to the host)"
        )


# --- in the supervisor (or the zygote, ahead) ------------------------------------------------


@dataclass
class Building:
    """A sandbox whose init is building it (:func:`build`): taken over with :func:`adopt`, by
    the process that built it or by a child of that process. ``builder``: the pid of init's
    parent, which reaps it."""

    init_pid: int
    ready_fd: int
    scratch: str
    builder: int
    #: Init's report, once read (:func:`wait_ready`): {mount point: path below the scratch
    #: tmpfs's root} of the copy-on-write upper layers.
    uppers: dict[str, str] | None = None
    #: And init's fd of the root of the sandbox's message queue file system, if it has one.
    mqueue: int | None = None
    #: And init's fd of the root of the scratch tmpfs: one for every upper layer, however
    #: many pieces a split root has.
    scratch_fd: int = -1
    #: And init's fd of the witness mount namespace (-1: none).
    witness_fd: int = -1
    #: And the host's mount points that are not reproduced in the sandbox: an empty
    #: read-only directory stands in for each (overlayfs refused it, see ``_stand_in_dir``).
    left_out: list[str] = field(default_factory=list)
    #: The builder's pidfd of init, opened before init could be reaped: unlike ``init_pid``
    #: it never names another process (the zygote reaps a spare's init that died at once).
    #: Handed to the supervisor with the rest: :func:`adopt` checks through it that what it
    #: opened by pid was init's.
    pidfd: int | None = None
    #: The builder's lock of ``scratch`` (:data:`kit.run.rundir.SCRATCH`), held until the
    #: directory is removed: a builder killed before then leaves it to the next sweep.
    scratch_lock: int = -1

    def wait_ready(self) -> dict[str, str]:
        """Wait until init has built the sandbox (or raise SandboxError saying why); the
        upper layers, each as a path through init's descriptors (valid while it lives)."""
        if self.uppers is None:
            items = _await_ready(self.ready_fd)
            mqueue = items.pop(_MQUEUE_ITEM, None)
            self.mqueue = None if mqueue is None else int(mqueue)
            self.scratch_fd = int(items.pop(_SCRATCH_ITEM))
            self.witness_fd = int(items.pop(_WITNESS_ITEM, -1))
            self.left_out = sorted(point for point, rel in items.items() if not rel)
            self.uppers = {point: rel for point, rel in items.items() if rel}
            # Init no longer needs it (its old root is detached): gone now, it cannot outlive
            # a builder that is killed.
            self._remove_scratch()
        root = f"/proc/{self.init_pid}/fd/{self.scratch_fd}"
        return {point: f"{root}/{rel}" for point, rel in self.uppers.items()}

    def init_exited(self) -> bool:
        """Whether init has exited (reaped or not), known from the pidfd only: without one,
        as good as exited (its pid alone says nothing)."""
        return _exited(self.pidfd)

    def abandon(self, reap: bool = False) -> None:
        """By the builder, for a sandbox no run will adopt: init is killed (through the
        pidfd: its pid may name another process by now) and our descriptors closed.
        ``reap``: init is waited for and reaped here (a one-shot launcher, which has no
        reaping loop as the zygote has)."""
        if self.pidfd is not None:
            pidfd, self.pidfd = self.pidfd, None
            if reap:
                stop_built(self.init_pid, pidfd, signal.SIGKILL)  # closes the pidfd
            else:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.close(pidfd)
        if self.ready_fd >= 0:  # once: a second call closes nothing
            fd, self.ready_fd = self.ready_fd, -1
            os.close(fd)
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        """The scratch directory removed (if it is still there), then its lock let go."""
        with contextlib.suppress(OSError):
            os.rmdir(self.scratch)
        if self.scratch_lock >= 0:
            fd, self.scratch_lock = self.scratch_lock, -1
            os.close(fd)


def build(shared: list[str]) -> Building:
    """Fork a new sandbox's init, which builds it while the caller goes on. ``shared``: host
    directories the run may write (bound in read-write at the same path). The caller's own
    later children stay in its pid namespace: only :func:`adopt` puts them in the sandbox's."""
    builder = os.getpid()
    scratch, scratch_lock = rundir.create(prefix=rundir.SCRATCH)  # 0700, as mkdtemp makes it

    def unmade() -> None:
        _remove_scratch(scratch)
        os.close(scratch_lock)

    try:
        table = host_mount_table()  # here, where it is cached: init is a fresh fork each time
        builder_fd = os.pidfd_open(builder)
    except BaseException:
        unmade()
        raise
    try:
        rfd, wfd = os.pipe()
    except BaseException:
        os.close(builder_fd)
        unmade()
        raise
    try:
        # SIGCHLD held until the pidfd is open: a handler that reaps (the zygote's) could
        # otherwise take an init that died at once before we hold it. Every signal with a
        # Python handler held too: init drops those handlers before any can run in it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, *_python_handled()})
        try:
            # Init is born with its name: built in the background at a low priority on a
            # busy machine, it may wait seconds before it runs a line, and whoever lists the
            # builder's children (ps, a test of leftovers) must know it all along.
            builder_name = linux.get_name()
            linux.set_name(INIT_NAME)
            try:
                pid = _fork_in_new_pid_namespace()
            finally:
                if os.getpid() == builder:
                    linux.set_name(builder_name)
            if pid == 0:
                os.close(rfd)
                shared = [os.path.realpath(p) for p in shared if os.path.isdir(p)]
                _init_main(scratch, shared, wfd, table, builder_fd)
            pidfd = _hold_init(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    except BaseException:
        os.close(rfd)
        unmade()
        raise
    finally:
        os.close(wfd)
        os.close(builder_fd)
    return Building(
        init_pid=pid,
        ready_fd=rfd,
        scratch=scratch,
        builder=builder,
        pidfd=pidfd,
        scratch_lock=scratch_lock,
    )


def _hold_init(pid: int) -> int:
    """A pidfd on the new init ``pid``; if none can be opened, init is killed by pid and
    reaped (SIGCHLD is still blocked: no handler can have reaped it, the pid is its)."""
    try:
        return os.pidfd_open(pid)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise


def _fork_in_new_pid_namespace() -> int:
    """Fork pid 1 of a new pid namespace; the caller's later children stay in its own.
    In the initial user namespace: unshare, fork, and back by setns. In another one the
    caller's pid namespace may belong to an ancestor user namespace, where setns back is
    refused: the child is cloned with CLONE_NEWPID instead (the builders, the zygote and a
    supervisor, are single-threaded)."""
    if not linux.in_initial_user_namespace():
        return linux.clone(linux.CLONE_NEWPID)
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.unshare(linux.CLONE_NEWPID)
        try:
            pid = os.fork()
        except BaseException:
            linux.setns(own, linux.CLONE_NEWPID)
            raise
        if pid != 0:
            linux.setns(own, linux.CLONE_NEWPID)  # our next children: in our namespace
        return pid
    finally:
        os.close(own)


def adopt(building: Building) -> HostSandbox:
    """Wait until the sandbox is built and take it over (once per supervisor: the caller's
    later children are born in the sandbox's pid namespace, and it can start no thread)."""
    sandbox = HostSandbox(
        init_pid=building.init_pid,
        upper_dir="",
        scratch=building.scratch,
        own_init=building.builder == os.getpid(),
    )
    try:
        if building.pidfd is None:
            raise SandboxError(
                "the host sandbox's init came without a pidfd: its pid "
                f"{building.init_pid} alone cannot tell that it is still init's"
            )
        # The supervisor's now: it checks through it before it signals init's descendants.
        sandbox.init_pidfd, building.pidfd = building.pidfd, None
        building.wait_ready()
        assert building.uppers is not None
        sandbox.left_out = list(building.left_out)
        _hold(sandbox, building.uppers, building.scratch_fd, building.mqueue, building.witness_fd)
        fd = os.open(linux.ns_path("pid", building.init_pid), os.O_RDONLY | os.O_CLOEXEC)
        try:
            # Everything above was opened by pid. Init is the builder's child (the zygote's):
            # had it died and been reaped, the pid could name another process by now, whose
            # namespaces (the host's) we would hold. Alive now, through the pidfd, it was
            # alive throughout: the pid was still init's.
            if sandbox.init_exited():
                raise SandboxError(
                    "the host sandbox's init exited before the run adopted it (its pid "
                    f"{building.init_pid} may name another process now)"
                )
            _release(sandbox, building.ready_fd)
            if sandbox.init_exited():  # the pipe's end was its death, not its letting go
                raise SandboxError("the host sandbox's init exited while the run adopted it")
            linux.setns(fd, linux.CLONE_NEWPID)
        finally:
            os.close(fd)
    except BaseException:
        building._remove_scratch()  # init never reported: the lock too, else end() left it
        end(sandbox)
        raise
    finally:
        os.close(building.ready_fd)
    return sandbox


def provide_joins(sandbox: HostSandbox, namespaces: dict[str, str]) -> None:
    """Bind each namespace of ``namespaces`` (kind -> path as the supervisor sees it) on
    :data:`JOIN_DIR`/kind in the sandbox, before the host diff's first look. Each must be a
    namespace of that kind made for the run: the supervisor's own (the host's) is refused.
    The binding is done by a short-lived child: born in the sandbox's pid namespace, it sees
    its own descriptors in the sandbox's /proc once it has entered the mount namespace."""
    check_join_kinds(namespaces)
    fds: dict[str, int] = {}
    try:
        for kind, path in namespaces.items():
            fds[kind] = _open_namespace(kind, path)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(rfd)
                linux.setns(sandbox.ns_fds["mount"], linux.CLONE_NEWNS)
                os.makedirs(JOIN_DIR, exist_ok=True)
                for kind, fd in fds.items():
                    os.close(os.open(f"{JOIN_DIR}/{kind}", os.O_CREAT | os.O_WRONLY, 0o444))
                    linux.mount(f"/proc/self/fd/{fd}", f"{JOIN_DIR}/{kind}", None, linux.MS_BIND)
            except BaseException as exc:  # noqa: BLE001 the child reports any failure
                os.write(wfd, f"{type(exc).__name__}: {exc}".encode())
                os._exit(1)
            os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            error = f.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise SandboxError(
                "the namespaces to join could not be bound in the host "
                f"sandbox: {error or os.waitstatus_to_exitcode(status)}"
            )
    finally:
        for fd in fds.values():
            os.close(fd)


def _open_namespace(kind: str, path: str) -> int:
    """An fd of the ``kind`` namespace at ``path``, checked: of that kind, not the host's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxError(
            f"join_namespaces: cannot open the {kind} namespace {path}: {exc.strerror}"
        ) from None
    try:
        try:
            nstype = fcntl.ioctl(fd, _NS_GET_NSTYPE)
        except OSError:
            raise SandboxError(f"join_namespaces: {path} is not a namespace file") from None
        if nstype != linux.NAMESPACES[kind][0]:
            raise SandboxError(f"join_namespaces: {path} is not a {kind} namespace")
        if os.fstat(fd).st_ino == linux.ns_inode(kind):
            raise SandboxError(
                f"join_namespaces: {path} is the host's own {kind} namespace; "
                "give the run one made for it (unshare in a helper process)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release(sandbox: HostSandbox, ready_fd: int) -> None:
    """Have init close its descriptors of the scratch tmpfs and of the message queues, its
    standard streams (the builder's: host files or pipes) and the report pipe, once the
    supervisor holds its own copies, before any engine code runs: root in the sandbox can
    open init's descriptors through /proc/1/fd, and through the scratch change the upper
    layers behind the host diff's back. Init's root and cwd are the sandbox's. The pipe's
    end of file says it is done (or that init died: adopt then finds it exited)."""
    assert sandbox.init_pidfd is not None
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(sandbox.init_pidfd, _RELEASE_SIGNAL)
    deadline = time.monotonic() + _READY_TIMEOUT
    while _read_by(ready_fd, deadline, "let go of the sandbox's scratch"):
        pass


def _read_by(rfd: int, deadline: float, what: str) -> bytes:
    """What is next on the pipe ``rfd`` (b"" at its end), or SandboxError once ``deadline``
    has passed. Polled: a descriptor number may be beyond select's FD_SETSIZE."""
    poller = select.poll()
    poller.register(rfd, select.POLLIN)
    left = deadline - time.monotonic()
    if left <= 0 or not poller.poll(left * 1000):
        raise SandboxError(f"the host sandbox's init did not {what} within {_READY_TIMEOUT} s")
    return os.read(rfd, 65536)


def _await_ready(rfd: int) -> dict[str, str]:
    """Init's report: ``{mount point: path below the scratch tmpfs}`` of the upper layers
    (and :data:`_MQUEUE_ITEM`, :data:`_SCRATCH_ITEM`: fd numbers in init), or raise. It ends
    with an empty item (init keeps the pipe open until :func:`_release`), an error with the
    pipe's end."""
    data = b""
    deadline = time.monotonic() + _READY_TIMEOUT
    while not (data.startswith(b"ready ") and data.endswith(b"\0\0")):
        chunk = _read_by(rfd, deadline, "build the sandbox")
        if not chunk:
            break
        data += chunk
    text = os.fsdecode(data)  # the mount points as os.scandir named them
    if not text.startswith("ready "):
        raise SandboxError(f"the host sandbox could not be built: {text or 'init died'}")
    items: dict[str, str] = {}
    for item in text[len("ready ") :].split("\0"):
        if item:
            point, _, value = item.rpartition("=")
            items[point] = value
    return items


def fresh_dirs(init_pid: int) -> dict[str, str]:
    """:attr:`HostSandbox.fresh_dirs` of the sandbox whose init is ``init_pid``: a file left
    in ``/dev/shm`` (a lock, a POSIX semaphore or shared memory object) outlives the run
    there as on a host."""
    return {point: f"/proc/{init_pid}/root{point}" for point in ("/dev", "/dev/shm")}


def _hold(
    sandbox: HostSandbox,
    uppers: dict[str, str],
    scratch_fd: int,
    mqueue: int | None = None,
    witness: int = -1,
) -> None:
    """Open what the supervisor needs from init while it lives: its namespaces (for
    :func:`enter`), the scratch tmpfs with the upper layers (kept readable after teardown),
    the root of the message queue file system and the witness mount namespace (held until
    the sandbox ends; init lets go of its own copy, which the run could reach)."""
    pid = sandbox.init_pid
    for kind in NS_KINDS:
        sandbox.ns_fds[kind] = os.open(linux.ns_path(kind, pid), os.O_RDONLY | os.O_CLOEXEC)
    if witness >= 0:
        sandbox.held_fds.append(os.open(f"/proc/{pid}/fd/{witness}", os.O_RDONLY | os.O_CLOEXEC))

    def held(fd: int) -> str:
        mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        sandbox.held_fds.append(mine)
        return f"/proc/{os.getpid()}/fd/{mine}"

    root = held(scratch_fd)
    for point, rel in uppers.items():
        sandbox.upper_dirs[point] = f"{root}/{rel}"
    sandbox.upper_dir = sandbox.upper_dirs["/"]
    if mqueue is not None:
        sandbox.mqueue_dir = held(mqueue)
    sandbox.fresh_dirs = fresh_dirs(pid)


def enter(sandbox: HostSandbox, keep: set[int]) -> None:
    """In a child of the supervisor (already in the sandbox's pid namespace): enter the
    sandbox's other namespaces, and close every descriptor but ``keep`` (what the run
    inherits on purpose). Entering the mount namespace moves root and cwd to its root; the
    supervisor's other descriptors (its own namespaces, held by the host diff to go back to
    them, directories and files of the host's /proc) would lead out of the sandbox."""
    for kind in NS_KINDS:
        linux.setns(sandbox.ns_fds[kind], linux.NAMESPACES[kind][0])
    linux.close_fds_except(keep)
    os.environ[SANDBOX_ENV] = ":".join(str(linux.ns_inode(k)) for k in ("mount", "uts"))
    os.chdir("/")


def open_fds() -> set[int]:
    """The calling process's open file descriptors."""
    fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = os.listdir(fd)
    finally:
        os.close(fd)
    # os.listdir lists through a duplicate of ``fd``, closed when it returns: its number (and
    # ``fd``'s) is no open descriptor, but the next one the caller opens would take it.
    return {int(name) for name in names if _is_open(int(name))}


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def processes(sandbox: HostSandbox, scans: int = 3) -> dict[int, str]:
    """The living processes of the sandbox other than init: pid (as the sandbox numbers
    them) -> command line, from the sandbox's own /proc. "None" takes ``scans`` scans in a
    row that find none: a daemon that keeps re-forking can exit between being listed and
    being looked at, after a successor the listing had already passed. None once init has
    exited: the kernel ended every process of its pid namespace, and the pid the scan went
    by may name another process by now."""
    for _ in range(scans):
        found = _scan(f"/proc/{sandbox.init_pid}/root/proc")
        # Read by pid: valid only if init still lives after it (else none is left either).
        if sandbox.init_exited():
            return {}
        if found:
            return found
    return {}


def _scan(proc: str) -> dict[int, str]:
    try:
        names = os.listdir(proc)
    except OSError:
        return {}
    found = {}
    for name in names:
        if not name.isdigit() or name == "1":
            continue
        if not linux.process_alive(int(name), proc):
            continue  # dead, exiting (killed, say) or a zombie init has not reaped yet
        try:
            argv = linux.read_file(f"{proc}/{name}/cmdline")
        except OSError:
            continue  # gone meanwhile
        text = argv.replace(b"\0", b" ").decode(errors="replace").strip()
        if not text:
            # An empty command line: the process began exiting since it was looked at (its
            # memory is gone); one that is still alive is named by comm.
            if not linux.process_alive(int(name), proc):
                continue
            text = f"[{linux.process_name(int(name), proc) or '?'}]"
        found[int(name)] = text
    return found


def end(sandbox: HostSandbox) -> None:
    """Tear the sandbox down: end init (the kernel then kills every process of its pid
    namespace) and reap it when it is our child, close what the supervisor held, remove the
    scratch directory. Nothing it held survives: its mounts and network namespace go with
    their last process and file descriptor. An init built by the zygote is the zygote's to
    end, as soon as the supervisor is gone: the run's result does not wait for it."""
    if sandbox.own_init:
        _stop_init(sandbox.init_pid)
    for fd in [*sandbox.ns_fds.values(), *sandbox.held_fds]:
        os.close(fd)
    sandbox.ns_fds, sandbox.held_fds = {}, []
    if sandbox.init_pidfd is not None:
        os.close(sandbox.init_pidfd)
        sandbox.init_pidfd = None
    _remove_scratch(sandbox.scratch)


def _stop_init(init: int) -> None:
    """Ask init to exit (it saves its coverage data, when measured, on the way out), SIGKILL
    it if it has not within :data:`_STOP_GRACE` s, and reap it. Every child is reaped
    meanwhile: init's exit waits (zap_pid_ns_processes) until each pid of its namespace is
    freed, a zombie starter of ours included."""
    try:
        pidfd = os.pidfd_open(init)
    except OSError:
        pidfd = None
    try:
        _signal(init, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE
        killed = False
        while True:
            if _reaped(init):
                return
            if not killed and time.monotonic() >= deadline:
                _signal(init, signal.SIGKILL)
                killed = True
            if pidfd is not None:
                _exited_within(pidfd, 0.05)
            else:
                time.sleep(0.005)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def stop_built(init_pid: int, pidfd: int, signum: int = signal.SIGTERM) -> None:
    """End the init of a sandbox this process built and no supervisor of its holds any
    longer (a one-shot launcher's, :mod:`kit.run.oneshot`): ``signum`` (SIGTERM: init saves
    its coverage data, when measured), SIGKILL if it has not exited within
    :data:`_STOP_GRACE` s, then reap it (ours: its pid cannot name another process before).
    ``pidfd`` is init's, closed here."""
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signum)
        if not _exited_within(pidfd, _STOP_GRACE):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(init_pid, 0)
    finally:
        os.close(pidfd)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reaped(init: int) -> bool:
    """Reap every child that has exited; True once init is reaped (or is no child)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == init:
            return True
        if pid == 0:
            return False


def _remove_scratch(scratch: str) -> None:
    try:
        os.rmdir(scratch)
    except FileNotFoundError:
        pass


# --- in the sandbox's init ------------------------------------------------------------------


def _python_handled() -> set[signal.Signals]:
    """The signals whose handler is Python code (the interpreter's SIGINT one included)."""
    return {s for s in signal.valid_signals() if callable(signal.getsignal(s))}


def _drop_python_handlers() -> None:
    """Init runs none of its builder's signal handlers: one raises (KeyboardInterrupt) out
    of sigwaitinfo and would unwind pid 1 back into the builder's code, which then goes on
    inside the sandbox (a supervisor removing its run directory, the zygote's loop). The
    terminal's signals are ignored (until init's setsid it is in its builder's process
    group: Ctrl-C is for the builder; init dies with it by its parent death signal), every
    other one is default: from inside, the kernel drops it for pid 1; from the host, it
    ends init."""
    for signum in _python_handled():
        ignored = signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
        signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL)


def _init_main(
    scratch: str, shared: list[str], ready_fd: int, table: list[linux.Mount], builder_fd: int
) -> NoReturn:
    """Pid 1 of the sandbox: build it, report, then reap orphans until killed. It never
    returns nor raises into its builder's code, whatever happens. ``builder_fd``: a pidfd
    of its builder."""
    try:
        _drop_python_handlers()
        _init_body(scratch, shared, ready_fd, table, builder_fd)
    finally:
        os._exit(1)


def _init_body(
    scratch: str, shared: list[str], ready_fd: int, table: list[linux.Mount], builder_fd: int
) -> None:
    try:
        linux.set_parent_death_signal(signal.SIGKILL)
        # A builder that died before the signal was armed never sends it: gone, so is init
        # (else an orphan would build on, and wait for a run forever).
        if _exited(builder_fd):
            os._exit(1)
        # A session of its own: no controlling terminal of its builder's (the CLI's, whose
        # user's shell engine code in the sandbox could otherwise reach through /dev/tty).
        os.setsid()
        _close_other_fds({ready_fd, builder_fd})
        watched = {signal.SIGCHLD, signal.SIGTERM, _RELEASE_SIGNAL}
        for signum in watched:  # taken by sigwaitinfo: not ignored, whatever the builder's
            signal.signal(signum, signal.SIG_DFL)
        # What build() held for the fork, let go now that no Python handler is left.
        signal.pthread_sigmask(signal.SIG_SETMASK, watched)
        linux.unshare(linux.ns_flags(NS_KINDS))
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        linux.link_up("lo")
        items = _build_root(scratch, shared, table)
        # Again, now: a builder whose exit was under way at the first look (it reads its
        # children's death signals before its pidfd reports it) may have read ours unset.
        # Then closed: no descriptor of a host process stays in pid 1 once a run can reach it.
        if _exited(builder_fd):
            os._exit(1)
        os.close(builder_fd)
        if priority_when_ready is not None:  # built in the background (kit.run.zygote)
            with contextlib.suppress(OSError):  # else it reaps orphans a little later
                os.setpriority(os.PRIO_PROCESS, 0, priority_when_ready)
        _confine_init()
        report = "".join(f"{point}={value}\0" for point, value in items.items())
        # A path's bytes, whatever they are; an empty item ends it (see _await_ready).
        os.write(ready_fd, os.fsencode(f"ready {report}\0"))
    except BaseException as exc:  # noqa: BLE001 the sandbox's init reports any failure
        try:
            os.write(ready_fd, os.fsencode(f"{type(exc).__name__}: {exc}"))
        finally:
            os._exit(1)
    held = [int(items[_SCRATCH_ITEM]), int(items[_MQUEUE_ITEM]), int(items[_WITNESS_ITEM])]
    held.append(ready_fd)  # the last: its end tells the supervisor init let go of the rest
    _reap_forever(held)


def _confine_init() -> None:
    """The host-global rules on init itself: no engine code runs here, but root in the
    sandbox may ptrace pid 1 and make it call anything. Refused at once, not recorded (a
    listener per filter chain: the run's is the starter's); where the filter cannot be
    installed at all, the starter's attempt records why in the ledger."""
    try:
        seccomp.install(seccomp.HOST_GLOBAL, privileged=True, notify=False)
    except seccomp.Unavailable:
        pass


def _close_other_fds(keep: set[int]) -> None:
    # Every number, not SC_OPEN_MAX (the soft limit): a descriptor inherited above it would
    # stay in pid 1, reachable from the sandbox's root through /proc/1/fd.
    linux.close_fds_except({0, 1, 2, *keep})


def _reap_forever(held: list[int]) -> NoReturn:
    """Reap orphans until the supervisor, outside the pid namespace (sender pid 0 as seen
    from in here), asks init to exit. A SIGTERM from a process of the run is ignored: pid 1
    must outlive the run. Asked by the supervisor (:func:`_release`), init closes ``held``
    (the last one the report pipe, which says it is done) and its standard streams."""
    while True:
        info = signal.sigwaitinfo({signal.SIGCHLD, signal.SIGTERM, _RELEASE_SIGNAL})
        if info.si_signo == _RELEASE_SIGNAL:
            if _from_outside(info) and held:
                _let_go(held)
                held = []
            continue
        if info.si_signo == signal.SIGTERM:
            if _from_outside(info):
                os._exit(0)
            continue
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


def _from_outside(info: signal.struct_siginfo) -> bool:
    """Sent by kill(2) or pidfd_send_signal(2) (the kit's senders) from outside init's pid
    namespace. Only SI_USER is believed: rt_sigqueueinfo(2) lets a process of the sandbox
    write si_pid 0 itself, with any negative si_code (SI_QUEUE), never SI_USER."""
    return info.si_code == _SI_USER and info.si_pid == 0


def _let_go(held: list[int]) -> None:
    # The standard streams are the builder's (a log file, a pipe of the host's): the
    # sandbox's /dev/null in their place (closed, if it cannot be opened).
    try:
        null = os.open("/dev/null", os.O_RDWR)
    except OSError:
        null = -1
    for fd in (0, 1, 2):
        if null < 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        elif fd != null:
            os.dup2(null, fd)
    if null > 2:
        os.close(null)
    for fd in held:
        os.close(fd)


def _build_root(scratch: str, shared: list[str], table: list[linux.Mount]) -> dict[str, str]:
    """Build the sandbox's root and pivot into it; returns ``{mount point: path below the
    scratch tmpfs}`` of the copy-on-write upper layers, and the fds (held open by init) of
    the roots of the message queue file system and of the scratch tmpfs."""
    linux.mount("kit-sandbox", scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0700")
    scratch_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    new = os.path.join(scratch, "root")
    os.mkdir(new)
    submounts = _host_submounts(scratch, table)
    # Namespace files count as mount points where the root is built in pieces (a mount
    # under a directory keeps it from being one overlay), and are never bound.
    points = [point for point, _ in submounts] + _namespace_files(scratch, table)
    layers = _Layers(scratch, table)
    layers.copy_on_write("/", new, [*points, *RECREATED])
    recursive: list[str] = []  # bound with their submounts (see _bind)
    views: list[str] = []
    left_out: list[str] = []  # an empty read-only stand-in on each (see _stand_in_dir)
    for point, flags in submounts:
        target = new + point
        if _nearest(point, left_out) is not None:
            if point in WRITABLE:
                raise SandboxError(
                    f"the host mount {point!r} is under {_nearest(point, left_out)!r}, which "
                    "the sandbox could not reproduce (overlayfs refused it as a lower layer)"
                )
            left_out.append(point)  # nothing of the host's under the stand-in
            continue
        # Every directory mount is copy-on-write, with the host mount's flags, not a
        # read-only bind: a read-only mount does not stop connect() to a socket in it (a
        # user's session bus under /run/user/N, a daemon's under /srv), and through an
        # overlay a socket is dead. Where overlayfs refuses the mount as a lower layer, it
        # is bound read-only only if its file system holds no socket nor FIFO; else an
        # empty read-only directory stands in for it (see _Layers.view).
        beneath = _nearest(point, [*recursive, *layers.bound]) is None
        if point in WRITABLE or (beneath and os.path.isdir(point)):
            if layers.view(point, target, points, flags, required=point in WRITABLE):
                views.append(point)
                continue
            if not _channel_free(point, table):
                _stand_in_dir(point, target)
                left_out.append(point)
                continue
        # A device node bound on a file is still the host's device through a read-only
        # mount (a write to /dev/full on /mnt/full reached it): nodev on its mount.
        flags |= linux.MS_RDONLY | _nodev(point)
        if _is_channel(point):
            # A socket or FIFO bound on a file: what it covers stays, dead. In a user
            # namespace that is not the initial one, a bind of a directory over it brought
            # it along, locked: a stand-in of the sandbox's own is mounted over it.
            if _nearest(point, [*recursive, *views, *layers.bound]) in [
                *recursive,
                *layers.bound,
            ]:
                _cover_channel(point, target, layers.state())
        elif _nearest(point, [*recursive, *views]) in recursive:
            _remount(target, flags)  # came with that bind, still on top
        elif _nearest(point, [*views, *layers.bound]) in layers.bound:
            continue  # came with a directory of the skeleton bound whole, read-only
        elif _bind(point, target, flags):
            recursive.append(point)
            _read_only_below(target)
    _make_proc(new)
    _make_sys(new)
    items = {point: os.path.relpath(upper, scratch) for point, upper in layers.uppers.items()}
    items[_MQUEUE_ITEM] = str(_make_dev(new))
    items[_SCRATCH_ITEM] = str(scratch_fd)
    items.update((point, "") for point in left_out)  # no upper layer: not reproduced
    for path in shared:
        _bind_shared(path, new + path, table)
    os.chdir(new)
    linux.pivot_root(".", ".")
    linux.umount(".", linux.MNT_DETACH)  # the old root, stacked under the new one
    os.chdir("/")
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_SHARED)
    items[_WITNESS_ITEM] = str(_witness())
    return items


def _witness() -> int:
    """A mount namespace copied from the sandbox's, held open (an fd of init's, then the
    supervisor's): every shared mount of the sandbox has a peer there, as a host's mounts
    have in the namespaces of its services. A peer group with no other member is freed when
    its mount leaves it, and a mount made private and shared again got its old group number
    back: the host diff could not tell (SPEC §11: mounts and their propagation), though on
    a host its peers would receive nothing from it any more. With the witness the number
    stays taken, and the mount's new one shows."""
    pid = linux.clone(linux.CLONE_NEWNS)  # the namespace exists once clone returns
    if pid == 0:
        try:
            while True:
                signal.pause()  # until killed: its mount namespace is opened meanwhile
        finally:
            os._exit(1)
    try:
        return os.open(linux.ns_path("mount", pid), os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


#: File systems that hold no socket nor FIFO: a mount of one that overlayfs refuses as a
#: lower layer is bound read-only instead (nothing in it can reach a host process). Not
#: iso9660 (Rock Ridge) nor udf: both store FIFOs, sockets and device nodes.
CHANNEL_FREE_FS = ("vfat", "msdos", "exfat")


def _channel_free(point: str, table: list[linux.Mount]) -> bool:
    """Whether the host's topmost mount on ``point`` is of a file system with no sockets
    nor FIFOs (:data:`CHANNEL_FREE_FS`), by the mount table's file system type."""
    fstype = ""
    for mount in table:
        if mount.point == point:
            fstype = mount.fstype
    return fstype in CHANNEL_FREE_FS


def _stand_in_dir(point: str, target: str) -> None:
    """Leave the host's directory mount ``point`` out of the sandbox: an empty read-only
    tmpfs on ``target``, with the host directory's owner, mode and times. Bound read-only,
    its sockets would be connectable and its FIFOs the host's (a read-only mount stops
    neither); the run sees an empty directory, and a write there fails (EROFS)."""
    nothing = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    linux.mount("kit-left-out", target, "tmpfs", nothing, "size=4k")
    with contextlib.suppress(OSError):  # gone since the table was read: the tmpfs's own
        _same_attributes(target, os.stat(point))
    _remount(target, nothing | linux.MS_RDONLY)


def _is_channel(path: str) -> bool:
    """Whether the host's ``path`` is a socket or a FIFO (a mount of one on a file, such
    as a container's /run/docker.sock): bound, even read-only, it would still let root in
    the sandbox connect to the host's listener or write to its reader."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)


def _nodev(path: str) -> int:
    """MS_NODEV where ``path`` is a device node (mounted on a file), else 0."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return 0
    return linux.MS_NODEV if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0


def _cover_channel(point: str, target: str, state: str) -> None:
    """Mount over ``target``, where the host's socket or FIFO ``point`` came along with a
    bind of what is over it (locked: it cannot be unmounted alone), a new one of the
    sandbox's own made in ``state`` (:func:`_stand_in`: nobody listens on it), read-only;
    else the build fails, naming it."""
    try:
        os.makedirs(state)
        stand_in = os.path.join(state, "stand-in")
        if not _stand_in(stand_in, os.lstat(point)):
            raise OSError(errno.EINVAL, "no longer a socket nor a FIFO")
        linux.mount(stand_in, target, None, linux.MS_BIND)
        _remount(target, linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    except OSError as exc:
        raise SandboxError(
            f"the host's socket or FIFO mounted at {point!r} came into the sandbox with a bind "
            f"of a directory over it and could not be covered ({exc.strerror})"
        ) from None


def _bind_shared(path: str, target: str, table: list[linux.Mount]) -> None:
    """Bind the host directory ``path`` the run shares with the kit on ``target``,
    read-write."""
    try:
        _bind(path, target, 0)
    except PermissionError:
        if linux.in_initial_user_namespace():
            raise  # nothing is locked there: a real failure
        # In a user namespace that is not the initial one: the kernel will not clear the
        # locked flags (nosuid, nodev, noexec, atime) of the host mount there.
        _remount(target, _flags_at(path, table) & ~linux.MS_RDONLY)


#: A regular file up to this size in a directory of a split view's skeleton is copied into
#: it (copy-on-write like the rest); a larger one, or one that cannot be read, is bound in
#: read-only (a copy per sandbox of a swap file or a disk image is not cheap).
SKELETON_COPY_LIMIT = 256 << 10


@dataclass
class _Layers:
    """The copy-on-write mounts of a sandbox being built: their upper layers by mount point,
    their state in numbered directories of the scratch tmpfs."""

    scratch: str
    table: list[linux.Mount]
    uppers: dict[str, str] = field(default_factory=dict)
    made: int = 0
    #: Directories of a skeleton bound from the host with what is under them, read-only
    #: (:meth:`_split`: they could not be listed).
    bound: list[str] = field(default_factory=list)

    def state(self) -> str:
        self.made += 1
        return os.path.join(self.scratch, "cow", str(self.made))

    def view(self, point: str, target: str, mounts: list[str], flags: int, required: bool) -> bool:
        """:meth:`copy_on_write`; False, with nothing left mounted on ``target``, where
        overlayfs refuses the host mount ``point`` as a lower layer, or a piece of it (any
        errno of that mount(2): EINVAL for a file system with case-insensitive names such as
        vfat, or one stacked too deep already, an overlay on an overlay; EACCES from FUSE;
        EOPNOTSUPP; ELOOP), and the view is not ``required``. The caller binds it read-only
        then only where its file system holds no socket nor FIFO (:func:`_channel_free`).
        Any other failure (the scratch tmpfs full, too many open files, an I/O error while
        the host directory is copied) ends the build, naming ``point``: a mount left out
        for it would hide a broken sandbox."""
        try:
            self.copy_on_write(point, target, mounts, flags)
        except _Refused:
            if required:
                raise
            self._undo(point, target)
            return False
        except OSError as exc:
            raise SandboxError(
                f"the copy-on-write view of the host mount {point!r}: {exc}"
            ) from exc
        return True

    def _undo(self, point: str, target: str) -> None:
        """Forget what a failed view of ``point`` left: a split one may have mounted its
        skeleton and some pieces on ``target`` before a piece was refused."""
        made = [p for p in self.uppers if _under(p, (point,))]
        for path in made:
            del self.uppers[path]
        self.bound[:] = [p for p in self.bound if not _under(p, (point,))]
        if made:
            linux.umount(target, linux.MNT_DETACH)  # the skeleton, with what is on it

    def copy_on_write(self, point: str, target: str, mounts: list[str], flags: int = 0) -> None:
        """A copy-on-write view of the host directory ``point`` on ``target``, mounted with
        the per-mount ``flags`` (the host mount's: a read-only one stays read-only);
        ``mounts``: the host's mount points under it (each gets its own mount afterwards).

        One overlay whose lower layer is ``point``, as in the initial user namespace. In
        another one, the mounts the kit's mount namespace copied from its parent are locked
        (MNT_LOCKED: unmounting one would reveal what it covers), and overlayfs will not
        take a lower layer with a locked mount under it ("failed to clone lowerpath",
        EINVAL): the view is then split (:meth:`_split`). Decided by trying, not by the
        namespace alone: a kit whose mounts were made in its own user namespace (a rootless
        container's root) has none locked, and one overlay is cheaper."""
        mounts = [m for m in mounts if _below(m, point)]  # those under it
        try:
            self.uppers[point] = _overlay(point, target, self.state(), flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not mounts or linux.in_initial_user_namespace():
                raise
            self._split(point, target, mounts, flags)

    def _split(self, point: str, target: str, mounts: list[str], view_flags: int) -> None:
        """The view of ``point`` in pieces: the directories on the way to each mount point
        (and what else they hold: symlinks, small files) copied into a skeleton on the
        scratch tmpfs, with no mount under it, made copy-on-write by an overlay; on it, one
        overlay per directory with no mount point under it, its lower layer the host's
        directory. Each upper layer is reported at its own mount point: the host diff
        compares an entry of it with the same path on the host."""
        state = self.state()
        skeleton = os.path.join(state, "skeleton")
        unread: list[str] = []
        pieces, files = _mirror(point, skeleton, mounts, unread)
        self.uppers[point] = _overlay(skeleton, target, state, view_flags, host=False)
        for path in pieces:
            piece = target + _rel(path, point)
            try:
                self.uppers[path] = _overlay(path, piece, self.state(), view_flags)
            except OSError as exc:
                if exc.errno != errno.ENOENT or os.path.lexists(path):
                    raise  # not the host's directory that is missing: a real failure
                # The host removed it since _mirror listed it (a busy /var/tmp): it is not
                # there, and its directory in the skeleton stays empty, copy-on-write.
        for path in unread:  # the host's, read-only, with the mounts under it
            flags = _flags_at(path, self.table) | linux.MS_RDONLY
            if _bind(path, target + _rel(path, point), flags):
                _read_only_below(target + _rel(path, point))
            self.bound.append(path)
        for path, st in files:
            flags = _flags_at(path, self.table) | linux.MS_RDONLY
            _bind_regular_file(path, st, target + _rel(path, point), flags)


def _mirror(
    point: str, skeleton: str, mounts: list[str], unread: list[str]
) -> tuple[list[str], list[tuple[str, os.stat_result]]]:
    """Copy into ``skeleton`` the directories of ``point`` that lead to one of ``mounts``
    (mode, owner and times as the host's), with each entry they hold: a directory with no
    mount point under it (left empty: returned, to get an overlay of its own), a mount
    point (an empty directory or file, to be covered), a symlink, a small regular file, a
    new FIFO or socket of its own (:func:`_stand_in`); an empty file in place of the others:
    a larger regular file (returned with its lstat, to get the host's bound on it), a
    device. A directory on the way that cannot be listed (its owner unmapped in this user
    namespace, say) is left empty, appended to ``unread``."""
    on_path = {point}
    for mount in mounts:
        parent = os.path.dirname(mount)
        while _below(parent, point) and parent not in on_path:
            on_path.add(parent)
            parent = os.path.dirname(parent)
    covered = set(mounts)
    pieces: list[str] = []
    files: list[tuple[str, os.stat_result]] = []
    os.makedirs(skeleton)
    dirs = [(point, os.stat(point))]
    for host_dir, _ in dirs:
        try:
            listing = os.scandir(host_dir)
        except PermissionError:
            unread.append(host_dir)
            continue
        except FileNotFoundError:  # removed since its parent was listed: left empty
            continue
        with listing as entries:
            for entry in entries:
                path = entry.path
                dst = skeleton + _rel(path, point)
                try:
                    st = entry.stat(follow_symlinks=False)
                    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
                except FileNotFoundError:  # gone since the listing
                    continue
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(dst)
                    if path in on_path and path not in covered:
                        dirs.append((path, st))
                    elif path not in covered:
                        pieces.append(path)
                    _same_attributes(dst, st)
                elif stat.S_ISLNK(st.st_mode):
                    os.symlink(target, dst)
                    _same_attributes(dst, st)
                elif path in covered or not (_copied(path, dst, st) or _stand_in(dst, st)):
                    os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    if path not in covered and stat.S_ISREG(st.st_mode):
                        files.append((path, st))
    for host_dir, st in reversed(dirs):  # children first: an entry made moves its dir's mtime
        _same_attributes(skeleton + _rel(host_dir, point), st)
    return pieces, files


def _copied(path: str, dst: str, st: os.stat_result) -> bool:
    """Copy the small regular file ``path`` to ``dst``; False when it is not one or cannot
    be read (unmapped owner, say)."""
    if not stat.S_ISREG(st.st_mode) or st.st_size > SKELETON_COPY_LIMIT:
        return False
    try:
        src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        now = os.fstat(src)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):  # swapped since the listing
            return False
        data = os.read(src, SKELETON_COPY_LIMIT + 1)
    finally:
        os.close(src)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    _same_attributes(dst, st)
    return True


def _stand_in(dst: str, st: os.stat_result) -> bool:
    """Make at ``dst`` a new FIFO or socket like the host's entry ``st``; False for another
    kind. Never the host's own, bound: a read-only mount stops neither a write to a FIFO
    nor a connect() to a socket (the host's /run/docker.sock would be the engine's)."""
    if stat.S_ISFIFO(st.st_mode):
        os.mkfifo(dst, 0o600)
    elif stat.S_ISSOCK(st.st_mode):
        os.mknod(dst, stat.S_IFSOCK | 0o600)  # nobody listens on it: ECONNREFUSED
    else:
        return False
    _same_attributes(dst, st)
    return True


def _bind_regular_file(path: str, st: os.stat_result, target: str, flags: int) -> None:
    """Bind the host's regular file ``path`` on ``target`` with ``flags``, only if it is
    still the file ``st`` (its lstat when the skeleton was made): through an O_PATH fd of
    the file itself, so that nothing swapped in meanwhile (a symlink, a socket) is bound."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # gone, or a symlink now: the empty file stays
        return
    try:
        now = os.fstat(fd)
        if stat.S_ISREG(now.st_mode) and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            _bind(f"/proc/self/fd/{fd}", target, flags)
    finally:
        os.close(fd)


def _same_attributes(path: str, st: os.stat_result) -> None:
    """Give ``path`` the owner, mode and times of ``st`` (the host's entry): the host diff
    leaves out a directory copied up unchanged only when it describes it as the host's."""
    with contextlib.suppress(OSError):  # an owner this user namespace does not map
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _rel(path: str, point: str) -> str:
    """``path`` below ``point``, from its ``/``: ``/var/tmp/x`` below ``/var/tmp`` is ``/x``."""
    return path[len(point.rstrip("/")) :]


def _below(path: str, point: str) -> bool:
    """Whether ``path`` is strictly below ``point``."""
    return path != point and _under(path, (point,))


def _nearest(path: str, points: list[str]) -> str | None:
    """The nearest of ``points`` at or over ``path``."""
    return max((p for p in points if _under(path, (p,))), key=len, default=None)


def _flags_at(path: str, table: list[linux.Mount]) -> int:
    """The per-mount flags of the host mount that holds ``path`` (the topmost one on the
    nearest mount point over it)."""
    best, flags = "", 0
    for mount in table:
        if _under(path, (mount.point,)) and len(mount.point) >= len(best):
            best, flags = mount.point, mount.flags
    return flags


class _Refused(OSError):
    """The overlay mount(2) of a host directory as a lower layer failed (its errno)."""


def _overlay(lower: str, target: str, state: str, flags: int = 0, host: bool = True) -> str:
    """Mount a copy-on-write view of ``lower`` on ``target`` with the per-mount ``flags``;
    returns its upper layer. ``host``: ``lower`` is the host's, whose refusal by overlayfs
    raises :class:`_Refused` (not a skeleton of the scratch's)."""
    upper, work = os.path.join(state, "upper"), os.path.join(state, "work")
    os.makedirs(upper)
    os.makedirs(work)
    # The overlay's root shows its upper directory's owner, mode and times: the lower's, as
    # on the host (a split /tmp stays 1777, /root 0700); the host diff compares them.
    _same_attributes(upper, os.stat(lower))
    options = f"lowerdir={_escape(lower)},upperdir={_escape(upper)},workdir={_escape(work)}"
    try:
        _mount_overlay(target, flags, options)
    except OSError as exc:
        if not host:
            raise
        raise _Refused(exc.errno, exc.strerror, lower) from exc
    return upper


def _mount_overlay(target: str, flags: int, options: str) -> None:
    global _userxattr
    if not _userxattr:
        try:
            linux.mount("kit-sandbox", target, "overlay", flags, options)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    # Launched in a user namespace that is not the initial one: no trusted.* xattrs.
    linux.mount("kit-sandbox", target, "overlay", flags, options + ",userxattr")
    _userxattr = True  # for the next overlays of this build (init is a fresh fork each time)


#: Whether an overlay of this process needed ``userxattr`` (the others will).
_userxattr = False


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _host_submounts(scratch: str, table: list[linux.Mount]) -> list[tuple[str, int]]:
    """The host's mounts to reproduce (``table``: :func:`host_mount_table`), topmost per
    mount point, parents first: every one but ``/``, those under :data:`RECREATED`, the
    sandbox's own, and namespace files (:func:`_namespace_files`)."""
    top: dict[str, int] = {}
    for mount in _reproducible(scratch, table):
        top.pop(mount.point, None)  # a later mount at the same point hides the earlier one
        top[mount.point] = mount.flags
    for point in _namespace_files(scratch, table):
        top.pop(point, None)
    return list(top.items())


def _namespace_files(scratch: str, table: list[linux.Mount]) -> list[str]:
    """Where the host has a namespace file mounted, topmost there (``ip netns add`` leaves
    one under /run/netns, container runtimes keep theirs under /run): bound into the
    sandbox, it would let root there setns into a host namespace. Each is left as the empty
    file the host's file system has under it."""
    top: dict[str, str] = {}
    for mount in _reproducible(scratch, table):
        top[mount.point] = mount.fstype
    return [point for point, fstype in top.items() if fstype == NAMESPACE_FS]


def _reproducible(scratch: str, table: list[linux.Mount]) -> list[linux.Mount]:
    return [
        m
        for m in table
        if m.point != "/" and not _under(m.point, RECREATED) and not _under(m.point, (scratch,))
    ]


#: (pid, an fd of its /proc/self/mountinfo, the table read): what :func:`host_mount_table`
#: read last in this process. Dropped in a forked child (its fd may be closed, its mount
#: namespace another); the pid is checked too, for a child forked around the hook.
_table_cache: tuple[int, int, list[linux.Mount]] | None = None


def _forget_table() -> None:
    global _table_cache
    _table_cache = None


os.register_at_fork(after_in_child=_forget_table)


def host_mount_table() -> list[linux.Mount]:
    """``linux.mount_table()`` of the calling process, read again only when the kernel says
    it changed: a poller of mountinfo wakes for every mount, unmount and remount (not for a
    change of propagation, which the table does not hold). The zygote builds a sandbox per
    run; its mount table, the host's, seldom changes."""
    global _table_cache
    if _table_cache is not None and _table_cache[0] == os.getpid():
        _, fd, table = _table_cache
        if not linux.mount_table_changed(fd):
            return table
        try:
            os.fstat(fd)
        except OSError:  # closed behind our back: open another
            fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    else:
        fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    linux.mount_table_changed(fd)  # cleared before the read: a change after it is seen next time
    table = linux.mount_table()
    _table_cache = (os.getpid(), fd, table)
    return table


def _under(path: str, roots: tuple[str, ...] | list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _bind(source: str, target: str, flags: int) -> bool:
    """Bind ``source`` on ``target`` (one mount, not its submounts), then apply the
    per-mount ``flags`` (MS_RDONLY, MS_NOSUID…) by a bind remount. True when the submounts
    came too: in a user namespace that is not the initial one, the kernel refuses to bind a
    mount alone when a locked mount is under it (EINVAL: that would reveal what it covers),
    so it is bound with them (each is then remounted by the caller, :func:`_remount`)."""
    recursive = False
    try:
        linux.mount(source, target, None, linux.MS_BIND)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # the mount point is hidden or gone: nothing to show
            return False
        if exc.errno != errno.EINVAL or linux.in_initial_user_namespace():
            raise
        linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
        recursive = True
    _remount(target, flags)
    return recursive


def _read_only_below(target: str) -> None:
    """Remount read-only every mount below ``target`` (as this process's mount table has
    them), which a recursive bind brought with their host flags: a writable one there (the
    host's /var/tmp under /var) would be the real one once the run unmounted the view
    stacked on it."""
    for mount in linux.mount_table():
        point = mount.point
        if not _below(point, target):
            continue
        if mount.fstype == NAMESPACE_FS:
            _leave_out(point, target)
            continue
        try:
            _remount(point, mount.flags | linux.MS_RDONLY | _nodev(point))
        except OSError as exc:
            # Gone under a mount over its parent, or in a directory no one here may enter
            # (EACCES; not EPERM, a remount refused).
            if exc.errno not in (errno.ENOENT, errno.EACCES):
                raise


def _leave_out(point: str, target: str) -> None:
    """Unmount a host namespace file that a recursive bind on ``target`` brought; a locked
    one (a user namespace that is not the initial one cannot unmount it alone) ends the
    build: a sandbox with a way into a host namespace is no sandbox."""
    try:
        linux.umount(point, linux.MNT_DETACH)
    except OSError as exc:
        raise SandboxError(
            f"a host namespace file is mounted at {point!r} under {target!r} and cannot be "
            f"left out of the sandbox ({exc.strerror}): unmount it on the host, or launch the "
            "kit where it is not locked (the initial user namespace)"
        ) from None


def _remount(target: str, flags: int) -> None:
    """Set the per-mount ``flags`` of the mount on ``target`` (a bind remount: the flags it
    is not given are cleared, and where the kernel locked one, refused: ``flags`` are the
    host's plus MS_RDONLY, which may always be added)."""
    linux.mount(None, target, None, linux.MS_BIND | linux.MS_REMOUNT | flags)


def _make_proc(new: str) -> None:
    proc = new + "/proc"
    nosuid_noexec = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    linux.mount("proc", proc, "proc", nosuid_noexec)
    bound = [f"{proc}/{name}" for name in PROC_READ_ONLY if os.path.exists(f"{proc}/{name}")]
    for path in bound:
        linux.mount(path, path, None, linux.MS_BIND)
    net = proc + "/sys/net"
    linux.mount(net, net, None, linux.MS_BIND)  # stays rw: per network namespace
    for path in bound:
        linux.mount(
            None, path, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | nosuid_noexec
        )


def _make_sys(new: str) -> None:
    linux.mount(
        "sysfs",
        new + "/sys",
        "sysfs",
        linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
    )


def _make_dev(new: str) -> int:
    """A tmpfs /dev as a container runtime makes it; returns an fd of its ``mqueue``'s root
    (a run may unmount it: the file system of the ipc namespace stays, with its queues).
    Beneath it, hidden, a proc and a sysfs with nothing mounted over any of their
    directories: the kernel lets a user namespace mount proc or sysfs only when such a fully
    visible one exists in its mount namespace (``mount_too_revealing``), and the sandbox's
    own /proc has read-only binds over /proc/sys and friends. On the host, /proc is fully
    visible: so it must stay here for the user-namespace flows."""
    dev = new + "/dev"
    flags = linux.MS_NOSUID | linux.MS_NOEXEC
    linux.mount("kit-sandbox", dev, "tmpfs", flags, "mode=0755,size=64k")
    for name, fstype in (("proc", "proc"), ("sys", "sysfs")):
        os.mkdir(f"{dev}/{name}")
        linux.mount(fstype, f"{dev}/{name}", fstype, 0)
    linux.mount("tmpfs", dev, "tmpfs", flags, "mode=0755,size=64k")  # covers them
    for name in DEVICES:  # made, not bound: a mount less each to copy and to tear down
        try:
            rdev = os.stat(f"/dev/{name}").st_rdev
        except FileNotFoundError:
            continue
        try:
            os.mknod(f"{dev}/{name}", stat.S_IFCHR | 0o666, rdev)
            os.chmod(f"{dev}/{name}", 0o666)  # mknod applies the umask
        except PermissionError:  # in a user namespace that is not the initial one
            open(f"{dev}/{name}", "w").close()
            linux.mount(f"/dev/{name}", f"{dev}/{name}", None, linux.MS_BIND)
    os.mkdir(f"{dev}/pts")
    linux.mount(
        "devpts",
        f"{dev}/pts",
        "devpts",
        linux.MS_NOSUID | linux.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.mkdir(f"{dev}/shm")
    linux.mount(
        "shm",
        f"{dev}/shm",
        "tmpfs",
        linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
        "mode=1777",
    )
    os.mkdir(f"{dev}/mqueue")
    linux.mount(
        "mqueue", f"{dev}/mqueue", "mqueue", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    )
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{dev}/{name}")
    return os.open(f"{dev}/mqueue", os.O_RDONLY | os.O_DIRECTORY)
