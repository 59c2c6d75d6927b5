"""The host diff: a run's host sandbox read from outside before and after, and compared."""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import json
import os
import resource
import select
import signal
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kit.system import linux

try:
    # hashlib's own blake2b (it never takes OpenSSL's), without hashlib's import of OpenSSL's
    # _hashlib: 3 ms of a one-shot run, which imports this module before its fork.
    from _blake2 import blake2b
except ImportError:  # an interpreter built without it
    from hashlib import blake2b

#: Object kinds, in report order.
KINDS = (
    "file",
    "mount",
    "hostname",
    "domainname",
    "sysctl",
    "ipc_sysctl",
    "machine_sysctl",
    "link",
    "address",
    "route",
    "netns",
    "ipc",
    "mqueue",
    "process",
)

#: The kinds the sysctls are read as (``net.*`` per network namespace, the ipc ones per ipc
#: namespace, the machine's own), all reported as ``sysctl``.
SYSCTL_KINDS = frozenset({"sysctl", "ipc_sysctl", "machine_sysctl"})

#: Changes a run's ledger lists at most (the rest are counted): an engine that writes a
#: million files must not make a ledger of gigabytes.
MAX_CHANGES = 500

#: A regular file up to this size is compared by content, a larger one by size and mtime.
HASH_LIMIT = 1 << 20

_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
#: Extended attributes never compared: overlayfs's own in an upper layer (opaque, origin,
#: impure…), and the labels an LSM computes anew for a copied-up file instead of copying
#: them (SELinux, Smack, IMA, EVM discard theirs at copy-up): an untouched parent directory
#: copied up would differ. So a relabel alone is not seen.
_UNCOMPARED_XATTRS = (
    "trusted.overlay.",
    "user.overlay.",
    "security.selinux",
    "security.SMACK64",
    "security.ima",
    "security.evm",
)


class Sandbox(Protocol):
    """What the diff needs of a host sandbox (kit.run.sandbox provides it)."""

    init_pid: int  # pid 1 of the sandbox's pid namespace, as the supervisor sees it
    upper_dir: str  # a path through which the overlay's upper layer can be walked


@dataclass(frozen=True)
class HostChange:
    """One object of the host that differs: ``before``/``after`` None when it did not exist."""

    kind: str
    name: str
    before: str | None
    after: str | None

    def describe(self) -> str:
        if self.before is None:
            return f"{self.kind} {self.name} created ({self.after})"
        if self.after is None:
            return f"{self.kind} {self.name} removed (was {self.before})"
        return f"{self.kind} {self.name} changed: {self.before} -> {self.after}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "before": self.before, "after": self.after}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> HostChange:
        return cls(str(doc["kind"]), str(doc["name"]), doc.get("before"), doc.get("after"))


@dataclass
class HostState:
    """Every object of a sandbox, by kind then name, as one comparable string each.
    ``lower`` is, for each path of the upper layer and the root of each, what the real host has
    there (None: nothing);
    ``errors`` what could not be read (a kind that could not be read is not compared)."""

    objects: dict[str, dict[str, str]] = field(default_factory=dict)
    lower: dict[str, str | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


# --- files: the overlay's upper layer -----------------------------------------------------------


def _xattrs(path: str, follow: bool = False) -> str:
    """`` xattrs NAMES DIGEST`` for the extended attributes of ``path`` (ACLs, capabilities
    and labels are ones; a copy-up copies them): a change of one alone is a change of the
    file (SPEC §11). Empty when it has none but overlayfs's own, or they cannot be listed."""
    try:
        names = sorted(
            n
            for n in os.listxattr(path, follow_symlinks=follow)
            if not n.startswith(_UNCOMPARED_XATTRS)
        )
    except OSError:
        return ""
    if not names:
        return ""
    digest = blake2b(digest_size=8)
    for name in names:
        try:
            value = _comparable(name, os.getxattr(path, name, follow_symlinks=follow))
        except OSError as exc:
            value = f"unreadable: {exc.errno}".encode()
        digest.update(b"%d:%s%d:%s" % (len(name), name.encode(), len(value), value))
    return f" xattrs {','.join(names)} {digest.hexdigest()}"


def _comparable(name: str, value: bytes) -> bytes:
    """An xattr's value as the diff compares it: file capabilities without their revision
    and root id (a copy-up in a user namespace rewrites a v2 one as v3, the same
    capabilities); the effective flag and the permitted and inheritable masks stay."""
    if name != "security.capability" or len(value) < 20:
        return value
    effective = int.from_bytes(value[:4], "little") & 0x1  # VFS_CAP_FLAGS_EFFECTIVE
    return bytes([effective]) + value[4:20]


def _describe_path(path: str, st: os.stat_result, follow: bool = False) -> str:
    """``path`` as the diff compares it: type, mode, owner, content (or target), and its
    extended attributes (``follow``: of what a symlink such as /proc/PID/fd/N names)."""
    return _describe_path_alone(path, st) + _xattrs(path, follow)


def _describe_path_alone(path: str, st: os.stat_result) -> str:
    mode = stat.S_IMODE(st.st_mode)
    head = f"{mode:04o} {st.st_uid}:{st.st_gid}"
    if stat.S_ISREG(st.st_mode):
        if st.st_size <= HASH_LIMIT:
            with open(path, "rb") as f:
                digest = blake2b(f.read(), digest_size=8).hexdigest()
            return f"file {head} {st.st_size} bytes {digest}"
        return f"file {head} {st.st_size} bytes mtime {st.st_mtime_ns}"
    if stat.S_ISDIR(st.st_mode):
        return f"dir {head}"
    if stat.S_ISLNK(st.st_mode):
        # Its owner too (lchown; a link's mode is always 0777): who owns a link decides
        # whether the kernel follows it under fs.protected_symlinks.
        return f"symlink {st.st_uid}:{st.st_gid} -> {os.readlink(path)}"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        kind = "chardev" if stat.S_ISCHR(st.st_mode) else "blockdev"
        return f"{kind} {head} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"{stat.S_IFMT(st.st_mode):o} {head}"  # fifo, socket


def _lower(rel: str, lower_dir: str) -> str | None:
    path = os.path.join(lower_dir, rel.lstrip("/"))
    try:
        return _describe_path(path, os.lstat(path))
    except OSError:
        return None


def _is_opaque(path: str) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _upper_entry(path: str, st: os.stat_result) -> str:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return "whiteout"
    if stat.S_ISDIR(st.st_mode) and _is_opaque(path):
        return "opaque " + _describe_path(path, st)
    return _describe_path(path, st)


def read_files(
    upper_dir: str, lower_dir: str = "/", point: str = "/"
) -> tuple[dict[str, str], dict[str, str | None]]:
    """Every entry of the upper layer of the overlay mounted on ``point`` (``/etc/x`` → its
    description) and, for each, what the lower layer has there. A directory that is only a
    copied-up parent (same type, mode and owner as below) is left out: its mtime moved
    because an entry in it changed, which is listed by itself. The upper layer's root is
    the overlay's (its owner and mode): listed at ``point`` when they are not the lower's."""
    upper: dict[str, str] = {}
    lower: dict[str, str | None] = {}
    root, lower_root = _root_sides(upper_dir, lower_dir)
    if lower_root is None:
        # Gone from the host since the sandbox was built (a piece of a split view, which
        # its overlay still holds): the root is listed with no lower side of its own, the
        # diff compares it with the one the snapshot before saw (:func:`_file_sides`).
        upper[point] = root
    elif root != lower_root:
        upper[point], lower[point] = root, lower_root
    todo = [(point.rstrip("/"), upper_dir)]
    while todo:
        rel_dir, real_dir = todo.pop()
        with os.scandir(real_dir) as entries:
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}"
                st = entry.stat(follow_symlinks=False)
                desc = _upper_entry(entry.path, st)
                below = _lower(rel[len(point.rstrip("/")) :], lower_dir)
                if stat.S_ISDIR(st.st_mode):
                    todo.append((rel, entry.path))
                    if desc == below:
                        continue
                upper[rel] = desc
                lower[rel] = below
    return upper, lower


def _root_sides(upper_dir: str, lower_dir: str) -> tuple[str, str | None]:
    """The descriptions of the roots of an upper layer and of its lower layer (each a
    directory, through whatever path: /proc/PID/fd/N is followed); None for a lower one
    that is not there (the host removed it)."""
    upper = _describe_path(upper_dir, os.stat(upper_dir), follow=True)
    try:
        return upper, _describe_path(lower_dir, os.stat(lower_dir), follow=True)
    except FileNotFoundError:
        return upper, None


# --- mounts -------------------------------------------------------------------------------------


def _propagation(optional: list[str]) -> str:
    # With their peer groups (shared:N, master:N, propagate_from:N): a diff compares one
    # sandbox's mount table before and after its run, where a mount's group changes only if
    # its propagation was changed and changed back (made private, then shared anew: its
    # peers, the mount's copies in other namespaces, no longer receive what it receives).
    return ",".join(sorted(optional)) or "private"


def read_mounts(mountinfo: str) -> dict[str, str]:
    """Each mount of a mountinfo file, by mount point (``/mnt [2]`` for the second mount stacked
    on ``/mnt``): file system, source, root, options, super block options and propagation with
    its peer groups (a diff compares one sandbox's table before and after its run, where they
    compare). Mount ids and device numbers are left out (they differ between equal
    sandboxes)."""
    with open(mountinfo) as f:
        return parse_mounts(f.read())


def parse_mounts(text: str) -> dict[str, str]:
    """:func:`read_mounts` of the text of a mountinfo file."""
    mounts: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        sep = fields.index("-")
        point = linux.unescape_mountinfo(fields[4])
        name, n = point, 1
        while name in mounts:
            n += 1
            name = f"{point} [{n}]"
        fstype, source, sopts = [*fields[sep + 1 : sep + 4], "", "", ""][:3]
        mounts[name] = (
            f"{fstype} {linux.unescape_mountinfo(source)} root "
            f"{linux.unescape_mountinfo(fields[3])} {fields[5]} ({sopts}) "
            f"{_propagation(fields[6:sep])}"
        )
    return mounts


