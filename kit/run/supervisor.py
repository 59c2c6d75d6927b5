"""The supervisor: the lean, single-threaded process that owns one run."""

from __future__ import annotations

import array
import contextlib
import dataclasses
import json
import mmap
import os
import select
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

import kit.rpc.server  # noqa: F401  (imported while privileged, for the RPC server)
from kit import preflight, registry
from kit.ledger import probe
from kit.ledger.record import (
    CONFIRMED,
    EXCERPT,
    MAX_EVENT,
    RETRY,
    SCHEMA_VERSION,
    SNAPSHOT_ATTEMPTS,
    LedgerWriter,
    check_event,
    ledger_socketpair,
    parse_datagram,
)
from kit.ledger.senders import PROCESS_ROLES, Senders, check_snapshot
from kit.run import hostdiff, rundir, seccomp
from kit.run import sandbox as host_sandbox
from kit.run.master_watch import MasterWatch
from kit.run.request import RunRequest
from kit.starter.common import (
    EXIT_FATAL,
    EXIT_LEDGER_LOST,
    UNTIMED_HOOKS,
    default_signals,
    rpc_conn_kept,
)
from kit.starter.stage1 import Starter
from kit.system import current, linux

NETNS_DIR = "/run/netns"
#: Datagrams read in one go: then the timeouts get their turn, even under a flood.
READ_BATCH = 256
#: Events a run may record, and engine faults: beyond, datagrams are only counted.
MAX_EVENTS = 100_000
#: Datagrams read at most once a deadline has passed, before it is acted on: more than the
#: ledger socket holds of the smallest events (10,923 measured), so everything that arrived
#: in time is read, and a run that floods delays its timeout by that many reads at most.
DEADLINE_DRAIN = 16_384
MAX_FAULTS = 100
#: struct ucred (pid, uid, gid), and the control buffer of one datagram: its sender's
#: credentials and up to linux.MAX_PASSED_FDS descriptors (more are cut: MSG_CTRUNC).
_UCRED = struct.Struct("iII")
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(linux.MAX_PASSED_FDS * 4)
# Plain ints: the socket module's flags are an enum.Flag, whose | and & run in Python.
_RECV_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
_CUT = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)


def _mount_points(pid: int | str = "self") -> set[tuple[str, str]]:
    """(mount id, mount point) of the host mount namespace (``pid``'s: the sandbox's)."""
    points = set()
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            points.add((fields[0], fields[4]))
    return points


def _netns(root: str = "") -> set[str]:
    try:
        return set(os.listdir(root + NETNS_DIR))
    except OSError:
        return set()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _configure_probes(req: RunRequest, run_dir: str) -> None:
    """The run's host user namespace and setuid-root binary, for the escalation probes of
    every process forked from here. The fake backend's binary exists in the model only,
    provided as the real kit would: by a launcher that is root (in the model)."""
    if req.backend == "real":
        binary = probe.provide_setuid_binary(run_dir)
    else:
        # The fake backend is imported only for fake runs: real runs fork from a leaner
        # process (fork cost grows with the forking process's memory).
        from kit.system.fake import ROOT_FLOWS  # noqa: PLC0415  (lazy: fake runs only)

        root = os.geteuid() == 0 or req.flow in ROOT_FLOWS
        binary = probe.SetuidBinary(
            os.path.join(run_dir, probe.SETUID_DIR, "id"),
            unavailable="" if root else "launched-without-root",
        )
    probe.configure(req.host_userns, binary)


