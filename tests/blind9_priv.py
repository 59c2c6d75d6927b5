"""Round 9 of the blind engines: privileges of the RPC server and of stage 2 / the payload.

Written from ``SPEC.md`` alone (§4, §5, §6), not from the suite. Each class is a correct
engine of ``blind9_priv_correct.py`` (:class:`~blind9_priv_correct.ScratchPrivEngine`, or
:class:`~blind9_priv_correct.TargetIdsEngine`, the base with capabilities and target ids
configured) with ONE honest mistake, made everywhere its code runs: the flows a docstring
names are those where the mistake changes what the kernel ends up with (elsewhere the same
code finds nothing to do, or the kernel refuses it and the engine carries on).

The six RPC-server engines break SPEC §4's RPC server row ("a method may raise more on its
own thread and must restore them") and the sentences under the table ("Every rule of this
table holds for every thread of the process, threads the engine started included, at every
hook entry and return and at every RPC method entry and return"; "A rule that says a hook
'changes no credential' compares the whole credential: uids and gids (r/e/s/fs),
supplementary groups, the five capability sets, securebits, no_new_privs and seccomp
mode"). Their mistaken method is the last RPC call of ``create_container``, so the
lifecycle runs to its end. The six stage-2 engines break the stage 2 and payload rows of §4
or §5; stage 2's mistakes happen in ``start_process`` before the exec (only the payload
shows them) or in ``prepare_config``.

Loaded as ``blind9_priv:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing acts at
import time. Nothing here touches the host: files are written in a tmpfs that the RPC
server mounts in the container's own mount namespace.
"""

from __future__ import annotations

import errno
import os
import pwd
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from blind9_priv_correct import (
    CAP_DAC_OVERRIDE,
    CAP_SETGID,
    CAP_SETPCAP,
    CAP_SETUID,
    CAP_SYS_ADMIN,
    FLOWS,
    OPTIONAL_FILES,
    PAYLOAD_CAPS,
    PAYLOAD_ENV,
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_RAISE,
    PR_CAPBSET_DROP,
    PR_SET_KEEPCAPS,
    ScratchConfig,
    ScratchPrivEngine,
    ScratchRPC,
    TargetIdsEngine,
    capget,
    capset,
    lower_effective,
    prctl,
    raise_effective,
    task_count,
    thread_setfsgid,
    thread_setfsuid,
    thread_setresuid,
    wait_task_count,
    write_new,
)

if TYPE_CHECKING:
    from kit.rpc import RPCClient
    from kit.starter.config import StarterConfig


# === the RPC server =========================================================================


class _CopyInOnSuccessRPC(ScratchRPC):
    def copy_in(self, src: str, dst: str) -> int:
        """Copy a host file into the scratch directory with CAP_DAC_OVERRIDE raised on this
        thread for the copy."""
        raised = raise_effective(CAP_DAC_OVERRIDE)
        with open(src) as f:
            data = f.read()
        written = write_new(dst, data)
        if raised:  # BUG: not reached when open() or the write raised
            lower_effective(CAP_DAC_OVERRIDE)
        return written


class CapLeftRaisedOnError(ScratchPrivEngine):
    """An RPC method restores the capability it raised only on success: a missing file leaves
    CAP_DAC_OVERRIDE effective on the server's thread.

    SPEC §4, RPC server, suid: "e=U, only CAP_SYS_ADMIN effective and a small bounding set;
    a method may raise more on its own thread and must restore them"; hybrid: "as suid,
    inside the container's user ns"; and "Every rule of this table holds ... at every RPC
    method entry and return". ``copy_in`` raises CAP_DAC_OVERRIDE and lowers it after the
    copy, not in a ``finally``; ``create_container`` copies optional host files and ignores
    a missing one (/etc/container-motd), whose ``FileNotFoundError`` skips the lowering.
    Wrong in suid and hybrid (CAP_DAC_OVERRIDE permitted, not effective); in root, userns
    and fakeroot the server already has it effective and raises nothing.
    """

    engine_name = "blind9-priv-cap-left-on-error"
    rpc_methods = _CopyInOnSuccessRPC

    def populate(self, rpc: RPCClient) -> None:
        super().populate(rpc)
        for src in OPTIONAL_FILES:
            try:
                rpc.call("copy_in", src=src, dst=self.scratch(os.path.basename(src)))
            except FileNotFoundError:
                pass  # optional


