"""Blind round 13, theme ``res``: buggy engines that set up resources for the container
beyond its namespaces, each the correct engine of ``blind13_res_correct`` with exactly one
plausible mistake, written from SPEC.md alone (and the kit's public API), without reading
the conformance suite, the reference engines or the mutants. Each bug changes the host's copy
of a resource instead of the container's, leaves a limit or an object on the host, or leaves
the RPC server with more privilege than §4 gives it; everything else, and the run, completes
as in the correct engine.

- ``blind13-res-master-sysctl``: as host root, the master writes the container's sysctls
  itself through ``/proc/PID/root/proc/sys`` (the container's fresh /proc); a sysctl file
  resolves to the opener's namespaces, so the host's ``net.*`` and IPC sysctls change
  (root flow; §11 sysctls).
- ``blind13-res-nsroot-caps``: the setuid RPC server's euid-0 section for the IPC sysctls
  saves the thread's capabilities after becoming euid 0 and "restores" every permitted
  capability as effective (suid flow; §4, RPC server row).
- ``blind13-res-mqueue-early``: the payload's control message queue is claimed before the
  container's /dev (and its own mqueue) is mounted, by path in the inherited /dev/mqueue:
  the queue is made in the host's IPC namespace and outlives the run (every flow; §11 POSIX
  message queues).
- ``blind13-res-shm-fallback``: /dev/shm is mounted owned by uid 0, which the userns flow
  does not map; the failure is hidden by binding the host's /dev/shm instead, and the
  engine's info object is left there (userns flow; §11 files).
- ``blind13-res-prlimit-init``: the payload's resource limits are applied by the master to
  "pid 1, the container's init": in the master's pid namespace that is the host's init,
  whose limits are lowered for good (root flow; §11 processes: nothing changed on the host
  outlives a run).
- ``blind13-res-rshared``: the container's / is made ``rshared`` instead of ``rslave``; the
  private /tmp and /dev/shm mounts propagate into the host's mount namespace and stay there
  (root and suid flows; §11 mounts, "not even while it runs").
- ``blind13-res-shm-remount``: /dev/shm is resized by remounting the inherited tmpfs; the
  size is the superblock's, which is the host's (root and suid flows; §11 mounts and their
  options).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import blind13_res_correct as correct

from kit import system
from kit.rpc import RPCClient
from kit.system import linux

# --- sysctls ----------------------------------------------------------------------------------


class MasterSysctlEngine(correct.SysctlEngine):
    """SPEC §11: "After a run the host is as it was before: files, mounts …, hostname and
    domainname, sysctls, …". As host root (root flow), the master skips the RPC round trip
    and writes the sysctls through the container's own /proc, reached as
    ``/proc/PID/root/proc/sys``. The path picks the container's /proc mount, but a sysctl
    file resolves to the namespaces of the process that opens it: the master is in the
    host's network and IPC namespaces, so the host's ``net.ipv4.ip_forward``,
    ``net.ipv4.ip_unprivileged_port_start``, ``kernel.msgmnb``, ``kernel.shmmni`` and
    ``fs.mqueue.msg_max`` change (the IPC ones past the host's read-only /proc/sys), and the
    container keeps its defaults. In the other flows the master is not host root and the RPC
    server does it, as in the correct engine.
    """

    engine_name = "blind13-res-master-sysctl"

    def set_sysctls(self, rpc: RPCClient, pid: int, values: dict[str, str]) -> None:
        if not system.current().privileged():
            super().set_sysctls(rpc, pid, values)
            return
        # Host root may write them from here: /proc/PID/root is the container's view, and
        # mount_proc has just put the container's own /proc there.
        proc = f"/proc/{pid}/root/proc"
        for name, value in values.items():
            correct.sysctl_kind(name)
            with open(correct.sysctl_path(name, proc), "r+") as f:
                f.write(value + "\n")


class NsRootCapsRPC(correct.SysctlRPC):
    @contextlib.contextmanager
    def _ns_root(self) -> Iterator[None]:
        _ruid, euid, suid = os.getresuid()
        if euid == 0:
            yield
            return
        if suid != 0:
            raise PermissionError("no root in the container's IPC namespace to write its sysctls")
        linux.thread_setresuid(-1, 0, -1)
        saved = linux.capget()  # what to give back once euid is U again
        try:
            yield
        finally:
            linux.thread_setresuid(-1, euid, -1)  # the kernel clears the effective set
            linux.capset(*saved)


class NsRootCapsEngine(correct.SysctlEngine):
    """SPEC §4, RPC server, suid: "e=U, only CAP_SYS_ADMIN effective and a small bounding
    set; a method may raise more on its own thread and must restore them". For the IPC
    sysctls (writable by euid 0 only) the setuid RPC server becomes euid 0 on its thread and
    back, then restores the capabilities it saved; but it saves them after the switch to euid
    0, when the kernel has made every permitted capability effective. ``apply_sysctls``
    returns with CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_SETGID, CAP_SETUID,
    CAP_SETPCAP, CAP_NET_ADMIN, CAP_SYS_CHROOT and CAP_MKNOD effective beside CAP_SYS_ADMIN
    (suid flow; the other flows need no switch).
    """

    engine_name = "blind13-res-nsroot-caps"
    rpc_methods = NsRootCapsRPC


# --- a private /dev -----------------------------------------------------------------------------


class MqueueEarlyEngine(correct.DevEngine):
    """SPEC §11: "After a run the host is as it was before: … SysV IPC objects and POSIX
    message queues". The payload's control queue is claimed first, "so that a name clash
    with another container stops the run before anything is mounted": the RPC server
    creates it by path in /dev/mqueue before ``setup_dev`` has mounted the container's own
    mqueue there. The /dev/mqueue it inherited is the host's mqueue file system, bound to the
    host's IPC namespace whatever namespace the creating process is in: the queue is the
    host's, and nothing removes it (every flow: /dev/mqueue is world-writable).
    """

    engine_name = "blind13-res-mqueue-early"

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        cfg = self.common.engine_config
        rpc = self.rpc(rpc_conn)
        rpc.sethostname(name=cfg.hostname)
        rpc.claim_queue(name=cfg.object_name)  # fail fast on a clash, before any mount
        rpc.setup_dev(
            size=cfg.dev_size,
            devices=cfg.devices,
            nodes=cfg.nodes,
            pts_options=cfg.pts_options,
            shm_size=cfg.shm_size,
            shm_owner=cfg.shm_owner,
        )
        rpc.write_info(
            name=cfg.object_name + ".json",
            info={"container": self.common.container_id, "hostname": cfg.hostname},
        )


class ShmFallbackRPC(correct.DevRPC):
    def _mount_shm(self, size: str, owner: list[int], host: str) -> None:
        try:
            # /dev/shm belongs to the container's root.
            super()._mount_shm(size, [0, 0], host)
        except OSError as exc:
            # Better a shared /dev/shm than none: the payload's POSIX IPC needs one.
            correct._warn(f"private /dev/shm refused ({exc}); using the host's")
            self.system.mount(f"{host}/shm", "/dev/shm", None, ["bind"])


class ShmFallbackEngine(correct.DevEngine):
    """SPEC §11: "a run changes nothing on the host that outlives it … After a run the host
    is as it was before: files, …". The private /dev/shm is mounted with ``uid=0,gid=0``;
    in the userns flow (U mapped to itself, no root) the kernel refuses that mount (EINVAL),
    and the RPC server hides the failure by binding the host's /dev/shm (reached through the
    old /dev it kept open) instead. The engine then writes the payload's info object into
    what it believes is the container's /dev/shm: the file lands in the host's /dev/shm and
    stays after the run (userns flow only; the other flows map uid 0).
    """

    engine_name = "blind13-res-shm-fallback"
    rpc_methods = ShmFallbackRPC


# --- /tmp, /dev/shm and limits --------------------------------------------------------------------


class PrlimitInitEngine(correct.LimitsEngine):
    """SPEC §11: "The contract for engines: a run changes nothing on the host that outlives
    it … After a run the host is as it was before: … processes." The payload's limits are
    applied to "the container's init": with a new pid namespace the payload is pid 1 (§2
    rule 9 says stage 2 sees itself as pid 1), so ``post_start_process`` calls
    ``prlimit(1, …)``. But the master is in the host's pid namespace, where pid 1 is the
    host's init: in the root flow (the master is root like init) init's NOFILE, CORE,
    MEMLOCK and NPROC limits are lowered and stay so after the run; the payload keeps the
    defaults. In the other flows the master may not touch init (EPERM, reported and skipped).
    """

    engine_name = "blind13-res-prlimit-init"

    def limits_target(self, pid: int) -> int:
        return 1  # the payload is init of its pid namespace


class RsharedEngine(correct.LimitsEngine):
    """SPEC §11: "a run changes nothing on the host that outlives it, and a few things
    (hostname, mount table: NS-010, NS-011) not even while it runs. After a run the host is
    as it was before: files, mounts (and their options and propagation), …". The container's
    / is made ``rshared`` (meant: mounts the host makes later reach the container; that is
    ``rslave``). Shared, the container's mounts are peers of the host's, so the private /tmp
    and /dev/shm tmpfs mounts the RPC server makes propagate into the host's mount
    namespace, cover its /tmp and /dev/shm and stay after the container is gone (root and
    suid flows; in the user-namespace flows the kernel makes the copied mounts slaves).
    """

    engine_name = "blind13-res-rshared"
    PROPAGATION = "rshared"


class ShmRemountRPC(correct.LimitsRPC):
    def size_shm(self, size: str) -> None:
        mounted = [m for m in linux.mount_table() if m.point == "/dev/shm"]
        if mounted and mounted[-1].fstype == "tmpfs":
            # Already a tmpfs: resize it in place (keeps what is in it, no new mount).
            try:
                self.system.mount(
                    None, "/dev/shm", None, ["remount", "nosuid", "nodev", "noexec"], f"size={size}"
                )
                return
            except PermissionError:
                pass  # not ours to resize (a user namespace): mount a new one
        super().size_shm(size)


class ShmRemountEngine(correct.LimitsEngine):
    """SPEC §11: "After a run the host is as it was before: files, mounts (and their options
    and propagation), …". To size /dev/shm the RPC server remounts the tmpfs the container
    inherited with ``size=32m`` instead of mounting a new one. The mount is the container's
    copy, but a tmpfs's size is an option of its superblock, which is the host's /dev/shm:
    the host's /dev/shm shrinks to 32 MiB for good (root and suid flows, where the RPC server
    holds CAP_SYS_ADMIN over that superblock; in the user-namespace flows the remount is
    refused and a new tmpfs is mounted, as in the correct engine).
    """

    engine_name = "blind13-res-shm-remount"
    rpc_methods = ShmRemountRPC