class Supervisor:
    """One run's supervisor.

    It imports everything of the kit the run needs before forking the starter, and never the
    engine (the starter does, before any privilege change, so no process of the run imports
    after one). It is a child subreaper: every process of
    the run that loses its parent comes back to it, so nothing escapes. It collects the ledger,
    enforces the per-hook timeout (a hung hook gets the run's whole process tree killed and the
    ledger names the hook), and checks that nothing was left behind: processes, mounts in the host
    mount namespace, named network namespaces, files in the run's temporary directory.
    """

    def __init__(self, request: RunRequest) -> None:
        self.req = request
        self.events: list[dict[str, Any]] = []
        self._datagrams: list[bytes | None] = []  # per event: its JSON as it arrived
        self.open_hooks: dict[tuple[str, str], tuple[float, int]] = {}
        #: Each timed hook's deadline from its first entry: a hook runs once in its process,
        #: so an entry after its return (a forged pair) reopens it with that deadline.
        self._first_deadlines: dict[tuple[str, str], tuple[float, int]] = {}
        #: The untimed hooks open now (monitor_container), with their process's pid: what
        #: the run timer names when no timed hook is open.
        self.untimed_open: dict[tuple[str, str], int] = {}
        self.leaks: list[dict[str, Any]] = []
        self.timed_out: dict[str, Any] | None = None
        self.me = LedgerWriter(None, "supervisor")
        self.faults = 0
        # (kernel pid, tid) -> snapshots in a row that disagreed with our own read
        self._mismatches: dict[tuple[int, Any], int] = {}
        self.dropped = 0  # datagrams beyond MAX_EVENTS or MAX_FAULTS
        self.senders = Senders(self._modelled_pids, number=self.run_pid)
        # The fake backend's snapshots are its model's, not the kernel's to confirm.
        self.outside_check = request.backend == "real" and request.probes
        self.master_watch = MasterWatch()
        self.sandbox: host_sandbox.HostSandbox | None = None
        self.host: Any = None  # the sandbox's kit.run.hostdiff.HostWatch
        self.listener: int | None = None  # the run's seccomp filter's (kit.run.seccomp)
        self.refusals = 0  # calls it refused; the first seccomp.MAX_RECORDED are recorded
        # The real backend's filter lets the watched calls run (kit.run.seccomp.HOST_WATCH):
        # those reaching the host sandbox (known by its init's namespaces) go to its diff.
        self.watching = False
        self.host_identity: seccomp.HostIdentity | None = None
        self.watched = 0  # watched calls that reached the host; the first MAX_RECORDED kept
        self._level: int | None = None  # see run_pid
        self._buffer: mmap.mmap | None = None  # see _receive
        self._tasks: dict[tuple[int, int], int] = {}  # see kit.ledger.senders.find_thread
        # Refusals answered in the middle of reading an event (the fake model's lock, see
        # _answer_while_the_model_is_locked), with the time before their notification was
        # read: attributed once the events queued before it are read.
        self._unattributed: list[tuple[dict[str, Any], int]] = []

    # -- ledger ------------------------------------------------------------------------------
    def record(self, event: dict[str, Any], datagram: bytes | None = None) -> None:
        """Number ``event`` and act on it. ``datagram`` is the JSON it was decoded from, if
        any: the result then reuses it instead of encoding the event again."""
        if datagram is not None and (
            "seq" in event or not datagram.startswith(b"{") or not datagram.endswith(b"}")
        ):
            datagram = None  # not spliceable: encoded again (with seq where it was)
        event["seq"] = len(self.events)
        self.events.append(event)
        self._datagrams.append(datagram)
        kind = event["kind"]
        role = event.get("role", "?")
        if kind == "hook_enter" and isinstance(event.get("hook"), str):
            if event["hook"] in UNTIMED_HOOKS:
                self.untimed_open[(role, event["hook"])] = event.get("pid", 0)
            else:
                # A hook entered again (engine code calling it, or datagrams it forged: an
                # entry, or a return and an entry) keeps its first deadline: a timer each
                # entry restarted would never end.
                key = (role, event["hook"])
                self.open_hooks[key] = self._first_deadlines.setdefault(
                    key, (time.monotonic() + self.req.hook_timeout, event.get("pid", 0))
                )
        elif kind in ("hook_return", "hook_raise"):
            self.open_hooks.pop((role, event.get("hook", "")), None)
            self.untimed_open.pop((role, event.get("hook", "")), None)
        elif kind in ("stage2_exec", "stage2_failed"):
            self.open_hooks.pop(("stage2", "start_process"), None)
        if self.host is not None:
            self.host.note(event)

    def emit(self, kind: str, **fields: Any) -> None:
        self.record(self.me.emit(kind, **fields))

    # -- the run -----------------------------------------------------------------------------
    def run(
        self,
        result_fd: int,
        ahead: Ahead | None = None,
        prepared: Any = None,
        inherited: set[int] | None = None,
    ) -> dict[str, Any]:
        """The run; ``ahead``: its directory and sandbox, made by the zygote
        (:func:`prepare_ahead`), else made here; ``prepared``: what :func:`prepare_backend`
        returned for it; ``inherited``: the descriptors the run may inherit, when the caller
        placed them (else every one open now but the result pipe and ``ahead``'s)."""
        req = self.req
        # What the run may inherit from here: stdio and the launcher's pass-through fds (not
        # the result pipe, nor anything the supervisor opens for itself from now on).
        if inherited is not None:
            self.inherited = set(inherited)
        else:
            self.inherited = host_sandbox.open_fds() - {result_fd}
            if ahead is not None:
                self.inherited -= ahead.fds() | set(ahead.files())
        linux.set_child_subreaper()
        run_dir, lock_fd = rundir.create() if ahead is None else (ahead.run_dir, ahead.lock_fd)
        self.run_dir = run_dir
        self.run_dir_removed = False
        # The launcher's death (then the zygote's) reaches us as SIGTERM: the run goes, and
        # so does its directory, which nobody else may remove while its lock is held.
        signal.signal(signal.SIGTERM, self._parent_gone)
        user = req.user()
        if os.getuid() == 0:
            os.chown(run_dir, user.uid, user.gid)
        os.chmod(run_dir, 0o755)
        if req.sandbox:
            try:
                if ahead is None:
                    building = host_sandbox.build([run_dir, *_coverage_dirs(), *req.shared_dirs])
                elif ahead.building is None:
                    raise host_sandbox.SandboxError(
                        f"the host sandbox could not be built ahead: {ahead.error}"
                    )
                else:
                    building = ahead.building
                self.sandbox = host_sandbox.adopt(building)
                if req.join_namespaces:
                    host_sandbox.provide_joins(self.sandbox, req.join_namespaces)
            except BaseException:
                if self.sandbox is not None:
                    host_sandbox.end(self.sandbox)
                rundir.remove(run_dir, lock_fd)
                raise
        try:
            # The state read ahead holds unless the supervisor changed the sandbox since.
            watch = ahead.watch if ahead is not None else None
            if watch is not None and req.join_namespaces:
                watch.close()  # the supervisor changed the sandbox since it was read
                watch = None
            # The fake model's store lives in the run directory, which the host sandbox
            # shares with the run (a store elsewhere would be the sandbox's copy).
            with _backend(req, prepared, run_dir):
                return self._run(result_fd, run_dir, lock_fd, watch)
        except BaseException:
            # A failure of the kit's own (the run's result says which): what the run
            # started and its directory go with it, as at the end of a run.
            self.kill_tree()
            if not self.run_dir_removed:
                rundir.remove(run_dir, lock_fd)
            raise
        finally:
            if self.sandbox is not None:
                host_sandbox.end(self.sandbox)

    def _run(
        self,
        result_fd: int,
        run_dir: str,
        lock_fd: int,
        ahead: hostdiff.ReadAhead | None = None,
    ) -> dict[str, Any]:
        req, user, box = self.req, self.req.user(), self.sandbox
        host = "self" if box is None else box.init_pid
        host_root = "" if box is None else f"/proc/{box.init_pid}/root"
        mounts_before = _mount_points(host)
        netns_before = _netns(host_root)
        os.environ["TMPDIR"] = run_dir
        tempfile.tempdir = run_dir

        if req.probes:
            _configure_probes(req, run_dir)
        reader, writer = ledger_socketpair()
        filter_here, filter_there = socket.socketpair()
        self.emit(
            "run_start",
            engine=req.engine,
            flow=req.flow,
            backend=req.backend,
            invoker={"uid": user.uid, "gid": user.gid, "name": user.name},
            probes=req.probes,
            hook_timeout=req.hook_timeout,
            run_dir=run_dir,
            host_userns=req.host_userns,
            # The host mounts the sandbox does not reproduce: the engine finds an empty
            # read-only directory there, which its author must be able to tell.
            **({} if box is None else {"sandbox_left_out": list(box.left_out)}),
        )
        sys.stdout.flush()
        self.watch_host(ahead)
        # The starter checks its parent against this pid (read after the fork, it could be
        # a reaper's); in the sandbox's pid namespace it cannot see it and reads its own.
        me = os.getpid() if box is None else None
        if req.backend == "fake" and os.geteuid() == 0 and box is None:
            # Unsandboxed on request (KIT_SANDBOX=0, sandbox=False): SPEC §9, the fake
            # backend never changes the real host. Its filter refuses the privileged calls;
            # what a filter cannot judge (a hostname written through /proc/sys, an interface
            # set by netlink, SysV IPC) lands in namespaces of the run's own, gone with it.
            # (Files, other sysctls and signals reach the host: only the sandbox stops them.)
            linux.unshare(linux.ns_flags(["uts", "ipc", "net"]))
        pid = os.fork()
        if pid == 0:
            # The starter's branch never returns into the supervisor's code (whose cleanup
            # would end the run and remove its directory from inside it).
            try:
                reader.close()
                os.close(lock_fd)  # the supervisor's alone: its death frees the directory
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                filter_here.close()
                if box is not None:
                    _enter_sandbox(
                        box, writer, self.inherited | {writer.fileno(), filter_there.fileno()}
                    )
                Starter(req, writer, filter_there, parent=me, inherited=self.inherited).main()
            except BaseException:  # noqa: BLE001 a kit bug before the starter could report it
                traceback.print_exc()
            finally:
                os._exit(EXIT_FATAL)
        writer.close()
        filter_there.close()
        self.senders.add_starter(pid)
        if self.host is not None:
            self.host.start()
        seen = (
            ""
            if box is None
            else " "
            + json.dumps(
                {
                    "sandbox_pid": box.init_pid,
                    "sandbox_mounts": sorted(mounts_before),
                    "sandbox_left_out": box.left_out,
                }
            )
        )
        os.write(result_fd, f"started {pid} {run_dir}{seen}\n".encode())
        self.listener, info = seccomp.receive_listener(filter_here, req.run_timeout)
        self.watching = info.get("filter") == "host-global"
        if self.watching and box is not None:
            self.host_identity = seccomp.HostIdentity.of(box.init_pid)
        filter_here.close()
        current().while_model_locked(self._answer_while_the_model_is_locked)
        self.emit(
            "seccomp_filter",
            **{k: info[k] for k in ("filter", "syscalls", "error", "reason") if k in info},
        )
        status = self.collect(reader, pid)
        self._attribute_answered()  # a read cut short (the run's end or a timeout)
        self._drain_notifications()
        current().while_model_locked(None)
        reader.close()
        seccomp.resolve_rpc_methods(self.events)
        code, reason = self.exit_code(status)
        if self.dropped:
            self.emit(
                "engine_fault",
                fault="flood",
                sender_pid=None,
                sender_role=None,
                open_hooks=[],
                detail=f"{self.dropped} more datagrams were not recorded "
                f"(a run records at most {MAX_EVENTS} events and {MAX_FAULTS} faults)",
                excerpt="",
            )

        # Leaks: every check runs after every run, whatever happened. Processes the kit
        # itself is already killing (parent-death signals) get a short grace period.
        leftovers = self._living_descendants(grace=0.25)
        self.host_diff()
        for p, argv in leftovers.items():
            where = "" if box is None else " in the sandbox"
            self.leak("process", f"pid {p}{where}: {argv}")
        if leftovers:
            self.kill_tree()
        for mount_id, point in sorted(_mount_points(host) - mounts_before):
            self.leak("mount", f"{point} (mount id {mount_id}) in the host mount namespace")
        for name in sorted(_netns(host_root) - netns_before):
            self.leak("netns", f"{NETNS_DIR}/{name}")
        probe.remove_setuid_binary(run_dir)
        left = rundir.leftovers(run_dir, current().own_files())
        if left:
            self.leak("tempdir", f"left in the run's temporary directory: {', '.join(left)}")
        for limit in current().model_limits():
            self.emit("model_limit", reason=limit)
        rundir.remove(run_dir, lock_fd)
        self.run_dir_removed = True
        if self.listener is not None:
            os.close(self.listener)  # a call still filtered now fails with ENOSYS
            self.listener = None
        if self.refusals > seccomp.MAX_RECORDED:
            self.emit("syscalls_unrecorded", count=self.refusals - seccomp.MAX_RECORDED)
        self.emit("exit", code=code, reason=reason)
        return {
            "exit_code": code,
            "reason": reason,
            "leaks": self.leaks,
            "timed_out": self.timed_out,
            "ledger": {
                "schema_version": SCHEMA_VERSION,
                "run": req.to_json(),
                "events": self.events,
            },
        }

    def _parent_gone(self, _signum: int, _frame: Any) -> None:
        """SIGTERM, our parent-death signal: nobody will read the result. Kill the run and
        remove its directory."""
        self.kill_tree()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        os._exit(EXIT_FATAL)

    def encode(self, result: dict[str, Any]) -> bytes:
        """``result`` (from :meth:`run`) as JSON. Each event that arrived as a datagram is
        that datagram with ``"seq"`` appended, which decodes to the event itself: a ledger
        of probe snapshots is not encoded a second time."""
        ledger = result.get("ledger")
        if not isinstance(ledger, dict) or ledger.get("events") is not self.events:
            return json.dumps(result).encode()
        head = {k: v for k, v in result.items() if k != "ledger"}
        rest = {k: v for k, v in ledger.items() if k != "events"}
        if not head or not rest or list(result)[-1] != "ledger" or list(ledger)[-1] != "events":
            return json.dumps(result).encode()  # the layout below would reorder keys
        parts = [
            json.dumps(head)[:-1].encode(),
            b', "ledger": ',
            json.dumps(rest)[:-1].encode(),
            b', "events": [',
        ]
        for i, (event, datagram) in enumerate(zip(self.events, self._datagrams, strict=True)):
            if i:
                parts.append(b", ")
            if datagram is None:
                parts.append(json.dumps(event).encode())
            else:
                parts += (datagram[:-1], b',"seq":%d}' % event["seq"])
        parts.append(b"]}}")
        return b"".join(parts)

    def _run_alive(self) -> bool:
        """Whether a process of the run other than the sandbox's init is left."""
        if self.sandbox is None:
            return self._has_children()
        return bool(host_sandbox.processes(self.sandbox))

    def _run_processes(self) -> list[int]:
        """Host pids of the run's processes: our descendants and, in the sandbox, its init's
        (orphans go to init, which may be the zygote's child), init itself spared."""
        if self.sandbox is None:
            return linux.descendants(os.getpid())
        init = self.sandbox.init_pid
        found = set(linux.descendants(os.getpid()))
        below = linux.descendants(init)
        # Checked after the scan: alive then, init was the parent it found. Once init is
        # killed and reaped, its pid may name another process, whose children are not ours.
        if not self.sandbox.init_exited():
            found.update(below)
        return sorted(found - {init})

    @staticmethod
    def _has_children() -> bool:
        """Whether any child (living or zombie) is left. We are a subreaper: every living
        descendant is a child of ours or below one, so no child means no descendant."""
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return True

    def _living_descendants(self, grace: float) -> dict[int, str]:
        """pid -> command line of each process of the run still alive (in the sandbox: as
        the sandbox numbers them)."""
        deadline = time.monotonic() + grace
        while True:
            reap_exited_children()
            if self.sandbox is not None:
                alive = host_sandbox.processes(self.sandbox)
            elif not self._has_children():
                alive = {}
            else:
                alive = {
                    p: _cmdline(p) for p in linux.descendants(os.getpid()) if linux.process_alive(p)
                }
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.005)

    def watch_host(self, ahead: hostdiff.ReadAhead | None = None) -> None:
        """Before the starter is forked: the host diff of the run's sandbox begins (SPEC §11;
        without a sandbox the host is not diffed), from ``ahead`` when the zygote read it."""
        if self.sandbox is not None:
            self.host = hostdiff.HostWatch(self.sandbox, ahead)
        elif ahead is not None:
            ahead.close()

    def host_diff(self) -> None:
        """After the run, before the sandbox is torn down: every change of its host, and the
        hooks open when a watched one appeared, as the ledger's ``host_changes`` event."""
        if self.host is not None:
            start = time.perf_counter()
            fields = self.host.finish()
            self.emit(
                "host_changes", **fields, cost_ms=round((time.perf_counter() - start) * 1000, 3)
            )
            self._files_under_modelled_mounts(fields.get("changes") or [])
            self.host.close()
            self.host = None

    def _files_under_modelled_mounts(self, changes: list[dict[str, Any]]) -> None:
        """A file written under a mount the fake backend only modelled (a container's tmpfs
        on /tmp) lands on the sandbox's file system, where the host diff sees it, and where a
        file the engine wrote on the host would be too: the run is beyond the model (SPEC
        §9: not-configured, never failed), said by a ``model_limit``."""
        modelled = current().modelled_mounts()
        if not modelled:
            return
        under = sorted(
            {
                str(c["name"])
                for c in changes
                if c.get("kind") == "file"
                and any(str(c["name"]).startswith(t.rstrip("/") + "/") for t in modelled)
            }
        )
        if under:
            self.emit(
                "model_limit",
                reason=f"files written under a mount only the model made ({', '.join(under[:5])}"
                f"{', …' if len(under) > 5 else ''}): they land on the sandbox's file system, "
                "where the host diff cannot tell them from the engine's writes to the host",
            )

    def leak(self, what: str, detail: str) -> None:
        self.leaks.append({"what": what, "detail": detail})
        self.emit("leak", what=what, detail=detail)

    def exit_code(self, status: int | None) -> tuple[int, str]:
        if self.timed_out is not None and not self.timed_out["hook"]:
            return EXIT_FATAL, (
                f"run timeout: the run did not end within {self.timed_out['seconds']} s, "
                f"and no hook was open ({self._last_hook()}): kit code or engine code "
                "outside the hooks kept it from going on"
            )
        if self.timed_out is not None:
            return EXIT_FATAL, (
                f"hook timeout: {self.timed_out['hook']} in "
                f"{self.timed_out['hook_role']} did not return within "
                f"{self.timed_out['seconds']} s"
            )
        if status is None:
            return EXIT_FATAL, "starter lost"
        if os.WIFSIGNALED(status):
            return EXIT_FATAL, f"master crashed: killed by signal {os.WTERMSIG(status)}"
        code = os.WEXITSTATUS(status)
        if not any(e["kind"] == "starter_exit" for e in self.events):
            if code == EXIT_LEDGER_LOST:  # known: the code, not who chose it
                return EXIT_FATAL, (
                    f"master crashed: exited {code} with nothing more recorded, as the kit's "
                    "master does when engine code closed its ledger socket (or put another "
                    f"file under its number); engine code exiting {code} itself looks the same"
                )
            return EXIT_FATAL, f"master crashed: exited {code} without finishing the run"
        return code, "exited"

    def collect(self, reader: socket.socket, starter_pid: int) -> int | None:
        """Read ledger events until the starter exits or a hook times out."""
        pidfd = os.pidfd_open(starter_pid)
        poller = select.poll()
        poller.register(reader.fileno(), select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        if self.listener is not None:
            poller.register(self.listener, select.POLLIN)
        run_deadline = time.monotonic() + self.req.run_timeout
        status: int | None = None
        reader_open = True
        try:
            while True:
                now = time.monotonic()
                deadline = self._deadline(run_deadline)
                # Past a deadline, what already waits is read first (a poll that does not
                # wait): a hook's return or the starter's exit that arrived in time, while
                # the supervisor was late to look, ends the wait as it would have on time.
                late = now >= deadline
                ready = poller.poll(0 if late else max(1, int((deadline - now) * 1000) + 1))
                batch = DEADLINE_DRAIN if late else READ_BATCH
                for fd, ev in ready:
                    if fd == pidfd:
                        continue
                    if fd == self.listener:
                        if reader_open:  # the hook_enter of the refused call's hook first
                            self._read_events(reader)
                        if not self._on_notification(ev):
                            poller.unregister(fd)
                        continue
                    if reader_open and not self._read_events(reader, batch):
                        poller.unregister(reader.fileno())
                        reader_open = False
                if any(fd == pidfd for fd, _ in ready):
                    _, status = os.waitpid(starter_pid, 0)
                    break
                if late and now >= self._deadline(run_deadline):
                    self.on_timeout(now >= run_deadline)
                    break
            if reader_open:
                reader.setblocking(False)
                self._read_events(reader, batch=MAX_EVENTS)
        finally:
            os.close(pidfd)
        if status is None:
            try:
                # WNOHANG: pid 0 (and status 0) while the starter still runs.
                pid, raw = os.waitpid(starter_pid, os.WNOHANG)
                status = raw if pid else None
            except ChildProcessError:
                status = None
        return status

    def _deadline(self, run_deadline: float) -> float:
        """The next deadline: the run's, or an open hook's if sooner."""
        return min([run_deadline] + [d for d, _ in self.open_hooks.values()])

    def _read_events(self, reader: socket.socket, batch: int | None = READ_BATCH) -> bool:
        """Read queued events (at most ``batch``; None: all); False at EOF (no credentials:
        a zero-length datagram has them)."""
        count = 0
        while batch is None or count < batch:
            count += 1
            try:
                data, sender, fds, truncated = self._receive(reader)
            except BlockingIOError:
                self._attribute_answered()
                if self.host is not None:
                    self.host.look()  # after a batch: the hooks open since the last look
                return True
            if not data and sender is None and not fds:
                self._attribute_answered()
                return False
            answer = CONFIRMED
            pipe = _is_pipe(fds)
            try:
                if len(self.events) >= MAX_EVENTS:
                    self.dropped += 1
                else:
                    answer = self.admit(data, sender, truncated, confirmed=pipe)
            finally:
                _release(fds, answer, pipe)
        return True

    def _receive(self, reader: socket.socket) -> tuple[bytes, int | None, list[int], bool]:
        """:func:`kit.system.linux.recv_with_sender` (without blocking) into one buffer kept
        for the run: ``recvmsg`` allocates its whole ``bufsize`` (MAX_EVENT, 1 MiB) for
        each datagram and shrinks it after, 16 µs against 2 µs here, for every datagram.
        An anonymous mapping: only the pages a datagram is written to are ever touched (a
        bytearray would zero all 256 of them, every run)."""
        if self._buffer is None:
            self._buffer = mmap.mmap(-1, MAX_EVENT)
        n, ancdata, msg_flags, _ = reader.recvmsg_into([self._buffer], _ANCILLARY, _RECV_FLAGS)
        pid = None
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                pid = _UCRED.unpack_from(payload)[0]
            elif kind == socket.SCM_RIGHTS:
                fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
        truncated = bool(msg_flags & _CUT)
        return self._buffer[:n], pid, fds, truncated

    def admit(
        self, data: bytes, sender: int | None, truncated: bool, confirmed: bool = False
    ) -> bytes:
        """Record a datagram of the run's processes, or an engine fault in its place when it
        is malformed, does not come from the process it names, or carries a snapshot that
        the kernel contradicts (LEDGER-003). ``confirmed``: the sender waits while we read
        its thread's credentials. Returns the answer for its confirmation pipe: RETRY asks
        it to read its snapshot again and resend (:data:`kit.ledger.record.SNAPSHOT_ATTEMPTS`)."""
        if truncated:
            self.engine_fault(
                "malformed",
                sender,
                f"a truncated datagram (longer than "
                f"{MAX_EVENT} bytes, or with more than "
                f"{linux.MAX_PASSED_FDS} descriptors)",
                data,
            )
            return CONFIRMED
        event, problem = parse_datagram(data)
        if event is not None:
            problem = check_event(event)
        if event is None or problem is not None:
            self.engine_fault("malformed", sender, problem or "undecodable event", data)
            return CONFIRMED
        problem = self.senders.check(sender, event)
        if problem is None and self.outside_check and sender:
            problem = check_snapshot(sender, event, confirmed, self._tasks)
            thread = (sender, event.get("tid"))
            if problem is not None and confirmed:
                # Another thread's process-wide credential change may have fallen between
                # the snapshot and our read: the sender reads it again, a few times.
                seen = self._mismatches.get(thread, 0) + 1
                if seen < SNAPSHOT_ATTEMPTS:
                    self._mismatches[thread] = seen
                    return RETRY
            self._mismatches.pop(thread, None)
        if problem is None and self.outside_check and sender:
            self.master_watch.note(sender, self.senders.role_of(sender), event)
            problem = self.master_watch.check_start(sender, event)
        if problem is not None:
            self.engine_fault("forged", sender, problem, data)
            return CONFIRMED
        self.record(event, data)
        if sender:
            self._watch_master(sender, event, confirmed)
        return CONFIRMED

    def _watch_master(self, sender: int, event: dict[str, Any], confirmed: bool) -> None:
        """What the master checks about itself, checked again from here while it waits
        (:class:`kit.run.master_watch.MasterWatch`): events of the supervisor's own."""
        watch = self.master_watch
        if not self.outside_check:
            return
        if watch.reaped_at(sender, event, confirmed):
            self.emit(
                "foreign_reap",
                child_pid=watch.number,
                detail=(
                    "a child of the master that is not the container (the kit's sentinel) "
                    f"was gone when {event.get('hook')} ended, before the kit reaps it: "
                    "monitor_container must reap only the container's pid (seen from the "
                    "supervisor)"
                ),
            )
        copies = watch.rpc_copies_at(sender, event, confirmed, self._run_processes)
        for copy in copies:
            copy["pid"] = pid = self.run_pid(copy["pid"])
            copy["process"] = {
                "master": "the master",
                "child": f"process {pid}, started by the master",
                "orphan": f"process {pid}, started by the master and orphaned",
            }[copy["process"]]
        if copies:
            self.emit("rpc_conn_kept", **rpc_conn_kept(copies, "seen from the supervisor"))

    def engine_fault(self, fault: str, sender: int | None, detail: str, data: bytes) -> None:
        self.faults += 1
        if self.faults > MAX_FAULTS:
            self.dropped += 1
            return
        role = self.senders.role_of(sender)
        hooks_of = role
        if role is None and sender:  # engine code's own child: its parent's hooks
            ids = linux.process_ids(sender)
            hooks_of = self.senders.role_of(ids[0]) if ids else None
            if ids and hooks_of is not None:
                detail += f" (a child of the {hooks_of} process, pid {self.run_pid(ids[0])})"
        numbered = self.run_pid(sender)
        if sender and numbered is None:
            detail += " (its sender was gone before the run's number of it could be read)"
        roles = PROCESS_ROLES.get(hooks_of or "", frozenset())
        if hooks_of == "rpc":  # an RPC method runs for the master's create_container
            roles = roles | {"master"}
        hooks = [f"{r} {h}" for (r, h) in self.open_hooks if r in roles]
        self.emit(
            "engine_fault",
            fault=fault,
            sender_pid=numbered,
            sender_role=role,
            open_hooks=hooks,
            detail=detail,
            excerpt=data[:EXCERPT].decode("utf-8", "replace"),
        )

    def _modelled_pids(self, kernel_pid: int, nspid: list[int]) -> set[int]:
        """The pids the fake model gives ``kernel_pid`` (its NSpid: ``nspid``): the model
        numbers a process as the process sees itself (in the host sandbox, as the sandbox's
        pid namespace does; a fake run makes no pid namespace of the kernel's)."""
        if self.sandbox is None:
            return current().modelled_pids(kernel_pid)
        level = self._sandbox_level()
        return current().modelled_pids(nspid[level]) if len(nspid) > level else set()

    def run_pid(self, kernel_pid: int | None) -> int | None:
        """A pid as the supervisor's pid namespace numbers it (SO_PASSCRED, seccomp, /proc)
        numbered as the ledger numbers the run's processes: in the host sandbox, as its pid
        namespace does (the kit's processes' own events, leaks); None when the process is
        gone or not in the sandbox. Unsandboxed, the pid itself."""
        if kernel_pid is None or self.sandbox is None:
            return kernel_pid
        level = self._sandbox_level()
        ids = linux.process_ids(kernel_pid)
        if ids is None or len(ids[1]) <= level:
            return None
        return ids[1][level]

    def _sandbox_level(self) -> int:
        """The index of the sandbox's pid namespace in an NSpid read here."""
        if self._level is None:
            own = linux.process_ids(os.getpid())
            assert own is not None, "the supervisor cannot read its own /proc status"
            self._level = len(own[1])  # the sandbox's pid namespace is one below ours
        return self._level

    def _on_notification(self, revents: int, later: bool = False) -> bool:
        """Answer and record one refused system call; False once no process is left under
        the filter (the listener hangs up). ``later``: the ledger's queue is not read up to
        the call (an event is being read), so its attribution waits until it is."""
        assert self.listener is not None
        if revents & select.POLLIN:
            before = time.monotonic_ns()  # the call was made earlier; its answer comes after
            refusal = seccomp.handle_notification(self.listener, self.watching, self.host_identity)
            if refusal is None:
                return True
            if refusal["category"] == seccomp.HOST_WATCH_CATEGORY:
                if refusal["effect"] is not None and self.host is not None:
                    self.watched += 1
                    if self.watched <= seccomp.MAX_RECORDED:  # one looping on a call
                        if later:
                            self._unattributed.append((refusal, before))
                        else:
                            self._record_refusal(refusal, self.events)
                return True
            self.refusals += 1
            if self.refusals <= seccomp.MAX_RECORDED:  # an engine looping on one call
                if later:
                    self._unattributed.append((refusal, before))
                else:
                    self._record_refusal(refusal, self.events)
            return True
        return not revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL)

    def _record_refusal(
        self,
        refusal: dict[str, Any],
        events: list[dict[str, Any]],
        since: list[dict[str, Any]] | None = None,
    ) -> None:
        """Record ``refusal``, attributed from ``events`` (the ledger up to its call).
        ``since``: the events read after its answer and recorded before it, where the return
        of the RPC method it was made in may already be (later ones name it at the end)."""
        role, hook = seccomp.attribute(events, refusal["target"], self.senders.role_of)
        if role == "rpc" and hook is None and since:
            hook = seccomp.rpc_method(refusal["target"], since)
        self._renumber(refusal)
        if refusal["category"] == seccomp.HOST_WATCH_CATEGORY:
            # Not refused: the call ran. What it did to the host is the host diff's.
            if self.host is not None:
                target = refusal.get("target") or {}
                pid = target.get("tgid") if isinstance(target, dict) else None
                self.host.called(
                    refusal["effect"],
                    refusal["syscall"],
                    (role or "unknown", hook or "no hook", pid if type(pid) is int else 0),
                )
            return
        self.emit("syscall_refused", **refusal, process_role=role, hook=hook)

    def _attribute_answered(self) -> None:
        """Record the refusals answered while an event was being read, now that the queue
        is read: each from the events stamped before its notification was read (the caller's
        own came before its call; what it sent after its answer is left out)."""
        while self._unattributed:
            refusal, before = self._unattributed.pop(0)
            events: list[dict[str, Any]] = []
            since: list[dict[str, Any]] = []
            for e in self.events:
                (events if type(e.get("t")) is int and e["t"] < before else since).append(e)
            self._record_refusal(refusal, events, since)

    def _answer_while_the_model_is_locked(self) -> None:
        """What the supervisor does while another process holds the fake model's lock (see
        ``Store.waiting``): answer a refused system call if one waits (its caller may be a
        thread of the lock's holder, keeping the GIL), else wait a millisecond."""
        if self.listener is not None:
            poller = select.poll()
            poller.register(self.listener, select.POLLIN)
            ready = poller.poll(1)
            if ready and ready[0][1] & select.POLLIN:
                self._on_notification(ready[0][1], later=True)
                return
        time.sleep(0.001)

    def _renumber(self, refusal: dict[str, Any]) -> None:
        """The kernel pids of a refusal (after its attribution, which needs them) in the
        ledger's numbering (:meth:`run_pid`)."""
        refusal["target_tid"] = self.run_pid(refusal["target_tid"])
        target = refusal.get("target")
        while isinstance(target, dict):
            target["tgid"] = self.run_pid(target.get("tgid"))
            target = target.get("parent")

    def _drain_notifications(self) -> None:
        """Answer the refusals still pending once the starter is gone (from processes it
        left behind: they are leaks, killed later, but their calls are refused and
        recorded all the same)."""
        if self.listener is None:
            return
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        for _ in range(1000):
            ready = poller.poll(0)
            if not ready or not ready[0][1] & select.POLLIN:
                return
            self._on_notification(ready[0][1])

    def on_timeout(self, whole_run: bool) -> None:
        # The hook named is the one open longest (the earliest deadline: every timed hook
        # has the same timeout), for the run timer too; with none open, an untimed hook
        # (monitor_container) that is; with no hook open at all, none: the run is stuck
        # between hooks (hook and role "", the reason says after which hook).
        role, hook, pid = "", "", 0
        if self.open_hooks:
            (role, hook), (_, pid) = min(self.open_hooks.items(), key=lambda kv: kv[1][0])
        elif self.untimed_open:
            (role, hook), pid = next(iter(self.untimed_open.items()))
        seconds = self.req.run_timeout if whole_run else self.req.hook_timeout
        # Every hook still open, oldest first: a hook blocked on another process's hung
        # hook (create_container on an RPC method, say) is listed with it.
        now = time.monotonic()
        still_open = [
            {"role": r, "hook": h, "open_for": round(now - d + self.req.hook_timeout, 3)}
            for (r, h), (d, _) in sorted(self.open_hooks.items(), key=lambda kv: kv[1][0])
        ]
        self.timed_out = {
            "hook": hook,
            "hook_role": role,
            "seconds": seconds,
            "whole_run": whole_run,
            "open_hooks": still_open,
        }
        self.emit(
            "hook_timeout",
            hook=hook,
            hook_role=role,
            hook_pid=pid,
            seconds=seconds,
            open_hooks=still_open,
        )
        self.kill_tree()

    def _last_hook(self) -> str:
        """The last hook that ended, as a reason's words."""
        for event in reversed(self.events):
            if event["kind"] in ("hook_return", "hook_raise"):
                verb = "returned" if event["kind"] == "hook_return" else "raised"
                return f"the last hook to end: {event.get('hook')} in {event.get('role')}, {verb}"
        return "none had run"

    def kill_tree(self) -> None:
        """SIGKILL every descendant until none is left; reap them (we are the subreaper).
        The sandbox's init is spared (the host diff still reads the sandbox through it): its
        end, later, ends whatever this missed."""
        for _ in range(200):
            reap_exited_children()
            if not self._run_alive():
                return
            for p in self._run_processes():
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)


