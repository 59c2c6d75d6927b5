"""The kernel's rules, as functions over a JSON-able state (no system call in here)."""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kit.system.linux import CAP_NUMBERS, NAMESPACES

KINDS = tuple(NAMESPACES)  # user, pid, net, uts, ipc, cgroup, mount
OVERFLOW_ID = 65534  # /proc/sys/kernel/overflowuid: what an unmapped id reads as
INVALID_ID = 0xFFFFFFFF  # (uid_t) -1
NGROUPS_MAX = 65536
MAX_EXTENTS = 340  # UID_GID_MAP_MAX_EXTENTS
MAX_USERNS_LEVEL = 32
HOSTNAME_MAX = 64  # __NEW_UTS_LEN
#: First synthetic namespace id. The kernel numbers namespaces from 0xF0000000 up
#: (PROC_DYNAMIC_FIRST; the initial ones just below): start far above, and skip any id
#: already in the model.
FIRST_SYNTHETIC_ID = 0xFFF00000

SECBIT_NOROOT = 1 << 0
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_KEEP_CAPS = 1 << 4
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6

SUID_DUMP_USER = 1

CAP_CHOWN = CAP_NUMBERS["CAP_CHOWN"]
CAP_DAC_OVERRIDE = CAP_NUMBERS["CAP_DAC_OVERRIDE"]
CAP_DAC_READ_SEARCH = CAP_NUMBERS["CAP_DAC_READ_SEARCH"]
CAP_SETGID = CAP_NUMBERS["CAP_SETGID"]
CAP_SETUID = CAP_NUMBERS["CAP_SETUID"]
CAP_SETPCAP = CAP_NUMBERS["CAP_SETPCAP"]
CAP_NET_ADMIN = CAP_NUMBERS["CAP_NET_ADMIN"]
CAP_SYS_CHROOT = CAP_NUMBERS["CAP_SYS_CHROOT"]
CAP_SYS_PTRACE = CAP_NUMBERS["CAP_SYS_PTRACE"]
CAP_SYS_ADMIN = CAP_NUMBERS["CAP_SYS_ADMIN"]
CAP_SETFCAP = CAP_NUMBERS["CAP_SETFCAP"]

#: Filesystem types an unprivileged user namespace may mount (FS_USERNS_MOUNT).
USERNS_MOUNTABLE = frozenset(
    {
        "proc",
        "sysfs",
        "tmpfs",
        "ramfs",
        "devpts",
        "mqueue",
        "cgroup",
        "cgroup2",
        "fuse",
        "overlay",
        "binfmt_misc",
    }
)
#: Per-mount flags (the ones ``mount -o remount,bind`` changes and a less privileged mount
#: namespace locks).
MNT_FLAGS = ("ro", "nosuid", "nodev", "noexec")
PROPAGATION_TYPES = ("shared", "private", "slave", "unbindable")


def fail(err: int, what: str) -> OSError:
    """An ``OSError`` as the kernel would report it (errno and strerror)."""
    return OSError(err, f"{what}: {os.strerror(err)}")


def cap_bit(cap: int) -> int:
    return 1 << cap


