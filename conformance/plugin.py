"""The pytest plugin (entry point ``pytest11: conformance``): ``pytest --engine=NAME``."""

from __future__ import annotations

import gc
import json
import os
import re
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conformance import SUITE_VERSION, outcomes, requirements, rootcause
from conformance.capabilities import Capabilities
from conformance.expectations import FLOWS
from conformance.markers import MARKERS, declared

if TYPE_CHECKING:
    from kit.preflight import Inspecting, StarterConfigCheck

# The function-level imports below are deliberate: pytest loads this plugin (entry point
# pytest11) in every session where the kit is installed, with or without --engine, and
# importing the suite's modules up front costs about 130 ms (300 ms without bytecode caches).

ENV_ENGINE = "CONFORMANCE_ENGINE"
BACKENDS = ("real", "fake", "auto")
#: --kit-self-check (conformance.runs.SELF_CHECK_MODES, repeated: that module is imported late).
SELF_CHECK_MODES = ("one", "all", "off")
SUITE_DIR = Path(__file__).resolve().parent / "suite"

STATE = pytest.StashKey["ConformanceState"]()
ITEM = pytest.StashKey["ItemInfo"]()
VERIFIER = pytest.StashKey[Any]()
OUTCOMES = pytest.StashKey[dict]()


class ConformanceFailure(AssertionError):
    """One or more requirements failed; the message renders every violation."""


# --- options and configuration -----------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "engine conformance suite (SPEC.md)")
    group.addoption(
        "--engine",
        metavar="NAME",
        help="run the conformance suite against this engine: a registered name, "
        "a kit.engines entry point or module:attribute (also: ini option "
        f"'engine', env {ENV_ENGINE})",
    )
    group.addoption(
        "--flow",
        action="append",
        default=[],
        metavar="FLOW[,FLOW…]",
        help=f"flows to check (repeatable or comma-separated; default all: "
        f"{', '.join(FLOWS)}; those this machine cannot run are reported "
        "not-configured)",
    )
    group.addoption(
        "--backend",
        metavar="NAME",
        default=None,
        help="backend of the runs: real (the kernel), fake (a model: no root or "
        "namespaces needed) or auto (default: real for each flow this machine can "
        "run, fake for the others)",
    )
    group.addoption(
        "--conformance-report", metavar="PATH", help="write the JSON conformance report to PATH"
    )
    group.addoption(
        "--conformance-strict",
        action="store_true",
        default=False,
        help="a flow or scenario this machine cannot run is a failure (also "
        "enabled by pytest's --strict)",
    )
    group.addoption(
        "--known-failures",
        metavar="FILE",
        help="the engine's known failures: 'REQUIREMENT[flow,…]: reason' per line",
    )
    group.addoption(
        "--hook-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds a hook may take before the run is killed (kit default when omitted)",
    )
    group.addoption(
        "--kit-self-check",
        choices=SELF_CHECK_MODES,
        default="one",
        help="where the kit checks its own requirements with the faults it injects into its "
        "own processes and that no engine check reads: in one flow of the session (default: "
        "the first selected one this machine can run, in the order root, suid, userns, "
        "fakeroot, hybrid, a real-backend flow first), in all of them, or off",
    )
    parser.addini("engine", "conformance: the engine to check (like --engine)", default="")


def _engine_setting(config: pytest.Config) -> tuple[str, str] | None:
    """(engine, where it came from): command line, then ini option, then environment; None
    when no engine is named."""
    value = config.getoption("engine")
    if value is not None and not value.strip():
        raise pytest.UsageError(
            "conformance: --engine is empty: name the engine to check, e.g. "
            "--engine=reference, --engine=my_package:MyEngine or a kit.engines entry point "
            "(python -m kit engines lists them)"
        )
    if value:
        return value, "the command line (--engine)"
    value = config.getini("engine")
    if value:
        where = config.inipath.name if config.inipath else "the ini file"
        return value, f"the ini option 'engine' ({where})"
    value = os.environ.get(ENV_ENGINE)
    if value:
        return value, f"the environment variable {ENV_ENGINE}"
    return None


@dataclass
class ItemInfo:
    requirements: list[str]
    flow: str
    scenarios: list[str]
    requires: list[str]
    test: str
    known: dict[str, outcomes.KnownFailure]