# --- inside the namespaces: uts, ipc, net -------------------------------------------------------


#: Bytes asked of each read of a ``/proc`` seq_file (mountinfo): the kernel gives at most
#: its buffer, a page (more only for a single line longer than that), however much is
#: asked; each read of 64 KiB cost an allocation, and a page fault, per look.
SEQ_READ = 4096


def _pread_all(fd: int, first: bytes | None = None) -> bytes:
    """The whole content of an open ``/proc`` file, from its start (``first``: what a read
    at offset 0 gave, already). One read of a seq_file returns at most its buffer, however
    much is asked: read to the end."""
    chunks = [os.pread(fd, SEQ_READ, 0) if first is None else first]
    offset = len(chunks[0])
    while chunks[-1]:
        chunks.append(os.pread(fd, SEQ_READ, offset))
        offset += len(chunks[-1])
    return b"".join(chunks)


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 65536).decode(errors="replace").strip()
    finally:
        os.close(fd)


#: Bytes asked of a sysctl by its first read. For each read of a sysctl the kernel allocates
#: and zeroes a buffer of the size asked for (``proc_sys_call_handler``: ``kvzalloc(count +
#: 1)``): 64 KiB a read cost about 5 µs of kernel time, for values of a few dozen bytes, half
#: a thousand times a run. 1023: the kernel's buffer is then one 1 KiB slab object.
SYSCTL_FIRST_READ = 1023
#: The most a sysctl's value is read of (as before: a single read of 64 KiB).
SYSCTL_MAX_READ = 65536


def _read_sysctl_fd(fd: int) -> bytes:
    """A sysctl's value through ``fd``, opened for reading: one small read, and only when it
    fails or fills its buffer (the value may be cut: a vector of integers cannot be read on
    from an offset, the kernel formats it whole at each read) a read of the full size from
    offset 0, exactly what a single read of the full size gives."""
    try:
        raw = os.read(fd, SYSCTL_FIRST_READ)
    except OSError:
        raw = None  # EINVAL for some per-device entries: the full read says the same, or not
    if raw is None or len(raw) >= SYSCTL_FIRST_READ:
        raw = os.pread(fd, SYSCTL_MAX_READ, 0)
    return raw


def _read_sysctl(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_sysctl_fd(fd).decode(errors="replace").removesuffix("\n")
    finally:
        os.close(fd)


#: Whether each sysctl file is writable by its mode: the same in every network namespace, so
#: stat'ed once per process (a per-device file of a new link is stat'ed when first seen).
_sysctl_writable: dict[str, bool] = {}


#: Where the writable sysctls are: directory → [(file, name)], as :func:`read_sysctls`
#: found them.
Layout = dict[str, list[tuple[str, str]]]


#: What reading a sysctl's file gave: its bytes, or the errno of the open or read that failed.
Raw = bytes | int


def read_sysctls(
    root: str = "/proc/sys/net", layout: Layout | None = None, raw: dict[str, Raw] | None = None
) -> dict[str, str]:
    """Every writable sysctl under ``root`` (``net.ipv4.ip_forward`` → its value), as the
    calling thread's network namespace has them; where each file is goes into ``layout``,
    what each read gave into ``raw``. Each file is opened relative to its directory: half a
    thousand of them, the path walks add up."""
    values: dict[str, str] = {}
    todo = [root]
    while todo:
        path = todo.pop()
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with os.scandir(dfd) as entries:
                for entry in entries:
                    name = entry.name
                    full = f"{path}/{name}"
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(full)
                        continue
                    writable = _sysctl_writable.get(full)
                    if writable is None:
                        writable = _sysctl_writable[full] = bool(
                            os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode & 0o222
                        )
                    if writable:
                        key = full[10:].replace("/", ".")
                        got = _read_raw_at(dfd, name)
                        values[key] = _value(got)
                        if raw is not None:
                            raw[key] = got
                        if layout is not None:
                            layout.setdefault(path, []).append((name, key))
        finally:
            os.close(dfd)
    return values


def read_laid_out_sysctls(layout: Layout) -> dict[str, str] | None:
    """:func:`read_sysctls` of the files of ``layout`` alone, listing no directory (the
    kernel makes an entry for each file it lists: the listings were a fifth of the read);
    None when one of them is not there (the layout is not this namespace's)."""
    values: dict[str, str] = {}
    for path, files in layout.items():
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            for name, key in files:
                values[key] = _read_at(dfd, name, gone=None)
        except FileNotFoundError:
            return None
        finally:
            os.close(dfd)
    return values


def _read_at(dfd: int, name: str, gone: str | None = "unreadable") -> str:
    """The value of sysctl ``name`` in directory ``dfd``; a file that is not there is
    ``unreadable`` (listed, then gone), or raises FileNotFoundError with ``gone=None``."""
    return _value(_read_raw_at(dfd, name, gone is None))


def _read_raw_at(dfd: int, name: str, gone: bool = False) -> Raw:
    """What reading sysctl ``name`` in directory ``dfd`` gives (:data:`Raw`); with ``gone``
    a file that is not there raises FileNotFoundError."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        if gone and exc.errno == errno.ENOENT:
            raise
        return exc.errno or errno.EIO
    try:
        return _read_sysctl_fd(fd)
    except OSError as exc:  # write-only, or EINVAL for some per-device entries
        return exc.errno or errno.EIO
    finally:
        os.close(fd)


def _value(raw: Raw) -> str:
    """A sysctl's value as compared and reported, from what reading its file gave: less
    the newline the kernel ends it with, no more (a value changed by whitespace alone is a
    change)."""
    if isinstance(raw, int):
        return f"unreadable: {os.strerror(raw)}"
    return raw.decode(errors="replace").removesuffix("\n").replace("\t", " ")


#: Directories of /proc/sys whose files no reader of the sysctls outside ``net.*`` walks:
#: ``net`` is read per network namespace (``sysctl``), and ``fs/binfmt_misc`` is a file system
#: of its own that systemd mounts on the machine at its first access.
_NOT_OUTSIDE_NET = ("/proc/sys/net", "/proc/sys/fs/binfmt_misc")
#: Writable sysctls that change with no run doing anything (or that a read changes): the pid
#: namespace's last pid, the uts names (their own kinds), what the kernel lowers, counts down
#: or sets itself, and a file whose read makes the kernel fold its counters (milliseconds).
_SELF_CHANGING_SYSCTLS = frozenset(
    {
        "kernel.ns_last_pid",
        "kernel.hostname",
        "kernel.domainname",
        "kernel.perf_event_max_sample_rate",
        "kernel.hung_task_warnings",
        "kernel.tainted",
        "vm.stat_refresh",
    }
)
#: The sysctls each ipc namespace has its own of (with ``fs.mqueue.*``).
_IPC_SYSCTLS = frozenset(
    {
        "kernel.shmmax",
        "kernel.shmall",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
        "kernel.shm_next_id",
        "kernel.msgmax",
        "kernel.msgmni",
        "kernel.msgmnb",
        "kernel.msg_next_id",
        "kernel.auto_msgmni",
        "kernel.sem",
        "kernel.sem_next_id",
    }
)


def is_ipc_sysctl(name: str) -> bool:
    """Whether sysctl ``name`` is one each ipc namespace has its own of."""
    return name in _IPC_SYSCTLS or name.startswith("fs.mqueue.")


#: The readable, writable sysctls outside ``net.*`` (less :data:`_SELF_CHANGING_SYSCTLS`),
#: as a :data:`Layout`: listed once per process (:func:`_outside_net_layout`).
_outside_net: Layout | None = None


def _outside_net_layout() -> Layout:
    """Where the sysctls outside ``net.*`` are (listed once: they are the kernel's own, the
    same in every namespace but for a module loaded since, which a run may not do)."""
    global _outside_net
    if _outside_net is None:
        layout: Layout = {}
        todo = ["/proc/sys"]
        while todo:
            path = todo.pop()
            with os.scandir(path) as entries:
                for entry in entries:
                    full = f"{path}/{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        if full not in _NOT_OUTSIDE_NET:
                            todo.append(full)
                        continue
                    key = full[10:].replace("/", ".")
                    mode = entry.stat(follow_symlinks=False).st_mode
                    if mode & 0o222 and mode & 0o444 and key not in _SELF_CHANGING_SYSCTLS:
                        layout.setdefault(path, []).append((entry.name, key))
        _outside_net = layout
    return _outside_net


def read_ipc_sysctls() -> dict[str, str]:
    """The sysctls of the calling thread's ipc namespace (``kernel.msgmnb``, ``fs.mqueue.*``…),
    opened each time: a sysctl file shows the namespace of the thread that opens it."""
    return _read_each(_outside_net_part(ipc=True))


def _outside_net_part(ipc: bool) -> list[tuple[str, list[tuple[str, str]]]]:
    """The directories of the sysctls outside ``net.*`` each ipc namespace has its own of
    (``ipc``) or of the machine's own, each with those files (name, key)."""
    out = []
    for path, files in _outside_net_layout().items():
        part = [(name, key) for name, key in files if is_ipc_sysctl(key) == ipc]
        if part:
            out.append((path, part))
    return out


def _read_each(part: list[tuple[str, list[tuple[str, str]]]]) -> dict[str, str]:
    """The sysctls of ``part`` (:func:`_outside_net_part`), each file opened for its read."""
    values: dict[str, str] = {}
    for path, files in part:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name, key in files:
                values[key] = _read_at(dfd, name)
        finally:
            os.close(dfd)
    return values


def open_machine_sysctls() -> list[tuple[str, int]] | None:
    """(key, descriptor) of each of the machine's own sysctls, opened: a watch holds them
    from its first read to its last, which are then preads (the opens and path walks were
    two thirds of a read). None when this process has no room for them (EMFILE): each read
    then opens one file at a time; so does a process they would leave short of its
    headroom (:func:`room_for`). The caller closes them (:func:`close_all`)."""
    held: list[tuple[str, int]] = []
    layout = _outside_net_part(ipc=False)
    try:
        if not room_for(sum(len(files) for _, files in layout)):
            return None
        for path, files in layout:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for name, key in files:
                    with contextlib.suppress(FileNotFoundError):  # gone since the listing
                        held.append((key, os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)))
            finally:
                os.close(dfd)
    except OSError:
        close_all([fd for _, fd in held])
        return None
    return held


