"""Preflight: what can be checked about an engine before any lifecycle, without privilege."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from kit import registry
from kit.contract import Common, ConfigError, Engine, EngineConfig
from kit.run.request import Invoker
from kit.starter.config import StarterConfig
from kit.system import linux


class EngineNotLoaded(RuntimeError):
    """The engine's inspection could not load it (its import raised or hung)."""


@dataclass(frozen=True)
class Problem:
    """One thing to change before a lifecycle can be run."""

    engine: str
    hook: str  # the hook or step at fault: "registration", "config", "rpc_methods"
    message: str  # what to change first, then what was found

    def __str__(self) -> str:
        return f"engine {self.engine}: {self.hook}: {self.message}"


#: Seconds an inspection may take (the engine's import above all) before its child is killed.
INSPECT_TIMEOUT = 60.0
#: Seconds a non-root caller's intermediate has, after SIGTERM, to kill its descendants.
KILL_GRACE = 2.0
#: The most an inspection's child may write (its JSON result).
MAX_INSPECTION = 16 << 20
#: What the inspection's child writes first once the engine is imported.
IMPORTED = b"imported\n"
#: The capabilities an inspection's child keeps as U: reading, never writing (see _drop_to_invoker).
READ_CAPS = ("CAP_DAC_READ_SEARCH",)
#: The uid and gid an inspection runs as when the caller is root and has no test user U.
NOBODY = 65534

#: What a caller collects in the inspection's child: a function of the registration that returns
#: JSON, under a name of the caller's choosing (:attr:`Inspection.collected`).
Collector = Callable[[registry.Registration], Any]
#: The shape of a JSON value (:func:`conforms`): a type (``int`` is never a bool; ``object``:
#: any JSON), ``[shape]`` (a list of it), ``{key: shape}`` (exactly those keys), ``{str:
#: shape}`` (any string keys), or a tuple of shapes (any one of them).
Shape = Any
#: What a caller collects and the shape it expects back (the child's answer is engine-written).
Collect = tuple[Collector, Shape]


@dataclass
class Inspection:
    """What an engine's inspection found, in a child as the invoking user (:func:`inspect`):
    everything the kit's trusted processes need to know about the engine without importing it.
    JSON-serialisable (:meth:`to_json`)."""

    spec: str
    name: str | None = None  # the registration's name; None when it was not found
    origin: str = ""
    #: Why the engine could not be found: "registry" (a RegistryError: unknown name, bad
    #: import path), "import" (its module raised), "timeout" (its import hung), "child"
    #: (the inspection ended without a result); "" when it was found.
    failure: str = ""
    failure_message: str = ""
    #: The traceback of what the engine's module raised ("registry", "import"): the child's
    #: stderr is /dev/null, this is how the author sees where.
    failure_traceback: str = ""
    rpc_methods: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    collected: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, collected: dict[str, Shape] | None = None) -> Inspection:
        """The inspection ``data`` describes; ValueError unless it has the shape of one
        (with ``collected``: exactly those keys, each of its shape)."""
        shape = dict(_INSPECTION_SHAPE)
        if collected is not None:
            shape["collected"] = (collected, {})  # nothing is collected after a failure
        if not conforms(data, shape) or not _consistent(data, collected):
            raise ValueError(f"no inspection: {_short(data)}")
        problems = [Problem(**p) for p in data["problems"]]
        return cls(**{**data, "problems": problems})


_PROBLEM_SHAPE = {"engine": str, "hook": str, "message": str}
_INSPECTION_SHAPE: dict[str, Shape] = {
    "spec": str,
    "name": (str, type(None)),
    "origin": str,
    "failure": str,
    "failure_message": str,
    "failure_traceback": str,
    "rpc_methods": [str],
    "problems": [_PROBLEM_SHAPE],
    "collected": {str: object},
}


def _consistent(data: dict[str, Any], collected: dict[str, Shape] | None) -> bool:
    """A failure has a problem and collected nothing; a success collected every key asked
    for (the callers index them)."""
    if data["failure"]:
        return bool(data["problems"]) and not data["collected"]
    return collected is None or set(data["collected"]) == set(collected)