class _PoolWorkerRPC(ScratchRPC):
    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self._pool: ThreadPoolExecutor | None = None

    def pooled_write(self, path: str, data: str) -> int:
        """Write on the method's own I/O worker, which does privileged writes only."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scratch-io")
        return self._pool.submit(_privileged_write, path, data).result()


def _privileged_write(path: str, data: str) -> int:
    # BUG: "the worker is ours and only ever does this", so the capability is raised on it
    # and never lowered; the worker outlives the method.
    raise_effective(CAP_DAC_OVERRIDE)
    return write_new(path, data)


class PoolWorkerCapLeft(ScratchPrivEngine):
    """An RPC method raises CAP_DAC_OVERRIDE on a thread pool worker of its own and never
    lowers it there; the worker lives on after the method returns.

    SPEC §4, RPC server, suid: "a method may raise more on its own thread and must restore
    them"; under the table: "Every rule of this table holds for every thread of the process,
    threads the engine started included, at every hook entry and return and at every RPC
    method entry and return". ``pooled_write`` hands the write to a one-worker
    ``ThreadPoolExecutor`` kept on the methods object; the worker raises the capability
    once "since it only does privileged writes". Wrong in suid and hybrid (permitted, not
    effective there); in root, userns and fakeroot it is effective already.
    """

    engine_name = "blind9-priv-pool-worker-cap"
    rpc_methods = _PoolWorkerRPC

    def populate(self, rpc: RPCClient) -> None:
        super().populate(rpc)
        rpc.call("pooled_write", path=self.scratch("pooled"), data="pool\n")


class _FsidsRPC(ScratchRPC):
    def write_file_as(self, path: str, data: str, uid: int, gid: int) -> int:
        """Create a file as ``uid:gid`` by switching this thread's fs ids."""
        raised = [cap for cap in (CAP_SETGID, CAP_SETUID) if raise_effective(cap)]
        try:
            thread_setfsgid(gid)
            old_uid = thread_setfsuid(uid)
            try:
                return write_new(path, data)
            finally:
                thread_setfsuid(old_uid)  # BUG: the fs gid is never put back
        finally:
            for cap in raised:
                lower_effective(cap)


class FsgidNotRestored(ScratchPrivEngine):
    """An RPC method switches its fs uid and fs gid for one file write and restores only the
    fs uid: the server's thread keeps fs gid 65534.

    SPEC §4, under the table: "A rule that says a hook 'changes no credential' compares the
    whole credential: uids and gids (r/e/s/fs), ..."; RPC server: "a method may raise more
    on its own thread and must restore them". ``write_file_as`` creates a file as
    nobody:nogroup in a sticky public directory with setfsgid/setfsuid (raising
    CAP_SETGID/CAP_SETUID where they are only permitted, lowered correctly). Wrong in root
    and suid; in userns, fakeroot and hybrid 65534 is not mapped, the kernel keeps the fs ids
    and nothing is left changed.
    """

    engine_name = "blind9-priv-fsgid-left"
    rpc_methods = _FsidsRPC

    def populate(self, rpc: RPCClient) -> None:
        super().populate(rpc)
        rpc.call("make_public_dir", path=self.scratch("public"))
        uid, gid = self.cfg.file_owner
        rpc.call(
            "write_file_as", path=self.scratch("public", "note"), data="hi\n", uid=uid, gid=gid
        )


class _GlibcSeteuidRPC(ScratchRPC):
    def write_root_file(self, path: str, data: str) -> int:
        """A root-owned file: where the server runs as euid U with saved uid 0, a worker
        thread takes euid 0 back for the write and then exits."""
        _, euid, suid = os.getresuid()
        if euid == 0 or suid != 0:
            return write_new(path, data)
        result: list[int] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                # BUG: glibc's setresuid changes every thread of the process (setxid
                # broadcast), not only this worker, whose exit was to drop euid 0 again.
                os.setresuid(-1, 0, -1)
                result.append(write_new(path, data))
            except BaseException as exc:  # handed to the method's thread
                errors.append(exc)

        before = task_count()
        worker = threading.Thread(target=work, name="scratch-root-write")
        worker.start()
        worker.join()
        wait_task_count(before)
        if errors:
            raise errors[0]
        return result[0]