def _is_pipe(fds: list[int]) -> bool:
    """Whether a datagram came with one descriptor, a pipe: a sender's confirmation pipe."""
    if len(fds) != 1:
        return False
    try:
        return stat.S_ISFIFO(os.fstat(fds[0]).st_mode)
    except OSError:
        return False


def _release(fds: list[int], answer: bytes = CONFIRMED, pipe: bool | None = None) -> None:
    """Answer a confirmation pipe (never blocking: a sender may hand us a full pipe) and
    close every descriptor a datagram brought. ``pipe``: :func:`_is_pipe` of ``fds``, when
    the caller has it already."""
    if _is_pipe(fds) if pipe is None else pipe:
        with contextlib.suppress(OSError):
            os.set_blocking(fds[0], False)
            os.write(fds[0], answer)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class Ahead:
    """What is made ahead for a sandboxed run, by the process that will fork its supervisor
    (the zygote, a one-shot launcher): a run directory (locked) and a host sandbox being
    built for it (or why it could not be)."""

    run_dir: str
    lock_fd: int
    building: host_sandbox.Building | None
    error: str = ""
    #: What the run's host watch starts from, read and opened ahead too.
    watch: hostdiff.ReadAhead | None = None
    #: Built and read (:func:`finish_ahead`), or failed: no longer waiting for init.
    finished: bool = False
    #: Nothing left to undo here: dropped (init ended, descriptors closed, the run directory
    #: removed) or handed over to a supervisor (:meth:`discard`).
    dropped: bool = False

    def fds(self) -> set[int]:
        """Its descriptors: the lock, init's ready pipe and pidfd (the supervisor's
        :func:`~kit.run.sandbox.adopt` checks through it that the pid is still init's),
        the watch's."""
        fds = {self.lock_fd}
        if self.building is not None:
            fds.add(self.building.ready_fd)
            if self.building.pidfd is not None:
                fds.add(self.building.pidfd)
            if self.building.scratch_lock >= 0:  # still being built: its scratch's lock
                fds.add(self.building.scratch_lock)
        if self.watch is not None:
            fds |= self.watch.fds()
        return fds

    def files(self) -> list[int]:
        """The watch's block of descriptors, handed over at their own numbers."""
        return [] if self.watch is None else self.watch.files()

    def moved(self, numbers: dict[int, int]) -> Ahead:
        """The same, its descriptors renumbered (``numbers``: old -> new)."""
        building = self.building
        if building is not None:
            pidfd = None if building.pidfd is None else numbers[building.pidfd]
            lock = building.scratch_lock
            building = dataclasses.replace(
                building,
                ready_fd=numbers[building.ready_fd],
                pidfd=pidfd,
                scratch_lock=-1 if lock < 0 else numbers[lock],
            )
        watch = None if self.watch is None else self.watch.moved(numbers)
        return dataclasses.replace(
            self, lock_fd=numbers[self.lock_fd], building=building, watch=watch
        )

    def drop(self, reap: bool = False) -> None:
        """Unused: init dies now (else with its builder, by its parent-death signal), the
        watch's files are closed, the run directory goes. Once: a dropped or handed-over
        one is left alone, so every way out may drop it. ``reap``: as
        :meth:`~kit.run.sandbox.Building.abandon` has it."""
        if self.dropped:
            return
        self.dropped = True
        if self.building is not None:
            self.building.abandon(reap)
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        rundir.remove(self.run_dir, self.lock_fd)

    def discard(self) -> None:
        """In the process that forked the supervisor it was handed over to, after the fork:
        its descriptors closed (its pidfd of init too, if it still has it, and the watch's
        sysctl files unless the zygote keeps them); nothing is left to drop."""
        self.dropped = True
        watch, self.watch = self.watch, None
        for fd in self.fds():
            os.close(fd)
        if watch is not None:
            watch.close()
        if self.building is not None:  # closed above: no number of theirs is ours now
            self.building.pidfd = None
            self.building.ready_fd = self.building.scratch_lock = -1