@dataclass
class Cred:
    """One task's credentials (``struct cred``), ids as kernel ids."""

    uid: list[int]  # real, effective, saved, fs
    gid: list[int]
    groups: list[int]
    eff: int
    prm: int
    inh: int
    bnd: int
    amb: int
    securebits: int = 0
    no_new_privs: bool = False  # per task in the kernel (atomic_flags); kept here
    userns: int = 0

    def copy(self) -> Cred:
        return Cred(
            list(self.uid),
            list(self.gid),
            list(self.groups),
            self.eff,
            self.prm,
            self.inh,
            self.bnd,
            self.amb,
            self.securebits,
            self.no_new_privs,
            self.userns,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": list(self.uid),
            "gid": list(self.gid),
            "groups": list(self.groups),
            "eff": self.eff,
            "prm": self.prm,
            "inh": self.inh,
            "bnd": self.bnd,
            "amb": self.amb,
            "securebits": self.securebits,
            "no_new_privs": self.no_new_privs,
            "userns": self.userns,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Cred:
        return cls(
            list(d["uid"]),
            list(d["gid"]),
            list(d["groups"]),
            d["eff"],
            d["prm"],
            d["inh"],
            d["bnd"],
            d["amb"],
            d["securebits"],
            d["no_new_privs"],
            d["userns"],
        )


@dataclass
class Task:
    """What the model needs to know about the calling process besides its credentials."""

    ns: dict[str, int]  # kind -> namespace id the task is in
    pid_for_children: int
    chrooted: bool = False  # fs->root is not the mount namespace's root
    threads: int = 1  # thread-group size
    fs_users: int = 1  # processes sharing the fs_struct (CLONE_FS)
    cwd: str = "/"  # host path
    root: str | None = None  # host path of a chroot; None: the mount namespace's root
    extra: dict[str, Any] = field(default_factory=dict)


def _map_down(extents: list[list[int]] | None, ident: int, count: int = 1) -> int | None:
    """Inside id → outside (parent) id, whole range in one extent (``map_id_range_down``)."""
    for first, lower, n in extents or ():
        if first <= ident and ident + count - 1 < first + n:
            return lower + ident - first
    return None


def _map_up(extents: list[list[int]] | None, ident: int) -> int | None:
    """Outside (parent) id → inside id (``map_id_up``)."""
    for first, lower, n in extents or ():
        if lower <= ident < lower + n:
            return first + ident - lower
    return None


def _ranges_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


class Model:
    """The kernel rules over ``state`` (a dict; mutated in place by the operations).

    It wraps one state document (the shared store's content, see :mod:`kit.system.fake.store`) and
    answers, for a credential :class:`Cred`, what the kernel would do: the capability check of
    ``cap_capable()`` (a capability in one's own user namespace, or ownership of a child namespace),
    id mapping through user namespaces, the credential transitions of
    ``setresuid``/``setresgid``/``setgroups``/``capset``/``prctl`` (with the capability effects of
    ``cap_emulate_setxuid``, capabilities(7) "Effect of user ID changes on capabilities": keep-caps,
    no-op calls; ``capset``'s subset rules; bounding drop needing CAP_SETPCAP; ambient raise needing
    permitted ∩ inheritable; no_new_privs; dumpable reset by ``commit_creds``), namespace creation
    (``create_user_ns`` giving every capability in the new namespace, CAP_SYS_ADMIN over the current
    or new user namespace for the others, copied mount tables that are locked in a less privileged
    namespace) and joining (``setns``'s ``*_install``), the id-map files
    (``map_write``/``new_idmap_permitted``/``proc_setgroups_write``: one write each, ``setgroups``
    deny before an unprivileged gid map, the DAC check of ``/proc/PID/*`` owned per
    ``task_dump_owner``), ``/proc/PID`` access (``ptrace_may_access``) and the mount calls
    (``path_mount``, ``umount2``, ``pivot_root``, propagation, chroot) on a per-mount-namespace
    table; hostname per uts namespace; interfaces per network namespace. Every refusal is an
    ``OSError`` with the errno the kernel returns; the function names in docstrings are the kernel's
    (Linux 6.x, ``kernel/sys.c``, ``kernel/user_namespace.c``, ``security/commoncap.c``,
    ``fs/namespace.c``).

    Ids inside a :class:`Cred` are *kernel* ids (kuids/kgids): ids of the model's initial user
    namespace, which stands for the host's. They are translated to and from a namespace's view with
    :meth:`make_kuid`/:meth:`from_kuid` exactly as the kernel does.

    Namespace records (``state["ns"][str(id)]``), by ``kind``:

    - ``user``: ``parent``, ``level``, ``owner``/``group`` (creator's euid/egid), ``uid_map`` /
      ``gid_map`` (``None`` until written; lines ``[inside, outside, count]`` with ``outside`` in
      the parent's ids), ``setgroups`` (``allow``/``deny``), ``parent_could_setfcap``;
    - ``pid``: ``owner`` (user ns), ``parent``, ``level``, ``last_pid``, ``init`` (real pid of its
      pid 1, once there is one);
    - ``uts``: ``owner``, ``hostname``, ``domainname``; ``net``: ``owner``, ``links`` (name → up);
      ``mount``: ``owner``, ``root`` (host path of its root), ``mounts``; ``ipc``, ``cgroup``:
      ``owner``.

    Every record has ``kind`` and, for the initial namespaces, ``initial: true`` (their ids are the
    real namespaces' inode numbers).
    """

    def __init__(self, state: dict[str, Any]) -> None:
        self.s = state

    # -- basics ----------------------------------------------------------------------------
    @property
    def cap_last(self) -> int:
        return int(self.s["cap_last"])

    @property
    def full_caps(self) -> int:
        """CAP_FULL_SET: every capability this kernel knows."""
        return (1 << (self.cap_last + 1)) - 1

    def ns(self, nsid: int) -> dict[str, Any]:
        try:
            ns: dict[str, Any] = self.s["ns"][str(nsid)]
            return ns
        except KeyError:
            raise fail(errno.ENOENT, f"namespace {nsid}") from None

    def has_ns(self, nsid: int) -> bool:
        return str(nsid) in self.s["ns"]

    def new_id(self, key: str = "next_ns") -> int:
        value = int(self.s[key])
        self.s[key] = value + 1
        return value

    def add_ns(self, record: dict[str, Any]) -> int:
        nsid = self.new_id()
        while str(nsid) in self.s["ns"]:
            nsid = self.new_id()
        self.s["ns"][str(nsid)] = record
        return nsid

    def initial(self, kind: str) -> int:
        return int(self.s["init"][kind])

    # -- ids ----------------------------------------------------------------------------------
    def _chain(self, userns: int) -> list[dict[str, Any]]:
        """User namespace records from ``userns`` up to (excluding) the initial one."""
        out = []
        ns = self.ns(userns)
        while ns.get("parent") is not None:
            out.append(ns)
            ns = self.ns(ns["parent"])
        return out

    def _make_kid(self, userns: int, ident: int, which: str) -> int | None:
        if ident < 0 or ident >= INVALID_ID:
            return None
        for ns in self._chain(userns):
            down = _map_down(ns[which], ident)
            if down is None:
                return None
            ident = down
        return ident

    def _from_kid(self, userns: int, kid: int, which: str) -> int | None:
        ident = kid
        for ns in reversed(self._chain(userns)):
            up = _map_up(ns[which], ident)
            if up is None:
                return None
            ident = up
        return ident

    def make_kuid(self, userns: int, uid: int) -> int | None:
        """``make_kuid``: the kernel id of ``uid`` as seen in ``userns`` (None: unmapped)."""
        return self._make_kid(userns, uid, "uid_map")

    def make_kgid(self, userns: int, gid: int) -> int | None:
        return self._make_kid(userns, gid, "gid_map")

    def from_kuid(self, userns: int, kuid: int) -> int | None:
        return self._from_kid(userns, kuid, "uid_map")

    def from_kgid(self, userns: int, kgid: int) -> int | None:
        return self._from_kid(userns, kgid, "gid_map")

    def from_kuid_munged(self, userns: int, kuid: int) -> int:
        ident = self.from_kuid(userns, kuid)
        return OVERFLOW_ID if ident is None else ident

    def from_kgid_munged(self, userns: int, kgid: int) -> int:
        ident = self.from_kgid(userns, kgid)
        return OVERFLOW_ID if ident is None else ident

    def shown_map(self, userns: int, which: str) -> list[list[int]]:
        """``/proc/self/{uid,gid}_map`` read by a task of ``userns``."""
        ns = self.ns(userns)
        if ns.get("parent") is None:
            return [list(line) for line in ns.get("shown_" + which) or []]
        return [list(line) for line in ns[which] or []]

    # -- capabilities ------------------------------------------------------------------------
    def capable(self, cred: Cred, target: int, cap: int) -> bool:
        """``cap_capable``: does ``cred`` have ``cap`` over user namespace ``target``?

        In its own namespace: the effective set decides. Over a descendant: only the owner
        of a child namespace of the cred's (with euid == owner) has every capability there."""
        cred_level = self.ns(cred.userns)["level"]
        nsid = target
        while True:
            if nsid == cred.userns:
                return bool(cred.eff >> cap & 1)
            ns = self.ns(nsid)
            if ns["level"] <= cred_level:
                return False
            if ns["parent"] == cred.userns and ns["owner"] == cred.uid[1]:
                return True
            nsid = ns["parent"]

    def cred_cap_issubset(self, old: Cred, new: Cred) -> bool:
        """``cred_cap_issubset(old, new)`` of ``commit_creds``."""
        if old.userns == new.userns:
            return new.prm & ~old.prm == 0
        nsid = new.userns
        while True:
            ns = self.ns(nsid)
            if ns.get("parent") is None:
                return False
            if ns["parent"] == old.userns and ns["owner"] == old.uid[1]:
                return True
            nsid = ns["parent"]

    def dumpable_after(self, old: Cred, new: Cred, dumpable: int) -> int:
        """``commit_creds``: a change of euid/egid/fsuid/fsgid or a gain of capabilities
        resets the dumpable flag to ``fs.suid_dumpable``."""
        if (
            old.uid[1] != new.uid[1]
            or old.gid[1] != new.gid[1]
            or old.uid[3] != new.uid[3]
            or old.gid[3] != new.gid[3]
            or not self.cred_cap_issubset(old, new)
        ):
            return int(self.s["suid_dumpable"])
        return dumpable

    def set_cred_user_ns(self, cred: Cred, userns: int) -> Cred:
        """``set_cred_user_ns``: every capability, bound to the new user namespace."""
        new = cred.copy()
        new.securebits = 0
        new.inh = 0
        new.prm = new.eff = new.bnd = self.full_caps
        new.amb = 0
        new.userns = userns
        return new

    # -- uid/gid changes -----------------------------------------------------------------------
    def setresuid(self, cred: Cred, ruid: int, euid: int, suid: int) -> Cred:
        """``__sys_setresuid`` + ``cap_task_fix_setuid`` (LSM_SETID_RES)."""
        return self._setres(cred, (ruid, euid, suid), "uid")

    def setresgid(self, cred: Cred, rgid: int, egid: int, sgid: int) -> Cred:
        """``__sys_setresgid`` (no capability effect)."""
        return self._setres(cred, (rgid, egid, sgid), "gid")

    def _setres(self, cred: Cred, ids: tuple[int, int, int], which: str) -> Cred:
        make = self.make_kuid if which == "uid" else self.make_kgid
        what = f"setres{which}"
        old_ids = getattr(cred, which)
        wanted: list[int | None] = []
        for ident in ids:
            if ident in (-1, INVALID_ID):
                wanted.append(None)
                continue
            k = make(cred.userns, ident)
            if k is None:
                raise fail(errno.EINVAL, f"{what}: {ident} is not mapped in the user namespace")
            wanted.append(k)
        kr, ke, ks = wanted
        if (
            (kr is None or kr == old_ids[0])
            and (ke is None or (ke == old_ids[1] and ke == old_ids[3]))
            and (ks is None or ks == old_ids[2])
        ):
            return cred  # a no-op changes nothing (not even dumpable)
        current = set(old_ids[:3])
        if any(k is not None and k not in current for k in wanted):
            cap = CAP_SETUID if which == "uid" else CAP_SETGID
            if not self.capable(cred, cred.userns, cap):
                raise fail(errno.EPERM, what)
        new = cred.copy()
        new_ids = getattr(new, which)
        for i, k in enumerate(wanted):
            if k is not None:
                new_ids[i] = k
        new_ids[3] = new_ids[1]
        if which == "uid" and not new.securebits & SECBIT_NO_SETUID_FIXUP:
            self._emulate_setxuid(new, cred)
        return new

    def _emulate_setxuid(self, new: Cred, old: Cred) -> None:
        """``cap_emulate_setxuid``: capabilities follow uid 0 (of the cred's namespace)."""
        root = self.make_kuid(old.userns, 0)
        had_root = root is not None and root in old.uid[:3]
        has_root = root is not None and root in new.uid[:3]
        if had_root and not has_root:
            if not new.securebits & SECBIT_KEEP_CAPS:
                new.prm = 0
                new.eff = 0
            new.amb = 0
        if old.uid[1] == root and new.uid[1] != root:
            new.eff = 0
        if old.uid[1] != root and new.uid[1] == root:
            new.eff = new.prm

    def setgroups(self, cred: Cred, groups: Iterable[int]) -> Cred:
        """``setgroups(2)``: CAP_SETGID and a user namespace that allows it; mapped gids."""
        groups = list(groups)
        if not (
            self.capable(cred, cred.userns, CAP_SETGID) and self.userns_may_setgroups(cred.userns)
        ):
            raise fail(errno.EPERM, "setgroups")
        if len(groups) > NGROUPS_MAX:
            raise fail(errno.EINVAL, "setgroups")
        kgids = []
        for g in groups:
            k = self.make_kgid(cred.userns, g)
            if k is None:
                raise fail(errno.EINVAL, f"setgroups: gid {g} is not mapped")
            kgids.append(k)
        new = cred.copy()
        new.groups = sorted(kgids)
        return new

    def userns_may_setgroups(self, userns: int) -> bool:
        ns = self.ns(userns)
        if ns.get("parent") is None:
            return bool(ns.get("setgroups", "allow") == "allow")
        return bool(ns["gid_map"]) and bool(ns["setgroups"] == "allow")

    # -- capability sets ----------------------------------------------------------------------
    def capset(self, cred: Cred, eff: int, prm: int, inh: int) -> Cred:
        """``cap_capset``: no new permitted capability, effective within permitted,
        inheritable within inheritable|permitted (unless CAP_SETPCAP) and the bounding set."""
        valid = self.full_caps
        eff, prm, inh = eff & valid, prm & valid, inh & valid
        if not self.capable(cred, cred.userns, CAP_SETPCAP) and inh & ~(cred.inh | cred.prm):
            raise fail(errno.EPERM, "capset: inheritable beyond inheritable|permitted")
        if inh & ~(cred.inh | cred.bnd):
            raise fail(errno.EPERM, "capset: inheritable beyond the bounding set")
        if prm & ~cred.prm:
            raise fail(errno.EPERM, "capset: permitted can only shrink")
        if eff & ~prm:
            raise fail(errno.EPERM, "capset: effective must be a subset of permitted")
        new = cred.copy()
        new.eff, new.prm, new.inh = eff, prm, inh
        new.amb &= prm & inh
        return new

    def setuid_root_exec_euid(self, cred: Cred, nosuid: bool) -> int:
        """``bprm_fill_uid``: the effective uid (as ``cred``'s namespace shows it) after the
        exec of a setuid binary owned by kuid 0 on a mount with or without ``nosuid``. The
        set-user-ID bit counts unless the mount is nosuid, no_new_privs is set, or the owner
        has no mapping in the caller's user namespace."""
        euid = cred.uid[1]
        if not nosuid and not cred.no_new_privs and self.from_kuid(cred.userns, 0) is not None:
            euid = 0
        return self.from_kuid_munged(cred.userns, euid)

    def _cap_valid(self, cap: int, what: str) -> None:
        if not 0 <= cap <= self.cap_last:
            raise fail(errno.EINVAL, f"{what}: capability {cap}")

    def bounding_read(self, cred: Cred, cap: int) -> bool:
        self._cap_valid(cap, "PR_CAPBSET_READ")
        return bool(cred.bnd >> cap & 1)

    def bounding_drop(self, cred: Cred, cap: int) -> Cred:
        """``cap_prctl_drop``: needs CAP_SETPCAP in the cred's user namespace."""
        if not self.capable(cred, cred.userns, CAP_SETPCAP):
            raise fail(errno.EPERM, "PR_CAPBSET_DROP")
        self._cap_valid(cap, "PR_CAPBSET_DROP")
        new = cred.copy()
        new.bnd &= ~cap_bit(cap)
        return new

    def ambient_clear(self, cred: Cred) -> Cred:
        new = cred.copy()
        new.amb = 0
        return new

    def ambient_raise(self, cred: Cred, cap: int) -> Cred:
        """PR_CAP_AMBIENT_RAISE: the capability must be permitted and inheritable."""
        self._cap_valid(cap, "PR_CAP_AMBIENT_RAISE")
        if (
            not cred.prm >> cap & 1
            or not cred.inh >> cap & 1
            or cred.securebits & SECBIT_NO_CAP_AMBIENT_RAISE
        ):
            raise fail(errno.EPERM, "PR_CAP_AMBIENT_RAISE")
        new = cred.copy()
        new.amb |= cap_bit(cap)
        return new

    def set_keepcaps(self, cred: Cred, value: bool) -> Cred:
        if cred.securebits & SECBIT_KEEP_CAPS_LOCKED:
            raise fail(errno.EPERM, "PR_SET_KEEPCAPS")
        new = cred.copy()
        if value:
            new.securebits |= SECBIT_KEEP_CAPS
        else:
            new.securebits &= ~SECBIT_KEEP_CAPS
        return new

    # -- namespaces: creation ------------------------------------------------------------------
    def create_user_ns(self, cred: Cred, chrooted: bool) -> tuple[Cred, int]:
        """``create_user_ns``: owned by the creator's euid/egid, which must be mapped in
        the parent; the new cred has every capability there (``set_cred_user_ns``)."""
        parent = self.ns(cred.userns)
        if parent["level"] > MAX_USERNS_LEVEL:
            raise fail(errno.ENOSPC, "user namespace nesting")
        if chrooted:
            raise fail(errno.EPERM, "user namespace from a chroot")
        if (
            self.from_kuid(cred.userns, cred.uid[1]) is None
            or self.from_kgid(cred.userns, cred.gid[1]) is None
        ):
            raise fail(errno.EPERM, "user namespace: the creator's ids are not mapped")
        nsid = self.add_ns(
            {
                "kind": "user",
                "parent": cred.userns,
                "level": parent["level"] + 1,
                "owner": cred.uid[1],
                "group": cred.gid[1],
                "uid_map": None,
                "gid_map": None,
                "setgroups": "allow",
                "parent_could_setfcap": bool(cred.eff >> CAP_SETFCAP & 1),
            }
        )
        return self.set_cred_user_ns(cred, nsid), nsid

    def create_ns(self, kind: str, owner: int, current: int) -> int:
        """A new namespace of ``kind`` owned by user namespace ``owner``, copied from the
        caller's ``current`` one as the kernel copies it."""
        old = self.ns(current)
        rec: dict[str, Any] = {"kind": kind, "owner": owner}
        if kind == "uts":
            rec["hostname"] = old["hostname"]
            rec["domainname"] = old.get("domainname", "(none)")
        elif kind == "net":
            rec["links"] = {"lo": False}
        elif kind == "pid":
            if old["level"] >= MAX_USERNS_LEVEL:
                raise fail(errno.ENOSPC, "pid namespace nesting")
            rec.update(parent=current, level=old["level"] + 1, last_pid=0, init=None)
        elif kind == "mount":
            rec["root"] = old["root"]
            rec["mounts"] = self._copy_mounts(old, owner)
        return self.add_ns(rec)

    def _copy_mounts(self, old: dict[str, Any], owner: int) -> list[dict[str, Any]]:
        """``copy_mnt_ns``: a copy of the table; copied into a less privileged namespace
        (another owner), every mount's flags are locked, every mount but the root is
        MNT_LOCKED, and shared mounts become slaves."""
        less_privileged = owner != old["owner"]
        out = []
        for m in old["mounts"]:
            c = dict(m)
            c["id"] = self.new_id("next_mount")
            c["flags"] = list(m["flags"])
            c["locked_flags"] = list(m.get("locked_flags", []))
            if c.get("root_inode") is not None:
                c["root_inode"] = list(c["root_inode"])  # no list shared by two mounts
            if less_privileged:
                c["locked_flags"] = sorted(set(c["locked_flags"]) | set(m["flags"]))
                c["locked"] = c["target"] != old["root"] or m.get("locked", False)
                if m["propagation"] == "shared":
                    c["propagation"] = "slave"
            out.append(c)
        return out

    def plan_namespaces(
        self, cred: Cred, task: Task, kinds: Iterable[str], *, clone: bool, share_fs: bool = False
    ) -> tuple[Cred, dict[str, int], int]:
        """New namespaces for ``unshare(kinds)`` (``clone=False``) or for the child of
        ``clone(kinds)``; returns (cred, namespaces, pid namespace for children) of the
        task that gets them. The state is changed only when every check passed."""
        asked = list(kinds)
        for k in asked:
            if k not in KINDS:
                raise KeyError(k)  # as linux.ns_flags
        kinds = [k for k in KINDS if k in asked]
        if clone and share_fs and ("user" in kinds or "mount" in kinds):
            raise fail(errno.EINVAL, "clone(CLONE_NEWUSER or CLONE_NEWNS with CLONE_FS)")
        if "user" in kinds and not clone and task.threads > 1:
            raise fail(errno.EINVAL, "unshare(CLONE_NEWUSER) in a multithreaded process")
        others = [k for k in kinds if k != "user"]
        if "pid" in kinds:
            pidc = self.ns(task.pid_for_children)
            if pidc["level"] >= MAX_USERNS_LEVEL:
                raise fail(errno.ENOSPC, "pid namespace nesting")
        # Validate before creating anything (the kernel frees what it made on failure).
        new_cred = cred
        userns = cred.userns
        if "user" in kinds:
            parent = self.ns(cred.userns)
            if parent["level"] > MAX_USERNS_LEVEL:
                raise fail(errno.ENOSPC, "user namespace nesting")
            if task.chrooted:
                raise fail(errno.EPERM, "user namespace from a chroot")
            if (
                self.from_kuid(cred.userns, cred.uid[1]) is None
                or self.from_kgid(cred.userns, cred.gid[1]) is None
            ):
                raise fail(errno.EPERM, "user namespace: the creator's ids are not mapped")
        elif others and not self.capable(cred, userns, CAP_SYS_ADMIN):
            raise fail(
                errno.EPERM,
                f"{'clone' if clone else 'unshare'}({', '.join(others)}) without CAP_SYS_ADMIN",
            )
        if "user" in kinds:
            new_cred, userns = self.create_user_ns(cred, task.chrooted)
        ns = dict(task.ns)
        pid_for_children = task.pid_for_children
        if "user" in kinds:
            ns["user"] = userns
        for kind in others:
            if kind == "pid":
                pid_for_children = self.create_ns("pid", userns, task.pid_for_children)
            else:
                ns[kind] = self.create_ns(kind, userns, task.ns[kind])
        if clone:
            ns["pid"] = pid_for_children
        return new_cred, ns, pid_for_children

    # -- namespaces: joining -------------------------------------------------------------------
    def install(
        self, cred: Cred, task: Task, kind: str, nsid: int
    ) -> tuple[Cred, dict[str, int], int]:
        """``setns``: the ``*_install`` checks of ``kind``; returns the new (cred,
        namespaces, pid namespace for children)."""
        target = self.ns(nsid)
        if target["kind"] != kind:
            raise fail(
                errno.EINVAL, f"setns: namespace {nsid} is a {target['kind']} namespace, not {kind}"
            )
        ns = dict(task.ns)
        pidc = task.pid_for_children
        if kind == "user":
            if nsid == cred.userns:
                raise fail(errno.EINVAL, "setns: already in that user namespace")
            if task.threads > 1:
                raise fail(errno.EINVAL, "setns(user) in a multithreaded process")
            if task.fs_users > 1:
                raise fail(errno.EINVAL, "setns(user) with a shared fs (CLONE_FS)")
            if not self.capable(cred, nsid, CAP_SYS_ADMIN):
                raise fail(errno.EPERM, "setns(user): no CAP_SYS_ADMIN over it")
            ns["user"] = nsid
            return self.set_cred_user_ns(cred, nsid), ns, pidc
        owner = target["owner"]
        if kind == "mount":
            if not (
                self.capable(cred, owner, CAP_SYS_ADMIN)
                and self.capable(cred, cred.userns, CAP_SYS_CHROOT)
                and self.capable(cred, cred.userns, CAP_SYS_ADMIN)
            ):
                raise fail(errno.EPERM, "setns(mount)")
            if task.fs_users > 1:
                raise fail(errno.EINVAL, "setns(mount) with a shared fs (CLONE_FS)")
            ns["mount"] = nsid
            return cred, ns, pidc
        if not (
            self.capable(cred, owner, CAP_SYS_ADMIN)
            and self.capable(cred, cred.userns, CAP_SYS_ADMIN)
        ):
            raise fail(errno.EPERM, f"setns({kind})")
        if kind == "pid":
            # Only the active pid namespace or one of its descendants.
            active = task.ns["pid"]
            walk: int | None = nsid
            while walk is not None and walk != active:
                walk = self.ns(walk).get("parent")
            if walk is None:
                raise fail(errno.EINVAL, "setns(pid): not a descendant of the active one")
            return cred, ns, nsid
        ns[kind] = nsid
        return cred, ns, pidc

    # -- /proc/PID access ------------------------------------------------------------------
    def dump_owner(self, target: dict[str, Any]) -> tuple[int, int]:
        """``task_dump_owner``: (kuid, kgid) owning ``/proc/PID/*`` of a registry entry."""
        cred = target["cred"]
        if target["dumpable"] == SUID_DUMP_USER:
            return cred["uid"][1], cred["gid"][1]
        mm_userns = self.initial("user")  # the namespace of the exec'd image (the host's)
        uid = self.make_kuid(mm_userns, 0)
        gid = self.make_kgid(mm_userns, 0)
        return (0 if uid is None else uid), (0 if gid is None else gid)

    def may_ptrace_read(self, cred: Cred, target: dict[str, Any], same_process: bool) -> bool:
        """``__ptrace_may_access(PTRACE_MODE_READ_FSCREDS)``."""
        if same_process:
            return True
        t = target["cred"]
        fsuid, fsgid = cred.uid[3], cred.gid[3]
        same_ids = (
            fsuid == t["uid"][0] == t["uid"][1] == t["uid"][2]
            and fsgid == t["gid"][0] == t["gid"][1] == t["gid"][2]
        )
        if not same_ids and not self.capable(cred, t["userns"], CAP_SYS_PTRACE):
            return False
        if target["dumpable"] != SUID_DUMP_USER:
            return self.capable(cred, self.initial("user"), CAP_SYS_PTRACE)
        return True

    def may_open_write(self, cred: Cred, owner: tuple[int, int], mode: int = 0o644) -> bool:
        """``inode_permission(MAY_WRITE)`` on a file of ``owner`` with ``mode``."""
        return self.permission(cred, owner[0], owner[1], mode, 2)

    def permission(
        self, cred: Cred, uid: int, gid: int, mode: int, want: int, is_dir: bool = False
    ) -> bool:
        """``generic_permission``: owner/group/other bits, then CAP_DAC_OVERRIDE (and
        CAP_DAC_READ_SEARCH) over an inode whose owner is mapped in the cred's namespace."""
        if cred.uid[3] == uid:
            bits = mode >> 6 & 7
        elif cred.gid[3] == gid or gid in cred.groups:
            bits = mode >> 3 & 7
        else:
            bits = mode & 7
        if want & ~bits == 0:
            return True
        mapped = (
            self.from_kuid(cred.userns, uid) is not None
            and self.from_kgid(cred.userns, gid) is not None
        )
        if not mapped:
            return False
        if self.capable(cred, cred.userns, CAP_DAC_OVERRIDE) and (
            is_dir or not want & 1 or mode & 0o111
        ):
            return True
        if want & 2 == 0 and self.capable(cred, cred.userns, CAP_DAC_READ_SEARCH):
            return is_dir or not want & 1
        return False

    # -- id maps ------------------------------------------------------------------------------
    def write_setgroups(self, cred: Cred, userns: int, value: str) -> None:
        """``proc_setgroups_open`` (write: CAP_SYS_ADMIN over the namespace, else EACCES)
        and ``proc_setgroups_write``."""
        ns = self.ns(userns)
        if not self.capable(cred, userns, CAP_SYS_ADMIN):
            raise fail(errno.EACCES, "setgroups: no CAP_SYS_ADMIN over the namespace")
        if value not in ("allow", "deny"):
            raise fail(errno.EINVAL, "setgroups")
        if value == "allow":
            if ns["setgroups"] != "allow":
                raise fail(errno.EPERM, "setgroups: cannot allow again once denied")
        else:
            if ns["gid_map"]:
                raise fail(errno.EPERM, "setgroups: the gid map is already written")
            ns["setgroups"] = "deny"

    def write_map(self, cred: Cred, userns: int, which: str, lines: list[list[int]]) -> None:
        """``map_write`` for ``uid_map``/``gid_map`` of ``userns`` by ``cred`` (the
        opener and writer)."""
        ns = self.ns(userns)
        what = f"{which} of user namespace {userns}"
        if ns.get("parent") is None or ns[which]:
            raise fail(errno.EPERM, f"{what}: already written")
        if not self.capable(cred, userns, CAP_SYS_ADMIN):
            raise fail(errno.EPERM, f"{what}: no CAP_SYS_ADMIN over the namespace")
        extents: list[list[int]] = []
        for line in lines:
            try:
                first, lower, count = (int(x) for x in line)
            except (TypeError, ValueError):
                raise fail(errno.EINVAL, what) from None
            if (
                count <= 0
                or first < 0
                or lower < 0
                or first + count - 1 >= INVALID_ID
                or lower + count - 1 >= INVALID_ID
            ):
                raise fail(errno.EINVAL, f"{what}: bad extent {line}")
            for f, lo, n in extents:
                if _ranges_overlap((first, count), (f, n)) or _ranges_overlap(
                    (lower, count), (lo, n)
                ):
                    raise fail(errno.EINVAL, f"{what}: overlapping extents")
            extents.append([first, lower, count])
            if len(extents) > MAX_EXTENTS:
                raise fail(errno.EINVAL, f"{what}: more than {MAX_EXTENTS} extents")
        if not extents:
            raise fail(errno.EINVAL, f"{what}: empty")
        cap = CAP_SETUID if which == "uid_map" else CAP_SETGID
        if not self._idmap_permitted(cred, userns, ns, which, cap, extents):
            raise fail(errno.EPERM, f"{what}: {extents} not permitted")
        parent = ns["parent"]
        make = self.make_kuid if which == "uid_map" else self.make_kgid
        for _, lower, count in extents:
            # The whole lower range must be mapped in the parent (one extent there).
            pmap = self.ns(parent)
            if pmap.get("parent") is None:
                ok = lower + count - 1 < INVALID_ID
            else:
                ok = (
                    _map_down(pmap[which], lower, count) is not None
                    and make(parent, lower) is not None
                )
            if not ok:
                raise fail(errno.EPERM, f"{what}: {lower}+{count} not mapped in the parent")
        ns[which] = extents

    def _idmap_permitted(
        self,
        cred: Cred,
        userns: int,
        ns: dict[str, Any],
        which: str,
        cap: int,
        extents: list[list[int]],
    ) -> bool:
        """``new_idmap_permitted`` (+ ``verify_root_map``)."""
        parent = ns["parent"]
        if which == "uid_map" and any(lower == 0 for _, lower, _ in extents):
            if userns == cred.userns:
                if not ns["parent_could_setfcap"]:
                    return False
            elif not self.capable(cred, parent, CAP_SETFCAP):
                return False
        if len(extents) == 1 and extents[0][2] == 1 and ns["owner"] == cred.uid[1]:
            lower = extents[0][1]
            if which == "uid_map":
                if self.make_kuid(parent, lower) == cred.uid[1]:
                    return True
            elif ns["setgroups"] == "deny" and self.make_kgid(parent, lower) == cred.gid[1]:
                return True
        return self.capable(cred, parent, cap)

    # -- uts and net -------------------------------------------------------------------------
    def sethostname(self, cred: Cred, utsns: int, name: str) -> None:
        self._set_uts_name(cred, utsns, "hostname", name)

    def setdomainname(self, cred: Cred, utsns: int, name: str) -> None:
        self._set_uts_name(cred, utsns, "domainname", name)

    def _set_uts_name(self, cred: Cred, utsns: int, field: str, name: str) -> None:
        """sethostname / setdomainname: CAP_SYS_ADMIN over the uts namespace's owner, and
        at most __NEW_UTS_LEN bytes (the kernel's rules for both)."""
        ns = self.ns(utsns)
        if not self.capable(cred, ns["owner"], CAP_SYS_ADMIN):
            raise fail(errno.EPERM, f"set{field}")
        if len(name.encode()) > HOSTNAME_MAX:
            raise fail(errno.EINVAL, f"set{field}")
        ns[field] = name

    def link_up(self, cred: Cred, netns: int, ifname: str) -> None:
        ns = self.ns(netns)
        if ifname not in ns["links"]:
            raise fail(errno.ENODEV, f"no network interface {ifname!r}")
        if not self.capable(cred, ns["owner"], CAP_NET_ADMIN):
            raise fail(errno.EPERM, f"link {ifname} up: no CAP_NET_ADMIN")
        ns["links"][ifname] = True

    # -- mounts -------------------------------------------------------------------------------
    def may_mount(self, cred: Cred, mntns: int) -> bool:
        return self.capable(cred, self.ns(mntns)["owner"], CAP_SYS_ADMIN)

    @staticmethod
    def top_mount(mounts: list[dict[str, Any]], path: str) -> dict[str, Any] | None:
        """The mount on top at mount point ``path`` (host path), if any."""
        found = None
        for m in mounts:
            if m["target"] == path:
                found = m
        return found

    @staticmethod
    def mount_of(mounts: list[dict[str, Any]], path: str) -> dict[str, Any] | None:
        """The mount ``path`` (host path) lies on: the top mount at its longest mounted
        prefix."""
        best = None
        for m in mounts:
            t = m["target"]
            under = path == t or path.startswith(t.rstrip("/") + "/")
            if under and (best is None or len(t) >= len(best["target"])):
                best = m
        return best

    def mount(
        self,
        cred: Cred,
        mntns: int,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
        exists: Any,
        is_dir: Any,
        pidns: int,
    ) -> None:
        """``do_mount``/``path_mount`` on host path ``target`` (already resolved); ``exists``
        and ``is_dir`` answer for host paths, ``pidns`` is the caller's active pid
        namespace (a new proc shows it and belongs to its owner)."""
        ns = self.ns(mntns)
        mounts = ns["mounts"]
        if not exists(target):
            raise fail(errno.ENOENT, f"mount: {target}")
        if not self.may_mount(cred, mntns):
            raise fail(errno.EPERM, "mount: no CAP_SYS_ADMIN over the mount namespace")
        fl = set(flags)
        mnt_flags = sorted(fl & set(MNT_FLAGS))
        if "remount" in fl:
            m = self.top_mount(mounts, target)
            if m is None:
                raise fail(errno.EINVAL, f"mount: remount of {target}: not a mount point")
            if "bind" not in fl and not self.capable(
                cred, m.get("sb_owner", ns["owner"]), CAP_SYS_ADMIN
            ):
                raise fail(errno.EPERM, "mount: remount of the superblock")
            locked = set(m.get("locked_flags", ()))
            if locked - set(mnt_flags):
                raise fail(
                    errno.EPERM,
                    f"mount: remount of {target} would clear locked "
                    f"flags {sorted(locked - set(mnt_flags))}",
                )
            m["flags"] = mnt_flags
            return
        if "bind" in fl:
            if source is None or not exists(source):
                raise fail(errno.ENOENT, f"mount: bind source {source}")
            src = self.mount_of(mounts, source)
            if src is not None and src["propagation"] == "unbindable":
                raise fail(errno.EINVAL, "mount: bind of an unbindable mount")
            if is_dir(source) != is_dir(target):
                raise fail(errno.ENOTDIR, "mount: bind of a directory on a file, or back")
            self._add_mount(
                ns,
                target,
                source,
                src["fstype"] if src else "none",
                sorted(set(src["flags"]) if src else set()),
                sorted(set(src.get("locked_flags", ())) if src else set()),
                bind=True,
                sb_owner=src.get("sb_owner", ns["owner"]) if src else ns["owner"],
            )
            return
        types = fl & set(PROPAGATION_TYPES)
        if types:
            if len(types) != 1 or fl - types - {"rec"}:
                raise fail(errno.EINVAL, "mount: exactly one propagation type")
            top = self.top_mount(mounts, target)
            if top is None:
                raise fail(errno.EINVAL, f"mount: {target} is not a mount point")
            kind = types.pop()
            tops = [top]
            if "rec" in fl:
                prefix = target.rstrip("/") + "/"
                tops = [
                    m for m in mounts if m["target"] == target or m["target"].startswith(prefix)
                ]
            for m in tops:
                m["propagation"] = kind
            return
        if "move" in fl:
            moved = None if source is None else self.top_mount(mounts, source)
            if source is None or moved is None:
                raise fail(errno.EINVAL, f"mount: move of {source}: not a mount point")
            if moved.get("locked"):
                raise fail(errno.EINVAL, "mount: move of a locked mount")
            prefix = source.rstrip("/") + "/"
            for m in mounts:
                if m is moved:
                    m["target"] = target
                elif m["target"].startswith(prefix):
                    m["target"] = target.rstrip("/") + "/" + m["target"][len(prefix) :]
            return
        if not fstype:
            raise fail(errno.EINVAL, "mount: no filesystem type")
        if fstype not in self.s["filesystems"]:
            raise fail(errno.ENODEV, f"mount: unknown filesystem type {fstype!r}")
        if cred.userns != self.initial("user") and fstype not in USERNS_MOUNTABLE:
            raise fail(errno.EPERM, f"mount: {fstype} cannot be mounted in a user namespace")
        fs_owner = self.ns(pidns)["owner"] if fstype == "proc" else cred.userns
        if not self.capable(cred, fs_owner, CAP_SYS_ADMIN):
            raise fail(errno.EPERM, f"mount: {fstype}: no CAP_SYS_ADMIN over its namespace")
        if not is_dir(target):
            raise fail(errno.ENOTDIR, f"mount: {target} is not a directory")
        self._add_mount(
            ns,
            target,
            source or fstype,
            fstype,
            mnt_flags,
            [],
            data=data,
            sb_owner=fs_owner,
            pidns=pidns if fstype == "proc" else None,
            root_inode=self._new_fs_root(cred, fstype, data),
        )

    def _add_mount(
        self,
        ns: dict[str, Any],
        target: str,
        source: str,
        fstype: str,
        flags: list[str],
        locked_flags: list[str],
        bind: bool = False,
        data: str | None = None,
        sb_owner: int | None = None,
        pidns: int | None = None,
        root_inode: list[int] | None = None,
    ) -> None:
        parent = self.mount_of(ns["mounts"], target)
        propagation = "private"
        if parent is not None and parent["propagation"] in ("shared", "slave"):
            # A mount under a shared (or slave) mount is shared like it, in a new peer group
            # of the namespace (the model does not propagate it to peers).
            propagation = "shared" if parent["propagation"] == "shared" else "private"
        ns["mounts"].append(
            {
                "id": self.new_id("next_mount"),
                "target": target,
                "source": source,
                "fstype": fstype,
                "flags": flags,
                "locked_flags": locked_flags,
                "locked": False,
                "propagation": propagation,
                "bind": bind,
                "data": data,
                "sb_owner": ns["owner"] if sb_owner is None else sb_owner,
                "pidns": pidns,
                "root_inode": root_inode,
            }
        )

    @staticmethod
    def _new_fs_root(cred: Cred, fstype: str, data: str | None) -> list[int] | None:
        """[uid, gid, mode] of the root directory of a new tmpfs/ramfs: the mounter's
        fsuid/fsgid and the ``mode=`` option (default 01777); None for other types."""
        if fstype not in ("tmpfs", "ramfs"):
            return None
        mode = 0o1777
        for option in (data or "").split(","):
            key, _, value = option.partition("=")
            if key == "mode" and value:
                try:
                    mode = int(value, 8) & 0o7777
                except ValueError:
                    pass
        return [cred.uid[3], cred.gid[3], mode]

    def umount(self, cred: Cred, mntns: int, target: str, detach: bool) -> None:
        """``umount2``: a mount point, not locked, CAP_SYS_ADMIN over the namespace; a
        detached old root (after ``pivot_root``) takes the whole old tree with it."""
        ns = self.ns(mntns)
        if not self.may_mount(cred, mntns):
            raise fail(errno.EPERM, "umount")
        m = self.top_mount(ns["mounts"], target)
        if m is None:
            raise fail(errno.EINVAL, f"umount: {target} is not a mount point")
        if m.get("locked"):
            raise fail(errno.EINVAL, f"umount: {target} is locked")
        if m.get("old_root"):
            keep_prefix = ns["root"].rstrip("/") + "/"
            ns["mounts"] = [
                x
                for x in ns["mounts"]
                if x is not m and (x["target"] == ns["root"] or x["target"].startswith(keep_prefix))
            ]
            return
        prefix = target.rstrip("/") + "/"
        under = [
            x
            for x in ns["mounts"]
            if x["target"].startswith(prefix) and ns["mounts"].index(x) > ns["mounts"].index(m)
        ]
        if under and not detach:
            raise fail(errno.EBUSY, f"umount: {target} has mounts below it")
        ns["mounts"] = [x for x in ns["mounts"] if x is not m and x not in under]

    def pivot_root(self, cred: Cred, mntns: int, root: str, new_root: str, put_old: str) -> None:
        """``pivot_root``: ``new_root`` a mount point that is not the current root, no
        shared mount involved, ``put_old`` at or under ``new_root``."""
        ns = self.ns(mntns)
        if not self.may_mount(cred, mntns):
            raise fail(errno.EPERM, "pivot_root")
        mounts = ns["mounts"]
        new_m = self.top_mount(mounts, new_root)
        root_m = self.mount_of(mounts, root)
        old_m = self.mount_of(mounts, put_old)
        if new_m is None or root_m is None or old_m is None:
            raise fail(errno.EINVAL, "pivot_root: new_root is not a mount point")
        if any(m["propagation"] == "shared" for m in (new_m, root_m, old_m)):
            raise fail(errno.EINVAL, "pivot_root: a shared mount is involved")
        if new_m.get("locked"):
            raise fail(errno.EINVAL, "pivot_root: new_root is locked")
        if new_root == root:
            raise fail(errno.EBUSY, "pivot_root: new_root is the current root")
        if not (put_old == new_root or put_old.startswith(new_root.rstrip("/") + "/")):
            raise fail(errno.EINVAL, "pivot_root: put_old is not under new_root")
        if not (new_root.startswith(root.rstrip("/") + "/")):
            raise fail(errno.EINVAL, "pivot_root: new_root is not under the root")
        mounts.append(
            {
                "id": self.new_id("next_mount"),
                "target": put_old,
                "source": root,
                "fstype": root_m["fstype"],
                "flags": list(root_m["flags"]),
                "locked_flags": list(root_m.get("locked_flags", [])),
                "locked": False,
                "propagation": "private",
                "bind": False,
                "data": None,
                "old_root": True,
                "sb_owner": root_m.get("sb_owner", ns["owner"]),
            }
        )
        ns["root"] = new_root


def resolve(root: str, cwd: str, path: str) -> str:
    """Host path of ``path`` for a task whose root is host path ``root`` and whose cwd is
    host path ``cwd`` (lexically; ``..`` never climbs above the root)."""
    if not path.startswith("/"):
        return posixpath.normpath(posixpath.join(cwd, path))
    inside = posixpath.normpath("/" + path.lstrip("/"))
    if root == "/":
        return inside
    return root.rstrip("/") + ("" if inside == "/" else inside)
