"""Buggy blind engines for the error paths (written from SPEC.md alone, not from the suite).

Each class is ``blind10_err_correct.ScratchErrEngine`` with ONE honest mistake that breaks a
sentence of SPEC.md §1, §2 (its rules and error table), §4's namespace sentence or §5. The
first line of each docstring names the bug; the body quotes the sentence it breaks and the
flows it shows in. A kit and suite that read the ledger right must fail every one.

Loaded as ``blind10_err:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here runs at
import time. The one engine that changes "the host" (:class:`ErrSharedPropagation`) decides
so in stage 1, only after checking that it runs inside the kit's host sandbox.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from blind10_err_correct import (
    FORWARDED,
    POLL,
    ErrConfig,
    ScratchErrEngine,
    inside_kit_sandbox,
)

from kit.contract import Context, SignalChannel, WaitStatus
from kit.starter.config import StarterConfig

#: ErrSharedConfig's cache: filled by the first config() call of a process, never at import.
_CONFIG_CACHE: list[ErrConfig] = []


class ErrCleanupRaisesOnFatal(ScratchErrEngine):
    """cleanup_container re-raises the fatal error it is handed, "so that it is not lost".

    Breaks §2's error table: "``cleanup_container`` raises → reported, exit code unchanged"
    read with rule 7 ("``cleanup_container`` runs exactly once per master run, with the first
    fatal error (or none)") and §1 ("tears everything down; must tolerate partial setup"):
    cleanup must tear down, not fail, when ``fatal`` is set. Shows in every flow (root, suid,
    userns, fakeroot, hybrid) in a run where a hook failed (e.g. the kit's injected
    create_container, post_start_process or monitor_container failure); a clean run passes.
    """

    engine_name = "blind10-err-cleanup-raises"

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        super().cleanup_container(ctx, fatal, status)
        if fatal is not None:
            raise RuntimeError(f"container failed: {fatal}") from fatal


class ErrCleanupAssumesCreate(ScratchErrEngine):
    """cleanup_container assumes create_container ran: it removes ``self.scratch`` unguarded.

    Breaks §1: ``cleanup_container`` "tears everything down; must tolerate partial setup"
    (and the contract's "Must tolerate any partial setup and be idempotent"). When
    create_container raised before making the directory (the kit's injected create_container
    failure: "nothing set up"), cleanup raises AttributeError. Shows in every flow (root,
    suid, userns, fakeroot, hybrid), only in runs where create_container did not run to its
    first line.
    """

    engine_name = "blind10-err-cleanup-partial"

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        shutil.rmtree(self.scratch)
        self.scratch = None


class ErrSharedConfig(ScratchErrEngine):
    """config() returns one cached object per process instead of a fresh one.

    Breaks §1: ``config()`` "returns a fresh, empty engine-config object (a dataclass)" (the
    contract: "never a shared one"). The second call hands back the first call's object with
    whatever was filled in it (argv, hostname), so state leaks between calls and between runs
    of one process. Shows in every flow (root, suid, userns, fakeroot, hybrid): anything that
    calls config() twice in one process sees the same, already-filled object.
    """

    engine_name = "blind10-err-shared-config"

    def config(self) -> ErrConfig:
        if not _CONFIG_CACHE:
            _CONFIG_CACHE.append(ErrConfig())
        return _CONFIG_CACHE[0]


class ErrStage1Attribute(ScratchErrEngine):
    """prepare_config keeps the payload's path in a non-field attribute start_process needs.

    Breaks §2 rule 3: "Only JSON-visible fields of the engine config cross from stage 1 to
    later processes; state kept in Python globals in stage 1 is gone later". The resolved
    path is set as a plain attribute on the config object in stage 1; stage 2's config is
    rebuilt from JSON without it, so start_process raises AttributeError instead of exec'ing
    (stage 2 failure, exit 255 for a payload that should exit 0). Shows in every flow (root,
    suid, userns, fakeroot, hybrid).
    """

    engine_name = "blind10-err-stage1-attribute"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        argv0 = self.cfg.argv[0]
        resolved = shutil.which(argv0) or argv0
        object.__setattr__(self.cfg, "resolved_path", resolved)

    def exec_path(self) -> str:
        path: str = self.cfg.resolved_path  # type: ignore[attr-defined]
        return path


class ErrCgroupPrivilegedOnly(ScratchErrEngine):
    """The cgroup namespace is requested only in the flows without a user namespace.

    The author believed a cgroup namespace needs host privilege, so the unprivileged flows
    leave the container in the master's cgroup namespace. Breaks §4: "the master shares none
    of pid/net/uts/ipc/cgroup with them" (stage 2 and the RPC server), a namespace rule of
    every flow. Shows in userns, fakeroot and hybrid; root and suid are right.
    """

    engine_name = "blind10-err-cgroup-some-flows"
    escapes = (
        "SPEC §4's \"the master shares none of pid/net/uts/ipc/cgroup with them\" is read "
        "for the namespaces the StarterConfig creates (NS-003): the reference engine and "
        "README's example ask for no cgroup namespace in any flow, so asking in some flows "
        "only is as free"
    )

    def namespaces(self, sc: StarterConfig) -> list[str]:
        kinds = super().namespaces(sc)
        if "user" in kinds:
            kinds.remove("cgroup")
        return kinds


class ErrNetJoinedAndCreated(ScratchErrEngine):
    """The net namespace is both created (flag) and given a path (``/proc/self/ns/net``).

    The author meant the path as a note of "the container's own net namespace" for a later
    join-only run; but §5: "Each is either created (a flag) or joined (a path such as
    ``/proc/PID/ns/net``); join wins over create", and the container side resolves that path
    to the network namespace it is still in: the host's. So the container shares the
    master's net namespace, against §4: "the master shares none of pid/net/uts/ipc/cgroup
    with them". Requested, and shown, in the flows without a user namespace: root and suid
    (the others would fail to join a namespace their user namespace does not own).
    """

    engine_name = "blind10-err-net-join-and-create"
    escapes = (
        "SPEC §5 says join wins over create, and a namespace joined by path is the "
        "engine's choice: joining the starter's own network namespace is no network "
        "namespace, as asking for none is (NS-003 reads the created ones); the kit could "
        "warn that a kind is both created and joined, but no rule fails it"
    )

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.flow in ("root", "suid"):
            starter_config.set_ns_path("net", "/proc/self/ns/net")


class ErrSharedPropagation(ScratchErrEngine):
    """The container's / gets ``rshared`` propagation, so its tmpfs mount reaches the host.

    The author wanted host mounts made later to show up in the container and chose shared
    instead of slave: the tmpfs create_container mounts on ``/mnt`` in the container
    propagates back to the host's mount namespace and outlives the run. Breaks §11: "a run
    changes nothing on the host that outlives it, and a few things (hostname, mount table:
    NS-010, NS-011) not even while it runs" (§5's ``set_mount_propagation``). Shows in root
    only, and only inside the kit's host sandbox (stage 1 checks; elsewhere it behaves as the
    base engine, rprivate and no mount).
    """

    engine_name = "blind10-err-shared-propagation"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        if starter_config.flow == "root" and inside_kit_sandbox():
            self.cfg.scratch_mount = "/mnt"
        super().prepare_config(starter_config)

    def propagation(self, sc: StarterConfig) -> str:
        return "rshared" if self.cfg.scratch_mount else "rprivate"


class ErrMonitorExitCode(ScratchErrEngine):
    """monitor_container returns ``os.WEXITSTATUS(status)`` instead of the raw wait status.

    Breaks §1: ``monitor_container(pid, signals)`` "→ wait status" ("blocks until the
    container exits"), §7: it "returns its wait status", and rule 8: "The run's exit code
    equals the payload's". A payload exiting 3 comes back as raw status 3 (killed by signal
    3: exit 131); one killed by a signal comes back as 0. Shows in every flow (root, suid,
    userns, fakeroot, hybrid) with a payload that does not exit 0.
    """

    engine_name = "blind10-err-monitor-exitcode"

    def wait_status(self, status: int) -> WaitStatus:
        return os.WEXITSTATUS(status)


class ErrSignalDeathLost(ScratchErrEngine):
    """monitor_container "normalises" the status via the exit code, losing a signal death.

    It returns ``(os.waitstatus_to_exitcode(status) & 0xFF) << 8``: right for an exit, but a
    container killed by signal N (exit code -N) comes back as a normal exit with code 256-N.
    Breaks rule 8: "The run's exit code equals the payload's (or 128+signal when it was
    killed by a signal)" and §7: "The run exits with the container's code, or re-raises its
    signal". Shows in every flow (root, suid, userns, fakeroot, hybrid) when the container is
    killed by a signal (a payload that segfaults: 139 becomes 245).
    """

    engine_name = "blind10-err-signal-lost"

    def wait_status(self, status: int) -> WaitStatus:
        return (os.waitstatus_to_exitcode(status) & 0xFF) << 8


class ErrMonitorReapsAny(ScratchErrEngine):
    """monitor_container reaps any child (``os.waitpid(-1, ...)``), not only the container.

    Statuses of children that are not the container are dropped.

    Breaks §7: "A conformant ``monitor_container`` forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/
    SIGUSR2 to the container, reaps only the container pid, and returns its wait status";
    a child the kit (or another hook) started in the master is reaped behind its back and
    its status lost. Shows in every flow (root, suid, userns, fakeroot, hybrid) whenever the
    master has another child to reap while the container runs.
    """

    engine_name = "blind10-err-monitor-reaps-any"

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        while True:
            sig = signals.get(timeout=POLL)
            if sig in FORWARDED:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            try:
                done, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                continue
            if done == pid:
                return status


__all__ = [
    "ErrCgroupPrivilegedOnly",
    "ErrCleanupAssumesCreate",
    "ErrCleanupRaisesOnFatal",
    "ErrMonitorExitCode",
    "ErrMonitorReapsAny",
    "ErrNetJoinedAndCreated",
    "ErrSharedConfig",
    "ErrSharedPropagation",
    "ErrSignalDeathLost",
    "ErrStage1Attribute",
]
