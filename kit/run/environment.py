"""What this machine can run for real, per flow, and the ``auto`` backend's choice."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator, Mapping

from kit.run.request import Invoker
from kit.starter.config import FLOWS
from kit.system import linux


def _probe(
    name: str, uid: int | None, gid: int | None, kinds: list[str], self_map: bool
) -> tuple[bool, str]:
    """In a forked child (never in this process): optionally become ``uid``, create the
    namespaces ``kinds`` and, for a user namespace, map the user to itself — what the flow's
    run will need. (A user namespace can be created yet unusable: Ubuntu's AppArmor
    restriction denies the new namespace every capability, so its maps cannot be written.)
    Namespaces alone, as who we are, in a process that allows it (:func:`probe_in_threads`),
    are tried in a short-lived thread instead."""
    if _in_threads and uid is None and not self_map and "user" not in kinds:
        return _probe_in_thread(name, kinds)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - result reported through the pipe
        message = ""
        try:
            os.close(rfd)
            step = "become the test user"
            if uid is not None and gid is not None and os.getuid() == 0:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                linux.set_dumpable(True)  # else /proc/self/uid_map is not writable (EACCES)
            me, group = os.geteuid(), os.getegid()  # read before: unmapped in the new ns
            step = f"unshare({', '.join(kinds)})"
            linux.unshare(linux.ns_flags(kinds))
            if self_map:
                step = "write the user namespace's uid/gid maps"
                linux.write_id_maps("self", [(me, me, 1)], [(group, group, 1)], True)
        except OSError as exc:
            message = f"{step} failed: {os.strerror(exc.errno) if exc.errno else exc}"
        except BaseException as exc:  # noqa: BLE001 the forked probe reports any failure
            message = f"{step} failed: {exc!r}"
        os.write(wfd, message.encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return (False, f"{name}: {message}") if message else (True, "")


#: Whether this process lets a probe create namespaces in a thread of its own.
_in_threads = False


def probe_in_threads() -> None:
    """Let the probes that create namespaces alone run in a short-lived thread of this
    process (:func:`_probe_in_thread`), not in a forked child. For a one-shot process that
    forks its run's supervisor itself (``kit run``); never for a launcher none of whose
    threads may change namespace (a pytest process: the kit's own tests guard that)."""
    global _in_threads
    _in_threads = True


def _probe_in_thread(name: str, kinds: list[str]) -> tuple[bool, str]:
    """Create the namespaces ``kinds`` (no user namespace) in a thread of this process that
    ends at once: a namespace made by unshare is the calling thread's, so no other thread of
    this process changes namespace, and the new ones go with the thread. Not a fork, which
    write-protects every page of this process: each page written again after it faults (a
    one-shot ``kit run``, which probes the root flow, paid 1,800 faults, 3 ms)."""
    failure: list[str] = []

    def attempt() -> None:
        step = f"unshare({', '.join(kinds)})"
        try:
            linux.unshare(linux.ns_flags(kinds))
        except OSError as exc:
            failure.append(f"{step} failed: {os.strerror(exc.errno) if exc.errno else exc}")
        except BaseException as exc:  # noqa: BLE001 the probe reports any failure
            failure.append(f"{step} failed: {exc!r}")

    thread = threading.Thread(target=attempt, name="kit-probe")
    thread.start()
    thread.join()
    return (False, f"{name}: {failure[0]}") if failure else (True, "")


#: The flows as ``python -m kit flows`` lists them: root, the emulated setuid starter's, then
#: the user namespace ones.
SHOWN_ORDER = ("root", "suid", "hybrid", "userns", "fakeroot")


class Flows(Mapping[str, tuple[bool, str]]):
    """flow -> (can run for real, why), each decided by trying what its runs need, on first
    look: a run asks for one flow and pays only for that flow's probes (the root flow's
    namespaces, the test user's user namespace), each made once per process."""

    def __init__(self) -> None:
        self._decided: dict[str, tuple[bool, str]] = {}
        self._user: tuple[Invoker | None, str] | None = None
        self._userns: tuple[bool, str] | None = None

    def __getitem__(self, flow: str) -> tuple[bool, str]:
        if flow not in self._decided:
            if flow not in FLOWS:
                raise KeyError(flow)
            self._decided[flow] = self._decide(flow)
        return self._decided[flow]

    def __iter__(self) -> Iterator[str]:
        return iter(SHOWN_ORDER)

    def __len__(self) -> int:
        return len(FLOWS)

    def __repr__(self) -> str:
        return f"Flows({dict(self._decided)!r}, probed {len(self._decided)}/{len(FLOWS)})"

    def user(self) -> tuple[Invoker | None, str]:
        """The invoking user U (None when there is none) and what to say about it."""
        if self._user is None:
            try:
                user = Invoker.resolve()
                self._user = user, f"invoking user U = {user.name} ({user.uid})"
            except ValueError as exc:
                self._user = None, str(exc)
        return self._user

    def userns(self) -> tuple[bool, str]:
        """Whether U can create a user namespace and map itself in it (the userns and
        fakeroot flows; the hybrid flow's container)."""
        if self._userns is None:
            user, user_why = self.user()
            if user is None:
                self._userns = (False, user_why)
            else:
                ok, why = _probe(
                    f"user namespace as uid {user.uid}", user.uid, user.gid, ["user"], True
                )
                self._userns = (
                    (True, f"unprivileged user namespaces work; {user_why}") if ok else (False, why)
                )
        return self._userns

    def _decide(self, flow: str) -> tuple[bool, str]:
        root = os.geteuid() == 0
        if flow == "root":
            if not root:
                return (False, "needs uid 0")
            ok, why = _probe("root", None, None, ["mount", "uts", "ipc", "net", "pid"], False)
            return (True, "running as root; namespaces can be created") if ok else (False, why)
        if flow in ("userns", "fakeroot"):
            return self.userns()
        # suid and hybrid: the setuid starter is emulated as root, for U
        if not root:
            return (False, "needs root to emulate the setuid starter")
        if not self["root"][0]:
            return self["root"]
        user, user_why = self.user()
        if user is None:
            return (False, user_why)
        if flow == "hybrid" and not self.userns()[0]:
            return self.userns()
        return (True, f"setuid starter emulated as root; {user_why}")


@functools.cache
def flows() -> Flows:
    """flow -> (can run for real, why) for this process; a flow is probed when it is first
    looked up (``dict(flows())`` probes them all)."""
    return Flows()


def userns_note() -> str | None:
    """What can be said when this process is not in the kernel's initial user namespace
    (None when nothing says so: the initial one cannot be proved from inside)."""
    try:
        _, inode = linux.userns_identity()
        with open("/proc/self/uid_map") as f:
            lines = [" ".join(line.split()) for line in f if line.strip()]
    except OSError as exc:
        return (
            f"user namespace: unknown ({exc}); host privilege is judged relative to the "
            "user namespace the kit is launched in"
        )
    shown = "; ".join(lines) or "empty"
    if inode == linux.INITIAL_USERNS_INO and lines == ["0 0 4294967295"]:
        return None
    why = (
        "its uid_map maps the full range, but its inode is not the initial one's"
        if lines == ["0 0 4294967295"]
        else "its uid_map does not map the full range"
    )
    return (
        f"user namespace: the kit runs inside a non-initial user namespace (inode "
        f"{inode}, uid_map '{shown}': {why}); host privilege and escalation are judged "
        "relative to this namespace, the one the kit is launched in (SPEC §4): what "
        "its ancestors could do is out of the kit's sight"
    )


#: Backends a run can ask for; ``auto`` is resolved per flow by :func:`backend_for`.
BACKENDS = ("real", "fake", "auto")


def backend_for(flow: str) -> tuple[str, str]:
    """The ``auto`` backend's choice for ``flow`` (``SPEC.md`` §9) and why: the kernel where
    this machine can run the flow for real, the fake backend's model for the rest."""
    ok, why = flows()[flow]
    if ok:
        return "real", why
    return "fake", f"fake: the real backend cannot run it here ({why})"