def _pread_sysctl(fd: int) -> Raw:
    """A sysctl's value through ``fd`` from its start, whatever the file's offset (the
    descriptor is read again, and shared by forked processes)."""
    try:
        raw = os.pread(fd, SYSCTL_FIRST_READ, 0)
        if len(raw) >= SYSCTL_FIRST_READ:
            raw = os.pread(fd, SYSCTL_MAX_READ, 0)
    except OSError as exc:
        return exc.errno or errno.EIO
    return raw


def read_machine_sysctls(held: list[tuple[str, int]] | None = None) -> dict[str, str]:
    """The machine's own writable sysctls (``vm.*``, ``kernel.*``, ``fs.*``…: no namespace has
    its own, so no sandbox either): what a run that reaches them changes is the real host's.
    Through ``held`` (:func:`open_machine_sysctls`), else opened for this read."""
    if held is not None:
        return {key: _value(_pread_sysctl(fd)) for key, fd in held}
    return _read_each(_outside_net_part(ipc=False))


#: A fresh sandbox's sysctls as their files read, compact: per directory of a layout, the
#: names of its files joined by "/" (never in a name), what they read, joined, and the
#: length of each (``array("i")``'s bytes; minus the errno of one that failed). A few
#: objects, not a thousand: a supervisor touching each of those (reference counts) copies
#: the pages of the zygote they are on.
Reads = list[tuple[str, str, bytes, bytes]]


def _reads(layout: Layout, raw: dict[str, Raw]) -> Reads:
    """``layout``'s files as :data:`Reads`, from what each read gave (``raw``)."""
    out: Reads = []
    for path, files in layout.items():
        got = [raw[key] for _, key in files]
        out.append(
            (
                path,
                "/".join(name for name, _ in files),
                b"".join(r for r in got if not isinstance(r, int)),
                array.array("i", [-r if isinstance(r, int) else len(r) for r in got]).tobytes(),
            )
        )
    return out


def _laid_out_as_read(reads: Reads, held: list[int | None] | None = None) -> bool | None:
    """Whether every sysctl of ``reads`` reads exactly as it did (bytes for bytes, or the
    same errno), the values left undecoded: True, or False at the first directory where
    one does not, or None when one of the files is not there (the layout is not this
    namespace's). ``held``: a descriptor of each file, in the order of ``reads``, opened
    ahead (:attr:`ReadAhead.sysctls`; left open here), or None for a file to open now."""
    at = 0
    for path, names, data, sizes in reads:
        listed = names.split("/")
        fds: list[int | None] = (
            [None] * len(listed) if held is None else held[at : at + len(listed)]
        )
        at += len(listed)
        got = _read_directory(path, listed, fds)
        if got is None:
            return None
        parts, lengths = got
        if lengths.tobytes() != sizes or b"".join(parts) != data:
            return False
    return True


def _read_directory(
    path: str, names: list[str], fds: list[int | None]
) -> tuple[list[bytes], array.array[int]] | None:
    """What the sysctls ``names`` of directory ``path`` read, through their descriptors
    ``fds`` (None: opened now): the values that could be read, and the length of each (minus
    the errno of one that failed, as :data:`Reads` has them); None when one is not there."""
    parts: list[bytes] = []
    lengths = array.array("i")
    dfd = -1  # opened for the first file not held
    try:
        for name, fd in zip(names, fds, strict=True):
            got: Raw
            if fd is not None:
                try:
                    got = _read_sysctl_fd(fd)
                except OSError as exc:  # write-only, or EINVAL for some per-device entries
                    got = exc.errno or errno.EIO
            else:
                if dfd < 0:
                    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                got = _read_raw_at(dfd, name, gone=True)
            if isinstance(got, int):
                lengths.append(-got)
            else:
                parts.append(got)
                lengths.append(len(got))
    except FileNotFoundError:
        return None
    finally:
        if dfd >= 0:
            os.close(dfd)
    return parts, lengths


#: Descriptors a process holding the sysctls must still have free under its limit.
_FD_HEADROOM = 256


def close_all(fds: list[int]) -> None:
    """Close ``fds``, one system call when they are a range (as :func:`_open_sysctls` opens
    them, in a table without holes)."""
    if fds and sorted(fds) == list(range(min(fds), max(fds) + 1)):
        os.closerange(min(fds), max(fds) + 1)
    else:
        for fd in fds:
            os.close(fd)


def _layout_size() -> int:
    """How many files the fresh sandbox's sysctl layout has (0: none known)."""
    if _fresh_raw is None:
        return 0
    return sum(names.count("/") + 1 for _, names, _, _ in _fresh_raw[0])


def room_for(count: int) -> bool:
    """Whether this process may open ``count`` more descriptors and keep
    :data:`_FD_HEADROOM` of its limit free."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return True
    return len(os.listdir("/proc/self/fd")) + count + _FD_HEADROOM <= soft


def _open_sysctls() -> list[int | None] | None:
    """The files of a fresh sandbox's sysctl layout (:func:`prime`), opened in the calling
    thread's network namespace, each as :func:`_laid_out_as_read` opens it, in its order:
    each one's descriptor, None for one that could not be opened (root may not read a
    write-only sysctl). None when no layout is known, or it is not this namespace's (a
    file is not there), or the descriptors would crowd this process's limit."""
    if _fresh_raw is None:
        return None
    names = [(path, name) for path, joined, _, _ in _fresh_raw[0] for name in joined.split("/")]
    if not room_for(len(names)):
        return None
    fds: list[int | None] = []
    dirs: dict[str, int] = {}
    done = False
    try:
        for path, _ in names:  # first: the files then take one range of numbers
            if path not in dirs:
                dirs[path] = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for path, name in names:
            try:
                fds.append(os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirs[path]))
            except FileNotFoundError:
                return None
            except OSError:
                fds.append(None)
        done = True
    except OSError:
        return None
    finally:
        for dfd in dirs.values():
            os.close(dfd)
        if not done:
            close_all([fd for fd in fds if fd is not None])
    return fds


@dataclass
class ReadAhead:
    """What a sandbox's host watch starts from, read and opened by the zygote that built it
    before any run (:func:`read_ahead`). Until a run adopts the sandbox nothing but its idle
    init runs in it: this is its state when that run's starter is forked, and the run's
    supervisor, on the run's path, only checks the mount table against it."""

    #: Its state: :func:`fresh_state`, the mount table, what a thread in its namespaces reads.
    before: HostState
    #: The mount table's text the mounts of ``before`` were parsed from.
    mount_raw: bytes = b""
    #: A netlink socket of its network namespace (:func:`_subscribe`; -1: none).
    net: int = -1
    #: Its sysctl files, opened in the order of a fresh sandbox's layout, each one's
    #: descriptor or None (one that could not be opened then: root may not read a write-only
    #: sysctl; opened by path after the run). After the run each is read through its
    #: descriptor, no path walked: a sysctl's open costs twice its read (a new dentry and
    #: inode), and there are half a thousand. A descriptor reads the namespace it was
    #: opened in, whoever reads it. Handed to the supervisor by the fork, at the same
    #: numbers (:func:`kit.run.zygote.place_fds`): never queued in a socket, where root's
    #: descriptors in flight would count against every root process's limit (ETOOMANYREFS).
    sysctls: list[int | None] | None = None
    #: Whether the zygote's limit leaves room to keep its copies of the sysctl files, once
    #: handed over, beside the spares' (:data:`kit.run.zygote.kept_files`).
    room_to_keep: bool = False

    def fds(self) -> set[int]:
        """The descriptors handed to the run's supervisor one by one (renumbered)."""
        return {self.net} if self.net >= 0 else set()

    def files(self) -> list[int]:
        """The sysctl files' descriptors, handed over as they are numbered."""
        return [fd for fd in self.sysctls or () if fd is not None]

    def moved(self, numbers: dict[int, int]) -> ReadAhead:
        """The supervisor's: its descriptors renumbered (``numbers``: old -> new)."""
        net = numbers[self.net] if self.net >= 0 else -1
        sysctls = None
        if self.sysctls is not None:
            sysctls = [None if fd is None else numbers[fd] for fd in self.sysctls]
        return ReadAhead(self.before, self.mount_raw, net, sysctls, self.room_to_keep)

    def close(self) -> None:
        """Its descriptors closed (unused, or the supervisor's own once handed over)."""
        for fd in self.fds():
            os.close(fd)
        close_all(self.files())
        self.net, self.sysctls = -1, None


