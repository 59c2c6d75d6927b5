"""What the contract expects, as data: privileges, namespaces, order and errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The privilege table of SPEC.md §4, the namespace rules, the order rules of §2 and the error table.
# Nothing here looks at a ledger: conformance.checks reads these tables and applies them to the
# events of a run. A test says which requirement it decides and the checks find the rows tagged with
# that requirement, so the table is the single place where a cell of the contract is written down.
FLOWS = ("root", "suid", "userns", "fakeroot", "hybrid")
ROLES = ("stage1", "master", "rpc", "stage2")
HOOK_KINDS = ("hook_enter", "hook_return", "hook_raise")
#: The RPC server's credentials around every method, read from its ``rpc_call`` records (SPEC
#: §4: the table holds at every RPC method entry and return, on every thread).
METHOD_KINDS = ("rpc_method_enter", "rpc_method_return")

# Symbols for ids (uids of a snapshot, real/effective/saved). ZERO: the id is 0 in the process's own
# user namespace. INVOKER: the id is U, literally (the process is in the host user namespace).
# MAPS_TO_U: the id, translated through the process's uid_map, is U on the host. ROOT_AS_U: the id
# is 0 in the process's user namespace and that 0 is U on the host. TARGET: the target uid the
# StarterConfig asks for (0 when none). None: not constrained.
ZERO, INVOKER, MAPS_TO_U, ROOT_AS_U, TARGET = (
    "0",
    "U",
    "maps to U",
    "0 = U on the host",
    "target uid",
)

# --- §1: which process runs which hook ---------------------------------------------------------

#: Hooks each process role calls in a successful run, in order of first call.
ROLE_HOOKS: dict[str, tuple[str, ...]] = {
    "stage1": ("config", "init_config", "prepare_config"),
    "master": (
        "config",
        "init_config",
        "create_container",
        "post_start_process",
        "monitor_container",
        "cleanup_container",
    ),
    "rpc": ("config", "init_config"),
    "stage2": ("config", "init_config", "start_process"),
}
#: hook -> the roles allowed to run it (ORDER-014).
HOOK_ROLES: dict[str, frozenset[str]] = {}
for _role, _hooks in ROLE_HOOKS.items():
    for _hook in _hooks:
        HOOK_ROLES.setdefault(_hook, frozenset())
        HOOK_ROLES[_hook] = HOOK_ROLES[_hook] | {_role}


# --- §4: the privilege table -------------------------------------------------------------------


@dataclass(frozen=True)
class Uids:
    """Real, effective and saved uid (one of the symbols above, or None). The fs uid is the
    fourth uid SPEC §4 reads: the kernel keeps it equal to the effective one (setresuid,
    exec), so a cell that constrains the effective uid constrains it the same way."""

    real: str | None
    effective: str | None
    saved: str | None

    @property
    def slots(self) -> tuple[tuple[str, str | None], ...]:
        """(name, symbol) of the real, effective, saved and fs uid, in snapshot order."""
        return (
            ("real", self.real),
            ("effective", self.effective),
            ("saved", self.saved),
            ("fs", self.effective),
        )

    def describe(self) -> str:
        parts = [f"{name}={value}" for name, value in self.slots if value is not None]
        return "uid " + ", ".join(parts)


@dataclass(frozen=True)
class Caps:
    """Capability sets. ``kind``: ``full`` (effective = permitted = bounding, not empty),
    ``none`` (effective, permitted, inheritable and ambient empty), ``configured`` (exactly
    what the StarterConfig asks for), ``effective`` (the effective set is exactly
    ``names``)."""

    kind: str
    names: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "full":
            return "full capabilities (effective = permitted = bounding set)"
        if self.kind == "none":
            return "no capabilities (effective, permitted, inheritable, ambient empty)"
        if self.kind == "configured":
            return "exactly the capabilities the StarterConfig configures"
        return f"effective capabilities exactly {list(self.names) or 'none'}"


@dataclass(frozen=True)
class BoundingSmallerThan:
    """The bounding set is a strict subset of ``role``'s bounding set in the same run."""

    role: str

    def describe(self) -> str:
        return f"a bounding set strictly smaller than the {self.role}'s"