@dataclass
class ConformanceState:
    engine: str
    engine_source: str
    engine_name: str
    origin: str
    capabilities: dict[str, bool]
    capabilities_source: str
    backend: str  # as asked: real, fake or auto
    backends: dict[str, str]  # flow -> the backend its runs use (real or fake)
    flows: tuple[str, ...]
    flows_source: str
    environment: dict[str, tuple[bool, str]]
    invoker: dict[str, Any] | None
    strict: bool
    strict_source: str
    hook_timeout: float | None
    known: list[outcomes.KnownFailure]
    known_source: str | None
    report_path: str | None
    worker: str | None
    xdist_workers: int
    notes: list[str] = field(default_factory=list)
    group_by_flow: bool = False
    results: outcomes.Results = field(default_factory=outcomes.Results)
    worker_runs: list[dict[str, Any]] = field(default_factory=list)
    all_runs: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _cache: Any = None
    _prefetched: set[str] = field(default_factory=set)
    _causes: dict[str, tuple[Any, bool]] = field(default_factory=dict)
    verdict: Any = None  # conformance.render.Verdict, at the end of the session
    own_tests: list[str] | None = None  # the project's own test paths run beside the suite
    kit_self_check: str = "one"  # --kit-self-check
    #: the kit-only scenarios (conformance.runs.one_flow_scenarios), from the suite's marks
    one_flow: frozenset[str] = frozenset()
    #: conformance.runs.SelfCheckPlan, once collection chose the flow (or a worker said)
    self_check_plan: Any = None

    def flow_runnable(self, name: str) -> tuple[bool, str]:
        """(whether this machine can run flow ``name``, why not)."""
        ok, why = self.environment.get(name, (False, "unknown flow"))
        if self.backends.get(name) == "fake":
            ok = True  # the model needs neither root nor namespaces
        if self.invoker is None and name != "root":
            ok, why = False, "no unprivileged invoking user U (set KIT_TEST_USER or create one)"
        return ok, why

    def plan(self) -> Any:
        """The session's :class:`conformance.runs.SelfCheckPlan` (before collection chose
        a flow: the first selected flow this machine can run)."""
        if self.self_check_plan is None:
            self.choose_self_check_flow([(f, [SELF_CHECK_ANY]) for f in self.flows])
        return self.self_check_plan

    def choose_self_check_flow(self, items: list[tuple[str, list[str]]]) -> None:
        """Choose the flow of ``--kit-self-check=one`` from the (flow, scenarios) of the
        tests that will run: the first flow that has a test reading a kit-only run and that
        this machine can run, one with the real backend before any with the fake one."""
        from conformance.runs import self_check_flow  # noqa: PLC0415 (lazy, see the top)

        def reads_one(names: list[str]) -> bool:
            return any(n == SELF_CHECK_ANY or n in self.one_flow for n in names)

        candidates = [
            flow
            for flow, names in items
            if flow in self.flows and reads_one(names) and self.flow_runnable(flow)[0]
        ]
        self.set_plan(self.kit_self_check, self_check_flow(candidates, self.backends))

    def set_plan(self, mode: str, flow: str | None) -> None:
        from conformance.runs import SelfCheckPlan  # noqa: PLC0415 (lazy, see the top)

        self.self_check_plan = SelfCheckPlan(mode, flow, self.one_flow)

    def supports(self, capabilities: list[str] | tuple[str, ...]) -> list[str]:
        """The capabilities among ``capabilities`` the engine does not declare."""
        return [c for c in capabilities if not self.capabilities.get(c)]

    def cache(self) -> Any:
        if self._cache is None:
            from conformance.runs import RunCache  # noqa: PLC0415 (lazy, see the top)

            parallel = max(1, (os.cpu_count() or 2) // max(1, self.xdist_workers))
            self._cache = RunCache(
                self.engine,
                dict(self.backends),
                self.hook_timeout,
                parallel=min(parallel, 3),
                worker=self.worker or "main",
                plan=self.plan(),
            )
        return self._cache

    def root_cause(self, run_id: str) -> tuple[Any, bool]:
        """(root cause or None, whether the run failed before the payload) of a finished
        run of this process."""
        if run_id not in self._causes:
            flow, _, name = run_id.partition("/")
            run = self.cache().get(flow, name)
            events = run.events if run.result is not None else []
            self._causes[run_id] = (rootcause.find(name, events), rootcause.early(events))
        return self._causes[run_id]

    def prefetch(self, flow: str, session: pytest.Session) -> None:
        """Start every run the remaining tests of ``flow`` read (once per flow)."""
        if flow in self._prefetched:
            return
        self._prefetched.add(flow)
        from conformance.scenario import SCENARIOS  # noqa: PLC0415 (lazy, see the top)

        wanted: list[str] = []
        for item in session.items:
            info = item.stash.get(ITEM, None)
            if info is None or info.flow != flow or self.supports(info.requires):
                continue
            for name in info.scenarios:
                scenario = SCENARIOS.get(name)
                if (
                    scenario is not None
                    and name not in wanted
                    and not self.supports(scenario.requires)
                    and (scenario.flows is None or flow in scenario.flows)
                    and not self.plan().excludes(flow, scenario)
                ):
                    wanted.append(name)
        for name in wanted:
            self.cache().submit(flow, name)


#: A stand-in scenario name: "some test of this flow reads a kit-only run".
SELF_CHECK_ANY = "*kit-self-check*"


def _parse_flows(values: list[str]) -> tuple[str, ...]:
    asked = [f.strip() for value in values for f in value.split(",") if f.strip()]
    unknown = [f for f in asked if f not in FLOWS]
    if unknown:
        raise pytest.UsageError(
            f"--flow: unknown flow(s) {', '.join(unknown)} (known: {', '.join(FLOWS)})"
        )
    return tuple(f for f in FLOWS if f in asked) if asked else FLOWS


def _flow_backend(asked: str, flow: str, env: dict[str, tuple[bool, str]]) -> str:
    """The backend a flow's runs use: ``auto`` is real where this machine can run the flow
    for real, else fake (SPEC §9)."""
    if asked != "auto":
        return asked
    return "real" if env.get(flow, (False, ""))[0] else "fake"


def _make_state(config: pytest.Config, engine: str, source: str) -> ConformanceState:
    from kit import preflight  # noqa: PLC0415 (lazy, see the top)

    backend = config.getoption("backend") or "auto"
    if backend not in BACKENDS:
        raise pytest.UsageError(
            f"--backend {backend}: unknown backend (known: {', '.join(BACKENDS)})"
        )
    flows = _parse_flows(config.getoption("flow"))
    try:
        from kit.run.request import Invoker  # noqa: PLC0415 (lazy, see the top)

        invoker: dict[str, Any] | None = dict(vars(Invoker.resolve()))
    except ValueError:
        invoker = None
    from conformance import capabilities as caps_module  # noqa: PLC0415 (lazy, see the top)

    workerinput = getattr(config, "workerinput", None)
    check = None
    if workerinput is None and invoker is not None:  # once per session, on the controller
        # Started first: its child runs while the inspection's does (SPEC §11: engine code
        # runs in neither this process nor as root).
        check = preflight.StarterConfigCheck(
            engine, flows, invoker["uid"], invoker["gid"], list(invoker.get("groups") or [])
        )
    inspecting = None
    try:
        # In a child, as U: the engine is never imported here (SPEC §11), where verdicts
        # are made. It runs while this process reads the suite's declarations.
        inspecting = preflight.Inspecting(
            engine, collect={"capabilities": (caps_module.collect, caps_module.COLLECTED)}
        )
        return _state_after_preflight(
            config, engine, source, backend, flows, invoker, check, inspecting
        )
    finally:
        # After a usage error that came first, their answers are not wanted.
        if inspecting is not None:
            inspecting.cancel()
        if check is not None:
            check.cancel()


def _state_after_preflight(
    config: pytest.Config,
    engine: str,
    source: str,
    backend: str,
    flows: tuple[str, ...],
    invoker: dict[str, Any] | None,
    check: StarterConfigCheck | None,
    inspecting: Inspecting,
) -> ConformanceState:
    from conformance.catalogue import (  # noqa: PLC0415 (lazy, see the top)
        SuiteDeclarationError,
        suite_tests,
        tests_by_requirement,
    )
    from conformance.runs import one_flow_scenarios  # noqa: PLC0415 (lazy, see the top)
    from kit.run import environment  # noqa: PLC0415 (lazy, see the top)

    try:
        tests = suite_tests()
        index = tests_by_requirement(tests)
    except SuiteDeclarationError as exc:
        raise pytest.UsageError(f"conformance suite: {exc}") from None
    env = dict(environment.flows())
    found = inspecting.result()
    where = f"\n{found.failure_traceback}" if found.failure_traceback else ""
    if found.failure == "registry":
        raise pytest.UsageError(
            f"conformance: engine from {source}: {found.failure_message}{where}"
        )
    if found.failure == "import":
        raise pytest.UsageError(
            f"conformance: cannot load engine {engine!r} (from {source}): "
            + found.failure_message.removeprefix("loading it raised ")
            + where
        )
    _preflight(engine, source, found.problems)
    declared = found.collected["capabilities"]
    if "error" in declared:
        raise pytest.UsageError(f"conformance: engine {engine!r}: {declared['error']}")
    declared_caps, cap_source = declared["capabilities"], declared["source"]
    flows_source = "--flow" if config.getoption("flow") else "default: every flow"
    known: list[outcomes.KnownFailure] = []
    known_path = config.getoption("known_failures")
    if known_path:
        try:
            text = Path(known_path).read_text()
        except OSError as exc:
            raise pytest.UsageError(f"--known-failures: {exc}") from None
        try:
            known = outcomes.parse_known_failures(text, known_path, index)
        except outcomes.KnownFailuresError as exc:
            raise pytest.UsageError(str(exc)) from None
    strict_option = bool(config.getoption("conformance_strict"))
    strict_ini = bool(config.getini("strict"))
    strict_source = (
        "--conformance-strict"
        if strict_option
        else "pytest's strict option"
        if strict_ini
        else "off"
    )
    hook_timeout = config.getoption("hook_timeout")
    if hook_timeout is not None and hook_timeout <= 0:
        raise pytest.UsageError(f"--hook-timeout: must be positive, got {hook_timeout}")
    workerinput = getattr(config, "workerinput", None)
    numprocesses = getattr(config.option, "numprocesses", None) or 0
    backends = {flow: _flow_backend(backend, flow, env) for flow in FLOWS}
    if check is not None:
        _preflight(engine, source, check.problems())
    return ConformanceState(
        engine=engine,
        engine_source=source,
        engine_name=str(found.name),
        origin=found.origin,
        capabilities=declared_caps,
        capabilities_source=cap_source,
        backend=backend,
        backends=backends,
        flows=flows,
        flows_source=flows_source,
        environment=env,
        invoker=invoker,
        strict=strict_option or strict_ini,
        strict_source=strict_source,
        hook_timeout=hook_timeout,
        kit_self_check=config.getoption("kit_self_check") or "one",
        one_flow=one_flow_scenarios(tests),
        known=known,
        known_source=known_path,
        report_path=config.getoption("conformance_report"),
        worker=workerinput["workerid"] if workerinput else None,
        xdist_workers=int(workerinput.get("workercount", 1))
        if workerinput
        else int(numprocesses)
        if isinstance(numprocesses, int)
        else 1,
    )


def _preflight(engine: str, source: str, problems: list[Any]) -> None:
    """Stop the session before any lifecycle: one message naming the engine, the hook and
    what to change for each problem (kit.preflight)."""
    if problems:
        raise pytest.UsageError(
            f"conformance: preflight of engine {engine!r} (from {source}) "
            f"{outcomes.PREFLIGHT_REFUSED}:\n  " + "\n  ".join(str(p) for p in problems)
        )


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers; with an engine, set the session up.

    Without an engine (no ``--engine``, no ini option ``engine``, no ``CONFORMANCE_ENGINE``) the
    plugin only registers its options and markers: any other test run is unaffected. With an engine
    it

    - collects the installed suite (``conformance/suite``) unless paths were given;
    - parametrizes each conformance test with the flows it applies to, deselects the flows not asked
      for (``--flow``) and reports those this machine cannot run as not-configured (failures with
      ``--strict``);
    - runs each (flow, scenario) lifecycle once per process, ahead of the tests that read it;
    - turns every test into one outcome per requirement (see :mod:`conformance.outcomes`), with
      known failures (``--known-failures FILE``) as xfail;
    - writes the JSON report (``--conformance-report PATH``) on the controller, merging the results
      and ledgers of pytest-xdist workers.
    """
    for text in MARKERS.values():
        config.addinivalue_line("markers", text)
    # Set on every item; known to pytest even when pytest-xdist is not loaded (-p no:xdist).
    config.addinivalue_line("markers", "xdist_group(name): pytest-xdist scheduling group")
    setting = _engine_setting(config)
    if setting is None:
        return
    engine, source = setting
    # An earlier session of this process (pytester's in-process runs) froze its objects at
    # the end of its collection (SessionPlugin.pytest_collection_finish): they may be
    # garbage now.
    gc.unfreeze()
    state = _make_state(config, engine, source)
    config.stash[STATE] = state
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        if source.startswith("the command line"):
            config.args = [str(SUITE_DIR)]
            state.notes.append(f"collecting the installed suite {SUITE_DIR}")
            _drop_unused_plugins(config, state)
        else:
            # An engine named by the ini file or the environment adds the suite: a plain
            # ``pytest`` in the engine's repository still runs the repository's own tests.
            own = [a for a in config.args if Path(a).resolve() != SUITE_DIR]
            config.args = [*own, str(SUITE_DIR)]
            state.own_tests = own
            state.notes.append(
                f"collecting your tests ({', '.join(own)}) and the installed "
                f"suite {SUITE_DIR} (engine from {source})"
            )
    if (
        getattr(config, "workerinput", None) is None
        and getattr(config.option, "dist", "no") == "load"
    ):
        # The tests of one flow go to one worker, so every lifecycle runs once per session
        # (see SessionPlugin.pytest_xdist_make_scheduler).
        state.group_by_flow = True
        state.notes.append("pytest-xdist: tests scheduled in groups, one group per flow")
    config.pluginmanager.register(SessionPlugin(state), "conformance-session")


#: Plugins that pytest loads by entry point and that a session of the installed suite alone
#: never uses: hypothesis' imports all of hypothesis at the end of every session (~0.45 s on
#: 2 cores), used or not. Kept when the user passes one of its options or names it with -p.
UNUSED_PLUGINS = {"hypothesispytest": "--hypothesis-"}


def _drop_unused_plugins(config: pytest.Config, state: ConformanceState) -> None:
    for name, option_prefix in UNUSED_PLUGINS.items():
        plugin = config.pluginmanager.get_plugin(name)
        if plugin is None or any(
            str(arg).startswith(option_prefix) or str(arg).endswith(name)
            for arg in config.invocation_params.args
        ):  # asked for
            continue
        config.pluginmanager.unregister(plugin)
        state.notes.append(f"plugin {name} not loaded: the suite does not use it")


# --- parametrization and fixtures (always present; inert without an engine) ---------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "flow" not in metafunc.fixturenames:
        return
    if not declared(metafunc.definition, "requirement"):
        return
    flows = declared(metafunc.definition, "flows") or list(FLOWS)
    metafunc.parametrize("flow", flows, ids=flows, indirect=True)


@pytest.fixture
def flow(request: pytest.FixtureRequest) -> str:
    """The flow of this test (parametrized); skips when this machine cannot run it."""
    state = request.config.stash.get(STATE, None)
    if state is None:
        pytest.skip("conformance suite: no engine selected (use --engine NAME)")
    name = getattr(request, "param", None)
    if name is None:
        raise pytest.UsageError(
            f"{request.node.nodeid}: a conformance test needs "
            "@requirement(...) to be parametrized with flows"
        )
    ok, why = state.flow_runnable(name)
    if not ok:
        if state.strict:
            pytest.fail(
                f"{outcomes.STRICT_PREFIX}flow {name} cannot run here: {why}", pytrace=False
            )
        pytest.skip(f"{outcomes.NOT_CONFIGURED_PREFIX}flow {name} cannot run here: {why}")
    return name


class Lifecycle:
    """``lifecycle("default")``: the cached run of a scenario in the test's flow."""

    def __init__(
        self,
        state: ConformanceState,
        flow: str,
        session: pytest.Session,
        declared_scenarios: list[str],
    ) -> None:
        self.state = state
        self.flow = flow
        self.session = session
        self.declared = declared_scenarios

    def unavailable(self, name: str) -> str | None:
        from conformance.scenario import SCENARIOS  # noqa: PLC0415 (lazy, see the top)

        scenario = SCENARIOS[name]
        missing = self.state.supports(scenario.requires)
        if missing:
            return "; ".join(
                f"the engine does not declare capability {c} ({Capabilities.describe(c)})"
                for c in missing
            )
        if scenario.flows is not None and self.flow not in scenario.flows:
            return f"scenario {name} does not apply to flow {self.flow}"
        return self.not_run(name)

    def not_run(self, name: str) -> str | None:
        """Why the kit-only scenario ``name`` is not run in this flow (--kit-self-check),
        or None."""
        from conformance.scenario import SCENARIOS  # noqa: PLC0415 (lazy, see the top)

        plan = self.state.plan()
        return plan.reason() if plan.excludes(self.flow, SCENARIOS[name]) else None

    def optional(self, name: str) -> Any:
        """The run, or None when the engine lacks a capability the scenario needs."""
        from conformance.checks import SuiteError  # noqa: PLC0415 (lazy, see the top)

        if name not in self.declared:
            raise SuiteError(f"scenario {name!r} is read but not declared with @scenarios")
        if self.unavailable(name):
            return None
        self.state.prefetch(self.flow, self.session)
        run = self.state.cache().get(self.flow, name)
        if run.not_configured is not None:
            why = f"scenario {name} cannot be prepared here: {run.not_configured}"
            if self.state.strict:
                pytest.fail(outcomes.STRICT_PREFIX + why, pytrace=False)
            pytest.skip(outcomes.NOT_CONFIGURED_PREFIX + why)
        return run

    def __call__(self, name: str) -> Any:
        run = self.optional(name)
        if run is None:
            not_run = self.not_run(name)
            if not_run is not None:  # not the engine's doing: nothing was decided here
                pytest.skip(outcomes.NOT_CONFIGURED_PREFIX + not_run)
            pytest.skip(outcomes.NOT_SUPPORTED_PREFIX + str(self.unavailable(name)))
        return run


@pytest.fixture
def lifecycle(request: pytest.FixtureRequest, flow: str) -> Lifecycle:
    """Access to the lifecycle runs of this flow: ``lifecycle("default")``."""
    state = request.config.stash[STATE]
    return Lifecycle(state, flow, request.session, declared(request.node, "scenarios"))


@pytest.fixture
def verify(request: pytest.FixtureRequest, flow: str) -> Any:
    """The test's :class:`conformance.checks.Verifier`, carrying the IDs of its
    ``@requirement`` marker: the checks attribute their verdicts to them."""
    from conformance.checks import Verifier  # noqa: PLC0415 (lazy, see the top)

    info = request.node.stash.get(ITEM, None)
    verifier = Verifier(
        flow, declared(request.node, "requirement"), info.test if info else request.node.nodeid
    )
    request.node.stash[VERIFIER] = verifier
    return verifier


@pytest.fixture
def engine_name(request: pytest.FixtureRequest) -> str:
    """The registered name of the engine under test (prefix of its RPC methods)."""
    return request.config.stash[STATE].engine_name


@pytest.fixture
def engine_spec(request: pytest.FixtureRequest) -> str:
    """The engine under test as it was named (``--engine``): what a run or an inspection
    (kit.preflight.inspect) finds it by."""
    return request.config.stash[STATE].engine


# --- the session (only with an engine) -----------------------------------------------------------

_FLOW_PARAM = re.compile(r"\[(" + "|".join(FLOWS) + r")\]$")


def _test_id(item: pytest.Item) -> str:
    return f"{item.path.name}::{item.name}"


class SessionPlugin:
    def __init__(self, state: ConformanceState) -> None:
        self.state = state

    # -- header ------------------------------------------------------------------------------
    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        s = self.state
        cannot = [
            f"{f} ({why})" for f, (ok, why) in s.environment.items() if not ok and f in s.flows
        ]
        caps = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in s.capabilities.items())
        lines = [
            f"conformance: engine {s.engine!r} from {s.engine_source} -> {s.engine_name} "
            f"({s.origin}); suite {SUITE_VERSION}",
            f"conformance: backend {s.backend} ("
            f"{', '.join(f'{f}={s.backends[f]}' for f in s.flows)}); "
            f"flows {', '.join(s.flows)} ({s.flows_source})"
            + (f"; not configured here: {'; '.join(cannot)}" if cannot else "")
            + (
                f"; invoking user U = {s.invoker['name']} ({s.invoker['uid']})" if s.invoker else ""
            ),
            f"conformance: capabilities from {s.capabilities_source}: {caps}",
            (
                f"conformance: strict on (from {s.strict_source}): an environment skip is a failure"
                if s.strict
                else "conformance: strict off"
            )
            + f"; known "
            f"failures: {len(s.known)}"
            + (f" from {s.known_source}" if s.known_source else "")
            + (f"; report: {s.report_path}" if s.report_path else ""),
            f"conformance: kit self-check (the kit-only runs: {', '.join(sorted(s.one_flow))})"
            + {
                "one": " in one flow (the first selected of root, suid, userns, fakeroot, "
                "hybrid with the real backend, else with the fake one)",
                "all": " in every flow",
                "off": ": not made (the kit requirements that read only them are not checked)",
            }[s.kit_self_check],
        ]
        lines += [f"conformance: {note}" for note in s.notes]
        return lines

    # -- collection ------------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        keep, drop = [], []
        for item in items:
            reqs = declared(item, "requirement")
            callspec = getattr(item, "callspec", None)
            flow = callspec.params.get("flow") if callspec else None
            if not reqs or flow is None:
                keep.append(item)
                continue
            if flow not in self.state.flows:
                drop.append(item)
                continue
            known = {}
            for req in reqs:
                entry = outcomes.known_failure(self.state.known, req, flow)
                if entry is not None:
                    known[req] = entry
            item.stash[ITEM] = ItemInfo(
                reqs,
                flow,
                declared(item, "scenarios"),
                declared(item, "requires"),
                _test_id(item),
                known,
            )
            for req in reqs:
                item.extra_keyword_matches.add(req)
                item.user_properties.append(("requirement", req))
            item.user_properties += [
                ("flow", flow),
                ("backend", self.state.backends.get(flow, "real")),
            ]
            item.add_marker(pytest.mark.xdist_group(flow))
            keep.append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # After every plugin's deselection (-k, --flow): the flow of --kit-self-check=one is
        # one whose tests will run. Each xdist worker collects the same items and chooses the
        # same flow.
        infos = [item.stash.get(ITEM, None) for item in session.items]
        self.state.choose_self_check_flow(
            [(info.flow, info.scenarios) for info in infos if info is not None]
        )
        # What the imports and the collection made lives until the session ends: the cyclic
        # garbage collector need not walk it again and again (pytest collects twice at its
        # end). The young generations are collected first (what collecting made and
        # dropped); garbage of the old one, if any, stays frozen until the process exits or
        # the next in-process session unfreezes it (a full collection costs ~30 ms here).
        gc.collect(1)
        gc.freeze()

    # -- running ---------------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        info = item.stash.get(ITEM, None)
        if info is None:
            return
        missing = self.state.supports(info.requires)
        if missing:
            pytest.skip(
                outcomes.NOT_SUPPORTED_PREFIX
                + "; ".join(
                    f"the engine does not declare capability {c} ({Capabilities.describe(c)})"
                    for c in missing
                )
            )
        not_run = _self_check_skip(self.state, info)
        if not_run is not None:
            pytest.skip(outcomes.NOT_CONFIGURED_PREFIX + not_run)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        info = item.stash.get(ITEM, None)
        if info is None:
            return (yield)
        try:
            result = yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            verdicts = _outcomes_after_exception(item, info, exc)
            if not isinstance(exc, pytest.skip.Exception):
                verdicts = _root_cause_first(self.state, item, verdicts)
            item.stash[OUTCOMES] = verdicts
            undecided = {m for o, m in verdicts.values() if o == outcomes.NOT_DECIDED}
            if undecided and not any(
                o in (outcomes.FAILED, outcomes.BROKEN) for o, _ in verdicts.values()
            ):
                pytest.skip("; ".join(sorted(undecided)))
            raise
        verdicts = _root_cause_first(self.state, item, _evaluate(item, info))
        verdicts = _self_check_view(self.state, info, verdicts)
        item.stash[OUTCOMES] = verdicts
        for req, (outcome, _) in verdicts.items():
            item.user_properties.append(("conformance_outcome", f"{req}: {outcome}"))
        failed = [msg for outcome, msg in verdicts.values() if outcome == outcomes.FAILED]
        if failed:
            raise ConformanceFailure("\n\n".join(failed))
        broken = [msg for outcome, msg in verdicts.values() if outcome == outcomes.BROKEN]
        if broken:
            raise HarnessFailure("\n\n".join(broken))
        xfailed = [msg for outcome, msg in verdicts.values() if outcome == outcomes.XFAIL]
        if xfailed:
            pytest.xfail("; ".join(xfailed))
        undecided = {msg for outcome, msg in verdicts.values() if outcome == outcomes.NOT_DECIDED}
        if undecided:  # the session fails at its end, under the run's one headline
            pytest.skip("; ".join(sorted(undecided)))
        if all(outcome == outcomes.NOT_SUPPORTED for outcome, _ in verdicts.values()):
            pytest.skip(
                outcomes.NOT_SUPPORTED_PREFIX + "; ".join(msg for _, msg in verdicts.values())
            )
        if all(
            outcome in (outcomes.NOT_SUPPORTED, outcomes.NOT_CONFIGURED)
            for outcome, _ in verdicts.values()
        ):
            pytest.skip(
                outcomes.NOT_CONFIGURED_PREFIX
                + "; ".join(sorted({msg for _, msg in verdicts.values()}))
            )
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        info = item.stash.get(ITEM, None)
        if info is not None:
            # An extra attribute pytest-xdist serialises with the report to the controller.
            report.conformance = _entries(  # type: ignore[attr-defined]
                item, info, call, report, self.state
            )
            if call.excinfo is not None and isinstance(
                call.excinfo.value, (ConformanceFailure, HarnessFailure)
            ):
                report.longrepr = str(call.excinfo.value)  # the violations, not our frames
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entries = getattr(report, "conformance", None)
        if entries:
            self.state.results.add(report.nodeid, report.when, entries)

    # -- xdist ---------------------------------------------------------------------------------
    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """With ``--dist load`` (the default of ``-n``), schedule whole flows: xdist's own
        ``loadgroup`` cannot be used (pytest 9.2 ignores the ``@group`` node-id suffix that
        xdist 3.8 relies on)."""
        if not self.state.group_by_flow:
            return None
        from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415 (lazy, see the top)

        class FlowScheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                match = _FLOW_PARAM.search(nodeid)
                return f"flow:{match.group(1)}" if match else nodeid

        return FlowScheduling(config, log)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", None) or {}
        self.state.worker_runs.extend(output.get("conformance_runs") or [])
        if output.get("conformance_self_check"):
            # the controller collects nothing: the workers chose the flow (all the same one)
            plan = output["conformance_self_check"]
            self.state.set_plan(plan["mode"], plan["flow"])

    # -- the end ---------------------------------------------------------------------------------
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        state = self.state
        runs = state._cache.finished() if state._cache is not None else []
        if state._cache is not None:
            state._cache.close()
        docs = [r.to_json() for r in runs]
        if state.worker is not None:
            output = session.config.workeroutput  # type: ignore[attr-defined]
            output["conformance_runs"] = docs
            output["conformance_self_check"] = state.plan().to_json()
            return
        state.all_runs = docs + state.worker_runs
        from conformance import render, report  # noqa: PLC0415 (lazy, see the top)

        doc: Any = report.build(state, state.results, state.all_runs)  # render reads untyped JSON
        state.verdict = render.verdict(doc)
        check = state.verdict.self_check
        if session.exitstatus == pytest.ExitCode.OK and (
            state.verdict.code == 1 or (check is not None and not check.ok)
        ):
            # a run failed early (its results are not decided), or --strict and a MUST
            # requirement could not be checked, or a kit requirement was excused as a known
            # failure: none shows as a failed test
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if state.report_path:
            path = Path(state.report_path)
            if path.parent and not path.parent.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        from conformance.render import wrap  # noqa: PLC0415 (lazy, see the top)
        from conformance.report import sandbox_left_out  # noqa: PLC0415

        state = self.state
        if state.worker is not None:
            return
        width = max(60, min(terminalreporter._tw.fullwidth, 120))
        # the engine's results only: the kit's are the self-check line among the reasons
        everything = state.results.merged()
        merged = [e for e in everything if e["subject"] == requirements.ENGINE]
        summary = outcomes.Results.summary(merged)
        terminalreporter.section("conformance")
        counts = ", ".join(f"{summary[o]} {o}" for o in outcomes.OUTCOMES)
        lines = wrap(
            f"engine {state.engine_name}: {summary['total']} results "
            f"(requirement x flow): {counts}",
            width,
        )
        v = state.verdict
        if not everything:
            lines += wrap(
                f"the conformance suite did not run (engine {state.engine} from "
                f"{state.engine_source}): no conformance test was selected",
                width,
            )
        elif v is not None:
            lines += wrap(f"{v.title.upper()}: " + (v.reasons[0] if v.reasons else ""), width)
            lines += [line for r in v.reasons[1:] for line in wrap(r, width, "  ")]
        for group in rootcause.groups(merged, state.all_runs):
            lines += _root_cause_lines(group, width)
        for entry in merged:
            if entry["outcome"] in (outcomes.FAILED, outcomes.BROKEN):
                first = entry["message"].splitlines()[0] if entry["message"] else ""
                lines += wrap(
                    f"{entry['outcome'].upper()} {entry['requirement']}[{entry['flow']}] {first}",
                    width,
                    "  ",
                    " " * 6,
                )
        wall = time.monotonic() - state.started
        busy = sum(r.get("seconds") or 0 for r in state.all_runs)
        lines.append(
            f"{len(state.all_runs)} lifecycles ({busy:.1f} s of lifecycle "
            f"time) in {wall:.1f} s of wall time"
        )
        left_out = sandbox_left_out(state.all_runs)
        if left_out:
            lines += wrap(
                "host sandbox: the host's mount(s) at "
                f"{', '.join(left_out)} not reproduced (overlayfs refused them); the engine "
                "saw an empty read-only directory there",
                width,
            )
        if state.report_path:
            lines.append(f"report: {state.report_path}")
        if state.own_tests is not None and everything:
            lines += wrap(
                f"the conformance suite ran too (engine {state.engine} from "
                f"{state.engine_source}), beside your tests in "
                f"{', '.join(state.own_tests)}",
                width,
            )
        for line in lines:
            terminalreporter.line(line)


