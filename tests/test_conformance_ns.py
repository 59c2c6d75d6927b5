"""The namespace, order and flow checks (SPEC §2, §3, §5) fed the violations blind engines made."""

from __future__ import annotations

from test_conformance_units import CONTAINER_NS, HOST_NS, G, U, hook, make_run, snapshot

from conformance import checks, requirements
from conformance import expectations as X
from conformance.scenario import SCENARIOS, fault_scenario
from kit.run import sandbox


def _cleanup(caller: str | None, fatal: object) -> dict:
    extra = {"caller": caller} if caller else {}
    return hook(
        "hook_enter",
        "master",
        "cleanup_container",
        snapshot(uid=(0, 0, 0, 0)),
        args={"fatal": fatal, "status": 9},
        **extra,
    )


def _create_failed_run(*cleanups: dict):
    snap = snapshot(uid=(0, 0, 0, 0))
    fatal = {"type": "InjectedFault", "message": "container creation failed: injected"}
    return make_run(
        "root",
        [
            hook("hook_enter", "master", "create_container", snap),
            hook("hook_raise", "master", "create_container", snap),
            {"kind": "fatal", "role": "master", "message": fatal["message"]},
            *[
                c if c.get("caller") else {**c, "args": {"fatal": fatal, "status": 9}}
                for c in cleanups
            ],
        ],
        exit_code=255,
        scenario=fault_scenario("ERR-002"),
    )


def test_a_cleanup_the_engine_calls_itself_breaks_order_011_in_a_failed_run():
    run = _create_failed_run(_cleanup("engine", None), _cleanup(None, None))
    verify = checks.Verifier("root", ["ORDER-011"], "t")
    checks.check_rules(verify, run, only=(X.Count,))
    (violation,) = verify.violations["ORDER-011"]
    assert violation.observed.startswith("2 recorded")


def test_the_kit_error_path_judges_only_the_kits_own_cleanup_call():
    # The engine's extra call (fatal None, first) is ORDER-011's, not the kit's ERR-002.
    run = _create_failed_run(_cleanup("engine", None), _cleanup(None, None))
    verify = checks.Verifier("root", ["ERR-002"], "t")
    checks.check_error_path(verify, run)
    assert not verify.violations.get("ERR-002"), verify.render("ERR-002")


def _stage2_with_maps(flow: str, uid_map, gid_map):
    snap = {**snapshot(uid=(U, U, U, U)), "uid_map": uid_map, "gid_map": gid_map}
    return make_run(flow, [hook("hook_enter", "stage2", "start_process", snap)])


def test_a_gid_map_of_the_wrong_flow_breaks_ns_006():
    good = _stage2_with_maps("userns", [[U, U, 1]], [[G, G, 1]])
    bad = _stage2_with_maps("userns", [[U, U, 1]], [[0, G, 1]])
    verify = checks.Verifier("userns", ["NS-006"], "t")
    checks.check_user_ns_map(verify, good)
    assert not verify.violations.get("NS-006")
    checks.check_user_ns_map(verify, bad)
    (violation,) = verify.violations["NS-006"]
    assert violation.observed == f"gid_map [[0, {G}, 1]]"
    fakeroot = checks.Verifier("fakeroot", ["NS-006"], "t")
    checks.check_user_ns_map(fakeroot, _stage2_with_maps("fakeroot", [[0, U, 1]], [[G, G, 1]]))
    assert len(fakeroot.violations["NS-006"]) == 1


def test_a_user_namespace_asked_for_in_the_root_flow_is_the_engines_ns_004_failure():
    # The starter accepts a user namespace in the root flow (SPEC §5 rejects one only in
    # suid without hybrid) and the master joins it: the engine broke NS-004, not the kit.
    assert requirements.CATALOGUE["NS-004"].subject == requirements.ENGINE
    root = snapshot(uid=(0, 0, 0, 0))
    inside = {**root, "ns": {**HOST_NS, "user": CONTAINER_NS["user"]}}
    container = {**root, "ns": dict(CONTAINER_NS)}
    run = make_run(
        "root",
        [
            hook("hook_enter", "stage1", "prepare_config", root),
            {"kind": "starter_config", "role": "starter", "config": {"requests": {}}},
            hook("hook_enter", "master", "create_container", inside),
            hook("hook_enter", "stage2", "start_process", container),
        ],
    )
    verify = checks.Verifier("root", ["NS-004"], "t")
    checks.check_master_user_ns(verify, run)
    (violation,) = verify.violations["NS-004"]
    assert violation.observed.startswith(f"user namespace {CONTAINER_NS['user']}")


