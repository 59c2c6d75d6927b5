"""The conformance gate: ``python -m conformance gate`` (and ``ci/gate`` in a checkout)."""

# python -m conformance gate --engine NAME [--flow FLOW[,FLOW]] [--backend B] [--strict]
#         [--out DIR] [--coverage] [-n N] [--known-failures FILE]
#         [--kit-self-check one|all|off] [-- PYTEST-ARGS]
#
# The conformance suite as one pipeline step: runs pytest with the conformance plugin against
# the engine and writes into DIR (default ./conformance-out):
#   junit.xml          JUnit XML (requirement, flow, backend and outcome as properties)
#   conformance.json   the JSON report (conformance/report.py), every run's ledger included
#   summary.md         verdict, failures first with their messages, requirements x flows
#   report.html        the same, each failure expandable to its ledger events, and one
#                      sequence diagram per flow drawn from the ledger (self-contained)
#   pytest.log         pytest's own output
#   coverage.txt/.xml  with --coverage: the engine package's coverage across every process
#
# Exit status: 0 conformant; 1 not conformant (a MUST failed, or a run failed early; with
# --strict anything failed or a MUST could not be checked; with --cov-fail-under, coverage too
# low); 2 harness or usage error (empty or bad engine name, a preflight problem, a bad option,
# broken results, pytest internal error, no tests, coverage lost the forked processes);
# 3 nothing could run in this environment (every result not-configured). Only the engine's
# requirements decide conformance; a kit requirement that does not hold (the harness's
# self-check on this machine) is a harness error, exit 2.
#
# The interpreter that runs it needs the kit and the engine installed; ci/gate in a checkout
# picks the checkout's .venv, else the active virtualenv, else python3 ($KIT_PYTHON overrides).

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from conformance import kitcov, render
from conformance.plugin import SUITE_DIR
from kit import preflight
from kit.run.request import Invoker

PROG = "python -m conformance gate"
USAGE_ERROR = 2
FILES = ("junit.xml", "conformance.json", "summary.md", "report.html")
DEFAULT_OUT = "conformance-out"
COV_DATA = "/var/tmp/kit-gate-coverage"


def parse(argv: list[str], prog: str = PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the conformance suite against an engine and write "
        "junit.xml, conformance.json, summary.md and report.html. Exit 0 conformant, 1 not "
        "conformant, 2 harness or usage error, 3 nothing could run here.",
    )
    parser.add_argument(
        "--engine",
        required=True,
        metavar="NAME",
        help="registered name, kit.engines entry point or module:attribute",
    )
    parser.add_argument(
        "--flow",
        action="append",
        default=[],
        metavar="FLOW[,FLOW]",
        help="flows to check (default all: root, suid, userns, fakeroot, "
        "hybrid; those this machine cannot run are not-configured)",
    )
    parser.add_argument(
        "--backend",
        metavar="NAME",
        help="backend of the runs (the plugin's --backend; default: the plugin's default)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="any failure, and any flow or scenario that cannot run here, "
        "makes the engine non-conformant",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"where to write the reports (default ./{DEFAULT_OUT})",
    )
    parser.add_argument(
        "-n",
        "--numprocesses",
        default="0",
        metavar="N",
        help="pytest-xdist workers (default 0: none; the suite already runs "
        "lifecycles in parallel, xdist pays off only for slow engines)",
    )
    parser.add_argument("--known-failures", metavar="FILE", help="the engine's known failures")
    parser.add_argument("--hook-timeout", metavar="SECONDS", help="per-hook timeout of runs")
    parser.add_argument(
        "--kit-self-check",
        choices=("one", "all", "off"),
        default="one",
        help="flows in which the kit checks its own requirements with the faults it injects "
        "(the plugin's --kit-self-check): one (default: the first selected flow, in the "
        "order root, suid, userns, fakeroot, hybrid), all, or off",
    )
    parser.add_argument(
        "--coverage",
        action="store_true",
        help="measure the engine package's coverage in every process (stage "
        "1, master, RPC server, stage 2): coverage.txt and coverage.xml",
    )
    parser.add_argument(
        "--cov-source",
        action="append",
        default=[],
        metavar="PKG",
        help="package or directory to measure (repeatable; default: the "
        "top-level package of the engine's classes)",
    )
    parser.add_argument(
        "--cov-fail-under",
        type=float,
        metavar="PCT",
        help="with --coverage: exit 1 when the total is below PCT",
    )
    parser.add_argument(
        "--cov-data",
        default=COV_DATA,
        metavar="DIR",
        help=f"with --coverage: data directory, writable by every uid of a "
        f"run (default {COV_DATA}; not /tmp, which engines mount over)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    parser.add_argument(
        "pytest_args", nargs=argparse.REMAINDER, help="after --: more pytest arguments"
    )
    args = parser.parse_args(argv)
    if args.pytest_args[:1] == ["--"]:
        args.pytest_args = args.pytest_args[1:]
    if args.cov_fail_under is not None and not args.coverage:
        parser.error("--cov-fail-under needs --coverage")
    return args


