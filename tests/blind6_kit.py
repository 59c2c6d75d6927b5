"""Blind engines that attack the kit itself (written from SPEC.md alone, not from the suite).

Each class is the reference engine with ONE trick that breaks a rule of the contract and then
tries to keep the kit from seeing it: by making a privilege snapshot or a ledger datagram say
something false, by hiding a thread, by putting a host change back before the supervisor
looks, or by reaching into the kit's objects from inside a hook (engine code runs in the same
interpreter as the kit's code of that process). A kit that is not fooled must fail every one.

Loaded as ``blind6_kit:ClassName`` with ``tests/`` on ``PYTHONPATH``. Nothing here runs at
import time: every trick starts inside a hook, so only the engine that is run acts.

The engines that change "the host" (the kit's host sandbox) first check that they are inside
it (:func:`_inside_kit_sandbox`), and do nothing otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import posix
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from kit.contract import Context, SignalChannel, WaitStatus
from kit.ledger import record as kit_record
from kit.starter import common as kit_common
from kit.starter import master as kit_master
from kit.starter import rpc_server as kit_rpc_server
from kit.system import linux
from reference_engines.minimal.engine import (
    FORWARDED_SIGNALS,
    MONITOR_POLL,
    ReferenceEngine,
)
from reference_engines.minimal.rpc import ReferenceRPC

#: The capability the "forgetful" engines raise and never lower: permitted in the setuid
#: master (full permitted set) and in the setuid RPC server (kit's RPC_SERVER_CAPS).
EXTRA_CAP = "CAP_DAC_OVERRIDE"
EXTRA_MASK = linux.caps_to_mask([EXTRA_CAP])
SYS_ADMIN_MASK = linux.caps_to_mask(["CAP_SYS_ADMIN"])
#: Credential fields of a thread entry in a privilege snapshot (kit.ledger.probe).
CRED_FIELDS = ("uid", "gid", "groups", "caps", "no_new_privs", "seccomp")
#: The environment variable the kit's host sandbox sets: "MNT:UTS" inode numbers.
SANDBOX_ENV = "KIT_HOST_SANDBOX"


# --- helpers ---------------------------------------------------------------------------------


def _inside_kit_sandbox() -> bool:
    """Whether this process is in the kit's host sandbox (its mount and uts namespaces, as
    the sandbox announces them): the engines that touch "the host" act only there, so that
    a run outside a sandbox can never change the real machine."""
    try:
        mnt, uts = (int(x) for x in os.environ.get(SANDBOX_ENV, "").split(":"))
        return (
            os.stat("/proc/self/ns/mnt").st_ino == mnt
            and os.stat("/proc/self/ns/uts").st_ino == uts
        )
    except (ValueError, OSError):
        return False


def _raise_effective(mask: int) -> bool:
    """Raise ``mask`` into the calling thread's effective set, if permitted (capset is per
    thread). False when it is not permitted here (a flow without that capability)."""
    eff, perm, inh = linux.capget()
    if mask & ~perm:
        return False
    linux.capset(eff | mask, perm, inh)
    return True


class _PrivilegedHelper:
    """A master helper thread that regains uid 0 for itself only (the raw setresuid: the
    setuid master's saved uid is 0, so the kernel allows it, and the effective set becomes the
    full permitted set) and then waits, privileged, until :meth:`finish`."""

    def __init__(self, name: str, comm: str | None = None) -> None:
        self.comm = comm
        self.tid = 0  # as the mounted /proc numbers it (what snapshots list)
        self.native = 0  # gettid()
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> int:
        self.thread.start()
        self.ready.wait(5)
        return self.tid

    def _run(self) -> None:
        self.tid = linux.proc_tid()
        self.native = threading.get_native_id()
        if self.comm is not None:
            linux.set_name(self.comm)  # the name snapshots show (comm), not Python's
        try:
            linux.thread_setresuid(0, 0, 0)
        except OSError:
            pass  # a flow whose master has no saved uid 0: nothing to hide there
        self.ready.set()
        self.stop.wait()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(5)


class _IdleThread:
    """A thread that never touches credentials and waits until :meth:`finish`."""

    def __init__(self, name: str, comm: str | None = None) -> None:
        self.comm = comm
        self.tid = 0
        self.native = 0
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.ready.wait(5)

    def _run(self) -> None:
        self.tid = linux.proc_tid()
        self.native = threading.get_native_id()
        if self.comm is not None:
            linux.set_name(self.comm)
        self.ready.set()
        self.stop.wait()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(5)


class _MasterHelperEngine(ReferenceEngine):
    """Base (not an engine: no engine_name): a privileged helper thread lives in the master
    from create_container to cleanup_container; :meth:`hide` is the trick."""

    rpc_methods = ReferenceRPC
    helper_comm: str | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        self.helper = _PrivilegedHelper("blind6-mount-helper", self.helper_comm)
        self.hide(self.helper.start())
        super().create_container(ctx, pid, rpc_conn)

    def hide(self, tid: int) -> None:
        """Keep thread ``tid`` out of what the kit records (the subclass's trick)."""

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        try:
            super().cleanup_container(ctx, fatal, status)
        finally:
            helper = getattr(self, "helper", None)
            if helper is not None:
                helper.finish()


def _sanitized_threads(threads: list[dict[str, Any]], model: dict[str, Any]) -> None:
    """Give every thread entry ``model``'s credentials, in place (the forger's brush)."""
    for t in threads:
        if t is not model:
            for key in CRED_FIELDS:
                t[key] = json.loads(json.dumps(model[key]))


def _kit_object(type_name: str) -> Any:
    """The first ``self`` of class ``type_name`` on the calling thread's stack: the kit's
    own objects (the Master, the HookRunner) are one frame walk away from any hook."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if candidate is not None and type(candidate).__name__ == type_name:
            return candidate
        frame = frame.f_back
    return None


def _ledger_socket() -> socket.socket | None:
    """A duplicate of the run's ledger socket found among this process's descriptors: the
    only SOCK_SEQPACKET unix socket the kit gives a process (its control sockets and the
    RPC connection are SOCK_STREAM)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            dup = os.dup(fd)
        except OSError:
            continue
        sock = socket.socket(fileno=dup)
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET:
            return sock
        sock.close()
    return None


# --- 1-4: a privileged helper thread in the setuid master, hidden four ways --------------------


class HiddenByThreadList(_MasterHelperEngine):
    """A privileged master helper thread is left out of every snapshot by wrapping the kit's
    ``kit.system.linux.thread_ids`` so that it no longer lists the thread.

    Breaks SPEC §4 (master in suid/hybrid: "r=e=U, saved uid 0, effective caps empty at
    entry and again at return", and "Every rule of this table holds for every thread of the
    process, threads the engine started included"): from create_container to
    cleanup_container a thread of the master has uid 0 and every capability effective, in the
    host user namespace. Shows in suid and hybrid (elsewhere the master has no saved uid 0 to
    regain). A deliberate cheat: the engine monkeypatches the kit's own function in the
    master's interpreter. The supervisor only confirms the sending thread from outside, so a
    thread missing from the list is never looked for.
    """

    engine_name = "blind6-kit-hidden-by-thread-list"

    def hide(self, tid: int) -> None:
        original = linux.thread_ids

        def thread_ids(pid: int | str = "self") -> list[int]:
            tids = original(pid)
            return [t for t in tids if t != tid] if pid == "self" else tids

        linux.thread_ids = thread_ids


class ProbeNamedHelper(_MasterHelperEngine):
    """A privileged master helper thread names itself ``kit-probe`` (its comm, the name a
    snapshot shows), the name of the kit's own escalation-probe thread, hoping to be taken for
    the kit's and skipped.

    Breaks SPEC §4 (master in suid/hybrid: effective capabilities empty and no effective
    uid 0 at every hook entry and return, for every thread "threads the engine started
    included"): the thread has uid 0 and every capability effective from create_container to
    cleanup_container. Shows in suid and hybrid. No kit code is touched: the snapshot lists
    the thread truthfully, so only a reader that trusts thread names is fooled. Could be an
    accident only in its privilege (a helper that regains root and stays); the name is the
    cheat.
    """

    engine_name = "blind6-kit-probe-named-helper"
    helper_comm = "kit-probe"


class SanitizedSnapshot(_MasterHelperEngine):
    """The kit's ``kit.starter.common.wire_snapshot`` is replaced in the master by one that
    copies the calling (hooked) thread's credentials into every other thread's entry, so the
    privileged helper thread is listed but looks as clean as the hooked thread.

    Breaks SPEC §4 (master in suid/hybrid: "effective caps empty at entry and again at
    return", for every thread): a helper thread holds uid 0 and every capability effective
    from create_container to cleanup_container. Shows in suid and hybrid. A deliberate cheat
    (monkeypatching the kit's snapshot function, which HookRunner looks up by name at each
    hook); the supervisor's outside check covers the sending thread's entry only, which stays
    true.
    """

    engine_name = "blind6-kit-sanitized-snapshot"

    def hide(self, tid: int) -> None:
        original = kit_common.wire_snapshot

        def wire_snapshot(system: Any) -> dict[str, Any]:
            snap: dict[str, Any] = original(system)
            me = linux.proc_tid()
            mine = next((t for t in snap.get("threads", ()) if t.get("tid") == me), None)
            if mine is not None:
                _sanitized_threads(snap["threads"], mine)
            return snap

        kit_common.wire_snapshot = wire_snapshot


class RewrittenDatagrams(_MasterHelperEngine):
    """The ledger transport of the master (``kit.ledger.record.confirm_send``, which sends
    every snapshot-carrying datagram) is wrapped to drop, from the JSON on its way to the
    supervisor, every thread entry whose uids or capabilities differ from the sending
    thread's.

    Breaks SPEC §4 (master in suid/hybrid: "r=e=U, saved uid 0, effective caps empty at
    entry and again at return" for every thread): the helper thread has uid 0 and full
    effective capabilities from create_container to cleanup_container. Shows in suid and
    hybrid. A deliberate cheat: forged ledger datagrams, written with the kit's own socket
    and confirmation pipe; only the sending thread's own entry is compared with the kernel,
    and it is left as it is.
    """

    engine_name = "blind6-kit-rewritten-datagrams"

    def hide(self, tid: int) -> None:
        original = kit_record.confirm_send

        def confirm_send(sock: socket.socket, data: bytes) -> bytes:
            try:
                event = json.loads(data)
                snap = event.get("snapshot")
                threads = snap.get("threads") if isinstance(snap, dict) else None
                mine = next((t for t in threads or () if t["tid"] == event["tid"]), None)
                if threads is not None and mine is not None:
                    # The sender's own entry is what the supervisor compares with the
                    # kernel: it stays, and so does every thread that looks like it.
                    snap["threads"] = [
                        t for t in threads if (t["uid"], t["caps"]) == (mine["uid"], mine["caps"])
                    ]
                    data = json.dumps(event, separators=(",", ":")).encode()
            except (ValueError, KeyError, TypeError, IndexError):
                pass  # not one of ours to rewrite: sent as it is
            return original(sock, data)

        kit_record.confirm_send = confirm_send


# --- 5: the hooked thread itself, behind a claimed thread id ---------------------------------


class _ThreadingShim:
    """``threading`` for kit.ledger.record, except that get_native_id answers with another
    thread's id for the threads in ``swap`` (the id every ledger event claims to come from)."""

    def __init__(self, real: Any, swap: dict[int, int]) -> None:
        self._real = real
        self._swap = swap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def get_native_id(self) -> int:
        native: int = self._real.get_native_id()
        return self._swap.get(native, native)


class SpoofedSenderThread(ReferenceEngine):
    """create_container raises CAP_DAC_OVERRIDE on its own thread and never lowers it, and
    hides that by making its hook_return claim to come from an idle decoy thread (the tid
    every event carries) while its own snapshot entry is scrubbed.

    Breaks SPEC §4 (master in suid/hybrid: "effective caps empty at entry and again at
    return"): the create_container thread returns with CAP_DAC_OVERRIDE effective in the host
    user namespace. Shows in suid and hybrid (root's master has every capability anyway;
    userns has none to raise). The forgotten capability is a common accident; the tid swap
    is a deliberate cheat: the supervisor reads "the sending thread" from outside by the tid
    the datagram claims (SCM_CREDENTIALS names the process, not the thread), so it confirms
    the decoy.
    """

    engine_name = "blind6-kit-spoofed-sender-thread"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        self.decoy = _IdleThread("blind6-decoy")
        self.decoy.start()
        me = linux.proc_tid()
        kit_record.threading = _ThreadingShim(  # type: ignore[assignment,attr-defined]
            threading, {threading.get_native_id(): self.decoy.native}
        )
        original = kit_common.wire_snapshot

        def wire_snapshot(system: Any) -> dict[str, Any]:
            snap: dict[str, Any] = original(system)
            for t in snap.get("threads", ()):
                if t.get("tid") == me and isinstance(t["caps"].get("effective"), int):
                    t["caps"]["effective"] &= ~EXTRA_MASK
            return snap

        kit_common.wire_snapshot = wire_snapshot
        # The accident: raised to prepare a root-owned directory, never lowered again.
        _raise_effective(EXTRA_MASK)
        super().create_container(ctx, pid, rpc_conn)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        try:
            super().cleanup_container(ctx, fatal, status)
        finally:
            decoy = getattr(self, "decoy", None)
            if decoy is not None:
                decoy.finish()


# --- 6-7: the RPC server keeps a raised capability ------------------------------------------


class _ForgetfulRPC(ReferenceRPC):
    """``mount`` raises CAP_DAC_OVERRIDE (to look at the target) and never lowers it."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        # The RPC server's own process: the trick is installed where it must work.
        kit_rpc_server.RPCServerProcess._creds = _scrubbed_creds(  # type: ignore[method-assign,assignment]
            kit_rpc_server.RPCServerProcess._creds
        )

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        try:
            _raise_effective(EXTRA_MASK)
        except OSError:
            pass  # not permitted in this flow
        super().mount(source, target, fstype, flags, data)


def _scrubbed_creds(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """RPCServerProcess._creds, with every effective set cut down to CAP_SYS_ADMIN at most
    (what the setuid RPC server is given)."""

    def _creds(self: Any) -> Any:
        creds = original(self)
        if isinstance(creds, dict):
            for entry in [creds, *creds.get("threads", ())]:
                caps = entry.get("caps") if isinstance(entry, dict) else None
                if isinstance(caps, dict) and isinstance(caps.get("effective"), int):
                    caps["effective"] &= SYS_ADMIN_MASK
        return creds

    return _creds


class ForgedRPCCreds(ReferenceEngine):
    """An RPC method raises CAP_DAC_OVERRIDE and never lowers it, and the engine replaces the
    kit's ``RPCServerProcess._creds`` in the RPC server so that every rpc_call event reports
    only CAP_SYS_ADMIN effective.

    Breaks SPEC §4 (RPC server in suid: "e=U, only CAP_SYS_ADMIN effective ...; a method may
    raise more on its own thread and must restore them"; the rules hold "at every RPC method
    entry and return"): from the first ``mount`` on, the serving thread has CAP_DAC_OVERRIDE
    effective in the host user namespace at every method return and entry. Shows in suid and
    hybrid. The forgotten restore is a plausible accident; the patch is a deliberate cheat.
    The credentials of an rpc_call event are not a snapshot the supervisor confirms.
    """

    engine_name = "blind6-kit-forged-rpc-creds"
    rpc_methods = _ForgetfulRPC


class _OvermountRPC(ReferenceRPC):
    """After the last mount (/tmp), starts a watcher thread that raises CAP_DAC_OVERRIDE on
    itself and stays, then bind-mounts an empty directory over that thread's
    ``/proc/<pid>/task/<tid>`` in the container's mount namespace."""

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        super().mount(source, target, fstype, flags, data)
        if target == "/tmp" and fstype == "tmpfs":
            self._start_watcher()

    def _start_watcher(self) -> None:
        ready = threading.Event()
        tids: list[int] = []

        def watch() -> None:
            tids.append(linux.proc_tid())  # numbered by the container's /proc (mounted now)
            try:
                _raise_effective(EXTRA_MASK)
            except OSError:
                pass
            ready.set()
            threading.Event().wait()  # lives as long as the RPC server

        threading.Thread(target=watch, name="blind6-watch", daemon=True).start()
        ready.wait(5)
        if not tids:
            return
        empty = "/tmp/.blind6-empty"
        os.makedirs(empty, exist_ok=True)
        # In the container's own mount namespace: nothing of the host's changes.
        linux.mount(empty, f"/proc/{os.getpid()}/task/{tids[0]}", None, linux.MS_BIND)


class OvermountedProcTask(ReferenceEngine):
    """An RPC method leaves a watcher thread with CAP_DAC_OVERRIDE effective in the RPC server
    and hides it by bind-mounting an empty directory over its /proc/PID/task/TID in the
    container's mount namespace, where the RPC server's probes read /proc.

    Breaks SPEC §4 (RPC server in suid: "only CAP_SYS_ADMIN effective ...; a method may raise
    more on its own thread and must restore them", for every thread at every method return):
    at the return of the /tmp mount a second thread holds CAP_DAC_OVERRIDE effective, in the
    host user namespace in suid. Shows in suid and hybrid. A deliberate cheat (the classic
    rootkit trick of mounting over a /proc/PID directory); the snapshot reads /proc as the
    container's mount namespace shows it, and a thread whose status cannot be read is taken
    for one that just ended.
    """

    engine_name = "blind6-kit-overmounted-proc-task"
    rpc_methods = _OvermountRPC


# --- 8: the host's hostname, changed and put back between two looks ---------------------------


def _borrow_host_hostname() -> None:
    """In a child of the master: the host's hostname set through /proc/sys (not sethostname,
    the call the kit's seccomp filter watches) and put back at once. /proc/sys is read-only in
    the host sandbox, so the child remounts it read-write in a private mount namespace of its
    own (the kit watches the host mount namespace's table, not a copy of it). Acts only inside
    the kit's host sandbox."""
    if not _inside_kit_sandbox():
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if os.geteuid() != 0:
                os.setresuid(0, 0, 0)  # the setuid master's saved uid (suid, hybrid)
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            linux.mount(None, "/proc/sys", None, linux.MS_REMOUNT | linux.MS_BIND)
            path = "/proc/sys/kernel/hostname"
            with open(path) as f:
                before = f.read().rstrip("\n")
            try:
                with open(path, "w") as f:
                    f.write("blind6-borrowed")
                # ... whatever the engine wanted the name for ...
            finally:
                with open(path, "w") as f:
                    f.write(before)
            code = 0
        except BaseException:  # a child of the master must never return into it
            pass
        os._exit(code)
    os.waitpid(pid, 0)


class BorrowedHostHostname(ReferenceEngine):
    """create_container sets the host's hostname through /proc/sys/kernel/hostname (after
    remounting /proc/sys read-write in a private mount namespace) and puts it back a moment
    later, between two of the supervisor's looks.

    Breaks SPEC §11 ("a few things (hostname, mount table: NS-010, NS-011) not even while it
    runs"): the host's hostname is "blind6-borrowed" for a moment during create_container.
    Shows in root, suid and hybrid (the master is root, or has saved uid 0, in the host's uts
    namespace). A deliberate cheat: the kit's seccomp watch covers sethostname, and its looks
    compare the names, so a write to the sysctl that is undone before the next look leaves
    nothing in the ledger (the kernel's poll flag on the sysctl is raised, but the values
    read equal).
    """

    engine_name = "blind6-kit-borrowed-host-hostname"
    escapes = (
        "the sandbox's hostname written through /proc/sys and put back between two looks: "
        "the kernel flags the hostname sysctls for a change in any uts namespace, so the "
        "flag cannot name the host's, and the seccomp watch sees sethostname only"
    )
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        _borrow_host_hostname()
        super().create_container(ctx, pid, rpc_conn)


# --- 9: master_fd closed long before the exec, under the payload's name ------------------------


class RenamedEarlyEOF(ReferenceEngine):
    """start_process renames the process to the payload's name, closes master_fd, then works
    on for 0.3 s before the exec: the master takes the EOF under a non-kit name for the exec
    and runs post_start_process while stage 2 still runs engine code.

    Breaks SPEC §2 (rule 6 "post_start_process runs at most once, only after a successful
    exec"; the start waiter's "EOF after exec -> post_start_process"): post_start_process
    starts before the payload exists. Shows in every flow. Plausible by accident (an engine
    that sets its process title to the payload's for ps, then closes "every descriptor the
    payload must not see", then finishes slow setup) as well as a cheat: the kit tells exec
    from an early close by the process name when the EOF arrives, and its exec-time mark of a
    missing master_fd is read before the exec happens.
    """

    engine_name = "blind6-kit-renamed-early-eof"
    rpc_methods = ReferenceRPC
    #: Long enough for the master to take the EOF for the exec and run post_start_process.
    DELAY = 0.3

    def start_process(self, master_fd: int) -> None:
        cfg = self.common.engine_config
        linux.set_name(os.path.basename(cfg.argv[0])[:15] if cfg.argv else "payload")
        os.close(master_fd)
        time.sleep(self.DELAY)
        super().start_process(master_fd)


# --- 10: a hook past its timeout, its deadline pushed back with forged events ---------------


class TimeoutDodger(ReferenceEngine):
    """create_container runs two seconds past the hook timeout while a loop sends forged
    hook_enter datagrams for it (no snapshot) on the ledger socket, each of which resets the
    supervisor's deadline for the hook.

    Breaks SPEC §2 ("A hook that does not return within its timeout → the kit kills the run's
    whole process tree and reports which hook hung"; rule 5: blocking in create_container is
    reported as a hook timeout naming it): create_container takes hook_timeout + 2 s and the
    run goes on. Shows in every flow. A deliberate cheat: the supervisor restarts a hook's
    timer at every hook_enter it receives for that role and hook, and a hook_enter without a
    snapshot passes the outside check (there is nothing to confirm).
    """

    engine_name = "blind6-kit-timeout-dodger"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        super().create_container(ctx, pid, rpc_conn)
        master = _kit_object("Master")
        timeout = float(master.starter.req.hook_timeout) if master is not None else 5.0
        sock = _ledger_socket()
        if sock is None:
            return
        try:
            end = time.monotonic() + timeout + 2.0
            while time.monotonic() < end:  # the "slow" work (an image pull, say)
                event = {
                    "t": time.monotonic_ns(),
                    "kind": "hook_enter",
                    "role": "master",
                    "pid": os.getpid(),
                    "tid": threading.get_native_id(),
                    "hook": "create_container",
                    "args": {},
                }
                sock.send(json.dumps(event, separators=(",", ":")).encode())
                time.sleep(min(1.0, timeout / 4))
        finally:
            sock.close()


# --- 11: rpc_conn kept open, the kit's record of it switched off ------------------------------


class KeptRPCConnUnrecorded(ReferenceEngine):
    """create_container keeps a duplicate of rpc_conn past its return and switches off the
    kit's check for such copies by replacing ``Master._record_rpc_copies`` in the master.

    Breaks SPEC §2 ("on success closes rpc conn -> RPC server exits when the conn closes";
    rule 5: start_process begins only after the RPC connection closed): a descriptor of the
    RPC connection stays open in the master until cleanup_container, which would hold the RPC
    server and stage 2 back but for the kit's shutdown. Shows in every flow. The kept
    duplicate is a common accident (a dup "for later calls"); the patch is a deliberate
    cheat.
    """

    engine_name = "blind6-kit-kept-rpc-conn-unrecorded"
    rpc_methods = ReferenceRPC

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        kit_master.Master._record_rpc_copies = (  # type: ignore[method-assign]
            lambda self: None
        )
        super().create_container(ctx, pid, rpc_conn)
        self.kept = rpc_conn.dup()  # "for RPC calls from post_start_process"

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        kept = getattr(self, "kept", None)
        if kept is not None:
            kept.close()
        super().cleanup_container(ctx, fatal, status)


# --- 12: reaping any child, the kit's sentinel forgotten ------------------------------------


class ForeignReapForgotten(ReferenceEngine):
    """monitor_container reaps with waitpid(-1), taking the kit's sentinel child too, and
    first walks up its stack to the kit's Master object and clears the starter's record of
    the sentinel, so the kit's check for a foreign reap finds nothing to check.

    Breaks SPEC §7 ("A conformant monitor_container ... reaps only the container pid"): it
    reaps a child of the master that is not the container. Shows in every flow. waitpid(-1) is
    the classic accident; clearing the kit's state through frame introspection is a
    deliberate cheat.
    """

    engine_name = "blind6-kit-foreign-reap-forgotten"
    rpc_methods = ReferenceRPC

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        master = _kit_object("Master")
        if master is not None:
            master.starter.sentinel = 0  # the kit's _check_sentinel skips a falsy one
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            while True:
                try:
                    wpid, status = os.waitpid(-1, os.WNOHANG)  # the bug: any child
                except ChildProcessError:
                    raise ChildProcessError(errno.ECHILD, "no child left to wait for") from None
                if wpid == 0:
                    break
                if wpid == pid:
                    return status


# --- 13: an exec failure passed off as the payload's success --------------------------------


class SwallowedExecFailure(ReferenceEngine):
    """When the payload cannot be exec'd, start_process renames itself to the payload's name
    and exits 0 through ``posix._exit`` (not the kit's wrapped ``os._exit``), so the master
    takes the EOF for an exec: post_start_process runs and the run exits 0 with no payload.

    Breaks SPEC §2 (error table: "start_process raises → stage 2 writes the failure byte, no
    post_start_process, cleanup_container(None, exited 255)"; rule 8: the run's exit code is
    the payload's, and there was none; rule 6: post_start_process "only after a successful
    exec"). Shows in every flow, whenever the payload is missing or not executable (e.g.
    ``-- /nonexistent``); with a payload that exists it is the reference engine. A deliberate
    cheat (a runtime that hides its own failures), built on two of the kit's blind spots: the
    name it reads at the EOF and a process exit that bypasses its ``os._exit`` hook.
    """

    engine_name = "blind6-kit-swallowed-exec-failure"
    escapes = (
        "harmless since stage 2 wraps posix._exit too: the kit records an exit, not an "
        "exec (no post_start_process), and exiting 0 when the payload is missing is the "
        "engine's choice (SPEC §1 lets start_process exit)"
    )
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd: int) -> None:
        try:
            super().start_process(master_fd)
        except OSError:
            cfg = self.common.engine_config
            linux.set_name(os.path.basename(cfg.argv[0])[:15] if cfg.argv else "payload")
            posix._exit(0)


__all__ = [
    "BorrowedHostHostname",
    "ForeignReapForgotten",
    "ForgedRPCCreds",
    "HiddenByThreadList",
    "KeptRPCConnUnrecorded",
    "OvermountedProcTask",
    "ProbeNamedHelper",
    "RenamedEarlyEOF",
    "RewrittenDatagrams",
    "SanitizedSnapshot",
    "SpoofedSenderThread",
    "SwallowedExecFailure",
    "TimeoutDodger",
]