def conforms(value: Any, shape: Shape) -> bool:
    """Whether the JSON ``value`` has ``shape`` (see :data:`Shape`)."""
    if isinstance(shape, tuple):
        return any(conforms(value, one) for one in shape)
    if isinstance(shape, list):
        return isinstance(value, list) and all(conforms(v, shape[0]) for v in value)
    if isinstance(shape, dict):
        return isinstance(value, dict) and _conforms_dict(value, shape)
    if shape is object:
        return True
    if shape in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, shape)


def _conforms_dict(value: dict[Any, Any], shape: dict[Any, Shape]) -> bool:
    if list(shape) == [str]:
        return all(isinstance(k, str) and conforms(v, shape[str]) for k, v in value.items())
    return set(value) == set(shape) and all(conforms(value[k], s) for k, s in shape.items())


def check(spec: str, engine_config: dict[str, Any] | None = None) -> list[Problem]:
    """Every problem preflight finds for the engine ``spec`` (empty: go ahead), found by
    :func:`inspect` in a child: the caller never imports the engine.

    What it checks:

    - the engine is found and registers (a name, an entry point or ``module:attribute``);
    - ``config()`` returns an :class:`~kit.contract.EngineConfig` dataclass, and its JSON survives
      the round trip from stage 1 to the later processes (SPEC §2 rule 3); with an engine config
      given (``kit run --config``) every field of it is known and of the right type;
    - the RPC methods are servable: the class the RPC server instantiates can be built and every
      registered method is a callable attribute of it.
    """
    return inspect(spec, engine_config).problems


def inspect(
    spec: str,
    engine_config: dict[str, Any] | None = None,
    collect: dict[str, Collect] | None = None,
    timeout: float | None = None,
) -> Inspection:
    """Inspect the engine ``spec`` in a forked child that drops to the invoking user U (the
    test user; ``nobody`` when there is none) with no_new_privs before the engine is imported:
    the preflight checks of :func:`check`, its registration, and what each of ``collect``
    returns there. The engine is untrusted code (SPEC §11): its import and hooks never run in
    the caller, whose verdicts they could forge, nor as root outside a run's sandbox. Its
    answer is taken only in the shape of an :class:`Inspection` for ``spec`` whose
    :attr:`~Inspection.collected` has each shape ``collect`` gives (the engine's code can
    write on the pipe too); anything else is an inspection failure naming the engine.

    The caller waits up to ``timeout`` seconds (:data:`INSPECT_TIMEOUT`), then kills the child
    and names the engine's import as what hung."""
    return Inspecting(spec, engine_config, collect, timeout).result()


#: The engines an inspection of this process found, by spec and import path: only whether
#: and as what, which neither the engine config nor the collectors asked for change.
_found: dict[tuple[str, tuple[str, ...]], Inspection] = {}


def found(spec: str) -> Inspection:
    """Whether the engine ``spec`` can be found (``failure``), as :func:`inspect` says: that
    of an inspection this process already made with the same import path (``kit run``'s
    preflight, then its preload: one inspection child, not two), else a new one."""
    known = _found.get((spec, tuple(sys.path)))
    return known if known is not None else inspect(spec)