class GlibcSetresuidWholeProcess(ScratchPrivEngine):
    """An RPC method regains euid 0 on a throwaway worker thread with ``os.setresuid``, whose
    glibc wrapper changes every thread: the whole server is left with euid 0.

    SPEC §4, RPC server, suid: "e=U, only CAP_SYS_ADMIN effective and a small bounding set;
    a method may raise more on its own thread and must restore them"; under the table:
    "Every rule of this table holds for every thread of the process ... at every RPC method
    entry and return". The author meant a per-thread change (the raw system call) that the
    worker's exit undoes; glibc broadcasts it, so the server's own thread returns from the
    method with euid 0 and every permitted capability effective. Wrong in suid, the only
    flow whose server has euid U and saved uid 0 (root, fakeroot and hybrid already have
    euid 0; userns has no saved uid 0).
    """

    engine_name = "blind9-priv-glibc-setresuid"
    rpc_methods = _GlibcSeteuidRPC

    def populate(self, rpc: RPCClient) -> None:
        super().populate(rpc)
        rpc.call("write_root_file", path=self.scratch("root-owned"), data="root\n")


class _HelperRPC(ScratchRPC):
    def run_helper(self, argv: list[str]) -> int:
        """Run a helper program on the container's files, unable to mount anything."""
        raised = raise_effective(CAP_SETPCAP)
        try:
            # BUG: the bounding set is the server thread's own; dropping it here, "for the
            # helper", drops it for the server for good (the helper would inherit it, but
            # the drop belonged in the child, between fork and exec).
            prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN)
        finally:
            if raised:
                lower_effective(CAP_SETPCAP)
        done = subprocess.run(argv, close_fds=True, check=False, env=PAYLOAD_ENV)
        return done.returncode


class BoundingSysAdminDropped(ScratchPrivEngine):
    """An RPC method drops CAP_SYS_ADMIN from the server's bounding set before it runs a
    helper and leaves it dropped: a credential change the other way.

    SPEC §4, RPC server, suid: "only CAP_SYS_ADMIN effective and a small bounding set";
    under the table: "A rule that says a hook 'changes no credential' compares the whole
    credential: ... the five capability sets". ``run_helper`` means to keep the helper from
    mounting, and does it with PR_CAPBSET_DROP in the server itself instead of in the child
    (raising CAP_SETPCAP for it where it is only permitted, lowered correctly). Wrong in all
    five flows: the server's thread returns without CAP_SYS_ADMIN in its bounding set.
    """

    engine_name = "blind9-priv-bounding-sys-admin-dropped"
    rpc_methods = _HelperRPC

    def populate(self, rpc: RPCClient) -> None:
        super().populate(rpc)
        rpc.call("run_helper", argv=["/bin/true"])


class _KeepCapsRPC(ScratchRPC):
    def write_file_as_owner(self, path: str, data: str, uid: int) -> int:
        """Create a file as ``uid`` by switching this thread's uids (raw setresuid) and back,
        keeping the permitted set across the switch."""
        prctl(PR_SET_KEEPCAPS, 1)  # BUG: SECBIT_KEEP_CAPS is never cleared again
        caps = capget()
        old = os.getresuid()
        try:
            thread_setresuid(uid, uid, uid)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EINVAL):
                raise
            return write_new(path, data)  # not permitted, or not mapped here: as we are
        try:
            return write_new(path, data)
        finally:
            capset(1 << CAP_SETUID, caps[1], caps[2])
            thread_setresuid(*old)
            capset(*caps)


