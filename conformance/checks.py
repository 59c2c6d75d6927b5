"""The checks the suite's tests call: each judges a run's ledger against the expectations."""

from __future__ import annotations

import dataclasses
import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import pytest

from conformance import expectations as X
from conformance import requirements
from conformance.cooperation import PROBE_METHOD, RPC_PROBES
from conformance.outcomes import NOT_CONFIGURED_PREFIX
from conformance.runs import HarnessError, Run
from conformance.scenario import (
    AGAIN,
    ALL_SIGNALS_ARRIVED,
    SECOND_ROUND_MASK_BASE,
    SIGNAL_MASK_BASE,
    SIGNAL_ROUNDS,
    decode_signal_exit,
    fault_scenario,
    parse_fds,
    parse_payload_ns,
)
from kit import preflight
from kit.ledger.probe import host_privilege, thread_state
from kit.ledger.record import LOST_EVENT, validate
from kit.run.hostdiff import is_ipc_sysctl
from kit.run.launcher import machine_note
from kit.run.seccomp import SYSTEM_INTERFACE, describe_refusal
from kit.system.linux import split_propagation

MAX_SHOWN = 3  # violations rendered per requirement


class SuiteError(Exception):
    """The suite itself is inconsistent (a test checks an undeclared requirement…): broken."""


# --- violations and the verifier -------------------------------------------------------------


def describe_event(event: dict[str, Any] | None) -> str:
    if event is None:
        return "(no event)"
    parts = [f"#{event.get('seq')} {event.get('kind')}", f"role={event.get('role')}"]
    for key in ("hook", "method", "name", "child_role", "stage"):
        if event.get(key) is not None:
            parts.append(f"{key}={event[key]}")
    parts.append(f"pid={event.get('pid')} tid={event.get('tid')}")
    return " ".join(parts)


def describe_run(run: Run) -> str:
    if run.result is None:
        return f"{run.id}: no result ({run.error})"
    res = run.result
    text = f"{run.id}: exit {res.exit_code} ({res.reason})"
    problems = []
    for ev in res.ledger.events:
        kind = ev.get("kind")
        if kind == "starter_error":
            problems.append(f"starter_error {ev.get('stage')}: {str(ev.get('message'))[:200]}")
        elif kind == "hook_raise":
            err = ev.get("error") or {}
            problems.append(
                f"{ev.get('role')} {ev.get('hook')} raised {err.get('type')}: "
                f"{str(err.get('message'))[:200]}"
            )
        elif kind in ("stage2_failed", "fatal"):
            problems.append(f"{kind}: {str(ev.get('message'))[:200]}")
        elif kind == "hook_timeout" and not ev.get("hook"):
            problems.append("run timeout with no hook open")
        elif kind == "hook_timeout":
            problems.append(f"hook timeout: {ev.get('hook_role')} {ev.get('hook')}")
    if problems:
        text += "; " + "; ".join(problems[:4])
    return text


@dataclass
class Violation:
    """A broken rule: the requirement and its text, the expected and the observed value, the
    flow and process role, and the ledger event where it was observed."""

    requirement: str
    expected: str
    observed: str
    flow: str
    role: str | None = None
    hook: str | None = None
    event: dict[str, Any] | None = None
    run: Run | None = None

    def render(self, headline: bool = True) -> str:
        req = requirements.get(self.requirement)
        where = [f"flow: {self.flow}"]
        role = self.role or (self.event or {}).get("role")
        hook = self.hook or (self.event or {}).get("hook")
        if role:
            where.append(f"role: {role}")
        if hook:
            where.append(f"hook: {hook}")
        lines = [req.headline()] if headline else []
        lines += [
            "  " + "   ".join(where),
            f"  expected: {self.expected}",
            f"  observed: {self.observed}",
        ]
        if self.event is not None:
            lines.append(f"  ledger event: {describe_event(self.event)}")
        if self.run is not None:
            lines.append(f"  run: {describe_run(self.run)}")
        return "\n".join(lines)


class Verifier:
    """Collects the checks of one test (the ``verify`` fixture), per requirement it declares.

    Every check is counted per requirement; a check that fails records a :class:`Violation`
    and the test goes on, so one test reports every violation of every requirement it
    declares. At the end the plugin turns the verifier into one outcome per requirement
    (passed, failed, not-supported, xfail…)."""

    def __init__(self, flow: str, declared: Iterable[str], test: str = "") -> None:
        self.flow = flow
        self.declared = list(declared)
        self.test = test
        self.checks: dict[str, int] = {r: 0 for r in self.declared}
        self.violations: dict[str, list[Violation]] = {r: [] for r in self.declared}
        self.unsupported_reasons: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self.runs: list[str] = []

    @property
    def requirement(self) -> str:
        """The test's one requirement: the ID that a check of a single requirement (every
        ``check_*`` below but :func:`check_rpc_probes`) attributes its verdicts to."""
        if len(self.declared) != 1:
            raise SuiteError(
                f"{self.test} declares {', '.join(self.declared) or 'no requirement'}: a check "
                "of one requirement needs a test that declares exactly one"
            )
        return self.declared[0]

    def _declared(self, req: str) -> None:
        if req not in self.checks:
            raise SuiteError(
                f"{self.test} checks {req} but declares only {', '.join(self.declared)}"
            )

    def used(self, run: Run) -> Run:
        if run.id not in self.runs:
            self.runs.append(run.id)
        return run

    def check(
        self,
        req: str,
        ok: bool,
        *,
        expected: str,
        observed: str | Callable[[], str],
        run: Run | None = None,
        event: dict[str, Any] | None = None,
        role: str | None = None,
        hook: str | None = None,
    ) -> bool:
        self._declared(req)
        self.checks[req] += 1
        if run is not None:
            self.used(run)
        if not ok:
            text = observed() if callable(observed) else observed
            self.violations[req].append(
                Violation(req, expected, text, self.flow, role, hook, event, run)
            )
        return ok

    def fail(self, req: str, **kwargs: Any) -> None:
        self.check(req, False, **kwargs)

    def vacuous(self, req: str, why: str) -> None:
        """A check that holds because there is nothing to check (noted in the report)."""
        self._declared(req)
        self.checks[req] += 1
        self.notes.setdefault(req, why)

    def unsupported(self, req: str, reason: str) -> None:
        """This requirement cannot be decided with this engine (reported not-supported)."""
        self._declared(req)
        self.unsupported_reasons[req] = reason

    def render(self, req: str) -> str:
        found = self.violations[req]
        parts = [requirements.get(req).headline()]
        parts += [v.render(headline=False) for v in found[:MAX_SHOWN]]
        if len(found) > MAX_SHOWN:
            parts.append(f"  … and {len(found) - MAX_SHOWN} more violation(s) of {req}")
        return "\n".join(parts)


# --- helpers on runs ---------------------------------------------------------------------------


def hook_events(
    run: Run,
    role: str | None = None,
    hook: str | None = None,
    kinds: tuple[str, ...] = X.HOOK_KINDS,
) -> list[dict[str, Any]]:
    return [
        e
        for e in run.events
        if e.get("kind") in kinds
        and (role is None or e.get("role") == role)
        and (hook is None or e.get("hook") == hook)
    ]