class Inspecting:
    """:func:`inspect` started: its child runs while the caller goes on (a one-shot run
    prepares itself meanwhile); :meth:`result` waits for the answer, :meth:`cancel` ends the
    child unasked. The timeout counts from the start."""

    def __init__(
        self,
        spec: str,
        engine_config: dict[str, Any] | None = None,
        collect: dict[str, Collect] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.spec = spec
        self.limit = INSPECT_TIMEOUT if timeout is None else timeout
        self.shapes = {key: shape for key, (_, shape) in (collect or {}).items()}
        collectors = {key: fn for key, (fn, _) in (collect or {}).items()}
        # The import path the answer holds for (found() asks with the caller's).
        self.path = tuple(sys.path)
        self.child = Contained(
            _drop_to_invoker,
            lambda wfd: _inspection_child(wfd, spec, engine_config, collectors),
            self.limit,
        )
        self.answer: Inspection | None = None

    def result(self) -> Inspection:
        """The inspection's answer, once the child has ended (killed at the timeout)."""
        if self.answer is None:
            self.answer = self._judge(self.child.finish())
            if not self.answer.failure:
                _found[(self.spec, self.path)] = self.answer
        return self.answer

    def cancel(self) -> None:
        """End the child if it has not answered (after :meth:`result`: nothing to do)."""
        self.child.cancel()

    def _judge(self, ended: Ended) -> Inspection:
        spec, limit = self.spec, self.limit
        imported = ended.data.startswith(IMPORTED)
        if not ended.in_time:
            what = (
                "its operations class, config() or its RPC methods class did not return"
                if imported
                else "importing it did not finish: make the engine module's top-level code "
                "return at once (it runs at every import)"
            )
            return _failed(
                spec, "timeout", f"{what} within {limit:g} s (the inspection was killed)"
            )
        try:
            answer = Inspection.from_json(
                json.loads(ended.data[len(IMPORTED) if imported else 0 :]), self.shapes
            )
        except (ValueError, RecursionError):  # JSONDecodeError too; [[[[… from engine code
            return _failed(
                spec,
                "child",
                f"inspecting it ended without a result in the kit's shape "
                f"({_status(ended.status)}): the engine's import or one of its hooks ended "
                "the process, or wrote on the inspection's pipe",
            )
        if answer.spec != spec:
            return _failed(spec, "child", f"its inspection answered for {answer.spec!r}")
        return answer


def _failed(spec: str, failure: str, message: str) -> Inspection:
    problem = Problem(spec, "registration", message)
    return Inspection(spec, failure=failure, failure_message=message, problems=[problem])


def _status(status: int | None) -> str:
    if status is None:
        return "its exit status was taken by another reaper"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


@dataclass(frozen=True)
class Ended:
    """How a contained child (:class:`Contained`) ended."""

    data: bytes  # what it wrote on its pipe (empty when it wrote too much)
    in_time: bool  # it closed the pipe and exited before the deadline
    status: int | None  # its wait status; None when another reaper took it


class Contained:
    """``body(wfd)`` (engine code) run in a contained child that first calls ``drop`` to
    become U; the caller goes on meanwhile, and :meth:`finish` takes what the child wrote on
    ``wfd`` (once) until it exits or ``limit`` seconds from the start pass.

    The child and everything it starts are ended by then, whatever the engine does: an
    intermediate (see :func:`_split`) makes it pid 1 of namespaces of its own (its end ends
    every descendant; the intermediate's SIGTERM or death ends it), it has no controlling
    terminal, no descriptor of the caller's but 0-2 on /dev/null and the pipe, a minimal
    environment, and it dies with the caller even after its drop to U."""

    def __init__(self, drop: Callable[[], None], body: Callable[[int], None], limit: float):
        rfd, wfd = os.pipe()
        try:
            watch = os.pidfd_open(os.getpid())  # the child's way to see we died (see _watch)
        except BaseException:
            os.close(rfd)
            os.close(wfd)
            raise
        # SIGCHLD held until the pidfd is open: a reaping handler (the zygote's) could take
        # a child that died at once, and its pid could be reused before we hold it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = 0
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child's coverage is its own process
                _contained_child(rfd, wfd, watch, drop, body)
            self.pidfd = _hold(pid)
        except BaseException:
            os.close(rfd)
            if pid > 0:  # interrupted after the fork (SIGINT): not reaped yet, so still ours
                os.kill(pid, signal.SIGTERM)  # the intermediate ends its namespace's processes
                os.waitpid(pid, 0)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(wfd)
            os.close(watch)
        self.pid, self.rfd = pid, rfd
        self.deadline = time.monotonic() + limit
        self.ended: Ended | None = None

    def finish(self) -> Ended:
        """Wait until the child exits or the deadline passes, and end it. Interrupted
        (KeyboardInterrupt), the child is killed and reaped all the same, and a second call
        answers what was read: its descriptors are given up before anything can raise."""
        if self.ended is not None:
            return self.ended
        rfd, pidfd, self.rfd, self.pidfd = self.rfd, self.pidfd, -1, -1
        data, eof, exited = b"", False, False
        try:
            if rfd >= 0:
                try:
                    data, eof = _read_until(rfd, self.deadline)
                finally:
                    os.close(rfd)
        finally:
            try:
                if pidfd >= 0:  # _end kills it by pidfd, even when interrupted
                    exited = _end(self.pid, pidfd, self.deadline if eof else time.monotonic())
            finally:
                self.ended = Ended(data, eof and exited, _reap(self.pid))
        return self.ended

    def cancel(self) -> None:
        """End the child now if it is not finished (its answer is not wanted: not read)."""
        if self.ended is None:
            self.deadline = time.monotonic()
            if self.rfd >= 0:
                rfd, self.rfd = self.rfd, -1
                os.close(rfd)
            self.finish()


def _hold(pid: int) -> int:
    """A pidfd on the child ``pid``; if none can be opened, the child is killed by pid and
    reaped (SIGCHLD is still blocked: nothing else can have reaped it, the pid is its)."""
    try:
        return os.pidfd_open(pid)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
        raise


def _end(pid: int, pidfd: int, deadline: float) -> bool:
    """Wait until the intermediate ``pid`` exits or ``deadline`` passes, then end it:
    SIGTERM (it kills every descendant), SIGKILL after :data:`KILL_GRACE`; whether it had
    exited in time."""
    try:
        exited = _wait_exit(pidfd, deadline)
        if not exited:  # the intermediate kills and reaps what is below it, then exits
            _signal(pidfd, signal.SIGTERM)
            if not _wait_exit(pidfd, time.monotonic() + KILL_GRACE):
                _signal(pidfd, signal.SIGKILL)  # its child dies with it (death signal)
        return exited
    except BaseException:  # interrupted while waiting (Ctrl-C): ended all the same
        _signal(pidfd, signal.SIGKILL)
        raise
    finally:
        os.close(pidfd)


def _wait_exit(pidfd: int, deadline: float) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)  # readable once the process has exited
    return bool(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))


