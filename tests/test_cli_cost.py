"""A one-shot ``python -m kit run`` imports only what a run uses (issue #17; measured with
``-X importtime``: which modules it imports, not how long they take)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import in_child

from kit.run import environment
from kit.system import linux

ROOT = Path(__file__).resolve().parents[1]
RUN = ("run", "--engine", "reference", "--flow", "root", "--", "/bin/true")


def _run_imports() -> set[str]:
    """Modules a one-shot run of the reference engine imports in the CLI process."""
    # Without the coverage of the kit's own test run: its start-up hook (a .pth file, on
    # when COVERAGE_PROCESS_START is set) imports platform, hashlib and more by itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kit", *RUN],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.fixture(scope="module")
def run_imports() -> set[str]:
    return _run_imports()


@pytest.mark.parametrize(
    "module",
    [
        "importlib.metadata",  # the built-in engines are found without the entry points
        "platform",  # os.uname() tells the machine
        "uuid",  # the container id is 48 random bits from os.urandom
        "_hashlib",  # the host diff's blake2b is hashlib's own, not OpenSSL's
        "subprocess",  # only a zygote or KIT_ZYGOTE=0 starts an interpreter
    ],
)
def test_a_one_shot_run_does_not_import(run_imports, module):
    assert "kit.run.supervisor" in run_imports  # the run was forked from this process
    assert module not in run_imports


def test_the_cli_skips_finalization_but_runs_atexit_handlers_and_flushes_stdout():
    # An object of __main__ is deleted by the interpreter's finalization, which the CLI
    # skips; the atexit handlers (coverage's) still run, and stdout, a pipe here (block
    # buffered without PYTHONUNBUFFERED), still reaches the reader whole.
    script = (
        "import atexit, os, runpy, sys\n"
        "class Finalized:\n"
        "    def __del__(self, write=os.write):\n"
        "        write(2, b'finalized\\n')\n"
        "keep = Finalized()\n"
        "atexit.register(sys.stderr.write, 'atexit ran\\n')\n"
        "sys.argv = ['kit', 'flows']\n"
        "runpy.run_module('kit', run_name='__main__', alter_sys=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "atexit ran\n"
    flows = [line.split()[0] for line in proc.stdout.split("\n\n")[0].splitlines()]
    assert flows == ["root", "suid", "hybrid", "userns", "fakeroot"]


def test_the_cli_exits_with_the_payloads_code():
    proc = subprocess.run(
        [sys.executable, "-m", "kit", *RUN[:-1], "/bin/sh", "-c", "exit 7"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 7, proc.stderr


NS_FILES = ("mnt", "uts", "ipc", "net", "pid_for_children")


def _own_namespaces() -> dict[str, int]:
    return {k: os.stat(f"/proc/thread-self/ns/{k}").st_ino for k in NS_FILES}


@pytest.mark.skipif(os.geteuid() != 0, reason="the root flow is probed as root")
def test_the_clis_root_flow_probe_forks_nothing_and_leaves_its_thread_as_it_was():
    # A fork would write-protect every page of the CLI (each written again then faults). In
    # a forked child: no thread of the pytest process may change namespace.
    def probe() -> list[Any]:
        def no_fork() -> int:
            raise AssertionError("the probe forked")

        before = _own_namespaces()
        environment.probe_in_threads()  # as kit run does
        os.fork = no_fork
        kinds = ["mount", "uts", "ipc", "net", "pid"]
        return [environment._probe("root", None, None, kinds, False), _own_namespaces() == before]

    assert in_child(probe) == {"ok": [[True, ""], True]}


def test_a_probe_that_cannot_unshare_says_why(monkeypatch):
    def refused(flags: int) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(linux, "unshare", refused)
    assert environment._probe("root", None, None, ["mount", "net"], False) == (
        False,
        "root: unshare(mount, net) failed: Operation not permitted",
    )


def _counting_forks() -> list[int]:
    """Count this (throwaway) process's os.fork calls from now on: one item per fork."""
    forks: list[int] = []
    fork = os.fork

    def counted() -> int:
        forks.append(1)
        return fork()

    os.fork = counted
    return forks


@pytest.mark.skipif(os.geteuid() != 0, reason="the run's preload primes as root")
def test_kit_runs_preflight_and_preload_share_one_inspection_child():
    # kit run inspects the engine (preflight) and then preloads the run, which asks the
    # same question: the engine's import, as U, in a child of the CLI. One child, not two.
    def both() -> list[int]:
        from kit import preflight
        from kit.run import supervisor
        from kit.run.launcher import make_request

        forks = _counting_forks()
        assert preflight.check("reference", {}) == []
        after_check = len(forks)
        supervisor.preload(make_request("reference", "root", ["/bin/true"]))
        return [after_check, len(forks)]

    assert in_child(both) == {"ok": [1, 1]}


def test_an_engine_not_found_is_inspected_again():
    def twice() -> list[Any]:
        from kit import preflight

        forks = _counting_forks()
        first = preflight.check("no-such-engine-of-kit-tests")
        again = preflight.found("no-such-engine-of-kit-tests")
        return [first[0].hook, again.failure, len(forks)]

    assert in_child(twice) == {"ok": ["registration", "registry", 2]}
