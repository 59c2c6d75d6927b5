"""Who sent a ledger datagram: the kernel's word (SCM_CREDENTIALS) against the kit's processes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kit.ledger import probe
from kit.ledger.record import outside_checked
from kit.system import linux

#: What the supervisor compares between a snapshot's entry for each thread of the sender
#: and its own read of that thread (the rest of the snapshot is the process's).
CHECKED_FIELDS = ("uid", "gid", "groups", "caps", "no_new_privs", "seccomp")

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

    ``own_pids(kernel pid, its NSpid)`` gives the pids a process may call its own besides
    its innermost NSpid (the fake backend's model's), from the NSpid read once: the process
    may be gone by the time it is asked. A role is taken once per run: a second claimant is an
    impostor.
    """

    own_pids: Callable[[int, list[int]], set[int]] = field(default=lambda pid, nspid: set())
    processes: dict[int, KitProcess] = field(default_factory=dict)
    #: A kernel pid as the ledger numbers the run's processes (in the host sandbox, its pid
    #: namespace's number; None when gone): what the messages show.
    number: Callable[[int], int | None] = field(default=lambda pid: pid)

    def _shown(self, kernel_pid: int) -> str:
        numbered = self.number(kernel_pid)
        return str(kernel_pid) + " (gone: not renumbered)" if numbered is None else str(numbered)

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
            return (
                f"it claims role {role} but comes from the {known.role} process "
                f"(pid {self._shown(kernel_pid)})"
            )
        if known.pids is None:
            ids = linux.process_ids(kernel_pid)
            known.pids = None if ids is None else self._pids(kernel_pid, ids[1])
        if known.pids is not None and claimed not in known.pids:
            return f"it claims pid {claimed} but its sender is pid {self._shown(kernel_pid)}"
        return None

    def _register(self, kernel_pid: int, role: str, claimed: int) -> str | None:
        if role not in PARENT:
            return (
                f"pid {self._shown(kernel_pid)} is not a process of the kit (it claims "
                f"role {role}, which is the {self.role_of_name(role)})"
            )
        ids = linux.process_ids(kernel_pid)
        if ids is not None:
            parent = self.processes.get(ids[0])
            if (parent is None or parent.role != PARENT[role]) and not self._orphaned(role):
                return (
                    f"pid {self._shown(kernel_pid)} is not a process of the kit: it claims "
                    f"role {role} but its parent, pid {self._shown(ids[0])}, is not the "
                    f"{PARENT[role]} process"
                )
            if claimed not in self._pids(kernel_pid, ids[1]):
                return f"it claims pid {claimed} but its sender is pid {self._shown(kernel_pid)}"
        if self.taken(role):
            return (
                f"pid {self._shown(kernel_pid)} is not a process of the kit: the {role} "
                f"process is another (it claims role {role})"
            )
        # Gone already (a short-lived stage 1 on a busy machine): first come, first served;
        # the real process's own datagram then shows up as the impostor's double.
        self.processes[kernel_pid] = KitProcess(
            role, None if ids is None else self._pids(kernel_pid, ids[1])
        )
        return None

    def _orphaned(self, role: str) -> bool:
        """Whether the kit process that creates ``role`` has died already: its child, whose
        first datagram was sent while it lived, now has another parent (the reaper). A run
        that fails (the master ends the container) can end the parent that soon; a second
        claimant of the role is still refused (:meth:`taken`)."""
        creators = [pid for pid, p in self.processes.items() if p.role == PARENT[role]]
        return bool(creators) and not any(linux.process_alive(pid) for pid in creators)

    def role_of_name(self, role: str) -> str:
        for name, roles in PROCESS_ROLES.items():
            if role in roles:
                return f"role of the {name} process"
        return "role of no process of the run"

    def _pids(self, kernel_pid: int, nspid: list[int]) -> set[int]:
        return {nspid[-1]} | self.own_pids(kernel_pid, nspid) if nspid else set()


