"""Starter mutants: the reference engine run by a deliberately broken kit.

About a third of the MUST rules of ``SPEC.md`` are the starter's, not the engine's: the order
and process of every hook, the error table, the exit code, the namespaces and credentials the
starter itself sets up, the ledger. An engine cannot break them, so an engine mutant cannot
prove that the suite checks them. A starter mutant can: it is the reference engine plus one
change to the kit (a wrapper around one kit function), and the suite must fail it with a
requirement it declares, exactly like an engine mutant.

How the change gets into the run
    Registering a starter mutant applies its change to the kit *of the registering process*:
    :func:`registrar` makes one registration function per mutant, reachable only by its
    explicit ``module:attribute`` spec (:meth:`StarterMutant.spec`, e.g.
    ``mutants.zoo.starter:register_starter_config_twice``). The kit's zygote
    registers the engine of a run before it forks the supervisor, so every process of the
    run inherits the change. Use them only in a process of their own (the kill matrix runs
    one pytest session, hence one zygote, per mutant).

Some bugs are races in a real starter (a master that does not wait for the container to be
ready, say); the mutants make them deterministic with a short sleep on the losing side.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from kit.contract import Context, dumps
from kit.ledger.record import LedgerWriter
from kit.rpc import server as rpc_server
from kit.starter import common, container, master, stage1
from kit.starter import rpc_server as rpc_server_role
from kit.starter.config import StarterConfig
from kit.starter.control import Control
from kit.system import RealSystem, current, linux
from mutants.zoo.base import HostDamageRefused, Mutant
from mutants.zoo.lifecycle import HANG_TIMEOUT
from reference_engines.bind_rootfs import BindRootfsEngine, BindRootfsRPC

#: How long the losing side of a made-deterministic race waits (seconds).
RACE_DELAY = 0.2


def _process() -> str:
    """The kit's name of the calling process (``kit-starter``, ``kit-container``…)."""
    return linux.process_name("self") or ""


def _system_classes() -> list[type]:
    from kit.system.fake.system import FakeSystem

    return [RealSystem, FakeSystem]


