"""Buggy engines of blind round 12 (operations, their order and their state), loaded as
``blind12_order:NAME`` with ``tests/`` on ``PYTHONPATH``.

Written from SPEC.md alone (§1, §2 and the error table), without reading the conformance
suite, the mutants or the other engines. Each engine subclasses a correct engine of
``blind12_order_correct`` and breaks exactly one rule of §1/§2, through its own mechanism;
the runs still complete (no hang).
"""

from __future__ import annotations

import os
import time
from typing import Any

from blind12_order_correct import (
    NestedStateEngine,
    PrecomputeEngine,
    SlowEngine,
    UtsNames,
    _check_hostname,
)

from kit import system
from kit.contract import Context, SignalChannel
from kit.rpc import RPCClient

#: Decisions of stage 1, kept where only stage 1 can see them (GlobalPlanEngine's bug).
_STAGE1_DECISIONS: dict[str, UtsNames] = {}


class GlobalPlanEngine(NestedStateEngine):
    """Keeps stage 1's resolved names in a module global, gone in the master (§2 rule 3).

    prepare_config stores the validated host/domain names in ``_STAGE1_DECISIONS`` instead of
    the ``resolved`` field; create_container reads the global, which is empty in the master
    (a separate process), and falls back to a default: the configured hostname is lost.
    Shows in every flow whenever ``uts.hostname`` is configured (the container gets
    ``blind12-nested`` instead).
    """

    engine_name = "blind12-order-global"
    escapes = (
        "§2 rule 3 is made true by the kit (separate processes); what the engine loses "
        "with its stage-1 global is its own configured hostname, seen only with a config "
        "the suite cannot know of (the engine's own schema); with its defaults every run "
        "is conformant"
    )

    def prepare_config(self, sc: Any) -> None:
        super().prepare_config(sc)
        cfg = self._cfg()
        assert cfg.resolved is not None
        _STAGE1_DECISIONS["names"] = cfg.resolved
        cfg.resolved = None  # "the global has it"

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self._cfg()
        names = _STAGE1_DECISIONS.get("names") or UtsNames()
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.sethostname(name=names.hostname)
        if names.domainname:
            rpc.setdomainname(name=names.domainname)
        for m in cfg.mounts:
            rpc.mount_tmpfs(target=m.target, size_kb=m.size_kb, flags=m.flags, mode=m.mode)
            self._mounted.append(m.target)


class SelfConfigEngine(PrecomputeEngine):
    """create_container calls self.config() for defaults: config runs twice (§2 rule 1).

    To tell a configured hostname prefix from the default one, create_container asks the
    engine's own ``config()`` for a fresh default object, so the master calls ``config`` a
    second time, after ``init_config`` (recorded as the engine's own call). Every flow.
    """

    engine_name = "blind12-order-selfconfig"
    escapes = (
        "§2 rule 1 is the starter's order (each process calls config then init_config "
        "once, before its own hook): the kit makes those calls. The engine calling its "
        "own factory method in a hook is recorded (caller: engine) and harmless; no "
        "sentence forbids it"
    )

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        plan = self._plan()
        defaults = self.config()
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.sethostname(name=plan.hostname)
        # A prefix the user chose: make sure the kernel kept the whole name.
        chosen = self._cfg().hostname_prefix != defaults.hostname_prefix
        if chosen and rpc.gethostname() != plan.hostname:
            raise RuntimeError("the configured hostname did not stick")


class EarlyUtsEngine(PrecomputeEngine):
    """prepare_config unshares a uts namespace to try the hostname: too early (§2 rule 2).

    To check that the kernel accepts the computed hostname, prepare_config creates a uts
    namespace (plus a user namespace when stage 1 has no privilege) in stage 1 and sets the
    name there: container work, a namespace, before the starter made any. Every flow where
    stage 1 may create the namespace (root: uts alone; others: user+uts); silently skipped
    where the kernel refuses.
    """

    engine_name = "blind12-order-early"

    def prepare_config(self, sc: Any) -> None:
        super().prepare_config(sc)
        plan = self._plan()
        sysif = system.current()
        kinds = ["uts"] if sc.flow == "root" else ["user", "uts"]
        try:
            sysif.unshare(kinds)
            sysif.sethostname(plan.hostname)
            _check_hostname(sysif.gethostname(), "hostname_prefix")
        except OSError:
            pass


class ChildPayloadEngine(PrecomputeEngine):
    """start_process runs the payload in a child and waits: stage 2 never execs (§1, rule 10).

    start_process forks, the child execs the payload, stage 2 waits for it and exits with
    its code: the payload is not stage 2 (not pid 1 of the container), stage 2 never became
    it, and the master never sees the exec (no post_start_process). Every flow.
    """

    engine_name = "blind12-order-childwait"

    def start_process(self, master_fd: int) -> None:
        cfg = self._cfg()
        plan = self._plan()
        os.chdir(cfg.workdir)
        child = os.fork()
        if child == 0:
            try:
                os.execve(plan.exe, cfg.argv, plan.env)
            finally:
                os._exit(127)
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)


class SelfTrackedPostStartEngine(SlowEngine):
    """monitor_container calls post_start_process itself if not done: twice/after fail (§2 r6).

    The engine tracks the exec itself: post_start_process marks itself done at its end, and
    monitor_container, once the container exited, calls ``self.post_start_process`` when it
    is not marked done "so that short payloads get their post-start work too". With a fast
    payload the kit's call is still sleeping, so it runs twice; when stage 2 fails (payload
    not found, start_process raising) it runs after the failure. Every flow.
    """

    engine_name = "blind12-order-selfpoststart"

    def init_config(self, common: Any, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        self._post_done = False
        self._ctx: Context | None = None

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        self._ctx = ctx
        super().create_container(ctx, pid, rpc_conn)

    def post_start_process(self, ctx: Context, pid: int) -> None:
        super().post_start_process(ctx, pid)
        self._post_done = True

    def monitor_container(self, pid: int, signals: SignalChannel) -> int:
        status = super().monitor_container(pid, signals)
        if not self._post_done:
            self.post_start_process(self._ctx or Context(), pid)
        return status


class PartialCleanupEngine(NestedStateEngine):
    """cleanup_container assumes create_container finished; raises on partial setup (§1, r7).

    create_container publishes the list of mounts only once all of them are made;
    cleanup_container iterates it unconditionally, so when create_container failed (a mount
    target missing) or never ran (the kit's injected failure), cleanup raises
    AttributeError instead of tolerating the partial setup. Shows in every flow with a
    failing create_container, e.g. ``--config '{"mounts":[{"target":"/nonexistent"}]}'``.
    """

    engine_name = "blind12-order-partial"

    def init_config(self, common: Any, privileged_stage1: bool) -> None:
        self.common = common
        self._cleaned = 0  # self._mounted is published by create_container once complete

    def create_container(self, ctx: Context, pid: int, rpc_conn: Any) -> None:
        cfg = self._cfg()
        assert cfg.resolved is not None
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.sethostname(name=cfg.resolved.hostname)
        if cfg.resolved.domainname:
            rpc.setdomainname(name=cfg.resolved.domainname)
        done = []
        for m in cfg.mounts:
            rpc.mount_tmpfs(target=m.target, size_kb=m.size_kb, flags=m.flags, mode=m.mode)
            done.append(m.target)
        self._mounted = done
        self._created_at = time.monotonic()

    def cleanup_container(self, ctx: Context, fatal: BaseException | None, status: Any) -> None:
        self._cleaned += 1
        for target in self._mounted:
            _ = target  # lives in the container's mount namespace: nothing to undo
        self._mounted.clear()