def _root_cause_lines(group: rootcause.Group, width: int) -> list[str]:
    """A root cause: what to change first, the results it left undecided, its traceback."""
    from conformance.render import wrap  # noqa: PLC0415 (lazy, see the top)

    cause = group.cause or {}
    lines = wrap(f"ROOT CAUSE: {group.message.removeprefix('not decided: ')}", width)
    if cause.get("advice"):
        lines += wrap(f"what to change: {cause['advice']}", width, "  ")
    flows = [f for f in FLOWS if f in group.flows]
    lines += wrap(
        f"{len(group.results)} result(s) not decided in {', '.join(flows)} "
        f"({len(group.runs)} runs)",
        width,
        "  ",
    )
    if "Traceback" in str(cause.get("traceback")):
        lines.append(f"  traceback (run {cause.get('run')}):")
        lines += ["    " + line for line in str(cause["traceback"]).rstrip().splitlines()]
    return lines


class HarnessFailure(Exception):
    """The harness could not decide one or more requirements (reported broken)."""


# --- outcomes -----------------------------------------------------------------------------------


def _known_message(entry: outcomes.KnownFailure) -> str:
    return f"known failure ({entry.where()}): {entry.reason}"


def _evaluate(item: pytest.Item, info: ItemInfo) -> dict[str, tuple[str, str]]:
    """Outcome and message per declared requirement, after the test body returned."""
    verifier = item.stash.get(VERIFIER, None)
    out: dict[str, tuple[str, str]] = {}
    for req in info.requirements:
        known = info.known.get(req)
        if verifier is None:
            out[req] = (outcomes.BROKEN, f"{info.test} did not use the verify fixture")
            continue
        if verifier.violations[req]:
            text = verifier.render(req)
            if known is not None:
                out[req] = (outcomes.XFAIL, f"{req}: {_known_message(known)}\n{text}")
            else:
                out[req] = (outcomes.FAILED, text)
        elif req in verifier.unsupported_reasons:
            out[req] = (outcomes.NOT_SUPPORTED, verifier.unsupported_reasons[req])
        elif verifier.checks[req] == 0:
            out[req] = (outcomes.BROKEN, f"{req}: {info.test} made no check of it")
        elif known is not None:
            out[req] = (
                outcomes.FAILED,
                f"{req}: unexpected pass: listed as a "
                f"{_known_message(known)}, but every check passed; remove the entry",
            )
        else:
            out[req] = (outcomes.PASSED, verifier.notes.get(req, ""))
    return out


