"""What this machine can run for real: one probe per flow, each with a reason; and the
``auto`` backend's choice per flow (real where the flow can run for real, else fake)."""

from __future__ import annotations

import functools
import os

from kit import linux
from kit.request import Invoker


def _probe(name: str, uid: int | None, gid: int | None, kinds: list[str],
           self_map: bool) -> tuple[bool, str]:
    """In a forked child (never in this process): optionally become ``uid``, create the
    namespaces ``kinds`` and, for a user namespace, map the user to itself — what the flow's
    run will need. (A user namespace can be created yet unusable: Ubuntu's AppArmor
    restriction denies the new namespace every capability, so its maps cannot be written.)"""
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


@functools.cache
def flows() -> dict[str, tuple[bool, str]]:
    """flow -> (can run for real, why), each decided by trying what its runs need."""
    root = os.geteuid() == 0
    out: dict[str, tuple[bool, str]] = {}
    try:
        user = Invoker.resolve()
        user_ok, user_why = True, f"invoking user U = {user.name} ({user.uid})"
    except ValueError as exc:
        user, user_ok, user_why = None, False, str(exc)
    if root:
        ok, why = _probe("root", None, None, ["mount", "uts", "ipc", "net", "pid"], False)
        out["root"] = (True, "running as root; namespaces can be created") if ok else \
            (False, why)
    else:
        out["root"] = (False, "needs uid 0")
    for flow in ("suid", "hybrid"):
        if not root:
            out[flow] = (False, "needs root to emulate the setuid starter")
        elif not out["root"][0]:
            out[flow] = out["root"]
        elif not user_ok:
            out[flow] = (False, user_why)
        else:
            out[flow] = (True, f"setuid starter emulated as root; {user_why}")
    if user is None:
        ns = (False, user_why)
    else:
        ok, why = _probe(f"user namespace as uid {user.uid}", user.uid, user.gid,
                         ["user"], True)
        ns = (True, f"unprivileged user namespaces work; {user_why}") if ok else (False, why)
    out["userns"] = ns
    out["fakeroot"] = ns
    if out["hybrid"][0] and not ns[0]:
        out["hybrid"] = ns
    return out


def userns_note() -> str | None:
    """What can be said when this process is not in the kernel's initial user namespace
    (None when nothing says so: the initial one cannot be proved from inside)."""
    try:
        _, inode = linux.userns_identity()
        with open("/proc/self/uid_map") as f:
            lines = [" ".join(line.split()) for line in f if line.strip()]
    except OSError as exc:
        return f"user namespace: unknown ({exc}); host privilege is judged relative to the " \
            "user namespace the kit is launched in"
    shown = "; ".join(lines) or "empty"
    if inode == linux.INITIAL_USERNS_INO and lines == ["0 0 4294967295"]:
        return None
    why = ("its uid_map maps the full range, but its inode is not the initial one's"
           if lines == ["0 0 4294967295"] else "its uid_map does not map the full range")
    return (f"user namespace: the kit runs inside a non-initial user namespace (inode "
            f"{inode}, uid_map '{shown}': {why}); host privilege and escalation are judged "
            "relative to this namespace, the one the kit is launched in (SPEC §4): what "
            "its ancestors could do is out of the kit's sight")


#: Backends a run can ask for; ``auto`` is resolved per flow by :func:`backend_for`.
BACKENDS = ("real", "fake", "auto")


def backend_for(flow: str) -> tuple[str, str]:
    """The ``auto`` backend's choice for ``flow`` (``SPEC.md`` §9) and why: the kernel where
    this machine can run the flow for real, the fake backend's model for the rest."""
    ok, why = flows()[flow]
    if ok:
        return "real", why
    return "fake", f"fake: the real backend cannot run it here ({why})"


def resolve_backend(backend: str, flow: str) -> str:
    """``real``/``fake`` as given; ``auto`` as :func:`backend_for` decides for ``flow``."""
    if backend == "auto":
        return backend_for(flow)[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    return backend