@dataclass(frozen=True)
class Escalation:
    """The kit's escalation probe (at hook entry) can regain host privilege or not."""

    possible: bool

    def describe(self) -> str:
        return "escalation to host privilege " + ("possible" if self.possible else "impossible")


@dataclass(frozen=True)
class NoHostPrivilege:
    """No uid 0 (real, effective, saved) and no permitted capability while in the host
    user namespace, the one the kit was launched in, known by its identity (SPEC §4's
    definition of host privilege)."""

    def describe(self) -> str:
        return "no host privilege"


@dataclass(frozen=True)
class NoNewPrivs:
    value: bool

    def describe(self) -> str:
        return f"no_new_privs {'set' if self.value else 'clear'}"


@dataclass(frozen=True)
class SameIdsAsStage2:
    """(The payload) the whole credential that stage 2 had when start_process began, as
    exec derives it (uids, gids, groups, no_new_privs, seccomp, capabilities)."""

    def describe(self) -> str:
        return "the credential stage 2 had when start_process began"


@dataclass(frozen=True)
class CapsWithinStage2:
    """(The payload) no capability outside stage 2's permitted set at start_process."""

    def describe(self) -> str:
        return "no capability outside stage 2's permitted set at start_process"


Aspect = (
    Uids
    | Caps
    | BoundingSmallerThan
    | Escalation
    | NoHostPrivilege
    | NoNewPrivs
    | SameIdsAsStage2
    | CapsWithinStage2
)


@dataclass(frozen=True)
class Expect:
    """One aspect of a cell of the privilege table, tagged with its requirement.

    ``scope``: ``process`` checks every thread of the snapshot, ``thread`` only the thread
    that runs the hook (SPEC §4 makes every rule hold for every thread: no row uses it). ``at``:
    the event kinds it applies to (escalation is only probed at hook entry)."""

    requirement: str
    aspect: Aspect
    scope: str = "process"
    at: tuple[str, ...] = HOOK_KINDS + METHOD_KINDS


def _suid_stage1() -> tuple[Expect, ...]:
    return (
        Expect("PRIV-STAGE1-001", Uids(INVOKER, INVOKER, INVOKER)),
        Expect("PRIV-STAGE1-002", Caps("none")),
        Expect("PRIV-STAGE1-003", Escalation(False), at=("hook_enter",)),
    )


def _user_stage1() -> tuple[Expect, ...]:
    return (
        Expect("PRIV-STAGE1-001", Uids(INVOKER, INVOKER, INVOKER)),
        Expect("PRIV-STAGE1-004", NoHostPrivilege()),
    )


def _suid_master() -> tuple[Expect, ...]:
    return (
        Expect("PRIV-MASTER-001", Uids(INVOKER, INVOKER, ZERO)),
        Expect("PRIV-MASTER-002", Caps("effective", ())),
        Expect("PRIV-MASTER-003", Escalation(True), at=("hook_enter",)),
    )


def _fakeroot_stage2() -> tuple[Expect, ...]:
    return (
        Expect("PRIV-STAGE2-001", Uids(ROOT_AS_U, ROOT_AS_U, ROOT_AS_U)),
        Expect("PRIV-STAGE2-004", NoHostPrivilege()),
    )


