"""Blind engines: the reference engine with one SPEC §4 privilege bug each (``blind_priv:X``)."""

from __future__ import annotations

import ctypes
import os
import platform
import threading

from kit.system import linux
from mutants.zoo import priv as zoo_priv
from reference_engines.minimal.engine import ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC

_libc = ctypes.CDLL(None, use_errno=True)
SYS_SETFSGID = 152 if platform.machine() in ("aarch64", "arm64") else 123
SYS_ADMIN = 1 << linux.CAP_NUMBERS["CAP_SYS_ADMIN"]
DAC_OVERRIDE = 1 << linux.CAP_NUMBERS["CAP_DAC_OVERRIDE"]
NET_RAW = 1 << linux.CAP_NUMBERS["CAP_NET_RAW"]


def _setuid_master() -> bool:
    """The master of the setuid flows (suid, hybrid): r=e=U, saved uid 0."""
    _ruid, euid, suid = os.getresuid()
    return euid != 0 and suid == 0


class MasterRealUidRoot(ReferenceEngine):
    """§4 master, suid/hybrid: "r=e=U, saved uid 0". create_container becomes full root to
    do some work (seteuid(0), setreuid(0, 0)) and drops back with seteuid(U) only: the real
    uid stays 0 in every thread after the hook returns."""

    engine_name = "blind-master-real-uid-root"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        if _setuid_master():
            user = os.getuid()
            os.seteuid(0)
            os.setreuid(0, 0)
            os.seteuid(user)  # the bug: the real uid is left 0
        super().create_container(ctx, pid, rpc_conn)


class MasterFsuidRoot(ReferenceEngine):
    """§4 master, suid/hybrid: "r=e=U, saved uid 0, effective caps empty". create_container
    writes a state file with setfsuid(0) (allowed: the saved uid is 0) and forgets to put the
    fs uid back: its thread keeps root's file access at return."""

    engine_name = "blind-master-fsuid-root"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        super().create_container(ctx, pid, rpc_conn)
        if _setuid_master():
            linux.thread_setfsuid(0)  # the bug: never set back to U


class MonitorThreadDropsSaved(ReferenceEngine):
    """§4 master, suid/hybrid: "saved uid 0 ... escalation possible", for every thread.
    monitor_container "needs no privilege" and drops its own thread's saved uid with a raw
    setresuid (the other threads keep it)."""

    engine_name = "blind-monitor-thread-drops-saved"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        if _setuid_master():
            user = os.getuid()
            linux.thread_setresuid(user, user, user)
        return super().monitor_container(pid, signals)


class RootMasterLoggerThread(ReferenceEngine):
    """§4 master, root: "uid 0", for every thread of the master (threads the engine started
    included). create_container starts a log-writer thread that drops itself to nobody with
    a raw setresuid and lives for the rest of the run."""

    engine_name = "blind-root-master-logger-thread"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx, pid, rpc_conn):  # type: ignore[no-untyped-def]
        if os.getresuid() == (0, 0, 0) and linux.in_initial_user_namespace():
            ready = threading.Event()

            def logger() -> None:
                linux.thread_setresuid(65534, 65534, 65534)
                ready.set()
                threading.Event().wait()

            threading.Thread(target=logger, name="blind-logger", daemon=True).start()
            ready.wait(5)
        super().create_container(ctx, pid, rpc_conn)


class Stage1RootDropsNetRaw(ReferenceEngine):
    """§4 stage 1, root: "uid 0, full caps". prepare_config drops CAP_NET_RAW from its
    effective and permitted sets early ("we never need raw sockets"), leaving the bounding
    set full."""

    engine_name = "blind-stage1-root-drops-net-raw"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        super().prepare_config(starter_config)
        if starter_config.flow == "root":
            eff, perm, inh = linux.capget()
            linux.capset(eff & ~NET_RAW, perm & ~NET_RAW, inh & ~NET_RAW)


class _InheritableRPC(ReferenceRPC):
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        eff, perm, inh = linux.capget()
        if perm & SYS_ADMIN:
            # The bug: "for the mount helper" CAP_SYS_ADMIN goes into the inheritable set
            # and is never taken out again.
            linux.capset(eff, perm, inh | SYS_ADMIN)
        super().mount(source, target, fstype, flags, data)


class RpcMethodInheritable(ReferenceEngine):
    """§4 RPC server, every flow: "a method may raise more on its own thread and must restore
    them" (the whole credential, the five capability sets). The mount method adds
    CAP_SYS_ADMIN to its thread's inheritable set and leaves it there."""

    engine_name = "blind-rpc-method-inheritable"
    rpc_methods = _InheritableRPC


class _RaisingInitRPC(ReferenceRPC):
    def __init__(self, engine):  # type: ignore[no-untyped-def]
        super().__init__(engine)
        eff, perm, inh = linux.capget()
        if eff == SYS_ADMIN and perm & DAC_OVERRIDE:
            # The bug: raised once at construction, "for every method", never lowered.
            linux.capset(eff | DAC_OVERRIDE, perm, inh)


class RpcInitRaisesDac(ReferenceEngine):
    """§4 RPC server, suid/hybrid: "e=U, only CAP_SYS_ADMIN effective". The RPC methods class
    raises CAP_DAC_OVERRIDE into the effective set when the server builds it, before any
    method runs: every method is entered (and returns) with two effective capabilities."""

    engine_name = "blind-rpc-init-raises-dac"
    rpc_methods = _RaisingInitRPC


