"""Coverage across forks, uids and namespaces, for ``ci/coverage`` and ``gate --coverage``."""

from __future__ import annotations

import ast
import os
import shutil
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_COVERAGE = (7, 10)  # [run] patch = subprocess and the .pth file that starts children
CORRUPT_DIR = "corrupt"


class CoverageSetupError(RuntimeError):
    """Coverage cannot be measured here (missing, too old, no data written)."""


def require_coverage() -> Any:
    try:
        import coverage  # noqa: PLC0415 (so that its absence gets the message below)
    except ImportError:
        raise CoverageSetupError(
            "coverage is not installed in this interpreter (pip install 'coverage>=7.10')"
        ) from None
    version = tuple(int(p) for p in coverage.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_COVERAGE:
        raise CoverageSetupError(
            f"coverage {coverage.__version__} is too old: measuring "
            "forked and exec'd children needs coverage>=7.10"
        )
    return coverage


def prepare(data_dir: Path, clean: bool = True) -> Path:
    """Create ``data_dir`` with mode 1777 (every uid of a run may write its file); with
    ``clean``, remove the data of earlier runs.

    How it works (the kit's README.md, "Coverage across forks and namespaces"): the command runs
    with ``COVERAGE_PROCESS_START`` naming a config with ``parallel = true`` and ``patch = _exit,
    subprocess, execv``; coverage's ``.pth`` file starts measuring in every Python process of the
    environment (pytest, its xdist workers, the kit's zygote and supervisors); forked children
    inherit the running measurement, and save it when they leave through ``os._exit`` or ``exec``.
    Every process writes its own data file into a directory that every uid can write (mode 1777) and
    that no container mounts over (not ``/tmp``: the reference engine mounts a tmpfs there). Then
    the files are combined.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o1777)
    if clean:
        for path in data_dir.glob(".coverage*"):
            path.unlink()
        shutil.rmtree(data_dir / CORRUPT_DIR, ignore_errors=True)
    return data_dir


def child_environment(config_file: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the measured command: our config, not an outer measurement's."""
    env = dict(os.environ if env is None else env)
    env.pop("COVERAGE_PROCESS_CONFIG", None)  # an outer `coverage run` would win otherwise
    env["COVERAGE_PROCESS_START"] = str(Path(config_file).resolve())
    return env


def write_config(path: Path, data_file: Path, sources: Sequence[str]) -> Path:
    """A ``.coveragerc`` measuring ``sources`` (packages or directories) across processes."""
    lines = [
        "# written by engine-kit ci (kitcov.write_config)",
        "[run]",
        "parallel = true",
        "patch =",
        "    _exit",
        "    subprocess",
        "    execv",
        f"data_file = {Path(data_file).resolve()}",
        "source =",
    ]
    lines += [f"    {s}" for s in sources]
    lines += ["", "[report]", "show_missing = false", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    os.chmod(path, 0o644)
    return path


@dataclass
class Combined:
    data_file: Path
    files: int = 0
    corrupt: list[str] = field(default_factory=list)


def _readable(path: Path) -> str | None:
    """Why the data file cannot be combined, or None."""
    try:
        if path.stat().st_size == 0:
            return "empty (its process was killed before it saved)"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            db.execute("select count(*) from coverage_schema").fetchone()
            db.execute("select count(*) from file").fetchone()
        finally:
            db.close()
    except (OSError, sqlite3.Error) as exc:
        return f"unreadable ({exc})"
    return None


def combine(config_file: Path, data_file: Path, append: bool = False) -> Combined:
    """Combine every ``<data_file>.*`` into ``data_file``; corrupt files (from killed
    processes) are moved to ``corrupt/`` beside them and listed, never fatal.

    A process killed by SIGKILL (a hook timeout kills the run's whole process tree) can leave a data
    file that is empty or half-written.
    """
    coverage = require_coverage()
    data_file = Path(data_file)
    result = Combined(data_file)
    parts = sorted(p for p in data_file.parent.glob(data_file.name + ".*") if p.is_file())
    for part in parts:
        why = _readable(part)
        if why is not None:
            aside = data_file.parent / CORRUPT_DIR
            aside.mkdir(exist_ok=True)
            part.rename(aside / part.name)
            result.corrupt.append(f"{part.name}: {why}")
    good = [p for p in parts if p.exists()]
    result.files = len(good)
    if not good and not (append and data_file.exists()):
        raise CoverageSetupError(
            f"no coverage data in {data_file.parent}: no measured process saved its data "
            "(is coverage>=7.10 installed in the interpreter that ran the command, and may "
            "every uid write that directory?)"
        )
    cov = coverage.Coverage(config_file=str(config_file), data_file=str(data_file))
    if append and data_file.exists():
        cov.load()
    if good:
        cov.combine(data_paths=[str(p) for p in good], strict=False, keep=False)
    cov.save()
    return result


def load(config_file: Path, data_file: Path) -> Any:
    coverage = require_coverage()
    cov = coverage.Coverage(config_file=str(config_file), data_file=str(data_file))
    cov.load()
    return cov


def percent(cov: Any, include: Sequence[str]) -> float:
    """Total percentage of the files matching ``include`` (silently)."""
    with open(os.devnull, "w") as sink:
        try:
            return float(cov.report(include=list(include), file=sink))
        except Exception as exc:  # coverage.exceptions.NoDataError: nothing matched
            if type(exc).__name__ in ("NoDataError", "NoSource"):
                return 0.0
            raise


# --- code that only runs in forked children -----------------------------------------------------


@dataclass
class FunctionCoverage:
    path: str
    qualname: str
    statements: int = 0
    executed: int = 0
    problem: str | None = None  # not found, not measured

    @property
    def ok(self) -> bool:
        # A body of only a docstring has no statement to see executed: nothing to fault.
        return self.problem is None and (self.executed > 0 or self.statements == 0)

    @property
    def pct(self) -> float:
        return 100.0 * self.executed / self.statements if self.statements else 0.0

    def describe(self) -> str:
        where = f"{self.path}::{self.qualname}"
        if self.problem:
            return f"{where}: {self.problem}"
        if not self.statements:
            return f"{where}: no statements to measure (a docstring only)"
        state = "executed" if self.ok else "NOT EXECUTED"
        return f"{where}: {state}, {self.executed}/{self.statements} statements ({self.pct:.0f} %)"


def function_span(source: str, qualname: str) -> tuple[int, int] | None:
    """(first line of the body, last line) of ``Class.method`` or ``function``."""
    tree = ast.parse(source)
    scope: Iterable[ast.AST] = tree.body
    parts = qualname.split(".")
    for i, name in enumerate(parts):
        found = None
        for node in scope:
            if (
                isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and node.name == name
            ):
                found = node
                break
        if found is None:
            return None
        if i == len(parts) - 1:
            if not isinstance(found, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return None
            return found.body[0].lineno, found.end_lineno or found.body[-1].lineno
        scope = found.body
    return None


def unexecuted(cov: Any, targets: Iterable[tuple[str, str]]) -> list[FunctionCoverage]:
    """Coverage of each ``(path, qualname)``; :attr:`FunctionCoverage.ok` is False for one
    that has no executed statement (or cannot be found).

    This is the check that matters: code that only runs in forked children (stage 1, the master, the
    RPC server, stage 2, the supervisor) must show as executed. If it does not, the measurement lost
    the children — a broken setup, not untested code.
    """
    out = []
    for path, qualname in targets:
        fc = FunctionCoverage(path, qualname)
        out.append(fc)
        full = Path(path).resolve()
        try:
            span = function_span(full.read_text(), qualname)
        except (OSError, SyntaxError) as exc:
            fc.problem = f"cannot read: {exc}"
            continue
        if span is None:
            fc.problem = "no such function (renamed? update the list of forked code)"
            continue
        try:
            _, statements, _, missing, _ = cov.analysis2(str(full))
        except Exception as exc:  # noqa: BLE001 whatever coverage raises: not measured
            fc.problem = f"not measured ({type(exc).__name__}: {exc})"
            continue
        first, last = span
        inside = [n for n in statements if first <= n <= last]
        missed = set(missing)
        fc.statements = len(inside)
        fc.executed = sum(1 for n in inside if n not in missed)
    return out