def fail(message: str, code: int = USAGE_ERROR, prog: str = PROG) -> int:
    """Print ``message`` once, wrapped between words to the screen, and return ``code``."""
    width = max(60, min(shutil.get_terminal_size().columns, 120))
    for i, line in enumerate(f"{prog}: {message}".splitlines()):
        print(
            "\n".join(
                textwrap.wrap(
                    line,
                    width,
                    subsequent_indent="    " if i == 0 else "      ",
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            ),
            file=sys.stderr,
        )
    return code


class Progress:
    """The progress line on a terminal, fed by :mod:`conformance.gate_progress` through a
    pipe."""

    def __init__(self, fd: int, stream: Any) -> None:
        self.file = os.fdopen(fd, "r", buffering=1)
        self.stream = stream
        self.total = self.done = self.failed = 0
        self.flow = ""
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.file:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "total" in msg:
                self.total = int(msg["total"])
            else:
                self.done += 1
                self.failed += int(msg.get("failed") or 0)
                match = re.search(r"\[([^\]]+)\]$", str(msg.get("nodeid", "")))
                self.flow = match.group(1) if match else self.flow
            self._draw()

    def _draw(self) -> None:
        width = 28
        filled = int(width * self.done / self.total) if self.total else 0
        bar = "#" * filled + "." * (width - filled)
        text = (
            f"\r  [{bar}] {self.done}/{self.total or '?'} tests · {self.failed} failed "
            f"results · flow {self.flow or '-'} · {time.monotonic() - self.started:.0f} s "
        )
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        self.thread.join(timeout=2)
        self.stream.write("\r" + " " * 100 + "\r")
        self.stream.flush()


def _starter_configs(args: argparse.Namespace) -> preflight.StarterConfigCheck | None:
    """Preflight of the StarterConfig in the selected unprivileged flows (kit.preflight),
    started; None where there is no U (those flows are not-configured, the suite says so)."""
    try:
        user = Invoker.resolve()
    except ValueError:
        return None
    flows = [f.strip() for value in args.flow for f in value.split(",") if f.strip()]
    return preflight.StarterConfigCheck(
        args.engine, flows or preflight.UNPRIVILEGED_FLOWS, user.uid, user.gid, user.groups
    )


#: The shape of what :func:`engine_classes` returns (kit.preflight.Shape).
ENGINE_CLASSES = [{"module": str, "functions": {str: ([(str, type(None))], type(None))}}]


def engine_classes(registration: Any) -> list[dict[str, Any]]:
    """In the engine's inspection child (kit.preflight.inspect): its classes (Operations, RPC
    methods) as JSON, each ``{"module": its module, "functions": {name: [module, source file,
    qualname] of the function of that name its MRO finds first, or null when what it finds
    is no function}}``."""
    module, _, qual = registration.origin.partition(":")
    classes: list[type] = []
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
        classes.append(obj if isinstance(obj, type) else type(obj))
    except (ImportError, AttributeError):
        pass
    if registration.rpc_methods is not None:
        classes.append(registration.rpc_methods)
    return [{"module": cls.__module__, "functions": _functions(cls)} for cls in classes]


def _functions(cls: type) -> dict[str, list[str] | None]:
    found: dict[str, list[str] | None] = {}
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            if name in found:
                continue
            found[name] = None
            if inspect.isfunction(value):
                try:
                    path = inspect.getsourcefile(value)
                except TypeError:
                    continue
                if path:
                    found[name] = [value.__module__, path, value.__qualname__]
    return found


def pytest_command(args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(SUITE_DIR),
        f"--engine={args.engine}",
        f"--conformance-report={out / 'conformance.json'}",
        f"--junitxml={out / 'junit.xml'}",
        "-o",
        "junit_suite_name=conformance",
        "-p",
        "conformance.gate_progress",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfE",
    ]
    cmd += [f"--flow={flow}" for flow in args.flow]
    if args.backend:
        cmd.append(f"--backend={args.backend}")
    if args.strict:
        cmd.append("--conformance-strict")
    if args.known_failures:
        cmd.append(f"--known-failures={Path(args.known_failures).resolve()}")
    if args.hook_timeout:
        cmd.append(f"--hook-timeout={args.hook_timeout}")
    cmd.append(f"--kit-self-check={args.kit_self_check}")
    if str(args.numprocesses) not in ("0", ""):
        cmd += ["-n", str(args.numprocesses)]
    return cmd + list(args.pytest_args)


def run_pytest(cmd: list[str], env: dict[str, str], log: Path, progress: bool) -> int:
    fds: tuple[int, ...] = ()
    bar = None
    if progress:
        rfd, wfd = os.pipe()
        env["KIT_GATE_PROGRESS_FD"] = str(wfd)
        fds = (wfd,)
        bar = Progress(rfd, sys.stderr)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            cmd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )
        for fd in fds:
            os.close(fd)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        finally:
            if bar is not None:
                bar.close()
    return rc


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("  | " + line for line in text[-lines:])


