"""Blind test engines, theme PRIVILEGES (correct ones), written from SPEC.md alone.

Two engines meant to be conformant in all five flows (root, suid, userns, fakeroot, hybrid):

- ``RaisingRPCEngine``: its RPC method ``bring_up`` raises CAP_NET_ADMIN (when permitted but
  not effective) on the RPC server's own thread for the duration of one call and restores the
  thread's capability sets before returning, on success and on error alike (SPEC §4 allows
  the RPC server to raise more capabilities on its own thread if it restores them).
- ``WorkerThreadEngine``: ``create_container`` starts a master worker thread (a container
  watcher) that lives until ``cleanup_container``; it never touches credentials, so it keeps
  the master's (SPEC §4: the rules hold for every thread, engine threads included). Stage 2
  is configured (in every flow but suid, where it would be host privilege) with a
  permitted+inheritable+bounding capability but no effective and no ambient set, so a
  non-root payload inherits nothing from it (SPEC §5).

Written from the contract (SPEC.md, README, kit.contract docstrings) only. Nothing runs at
import time but definitions. The ctypes helpers at the end are shared with the buggy engines
of ``blind11_priv``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import ClassVar

from kit import system
from kit.contract import EngineConfig, Operations
from kit.rpc import RPCClient

FORWARDED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

CAP_NET_ADMIN = 12
CAP_NET_BIND_SERVICE = 10


# --- shared engine pieces ------------------------------------------------------------------


@dataclass
class PrivConfig(EngineConfig):
    hostname: str = "blind11"
    links: list[str] = field(default_factory=lambda: ["lo"])


def _forward_and_wait(pid: int, signals) -> int:
    while True:
        sig = signals.get(timeout=0.2)
        if sig in FORWARDED:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return status


def _namespaces(sc) -> list[str]:
    namespaces = ["mount", "pid", "uts", "ipc", "net"]
    if sc.flow in ("userns", "fakeroot", "hybrid"):
        namespaces.append("user")
        inside_uid, inside_gid = (sc.invoker_uid, sc.invoker_gid) if sc.flow == "userns" else (0, 0)
        sc.add_uid_mappings([(inside_uid, sc.invoker_uid, 1)])
        sc.add_gid_mappings([(inside_gid, sc.invoker_gid, 1)])
    return namespaces


# --- engine 1: an RPC method that raises a capability on its own thread ----------------------


class RaisingRPC:
    """RPC methods, served as ``<engine>.<method>`` with the RPC server's privileges."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)

    def bring_up(self, ifname: str) -> bool:
        """Bring an interface up with CAP_NET_ADMIN raised on this thread for the call only."""
        with self._raised(1 << CAP_NET_ADMIN):
            self.system.link_up(ifname)
        return True

    @contextlib.contextmanager
    def _raised(self, wanted: int):
        # Raise only what is permitted and not already effective; restore the exact sets on
        # the way out, whatever happened inside.
        effective, permitted, inheritable = self.system.capabilities()
        extra = wanted & permitted & ~effective
        if extra:
            self.system.set_capabilities(effective | extra, permitted, inheritable)
        try:
            yield
        finally:
            if extra:
                self.system.set_capabilities(effective, permitted, inheritable)


class RaisingRPCEngine(Operations):
    """Correct: an RPC method raises CAP_NET_ADMIN on its own thread and restores it before returning (SPEC §4 RPC server row)."""  # noqa: E501

    engine_name = "blind11-priv-rpcraise"
    rpc_methods = RaisingRPC

    def config(self):
        return PrivConfig()

    # prepare_config is split in small steps so that a variant can change one of them.
    def _wants_no_new_privs(self, sc) -> bool:
        return sc.flow != "root"

    def prepare_config(self, sc):
        sc.set_ns_flags(_namespaces(sc))
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_bring_loopback_interface()
        sc.set_mount_propagation("rprivate")
        if self._wants_no_new_privs(sc):
            sc.set_no_new_privs()
        # No set_capabilities: every set, bounding included, is empty at exec (SPEC §5).

    def _client(self, rpc_conn) -> RPCClient:
        return RPCClient(rpc_conn, self.common.engine_name)

    def create_container(self, ctx, pid, rpc_conn):
        rpc = self._client(rpc_conn)
        rpc.sethostname(name=self.common.engine_config.hostname)
        for link in self.common.engine_config.links:
            rpc.bring_up(ifname=link)

    def start_process(self, master_fd):
        argv = self.common.engine_config.argv
        os.execve(argv[0], argv, {"PATH": PATH})

    def monitor_container(self, pid, signals):
        return _forward_and_wait(pid, signals)

    def cleanup_container(self, ctx, fatal, status):
        pass


