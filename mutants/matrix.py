"""The kill matrix: does the suite fail every mutant of the zoo, for the right reason?

``python -m mutants --json FILE [--backend real|fake|both] [-j N] [--shard K/N]`` (from the
repository's root) runs the conformance suite once against every mutant of :mod:`mutants.zoo`
(one pytest process per mutant, ``--engine=`` the import path of its registration function,
in the flows its bug shows in, up to N at a time), and once against the reference engine and
its cooperating variant (the baselines, every flow). Every session runs the kit-injected
scenarios in each of its flows (``--kit-self-check=all``, not the suite's default of one flow),
so a starter mutant is judged in every flow it declares. Each session writes a conformance
report; for every mutant and flow the matrix compares the requirements that failed with those
the mutant declares (``killed_by``):

- **killed**: a declared requirement failed in that flow;
- **survived**: none did (the suite misses the bug, or the mutant does not do what it says);
- **broken**: none failed and one could not be decided (a harness error);
- **not-configured**: this machine cannot run the flow (or the backend cannot decide it).

A mutant is killed when it is killed in every flow it declares. The baselines must pass
everything. Mutants with a ``gap`` are known survivors: they must survive (a kill means the gap
closed: remove the ``gap``). The JSON is a list of entries, one per target, flow and backend::

    {"mutant", "slug", "flow", "backend", "declared", "failed", "broken", "killed",
     "undecided_only", "status", "bug", "gap", "baseline", "mechanism", "seconds", "error",
     "messages"}

``messages``: for a baseline, the first message of each requirement it failed or broke.

The exit status is 1 when a mutant survives in the real backend, a baseline fails anything,
a known gap is killed, a declaration is wrong, or a MUST requirement is neither the declared
killer of a mutant nor listed in :data:`EXCEPTIONS` with the reason.

``--shard K/N`` runs the K-th of N disjoint parts of the sessions (:func:`shard`), for N CI
jobs; ``--combine FILE…`` judges their JSON files together (a requirement a mutant declares
must fail for one of its mutants, which may have run in another shard).

As root, every lifecycle of a session runs in the kit's host sandbox (:mod:`kit.run.sandbox`):
"the host" of the mutants that change it on purpose (its hostname, its mount table) is that
sandbox, which vanishes with the run; the session's temporary directory is removed
afterwards.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from conformance import requirements
from conformance.expectations import FLOWS

# For annotations only: the zoo itself is imported by the functions that need it (zoo()).
if TYPE_CHECKING:
    from mutants.zoo.base import Mutant

#: The checkout's root: the directory that holds the ``mutants`` package, put on the import
#: path of every session (the zoo is not installed; the sessions run in temporary directories).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BACKENDS = ("real", "fake")
#: The baselines: (label, engine spec). They must pass everything in every flow.
BASELINES = (
    ("reference", "reference"),
    ("reference-cooperative", "conformance.cooperation:register_reference"),
)
#: Seconds one pytest session may take before the matrix kills it.
SESSION_TIMEOUT = 600.0

#: MUST requirements no mutant of the real backend can break, with the reason (the starter
#: mutants, :mod:`mutants.zoo.starter`, break the rules only the kit can break;
#: the requirements the suite does not check, ``unchecked`` in the catalogue, and those only a
#: known survivor, a mutant's ``gap``, breaks are listed on their own, from their own reasons).
EXCEPTIONS: dict[str, str] = {
    "HOST-050": "a rule of the fake backend (in the real backend the kernel answers an "
    "engine's privileged calls, and the rule holds by definition): "
    "tests/test_seccomp.py runs an engine that "
    "bypasses the system interface from every hook and an RPC method, as root and "
    "as the test user, and shows HOST-050 failing for each call",
}

#: MUST requirements that mutants break by one mechanism only (issue 14 asks for two where
#: two exist), with the reason. Requirements whose mutants are all starter mutants need no
#: entry (:func:`one_mechanism` gives their reason).
MECHANISM_EXCEPTIONS: dict[str, str] = {
    "PRIV-MASTER-003": "the setuid master regains privilege only through its saved uid 0, "
    "which is process-wide (the probe forks from the kit's thread, so a "
    "hook thread's raw setresuid does not reach it): dropping it is the "
    "one way; in the userns flow an engine cannot make escalation possible",
    "PRIV-STAGE2-003": "no_new_privs cannot be cleared once set: not asking for it is the one "
    "way to break the rule",
    "NS-007": "whether the container gets a user namespace is one switch (the StarterConfig's "
    "namespace flags)",
    "ORDER-013": "the starter calls these hooks; an engine breaks the count only by blocking "
    "the run (the mutant)",
    "RPC-002": "the request's name is one string built by the engine's RPC client: the wrong "
    "prefix (the mutant) is the way",
    "RPC-003": "the server's exit status is the process's: a method ending it (the mutant) is "
    "the way an engine changes it",
    "EXIT-001": "the run's exit code comes from the one status monitor_container returns",
    "EXIT-002": "the run's exit code comes from the one status monitor_container returns",
    "SIG-005": "SIGCHLD reaches the master unless its disposition is ignore: one kernel state, "
    "however it is set",
    "CLEAN-002": "one hook (cleanup_container) that raises on partial setup",
    "JOIN-001": "the StarterConfig's join-only switch is the one way",
    **{
        req: "the host diff reads the sandbox's state from outside, after the run: how the "
        "change was made (hook thread, helper thread, child, raw call) does not reach it"
        for req in (
            "HOST-003",
            "HOST-005",
            "HOST-006",
            "HOST-007",
        )
    },
}


# --- the zoo and its declarations ------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One pytest session of the matrix: a mutant, or a baseline."""

    label: str  # mutant-<slug>, or the baseline's label
    engine: str  # the --engine value
    declared: tuple[str, ...] = ()
    flows: tuple[str, ...] = FLOWS
    bug: str = ""
    gap: str | None = None
    hook_timeout: float | None = None
    baseline: bool = False
    cost: float = 1.0
    mechanism: str = ""
    #: Its bug is the supervisor's: applied in every interpreter of the session
    #: (mutants/site/sitecustomize.py), since the supervisor never imports the engine.
    in_supervisor: bool = False
    #: Directories the session imports from besides the checkout (the blind engines of
    #: ``tests/`` are modules there, not a package).
    pythonpath: tuple[str, ...] = ()
    #: ``--kit-self-check``: the matrix judges every flow by its kit-injected runs too.
    kit_self_check: str = "all"

    @property
    def slug(self) -> str:
        return self.label[len("mutant-") :] if self.label.startswith("mutant-") else self.label


