"""Who sent a ledger datagram: the kernel's word (SCM_CREDENTIALS), checked against the kit's processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kit import linux

#: Roles each kit process writes under: the starter becomes the master, the container
#: process becomes stage 2.
PROCESS_ROLES: dict[str, frozenset[str]] = {
    "starter": frozenset({"starter", "master"}),
    "stage1": frozenset({"stage1"}),
    "container": frozenset({"container", "stage2"}),
    "rpc": frozenset({"rpc"}),
}
#: The kit process that creates each of the others (by its first role).
PARENT: dict[str, str] = {"stage1": "starter", "container": "starter", "rpc": "container"}


@dataclass
class KitProcess:
    role: str  # its first role (a key of PROCESS_ROLES)
    pids: set[int] | None  # the pids it may call its own, once /proc could tell


@dataclass
class Senders:
    """The kit processes of one run, by kernel pid (as the supervisor's pid namespace numbers
    them). The starter is known from the fork; every other kit process is known by its first
    datagram, which the kit sends before any engine code runs in it or in a process that could
    have forked an impostor (stage 1 before its hooks; the container before the master's
    hooks; the RPC server right after its clone, and its parent must be the container).

    ``own_pids(kernel pid)`` gives the pids a process may call its own (the kernel's NSpid,
    plus the fake backend's model). A role is taken once per run: a second claimant is an
    impostor.
    """

    own_pids: Callable[[int], set[int]] = field(default=lambda pid: set())
    processes: dict[int, KitProcess] = field(default_factory=dict)

    def add_starter(self, kernel_pid: int) -> None:
        self.processes[kernel_pid] = KitProcess("starter", None)

    def role_of(self, kernel_pid: int | None) -> str | None:
        p = self.processes.get(kernel_pid) if kernel_pid else None
        return p.role if p else None

    def taken(self, role: str) -> bool:
        return any(p.role == role for p in self.processes.values())

    def check(self, kernel_pid: int | None, event: dict[str, Any]) -> str | None:
        """Why ``event`` (schema-valid) cannot come from ``kernel_pid``; None when it can.
        A first datagram from a new kit process registers it."""
        if kernel_pid is None:
            return "the kernel gave no credentials with it"
        if kernel_pid == 0:
            return "its sender is outside the supervisor's pid namespace"
        role, claimed = event["role"], event["pid"]
        known = self.processes.get(kernel_pid)
        if known is None:
            return self._register(kernel_pid, role, claimed)
        if role not in PROCESS_ROLES[known.role]:
            return (f"it claims role {role} but comes from the {known.role} process "
                    f"(pid {kernel_pid})")
        if known.pids is None:
            ids = linux.process_ids(kernel_pid)
            known.pids = None if ids is None else self._pids(kernel_pid, ids[1])
        if known.pids is not None and claimed not in known.pids:
            return f"it claims pid {claimed} but its sender is pid {kernel_pid}"
        return None

    def _register(self, kernel_pid: int, role: str, claimed: int) -> str | None:
        if role not in PARENT:
            return (f"pid {kernel_pid} is not a process of the kit (it claims role {role}, "
                    f"which is the {self.role_of_name(role)})")
        ids = linux.process_ids(kernel_pid)
        if ids is not None:
            parent = self.processes.get(ids[0])
            if parent is None or parent.role != PARENT[role]:
                return (f"pid {kernel_pid} is not a process of the kit: it claims role {role} "
                        f"but its parent, pid {ids[0]}, is not the {PARENT[role]} process")
            if claimed not in self._pids(kernel_pid, ids[1]):
                return f"it claims pid {claimed} but its sender is pid {kernel_pid}"
        if self.taken(role):
            return (f"pid {kernel_pid} is not a process of the kit: the {role} process is "
                    f"another (it claims role {role})")
        # Gone already (a short-lived stage 1 on a busy machine): first come, first served;
        # the real process's own datagram then shows up as the impostor's double.
        self.processes[kernel_pid] = KitProcess(
            role, None if ids is None else self._pids(kernel_pid, ids[1]))
        return None

    def role_of_name(self, role: str) -> str:
        for name, roles in PROCESS_ROLES.items():
            if role in roles:
                return f"role of the {name} process"
        return "role of no process of the run"

    def _pids(self, kernel_pid: int, nspid: list[int]) -> set[int]:
        return {nspid[-1]} | self.own_pids(kernel_pid) if nspid else self.own_pids(kernel_pid)