# --- engine 2: a master worker thread that keeps the master's credentials ----------------------


class HostnameRPC:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)


class WorkerThreadEngine(Operations):
    """Correct: create_container starts a master worker thread that keeps the master's credentials until cleanup (SPEC §4, every thread); stage 2 gets permitted/inheritable/bounding NET_BIND_SERVICE, no ambient, except in suid (SPEC §5)."""  # noqa: E501

    engine_name = "blind11-priv-worker"
    rpc_methods = HostnameRPC

    #: The capability given to stage 2 (permitted, inheritable, bounding; never effective or
    #: ambient: a non-root payload's exec derives nothing from it).
    STAGE2_CAPS: ClassVar[tuple[str, ...]] = ("CAP_NET_BIND_SERVICE",)

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.ticks = 0

    def config(self):
        return PrivConfig(hostname="blind11w")

    def prepare_config(self, sc):
        sc.set_ns_flags(_namespaces(sc))
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()
        sc.set_bring_loopback_interface()
        if sc.flow != "root":
            sc.set_no_new_privs()
        # Capabilities for stage 2, but never in suid: there stage 2 is U in the host user
        # namespace, where a permitted capability would be host privilege.
        if sc.flow != "suid":
            for kind in ("permitted", "inheritable", "bounding"):
                sc.set_capabilities(kind, self.STAGE2_CAPS)
            sc.set_capabilities("effective", [])
            sc.set_capabilities("ambient", [])

    # The worker: watches the container through /proc, nothing else.
    def _watch(self, pid: int) -> None:
        while not self._stop.wait(0.05):
            self.ticks += 1
            if not os.path.exists(f"/proc/{pid}"):
                break

    def _start_worker(self, pid: int) -> None:
        self._worker = threading.Thread(
            target=self._watch, args=(pid,), name="blind11-watch", daemon=True
        )
        self._worker.start()

    def create_container(self, ctx, pid, rpc_conn):
        self._start_worker(pid)
        RPCClient(rpc_conn, self.common.engine_name).sethostname(
            name=self.common.engine_config.hostname
        )

    def start_process(self, master_fd):
        argv = self.common.engine_config.argv
        os.execve(argv[0], argv, {"PATH": PATH})

    def post_start_process(self, ctx, pid):
        # Give the watcher a moment: it runs alongside the other hooks.
        time.sleep(0.01)

    def monitor_container(self, pid, signals):
        return _forward_and_wait(pid, signals)

    def cleanup_container(self, ctx, fatal, status):
        self._stop.set()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=2)


# --- ctypes helpers (as an engine author would write them) -----------------------------------

_LIBC = None

_SYS_SETFSUID = {"x86_64": 122, "aarch64": 151}
PR_SET_KEEPCAPS = 8
PR_GET_SECUREBITS = 27
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
_CAP_V3 = 0x20080522


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    rc = _libc().prctl(
        ctypes.c_int(option),
        ctypes.c_ulong(a2),
        ctypes.c_ulong(a3),
        ctypes.c_ulong(a4),
        ctypes.c_ulong(a5),
    )
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return rc


def _thread_setfsuid(fsuid: int) -> int:
    """setfsuid(2) for the calling thread; returns the previous fs uid."""
    nr = _SYS_SETFSUID[os.uname().machine]
    return int(_libc().syscall(ctypes.c_long(nr), ctypes.c_int(fsuid)))


def _thread_capget() -> tuple[int, int, int]:
    hdr = (ctypes.c_uint32 * 2)(_CAP_V3, 0)
    data = (ctypes.c_uint32 * 6)()
    if _libc().capget(hdr, data) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    return (
        data[0] | data[3] << 32,
        data[1] | data[4] << 32,
        data[2] | data[5] << 32,
    )


def _thread_capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = (ctypes.c_uint32 * 2)(_CAP_V3, 0)
    m = 0xFFFFFFFF
    data = (ctypes.c_uint32 * 6)(
        effective & m,
        permitted & m,
        inheritable & m,
        effective >> 32 & m,
        permitted >> 32 & m,
        inheritable >> 32 & m,
    )
    if _libc().capset(hdr, data) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