def _self_check_skip(state: ConformanceState, info: ItemInfo) -> str | None:
    """Why a test of the kit's own requirements is not run in its flow (--kit-self-check, one
    rule for one and off): every run it reads is kit-only and not made in this flow. None: it
    runs (a flow this machine cannot run is the flow fixture's to report); a kit test that
    reads a run made anyway (the engine's, or one an engine test reads) costs nothing."""
    if not info.requirements or any(
        requirements.subject_of(r) != requirements.KIT for r in info.requirements
    ):
        return None
    plan = state.plan()
    if plan.runs_in(info.flow) or not state.flow_runnable(info.flow)[0]:
        return None
    if info.scenarios and len(plan.kit_only(info.scenarios)) == len(info.scenarios):
        return str(plan.reason())
    return None


def _self_check_view(
    state: ConformanceState, info: ItemInfo, verdicts: dict[str, tuple[str, str]]
) -> dict[str, tuple[str, str]]:
    """A kit requirement that its test could not decide because the kit-only runs it
    reads are not made in this flow (--kit-self-check) is not-configured, with the flow that
    checks it: the test read none of them, so nothing the engine declares is missing."""
    plan = state.plan()
    if plan.runs_in(info.flow) or not plan.kit_only(info.scenarios):
        return verdicts
    return {
        req: (outcomes.NOT_CONFIGURED, plan.reason())
        if outcome == outcomes.NOT_SUPPORTED and requirements.subject_of(req) == requirements.KIT
        else (outcome, message)
        for req, (outcome, message) in verdicts.items()
    }