def test_the_join_scenario_asks_for_every_kind_a_run_may_be_given_to_join():
    # A kind the scenario never asks for is one an engine may drop unseen (JOIN-002).
    assert set(SCENARIOS["join"].join_kinds) == set(sandbox.JOIN_KINDS)


def test_a_join_the_starter_config_dropped_breaks_join_002():
    root = snapshot(uid=(0, 0, 0, 0))
    joined = {**root, "ns": {**HOST_NS, "uts": 7, "ipc": 8}}  # net left the host's
    run = make_run(
        "root",
        [
            hook("hook_enter", "stage1", "prepare_config", root),
            {
                "kind": "starter_config",
                "role": "starter",
                "config": {"requests": {"ns_paths": {"uts": "/u", "ipc": "/i"}}},
            },
            hook("hook_enter", "stage2", "start_process", joined),
        ],
        scenario="join",
    )
    run.notes = {"targets": {"uts": 7, "ipc": 8, "net": 9}, "paths": {"net": "/n"}}
    verify = checks.Verifier("root", ["JOIN-002"], "t")
    checks.check_requested_namespaces(verify, run)
    (violation,) = verify.violations["JOIN-002"]
    assert "does not join net" in violation.observed


def _fds_run(payload_ns: dict[str, int]):
    snap = snapshot(uid=(0, 0, 0, 0), ns=CONTAINER_NS)
    run = make_run("root", [hook("hook_enter", "stage2", "start_process", snap)], scenario="fds")
    links = {"mount": "mnt"}
    run.result.stdout = "fd 0 /dev/null\n" + "".join(
        f"ns {links.get(k, k)} {ino}\n" for k, ino in payload_ns.items()
    )
    return run


def test_a_payload_in_a_namespace_start_process_made_breaks_ns_013():
    verify = checks.Verifier("root", ["NS-013"], "t")
    checks.check_payload_namespaces(verify, _fds_run(CONTAINER_NS))
    assert not verify.violations.get("NS-013")
    checks.check_payload_namespaces(verify, _fds_run({**CONTAINER_NS, "cgroup": 5}))
    (violation,) = verify.violations["NS-013"]
    assert violation.observed == f"different: cgroup 5 (stage 2: {CONTAINER_NS['cgroup']})"


def test_a_post_start_the_engine_calls_itself_is_order_009s_not_the_kits():
    snap = snapshot(uid=(0, 0, 0, 0))
    events = [
        hook("hook_enter", "master", "create_container", snap, tid=10),
        hook("hook_raise", "master", "create_container", snap, tid=10),
        hook("hook_enter", "master", "monitor_container", snap, tid=12),
        hook("hook_enter", "master", "post_start_process", snap, tid=12, caller="engine"),
        {"kind": "fatal", "role": "master", "message": "container creation failed: x"},
        hook(
            "hook_enter",
            "master",
            "cleanup_container",
            snap,
            args={"fatal": {"message": "container creation failed: x"}, "status": 9},
        ),
    ]
    run = make_run("root", events, exit_code=255, scenario=fault_scenario("ERR-002"))
    order = checks.Verifier("root", ["ORDER-009"], "t")
    checks.check_rules(order, run)
    assert "no stage2_exec was recorded" in order.violations["ORDER-009"][0].observed
    kit = checks.Verifier("root", ["ERR-002"], "t")
    checks.check_error_path(kit, run)
    assert not kit.violations.get("ERR-002"), kit.render("ERR-002")
    # The kit ran create_container and monitor_container in threads of their own; the
    # engine's own post_start_process call in the monitor's thread is not the kit's.
    rule = checks.order_rule_for(X.rules_for("ORDER-006")[0])
    assert [f.problem for f in rule.check(run.events)] == [None]


def test_the_kits_pid_and_flag_rules_judge_only_the_hook_calls_the_kit_made():
    snap = snapshot(uid=(0, 0, 0, 0))
    run = make_run(
        "root",
        [
            {"kind": "container_start", "role": "starter", "container_pid": 42},
            hook("hook_enter", "master", "init_config", snap, args={"privileged_stage1": False}),
            hook("hook_enter", "master", "monitor_container", snap, args={"pid": 42}),
            # the engine's own calls, with values of its choosing
            hook(
                "hook_enter",
                "master",
                "init_config",
                snap,
                args={"privileged_stage1": True},
                caller="engine",
            ),
            hook(
                "hook_enter",
                "master",
                "post_start_process",
                snap,
                args={"pid": 7},
                caller="engine",
            ),
        ],
    )
    for req, check in (
        ("PID-001", checks.check_master_pids),
        ("ORDER-002", checks.check_init_flag),
    ):
        verify = checks.Verifier("root", [req], "t")
        check(verify, run)
        assert not verify.violations.get(req), verify.render(req)
        assert verify.checks[req] == 1