class KeepCapsLeftSet(ScratchPrivEngine):
    """An RPC method sets SECBIT_KEEP_CAPS (PR_SET_KEEPCAPS) for a uid switch and never clears
    it: the server's thread returns with a securebit set.

    SPEC §4, under the table: "A rule that says a hook 'changes no credential' compares the
    whole credential: uids and gids (r/e/s/fs), supplementary groups, the five capability
    sets, securebits, no_new_privs and seccomp mode"; RPC server: "a method may raise more on
    its own thread and must restore them". ``write_file_as_owner`` restores the uids and
    the capability sets exactly, but not the keep-caps bit, which it sets before it knows
    whether a switch is possible. Wrong in all five flows (the switch to 65534 happens in
    root only; elsewhere it is refused, EPERM or EINVAL, and the bit stays set anyway).
    """

    engine_name = "blind9-priv-keepcaps-left"
    rpc_methods = _KeepCapsRPC

    def populate(self, rpc: RPCClient) -> None:
        super().populate(rpc)
        rpc.call("make_public_dir", path=self.scratch("public"))
        path = self.scratch("public", "owned")
        rpc.call("write_file_as_owner", path=path, data="hi\n", uid=self.cfg.file_owner[0])


# === stage 2 and the payload ================================================================


class SuidNoNewPrivsMissing(ScratchPrivEngine):
    """Stage 1 asks for no_new_privs only when there is a user namespace: stage 2 of the suid
    flow runs without it.

    SPEC §4, stage 2, suid: "r=e=s=U (a target uid is ignored for a non-root caller); caps
    as configured (default none); no_new_privs set; no saved uid 0". The author tied
    no_new_privs to user namespaces ("that is where an unprivileged user gets capabilities").
    Wrong in suid only (userns, fakeroot and hybrid create a user namespace and get it;
    root needs none).
    """

    engine_name = "blind9-priv-suid-no-new-privs-missing"

    def wants_no_new_privs(self, sc: StarterConfig, namespaces: list[str]) -> bool:
        return "user" in namespaces  # BUG: suid has no user namespace


#: The capabilities SuidTargetUidHonoured gives stage 2 so that start_process can switch ids.
_SWITCH_CAPS = ["CAP_SETGID", "CAP_SETUID"]


class SuidTargetUidHonoured(ScratchPrivEngine):
    """Stage 2 applies the configured target uid itself where the starter left it: in suid
    the payload runs as the target uid (root by default) instead of U.

    SPEC §4, stage 2, suid: "r=e=s=U (a target uid is ignored for a non-root caller); caps
    as configured (default none); no_new_privs set; no saved uid 0"; the payload: "no host
    privilege in every flow but root". The engine's default user is root (target uid 0,
    gids 0), it gives stage 2 CAP_SETUID/CAP_SETGID (legal: "caps as configured") and, in
    ``start_process``, switches to the target ids when the starter "forgot" them. Wrong in
    suid: the payload is uid 0 in the host user namespace with the bounding set's
    capabilities. In root, fakeroot and hybrid stage 2 is uid 0 already; in userns 0 is not
    mapped and the switch fails (EINVAL), which the engine ignores.
    """

    engine_name = "blind9-priv-suid-target-uid-honoured"
    payload_cap_flows = FLOWS  # stage 2's own switch capabilities, in every flow

    def config(self) -> ScratchConfig:
        caps = {kind: list(_SWITCH_CAPS) for kind in ("bounding", "permitted", "effective")}
        return ScratchConfig(target_uid=0, target_gids=[0], capabilities=caps)

    def before_exec(self) -> None:
        cfg = self.cfg
        uid = cfg.target_uid
        if uid is None or os.getresuid() == (uid, uid, uid):
            return
        if not capget()[0] & 1 << CAP_SETUID:
            return
        gids = cfg.target_gids or [uid]
        try:
            # BUG: for a non-root caller the target uid is to be ignored, not "fixed".
            os.setresgid(gids[0], gids[0], gids[0])
            os.setresuid(uid, uid, uid)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # an id this user namespace does not map
                raise


class SuidAmbientCapsConfigured(TargetIdsEngine):
    """Stage 1 configures the payload's capabilities, ambient included, in every flow: in
    suid the payload keeps an ambient capability in the host user namespace.

    SPEC §4, the payload: "as the kernel derives from stage 2 (check: no host privilege in
    every flow but root)"; "Host privilege" means "a uid 0 (real, effective or saved) or any
    permitted capability while in the host user namespace". TargetIdsEngine leaves suid
    out of its payload capabilities; this one does not ("caps as configured" in suid read
    as "the payload may have them"). Stage 2 itself is as configured; the payload, U with
    CAP_NET_BIND_SERVICE ambient, permitted and effective, is not. Wrong in suid only.
    """

    engine_name = "blind9-priv-suid-ambient-caps"
    payload_cap_flows = FLOWS  # BUG: suid included