def _wrap(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``owner.name`` by ``make(original)``."""
    setattr(owner, name, make(getattr(owner, name)))


def _wrap_system(name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Wrap a method of both system interfaces (the kernel and the fake backend's model)."""
    for cls in _system_classes():
        _wrap(cls, name, make)


def _leave_out(method: str, process: str, kind: str) -> None:
    """In the kit process ``process``, the system interface's ``clone`` or ``unshare``
    leaves namespace ``kind`` out of what it is asked to create."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def without(system: Any, kinds: Any = (), *args: Any, **kwargs: Any) -> Any:
            if _process() == process:
                kinds = [k for k in kinds if k != kind]
            return original(system, kinds, *args, **kwargs)

        return without

    _wrap_system(method, make)


def _wrap_hook_call(change: Callable[..., Any]) -> None:
    """Route every ``HookRunner.call`` through ``change(original, runner, hook, fn, *args)``."""
    original = common.HookRunner.call

    # The first parameter is named self, as in the method it replaces: mypy matches names.
    def call(self: common.HookRunner, hook: str, fn: Callable[..., Any], *args: Any) -> Any:
        return change(original, self, hook, fn, *args)

    common.HookRunner.call = call  # type: ignore[method-assign]  # the mutation


class StarterMutant(Mutant):
    """A mutant whose bug is in the kit: :meth:`mutate` changes the kit of this process."""

    #: The plain reference engine: the error paths of the kit's requirements are made by the
    #: kit itself (kit.starter.inject), so a starter bug there is caught without the engine's help.
    cooperative: ClassVar[bool] = False
    mechanism: ClassVar[str] = "starter"
    #: The bug leaves the container without the namespaces the engine asked for, so the
    #: reference's create_container would mount on the host's /proc and /tmp (hiding them
    #: from everything, the kill matrix's own sandbox included) and set the host's hostname:
    #: in the real backend such a mutant's create_container refuses (and fails) instead.
    #: The rules it breaks are about stage 1 and show all the same.
    no_namespaces: ClassVar[bool] = False
    #: The bug is the supervisor's, which never imports the engine: the kill matrix applies
    #: it in every interpreter of the session instead (mutants/site/sitecustomize.py).
    in_supervisor: ClassVar[bool] = False

    def create_container(self, ctx: Any, pid: int, rpc_conn: Any) -> None:
        if self.no_namespaces and current().name == "real":
            raise HostDamageRefused(
                f"mutant-{self.slug}: the container has none of the namespaces asked for; "
                "refusing to mount or set the hostname in the host's"
            )
        super().create_container(ctx, pid, rpc_conn)

    @staticmethod
    def mutate() -> None:
        raise NotImplementedError

    @classmethod
    def registrar_name(cls) -> str:
        return "register_" + cls.slug.replace("-", "_")

    @classmethod
    def spec(cls) -> str:
        """The ``--engine`` value that registers this mutant (and so mutates the kit)."""
        return f"{__name__}:{cls.registrar_name()}"


# --- hook order and processes (SPEC §2) --------------------------------------------------------


class ConfigTwice(StarterMutant):
    slug = "starter-config-twice"
    bug = "the starter calls config() a second time after init_config in every process"
    killed_by = ("ORDER-001",)

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def init_engine(runner: common.HookRunner, engine: Any, *args: Any) -> Any:
                common = original(runner, engine, *args)
                runner.call("config", engine.operations.config)
                return common

            return init_engine

        _wrap(common.HookRunner, "init_engine", make)


class PrivilegedStage1Everywhere(StarterMutant):
    slug = "starter-privileged-stage1-everywhere"
    bug = "the starter tells init_config privileged_stage1=True in every process and flow"
    killed_by = ("ORDER-002",)

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def init_engine(
                runner: common.HookRunner,
                engine: Any,
                config_json: Any,
                container_id: str,
                privileged_stage1: bool,
            ) -> Any:
                return original(runner, engine, config_json, container_id, True)

            return init_engine

        _wrap(common.HookRunner, "init_engine", make)


class PrepareConfigTwice(StarterMutant):
    slug = "starter-prepare-config-twice"
    bug = "stage 1 calls prepare_config twice"
    killed_by = ("ORDER-003",)

    @staticmethod
    def mutate() -> None:
        def change(
            original: Callable[..., Any],
            runner: common.HookRunner,
            hook: str,
            fn: Callable[..., Any],
            *args: Any,
        ) -> Any:
            if hook == "prepare_config":
                original(runner, hook, fn, *args)
            return original(runner, hook, fn, *args)

        _wrap_hook_call(change)


class Stage1HandsOverEarly(StarterMutant):
    slug = "starter-stage1-hands-over-early"
    bug = (
        "stage 1 sends its result before it calls prepare_config, and the starter goes on "
        "without waiting for stage 1 to exit"
    )
    killed_by = ("ORDER-004", "STATE-002")
    no_namespaces = True  # the StarterConfig handed over asks for no namespace

    @staticmethod
    def mutate() -> None:
        patch = _run_stage1_without_waiting
        stage1.Starter.run_stage1 = patch  # type: ignore[method-assign]  # the mutation


#: The other ends of the sockets stage 1 sends into once it handed its result over early.
_SINKS: list[socket.socket] = []


def _hand_over_before_prepare_config(channel: socket.socket) -> None:
    """In stage 1: send the result to the starter (on ``channel``) when prepare_config is
    about to be called, then call it (its changes are lost)."""

    def change(
        original: Callable[..., Any],
        runner: common.HookRunner,
        hook: str,
        fn: Callable[..., Any],
        *args: Any,
    ) -> Any:
        if hook != "prepare_config":
            return original(runner, hook, fn, *args)
        ops = fn.__wrapped__.__self__  # type: ignore[attr-defined]  # set by functools.wraps
        doc = {"common": ops.common.to_json(), "starter_config": args[0].to_json(), "kept": []}
        channel.sendall(dumps(doc).encode())
        # The starter sees EOF; stage 1's own send later goes into a socket nobody reads.
        sink, unread = socket.socketpair()
        os.dup2(sink.fileno(), channel.fileno())
        _SINKS.append(unread)  # open until stage 1 exits
        time.sleep(RACE_DELAY)
        return original(runner, hook, fn, *args)

    _wrap_hook_call(change)


def _run_stage1_without_waiting(self: stage1.Starter) -> tuple[dict[str, Any], StarterConfig]:
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        _hand_over_before_prepare_config(theirs)
        self._stage1_child(theirs)
    theirs.close()
    with ours:
        data, fds = linux.recv_with_fds(ours, stage1.MAX_KEPT_FDS)
    if not data:  # the bug: stage 1 is neither waited for nor its exit status checked
        raise common.StageFailed("stage 1 sent nothing")
    doc = json.loads(data)
    sconf = StarterConfig.from_json(doc["starter_config"])
    self.place_kept_fds(doc["kept"], fds, sconf.keep_fds)
    return doc["common"], sconf


class MasterHooksBeforeNamespaces(StarterMutant):
    slug = "starter-master-hooks-before-namespaces"
    bug = (
        "the container process reports ready before it sets up its namespaces, so the "
        "master's hooks start while the namespaces are still being made"
    )
    killed_by = ("ORDER-005",)

    @staticmethod
    def mutate() -> None:
        sent: list[bool] = []
        original_send = common._send

        def send(sock: Any, data: str) -> None:
            if data == "R" and sent:
                return  # already said so, too early
            original_send(sock, data)

        common._send = send

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def setup_namespaces(container: container.Container) -> None:
                original_send(container.sock, Control.READY)
                sent.append(True)
                time.sleep(RACE_DELAY)
                original(container)

            return setup_namespaces

        _wrap(container.Container, "setup_namespaces", make)


class MasterHooksInOneThread(StarterMutant):
    slug = "starter-master-hooks-in-one-thread"
    bug = "the master runs the start waiter (post_start_process) in monitor_container's thread"
    killed_by = ("ORDER-006",)

    @staticmethod
    def mutate() -> None:
        start_waiter, monitor = master.Master._start_waiter, master.Master._monitor

        def sequential(self: master.Master) -> None:
            start_waiter(self)
            monitor(self)

        def no_waiter(self: master.Master) -> None:
            """Starts no waiter thread (sequential runs it)."""

        master.Master._start_waiter = no_waiter  # type: ignore[method-assign]  # the mutation
        master.Master._monitor = sequential  # type: ignore[method-assign]  # the mutation


class Stage2BeforeCreateReturns(StarterMutant):
    slug = "starter-stage2-before-create-returns"
    bug = (
        "the master lets stage 2 start when create_container begins, and the RPC server "
        "detaches from the container process (which then never waits for it)"
    )
    killed_by = ("ORDER-007",)

    @staticmethod
    def mutate() -> None:
        sent: list[bool] = []
        original_send = common._send

        def send(sock: Any, data: str) -> None:
            if data == "G" and sent:
                return
            original_send(sock, data)

        common._send = send

        def make_create(original: Callable[..., Any]) -> Callable[..., Any]:
            def create(master: master.Master) -> None:
                master.go_sent.set()
                original_send(master.sock, Control.GO)
                sent.append(True)
                time.sleep(RACE_DELAY)
                original(master)

            return create

        _wrap(master.Master, "_create", make_create)

        def make_rpc(original: Callable[..., Any]) -> Callable[..., Any]:
            def main(rpc: rpc_server_role.RPCServerProcess) -> None:
                middle = os.getpid()
                if os.fork() != 0:
                    common._exit(0)
                while os.getppid() == middle:  # reparented to the container (its pid 1)
                    time.sleep(0.001)
                original(rpc)

            return main

        _wrap(rpc_server_role.RPCServerProcess, "main", make_rpc)


class PostStartAfterStage2Failure(StarterMutant):
    slug = "starter-post-start-after-stage2-failure"
    bug = "the master's start waiter takes every end of stage 2, even a failure, for the exec"
    killed_by = ("ORDER-010", "ERR-003", "ERR-008")
    cooperative = True  # ERR-003 is the engine's: start_process fails on the engine's request

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def wait_for_exec(master: master.Master) -> bool:
                original(master)
                return True

            return wait_for_exec

        _wrap(master.Master, "_wait_for_exec", make)


class CleanupAfterStage1Failure(StarterMutant):
    slug = "starter-cleanup-after-stage1-failure"
    bug = "the starter calls cleanup_container after stage 1 failed"
    killed_by = ("ORDER-012",)

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def run_stage1(starter: stage1.Starter) -> Any:
                try:
                    return original(starter)
                except common.StageFailed as exc:
                    from kit import registry

                    hooks = common.HookRunner(
                        starter.ledger.for_role("master"), starter.system, starter.req.probes
                    )
                    ops = registry.make_engine(starter.req.engine).operations
                    hooks.instrument(ops)
                    try:
                        hooks.call("cleanup_container", ops.cleanup_container, Context(), exc, None)
                    except common.HookFailed:
                        pass
                    raise

            return run_stage1

        _wrap(stage1.Starter, "run_stage1", make)


class HookInTheWrongProcess(StarterMutant):
    slug = "starter-hook-in-the-wrong-process"
    bug = "stage 2 calls post_start_process itself, before start_process"
    killed_by = ("ORDER-014",)

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def init_engine(runner: common.HookRunner, engine: Any, *args: Any) -> Any:
                common = original(runner, engine, *args)
                if runner.ledger.role == "stage2":
                    runner.call(
                        "post_start_process",
                        engine.operations.post_start_process,
                        Context(),
                        os.getpid(),
                    )
                return common

            return init_engine

        _wrap(common.HookRunner, "init_engine", make)


# --- pids and namespaces (SPEC §3, §5) ---------------------------------------------------------


class WrongPidToMasterHooks(StarterMutant):
    slug = "starter-wrong-pid-to-master-hooks"
    bug = (
        "the master passes create_container and post_start_process the container's pid "
        "as the container sees itself (1), not as the master sees it"
    )
    killed_by = ("PID-001",)

    @staticmethod
    def mutate() -> None:
        def change(
            original: Callable[..., Any],
            runner: common.HookRunner,
            hook: str,
            fn: Callable[..., Any],
            *args: Any,
        ) -> Any:
            if hook in ("create_container", "post_start_process"):
                args = (args[0], 1, *args[2:])
            return original(runner, hook, fn, *args)

        _wrap_hook_call(change)


class NoNewPidNamespace(StarterMutant):
    slug = "starter-no-new-pid-namespace"
    bug = "the starter clones the container without CLONE_NEWPID"
    killed_by = ("PID-002", "NS-005")

    @staticmethod
    def mutate() -> None:
        _leave_out("clone", "kit-starter", "pid")


class SkipsTheIpcNamespace(StarterMutant):
    slug = "starter-skips-the-ipc-namespace"
    bug = "the container process unshares every namespace it was asked for but ipc"
    killed_by = ("NS-005",)

    @staticmethod
    def mutate() -> None:
        _leave_out("unshare", "kit-container", "ipc")


class MountNamespaceFirst(StarterMutant):
    slug = "starter-mount-namespace-first"
    bug = "the container process creates its mount namespace before net, uts, ipc and cgroup"
    killed_by = ("NS-009",)

    @staticmethod
    def mutate() -> None:
        container.CONTAINER_NS_ORDER = ("mount", "net", "uts", "ipc", "cgroup")


class IgnoresMountPropagation(StarterMutant):
    slug = "starter-ignores-mount-propagation"
    bug = (
        "the container process makes / of its new mount namespace rslave whatever "
        "propagation the StarterConfig asks for (private by default)"
    )
    killed_by = ("NS-008",)

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def set_propagation(system: Any, target: str, propagation: str) -> None:
                if _process() == "kit-container":
                    propagation = "rslave"
                original(system, target, propagation)

            return set_propagation

        _wrap_system("set_propagation", make)


class BoundingKeptWhenUnset(StarterMutant):
    slug = "starter-bounding-kept-when-unset"
    bug = (
        "stage 2 limits its bounding set only when the StarterConfig sets one: an engine "
        "that leaves it unset gets the starter's whole bounding set instead of none"
    )
    killed_by = ("PRIV-STAGE2-002", "PRIV-PAYLOAD-002")
    flows = ("root",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        starter_config.capabilities["bounding"] = None  # left unset (SPEC §5: empty)

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def limit_bounding(system: Any, keep: int) -> None:
                if _process() != "kit-container":
                    original(system, keep)

            return limit_bounding

        _wrap_system("limit_bounding", make)


class _ChrootRPC(BindRootfsRPC):
    """The bind example's RPC methods with ``pivot_root`` done as a chroot of the RPC server
    (which moves the container process too, as long as the two share their fs struct)."""

    def pivot_root(self, new_root: str) -> None:
        if self.root is None or new_root != self.root or self.pivoted:
            raise ValueError(
                f"pivot_root: {new_root!r} is not the container root "
                f"({self.root!r}) or the root was changed already"
            )
        self.system.chdir(new_root)
        self.system.chroot(".")
        self.system.chdir("/")
        self.root = "/"
        self.pivoted = True


class RPCServerOwnFs(StarterMutant, BindRootfsEngine):
    slug = "starter-rpc-server-own-fs"
    bug = (
        "the container process clones the RPC server without CLONE_FS, so the root an RPC "
        "method sets (this engine: the bind-rootfs example, entered by chroot) is "
        "not stage 2's"
    )
    killed_by = ("NS-002",)
    rpc = _ChrootRPC

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def clone(system: Any, kinds: Any = (), share_fs: bool = False) -> int:
                if _process() == "kit-container":
                    share_fs = False
                return original(system, kinds, share_fs)

            return clone

        _wrap_system("clone", make)


def _skip_joining_the_container_user_namespace() -> None:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def setns(system: Any, kind: str, path: str) -> None:
            if kind == "user" and _process() == "kit-starter" and path.startswith("/proc/"):
                return
            original(system, kind, path)

        return setns

    _wrap_system("setns", make)


class MasterStaysInTheHostUserNamespace(StarterMutant):
    slug = "starter-master-stays-in-host-userns"
    bug = "in the userns flow the master never joins the container's user namespace"
    killed_by = ("NS-004",)
    flows = ("userns",)

    @staticmethod
    def mutate() -> None:
        _skip_joining_the_container_user_namespace()


class UserNamespaceFlowsRunAsRoot(StarterMutant):
    slug = "starter-userns-flows-as-root"
    bug = (
        "run by root, the starter of the user namespace flows stays root and clones the "
        "container without a user namespace"
    )
    killed_by = ("PRIV-STAGE1-004", "PRIV-MASTER-004", "PRIV-RPC-003", "PRIV-STAGE2-004")
    flows = ("fakeroot",)

    @staticmethod
    def mutate() -> None:
        def make_invoker(original: Callable[..., Any]) -> Callable[..., Any]:
            def become_invoker(starter: stage1.Starter) -> None:
                if starter.req.flow not in ("userns", "fakeroot"):
                    original(starter)

            return become_invoker

        _wrap(stage1.Starter, "become_invoker", make_invoker)

        def no_maps(self: stage1.Starter, pid: int, sconf: StarterConfig) -> None:
            """Writes no uid or gid map."""

        stage1.Starter._write_maps = no_maps  # type: ignore[method-assign]  # the mutation
        _leave_out("clone", "kit-starter", "user")
        _skip_joining_the_container_user_namespace()


class SetuidStage1KeepsSavedRoot(StarterMutant):
    slug = "starter-setuid-stage1-keeps-saved-root"
    bug = "stage 1 of the setuid starter drops only its effective uid and keeps saved uid 0"
    killed_by = ("PRIV-STAGE1-003",)
    flows = ("suid",)

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def become_user(
                system: Any, uid: int, gid: int, groups: Any, *args: Any, **kwargs: Any
            ) -> None:
                if _process() == "kit-stage1":
                    system.drop_effective(uid)
                    return
                original(system, uid, gid, groups, *args, **kwargs)

            return become_user

        _wrap_system("become_user", make)


# --- the StarterConfig and the hand-over (SPEC §4) ------------------------------------------


class NoStarterConfigValidation(StarterMutant):
    slug = "starter-no-config-validation"
    bug = "the starter uses the StarterConfig from stage 1 without validating it"
    killed_by = ("SC-001",)

    @staticmethod
    def mutate() -> None:
        # the mutation:
        StarterConfig.validate = lambda self, kit_fds=None: None  # type: ignore[method-assign]


class StarterConfigRecordedLate(StarterMutant):
    slug = "starter-config-recorded-late"
    bug = (
        "the starter records the StarterConfig it got from stage 1 only once the master "
        "runs, after the container started"
    )
    killed_by = ("STATE-003",)

    @staticmethod
    def mutate() -> None:
        held: list[tuple[LedgerWriter, dict[str, Any]]] = []

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def emit(writer: LedgerWriter, kind: str, **fields: Any) -> dict[str, Any]:
                if kind == "starter_config" and writer.role == "starter":
                    held.append((writer, fields))
                    return {"kind": kind, **fields}
                if writer.role == "master" and held:
                    starter, config = held.pop()
                    original(starter, "starter_config", **config)
                return original(writer, kind, **fields)

            return emit

        _wrap(LedgerWriter, "emit", make)


# --- the error table and the exit code (SPEC §2, §7) ------------------------------------------


def _swallow(
    role_hook: tuple[str, str], instead: Callable[..., Any] = lambda *args: None
) -> Callable[..., Any]:
    """A HookRunner.call change that ignores the failure of one hook of one role."""

    def change(
        original: Callable[..., Any],
        runner: common.HookRunner,
        hook: str,
        fn: Callable[..., Any],
        *args: Any,
    ) -> Any:
        try:
            return original(runner, hook, fn, *args)
        except common.HookFailed:
            if (runner.ledger.role, hook) != role_hook:
                raise
            return instead(*args)

    return change


class Stage1FailureIgnored(StarterMutant):
    slug = "starter-stage1-failure-ignored"
    bug = "stage 1 ignores an exception of prepare_config and hands over the StarterConfig"
    killed_by = ("ERR-001",)
    no_namespaces = True  # the StarterConfig handed over asks for no namespace

    @staticmethod
    def mutate() -> None:
        _wrap_hook_call(_swallow(("stage1", "prepare_config")))


class CreateFailureIgnored(StarterMutant):
    slug = "starter-create-failure-ignored"
    bug = "the master starts stage 2 even when create_container raised"
    killed_by = ("ERR-002",)

    @staticmethod
    def mutate() -> None:
        _wrap_hook_call(_swallow(("master", "create_container")))


class PostStartFailureIgnored(StarterMutant):
    slug = "starter-post-start-failure-ignored"
    bug = "the master ignores an exception of post_start_process"
    killed_by = ("ERR-004",)

    @staticmethod
    def mutate() -> None:
        _wrap_hook_call(_swallow(("master", "post_start_process")))


class MonitorFailureIgnored(StarterMutant):
    slug = "starter-monitor-failure-ignored"
    bug = (
        "when monitor_container raises, the master waits for the container itself and "
        "carries on as if nothing happened"
    )
    killed_by = ("ERR-005",)

    @staticmethod
    def mutate() -> None:
        _wrap_hook_call(
            _swallow(("master", "monitor_container"), lambda pid, signals: os.waitpid(pid, 0)[1])
        )


class CleanupFailureIsFatal(StarterMutant):
    slug = "starter-cleanup-failure-is-fatal"
    bug = "the master exits 255 at once when cleanup_container raises"
    killed_by = ("ERR-006",)

    @staticmethod
    def mutate() -> None:
        _wrap_hook_call(
            _swallow(("master", "cleanup_container"), lambda *args: common._exit(common.EXIT_FATAL))
        )


class FatalErrorExitsZero(StarterMutant):
    slug = "starter-fatal-error-exits-0"
    bug = "the master exits 0 after a fatal error"
    killed_by = ("EXIT-003",)

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def main(master: master.Master) -> int:
                code = original(master)
                return 0 if code == common.EXIT_FATAL else code

            return main

        _wrap(master.Master, "main", make)


class HookTimeoutUnnamed(StarterMutant):
    slug = "starter-hook-timeout-unnamed"
    bug = "the supervisor kills a run whose hook timed out without saying which hook it was"
    killed_by = ("ERR-007", "ORDER-008")
    hook_timeout = HANG_TIMEOUT
    in_supervisor = True

    @staticmethod
    def mutate() -> None:
        from kit.run.supervisor import Supervisor

        def make_emit(original: Callable[..., Any]) -> Callable[..., Any]:
            def emit(supervisor: Supervisor, kind: str, **fields: Any) -> None:
                if kind == "hook_timeout":
                    fields.update(hook=None, hook_role=None, open_hooks=[])
                original(supervisor, kind, **fields)

            return emit

        _wrap(Supervisor, "emit", make_emit)

        def make_on_timeout(original: Callable[..., Any]) -> Callable[..., Any]:
            def on_timeout(supervisor: Supervisor, whole_run: bool) -> None:
                original(supervisor, whole_run)
                if supervisor.timed_out is not None:
                    supervisor.timed_out.update(hook=None, hook_role=None, open_hooks=[])

            return on_timeout

        _wrap(Supervisor, "on_timeout", make_on_timeout)


# --- RPC, signals, ledger (SPEC §6, §7, §8) ---------------------------------------------------


class RPCRequestsOnThreads(StarterMutant):
    slug = "starter-rpc-request-threads"
    bug = "the RPC server hands every request to a thread of its own"
    killed_by = ("RPC-004",)

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def handle(server: Any, obj: Any, fds: Any) -> None:
                worker = threading.Thread(target=original, args=(server, obj, fds))
                worker.start()
                worker.join()

            return handle

        _wrap(rpc_server._Server, "_handle", make)


class RPCServerTakesPickle(StarterMutant):
    slug = "starter-rpc-server-takes-pickle"
    bug = "the RPC server unpickles a frame body that is not JSON"
    killed_by = ("RPC-005",)

    @staticmethod
    def mutate() -> None:
        import pickle

        from kit.rpc import codec

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def decode_body(body: bytes) -> Any:
                try:
                    return original(body)
                except codec.FrameError:
                    return pickle.loads(body)

            return decode_body

        _wrap(codec, "decode_body", make)


class RPCServerQuitsOnUnknownMethod(StarterMutant):
    slug = "starter-rpc-server-quits-on-unknown-method"
    bug = "the RPC server answers an unknown method, then hangs up"
    killed_by = ("RPC-006",)

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def fail(server: Any, start: float, rid: Any, obj: Any, exc: BaseException) -> None:
                original(server, start, rid, obj, exc)
                if type(exc).__name__ == "UnknownMethodError":
                    server._shutdown()

            return fail

        _wrap(rpc_server._Server, "_fail", make)


class MasterMissesSIGUSR1(StarterMutant):
    slug = "starter-master-misses-sigusr1"
    bug = "the master ignores SIGUSR1 instead of receiving it on the signals channel"
    killed_by = ("SIG-001",)

    @staticmethod
    def mutate() -> None:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            # Not a parameter named master: it would hide the module that owns MASTER_SIGNALS.
            def main(self: master.Master) -> int:
                master.MASTER_SIGNALS.discard(signal.SIGUSR1)  # this process's copy only
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)
                return original(self)

            return main

        _wrap(master.Master, "main", make)


class LedgerWithoutThreadIds(StarterMutant):
    slug = "starter-ledger-without-tids"
    bug = "the kit records process starts without the thread id the ledger schema requires"
    killed_by = ("LEDGER-001", "LEDGER-003")  # the supervisor refuses them as malformed

    @staticmethod
    def mutate() -> None:
        original_emit = LedgerWriter.emit

        def emit(
            self: LedgerWriter,
            kind: str,
            refresh: Callable[[], Any] | None = None,
            **fields: Any,
        ) -> dict[str, Any]:
            if kind != "process_start":
                return original_emit(self, kind, refresh, **fields)
            event = {
                "t": time.monotonic_ns(),
                "kind": kind,
                "role": self.role,
                "pid": os.getpid(),
                **fields,
            }
            if self.sock is not None:
                self.sock.send(json.dumps(event).encode())
            return event

        LedgerWriter.emit = emit  # type: ignore[method-assign]  # the mutation


MUTANTS: tuple[type[StarterMutant], ...] = (
    ConfigTwice,
    PrivilegedStage1Everywhere,
    PrepareConfigTwice,
    Stage1HandsOverEarly,
    MasterHooksBeforeNamespaces,
    MasterHooksInOneThread,
    Stage2BeforeCreateReturns,
    PostStartAfterStage2Failure,
    CleanupAfterStage1Failure,
    HookInTheWrongProcess,
    WrongPidToMasterHooks,
    NoNewPidNamespace,
    SkipsTheIpcNamespace,
    MountNamespaceFirst,
    IgnoresMountPropagation,
    RPCServerOwnFs,
    BoundingKeptWhenUnset,
    MasterStaysInTheHostUserNamespace,
    UserNamespaceFlowsRunAsRoot,
    SetuidStage1KeepsSavedRoot,
    NoStarterConfigValidation,
    StarterConfigRecordedLate,
    Stage1FailureIgnored,
    CreateFailureIgnored,
    PostStartFailureIgnored,
    MonitorFailureIgnored,
    CleanupFailureIsFatal,
    FatalErrorExitsZero,
    HookTimeoutUnnamed,
    RPCRequestsOnThreads,
    RPCServerTakesPickle,
    RPCServerQuitsOnUnknownMethod,
    MasterMissesSIGUSR1,
    LedgerWithoutThreadIds,
)

_mutated: list[str] = []  # the starter mutant applied in this process, if any


def registrar(mutant: type[StarterMutant]) -> Callable[[], None]:
    """The function that registers ``mutant`` and applies its change to this process's kit.

    At most one starter mutant per process: a second one is refused (their changes would
    add up and neither result would mean anything)."""

    def register() -> None:
        from conformance.cooperation import cooperative
        from kit.registry import register_operations, register_rpc_methods, registered

        name = f"mutant-{mutant.slug}"
        if _mutated and _mutated != [name]:
            raise RuntimeError(
                f"{name}: this process's kit is already mutated by "
                f"{_mutated[0]}; run each starter mutant in its own process"
            )
        if name in registered():
            return
        register_operations(name, cooperative(mutant) if mutant.cooperative else mutant)
        register_rpc_methods(name, mutant.rpc)
        mutant.mutate()
        _mutated.append(name)

    register.__name__ = register.__qualname__ = mutant.registrar_name()
    register.__doc__ = f"Register mutant-{mutant.slug} and mutate this process's kit: {mutant.bug}."
    return register


for _mutant in MUTANTS:
    globals()[_mutant.registrar_name()] = registrar(_mutant)