def _root_cause_first(
    state: ConformanceState, item: pytest.Item, verdicts: dict[str, tuple[str, str]]
) -> dict[str, tuple[str, str]]:
    """Verdicts read from runs that failed early become not-decided under the run's root
    cause: a failure (or a missing check) whose every violation comes from such a run, and a
    pass whose every run never reached the payload."""
    verifier = item.stash.get(VERIFIER, None)
    if verifier is None or not verifier.runs:
        return verdicts
    causes = {rid: state.root_cause(rid) for rid in verifier.runs}
    out = dict(verdicts)
    for req, (outcome, _) in verdicts.items():
        if outcome == outcomes.FAILED:
            runs = [v.run.id if v.run is not None else None for v in verifier.violations[req]]
        elif outcome == outcomes.BROKEN or outcome == outcomes.PASSED:
            runs = list(verifier.runs)
        else:
            continue
        found = [causes[r] for r in runs if r in causes]
        if not runs or len(found) != len(runs) or any(c is None for c, _ in found):
            continue
        if outcome == outcomes.PASSED and not all(early for _, early in found):
            continue
        out[req] = (outcomes.NOT_DECIDED, found[0][0].message)
    return out


def _outcomes_after_exception(
    item: pytest.Item, info: ItemInfo, exc: BaseException
) -> dict[str, tuple[str, str]]:
    verifier = item.stash.get(VERIFIER, None)
    if isinstance(exc, pytest.skip.Exception):
        outcome, message = outcomes.skip_outcome(str(exc.msg))
        return {req: (outcome, message) for req in info.requirements}
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, AssertionError):
        return {req: (outcomes.FAILED, text) for req in info.requirements}
    out = {}
    for req in info.requirements:
        if verifier is not None and verifier.violations[req]:
            out[req] = (outcomes.FAILED, verifier.render(req))
        else:
            out[req] = (outcomes.BROKEN, f"{req}: harness error: {text}")
    return out


