"""Raw kernel access: the only module of the kit that calls ctypes."""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import re
import resource
import select
import signal
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import NamedTuple

# Every function here is a thin, typed wrapper over one system call or one /proc file, raising
# OSError with the errno the kernel returned; policy (what to call, in which order, with which
# values) lives in the callers, kit.system and kit.starter. Python 3.11 has no os.unshare or
# os.setns and no capability calls, hence ctypes.
_libc = ctypes.CDLL(None, use_errno=True)
# Looked up now, in the zygote, not by each process it forks at its first call: there the
# lookup (a dlsym, and the pages it writes) cost 15-150 us a function (a sandbox's init
# looked up mount and umount2 at every build).
_LIBC_FUNCTIONS = (
    "capget",
    "capset",
    "fstatfs",
    "mount",
    "prctl",
    "setns",
    "sigaction",
    "syscall",
    "umount2",
    "unshare",
)
for _function in _LIBC_FUNCTIONS:
    with contextlib.suppress(AttributeError):  # a libc without it: the call says so
        getattr(_libc, _function)
# PyDLL keeps the GIL across the call: required for clone, whose child resumes in the
# interpreter and must find the GIL held by its only thread.
_pylibc = ctypes.PyDLL(None, use_errno=True)
_pylibc.syscall  # noqa: B018 looked up now, as above

# What platform.machine() answers, without importing platform (1 ms of a one-shot run).
_MACHINE = os.uname().machine
_SYSCALLS = {
    # name: (x86_64, aarch64)
    "clone": (56, 220),
    "pivot_root": (155, 41),
    "setresuid": (117, 147),
    "setresgid": (119, 149),
    "setfsuid": (122, 151),
    "capget": (125, 90),
    "capset": (126, 91),
    "setgroups": (116, 159),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "open_tree": (428, 428),
    "seccomp": (317, 277),
    "keyctl": (250, 219),
    "close_range": (436, 436),
}


def _nr(name: str) -> int:
    x86, arm = _SYSCALLS[name]
    if _MACHINE in ("x86_64", "AMD64"):
        return x86
    if _MACHINE in ("aarch64", "arm64"):
        return arm
    raise OSError(f"kit.system.linux: unsupported architecture {_MACHINE!r}")


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


# --- namespaces -------------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_FS = 0x00000200

#: Namespace kind (the kit's name) -> (clone flag, name under /proc/PID/ns).
NAMESPACES: dict[str, tuple[int, str]] = {
    "user": (CLONE_NEWUSER, "user"),
    "pid": (CLONE_NEWPID, "pid"),
    "net": (CLONE_NEWNET, "net"),
    "uts": (CLONE_NEWUTS, "uts"),
    "ipc": (CLONE_NEWIPC, "ipc"),
    "cgroup": (CLONE_NEWCGROUP, "cgroup"),
    "mount": (CLONE_NEWNS, "mnt"),
}


