"""The system interface: every privileged action of the starter and of engines."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

from kit.ledger import probe
from kit.system import linux


class System:
    """The interface. Subclasses implement the primitives; the credential transitions of
    the flows (:meth:`become_user`, :meth:`emulate_setuid_exec`, :meth:`drop_effective`) are
    written once, here, in terms of them.

    The starter and engines never call the kernel directly; they call the active system
    (:func:`current`). :class:`RealSystem` acts on the kernel through :mod:`kit.system.linux`; the
    fake backend (:mod:`kit.system.fake`, a model of namespaces, mounts and credentials) can be
    swapped in for machines without namespaces (``SPEC.md`` §9).
    """

    name = "abstract"

    def __getattr__(self, item: str) -> Any:  # pragma: no cover - interface guard
        raise NotImplementedError(f"{type(self).__name__} does not implement {item}")

    # -- credential transitions (built on the primitives) --------------------------------------
    def become_user(
        self,
        uid: int,
        gid: int,
        groups: list[int] | None,
        saved_uid: int | None = None,
        keep_caps: bool = False,
    ) -> None:
        """Set groups (unless None), gids then uids of the whole process: r=e=``uid``,
        saved=``saved_uid`` or ``uid``. ``keep_caps`` keeps the permitted set across the
        change (the kernel clears the effective set)."""
        if groups is not None:
            self.setgroups(groups)
        self.setresgid(gid, gid, gid)
        if keep_caps:
            self.set_keepcaps(True)
        self.setresuid(uid, uid, uid if saved_uid is None else saved_uid)
        if keep_caps:
            self.set_keepcaps(False)

    def emulate_setuid_exec(self, uid: int, gid: int, groups: list[int]) -> None:
        """The state the kernel leaves after exec of a setuid-root binary by ``uid``: real uid
        U, effective and saved uid 0, U's gids and groups, capabilities unchanged (full)."""
        self.setgroups(groups)
        self.setresgid(gid, gid, gid)
        self.setresuid(uid, 0, 0)

    def drop_effective(self, uid: int) -> None:
        """r=e=``uid``, saved uid kept (0): effective capabilities are cleared, permitted kept
        — the setuid master's state."""
        self.setresuid(uid, uid, -1)

    # -- mounts (built on mount) ------------------------------------------------------------
    def set_propagation(self, target: str, propagation: str) -> None:
        """``private``, ``rslave``… on ``target`` (r prefix = recursive)."""
        kind, recursive = linux.split_propagation(propagation)
        self.mount(None, target, None, [kind, "rec"] if recursive else [kind])

    def modelled_pids(self, kernel_pid: int) -> set[int]:
        """The pids the backend's model gives process ``kernel_pid`` (none: the kernel's
        NSpid is the truth)."""
        return set()

    def while_model_locked(self, callback: Callable[[], None] | None) -> None:
        """What the caller does while another process holds the backend's model (None:
        wait). Only a modelled backend has one: the kernel is never locked."""

    def pid_namespace_init_exited(self, pid: int) -> None:
        """Process ``pid``, a child of the caller, has exited (not reaped yet). When it was
        init of a pid namespace, the kernel has killed every other process of it; a model
        of pid namespaces does the same (the kernel's: nothing left to do)."""