def prepare_ahead() -> Ahead:
    """A run directory and a host sandbox for a request that binds no other directory (the
    zygote, between runs: the run then only adopts them), built and read."""
    return finish_ahead(start_ahead())


def start_ahead() -> Ahead:
    """The first half of :func:`prepare_ahead`: the run directory, and the sandbox's init
    forked, building it while the caller goes on (:func:`finish_ahead` waits for it)."""
    run_dir, lock_fd = rundir.create()
    try:
        building = host_sandbox.build([run_dir, *_coverage_dirs()])
    except Exception as exc:  # noqa: BLE001 reported by the run that would have used it
        return Ahead(run_dir, lock_fd, None, f"{type(exc).__name__}: {exc}", finished=True)
    except BaseException:  # interrupted (kit run's signal): nothing is handed out
        rundir.remove(run_dir, lock_fd)
        raise
    return Ahead(run_dir, lock_fd, building)


def finish_ahead(ahead: Ahead, reap: bool = False) -> Ahead:
    """The second half of :func:`prepare_ahead`: wait until init has built the sandbox of
    ``ahead`` (started by :func:`start_ahead`), then read its state ahead. ``ahead`` itself,
    finished, or one that says why it could not be; raises only after dropping it
    (:attr:`Ahead.dropped`). ``reap``: an init given up on is reaped here
    (:meth:`~kit.run.sandbox.Building.abandon`)."""
    building = ahead.building
    if ahead.finished or building is None:
        return ahead
    run_dir, lock_fd = ahead.run_dir, ahead.lock_fd
    try:
        uppers = building.wait_ready()
    except Exception as exc:  # noqa: BLE001 init is gone, going or garbled: the run reports why
        building.abandon(reap)
        return Ahead(run_dir, lock_fd, None, f"{type(exc).__name__}: {exc}", finished=True)
    # The message queues listed through init's fd of their file system's root: a detached
    # mqueue mount of the zygote's own would need CAP_SYS_ADMIN over its mount namespace's
    # owner, which root of a user namespace that is not the initial one may lack.
    mqueue = "" if building.mqueue is None else f"/proc/{building.init_pid}/fd/{building.mqueue}"
    view = host_sandbox.HostSandbox(
        init_pid=building.init_pid,
        upper_dir=uppers["/"],
        upper_dirs=uppers,
        own_init=False,
        mqueue_dir=mqueue,
        fresh_dirs=host_sandbox.fresh_dirs(building.init_pid),
    )
    try:
        watch = None if building.pidfd is None else hostdiff.read_ahead(view, building.pidfd)
    except BaseException:
        ahead.dropped = True
        building.abandon(reap)
        rundir.remove(run_dir, lock_fd)
        raise
    return Ahead(run_dir, lock_fd, building, watch=watch, finished=True)