def ns_flags(kinds: Iterable[str]) -> int:
    """Clone flags for namespace kinds (names from :data:`NAMESPACES`)."""
    flags = 0
    for kind in kinds:
        flags |= NAMESPACES[kind][0]
    return flags


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns(fd {fd}, {nstype:#x})")


def clone(flags: int) -> int:
    """fork(2) with extra clone flags; returns 0 in the child, the child's pid in the parent.

    Only safe in a single-threaded process (the starter): the child resumes in the interpreter.
    """
    before = ctypes.pythonapi.PyOS_BeforeFork
    after_child = ctypes.pythonapi.PyOS_AfterFork_Child
    after_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
    syscall = _pylibc.syscall
    syscall.restype = ctypes.c_long
    before()
    pid = syscall(
        ctypes.c_long(_nr("clone")),
        ctypes.c_ulong(flags | signal.SIGCHLD),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
    )
    if pid == 0:
        after_child()
        return 0
    err = ctypes.get_errno()
    after_parent()
    if pid < 0:
        raise OSError(err, f"clone({flags:#x}): {os.strerror(err)}")
    return int(pid)


def ns_inode(kind: str, pid: int | str = "self") -> int:
    """Inode number identifying the namespace of ``kind`` that ``pid`` is in."""
    return os.stat(f"/proc/{pid}/ns/{NAMESPACES[kind][1]}").st_ino


#: The inode the kernel gives its initial user namespace (``PROC_USER_INIT_INO``): a hint,
#: not a proof (what /proc shows is up to whoever mounted it).
INITIAL_USERNS_INO = 0xEFFFFFFD


def userns_identity(pid: int | str = "self") -> tuple[int, int]:
    """(device, inode) of the user namespace ``pid`` is in: a namespace's identity, which
    no map content can imitate (``SPEC.md`` §4)."""
    st = os.stat(f"/proc/{pid}/ns/user")
    return st.st_dev, st.st_ino


def ns_inodes(directory: str = "/proc/self/ns") -> dict[str, int | None]:
    """Inode number of every namespace (by kind) of a ``/proc/…/ns`` directory, None for a
    link that cannot be read. Reads the links' targets (``net:[4026531840]``), cheaper than
    following them."""
    out: dict[str, int | None] = dict.fromkeys(NAMESPACES)
    try:
        # O_PATH: the directory may be searchable only (0511, owned by root when the process
        # is not dumpable).
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return out
    try:
        for kind, (_, name) in NAMESPACES.items():
            try:
                target = os.readlink(name, dir_fd=fd)
                out[kind] = int(target[target.index("[") + 1 : target.rindex("]")])
            except (OSError, ValueError):
                pass
    finally:
        os.close(fd)
    return out


#: The inode number of the initial user namespace (PROC_USER_INIT_INO), the same everywhere.
INITIAL_USER_NS_INODE = 0xEFFFFFFD


def in_initial_user_namespace() -> bool:
    return ns_inode("user") == INITIAL_USER_NS_INODE


def ns_path(kind: str, pid: int | str = "self") -> str:
    return f"/proc/{pid}/ns/{NAMESPACES[kind][1]}"


def write_id_maps(
    pid: int | str,
    uid_lines: list[tuple[int, int, int]],
    gid_lines: list[tuple[int, int, int]],
    deny_setgroups: bool,
) -> None:
    """Write ``/proc/PID/{setgroups,gid_map,uid_map}`` (each map in a single write)."""
    if deny_setgroups:
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
    for name, lines in (("gid_map", gid_lines), ("uid_map", uid_lines)):
        text = "".join(f"{inside} {outside} {count}\n" for inside, outside, count in lines)
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


# --- mounts and filesystem ----------------------------------------------------------------

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MNT_DETACH = 0x2

#: Mount flag names accepted by the kit's system interface.
MOUNT_FLAGS: dict[str, int] = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "remount": MS_REMOUNT,
    "bind": MS_BIND,
    "move": MS_MOVE,
    "rec": MS_REC,
    "unbindable": MS_UNBINDABLE,
    "private": MS_PRIVATE,
    "slave": MS_SLAVE,
    "shared": MS_SHARED,
}


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    def b(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    _check(
        _libc.mount(b(source), b(target), b(fstype), ctypes.c_ulong(flags), b(data)),
        f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x})",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), f"umount2({target!r})")


FSCONFIG_CMD_CREATE = 6
FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1


def detached_mount(fstype: str) -> int:
    """A new ``fstype`` file system as a mount attached nowhere (fsopen, fsmount): an fd of
    its root. Its namespace-bound state (mqueue's ipc namespace) is the calling thread's; no
    mount table changes. Needs CAP_SYS_ADMIN in the caller's mount namespace's owner."""
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    fs = _check(
        syscall(
            ctypes.c_long(_nr("fsopen")),
            ctypes.c_char_p(fstype.encode()),
            ctypes.c_uint(FSOPEN_CLOEXEC),
        ),
        f"fsopen({fstype})",
    )
    try:
        _check(
            syscall(
                ctypes.c_long(_nr("fsconfig")),
                ctypes.c_int(fs),
                ctypes.c_uint(FSCONFIG_CMD_CREATE),
                ctypes.c_void_p(0),
                ctypes.c_void_p(0),
                ctypes.c_int(0),
            ),
            f"fsconfig({fstype}, create)",
        )
        mnt = _check(
            syscall(
                ctypes.c_long(_nr("fsmount")),
                ctypes.c_int(fs),
                ctypes.c_uint(FSMOUNT_CLOEXEC),
                ctypes.c_uint(0),
            ),
            f"fsmount({fstype})",
        )
    finally:
        os.close(fs)
    try:
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=mnt)
    finally:
        os.close(mnt)


OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC


def clone_mount(path: str) -> int:
    """A detached copy of the mount at ``path`` alone, without its submounts (open_tree with
    OPEN_TREE_CLONE): an fd of its root, the file system as a bind of it would show it.
    Needs CAP_SYS_ADMIN in the caller's mount namespace's owner."""
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    return _check(
        syscall(
            ctypes.c_long(_nr("open_tree")),
            ctypes.c_int(-100),
            ctypes.c_char_p(os.fsencode(path)),
            ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
        ),
        f"open_tree({path!r}, clone)",
    )


def pivot_root(new_root: str, put_old: str) -> None:
    _check(
        _libc.syscall(
            ctypes.c_long(_nr("pivot_root")), os.fsencode(new_root), os.fsencode(put_old)
        ),
        f"pivot_root({new_root!r}, {put_old!r})",
    )


def setdomainname(name: str) -> None:
    """Set the NIS domain name of the calling process's uts namespace."""
    raw = name.encode()
    _check(_libc.setdomainname(raw, ctypes.c_size_t(len(raw))), f"setdomainname({name!r})")


def getdomainname() -> str:
    """The NIS domain name of the calling process's uts namespace (``(none)`` when unset)."""
    return read_file("/proc/sys/kernel/domainname").decode().strip()


def propagation_type(optional_fields: Iterable[str]) -> str:
    """The propagation type that the optional fields of a mountinfo line describe: shared,
    slave, unbindable or private (a mount that is shared and a slave counts as shared)."""
    kind = "private"
    for tag in optional_fields:
        if tag.startswith("shared:"):
            return "shared"
        if tag.startswith("master:"):
            kind = "slave"
        elif tag == "unbindable":
            kind = "unbindable"
    return kind


