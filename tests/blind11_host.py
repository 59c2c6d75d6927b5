"""Blind engines for SPEC §11 (the host): six BUGGY engines.

Written from SPEC.md alone (plus the kit's public API), without reading the conformance
suite, the mutants, the reference engines or the host diff. Each engine subclasses one of the
correct engines of ``blind11_host_correct`` and leaves ONE change on the host (the sandbox
that stands for it) through its own mechanism; everything else it sets up it still cleans up,
and every run completes.

Work that needs host privilege is done, where the flow has it, by a throwaway child of the
master that raises its own permitted capabilities (the suid/hybrid master has a saved uid 0),
so the hooked threads' credentials are never touched.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

import blind11_host_correct as correct

from kit.rpc import RPCClient
from kit.system import linux

MS_PRIVATE = linux.MS_PRIVATE
MS_SHARED = linux.MS_SHARED


def _privileged_child(action: Any, caps: list[str]) -> int:
    """Run ``action`` in a forked child of the calling (master) process, with ``caps`` raised
    from its permitted set (a no-op where it has none: userns, fakeroot). Returns the child's
    exit code: 0, or the errno of the OSError that stopped it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            eff, perm, inh = linux.capget()
            want = linux.caps_to_mask(caps) & perm
            if want & ~eff:
                linux.capset(eff | want, perm, inh)
            action()
        except OSError as exc:
            code = (exc.errno or 1) & 0xFF
        except BaseException:
            code = 250
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# --- 1. mount propagation of the host's root -------------------------------------------------


class HostBugPropagation(correct.HostCorrectNS):
    """Bug (SPEC §11, mounts and their propagation; NS-011 mount table while it runs): the master makes the host's / private during the run and 're-shares' it in cleanup, so it ends in a new peer group."""  # noqa: E501

    engine_name = "blind11-host-propagation"

    def post_start_process(self, ctx: Any, pid: int) -> None:
        super().post_start_process(ctx, pid)
        # meant: "keep the container's mounts from propagating while it runs" -- but this is
        # the master's mount namespace, the host's.
        self._privatised = (
            _privileged_child(lambda: linux.mount(None, "/", None, MS_PRIVATE), ["CAP_SYS_ADMIN"])
            == 0
        )

    def cleanup_container(self, ctx: Any, fatal: BaseException | None, status: int | None) -> None:
        super().cleanup_container(ctx, fatal, status)
        if getattr(self, "_privatised", False):
            # "restored": shared again, but in a peer group of its own, cut from its old peers
            _privileged_child(lambda: linux.mount(None, "/", None, MS_SHARED), ["CAP_SYS_ADMIN"])


# --- 2. hostname changed and put back within one hook ----------------------------------------


class HostBugHostnameBlip(correct.HostCorrectNS):
    """Bug (SPEC §11 / NS-010, hostname not even while it runs): post_start_process sets the host's hostname to the container's and puts the old one back before it returns."""  # noqa: E501

    engine_name = "blind11-host-hostname-blip"

    def post_start_process(self, ctx: Any, pid: int) -> None:
        super().post_start_process(ctx, pid)
        name = self.common.engine_config.hostname

        def blip() -> None:
            old = socket.gethostname()
            socket.sethostname(name)  # "so the post-start script logs the container's name"
            try:
                with open("/proc/sys/kernel/hostname") as f:
                    f.read()
            finally:
                socket.sethostname(old)

        _privileged_child(blip, ["CAP_SYS_ADMIN"])


# --- 3. the host's loopback MTU, "restored" to the wrong value -------------------------------


class HostBugLoopbackMtu(correct.HostCorrectSlave):
    """Bug (SPEC §11, network links): the master also sets lo's MTU in its own (host) network namespace and cleanup 'restores' it to a hard-coded 65535, not the 65536 it had."""  # noqa: E501

    engine_name = "blind11-host-lo-mtu"

    def post_start_process(self, ctx: Any, pid: int) -> None:
        super().post_start_process(ctx, pid)
        touch = _privileged_child(lambda: correct.ifmtu("lo", 9000), ["CAP_NET_ADMIN"])
        self._mtu_touched = touch == 0

    def cleanup_container(self, ctx: Any, fatal: BaseException | None, status: int | None) -> None:
        super().cleanup_container(ctx, fatal, status)
        if getattr(self, "_mtu_touched", False):
            _privileged_child(lambda: correct.ifmtu("lo", 65535), ["CAP_NET_ADMIN"])


# --- 4. a SysV semaphore in the host's ipc namespace, removed by the wrong key ---------------

BARRIER_KEY = 0x0B1B


class HostBugSysvSemaphore(correct.HostCorrectSlave):
    """Bug (SPEC §11, SysV IPC objects): the master creates a SysV semaphore (IPC_PRIVATE) in the host ipc namespace and cleanup looks it up by a key it never had, so it stays."""  # noqa: E501

    engine_name = "blind11-host-sysv-sem"

    def post_start_process(self, ctx: Any, pid: int) -> None:
        super().post_start_process(ctx, pid)
        # a "start barrier" -- made in the master, whose ipc namespace is the host's
        with contextlib.suppress(OSError):
            self._barrier = correct.semget(correct.IPC_PRIVATE, 1, correct.IPC_CREAT | 0o600)

    def cleanup_container(self, ctx: Any, fatal: BaseException | None, status: int | None) -> None:
        super().cleanup_container(ctx, fatal, status)
        with contextlib.suppress(OSError):
            # ENOENT: the semaphore was created with IPC_PRIVATE, not with this key
            semid = correct.semget(BARRIER_KEY, 0, 0)
            correct._libc().semctl(semid, 0, correct.IPC_RMID)


# --- 5. a helper that double-forks and renames itself ----------------------------------------

DAEMON = r"""
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["[kworker/u8:2-events]", "20"])
    os._exit(0)
os._exit(0)
"""


class HostBugDaemon(correct.HostCorrectNS):
    """Bug (SPEC §11, processes): post_start_process starts a 'log flusher' that double-forks and renames itself, so cleanup reaps only its parent and the grandchild outlives the run."""  # noqa: E501

    engine_name = "blind11-host-daemon"

    def post_start_process(self, ctx: Any, pid: int) -> None:
        super().post_start_process(ctx, pid)
        subprocess.run(
            [sys.executable, "-c", DAEMON],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            env={"PATH": correct.PATH},
            check=False,
        )


# --- 6. a host file replaced by a copy with the same content ---------------------------------


class RenameRPC(correct.HostRPC):
    """HostRPC plus a method that 'refreshes' a file of the container's /etc, which, with no
    pivot_root, is the host's."""

    def refresh_file(self, path: str) -> str:
        with open(path, "rb") as f:
            data = f.read()
        directory = os.path.dirname(path)
        try:
            with correct.thread_caps(["CAP_DAC_OVERRIDE"]):
                fd, tmp = tempfile.mkstemp(dir=directory, prefix=".blind11-")  # mode 0600
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, path)  # same bytes, new inode, mode 0600 instead of 0644
        except OSError as exc:
            return f"not refreshed: {exc.strerror}"
        return "refreshed"


class HostBugRenameOver(correct.HostCorrectNS):
    """Bug (SPEC §11, files): an RPC method rewrites /etc/shells through a mkstemp file renamed over it: same content, but the host file's mode becomes 0600."""  # noqa: E501

    engine_name = "blind11-host-rename-over"
    rpc_methods = RenameRPC

    def _rpc_setup(self, rpc: RPCClient, workdir: str) -> None:
        super()._rpc_setup(rpc, workdir)
        self.setup_report["refresh"] = rpc.refresh_file(path="/etc/shells")
