"""Privilege probes: what the kernel says about the calling process at a hook.

:func:`snapshot` reads, for every thread, the credentials and capability sets from
``/proc/self/task/TID/status`` (the kernel's own report), plus the process's namespaces, id
maps, securebits and dumpable flag. :func:`escalation` forks a throwaway child that tries to
regain privilege and reports what worked; the hooked process itself is never changed.
"""

from __future__ import annotations

import os
from typing import Any

from kit import linux

SNAPSHOT_KEYS = ("threads", "securebits", "dumpable", "ns", "uid_map", "gid_map", "nspid",
                 "root")
FULL_MAP = [[0, 0, 4294967295]]

#: pids of escalation-probe children (their SIGCHLD is the kit's, not the engine's business).
probe_children: set[int] = set()


def _ids(field: str) -> list[int]:
    return [int(x) for x in field.split()]


def _caps(field: str) -> list[str]:
    return linux.mask_to_caps(int(field, 16))


def _read_map(path: str) -> list[list[int]]:
    try:
        text = linux.read_file(path).decode()
    except OSError:
        return []
    return [[int(x) for x in line.split()] for line in text.splitlines() if line.strip()]


def thread_state(status: dict[str, str], tid: int) -> dict[str, Any]:
    """One thread's credentials from its parsed ``status`` file."""
    return {
        "tid": tid,
        "uid": _ids(status["Uid"]),  # real, effective, saved, fs
        "gid": _ids(status["Gid"]),
        "groups": _ids(status.get("Groups", "")),
        "caps": {
            "effective": _caps(status["CapEff"]),
            "permitted": _caps(status["CapPrm"]),
            "inheritable": _caps(status["CapInh"]),
            "bounding": _caps(status["CapBnd"]),
            "ambient": _caps(status.get("CapAmb", "0")),
        },
        "no_new_privs": status.get("NoNewPrivs", "0") == "1",
        "seccomp": int(status.get("Seccomp", "0")),
    }


def _thread_ns(tid: int) -> dict[str, int | None]:
    """The namespaces of one thread (a thread may setns on its own, e.g. into a net ns)."""
    return linux.ns_inodes(f"/proc/self/task/{tid}/ns")


def snapshot() -> dict[str, Any]:
    """Privilege state of the calling process, every thread included."""
    threads = []
    nspid: list[int] = []
    leader = linux.proc_self()  # /proc/self/ns is the thread group leader's
    ns: dict[str, int | None] | None = None
    for tid in linux.thread_ids():
        try:
            status = linux.read_status(f"/proc/self/task/{tid}/status")
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile (ESRCH)
            continue
        state = thread_state(status, tid)
        state["ns"] = _thread_ns(tid)
        if tid != leader and all(ino is None for ino in state["ns"].values()):
            continue  # it ended between its status and its namespaces
        threads.append(state)
        if tid == leader:
            ns = dict(state["ns"])
        if not nspid:
            nspid = _ids(status.get("NSpid", str(os.getpid())))
    if ns is None:
        ns = linux.ns_inodes()
    return {
        "threads": threads,
        "securebits": linux.get_securebits(),
        "dumpable": linux.get_dumpable(),
        "ns": ns,
        "uid_map": _read_map("/proc/self/uid_map"),
        "gid_map": _read_map("/proc/self/gid_map"),
        "nspid": nspid,
        "root": linux.path_identity("/"),
    }


def _own_capabilities() -> tuple[int, int, int]:
    """(effective, permitted, inheritable) of the calling process, which must have one
    thread (the escalation child): read from its ``/proc/self/status``, which a freshly
    forked child does for a fraction of what ``capget`` through ctypes costs it there; else
    ``capget``."""
    try:
        status = linux.read_file("/proc/self/status")
        masks = []
        for key in (b"\nCapEff:", b"\nCapPrm:", b"\nCapInh:"):
            start = status.index(key) + len(key)
            masks.append(int(status[start:status.index(b"\n", start)], 16))
        return masks[0], masks[1], masks[2]
    except (OSError, ValueError):
        return linux.capget()


def escalation() -> dict[str, Any]:
    """Try to regain privilege from a throwaway child of the calling thread.

    Returns ``{"setresuid_root": bool, "raise_caps": [names], "setuid_exec": bool,
    "initial_userns": bool, "host_escalation": bool}``. ``setuid_exec`` is derived (not
    tried): exec of a root-owned setuid binary grants privilege unless no_new_privs is set or
    the process is outside the initial user namespace. ``host_escalation`` is true when any
    route gives host privilege (uid 0 or a capability in the initial user namespace).
    """
    initial = _read_map("/proc/self/uid_map") == FULL_MAP
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - measured through the ledger, not in-process coverage
        code = 0
        try:
            os.close(rfd)
            report = []
            try:
                os.setresuid(0, 0, 0)
                report.append("U")
            except OSError:
                pass
            try:
                eff, perm, inh = _own_capabilities()
                if perm & ~eff:
                    linux.capset(eff | perm, perm, inh)
                    report.append("C" + format(perm & ~eff, "x"))
            except OSError:
                pass
            os.write(wfd, " ".join(report).encode() + b"\n")
        except BaseException:
            code = 1
        os._exit(code)
    probe_children.add(pid)
    os.close(wfd)
    data = b""
    try:
        while chunk := os.read(rfd, 256):
            data += chunk
    finally:
        os.close(rfd)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # an engine reaped it (waitpid(-1)): not our problem here
            pass
    words = data.decode().split()
    setresuid_root = "U" in words
    raised: list[str] = []
    for w in words:
        if w.startswith("C"):
            raised = linux.mask_to_caps(int(w[1:], 16))
    nnp = linux.get_no_new_privs()
    uid = os.getresuid()
    setuid_exec = initial and not nnp and 0 not in uid
    return {
        "setresuid_root": setresuid_root,
        "raise_caps": raised,
        "setuid_exec": setuid_exec,
        "initial_userns": initial,
        "host_escalation": initial and (setresuid_root or bool(raised) or setuid_exec),
    }


def host_privilege(snap: dict[str, Any]) -> bool:
    """True when any thread has uid 0 (real, effective or saved) or a permitted capability
    while in the initial user namespace (``SPEC.md`` §4)."""
    if snap["uid_map"] != FULL_MAP:
        return False
    return any(0 in t["uid"][:3] or t["caps"]["permitted"] for t in snap["threads"])
