"""The starter's cheaper steps behave as the ones they replace: sentinel, signals, config types."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field

from conftest import exit_code_in_child

from kit.contract import FIELD_TYPES, EngineConfig, field_types
from kit.run.launcher import start
from kit.starter.common import default_signals, exiting_child
from kit.starter.stage1 import resolve_config_types


def test_the_exiting_child_exits_zero_and_is_a_child_of_its_caller():
    pid = exiting_child()
    assert pid > 0 and pid != os.getpid()
    found = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    assert found is not None and found.si_pid == pid and found.si_code == os.CLD_EXITED
    assert os.waitpid(pid, 0) == (pid, 0)


def test_the_exiting_child_leaves_the_signal_mask_and_pending_signals_alone():
    def body() -> int:
        signal.pthread_sigmask(signal.SIG_SETMASK, {signal.SIGUSR1})
        os.kill(os.getpid(), signal.SIGUSR1)  # pending: blocked
        pid = exiting_child()
        os.waitpid(pid, 0)
        if signal.pthread_sigmask(signal.SIG_BLOCK, ()) != {signal.SIGUSR1}:
            return 2
        if signal.SIGUSR1 not in signal.sigpending():
            return 3
        return 0

    assert exit_code_in_child(body) == 0


def test_default_signals_undoes_ignored_signals_and_the_mask():
    def body() -> int:
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGCHLD})
        default_signals()
        if signal.getsignal(signal.SIGHUP) != signal.SIG_DFL:
            return 2
        if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            return 3
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return 4
        if signal.pthread_sigmask(signal.SIG_BLOCK, ()):
            return 5
        if signal.getsignal(signal.SIGPIPE) != signal.SIG_IGN:
            return 6  # CPython's own, kept until the exec
        default_signals(for_exec=True)
        if signal.getsignal(signal.SIGPIPE) != signal.SIG_DFL:
            return 7
        return 0

    assert exit_code_in_child(body) == 0


@dataclass
class _Inner(EngineConfig):
    depth: int = 0


@dataclass
class _Outer(EngineConfig):
    inner: _Inner = field(default_factory=_Inner)
    names: list[str] = field(default_factory=list)


def test_field_types_are_resolved_once_and_still_checked():
    assert field_types(_Outer) is field_types(_Outer)
    cfg = _Outer.from_json({"inner": {"depth": 2}, "names": ["a"]})
    assert cfg.inner.depth == 2 and cfg.names == ["a"]
    try:
        _Outer.from_json({"names": [1]})
    except ValueError as exc:
        assert "names[0]" in str(exc)
    else:
        raise AssertionError("a wrong type passed")


def test_resolving_the_engines_config_types_fills_the_cache():
    from reference_engines.minimal.engine import ReferenceConfig

    FIELD_TYPES.pop(ReferenceConfig, None)
    resolve_config_types("reference")
    assert ReferenceConfig in FIELD_TYPES
    assert field_types(ReferenceConfig) is FIELD_TYPES[ReferenceConfig]


def test_the_config_types_reach_the_run_resolved_by_the_starter(shared_dir):
    # Resolving evaluates the engine's annotations (engine code): the starter does it where
    # it imports the engine, in the run's sandbox, and every later process of the run
    # inherits the result; none of them evaluates them again, and the zygote (which judges
    # nothing of the engine's) never does.
    report = os.path.join(shared_dir, "resolved")
    result = start(
        "kit_test_engines:WhereEngine",
        "root",
        ["/bin/true"],
        shared_dirs=[shared_dir],
        engine_config={"mount_tmp": False, "report": report},
    ).wait()
    assert result.exit_code == 0, result.reason
    with open(report) as f:
        assert json.load(f) == ["kit-starter"]