# --- coverage of the engine ---------------------------------------------------------------------


class EngineCoverage:
    def __init__(self, args: argparse.Namespace, classes: list[dict[str, Any]]) -> None:
        self.kitcov = kitcov
        kitcov.require_coverage()
        self.sources = args.cov_source or sorted({c["module"].split(".")[0] for c in classes})
        base = kitcov.prepare(Path(args.cov_data), clean=False)
        self.dir = Path(tempfile.mkdtemp(prefix="run-", dir=base))
        kitcov.prepare(self.dir)
        self.data_file = self.dir / ".coverage"
        self.config = kitcov.write_config(self.dir / "coveragerc", self.data_file, self.sources)
        self.classes = classes

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        return self.kitcov.child_environment(self.config, env)

    def finish(
        self, doc: dict[str, Any] | None, out: Path, fail_under: float | None
    ) -> tuple[int, list[str]]:
        """(exit code contribution, lines to print)."""
        kitcov = self.kitcov
        lines: list[str] = []
        try:
            combined = kitcov.combine(self.config, self.data_file)
        except kitcov.CoverageSetupError as exc:
            return USAGE_ERROR, [f"coverage: {exc}"]
        cov = kitcov.load(self.config, self.data_file)
        with open(out / "coverage.txt", "w") as f:
            total = float(cov.report(file=f))
        cov.xml_report(outfile=str(out / "coverage.xml"))
        lines.append(
            f"coverage of {', '.join(self.sources)}: {total:.1f} % ({combined.files} "
            "data files"
            + (f", {len(combined.corrupt)} corrupt set aside" if combined.corrupt else "")
            + ")"
        )
        code = 0
        targets = self.hook_targets(doc or {})
        checked = kitcov.unexecuted(cov, [(path, qual) for path, qual, _ in targets])
        lost = [fc for fc in checked if not fc.ok]
        if targets:
            where = {(p, q): w for p, q, w in targets}
            lines.append(
                "  code the ledger saw run in forked processes: "
                + ", ".join(
                    f"{fc.qualname} ({where[(fc.path, fc.qualname)]}) "
                    f"{'ok' if fc.ok else 'NOT EXECUTED'}"
                    for fc in checked
                )
            )
        if lost:
            code = USAGE_ERROR
            lines.append(
                "coverage: the ledger saw these run, but coverage shows them "
                "unexecuted: the measurement lost the forked processes: "
                + "; ".join(fc.describe() for fc in lost)
            )
        if fail_under is not None and total < fail_under:
            code = code or 1
            lines.append(f"coverage: {total:.1f} % is below --cov-fail-under {fail_under:g}")
        shutil.rmtree(self.dir, ignore_errors=True)
        return code, lines

    def hook_targets(self, doc: dict[str, Any]) -> list[tuple[str, str, str]]:
        """(file, qualname, processes) of every hook and RPC method of the engine's own
        code (within the measured sources) that the ledger saw run."""
        seen: dict[str, set[str]] = {}
        for run in doc.get("runs", []):
            for event in (run.get("ledger") or {}).get("events") or []:
                if event.get("kind") == "hook_enter":
                    seen.setdefault(str(event.get("hook")), set()).add(str(event.get("role")))
                elif event.get("kind") == "rpc_call" and event.get("ok"):
                    method = str(event.get("method", "")).rpartition(".")[2]
                    seen.setdefault(method, set()).add("rpc")
        out = []
        for name, roles in sorted(seen.items()):
            for cls in self.classes:
                func = cls["functions"].get(name)
                if func is None:
                    continue
                module, path, qualname = func
                if module.split(".")[0] not in {s.split(".")[0] for s in self.sources}:
                    continue  # the kit's default, or a base outside the measured sources
                out.append((path, qualname, ",".join(sorted(roles))))
                break
        return out


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str], prog: str = PROG) -> int:
    """Run the gate with the command line ``argv``; ``prog`` is the command's name in messages
    (``ci/gate`` from the checkout's wrapper)."""
    started = time.monotonic()
    args = parse(argv, prog)

    def usage(message: str) -> int:
        return fail(message, prog=prog)

    plugins = {ep.name for ep in importlib.metadata.entry_points(group="pytest11")}
    if "conformance" not in plugins:
        return usage(
            f"the conformance pytest plugin is not installed for {sys.executable} "
            "(pip install engine-kit, or pip install -e on the kit's checkout)"
        )
    if not args.engine.strip():
        return usage(
            "--engine is empty: name the engine to check, e.g. --engine reference, "
            "--engine my_package:MyEngine or a kit.engines entry point (python -m kit "
            "engines lists them)"
        )
    # In children, as U, at once: the gate never imports the engine itself (SPEC §11).
    check = _starter_configs(args)
    try:
        found = preflight.inspect(
            args.engine, collect={"classes": (engine_classes, ENGINE_CLASSES)}
        )
        problems = found.problems or (check.problems() if check is not None else [])
    finally:
        if check is not None:
            check.cancel()  # not wanted once the inspection found a problem
    if problems:  # before any lifecycle: one message per problem, usage/engine error exit
        return usage(
            f"--engine {args.engine}: preflight failed, no lifecycle was run:\n  "
            + "\n  ".join(str(p) for p in problems)
        )
    classes = found.collected["classes"]

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in (*FILES, "pytest.log", "coverage.txt", "coverage.xml"):
        (out / name).unlink(missing_ok=True)  # never leave a stale report behind
    env = dict(os.environ)
    cov = None
    if args.coverage:
        try:
            cov = EngineCoverage(args, classes)
        except kitcov.CoverageSetupError as exc:
            return usage(str(exc))
        env = cov.environment(env)
    cmd = pytest_command(args, out)
    progress = sys.stderr.isatty() and not args.quiet
    print(
        f"{prog}: engine {found.name} ({found.origin}); running the conformance suite "
        f"(log: {out / 'pytest.log'})",
        flush=True,
    )
    try:
        rc = run_pytest(cmd, env, out / "pytest.log", progress)
    except KeyboardInterrupt:
        return usage("interrupted")
    except OSError as exc:
        return usage(f"cannot run pytest: {exc}")
    seconds = time.monotonic() - started

    report_path = out / "conformance.json"
    problem = None
    if rc == 5:
        problem = "pytest collected no test (exit 5)"
    elif rc not in (0, 1):
        problem = {
            2: "pytest was interrupted or could not collect the suite (exit 2)",
            3: "pytest internal error (exit 3)",
            4: "pytest usage error (exit 4)",
        }.get(rc, f"pytest exited {rc}")
    elif not report_path.exists():
        problem = f"pytest exited {rc} but wrote no report"
    doc = None
    if problem is None:
        try:
            doc = render.load(report_path)
        except render.ReportError as exc:
            problem = f"broken results: {exc}"
    if problem is not None or doc is None:
        print(f"{prog}: HARNESS OR USAGE ERROR (exit 2): {problem}", file=sys.stderr)
        print(tail(out / "pytest.log"), file=sys.stderr)
        return USAGE_ERROR

    verdict, _paths = render.write(doc, out, strict=args.strict or None)
    code = verdict.code
    width = min(shutil.get_terminal_size().columns, 120) if sys.stdout.isatty() else 120
    lines = render.terminal_summary(doc, verdict, width=max(width, 70))  # the flow table: 68
    if cov is not None:
        cov_code, cov_lines = cov.finish(doc, out, args.cov_fail_under)
        lines += cov_lines
        if cov_code and code == 0:
            code = cov_code
    for line in lines:
        print(line)
    written = [
        out / name for name in (*FILES, "coverage.txt", "coverage.xml") if (out / name).exists()
    ]
    print("written: " + " ".join(_shown(p) for p in written))
    runs = doc["runs"]
    lifecycle = sum(float(r.get("seconds") or 0) for r in runs)
    outcome = (
        "conformant"
        if code == 0
        else verdict.title
        if code == verdict.code
        else "coverage check failed"
    )
    print(
        f"took {seconds:.1f} s ({len(runs)} lifecycle runs, {lifecycle:.1f} s of lifecycle "
        f"time); exit {code}: {outcome}"
    )
    return code


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it."""
    cwd = Path.cwd()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)
