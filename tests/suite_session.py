"""One conformance session in a subprocess, for the kit's tests: its output and JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def suite(engine: str, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the suite against ``engine`` (extra pytest ``args``) from ``tmp_path``; the checkout
    and tests/ are on the import path (test engines, the mutant zoo)."""
    report = tmp_path / "conformance.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "tests")))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            f"--engine={engine}",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--conformance-report={report}",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(report.read_text())