def _signal(pidfd: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, sig)


def _reap(pid: int) -> int | None:
    """The wait status of the child ``pid`` (exited or killed); None when a SIGCHLD handler
    (the zygote's) reaped it first."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


def _read_until(rfd: int, deadline: float) -> tuple[bytes, bool]:
    """Everything the child writes on ``rfd`` until EOF, and whether EOF came before
    ``deadline``; more than :data:`MAX_INSPECTION` bytes count as nothing, at once."""
    data = b""
    waiting = select.poll()  # not select(): an fd numbered 1024 or more would raise
    waiting.register(rfd, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        # Past the deadline what is already there still counts (a Contained read late, its
        # caller busy meanwhile): read on without waiting until nothing is ready.
        if not waiting.poll(max(1, int(left * 1000) + 1) if left > 0 else 0):
            return data, False
        chunk = os.read(rfd, 65536)
        if not chunk:
            return data, True
        data += chunk
        if len(data) > MAX_INSPECTION:
            return b"", False


def _contained_child(
    rfd: int, wfd: int, watch: int, drop: Callable[[], None], body: Callable[[int], None]
) -> NoReturn:  # pragma: no cover - runs in the forked child
    code = 1
    try:
        os.close(rfd)
        # SIGTERM, not SIGKILL: this process becomes the intermediate, whose handler ends the
        # engine's processes from outside (they may clear their own death signal).
        linux.set_parent_death_signal(signal.SIGTERM)
        _watch(watch)
        # The caller's reaping SIGCHLD handler (the zygote's) would race our waits.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        _detach({wfd, watch})
        watch = _split(watch)
        linux.join_new_session_keyring()  # the caller's keys are not the engine's
        drop()
        linux.set_parent_death_signal(signal.SIGKILL)  # a credential change cleared it
        _watch(watch)
        os.close(watch)
        _minimal_environment()
        body(wfd)
        code = 0
    finally:
        os._exit(code)


def _watch(parent: int) -> None:
    """Exit if the process ``parent`` (a pidfd) has already died: its death signal, armed
    just before, would have come too late. (By pidfd: pid 1 of a new namespace has no
    parent pid to compare.)"""
    poller = select.poll()
    poller.register(parent, select.POLLIN)
    if poller.poll(0):
        os._exit(1)


def _detach(keep: set[int]) -> None:  # pragma: no cover - runs in the forked child
    """No terminal of the caller's (TIOCSTI could type into its shell): a session of our
    own, 0-2 on /dev/null, every other descriptor but ``keep`` closed."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if null != fd:
            os.dup2(null, fd)
    linux.close_fds_except({0, 1, 2, *keep})


#: The namespaces the engine's code runs in, of its own: pid (it is pid 1 there: its exit
#: ends every descendant), network (no host network for engine code), IPC, UTS, mount.
_OWN_NAMESPACES = (
    linux.CLONE_NEWPID
    | linux.CLONE_NEWNET
    | linux.CLONE_NEWIPC
    | linux.CLONE_NEWUTS
    | linux.CLONE_NEWNS
)