def mount_propagation(target: str = "/") -> str | None:
    """The propagation type of the topmost mount at ``target`` in the calling process's
    mount namespace (``/proc/self/mountinfo``); None when nothing is mounted there."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 6 and "-" in fields and unescape_mountinfo(fields[4]) == target:
                found = propagation_type(fields[6 : fields.index("-")])
    return found


def fd_base() -> int:
    """Where the kit's own descriptors in engine processes go (the master's poll loop, the
    ledger socket): high, three quarters up to the soft limit (768 at the usual 1024), so
    that engine code closing low numbers (its own, or a range of them) does not hit the
    kit's; a loss noticed all the same is a fatal error."""
    return fd_base_for(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def fd_base_for(soft: int) -> int:
    """:func:`fd_base` of a process whose soft RLIMIT_NOFILE is ``soft``."""
    if soft == resource.RLIM_INFINITY:
        soft = 1024
    return max(3, min(soft, 1024) * 3 // 4)


def nofile_soft(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of process ``pid`` (``/proc/PID/limits``); None when gone."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line[len("Max open files") :].split()[0]
                    return resource.RLIM_INFINITY if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        return None
    return None


def fd_target(pid: int, fd: int) -> str | None:
    """What descriptor ``fd`` of process ``pid`` refers to (its ``/proc`` link: a path,
    ``socket:[INODE]``…); None when it is not open or not ours to read."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def dup_high(fd: int, base: int) -> int:
    """A close-on-exec duplicate of ``fd`` at the lowest free number from ``base``, or
    anywhere when nothing is free up there."""
    try:
        high: int = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
    except OSError:
        high = os.dup(fd)
        os.set_inheritable(high, False)
    return high


def move_high(fd: int, base: int) -> int:
    """``fd`` moved up (see :func:`dup_high`); unmoved when it cannot be duplicated."""
    try:
        high = dup_high(fd, base)
    except OSError:
        return fd
    os.close(fd)
    return high


#: The most descriptors one SCM_RIGHTS message may carry (the kernel's SCM_MAX_FD).
SCM_MAX_FD = 253


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send ``fds`` over a blocking stream socket (SCM_RIGHTS, in order, each message of at
    most :data:`SCM_MAX_FD` riding on one NUL byte), then ``data``; :func:`recv_with_fds`
    reads both."""
    for first in range(0, len(fds), SCM_MAX_FD):
        chunk = array.array("i", fds[first : first + SCM_MAX_FD]).tobytes()
        sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, chunk)])
    sock.sendall(data)


def recv_with_fds(
    sock: socket.socket, max_fds: int, peer: tuple[int, int] | None = None
) -> tuple[bytes, list[int]]:
    """What :func:`send_with_fds` sent, read until EOF: the data (the NUL bytes the
    descriptors rode on dropped: the data must not start with one) and the descriptors, in
    order, close-on-exec, the caller's to close. ValueError, every descriptor received
    closed, when more than ``max_fds`` came, the kernel dropped some (MSG_CTRUNC: the
    descriptor table was full), or one is ``peer`` (the :func:`fd_identity` of the sending
    end: held here, it would keep the EOF from ever coming)."""
    chunks: list[bytes] = []
    fds: list[int] = []
    space = socket.CMSG_SPACE(SCM_MAX_FD * 4)
    try:
        while True:
            data, ancdata, flags, _ = sock.recvmsg(1 << 16, space, socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if flags & socket.MSG_CTRUNC:
                raise ValueError("descriptors were dropped on the way (MSG_CTRUNC)")
            if len(fds) > max_fds:
                raise ValueError(f"more than {max_fds} descriptors came")
            if peer is not None and any(fd_identity(fd) == peer for fd in fds):
                raise ValueError("the sending end itself came as a descriptor")
            if not data:
                return b"".join(chunks).lstrip(b"\0"), fds
            chunks.append(data)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def grow_fd_table(count: int) -> None:
    """Make room now in this process's descriptor table for ``count`` more descriptors
    above the highest open one (up to the soft limit); nothing is left open. The kernel
    grows the table when an open needs it, and while a second thread shares it every growth
    waits for an RCU grace period (expand_fdtable: several ms each, ~30 ms for a first
    500 descriptors opened by a thread): a caller that is still single-threaded grows it at
    no such cost, before it starts the thread that opens them."""
    if count <= 0:
        return
    # Any failure (EMFILE near the limit) leaves the table as it is: the opens say the rest.
    with contextlib.suppress(OSError):
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            want = max(int(n) for n in os.listdir("/proc/self/fd")) + count
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft != resource.RLIM_INFINITY:
                want = min(want, soft - 1)
            os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, want))
        finally:
            os.close(fd)


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every descriptor but ``keep``: every number up to 2**32 - 1, not the soft
    limit (a descriptor inherited above it would stay open), by close_range(2) per gap.
    Where the kernel has no close_range or a seccomp filter refuses it (ENOSYS, EPERM, or
    whatever errno a profile chose: any but EBADF and EINVAL, which say the call itself was
    wrong), each descriptor /proc/self/fd lists; OSError if that cannot be read either, or
    is not procfs. Not os.closerange: on such a failure it calls close() on every number of
    the range, 2**31 of them (minutes)."""
    kept = sorted(set(keep))
    try:
        low = 0
        for fd in kept:
            if fd > low:
                _close_range(low, fd - 1)
            low = max(low, fd + 1)
        _close_range(low, 2**32 - 1)
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.EINVAL):
            raise
        _close_listed(set(kept), exc.strerror or "")


def _close_range(first: int, last: int) -> None:
    """close_range(2) of ``first``..``last`` (unsigned: 2**32 - 1 is every number)."""
    result = _libc.syscall(
        ctypes.c_long(_nr("close_range")), ctypes.c_uint(first), ctypes.c_uint(last), 0
    )
    _check(result, "close_range")


def _close_listed(keep: set[int], why: str) -> None:
    """Close each descriptor /proc/self/fd lists but ``keep`` (the caller is single-threaded:
    nothing opens one meanwhile); raise OSError naming ``why`` close_range failed when the
    listing cannot be read, or is not procfs's (a file system mounted over /proc would
    list made-up names): guessing numbers would leave some open."""
    listing = -1
    try:
        listing = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if _fs_type(listing) != PROC_SUPER_MAGIC:
            raise OSError(errno.ENOTSUP, "not procfs")
        names = os.listdir(listing)
        fds = [int(name) for name in names if name.isascii() and name.isdigit()]
        if len(fds) != len(names):
            raise OSError(errno.ENOTSUP, "a name that is no descriptor number")
    except OSError as exc:
        if listing >= 0:
            os.close(listing)
        raise OSError(
            exc.errno,
            f"cannot close the inherited descriptors: close_range failed ({why}) and "
            f"/proc/self/fd cannot be listed ({exc.strerror})",
        ) from None
    for fd in fds:
        if fd not in keep and fd != listing:
            with contextlib.suppress(OSError):  # EIO, EINTR: Linux has released it anyway
                os.close(fd)
    os.close(listing)  # a number kept but not open may be its own: closed all the same


#: statfs(2) f_type of procfs.
PROC_SUPER_MAGIC = 0x9FA0


def _fs_type(fd: int) -> int:
    """fstatfs(2) f_type of the file system of ``fd``: the first field of struct statfs,
    a long (the struct is 120 bytes on 64-bit Linux, 84 or 88 on 32-bit: 128 suffice)."""
    buf = ctypes.create_string_buffer(128)
    _check(_libc.fstatfs(fd, buf), "fstatfs")
    return ctypes.c_long.from_buffer(buf).value


def holds(identity: tuple[int, int] | None) -> bool | None:
    """Whether any descriptor of the calling process refers to what ``identity`` names
    (see :func:`fd_identity`); None when its descriptors cannot be listed (no /proc)."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return None
    return identity is not None and any(fd_identity(fd) == identity for fd in fds)