#: role -> flow -> what every hook snapshot of that role must show (SPEC §4).
PRIVILEGES: dict[str, dict[str, tuple[Expect, ...]]] = {
    "stage1": {
        "root": (
            Expect("PRIV-STAGE1-001", Uids(ZERO, ZERO, ZERO)),
            Expect("PRIV-STAGE1-002", Caps("full")),
        ),
        "suid": _suid_stage1(),
        "userns": _user_stage1(),
        "fakeroot": _user_stage1(),
        "hybrid": _suid_stage1(),
    },
    "master": {
        "root": (Expect("PRIV-MASTER-001", Uids(ZERO, ZERO, ZERO)),),
        "suid": _suid_master(),
        "userns": (
            Expect("PRIV-MASTER-001", Uids(None, None, MAPS_TO_U)),
            Expect("PRIV-MASTER-003", Escalation(False), at=("hook_enter",)),
            Expect("PRIV-MASTER-004", NoHostPrivilege()),
        ),
        "fakeroot": (Expect("PRIV-MASTER-004", NoHostPrivilege()),),
        "hybrid": _suid_master(),
    },
    "rpc": {
        "root": (Expect("PRIV-RPC-001", Uids(ZERO, ZERO, ZERO)),),
        "suid": (
            Expect("PRIV-RPC-001", Uids(None, INVOKER, None)),
            Expect("PRIV-RPC-002", Caps("effective", ("CAP_SYS_ADMIN",))),
            Expect("PRIV-RPC-002", BoundingSmallerThan("master")),
        ),
        "userns": (Expect("PRIV-RPC-003", NoHostPrivilege()),),
        "fakeroot": (
            Expect("PRIV-RPC-001", Uids(None, ZERO, None)),
            Expect("PRIV-RPC-003", NoHostPrivilege()),
        ),
        "hybrid": (
            Expect("PRIV-RPC-001", Uids(None, MAPS_TO_U, None)),
            Expect("PRIV-RPC-002", Caps("effective", ("CAP_SYS_ADMIN",))),
            Expect("PRIV-RPC-002", BoundingSmallerThan("master")),
        ),
    },
    "stage2": {
        "root": (
            Expect("PRIV-STAGE2-001", Uids(TARGET, TARGET, TARGET)),
            Expect("PRIV-STAGE2-002", Caps("configured")),
        ),
        "suid": (
            Expect("PRIV-STAGE2-001", Uids(INVOKER, INVOKER, INVOKER)),
            Expect("PRIV-STAGE2-002", Caps("configured")),
            Expect("PRIV-STAGE2-003", NoNewPrivs(True)),
        ),
        "userns": (
            Expect("PRIV-STAGE2-001", Uids(MAPS_TO_U, MAPS_TO_U, MAPS_TO_U)),
            Expect("PRIV-STAGE2-004", NoHostPrivilege()),
        ),
        "fakeroot": _fakeroot_stage2(),
        "hybrid": _fakeroot_stage2(),
    },
}

#: The payload after exec (read from its own /proc/self/status): flow -> expectations.
PAYLOAD: dict[str, tuple[Expect, ...]] = {
    flow: ((Expect("PRIV-PAYLOAD-001", NoHostPrivilege()),) if flow != "root" else ())
    + (
        Expect("PRIV-PAYLOAD-002", CapsWithinStage2()),
        Expect("PRIV-PAYLOAD-003", SameIdsAsStage2()),
    )
    for flow in FLOWS
}
#: FD-001: descriptors every payload may have open (besides those the StarterConfig keeps).
PAYLOAD_STANDARD_FDS = (0, 1, 2)


def privilege_flows(requirement: str) -> tuple[str, ...]:
    """The flows in which the privilege table says something for ``requirement``."""
    found = {
        flow
        for table in (*PRIVILEGES.values(), PAYLOAD)
        for flow, cell in table.items()
        if any(e.requirement == requirement for e in cell)
    }
    return tuple(f for f in FLOWS if f in found)


def privilege_roles(requirement: str) -> tuple[str, ...]:
    return tuple(
        role
        for role, table in PRIVILEGES.items()
        if any(e.requirement == requirement for cell in table.values() for e in cell)
    )


# --- §3, §4, §5: namespaces ----------------------------------------------------------------------

