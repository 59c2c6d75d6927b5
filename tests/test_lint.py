"""The linter and type checker configuration in pyproject.toml catches what it is meant to."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _ruff(path: str, source: str) -> subprocess.CompletedProcess[str]:
    """``ruff check`` of ``source`` as if it were the file ``path`` of the checkout."""
    return subprocess.run(
        [
            str(BIN / "ruff"),
            "check",
            "--no-cache",
            "--output-format",
            "concise",
            "--stdin-filename",
            path,
            "-",
        ],
        input=source,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def _mypy(path: str, source: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    """mypy with the project's configuration on the module at ``path``, its text replaced by
    ``source`` (the cache, shared by the calls of one test, outside the checkout)."""
    return subprocess.run(
        [str(BIN / "mypy"), "--cache-dir", str(cache), "--shadow-file", path, str(source), path],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


BLIND = "def f() -> None:\n    try:\n        pass\n    except Exception:\n        pass\n"
LATE_IMPORT = "def g() -> None:\n    import os\n\n    os.getpid()\n"


@pytest.mark.parametrize(
    "source, code",
    [
        ("import os\n", "F401"),
        (BLIND, "BLE001"),
        (LATE_IMPORT, "PLC0415"),
        ("x = 1  \n", "W291"),
        ("from typing import List\n\nx: List[int] = []\n", "UP035"),
        (f"x = '{'y' * 100}'\n", "E501"),
    ],
)
def test_ruff_flags_a_violation_in_the_kit(source: str, code: str) -> None:
    proc = _ruff("kit/example.py", source)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f" {code} " in proc.stdout, proc.stdout


def test_the_tests_may_catch_everything_and_import_late() -> None:
    assert _ruff("tests/test_example.py", BLIND + "\n\n" + LATE_IMPORT).returncode == 0


def test_mypy_is_strict_on_the_kit_and_checks_every_body_of_conformance(tmp_path: Path) -> None:
    untyped = tmp_path / "untyped.py"
    untyped.write_text("def f(x):\n    return x\n")
    cache = tmp_path / "mypy-cache"
    kit = _mypy("kit/run/rundir.py", untyped, cache)
    assert kit.returncode == 1 and "[no-untyped-def]" in kit.stdout, kit.stdout + kit.stderr
    assert _mypy("conformance/diff.py", untyped, cache).returncode == 0
    # Not strict, but an unannotated function's body is still checked.
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def f(x):\n    n: int = 'text'\n    return n\n")
    conformance = _mypy("conformance/diff.py", wrong, cache)
    assert conformance.returncode == 1 and "[assignment]" in conformance.stdout, (
        conformance.stdout + conformance.stderr
    )