def fd_identity(fd: int) -> tuple[int, int] | None:
    """(device, inode) of what descriptor ``fd`` refers to; None when it is not open. (All
    anonymous-inode descriptors of a kind may share one: an identity tells a file, a pipe
    or a socket from another, not one signalfd from another.)"""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def path_identity(path: str = "/") -> str | None:
    """``"DEV:INO"`` of ``path`` (of the calling process's root directory by default); None
    when it cannot be reached."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def unescape_mountinfo(field: str) -> str:
    """A mountinfo path field with its octal escapes (``\\040`` for a space…) decoded."""
    if "\\" not in field:
        return field  # the common case: no regex (compiled anew in each forked process)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


#: Per-mount flags as mountinfo's fifth column names them (for a bind remount).
MOUNTINFO_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": 0x400,
    "nodiratime": 0x800,
    "relatime": 0x200000,
    "strictatime": 0x1000000,
}


class Mount(NamedTuple):
    """One line of mountinfo: what the kit compares and reproduces of a mount."""

    mount_id: int
    point: str
    #: MS_* per-mount flags.
    flags: int
    fstype: str


def mount_table(pid: int | str = "self") -> list[Mount]:
    """Every mount of ``pid``'s mount namespace, in mountinfo order (a parent before its
    children)."""
    table = []
    for line in read_file(f"/proc/{pid}/mountinfo").decode(errors="surrogateescape").splitlines():
        fields = line.split()
        flags = 0
        for name in fields[5].split(","):
            flags |= MOUNTINFO_FLAGS.get(name, 0)
        # The optional fields end at " - ", then the file system type.
        fstype = fields[fields.index("-", 6) + 1]
        table.append(Mount(int(fields[0]), unescape_mountinfo(fields[4]), flags, fstype))
    return table


# --- credentials and capabilities ---------------------------------------------------------


def thread_setresuid(ruid: int, euid: int, suid: int) -> None:
    """setresuid for the calling thread only (glibc's wrapper changes every thread)."""
    _check(
        _libc.syscall(
            ctypes.c_long(_nr("setresuid")),
            ctypes.c_int(ruid),
            ctypes.c_int(euid),
            ctypes.c_int(suid),
        ),
        "setresuid (thread)",
    )


def thread_setfsuid(fsuid: int) -> int:
    """setfsuid for the calling thread; returns the previous fs uid (the call reports no
    error: compare with what it returns)."""
    return int(_libc.syscall(ctypes.c_long(_nr("setfsuid")), ctypes.c_int(fsuid)))


#: Capability names by number (linux/capability.h), CAP_LAST_CAP = 40.
CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
CAP_NUMBERS = {name: i for i, name in enumerate(CAPABILITIES)}
_CAP_V3 = 0x20080522


@functools.cache
def cap_last() -> int:
    """The highest capability number this kernel knows: read once (it never changes while
    the kernel runs), before a process can lose its view of /proc/sys (a container's /proc
    mounted with subset=pid has none)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def caps_to_mask(names: Iterable[str]) -> int:
    mask = 0
    for name in names:
        mask |= 1 << CAP_NUMBERS[name]
    return mask


def mask_to_caps(mask: int) -> list[str]:
    return list(_caps_of(mask))


@functools.lru_cache(maxsize=256)
def _caps_of(mask: int) -> tuple[str, ...]:
    return tuple(
        CAPABILITIES[i] if i < len(CAPABILITIES) else f"CAP_{i}" for i in range(64) if mask >> i & 1
    )


def capget(tid: int = 0) -> tuple[int, int, int]:
    """(effective, permitted, inheritable) masks of a thread (0 = the calling thread)."""
    header = struct.pack("Ii", _CAP_V3, tid)
    hbuf = ctypes.create_string_buffer(header, len(header))
    dbuf = ctypes.create_string_buffer(24)
    _check(_libc.capget(hbuf, dbuf), "capget")
    e0, p0, i0, e1, p1, i1 = struct.unpack("6I", dbuf.raw)
    return e0 | e1 << 32, p0 | p1 << 32, i0 | i1 << 32


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's capability sets (the kernel's rules apply)."""
    hbuf = ctypes.create_string_buffer(struct.pack("Ii", _CAP_V3, 0), 8)
    lo, hi = 0xFFFFFFFF, 32
    data = struct.pack(
        "6I",
        effective & lo,
        permitted & lo,
        inheritable & lo,
        effective >> hi & lo,
        permitted >> hi & lo,
        inheritable >> hi & lo,
    )
    dbuf = ctypes.create_string_buffer(data, 24)
    _check(_libc.capset(hbuf, dbuf), "capset")


# --- prctl ----------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_GET_SECUREBITS = 27
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        ),
        f"prctl({option})",
    )


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def get_no_new_privs() -> bool:
    return bool(prctl(PR_GET_NO_NEW_PRIVS))


