"""Buggy blind engines, theme "realistic container setup" (written from SPEC.md alone).

Written from ``/work/shared/SPEC.md`` and the kit's public API only, not from the conformance
suite, the mutants or the reference engines. Each engine subclasses one of the correct
engines of :mod:`blind11_setup_correct` and makes exactly one mistake that an author porting
a real container runtime could make in its setup code. Every run still completes and the
payload still runs; the flows in which the mistake shows are named in each docstring.

Loaded as ``blind11_setup:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here runs at
import time but definitions.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from typing import Any

from blind11_setup_correct import (
    MinimalSlaveEngine,
    PivotRPC,
    PivotTmpfsEngine,
    RoBindRootEngine,
    RoBindRPC,
    cap_mask,
)

from kit import system
from kit.contract import Context, WaitStatus
from kit.starter.config import StarterConfig

# ==========================================================================================
# 1. non-recursive propagation: the submounts of / stay peers of the host's
# ==========================================================================================


class ShallowPropagationEngine(RoBindRootEngine):
    """Bug (SPEC §11, NS-011): asks for non-recursive "private" propagation, so the bind of / keeps host peer groups and the container's /proc and /dev mounts reach the host mount table (root, suid).

    The author reasoned that only ``/`` needs to stop being shared ("the mounts we make hang
    below it"). But ``set_mount_propagation("private")`` changes ``/`` alone: ``/proc``,
    ``/dev`` and the other host submounts copied into the container's mount namespace stay
    in the host's peer groups, the recursive bind of ``/`` in ``stage_root`` joins them too,
    and the fresh proc and ``/dev`` tmpfs mounted over ``<session>/root/proc`` and
    ``<session>/root/dev`` propagate into the host's ``/proc`` and ``/dev`` — and stay there
    after the run. In userns, fakeroot and hybrid the container's mount namespace belongs to
    a less privileged user namespace, whose copies of shared mounts are slaves: nothing
    comes back, the bug does not show there.
    """  # noqa: E501

    engine_name = "blind11-setup-shallowprop"
    propagation = "private"


# ==========================================================================================
# 2. a session tmpfs prepared in stage 1, in the host's mount namespace
# ==========================================================================================


class EarlySessionRPC(PivotRPC):
    """Reuses a session directory that is already a tmpfs instead of mounting another."""

    def mount_session(self, path: str, size_mb: int) -> str:
        if not os.path.isdir(path):
            raise FileNotFoundError(2, f"session directory {path!r} does not exist")
        if self._is_tmpfs(path):  # prepared by stage 1 (root flow)
            rootfs = os.path.join(path, "rootfs")
            os.mkdir(rootfs, 0o755)
            self.sys.mount("tmpfs", rootfs, "tmpfs", ["nosuid", "nodev"], "mode=0755,size=32m")
            return rootfs
        return super().mount_session(path, size_mb)

    def _is_tmpfs(self, path: str) -> bool:
        with open("/proc/self/mountinfo") as f:
            found = None
            for line in f:
                fields = line.split()
                if len(fields) > 8 and fields[4] == path:
                    found = fields[fields.index("-") + 1]
        return found == "tmpfs"


class EarlySessionEngine(PivotTmpfsEngine):
    """Bug (SPEC §11): when already root (root flow) prepare_config mounts the session tmpfs in stage 1, i.e. in the host's mount namespace, and nothing ever unmounts it (root).

    Ported from a runtime that prepares its session directory as early as it can "while we
    still have privileges": stage 1 runs as uid 0 in the root flow, so the author mounts the
    tmpfs there and lets ``create_container`` reuse it (the container's mount namespace is a
    copy made later, so the setup still works). But stage 1 runs before any container
    namespace exists (§2 rule 2): the mount is made on the host, and the engine only tears
    down the container's namespace, so the host keeps a tmpfs over the session directory
    after the run. The unprivileged flows cannot mount in stage 1 and fall back to the RPC
    server: the bug shows in the root flow only.
    """  # noqa: E501

    engine_name = "blind11-setup-earlysession"
    rpc_methods = EarlySessionRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        cfg = self.common.engine_config
        if os.geteuid() == 0:
            # Save a round trip later: the session exists before the container does.
            with contextlib.suppress(OSError):
                system.current().mount(
                    "tmpfs",
                    cfg.session_dir,
                    "tmpfs",
                    ["nosuid", "nodev"],
                    f"mode=0755,size={cfg.session_size_mb}m",
                )


# ==========================================================================================
# 3. capabilities raised once for the RPC server's lifetime
# ==========================================================================================


class ServerCapsRPC(RoBindRPC):
    """Raises the capabilities its methods need once, when the server starts."""

    NEEDED = ("CAP_SYS_CHROOT", "CAP_NET_ADMIN", "CAP_MKNOD")

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        # "The server only lives for the setup: raise what the methods need up front,
        # like the Go code did with its capability set at init."
        eff, prm, inh = self.sys.capabilities()
        want = eff | (cap_mask(*self.NEEDED) & prm)
        if want != eff:
            self.sys.set_capabilities(want, prm, inh)

    def _chroot_here(self) -> None:
        self.sys.chroot(".")


class ServerCapsEngine(RoBindRootEngine):
    """Bug (SPEC §4, RPC server row): the RPC methods class raises CAP_SYS_CHROOT, CAP_NET_ADMIN and CAP_MKNOD into the server's effective set at start-up and never restores them (suid, hybrid).

    SPEC §4 allows the suid/hybrid RPC server only ``CAP_SYS_ADMIN`` effective; a method may
    raise more on its own thread but must restore them. Here ``__init__`` (run once in the
    RPC server before the first request) raises the permitted ``CAP_SYS_CHROOT``,
    ``CAP_NET_ADMIN`` and ``CAP_MKNOD`` for the server's whole life, so every method enters
    and returns with them effective. In root, userns and fakeroot every capability is
    already effective there: the bug shows in suid and hybrid only.
    """  # noqa: E501

    engine_name = "blind11-setup-servercaps"
    rpc_methods = ServerCapsRPC


# ==========================================================================================
# 4. a pause process stopped with a signal the master's children have blocked
# ==========================================================================================


class PauseLeftEngine(MinimalSlaveEngine):
    """Bug (SPEC §11, processes): create_container starts a pause process that cleanup_container stops with SIGTERM, which the master's children inherit blocked, so it outlives the run (all flows).

    Like podman's rootless pause process, the engine starts ``sleep infinity`` from
    ``create_container`` to keep a process around for later ``exec`` sessions, and stops it
    in ``cleanup_container`` with ``Popen.terminate()`` without waiting ("it is only a
    sleep"). The master's hooks run with every signal blocked and a child keeps that mask
    across exec: ``sleep`` never sees the SIGTERM, and is left on the host when the master
    exits.
    """  # noqa: E501

    engine_name = "blind11-setup-pauseleft"

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        self._pause = subprocess.Popen(
            ["sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
        )

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        pause = getattr(self, "_pause", None)
        if pause is not None and pause.poll() is None:
            pause.terminate()
        super().cleanup_container(ctx, fatal, status)


# ==========================================================================================
# 5. a watchdog thread born while the hook thread had raised capabilities
# ==========================================================================================


class WatchdogEngine(PivotTmpfsEngine):
    """Bug (SPEC §4, master row, "threads the engine started included"): create_container starts its rootfs watchdog thread while CAP_SYS_PTRACE/CAP_DAC_READ_SEARCH are raised, so that thread keeps them effective after the hook returns (suid, hybrid).

    The watchdog reads ``/proc/PID/mountinfo`` of the container every 100 ms (a debug aid:
    it logs when the pivot happened). Reading another process's mountinfo needs ptrace
    access, which the setuid master only has with ``CAP_SYS_PTRACE`` effective, so the
    author raises it on the hook thread — as §4 allows — and starts the thread inside that
    block "so that it has what it needs", then drops the capabilities of the hook thread
    only. A new thread inherits its creator's credentials: the watchdog runs with effective
    capabilities through create_container's return, post_start_process and
    cleanup_container (which stops it). In root, userns and fakeroot the master's effective
    set is full anyway: the bug shows in suid and hybrid only.
    """  # noqa: E501

    engine_name = "blind11-setup-watchdog"

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        super().create_container(ctx, pid, rpc_conn)
        self._stop = threading.Event()
        sysi = system.current()
        saved = sysi.capabilities()
        eff, prm, inh = saved
        want = eff | (cap_mask("CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH") & prm)
        if want != eff:
            sysi.set_capabilities(want, prm, inh)
        try:
            self._watchdog = threading.Thread(
                target=self._watch, args=(pid,), name="rootfs-watchdog", daemon=True
            )
            self._watchdog.start()
        finally:
            if want != eff:
                sysi.set_capabilities(*saved)

    def _watch(self, pid: int) -> None:
        last = None
        while not self._stop.wait(0.1):
            try:
                with open(f"/proc/{pid}/mountinfo") as f:
                    roots = [line.split()[4] for line in f if len(line.split()) > 4]
            except OSError:
                continue  # not readable (yet), or the container is gone: cleanup stops us
            if roots != last:
                last = roots

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self._watchdog.join(timeout=1.0)
        super().cleanup_container(ctx, fatal, status)


__all__ = [
    "EarlySessionEngine",
    "PauseLeftEngine",
    "ServerCapsEngine",
    "ShallowPropagationEngine",
    "WatchdogEngine",
]
