"""``python -m kit``: run one lifecycle, list flows and engines, start a new engine."""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from kit import registry
from kit.contract import FORWARDED_SIGNALS
from kit.run import environment
from kit.run.launcher import LaunchError, RunHandle, make_request
from kit.run.oneshot import OneShot
from kit.run.request import DEFAULT_HOOK_TIMEOUT, DEFAULT_RUN_TIMEOUT, RunRequest
from kit.starter.config import FLOWS


class _Stopped(BaseException):
    """A signal of :data:`~kit.contract.FORWARDED_SIGNALS` came before the run started:
    nothing is started. A BaseException, as KeyboardInterrupt: no ``except Exception`` on
    the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _parser() -> argparse.ArgumentParser:
    """The command line::

        python -m kit run --engine NAME --flow FLOW [--backend real|fake|auto] [--ledger FILE] \
            -- CMD [ARGS…]
        python -m kit flows      (each flow: the backend auto picks, and why)
        python -m kit engines
        python -m kit new ENGINE_NAME [DIR]   (a new engine package that passes the suite)
    """
    p = argparse.ArgumentParser(prog="python -m kit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one engine lifecycle; exits with the payload's code")
    r.add_argument(
        "--engine",
        required=True,
        help="registered name, kit.engines entry point, or module:attribute",
    )
    r.add_argument("--flow", required=True, choices=FLOWS)
    r.add_argument(
        "--backend",
        default="auto",
        choices=environment.BACKENDS,
        help="real: the kernel; fake: a model, no namespace or privilege needed; "
        "auto: real where this machine can run the flow, else fake (default)",
    )
    r.add_argument(
        "--user",
        help="the unprivileged invoking user U (name or uid; default "
        "$KIT_TEST_USER, kit-test, nobody)",
    )
    r.add_argument("--ledger", metavar="FILE", help="write the run's ledger (JSON) to FILE")
    r.add_argument(
        "--config", metavar="JSON", default="{}", help="engine config fields as a JSON object"
    )
    r.add_argument(
        "--hook-timeout",
        type=float,
        default=DEFAULT_HOOK_TIMEOUT,
        help="seconds a hook may take (default %(default)s)",
    )
    r.add_argument(
        "--run-timeout",
        type=float,
        default=DEFAULT_RUN_TIMEOUT,
        help="seconds the whole run may take (default %(default)s)",
    )
    r.add_argument(
        "--probes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="take privilege snapshots and run escalation probes at every hook "
        "(default: with --ledger, the only place they are shown)",
    )
    r.add_argument("argv", nargs="+", metavar="CMD", help="the payload, after --")
    sub.add_parser(
        "flows",
        help="which backend each flow runs on here (real where the "
        "machine allows it, else fake), and why",
    )
    sub.add_parser("engines", help="registered engines: name, then where it comes from")
    n = sub.add_parser(
        "new",
        help="write a new engine package: pyproject with the kit.engines "
        "entry point, the engine (each hook says where it runs and with which "
        "privileges), its RPC methods, a unit test using rpc_mock, a CI workflow",
    )
    n.add_argument("name", metavar="ENGINE_NAME", help="e.g. my-engine (package my_engine)")
    n.add_argument(
        "dir", nargs="?", metavar="DIR", help="where (new or empty; default: ./ENGINE_NAME)"
    )
    return p


def cmd_run(args: argparse.Namespace) -> int:
    try:
        engine_config = json.loads(args.config)
        if not isinstance(engine_config, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        print(f"kit run: --config: {exc}", file=sys.stderr)
        return 2
    # A one-shot process, which forks its run itself: the auto backend's probe of the flow
    # (namespaces alone, as root) may take a thread of it rather than a fork of all of it.
    environment.probe_in_threads()
    try:
        request = make_request(
            args.engine,
            args.flow,
            args.argv,
            engine_config=engine_config,
            user=args.user,
            backend=args.backend,
            hook_timeout=args.hook_timeout,
            run_timeout=args.run_timeout,
            probes=args.probes if args.probes is not None else bool(args.ledger),
        )
    except ValueError as exc:
        print(f"kit run: {exc}", file=sys.stderr)
        return 2
    # The signals a run forwards to its master, from now on: before the run has started,
    # the first one stops what is being prepared (its children ended, its directory
    # removed: a default action would end this process and leave the directory; a second
    # one meanwhile is let go, not allowed to cut that short), then the run gets them.
    started: list[RunHandle] = []
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if started:
            started[0].send_signal(signum)
        elif not stopping:
            stopping.append(signum)
            raise _Stopped(signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, on_signal)
    try:
        one_shot = _prepare(request)
        if one_shot is None:
            return 2
        # Held while the run is forked and known here: a signal then goes to the run (as
        # soon as they are let through), never stops a run that exists already.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        try:
            handle = _fork_run(one_shot)
            if handle is not None:
                started.append(handle)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if handle is None:
            return 2
    except _Stopped as stop:
        name = signal.Signals(stop.signum).name
        print(f"kit run: {name} before the run started: nothing was left running", file=sys.stderr)
        return 128 + stop.signum
    try:
        result = handle.wait()
    except LaunchError as exc:  # the kit's own failure (a bug, or its process killed)
        first, *rest = str(exc).splitlines() or [""]
        print(f"kit run: the kit failed, not the engine: {first}", file=sys.stderr)
        for line in rest:  # the supervisor's stderr, as it was
            print(f"kit run:   {line}", file=sys.stderr)
        return 2  # as every other failure to launch: no payload status to pass on
    if args.ledger:
        with open(args.ledger, "w") as f:
            f.write(result.ledger.to_json())
    for line in result.notes():
        print(f"kit run: note: {line}", file=sys.stderr)
    for line in result.problems():
        print(f"kit run: {line}", file=sys.stderr)
    return result.exit_code


def _prepare(request: RunRequest) -> OneShot | None:
    """The engine's inspection and the run's sandbox, made while this process gets ready;
    None when the inspection found a problem, or they could not be made (said on stderr).
    Interrupted, what was made is ended (by OneShot itself)."""
    try:
        one_shot = OneShot(request)
    except LaunchError as exc:
        print(f"kit run: {exc}", file=sys.stderr)
        return None
    problems = one_shot.problems()  # interrupted, it ends what was made
    if problems:  # one message each, before any process of the run starts
        one_shot.cancel()
        for problem in problems:
            print(f"kit run: {problem}", file=sys.stderr)
        return None
    return one_shot


def _fork_run(one_shot: OneShot) -> RunHandle | None:
    """The run, its supervisor forked from this process (no zygote, no second interpreter
    to start and import the kit into); None when it cannot start (said on stderr)."""
    # What exists now lives as long as this process: frozen, no collection walks it (here
    # or in the forked run, whose pages it would copy); the collector is back on for the run.
    gc.freeze()
    gc.enable()
    try:
        return one_shot.start(stdin=sys.stdin)
    except (registry.RegistryError, ValueError, LaunchError) as exc:
        print(f"kit run: {exc}", file=sys.stderr)
        return None


def cmd_flows() -> int:
    for flow in environment.flows():
        backend, why = environment.backend_for(flow)
        print(f"{flow:9} {backend}  {why}")
    note = environment.userns_note()
    if note:
        print(f"\n{note}")
    return 0


def cmd_engines() -> int:
    for name, origin in registry.available().items():
        print(f"{name}\t{origin}")
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from kit.scaffold import ScaffoldError, write_package  # noqa: PLC0415  (not a run's cost)

    directory = Path(args.dir or args.name)
    try:
        written = write_package(args.name, directory)
    except ScaffoldError as exc:
        print(f"kit new: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    where = directory if directory.is_absolute() else Path(".") / directory
    print(
        f"next: pip install {where} && pytest {where}/tests && pytest --engine={args.name}"
        "  (as root, to check every flow)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "flows":
        return cmd_flows()
    if args.command == "new":
        return cmd_new(args)
    return cmd_engines()
