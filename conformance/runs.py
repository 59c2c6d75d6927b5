"""Lifecycle runs: each (flow, scenario) run once per pytest process, shared by its tests."""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conformance.expectations import FLOWS
from conformance.requirements import ENGINE, subject_of
from conformance.scenario import SCENARIOS, HelperError, Scenario

if TYPE_CHECKING:
    from conformance.catalogue import TestDeclaration

#: Hook timeout of the scenarios that hang on purpose (seconds).
SHORT_HOOK_TIMEOUT = 1.0

#: ``--kit-self-check``: the flows that run the kit-only scenarios (the kit checking its own
#: requirements): ``one`` flow of the session (the default), ``all`` of them, or none.
SELF_CHECK_MODES = ("one", "all", "off")
#: With ``one``, the first of these flows that the session selected and can run, a flow with
#: the real backend before any with the fake one. The same order as FLOWS: root first, the
#: flow that needs nothing but root.
SELF_CHECK_ORDER = FLOWS


def one_flow_scenarios(tests: Iterable[TestDeclaration] | None = None) -> frozenset[str]:
    """The kit-only scenarios: kit-injected (:attr:`Scenario.kit_self_check`) and declared
    specifically by no test of an engine requirement. ``--kit-self-check`` makes only these
    in fewer flows; ``tests``: the suite's declarations (default: the installed suite's).

    A kit-injected run that an engine test declares by name (CLEAN-002 reads the engine's
    cleanup after each injected failure, ORDER-010 the master after stage 2 returned) shows
    engine code on a path no other run takes, and that code may behave differently per flow
    (the privileges differ): it is made in every flow, whatever the mode.

    A test that declares every scenario (HOST-*, CLEAN-001, LEDGER-002/003: checks of every
    run) does not count, and loses nothing real in the flows that skip the kit-only runs: in
    them the engine's code takes no path that a run made in every flow does not take too. The
    kit raises after the engine's prepare_config returned, or makes its StarterConfig invalid
    (stage 1 fails: no other hook runs), or raises after the engine's cleanup_container
    returned: the engine ran the default run's path. The kit blocks in place of
    create_container until the hook timeout: the engine's cleanup then follows a
    create_container that set nothing up, as after inject:create_container, made in every
    flow. The RPC probe's frames are refused by the kit's RPC server before any engine
    method; the engine's hooks run as in the default run.
    """
    if tests is None:
        return _suite_one_flow_scenarios()
    injected = {name for name, s in SCENARIOS.items() if s.kit_self_check}
    engine_reads: set[str] = set()
    for decl in tests:
        if set(decl.scenarios) >= set(SCENARIOS):  # a check of every run
            continue
        if any(subject_of(r) == ENGINE for r in decl.requirements):
            engine_reads.update(decl.scenarios)
    return frozenset(injected - engine_reads)


@functools.cache
def _suite_one_flow_scenarios() -> frozenset[str]:
    from conformance.catalogue import suite_tests  # noqa: PLC0415 (imports the suite)

    return one_flow_scenarios(suite_tests())


def self_check_flow(
    candidates: Iterable[str], backends: Mapping[str, str] | None = None
) -> str | None:
    """The flow that runs the kit-only scenarios with ``--kit-self-check=one``: the first of
    ``candidates`` in :data:`SELF_CHECK_ORDER` whose backend (``backends``: flow -> real or
    fake) is real, else the first of them (None: no candidate).

    Real first: as non-root with ``--backend=auto`` root runs on the fake model, and the kit
    checked against its own model only says nothing of the kit on this kernel."""
    wanted = [f for f in SELF_CHECK_ORDER if f in set(candidates)]
    real = [f for f in wanted if (backends or {}).get(f, "real") == "real"]
    return next(iter(real or wanted), None)


@dataclass(frozen=True)
class SelfCheckPlan:
    """Which flows run the kit-only scenarios, and what the others say instead.

    The kit's own requirements do not depend on the engine, so the runs made only to check
    them (:func:`one_flow_scenarios`) are needed once per machine, not once per flow.
    """

    mode: str = "all"
    flow: str | None = None  # mode one: the flow that runs them
    #: the kit-only scenarios (:func:`one_flow_scenarios`); every other run is made in every flow
    scenarios: frozenset[str] = field(default_factory=one_flow_scenarios)

    def __post_init__(self) -> None:
        if self.mode not in SELF_CHECK_MODES:
            raise ValueError(
                f"--kit-self-check={self.mode}: unknown mode (known: {', '.join(SELF_CHECK_MODES)})"
            )

    def runs_in(self, flow: str) -> bool:
        """Whether ``flow`` runs the kit-only scenarios."""
        return self.mode == "all" or (self.mode == "one" and flow == self.flow)

    def excludes(self, flow: str, scenario: Scenario) -> bool:
        """Whether this plan leaves ``scenario`` unrun in ``flow``."""
        return scenario.name in self.scenarios and not self.runs_in(flow)

    def kit_only(self, names: Iterable[str]) -> list[str]:
        """The kit-only scenarios among ``names``."""
        return [n for n in names if n in self.scenarios]

    def reason(self) -> str:
        """What a kit requirement that a flow did not check says instead (not-configured:
        nothing was decided, neither passed nor failed)."""
        if self.mode == "off":
            return "its kit-only runs were not made (--kit-self-check=off)"
        if self.flow is None:
            return (
                "the kit's self-check ran in no flow of this session "
                "(--kit-self-check=all for every flow)"
            )
        return f"checked in flow {self.flow} (--kit-self-check=all for every flow)"

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "flow": self.flow if self.mode == "one" else None}