def check_snapshot(
    kernel_pid: int,
    event: dict[str, Any],
    confirmed: bool,
    tasks: dict[tuple[int, int], int] | None = None,
) -> str | None:
    """Why ``event``'s snapshot is not what the kernel says of the sending process (read
    here, from outside it, while the sender waits: ``confirmed``); None when it is. Every
    thread the kernel lists is compared, the sending one first. A snapshot without the wait
    cannot be checked and is refused. ``tasks``: where each sending thread was found before
    (kept by the caller, see :func:`find_thread`)."""
    snap = outside_checked(event)
    if not isinstance(snap, dict) or "threads" not in snap:
        return None  # no snapshot (probes off), or the probe's own error
    if not confirmed:
        return "its snapshot came without waiting for the supervisor's outside check"
    found = find_thread(kernel_pid, event["tid"], tasks)
    if found is None:
        return f"its sending thread {event['tid']} is not a thread of pid {kernel_pid}"
    task, status = found
    threads = snap["threads"] if isinstance(snap["threads"], list) else []
    numbered = {t.get("tid"): t for t in threads if isinstance(t, dict)}
    live = _live_tasks(kernel_pid)
    live.setdefault(task, (status, _levels(status, task)))
    # The snapshot numbers its threads as the sender's /proc does: one level of their NSpid
    # (in the kit's host sandbox, the RPC server reads the sandbox's, not its own).
    level = _numbering_level(numbered, live, task)
    if level is None:
        return f"its snapshot has no entry for its sending thread {event['tid']}"
    mine = numbered[_at(live[task][1], level)]
    maps = _id_maps(kernel_pid)  # read once: every thread of a process shares them
    problem = _compare(_kernel_view(maps, status, task), mine, event["tid"])
    problem = problem or _check_ns(mine, _ns_of(kernel_pid, task), event["tid"])
    if problem is None and event.get("kind") != "rpc_call":
        # The process's own namespaces: what NS checks read first (an rpc_call's credentials
        # carry none).
        problem = _check_ns(snap, linux.ns_inodes(f"/proc/{kernel_pid}/ns"), "the process")
    return problem or _check_other_threads(kernel_pid, maps, task, live, level, numbered)


def _levels(status: dict[str, str], task: int) -> list[int]:
    """A task's numbers in every pid namespace it is in, outermost first (NSpid)."""
    return [int(n) for n in status.get("NSpid", str(task)).split()] or [task]


def _at(levels: list[int], level: int) -> int:
    return levels[level] if level < len(levels) else levels[-1]


def _live_tasks(kernel_pid: int) -> dict[int, tuple[dict[str, str], list[int]]]:
    """Every thread of ``kernel_pid`` that is not ending: task → (its status, its levels).
    A snapshot leaves out a thread it sees ending; this one may have seen it so."""
    try:
        listed = os.listdir(f"/proc/{kernel_pid}/task")
    except OSError:
        return {}  # the process is gone: nothing left to compare with
    live = {}
    for name in listed:
        try:
            raw = linux.read_file(f"/proc/{kernel_pid}/task/{name}/status")
        except OSError:
            continue  # ended since it was listed
        if linux.thread_ending(int(name), kernel_pid):
            continue
        status = _parse_status(raw)
        live[int(name)] = (status, _levels(status, int(name)))
    return live


def _numbering_level(
    numbered: dict[Any, dict[str, Any]],
    live: dict[int, tuple[dict[str, str], list[int]]],
    sender: int,
) -> int | None:
    """The NSpid level the snapshot numbers threads at: of those where the sending thread has
    an entry, the one where most of the kernel's threads do (a number of one level may be
    another thread's at another level), the innermost on a tie."""
    depth = len(live[sender][1])
    best: tuple[int, int] | None = None
    for level in range(depth):
        if _at(live[sender][1], level) not in numbered:
            continue
        score = sum(_at(levels, level) in numbered for _, levels in live.values())
        if best is None or score >= best[0]:
            best = (score, level)
    return None if best is None else best[1]