def _split(watch: int) -> int:  # pragma: no cover - runs in the forked child
    """Make this process an intermediate that never returns; its child returns here, with a
    pidfd on it, to run the engine's code. (Namespaces are made here, not in the caller:
    the kit's trusted processes never change theirs.)

    Preferred: the child is pid 1 of :data:`_OWN_NAMESPACES` (a non-root caller's inside a
    user namespace of its own), so that its end, or the intermediate's (its death signal),
    ends every descendant. Where the kernel refuses those namespaces (a non-root caller
    without unprivileged user namespaces, root without CAP_SYS_ADMIN), the intermediate is
    a subreaper instead: every orphan below it is reparented to it, and at the child's exit
    or SIGTERM from the caller it kills and reaps them all (best effort: as the same user,
    one could kill it first)."""
    _own_namespaces()
    linux.set_child_subreaper()  # in namespaces too: harmless, and the fallback's whole point
    # Our death signal ends the engine's processes from outside: the child (pid 1 of its
    # namespace, or the subreaper's first) may clear its own.
    signal.signal(signal.SIGTERM, _stop_intermediate)
    linux.set_parent_death_signal(signal.SIGTERM)  # entering a user namespace cleared it
    _watch(watch)
    os.close(watch)
    me = os.pidfd_open(os.getpid())
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        linux.set_parent_death_signal(signal.SIGKILL)
        _watch(me)
        return me
    os.close(me)
    status = _wait_for(pid)
    _end_descendants()
    _exit_as(status)


