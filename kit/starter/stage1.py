"""Stage 1: the starter before it becomes the master (SPEC §2, §5)."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import mmap
import os
import signal
import socket
import sys
from typing import Any, NoReturn

from kit import registry
from kit.contract import (
    FORWARDED_SIGNALS,
    ConfigError,
    EngineConfig,
    dumps,
    field_types,
)
from kit.ledger.record import LedgerWriter
from kit.run import seccomp
from kit.run.request import Invoker, RunRequest
from kit.run.sandbox import open_fds
from kit.starter import inject
from kit.starter.common import (
    EXIT_FATAL,
    ControlProtocolError,
    HookFailed,
    HookRunner,
    StageFailed,
    _exit,
    _recv_control,
    _send,
    _status_to_code,
    default_signals,
    describe_error,
    exiting_child,
    ledger_lost,
    rearm_parent_death,
)
from kit.starter.config import StarterConfig
from kit.starter.container import Container
from kit.starter.control import Control
from kit.starter.master import Master, control_abused
from kit.system import current, linux
from kit.system.linux import dup_high, fd_base


def load_engine(engine: str) -> None:
    """Import the engine in the starter, before any process of the run is forked and before
    any privilege change (the run's other processes inherit it, and none imports after a
    privilege change): the first engine code of a run, in its sandbox and under its seccomp
    filter; the kit's trusted processes never import it (SPEC §11). No bytecode is written:
    in the sandbox, a new ``__pycache__`` would be a change of the run's (the kit's own), and
    unsandboxed it would be root's file in the engine author's tree."""
    sys.dont_write_bytecode = True
    registry.find(engine)
    resolve_config_types(engine)
    if "pyroute2" in sys.modules:
        # The engine uses pyroute2 (the kit does not: it brings lo up with an ioctl). One
        # netlink round trip pulls in the modules pyroute2 imports lazily, which an
        # unprivileged uid may not be able to read.
        from pyroute2 import IPRoute  # noqa: PLC0415  (~110 ms; only if the engine uses it)

        with IPRoute() as ipr:
            ipr.link_lookup(ifname="lo")


def resolve_config_types(engine: str) -> None:
    """Resolve the field types of the engine's config classes (those of the module that
    defines its operations) once, before the forks: stage 1, the master, the RPC server and
    stage 2 then find them resolved instead of each evaluating every annotation again.

    Resolving evaluates the engine's annotations (engine code), so it runs where the engine
    module is imported, with the same privilege and outside any hook as that import: the
    starter (:func:`load_engine`)."""
    module = getattr(registry.find(engine).factory, "__module__", None)
    todo = EngineConfig.__subclasses__()
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__ == module:
            try:
                field_types(cls)
            except Exception:  # noqa: BLE001 the engine's own process reports it
                pass


#: The most descriptors stage 1 may hand over (far above any real need; the table's own
#: limit comes first at the usual soft limit of 1024).
MAX_KEPT_FDS = 4096


def _moved_high(sock: socket.socket) -> socket.socket:
    """The ledger socket at a high number, as the master's own descriptors (see
    :func:`kit.system.linux.fd_base`): engine code closing or overwriting a range of low
    numbers in a hook leaves it alone. Unmoved when it cannot be."""
    try:
        high = dup_high(sock.fileno(), fd_base())
    except OSError:
        return sock
    sock.close()
    return socket.socket(fileno=high)


class Starter:
    """One run's starter, in the starter process. :meth:`main` never returns."""

    def __init__(
        self,
        request: RunRequest,
        ledger_sock: socket.socket,
        filter_channel: socket.socket | None = None,
        parent: int | None = None,
        inherited: set[int] | None = None,
    ) -> None:
        # The supervisor's pid, known before the fork: read after it (getppid), it would be
        # the reaper's pid if the supervisor died in between, and the starter would live on.
        self.parent = parent
        #: The descriptors the run may inherit (stdio, the launcher's pass-through ones):
        #: every other one open here is the kit's (None: not known, the ledger's alone).
        self.inherited = None if inherited is None else frozenset(inherited)
        self.own_fds: dict[int, str] = {}
        self.req = request
        inject.arm(request.inject)  # before any process of the run is forked
        self.filter_channel = filter_channel
        self.user: Invoker = request.user()
        self.system = current()
        self.ledger_sock = _moved_high(ledger_sock)
        self.ledger = LedgerWriter(
            self.ledger_sock, "starter", confirm=self.system.name == "real" and request.probes
        )
        self.ledger.on_lost = ledger_lost  # every process of the run inherits it
        self.hooks = HookRunner(self.ledger, self.system, request.probes)

    # -- invoker state ---------------------------------------------------------------------
    def become_invoker(self) -> None:
        """Put the starter in the state the flow's caller leaves it in (SPEC §3)."""
        flow, u = self.req.flow, self.user
        if flow == "root" and self.system.privileged():
            return
        if not self.system.privileged():
            if flow == "root":
                raise StageFailed("flow root: needs uid 0")
            if flow in ("suid", "hybrid"):
                raise StageFailed(f"flow {flow}: needs root to emulate the setuid starter")
            return  # already U
        if flow in ("suid", "hybrid"):
            self.system.emulate_setuid_exec(u.uid, u.gid, u.groups)
        else:
            self.system.become_user(u.uid, u.gid, u.groups)
            self.system.set_dumpable(True)  # uid maps and /proc need it after setresuid

    def main(self) -> NoReturn:
        code = EXIT_FATAL
        try:
            if self.filter_channel is not None:
                # First, while the starter still has the launcher's privilege and before
                # any engine code: the fake backend's containment, or (real backend, as
                # root, in the host sandbox or not) the host-global refusals. The one place
                # a run's filter is installed: every process of the run descends from here.
                refused = seccomp.install_for_run(self.req.backend, self.filter_channel)
                self.filter_channel = None
                if refused:
                    raise StageFailed(refused)
            linux.set_name("kit-starter")
            default_signals()
            # Read while /proc is the host's: stage 2 needs it after engine code mounted the
            # container's /proc, which may leave out /proc/sys (subset=pid).
            linux.cap_last()
            # Before the engine's import, which may open descriptors of its own to keep.
            self.own_fds = self.kit_fds()
            try:
                load_engine(self.req.engine)
            except Exception as exc:  # noqa: BLE001 the engine's import may raise anything
                raise StageFailed(
                    f"importing engine {self.req.engine}: {type(exc).__name__}: {exc}"
                ) from None
            if self.parent is None:
                self.parent = os.getppid()
            self.become_invoker()
            rearm_parent_death(self.parent)
            self.ledger.emit(
                "process_start", ppid=self.system.getppid(), nspid=[self.system.getpid()]
            )
            # Every object so far is the children's too: frozen, no collection in them
            # walks (and so copies) the pages it lies on. Garbage first: frozen, a cycle
            # would never be collected, and what it holds (a descriptor) stays open in
            # every process forked from here.
            gc.collect()
            gc.freeze()
            common_json, sconf = self.run_stage1()
            self.ledger.emit("starter_config", config=sconf.to_json())
            try:
                sconf.validate(kit_fds=self.own_fds)
            except ConfigError as exc:
                self.ledger.emit("starter_error", stage="starter_config", message=str(exc))
            else:
                code = self.run_container(common_json, sconf)
        except StageFailed as exc:
            self.ledger.emit("starter_error", stage="starter", message=str(exc))
        except BaseException as exc:  # noqa: BLE001 a kit bug: report, never hang
            self.ledger.emit(
                "starter_error", stage="starter", message=describe_error(exc)["traceback"]
            )
        self.ledger.emit("starter_exit", code=code)
        _exit(code)

    def kit_fds(self) -> dict[int, str]:
        """The kit's own descriptors open here, which no payload may hold: before the
        engine is imported, each one but stdio and those the run inherits (unsandboxed,
        the supervisor's pipes are open here too), the ledger socket named."""
        own = (
            {}
            if self.inherited is None
            else {fd: "own descriptor" for fd in open_fds() if fd > 2 and fd not in self.inherited}
        )
        own[self.ledger_sock.fileno()] = "ledger socket"
        return own

    # -- stage 1 ---------------------------------------------------------------------------
    def run_stage1(self) -> tuple[dict[str, Any], StarterConfig]:
        # A socket, not a pipe: besides the configs, stage 1 hands over the descriptors
        # prepare_config keeps, as upstream's stage 1 shares its descriptor table with the
        # starter (CLONE_FILES). Both ends high, out of the engine's way, and the kit's.
        ours, theirs = (_moved_high(s) for s in socket.socketpair())
        for end in (ours, theirs):
            self.own_fds[end.fileno()] = "stage 1 channel"
        pid = os.fork()
        if pid == 0:
            ours.close()
            self._stage1_child(theirs)
        peer = linux.fd_identity(theirs.fileno())
        theirs.close()
        fds: list[int] = []
        data, problem = b"", None
        try:
            data, fds = linux.recv_with_fds(ours, MAX_KEPT_FDS, peer=peer)
        except (OSError, ValueError) as exc:
            problem = f"stage 1's channel: {exc}"
        finally:
            ours.close()
        _, status = os.waitpid(pid, 0)
        self.ledger.emit("process_exit", child_role="stage1", child_pid=pid, status=status)
        try:
            if problem:
                raise StageFailed(problem)
            if status != 0 or not data:
                raise StageFailed(f"stage 1 failed (exit code {_status_to_code(status)})")
            try:
                doc = json.loads(data)
                common, sconf = doc["common"], StarterConfig.from_json(doc["starter_config"])
                kept = doc["kept"]
            except (ValueError, KeyError, TypeError) as exc:
                raise StageFailed(f"stage 1's result is malformed: {exc!r}") from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.place_kept_fds(kept, fds, sconf.keep_fds)
        return common, sconf

    def place_kept_fds(self, kept: Any, received: list[int], keep: list[int]) -> None:
        """Put the descriptors stage 1 kept (``received``, numbered by ``kept``) under the
        same numbers here, and close those of ``keep`` that stage 1 did not have open: the
        starter's table is then stage 1's, as if the two shared it (upstream's CLONE_FILES).
        The kit's own numbers are left alone (validation names them). Closes ``received``."""
        parked: dict[int, int] = {}
        try:
            if (
                not isinstance(kept, list)
                or len(kept) != len(received)
                or len(set(kept)) != len(kept)
                or not set(kept) <= set(keep)
            ):
                raise StageFailed(
                    f"stage 1 sent {len(received)} descriptors numbered {kept!r}: not those "
                    f"keep_file_descriptor kept ({keep!r})"
                )
            if not keep:
                return  # nothing kept, nothing came (checked above): the usual run
            # By number and by what it is: stage 1 can put a copy of the kit's ledger socket
            # (a descriptor it inherited) under a number of its own and keep that.
            kit_files = {linux.fd_identity(n) for n in self.own_fds} - {None}
            for number, fd in zip(kept, received, strict=True):
                if number not in self.own_fds and linux.fd_identity(fd) in kit_files:
                    raise StageFailed(
                        f"keep_file_descriptor: fd {number} is a copy of one of the kit's own "
                        "descriptors: the payload may not hold it"
                    )
            placing = dict(zip(kept, received, strict=True))
            for number in self.own_fds:
                placing.pop(number, None)
            closing = [
                n
                for n in keep
                if n not in self.own_fds
                and n not in placing
                and n not in received  # a number free here, taken by what came
                and linux.fd_identity(n) is not None
            ]
            # Received descriptors may lie under numbers to fill or to close: each is parked
            # above every number involved first, and the received ones are closed.
            top = max([*received, *placing, *closing], default=2)
            for number, fd in placing.items():
                parked[number] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top + 1)
            for fd in received:
                os.close(fd)
            received = []
            for number in closing:
                os.close(number)  # closed in stage 1, so closed here
            for number, fd in parked.items():
                os.dup2(fd, number)
        except OSError as exc:
            raise StageFailed(f"keep_file_descriptor: stage 1's descriptors: {exc}") from None
        finally:
            for fd in [*received, *parked.values()]:
                os.close(fd)

    def _stage1_child(self, channel: socket.socket) -> NoReturn:
        code = EXIT_FATAL
        self.system_parent = os.getppid()
        try:
            rearm_parent_death(self.system_parent)
            linux.set_name("kit-stage1")
            ledger = self.ledger.for_role("stage1")
            u = self.user
            if self.req.flow in ("suid", "hybrid"):
                # Stage 1 of the setuid starter runs with every privilege dropped.
                self.system.become_user(u.uid, u.gid, u.groups)
                self.system.set_no_new_privs()
                rearm_parent_death(self.system_parent)
            ledger.emit("process_start", ppid=self.system.getppid(), nspid=[self.system.getpid()])
            hooks = HookRunner(ledger, self.system, self.req.probes)
            engine = registry.make_engine(self.req.engine)
            config_json = dict(self.req.engine_config)
            if self.req.argv:
                config_json["argv"] = list(self.req.argv)
            privileged = self.req.flow in ("suid", "hybrid")
            common = hooks.init_engine(engine, config_json, self.req.container_id, privileged)
            sconf = StarterConfig(
                self.req.flow,
                u.uid if self.req.flow != "root" else 0,
                u.gid if self.req.flow != "root" else 0,
            )
            hooks.call("prepare_config", engine.operations.prepare_config, sconf)
            # Not the kit's (the starter names them when it validates).
            kept = [
                fd
                for fd in sconf.keep_fds
                if fd not in self.own_fds and linux.fd_identity(fd) is not None
            ]
            doc = {"common": common.to_json(), "starter_config": sconf.to_json(), "kept": kept}
            linux.send_with_fds(channel, dumps(doc).encode(), kept)
            code = 0
        except HookFailed:
            pass  # the ledger has the hook_raise
        except BaseException as exc:  # noqa: BLE001 stage 1 reports any failure, then exits
            self.ledger.for_role("stage1").emit(
                "starter_error", stage="stage1", message=describe_error(exc)["traceback"]
            )
        _exit(code)

    # -- namespaces and the container process ----------------------------------------------
    def _write_maps(self, pid: int, sconf: StarterConfig) -> None:
        uid_map, gid_map = sconf.uid_mappings, sconf.gid_mappings
        if not self.system.privileged():
            euid, egid = self.system.getresuid()[1], self.system.getresgid()[1]
            for name, maps, own in (
                ("add_uid_mappings", uid_map, euid),
                ("add_gid_mappings", gid_map, egid),
            ):
                if len(maps) != 1 or maps[0][1] != own or maps[0][2] != 1:
                    raise StageFailed(
                        f"{name}: {maps} needs privilege (an unprivileged "
                        f"starter can map only its own id {own}, size 1)"
                    )
            if sconf.allow_setgroups:
                raise StageFailed(
                    "set_allow_setgroups: an unprivileged starter must deny "
                    "setgroups in the user namespace"
                )
        self.system.write_id_maps(pid, uid_map, gid_map, deny_setgroups=not sconf.allow_setgroups)

    def run_container(self, common_json: dict[str, Any], sconf: StarterConfig) -> int:
        """Create/join namespaces, start the container process, run the master."""
        created = sconf.namespaces_created()
        joined = dict(sconf.ns_paths)
        # user and pid: in the starter, before the fork (joined by path here; created by
        # the clone so that the new pid namespace is owned by a new user namespace).
        starter_joined = [kind for kind in ("user", "pid") if kind in joined]
        for kind in starter_joined:
            self.system.setns(kind, joined[kind])
        clone_kinds = [k for k in ("user", "pid") if k in created]
        master_sock, container_sock = socket.socketpair()
        rpc_master, rpc_server = socket.socketpair()
        for s in (master_sock, container_sock, rpc_master, rpc_server):
            s.set_inheritable(False)

        # A sentinel child, older than the container, that exits at once: a monitor that
        # reaps any child (waitpid(-1)) takes it first, and the master sees it gone.
        self.sentinel = exiting_child()
        # Two bytes shared with the container side: stage 2 sets the first when it calls
        # exec, so the master can tell exec from death even when a monitor reaped it at
        # once; the second when master_fd was no longer the master socket at that call.
        self.exec_mark = mmap.mmap(-1, 2)
        pid = self.system.clone(clone_kinds)
        if pid == 0:
            master_sock.close()
            rpc_master.close()
            Container(self, common_json, sconf, container_sock, rpc_server).main()
        container_sock.close()
        rpc_server.close()
        self.ledger.emit(
            "container_start",
            container_pid=pid,
            created=clone_kinds,
            joined=starter_joined,
            # Sent before any engine code runs in this process: the supervisor checks from
            # outside what the master checks about itself (kit.run.master_watch).
            sentinel_pid=self.sentinel,
            rpc_conn={
                "inode": os.fstat(rpc_master.fileno()).st_ino,
                "fd": rpc_master.fileno(),
                "fd_base": linux.fd_base(),
            },
        )

        try:
            if "user" in created:
                self._write_maps(pid, sconf)
                if not sconf.hybrid_workflow:
                    self.system.setns("user", f"/proc/{pid}/ns/user")
                    rearm_parent_death(self.parent)
        except (OSError, StageFailed) as exc:
            self.ledger.emit("starter_error", stage="user_namespace", message=str(exc))
            _send(master_sock, Control.ABORT)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return EXIT_FATAL
        if self.req.flow in ("suid", "hybrid"):
            # The setuid master: r=e=U, saved uid 0, no effective capabilities.
            self.system.drop_effective(self.user.uid)
            rearm_parent_death(self.parent)
        _send(master_sock, Control.MAPS_WRITTEN)

        if sconf.namespace_join_only:
            return self._join_only_master(pid, master_sock, rpc_master)
        return Master(self, common_json, sconf, pid, master_sock, rpc_master).main()

    def _join_only_master(
        self, pid: int, master_sock: socket.socket, rpc_master: socket.socket
    ) -> int:
        # No monitor_container runs (SPEC §5): the starter forwards what a monitor would
        # (§7), so that a signalled run ends with its container instead of leaving it.
        def forward(signum: int, _frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, forward)
        rpc_master.close()
        os.waitpid(self.sentinel, 0)  # no monitor in a join-only run
        kind, message = _recv_control(master_sock)
        if kind == Control.SETUP_FAILED:
            self.ledger.emit("starter_error", stage="namespaces", message=message)
        elif kind == Control.READY:
            _send(master_sock, Control.GO)
            try:
                kind, message = _recv_control(master_sock, Control.STAGE2_FAILED)
            except ControlProtocolError as exc:
                kind, message = Control.ABORT, str(control_abused(exc))
            if kind == Control.ABORT:
                self.ledger.emit("fatal", message=message)
                os.kill(pid, signal.SIGKILL)
            elif kind == Control.STAGE2_FAILED:
                self.ledger.emit("stage2_failed", message=message)
            else:
                self.ledger.emit("stage2_exec")
        master_sock.close()
        _, status = os.waitpid(pid, 0)
        self.ledger.emit("process_exit", child_role="container", child_pid=pid, status=status)
        if kind in (Control.SETUP_FAILED, Control.ABORT):
            return EXIT_FATAL
        return _status_to_code(status)
