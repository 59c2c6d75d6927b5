"""A conformance session pays only for what it uses: the plugins it does not use are not
loaded (measured with ``-X importtime``: what a session imports, not how long it takes)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("hypothesis") is None,
    reason="hypothesis is not installed (the kit's test extra)",
)


def _imports(*args: str) -> tuple[set[str], str]:
    """Modules a collect-only conformance session of one requirement imports, and its
    output."""
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "pytest",
            "--engine=reference",
            "--flow=root",
            "-k",
            "ORDER-003",
            "--co",
            "-p",
            "no:cacheprovider",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return modules, proc.stdout


def test_a_session_of_the_suite_never_imports_hypothesis():
    modules, out = _imports()
    assert "hypothesis" not in modules
    assert "plugin hypothesispytest not loaded" in out


@pytest.mark.parametrize("option", ["--hypothesis-seed=1", "-phypothesispytest"])
def test_the_hypothesis_plugin_stays_when_asked_for(option):
    modules, out = _imports(option)
    assert "hypothesis" in modules
    assert "hypothesispytest not loaded" not in out
