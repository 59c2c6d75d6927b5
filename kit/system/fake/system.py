"""FakeSystem: the system interface on the model instead of the kernel."""

from __future__ import annotations

import copy
import errno
import os
import re
import signal
import socket
import stat
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kit.ledger import probe
from kit.ledger.probe import FULL_MAP
from kit.system import System, linux
from kit.system.fake.model import (
    CAP_SYS_CHROOT,
    FIRST_SYNTHETIC_ID,
    KINDS,
    Cred,
    Model,
    Task,
    fail,
    resolve,
)
from kit.system.fake.store import Store

_NS_PATH = re.compile(r"/proc/(self|thread-self|\d+)(?:/task/\d+)?/ns/([a-z_]+)")
#: /proc/PID/ns names -> the kit's kind names.
_NS_NAMES = {name: kind for kind, (_, name) in linux.NAMESPACES.items()}
IFF_UP = 0x1


@dataclass
class ProcState:
    """One process as the model sees it."""

    real_pid: int
    cred: Cred  # every thread without its own credentials (see thread_creds)
    ns: dict[str, int]
    pid_for_children: int
    levels: list[list[int]]  # [[pid ns, pid], ...] in the model's own pid namespaces
    dumpable: int
    fs: int  # id of the fs struct (root, cwd) in the store
    thread_creds: dict[int, Cred] = field(default_factory=dict)
    #: (real pid, its start time) as last read: a fork's copy reads its own again.
    _start: tuple[int, int | None] = field(default=(0, None), compare=False, repr=False)

    def start(self) -> int | None:
        """When the process ``real_pid`` names started (see :func:`linux.process_start`)."""
        if self._start[0] != self.real_pid or self._start[1] is None:
            self._start = (self.real_pid, linux.process_start(self.real_pid))
        return self._start[1]

    def entry(self) -> dict[str, Any]:
        """This process in the store's registry (what other processes may look at)."""
        leader = self.thread_creds.get(self.real_pid, self.cred)
        return {
            "ns": dict(self.ns),
            "pidc": self.pid_for_children,
            "levels": [list(x) for x in self.levels],
            "cred": leader.to_json(),
            "dumpable": self.dumpable,
            "fs": self.fs,
            "start": self.start(),
        }


def _alive(pid: int, entry: dict[str, Any]) -> bool:
    """Whether the registry's ``entry`` for ``pid`` describes a live process: the number
    may have gone to another process since (the start time tells)."""
    return linux.process_alive(pid) and _same(pid, entry)


def _same(pid: int, entry: dict[str, Any]) -> bool:
    """Whether ``pid`` still names the process of ``entry`` (an entry whose start time
    could not be read cannot tell: taken for the same, as before start times)."""
    return entry.get("start") is None or linux.process_start(pid) == entry["start"]