def _entries(
    item: pytest.Item,
    info: ItemInfo,
    call: pytest.CallInfo[None],
    report: pytest.TestReport,
    state: ConformanceState,
) -> list[dict[str, Any]]:
    verifier = item.stash.get(VERIFIER, None)
    runs = list(verifier.runs) if verifier is not None else []

    def entries(pairs: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
        return [
            outcomes.result(
                req,
                info.flow,
                state.backends.get(info.flow, "real"),
                outcome,
                info.test,
                message,
                runs,
                verifier.checks.get(req, 0) if verifier else 0,
            )
            for req, (outcome, message) in pairs.items()
        ]

    if call.when == "setup":
        if report.skipped:
            reason = (
                report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            )
            outcome, message = outcomes.skip_outcome(reason)
            return entries({req: (outcome, message) for req in info.requirements})
        if report.failed:
            text = call.excinfo.exconly() if call.excinfo else str(report.longrepr)
            if outcomes.STRICT_PREFIX in text:
                message = text[text.index(outcomes.STRICT_PREFIX) :]
                return entries({req: (outcomes.FAILED, message) for req in info.requirements})
            return entries(
                {req: (outcomes.BROKEN, f"setup error: {text}") for req in info.requirements}
            )
        return []
    if call.when == "call":
        verdicts = item.stash.get(OUTCOMES, None)
        if verdicts is None:
            text = call.excinfo.exconly() if call.excinfo else "no outcome"
            verdicts = {req: (outcomes.BROKEN, text) for req in info.requirements}
        return entries(verdicts)
    if report.failed:  # teardown error
        text = call.excinfo.exconly() if call.excinfo else str(report.longrepr)
        return entries(
            {req: (outcomes.BROKEN, f"teardown error: {text}") for req in info.requirements}
        )
    return []
