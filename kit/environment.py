"""What this machine can run for real: one probe per flow, each with a reason; and the
``auto`` backend's choice per flow (real where the flow can run for real, else fake)."""

from __future__ import annotations

import functools
import os

from kit import linux
from kit.request import Invoker


def _userns_possible(uid: int, gid: int) -> tuple[bool, str]:
    """Fork, become ``uid`` and try to create a user namespace (never in this process)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - result reported through the exit code
        code = 1
        try:
            if os.getuid() == 0:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            linux.unshare(linux.CLONE_NEWUSER)
            code = 0
        except OSError as exc:
            code = 10 + (exc.errno or 0) if (exc.errno or 0) < 100 else 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return True, "unprivileged user namespaces work"
    if code >= 10:
        return False, f"unshare(CLONE_NEWUSER) as uid {uid} failed: {os.strerror(code - 10)}"
    return False, f"user namespace probe failed (exit {code})"


@functools.cache
def flows() -> dict[str, tuple[bool, str]]:
    """flow -> (can run for real, why)."""
    root = os.geteuid() == 0
    out: dict[str, tuple[bool, str]] = {}
    try:
        user = Invoker.resolve()
        user_ok, user_why = True, f"invoking user U = {user.name} ({user.uid})"
    except ValueError as exc:
        user, user_ok, user_why = None, False, str(exc)
    out["root"] = (True, "running as root") if root else (False, "needs uid 0")
    for flow in ("suid", "hybrid"):
        if not root:
            out[flow] = (False, "needs root to emulate the setuid starter")
        elif not user_ok:
            out[flow] = (False, user_why)
        else:
            out[flow] = (True, f"setuid starter emulated as root; {user_why}")
    if user is None:
        ns = (False, user_why)
    else:
        ok, why = _userns_possible(user.uid, user.gid)
        ns = (ok, f"{why}; {user_why}" if ok else why)
    out["userns"] = ns
    out["fakeroot"] = ns
    if out["hybrid"][0] and not ns[0]:
        out["hybrid"] = ns
    return out


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