def zoo() -> list[type[Mutant]]:
    from mutants.zoo import MUTANTS

    return list(MUTANTS)


def mutant_targets(only: Sequence[str] = ()) -> list[Target]:
    """The mutants (all, or those whose slug or name is in ``only``)."""
    from mutants.zoo import engine_spec, registered_name

    out = []
    for mutant in zoo():
        name = registered_name(mutant)
        if only and name not in only and mutant.slug not in only:
            continue
        cost = len(mutant.flows) * (2.5 if mutant.cooperative else 1.0) + (
            3.0 if mutant.hook_timeout else 0.0
        )
        out.append(
            Target(
                name,
                engine_spec(mutant),
                tuple(mutant.killed_by),
                tuple(mutant.flows),
                mutant.bug,
                mutant.gap,
                mutant.hook_timeout,
                cost=cost,
                mechanism=mutant.mechanism,
                in_supervisor=getattr(mutant, "in_supervisor", False),
            )
        )
    unknown = [n for n in only if not any(n in (t.label, t.slug) for t in out)]
    if unknown:
        raise ValueError(f"unknown mutant(s): {', '.join(unknown)}")
    return out


def baseline_targets() -> list[Target]:
    return [
        Target(
            label,
            spec,
            baseline=True,
            bug="the reference: must pass everything",
            cost=len(FLOWS) * (2.5 if "cooperat" in label else 1.0),
        )
        for label, spec in BASELINES
    ]


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → (K, N), 1 ≤ K ≤ N; a ValueError naming the bad value otherwise."""
    k, slash, n = text.partition("/")
    try:
        index, count = int(k), int(n)
    except ValueError:
        index = count = 0
    if not slash or count < 1 or not 1 <= index <= count:
        raise ValueError(f"--shard {text!r}: write K/N with 1 <= K <= N, e.g. 2/4")
    return index, count


def shard(targets: Sequence[Target], index: int, count: int) -> list[Target]:
    """The ``index``-th (1-based) of ``count`` disjoint parts of ``targets``, in their order.

    Deterministic and balanced by estimated cost: the targets, costliest first (ties by
    label), each go to the part with the least cost so far (ties: the lowest part). The same
    targets give the same parts on every machine, and the parts cover them exactly once."""
    if not 1 <= index <= count:
        raise ValueError(f"shard {index}/{count}: need 1 <= K <= N")
    load = [0.0] * count
    part: dict[str, int] = {}
    for target in sorted(targets, key=lambda t: (-t.cost, t.label)):
        lightest = min(range(count), key=lambda i: (load[i], i))
        load[lightest] += target.cost
        part[target.label] = lightest + 1
    return [t for t in targets if part[t.label] == index]


def declaration_problems() -> list[str]:
    """Mutant declarations that cannot be right: an unknown requirement or flow, a flow of the
    mutant in which no test checks a requirement it declares (for the capabilities it has), a
    missing or duplicate name, no bug or no requirement."""
    from conformance.catalogue import tests_by_requirement
    from mutants.zoo.base import MECHANISMS

    index = tests_by_requirement()
    problems = []
    seen: set[str] = set()
    for mutant in zoo():
        name = f"mutant-{mutant.slug}"
        if not mutant.slug or name in seen:
            problems.append(f"{mutant.__qualname__}: missing or duplicate slug {mutant.slug!r}")
        seen.add(name)
        if not mutant.bug:
            problems.append(f"{name}: no bug description")
        if not mutant.killed_by:
            problems.append(f"{name}: declares no requirement that kills it")
        if mutant.mechanism not in MECHANISMS:
            problems.append(
                f"{name}: unknown mechanism {mutant.mechanism!r} (known: {', '.join(MECHANISMS)})"
            )
        bad_flows = [f for f in mutant.flows if f not in FLOWS]
        if not mutant.flows or bad_flows:
            problems.append(f"{name}: flows {list(mutant.flows)} (known: {', '.join(FLOWS)})")
        unknown = [req for req in mutant.killed_by if req not in requirements.CATALOGUE]
        problems += [f"{name}: unknown requirement {req}" for req in unknown]
        if unknown or mutant.gap:
            continue  # a known survivor may name a requirement nothing checks yet
        caps = _capabilities(mutant)
        tested = {
            f
            for req in mutant.killed_by
            for decl in index[req]
            if set(decl.requires) <= caps
            for f in decl.flows
        }
        for flow in mutant.flows:
            if flow not in tested:
                problems.append(
                    f"{name}: none of {', '.join(mutant.killed_by)} is checked in "
                    f"flow {flow} for this mutant (tested in "
                    f"{', '.join(sorted(tested)) or 'no flow'})"
                )
    return problems


def _capabilities(mutant: type[Mutant]) -> set[str]:
    """The capabilities a mutant declares once registered (cooperative ones: both
    cooperation protocols)."""
    from conformance.capabilities import Capabilities, _instance

    declared = getattr(mutant, "conformance_capabilities", None) or Capabilities
    caps = {k for k, v in _instance(declared, mutant.__qualname__).as_dict().items() if v}
    if mutant.cooperative:
        caps |= {"fault_injection", "join_only"}
    return caps


def must_requirements() -> list[str]:
    return [r.id for r in requirements.CATALOGUE.values() if r.level == "MUST"]


def killers() -> dict[str, list[str]]:
    """Requirement → the mutants (not known survivors) that declare it."""
    out: dict[str, list[str]] = {}
    for mutant in zoo():
        if mutant.gap:
            continue
        for req in mutant.killed_by:
            out.setdefault(req, []).append(f"mutant-{mutant.slug}")
    return out


def not_killed_by_a_mutant() -> dict[str, str]:
    """Every MUST requirement that no mutant of the zoo is declared to be killed by, with the
    reason it has none: an exception (:data:`EXCEPTIONS`), not checked by the suite, or only a
    known survivor breaks it — or ``""`` when there is no reason (a hole in the zoo)."""
    covered = killers()
    gaps = {
        req: f"known survivor mutant-{m.slug}: {m.gap}"
        for m in zoo()
        if m.gap
        for req in m.killed_by
    }
    out = {}
    for req in must_requirements():
        if req in covered:
            continue
        entry = requirements.CATALOGUE[req]
        if req in gaps:
            why = gaps[req]
        elif entry.unchecked:
            why = f"not checked by the suite: {entry.unchecked}"
        else:
            why = EXCEPTIONS.get(req, "")
        out[req] = why
    return out


def declared_mechanisms() -> dict[str, list[str]]:
    """Requirement → the mechanisms of the mutants (not known survivors) that declare it."""
    out: dict[str, set[str]] = {}
    for mutant in zoo():
        if not mutant.gap:
            for req in mutant.killed_by:
                out.setdefault(req, set()).add(mutant.mechanism)
    return {req: sorted(found) for req, found in out.items()}


def one_mechanism() -> dict[str, str]:
    """Every MUST requirement that mutants declare by fewer than two mechanisms, with the
    reason (:data:`MECHANISM_EXCEPTIONS`, or: only the starter can break it) — or ``""``
    when there is none (a second mechanism is missing from the zoo)."""
    out = {}
    for req, found in declared_mechanisms().items():
        entry = requirements.CATALOGUE.get(req)
        if entry is None or entry.level != "MUST" or len(found) >= 2:
            continue
        if req in MECHANISM_EXCEPTIONS:
            out[req] = MECHANISM_EXCEPTIONS[req]
        elif found == ["starter"]:
            out[req] = (
                "a rule of the starter (the kit's own order, processes, error "
                "handling or set-up): an engine's thread, syscall, value or path "
                "cannot break it"
            )
        else:
            out[req] = ""
    return out


def uncovered() -> list[str]:
    """MUST requirements without a mutant and without a reason."""
    return [req for req, why in not_killed_by_a_mutant().items() if not why]


def stale_exceptions() -> list[str]:
    """Entries of :data:`EXCEPTIONS` that are wrong: unknown, not MUST, or killed by a mutant
    after all (then the exception must go)."""
    covered = killers()
    out = []
    for req in EXCEPTIONS:
        entry = requirements.CATALOGUE.get(req)
        if entry is None:
            out.append(f"{req}: unknown requirement")
        elif entry.level != "MUST":
            out.append(f"{req}: not a MUST requirement ({entry.level})")
        elif req in covered:
            out.append(f"{req}: killer of {', '.join(covered[req])}; remove the exception")
        elif entry.unchecked:
            out.append(f"{req}: not checked by the suite; its reason is the catalogue's")
    return out


def stale_mechanism_exceptions() -> list[str]:
    """Entries of :data:`MECHANISM_EXCEPTIONS` that are wrong: unknown, not MUST, or killed
    by two mechanisms after all."""
    declared = declared_mechanisms()
    out = []
    for req in MECHANISM_EXCEPTIONS:
        entry = requirements.CATALOGUE.get(req)
        if entry is None or entry.level != "MUST":
            out.append(f"{req}: not a known MUST requirement")
        elif len(declared.get(req, [])) >= 2:
            out.append(
                f"{req}: declared by mechanisms {', '.join(declared[req])}; remove the exception"
            )
    return out


# --- running the suite ------------------------------------------------------------------------


def backend_available(backend: str) -> tuple[bool, str]:
    """Whether the suite accepts ``--backend backend`` (the fake backend comes later)."""
    from conformance import plugin

    if backend in getattr(plugin, "BACKENDS", ("real",)):
        return True, ""
    return False, (
        f"the conformance suite does not accept --backend {backend} yet "
        f"(it accepts: {', '.join(getattr(plugin, 'BACKENDS', ('real',)))})"
    )


#: The directory of the sitecustomize that applies a supervisor mutant (Target.in_supervisor).
SUPERVISOR_SITE = os.path.join(ROOT, "mutants", "site")


def _environment(tmpdir: str, target: Target | None = None) -> dict[str, str]:
    # The matrix measures the suite, not the kit: coverage of the kit's own test run must
    # not follow it into hundreds of sessions (that alone multiplies CI time).
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "CONFORMANCE_", "COVERAGE_")) and k != "COV_CORE_SOURCE"
    }
    env["TMPDIR"] = tmpdir
    extra = target.pythonpath if target is not None else ()
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *extra, *filter(None, [env.get("PYTHONPATH")])])
    if target is not None and target.in_supervisor:
        env["PYTHONPATH"] = os.pathsep.join([SUPERVISOR_SITE, env["PYTHONPATH"]])
        env["KIT_SUPERVISOR_MUTANT"] = target.slug
    return env


def session_command(target: Target, backend: str, report: str, focus: bool = False) -> list[str]:
    """The pytest command line of ``target``'s session (see :func:`run_session`)."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:hypothesispytest",
        "-p",
        "no:xdist",
        f"--engine={target.engine}",
        f"--backend={backend}",
        f"--flow={','.join(target.flows)}",
        f"--conformance-report={report}",
        # A starter mutant breaks a kit requirement in every flow, and an engine mutant may
        # break an engine rule only in a kit-injected run of one flow: the matrix judges every
        # flow by every run, so each flow runs the kit-injected scenarios too.
        f"--kit-self-check={target.kit_self_check}",
    ]
    if target.hook_timeout:
        command.append(f"--hook-timeout={target.hook_timeout}")
    if focus and target.declared and not target.baseline:
        command += ["-k", " or ".join(target.declared)]
    return command