class AmbientRaisedUnconfigured(TargetIdsEngine):
    """Stage 2 raises its permitted capabilities into the inheritable and ambient sets for a
    non-root payload, though the StarterConfig leaves both unset.

    SPEC §5: "A capability set the StarterConfig leaves unset is empty when stage 2 execs
    the payload, the bounding set included"; §4, stage 2, root: "caps exactly as
    configured". This engine configures effective, permitted and bounding only and, in
    ``start_process``, makes them "survive the exec" itself. Wrong where the payload is not
    root: root (target uid 1000) and userns (U); in suid stage 2 has no capabilities, in
    fakeroot and hybrid it is uid 0 and raises nothing.
    """

    engine_name = "blind9-priv-ambient-raised"

    def config(self) -> ScratchConfig:
        cfg = super().config()
        cfg.capabilities = {
            kind: list(PAYLOAD_CAPS[kind]) for kind in ("bounding", "permitted", "effective")
        }
        return cfg

    def before_exec(self) -> None:
        if os.geteuid() == 0:
            return  # a root payload gets its capabilities at exec
        eff, perm, inh = capget()
        if not perm:
            return
        # BUG: neither set was configured; they must be empty at exec.
        capset(eff, perm, inh | perm)
        for cap in range(64):
            if perm >> cap & 1:
                prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


class GroupsFromPasswd(TargetIdsEngine):
    """Stage 2 gives the payload the supplementary groups of its passwd entry (initgroups),
    replacing the configured target gids.

    SPEC §4, stage 2, root: "r=e=s=target uid (default 0); caps exactly as configured";
    §5: ``set_target_gids`` sets the target gids (primary first, then the supplementary
    groups). TargetIdsEngine asks for gids 1000, 100; the starter applies them; then
    ``start_process`` does what login and su do, ``initgroups`` for the user's name (or no
    groups for a uid without one), so the payload's groups are not the target's. Wrong in
    root only: in suid stage 2 has no CAP_SETGID; the user namespaces deny setgroups
    (EPERM, ignored).
    """

    engine_name = "blind9-priv-groups-from-passwd"

    def before_exec(self) -> None:
        if not capget()[0] & 1 << CAP_SETGID:
            return
        try:
            try:
                name = pwd.getpwuid(os.getuid()).pw_name
            except KeyError:
                os.setgroups([])  # BUG: drops the configured supplementary gids
            else:
                os.initgroups(name, os.getgid())  # BUG: the same, from /etc/group
        except PermissionError:
            pass  # a user namespace that denies setgroups


class RootRealUidLeftZero(TargetIdsEngine):
    """Stage 2 becomes root again for one write with ``setuid(0)`` and drops back with
    ``seteuid(target)``: the real uid of the payload stays 0, not the target uid.

    SPEC §4, stage 2, root: "r=e=s=target uid (default 0); caps exactly as configured";
    the payload: "as the kernel derives from stage 2". With CAP_SETUID configured (legal),
    ``start_process`` writes a pid file in the root-owned scratch directory as root; the
    setuid/seteuid pair leaves real uid 0 (exec then resets only the saved uid), and a
    real uid 0 gives the payload the bounding set at exec (``/bin/grep`` shows Uid 0 1000
    1000 1000; a ``/bin/sh`` payload even sets its effective uid back to its real uid 0, as
    a shell does when the two differ). Wrong in root (target uid 1000);
    in fakeroot and hybrid stage 2 is uid 0 already, in userns 0 is not mapped (EINVAL), in
    suid stage 2 has no CAP_SETUID (EPERM): the engine then writes as it is, or not at all.
    """

    engine_name = "blind9-priv-root-real-uid-left-zero"

    def before_exec(self) -> None:
        path = self.scratch("stage2.pid")
        uid = os.geteuid()
        if uid == 0:
            write_new(path, f"{os.getpid()}\n")
            return
        try:
            os.setuid(0)
        except OSError:
            return  # cannot be root here: no pid file
        try:
            write_new(path, f"{os.getpid()}\n")
        finally:
            os.seteuid(uid)  # BUG: the real and saved uids stay 0
