"""The master tells exec from death although a monitor reaped the container at once."""

from __future__ import annotations

import os

import pytest

from kit.run.launcher import run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the real backend as root")


@pytest.mark.parametrize("flow", ["root", "suid"])
def test_a_payload_reaped_before_the_start_waiter_looks_was_still_execd(flow):
    # SPEC §7 lets monitor_container reap the container the moment it exits; the start
    # waiter's EOF comes later here (a child of stage 2 holds master_fd), when the
    # container is gone: it was exec'd, so post_start_process runs and no failure.
    result = run("blind_correct:LateEOFEngine", flow, ["/bin/sh", "-c", "exit 7"], hook_timeout=5)
    assert result.exit_code == 7, result
    assert not result.ledger.select("stage2_failed"), result
    assert result.ledger.select("stage2_exec"), result
    assert result.ledger.select("hook_enter", hook="post_start_process"), result


def test_an_exec_that_failed_before_stage_2_died_is_no_exec():
    # The mark is set when exec is called; a failed one is followed by engine code again,
    # which clears it: a stage 2 reaped at once after dying there did not exec.
    result = run("kit_test_engines:LateEOFFailedExecEngine", "root", ["/bin/true"], hook_timeout=5)
    assert not result.ledger.select("stage2_exec"), result
    (failed,) = result.ledger.select("stage2_failed")
    assert failed["message"] == "stage 2 died before exec"
    assert not result.ledger.select("hook_enter", hook="post_start_process")