def run_session(target: Target, backend: str, workdir: str, focus: bool = False) -> dict[str, Any]:
    """One pytest session of the suite against ``target``; returns its report (parsed) or
    ``{"error": …}``, plus ``seconds``. ``focus``: only the tests of the requirements the
    mutant declares (``-k``; the lifecycles of the other scenarios are then not run)."""
    report = os.path.join(workdir, "report.json")
    tmpdir = os.path.join(workdir, "tmp")
    os.makedirs(tmpdir, exist_ok=True)
    for path in (workdir, tmpdir):
        os.chmod(path, 0o755)  # the run directories inside belong to U
    command = session_command(target, backend, report, focus)
    start = time.monotonic()
    try:
        proc = _session_process(command, workdir, _environment(tmpdir, target))
    except subprocess.TimeoutExpired as exc:
        # What the session wrote so far (text, as communicate gave it; bytes from older code).
        partial = exc.stdout or b""
        output = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        return {
            "error": f"the session took more than {SESSION_TIMEOUT:.0f} s: {output[-1000:]}",
            "seconds": SESSION_TIMEOUT,
        }
    seconds = time.monotonic() - start
    try:
        with open(report) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {
            "error": f"no report (pytest exit {proc.returncode}): "
            f"{(proc.stdout + proc.stderr)[-1500:]}",
            "seconds": seconds,
        }
    doc["seconds"] = seconds
    return doc


