"""Blind test engines, theme PRIVILEGES (buggy ones), written from SPEC.md alone.

Each engine subclasses one of the correct engines of ``blind11_priv_correct`` and breaks
exactly one rule of SPEC §4/§5, each through a different mechanism (none of them a plain
setresuid): an fs uid, an ambient capability, an engine thread, a securebit, a missing
StarterConfig flag, an RPC method's error path. The runs complete and the payload runs.

Written from the contract (SPEC.md, README, kit.contract docstrings) only. Nothing runs at
import time but definitions.
"""

from __future__ import annotations

import errno
import os

from kit import system

try:  # imported as tests.blind11_priv, or with tests/ on the path
    from . import blind11_priv_correct as correct
except ImportError:
    import blind11_priv_correct as correct

CAP_SYS_ADMIN = 21


# --- 1. an fs uid left at 0 in a master hook ----------------------------------------------------


class FsuidLeftEngine(correct.RaisingRPCEngine):
    """Bug (SPEC §4, master row: suid/hybrid master r=e=U with no effective capability at return): create_container switches its thread's fs uid to 0 (setfsuid) to list a root-only directory and switches back only if that fails, so the fs uid stays 0 and the kernel makes the fs capabilities effective."""  # noqa: E501

    engine_name = "blind11-priv-fsuid"

    #: Root-only (0700) directories: ld.so's cache on Debian-like hosts, else root's home.
    ROOT_ONLY_DIRS = ("/var/cache/ldconfig", "/root")

    def _count_root_only(self) -> int:
        # Read it with fs uid 0, which the saved uid 0 of the setuid master allows.
        where = next((d for d in self.ROOT_ONLY_DIRS if os.path.isdir(d)), "/")
        previous = correct._thread_setfsuid(0)
        try:
            return len(os.listdir(where))
        except OSError:
            correct._thread_setfsuid(previous)  # BUG: only the failure path switches back
            return -1

    def create_container(self, ctx, pid, rpc_conn):
        super().create_container(ctx, pid, rpc_conn)
        self._count_root_only()


# --- 2. an ambient capability raised for the payload ---------------------------------------------


class AmbientPayloadEngine(correct.WorkerThreadEngine):
    """Bug (SPEC §5: a capability set the StarterConfig leaves unset (here ambient, set empty) is empty when stage 2 execs the payload): start_process raises every permitted+inheritable capability into the ambient set (prctl PR_CAP_AMBIENT_RAISE) right before exec."""  # noqa: E501

    engine_name = "blind11-priv-ambient"

    def start_process(self, master_fd):
        _, permitted, inheritable = system.current().capabilities()
        for cap in range(64):
            if (permitted & inheritable) >> cap & 1:
                # BUG: the ambient set was configured empty
                correct._prctl(correct.PR_CAP_AMBIENT, correct.PR_CAP_AMBIENT_RAISE, cap)
        super().start_process(master_fd)


# --- 3. a master worker thread that regains privilege ------------------------------------------


class WorkerRaisesEngine(correct.WorkerThreadEngine):
    """Bug (SPEC §4, every thread: suid/hybrid master has no effective capability at hook entry and return): the watcher thread that create_container starts raises CAP_SYS_ADMIN into its own effective set (capset on that thread only) and keeps it, while every hook thread stays clean."""  # noqa: E501

    engine_name = "blind11-priv-workercap"

    def _watch(self, pid: int) -> None:
        # "So the watcher can remount the container's /proc later without an RPC round trip."
        sysi = system.current()
        effective, permitted, inheritable = sysi.capabilities()
        bit = 1 << CAP_SYS_ADMIN
        if permitted & bit and not effective & bit:
            sysi.set_capabilities(effective | bit, permitted, inheritable)  # BUG: never dropped
        super()._watch(pid)


# --- 4. a securebit changed by a hook that must change no credential ----------------------------


class KeepCapsEngine(correct.WorkerThreadEngine):
    """Bug (SPEC §4: a master hook changes no credential, securebits included): post_start_process sets PR_SET_KEEPCAPS (the SECBIT_KEEP_CAPS securebit) on its thread "for a later drop" and never clears it."""  # noqa: E501

    engine_name = "blind11-priv-keepcaps"
    escapes = (
        "SPEC §4 has no rule that a master hook changes no credential: its \"changes no "
        "credential\" sentence defines how such a rule compares, and the one rule that uses "
        "it is start_process's before the exec (PRIV-PAYLOAD-003). The master's rows ask for "
        "uids, effective capabilities and escalation, which SECBIT_KEEP_CAPS leaves as they "
        "were (round 7's KEEP_CAPS on a setuid master, the same question)"
    )

    def post_start_process(self, ctx, pid):
        correct._prctl(correct.PR_SET_KEEPCAPS, 1)  # BUG: left set when the hook returns
        super().post_start_process(ctx, pid)


# --- 5. no_new_privs missing in suid stage 2 ---------------------------------------------------


class NoNNPInSuidEngine(correct.RaisingRPCEngine):
    """Bug (SPEC §4, stage 2 row, suid: no_new_privs set): prepare_config asks for no_new_privs only when the run has a user namespace, so suid stage 2 and its payload can still gain privilege through a setuid-root exec."""  # noqa: E501

    engine_name = "blind11-priv-nonnp"

    def _wants_no_new_privs(self, sc) -> bool:
        return sc.flow in ("userns", "fakeroot", "hybrid")  # BUG: suid forgotten


# --- 6. a capability raised by an RPC method and restored only on success -----------------------


class RestoreOnSuccessRPC(correct.RaisingRPC):
    def bring_up(self, ifname: str) -> bool:
        sysi = self.system
        effective, permitted, inheritable = sysi.capabilities()
        extra = (1 << correct.CAP_NET_ADMIN) & permitted & ~effective
        if extra:
            sysi.set_capabilities(effective | extra, permitted, inheritable)
        sysi.link_up(ifname)  # raises ENODEV for an absent interface...
        if extra:  # BUG: ...and then this restore never runs
            sysi.set_capabilities(effective, permitted, inheritable)
        return True


class RPCRestoreOnSuccessEngine(correct.RaisingRPCEngine):
    """Bug (SPEC §4, RPC server row: a method may raise more capabilities on its own thread and must restore them): bring_up raises CAP_NET_ADMIN and restores it only on success, and create_container asks for an optional interface that does not exist (ENODEV, tolerated)."""  # noqa: E501

    engine_name = "blind11-priv-rpcerr"
    rpc_methods = RestoreOnSuccessRPC

    OPTIONAL_LINK = "b11opt0"

    def create_container(self, ctx, pid, rpc_conn):
        rpc = self._client(rpc_conn)
        rpc.sethostname(name=self.common.engine_config.hostname)
        for link in self.common.engine_config.links:
            rpc.bring_up(ifname=link)
        try:
            rpc.bring_up(ifname=self.OPTIONAL_LINK)
        except OSError as exc:  # an optional interface: absent is fine
            if exc.errno not in (errno.ENODEV, errno.ENXIO):
                raise