class StartProcessNoRoot(zoo_priv.StartProcessSetsNoRoot):
    """§4 payload: "as the kernel derives from stage 2", and stage 2 root: "caps exactly as
    configured". start_process "hardens" the payload with SECBIT_NOROOT before exec: the
    uid-0 payload gets none of its configured capabilities."""

    engine_name = "blind-start-process-noroot"
    rpc_methods = ReferenceRPC


class _FsgidRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        gid = os.getgid()
        # The bug: the fs gid is switched "to create files as the container's group" and
        # never switched back (setfsgid reports no error: the call just returns).
        _libc.syscall(ctypes.c_long(SYS_SETFSGID), ctypes.c_int(65534 if gid == 0 else gid))
        super().sethostname(name)


class RpcMethodFsgid(ReferenceEngine):
    """§4 RPC server: "a method may raise more on its own thread and must restore them"
    (the whole credential: uids and gids r/e/s/fs). sethostname changes its thread's fs gid
    and leaves it."""

    engine_name = "blind-rpc-method-fsgid"
    rpc_methods = _FsgidRPC


class CleanupKeepsDac(ReferenceEngine):
    """§4 master, suid/hybrid: "effective caps empty at entry and again at return" (every
    master hook). cleanup_container raises CAP_DAC_OVERRIDE to remove its files and does not
    lower it again."""

    engine_name = "blind-cleanup-keeps-dac"
    rpc_methods = ReferenceRPC

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        if _setuid_master():
            eff, perm, inh = linux.capget()
            linux.capset(eff | DAC_OVERRIDE, perm, inh)
        super().cleanup_container(ctx, fatal, status)


class _KeepCapsRPC(ReferenceRPC):
    def sethostname(self, name: str) -> None:
        # The bug: keep-caps is set "for a later setresuid" and never cleared.
        linux.set_keepcaps(True)
        super().sethostname(name)


class RpcMethodKeepCaps(ReferenceEngine):
    """§4 RPC server: "a method may raise more on its own thread and must restore them"; the
    whole credential includes securebits. sethostname sets SECBIT_KEEP_CAPS on its thread
    and leaves it."""

    engine_name = "blind-rpc-method-keepcaps"
    rpc_methods = _KeepCapsRPC


class _NnpRPC(ReferenceRPC):
    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        # The bug: "hardening" the serving thread; no_new_privs cannot be cleared again.
        linux.set_no_new_privs()
        super().mount(source, target, fstype, flags, data)


class RpcMethodNnp(ReferenceEngine):
    """§4 RPC server: "must restore them"; the whole credential includes no_new_privs. The
    mount method sets no_new_privs on its own thread (per thread in the kernel)."""

    engine_name = "blind-rpc-method-nnp"
    rpc_methods = _NnpRPC


class StartProcessNnpRoot(ReferenceEngine):
    """§4 payload: "as the kernel derives from stage 2". start_process sets no_new_privs in
    every flow, root included, before exec: the root payload has a flag stage 2 did not."""

    engine_name = "blind-start-process-nnp-root"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd):  # type: ignore[no-untyped-def]
        linux.set_no_new_privs()
        super().start_process(master_fd)


class StartProcessGid(ReferenceEngine):
    """§4 payload: "as the kernel derives from stage 2" (the whole credential, gids too).
    start_process in the root flow switches to the nogroup gid before exec."""

    engine_name = "blind-start-process-gid"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd):  # type: ignore[no-untyped-def]
        if os.getresgid() == (0, 0, 0) and linux.in_initial_user_namespace():
            os.setresgid(65534, 65534, 65534)
        super().start_process(master_fd)


class CleanupOnFailureKeepsCap(zoo_priv.CleanupAfterFailureKeepsCapability):
    """§4 master, suid/hybrid: "effective caps empty at entry and again at return", at every
    master hook, the error paths included. cleanup_container raises CAP_DAC_OVERRIDE only
    after a fatal error (to remove a partial setup) and forgets to lower it."""

    engine_name = "blind-cleanup-on-failure-keeps-cap"
    rpc_methods = ReferenceRPC


class MonitorForwardKeepsKill(zoo_priv.MonitorForwardingKeepsCapability):
    """§4 master, suid/hybrid: "effective caps empty at entry and again at return". To
    forward a signal, monitor_container raises CAP_KILL ("the container may run as another
    uid") and never lowers it: visible only in a run that forwards a signal."""

    engine_name = "blind-monitor-forward-keeps-kill"
    rpc_methods = ReferenceRPC


class MonitorHoldsCapWhileWaiting(ReferenceEngine):
    """§4 master, suid/hybrid: "effective caps empty", at every hook entry and return for
    every thread. monitor_container raises CAP_KILL on its own thread for as long as it
    waits and lowers it before it returns: its own entry and return are clean, but every
    other hook (create_container, post_start_process) enters and returns while the monitor
    thread holds an effective capability."""

    engine_name = "blind-monitor-holds-cap-while-waiting"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        if not _setuid_master():
            return super().monitor_container(pid, signals)
        eff, perm, inh = linux.capget()
        linux.capset(eff | 1 << linux.CAP_NUMBERS["CAP_KILL"], perm, inh)
        try:
            return super().monitor_container(pid, signals)
        finally:
            linux.capset(eff, perm, inh)


class Stage1RootDropsNetRawEverywhere(zoo_priv.Stage1DropsCapabilityEverywhere):
    """§4 stage 1, root: "uid 0, full caps". prepare_config drops CAP_NET_RAW early ("we
    never need raw sockets") from every set it can: bounding, permitted and effective, so the
    three sets still agree with each other but are no longer full."""

    engine_name = "blind-stage1-root-drops-net-raw-everywhere"
    rpc_methods = ReferenceRPC