class Cancelled(Exception):
    """The run was interrupted: no session starts any more."""


#: The pytest sessions running now, each killed when the run is interrupted; ``None`` once it
#: was (a session about to start then does not).
_running: set[subprocess.Popen[str]] | None = set()
_running_lock = threading.Lock()


def _session_process(
    command: list[str], workdir: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` of one session, killed at :data:`SESSION_TIMEOUT` (TimeoutExpired)
    or when the run is interrupted (:func:`_kill_sessions`; Cancelled). Killed, pytest's
    zygote sees its control socket close and ends what it started."""
    with _running_lock:
        if _running is None:
            raise Cancelled("the run was interrupted before this session started")
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _running.add(proc)
    try:
        try:
            out, err = proc.communicate(timeout=SESSION_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise subprocess.TimeoutExpired(command, SESSION_TIMEOUT, output=out) from None
    finally:
        proc.kill()  # a no-op once it has exited
        proc.wait()
        with _running_lock:
            if _running is not None:
                _running.discard(proc)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _kill_sessions() -> None:
    """Kill every session running and let none start (the run was interrupted)."""
    global _running
    with _running_lock:
        running, _running = _running or set(), None
    for proc in running:
        proc.kill()


def sessions_root() -> str:
    """A new directory for the work directories of a run's sessions (the caller removes it)."""
    root = tempfile.mkdtemp(
        prefix="kit-mutants-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None
    )
    os.chmod(root, 0o755)
    return root


Item = TypeVar("Item")
Result = TypeVar("Result")


#: Seconds at most between a signal that ends the run and the start of its ending.
INTERRUPT_LATENCY = 0.25


def in_sessions(
    work: Sequence[Item], session: Callable[[str, int, Item], Result], jobs: int
) -> list[Result]:
    """``session(root, index, item)`` for each item of ``work``, ``jobs`` at a time, under a
    :func:`sessions_root` removed after; the results in the order of ``work``."""
    global _running
    with _running_lock:
        _running = set()  # a run interrupted before this one let none start
    root = sessions_root()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = [pool.submit(session, root, i, item) for i, item in enumerate(work)]
        pending = set(futures)
        while pending:
            # Not one wait until all are done: the kernel may hand a signal to a session's
            # thread, and its handler runs here only once this thread wakes up.
            _, pending = concurrent.futures.wait(pending, timeout=INTERRUPT_LATENCY)
        return [future.result() for future in futures]
    except BaseException:
        # Interrupted (Ctrl-C, or SIGTERM: see interruptible): the sessions end now, not
        # when they are done, and the directory goes only once none writes there.
        _kill_sessions()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(root, ignore_errors=True)


def interruptible() -> None:
    """SIGTERM and SIGHUP (a CI job cancelled, a closed terminal) end the run as Ctrl-C
    does: its sessions killed and its work directories removed, not left behind."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def session_in(
    root: str, index: int, target: Target, backend: str, focus: bool = False
) -> dict[str, Any]:
    """:func:`run_session` in a work directory of its own under ``root``, removed after."""
    workdir = os.path.join(root, f"{index:03d}-{target.slug}-{backend}")
    os.makedirs(workdir)
    try:
        return run_session(target, backend, workdir, focus=focus)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def entries_for(target: Target, backend: str, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One matrix entry per flow of ``target`` from its session's report."""
    out = []
    by_flow: dict[str, list[dict[str, Any]]] = {flow: [] for flow in target.flows}
    for result in doc.get("results") or []:
        by_flow.setdefault(result["flow"], []).append(result)
    for flow in target.flows:
        results = by_flow.get(flow, [])
        # A result a failed-early run left undecided still detects the mutant (its root cause
        # is the engine's fault).
        failed = sorted(
            {r["requirement"] for r in results if r["outcome"] in ("failed", "not-decided")}
        )
        broken = sorted({r["requirement"] for r in results if r["outcome"] == "broken"})
        declared = set(target.declared)
        killed = bool(declared & set(failed))
        # Killed with no declared requirement failing on its own verdict, only left
        # undecided by a run that failed early: the declared bug, or a crash of the mutant
        # that would "kill" any declaration. The table lists these for a reader to judge.
        undecided_only = killed and not any(
            r["requirement"] in declared and r["outcome"] == "failed" for r in results
        )
        # A baseline's failures are the kit's or the reference's bugs, often seen once in
        # many runs: keep what each said, so that one failed run can be diagnosed.
        messages = (
            {
                r["requirement"]: str(r.get("message") or "")[:800]
                for r in reversed(results)
                if r["outcome"] in ("failed", "not-decided", "broken")
            }
            if target.baseline
            else {}
        )
        if doc.get("error"):
            status = "broken"
        elif target.baseline:
            status = "passed" if not failed and not broken else "failed"
        elif killed:
            status = "killed"
        elif declared & set(broken):
            status = "broken"
        elif any(
            r["requirement"] in declared and r["outcome"] in ("passed", "xfail") for r in results
        ):
            status = "survived"
        elif target.gap and not any(r["requirement"] in declared for r in results):
            status = "survived"  # a known survivor: nothing checks what it breaks
        else:
            status = "not-configured"
        out.append(
            {
                "mutant": target.label,
                "slug": target.slug,
                "flow": flow,
                "backend": backend,
                "declared": list(target.declared),
                "failed": failed,
                "broken": broken,
                "killed": killed,
                "undecided_only": undecided_only,
                "status": status,
                "bug": target.bug,
                "gap": target.gap,
                "baseline": target.baseline,
                "mechanism": target.mechanism,
                "seconds": round(float(doc.get("seconds", 0.0)), 2),
                "error": doc.get("error"),
                "messages": dict(sorted(messages.items())),
            }
        )
    return out


def _unavailable(target: Target, backend: str, why: str) -> list[dict[str, Any]]:
    return [
        {
            "mutant": target.label,
            "slug": target.slug,
            "flow": flow,
            "backend": backend,
            "declared": list(target.declared),
            "failed": [],
            "broken": [],
            "killed": False,
            "undecided_only": False,
            "status": "not-configured",
            "bug": target.bug,
            "gap": target.gap,
            "baseline": target.baseline,
            "mechanism": target.mechanism,
            "seconds": 0.0,
            "error": why,
            "messages": {},
        }
        for flow in target.flows
    ]


@dataclass
class Matrix:
    entries: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def verdict(self, whole: bool = True) -> list[str]:
        """Why the matrix fails (empty: it passes). ``whole=False`` for one shard: a
        requirement declared by mutants may have failed for one in another shard, so
        :meth:`unproven` is left to ``--combine``."""
        out = list(self.problems)
        if whole:
            out += [
                f"{req}: declared by mutants, failed for none of them" for req in self.unproven()
            ]
        for label, flows in self._by_target().items():
            first = flows[0]
            backend = first["backend"]
            statuses = {e["status"] for e in flows}
            where = f"{label} ({backend})"
            if first["baseline"]:
                bad = [
                    e for e in flows if e["status"] != "passed" and e["status"] != "not-configured"
                ]
                for e in bad:
                    error = f"; {e['error']}" if e["error"] else ""
                    said = "".join(
                        f"\n    {req}: {message}"
                        for req, message in (e.get("messages") or {}).items()
                    )
                    out.append(
                        f"{where}: the baseline {e['status']} in {e['flow']}: failed "
                        f"{', '.join(e['failed']) or '-'}, broken "
                        f"{', '.join(e['broken']) or '-'}{error}{said}"
                    )
            elif first["gap"]:
                if "killed" in statuses and backend == "real":
                    out.append(
                        f"{where}: a known survivor was killed; its gap closed, remove "
                        "it from the mutant"
                    )
            elif backend == "real" and statuses & {"survived", "broken"}:
                for e in flows:
                    if e["status"] in ("survived", "broken"):
                        out.append(
                            f"{where}: {e['status']} in {e['flow']} (declared "
                            f"{', '.join(e['declared'])}; failed "
                            f"{', '.join(e['failed']) or 'nothing'})"
                            + (f": {e['error'][:300]}" if e["error"] else "")
                        )
        return out

    def _real_mutant_entries(self) -> list[dict[str, Any]]:
        return [
            e for e in self.entries if e["backend"] == "real" and not e["baseline"] and not e["gap"]
        ]

    def shown(self) -> set[str]:
        """Requirements that failed, in the real backend, for a mutant that declares them."""
        return {
            req
            for e in self._real_mutant_entries()
            for req in set(e["declared"]) & set(e["failed"])
        }

    def unproven(self) -> list[str]:
        """Requirements that mutants declare but that failed for none of them in the real
        backend: declared, never shown to catch anything (a mutant that only another of
        its declared requirements kills proves nothing about this one)."""
        declared = {req for e in self._real_mutant_entries() for req in e["declared"]}
        return sorted(declared - self.shown())

    def mechanisms(self) -> dict[str, list[str]]:
        """Requirement → the mechanisms of the mutants it was shown to kill (real backend:
        it failed for a mutant that declares it)."""
        out: dict[str, set[str]] = {}
        for e in self._real_mutant_entries():
            for req in set(e["declared"]) & set(e["failed"]):
                out.setdefault(req, set()).add(e.get("mechanism") or "direct")
        return {req: sorted(found) for req, found in sorted(out.items())}

    def _by_target(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for e in self.entries:
            out.setdefault(f"{e['mutant']}\0{e['backend']}", []).append(e)
        return {k.replace("\0", "@"): v for k, v in out.items()}

    def killed_fraction(self, backend: str) -> tuple[int, int, int]:
        """(killed, decidable, total) mutants in ``backend``, known survivors aside: killed in
        every flow it could be decided in; decidable in at least one flow (the fake backend
        cannot decide what only the kernel shows)."""
        killed = decidable = total = 0
        for flows in self._by_target().values():
            first = flows[0]
            if first["baseline"] or first["gap"] or first["backend"] != backend:
                continue
            total += 1
            if all(e["status"] == "not-configured" for e in flows):
                continue
            decidable += 1
            killed += all(e["status"] in ("killed", "not-configured") for e in flows)
        return killed, decidable, total


#: The backends whose mutant sessions run only the declared requirements' tests by default
#: (``run_matrix(focus=…)``): the real backend runs the whole suite (what else fails is part
#: of the evidence); the fake backend only says which mutants it can kill.
FOCUSED_BACKENDS = ("fake",)


def run_matrix(
    backend: str = "real",
    jobs: int = 2,
    only: Sequence[str] = (),
    baselines: bool = True,
    progress: Callable[[str], None] | None = None,
    part: tuple[int, int] | None = None,
    focus: Sequence[str] = FOCUSED_BACKENDS,
    mutant_backends: Sequence[str] = BACKENDS,
) -> Matrix:
    """Run the suite against the baselines and every mutant (or ``only`` those) in
    ``backend`` (``real``, ``fake`` or ``both``), ``jobs`` sessions at a time; ``part``
    (K, N): only the K-th of N shards of those targets (:func:`shard`). In the backends of
    ``focus`` a mutant's session runs only the tests of the requirements it declares
    (its ``failed`` then lists only those: what else the bug breaks is not looked at).
    Baselines run everything; mutants only in ``mutant_backends`` (a fake backend's kills
    are a measure, not a verdict: CI runs its baselines only)."""
    start = time.monotonic()
    backends = BACKENDS if backend == "both" else (backend,)
    matrix = Matrix(problems=declaration_problems())
    targets = (baseline_targets() if baselines else []) + mutant_targets(only)
    if part is not None:
        targets = shard(targets, *part)
    work: list[tuple[Target, str]] = []
    for name in backends:
        ok, why = backend_available(name)
        for target in targets:
            if not target.baseline and name not in mutant_backends:
                continue
            if ok:
                work.append((target, name))
            else:
                matrix.entries += _unavailable(target, name, why)
    work.sort(key=lambda item: -item[0].cost)

    def one(root: str, index: int, item: tuple[Target, str]) -> list[dict[str, Any]]:
        target, name = item
        doc = session_in(root, index, target, name, focus=name in focus)
        found = entries_for(target, name, doc)
        if progress is not None:
            progress(_line(found))
        return found

    for found in in_sessions(work, one, jobs):
        matrix.entries += found
    order = {t.label: i for i, t in enumerate(targets)}
    matrix.entries.sort(
        key=lambda e: (e["backend"], order.get(e["mutant"], 999), FLOWS.index(e["flow"]))
    )
    matrix.seconds = time.monotonic() - start
    return matrix


# --- output ------------------------------------------------------------------------------------

_MARK = {
    "killed": "killed",
    "survived": "SURVIVED",
    "broken": "BROKEN",
    "passed": "passed",
    "failed": "FAILED",
    "not-configured": "n/c",
}


def _line(flows: list[dict[str, Any]]) -> str:
    first = flows[0]
    cells = ", ".join(f"{e['flow']} {_MARK[e['status']]}" for e in flows)
    other = sorted({r for e in flows for r in e["failed"]} - set(first["declared"]))
    tag = (
        " (known gap)"
        if first["gap"] and first["backend"] == "real"
        else " (a known gap of the real backend)"
        if first["gap"]
        else ""
    )
    return (
        f"{first['mutant']:<38} {first['backend']:<4} {cells}{tag}  "
        f"[{', '.join(first['declared']) or 'baseline'}]"
        + (
            f"  also failed: {', '.join(other[:6])}{' …' if len(other) > 6 else ''}"
            if other and not first["baseline"]
            else ""
        )
        + f"  {first['seconds']:.1f}s"
    )


def table(matrix: Matrix) -> str:
    lines = [_line(flows) for flows in matrix._by_target().values()]
    for name in BACKENDS:
        killed, decidable, total = matrix.killed_fraction(name)
        if total:
            lines.append(
                f"{name} backend: {killed}/{total} mutants killed "
                f"({100 * killed / total:.0f} %)"
                + (f"; {total - decidable} not decidable there (n/c)" if decidable < total else "")
            )
    musts = must_requirements()
    lines.append(
        f"MUST requirements shown to kill a mutant that declares them (real backend): "
        f"{len(matrix.shown() & set(musts))}/{len(musts)}"
    )
    shown = matrix.mechanisms()
    pairs = sum(len(found) for req, found in shown.items() if req in musts)
    several = sum(1 for req, found in shown.items() if req in musts and len(found) >= 2)
    lines.append(
        f"requirements × mechanisms shown (real backend, MUST): {pairs}; "
        f"{several} MUST requirements killed by two mechanisms or more"
    )
    undecided = sorted(
        {e["slug"] for e in matrix.entries if e.get("undecided_only") and e["backend"] == "real"}
    )
    if undecided:
        lines.append(
            f"killed only by results a failed run left undecided (real backend; check that the "
            f"run failed for the declared bug, not a crash): {len(undecided)}: "
            + ", ".join(undecided)
        )
    lines.append(f"{len(matrix._by_target())} sessions in {matrix.seconds:.0f} s")
    return "\n".join(lines)


def coverage_text() -> str:
    lines = ["MUST requirements no mutant is declared to be killed by:"]
    for req, why in not_killed_by_a_mutant().items():
        lines.append(f"  {req}: {why or 'NO MUTANT AND NO REASON'}")
    lines.append("MUST requirements killed by one mechanism only (the exceptions):")
    for req, why in one_mechanism().items():
        lines.append(f"  {req}: {why or 'NO SECOND MECHANISM AND NO REASON'}")
    return "\n".join(lines)


def mechanism_table(matrix: Matrix | None = None) -> str:
    """Requirement × mechanism as Markdown: the mutants declared (and, given a matrix, the
    mechanisms shown to kill it in the real backend)."""
    declared = declared_mechanisms()
    shown = matrix.mechanisms() if matrix is not None else {}
    lines = ["| requirement | mechanisms declared | shown to kill (real) |", "|---|---|---|"]
    for req in requirements.CATALOGUE:
        if req in declared:
            lines.append(
                f"| {req} | {', '.join(declared[req])} | {', '.join(shown.get(req, [])) or '-'} |"
            )
    return "\n".join(lines)


def listing() -> str:
    """The zoo as a Markdown table (name and ``--engine`` value, declared killers, flows,
    mechanism, bug)."""
    from mutants.zoo import engine_spec

    lines = ["| mutant | killed by | flows | mechanism | bug |", "|---|---|---|---|---|"]
    for mutant in zoo():
        gap = f" **Known survivor**: {mutant.gap}." if mutant.gap else ""
        name = f"mutant-{mutant.slug}"
        spec = engine_spec(mutant)
        shown = f"`{name}` (`--engine={spec}`)"
        lines.append(
            f"| {shown} | {', '.join(mutant.killed_by)} | "
            f"{', '.join(mutant.flows)} | {mutant.mechanism} | {mutant.bug}.{gap} |"
        )
    return "\n".join(lines)


def load_entries(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The entries of the matrix JSON files ``paths`` (one per shard), as one list; a
    ValueError naming the file that is not such a list."""
    entries: list[dict[str, Any]] = []
    for path in paths:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--combine {path}: cannot read a matrix: {exc}") from None
        if not isinstance(doc, list) or not all(isinstance(e, dict) and "mutant" in e for e in doc):
            raise ValueError(
                f"--combine {path}: not a matrix (a JSON list of entries, as --json writes)"
            )
        entries += doc
    return entries


def missing_targets(entries: Sequence[dict[str, Any]]) -> list[str]:
    """The targets (baselines and mutants) that no entry is of: a shard missing from
    ``--combine``."""
    seen = {e["mutant"] for e in entries}
    missing = [t.label for t in baseline_targets() + mutant_targets() if t.label not in seen]
    if not missing:
        return []
    return [
        f"{len(missing)} targets ran in none of the combined shards (is one missing?): "
        f"{', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}"
    ]


def main(
    json_path: str | None,
    backend: str,
    jobs: int,
    only: Sequence[str] = (),
    list_only: bool = False,
    part: tuple[int, int] | None = None,
    combine: Sequence[str] = (),
    focus: Sequence[str] = FOCUSED_BACKENDS,
) -> int:
    """``python -m mutants``."""
    if list_only:
        print(listing())
        print()
        print(mechanism_table())
        print()
        print(coverage_text())
        return 0
    if combine:
        matrix = Matrix(entries=load_entries(combine), problems=declaration_problems())
    else:
        matrix = run_matrix(
            backend,
            jobs,
            only,
            progress=lambda line: print(line, flush=True),
            part=part,
            focus=focus,
        )
    print()
    print(table(matrix))
    print()
    print(mechanism_table(matrix))
    print()
    print(coverage_text())
    problems = matrix.verdict(whole=part is None)
    if combine:
        problems += missing_targets(matrix.entries)
    if not only:
        problems += [
            f"{req}: no mutant is declared to be killed by it and EXCEPTIONS gives no reason"
            for req in uncovered()
        ]
        problems += [f"EXCEPTIONS: {p}" for p in stale_exceptions()]
        problems += [
            f"{req}: one mechanism kills it and MECHANISM_EXCEPTIONS gives no reason"
            for req, why in one_mechanism().items()
            if not why
        ]
        problems += [f"MECHANISM_EXCEPTIONS: {p}" for p in stale_mechanism_exceptions()]
    if json_path:
        with open(json_path, "w") as f:
            json.dump(matrix.entries, f, indent=1)
        print(f"matrix: {json_path}")
    if part is not None:
        print(
            f"\nshard {part[0]}/{part[1]}: whether every declared requirement failed for "
            "one of its mutants is judged over all shards: python -m mutants --combine "
            "SHARD.json…"
        )
    if problems:
        print("\nthe matrix fails:")
        for p in problems:
            print(f"  {p}")
        return 1
    where = f" of shard {part[0]}/{part[1]}" if part is not None else ""
    print(f"\nevery mutant{where} was killed by a requirement it declares; the baselines passed")
    return 0