def _kill_if_same(pid: int, entry: dict[str, Any]) -> None:
    """SIGKILL the process the registry's ``entry`` describes, if ``pid`` still names it:
    an entry outlives its process, and the number may since have gone to another (through
    a pidfd, so that the process checked is the one signalled)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # gone
    try:
        if _same(pid, entry):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass  # gone since
    finally:
        os.close(fd)


def _read_text(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def _read_map(path: str) -> list[list[int]]:
    return [
        [int(x) for x in line.split()] for line in _read_text(path).splitlines() if line.strip()
    ]


def _real_mounts() -> list[dict[str, Any]]:
    """The host mount table (``/proc/self/mountinfo``) as model mounts."""
    mounts = []
    for line in _read_text("/proc/self/mountinfo").splitlines():
        fields = line.split()
        if len(fields) < 7:
            continue
        sep = fields.index("-")
        options = set(fields[5].split(","))
        propagation = linux.propagation_type(fields[6:sep])
        mounts.append(
            {
                "id": int(fields[0]),
                "target": linux.unescape_mountinfo(fields[4]),
                "source": (
                    linux.unescape_mountinfo(fields[sep + 2]) if len(fields) > sep + 2 else "none"
                ),
                "fstype": fields[sep + 1],
                "flags": sorted(f for f in ("ro", "nosuid", "nodev", "noexec") if f in options),
                "locked_flags": [],
                "locked": False,
                "propagation": propagation,
                "bind": False,
                "data": None,
            }
        )
    return mounts


def _real_links() -> dict[str, bool]:
    links = {}
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        names = ["lo"]
    for name in names:
        try:
            flags = int(_read_text(f"/sys/class/net/{name}/flags", "0x0").strip(), 16)
        except ValueError:
            flags = 0
        links[name] = bool(flags & IFF_UP)
    return links


def _filesystems() -> list[str]:
    names = [
        line.split()[-1] for line in _read_text("/proc/filesystems").splitlines() if line.strip()
    ]
    return sorted(set(names) | {"proc", "tmpfs", "sysfs"})


def initial_state(needs_root: bool) -> tuple[dict[str, Any], ProcState]:
    """The model of this (real) process and its namespaces.

    Credentials are the real ones, except when ``needs_root`` and the process is not root:
    then the model starts as uid/gid 0 with every capability of the real bounding set
    (effective, permitted, bounding), which is what a real root has on this machine."""
    status = linux.read_status()
    ruid, euid, suid = os.getresuid()
    rgid, egid, sgid = os.getresgid()
    fsuid = int(status["Uid"].split()[3])
    fsgid = int(status["Gid"].split()[3])
    eff, prm, inh = linux.capget()
    bnd = int(status.get("CapBnd", "0"), 16)
    amb = int(status.get("CapAmb", "0"), 16)
    nsids: dict[str, int] = {}
    synthetic = FIRST_SYNTHETIC_ID - 0x100  # only if /proc/self/ns cannot be read
    for kind in KINDS:
        try:
            nsids[kind] = linux.ns_inode(kind)
        except OSError:
            nsids[kind] = synthetic
            synthetic += 1
    user = nsids["user"]
    cred = Cred(
        [ruid, euid, suid, fsuid],
        [rgid, egid, sgid, fsgid],
        sorted(os.getgroups()),
        eff,
        prm,
        inh,
        bnd,
        amb,
        securebits=linux.get_securebits(),
        no_new_privs=linux.get_no_new_privs(),
        userns=user,
    )
    if needs_root and euid != 0:
        cred = Cred(
            [0, 0, 0, 0],
            [0, 0, 0, 0],
            [],
            bnd,
            bnd,
            0,
            bnd,
            0,
            securebits=0,
            no_new_privs=cred.no_new_privs,
            userns=user,
        )
    try:
        suid_dumpable = int(_read_text("/proc/sys/fs/suid_dumpable", "0").strip() or 0)
    except ValueError:
        suid_dumpable = 0
    owner = {"owner": user, "initial": True}
    ns: dict[str, dict[str, Any]] = {
        str(user): {
            "kind": "user",
            "parent": None,
            "level": 0,
            "owner": 0,
            "group": 0,
            "uid_map": None,
            "gid_map": None,
            "initial": True,
            "shown_uid_map": _read_map("/proc/self/uid_map") or FULL_MAP,
            "shown_gid_map": _read_map("/proc/self/gid_map") or FULL_MAP,
            "setgroups": _read_text("/proc/self/setgroups", "allow").strip() or "allow",
            "parent_could_setfcap": True,
        },
        str(nsids["pid"]): {
            "kind": "pid",
            "parent": None,
            "level": 0,
            "last_pid": 0,
            "init": None,
            **owner,
        },
        str(nsids["uts"]): {
            "kind": "uts",
            "hostname": socket.gethostname(),
            "domainname": _read_text("/proc/sys/kernel/domainname", "(none)").strip(),
            **owner,
        },
        str(nsids["net"]): {"kind": "net", "links": _real_links(), **owner},
        str(nsids["ipc"]): {"kind": "ipc", **owner},
        str(nsids["cgroup"]): {"kind": "cgroup", **owner},
        str(nsids["mount"]): {"kind": "mount", "root": "/", "mounts": _real_mounts(), **owner},
    }
    state = {
        "version": 1,
        "cap_last": linux.cap_last(),
        "suid_dumpable": suid_dumpable,
        "filesystems": _filesystems(),
        "init": nsids,
        "next_ns": FIRST_SYNTHETIC_ID,
        "next_mount": 1 << 20,
        "next_fs": 1,
        "ns": ns,
        "procs": {},
        "fs": {"0": {"cwd": os.getcwd(), "root": None}},
        "paths": {},
    }
    proc = ProcState(
        real_pid=os.getpid(),
        cred=cred,
        ns=dict(nsids),
        pid_for_children=nsids["pid"],
        levels=[],
        dumpable=linux.get_dumpable(),
        fs=0,
    )
    return state, proc


# --- fork hooks (one set per process; they act on the active FakeSystem) --------------------

_active: FakeSystem | None = None
_hooks_registered = False


def _before_fork() -> None:
    if _active is not None:
        _active._before_fork()


def _after_fork_in_parent() -> None:
    if _active is not None:
        _active._after_fork_in_parent()


def _after_fork_in_child() -> None:
    if _active is not None:
        _active._after_fork_in_child()


def activate(system: FakeSystem | None) -> None:
    """Make ``system`` the one the fork hooks of this process keep right (None: none)."""
    global _active, _hooks_registered
    _active = system
    if system is not None and not _hooks_registered:
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_in_parent,
            after_in_child=_after_fork_in_child,
        )
        _hooks_registered = True


class FakeSystem(System):
    """The model. Create with :meth:`create` in the process that forks the run.

    It implements every method of :class:`kit.system.RealSystem` on the model
    (:mod:`kit.system.fake.model`); the starter, the engine and the probes call it exactly as they
    call the real one, and the processes, order, sockets, RPC and ledger of a run are the real ones.

    Per-process state (:class:`ProcState`: credentials of each thread, the namespaces the process is
    in, its pids, its dumpable flag) lives in this object and is copied by ``fork`` exactly as the
    kernel copies it (``os.register_at_fork`` keeps the copy right for forks the kit does not make
    itself). Shared state (namespaces, the registry of real pids, fs structs, directories made only
    in the model) lives in the :class:`~kit.system.fake.store.Store`.

    Nothing here changes a real credential or namespace. Real effects are limited to: forking
    (``clone`` really forks and gives the child the new model namespaces; with ``share_fs`` through
    the real ``clone(CLONE_FS)``, which needs no privilege), ``chdir`` (into directories that really
    exist), and ``mkdir`` inside the run's temporary directory. ``getpid``/``getppid`` answer in the
    model's pid namespaces (1 for the first process of a new one).

    Initial state (:func:`initial_state`): the real supervisor's credentials, namespaces (their real
    inode numbers), hostname, interfaces and mount table — except that a flow that needs root (root,
    suid, hybrid) run by a non-root user starts the model as uid/gid 0 with every capability of the
    real bounding set (the set a real root has on this machine).

    Probes: :meth:`snapshot` and :meth:`escalation` return the structures of
    :func:`kit.ledger.probe.snapshot` and :func:`kit.ledger.probe.escalation`, computed from the
    model (threads listed by real tid; no probe child is forked): each escalation way by its own
    rule (setresuid, capset, and ``bprm_fill_uid`` for the run's setuid-root binary, which exists in
    the model only), relative to the model's initial user namespace, the one the kit was launched
    in.

    Containment: an engine that makes a privileged call itself (not through the system interface)
    would act on the real kernel: every process of a fake run is under the seccomp filter of
    :mod:`kit.run.seccomp` (installed by the starter before anything else), so the call fails with
    EPERM, the supervisor records it and HOST-050 fails. The kit's own fake code needs none of the
    refused calls: credentials, namespaces, mounts and hostnames are the model's; it forks (plain
    ``fork``, ``clone(CLONE_FS)``) and starts threads, which stay allowed.
    """

    name = "fake"

    def __init__(self, store: Store, proc: ProcState) -> None:
        self._store = store
        self._proc = proc
        self._cloning = False
        self._fork_cred: Cred | None = None

    @classmethod
    def create(
        cls,
        needs_root: bool = False,
        directory: str | None = None,
        initial: tuple[dict[str, Any], ProcState] | None = None,
    ) -> FakeSystem:
        """A model of this process (see :func:`initial_state`) with a new store. ``initial``
        is what :func:`initial_state` returned in a process with the same credentials,
        namespaces and working directory (the zygote, just before it forked this one)."""
        state, proc = initial if initial is not None else initial_state(needs_root)
        proc.real_pid = os.getpid()
        state["procs"][str(proc.real_pid)] = proc.entry()
        system = cls(Store.create(state, directory), proc)
        activate(system)
        return system

    def close(self) -> None:
        """Forget the model (the run is over): remove the store."""
        global _active
        if _active is self:
            _active = None
        self._store.remove()

    def while_model_locked(self, callback: Callable[[], None] | None) -> None:
        """``callback`` runs between attempts to take the model's lock (see ``Store.waiting``)."""
        self._store.waiting = callback

    # -- internals ------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        return self._store

    def _me(self) -> ProcState:
        p = self._proc
        if p.real_pid != os.getpid():  # forked without the hooks (not by Python's fork)
            self._after_fork_in_child(from_hook=False)
        return self._proc

    def _cred(self) -> Cred:
        p = self._me()
        return p.thread_creds.get(threading.get_native_id(), p.cred)

    def _set_thread_cred(self, new: Cred) -> None:
        p = self._proc
        tid = threading.get_native_id()
        if tid in p.thread_creds:
            p.thread_creds[tid] = new
        elif threading.active_count() <= 1 and not p.thread_creds:
            p.cred = new
        else:  # only this thread changes (capset, prctl act on the calling thread)
            p.thread_creds[tid] = new

    def _register(self, st: dict[str, Any]) -> None:
        st["procs"][str(self._proc.real_pid)] = self._proc.entry()

    def _fs(self, st: dict[str, Any]) -> dict[str, Any]:
        """This process's fs struct (a fresh one, recorded only in a write transaction)."""
        key = str(self._proc.fs)
        fs: dict[str, Any] | None = st["fs"].get(key)
        if fs is None:
            fs = {"cwd": "/", "root": None}
            if self._store.writing:
                st["fs"][key] = fs
        return fs

    def _root(self, st: dict[str, Any]) -> str:
        fs = self._fs(st)
        root: str = fs["root"] or Model(st).ns(self._proc.ns["mount"])["root"]
        return root

    def _host(self, st: dict[str, Any], path: str) -> str:
        return resolve(self._root(st), self._fs(st)["cwd"], path)

    def _task(self, st: dict[str, Any]) -> Task:
        p = self._me()
        fs = self._fs(st)
        mnt_root = Model(st).ns(p.ns["mount"])["root"]
        users = 0
        for pid, entry in st["procs"].items():
            if entry.get("fs") == p.fs and (int(pid) == p.real_pid or _alive(int(pid), entry)):
                users += 1
        try:
            threads = len(os.listdir("/proc/self/task"))
        except OSError:
            threads = threading.active_count()
        return Task(
            ns=dict(p.ns),
            pid_for_children=p.pid_for_children,
            chrooted=fs["root"] is not None and fs["root"] != mnt_root,
            threads=threads,
            fs_users=max(users, 1),
            cwd=fs["cwd"],
            root=fs["root"] or mnt_root,
        )

    def _new_fs(self, st: dict[str, Any]) -> int:
        """A copy of this process's fs struct (fork without CLONE_FS)."""
        fid = Model(st).new_id("next_fs")
        st["fs"][str(fid)] = dict(self._fs(st))
        return fid

    def _alloc_pids(self, m: Model, pidns: int) -> list[list[int]]:
        """``alloc_pid``: a pid in ``pidns`` and in each of its model ancestors (outermost
        first); ENOMEM once the namespace's pid 1 is gone."""
        chain = []
        nsid: int | None = pidns
        while nsid is not None:
            ns = m.ns(nsid)
            if ns.get("parent") is None:
                break
            chain.append(nsid)
            nsid = ns["parent"]
        levels = []
        for nsid in reversed(chain):
            ns = m.ns(nsid)
            init = ns.get("init")
            if init is not None and not _alive(init, m.s["procs"].get(str(init)) or {}):
                raise fail(errno.ENOMEM, "fork: the pid namespace's init has exited")
        for nsid in reversed(chain):
            ns = m.ns(nsid)
            ns["last_pid"] += 1
            levels.append([nsid, ns["last_pid"]])
        return levels

    def _change(self, fn: Callable[[Model, Cred], Cred], process_wide: bool = False) -> None:
        """Apply a credential change to the calling thread (or, like glibc's setxid
        broadcast, to every thread); commit_creds resets dumpable when it must."""
        with self._store.transaction() as st:
            m = Model(st)
            p = self._me()
            old = self._cred()
            new = fn(m, old)
            if new is old:
                return
            if process_wide:
                tid = threading.get_native_id()
                others = {t: c for t, c in p.thread_creds.items() if t != tid}
                if tid in p.thread_creds:
                    p.thread_creds[tid] = new
                    try:
                        p.cred = fn(m, p.cred)
                    except OSError:
                        pass
                else:
                    p.cred = new
                for t, c in others.items():
                    try:
                        p.thread_creds[t] = fn(m, c)
                    except OSError:
                        pass
            else:
                self._set_thread_cred(new)
            p.dumpable = m.dumpable_after(old, new, p.dumpable)
            self._register(st)

    # -- fork ------------------------------------------------------------------------------------
    def _before_fork(self) -> None:
        self._store.before_fork()
        self._fork_cred = self._cred()

    def _after_fork_in_parent(self) -> None:
        self._store.after_fork_in_parent()

    def _after_fork_in_child(self, from_hook: bool = True) -> None:
        if from_hook:  # else the store noticed the new pid itself (Store.begin)
            self._store.after_fork_in_child()
        p = self._proc
        if from_hook and self._fork_cred is not None:
            p.cred = self._fork_cred  # the forking thread's credentials
        self._fork_cred = None
        p.thread_creds = {}
        p.real_pid = os.getpid()
        if self._cloning:
            return  # clone() sets the child up itself
        # A plain fork: the child is in the parent's pid namespace for children, with a
        # copy of its fs struct.
        try:
            with self._store.transaction() as st:
                m = Model(st)
                p.ns["pid"] = p.pid_for_children
                try:
                    p.levels = self._alloc_pids(m, p.pid_for_children)
                except OSError:
                    p.levels = []
                p.fs = self._new_fs(st)
                self._register(st)
        except OSError:
            pass

    # -- identity ----------------------------------------------------------------------------
    def getpid(self) -> int:
        p = self._me()
        return p.levels[-1][1] if p.levels else os.getpid()

    def modelled_pids(self, kernel_pid: int) -> set[int]:
        """The pid process ``kernel_pid`` has in its innermost pid namespace of the model."""
        with self._store.transaction(write=False) as st:
            levels = (st["procs"].get(str(kernel_pid)) or {}).get("levels") or []
        return {int(levels[-1][1])} if levels else set()

    def getppid(self) -> int:
        """The parent's pid in this process's pid namespace; 0 when the parent is outside."""
        p = self._me()
        real = os.getppid()
        if not p.levels:
            return real
        mine = p.levels[-1][0]
        with self._store.transaction(write=False) as st:
            entry = st["procs"].get(str(real))
            for nsid, pid in (entry or {}).get("levels", []):
                if nsid == mine:
                    return int(pid)
        return 0

    def privileged(self) -> bool:
        """euid 0 in the host user namespace: the model's initial one, the namespace the kit
        was launched in (as :meth:`escalation` and :func:`kit.ledger.probe.host_privilege`
        judge)."""
        with self._store.transaction(write=False) as st:
            cred = self._cred()
            return cred.userns == Model(st).initial("user") and cred.uid[1] == 0

    # -- namespaces ------------------------------------------------------------------------------
    def unshare(self, kinds: Iterable[str]) -> None:
        kinds = list(kinds)
        if not kinds:
            return
        with self._store.transaction() as st:
            m = Model(st)
            p = self._me()
            old = self._cred()
            task = self._task(st)
            new, ns, pidc = m.plan_namespaces(old, task, kinds, clone=False)
            if ("user" in kinds or "mount" in kinds) and task.fs_users > 1:
                p.fs = self._new_fs(st)  # CLONE_FS is unshared with them
            p.ns, p.pid_for_children = ns, pidc
            if new is not old:
                p.cred = new
                p.thread_creds = {}
                p.dumpable = m.dumpable_after(old, new, p.dumpable)
            self._register(st)

    def _lookup(self, st: dict[str, Any], path: str, kind: str | None) -> int:
        """The namespace id that ``path`` names (``/proc/PID/ns/NAME`` through the registry;
        another path by its real inode, adopted into the model if unknown)."""
        m = Model(st)
        match = _NS_PATH.fullmatch(os.path.normpath(path))
        if match:
            who, name = match.groups()
            if name != "pid_for_children" and name not in _NS_NAMES:
                raise fail(errno.ENOENT, path)
            entry: dict[str, Any] | None
            if who in ("self", "thread-self") or int(who) == os.getpid():
                entry = self._proc.entry()
            else:
                entry = st["procs"].get(who)
                if entry is not None and not linux.process_alive(int(who)):
                    raise fail(errno.ENOENT, path)
                if entry is not None and not _same(int(who), entry):
                    entry = None  # the number went to a process the model never saw
                if entry is not None and not m.may_ptrace_read(self._cred(), entry, False):
                    raise fail(errno.EACCES, path)
            if entry is not None:
                if name == "pid_for_children":
                    return int(entry["pidc"])
                return int(entry["ns"][_NS_NAMES[name]])
            kind = kind or (_NS_NAMES.get(name) if name != "pid_for_children" else "pid")
        ino = os.stat(path).st_ino  # a real namespace file: the real error if any
        if m.has_ns(ino):
            return ino
        if kind is None or kind == "user":
            raise fail(errno.EINVAL, f"{path}: a namespace the model does not know")
        owner = m.initial("user")
        current = m.ns(self._proc.ns[kind] if kind != "pid" else self._proc.ns["pid"])
        if self._store.writing:  # a read transaction answers without adopting
            record = copy.deepcopy({k: v for k, v in current.items() if k != "initial"})
            record.update(kind=kind, owner=owner, adopted=True)
            st["ns"][str(ino)] = record
        return ino

    def setns(self, kind: str, path: str) -> None:
        if kind not in linux.NAMESPACES:
            raise KeyError(kind)
        with self._store.transaction() as st:
            m = Model(st)
            p = self._me()
            nsid = self._lookup(st, path, kind)
            old = self._cred()
            task = self._task(st)
            new, ns, pidc = m.install(old, task, kind, nsid)
            if kind == "mount" and task.fs_users > 1:
                p.fs = self._new_fs(st)
            if kind == "mount":
                fs = self._fs(st)
                fs["root"] = None
                fs["cwd"] = m.ns(nsid)["root"]
            p.ns, p.pid_for_children = ns, pidc
            if new is not old:
                p.cred = new
                p.thread_creds = {}
                p.dumpable = m.dumpable_after(old, new, p.dumpable)
            self._register(st)

    def clone(self, kinds: Iterable[str] = (), share_fs: bool = False) -> int:
        """A real fork (``clone(CLONE_FS)`` with ``share_fs``); the child is in the new
        model namespaces. Returns the child's *real* pid (the starter waits for it with
        the real ``waitpid``), 0 in the child."""
        kinds = list(kinds)
        st = self._store.begin()
        try:
            m = Model(st)
            p = self._me()
            old = self._cred()
            task = self._task(st)
            new, ns, pidc = m.plan_namespaces(old, task, kinds, clone=True, share_fs=share_fs)
            levels = self._alloc_pids(m, ns["pid"])
            fs = p.fs if share_fs else self._new_fs(st)
            if "mount" in kinds:
                fs_rec = st["fs"][str(fs)]
                fs_rec["root"] = fs_rec["root"] if fs_rec["root"] != task.root else None
        except BaseException:
            self._store.end(commit=False)
            raise
        child = ProcState(
            real_pid=0,
            cred=new,
            ns=ns,
            pid_for_children=pidc,
            levels=levels,
            dumpable=p.dumpable,
            fs=fs,
        )
        self._store.end(commit=True, keep_locked=True)
        self._cloning = True
        try:
            pid = linux.clone(linux.CLONE_FS) if share_fs else os.fork()
        except BaseException:
            self._cloning = False
            self._store.end(commit=False)
            raise
        if pid == 0:
            self._cloning = False
            child.real_pid = os.getpid()
            self._proc = child
            return 0
        try:
            child.real_pid = pid
            st["procs"][str(pid)] = child.entry()
            if levels and levels[-1][1] == 1:
                m.ns(levels[-1][0])["init"] = pid
        finally:
            self._cloning = False
            self._store.end(commit=True)
        return pid

    def ns_inode(self, kind: str, pid: int | str = "self") -> int:
        name = linux.NAMESPACES[kind][1]
        if pid == "self" or pid == os.getpid():
            return int(self._me().ns[kind])
        with self._store.transaction(write=False) as st:
            return self._lookup(st, f"/proc/{pid}/ns/{name}", kind)

    def write_id_maps(
        self,
        pid: int | str,
        uid_map: list[list[int]],
        gid_map: list[list[int]],
        deny_setgroups: bool,
    ) -> None:
        """``/proc/PID/{setgroups,gid_map,uid_map}``, in that order, each a separate write
        (what was written before a refusal stays written, as with the kernel)."""
        error: OSError | None = None
        with self._store.transaction() as st:
            m = Model(st)
            me = pid == "self" or int(pid) == os.getpid()
            entry = self._proc.entry() if me else st["procs"].get(str(pid))
            if entry is None or (not me and not _alive(int(pid), entry)):
                raise fail(errno.ENOENT, f"/proc/{pid}/uid_map")
            userns = int(entry["ns"]["user"])
            cred = self._cred()
            owner = m.dump_owner(entry)
            steps: list[tuple[str, Any]] = []
            if deny_setgroups:
                steps.append(("setgroups", "deny"))
            steps += [("gid_map", gid_map), ("uid_map", uid_map)]
            try:
                for name, value in steps:
                    if not m.may_open_write(cred, owner):
                        raise fail(errno.EACCES, f"/proc/{pid}/{name}")
                    if name == "setgroups":
                        m.write_setgroups(cred, userns, value)
                    else:
                        m.write_map(cred, userns, name, [list(x) for x in value])
            except OSError as exc:
                error = exc
        if error is not None:
            raise error

    # -- credentials -------------------------------------------------------------------------
    def setresuid(self, ruid: int, euid: int, suid: int) -> None:
        self._change(lambda m, c: m.setresuid(c, ruid, euid, suid), process_wide=True)

    def setresgid(self, rgid: int, egid: int, sgid: int) -> None:
        self._change(lambda m, c: m.setresgid(c, rgid, egid, sgid), process_wide=True)

    def setgroups(self, groups: list[int]) -> None:
        self._change(lambda m, c: m.setgroups(c, groups), process_wide=True)

    def getresuid(self) -> tuple[int, int, int]:
        with self._store.transaction(write=False) as st:
            m, c = Model(st), self._cred()
            return tuple(m.from_kuid_munged(c.userns, u) for u in c.uid[:3])  # type: ignore

    def getresgid(self) -> tuple[int, int, int]:
        with self._store.transaction(write=False) as st:
            m, c = Model(st), self._cred()
            return tuple(m.from_kgid_munged(c.userns, g) for g in c.gid[:3])  # type: ignore

    def set_keepcaps(self, value: bool) -> None:
        self._change(lambda m, c: m.set_keepcaps(c, value))

    def capabilities(self) -> tuple[int, int, int]:
        c = self._cred()
        return c.eff, c.prm, c.inh

    def set_capabilities(self, effective: int, permitted: int, inheritable: int) -> None:
        self._change(lambda m, c: m.capset(c, effective, permitted, inheritable))

    def limit_bounding(self, keep: int) -> None:
        def drop(m: Model, c: Cred) -> Cred:
            for cap in range(m.cap_last + 1):
                if not keep >> cap & 1 and m.bounding_read(c, cap):
                    c = m.bounding_drop(c, cap)
            return c

        self._change(drop)

    def set_ambient(self, mask: int) -> None:
        self._change(lambda m, c: m.ambient_clear(c))
        for cap in range(64):
            if mask >> cap & 1:

                def raise_cap(m: Model, c: Cred, cap: int = cap) -> Cred:
                    return m.ambient_raise(c, cap)

                self._change(raise_cap)

    def set_no_new_privs(self) -> None:
        def nnp(m: Model, c: Cred) -> Cred:
            if c.no_new_privs:
                return c
            new = c.copy()
            new.no_new_privs = True
            return new

        self._change(nnp)

    def set_dumpable(self, value: bool) -> None:
        with self._store.transaction() as st:
            self._me().dumpable = int(bool(value))
            self._register(st)

    # -- mounts and files ---------------------------------------------------------------------
    def _exists(self, st: dict[str, Any], host: str) -> bool:
        if os.path.lexists(host):
            return True
        rec = st["paths"].get(host)
        return rec is not None and rec["mntns"] == self._proc.ns["mount"]

    def _is_dir(self, st: dict[str, Any], host: str) -> bool:
        if os.path.isdir(host):
            return True
        rec = st["paths"].get(host)
        return rec is not None and rec["mntns"] == self._proc.ns["mount"] and rec["dir"]

    def _inode(self, st: dict[str, Any], host: str) -> tuple[int, int, int] | None:
        """(kuid, kgid, mode) of ``host`` as the model sees it: a directory made through
        the model (owned by the model's fsuid, even when it was really made), the root of a
        filesystem the model mounted (owned by its mounter), else the real inode."""
        rec = st["paths"].get(host)
        if rec is not None and rec["mntns"] == self._proc.ns["mount"]:
            return rec["uid"], rec["gid"], rec["mode"] | stat.S_IFDIR
        top = Model.top_mount(Model(st).ns(self._proc.ns["mount"])["mounts"], host)
        if top is not None and top.get("root_inode"):
            uid, gid, mode = top["root_inode"]
            return uid, gid, mode | stat.S_IFDIR
        try:
            s = os.stat(host)
            return s.st_uid, s.st_gid, s.st_mode
        except OSError:
            return None

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None = None,
        flags: Iterable[str] = (),
        data: str | None = None,
    ) -> None:
        flags = list(flags)
        for name in flags:
            if name not in linux.MOUNT_FLAGS:
                raise ValueError(
                    f"unknown mount flag {name!r} (known: {', '.join(linux.MOUNT_FLAGS)})"
                )
        with self._store.transaction() as st:
            m = Model(st)
            host_target = self._host(st, target)
            host_source = source
            if source is not None and ("bind" in flags or "move" in flags):
                host_source = self._host(st, source)
            self._note_model_only_tree(st, m, host_target)
            m.mount(
                self._cred(),
                self._proc.ns["mount"],
                host_source,
                host_target,
                fstype,
                flags,
                data,
                lambda h: self._exists(st, h),
                lambda h: self._is_dir(st, h),
                self._me().ns["pid"],
            )

    def _note_model_only_tree(self, st: dict[str, Any], m: Model, host_target: str) -> None:
        """Record a mount made inside a file system that only the model mounted.

        Such a tree (a bind root file system built on a model tmpfs) does not exist for the
        real VFS, so the engine's own file calls there (mkdir, stat, ismount) see the host's
        directory instead: SPEC §9 makes the run not-configured, not failed.
        """
        under = m.mount_of(m.ns(self._proc.ns["mount"])["mounts"], host_target)
        if under is None or under["target"] in ("/", host_target):
            return
        if os.path.ismount(under["target"]):
            return  # a real mount point: the host's file system, which the VFS sees too
        st.setdefault("model_limits", []).append(
            f"a mount on {host_target} inside the {under['fstype']} that only the model "
            f"mounted at {under['target']}"
        )

    def own_files(self) -> list[str]:
        return self._store.files()

    def model_limits(self) -> list[str]:
        with self._store.transaction(write=False) as st:
            return list(st.get("model_limits", ()))

    def modelled_mounts(self) -> list[str]:
        """The targets (host paths) of the mounts the model made in any namespace: more
        mounts at a target than the real table has there (a tmpfs over a real /tmp counts)."""
        with self._store.transaction(write=False) as st:
            real = Counter(m["target"] for m in Model(st).ns(st["init"]["mount"])["mounts"])
            found: set[str] = set()
            for record in st["ns"].values():
                if record.get("kind") != "mount" or record.get("initial"):
                    continue
                here = Counter(m["target"] for m in record["mounts"])
                found.update(t for t, n in here.items() if n > real.get(t, 0) and t != "/")
            return sorted(found)

    def propagation(self, target: str) -> str | None:
        with self._store.transaction(write=False) as st:
            m = Model(st)
            top = m.top_mount(m.ns(self._me().ns["mount"])["mounts"], self._host(st, target))
            return None if top is None else top["propagation"]

    def umount(self, target: str, detach: bool = False) -> None:
        with self._store.transaction() as st:
            host = self._host(st, target)
            if not self._exists(st, host):
                raise fail(errno.ENOENT, f"umount2({target!r})")
            Model(st).umount(self._cred(), self._proc.ns["mount"], host, detach)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        with self._store.transaction() as st:
            m = Model(st)
            new_host, old_host = self._host(st, new_root), self._host(st, put_old)
            for h in (new_host, old_host):
                if not self._exists(st, h):
                    raise fail(errno.ENOENT, f"pivot_root({new_root!r}, {put_old!r})")
                if not self._is_dir(st, h):
                    raise fail(errno.ENOTDIR, f"pivot_root({new_root!r}, {put_old!r})")
            mntns = self._proc.ns["mount"]
            old_root = self._root(st)
            m.pivot_root(self._cred(), mntns, old_root, new_host, old_host)
            # chroot_fs_refs: every fs whose root or cwd is the old root moves to the new one.
            for fs in st["fs"].values():
                if fs.get("root") == old_root:
                    fs["root"] = None
                if fs.get("cwd") == old_root:
                    fs["cwd"] = new_host

    def _searchable_dir(self, st: dict[str, Any], m: Model, path: str, call: str) -> str:
        """The host path of ``path`` if it is a directory the caller may search (the checks
        chdir and chroot share), else the kernel's errno."""
        host = self._host(st, path)
        if not self._exists(st, host):
            raise fail(errno.ENOENT, f"{call}({path!r})")
        if not self._is_dir(st, host):
            raise fail(errno.ENOTDIR, f"{call}({path!r})")
        inode = self._inode(st, host)
        if inode is not None and not m.permission(
            self._cred(), inode[0], inode[1], inode[2], 1, is_dir=True
        ):
            raise fail(errno.EACCES, f"{call}({path!r})")
        return host

    def chroot(self, path: str) -> None:
        with self._store.transaction() as st:
            m = Model(st)
            host = self._searchable_dir(st, m, path, "chroot")
            cred = self._cred()
            if not m.capable(cred, cred.userns, CAP_SYS_CHROOT):
                raise fail(errno.EPERM, f"chroot({path!r})")
            self._fs(st)["root"] = host

    def chdir(self, path: str) -> None:
        with self._store.transaction() as st:
            host = self._searchable_dir(st, Model(st), path, "chdir")
            self._fs(st)["cwd"] = host
            if os.path.isdir(host):
                try:
                    os.chdir(host)  # real and harmless; shared like the kernel's (CLONE_FS)
                except OSError:
                    pass

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """Really inside the run's temporary directory; elsewhere only in the model."""
        with self._store.transaction() as st:
            m = Model(st)
            host = self._host(st, path)
            if self._exists(st, host):
                raise fail(errno.EEXIST, f"mkdir({path!r})")
            parent = os.path.dirname(host) or "/"
            if not self._exists(st, parent):
                raise fail(errno.ENOENT, f"mkdir({path!r})")
            if not self._is_dir(st, parent):
                raise fail(errno.ENOTDIR, f"mkdir({path!r})")
            inode = self._inode(st, parent)
            cred = self._cred()
            if inode is not None and not m.permission(
                cred, inode[0], inode[1], inode[2], 3, is_dir=True
            ):
                raise fail(errno.EACCES, f"mkdir({path!r})")
            on = m.mount_of(m.ns(self._proc.ns["mount"])["mounts"], parent)
            if on is not None and "ro" in on["flags"]:
                raise fail(errno.EROFS, f"mkdir({path!r})")
            umask = int(linux.read_status().get("Umask", "0022"), 8)
            tmp = os.path.realpath(tempfile.gettempdir())
            real = host.startswith(tmp.rstrip("/") + "/") and os.path.isdir(parent)
            if real:
                os.mkdir(host, mode)
            st["paths"][host] = {
                "mntns": self._proc.ns["mount"],
                "dir": True,
                "mode": mode & 0o7777 & ~umask,
                "uid": cred.uid[3],
                "gid": cred.gid[3],
                "real": real,
            }

    def pid_namespace_init_exited(self, pid: int) -> None:
        """As the kernel does when init of a pid namespace exits: SIGKILL every other
        process of the model's namespace ``pid`` was init of (a daemon left in the
        container's pid namespace dies with it)."""
        with self._store.transaction(write=False) as st:
            procs = st["procs"]
            levels = (procs.get(str(pid)) or {}).get("levels") or []
            if not levels or int(levels[-1][1]) != 1:
                return  # not init of a pid namespace of the model's
            nsid = levels[-1][0]
            members = [
                (int(key), entry)
                for key, entry in procs.items()
                if key != str(pid) and any(level[0] == nsid for level in entry.get("levels", []))
            ]
        for member, entry in members:
            _kill_if_same(member, entry)

    def sethostname(self, name: str) -> None:
        with self._store.transaction() as st:
            Model(st).sethostname(self._cred(), self._me().ns["uts"], name)

    def gethostname(self) -> str:
        with self._store.transaction(write=False) as st:
            return str(Model(st).ns(self._me().ns["uts"])["hostname"])

    def setdomainname(self, name: str) -> None:
        with self._store.transaction() as st:
            Model(st).setdomainname(self._cred(), self._me().ns["uts"], name)

    def getdomainname(self) -> str:
        with self._store.transaction(write=False) as st:
            return str(Model(st).ns(self._me().ns["uts"]).get("domainname", "(none)"))

    def link_up(self, ifname: str = "lo") -> None:
        with self._store.transaction() as st:
            Model(st).link_up(self._cred(), self._me().ns["net"], ifname)

    # -- probes ---------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """:func:`kit.ledger.probe.snapshot`'s structure, from the model (threads by real tid)."""
        status = linux.read_status()
        seccomp = int(status.get("Seccomp", "0"))
        real_nspid = [int(x) for x in status.get("NSpid", str(os.getpid())).split()]
        with self._store.transaction(write=False) as st:
            m = Model(st)
            p = self._me()
            me = self._cred()
            tids = linux.thread_ids()
            for tid in list(p.thread_creds):
                if tid not in tids:
                    del p.thread_creds[tid]
            threads = []
            for tid in tids:
                name = linux.thread_name(tid)  # the real thread's, as the probe's
                if name is None:
                    # Ended since it was listed (a hook thread just done): the real probe,
                    # whose read of its status fails then, leaves it out too.
                    continue
                c = p.thread_creds.get(tid, p.cred)
                threads.append(
                    {
                        "tid": tid,
                        "name": name,
                        "uid": [m.from_kuid_munged(me.userns, u) for u in c.uid],
                        "gid": [m.from_kgid_munged(me.userns, g) for g in c.gid],
                        "groups": [m.from_kgid_munged(me.userns, g) for g in c.groups],
                        "caps": {
                            "effective": linux.mask_to_caps(c.eff),
                            "permitted": linux.mask_to_caps(c.prm),
                            "inheritable": linux.mask_to_caps(c.inh),
                            "bounding": linux.mask_to_caps(c.bnd),
                            "ambient": linux.mask_to_caps(c.amb),
                        },
                        "no_new_privs": c.no_new_privs,
                        "seccomp": seccomp,
                        "ns": {kind: int(p.ns[kind]) for kind in linux.NAMESPACES},
                    }
                )
            return {
                "threads": threads,
                "securebits": me.securebits,
                "dumpable": p.dumpable,
                "ns": {kind: int(p.ns[kind]) for kind in linux.NAMESPACES},
                "uid_map": m.shown_map(me.userns, "uid_map"),
                "gid_map": m.shown_map(me.userns, "gid_map"),
                "nspid": self._nspid(st, real_nspid),
                "root": linux.path_identity(self._root(st)),
            }

    def _nspid(self, st: dict[str, Any], real_nspid: list[int]) -> list[int]:
        """NSpid as ``/proc/self/status`` shows it: relative to the pid namespace of the
        proc mounted on ``/proc`` (a proc the model mounted shows its own namespace)."""
        p = self._proc
        m = Model(st)
        top = m.top_mount(m.ns(p.ns["mount"])["mounts"], self._host(st, "/proc"))
        pidns = top.get("pidns") if top is not None and top["fstype"] == "proc" else None
        if pidns is not None and not m.ns(pidns).get("initial"):
            for i, (nsid, _) in enumerate(p.levels):
                if nsid == pidns:
                    return [pid for _, pid in p.levels[i:]]
        return real_nspid + [pid for _, pid in p.levels]

    def escalation(self) -> dict[str, Any]:
        """:func:`kit.ledger.probe.escalation`'s answer by the model's rules, each way tried on its
        own copy of the calling thread's credentials: setresuid(0, 0, 0); raising the
        permitted capabilities; exec of the run's setuid-root binary."""
        with self._store.transaction(write=False) as st:
            m = Model(st)
            original = self._cred()
            try:
                m.setresuid(original.copy(), 0, 0, 0)
                setresuid_root = True
            except OSError:
                setresuid_root = False
            raised: list[str] = []
            extra = original.prm & ~original.eff
            if extra:
                try:
                    m.capset(
                        original.copy(), original.eff | original.prm, original.prm, original.inh
                    )
                    raised = linux.mask_to_caps(extra)
                except OSError:
                    pass
            euid, untried = self._setuid_exec(st, original)
            return probe.escalation_result(
                setresuid_root=setresuid_root,
                raised=raised,
                setuid_euid=euid,
                untried=untried,
                host_userns=original.userns == m.initial("user"),
            )

    def _setuid_exec(self, st: dict[str, Any], cred: Cred) -> tuple[int | None, str]:
        """(euid the run's setuid binary would print, why not tried): reachable when this
        process sees the host root and the mount the binary lies on in the launch mount
        namespace."""
        binary = probe.setuid_binary()
        if binary is None:
            return None, probe.UNTRIED_NO_BINARY
        if binary.unavailable:
            return None, f"{probe.UNTRIED_NO_BINARY}:{binary.unavailable}"
        m = Model(st)
        mine = m.mount_of(m.ns(self._me().ns["mount"])["mounts"], binary.path)
        launch = m.mount_of(m.ns(m.initial("mount"))["mounts"], binary.path)

        def where(mount: dict[str, Any] | None) -> tuple[Any, ...] | None:
            return None if mount is None else (mount["target"], mount["source"], mount["fstype"])

        if self._root(st) != "/" or where(mine) != where(launch) or mine is None:
            return None, f"{probe.UNTRIED_UNREACHABLE}:ENOENT"
        return m.setuid_root_exec_euid(cred, "nosuid" in mine["flags"]), ""

    # -- for tests and reports -------------------------------------------------------------------
    def model_state(self) -> dict[str, Any]:
        """A copy of the shared model (namespaces, registry, fs structs)."""
        return self._store.read()

    def mounts(self) -> list[dict[str, Any]]:
        """The mount table of this process's mount namespace (host paths)."""
        with self._store.transaction(write=False) as st:
            return copy.deepcopy(Model(st).ns(self._me().ns["mount"])["mounts"])