#: NS-004: whose user namespace the master is in.
MASTER_USER_NS: dict[str, str] = {
    "root": "host",
    "suid": "host",
    "hybrid": "host",
    "userns": "container",
    "fakeroot": "container",
}
#: NS-007: whether the container gets a new user namespace.
NEW_USER_NS: dict[str, bool] = {
    "root": False,
    "suid": False,
    "userns": True,
    "fakeroot": True,
    "hybrid": True,
}
#: NS-006: the uid-map line (inside id, host id) the container's user namespace must have.
USER_NS_MAP: dict[str, tuple[str, str]] = {
    "userns": (INVOKER, INVOKER),
    "fakeroot": (ZERO, INVOKER),
    "hybrid": (ZERO, INVOKER),
}
#: NS-012: host ids the container's user namespace may map, per flow: ``INVOKER`` (U's uid in
#: the uid map, U's gid in the gid map) and ``SUBORDINATE`` (U's ranges in /etc/subuid and
#: /etc/subgid).
SUBORDINATE = "U's subordinate ids"
MAPPABLE_HOST_IDS: dict[str, tuple[str, ...]] = {
    "userns": (INVOKER,),
    "fakeroot": (INVOKER, SUBORDINATE),
    "hybrid": (INVOKER, SUBORDINATE),
}
#: NS-003: namespaces the master must not share with the container when created for it.
NOT_SHARED_WITH_MASTER = ("pid", "net", "uts", "ipc", "cgroup")
NAMESPACE_KINDS = ("mount", "pid", "net", "uts", "ipc", "user", "cgroup")


# --- §2: order rules -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """A pattern for ledger events: kind(s), role, hook and other fields."""

    kind: str | tuple[str, ...]
    role: str | None = None
    hook: str | None = None
    fields: tuple[tuple[str, Any], ...] = ()

    def matches(self, event: dict[str, Any]) -> bool:
        kinds = (self.kind,) if isinstance(self.kind, str) else self.kind
        return (
            event.get("kind") in kinds
            and (self.role is None or event.get("role") == self.role)
            and (self.hook is None or event.get("hook") == self.hook)
            and all(event.get(k) == v for k, v in self.fields)
        )

    def describe(self) -> str:
        kinds = self.kind if isinstance(self.kind, str) else "/".join(self.kind)
        parts = [kinds]
        if self.role:
            parts.append(f"role={self.role}")
        if self.hook:
            parts.append(f"hook={self.hook}")
        parts += [
            "called by the kit" if (k, v) == ("caller", None) else f"{k}={v}"
            for k, v in self.fields
        ]
        return " ".join(parts)


def enter(role: str, hook: str) -> Point:
    return Point("hook_enter", role, hook)


def kit_call(point: Point) -> Point:
    """``point``, only where the kit made the call (an engine's own call of one of its hooks
    is recorded with ``caller: "engine"``; the kit's carry no caller)."""
    return Point(point.kind, point.role, point.hook, (*point.fields, ("caller", None)))


def returned(role: str, hook: str) -> Point:
    """The hook's return or raise."""
    return Point(("hook_return", "hook_raise"), role, hook)


@dataclass(frozen=True)
class Before:
    """Every event matching ``then`` comes after an event matching ``first``."""

    requirement: str
    first: Point
    then: Point

    def describe(self) -> str:
        return f"{self.then.describe()} only after {self.first.describe()}"


@dataclass(frozen=True)
class Count:
    """The number of events matching ``point`` is within [at_least, at_most]."""

    requirement: str
    point: Point
    at_least: int = 0
    at_most: int | None = None

    def describe(self) -> str:
        if self.at_most == self.at_least:
            n = f"exactly {self.at_least}"
        elif self.at_most is None:
            n = f"at least {self.at_least}"
        else:
            n = f"{self.at_least} to {self.at_most}"
        return f"{n} × {self.point.describe()}"


@dataclass(frozen=True)
class FirstHooks:
    """The first hooks a role enters are ``hooks``, in that order."""

    requirement: str
    role: str
    hooks: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.role} enters {', '.join(self.hooks)} first, in this order"


@dataclass(frozen=True)
class DistinctThreads:
    """The given hooks of ``role`` each run in a thread of their own."""

    requirement: str
    role: str
    hooks: tuple[str, ...]

    def describe(self) -> str:
        return f"{', '.join(self.hooks)} of the {self.role} each run in their own thread"


Rule = Before | Count | FirstHooks | DistinctThreads

_CONTAINER_START = Point("process_start", "container")
_STAGE1_EXIT = Point("process_exit", "starter", fields=(("child_role", "stage1"),))
_RPC_EXIT = Point("process_exit", "container", fields=(("child_role", "rpc"),))