def kit_calls(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The hook events of calls the kit made, not those of a hook the engine called itself
    (recorded with ``caller: "engine"``)."""
    return [e for e in events if e.get("caller", "kit") == "kit"]


def reached(run: Run, *roles: str) -> bool:
    """Whether each process role of ``roles`` entered a hook in ``run``."""
    return all(hook_events(run, role) for role in roles)


def events_of(run: Run, kind: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in run.events
        if e.get("kind") == kind and all(e.get(k) == v for k, v in match.items())
    ]


def to_host(value: int, idmap: list[list[int]]) -> int | None:
    """``value`` as seen in a user namespace, translated to the host through its map."""
    for inside, outside, count in idmap:
        if inside <= value < inside + count:
            return outside + value - inside
    return None


class Facts:
    """What a run says about itself: U, the StarterConfig, the host's namespaces."""

    def __init__(self, run: Run) -> None:
        self.run = run
        start = events_of(run, "run_start")
        invoker = (start[0].get("invoker") if start else None) or {}
        self.uid: int | None = invoker.get("uid")
        self.gid: int | None = invoker.get("gid")
        configs = events_of(run, "starter_config")
        self.starter_config: dict[str, Any] | None = (
            configs[0]["config"].get("requests") if configs else None
        )

    def first_snapshot(self, role: str) -> dict[str, Any] | None:
        for e in hook_events(run=self.run, role=role):
            if e.get("snapshot"):
                return e["snapshot"]
        return None

    @property
    def host_ns(self) -> dict[str, int] | None:
        """Stage 1 always runs in the host's namespaces (before any is created)."""
        snap = self.first_snapshot("stage1")
        return snap["ns"] if snap else None

    def created(self) -> list[str]:
        if self.starter_config is None:
            return []
        paths = self.starter_config.get("ns_paths") or {}
        return [k for k in self.starter_config.get("ns_flags") or [] if k not in paths]

    def joined(self) -> dict[str, str]:
        return dict((self.starter_config or {}).get("ns_paths") or {})

    def target_uid(self) -> int:
        value = (self.starter_config or {}).get("target_uid")
        return 0 if value is None else value


def _snapshot(event: dict[str, Any]) -> dict[str, Any]:
    snap = event.get("snapshot")
    if not snap:
        raise HarnessError(
            f"ledger event {describe_event(event)} has no privilege snapshot "
            "(were probes disabled?)"
        )
    if "probe_error" in snap:
        # No thread to judge is no thread that passes: the rule cannot be decided.
        raise HarnessError(
            f"ledger event {describe_event(event)}: the kit could not read the process's "
            f"privileges there ({snap['probe_error']}; is /proc mounted where the hook "
            "runs?)"
        )
    return snap


def _threads(event: dict[str, Any], scope: str) -> list[dict[str, Any]]:
    threads = _snapshot(event).get("threads") or []
    if scope == "thread":
        own = [t for t in threads if t.get("tid") == event.get("tid")]
        return own or threads
    return threads


def _caps_text(names: list[str]) -> str:
    if len(names) <= 6:
        return f"[{', '.join(names)}]"
    return f"{len(names)} capabilities [{', '.join(names[:4])}, …]"


def thread_label(t: dict[str, Any]) -> str:
    """``thread TID ("name")``: the thread a violation is about, as the snapshot names it."""
    name = t.get("name")
    return f"thread {t.get('tid')}" + (f" ({name!r})" if name else "")


def _thread_text(t: dict[str, Any], what: str = "uid") -> str:
    caps = t.get("caps", {})
    if what == "uid":
        return f"{thread_label(t)}: uid real/effective/saved/fs {t.get('uid')}"
    if what == "nnp":
        return f"{thread_label(t)}: no_new_privs {t.get('no_new_privs')}"
    return f"{thread_label(t)}: " + ", ".join(
        f"{k} {_caps_text(caps.get(k, []))}"
        for k in ("effective", "permitted", "inheritable", "ambient", "bounding")
    )


# --- privilege table (SPEC §4) ---------------------------------------------------------------


def _id_ok(symbol: str | None, value: int, snap: dict[str, Any], facts: Facts) -> bool:
    if symbol is None:
        return True
    host = to_host(value, snap.get("uid_map") or [])
    if symbol == X.ZERO:
        return value == 0
    if symbol == X.INVOKER:
        return value == facts.uid and host == facts.uid
    if symbol == X.MAPS_TO_U:
        return host == facts.uid
    if symbol == X.ROOT_AS_U:
        return value == 0 and host == facts.uid
    if symbol == X.TARGET:
        return value == facts.target_uid()
    raise SuiteError(f"unknown id symbol {symbol!r}")


def _symbol_text(symbol: str, facts: Facts) -> str:
    if symbol == X.INVOKER:
        return f"U ({facts.uid})"
    if symbol == X.MAPS_TO_U:
        return f"an id that maps to U ({facts.uid}) on the host"
    if symbol == X.ROOT_AS_U:
        return f"0, mapped to U ({facts.uid}) on the host"
    if symbol == X.TARGET:
        return f"the target uid ({facts.target_uid()})"
    return symbol


def _configured_caps(facts: Facts) -> dict[str, list[str] | None]:
    caps = (facts.starter_config or {}).get("capabilities") or {}
    return {
        k: caps.get(k) for k in ("effective", "permitted", "inheritable", "ambient", "bounding")
    }


@dataclass(frozen=True)
class Problem:
    """Why a rule does not hold: what it expected and what the snapshot showed instead."""

    expected: str
    observed: str


@dataclass(frozen=True)
class Seen:
    """One snapshot a privilege rule judges, with what judging it needs.

    ``snap`` is a hook's (or an RPC method's) snapshot, or the payload's as parsed from its
    output; ``threads`` the threads of it the rule's scope covers; ``event`` the ledger event
    the snapshot belongs to (for the payload: stage 2's entry to start_process, whose thread
    is ``stage2``).
    """

    run: Run
    facts: Facts
    snap: dict[str, Any]
    threads: list[dict[str, Any]]
    event: dict[str, Any] | None = None
    stage2: dict[str, Any] | None = None


class PrivilegeRule(ABC):
    """A cell of the privilege table (SPEC §4) that checks and describes itself.

    Subclasses register for the place they judge (``hook``: every hook and RPC method
    snapshot; ``payload``: the payload after exec) and the aspect type they implement
    (and, for :class:`~conformance.expectations.Caps`, its kind)."""

    #: Whether the rule compares with stage 2 at start_process (payload rules only).
    needs_stage2 = False

    def __init__(self, aspect: Any) -> None:
        self.aspect = aspect

    @abstractmethod
    def check(self, seen: Seen) -> Problem | None:
        """None when the rule holds for ``seen``, else what it expected and saw."""

    def describe(self) -> str:
        text: str = self.aspect.describe()
        return text


#: (place, aspect type, Caps kind or None) -> the rule that judges it: the one table.
RULES: dict[tuple[str, type, str | None], type[PrivilegeRule]] = {}


def _rule(
    place: str, aspect: type, kind: str | None = None
) -> Callable[[type[PrivilegeRule]], type[PrivilegeRule]]:
    def register(cls: type[PrivilegeRule]) -> type[PrivilegeRule]:
        key = (place, aspect, kind)
        if key in RULES:
            raise SuiteError(f"two rules for {key}: {RULES[key].__name__} and {cls.__name__}")
        RULES[key] = cls
        return cls

    return register


def rule_for(place: str, aspect: Any) -> PrivilegeRule:
    """The rule that judges ``aspect`` at ``place`` (``hook`` or ``payload``)."""
    # only Caps has a kind: its kinds are rules of their own
    key = (place, type(aspect), getattr(aspect, "kind", None))
    if key not in RULES:
        raise SuiteError(
            f"no {place} rule for {aspect!r}: register one with @_rule({place!r}, "
            f"{type(aspect).__name__}) in conformance.checks"
        )
    return RULES[key](aspect)


@_rule("hook", X.Uids)
class UidsRule(PrivilegeRule):
    aspect: X.Uids

    def check(self, seen: Seen) -> Problem | None:
        facts, snap = seen.facts, seen.snap
        bad = [
            t
            for t in seen.threads
            if not all(
                _id_ok(sym, t["uid"][i], snap, facts)
                for i, (_, sym) in enumerate(self.aspect.slots[: len(t["uid"])])
            )
        ]
        if not bad:
            return None
        expected = ", ".join(
            f"{slot} uid {_symbol_text(sym, facts)}"
            for slot, sym in self.aspect.slots
            if sym is not None
        )
        return Problem(
            expected + " in every thread", f"{_thread_text(bad[0])}; uid_map {snap.get('uid_map')}"
        )


class _CapsRule(PrivilegeRule):
    """Every thread in scope has the capability sets the aspect's kind asks for."""

    aspect: X.Caps

    @abstractmethod
    def wrong(self, thread: dict[str, Any], seen: Seen) -> bool:
        """Whether ``thread``'s capability sets break the rule."""

    def expected(self, seen: Seen) -> str:
        return self.describe()

    def check(self, seen: Seen) -> Problem | None:
        bad = [t for t in seen.threads if self.wrong(t, seen)]
        if not bad:
            return None
        return Problem(self.expected(seen), _thread_text(bad[0], "caps"))


@_rule("hook", X.Caps, "full")
class FullCapsRule(_CapsRule):
    # Full is what the kit gave the process: the sets agree and none lost a capability since
    # the first hook entry of the process (taken before any of its hooks ran), else a hook
    # that drops a capability from every set alike would pass.
    def wrong(self, thread: dict[str, Any], seen: Seen) -> bool:
        caps = thread["caps"]
        return (
            not caps["bounding"]
            or not set(caps["effective"]) == set(caps["permitted"]) == set(caps["bounding"])
            or bool(self._given(seen) - set(caps["bounding"]))
        )

    def _given(self, seen: Seen) -> set[str]:
        first = seen.facts.first_snapshot((seen.event or {}).get("role") or "")
        threads = (first or {}).get("threads") or []
        return set(threads[0]["caps"]["bounding"]) if threads else set()

    def expected(self, seen: Seen) -> str:
        given = sorted(self._given(seen))
        return f"{self.describe()}, none lost since the first hook ({len(given)} capabilities)"

    def check(self, seen: Seen) -> Problem | None:
        problem = super().check(seen)
        bad = next((t for t in seen.threads if self.wrong(t, seen)), None)
        if problem is None or bad is None:
            return problem
        lost = sorted(self._given(seen) - set(bad["caps"]["bounding"]))
        if not lost:
            return problem
        return Problem(problem.expected, f"{problem.observed}; lost {_caps_text(lost)}")


@_rule("hook", X.Caps, "none")
class NoCapsRule(_CapsRule):
    def wrong(self, thread: dict[str, Any], seen: Seen) -> bool:
        return any(thread["caps"][k] for k in ("effective", "permitted", "inheritable", "ambient"))


@_rule("hook", X.Caps, "effective")
class EffectiveCapsRule(_CapsRule):
    def wrong(self, thread: dict[str, Any], seen: Seen) -> bool:
        return set(thread["caps"]["effective"]) != set(self.aspect.names)


@_rule("hook", X.Caps, "configured")
class ConfiguredCapsRule(_CapsRule):
    # An unset set is empty, the bounding set included (SPEC §4 "default none", §5).
    def wrong(self, thread: dict[str, Any], seen: Seen) -> bool:
        return any(
            set(thread["caps"][kind]) != set(want or ())
            for kind, want in _configured_caps(seen.facts).items()
        )

    def expected(self, seen: Seen) -> str:
        return "capabilities as configured (an unset set empty): " + ", ".join(
            f"{k} {_caps_text(v or [])}" for k, v in _configured_caps(seen.facts).items()
        )


@_rule("hook", X.BoundingSmallerThan)
class BoundingSmallerThanRule(PrivilegeRule):
    aspect: X.BoundingSmallerThan

    def check(self, seen: Seen) -> Problem | None:
        role = self.aspect.role
        other = seen.facts.first_snapshot(role)
        if other is None:
            return Problem(
                f"a {role} snapshot to compare with", f"no hook of the {role} was recorded"
            )
        theirs = set(other["threads"][0]["caps"]["bounding"])
        bad = [t for t in seen.threads if not set(t["caps"]["bounding"]) < theirs]
        if not bad:
            return None
        return Problem(
            f"{self.describe()} ({len(theirs)} capabilities)", _thread_text(bad[0], "caps")
        )


@_rule("hook", X.Escalation)
class EscalationRule(PrivilegeRule):
    aspect: X.Escalation

    def check(self, seen: Seen) -> Problem | None:
        event = seen.event or {}
        esc = event.get("escalation")
        if esc is None:
            raise HarnessError(f"{describe_event(event)} has no escalation probe result")
        if bool(esc.get("host_escalation")) == self.aspect.possible:
            return None
        return Problem(self.describe(), f"escalation probe {esc}")


@_rule("hook", X.NoHostPrivilege)
class NoHostPrivilegeRule(PrivilegeRule):
    def check(self, seen: Seen) -> Problem | None:
        if not _host_privilege(seen.snap, seen.run):
            return None
        return Problem(
            self.describe() + " (no uid 0 and no permitted capability in the host user namespace)",
            _privilege_text(seen.snap, seen.run),
        )


@_rule("hook", X.NoNewPrivs)
class NoNewPrivsRule(PrivilegeRule):
    aspect: X.NoNewPrivs

    def check(self, seen: Seen) -> Problem | None:
        bad = [t for t in seen.threads if t["no_new_privs"] != self.aspect.value]
        if not bad:
            return None
        return Problem(self.describe(), _thread_text(bad[0], "nnp"))


@_rule("payload", X.NoHostPrivilege)
class PayloadNoHostPrivilegeRule(PrivilegeRule):
    def check(self, seen: Seen) -> Problem | None:
        # exec keeps the user namespace: the payload's is stage 2's at start_process
        snap = {**seen.snap, "ns": {"user": (seen.stage2 or {}).get("ns", {}).get("user")}}
        if not _host_privilege(snap, seen.run):
            return None
        return Problem(self.describe(), _privilege_text(snap, seen.run))


@_rule("payload", X.SameIdsAsStage2)
class SameIdsAsStage2Rule(PrivilegeRule):
    needs_stage2 = True

    def check(self, seen: Seen) -> Problem | None:
        assert seen.stage2 is not None and seen.event is not None  # needs_stage2
        securebits = (seen.event.get("snapshot") or {}).get("securebits")
        wrong = exec_changes(seen.stage2, seen.threads[0], securebits)
        if not wrong:
            return None
        return Problem(
            f"{self.describe()}, as exec derives it from stage 2's whole credential",
            "the payload's " + "; ".join(wrong),
        )


@_rule("payload", X.CapsWithinStage2)
class CapsWithinStage2Rule(PrivilegeRule):
    needs_stage2 = True

    def check(self, seen: Seen) -> Problem | None:
        stage2, payload = seen.stage2, seen.threads[0]
        assert stage2 is not None  # needs_stage2
        allowed = set(stage2["caps"]["permitted"])
        extra = {
            kind: sorted(set(payload["caps"][kind]) - allowed)
            for kind in ("effective", "permitted", "ambient")
        }
        extra = {kind: names for kind, names in extra.items() if names}
        if not extra:
            return None
        return Problem(
            f"{self.describe()} {_caps_text(sorted(allowed))}",
            "the payload has "
            + "; ".join(f"{kind} {_caps_text(names)}" for kind, names in extra.items())
            + f" (stage 2's bounding set {_caps_text(stage2['caps']['bounding'])},"
            f" inheritable {_caps_text(stage2['caps']['inheritable'])}, ambient "
            f"{_caps_text(stage2['caps']['ambient'])})",
        )


def apply_rule(
    verify: Verifier, requirement: str, rule: PrivilegeRule, seen: Seen, **where: Any
) -> bool:
    """One check of ``requirement``: ``rule`` judges ``seen``; a problem is a violation."""
    problem = rule.check(seen)
    return verify.check(
        requirement,
        problem is None,
        expected=problem.expected if problem else rule.describe(),
        observed=problem.observed if problem else "",
        **where,
    )


def host_userns(run: Run) -> list[int]:
    """(device, inode) of the user namespace the run was launched in (SPEC §4), as the
    supervisor recorded it: host privilege is judged against it, never against a uid map."""
    start = events_of(run, "run_start")
    host = (start[0].get("host_userns") if start else None) or (
        run.result.ledger.document.get("run") or {}
    ).get("host_userns")
    if not host:
        raise HarnessError(
            "the ledger does not record the host user namespace (run_start has no host_userns)"
        )
    return list(host)


def _host_privilege(snap: dict[str, Any], run: Run) -> bool:
    return host_privilege(snap, host_userns(run))


def _privilege_text(snap: dict[str, Any], run: Run) -> str:
    culprits = [
        t for t in snap.get("threads", []) if 0 in t["uid"][:3] or t["caps"]["permitted"]
    ] or snap.get("threads", [])[:1]
    userns = (snap.get("ns") or {}).get("user")
    where = "host" if userns in (None, host_userns(run)[1]) else "not the host's"
    text = f"user namespace {userns} ({where}), uid_map {snap.get('uid_map')}"
    if culprits:
        t = culprits[0]
        text += f"; {_thread_text(t)}; permitted {_caps_text(t['caps']['permitted'])}"
    return text


def check_privileges(verify: Verifier, run: Run, every_role: bool = True) -> None:
    """Every hook snapshot of every role the privilege table constrains for the test's
    requirement in this flow. ``every_role``: a role with no hook recorded is a violation
    (false for a run whose error path leaves a process out)."""
    requirement = verify.requirement
    facts = Facts(verify.used(run.usable()))
    roles = [
        role
        for role in X.PRIVILEGES
        if any(e.requirement == requirement for e in X.PRIVILEGES[role].get(run.flow, ()))
    ]
    if not roles:
        raise SuiteError(f"the privilege table has no row for {requirement} in {run.flow}")
    for role in roles:
        cell = [e for e in X.PRIVILEGES[role][run.flow] if e.requirement == requirement]
        events = hook_events(run, role)
        if not events and not every_role:
            continue
        if not events:
            verify.fail(
                requirement,
                expected=f"hooks of the {role} to check",
                observed=f"no hook of the {role} was recorded",
                run=run,
                role=role,
            )
            continue
        if role == "rpc":
            events = events + method_events(run)
        for event in events:
            for expect in cell:
                if event["kind"] in expect.at:
                    seen = Seen(run, facts, _snapshot(event), _threads(event, expect.scope), event)
                    apply_rule(
                        verify,
                        expect.requirement,
                        rule_for("hook", expect.aspect),
                        seen,
                        run=run,
                        event=event,
                    )


#: SPEC §4: the privilege table holds at every hook entry and return of every run, not only
#: the default one: an engine's master hooks take other paths when a signal is forwarded, the
#: payload exits non-zero or dies, or cleanup_container gets a fatal error.
PRIVILEGE_SCENARIOS: tuple[str, ...] = (
    "default",
    "exit-code",
    "signals",
    "signal-death",
    *(fault_scenario(p) for p in X.CLEANUP_AFTER_FAILURE),
    "exec-failure",
    # A join-only run has stage 1 and stage 2 alone, and their rows hold as in any run.
    "join",
)


def privilege_runs(lifecycle: Any) -> list[Run]:
    """The default run (required) and every other run of PRIVILEGE_SCENARIOS this engine and
    machine have (a scenario the engine cannot have or the machine cannot prepare is left
    out: it must not hide what the default run decides)."""
    return [lifecycle("default"), *_available_runs(lifecycle, PRIVILEGE_SCENARIOS[1:])]


def _available_runs(lifecycle: Any, names: Sequence[str]) -> list[Run]:
    """The runs of ``names`` this engine and machine have: one the engine cannot have or the
    machine cannot prepare is left out (it must not hide what the other runs decide)."""
    runs = []
    for name in names:
        try:
            run = lifecycle.optional(name)
        except pytest.skip.Exception:
            continue
        if run is not None:
            runs.append(run)
    return runs


def check_privileges_in_every_run(verify: Verifier, lifecycle: Any) -> None:
    """:func:`check_privileges` over :func:`privilege_runs`: a role an error path leaves
    out (no stage 2 after create_container failed) is required in the default run only."""
    for i, run in enumerate(privilege_runs(lifecycle)):
        check_privileges(verify, run, every_role=i == 0)


def method_events(run: Run) -> list[dict[str, Any]]:
    """The RPC server's state around every method, as events of kind ``rpc_method_enter``
    and ``rpc_method_return`` whose snapshot holds every thread (from the ``rpc_call``
    records that carry every thread and the uid map)."""
    out = []
    for call in events_of(run, "rpc_call", role="rpc"):
        creds = call.get("creds") or {}
        for moment, kind in zip(("before", "after"), X.METHOD_KINDS, strict=True):
            seen = creds.get(moment) or {}
            if not seen.get("threads") or "uid_map" not in seen:
                continue
            # Every thread of a process is in one user namespace (setns into another needs a
            # single-threaded process): the first thread's namespaces stand for the process's.
            ns = next((t["ns"] for t in seen["threads"] if t.get("ns")), None)
            out.append(
                {
                    **call,
                    "kind": kind,
                    "snapshot": {
                        "threads": seen["threads"],
                        "uid_map": seen["uid_map"],
                        "securebits": seen.get("securebits"),
                        "root": seen.get("root"),
                        **({"ns": dict(ns)} if ns else {}),
                    },
                }
            )
    return out


def parse_payload_status(stdout: str) -> dict[str, Any] | None:
    """A snapshot-like dict from the default payload's output (``/proc/self/status`` then
    ``/proc/self/uid_map``)."""
    status: dict[str, str] = {}
    uid_map: list[list[int]] = []
    for line in stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.strip().isdigit():
            status[key.strip()] = value.strip()
            continue
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            uid_map.append([int(f) for f in fields])
    if "Uid" not in status or "CapPrm" not in status or not uid_map:
        return None
    tid = int(status.get("Pid", "0") or 0)
    return {
        "threads": [thread_state(status, tid)],
        "uid_map": uid_map,
        "securebits": _reported_securebits(stdout),
    }


def _reported_securebits(stdout: str) -> int | None:
    """The ``securebits N`` line a payload printed (the ``fds`` payload does), or None."""
    for line in stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "securebits" and value.strip().lstrip("-").isdigit():
            return int(value)
    return None


def kernel_only(run: Run, what: str) -> None:
    """Report the test not-configured when ``run`` used the fake backend: ``what`` is only
    decided by the kernel (SPEC §9: never passed in fake mode)."""
    if run.backend == "fake":
        pytest.skip(
            f"{NOT_CONFIGURED_PREFIX}fake backend: {what} is decided by the kernel, "
            "not by the model"
        )


def _start_process_thread(run: Run) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(event, thread state) of stage 2 when start_process began."""
    entered = hook_events(run, "stage2", "start_process", ("hook_enter",))
    if not entered or not entered[-1].get("snapshot"):
        return None, None
    event = entered[-1]
    threads = _threads(event, "thread")
    return event, threads[0] if threads else None


#: The runs whose payload prints its own credential (SPEC §4: the payload row holds in
#: every run): ``default`` its /proc/self/status, ``fds`` that and its securebits.
PAYLOAD_CREDENTIAL_RUNS = ("default", "fds")
#: Runs whose payload also prints its credential, where the engine and the flow have them.
OPTIONAL_PAYLOAD_CREDENTIAL_RUNS = ("join",)


def payload_credential_runs(lifecycle: Any) -> list[Run]:
    """The runs of :data:`PAYLOAD_CREDENTIAL_RUNS` (required) and of
    :data:`OPTIONAL_PAYLOAD_CREDENTIAL_RUNS` this engine and flow have."""
    return [
        *(lifecycle(name) for name in PAYLOAD_CREDENTIAL_RUNS),
        *_available_runs(lifecycle, OPTIONAL_PAYLOAD_CREDENTIAL_RUNS),
    ]


#: The runs whose payload also reports its securebits (not in /proc/self/status).
_SECUREBITS_RUNS = ("fds",)


def check_payload(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    cell = [e for e in X.PAYLOAD.get(run.flow, ()) if e.requirement == requirement]
    # In fake mode the payload runs with the launcher's real credentials: nothing the
    # payload reports about itself says anything about the engine.
    kernel_only(run, "the payload's credentials after exec")
    snap = parse_payload_status(run.result.stdout)
    wants_securebits = run.scenario.name in _SECUREBITS_RUNS
    if snap is None or (wants_securebits and snap["securebits"] is None):
        verify.fail(
            requirement,
            expected="the payload's own /proc/self/status and /proc/self/uid_map"
            + (" and its securebits" if wants_securebits else "")
            + " on its standard output",
            observed=f"stdout {run.result.stdout[-300:]!r}",
            run=run,
            role="payload",
        )
        return
    # securebits are the process's (the payload has one thread): compared where reported
    payload = {**snap["threads"][0], "securebits": snap["securebits"]}
    facts = Facts(run)
    for expect in cell:
        rule = rule_for("payload", expect.aspect)
        event, stage2 = _start_process_thread(run)
        if rule.needs_stage2 and (stage2 is None or event is None):
            verify.fail(
                requirement,
                expected="stage 2's snapshot at start_process to compare with",
                observed="no start_process entry with a snapshot",
                run=run,
                role="stage2",
                hook="start_process",
            )
            continue
        seen = Seen(run, facts, snap, [payload], event, stage2)
        # the payload's own rule names no event: there is none of the payload in the ledger
        apply_rule(
            verify,
            requirement,
            rule,
            seen,
            run=run,
            event=event if rule.needs_stage2 else None,
            role="payload",
        )


#: securebits: SECBIT_NOROOT (exec does not treat uid 0 as having every file capability).
_SECBIT_NOROOT = 1 << 0
#: securebits: SECBIT_KEEP_CAPS, the one bit exec clears (its lock bit stays).
_SECBIT_KEEP_CAPS = 1 << 4


def exec_credential(
    stage2: dict[str, Any], securebits: Any, downgraded: bool = False
) -> dict[str, Any]:
    """What exec of a plain binary (no setuid bit, no file capabilities) makes of stage 2's
    credential: saved and fs ids become the effective one; the ambient set is kept; without
    root, permitted and effective become the ambient set; with root (a real or effective uid
    0, and no SECBIT_NOROOT), permitted becomes bounding | inheritable | ambient, effective
    too when the effective uid is 0 (else the ambient set). ``downgraded``: an exec the
    kernel lets gain no capability (no_new_privs set, or another process sharing stage 2's
    file system information: ``cap_bprm_creds_from_file``), where root's bounding |
    inheritable is cut to what stage 2 has permitted. Groups, no_new_privs, seccomp,
    inheritable and bounding sets are kept, and the securebits but SECBIT_KEEP_CAPS (None
    when stage 2's are not known)."""
    uid, gid, caps = stage2["uid"], stage2["gid"], stage2["caps"]
    root = 0 in uid[:2] and not (isinstance(securebits, int) and securebits & _SECBIT_NOROOT)
    ambient = sorted(caps["ambient"])
    if root:
        gained = set(caps["inheritable"]) | set(caps["bounding"])
        if downgraded:
            gained &= set(caps["permitted"])
        permitted = sorted(gained | set(ambient))
        effective = permitted if uid[1] == 0 else ambient
    else:
        permitted = effective = ambient
    return {
        "uid": [uid[0], uid[1], uid[1], uid[1]],
        "gid": [gid[0], gid[1], gid[1], gid[1]],
        "groups": sorted(stage2.get("groups") or []),
        "no_new_privs": stage2.get("no_new_privs"),
        "seccomp": stage2.get("seccomp"),
        "securebits": securebits & ~_SECBIT_KEEP_CAPS if isinstance(securebits, int) else None,
        "caps": {
            "effective": effective,
            "permitted": permitted,
            "ambient": ambient,
            "inheritable": sorted(caps["inheritable"]),
            "bounding": sorted(caps["bounding"]),
        },
    }


def exec_changes(stage2: dict[str, Any], payload: dict[str, Any], securebits: Any) -> list[str]:
    """How the payload's credential differs from what exec derives from stage 2's at
    start_process: ids, groups, no_new_privs, seccomp, securebits (where the payload reports
    them) and each capability set exactly (the derivation is the kernel's; a set narrower
    than it means start_process changed the credential, e.g. set SECBIT_NOROOT or dropped a
    bounding capability, before the exec)."""
    # Cut to what stage 2 had where the kernel lets exec gain nothing: with no_new_privs.
    # (Another process sharing stage 2's file system information would too: the kit's RPC
    # server does, and the container reaps it before start_process.)
    want = exec_credential(stage2, securebits, downgraded=bool(stage2.get("no_new_privs")))
    out = [
        f"{name} {payload.get(name)} (exec gives {want[name]})"
        for name in ("uid", "gid", "no_new_privs", "seccomp")
        if payload.get(name) != want[name]
    ]
    if sorted(payload.get("groups") or []) != want["groups"]:
        out.append(f"groups {payload.get('groups')} (exec gives {want['groups']})")
    # only a payload that reports them (the fds payload: /proc/self/status has none)
    seen_bits, want_bits = payload.get("securebits"), want["securebits"]
    if seen_bits is not None and want_bits is not None and seen_bits != want_bits:
        out.append(
            f"securebits {seen_bits:#x} (exec gives {want_bits:#x}: stage 2's "
            f"{securebits:#x} without SECBIT_KEEP_CAPS)"
        )
    for kind, allowed in want["caps"].items():
        extra = sorted(set(payload["caps"][kind]) - set(allowed))
        if extra:
            out.append(
                f"{kind} capabilities {_caps_text(extra)} beyond what exec gives "
                f"{_caps_text(allowed)}"
            )
        missing = sorted(set(allowed) - set(payload["caps"][kind]))
        if missing:
            out.append(
                f"{kind} capabilities without {_caps_text(missing)} that exec gives "
                f"{_caps_text(allowed)}"
            )
    return out


def check_payload_fds(verify: Verifier, run: Run) -> None:
    """FD-001: the ``fds`` payload lists its open descriptors; only the standard ones and
    those the StarterConfig keeps may be there."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    found = parse_fds(run.result.stdout)
    if found is None:
        verify.fail(
            requirement,
            expected="the payload's list of its open file descriptors on its standard output",
            observed=f"stdout {run.result.stdout[:300]!r} ({describe_run(run)})",
            run=run,
            role="payload",
        )
        return
    kept = (Facts(run).starter_config or {}).get("keep_fds") or []
    allowed = set(X.PAYLOAD_STANDARD_FDS) | set(kept)
    extra = {fd: target for fd, target in sorted(found.items()) if fd not in allowed}
    verify.check(
        requirement,
        not extra,
        expected=f"only fds {sorted(allowed)} (0, 1, 2 and those kept: {sorted(kept)})",
        observed=lambda: (
            "also open: " + ", ".join(f"{fd} -> {target}" for fd, target in extra.items())
        ),
        run=run,
        role="payload",
        event=exit_event(run),
    )


# --- order rules (SPEC §2) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One check an order rule made: what broke it (None when it held) and where."""

    problem: Problem | None
    event: dict[str, Any] | None = None
    role: str | None = None
    hook: str | None = None


class OrderRule(ABC):
    """An order or count rule of SPEC §2 that checks a run's events and describes itself."""

    def __init__(self, rule: Any) -> None:
        self.rule = rule

    @abstractmethod
    def check(self, events: list[dict[str, Any]]) -> list[Finding]:
        """One finding per check the rule makes of ``events`` (none when it cannot apply)."""

    def describe(self) -> str:
        text: str = self.rule.describe()
        return text


#: order rule type -> the rule that judges it.
ORDER_RULES: dict[type, type[OrderRule]] = {}


def _order_rule(rule: type) -> Callable[[type[OrderRule]], type[OrderRule]]:
    def register(cls: type[OrderRule]) -> type[OrderRule]:
        if rule in ORDER_RULES:
            raise SuiteError(f"two rules for {rule.__name__}: {ORDER_RULES[rule].__name__}")
        ORDER_RULES[rule] = cls
        return cls

    return register


def order_rule_for(rule: Any) -> OrderRule:
    if type(rule) not in ORDER_RULES:
        raise SuiteError(
            f"unknown rule {rule!r}: register one with @_order_rule({type(rule).__name__}) "
            "in conformance.checks"
        )
    return ORDER_RULES[type(rule)](rule)


@_order_rule(X.Before)
class BeforeRule(OrderRule):
    rule: X.Before

    def check(self, events: list[dict[str, Any]]) -> list[Finding]:
        first = self.rule.first
        firsts = [e["seq"] for e in events if first.matches(e)]
        out = []
        for then in (e for e in events if self.rule.then.matches(e)):
            if any(seq < then["seq"] for seq in firsts):
                out.append(Finding(None, then))
                continue
            observed = f"it came at #{then['seq']}, " + (
                f"the first {first.describe()} only at #{firsts[0]}"
                if firsts
                else f"and no {first.describe()} was recorded"
            )
            out.append(Finding(Problem(self.describe(), observed), then))
        return out


@_order_rule(X.Count)
class CountRule(OrderRule):
    rule: X.Count

    def check(self, events: list[dict[str, Any]]) -> list[Finding]:
        rule = self.rule
        found = [e for e in events if rule.point.matches(e)]
        n = len(found)
        ok = n >= rule.at_least and (rule.at_most is None or n <= rule.at_most)
        observed = f"{n} recorded" + (
            f" (at {', '.join('#' + str(e['seq']) for e in found[:6])})" if found else ""
        )
        extra = found[rule.at_most] if rule.at_most is not None and n > rule.at_most else None
        problem = None if ok else Problem(self.describe(), observed)
        return [Finding(problem, extra, rule.point.role, rule.point.hook)]


@_order_rule(X.FirstHooks)
class FirstHooksRule(OrderRule):
    rule: X.FirstHooks

    def check(self, events: list[dict[str, Any]]) -> list[Finding]:
        role = self.rule.role
        entered = [e for e in events if e.get("kind") == "hook_enter" and e.get("role") == role]
        if not entered:
            return []  # the Count rules report a missing process
        first = [e["hook"] for e in entered[: len(self.rule.hooks)]]
        problem = None
        if tuple(first) != self.rule.hooks:
            problem = Problem(self.describe(), f"the {role} entered {', '.join(first)} first")
        return [Finding(problem, entered[0], role)]


@_order_rule(X.DistinctThreads)
class DistinctThreadsRule(OrderRule):
    rule: X.DistinctThreads

    def check(self, events: list[dict[str, Any]]) -> list[Finding]:
        rule = self.rule
        # The threads the kit runs the hooks in: a hook the engine calls itself runs in its
        # caller's thread (ORDER-009 and the other counts judge such a call).
        entered = kit_calls(
            [
                e
                for e in events
                if e.get("kind") == "hook_enter"
                and e.get("role") == rule.role
                and e.get("hook") in rule.hooks
            ]
        )
        tids = [(e["hook"], e["tid"]) for e in entered]
        distinct = len({tid for _, tid in tids}) == len(tids)
        problem = None
        if not (distinct and len(entered) >= 2):
            observed = (
                ", ".join(f"{hook} in thread {tid}" for hook, tid in tids) or "none of them ran"
            )
            problem = Problem(self.describe(), observed)
        return [Finding(problem, entered[-1] if entered else None, rule.role)]


def check_rules(verify: Verifier, run: Run, only: tuple[type, ...] | None = None) -> None:
    """The order rules tagged with the requirement (``only``: those of these types, e.g. the
    counts on a run that failed on purpose, where some hooks never run)."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    rules = X.rules_for(requirement)
    if not rules:
        raise SuiteError(f"no order rule is tagged {requirement}")
    if only is not None:
        rules = tuple(r for r in rules if isinstance(r, only))
    for rule in map(order_rule_for, rules):
        for found in rule.check(run.events):
            verify.check(
                requirement,
                found.problem is None,
                expected=found.problem.expected if found.problem else rule.describe(),
                observed=found.problem.observed if found.problem else "",
                run=run,
                event=found.event,
                role=found.role,
                hook=found.hook,
            )


def check_hook_roles(verify: Verifier, run: Run) -> None:
    """ORDER-014: each hook runs only in the roles SPEC §1 assigns to it."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    for event in hook_events(run, kinds=("hook_enter",)):
        allowed = X.HOOK_ROLES.get(event["hook"], frozenset())
        verify.check(
            requirement,
            event["role"] in allowed,
            expected=f"{event['hook']} only in {', '.join(sorted(allowed))}",
            observed=f"{event['hook']} ran in the {event['role']}",
            run=run,
            event=event,
        )


def check_pid_one(verify: Verifier, run: Run) -> None:
    """PID-002: with a new pid namespace stage 2 is pid 1 of it."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    facts = Facts(run)
    if "pid" not in facts.created():
        verify.unsupported(requirement, "the engine does not create a pid namespace")
        return
    events = hook_events(run, "stage2")
    if not events:
        verify.fail(
            requirement, expected="stage 2 hooks", observed="none recorded", run=run, role="stage2"
        )
    for event in events:
        verify.check(
            requirement,
            event.get("pid") == 1,
            expected="stage 2 sees itself as pid 1",
            observed=f"pid {event.get('pid')}",
            run=run,
            event=event,
        )


# --- state (SPEC §1, §2 rule 3) ---------------------------------------------------------------


def check_fresh_config(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    returns = hook_events(run, hook="config", kinds=("hook_return",))
    reference = next((e for e in returns if e["role"] == "stage1"), None)
    if reference is None:
        verify.fail(
            requirement,
            expected="config() returned in stage 1",
            observed="no return of config in stage 1",
            run=run,
            role="stage1",
        )
        return
    want = reference.get("result") or {}
    for event in returns:
        got = event.get("result") or {}
        same = (
            isinstance(got, dict)
            and got.get("type") == want.get("type")
            and got.get("json") == want.get("json")
        )
        verify.check(
            requirement,
            same,
            expected=f"the same fresh config as stage 1's "
            f"config() (#{reference['seq']}): {str(want.get('json'))[:200]}",
            observed=f"{str(got)[:300]}",
            run=run,
            event=event,
        )
    roles = {e["role"] for e in returns}
    for role in X.ROLES:
        verify.check(
            requirement,
            role in roles,
            expected=f"config() returned in the {role}",
            observed=f"roles that returned from config: {sorted(roles)}",
            run=run,
            role=role,
        )


#: The shape of what :func:`config_calls` returns (kit.preflight.Shape).
CONFIG_CALLS = (
    {
        "json": object,
        "again": object,
        "same": bool,
        "type": str,
        "id": int,
        "shared": [str],
    },
    {"error": str},
)


def config_calls(registration: Any) -> dict[str, Any]:
    """In the engine's inspection child (kit.preflight.inspect): what STATE-001 judges of two
    calls of ``config()`` there, as JSON: their JSON, whether they are the same object and
    the mutable parts they share; ``{"error": ...}`` when one of them raised."""
    try:
        ops = registration.factory()
        first, second = ops.config(), ops.config()
        got = first.to_json()
        again = second.to_json()
    except Exception as exc:  # noqa: BLE001 engine code may raise anything
        return {"error": f"{type(exc).__name__}: {exc}"}
    mine = {id(obj): path for path, obj in mutable_parts(first)}
    shared = [
        f"{path} (also {mine[id(obj)]} of the first)"
        for path, obj in mutable_parts(second)
        if id(obj) in mine and first is not second
    ]
    return {
        "json": got,
        "again": again,
        "same": first is second,
        "type": type(first).__name__,
        "id": id(first),
        "shared": shared,
    }


def check_config_calls(verify: Verifier, run: Run, engine: str) -> None:
    """STATE-001, in a process of its own (an inspection child as U: engine code never runs
    in the suite's process): two calls of ``config()`` of the engine ``engine`` (as named to
    the suite) return two objects with the JSON that stage 1's ``config()`` returned in
    ``run``, sharing no mutable value (a shared object or a shared mutable default would carry
    one caller's changes to the next)."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    found = preflight.inspect(engine, collect={"config_calls": (config_calls, CONFIG_CALLS)})
    seen = found.collected.get("config_calls")
    if seen is None or "error" in seen:
        why = "; ".join(str(p) for p in found.problems) or "no result"
        verify.fail(
            requirement,
            expected="config() callable in any process",
            observed=f"it raised {seen['error']}" if seen else f"the inspection failed: {why}",
            hook="config",
        )
        return
    got = seen["json"]
    stage1 = next((e for e in hook_events(run, "stage1", "config", ("hook_return",))), None)
    want = ((stage1 or {}).get("result") or {}).get("json")
    verify.check(
        requirement,
        stage1 is not None and got == want,
        expected=f"the fresh config stage 1's config() returned: {str(want)[:200]}",
        observed=f"config() returned {str(got)[:300]} here",
        run=run,
        event=stage1,
        hook="config",
    )
    verify.check(
        requirement,
        not seen["same"],
        expected="a new object on every call of config()",
        observed=f"two calls returned the same {seen['type']} object (id {seen['id']:#x})",
        hook="config",
    )
    again = seen["again"]
    verify.check(
        requirement,
        again == got,
        expected=f"the same JSON from every call of config(): {str(got)[:200]}",
        observed=f"the second call returned {str(again)[:300]}",
        hook="config",
    )
    if seen["same"]:
        return
    shared = seen["shared"]
    verify.check(
        requirement,
        not shared,
        expected="no mutable object shared between two configs, at any depth",
        observed=lambda: f"{', '.join(shared[:4])} is the same object in both",
        hook="config",
    )


_IMMUTABLE = (str, bytes, int, float, complex, bool, type(None))


def mutable_parts(root: Any, path: str = "config") -> list[tuple[str, Any]]:
    """(path, object) of every mutable object reachable from ``root``, ``root`` included:
    lists, dicts, sets, bytearrays and (unfrozen) dataclass instances, at any depth, also
    inside tuples, frozensets and frozen dataclasses. Each object once, cycles included."""
    out: list[tuple[str, Any]] = []
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [(path, root)]
    while todo:
        where, obj = todo.pop()
        if isinstance(obj, (*_IMMUTABLE, type)) or id(obj) in seen:
            continue
        seen.add(id(obj))
        instance = dataclasses.is_dataclass(obj)
        if isinstance(obj, (list, dict, set, bytearray)) or (
            instance and not type(obj).__dataclass_params__.frozen
        ):
            out.append((where, obj))
        if isinstance(obj, dict):
            todo += [(f"{where}[{key!r}]", value) for key, value in obj.items()]
        elif isinstance(obj, (list, tuple)):
            todo += [(f"{where}[{i}]", value) for i, value in enumerate(obj)]
        elif isinstance(obj, (set, frozenset)):
            todo += [(f"{where}{{…}}", value) for value in obj]
        elif instance:
            todo += [
                (f"{where}.{f.name}", getattr(obj, f.name, None)) for f in dataclasses.fields(obj)
            ]
    return out


def check_distinct_processes(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    seen: dict[tuple[Any, Any], str] = {}
    for role in X.ROLES:
        events = hook_events(run, role)
        if not events:
            verify.fail(
                requirement,
                expected=f"hooks of the {role}",
                observed="none recorded",
                run=run,
                role=role,
            )
            continue
        key = ((events[0].get("snapshot") or {}).get("ns", {}).get("pid"), events[0]["pid"])
        verify.check(
            requirement,
            key not in seen,
            expected="a process of its own for each of stage 1, master, RPC server, stage 2",
            observed=lambda: (
                f"the {role} is the same process as the {seen[key]} "
                f"(pid {key[1]} in pid namespace {key[0]})"
            ),
            run=run,
            event=events[0],
        )
        seen.setdefault(key, role)


# --- namespaces (SPEC §3, §4, §5) ---------------------------------------------------------------


def _ns(event: dict[str, Any]) -> dict[str, int]:
    return _snapshot(event)["ns"]


def _stage2_event(run: Run) -> dict[str, Any] | None:
    events = hook_events(run, "stage2", kinds=("hook_enter",))
    return events[-1] if events else None


def check_rpc_shares_namespaces(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    stage2 = _stage2_event(run)
    rpc = hook_events(run, "rpc")
    if stage2 is None or not rpc:
        verify.fail(
            requirement,
            expected="hooks of both stage 2 and the RPC server",
            observed=f"stage 2 {'recorded' if stage2 else 'missing'}, RPC server "
            f"{'recorded' if rpc else 'missing'}",
            run=run,
        )
        return
    want = _ns(stage2)
    # Every thread of the server, at its hooks and around every method (SPEC §4): a thread
    # may unshare or setns on its own.
    for event in rpc + method_events(run):
        snap = _snapshot(event)  # a method record's "ns" is its first thread's
        process = "ns" in snap and event["kind"] not in X.METHOD_KINDS
        views = ([("the process", snap["ns"])] if process else []) + [
            (thread_label(t), t["ns"]) for t in snap["threads"] if t.get("ns")
        ]
        differ = [
            (who, k, got.get(k))
            for who, got in views
            for k in X.NAMESPACE_KINDS
            if got.get(k) != want.get(k) and (who == "the process" or got.get(k) is not None)
        ]  # a thread ending
        verify.check(
            requirement,
            not differ,
            expected=f"the namespaces of stage 2 (#{stage2['seq']}) in every thread",
            observed=lambda: (
                "different: "
                + ", ".join(
                    f"{who}: {k} {ino} (stage 2: {want.get(k)})" for who, k, ino in differ[:4]
                )
            ),
            run=run,
            event=event,
        )


def check_payload_namespaces(verify: Verifier, run: Run) -> None:
    """NS-013: the namespaces the ``fds`` payload reports after exec are those stage 2 had
    at start_process (exec changes none: a difference is start_process's own)."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    kernel_only(run, "the payload's namespaces after exec")
    entered = hook_events(run, "stage2", "start_process", ("hook_enter",))
    found = parse_payload_ns(run.result.stdout)
    if not entered or found is None:
        verify.fail(
            requirement,
            expected="stage 2's start_process and the payload's list of its namespaces",
            observed=f"stdout {run.result.stdout[-300:]!r} ({describe_run(run)})",
            run=run,
            role="payload",
        )
        return
    want = _ns(entered[-1])
    differ = [k for k in X.NAMESPACE_KINDS if found.get(k) != want.get(k)]
    verify.check(
        requirement,
        not differ,
        expected=f"the namespaces of stage 2 at start_process (#{entered[-1]['seq']})",
        observed=lambda: (
            "different: "
            + ", ".join(f"{k} {found.get(k)} (stage 2: {want.get(k)})" for k in differ)
        ),
        run=run,
        role="payload",
        event=exit_event(run),
    )


def check_master_not_shared(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    facts = Facts(run)
    stage2 = _stage2_event(run)
    created = [k for k in X.NOT_SHARED_WITH_MASTER if k in facts.created()]
    master = hook_events(run, "master")
    if stage2 is None or not master:
        verify.fail(
            requirement,
            expected="hooks of both the master and stage 2",
            observed="one of them is missing",
            run=run,
        )
        return
    if not created:
        verify.vacuous(requirement, "no pid, net, uts, ipc or cgroup namespace is created")
        return
    container = _ns(stage2)
    for event in master:
        # The process's namespaces and each thread's: a hook thread may setns on its own.
        views = [_ns(event)] + [t["ns"] for t in _snapshot(event)["threads"] if t.get("ns")]
        shared = [k for k in created if any(v.get(k) == container.get(k) for v in views)]
        verify.check(
            requirement,
            not shared,
            expected=f"none of the container's {', '.join(created)} namespaces",
            observed=lambda: f"shares {', '.join(shared)} with stage 2 (#{stage2['seq']})",
            run=run,
            event=event,
        )


def check_master_user_ns(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    facts = Facts(run)
    whose = X.MASTER_USER_NS[run.flow]
    stage2 = _stage2_event(run)
    host = facts.host_ns
    if stage2 is None or host is None:
        verify.fail(
            requirement, expected="hooks of stage 1 and stage 2", observed="missing", run=run
        )
        return
    want = host["user"] if whose == "host" else _ns(stage2)["user"]
    for event in hook_events(run, "master"):
        got = _ns(event)["user"]
        verify.check(
            requirement,
            got == want,
            expected=f"the {whose}'s user namespace ({want})",
            observed=f"user namespace {got} (host {host['user']}, container {_ns(stage2)['user']})",
            run=run,
            event=event,
        )


def check_shared_root(verify: Verifier, run: Run) -> None:
    """NS-002: stage 2 enters start_process with the root directory the RPC server had after
    its last request (snapshots record the root's identity; the RPC server shares it with the
    container process through CLONE_FS, so a root an RPC method set is stage 2's too)."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    enters = hook_events(run, "stage2", "start_process", ("hook_enter",))
    snap = (enters[0].get("snapshot") or {}) if enters else {}
    if not enters or "probe_error" in snap or not snap:
        verify.vacuous(requirement, "stage 2 has no snapshot at start_process")
        return
    last = None  # (root, event): the RPC server's last record of its root
    for e in run.events:
        if e.get("role") != "rpc":
            continue
        if e.get("kind") == "rpc_call":
            seen = (e.get("creds") or {}).get("after") or {}
        elif e.get("kind") in ("hook_enter", "hook_return"):
            seen = e.get("snapshot") or {}
        else:
            continue
        if "root" in seen:
            last = (seen["root"], e)
    if last is None:
        verify.vacuous(requirement, "the RPC server recorded no snapshot")
        return
    rpc_root, event = last
    verify.check(
        requirement,
        rpc_root is not None and snap.get("root") == rpc_root,
        expected=f"stage 2's root is the RPC server's ({rpc_root} at #{event['seq']})",
        observed=f"stage 2's root is {snap.get('root')}",
        run=run,
        event=enters[0],
    )


#: SPEC §5: user and pid in the starter (before the fork), then the container side. Written
#: out from the SPEC, not taken from the kit (whose order is what is being checked).
NS_ENTRY_ORDER = ("user", "pid", "net", "uts", "ipc", "cgroup", "mount")
_STARTER_KINDS = ("user", "pid")


def check_namespace_order(verify: Verifier, run: Run) -> None:
    """NS-009: the namespaces the starter joined and created before the fork
    (``container_start``), then those the container process entered (``namespaces``
    ``order``), follow :data:`NS_ENTRY_ORDER`, each on its side."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    rank = {kind: i for i, kind in enumerate(NS_ENTRY_ORDER)}
    entered: list[tuple[str, str, dict[str, Any]]] = []
    for ev in events_of(run, "container_start"):
        entered += [
            (kind, "starter", ev) for kind in (ev.get("joined") or []) + (ev.get("created") or [])
        ]
    setups = events_of(run, "namespaces")
    for ev in setups:
        verify.check(
            requirement,
            isinstance(ev.get("order"), list),
            expected="the container side records the order it entered namespaces in",
            observed="no order recorded",
            run=run,
            event=ev,
        )
        entered += [(kind, "container", ev) for _, kind in ev.get("order") or []]
    for kind, side, ev in entered:
        want = "starter" if kind in _STARTER_KINDS else "container"
        verify.check(
            requirement,
            side == want,
            expected=f"the {kind} namespace entered in the {want}",
            observed=f"entered in the {side}",
            run=run,
            event=ev,
        )
    for (before, _, _), (kind, _, ev) in itertools.pairwise(entered):
        verify.check(
            requirement,
            rank.get(kind, -1) > rank.get(before, len(rank)),
            expected=f"namespaces entered in the order {', '.join(NS_ENTRY_ORDER)}",
            observed=f"{kind} entered after {before}",
            run=run,
            event=ev,
        )
    if not entered:
        verify.vacuous(requirement, "the run entered no namespace")


def check_mount_propagation(verify: Verifier, run: Run) -> None:
    """NS-008: a new mount namespace has the StarterConfig's propagation on / (recorded by
    the container process right after it set it), before any RPC call could mount."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    configs = events_of(run, "starter_config")
    wanted = (
        ((configs[0].get("config") or {}).get("requests") or {}).get("mount_propagation")
        if configs
        else None
    )
    base = split_propagation(wanted)[0] if wanted else wanted
    setups = [ev for ev in events_of(run, "namespaces") if "mount" in (ev.get("created") or [])]
    calls = events_of(run, "rpc_call")
    for ev in setups:
        verify.check(
            requirement,
            ev.get("propagation") == base,
            expected=f"/ is {base} (mount_propagation {wanted!r})",
            observed=f"/ is {ev.get('propagation')}",
            run=run,
            event=ev,
        )
        early = [c for c in calls if c["seq"] < ev["seq"]]
        verify.check(
            requirement,
            not early,
            expected="the propagation set before any RPC call",
            observed=lambda: f"{early[0].get('method')} came first",
            run=run,
            event=early[0] if early else ev,
        )
    if not setups:
        verify.vacuous(requirement, "no new mount namespace")


def check_requested_namespaces(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    facts = Facts(run)
    stage2 = _stage2_event(run)
    host = facts.host_ns
    if stage2 is None or host is None or facts.starter_config is None:
        verify.fail(
            requirement,
            expected="a StarterConfig and hooks of stage 1 and 2",
            observed="missing",
            run=run,
        )
        return
    got = _ns(stage2)
    for kind in facts.created():
        verify.check(
            requirement,
            got.get(kind) != host.get(kind),
            expected=f"a new {kind} namespace (the StarterConfig creates it)",
            observed=f"the host's {kind} namespace {got.get(kind)}",
            run=run,
            event=stage2,
        )
    # Every namespace the suite asked the engine to join (the join scenario's notes), whether
    # or not the StarterConfig passed it on.
    targets = run.notes.get("targets") or {}
    paths = {**(run.notes.get("paths") or {}), **facts.joined()}
    for kind, inode in targets.items():
        verify.check(
            requirement,
            got.get(kind) == inode,
            expected=f"the {kind} namespace joined at {paths.get(kind)} ({inode})",
            observed=f"{kind} namespace {got.get(kind)}"
            + ("" if kind in facts.joined() else f" (the StarterConfig does not join {kind})"),
            run=run,
            event=stage2,
        )
    if not facts.created() and not facts.joined():
        verify.vacuous(requirement, "the StarterConfig asks for no namespace")


def check_user_ns_map(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    facts = Facts(run)
    inside_sym, _ = X.USER_NS_MAP[run.flow]
    if facts.uid is None or facts.gid is None:
        raise SuiteError(f"run {run.id}: its run_start event names no invoking user")
    stage2 = _stage2_event(run)
    if stage2 is None:
        verify.fail(requirement, expected="stage 2 hooks", observed="none", run=run)
        return
    # "map U→U" (userns) and "map 0→U" (fakeroot, hybrid) are about U's gid as much as its
    # uid: a gid map copied from the other flow gives the container U's group under id 0.
    for name, host_id in (("uid", facts.uid), ("gid", facts.gid)):
        inside = host_id if inside_sym == X.INVOKER else 0
        idmap = _snapshot(stage2).get(f"{name}_map") or []
        verify.check(
            requirement,
            to_host(inside, idmap) == host_id,
            expected=f"a {name} map of {inside} to U's {name} ({host_id})",
            observed=f"{name}_map {idmap}",
            run=run,
            event=stage2,
        )


def check_new_user_ns(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    facts = Facts(run)
    stage2 = _stage2_event(run)
    host = facts.host_ns
    if stage2 is None or host is None:
        verify.fail(
            requirement, expected="hooks of stage 1 and stage 2", observed="missing", run=run
        )
        return
    new = _ns(stage2)["user"] != host["user"]
    want = X.NEW_USER_NS[run.flow]
    verify.check(
        requirement,
        new == want,
        expected="a new user namespace" if want else "the host's user namespace",
        observed=f"user namespace {_ns(stage2)['user']} (host {host['user']})",
        run=run,
        event=stage2,
    )


def _subordinate_ranges(path: str, user: str | None, uid: int | None) -> list[tuple[int, int]]:
    """U's ranges (first id, count) in /etc/subuid or /etc/subgid."""
    ranges = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if (
                    len(parts) == 3
                    and parts[0] in (user, str(uid))
                    and parts[1].isdigit()
                    and parts[2].isdigit()
                ):
                    ranges.append((int(parts[1]), int(parts[2])))
    except OSError:
        pass
    return ranges


def check_user_ns_host_ids(verify: Verifier, run: Run) -> None:
    """NS-012: every host id the container's uid and gid maps reach is one the flow may map."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    facts = Facts(run)
    stage2 = _stage2_event(run)
    if stage2 is None:
        verify.fail(requirement, expected="stage 2 hooks", observed="none", run=run)
        return
    host = facts.host_ns
    if host is not None and _ns(stage2)["user"] == host["user"]:
        verify.vacuous(requirement, "stage 2 is in the host's user namespace (NS-007)")
        return
    allowed_kinds = X.MAPPABLE_HOST_IDS[run.flow]
    start = events_of(run, "run_start")
    name = (start[0].get("invoker") or {}).get("name") if start else None
    snap = _snapshot(stage2)
    for map_name, own, subfile in (
        ("uid_map", facts.uid, "/etc/subuid"),
        ("gid_map", facts.gid, "/etc/subgid"),
    ):
        if own is None:
            raise SuiteError(f"run {run.id}: its run_start event names no invoking user")
        allowed = [(own, 1)] if X.INVOKER in allowed_kinds else []
        if X.SUBORDINATE in allowed_kinds:
            allowed += _subordinate_ranges(subfile, name, facts.uid)
        for inside, outside, count in snap.get(map_name) or []:
            ok = any(first <= outside and outside + count <= first + n for first, n in allowed)
            verify.check(
                requirement,
                ok,
                expected=f"a {map_name} reaching only host ids "
                + ", ".join(
                    f"{first}" if n == 1 else f"{first}-{first + n - 1}" for first, n in allowed
                ),
                observed=f"{map_name} line {inside} {outside} {count} maps host ids "
                f"{outside}-{outside + count - 1}",
                run=run,
                event=stage2,
            )


def check_host_view(verify: Verifier, run: Run, what: str) -> None:
    """NS-010 (``what="hostname"``), NS-011 (``what="mounts"``): what the launcher saw of the
    host while the ``host-view`` run lasted and after it (the scenario's notes)."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    kernel_only(run, "the host's hostname and mount namespace")
    notes = run.notes
    if "hostname_after" not in notes:
        raise HarnessError(f"run {run.id} has no view of the host: {notes.get('error')}")
    watched = f"watched {notes.get('looks', 0)} times during the run" + (
        f"; {notes['error']}" if notes.get("error") else ""
    )
    # In a host sandbox, "the host" the engine can reach is the sandbox: the supervisor
    # watched its hostname and mount table (kit.run.hostdiff), the launcher's view is the real
    # host's, which the sandbox keeps unchanged.
    kinds = ("hostname",) if what == "hostname" else ("mount",)
    for change in _seen_in_sandbox(run, kinds):
        hooks = change.get("hooks") or []
        verify.fail(
            requirement,
            expected=f"the host's {what} unchanged while the run lasts "
            "(the host sandbox's, watched by the supervisor)",
            observed=_host_change_text(change),
            run=run,
            role=hooks[0].get("role") if len(hooks) == 1 else "master",
            hook=hooks[0].get("hook") if len(hooks) == 1 else None,
        )
    if what == "hostname":
        before = notes["hostname_before"]
        seen = notes.get("hostnames_during") or []
        verify.check(
            requirement,
            not seen,
            expected=f"the host's hostname {before!r} while the run lasts ({watched})",
            observed=f"the host's hostname was also {', '.join(map(repr, seen))}",
            run=run,
            role="master",
        )
        after = notes["hostname_after"]
        verify.check(
            requirement,
            after == before,
            expected=f"the host's hostname {before!r} after the run",
            observed=f"it is {after!r}",
            run=run,
            role="master",
        )
    elif what == "mounts":
        new = notes.get("new_mounts_during") or []
        verify.check(
            requirement,
            not new,
            expected=f"no new or changed mount (options, "
            f"propagation) in the host's mount namespace while the run lasts "
            f"({watched})",
            observed=lambda: "new or changed: " + ", ".join(new[:5]),
            run=run,
            role="master",
        )
    else:
        raise SuiteError(f"unknown host view {what!r}")


# --- RPC (SPEC §6) -------------------------------------------------------------------------------


def check_rpc_calls_during_create(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    calls = events_of(run, "rpc_call")
    enter = hook_events(run, "master", "create_container", ("hook_enter",))
    done = hook_events(run, "master", "create_container", ("hook_return", "hook_raise"))
    if not enter or not done:
        verify.fail(
            requirement,
            expected="create_container entered and returned",
            observed="missing",
            run=run,
            role="master",
            hook="create_container",
        )
        return
    lo, hi = enter[0]["seq"], done[0]["seq"]
    for call in calls:
        verify.check(
            requirement,
            call.get("role") == "rpc" and lo < call["seq"] < hi,
            expected=f"served by the RPC server while create_container ran (#{lo}..#{hi})",
            observed=f"{call.get('method')} recorded by the {call.get('role')} at #{call['seq']}",
            run=run,
            event=call,
        )
    # SPEC §2 rule 5: "start_process begins only after create_container returned and the RPC
    # connection closed": a copy engine code keeps (a dup, socket.fromfd, a forked helper, in
    # any process the master started) keeps the connection open, whether or not it is used
    # for a call. The master looks for copies when create_container returns.
    # The supervisor's finding, made from outside the master, else the master's own.
    kept_copies = events_of(run, "rpc_conn_kept", role="supervisor") or events_of(
        run, "rpc_conn_kept", role="master"
    )
    for kept in kept_copies:
        verify.fail(
            requirement,
            expected="no copy of the RPC connection open once create_container returned "
            "(the RPC server exits when the connection closes; stage 2 starts after it)",
            observed=str(kept.get("detail") or kept.get("holders")),
            run=run,
            event=kept,
            role="master",
            hook="create_container",
        )
    if not calls and not kept_copies:
        verify.vacuous(requirement, "the engine made no RPC call")


def check_rpc_method_names(verify: Verifier, run: Run, engine_name: str) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    calls = events_of(run, "rpc_call")
    if not calls:
        verify.unsupported(requirement, "the engine made no RPC call in this run")
        return
    for call in calls:
        method = str(call.get("method"))
        verify.check(
            requirement,
            method.startswith(engine_name + ".") and len(method) > len(engine_name) + 1,
            expected=f"a method named \"{engine_name}.<method>\"",
            observed=f"method {method!r}",
            run=run,
            event=call,
        )


def check_rpc_server_exit(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    exits = events_of(run, "process_exit", child_role="rpc")
    verify.check(
        requirement,
        len(exits) == 1 and exits[0].get("status") == 0,
        expected="the RPC server exits with status 0 once the client closed",
        observed=", ".join(f"status {e.get('status')}" for e in exits)
        or "no exit of the RPC server was recorded",
        run=run,
        event=exits[0] if exits else None,
        role="rpc",
    )


def check_rpc_sequential(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    calls = events_of(run, "rpc_call")
    previous = None
    for call in calls:
        if previous is not None:
            started = call["t"] - float(call.get("duration_ms") or 0) * 1e6
            verify.check(
                requirement,
                started >= previous["t"] - 5e4 and call.get("tid") == previous.get("tid"),
                expected="each request served after the previous one was answered, "
                "by the same thread",
                observed=f"{call.get('method')} started "
                f"{(previous['t'] - started) / 1e6:.3f} ms before "
                f"{previous.get('method')} (#{previous['seq']}) was answered",
                run=run,
                event=call,
            )
        previous = call
    if len(calls) < 2:
        verify.vacuous(requirement, f"{len(calls)} RPC call(s): nothing can overlap")


#: What the RPC server must answer to each probe of the rpc-probe scenario (the error type).
_PROBE_ERRORS = {
    "unknown-method": "UnknownMethodError",
    "unknown-argument": "TypeError",
    "malformed-json": "ProtocolError",
    "pickle": "ProtocolError",
}


def _error_reply(call: dict[str, Any], want: str) -> tuple[bool, str]:
    err = call.get("error") or {}
    ok = (
        call.get("ok") is False
        and err.get("type") == want
        and "errno" in err
        and bool(err.get("message"))
    )
    return ok, (
        f"ok={call.get('ok')}, error {err.get('type')} (errno {err.get('errno')!r}): "
        f"{str(err.get('message'))[:160]!r}"
    )


def _names_probe_method(call: dict[str, Any]) -> bool:
    """Whether the server recorded ``call`` under the kit's unknown probe method
    (``<engine>.conformance_no_such_method``)."""
    return str(call.get("method", "")).rpartition(".")[2] == PROBE_METHOD


def check_rpc_probes(verify: Verifier, run: Run) -> None:
    """RPC-005 and RPC-006 on the rpc-probe scenario: the server's record of every probe
    frame (:data:`conformance.cooperation.RPC_PROBES`, in order, then the engine's own calls,
    then an oversized frame header).

    The one check that decides two requirements: its test declares both, and each verdict
    names its own ID (a pickle or an oversized frame refused: RPC-005; every other probe
    answered and the serving going on: RPC-006; a record per probe: both)."""
    run = verify.used(run.usable())
    calls = events_of(run, "rpc_call")
    probes, later = calls[: len(RPC_PROBES)], calls[len(RPC_PROBES) :]
    for req in ("RPC-005", "RPC-006"):
        verify.check(
            req,
            len(probes) == len(RPC_PROBES),
            expected=f"one record per probe frame ({', '.join(RPC_PROBES)})",
            observed=f"{len(probes)} record(s) before the server stopped",
            run=run,
        )
    # Fewer records than probes is reported above; the ones that came are checked.
    for name, call in zip(RPC_PROBES, probes, strict=False):
        req = "RPC-005" if name == "pickle" else "RPC-006"
        want = _PROBE_ERRORS[name]
        if name == "unknown-argument" and _names_probe_method(call):
            # The engine serves no method (the kit then sends its bad arguments to another
            # unknown method): "an unknown method ... gets an error reply" is what is left.
            want = _PROBE_ERRORS["unknown-method"]
        ok, seen = _error_reply(call, want)
        verify.check(
            req,
            ok,
            expected=f"the {name} probe answered with a {want} "
            "error reply carrying errno and message",
            observed=seen,
            run=run,
            event=call,
        )
    if len(probes) == len(RPC_PROBES):
        verify.check(
            "RPC-006",
            bool(later),
            expected="the server keeps serving after the probes",
            observed="nothing more was served",
            run=run,
            event=probes[-1],
        )
        served = [c for c in later[:-1] if c.get("ok")]
        if len(later) > 1:
            verify.check(
                "RPC-006",
                bool(served),
                expected="the engine's own calls after the probes are served",
                observed=f"{len(later) - 1} call(s), none served",
                run=run,
                event=later[0],
            )
    oversized = later[-1] if later else None
    ok, seen = _error_reply(oversized, "ProtocolError") if oversized else (False, "no record")
    ok = ok and "exceeds" in str((oversized or {}).get("error", {}).get("message"))
    verify.check(
        "RPC-005",
        ok,
        expected="a frame announcing more than the maximum size "
        "refused with a ProtocolError naming the size",
        observed=seen,
        run=run,
        event=oversized,
    )


# --- signals and exit (SPEC §7, §2 rule 8) ---------------------------------------------------


def exit_event(run: Run) -> dict[str, Any] | None:
    """The ledger's record of the run's exit code (written by the supervisor)."""
    exits = events_of(run, "exit")
    return exits[-1] if exits else None


def check_exit_code(verify: Verifier, run: Run, expected: int | None = None) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    want = run.scenario.expected_exit if expected is None else expected
    verify.check(
        requirement,
        run.result.exit_code == want,
        expected=f"exit code {want} ({run.scenario.description})",
        observed=f"exit code {run.result.exit_code} ({run.result.reason})",
        run=run,
        event=exit_event(run),
        role="master",
    )


def check_monitor_status(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    want = run.scenario.expected_exit
    if want is None:
        raise SuiteError(f"scenario {run.scenario.name!r} has no fixed exit status to check")
    returns = hook_events(run, "master", "monitor_container", ("hook_return",))
    if not returns:
        verify.fail(
            requirement,
            expected="monitor_container returned a wait status",
            observed="no return of monitor_container",
            run=run,
            role="master",
            hook="monitor_container",
        )
        return
    status = returns[0].get("result")
    if not isinstance(status, int) or isinstance(status, bool):
        verify.fail(
            requirement,
            expected="a wait status (int)",
            observed=repr(status),
            run=run,
            event=returns[0],
        )
        return
    # The status itself, not the exit code it maps to: a container killed by signal N and one
    # that exited 128+N give the same code, but only one is the container's wait status (and
    # only a death by signal lets the run re-raise it, SPEC §7). A scenario expecting more
    # than 128 is a death by signal (SPEC §2 rule 8: 128+signal); the core-dump flag is the
    # kernel's choice, not the monitor's.
    if want > 128:
        right = os.WIFSIGNALED(status) and os.WTERMSIG(status) == want - 128
    else:
        right = os.WIFEXITED(status) and os.WEXITSTATUS(status) == want
    verify.check(
        requirement,
        right,
        expected=f"the container's wait status "
        f"({f'killed by signal {want - 128}' if want > 128 else f'exited {want}'})",
        observed=f"wait status {status:#x} ("
        + (
            f"killed by signal {os.WTERMSIG(status)}"
            if os.WIFSIGNALED(status)
            else f"exited {os.WEXITSTATUS(status)}"
        )
        + ")",
        run=run,
        event=returns[0],
    )


def check_sigchld_recorded(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    chld = [e for e in events_of(run, "signal", role="master") if e.get("name") == "SIGCHLD"]
    verify.check(
        requirement,
        bool(chld),
        expected="the container's exit recorded as a SIGCHLD of the master",
        observed="no SIGCHLD recorded",
        run=run,
        role="master",
    )


#: SPEC §4: "changes no credential" compares all of these (securebits: the process's).
CREDENTIAL_FIELDS = (
    "uid",
    "gid",
    "groups",
    "caps.effective",
    "caps.permitted",
    "caps.inheritable",
    "caps.bounding",
    "caps.ambient",
    "no_new_privs",
    "seccomp",
    "securebits",
)


def credential(thread: dict[str, Any], securebits: Any = None) -> dict[str, Any]:
    """A thread's whole credential, field by field (capability sets as sorted lists)."""
    out: dict[str, Any] = {}
    for name in CREDENTIAL_FIELDS:
        if name == "securebits":
            out[name] = securebits
        elif name.startswith("caps."):
            out[name] = sorted((thread.get("caps") or {}).get(name[5:]) or [])
        else:
            out[name] = thread.get(name)
    return out


def credential_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``field before -> after`` for every field of two credentials that differs."""
    return [
        f"{name} {_short(before[name])} -> {_short(after[name])}"
        for name in CREDENTIAL_FIELDS
        if before.get(name) != after.get(name)
    ]


def _short(value: Any) -> str:
    return (
        _caps_text(value)
        if isinstance(value, list) and value and isinstance(value[0], str)
        else str(value)
    )


def _method_credentials(seen: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    """The whole credential of the serving thread (key ``"serving"``: the record's own
    fields) and of every thread the record lists, by tid. A method may mount a new /proc,
    which numbers threads anew: threads are compared where both records know the tid, the
    serving thread always."""
    out: dict[Any, dict[str, Any]] = {"serving": credential(seen, seen.get("securebits"))}
    for t in seen.get("threads") or []:
        out[t.get("tid")] = credential(t, seen.get("securebits"))
    return out


def check_rpc_methods_restore_credentials(verify: Verifier, run: Run) -> None:
    """The kit records the RPC server's credentials before and after every method: every
    thread leaves the method with the whole credential it entered with (what a method raised
    on its own thread it must have lowered again; no other thread may change at all)."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    calls = events_of(run, "rpc_call", role="rpc")
    if not calls:
        verify.vacuous(requirement, "no RPC request was answered")
        return
    for event in calls:
        creds = event.get("creds")
        before, after = (
            (creds.get("before"), creds.get("after")) if isinstance(creds, dict) else (None, None)
        )
        if not isinstance(before, dict) or not isinstance(after, dict):
            # The kit records both sides of every answered request (a refused one's too),
            # or says why it could not read one: a side missing without a reason was taken
            # out by code in the RPC server's process.
            why = creds.get("unread") if isinstance(creds, dict) else None
            if event.get("truncated") and not why:
                why = "the event was longer than the ledger's limit, its credentials too"
            verify.fail(
                requirement,
                expected=f"the kit's record of the credentials before and after "
                f"{event.get('method') or 'the request'}",
                observed="no credentials recorded for "
                + ("before" if not isinstance(before, dict) else "after")
                + " the method: "
                + (str(why) if why else "engine code in the RPC server removed the kit's record"),
                run=run,
                event=event,
                role="rpc",
            )
            continue
        was, now = _method_credentials(before), _method_credentials(after)
        serving = (was["serving"], now["serving"])
        for tid in sorted(set(was) & set(now), key=str):
            if tid != "serving" and (was[tid], now[tid]) == serving and serving[0] != serving[1]:
                continue  # the serving thread itself, already reported
            changes = credential_changes(was[tid], now[tid])
            thread = next(
                (t for t in after.get("threads") or [] if t.get("tid") == tid),
                {
                    "tid": event.get("tid") if tid == "serving" else tid,
                    "name": "serving the method" if tid == "serving" else None,
                },
            )
            verify.check(
                requirement,
                not changes,
                expected=f"{event.get('method') or 'the method'} returns "
                f"with every thread's whole credential as it started "
                f"({', '.join(CREDENTIAL_FIELDS)})",
                observed=lambda: f"{thread_label(thread)}: " + "; ".join(changes),
                run=run,
                event=event,
                role="rpc",
            )
        # A thread the method started (or one a new /proc numbers anew) entered no method:
        # it may have less privilege than the method's own thread had at entry, never more
        # (SPEC §4: the rows hold for threads the engine started; one started while the
        # method's thread had raised a capability keeps it).
        # Root's threads may hold any capability already: the flows whose rows narrow them.
        for t in after.get("threads") or [] if run.flow != "root" else []:
            mine = credential(t, after.get("securebits"))
            if t.get("tid") in was or (mine == serving[1] and serving[0] != serving[1]):
                continue  # compared above, or the serving thread numbered anew: reported
            gained = privilege_gained(was["serving"], mine)
            verify.check(
                requirement,
                not gained,
                expected=f"a thread {event.get('method') or 'the method'} left running has no "
                "privilege the method's own thread did not have when it started",
                observed=f"{thread_label(t)}: {'; '.join(gained)}",
                run=run,
                event=event,
                role="rpc",
            )


def privilege_gained(entry: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What credential ``now`` (:func:`credential`) holds that ``entry`` did not: a capability
    in any set, a uid or gid 0 where it had none, a supplementary group, no_new_privs or a
    seccomp filter lost."""
    out = []
    for kind in ("effective", "permitted", "inheritable", "bounding", "ambient"):
        extra = sorted(set(now[f"caps.{kind}"]) - set(entry[f"caps.{kind}"]))
        if extra:
            out.append(f"{kind} capabilities {_caps_text(extra)}")
    for name in ("uid", "gid"):
        mine, was = now.get(name) or [], entry.get(name) or []
        if any(v == 0 and (i >= len(was) or was[i] != 0) for i, v in enumerate(mine)):
            out.append(f"{name} {mine} (0 where it was {was})")
    extra_groups = sorted(set(now.get("groups") or []) - set(entry.get("groups") or []))
    if extra_groups:
        out.append(f"groups {extra_groups}")
    if entry.get("no_new_privs") and not now.get("no_new_privs"):
        out.append("no_new_privs cleared")
    if (entry.get("seccomp") or 0) > (now.get("seccomp") or 0):
        out.append(f"seccomp {entry.get('seccomp')} -> {now.get('seccomp')}")
    return out


def check_only_the_container_reaped(verify: Verifier, run: Run) -> None:
    """The kit gives the master a sentinel child older than the container; a monitor that
    reaps any child takes it, and the master records a ``foreign_reap`` event, as does the
    supervisor that watches it from outside (engine code in the master could stop the
    master's). A monitor that returns without reaping the container leaves it to the
    master, which records its ``process_exit`` after monitor_container returned."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    reaped = events_of(run, "foreign_reap", role="supervisor") or events_of(
        run, "foreign_reap", role="master"
    )
    verify.check(
        requirement,
        not reaped,
        expected="only the container's pid reaped by the engine",
        observed=lambda: reaped[0].get("detail", ""),
        run=run,
        event=reaped[0] if reaped else None,
        role="master",
    )
    returned = hook_events(run, "master", "monitor_container", ("hook_return",))
    if not returned:
        return
    left = [
        e
        for e in events_of(run, "process_exit", role="master", child_role="container")
        if e["seq"] > returned[0]["seq"]
    ]
    verify.check(
        requirement,
        not left,
        expected="monitor_container reaps the container before it returns its status",
        observed=lambda: (
            f"the container (pid {left[0].get('child_pid')}) was left unreaped: "
            "the kit reaped it after monitor_container returned"
        ),
        run=run,
        event=left[0] if left else None,
        role="master",
        hook="monitor_container",
    )


def check_signals_recorded(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    sent = run.notes.get("sent") or []
    if not sent:
        verify.fail(
            requirement,
            expected=f"the suite sends {', '.join(X.FORWARDED_SIGNALS)} "
            "to the master once the payload runs",
            observed=f"nothing was sent: {run.notes.get('error', 'unknown reason')}",
            run=run,
            role="master",
        )
        return
    recorded = [e for e in events_of(run, "signal", role="master")]
    taken = taken_off_the_master(run)
    for name in sent:
        found = [e for e in recorded if e.get("name") == name]
        if not found and name in taken:
            # The container got it, so the master did receive it: engine code took it before
            # the kit could read it (SIG-002 fails the engine for it), not the kit's loss.
            verify.vacuous(requirement, f"{name} was taken off the master by engine code")
            continue
        verify.check(
            requirement,
            bool(found),
            expected=f"{name} recorded by the master",
            observed=f"signals recorded: {sorted({e.get('name') for e in recorded}, key=str)}",
            run=run,
            role="master",
        )


def taken_off_the_master(run: Run) -> set[str]:
    """Forwarded signals the signals payload received although the master recorded none of
    that kind: the kit records each signal as it puts it on the channel, so one that reached
    the container without a record was taken off the master by engine code (sigwait,
    sigtimedwait, a signalfd or an unblocked mask of its own), not read from the channel."""
    missing = decode_signal_exit(run.result.exit_code)
    if missing is None or not run.notes.get("sent"):
        return set()
    recorded = {e.get("name") for e in events_of(run, "signal", role="master")}
    received = [n for n in X.FORWARDED_SIGNALS if n not in missing]
    return {n for n in received if n not in recorded}


def check_signals_forwarded(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    sent = run.notes.get("sent") or []
    rounds = len(sent) // len(X.FORWARDED_SIGNALS)
    # A first round sent whole is enough to judge: the second is sent only once the payload
    # marked the first received, so without it the payload's exit code says what it lacked.
    if rounds < 1 or (rounds < SIGNAL_ROUNDS and decode_signal_exit(run.result.exit_code) == []):
        verify.fail(
            requirement,
            expected=f"{', '.join(X.FORWARDED_SIGNALS)} sent to the master {SIGNAL_ROUNDS} "
            "times while the payload runs",
            observed=f"sent {sent}: {run.notes.get('error', '')}",
            run=run,
            role="master",
            hook="monitor_container",
        )
        return
    code = run.result.exit_code
    missing = decode_signal_exit(code)
    # The first round arrived whole (only "again" is missing) and the suite could not send
    # the second: judged on the first.
    if (
        rounds < SIGNAL_ROUNDS
        and run.notes.get("second_round")
        and missing
        and all(name.endswith(AGAIN) for name in missing)
    ):
        missing = []
    returns = hook_events(run, "master", "monitor_container", ("hook_return",))
    if missing is None:
        observed = (
            f"exit code {code}, which the payload never exits with (it exits "
            f"{ALL_SIGNALS_ARRIVED}, or {SIGNAL_MASK_BASE} or {SECOND_ROUND_MASK_BASE} + the "
            "mask of the signals it received once or twice): the exit code does not come "
            "from the payload"
        )
    else:
        observed = f"exit code {code}: the payload did not receive {', '.join(missing)}"
    verify.check(
        requirement,
        missing == [],
        expected="the payload received "
        f"{', '.join(X.FORWARDED_SIGNALS)}, each {SIGNAL_ROUNDS} times (it then exits "
        f"{ALL_SIGNALS_ARRIVED})",
        observed=observed,
        run=run,
        role="master",
        hook="monitor_container",
        event=returns[0] if returns else exit_event(run),
    )
    # SPEC §7: the master turns every signal into an entry on the channel, and the monitor
    # forwards from there; one taken off the master around the kit never reaches the
    # channel (nor the ledger), whoever then forwards it.
    taken = sorted(taken_off_the_master(run), key=X.FORWARDED_SIGNALS.index)
    verify.check(
        requirement,
        not taken,
        expected="every forwarded signal taken from the signals channel, where the master "
        "puts (and records) every signal it receives",
        observed=f"{', '.join(taken)} reached the container, but the master never recorded "
        "it: engine code took it off the master (sigwait, sigtimedwait, a signalfd or an "
        "unblocked signal mask of its own) instead of reading the channel",
        run=run,
        role="master",
        hook="monitor_container",
        event=returns[0] if returns else exit_event(run),
    )


# --- error paths (SPEC §2 error table) ------------------------------------------------------


def raised_in(run: Run, role: str, hook: str) -> bool:
    return bool(hook_events(run, role, hook, ("hook_raise",)))


def check_error_path(verify: Verifier, run: Run, path: X.ErrorPath | None = None) -> None:
    req = verify.requirement
    run = verify.used(run.usable())
    path = path or X.ERROR_PATHS[req]
    res = run.result
    want_exit = run.scenario.expected_exit if path.exit_code is None else path.exit_code
    verify.check(
        req,
        res.exit_code == want_exit,
        expected=f"exit code {want_exit}",
        observed=f"exit code {res.exit_code} ({res.reason})",
        run=run,
        event=exit_event(run),
        role="master",
    )
    if path.raised:
        role, hook = path.raised
        verify.check(
            req,
            raised_in(run, role, hook),
            expected=f"{hook} raised in the {role}",
            observed="no hook_raise of it was recorded",
            run=run,
            role=role,
            hook=hook,
        )
    for role in path.absent_roles:
        found = hook_events(run, role, kinds=("hook_enter",))
        verify.check(
            req,
            not found,
            expected=f"no hook of the {role} runs",
            observed=lambda: f"{found[0]['hook']} ran",
            run=run,
            event=found[0] if found else None,
            role=role,
        )
    for role, hook in path.absent_hooks:
        # The kit's calls: one the engine makes itself is ORDER-009's or ORDER-010's.
        found = kit_calls(hook_events(run, role, hook, ("hook_enter",)))
        verify.check(
            req,
            not found,
            expected=f"{hook} does not run",
            observed=f"{hook} ran",
            run=run,
            event=found[0] if found else None,
            role=role,
            hook=hook,
        )
    if path.cleanup is not None:
        # The kit's call: one the engine makes itself (caller "engine") is ORDER-011's.
        found = kit_calls(hook_events(run, "master", "cleanup_container", ("hook_enter",)))
        want = 1 if path.cleanup else 0
        verify.check(
            req,
            len(found) == want,
            expected=f"cleanup_container runs {want} time(s)",
            observed=f"it ran {len(found)} time(s)",
            run=run,
            event=found[0] if found else None,
            role="master",
            hook="cleanup_container",
        )
    fatals = events_of(run, "fatal", role="master")
    if path.fatal is not None:
        match = [e for e in fatals if path.fatal in str(e.get("message"))]
        verify.check(
            req,
            bool(match),
            expected="the master's fatal error" + (f" \"{path.fatal}: …\"" if path.fatal else ""),
            observed=", ".join(repr(e.get("message")) for e in fatals) or "no fatal error recorded",
            run=run,
            role="master",
        )
    if path.no_fatal:
        verify.check(
            req,
            not fatals,
            expected="no fatal error (cleanup_container gets None)",
            observed=lambda: f"fatal {fatals[0].get('message')!r}",
            run=run,
            event=fatals[0] if fatals else None,
        )
    if path.stage2_failed is not None:
        failed = events_of(run, "stage2_failed")
        match = [e for e in failed if path.stage2_failed in str(e.get("message"))]
        verify.check(
            req,
            bool(match),
            expected="stage 2 reports its failure"
            + (f" (\"{path.stage2_failed}\")" if path.stage2_failed else ""),
            observed=", ".join(repr(e.get("message")) for e in failed)
            or "no stage-2 failure recorded",
            run=run,
            role="stage2",
        )
        execs = events_of(run, "stage2_exec")
        verify.check(
            req,
            not execs,
            expected="no exec of the payload",
            observed="stage2_exec recorded",
            run=run,
            event=execs[0] if execs else None,
        )
    if path.container_exit is not None:
        returns = hook_events(run, "master", "monitor_container", ("hook_return",))
        if returns and isinstance(returns[0].get("result"), int):
            status = returns[0]["result"]
            code = os.waitstatus_to_exitcode(status)
            verify.check(
                req,
                code == path.container_exit,
                expected=f"the container exited {path.container_exit}",
                observed=f"wait status {status:#x} (exit code {code})",
                run=run,
                event=returns[0],
            )
    if path.timeout is not None:
        role, hook = path.timeout
        timed = res.timed_out or {}
        verify.check(
            req,
            timed.get("hook") == hook and timed.get("hook_role") == role,
            expected=f"a hook timeout naming {hook} in the {role}",
            observed=f"timed_out {res.timed_out!r}",
            run=run,
            role=role,
            hook=hook,
        )
        left = [leak for leak in res.leaks if leak.get("what") == "process"]
        verify.check(
            req,
            not left,
            expected="the run's whole process tree killed",
            observed=lambda: f"left behind: {left}",
            run=run,
        )
    if path.starter_error is not None:
        stage, text = path.starter_error
        errors = events_of(run, "starter_error")
        match = [e for e in errors if e.get("stage") == stage and text in str(e.get("message"))]
        verify.check(
            req,
            bool(match),
            expected=f"rejected by the starter ({stage}) with a message naming {text}",
            observed=", ".join(f"{e.get('stage')}: {e.get('message')!r}" for e in errors)
            or "no starter error recorded",
            run=run,
            role="starter",
        )
    if (
        path.cleanup_fatal is not None
        or path.cleanup_gets_no_fatal
        or path.cleanup_exit is not None
    ):
        _check_cleanup_arguments(verify, run, path)
    if path.no_namespaces:
        created = events_of(run, "namespaces") + events_of(run, "process_start", role="container")
        verify.check(
            req,
            not created,
            expected="no container namespace created",
            observed=lambda: f"{describe_event(created[0])}",
            run=run,
            event=created[0] if created else None,
        )


def check_no_post_start_after_stage2_failure(verify: Verifier, run: Run) -> None:
    """ORDER-010: a run whose stage 2 failed records the failure and no post_start_process."""
    requirement = verify.requirement
    ran = hook_events(run, "master", "post_start_process", ("hook_enter",))
    failed = events_of(run, "stage2_failed")
    verify.check(
        requirement,
        bool(failed),
        expected="stage 2 reported a failure",
        observed="no stage-2 failure recorded",
        run=run,
        role="stage2",
    )
    verify.check(
        requirement,
        not ran,
        expected="no post_start_process after the stage-2 failure",
        observed="post_start_process ran",
        run=run,
        event=ran[0] if ran else None,
    )


def check_no_cleanup_after_stage1_failure(verify: Verifier, run: Run) -> None:
    """ORDER-012: no cleanup_container in a run whose stage 1 failed."""
    ran = hook_events(run, "master", "cleanup_container", ("hook_enter",))
    verify.check(
        verify.requirement,
        not ran,
        expected="no cleanup_container after stage 1 failed",
        observed="cleanup_container ran",
        run=run,
        event=ran[0] if ran else None,
    )


def check_fatal_exit(verify: Verifier, run: Run) -> None:
    """EXIT-003: a run with a fatal error records it and exits 255."""
    requirement = verify.requirement
    fatal = events_of(run, "fatal")
    verify.check(
        requirement,
        bool(fatal),
        expected="a fatal error recorded",
        observed="none",
        run=run,
        role="master",
    )
    verify.check(
        requirement,
        run.result.exit_code == 255,
        expected="exit code 255",
        observed=f"exit code {run.result.exit_code} ({run.result.reason})",
        run=run,
        event=fatal[0] if fatal else None,
    )


def hook_args(event: dict[str, Any]) -> dict[str, Any] | None:
    """The arguments a hook was called with, as the ledger records them (None: not recorded
    by this kit)."""
    args = event.get("args")
    return args if isinstance(args, dict) else None


def _check_cleanup_arguments(verify: Verifier, run: Run, path: X.ErrorPath) -> None:
    req = verify.requirement
    entered = kit_calls(hook_events(run, "master", "cleanup_container", ("hook_enter",)))
    if not entered:
        return  # reported by the cleanup count
    event = entered[0]
    args = hook_args(event)
    if args is None:
        verify.unsupported(req, "the kit's ledger does not record hook arguments")
        return
    fatal, status = args.get("fatal"), args.get("status")
    if path.cleanup_fatal is not None:
        message = (fatal or {}).get("message", "") if isinstance(fatal, dict) else str(fatal)
        verify.check(
            req,
            fatal is not None and path.cleanup_fatal in message,
            expected="cleanup_container gets the fatal error"
            + (f" \"{path.cleanup_fatal}: …\"" if path.cleanup_fatal else ""),
            observed=f"fatal={fatal!r}",
            run=run,
            event=event,
        )
    if path.cleanup_gets_no_fatal:
        verify.check(
            req,
            fatal is None,
            expected="cleanup_container gets no fatal error",
            observed=f"fatal={fatal!r}",
            run=run,
            event=event,
        )
    if path.cleanup_exit is not None:
        code = os.waitstatus_to_exitcode(status) if isinstance(status, int) else None
        verify.check(
            req,
            code == path.cleanup_exit,
            expected=f"cleanup_container gets the container's status (exited {path.cleanup_exit})",
            observed=f"status={status!r}" + (f" (exit code {code})" if code is not None else ""),
            run=run,
            event=event,
        )


def check_init_flag(verify: Verifier, run: Run) -> None:
    """ORDER-002: init_config's privileged_stage1 is true only in stage 1 of suid/hybrid."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    # The kit's calls: an engine that calls init_config itself chose its own flag.
    events = kit_calls(hook_events(run, hook="init_config", kinds=("hook_enter",)))
    if events and all(hook_args(e) is None for e in events):
        verify.unsupported(requirement, "the kit's ledger does not record hook arguments")
        return
    if not events:
        verify.fail(requirement, expected="init_config calls", observed="none recorded", run=run)
    for event in events:
        want = event["role"] == "stage1" and run.flow in ("suid", "hybrid")
        got = (hook_args(event) or {}).get("privileged_stage1")
        verify.check(
            requirement,
            got is want,
            expected=f"privileged_stage1={want}",
            observed=f"privileged_stage1={got!r}",
            run=run,
            event=event,
        )


def check_master_pids(verify: Verifier, run: Run) -> None:
    """PID-001: the pid given to the master's hooks is the container's (as the master sees
    it: the pid the starter recorded when it started the container)."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    started = events_of(run, "container_start")
    events = [
        e
        for e in kit_calls(hook_events(run, "master", kinds=("hook_enter",)))
        if e["hook"] in ("create_container", "post_start_process", "monitor_container")
    ]  # the kit's calls: the pid an engine passes to a hook it calls itself is its own
    if not started or (events and all(hook_args(e) is None for e in events)):
        verify.unsupported(
            requirement,
            "the kit's ledger does not record the container's pid or the hook arguments",
        )
        return
    container_pid = started[0].get("container_pid")
    if not events:
        verify.fail(
            requirement, expected="master hooks", observed="none recorded", run=run, role="master"
        )
    for event in events:
        got = (hook_args(event) or {}).get("pid")
        verify.check(
            requirement,
            got == container_pid,
            expected=f"pid {container_pid}, the "
            f"container as the master sees it (#{started[0]['seq']})",
            observed=f"pid {got!r}",
            run=run,
            event=event,
        )


# --- cleanup, join-only, ledger ------------------------------------------------------------


def check_no_leaks(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    leaks = run.result.leaks
    verify.check(
        requirement,
        not leaks,
        expected="nothing left behind",
        observed=lambda: "; ".join(f"{leak.get('what')}: {leak.get('detail')}" for leak in leaks),
        run=run,
        event=next((e for e in run.events if e.get("kind") == "leak"), None),
    )


#: Requirement → the kinds of host objects (kit.run.hostdiff.KINDS) it covers.
HOST_KINDS = {
    "HOST-001": ("file",),
    "HOST-002": ("mount",),
    "HOST-003": ("hostname", "domainname"),
    "HOST-004": ("sysctl",),
    "HOST-005": ("link", "address", "route"),
    "HOST-006": ("netns",),
    "HOST-007": ("ipc", "mqueue"),
    "HOST-008": ("process",),
    "HOST-009": ("hostname", "domainname", "mount"),
}


def _host_change_text(change: dict[str, Any]) -> str:
    kind, name = change.get("kind"), change.get("name")
    before, after = change.get("before"), change.get("after")
    if change.get("signal"):
        text = (
            f"{kind} {name} ({before}), a process the run did not start, was sent "
            f"{change.get('signal')} ({change.get('syscall')})"
        )
    elif change.get("transient"):
        back = "gone" if before is None else f"back to {before!r}"
        text = f"{kind} {name} was {after!r} for a while ({back} by the end)"
    elif before is None:
        text = f"{kind} {name} created: {after}"
    elif after is None:
        text = f"{kind} {name} removed (was {before})"
    else:
        text = f"{kind} {name} changed: {before} -> {after}"
    text += machine_note(change)
    hooks = change.get("hooks")
    if hooks:
        text += "; appeared while open: " + ", ".join(
            f"{h.get('hook')} ({h.get('role')} pid {h.get('pid')})" for h in hooks
        )
    elif hooks is not None:
        text += "; appeared while no hook was open"
    return text


def _seen_in_sandbox(run: Run, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """Changes of ``kinds`` that the supervisor saw in the run's host sandbox while the run
    went on (none without a sandbox); a mount that appeared or changed counts (NS-011)."""
    event = next((e for e in run.events if e.get("kind") == "host_changes"), None)
    return [
        c
        for c in (event or {}).get("changes") or []
        if c.get("kind") in kinds and (c.get("transient") or c.get("hooks") is not None)
    ]


#: What the kernel keeps per network or ipc namespace: in the fake backend the container
#: has none of its own (the model's only), so such a change the container made lands in
#: the sandbox's, where in the kernel it would have stayed in the container's.
_PER_CONTAINER_NAMESPACE = ("link", "address", "route", "ipc", "mqueue")
#: Processes outside the container: what they change is the host's in either backend.
_OUTSIDE_THE_CONTAINER = ("starter", "stage1", "master")


def _container_may_own(change: dict[str, Any], container_ns: set[str]) -> bool:
    """Whether, in a fake run, ``change`` may be one the container made in a namespace the
    kernel would have given it (a net.* sysctl, a link, an IPC object…), not the host's:
    the container got such a namespace (``container_ns``: the kinds it created or joined),
    and no hook of a process outside the container was the only kind open."""
    kind, name = change.get("kind"), str(change.get("name"))
    if kind in ("ipc", "mqueue"):
        ns = "ipc"
    elif kind in ("link", "address", "route") or (kind == "sysctl" and name.startswith("net.")):
        ns = "net"
    elif kind == "sysctl" and is_ipc_sysctl(name):
        ns = "ipc"
    else:
        return False
    roles = {h.get("role") for h in change.get("hooks") or []}
    return ns in container_ns and not (roles and roles <= set(_OUTSIDE_THE_CONTAINER))


def _container_namespaces(run: Run) -> set[str]:
    """The namespace kinds the run's container created or joined (its ``namespaces``)."""
    event = next((e for e in run.events if e.get("kind") == "namespaces"), None) or {}
    return {str(k) for k in event.get("created") or []} | set(event.get("joined") or {})


def check_host(verify: Verifier, run: Run) -> None:
    """HOST-*: the run's host diff (the supervisor's ``host_changes`` event, kit.run.hostdiff)
    names no object of the requirement's kinds; HOST-009 every watched change seen while the
    run went on, even one undone by its end. In both backends: the fake model changes
    nothing of the kernel's, so what the diff of a fake run shows, engine code did directly;
    but a change of what the kernel keeps per network or ipc namespace, not made by a
    process outside the container, is not decided there (SPEC §9: the container has no such
    namespace of the kernel's in the fake backend; the real backend decides it)."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    event = next((e for e in run.events if e.get("kind") == "host_changes"), None)
    if event is None:
        pytest.skip(
            f"{NOT_CONFIGURED_PREFIX}run {run.id} had no host sandbox to diff (a run "
            "launched as root runs in one)"
        )
    kinds = HOST_KINDS[requirement]
    errors = event.get("errors") or {}
    for kind in kinds:
        if kind in errors:
            raise HarnessError(f"run {run.id}: the host diff could not read {kind}: {errors[kind]}")
    during = requirement == "HOST-009"
    found = [
        c
        for c in event.get("changes") or []
        if c.get("kind") in kinds
        and (c.get("transient") or c.get("hooks") is not None if during else not c.get("transient"))
    ]
    omitted = {k: n for k, n in (event.get("omitted") or {}).items() if k in kinds}
    undecided: list[dict[str, Any]] = []
    if run.backend == "fake":
        container_ns = _container_namespaces(run)
        undecided = [c for c in found if _container_may_own(c, container_ns)]
        found = [c for c in found if not _container_may_own(c, container_ns)]
        for kind in set(omitted) & {*_PER_CONTAINER_NAMESPACE, "sysctl"}:
            if ("ipc" if kind in ("ipc", "mqueue") else "net") in container_ns:
                undecided.append({"kind": kind, "name": f"{omitted.pop(kind)} more, not listed"})
    if omitted and not during:
        verify.fail(
            requirement,
            expected="the host as before the run",
            observed=", ".join(
                f"{n} more change(s) of {k} not listed" for k, n in sorted(omitted.items())
            ),
            run=run,
            event=event,
            role="unknown",
        )
    for change in found:
        hooks = change.get("hooks") or []
        one = (
            hooks[0]
            if len(hooks) == 1
            else {
                # several hooks open at once, or none known: not the supervisor that recorded it
                "role": "/".join(sorted({str(h.get("role")) for h in hooks})) or "unknown"
            }
        )
        verify.fail(
            requirement,
            expected=f"{change.get('kind')} {change.get('name')} "
            f"{'unchanged while the run lasts' if during else 'as before the run'}: "
            f"{change.get('before') if change.get('before') is not None else 'absent'}",
            observed=_host_change_text(change),
            run=run,
            event=event,
            role=one.get("role"),
            hook=one.get("hook"),
        )
    if not found and not omitted:
        if undecided:
            shown = ", ".join(f"{c.get('kind')} {c.get('name')}" for c in undecided[:3])
            pytest.skip(
                f"{NOT_CONFIGURED_PREFIX}fake backend: {len(undecided)} change(s) of what the "
                f"kernel keeps per network or ipc namespace ({shown}) made while no hook of "
                "the processes outside the container was the only one open: the container "
                "has no such namespace of the kernel's here, so they may be its own (the "
                "real backend decides)"
            )
        verify.check(requirement, True, expected="", observed="", run=run)


def check_refused_calls(verify: Verifier, run: Run, category: str) -> None:
    """HOST-050 (``category="system-interface"``, fake backend), HOST-051 (``"host-global"``):
    every call the run's seccomp filter refused (``syscall_refused``) is a violation that
    names the call, the hook and the process role."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    refused = [
        e
        for e in run.events
        if e.get("kind") == "syscall_refused" and e.get("category") == category
    ]
    what = (
        "engine bypassed the system interface"
        if category == SYSTEM_INTERFACE
        else "engine made a host-global system call"
    )
    for event in refused:
        verify.fail(
            requirement,
            expected=f"no {category} system call (refused with EPERM)",
            observed=f"{what}: {describe_refusal(event)}",
            run=run,
            event=event,
            role=event.get("process_role"),
            hook=event.get("hook"),
        )
    if refused:
        return
    installed = next((e for e in run.events if e.get("kind") == "seccomp_filter"), None)
    if category == SYSTEM_INTERFACE and run.backend != "fake":
        verify.vacuous(
            requirement,
            "a rule of the fake backend: in the real backend the "
            "kernel itself answers an engine's privileged calls",
        )
    elif installed is not None and installed.get("filter") is None and installed.get("reason"):
        verify.vacuous(requirement, f"no filter by design: {installed['reason']}")
    elif installed is None or not installed.get("filter") or installed.get("error"):
        why = (installed or {}).get("error") or "the run has no seccomp filter"
        not_configured(f"no system call was watched: {why}")
    else:
        verify.check(requirement, True, expected="", observed="", run=run)


def not_configured(why: str) -> NoReturn:
    """Report the test not-configured: what it checks cannot be decided in this run."""
    pytest.skip(f"{NOT_CONFIGURED_PREFIX}{why}")


def check_cleanup_returned(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    raised = hook_events(run, "master", "cleanup_container", ("hook_raise",))
    returned = hook_events(run, "master", "cleanup_container", ("hook_return",))
    verify.check(
        requirement,
        bool(returned) and not raised,
        expected="cleanup_container returns without raising after the failure",
        observed=lambda: (
            f"it raised {raised[0]['error'].get('type')}: {raised[0]['error'].get('message')}"
            if raised
            else "it did not run"
        ),
        run=run,
        event=raised[0] if raised else None,
        role="master",
        hook="cleanup_container",
    )


JOIN_HOOKS = {
    "stage1": {"config", "init_config", "prepare_config"},
    "stage2": {"config", "init_config", "start_process"},
}


def check_join_only_hooks(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    for event in hook_events(run, kinds=("hook_enter",)):
        allowed = JOIN_HOOKS.get(event["role"], set())
        verify.check(
            requirement,
            event["hook"] in allowed,
            expected="only config, init_config, prepare_config and start_process",
            observed=f"{event['hook']} ran in the {event['role']}",
            run=run,
            event=event,
        )
    started = hook_events(run, "stage2", "start_process", ("hook_enter",))
    verify.check(
        requirement,
        bool(started),
        expected="start_process runs",
        observed="it did not run",
        run=run,
        role="stage2",
        hook="start_process",
    )
    verify.check(
        requirement,
        run.result.exit_code == run.scenario.expected_exit,
        expected=f"exit code {run.scenario.expected_exit}",
        observed=f"exit code {run.result.exit_code} ({run.result.reason})",
        run=run,
    )


def check_ledger_schema(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    problems = validate(run.result.ledger.document)
    # A datagram the supervisor refused for its schema never reached the document: it is a
    # schema violation all the same (its sender is LEDGER-003's business).
    problems += [
        f"a datagram refused by the supervisor: {e.get('detail')}"
        for e in events_of(run, "engine_fault", fault="malformed")
    ]
    verify.check(
        requirement,
        not problems,
        expected="a ledger valid against its schema",
        observed=lambda: "; ".join(problems[:5]),
        run=run,
    )


def check_no_engine_fault(verify: Verifier, run: Run) -> None:
    """LEDGER-003: no datagram the supervisor rejected as malformed or forged."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    for event in events_of(run, "engine_fault"):
        role = event.get("sender_role")
        sender = f"pid {event.get('sender_pid')}" + (
            f" (the {role} process)" if role else " (no process of the kit)"
        )
        if event.get("sender_pid") is None:
            sender = "the run's processes"
        hooks = ", ".join(event.get("open_hooks") or []) or "no hook open"
        verify.check(
            requirement,
            False,
            expected="only the kit's own events on the ledger",
            observed=f"a {event.get('fault')} datagram from {sender}, in {hooks}: "
            f"{event.get('detail')}; it read {event.get('excerpt')!r}",
            run=run,
            event=event,
            role=role,
        )
    verify.check(requirement, True, expected="", observed="", run=run)


#: Roles that the master kills with the container after a fatal error (SPEC §2).
_CONTAINER_SIDE = ("rpc", "stage2")


def unfinished_hooks(run: Run) -> list[dict[str, Any]]:
    """Hook entries (start_process aside: it execs) without their return or raise, except
    those still running when a hook timeout killed the run, and those of the container side
    in a run where the master killed the container after a fatal error."""
    events = run.events
    timeouts = [e["seq"] for e in events if e.get("kind") == "hook_timeout"]
    fatals = [e["seq"] for e in events if e.get("kind") == "fatal" and e.get("role") == "master"]
    out = []
    for i, event in enumerate(events):
        if event.get("kind") != "hook_enter" or event["hook"] == "start_process":
            continue
        done = [
            e
            for e in events[i + 1 :]
            if e.get("kind") in ("hook_return", "hook_raise")
            and e.get("role") == event["role"]
            and e.get("pid") == event["pid"]
            and e.get("tid") == event["tid"]
            and e.get("hook") == event["hook"]
        ]
        if done or any(seq > event["seq"] for seq in timeouts):
            continue
        if event["role"] in _CONTAINER_SIDE and fatals:
            continue  # killed with the container after the master's fatal error (the entry
            # may come after the fatal event: the processes run concurrently)
        out.append(event)
    return out


def check_hook_pairs(verify: Verifier, run: Run) -> None:
    requirement = verify.requirement
    run = verify.used(run.usable())
    for event in run.events:
        if event.get("kind") == "hook_enter":
            verify.check(
                requirement,
                bool(event.get("snapshot")),
                expected="a privilege snapshot at hook entry",
                observed="none",
                run=run,
                event=event,
            )
    for event in unfinished_hooks(run):
        verify.check(
            requirement,
            False,
            expected="a hook_return or hook_raise for this entry",
            observed="none recorded",
            run=run,
            event=event,
        )


# --- runs that nothing asks to fail (ERR-009..011) ------------------------------------------


def check_no_hang(verify: Verifier, run: Run) -> None:
    """ERR-009: no hook of the run ran into the hook timeout."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    timed = run.result.timed_out
    event = next((e for e in run.events if e.get("kind") == "hook_timeout"), None)
    verify.check(
        requirement,
        timed is None,
        expected="every hook returns within the hook timeout",
        observed=lambda: (
            f"the run did not end within {timed.get('seconds')} s with no hook open (stuck "
            "between hooks)"
            if not timed.get("hook")
            else f"{timed.get('hook')} in the {timed.get('hook_role')}"
            f" did not return within {timed.get('seconds')} s (still open: "
            f"{', '.join(h['role'] + ' ' + h['hook'] for h in timed.get('open_hooks', []))})"
        ),
        run=run,
        event=event,
    )


#: Prefix of the supervisor's reason when the master died without finishing the run.
_MASTER_CRASHED = "master crashed"
_STAGE2_DIED = "died before exec"


def check_no_crash(verify: Verifier, run: Run) -> None:
    """ERR-010: every hook returned or raised (start_process: exec'd or reported), and the
    master finished the run."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    res = run.result
    verify.check(
        requirement,
        not res.reason.startswith(_MASTER_CRASHED),
        expected="the master finishes the run",
        observed=res.reason,
        run=run,
        event=exit_event(run),
        role="master",
    )
    for event in unfinished_hooks(run):
        verify.check(
            requirement,
            False,
            expected=f"{event['hook']} returns or raises",
            observed=f"its process ended inside it ({describe_run(run)})",
            run=run,
            event=event,
        )
    died = [e for e in events_of(run, "stage2_failed") if _STAGE2_DIED in str(e.get("message"))]
    verify.check(
        requirement,
        not died,
        expected="stage 2 execs the payload or reports why not",
        observed="stage 2 died before the exec",
        run=run,
        event=died[0] if died else None,
        role="stage2",
        hook="start_process",
    )


def check_no_failure(verify: Verifier, run: Run) -> None:
    """ERR-011: no hook raised, start_process did not return, the payload was exec'd (a hang
    or a crash is ERR-009's or ERR-010's)."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    for event in hook_events(run, kinds=("hook_raise",)):
        err = event.get("error") or {}
        verify.check(
            requirement,
            False,
            expected="no hook raises",
            observed=f"{event['hook']} raised {err.get('type')}: {str(err.get('message'))[:300]}",
            run=run,
            event=event,
        )
    failed = [
        e for e in events_of(run, "stage2_failed") if _STAGE2_DIED not in str(e.get("message"))
    ]
    for event in failed:
        verify.check(
            requirement,
            False,
            expected="start_process execs the payload",
            observed=f"stage 2: {event.get('message')}",
            run=run,
            event=event,
        )
    hung_or_crashed = (
        run.result.timed_out is not None
        or bool(unfinished_hooks(run))
        or run.result.reason.startswith(_MASTER_CRASHED)
    )
    if not hung_or_crashed and not failed:
        execs = events_of(run, "stage2_exec")
        verify.check(
            requirement,
            bool(execs),
            expected="the payload is exec'd",
            observed=lambda: f"no exec was recorded ({describe_run(run)})",
            run=run,
            role="stage2",
            hook="start_process",
        )


def check_start_process_never_returns(verify: Verifier, run: Run) -> None:
    """ERR-012: in a run whose payload cannot be exec'd, start_process raised or exited (or
    exec'd something after all); it did not return, nor hang (SPEC §1: "it must exec or
    exit, never return")."""
    requirement = verify.requirement
    run = verify.used(run.usable())
    if not kit_calls(hook_events(run, "stage2", "start_process", ("hook_enter",))):
        verify.vacuous(requirement, f"start_process did not run in this run ({describe_run(run)})")
        return
    returned = kit_calls(hook_events(run, "stage2", "start_process", ("hook_return",)))
    raised = kit_calls(hook_events(run, "stage2", "start_process", ("hook_raise",)))
    failures = [str(e.get("message")) for e in events_of(run, "stage2_failed")]
    ended = [m for m in failures if "exited with code" in m or _STAGE2_DIED in m]
    # Engine code closed the ledger socket (before an exec, say): stage 2 told the master
    # the hook event it could not record.
    lost = {
        m.split(LOST_EVENT, 1)[1].split(" (", 1)[0].strip() for m in failures if LOST_EVENT in m
    }
    did_return = bool(returned) or "hook_return of start_process" in lost
    did_raise = bool(raised) or "hook_raise of start_process" in lost
    ok = not did_return and (did_raise or bool(ended or events_of(run, "stage2_exec")))
    verify.check(
        requirement,
        ok,
        expected="start_process raises or exits when it cannot exec the payload",
        observed=lambda: (
            f"start_process {'returned' if did_return else 'neither raised nor exited'} "
            f"({describe_run(run)})"
        ),
        run=run,
        event=returned[0] if returned else None,
        role="stage2",
        hook="start_process",
    )


# --- which runs show an error path ---------------------------------------------------------------

#: Error paths that the ``exec-failure`` scenario (a payload that does not exist) may take
#: without any cooperation of the engine: path requirement -> "did this run take it?".
NATURAL_TRIGGERS: dict[str, Callable[[Run], bool]] = {
    "ERR-001": lambda run: raised_in(run, "stage1", "prepare_config"),
    "ERR-003": lambda run: raised_in(run, "stage2", "start_process"),
}


def error_runs(
    verify: Verifier, lifecycle: Any, paths: Iterable[str]
) -> list[tuple[Run, X.ErrorPath]]:
    """The runs in which one of the error ``paths`` happened: the fault-injection runs the
    engine supports, and the ``exec-failure`` run when it took one of these paths. When there
    is none, every requirement of the test is reported not-supported."""
    paths = list(paths)
    found: list[tuple[Run, X.ErrorPath]] = []
    for path in paths:
        run = lifecycle.optional(fault_scenario(path))
        if run is not None:
            found.append((run.usable(), X.ERROR_PATHS[path]))
    natural = [p for p in paths if p in NATURAL_TRIGGERS]
    why = "the engine does not declare capability fault_injection"
    if natural:
        run = lifecycle.optional("exec-failure")
        if run is not None:
            run.usable()
            taken = [p for p in natural if NATURAL_TRIGGERS[p](run)]
            found += [(run, X.ERROR_PATHS[p]) for p in taken]
            if not taken:
                why += f", and the exec-failure run did not take this path ({describe_run(run)})"
    if not found:
        for req in verify.declared:
            verify.unsupported(req, why)
    return found