def _exit_as(status: int) -> NoReturn:  # pragma: no cover - runs in the intermediate
    """End as the child ended (its exit code, or its signal): the caller reports that."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        linux.set_dumpable(False)  # a SIGSEGV passed on must write no core of ours
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is not to end a process
    os._exit(os.WEXITSTATUS(status))


def _own_namespaces() -> bool:  # pragma: no cover - runs in the forked child
    """Enter :data:`_OWN_NAMESPACES` (for a non-root caller in a user namespace mapping it to
    itself) with mounts that never propagate to the host; False when the kernel refuses."""
    uid, gid = os.getuid(), os.getgid()
    try:
        if os.geteuid() == 0:
            linux.unshare(_OWN_NAMESPACES)
        else:
            linux.unshare(linux.CLONE_NEWUSER | _OWN_NAMESPACES)
            _map_self(uid, gid)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    except OSError:
        return False
    return True


def _map_self(uid: int, gid: int) -> None:  # pragma: no cover - runs in the forked child
    maps = (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1"))
    for name, text in maps:
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _wait_for(pid: int) -> int:  # pragma: no cover - runs in the intermediate
    """Reap children (orphans reparented to a subreaper) until ``pid`` ends; its status."""
    while True:
        got, status = os.waitpid(-1, 0)
        if got == pid:
            return status


def _stop_intermediate(signum: int, frame: object) -> None:  # pragma: no cover
    _end_descendants()
    os._exit(1)


def _end_descendants() -> None:  # pragma: no cover - runs in the intermediate
    """Kill and reap every descendant (a subreaper's orphans are its children) until none
    is left; a no-op in a user namespace, where the pid 1 child took them with it."""
    while True:
        left = linux.descendants(os.getpid())
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        if not left:
            return
        time.sleep(0.01)  # the killed ones die and are reparented to us: reap them next


#: Environment variables the inspection's child keeps (the engine's import may need them);
#: the caller's others (tokens, SSH agents, ...) are none of the engine's business.
KEPT_ENVIRONMENT = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "KIT_TEST_USER",
)


def _minimal_environment() -> None:  # pragma: no cover - runs in the forked child
    kept = {k: os.environ[k] for k in KEPT_ENVIRONMENT if k in os.environ}
    os.environ.clear()
    os.environ.update(kept)


def _inspection_child(
    wfd: int, spec: str, engine_config: dict[str, Any] | None, collect: dict[str, Collector]
) -> None:  # pragma: no cover - runs in the forked child
    result = _inspect_here(spec, engine_config, collect, wfd).to_json()
    _write_all(wfd, json.dumps(result, default=repr).encode())


def _drop_to_invoker() -> None:
    """Become U (groups, gids, uids) with no_new_privs; as a non-root caller, stay U. Of
    root's capabilities only :data:`READ_CAPS` stay: the engine's files are found wherever
    its root caller could read them (a directory only root may read, such as pytest's
    tmp_path), and nothing of the host can be changed that U could not change."""
    if os.geteuid() == 0:
        try:
            user = Invoker.resolve()
            uid, gid, groups = user.uid, user.gid, list(user.groups)
        except ValueError:
            uid, gid, groups = NOBODY, NOBODY, []
        linux.set_keepcaps(True)
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        keep = linux.caps_to_mask(READ_CAPS)
        linux.capset(keep, keep, 0)
        linux.set_keepcaps(False)
    linux.set_no_new_privs()


def _inspect_here(
    spec: str, engine_config: dict[str, Any] | None, collect: dict[str, Collector], wfd: int
) -> Inspection:
    """In the inspection's child: find the engine (then say so on ``wfd``), run the
    preflight checks, collect."""
    try:
        reg = registry.find(spec)
        os.write(wfd, IMPORTED)
    except registry.RegistryError as exc:
        return _with_traceback(_failed(spec, "registry", str(exc)), exc.__cause__)
    except Exception as exc:  # noqa: BLE001 the engine's module failed to import or to register
        failed = _failed(spec, "import", f"loading it raised {type(exc).__name__}: {exc}")
        return _with_traceback(failed, exc)
    found = Inspection(spec, reg.name, reg.origin, rpc_methods=sorted(reg.rpc_specs))
    found.problems = _checks(reg, engine_config)
    for key, collector in collect.items():
        found.collected[key] = collector(reg)
    return found


#: The most of a traceback an inspection carries back (its last lines: where it was raised).
MAX_TRACEBACK = 8192


def _with_traceback(found: Inspection, exc: BaseException | None) -> Inspection:
    if exc is not None:
        text = "".join(traceback.format_exception(exc))
        found.failure_traceback = text[-MAX_TRACEBACK:]
    return found


def _checks(reg: registry.Registration, engine_config: dict[str, Any] | None) -> list[Problem]:
    try:
        operations = reg.factory()
    except Exception as exc:  # noqa: BLE001 the engine's constructor may raise anything
        return [
            Problem(
                reg.name,
                "registration",
                f"make the operations class constructible "
                f"without arguments: creating it raised {type(exc).__name__}: {exc}",
            )
        ]
    problems = _config(reg.name, operations, engine_config)
    problems += _rpc_methods(reg, operations)
    return problems


def _config(name: str, operations: Any, engine_config: dict[str, Any] | None) -> list[Problem]:
    try:
        cfg = operations.config()
    except Exception as exc:  # noqa: BLE001 the engine's config() may raise anything
        return [
            Problem(
                name,
                "config",
                f"make config() return a fresh EngineConfig without "
                f"raising: it raised {type(exc).__name__}: {exc}",
            )
        ]
    if not isinstance(cfg, EngineConfig) or not dataclasses.is_dataclass(cfg):
        return [
            Problem(
                name,
                "config",
                "return an instance of a @dataclass subclass of "
                "kit.EngineConfig from config() (every process calls it): it returned "
                f"{type(cfg).__name__} {_short(cfg)}",
            )
        ]
    try:
        data = cfg.to_json()
        text = json.dumps(data)
        again = type(cfg).from_json(json.loads(text)).to_json()
    except (ConfigError, TypeError, ValueError) as exc:
        return [
            Problem(
                name,
                "config",
                "make every field of the engine config a JSON value "
                "or a nested EngineConfig (only JSON crosses from stage 1 to the "
                f"later processes): {exc}",
            )
        ]
    if again != data:
        return [
            Problem(
                name,
                "config",
                "make the engine config survive the JSON round trip "
                f"from stage 1 to the later processes: {_short(data)} came back as "
                f"{_short(again)}",
            )
        ]
    if engine_config is not None:
        try:
            type(cfg).from_json(engine_config)
        except ConfigError as exc:
            return [Problem(name, "config", f"fix the engine config given: {exc}")]
    return []


def _rpc_methods(reg: registry.Registration, operations: Any) -> list[Problem]:
    if reg.rpc_methods is None:
        return []
    try:
        instance = reg.rpc_methods(Engine(name=reg.name, operations=operations))
    except Exception as exc:  # noqa: BLE001 the engine's RPC methods class may raise anything
        return [
            Problem(
                reg.name,
                "rpc_methods",
                f"make {reg.rpc_methods.__qualname__}(engine) "
                f"constructible as the RPC server builds it: it raised "
                f"{type(exc).__name__}: {exc}",
            )
        ]
    missing = [m for m in reg.rpc_specs if not callable(getattr(instance, m, None))]
    if missing:
        return [
            Problem(
                reg.name,
                "rpc_methods",
                f"make {', '.join(missing)} callable methods "
                f"of {reg.rpc_methods.__qualname__} instances (the RPC server serves "
                "them from one)",
            )
        ]
    return []


def _short(value: Any, width: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


#: Flows whose stage 1 runs as U without privilege (preflight may run prepare_config there).
UNPRIVILEGED_FLOWS = ("suid", "userns", "fakeroot", "hybrid")
#: Seconds prepare_config may take in preflight before its child is killed (no verdict then).
PREPARE_TIMEOUT = 10.0


def starter_configs(
    spec: str, flows: list[str] | tuple[str, ...], uid: int, gid: int, groups: list[int]
) -> list[Problem]:
    """Problems of the StarterConfig ``prepare_config`` fills in each unprivileged flow of
    ``flows``, found by running stage 1's hooks as U (``uid``/``gid``) in a forked child.
    Only a StarterConfig that the starter would reject is a problem here.

    The flows are suid, userns, fakeroot and hybrid (SPEC §5's combinations). Stage 1 runs there as
    the invoking user U without any privilege, so preflight does the same: the child drops to U
    (groups, gids, uids) with no_new_privs before the engine's code runs, and only the
    StarterConfig's validation is judged (a hook that raises there may depend on what the starter
    sets up; the lifecycle reports it as its root cause).

    Not run here: ``prepare_config`` of the root flow, which runs as uid 0 with every capability and
    may touch the system; in the caller (a pytest process, as root) it would have privileges and
    side effects outside any run's sandbox. The starter validates that StarterConfig before any
    namespace exists and the suite reports a rejection as the run's root cause.
    """
    return StarterConfigCheck(spec, flows, uid, gid, groups).problems()


class StarterConfigCheck:
    """:func:`starter_configs` started (its child runs while the caller goes on, an
    inspection say): :meth:`problems` waits for it, :meth:`cancel` ends it unasked. One
    :data:`PREPARE_TIMEOUT`, from the start, covers the engine's import and every flow,
    whose stage-1 hooks run at the same time, each in a child of its own."""

    def __init__(
        self, spec: str, flows: list[str] | tuple[str, ...], uid: int, gid: int, groups: list[int]
    ) -> None:
        self.spec = spec
        self.flows = [f for f in dict.fromkeys(flows) if f in UNPRIVILEGED_FLOWS]
        if os.geteuid() == 0 and uid == 0:
            self.flows = []  # U must be unprivileged: never run engine code as root here
        self.child = _stage1_in_child(spec, self.flows, uid, gid, groups) if self.flows else None

    def problems(self) -> list[Problem]:
        reasons = _stage1_verdicts(self.child.finish(), self.flows) if self.child else {}
        by_reason: dict[str, list[str]] = {}
        for flow in self.flows:
            reason = reasons.get(flow)
            if reason:
                by_reason.setdefault(reason, []).append(flow)
        return [
            Problem(
                self.spec,
                "prepare_config",
                f"fix the StarterConfig that prepare_config fills "
                f"in the {', '.join(fl)} flow{'s' if len(fl) > 1 else ''} (stage 1, run "
                f"as the invoking user): the starter would refuse it: {reason}",
            )
            for reason, fl in by_reason.items()
        ]

    def cancel(self) -> None:
        if self.child is not None:
            self.child.cancel()


def _stage1_in_child(
    spec: str, flows: list[str], uid: int, gid: int, groups: list[int]
) -> Contained:
    """The child that finds why the StarterConfig of each of ``flows`` is invalid, started
    and contained as an inspection (:class:`Contained`): it imports the engine once, then
    forks one child per flow, as the starter forks stage 1 after its import, so each flow's
    hooks start from the same state and none sees what another's left behind."""

    def drop() -> None:
        _become(uid, gid, groups)

    def body(wfd: int) -> None:
        _stage1_flows(wfd, spec, flows, uid, gid)

    return Contained(drop, body, PREPARE_TIMEOUT)


def _stage1_verdicts(ended: Ended, flows: list[str]) -> dict[str, str | None]:
    """flow -> why its StarterConfig is invalid (None: valid), from what the child of
    :func:`_stage1_in_child` wrote; a flow whose hooks hung has no verdict, the others keep
    theirs (what came before the deadline counts, line by line)."""
    verdicts: dict[str, str | None] = {}
    for line in ended.data.splitlines():
        try:
            flow, reason = json.loads(line)
        except (ValueError, TypeError, RecursionError):  # engine code holds the pipe too
            continue  # cut at the deadline, or not the kit's: no verdict from it
        if flow in flows and isinstance(reason, str) and flow not in verdicts:
            verdicts[flow] = reason or None
    return verdicts


def _stage1_flows(
    wfd: int, spec: str, flows: list[str], uid: int, gid: int
) -> None:  # pragma: no cover - runs in the contained child
    """In the contained child, as U: the engine imported once, then stage 1 of each flow in
    a child of its own (all at once); one JSON line ``[flow, reason]`` on ``wfd`` for each
    as it ends ("" when valid)."""
    try:
        registry.find(spec)
    except Exception:  # noqa: BLE001 engine code: the lifecycle names it as root cause
        return
    pending: dict[int, tuple[str, int]] = {}  # read end -> (flow, child pid)
    for flow in flows:
        rfd, child_wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # The kit's pipe and the other flows' answers are none of this flow's
                # business (the engine's own descriptors stay, as in stage 1).
                for fd in (wfd, rfd, *pending):
                    os.close(fd)
                linux.set_parent_death_signal(signal.SIGKILL)
                reason = _child(spec, flow, uid, gid) or ""
                _write_all(child_wfd, reason.encode()[:_MAX_REASON])
                code = 0
            finally:
                os._exit(code)
        os.close(child_wfd)
        pending[rfd] = (flow, pid)
    poller = select.poll()
    for rfd in pending:
        poller.register(rfd, select.POLLIN)
    got: dict[int, bytes] = dict.fromkeys(pending, b"")
    while pending:
        for rfd, _ in poller.poll():
            chunk = os.read(rfd, 65536)
            if chunk:
                got[rfd] = (got[rfd] + chunk)[:_MAX_REASON]
                continue
            poller.unregister(rfd)
            os.close(rfd)
            flow, pid = pending.pop(rfd)
            line = json.dumps([flow, got[rfd].decode(errors="replace")]) + "\n"
            _write_all(wfd, line.encode())  # before the reaping: a flow never waits on another
            with contextlib.suppress(ChildProcessError):  # the engine's SIGCHLD may be SIG_IGN
                os.waitpid(pid, os.WNOHANG)  # else reaped as this pid namespace ends


#: The most of a flow's reason that is kept: a line (JSON escapes a byte in up to six) fits
#: a pipe's buffer many times over, so a late reader (past the deadline, reading only what
#: is there) finds it whole.
_MAX_REASON = 4096


def _write_all(fd: int, data: bytes) -> None:
    """``data`` written whole (a write to a pipe may return short if a signal, the engine's
    handler say, comes while it waits for room)."""
    os.set_blocking(fd, True)  # engine code may have made it non-blocking
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _become(uid: int, gid: int, groups: list[int]) -> None:  # pragma: no cover - in the child
    """Become U as stage 1 of an unprivileged flow runs: no capability, no_new_privs."""
    if os.geteuid() == 0:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    linux.set_no_new_privs()


def _child(spec: str, flow: str, uid: int, gid: int) -> str | None:
    """In the contained child, as U: run config, init_config and prepare_config as stage 1
    of ``flow`` does, and return why the StarterConfig is invalid (None when it is valid, or
    when something else than its validation failed)."""
    try:
        engine = registry.make_engine(spec)
        ops = engine.operations
        cfg = ops.config()
        cfg.update_from_json({"argv": ["/bin/true"]})  # as the launcher fills it for a run
        ops.init_config(Common(engine.name, "kit-preflight", cfg), flow in ("suid", "hybrid"))
        sconf = StarterConfig(flow, uid, gid)
        ops.prepare_config(sconf)
    except Exception:  # noqa: BLE001 engine code; not a StarterConfig problem
        return None  # not a StarterConfig problem: the lifecycle names it as root cause
    try:
        sconf.validate()
    except ConfigError as exc:
        return str(exc)
    return None
