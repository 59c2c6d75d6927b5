"""Correct engines of the third blind round (privileges), loaded as ``blind3_priv_correct:NAME``
(``tests/`` on ``PYTHONPATH``): legal shapes of temporary escalation that SPEC.md allows and the
reference does not take; any failure is a false failure of a check."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import threading

from kit.system import linux
from reference_engines.minimal.engine import ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC, check_path

CAP_DAC_OVERRIDE = linux.CAP_NUMBERS["CAP_DAC_OVERRIDE"]
#: Where a crashed run would have left its lock (never there: removing it is best effort).
LOCK_DIR = "/run"


def _setuid_role() -> bool:
    """The master (and the RPC server) of the setuid flows: r=e=U, saved uid 0."""
    _ruid, euid, suid = os.getresuid()
    return euid != 0 and suid == 0


class CleanupThreadEuidEngine(ReferenceEngine):
    """cleanup_container takes euid 0 on a joined worker thread only and drops it back.

    SPEC §4, master row (suid, hybrid): "r=e=U, saved uid 0, effective caps empty at
    entry and again at return; escalation possible" (the contract: "a hook may raise them
    temporarily"), with "Every rule of this table holds for every thread ... at every hook
    entry and return". cleanup_container removes a stale root-owned lock on a worker
    thread that takes euid 0 from its saved uid with a raw setresuid (that thread only),
    then sets its euid back to U the same way -- the kernel clears the effective set as the
    euid leaves 0, the permitted set stays (the saved uid is still 0) -- and ends; the hook
    joins it before it returns. cleanup_container runs alone (every other hook returned),
    so no hook entry or return ever sees the raised thread. Legal."""

    engine_name = "blind3-ok-cleanup-thread-euid"
    rpc_methods = ReferenceRPC

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        super().cleanup_container(ctx, fatal, status)
        lock = os.path.join(LOCK_DIR, f"blind3-{self.common.container_id}.lock")
        errors: list[BaseException] = []

        def remove_as_root() -> None:
            raised = False
            user = os.geteuid()
            try:
                if _setuid_role():
                    linux.thread_setresuid(-1, 0, -1)
                    raised = True
                try:
                    os.unlink(lock)
                except FileNotFoundError:
                    pass  # no crashed run before this one: the usual case
            except BaseException as exc:  # handed to the hook, which re-raises it
                errors.append(exc)
            finally:
                if raised:
                    linux.thread_setresuid(-1, user, -1)

        worker = threading.Thread(target=remove_as_root, name="blind3-ok-unlock")
        worker.start()
        worker.join()
        if errors:
            raise errors[0]


class _RestoringPoolRPC(ReferenceRPC):
    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        super().__init__(engine)
        # A long-lived worker for blocking file-system checks (it outlives every method).
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blind3-ok-io")

    def _is_dir(self, path: str) -> bool:
        """On the worker: CAP_DAC_OVERRIDE raised for the check, the sets restored before
        the result is handed back."""
        eff, perm, inh = linux.capget()
        raise_it = bool(perm >> CAP_DAC_OVERRIDE & 1) and not eff >> CAP_DAC_OVERRIDE & 1
        if raise_it:
            linux.capset(eff | 1 << CAP_DAC_OVERRIDE, perm, inh)
        try:
            return os.path.isdir(path)
        finally:
            if raise_it:
                linux.capset(eff, perm, inh)

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        full = check_path(target, "mount target")
        if not self.pool.submit(self._is_dir, full).result(5):
            raise FileNotFoundError(errno.ENOENT, f"mount: target {target!r} is not a directory")
        super().mount(source, target, fstype, flags, data)


class RpcPoolRestoresEngine(ReferenceEngine):
    """An RPC pool worker raises CAP_DAC_OVERRIDE for a check and restores its sets at once.

    SPEC §4, RPC server row: "a method may raise more on its own thread and must restore
    them", and every thread holds the row "at every RPC method entry and return"; §6: the
    server "handles one request at a time". The mount method hands its directory check to
    a one-thread pool whose worker lives as long as the server; the worker raises
    CAP_DAC_OVERRIDE (where it is permitted and not effective: suid, hybrid) for the check
    and restores its exact sets before the result reaches the method, so at every method
    entry and return the idle worker has the serving thread's credentials. Legal."""

    engine_name = "blind3-ok-rpc-pool-restores"
    rpc_methods = _RestoringPoolRPC


class _EuidDanceRPC(ReferenceRPC):
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        super().mount(source, target, fstype, flags, data)
        if fstype == "tmpfs" and _setuid_role():
            # Give the container's /tmp to the invoking user, as root for a moment; the
            # euid change clears the effective set, so the sets are put back as they were.
            user = os.geteuid()
            saved = linux.capget()
            os.seteuid(0)
            try:
                os.chown(self._host_path(target, "mount target"), user, os.getegid())
            finally:
                os.seteuid(user)
                linux.capset(*saved)


class RpcEuidDanceRestoresEngine(ReferenceEngine):
    """An RPC seteuid dance that restores the saved capability sets afterwards (suid).

    SPEC §4, RPC server row, suid: "e=U, only CAP_SYS_ADMIN effective ...; a method may
    raise more on its own thread and must restore them". After mounting the tmpfs, the
    mount method gives /tmp to the user by taking euid 0 from its saved uid (the server is
    single-threaded: os.seteuid changes only the serving thread), chowning, and setting the
    euid back to U; as the kernel cleared the effective set on that change, it restores the
    capability sets it saved (CAP_SYS_ADMIN effective again), so the method returns with
    the credentials it was entered with. suid flow only (elsewhere nothing to do). Legal."""

    engine_name = "blind3-ok-rpc-euid-dance-restores"
    rpc_methods = _EuidDanceRPC


ENGINES = [
    CleanupThreadEuidEngine,
    RpcPoolRestoresEngine,
    RpcEuidDanceRestoresEngine,
]