#: Order and count rules of a successful run (SPEC §2), tagged with their requirement.
ORDER_RULES: tuple[Rule, ...] = (
    *(FirstHooks("ORDER-001", role, ("config", "init_config")) for role in ROLES),
    # Rule 1 is the starter's order: it counts the starter's calls. config() is a pure
    # factory (SPEC §1: "returns a fresh, empty engine-config object") an engine may call
    # for the defaults; what an engine does calling its own init_config again is its
    # state's concern (STATE-*), not the order's.
    *(Count("ORDER-001", kit_call(enter(role, "config")), 1, 1) for role in ROLES),
    *(Count("ORDER-001", kit_call(enter(role, "init_config")), 1, 1) for role in ROLES),
    Count("ORDER-003", Point("hook_enter", hook="prepare_config"), 1, 1),
    Count("ORDER-003", enter("stage1", "prepare_config"), 1, 1),
    Before("ORDER-004", returned("stage1", "prepare_config"), Point("starter_config")),
    Before("ORDER-004", returned("stage1", "prepare_config"), _CONTAINER_START),
    Before("ORDER-004", returned("stage1", "prepare_config"), Point("namespaces")),
    *(
        Before("ORDER-005", Point("namespaces"), enter("master", hook))
        for hook in ("create_container", "post_start_process", "monitor_container")
    ),
    DistinctThreads(
        "ORDER-006", "master", ("create_container", "post_start_process", "monitor_container")
    ),
    Before("ORDER-007", returned("master", "create_container"), Point("process_start", "stage2")),
    Before("ORDER-007", returned("master", "create_container"), enter("stage2", "start_process")),
    Before("ORDER-007", _RPC_EXIT, enter("stage2", "start_process")),
    Count("ORDER-009", enter("master", "post_start_process"), 0, 1),
    # "EOF after exec -> post_start_process": an EOF before the exec (master_fd closed or
    # replaced by engine code) is what would run post_start_process before the payload.
    Count("ORDER-009", Point("master_fd_closed_early"), 0, 0),
    Before("ORDER-009", Point("stage2_exec"), enter("master", "post_start_process")),
    Count("ORDER-011", enter("master", "cleanup_container"), 1, 1),
    *(
        Before("ORDER-011", returned("master", hook), enter("master", "cleanup_container"))
        for hook in ("create_container", "post_start_process", "monitor_container")
    ),
    *(
        Count("ORDER-013", enter(role, hook), 1, 1)
        for role, hook in (
            ("master", "create_container"),
            ("master", "monitor_container"),
            ("stage2", "start_process"),
        )
    ),
    Count("STATE-002", _STAGE1_EXIT, 1, 1),
    *(
        Before("STATE-002", _STAGE1_EXIT, Point("hook_enter", role))
        for role in ("master", "rpc", "stage2")
    ),
    Before("STATE-003", Point("starter_config"), _CONTAINER_START),
    Count("STATE-003", Point("starter_config", "starter"), 1, 1),
)


def rules_for(requirement: str) -> tuple[Rule, ...]:
    return tuple(r for r in ORDER_RULES if r.requirement == requirement)


# --- §2: the error table -------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorPath:
    """What a run looks like when one hook fails (a row of SPEC §2's error table).

    ``fault`` is the value of the engine-config field ``conformance_fault`` that makes a
    cooperating engine fail that way (see :mod:`conformance.capabilities`).
    """

    requirement: str
    fault: str
    exit_code: int | None  # None: the payload's own exit code
    raised: tuple[str, str] | None = None  # (role, hook) whose hook_raise is recorded
    absent_roles: tuple[str, ...] = ()  # roles that must run no hook at all
    absent_hooks: tuple[tuple[str, str], ...] = ()  # (role, hook) that must not run
    cleanup: bool | None = None  # cleanup_container runs exactly once (True) or never (False)
    fatal: str | None = None  # substring of the master's fatal event ("" = any message)
    no_fatal: bool = False  # cleanup_container gets no fatal error
    stage2_failed: str | None = None  # substring of the recorded stage-2 failure
    container_exit: int | None = None  # exit code of the status monitor_container returns
    timeout: tuple[str, str] | None = None  # (role, hook) the hook timeout must name
    starter_error: tuple[str, str] | None = None  # (stage, substring of the message)
    cleanup_fatal: str | None = None  # cleanup_container's fatal argument contains this
    cleanup_gets_no_fatal: bool = False  # cleanup_container's fatal argument is None
    cleanup_exit: int | None = None  # exit code of cleanup_container's status argument
    no_namespaces: bool = False  # no container namespace was ever created
    notes: tuple[str, ...] = field(default=())