def fits_ahead(request: RunRequest) -> bool:
    """Whether a run of ``request`` can take what :func:`prepare_ahead` made."""
    return bool(request.sandbox) and not request.shared_dirs


def _enter_sandbox(box: host_sandbox.HostSandbox, writer: socket.socket, keep: set[int]) -> None:
    """In the starter, before anything else: into the host sandbox with only the ``keep``
    descriptors, or die saying why."""
    try:
        host_sandbox.enter(box, keep)
    except BaseException as exc:  # noqa: BLE001 any failure is reported in the ledger
        LedgerWriter(writer, "starter").emit(
            "starter_error", stage="sandbox", message=f"entering the host sandbox: {exc}"
        )
        os._exit(EXIT_FATAL)


def _coverage_dirs() -> list[str]:
    """The directory coverage data files of a measured run go to: the real one, or the
    run's processes lose their coverage."""
    cov = sys.modules.get("coverage")
    current = getattr(getattr(cov, "Coverage", None), "current", None)
    instance = current() if current is not None else None
    if instance is None:
        return []
    return [os.path.dirname(os.path.abspath(instance.config.data_file))]


def reap_exited_children() -> None:
    """Reap every child that has exited, without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


_preloaded: set[tuple[str, str, tuple[str, ...]]] = set()


def preload(request: RunRequest) -> bool:
    """Import everything of the kit the run needs while still privileged (once per process for
    each engine and import path); True when this call did the work.

    The engine itself is not imported here: the zygote and the supervisors judge the run, and
    the engine is untrusted code (SPEC §11). Whether it can be found at all is asked of an
    inspection child, as U (:func:`kit.preflight.inspect`), so a run of an engine that cannot
    be found is a launch error as before; the run's starter imports it, in the run's sandbox
    (:func:`kit.starter.stage1.load_engine`)."""
    key = (request.engine, request.backend, tuple(request.sys_path))
    if key in _preloaded:
        return False
    for entry in reversed(request.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if not registry.found_without_entry_points(request.engine):
        registry.entry_points()  # metadata only: the starters find the engine's without a scan
    found = preflight.found(request.engine)
    if found.failure == "registry":
        raise registry.RegistryError(found.failure_message)
    if found.failure:
        raise preflight.EngineNotLoaded(f"engine {request.engine}: {found.failure_message}")
    warm(request)
    _preloaded.add(key)
    return True


def warm(request: RunRequest, prime: bool = True) -> None:
    """The part of :func:`preload` that needs no answer about the engine: what the run's
    backend needs imported and read. A one-shot run does it while the engine's inspection
    goes on (:mod:`kit.run.oneshot`), without ``prime``: it primes from the sandbox built
    for its run, as it reads it ahead (:func:`kit.run.hostdiff.read_ahead`). A second call
    costs next to nothing."""
    if request.backend == "fake":
        import kit.system.fake  # noqa: F401, PLC0415  (the model replaces the kernel; fake runs only)
    if prime and request.backend != "fake" and os.geteuid() == 0:
        hostdiff.prime()  # what every fresh host sandbox has, read once for all runs
    seccomp.warm()
    traceback.format_exception(ValueError("warm-up"))  # pulls in lazy imports of traceback


def prepare_backend(request: RunRequest) -> Any:
    """What the run's system interface starts from, computed ahead (by the zygote, before
    it forks the supervisor, in code it has run before): the fake backend's initial model;
    None for the kernel, or when it cannot be computed here (the supervisor then computes
    it itself, and reports what goes wrong)."""
    if request.backend != "fake":
        return None
    try:
        from kit.system.fake import prepare  # noqa: PLC0415  (lazy: fake runs only, see above)

        return prepare(request)
    except Exception:  # noqa: BLE001 the supervisor computes it again and reports the error
        return None


def _backend(
    request: RunRequest, prepared: Any, run_dir: str
) -> contextlib.AbstractContextManager[Any]:
    """The run's system interface, installed before the starter is forked: the kernel
    (as is), or the fake backend's model (:mod:`kit.system.fake`), kept in ``run_dir``."""
    if request.backend == "fake":
        from kit.system.fake import installed  # noqa: PLC0415  (lazy: fake runs only, see above)

        return installed(request, prepared, rundir.kit_own(run_dir))
    return contextlib.nullcontext()


