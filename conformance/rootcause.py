"""Root cause of a run that failed early: the first thing that went wrong, and what to change."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from conformance.outcomes import NOT_DECIDED

#: Ledger events that mean something went wrong in the run.
BAD_KINDS = ("hook_raise", "hook_timeout", "starter_error", "fatal", "stage2_failed")
HOOKS = (
    "config",
    "init_config",
    "prepare_config",
    "create_container",
    "start_process",
    "post_start_process",
    "monitor_container",
    "cleanup_container",
)

#: Starter stages whose error is the engine's StarterConfig or engine config.
_STAGE_ADVICE = {
    "starter_config": "fix the StarterConfig that prepare_config fills (stage 1): the starter "
    "rejected it",
    "engine_config": "fix config()/the engine config: the starter could not decode it "
    "(config() must return an EngineConfig dataclass of JSON-visible fields)",
    "stage1": "fix stage 1 (config, init_config, prepare_config): it failed",
    "user_namespace": "check the user namespace the StarterConfig asks for: the starter could "
    "not set it up",
    "namespaces": "check the namespaces the StarterConfig asks to create or join: the starter "
    "could not set them up",
    "rpc_server": "fix the engine's RPC methods: the RPC server failed",
}


@dataclass(frozen=True)
class RootCause:
    """Where a run failed first, as the ledger recorded it."""

    hook: str  # the hook, or the starter stage when no hook was running
    role: str
    error: str  # ``TYPE: MESSAGE`` (one line)
    advice: str  # what to change, first
    traceback: str  # the full traceback when the ledger has one, else ""
    run: str = ""  # the run's id

    @property
    def headline(self) -> str:
        if not self.hook:
            return f"the run failed between hooks: {self.error}"
        return f"the run failed at {self.hook} ({self.role}): {self.error}"

    @property
    def message(self) -> str:
        """The message of every result this root cause leaves undecided."""
        return f"not decided: {self.headline}"

    def to_json(self) -> dict[str, Any]:
        return {
            "headline": self.headline,
            "hook": self.hook,
            "role": self.role,
            "error": self.error,
            "advice": self.advice,
            "traceback": self.traceback,
        }


def expected_hook(scenario: str) -> str | None:
    """The hook a scenario asks to fail (None: the scenario asks for no failure)."""
    if scenario == "exec-failure":
        return "start_process"  # the payload path does not exist: stage 2 must fail
    # fault: the engine fails on request; inject: the kit makes the hook fail (kit.starter.inject)
    for prefix in ("fault:", "inject:"):
        if scenario.startswith(prefix):
            fault = scenario[len(prefix) :]
            return None if fault == "create_container:rpc-probe" else fault.split(":")[0]
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _from_event(event: dict[str, Any]) -> RootCause:
    kind = event.get("kind")
    role = str(event.get("role"))
    raw = event.get("error")
    error = raw if isinstance(raw, dict) else {}
    trace = str(error.get("traceback") or "")
    if kind == "hook_raise":
        hook = str(event.get("hook"))
        text = f"{error.get('type')}: {error.get('message')}"
        return RootCause(
            hook,
            role,
            text,
            f"make {hook} ({role}) not raise in a run that asks for no failure: it raised {text}",
            trace,
        )
    if kind == "hook_timeout" and not event.get("hook"):
        text = f"run timeout: no hook was open when the run's {event.get('seconds')} s were up"
        return RootCause(
            "",
            role,
            text,
            "find what kept the run from going on between two hooks: a hook's thread or "
            "child still running, an RPC server that does not exit (SPEC §2 rule 5)",
            "",
        )
    if kind == "hook_timeout":
        hook, role = str(event.get("hook")), str(event.get("hook_role") or role)
        text = f"hook timeout: no return within {event.get('seconds')} s"
        hint = (
            " (SPEC §2 rule 5: create_container must not wait for the container)"
            if hook == "create_container"
            else ""
        )
        return RootCause(hook, role, text, f"make {hook} ({role}) return in time{hint}", "")
    message = str(event.get("message") or "")
    if kind == "starter_error":
        stage = str(event.get("stage"))
        text = _last_line(message) if "Traceback" in message else message
        advice = _STAGE_ADVICE.get(stage, f"the starter failed at {stage}")
        return RootCause(
            stage,
            "starter",
            f"starter error: {text}",
            f"{advice}: {text}",
            message if "Traceback" in message else "",
        )
    hook = message.split(" ", 1)[0]
    if kind == "stage2_failed":
        return RootCause(
            "start_process",
            "stage2",
            f"stage 2 failed: {message}",
            f"make start_process (stage2) exec the payload: {message}",
            "",
        )
    # fatal: the master's first fatal error (a wrong return value has no hook_raise)
    text = f"{error.get('type') or 'fatal'}: {message}"
    if hook in HOOKS:
        what = (
            f"make {hook} ({role}) return what SPEC §1 asks of it"
            if " returned " in message
            else f"fix {hook} ({role})"
        )
        return RootCause(hook, role, text, f"{what}: {message}", trace)
    return RootCause("master", role, text, f"fix the master's hooks: {message}", trace)


#: Hooks whose failure the master turns into a fatal error (SPEC §2's error table).
_FATAL_AFTER = ("create_container", "post_start_process", "monitor_container")
_MASTER_HOOKS = (*_FATAL_AFTER, "cleanup_container")


def _expected(event: dict[str, Any], target: str) -> bool:
    """Whether a bad event, after the targeted hook began, is the requested failure or one
    of its consequences."""
    kind = event.get("kind")
    if kind in ("hook_raise", "hook_timeout"):
        return event.get("hook") == target
    if kind == "stage2_failed":
        return target == "start_process"
    if kind == "starter_error":
        return target == "prepare_config"
    return kind == "fatal" and target in _FATAL_AFTER


def find(scenario: str, events: Iterable[Any]) -> RootCause | None:
    """The root cause of a run of ``scenario`` with these ledger events, or None when the run
    went as the scenario asks (successfully, or failing where its fault targets).

    A run of a scenario that asks for no failure (or, for a fault scenario, a failure before the
    hook the fault targets) is *failed early* when its ledger records a hook that raised or hung, a
    starter error, a fatal error of the master or a stage-2 failure. Every result read from such a
    run is then not decided by it: the plugin reports them as ``not-decided`` under the run's
    headline instead of as dozens of failures with one cause.
    """
    target = expected_hook(scenario)
    # The kit's injection starts at its kit_injected record: an engine's hook that failed on
    # its own before the kit could inject anything is the engine's root cause.
    by_kit = scenario.startswith("inject:")
    started = False
    for event in events:
        if not isinstance(event, dict):
            continue
        kind = event.get("kind")
        if (
            target is not None
            and event.get("hook") == target
            and kind == ("kit_injected" if by_kit else "hook_enter")
        ):
            started = True
        if kind not in BAD_KINDS:
            continue
        if started and _expected(event, str(target)):
            if kind in ("hook_raise", "hook_timeout") and target in _MASTER_HOOKS:
                # the requested failure happened in the master: whatever follows, its hooks
                # running concurrently included, is its consequence
                return None
            continue
        return _from_event(event)
    return None


def early(events: Iterable[dict[str, Any]]) -> bool:
    """True when the run never reached the payload (no exec of stage 2 was recorded)."""
    return not any(isinstance(e, dict) and e.get("kind") == "stage2_exec" for e in events)


def of_run_doc(run: dict[str, Any]) -> RootCause | None:
    """The root cause of a run as the JSON report stores it (``runs[i]``)."""
    raw_ledger = run.get("ledger")
    ledger = raw_ledger if isinstance(raw_ledger, dict) else {}
    raw_events = ledger.get("events")
    events = raw_events if isinstance(raw_events, list) else []
    cause = find(str(run.get("scenario", "")), events)
    if cause is None:
        return None
    return RootCause(
        cause.hook, cause.role, cause.error, cause.advice, cause.traceback, str(run.get("id", ""))
    )


@dataclass
class Group:
    """The results one root cause left undecided, with the cause (None when no run of the
    report has it, e.g. a report without ledgers)."""

    message: str
    cause: dict[str, Any] | None
    results: list[dict[str, Any]]

    @property
    def flows(self) -> list[str]:
        return sorted({str(e.get("flow")) for e in self.results})

    @property
    def runs(self) -> list[str]:
        return sorted({str(r) for e in self.results for r in (e.get("runs") or [])})


def groups(results: Iterable[dict[str, Any]], runs: Iterable[dict[str, Any]]) -> list[Group]:
    """The not-decided results grouped by their root cause, largest group first."""
    by_message: dict[str, Group] = {}
    for entry in results:
        if entry.get("outcome") == NOT_DECIDED:
            message = str(entry.get("message") or "")
            by_message.setdefault(message, Group(message, None, [])).results.append(entry)
    if by_message:
        for run in runs:
            cause = of_run_doc(run) if isinstance(run, dict) else None
            if cause is not None and cause.message in by_message:
                group = by_message[cause.message]
                if group.cause is None or (not group.cause["traceback"] and cause.traceback):
                    group.cause = {**cause.to_json(), "run": cause.run}
    return sorted(by_message.values(), key=lambda g: -len(g.results))
