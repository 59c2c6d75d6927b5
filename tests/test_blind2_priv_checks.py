"""Checks and StarterConfig validation widened after round-2 blind privilege engines."""

from __future__ import annotations

import pytest
from test_conformance_units import G, hook, make_run, snapshot

from conformance import checks
from conformance.scenario import SCENARIOS
from kit.contract import ConfigError
from kit.starter.config import StarterConfig

ROOT_CAPS = ("CAP_CHOWN", "CAP_SYS_ADMIN")
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_KEEP_CAPS = 1 << 4


def _payload_stdout(securebits: int | None) -> str:
    """What the fds payload prints for a root payload with ROOT_CAPS: its securebits line
    (when given), /proc/self/status and uid_map."""
    mask = f"{(1 << 0) | (1 << 21):016x}"  # CAP_CHOWN, CAP_SYS_ADMIN
    out = "fd 0 /dev/null\nfd 1 pipe:[7]\nfd 2 pipe:[7]\nns uts 4026531838\n"
    if securebits is not None:
        out += f"securebits {securebits}\n"
    return out + (
        f"Name:\tpython3\nPid:\t1\nUid:\t0\t0\t0\t0\nGid:\t{G}\t{G}\t{G}\t{G}\nGroups:\t\n"
        f"NoNewPrivs:\t0\nSeccomp:\t0\nCapInh:\t0000000000000000\nCapPrm:\t{mask}\n"
        f"CapEff:\t{mask}\nCapBnd:\t{mask}\nCapAmb:\t0000000000000000\n"
        "         0          0 4294967295\n"
    )


def _fds_run(stage2_securebits: int, payload_securebits: int | None):
    stage2 = snapshot(uid=(0, 0, 0, 0), eff=ROOT_CAPS, prm=ROOT_CAPS, bnd=ROOT_CAPS)
    stage2["securebits"] = stage2_securebits
    run = make_run("root", [hook("hook_enter", "stage2", "start_process", stage2)], scenario="fds")
    run.result.stdout = _payload_stdout(payload_securebits)
    return run


def test_the_fds_payload_reports_its_securebits_and_its_status():
    # the payload's securebits are nowhere in /proc/self/status: it prints them itself
    script = SCENARIOS["fds"].argv[-1]
    assert "prctl(27" in script and "'status'" in script
    snap = checks.parse_payload_status(_payload_stdout(5))
    assert snap is not None and snap["securebits"] == 5
    assert snap["threads"][0]["caps"]["permitted"] == list(ROOT_CAPS)
    assert checks.parse_payload_status(_payload_stdout(None))["securebits"] is None


def test_a_securebit_start_process_sets_breaks_priv_payload_003():
    # blind2-start-process-no-setuid-fixup: the bit changes no capability set at exec, only
    # the securebits show it
    verify = checks.Verifier("root", ["PRIV-PAYLOAD-003"], "t")
    checks.check_payload(verify, _fds_run(0, SECBIT_NO_SETUID_FIXUP))
    (violation,) = verify.violations["PRIV-PAYLOAD-003"]
    assert "securebits 0x4 (exec gives 0x0" in violation.observed


def test_exec_clears_only_keep_caps_from_the_securebits():
    for stage2_bits, payload_bits in (
        (SECBIT_KEEP_CAPS, 0),
        (SECBIT_NO_SETUID_FIXUP | SECBIT_KEEP_CAPS, SECBIT_NO_SETUID_FIXUP),
    ):
        verify = checks.Verifier("root", ["PRIV-PAYLOAD-003"], "t")
        checks.check_payload(verify, _fds_run(stage2_bits, payload_bits))
        assert not verify.violations.get("PRIV-PAYLOAD-003"), (stage2_bits, payload_bits)
    verify = checks.Verifier("root", ["PRIV-PAYLOAD-003"], "t")
    checks.check_payload(verify, _fds_run(SECBIT_KEEP_CAPS, SECBIT_KEEP_CAPS))
    assert verify.violations["PRIV-PAYLOAD-003"]  # exec would have cleared it


def test_an_fds_payload_that_does_not_report_its_securebits_is_not_passed():
    verify = checks.Verifier("root", ["PRIV-PAYLOAD-003"], "t")
    checks.check_payload(verify, _fds_run(0, None))
    (violation,) = verify.violations["PRIV-PAYLOAD-003"]
    assert "its securebits" in violation.expected


# --- StarterConfig: maps the kernel would refuse once the namespace exists -----------------


def _hybrid(uid_maps, gid_maps):
    sc = StarterConfig("hybrid", 1000, 1001)
    sc.set_ns_flags(["user", "mount", "pid"])
    sc.set_hybrid_workflow()
    sc.add_uid_mappings(uid_maps)
    sc.add_gid_mappings(gid_maps)
    return sc


def test_a_hybrid_map_without_the_invoking_user_is_refused_before_any_namespace():
    # blind2 round: a gid map of the container's 0 to the host's 0 failed later, at the
    # container's namespace setup, with a bare EINVAL that named no setting
    _hybrid([(0, 1000, 1)], [(0, 1001, 1)]).validate()
    _hybrid([(0, 1000, 1)], [(0, 1001, 1), (1, 1, 100)]).validate()  # NS-012's to judge
    with pytest.raises(ConfigError, match=r"^add_gid_mappings: .* gid 1001 .*\[\[0, 0, 1\]\]"):
        _hybrid([(0, 1000, 1)], [(0, 0, 1)]).validate()
    with pytest.raises(ConfigError, match=r"^add_uid_mappings: .* uid 1000"):
        _hybrid([(0, 0, 1)], [(0, 1001, 1)]).validate()
