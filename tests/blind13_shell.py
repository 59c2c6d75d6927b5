"""Blind round 13, theme ``shell``: buggy engines that do their work through helper programs.

Written from ``SPEC.md`` alone (and the kit's public API). Each engine subclasses one of the
correct engines of :mod:`blind13_shell_correct` and makes exactly one mistake of the kind
runtimes that shell out make: a helper run in the wrong process or namespace, a helper left
running, a credential changed to give a helper privilege, a descriptor or an error lost in a
shell wrapper, a wait that reaps what is not the container's. Everything else stays correct and
the run completes (but where the mistake itself makes a flow fail, as said per engine).

- ``NsenterMountNotNet`` (``blind13-shell-nsenter-mnt``): the master's ``sysctl`` helper enters
  the container's mount namespace instead of its network namespace, so the sysctl is written
  in the host's network namespace (root, suid, hybrid; refused, so the run fails, in fakeroot).
- ``UmountShmFromMaster`` (``blind13-shell-umount-shm``): ``cleanup_container`` runs ``umount
  -l /dev/shm`` to undo the RPC server's tmpfs, but in the master's (the host's) mount
  namespace: in the root flow it unmounts the host's ``/dev/shm``.
- ``WrapperKeepsFd3`` (``blind13-shell-wrapper-fd3``): the ``/bin/sh`` wrapper saves stderr on fd
  3 and puts it back without closing fd 3, so the payload inherits a descriptor nobody kept.
- ``WrapperHidesExecFailure`` (``blind13-shell-wrapper-noexec-check``): the payload is handed to
  the wrapper unchecked: when it cannot be exec'd, the shell prints an error and exits 127, so
  stage 2 looks like a successful exec, ``post_start_process`` runs and the run exits 127.
- ``SetuidForHelpers`` (``blind13-shell-setuid``): the setuid master gets root for its helpers
  with ``os.setuid(0)`` and "drops back" with ``os.setuid(uid)``, which, made with euid 0, sets
  the saved uid too: the master loses its saved uid 0 (every thread) for the rest of the run.
- ``MonitorReapsHelpers`` (``blind13-shell-reap-any``): ``monitor_container`` reaps with
  ``waitpid(-1)`` so that helper children never stay zombies, reaping processes that are not
  the container.
- ``HolderStoppedWithSigterm`` (``blind13-shell-holder-sigterm``): ``cleanup_container`` stops the
  namespace holder with SIGTERM, which the holder inherited blocked from the master, gives up
  after a second and leaves it running after the run.
- ``IpcmkFromMaster`` (``blind13-shell-ipcmk``): the container's SysV shared-memory segment is
  created with ``ipcmk`` run by the master ("no privilege needed, no RPC round trip"), i.e. in
  the host's IPC namespace, where it outlives the run (every flow).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import blind13_shell_correct as correct
from blind13_shell_correct import FORWARDED, PAYLOAD_ENV, run_helper

from kit.rpc import RPCClient


class NsenterMountNotNet(correct.ShellMasterEngine):
    """SPEC §11: "After a run the host is as it was before: files, mounts …, hostname and
    domainname, sysctls, network links, …" — and §4: "the master shares none of
    pid/net/uts/ipc/cgroup with them".

    The author wanted the container's ``/proc/sys/net`` and entered the container's *mount*
    namespace (``nsenter --target PID --mount``), thinking the sysctl files follow the mounted
    ``/proc``. They follow the network namespace of the process that opens them: the master's,
    the host's. So ``net.ipv4.ip_unprivileged_port_start`` of the host's network namespace is
    set to 0 and stays so (root, suid, hybrid); in fakeroot the write is refused and the run
    fails; userns runs no master helper."""

    engine_name = "blind13-shell-nsenter-mnt"
    rpc_methods = correct.ShellRPC

    def _configure_from_master(self, pid: int) -> None:
        cfg = self.common.engine_config
        if cfg.unprivileged_port_start >= 0:
            run_helper(
                [
                    *self._nsenter(pid, "mount"),  # the container's /proc/sys, or so it seemed
                    "sysctl",
                    "-q",
                    "-w",
                    f"net.ipv4.ip_unprivileged_port_start={cfg.unprivileged_port_start}",
                ]
            )
        self._holder = self._spawn_holder(pid)


class UmountShmFromMaster(correct.ShellRPCEngine):
    """SPEC §11: "a run changes nothing on the host that outlives it, and a few things
    (hostname, mount table: NS-010, NS-011) not even while it runs"; §4: the master's mount
    namespace is the host's.

    ``cleanup_container`` "releases" the container's ``/dev/shm`` tmpfs with ``umount -n -l
    /dev/shm`` as if it ran where the RPC server mounted it. It runs in the master, in the
    host's mount namespace: in the root flow it detaches the host's own ``/dev/shm``. In the
    other flows the master cannot unmount and the helper's failure is ignored (cleanup is best
    effort), so only root shows it."""

    engine_name = "blind13-shell-umount-shm"
    rpc_methods = correct.ShellRPC

    def cleanup_container(self, ctx, fatal, status) -> None:
        # Free the tmpfs memory right away rather than when the last reference goes.
        run_helper(["umount", "-n", "-l", "/dev/shm"], check=False)


class WrapperKeepsFd3(correct.ShellWrapperEngine):
    """SPEC §5: ``keep_file_descriptor`` is how a descriptor reaches the payload (the starter
    closes every other one before stage 2); an engine that asked for none must give the payload
    only 0, 1 and 2.

    The wrapper saves stderr on fd 3 while it sets the limits quietly and restores stderr with
    ``exec 2>&3`` but forgets ``3>&-``: the payload is exec'd holding fd 3 (a duplicate of
    stderr) in every flow."""

    engine_name = "blind13-shell-wrapper-fd3"
    rpc_methods = correct.ShellRPC

    WRAPPER = "exec 3>&2 2>/dev/null\nulimit -c 0\nulimit -S -n 1024\nexec 2>&3\nexec \"$@\"\n"


class WrapperHidesExecFailure(correct.ShellWrapperEngine):
    """SPEC §1: ``start_process`` "becomes the payload: it must exec or exit"; §2 rule 6:
    ``post_start_process`` runs "only after a successful exec; not if stage 2 reported
    failure"; the error table: ``start_process`` raises → failure byte, no
    ``post_start_process``, exit 255.

    The payload is passed to ``sh -c '… exec "$@"'`` without being checked ("the shell will
    search PATH and report errors anyway"). When it cannot be exec'd the failure happens in the
    shell, after stage 2's own exec succeeded: the shell prints "not found" and exits 127, so
    the kit sees a successful exec, runs ``post_start_process`` and the run exits 127 instead of
    the stage-2 failure (255) the SPEC asks for. A payload that exists runs normally."""

    engine_name = "blind13-shell-wrapper-noexec-check"
    escapes = (
        "stage 2's exec succeeded: the program it ran (a shell that execs the payload, as "
        "upstream's action scripts do) failed to exec the payload afterwards; no SPEC sentence "
        "says the program start_process execs must be the payload itself, and a wrapper's "
        "exit 127 is a payload's exit code to the kit"
    )
    rpc_methods = correct.ShellRPC

    def start_process(self, master_fd: int) -> None:
        argv = self.common.engine_config.argv
        os.execve("/bin/sh", ["sh", "-c", self.WRAPPER, "sh", *argv], PAYLOAD_ENV)


class SetuidForHelpers(correct.ShellMasterEngine):
    """SPEC §4, master row, suid (and hybrid "as suid"): "r=e=U, saved uid 0, effective caps
    empty at entry and again at return; escalation possible", for every thread at every hook
    entry and return.

    To run its nsenter helpers as root the setuid master calls ``os.setuid(0)`` (allowed: the
    saved uid is 0; it sets the effective uid only) and drops back with ``os.setuid(uid)``.
    Made with euid 0 and CAP_SETUID, that second call sets real, effective *and saved* uid to U
    and empties the permitted set, on every thread (glibc). From then on the master has no saved
    uid 0 and cannot escalate: post_start_process, monitor_container's return and
    cleanup_container see r=e=s=U (and cleanup's own escalation fails, which it logs). Root and
    fakeroot masters are already root and are unaffected; userns runs no helper."""

    engine_name = "blind13-shell-setuid"
    rpc_methods = correct.ShellRPC

    @contextlib.contextmanager
    def _escalated(self):
        uid = os.getuid()
        if os.geteuid() == 0:
            yield
            return
        os.setuid(0)
        try:
            yield
        finally:
            os.setuid(uid)  # back to the invoking user


class MonitorReapsHelpers(correct.ShellMasterEngine):
    """SPEC §7: "A conformant ``monitor_container`` forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/
    SIGUSR2 to the container, reaps only the container pid, and returns its wait status."

    Because the master starts helpers (nsenter, sysctl, the holder), the monitor reaps
    everything that exits with ``waitpid(-1, WNOHANG)`` "so that no helper stays a zombie",
    and returns when the reaped pid is the container's. It reaps children that are not the
    container (the kit's, and helpers that ``subprocess`` was about to wait for)."""

    engine_name = "blind13-shell-reap-any"
    rpc_methods = correct.ShellRPC

    def monitor_container(self, pid: int, signals) -> int:
        self._monitor_up.set()
        while True:
            sig = signals.get(timeout=0.1)
            if sig in FORWARDED:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            while True:
                try:
                    done, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if done == 0:
                    break
                if done == pid:
                    return status
                # a helper of ours: reaped, nothing else to do


class HolderStoppedWithSigterm(correct.ShellMasterEngine):
    """SPEC §11: "After a run the host is as it was before: … processes." (and "a run changes
    nothing on the host that outlives it").

    ``cleanup_container`` stops the namespace holder politely: SIGTERM, a second's wait, and if
    it is still there it is left to "exit on its own". It never will: it was started by a
    master hook, whose signals are all blocked, and that mask survived nsenter's exec of
    ``sleep``, so SIGTERM stays pending. ``sleep infinity`` (holding the container's network
    namespace) outlives the run in root, suid, fakeroot and hybrid; userns starts no holder."""

    engine_name = "blind13-shell-holder-sigterm"
    rpc_methods = correct.ShellRPC

    def _stop_holder(self, holder: subprocess.Popen[bytes]) -> None:
        holder.terminate()
        try:
            holder.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            sys.stderr.write(
                f"{self.engine_name}: holder {holder.pid} still exiting, not waiting for it\n"
            )


class IpcmkFromMaster(correct.ShellRPCEngine):
    """SPEC §11: "After a run the host is as it was before: … SysV IPC objects and POSIX
    message queues"; §4: the master shares no ipc namespace with the container.

    Legacy payloads attach a SysV shared-memory segment prepared for them. ``ipcmk`` needs no
    privilege, so the engine runs it straight from ``create_container`` instead of through the
    RPC server, expecting the segment to vanish with the container's IPC namespace. The master
    is in the host's IPC namespace: the segment is created there and outlives the run, in every
    flow."""

    engine_name = "blind13-shell-ipcmk"
    rpc_methods = correct.ShellRPC

    SEGMENT_BYTES = 1 << 20

    def create_container(self, ctx, pid: int, rpc_conn) -> None:
        self._set_up_container(RPCClient(rpc_conn, self.common.engine_name))
        out = run_helper(["ipcmk", "-M", str(self.SEGMENT_BYTES), "-p", "0600"])
        sys.stderr.write(f"{self.engine_name}: {out.strip()}\n")