ERROR_PATHS: dict[str, ErrorPath] = {
    p.requirement: p
    for p in (
        ErrorPath(
            "ERR-001",
            "prepare_config",
            255,
            raised=("stage1", "prepare_config"),
            absent_roles=("master", "rpc", "stage2"),
            cleanup=False,
            no_namespaces=True,
        ),
        ErrorPath(
            "ERR-002",
            "create_container",
            255,
            raised=("master", "create_container"),
            absent_roles=("stage2",),
            absent_hooks=(("master", "post_start_process"),),
            cleanup=True,
            fatal="container creation failed",
            cleanup_fatal="container creation failed",
        ),
        ErrorPath(
            "ERR-003",
            "start_process",
            255,
            raised=("stage2", "start_process"),
            absent_hooks=(("master", "post_start_process"),),
            cleanup=True,
            no_fatal=True,
            stage2_failed="",
            container_exit=255,
            cleanup_gets_no_fatal=True,
            cleanup_exit=255,
        ),
        ErrorPath(
            "ERR-004",
            "post_start_process",
            255,
            raised=("master", "post_start_process"),
            cleanup=True,
            fatal="",
            cleanup_fatal="",
        ),
        ErrorPath(
            "ERR-005",
            "monitor_container",
            255,
            raised=("master", "monitor_container"),
            cleanup=True,
            fatal="",
            cleanup_fatal="",
        ),
        ErrorPath(
            "ERR-006",
            "cleanup_container",
            None,
            raised=("master", "cleanup_container"),
            cleanup=True,
        ),
        ErrorPath(
            "ERR-007",
            "create_container:hang",
            255,
            timeout=("master", "create_container"),
            absent_roles=("stage2",),
        ),
        ErrorPath(
            "ERR-008",
            "start_process:return",
            255,
            absent_hooks=(("master", "post_start_process"),),
            cleanup=True,
            stage2_failed="stage 2 returned",
            container_exit=255,
            cleanup_gets_no_fatal=True,
            cleanup_exit=255,
        ),
        ErrorPath(
            "SC-001",
            "prepare_config:invalid",
            255,
            absent_roles=("master", "rpc", "stage2"),
            cleanup=False,
            no_namespaces=True,
            starter_error=("starter_config", "set_capabilities"),
        ),
    )
}
#: ORDER-008 is ERR-007's run seen from rule 5 (create_container waiting for the container).
ERROR_PATHS["ORDER-008"] = ERROR_PATHS["ERR-007"]

#: ERR-009..011: scenarios in which nothing asks the engine to fail (a valid config, a payload
#: that exists): every hook returns and the payload is exec'd.
UNFAILING_SCENARIOS = ("default", "exit-code", "signals", "signal-death", "host-view", "fds")

#: Error paths after which the master ran and cleanup_container had to cope with partial setup
#: (CLEAN-002), and those that are fatal (EXIT-003).
CLEANUP_AFTER_FAILURE = ("ERR-002", "ERR-003", "ERR-004", "ERR-005", "ERR-008")
FATAL_PATHS = ("ERR-002", "ERR-004", "ERR-005")
STAGE2_FAILURE_PATHS = ("ERR-003", "ERR-008")  # ORDER-010
STAGE1_FAILURE_PATHS = ("ERR-001", "SC-001")  # ORDER-012


# --- §7: signals ---------------------------------------------------------------------------------

#: Signals monitor_container must forward (SIG-002), in the order the suite sends them.
FORWARDED_SIGNALS = ("SIGHUP", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGTERM")