def _ns_of(kernel_pid: int, task: int) -> dict[str, int | None]:
    return linux.ns_inodes(f"/proc/{kernel_pid}/task/{task}/ns")


def _kernel_view(maps: IdMaps, status: dict[str, str], task: int) -> dict[str, Any]:
    """What the kernel's ``status`` of task ``task`` says of its credentials, its ids as the
    process sees them (``maps``: :func:`_id_maps`) and its capability sets as masks."""
    return _as_inside(maps, probe.thread_state(status, task, masks=True))


def _compare(kernel: dict[str, Any], mine: dict[str, Any], tid: Any) -> str | None:
    """Why snapshot entry ``mine`` of thread ``tid`` says other than the ``kernel``'s view
    of it (:func:`_kernel_view`); None when it does not."""
    # Masks on the wire: compared as masks when every set is one (a mask names its
    # capabilities one to one), else as names; a mismatch is told in names either way.
    if not _all_masks(mine.get("caps")):
        mine = {**mine, "caps": probe.named_caps(mine.get("caps"))}
        kernel = {**kernel, "caps": probe.named_caps(kernel["caps"])}
    for key in CHECKED_FIELDS:
        if mine.get(key) != kernel[key]:
            said, says = mine.get(key), kernel[key]
            if key == "caps":
                said, says = probe.named_caps(said), probe.named_caps(says)
            return f"its snapshot says {key} {said!r} for thread {tid}, the kernel says {says!r}"
    return None


def _check_other_threads(
    kernel_pid: int,
    maps: IdMaps,
    sender: int,
    live: dict[int, tuple[dict[str, str], list[int]]],
    level: int,
    numbered: dict[Any, dict[str, Any]],
) -> str | None:
    """Why the snapshot's other threads are not every live thread the kernel lists for the
    process, each as the kernel says it is; None when they are. The snapshot is read inside
    the process, where engine code can hide a thread from it (a mount over its
    ``/proc/PID/task/TID``, a patched list) or dress one up, and SPEC §4 speaks of every
    thread. A thread that changed since the snapshot makes the sender read it again (RETRY),
    as a change of the sending thread's does. One the snapshot lacks but that is, to the
    kernel, exactly as one it shows hides nothing (threads start between the snapshot and
    this read: a timer, a monitor's helper)."""
    for task, (status, levels) in live.items():
        if task == sender:
            continue
        number = _at(levels, level)
        actual = _ns_of(kernel_pid, task)
        if any(inode is None for inode in actual.values()):
            continue  # ending after all (its own process reads a live one's): left out
        kernel = _kernel_view(maps, status, task)
        mine = numbered.get(number)
        if mine is None:
            if any(
                _compare(kernel, shown, number) is None and _check_ns(shown, actual, number) is None
                for shown in numbered.values()
            ):
                continue
            return (
                f"its snapshot has no entry for thread {number}, which the kernel lists "
                f"(task {task}: uid {status.get('Uid', '?')}, effective capabilities "
                f"{status.get('CapEff', '?')})"
            )
        problem = _compare(kernel, mine, number) or _check_ns(mine, actual, number)
        if problem is not None:
            return problem
    return None


def _parse_status(raw: bytes) -> dict[str, str]:
    """A task's ``status`` file as linux.read_status parses it, but a thread's name is any
    bytes its process chose (prctl PR_SET_NAME), not always UTF-8: decoding strictly let
    engine code crash the supervisor's check with a name."""
    status: dict[str, str] = {}
    for line in raw.decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return status


def _all_masks(caps: Any) -> bool:
    """Whether ``caps`` is a dict of capability masks only (what :func:`probe.named_caps`
    would name: ints, not bools, of 64 bits)."""
    return isinstance(caps, dict) and all(
        type(v) is int and 0 <= v < 1 << 64 for v in caps.values()
    )