def run_supervised(
    request: RunRequest,
    result_fd: int,
    prepared: Any = None,
    ahead: Ahead | None = None,
    inherited: set[int] | None = None,
) -> None:
    """Supervise one run in this process and write its result to ``result_fd`` (closed).
    ``prepared``: what :func:`prepare_backend` returned for ``request`` (in this process or
    in its parent, just before the fork); ``ahead``: what :func:`prepare_ahead` made for it
    (in the parent); ``inherited``: :meth:`Supervisor.run`'s."""
    # SIGTERM (default action: die) until the supervisor handles it with its cleanup.
    linux.set_parent_death_signal(signal.SIGTERM)
    linux.set_name("kit-supervisor")
    os.chdir("/")
    try:
        preload(request)
        supervisor = Supervisor(request)
        result = supervisor.run(result_fd, ahead, prepared, inherited)
        data = supervisor.encode(result)
    except Exception as exc:  # noqa: BLE001 any failure becomes the run's result, never a hang
        result = {
            "exit_code": EXIT_FATAL,
            "reason": f"supervisor error: {exc!r}",
            "leaks": [],
            "timed_out": None,
            "ledger": None,
            "error": repr(exc),
        }
        data = json.dumps(result).encode()
    view = memoryview(data)
    while view:
        n = os.write(result_fd, view)
        view = view[n:]
    os.close(result_fd)


def main(argv: list[str]) -> int:
    """``python -m kit.run.supervisor REQUEST_FD RESULT_FD``: one run in a fresh interpreter.

    Used by :mod:`kit.run.launcher`. The request is a :class:`kit.run.request.RunRequest` as JSON;
    the result, written when the run is over, is ``{"exit_code", "reason", "ledger", "leaks",
    "timed_out"}``. The first line on RESULT_FD is ``started <starter pid> <run dir>`` as soon as
    the starter exists, followed, for a run in the host sandbox, by ``{"sandbox_pid",
    "sandbox_mounts", "sandbox_left_out"}`` (JSON: its init's host pid, its mount table before
    the starter was forked, the host mount points it does not reproduce).
    """
    req_fd, result_fd = int(argv[0]), int(argv[1])
    default_signals()
    with os.fdopen(req_fd, "rb") as f:
        request = RunRequest.from_json(json.loads(f.read()))
    os.set_inheritable(result_fd, False)  # the run's processes must not hold it
    rundir.sweep()  # what supervisors and sandbox builders that died left
    run_supervised(request, result_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