class RealSystem(System):
    """The kernel."""

    name = "real"

    # -- identity ---------------------------------------------------------------------------
    def getpid(self) -> int:
        return os.getpid()

    def getppid(self) -> int:
        """The parent's pid as this process sees it (0 when the parent is outside its pid
        namespace, e.g. for pid 1 of the container)."""
        return os.getppid()

    def privileged(self) -> bool:
        """True when this process may act as host root (euid 0 in the host user namespace,
        the one the kit was launched in)."""
        return os.geteuid() == 0 and probe.in_host_userns()

    # -- namespaces --------------------------------------------------------------------------
    def unshare(self, kinds: Iterable[str]) -> None:
        flags = linux.ns_flags(kinds)
        if flags:
            linux.unshare(flags)

    def setns(self, kind: str, path: str) -> None:
        """Join the namespace of ``kind`` at ``path`` (the calling process must be
        single-threaded to join a user namespace)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(fd, linux.NAMESPACES[kind][0])
        finally:
            os.close(fd)

    def clone(self, kinds: Iterable[str] = (), share_fs: bool = False) -> int:
        """fork, creating the namespaces ``kinds`` for the child; ``share_fs`` shares root,
        cwd and umask with the child (CLONE_FS). Single-threaded callers only."""
        return linux.clone(linux.ns_flags(kinds) | (linux.CLONE_FS if share_fs else 0))

    def ns_inode(self, kind: str, pid: int | str = "self") -> int:
        return linux.ns_inode(kind, pid)

    def write_id_maps(
        self,
        pid: int | str,
        uid_map: list[list[int]],
        gid_map: list[list[int]],
        deny_setgroups: bool,
    ) -> None:
        linux.write_id_maps(
            pid,
            [(a, b, n) for a, b, n in uid_map],
            [(a, b, n) for a, b, n in gid_map],
            deny_setgroups,
        )

    # -- credentials -------------------------------------------------------------------------
    def setresuid(self, ruid: int, euid: int, suid: int) -> None:
        os.setresuid(ruid, euid, suid)

    def setresgid(self, rgid: int, egid: int, sgid: int) -> None:
        os.setresgid(rgid, egid, sgid)

    def setgroups(self, groups: list[int]) -> None:
        os.setgroups(groups)

    def getresuid(self) -> tuple[int, int, int]:
        return os.getresuid()

    def getresgid(self) -> tuple[int, int, int]:
        return os.getresgid()

    def set_keepcaps(self, value: bool) -> None:
        linux.set_keepcaps(value)

    def capabilities(self) -> tuple[int, int, int]:
        """(effective, permitted, inheritable) masks of the calling thread."""
        return linux.capget()

    def set_capabilities(self, effective: int, permitted: int, inheritable: int) -> None:
        linux.capset(effective, permitted, inheritable)

    def limit_bounding(self, keep: int) -> None:
        """Drop every bounding capability not in the mask ``keep`` (needs CAP_SETPCAP)."""
        for cap in range(linux.cap_last() + 1):
            if not keep >> cap & 1 and linux.bounding_has(cap):
                linux.bounding_drop(cap)

    def set_ambient(self, mask: int) -> None:
        linux.ambient_clear()
        for cap in range(64):
            if mask >> cap & 1:
                linux.ambient_raise(cap)

    def set_no_new_privs(self) -> None:
        linux.set_no_new_privs()

    def set_dumpable(self, value: bool) -> None:
        linux.set_dumpable(value)

    # -- mounts and files ---------------------------------------------------------------------
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None = None,
        flags: Iterable[str] = (),
        data: str | None = None,
    ) -> None:
        """mount(2); ``flags`` are names from :data:`kit.system.linux.MOUNT_FLAGS`."""
        mask = 0
        for name in flags:
            if name not in linux.MOUNT_FLAGS:
                raise ValueError(
                    f"unknown mount flag {name!r} (known: {', '.join(linux.MOUNT_FLAGS)})"
                )
            mask |= linux.MOUNT_FLAGS[name]
        linux.mount(source, target, fstype, mask, data)

    def propagation(self, target: str) -> str | None:
        """The propagation type (shared, slave, private, unbindable) of the topmost mount at
        ``target`` in this process's mount namespace; None when nothing is mounted there."""
        return linux.mount_propagation(target)

    def umount(self, target: str, detach: bool = False) -> None:
        linux.umount(target, linux.MNT_DETACH if detach else 0)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        linux.pivot_root(new_root, put_old)

    def chroot(self, path: str) -> None:
        os.chroot(path)

    def chdir(self, path: str) -> None:
        os.chdir(path)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        os.mkdir(path, mode)

    def sethostname(self, name: str) -> None:
        socket.sethostname(name)

    def gethostname(self) -> str:
        return socket.gethostname()

    def setdomainname(self, name: str) -> None:
        linux.setdomainname(name)

    def getdomainname(self) -> str:
        return linux.getdomainname()

    def link_up(self, ifname: str = "lo") -> None:
        """Bring a network interface up in the current network namespace (``SIOCSIFFLAGS``;
        ENODEV when there is no such interface, EPERM without CAP_NET_ADMIN over it)."""
        linux.link_up(ifname)

    # -- probes ---------------------------------------------------------------------------------
    def model_limits(self) -> list[str]:
        """What the run did that the backend cannot reproduce (the kernel: nothing)."""
        return []

    def own_files(self) -> list[str]:
        """The files the backend keeps in the run's directory (the kernel: none), by path:
        not the run's leftovers."""
        return []

    def modelled_mounts(self) -> list[str]:
        """Where the backend only pretends a file system is mounted (the kernel: nowhere):
        what is written under one lands on the host's file system below it."""
        return []

    def snapshot(self) -> dict[str, Any]:
        return probe.snapshot()

    def escalation(self) -> dict[str, Any]:
        return probe.escalation()


_current: System = RealSystem()


def current() -> System:
    """The system interface of this process."""
    return _current


def use(system: System) -> None:
    """Make ``system`` the interface of this process (the starter does this per run)."""
    global _current
    _current = system