class HarnessError(RuntimeError):
    """The suite or the kit could not produce a run: reported as *broken*, not failed."""


@dataclass
class Run:
    """One finished lifecycle run (or the harness error that prevented it)."""

    flow: str
    scenario: Scenario
    backend: str
    result: Any = None  # kit.run.launcher.RunResult
    error: str | None = None
    not_configured: str | None = None  # this machine cannot prepare the scenario
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = "main"

    @property
    def id(self) -> str:
        return f"{self.flow}/{self.scenario.name}"

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.result.ledger.events

    def usable(self) -> Run:
        if self.error is not None:
            raise HarnessError(f"run {self.id} could not be made: {self.error}")
        return self

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id,
            "flow": self.flow,
            "scenario": self.scenario.name,
            "backend": self.backend,
            "argv": list(self.scenario.argv),
            "engine_config": self.scenario.config(),
            "worker": self.worker,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
            "error": self.error,
            "not_configured": self.not_configured,
        }
        if self.result is not None:
            doc.update(
                exit_code=self.result.exit_code,
                reason=self.result.reason,
                leaks=self.result.leaks,
                timed_out=self.result.timed_out,
                stdout=self.result.stdout[-4000:],
                stderr=self.result.stderr[-4000:],
                ledger=self.result.ledger.document,
            )
        return doc


class RunCache:
    """Runs of one engine, by (flow, scenario name), done at most once each.

    Runs are started ahead of the tests that need them, a few at a time in background threads (each
    run is a separate supervisor process, so threads here only wait), and kept with their ledger for
    the report. Under pytest-xdist every worker has its own cache; the plugin groups the tests of
    one flow on one worker so no run is done twice.
    """

    def __init__(
        self,
        engine: str,
        backends: dict[str, str] | str,
        hook_timeout: float | None,
        parallel: int = 2,
        worker: str = "main",
        plan: SelfCheckPlan | None = None,
    ) -> None:
        self.engine = engine
        # The suite asks only for the runs the plan makes; a request for another is a bug of
        # the suite, and making the run anyway would hide it (and cost a lifecycle).
        self.plan = plan or SelfCheckPlan()
        # The backend of each flow's runs (real or fake); one name for every flow is fine.
        self.backends = backends if isinstance(backends, dict) else {}
        self.default_backend = backends if isinstance(backends, str) else "real"
        self.hook_timeout = hook_timeout
        self.worker = worker
        self._lock = threading.Lock()
        self._futures: dict[tuple[str, str], concurrent.futures.Future[Run]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, parallel), thread_name_prefix="conformance-run"
        )

    def submit(self, flow: str, name: str) -> concurrent.futures.Future[Run]:
        if self.plan.excludes(flow, SCENARIOS[name]):
            raise HarnessError(f"run {flow}/{name} is not made here: {self.plan.reason()}")
        with self._lock:
            key = (flow, name)
            if key not in self._futures:
                self._futures[key] = self._pool.submit(self._execute, flow, SCENARIOS[name])
            return self._futures[key]

    def get(self, flow: str, name: str) -> Run:
        return self.submit(flow, name).result()

    def backend(self, flow: str) -> str:
        return self.backends.get(flow, self.default_backend)

    def _options(self, flow: str, scenario: Scenario) -> dict[str, Any]:
        options: dict[str, Any] = {"backend": self.backend(flow)}
        timeout = self.hook_timeout
        if scenario.short_hook_timeout:
            timeout = min(timeout or SHORT_HOOK_TIMEOUT, SHORT_HOOK_TIMEOUT)
        if timeout is not None:
            options["hook_timeout"] = timeout
        if scenario.inject is not None:
            options["inject"] = scenario.inject
        return options

    def _execute(self, flow: str, scenario: Scenario) -> Run:
        run = Run(flow, scenario, self.backend(flow), worker=self.worker)
        start = time.monotonic()
        try:
            run.result, run.notes = scenario.start(self.engine, flow, self._options(flow, scenario))
        except HelperError as exc:
            run.not_configured = str(exc)
            run.error = f"not configured: {exc}"
        except Exception as exc:  # noqa: BLE001 LaunchError, a kit bug: the run is broken
            run.error = f"{type(exc).__name__}: {exc}"
        run.seconds = time.monotonic() - start
        if run.result is not None:
            limits = run.result.ledger.select("model_limit")
            if limits:
                run.not_configured = (
                    "the fake backend's model cannot build this setup "
                    f"(SPEC §9): {limits[0].get('reason')}"
                )
        return run

    def finished(self) -> list[Run]:
        with self._lock:
            futures = list(self._futures.values())
        return [f.result() for f in futures if f.done() and not f.cancelled()]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
