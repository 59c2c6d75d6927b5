"""The master survives what engine code does to its descriptors, signals and channels."""

from __future__ import annotations

import os

import pytest

from kit.run.launcher import RunResult, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the real backend as root")

FAULT = "kit_test_engines:FaultEngine"
#: Small limits: every run here must end by itself well before them.
LIMITS = {"hook_timeout": 10, "run_timeout": 60}


def fault_run(engine: str = FAULT, argv: list[str] | None = None, **cfg: object) -> RunResult:
    result = run(
        engine,
        "root",
        argv or ["/bin/true"],
        engine_config={"mount_tmp": False, **cfg},
        **LIMITS,
    )
    assert result.timed_out is None, result
    assert result.events[-1]["kind"] == "exit", result
    return result


@pytest.mark.parametrize("action", ["exit", "segv"])
def test_stage2_dying_in_init_config_is_no_exec(action):
    # Stage 2 is still named kit-container when its init_config runs: a death there is a
    # death before exec, not a payload that ran.
    result = fault_run(fault_hook="init_config", fault_role="stage2", fault_action=action)
    assert not result.ledger.select("stage2_exec"), result
    (failed,) = result.ledger.select("stage2_failed")
    assert failed["message"] == "stage 2 died before exec"
    assert not result.ledger.select("hook_enter", hook="post_start_process")