def read_ahead(sandbox: Sandbox, pidfd: int) -> ReadAhead:
    """By the process that built a sandbox ahead (the zygote, a one-shot launcher;
    ``pidfd``: its init's): its state before any run, a netlink socket of its network
    namespace and its sysctl files opened. What only a thread in its namespaces can read or
    open, a short-lived thread does (the builder's own never moves); what it could not is
    left to the run's watch. Unprimed (:func:`prime`), the builder primes from the sandbox
    itself (:func:`_prime_in`)."""
    if _fresh_sysctls is None:
        _prime_in(pidfd)
    ahead = ReadAhead(fresh_state(sandbox))
    before = ahead.before
    try:
        fd = os.open(f"/proc/{sandbox.init_pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        try:
            ahead.mount_raw = _pread_all(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # init is gone: the run that adopts the sandbox says so; else the watch reads it
    if ahead.mount_raw:
        text = ahead.mount_raw.decode(errors="replace").strip()
        _outside(before, "mount", lambda: parse_mounts(text))
    kinds = _mqueues_from_outside(
        before, sandbox, frozenset(_BEFORE_INSIDE.difference(before.objects, before.errors))
    )
    opened: dict[str, Any] = {}

    def inside() -> None:
        try:
            linux.setns(pidfd, linux.CLONE_NEWNET | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC)
        except OSError:
            return  # a kernel before 5.8 (setns of a pidfd): the run's watch reads them
        read = HostState()
        _read_joined(read, kinds, {})
        before.objects.update(read.objects)  # what could not be read, the watch reads again
        with contextlib.suppress(OSError):
            opened["net"] = _subscribe().detach()
        opened["sysctls"] = _open_sysctls()

    linux.grow_fd_table(_layout_size())  # the files _open_sysctls opens in the thread
    thread = threading.Thread(target=inside, name="kit-hostdiff-ahead")
    thread.start()
    thread.join()
    ahead.net = opened.get("net", -1)
    ahead.sysctls = opened.get("sysctls")
    try:
        ahead.room_to_keep = ahead.sysctls is not None and room_for(len(ahead.files()))
    except OSError:  # EMFILE listing the descriptors: no room
        ahead.room_to_keep = False
    return ahead


def read_sysvipc() -> dict[str, str]:
    """SysV message queues, semaphore sets and shared memory segments of the calling thread's
    ipc namespace: by kind, key and id; their permissions and owner (not times or counters)."""
    objects: dict[str, str] = {}
    for kind in ("msg", "sem", "shm"):
        # Raw reads: a text file object costs more than the read of a header alone (the
        # usual content: a fresh ipc namespace has no object).
        head, *lines = linux.read_file(f"/proc/sysvipc/{kind}").decode().splitlines()
        header = head.split()
        for line in lines:
            row = dict(zip(header, line.split(), strict=False))
            keep = [
                f"perms {row.get('perms')}",
                f"uid {row.get('uid')}",
                f"gid {row.get('gid')}",
            ]
            if kind == "shm":
                keep.append(f"size {row.get('size')}")
            objects[f"{kind} key {row.get('key')} id {row.get(kind + 'id')}"] = " ".join(keep)
    return objects


def read_mqueues(root: str = "") -> dict[str, str]:
    """POSIX message queues of an ipc namespace: listed in ``root``, a directory that is the
    root of its message queue file system (one per namespace, however often mounted), else
    in a detached mqueue mount of the calling thread's namespace (its close waits for an RCU
    grace period: milliseconds on a loaded machine)."""
    fd = (
        os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if root
        else linux.detached_mount("mqueue")
    )
    try:
        queues = {}
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            queues["/" + name] = f"{stat.S_IMODE(st.st_mode):04o} {st.st_uid}:{st.st_gid}"
        return queues
    finally:
        os.close(fd)


def _attr(msg: Any, name: str) -> Any:
    return msg.get(name) if hasattr(msg, "get") else None


def read_network() -> dict[str, dict[str, str]]:
    """Links, addresses and routes of the calling thread's network namespace (pyroute2)."""
    # pyroute2 costs ~110 ms to import: paid only when netlink said the network changed.
    from pyroute2 import IPRoute  # noqa: PLC0415

    links: dict[str, str] = {}
    addresses: dict[str, str] = {}
    routes: dict[str, str] = {}
    with IPRoute(groups=0) as ipr:
        names = {}
        for link in ipr.get_links():
            name = str(_attr(link, "IFLA_IFNAME"))
            names[link["index"]] = name
            info = _attr(link, "IFLA_LINKINFO")
            kind = _attr(info, "IFLA_INFO_KIND") if info is not None else None
            links[name] = (
                f"{kind or 'device'} flags {link['flags']:#x} mtu "
                f"{_attr(link, 'IFLA_MTU')} address {_attr(link, 'IFLA_ADDRESS')} "
                f"state {_attr(link, 'IFLA_OPERSTATE')}"
            )
        for addr in ipr.get_addr():
            dev = names.get(addr["index"], str(addr["index"]))
            addresses[f"{dev} {_attr(addr, 'IFA_ADDRESS')}/{addr['prefixlen']}"] = (
                f"scope {addr['scope']} flags {_attr(addr, 'IFA_FLAGS')}"
            )
        for route in ipr.get_routes():
            table = _attr(route, "RTA_TABLE") or route["table"]
            dst = _attr(route, "RTA_DST") or ("default" if route["family"] == 2 else "::")
            dev = names.get(_attr(route, "RTA_OIF"), "-")
            name = (
                f"table {table} type {route['type']} {dst}/{route['dst_len']} dev {dev} "
                f"via {_attr(route, 'RTA_GATEWAY') or '-'}"
            )
            routes[name] = (
                f"proto {route['proto']} scope {route['scope']} metric "
                f"{_attr(route, 'RTA_PRIORITY')} src {_attr(route, 'RTA_PREFSRC')}"
            )
    return {"link": links, "address": addresses, "route": routes}


def _read_uts() -> dict[str, dict[str, str]]:
    """The hostname and domainname, as their sysctls read: one uname(2) for both, not an
    open, a read and a close of each file."""
    hostname, domainname = _uname_names()
    return {"hostname": {"": hostname}, "domainname": {"": domainname}}


def _join(init_pid: int, kind: str) -> None:
    fd = os.open(linux.ns_path(kind, init_pid), os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(fd, linux.NAMESPACES[kind][0])
    finally:
        os.close(fd)


#: What a thread that joined the sandbox's namespaces reads: kind → reader (or kinds at once).
_INSIDE: tuple[tuple[str, tuple[str, ...], Callable[[], Any]], ...] = (
    ("uts", ("hostname", "domainname"), _read_uts),
    ("net", ("sysctl",), lambda: {"sysctl": read_sysctls()}),
    ("net", ("link", "address", "route"), read_network),
    ("ipc", ("ipc",), lambda: {"ipc": read_sysvipc()}),
    ("ipc", ("ipc_sysctl",), lambda: {"ipc_sysctl": read_ipc_sysctls()}),
    ("ipc", ("mqueue",), lambda: {"mqueue": read_mqueues()}),
)


INSIDE_KINDS = frozenset(kind for _, kinds, _ in _INSIDE for kind in kinds)


_INSIDE_NS = ("uts", "net", "ipc")


class Inside:
    """The calling thread in the sandbox's uts, net and ipc namespaces, until :meth:`leave`
    (setns of these kinds moves the calling thread alone). ``failed``: the namespaces it could
    not join, with why."""

    def __init__(self, init_pid: int, ns_fds: dict[str, int] | None = None) -> None:
        """``ns_fds``: descriptors of the namespaces, held since init's pid was checked
        (:func:`kit.run.sandbox.adopt`): joined through them, not through the pid, which
        names another process once init is gone and reaped (engine code can end it)."""
        self.own = {
            ns: os.open(
                f"/proc/thread-self/ns/{linux.NAMESPACES[ns][1]}", os.O_RDONLY | os.O_CLOEXEC
            )
            for ns in _INSIDE_NS
        }
        self.failed: dict[str, str] = {}
        for ns in _INSIDE_NS:
            try:
                if ns_fds and ns in ns_fds:
                    linux.setns(ns_fds[ns], linux.NAMESPACES[ns][0])
                else:
                    _join(init_pid, ns)
            except OSError as exc:
                self.failed[ns] = f"cannot join its {ns} namespace: {exc}"

    def read(self, state: HostState, only: frozenset[str] = INSIDE_KINDS) -> None:
        """The kinds ``only`` of what the joined namespaces hold, into ``state``."""
        _read_joined(state, only, self.failed)

    def leave(self) -> None:
        for ns, fd in self.own.items():
            try:
                linux.setns(fd, linux.NAMESPACES[ns][0])
            except PermissionError:
                if linux.in_initial_user_namespace():
                    raise  # it owns every namespace: a real failure
                # Launched in a user namespace that does not own the launcher's namespaces:
                # there is no way back. The supervisor, which reads nothing more of them,
                # stays in the sandbox's until it exits (they outlive init that long).
            finally:
                os.close(fd)
        self.own = {}


def _read_joined(state: HostState, only: frozenset[str], failed: dict[str, str]) -> None:
    """The kinds ``only`` of what the calling thread's namespaces hold, into ``state``
    (``failed``: namespaces it could not join, with why)."""
    for ns, kinds, reader in _INSIDE:
        if not only.intersection(kinds):
            continue
        try:
            if ns in failed:
                raise OSError(failed[ns])
            state.objects.update(reader())
        except Exception as exc:  # noqa: BLE001 one unreadable kind must not hide the others
            for kind in kinds:
                state.errors[kind] = f"{type(exc).__name__}: {exc}"


def _read_inside(init_pid: int, state: HostState, only: frozenset[str]) -> None:
    """In a short-lived thread: join the sandbox's namespaces and read them."""
    inside = Inside(init_pid)
    try:
        inside.read(state, only)
    finally:  # the thread ends: it need not go back, but its way back must not leak
        for fd in inside.own.values():
            os.close(fd)


def _fresh(reader: Callable[[], Any]) -> Any:
    """``reader()`` in a new network namespace with ``lo`` up, as a fresh sandbox has it; the
    calling thread goes back to its own network namespace. No thread: a process that
    unshared a pid namespace (the supervisor of a sandbox) cannot start one."""
    if not linux.in_initial_user_namespace():
        # The launcher's network namespace may belong to an ancestor user namespace, where
        # setns back is refused: a forked child makes the new one and reads it.
        return _fresh_in_child(reader)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.unshare(linux.CLONE_NEWNET)
        try:
            linux.link_up("lo")
            return reader()
        finally:
            linux.setns(own, linux.CLONE_NEWNET)
    finally:
        os.close(own)


def _fresh_in_child(reader: Callable[[], Any]) -> Any:
    """:func:`_fresh` by a forked child: ``reader()``'s JSON-able result, or OSError.
    Refused once this process's children are born in another pid namespace (a sandbox's,
    adopted): there the child would be within reach of the run's processes."""
    try:  # ENOENT: a new pid namespace that has no init yet
        children = os.readlink("/proc/self/ns/pid_for_children")
    except FileNotFoundError:
        children = ""
    if children != os.readlink("/proc/self/ns/pid"):
        raise OSError("a fresh network namespace: a child would be born in the sandbox")
    r, w = os.pipe()
    try:
        pid = os.fork()
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        try:  # never back into the caller's code, whatever fails (EPIPE in the write)
            os.close(r)
            try:
                linux.unshare(linux.CLONE_NEWNET)
                linux.link_up("lo")
                data = json.dumps({"ok": reader()}).encode()
            except BaseException as exc:  # noqa: BLE001 the child reports any failure
                data = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
            while data:
                data = data[os.write(w, data) :]
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            raw = f.read()
    finally:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    try:
        out = json.loads(raw or b'{"error": "the child died"}')
    except ValueError:  # killed mid-write
        out = {"error": "the child died while it reported"}
    if "error" in out:
        raise OSError(f"a fresh network namespace: {out['error']}")
    return out["ok"]


#: The sysctls of a fresh sandbox (``net.*`` of a new network namespace with ``lo`` up): the
#: same for every run, so read once (:func:`prime`) by the long-lived process that forks the
#: supervisors, instead of twice per run.
_fresh_sysctls: dict[str, str] | None = None
#: Where they are, and the modules loaded then (:func:`_modules`): a sandbox's network
#: namespace has the same files while no module was loaded or unloaded since and no link
#: came or went (the rest are registered with each namespace, or with a module).
_fresh_layout: tuple[Layout, str] | None = None
#: What each file of the layout read then (:data:`Reads`), with the values they make: a
#: sandbox's sysctls that read the same have those values, none decoded or compared.
_fresh_raw: tuple[Reads, dict[str, str]] | None = None


def _modules() -> str:
    """The names of the loaded modules ("" on a kernel without modules)."""
    try:
        text = linux.read_file("/proc/modules").decode(errors="replace")
    except FileNotFoundError:
        return ""
    return " ".join(line.split(" ", 1)[0] for line in text.splitlines())


#: Links, addresses and routes of a fresh sandbox, read by :func:`prime` where a fresh one
#: cannot be read after the run (:func:`_fresh_network_now`).
_fresh_network: dict[str, dict[str, str]] | None = None


def prime() -> None:
    """Read what every fresh sandbox has, once per process (the zygote, before it forks;
    a supervisor, before it adopts its sandbox), unless :func:`_prime_in` did."""
    global _fresh_network
    with contextlib.suppress(OSError):  # else listed by the run that reads them
        _outside_net_layout()
    if _fresh_sysctls is None:
        modules = _modules()
        try:
            # All returned: a forked child may be the reader (_fresh_in_child).
            _keep_fresh(modules, *_fresh(_sysctls_and_layout))
        except OSError:
            pass  # no network namespace here (a root without CAP_SYS_ADMIN): read per run
    if _fresh_network is None and not linux.in_initial_user_namespace():
        with contextlib.suppress(OSError):  # the run's diff then says the kinds are unread
            _fresh_network = _fresh(read_network)


def _keep_fresh(
    modules: str, values: dict[str, str], layout: Layout, raw: dict[str, str | int]
) -> None:
    """Keep what :func:`_sysctls_and_layout` read in a fresh sandbox's network namespace."""
    global _fresh_sysctls, _fresh_layout, _fresh_raw
    read = {k: v if isinstance(v, int) else v.encode("latin-1") for k, v in raw.items()}
    _fresh_sysctls = values
    _fresh_layout = (layout, modules) if layout else None
    _fresh_raw = (_reads(layout, read), values)


def _prime_in(pidfd: int) -> None:
    """:func:`prime`, read in the sandbox whose init ``pidfd`` is, built and not yet run in
    (so a fresh one), by a short-lived thread in its network namespace: no namespace is
    made for the purpose. For a process with one run to watch (a one-shot launcher), which
    has a sandbox to read before it would have primed."""
    with contextlib.suppress(OSError):  # the same in every namespace: listed here
        _outside_net_layout()

    def inside() -> None:
        try:
            linux.setns(pidfd, linux.CLONE_NEWNET)
        except OSError:
            return  # a kernel before 5.8 (setns of a pidfd): prime() reads a new one
        with contextlib.suppress(OSError):
            _keep_fresh(_modules(), *_sysctls_and_layout())
        # Not the links, addresses and routes prime() reads outside the initial user
        # namespace: a forked child reads them there, never this process (no pyroute2 here).

    thread = threading.Thread(target=inside, name="kit-hostdiff-prime")
    thread.start()
    thread.join()


def _fresh_network_now() -> dict[str, dict[str, str]]:
    """Links, addresses and routes of a fresh sandbox, for a supervisor whose run is over.
    Outside the initial user namespace a fresh one is read by a forked child
    (:func:`_fresh_in_child`), which the supervisor cannot fork now: born in the sandbox's
    pid namespace while the run's leftover processes live, it would show them, through
    /proc/<child>/root, ns/mnt and fd, the kit's own root and namespaces. There, the one
    :func:`prime` read before the sandbox was adopted (or OSError)."""
    if linux.in_initial_user_namespace():
        return dict(_fresh(read_network))
    if _fresh_network is None:
        raise OSError("no fresh network namespace was read before the run")
    return {kind: dict(objects) for kind, objects in _fresh_network.items()}


def _sysctls_and_layout() -> tuple[dict[str, str], Layout, dict[str, str | int]]:
    """The sysctls, their layout and what each read gave, JSON-able (the bytes as latin-1
    text: a forked child may be the reader)."""
    layout: Layout = {}
    raw: dict[str, Raw] = {}
    values = read_sysctls(layout=layout, raw=raw)
    return (
        values,
        layout,
        {k: v if isinstance(v, int) else v.decode("latin-1") for k, v in raw.items()},
    )


def _sysctls_as_laid_out(held: list[int | None] | None = None) -> dict[str, str] | None:
    """The calling thread's network namespace's sysctls, read from a fresh sandbox's layout
    when it is that namespace's too (:data:`_fresh_layout`; the caller knows that no link
    came or went); None when it may not be: they must be listed. When every file reads as
    the fresh sandbox's did (the usual run), the fresh sandbox's values, that very dict.
    ``held``: a descriptor of each file, opened ahead in this namespace (:class:`ReadAhead`;
    left open)."""
    if _fresh_layout is None or _fresh_layout[1] != _modules():
        return None
    if _fresh_raw is not None:
        same = _laid_out_as_read(_fresh_raw[0], held)
        if same is None:
            return None
        if same:
            return _fresh_raw[1]
    return read_laid_out_sysctls(_fresh_layout[0])


#: rtnetlink multicast groups whose messages tell that links, addresses, routes, rules or
#: per-device settings (netconf) changed: LINK, IPV4_IFADDR, IPV4_ROUTE, IPV4_RULE,
#: IPV6_IFADDR, IPV6_ROUTE, IPV6_RULE, IPV4_NETCONF, IPV6_NETCONF.
_NET_GROUPS = sum(1 << (group - 1) for group in (1, 5, 7, 8, 9, 11, 19, 24, 25))


def _subscribe() -> socket.socket:
    """A netlink socket of the calling thread's network namespace that queues a message for
    every change of its links, addresses and routes."""
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        socket.NETLINK_ROUTE,
    )
    sock.bind((0, _NET_GROUPS))
    return sock


def _notified(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(65536))
    except BlockingIOError:
        return False
    except OSError:  # ENOBUFS: so many changes that the queue overflowed
        return True


def read_processes(init_pid: int) -> dict[str, str]:
    """The processes of the sandbox's pid namespace (pid as it sees them → command line), from
    its own ``/proc`` (checked to be the proc of that pid namespace)."""
    proc = f"/proc/{init_pid}/root/proc"
    own = os.readlink(f"/proc/{init_pid}/ns/pid")
    try:
        ours = os.readlink(f"{proc}/1/ns/pid") == own
    except OSError:
        ours = False
    if not ours:  # its /proc was unmounted or covered: the slow way, through ours
        return _processes_in(own)
    processes = {}
    for name in os.listdir(proc):
        # A process that is exiting or a zombie is not left behind: it is dead, or its exit
        # (a kill by the supervisor, say) only has to complete.
        if name.isdigit() and linux.process_alive(int(name), proc):
            try:
                with open(f"{proc}/{name}/cmdline", "rb") as f:
                    argv = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                argv = argv or f"[{_read(f'{proc}/{name}/comm')}]"  # one that began exiting
            except OSError:
                continue  # exited meanwhile
            processes[f"pid {name}"] = argv
    processes.update(_init_attributes(init_pid))
    return processes


def _init_attributes(init_pid: int) -> dict[str, str]:
    """What another process can change of the sandbox's init, which stands for the host's
    processes (SPEC §11: a run leaves them as they were): its resource limits (prlimit), its
    scheduling (nice, policy, real-time priority, the CPUs it may run on), its OOM score
    adjustment and its cgroups. Nothing when it is gone (the diff names that)."""
    try:
        with open(f"/proc/{init_pid}/limits") as f:
            rows = f.read().splitlines()[1:]
        with open(f"/proc/{init_pid}/stat") as f:
            stat = f.read()
        status = linux.read_status(f"/proc/{init_pid}/status")
        oom = _read(f"/proc/{init_pid}/oom_score_adj")
        cgroups = _read(f"/proc/{init_pid}/cgroup").replace("\n", " ")
    except (OSError, KeyError):
        return {}
    fields = stat[stat.rindex(")") + 2 :].split()  # from the state on (field 3 of proc(5))
    return {
        # "Max open files            1024                 524288               files"
        **{f"pid 1 limit {row[4:26].strip()}": "/".join(row[26:].split()[:2]) for row in rows},
        "pid 1 scheduling": (
            f"nice {fields[16]}, policy {fields[38]}, real-time priority {fields[37]}, "
            f"cpus {status.get('Cpus_allowed_list', '?')}"
        ),
        "pid 1 oom_score_adj": oom,
        "pid 1 cgroups": cgroups,
    }


def _processes_in(pid_ns: str) -> dict[str, str]:
    """The processes of pid namespace ``pid_ns`` (``pid:[…]``), found in this process's /proc
    and named by their pid in that namespace (the last of NSpid)."""
    processes = {}
    for name in os.listdir("/proc"):
        try:
            if not name.isdigit() or os.readlink(f"/proc/{name}/ns/pid") != pid_ns:
                continue
            if not linux.process_alive(int(name)):
                continue
            nspid = linux.read_status(f"/proc/{name}/status")["NSpid"].split()[-1]
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            processes[f"pid {nspid}"] = argv or f"[{_read(f'/proc/{name}/comm')}]"
        except (OSError, KeyError):
            continue  # exited meanwhile, or a kernel thread
    return processes


def read_netns(init_pid: int) -> dict[str, str]:
    """Named network namespaces of the sandbox (its ``/run/netns``)."""
    try:
        names = os.listdir(f"/proc/{init_pid}/root/run/netns")
    except FileNotFoundError:
        return {}
    return {name: "netns" for name in names}


def _outside(state: HostState, kind: str, reader: Callable[[], dict[str, str]]) -> None:
    try:
        state.objects[kind] = reader()
    except Exception as exc:  # noqa: BLE001 one unreadable kind must not hide the others
        state.errors[kind] = f"{type(exc).__name__}: {exc}"


def _mount_alone(point: str) -> tuple[str, int | None]:
    """A path to the file system mounted on ``point`` without the mounts on it: what an
    overlay with ``lowerdir=point`` has below (``/dev/null`` under ``/`` is not the devtmpfs
    one). Without the privilege to clone it, ``point`` (wrong only under a mount point)."""
    try:
        fd = linux.clone_mount(point)
    except OSError:
        return point, None
    return f"/proc/self/fd/{fd}", fd


def _empty(directory: str) -> bool:
    with os.scandir(directory) as entries:
        return next(entries, None) is None


def read_fresh_files(points: dict[str, str]) -> dict[str, str]:
    """Every entry of the sandbox's own fresh file systems (``points``: mount point -> a path
    to it valid here; its tmpfs ``/dev`` and ``/dev/shm``), which the host's processes
    share as the host's and which no upper layer records: with no lower layer, each entry
    is listed as it is. Each walk stays on its file system (the mounts on it, a devpts or
    an mqueue, are the mount table's and the message queues')."""
    files: dict[str, str] = {}
    for point, top in sorted(points.items()):
        device = os.stat(top).st_dev
        todo = [(point.rstrip("/"), top)]
        while todo:
            rel_dir, real_dir = todo.pop()
            # Read while the run goes on (the watch's looks): a file its processes remove
            # between the listing and the read (glibc's temporary files of sem_open and
            # shm_open) was not there, as it will not be at the end.
            try:
                with os.scandir(real_dir) as entries:
                    for entry in entries:
                        try:
                            st = entry.stat(follow_symlinks=False)
                            if st.st_dev != device:
                                continue
                            rel = f"{rel_dir}/{entry.name}"
                            files[rel] = _describe_path(entry.path, st)
                        except (FileNotFoundError, NotADirectoryError):
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            todo.append((rel, entry.path))
            except (FileNotFoundError, NotADirectoryError):
                continue
    return files


def _read_all_files(sandbox: Sandbox, lower_dir: str | None, state: HostState) -> dict[str, str]:
    """The upper layers of every copy-on-write mount of the sandbox (``upper_dirs`` by mount
    point when it has several, else ``upper_dir`` for ``/``), and its fresh file systems
    (``fresh_dirs``: :func:`read_fresh_files`)."""
    uppers = getattr(sandbox, "upper_dirs", None) or {"/": sandbox.upper_dir}
    files: dict[str, str] = read_fresh_files(getattr(sandbox, "fresh_dirs", None) or {})
    for point, upper_dir in sorted(uppers.items()):
        if lower_dir is None:
            root, host_root = _root_sides(upper_dir, point)
            if host_root is not None:
                # The root's lower side, kept: should the host remove the directory before
                # a later snapshot (a piece of a split view), that one compares the root
                # with it (_file_sides).
                state.lower[point] = host_root
            if root == host_root and _empty(upper_dir):
                # Nothing was copied up, created or deleted there, its root is as on the
                # host (the mount point's top mount is the overlay's lower layer): no lower
                # layer to look at (a detached copy of the mount costs an RCU grace period
                # when closed).
                continue
        below, fd = (lower_dir, None) if lower_dir is not None else _mount_alone(point)
        try:
            found, lower = read_files(upper_dir, below, point)
        finally:
            if fd is not None:
                os.close(fd)
        files.update(found)
        state.lower.update(lower)
    return files


def snapshot(
    sandbox: Sandbox,
    lower_dir: str | None = None,
    only: frozenset[str] = INSIDE_KINDS,
    inside: Inside | None = None,
    mounts: bool = True,
) -> HostState:
    """The state of ``sandbox``, read from outside it (``lower_dir``: the lower layer of its
    root overlay as this process sees it; by default the file system mounted on each
    copy-on-write mount point, alone). The per-namespace kinds (``only`` of them) are read by
    ``inside`` (this thread, already in the sandbox's namespaces), else by a short-lived
    thread that joins them.

    SPEC §11: after a run the host is as it was before. In the real backend as root the host a run
    sees is the kit's sandbox, so its state before the starter is forked and after the run, both
    read by the supervisor (which keeps the real host's ``/proc``), tell every change the run made:

    - files: the overlay's upper layer lists every path created, changed or deleted (a whiteout is a
      character device 0/0, a replaced directory carries the ``trusted.overlay.opaque`` xattr);
      the sandbox's own tmpfs ``/dev`` and ``/dev/shm`` (``fresh_dirs``) are listed whole;
    - mounts of the sandbox's mount namespace (``/proc/<init>/mountinfo``): added, removed, options,
      propagation;
    - hostname and domainname, the writable sysctls (``net.*`` of the sandbox's network namespace),
      network links, addresses and routes (netlink, through pyroute2), SysV IPC objects and POSIX
      message queues: read by a short-lived thread that joined the sandbox's uts, ipc and net
      namespaces (those files and sockets show the reader's namespace; the queues are listed
      from outside when the sandbox holds its ipc namespace's mqueue root, ``mqueue_dir``);
    - named network namespaces (``/run/netns`` in the sandbox) and the processes of its pid
      namespace.

    What cannot be seen here: writes to other file systems that are not the overlay (a tmpfs the
    run mounts, bind mounts of the real host), and anything outside the sandbox's namespaces.
    """
    state = HostState()
    pid = sandbox.init_pid
    thread = None
    only = _mqueues_from_outside(state, sandbox, only)
    if inside is not None:
        inside.read(state, only)
    elif only:
        thread = threading.Thread(target=_read_inside, args=(pid, state, only), name="kit-hostdiff")
        thread.start()
    _outside(state, "file", lambda: _read_all_files(sandbox, lower_dir, state))
    if mounts:
        _outside(state, "mount", lambda: read_mounts(f"/proc/{pid}/mountinfo"))
    _outside(state, "netns", lambda: read_netns(pid))
    _outside(state, "process", lambda: read_processes(pid))
    if thread is not None:
        thread.join()
    return state


def _mqueues_from_outside(
    state: HostState, sandbox: Sandbox, only: frozenset[str]
) -> frozenset[str]:
    """``only`` without the message queues when the sandbox's are listed from here (into
    ``state``: the root of its mqueue file system is held open, no need to join its ipc
    namespace)."""
    mqueue_dir = getattr(sandbox, "mqueue_dir", "")
    if not mqueue_dir or "mqueue" not in only:
        return only
    _outside(state, "mqueue", lambda: read_mqueues(mqueue_dir))
    return only - {"mqueue"}


def diff(before: HostState, after: HostState) -> list[HostChange]:
    """Every object that differs between two snapshots of one sandbox, in :data:`KINDS` order
    then by name. A kind that either snapshot could not read is reported as a change of
    kind ``unreadable`` (the diff cannot vouch for it)."""
    changes: list[HostChange] = []
    links = {
        name
        for name in before.objects.get("link", {}).keys() ^ after.objects.get("link", {}).keys()
    }
    for kind in KINDS:
        if kind in before.errors or kind in after.errors:
            changes.append(
                HostChange("unreadable", kind, before.errors.get(kind), after.errors.get(kind))
            )
            continue
        old = before.objects.get(kind, {})
        new = after.objects.get(kind, {})
        if old is new or old == new:  # the usual case; the sysctls: half a thousand names
            continue
        for name in sorted(old.keys() | new.keys()):
            was, now = old.get(name), new.get(name)
            if kind == "file":
                was, now = _file_sides(name, before, after)
            elif kind == "sysctl" and (was is None or now is None) and _of_link(name, links):
                continue  # a link's own settings come and go with it: the link is named
            elif (
                kind == "process"
                and name.startswith("pid 1 ")
                and not ("pid 1" in old and "pid 1" in new)
            ):
                continue  # init's settings come and go with it: init is named
            if was != now:
                reported = "sysctl" if kind in SYSCTL_KINDS else kind
                changes.append(HostChange(reported, name or kind, was, now))
    return changes


def _of_link(sysctl: str, links: set[str]) -> bool:
    """Whether ``sysctl`` is a per-device setting (``net.ipv4.conf.DEV.x``,
    ``net.ipv6.neigh.DEV.x``…) of one of ``links``."""
    parts = sysctl.split(".")
    return len(parts) > 4 and parts[2] in ("conf", "neigh") and parts[3] in links


def _file_sides(path: str, before: HostState, after: HostState) -> tuple[str | None, str | None]:
    """What the path was before and is after, seen through the overlay: an upper entry hides
    the lower one (a whiteout hides it as if deleted)."""
    lower = after.lower.get(path, before.lower.get(path))

    def merged(state: HostState) -> str | None:
        entry = state.objects["file"].get(path)
        if entry is None:
            return lower
        return None if entry == "whiteout" else entry.removeprefix("opaque ")

    was, now = merged(before), merged(after)
    if was == now and before.objects["file"].get(path, "").startswith("opaque ") != after.objects[
        "file"
    ].get(path, "").startswith("opaque "):
        now = f"{now} (replaced: its old entries hidden)"
    return was, now


# --- during the run: what the ledger can tell ---------------------------------------------------

#: Kinds watched while the run goes on (SPEC §11: not even transiently; NS-010, NS-011).
WATCHED = ("hostname", "domainname", "mount")
#: The name of a change of the mount table that a look knows of only by the kernel's flag:
#: made and undone since the last look (a mount and its unmount, a remount and back).
UNDONE_MOUNT = "(mount table)"
UNDONE_MOUNT_TEXT = "a mount, unmount or remount made and undone between two looks"

Hook = tuple[str, str, int]  # (role, hook, pid)


class HostWatch:
    """One run's host diff, held by the supervisor: the sandbox's state before the starter is
    forked (:meth:`__init__`), its hostname, domainname and mount table looked at after every
    batch of ledger events while the run goes on (:meth:`look`), and at the end every change
    (:meth:`finish`), each watched one with the hooks that were open when it appeared.

    From :meth:`start` (from :meth:`__init__` when nothing was read ahead) to :meth:`finish`
    the calling thread is in the sandbox's uts, net and ipc namespaces (then back in its
    own): a uname there is the sandbox's hostname for the price of a system call, and no
    thread is needed (a supervisor that unshared a pid namespace for the sandbox cannot start
    one). The starter enters them anyway."""

    def __init__(self, sandbox: Sandbox, ahead: ReadAhead | None = None) -> None:
        """``ahead``: what the zygote that built the sandbox read and opened for its watch
        (:func:`read_ahead`; nothing but its idle init has run in it since), now the watch's
        to close; else everything is read now."""
        self.sandbox = sandbox
        #: The sysctl files opened ahead (:attr:`ReadAhead.sysctls`), closed by :meth:`close`.
        self._sysctl_fds = None if ahead is None else ahead.sysctls
        # Opened before the snapshot: a mount made after it wakes the first poll.
        self._mountinfo: int | None = os.open(
            f"/proc/{sandbox.init_pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC
        )
        # One poll for the looks: the mount table (mounts, unmounts, remounts) and the uts
        # names (the kernel flags every sethostname and setdomainname, of any namespace).
        self._poller = select.poll()
        self._poller.register(self._mountinfo, select.POLLPRI)
        self._uts_fds = _uts_watch()
        for fd in self._uts_fds:
            self._poller.register(fd, select.POLLPRI)
        self._poller.poll(0)  # clears the mountinfo flag: a mount from now on wakes a look
        self._mount_raw = _pread_all(self._mountinfo)
        self._page = bytearray(SEQ_READ)  # each look's first read of the mount table
        # Held for the looks: statvfs of a path through /proc costs a lookup each time. One
        # per file system: a sandbox split in pieces has dozens of upper layers on one tmpfs.
        uppers = getattr(sandbox, "upper_dirs", None) or {"/": sandbox.upper_dir}
        fresh = getattr(sandbox, "fresh_dirs", None) or {}
        self._uppers: list[int] = []
        devices: set[int] = set()
        for path in sorted(uppers.values()) + sorted(fresh.values()):
            try:
                fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            device = os.fstat(fd).st_dev
            if device in devices:
                os.close(fd)
                continue
            devices.add(device)
            self._uppers.append(fd)
        self.inside: Inside | None = None
        self._net: socket.socket | None = None
        if ahead is not None and ahead.net >= 0:
            # Subscribed ahead, in the sandbox's network namespace: the namespaces are
            # joined after the starter's fork (start), off the run's path.
            self._net = socket.socket(fileno=ahead.net)
        else:
            if "net" not in self._join().failed:
                self._net = _subscribe()  # before the snapshot: no change falls in between
        if ahead is None:
            before = fresh_state(sandbox, self._join())
        else:
            before = ahead.before
            missing = _BEFORE_INSIDE.difference(before.objects, before.errors)
            if missing:  # what the zygote's thread could not read
                self._join().read(before, _mqueues_from_outside(before, sandbox, missing))
            if ahead.mount_raw != self._mount_raw or "mount" not in before.objects:
                # Changed since it was read ahead (or never read): the text read for the
                # looks is the one before.
                before.errors.pop("mount", None)
                text = self._mount_raw.decode(errors="replace").strip()
                _outside(before, "mount", lambda: parse_mounts(text))
        # The machine's own sysctls now, not ahead: no sandbox has them, so what they were
        # when a spare sandbox was built says nothing of this run. Held until the last read.
        self._machine = open_machine_sysctls()
        _outside(before, "machine_sysctl", lambda: read_machine_sysctls(self._machine))
        self.before = before
        self.last = {kind: dict(self.before.objects.get(kind, {})) for kind in (*WATCHED, "file")}
        self._usage = self._upper_usage()
        self.seen: dict[tuple[str, str], dict[str, Any]] = {}  # first sighting of each change
        self.open: set[Hook] = set()
        self.window: set[Hook] = set()  # hooks open at some moment since the last look
        self.looks = 0
        self._joined = False
        #: (signal, hook) -> the call: signals the run sent to the sandbox's init.
        self.signalled: dict[tuple[int, Hook], str] = {}

    def _snapshot(self, sysctls: bool, network: bool = False, mounts: bool = True) -> HostState:
        return _partial(self.sandbox, self._join(), sysctls, network, mounts)

    def _join(self) -> Inside:
        """The calling thread in the sandbox's uts, net and ipc namespaces (once)."""
        if self.inside is None:
            self.inside = Inside(self.sandbox.init_pid, getattr(self.sandbox, "ns_fds", None))
        return self.inside

    def start(self) -> None:
        """After the starter is forked: the looks begin. The namespaces are joined now (if
        not yet), while the starter finds its feet."""
        self._joined = "uts" not in self._join().failed

    def note(self, event: dict[str, Any]) -> None:
        """Keep track of the open hooks (every ledger event goes through here)."""
        kind, role, pid = event.get("kind"), str(event.get("role")), event.get("pid", 0)
        if kind == "hook_enter":
            hook = (role, str(event.get("hook")), pid)
            self.open.add(hook)
            self.window.add(hook)
        elif kind in ("hook_return", "hook_raise"):
            self.open.discard((role, str(event.get("hook")), pid))
        elif kind == "stage2_exec":
            self.open = {h for h in self.open if h[:2] != ("stage2", "start_process")}
            payload = ("payload", "after exec", pid)
            self.open.add(payload)
            self.window.add(payload)

    def called(self, effect: dict[str, Any], syscall: str, hook: Hook) -> None:
        """A watched system call the kernel is about to run (kit.run.seccomp.HOST_WATCH),
        made with ``hook`` open: a hostname or domainname set in the sandbox's uts namespace
        to another name than its own before the run is a change, even one put back before
        the next look; a signal sent to the sandbox's init (the host's, as the run sees it)
        is one to a process the run did not start."""
        kind = effect.get("kind")
        if kind in ("hostname", "domainname"):
            value = effect.get("value")
            if value != self.before.objects.get(kind, {}).get(""):
                # setdefault: a look that saw the change first keeps its sighting.
                self.seen.setdefault((kind, kind), {"value": value, "hooks": [hook]})
        elif kind == "signal" and isinstance(effect.get("signal"), int):
            key = (effect["signal"], hook)
            if key not in self.signalled and len(self.signalled) < MAX_CHANGES:
                self.signalled[key] = syscall

    def look(self) -> None:
        """After a batch of ledger events: any watched object that changed since the last
        look appeared while one of the hooks of the window was open (the window holds every
        hook open since the last look: events of the batch were sent before this look)."""
        if self._mountinfo is None or not self._joined:
            return
        self.looks += 1
        # Polled before the reads: a change in between is in what is read, and polled again
        # next time (a flag is cleared by the poll that reports it).
        flagged = {fd for fd, ev in self._poller.poll(0) if ev & _FLAGGED}
        now: dict[str, dict[str, str]] = {}
        if not self._uts_fds or not flagged.isdisjoint(self._uts_fds):
            hostname, domainname = _uts_names()
            now = {"hostname": {"": hostname}, "domainname": {"": domainname}}
        # The kernel wakes a poller of mountinfo for a mount or an unmount, not for a change
        # of propagation (MS_PRIVATE and kin): the text is compared too, parsed only if new.
        # Unflagged, no line came or went since the poll: a first read (whole lines) that is
        # the last text, whole, is the text now, without a read that finds its end.
        n = os.preadv(self._mountinfo, [self._page], 0)  # no buffer to allocate each look
        known = self._mount_raw
        if self._mountinfo in flagged or n != len(known) or not self._page.startswith(known):
            raw = _pread_all(self._mountinfo, bytes(memoryview(self._page)[:n]))
            if self._mountinfo in flagged or raw != self._mount_raw:
                self._mount_raw = raw
                now["mount"] = parse_mounts(raw.decode(errors="replace").strip())
        if self._mountinfo in flagged and now.get("mount") == self.last["mount"]:
            # The kernel flags a mount, an unmount or a remount in the sandbox's mount
            # namespace only (not in a namespace copied from it), yet the table reads as at
            # the last look: the change was undone in between (SPEC §11: not even for a
            # moment).
            self.seen.setdefault(
                ("mount", UNDONE_MOUNT),
                {"value": UNDONE_MOUNT_TEXT, "hooks": sorted(self.window)},
            )
        usage = self._upper_usage()
        if usage != self._usage:  # a file was copied up, created, grown or deleted
            self._usage = usage
            now["file"] = _read_all_files(self.sandbox, None, HostState())
        for kind, objects in now.items():
            last = self.last[kind]
            for name in last.keys() | objects.keys():
                if last.get(name) != objects.get(name):
                    self.seen.setdefault(
                        (kind, name or kind),
                        {"value": objects.get(name), "hooks": sorted(self.window)},
                    )
            self.last[kind] = objects
        self.window = set(self.open)

    def _upper_usage(self) -> tuple[int, ...]:
        """Free blocks and inodes of the file systems of the upper layers: one statvfs each
        tells, for nothing, whether a look must walk them (a rewrite in place that keeps the
        size is missed: that change is still in the diff, without the hooks)."""
        usage: list[int] = []
        for fd in self._uppers:
            st = os.fstatvfs(fd)
            usage += (st.f_bfree, st.f_ffree)
        return tuple(usage)

    def close(self) -> None:
        """After :meth:`finish`: the sysctl files' descriptors closed."""
        close_all([fd for _, fd in self._machine or ()])
        self._machine = None
        fds, self._sysctl_fds = self._sysctl_fds, None
        if fds is not None:
            close_all([fd for fd in fds if fd is not None])

    def finish(self) -> dict[str, Any]:
        """After the run: the fields of the ledger's ``host_changes`` event. Each change is
        ``HostChange.to_json()`` with ``hooks`` (open when it appeared; None when the ledger
        cannot tell) and ``transient`` (seen during the run, gone at its end)."""
        looked = self._mountinfo is not None and self._joined
        self.look()
        if self._mountinfo is not None:
            os.close(self._mountinfo)
            self._mountinfo = None
        for fd in [*self._uppers, *self._uts_fds]:
            os.close(fd)
        self._uppers, self._uts_fds = [], ()
        network = self._net is None or _notified(self._net)
        if self._net is not None:
            self._net.close()
        laid_out = None
        if not network and "net" not in self._join().failed:
            # No link came or went: the files are a fresh sandbox's, known without a listing.
            held = self._sysctl_fds
            if held is not None and len(held) != _layout_size():
                held = None  # opened for another layout: the files are opened anew
            laid_out = _sysctls_as_laid_out(held)
        # The last look read the mount table (its text, parsed if new): no need to again.
        after = self._snapshot(sysctls=laid_out is None, network=network, mounts=not looked)
        _outside(after, "machine_sysctl", lambda: read_machine_sysctls(self._machine))
        close_all([fd for _, fd in self._machine or ()])
        self._machine = None
        if looked:
            after.objects["mount"] = self.last["mount"]
        if laid_out is not None:
            after.objects["sysctl"] = laid_out
        if self.inside is not None:
            self.inside.leave()
            self.inside = None
        if network:  # changed (or not watched): compared with a fresh sandbox's
            try:
                self.before.objects.update(_fresh_network_now())
            except OSError as exc:
                for kind in ("link", "address", "route"):
                    self.before.errors[kind] = str(exc)
        template = self.before.objects.get("sysctl")
        now = after.objects.get("sysctl")
        if (
            template is _fresh_sysctls
            and now is not template  # the same dict: every file read as the fresh sandbox's
            and now != template
            and linux.in_initial_user_namespace()  # else no fresh one now: see _fresh_network_now
        ):
            # A different value, or the cached template is stale: the host's defaults for
            # new network namespaces moved since it was read. Read a fresh one now.
            self.before.objects["sysctl"] = _fresh(read_sysctls)
        out: list[dict[str, Any]] = []
        final = diff(self.before, after)
        for change in final:
            seen = self.seen.get((change.kind, change.name))
            entry = {
                **change.to_json(),
                "transient": False,
                "hooks": _hooks_json(seen["hooks"]) if seen else None,
            }
            out.append(_machine_marked(entry, self.before))
        named = {(c.kind, c.name) for c in final}
        for (kind, name), seen in self.seen.items():
            if (kind, name) not in named and kind in WATCHED:  # a temporary file is allowed
                was = self.before.objects.get(kind, {}).get("" if name == kind else name)
                out.append(
                    {
                        "kind": kind,
                        "name": name,
                        "before": was,
                        "after": seen["value"],
                        "transient": True,
                        "hooks": _hooks_json(seen["hooks"]),
                    }
                )
        init = self.before.objects.get("process", {}).get("pid 1", "the sandbox's init")
        for (signum, hook), syscall in self.signalled.items():
            out.append(
                {
                    "kind": "process",
                    "name": "pid 1",
                    "before": init,
                    "after": init,
                    "signal": _signal_name(signum),
                    "syscall": syscall,
                    "transient": False,
                    "hooks": _hooks_json([hook]),
                }
            )
        omitted: dict[str, int] = {}
        for extra in out[MAX_CHANGES:]:
            omitted[extra["kind"]] = omitted.get(extra["kind"], 0) + 1
        return {
            "changes": out[:MAX_CHANGES],
            "omitted": omitted,
            "errors": {**self.before.errors, **after.errors},
            "looks": self.looks,
        }


def _partial(
    sandbox: Sandbox,
    inside: Inside | None,
    sysctls: bool,
    network: bool = False,
    mounts: bool = True,
) -> HostState:
    """What :func:`snapshot` reads, but the sysctls only when ``sysctls``, links, addresses
    and routes only when ``network``, the mount table only when ``mounts``."""
    only = INSIDE_KINDS - {"sysctl", "link", "address", "route"}
    only |= {"sysctl"} if sysctls else set()
    only |= {"link", "address", "route"} if network else set()
    return snapshot(sandbox, only=frozenset(only), inside=inside, mounts=mounts)


#: The kinds of a sandbox's state before its run that a thread in its namespaces reads (the
#: sysctls are a fresh sandbox's, links, addresses and routes are read after only if changed).
_BEFORE_INSIDE = INSIDE_KINDS - {"sysctl", "link", "address", "route"}


def fresh_state(sandbox: Sandbox, inside: Inside | None = None) -> HostState:
    """A sandbox's state before its run: the sysctls are a fresh sandbox's (:func:`prime`),
    links, addresses and routes are read after the run only if they changed. ``inside``:
    the calling thread is in its namespaces. Else what is read from outside only, but the
    mount table (:func:`read_ahead` reads the rest, a short-lived thread reads the sysctls
    only if no fresh sandbox's are known)."""
    if inside is not None:
        state = _partial(sandbox, inside, sysctls=_fresh_sysctls is None)
    else:
        only = {"mqueue"} if getattr(sandbox, "mqueue_dir", "") else set()
        only |= {"sysctl"} if _fresh_sysctls is None else set()
        state = snapshot(sandbox, only=frozenset(only), mounts=False)
    if _fresh_sysctls is not None:
        state.objects["sysctl"] = _fresh_sysctls
    return state


#: What a poll of a mountinfo or a uts sysctl reports when it flags a change (POLLNVAL: the
#: fd is gone, nothing can be known through it).
_FLAGGED = select.POLLPRI | select.POLLERR | select.POLLNVAL


def _uts_watch() -> tuple[int, ...]:
    """The hostname and domainname sysctls, open for polling: the kernel flags each open file
    of them at every change of either name in any uts namespace (``uts_proc_notify``), so a
    look reads the names only after a change somewhere, not at every look. Empty when they
    cannot be opened: every look then reads the names."""
    fds: list[int] = []
    try:
        for name in ("hostname", "domainname"):
            fds.append(os.open(f"/proc/sys/kernel/{name}", os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        for fd in fds:
            os.close(fd)
        return ()
    return tuple(fds)


_libc = ctypes.CDLL(None, use_errno=True)
#: Looked up once, where the module is imported (the zygote): the first lookup, a dlsym,
#: cost each supervisor about 0.1 ms.
_uname = _libc.uname
#: Bytes of each field of ``struct utsname`` (``_UTSNAME_LENGTH``), six fields.
_UTS_FIELD = 65


def _uts_names() -> tuple[str, str]:
    """A look's read of the hostname and domainname (:func:`_uname_names`)."""
    return _uname_names()


def _uname_names() -> tuple[str, str]:
    """The hostname and domainname of the calling thread's uts namespace, as their sysctls
    read (less their newline, not stripped: "x " is not "x"): one uname(2) for both, not
    an open, read and close of a file."""
    buf = ctypes.create_string_buffer(6 * _UTS_FIELD)
    if _uname(buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    raw = buf.raw

    def field(i: int) -> str:
        value = raw[i * _UTS_FIELD : (i + 1) * _UTS_FIELD].split(b"\0", 1)[0]
        return value.decode(errors="replace")

    return field(1), field(5)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _machine_marked(change: dict[str, Any], before: HostState) -> dict[str, Any]:
    """``change`` (a ``host_changes`` entry), with ``machine`` set when its object is one of
    the machine's own sysctls: the real host's, not the sandbox's (it stays after the run)."""
    if change["kind"] == "sysctl" and change["name"] in before.objects.get("machine_sysctl", ()):
        return {**change, "machine": True}
    return change


def _hooks_json(hooks: list[Hook]) -> list[dict[str, Any]]:
    return [{"role": role, "hook": hook, "pid": pid} for role, hook, pid in hooks]