def set_dumpable(value: bool) -> None:
    prctl(PR_SET_DUMPABLE, int(value))


def get_dumpable() -> int:
    return prctl(PR_GET_DUMPABLE)


def get_securebits() -> int:
    return prctl(PR_GET_SECUREBITS)


def set_keepcaps(value: bool) -> None:
    prctl(PR_SET_KEEPCAPS, int(value))


#: keyctl(2) operation: make a new anonymous session keyring the caller's.
KEYCTL_JOIN_SESSION_KEYRING = 1


def join_new_session_keyring() -> int:
    """Leave the inherited session keyring for a new, empty one (a process keeps its
    session keyring across setresuid: the keys linked in it, a caller's credentials say,
    stay possessed). Returns the new keyring's serial."""
    return _check(
        _libc.syscall(
            ctypes.c_long(_nr("keyctl")),
            ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING),
            ctypes.c_void_p(None),
        ),
        "keyctl(KEYCTL_JOIN_SESSION_KEYRING)",
    )


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_parent_death_signal(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def bounding_has(cap: int) -> bool:
    return bool(prctl(PR_CAPBSET_READ, cap))


def bounding_drop(cap: int) -> None:
    prctl(PR_CAPBSET_DROP, cap)


def ambient_raise(cap: int) -> None:
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


def ambient_clear() -> None:
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


# --- signals -----------------------------------------------------------------------------

_SIG_IGN = 1


def signal_name(sig: int) -> str:
    """The name of signal number ``sig``: the enum's, else SIGRTMIN+n (the real-time signals
    between the two ends have no name of their own), else SIG<number>."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        pass
    if signal.SIGRTMIN < sig < signal.SIGRTMAX:
        return f"SIGRTMIN+{sig - signal.SIGRTMIN}"
    return f"SIG{sig}"


def signal_ignored(sig: int) -> bool:
    """Whether ``sig`` is ignored in this process, as the kernel has it (an engine may have
    set SIG_IGN through libc, behind the back of Python's own handler table)."""
    # struct sigaction (glibc, 64-bit) begins with the handler; the rest is room enough.
    old = ctypes.create_string_buffer(256)
    _check(_libc.sigaction(sig, None, old), "sigaction")
    return ctypes.c_void_p.from_buffer(old).value == _SIG_IGN


def signal_pending(sig: int) -> bool:
    """Whether ``sig`` is pending for this process (sent to it, or to the calling thread)
    and not yet taken: ``ShdPnd`` and ``SigPnd`` of ``/proc/thread-self/status``."""
    status = read_status("/proc/thread-self/status")
    bit = 1 << (sig - 1)
    return any(int(status.get(key, "0"), 16) & bit for key in ("ShdPnd", "SigPnd"))


# --- memory ------------------------------------------------------------------------------


def release_free_memory() -> None:
    """Return the free pages of the C heap to the kernel (glibc ``malloc_trim(0)``; a no-op
    with a C library that has none)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(ctypes.c_size_t(0))


# --- network interfaces ----------------------------------------------------------------

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16
#: struct ifreq: the interface name, then ifr_flags (a short) first in the 24-byte union.
_IFREQ_FLAGS = struct.Struct("16sH22x")


def _ifreq(ifname: str, flags: int = 0) -> bytes:
    name = os.fsencode(ifname)
    if not name or len(name) >= IFNAMSIZ or b"\0" in name or b"/" in name:
        raise OSError(errno.ENODEV, f"no network interface {ifname!r}")
    return _IFREQ_FLAGS.pack(name, flags & 0xFFFF)


def link_flags(ifname: str) -> int:
    """The ``IFF_*`` flags of a network interface of the calling thread's network namespace
    (``SIOCGIFFLAGS``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        return _link_flags(s, ifname)


def _link_flags(s: socket.socket, ifname: str) -> int:
    try:
        reply = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, _ifreq(ifname))
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise OSError(errno.ENODEV, f"no network interface {ifname!r}") from None
        raise OSError(exc.errno, f"SIOCGIFFLAGS({ifname!r}): {exc.strerror}") from None
    return int(_IFREQ_FLAGS.unpack(reply)[1])


def link_up(ifname: str) -> None:
    """Set ``IFF_UP`` on a network interface of the calling thread's network namespace
    (``SIOCGIFFLAGS`` then ``SIOCSIFFLAGS``, as ``ifconfig NAME up`` does; needs
    CAP_NET_ADMIN over the namespace). ENODEV when there is no such interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        flags = _link_flags(s, ifname)
        try:  # even when already up: the kernel checks CAP_NET_ADMIN first (EPERM)
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, _ifreq(ifname, flags | IFF_UP))
        except OSError as exc:
            raise OSError(exc.errno, f"SIOCSIFFLAGS({ifname!r}): {exc.strerror}") from None


# --- /proc ----------------------------------------------------------------------------------


def read_file(path: str) -> bytes:
    """The whole content of a (small, ``/proc``) file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_status(path: str = "/proc/self/status") -> dict[str, str]:
    """``/proc/.../status`` as a dict of raw field strings. ``Name`` is any bytes a thread
    set (``PR_SET_NAME``), so the text is decoded with replacement, never refused."""
    fields: dict[str, str] = {}
    for line in read_file(path).decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def proc_self() -> int | None:
    """The calling process's pid as the mounted ``/proc`` numbers it (None when it is not in
    that proc's pid namespace)."""
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return None


def thread_ids(pid: int | str = "self") -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def process_parents() -> dict[int, int]:
    """pid -> parent pid of every process visible in ``/proc``."""
    table: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _stat(name)
        if stat is None:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        table[int(name)] = int(stat[stat.rindex(b")") + 2 :].split()[1])
    return table


def descendants(pid: int, skip: Iterable[int] = ()) -> list[int]:
    """Every descendant of ``pid`` (not ``pid``; zombies too), parents before children,
    leaving out the processes of ``skip`` and theirs: read down its tree (:func:`children`)."""
    skipped = set(skip)
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children(queue.pop(0)):
            if child not in skipped and child not in found:
                found.append(child)
                queue.append(child)
    return found


#: Bytes of a thread's name (``comm``), its final NUL included.
_TASK_COMM_LEN = 16


def set_name(name: str) -> None:
    """Set the calling thread's name (``comm``, 15 bytes)."""
    # Always 16 bytes: each size of buffer is a ctypes type of its own, made at its first use
    # in a process (about 0.1 ms); this one is made once, by the zygote naming itself.
    buf = ctypes.create_string_buffer(name.encode()[:15], _TASK_COMM_LEN)
    prctl(PR_SET_NAME, ctypes.addressof(buf))


def get_name() -> str:
    """The calling thread's name (``comm``), from the kernel itself (no /proc needed)."""
    buf = ctypes.create_string_buffer(_TASK_COMM_LEN)
    prctl(PR_GET_NAME, ctypes.addressof(buf))
    return buf.value.decode(errors="replace")


def _stat(pid: int | str, proc: str = "/proc") -> bytes | None:
    """``/proc/PID/stat`` ("pid (comm) state ppid …"), None when the process is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            return f.read()
    except OSError:
        return None


#: ``PF_EXITING`` in a task's flags (field 9 of ``/proc/PID/stat``): it has begun to exit.
_PF_EXITING = 0x4


def thread_ending(tid: int, pid: int | str = "self") -> bool:
    """Whether thread ``tid`` of process ``pid`` (the calling one by default) has ended or
    is ending: gone from ``/proc/PID/task``, exiting (``PF_EXITING``), or a zombie."""
    stat = _stat(tid, f"/proc/{pid}/task")
    if stat is None:
        return True
    fields = stat[stat.rindex(b")") + 2 :].split()
    return fields[0] in (b"Z", b"X", b"x") or bool(int(fields[6]) & _PF_EXITING)


def thread_name(tid: int) -> str | None:
    """``comm`` of thread ``tid`` of the calling process; None when it is gone (ended since
    it was listed: a name may be empty)."""
    try:
        return read_file(f"/proc/self/task/{tid}/comm").decode(errors="replace").strip()
    except OSError:
        return None


def process_name(pid: int | str = "self", proc: str = "/proc") -> str | None:
    """``comm`` of ``pid`` (also readable for a zombie), None when it is gone; ``proc``: the
    proc file system that numbers it."""
    stat = _stat(pid, proc)
    if stat is None:
        return None
    return stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")


def wait_channel(pid: int) -> str | None:
    """The kernel function ``pid`` sleeps in (``/proc/PID/wchan``; "0" when it runs), None
    when it is gone."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_state(pid: int, proc: str = "/proc") -> str | None:
    """State letter of ``pid`` (R, S, D, Z…), None when it is gone; ``proc``: the proc
    file system that numbers it (another pid namespace's, say)."""
    stat = _stat(pid, proc)
    return None if stat is None else stat[stat.rindex(b")") + 2 :].split()[0].decode()


def mount_table_changed(mountinfo_fd: int) -> bool:
    """Whether the kernel flagged a change of the mount table behind an open mountinfo file
    since the last call (a mount, unmount or remount; not a change of propagation); True
    too when the fd is no longer open (POLLNVAL: nothing can be known through it)."""
    poller = select.poll()
    poller.register(mountinfo_fd, select.POLLPRI)
    flagged = select.POLLPRI | select.POLLERR | select.POLLNVAL
    return any(ev & flagged for _, ev in poller.poll(0))


#: ``PF_EXITING`` in the flags of ``/proc/PID/stat`` (include/linux/sched.h): set first thing
#: in ``do_exit``, long before the task turns zombie.
PF_EXITING = 0x4


def process_alive(pid: int, proc: str = "/proc") -> bool:
    """Whether ``pid`` has a thread that is neither dead, a zombie nor exiting. Not the same
    as its state letter: a killed process is ``R`` or ``D`` (with an empty command line)
    until its exit completes, and a process whose main thread exited alone shows ``Z`` while
    its other threads run on."""
    try:
        tids = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        stat = _stat(f"{pid}/task/{tid}", proc)
        if stat is None:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] not in (b"Z", b"X", b"x") and not int(fields[6]) & PF_EXITING:
            return True
    return False


def process_start(pid: int, proc: str = "/proc") -> int | None:
    """When ``pid`` started (clock ticks after boot, field 22 of ``/proc/PID/stat``): with
    the pid, it names one process for good, whatever later reuses the number. None when
    it is gone."""
    stat = _stat(pid, proc)
    if stat is None:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def proc_tid() -> int:
    """The calling thread's id as the mounted ``/proc`` numbers it (which differs from
    gettid() in a new pid namespace until a new /proc is mounted)."""
    try:
        return int(os.readlink("/proc/thread-self").rsplit("/", 1)[1])
    except (OSError, ValueError):
        return threading.get_native_id()


# --- sender credentials on unix sockets -----------------------------------------------------

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
MAX_PASSED_FDS = 4  # more with one message are cut off by the kernel (MSG_CTRUNC)


def pass_credentials(sock: socket.socket) -> None:
    """``SO_PASSCRED`` on a receiving unix socket: the kernel attaches the sender's pid, uid
    and gid (``SCM_CREDENTIALS``) to every message, translated into the receiver's pid and
    user namespaces."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)


def recv_with_sender(
    sock: socket.socket, bufsize: int, flags: int = 0
) -> tuple[bytes, int | None, list[int], bool]:
    """One message of a ``SO_PASSCRED`` socket: (data, the sender's pid as the kernel names
    it here, 0 when the sender is not visible in this pid namespace and None when no
    credentials came, the descriptors that came along (the caller's to close), truncated)."""
    data, ancdata, msg_flags, _ = sock.recvmsg(
        bufsize,
        socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(MAX_PASSED_FDS * 4),
        flags | socket.MSG_CMSG_CLOEXEC,
    )
    pid = None
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if (
            level == socket.SOL_SOCKET
            and kind == socket.SCM_CREDENTIALS
            and len(payload) >= _UCRED.size
        ):
            pid = _UCRED.unpack_from(payload)[0]
        elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += [struct.unpack_from("i", payload, 4 * i)[0] for i in range(len(payload) // 4)]
    return data, pid, fds, bool(msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))


def thread_status(pid: int, tid: int) -> tuple[int, dict[str, str]] | None:
    """(its tid as the mounted ``/proc`` numbers it, its parsed status) of the thread of
    process ``pid`` that calls itself ``tid`` (the last field of its NSpid); None when
    there is no such thread."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            status = read_status(f"/proc/{pid}/task/{task}/status")
        except OSError:
            continue
        nspid = status.get("NSpid", task).split()
        if nspid and int(nspid[-1]) == tid:
            return int(task), status
    return None


def process_ids(pid: int) -> tuple[int, list[int]] | None:
    """(parent pid, NSpid: its pid in each pid namespace from the mounted ``/proc``'s down to
    its own) of a process, from ``/proc/PID/status``; None when it is gone."""
    try:
        status = read_status(f"/proc/{pid}/status")
        return int(status["PPid"]), [int(p) for p in status["NSpid"].split()]
    except (OSError, KeyError, ValueError):
        return None


def children(pid: int) -> list[int]:
    """The children of ``pid`` (zombies too), as the mounted ``/proc`` numbers them: every
    thread's ``children`` list (a child belongs to the thread that forked it), or, on a
    kernel built without them, every process whose parent it is; empty once it is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            if os.path.exists(f"/proc/{pid}/task/{task}"):  # no CONFIG_PROC_CHILDREN
                return [p for p, parent in process_parents().items() if parent == pid]
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    return found


def socket_fds(pid: int, inode: int) -> list[int]:
    """The descriptor numbers of process ``pid`` that refer to the socket of ``inode``;
    empty when it is gone or not ours to read."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    found: list[int] = []
    for name in names:
        if fd_target(pid, int(name)) == f"socket:[{inode}]":  # None: closed meanwhile
            found.append(int(name))
    return found


def child_numbered(pid: int, number: int) -> int | None:
    """The pid (as the mounted ``/proc`` numbers it) of the child of ``pid``, zombie or not,
    that ``pid``'s pid namespace numbers ``number`` (what fork or clone returned to it); None
    when it has no such child (never had, or it was reaped). A child is in ``pid``'s pid
    namespace or below it (a new one, or one joined by path): its NSpid has an entry at the
    depth of ``pid``'s own namespace."""
    ids = process_ids(pid)
    if ids is None:
        return None
    depth = len(ids[1]) - 1
    for child in children(pid):
        found = process_ids(child)
        if found is not None and len(found[1]) > depth and found[1][depth] == number:
            return child
    return None


# --- seccomp ----------------------------------------------------------------------------------

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
AUDIT_ARCH_X86_64 = 0xC000003E
#: struct seccomp_notif (80 bytes): id, pid, flags, then struct seccomp_data (nr, arch,
#: instruction_pointer, args[6]).
_NOTIF = struct.Struct("=QIIiIQ6Q")
#: struct seccomp_notif_resp (24 bytes): id, val, error, flags.
_NOTIF_RESP = struct.Struct("=QqiI")
# _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, struct seccomp_notif_resp),
# _IOW('!', 2, __u64).
SECCOMP_IOCTL_NOTIF_RECV = 0xC0000000 | _NOTIF.size << 16 | 0x21 << 8 | 0
SECCOMP_IOCTL_NOTIF_SEND = 0xC0000000 | _NOTIF_RESP.size << 16 | 0x21 << 8 | 1
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40000000 | 8 << 16 | 0x21 << 8 | 2
_SOCK_FILTER = struct.Struct("=HBBI")


class SockFprog:
    """A classic BPF program (``(code, jt, jf, k)`` instructions) as seccomp(2) takes it: a
    ``struct sock_fprog`` and the instructions it points to. Built once (the zygote), it is
    only read by each install: packing it and making its ctypes buffers cost a process
    forked from the zygote about 0.25 ms."""

    def __init__(self, program: Iterable[tuple[int, int, int, int]]) -> None:
        raw = b"".join(_SOCK_FILTER.pack(*ins) for ins in program)
        self._instructions = ctypes.create_string_buffer(raw, len(raw))
        header = struct.pack(
            "=HxxxxxxQ", len(raw) // _SOCK_FILTER.size, ctypes.addressof(self._instructions)
        )
        self.fprog = ctypes.create_string_buffer(header, len(header))


def seccomp_install_filter(
    program: list[tuple[int, int, int, int]] | SockFprog, listener: bool
) -> int | None:
    """Load a classic BPF program (``(code, jt, jf, k)`` instructions, or built) as a
    seccomp filter on the calling thread; the listener fd (close-on-exec) when ``listener``.
    The caller needs no_new_privs or CAP_SYS_ADMIN in its user namespace (the kernel's
    rule)."""
    # Held until the call returns: its fprog points into its instructions.
    built = program if isinstance(program, SockFprog) else SockFprog(program)
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if listener else 0
    fd = _check(
        _libc.syscall(
            ctypes.c_long(_nr("seccomp")),
            ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(flags),
            built.fprog,
        ),
        "seccomp(SET_MODE_FILTER)",
    )
    return fd if listener else None


class SeccompNotif(NamedTuple):
    """A seccomp user notification: its id, the calling thread (as the receiver's pid
    namespace numbers it), the call's number, architecture and six arguments."""

    id: int
    pid: int
    nr: int
    arch: int
    args: tuple[int, ...]


#: How long a receive of a notification waits before a timer signal ends it (OSError).
NOTIF_RECV_TIMEOUT = 0.25


class _TimerFired(Exception):
    """Raised by the SIGALRM handler of :func:`seccomp_notif_recv`."""


def _timer_fired(_signum: int, _frame: object) -> None:
    # Raised, not returned: a handler that returns lets Python retry the call (PEP 475).
    raise _TimerFired


def seccomp_notif_recv(listener: int, timeout: float = NOTIF_RECV_TIMEOUT) -> SeccompNotif:
    """One pending notification (``SECCOMP_IOCTL_NOTIF_RECV``). OSError ENOENT when it went
    away (its thread was killed) before it was read, EINTR when none came in ``timeout``.

    The receive waits for a notification, and the poll that said one was there can be
    stale by then (its thread died in between): were another process still running under
    the filter, the receive would wait for that one's next filtered call, which may never
    come (a run's re-forking daemon hung its supervisor so). A timer signal ends the wait.
    Whether a notification came is told by the struct the kernel filled, whenever the
    signal's handler runs. Main thread only (the supervisor has no other)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("seccomp_notif_recv: a timer signal reaches the main thread only")
    buf = bytearray(_NOTIF.size)  # the kernel requires a zeroed struct
    error: OSError | None = None
    previous = signal.signal(signal.SIGALRM, _timer_fired)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    timer: tuple[float, float] = (0.0, 0.0)
    try:
        try:
            timer = signal.setitimer(signal.ITIMER_REAL, timeout)
            fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as exc:
            error = exc
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _TimerFired:
        pass  # before, during or just after the call: the struct says which
    finally:
        while True:  # a handler that fires now raises here: again until restored
            try:
                signal.signal(signal.SIGALRM, previous)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                if timer[0] > 0:  # a timer of the caller's, set again (less the wait)
                    signal.setitimer(signal.ITIMER_REAL, max(timer[0] - timeout, 1e-3), timer[1])
                break
            except _TimerFired:
                continue
    if not any(buf):
        raise error or OSError(errno.EINTR, "no seccomp notification came in time")
    nid, pid, _flags, nr, arch, _ip, *args = _NOTIF.unpack(buf)
    return SeccompNotif(nid, pid, nr, arch, tuple(args))


def read_memory(pid: int, address: int, size: int) -> bytes:
    """``size`` bytes at ``address`` of process (or thread) ``pid`` (``/proc/PID/mem``; needs
    ptrace access to it); fewer at the end of a mapping."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, address)
    finally:
        os.close(fd)


def seccomp_notif_id_valid(listener: int, notif_id: int) -> bool:
    """Whether the notification is still pending (its thread still waits for the answer)."""
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", notif_id))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def seccomp_notif_send_error(listener: int, notif_id: int, err: int) -> bool:
    """Answer a notification: the system call fails with ``err``. False when the
    notification went stale (the thread was killed, or a signal interrupted the call)."""
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, _NOTIF_RESP.pack(notif_id, 0, -err, 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def seccomp_notif_send_continue(listener: int, notif_id: int) -> bool:
    """Answer a notification: the kernel runs the system call as if no filter had stopped it
    (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``). Only for a call the supervisor looks at, never
    for one it refuses: the call's memory may change between the look and the call. False
    when the notification went stale."""
    try:
        fcntl.ioctl(
            listener,
            SECCOMP_IOCTL_NOTIF_SEND,
            _NOTIF_RESP.pack(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE),
        )
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


# --- mount propagation ----------------------------------------------------------------------

#: Propagation types a mount can be given (``r…``: recursively).
PROPAGATIONS = (
    "private",
    "rprivate",
    "slave",
    "rslave",
    "shared",
    "rshared",
    "unbindable",
    "runbindable",
)


def split_propagation(propagation: str) -> tuple[str, bool]:
    """``("private", True)`` for ``rprivate``: the propagation type and whether it applies
    recursively (the ``r`` prefix). A name that is not one of :data:`PROPAGATIONS` comes back
    as it is, not recursive (mount then names it as an unknown flag)."""
    if propagation in PROPAGATIONS and propagation.startswith("r"):
        return propagation[1:], True
    return propagation, False