def find_thread(
    kernel_pid: int, tid: int, tasks: dict[tuple[int, int], int] | None = None
) -> tuple[int, dict[str, str]] | None:
    """What :func:`kit.system.linux.thread_status` finds, cheaper: first the task where
    ``tasks`` found the thread last time, its status read again (a process's threads
    calling themselves ``tid`` are one at a time); else every task, newest first (a hook's
    snapshot mostly comes from a thread started for the hook), each status parsed only
    when its NSpid names ``tid``."""
    known = tasks.get((kernel_pid, tid)) if tasks is not None else None
    found = None if known is None else _thread_if(kernel_pid, str(known), tid)
    if found is None:
        try:
            listed = os.listdir(f"/proc/{kernel_pid}/task")
        except OSError:
            return None
        for task in sorted(listed, key=int, reverse=True):
            if task != str(known) and (found := _thread_if(kernel_pid, task, tid)):
                break
    if found is not None and tasks is not None:
        tasks[(kernel_pid, tid)] = found[0]
    return found


def _thread_if(kernel_pid: int, task: str, tid: int) -> tuple[int, dict[str, str]] | None:
    """(task, its parsed status) when task ``task`` of ``kernel_pid`` calls itself ``tid``
    (the last field of its NSpid; the task's own number without one)."""
    try:
        raw = linux.read_file(f"/proc/{kernel_pid}/task/{task}/status")
    except OSError:
        return None
    start = raw.find(b"\nNSpid:")
    if start < 0:
        nspid = [task.encode()]
    else:
        end = raw.find(b"\n", start + 1)
        nspid = raw[start + 7 : end if end >= 0 else len(raw)].split()
    if not nspid or int(nspid[-1]) != tid:
        return None
    return int(task), _parse_status(raw)


OVERFLOW_ID = 65534  # what a process is shown for an id its user namespace does not map


#: A process's uid map and gid map, as :func:`_read_map` reads them.
IdMaps = tuple[list[list[int]], list[list[int]]]


def _id_maps(kernel_pid: int) -> IdMaps:
    return _read_map(f"/proc/{kernel_pid}/uid_map"), _read_map(f"/proc/{kernel_pid}/gid_map")


def _as_inside(maps: IdMaps, state: dict[str, Any]) -> dict[str, Any]:
    """The ids of ``state`` (as /proc shows them to us) as the process itself sees them:
    through its id ``maps``, which, read by a process of another user namespace, translate
    its ids into the reader's."""
    uid_map, gid_map = maps
    return {
        **state,
        "uid": [_inside(i, uid_map) for i in state["uid"]],
        "gid": [_inside(i, gid_map) for i in state["gid"]],
        "groups": [_inside(i, gid_map) for i in state["groups"]],
    }


def _read_map(path: str) -> list[list[int]]:
    try:
        text = linux.read_file(path).decode()
    except OSError:
        return [[0, 0, 4294967295]]
    return [[int(x) for x in line.split()] for line in text.splitlines() if line.strip()]


def _inside(outside_id: int, lines: list[list[int]]) -> int:
    for inside, outside, count in lines:
        if outside <= outside_id < outside + count:
            return inside + outside_id - outside
    return OVERFLOW_ID


def _check_ns(mine: dict[str, Any], actual: dict[str, int | None], whose: Any) -> str | None:
    """Why the namespaces ``mine`` claims (its ``ns``) are not the kernel's ``actual`` ones
    of thread (or process) ``whose``: a real snapshot gives each its namespaces, and leaving
    them out would hide one (a master thread in the container's network namespace)."""
    claimed = mine.get("ns")
    if not isinstance(claimed, dict):
        return f"its snapshot gives {_whose(whose)} no namespaces"
    for kind, inode in actual.items():
        if inode is not None and claimed.get(kind) != inode:
            return (
                f"its snapshot says {kind} namespace {claimed.get(kind)!r} for "
                f"{_whose(whose)}, the kernel says {inode}"
            )
    return None


def _whose(whose: Any) -> str:
    return whose if isinstance(whose, str) else f"thread {whose}"
