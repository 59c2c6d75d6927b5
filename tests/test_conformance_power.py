"""The checks over the whole domain of their SPEC sentence (issue 14), fed violations."""

from __future__ import annotations

from dataclasses import dataclass, field

from test_conformance_units import G, U, hook, make_run, snapshot

from conformance import checks


def _with_helper(snap, **changes):
    """``snap`` plus a second thread named ``helper`` (tid 11) with ``changes``."""
    helper = {**snap["threads"][0], "tid": 11, "name": "helper"}
    for key, value in changes.items():
        if key in ("effective", "permitted", "inheritable", "bounding", "ambient"):
            helper["caps"] = {**helper["caps"], key: list(value)}
        else:
            helper[key] = value
    return {**snap, "threads": [snap["threads"][0], helper]}


def test_a_master_helper_thread_with_effective_capabilities_breaks_priv_master_002():
    clean = snapshot(uid=(U, U, 0, U), prm=("CAP_SYS_ADMIN",))
    run = make_run(
        "suid",
        [
            hook(
                "hook_enter",
                "master",
                "create_container",
                clean,
                tid=10,
                escalation={"host_escalation": True},
            ),
            hook(
                "hook_return",
                "master",
                "create_container",
                _with_helper(clean, effective=["CAP_SYS_ADMIN"]),
                tid=10,
            ),
        ],
    )
    verify = checks.Verifier("suid", ["PRIV-MASTER-002"], "t")
    checks.check_privileges(verify, run)
    (violation,) = verify.violations["PRIV-MASTER-002"]
    assert violation.observed.startswith("thread 11 ('helper'): effective [CAP_SYS_ADMIN]")


def _rpc_call(before, after, method="reference.mkdir", tid=10):
    return {
        "kind": "rpc_call",
        "role": "rpc",
        "method": method,
        "tid": tid,
        "ok": True,
        "creds": {"before": before, "after": after},
    }


def _creds(snap):
    me = snap["threads"][0]
    return {
        **{k: me[k] for k in ("uid", "gid", "groups", "caps", "no_new_privs", "seccomp")},
        "root": [1, 2],
        "threads": snap["threads"],
        "uid_map": snap["uid_map"],
        "securebits": snap["securebits"],
    }


def test_a_thread_with_euid_0_after_an_rpc_method_breaks_priv_rpc_001():
    server = snapshot(uid=(U, U, 0, U), eff=("CAP_SYS_ADMIN",), prm=("CAP_SYS_ADMIN",))
    after = _with_helper(server, uid=[U, 0, 0, 0])
    run = make_run(
        "suid",
        [
            hook("hook_enter", "rpc", "config", server),
            hook("hook_return", "rpc", "config", server),
            _rpc_call(_creds(server), _creds(server)),
            _rpc_call(_creds(server), _creds(after), method="reference.mount"),
        ],
    )
    verify = checks.Verifier("suid", ["PRIV-RPC-001"], "t")
    checks.check_privileges(verify, run)
    assert verify.checks["PRIV-RPC-001"] == 6  # two hooks, two methods × entry and return
    (violation,) = verify.violations["PRIV-RPC-001"]
    assert violation.event["kind"] == "rpc_method_return"
    assert violation.event["method"] == "reference.mount"
    assert "thread 11 ('helper')" in violation.observed


def test_a_creds_record_without_every_thread_is_not_taken_as_the_whole_process():
    server = snapshot(uid=(U, U, 0, U), eff=("CAP_SYS_ADMIN",), prm=("CAP_SYS_ADMIN",))
    partial = {k: v for k, v in _creds(server).items() if k not in ("threads", "uid_map")}
    run = make_run("suid", [_rpc_call(partial, partial)])
    assert checks.method_events(run) == []


def test_an_rpc_method_that_leaves_any_field_of_the_credential_changed_breaks_priv_rpc_004():
    server = snapshot(uid=(0, 0, 0, 0))
    for changed, seen in (
        (dict(uid=[0, 0, 0, 65534]), "uid [0, 0, 0, 0] -> [0, 0, 0, 65534]"),
        (dict(groups=[27]), "groups [] -> [27]"),
        (dict(ambient=["CAP_CHOWN"]), "caps.ambient [] -> [CAP_CHOWN]"),
        (dict(no_new_privs=True), "no_new_privs False -> True"),
        (dict(seccomp=2), "seccomp 0 -> 2"),
    ):
        after = _with_helper(server)
        thread = {**after["threads"][0]}
        for key, value in changed.items():
            if key == "ambient":
                thread["caps"] = {**thread["caps"], "ambient": value}
            else:
                thread[key] = value
        after = {**after, "threads": [thread, after["threads"][1]]}
        run = make_run("root", [_rpc_call(_creds(_with_helper(server)), _creds(after))])
        verify = checks.Verifier("root", ["PRIV-RPC-004"], "t")
        checks.check_rpc_methods_restore_credentials(verify, run)
        (violation,) = verify.violations["PRIV-RPC-004"]
        assert violation.observed == f"thread 10 ('serving the method'): {seen}", changed
    run = make_run("root", [_rpc_call(_creds(server), _creds(server))])
    verify = checks.Verifier("root", ["PRIV-RPC-004"], "t")
    checks.check_rpc_methods_restore_credentials(verify, run)
    assert verify.checks["PRIV-RPC-004"] == 2 and not verify.violations["PRIV-RPC-004"]


def test_a_thread_an_rpc_method_leaves_with_more_than_it_entered_with_breaks_priv_rpc_004():
    # The method's worker (tid 11) did not exist when it started: compared with what the
    # method's own thread had then, more privilege by any field is a violation, less none.
    server = snapshot(uid=(U, U, 0, U), eff=("CAP_SYS_ADMIN",), prm=("CAP_SYS_ADMIN", "CAP_CHOWN"))
    for changed, seen in (
        (dict(inheritable=["CAP_CHOWN"]), "inheritable capabilities [CAP_CHOWN]"),
        (dict(ambient=["CAP_CHOWN"]), "ambient capabilities [CAP_CHOWN]"),
        (dict(uid=[0, U, 0, U]), f"uid [0, {U}, 0, {U}] (0 where it was [{U}, {U}, 0, {U}])"),
        (dict(groups=[0]), "groups [0]"),
    ):
        run = make_run("suid", [_rpc_call(_creds(server), _creds(_with_helper(server, **changed)))])
        verify = checks.Verifier("suid", ["PRIV-RPC-004"], "t")
        checks.check_rpc_methods_restore_credentials(verify, run)
        (violation,) = verify.violations["PRIV-RPC-004"]
        assert violation.observed == f"thread 11 ('helper'): {seen}", changed
    # root's threads hold every capability already: nothing to gain
    root = snapshot(uid=(0, 0, 0, 0))
    run = make_run("root", [_rpc_call(_creds(root), _creds(_with_helper(root, ambient=["X"])))])
    verify = checks.Verifier("root", ["PRIV-RPC-004"], "t")
    checks.check_rpc_methods_restore_credentials(verify, run)
    assert not verify.violations["PRIV-RPC-004"]
    for fewer in (dict(effective=[]), dict(permitted=["CAP_SYS_ADMIN"]), dict(uid=[U] * 4)):
        run = make_run("suid", [_rpc_call(_creds(server), _creds(_with_helper(server, **fewer)))])
        verify = checks.Verifier("suid", ["PRIV-RPC-004"], "t")
        checks.check_rpc_methods_restore_credentials(verify, run)
        assert not verify.violations["PRIV-RPC-004"], fewer


def test_an_rpc_call_whose_credentials_were_taken_out_breaks_priv_rpc_004():
    """The kit records both sides of every answered request, a refused one's too: a call
    without them had its record removed by code in the RPC server's process."""
    server = _creds(snapshot(uid=(0, 0, 0, 0)))
    for creds, side in (
        (None, "before"),
        ({"before": None, "after": None}, "before"),
        ({"before": server, "after": None}, "after"),
        ({"after": server}, "before"),
    ):
        call = _rpc_call(server, server, method="x.mount")
        call["creds"] = creds
        verify = checks.Verifier("root", ["PRIV-RPC-004"], "t")
        checks.check_rpc_methods_restore_credentials(verify, make_run("root", [call]))
        (violation,) = verify.violations["PRIV-RPC-004"]
        assert violation.observed.startswith(f"no credentials recorded for {side} the method")
        assert violation.observed.endswith("engine code in the RPC server removed the kit's record")
        assert "x.mount" in violation.expected
    # the kit's own read failed: said so, not blamed on the engine
    call = _rpc_call(server, None, method="x.mount")
    call["creds"]["unread"] = "the kit's read failed: OSError: gone"
    verify = checks.Verifier("root", ["PRIV-RPC-004"], "t")
    checks.check_rpc_methods_restore_credentials(verify, make_run("root", [call]))
    (violation,) = verify.violations["PRIV-RPC-004"]
    assert violation.observed.endswith("the method: the kit's read failed: OSError: gone")


def test_a_method_that_renumbers_threads_is_still_compared_on_its_serving_thread():
    """A method that mounts a new /proc changes the tids the records use: the serving
    thread's own fields are compared all the same (mutant-rpc-method-keeps-caps)."""
    server = snapshot(uid=(U, U, 0, U), eff=("CAP_SYS_ADMIN",), prm=("CAP_SYS_ADMIN", "CAP_CHOWN"))
    raised = snapshot(
        uid=(U, U, 0, U),
        eff=("CAP_CHOWN", "CAP_SYS_ADMIN"),
        prm=("CAP_SYS_ADMIN", "CAP_CHOWN"),
        tid=2,
    )
    run = make_run("suid", [_rpc_call(_creds(server), _creds(raised), method="x.mount")])
    verify = checks.Verifier("suid", ["PRIV-RPC-004"], "t")
    checks.check_rpc_methods_restore_credentials(verify, run)
    (violation,) = verify.violations["PRIV-RPC-004"]
    assert violation.observed == (
        "thread 10 ('serving the method'): caps.effective "
        "[CAP_SYS_ADMIN] -> [CAP_CHOWN, CAP_SYS_ADMIN]"
    )


def _thread(
    uid=(U, U, U, U),
    gid=(G, G, G, G),
    groups=(),
    inh=(),
    prm=(),
    eff=(),
    amb=(),
    bnd=("CAP_CHOWN", "CAP_KILL"),
    nnp=False,
    seccomp=0,
):
    return {
        "tid": 1,
        "uid": list(uid),
        "gid": list(gid),
        "groups": list(groups),
        "caps": {
            "effective": list(eff),
            "permitted": list(prm),
            "inheritable": list(inh),
            "bounding": list(bnd),
            "ambient": list(amb),
        },
        "no_new_privs": nnp,
        "seccomp": seccomp,
    }


def test_exec_derives_the_payload_credential_from_stage_2s():
    root = _thread(uid=(0, 0, 0, 0), gid=(0, 0, 0, 0), prm=("CAP_CHOWN",), eff=("CAP_CHOWN",))
    payload = _thread(
        uid=(0, 0, 0, 0),
        gid=(0, 0, 0, 0),
        prm=("CAP_CHOWN", "CAP_KILL"),
        eff=("CAP_CHOWN", "CAP_KILL"),
    )
    assert checks.exec_changes(root, payload, 0) == []  # root: permitted = bounding at exec
    assert checks.exec_changes(root, payload, 1) != []  # SECBIT_NOROOT: nothing from root
    user = _thread(uid=(U, U, 0, 7), prm=("CAP_KILL",))
    assert checks.exec_changes(user, _thread(), 0) == []  # saved and fs uid become U


def test_start_process_changing_any_part_of_the_credential_breaks_priv_payload_003():
    stage2 = _thread()
    for payload, seen in (
        (_thread(groups=(27,)), "groups [27]"),
        (_thread(gid=(G, 0, 0, 0)), "gid"),
        (_thread(nnp=True), "no_new_privs True"),
        (_thread(seccomp=2), "seccomp 2"),
        (
            _thread(amb=("CAP_KILL",), prm=("CAP_KILL",), eff=("CAP_KILL",)),
            "ambient capabilities [CAP_KILL]",
        ),
    ):
        changes = checks.exec_changes(stage2, payload, 0)
        assert changes and any(c.startswith(seen) for c in changes), (seen, changes)


@dataclass
class _Inner:
    items: list[int] = field(default_factory=list)


_SHARED: list[int] = []


@dataclass
class _Config:
    name: str = "x"
    nested: dict[str, tuple[_Inner, ...]] = field(default_factory=dict)


def test_a_mutable_object_shared_at_any_depth_is_found_with_its_path():
    first, second = (
        _Config(nested={"a": (_Inner(_SHARED),)}),
        _Config(nested={"a": (_Inner(_SHARED),)}),
    )
    mine = {id(obj) for _, obj in checks.mutable_parts(first)}
    shared = [path for path, obj in checks.mutable_parts(second) if id(obj) in mine]
    assert shared == ["config.nested['a'][0].items"]
    fresh = _Config(nested={"a": (_Inner([]),)})
    assert not [p for p, o in checks.mutable_parts(fresh) if id(o) in mine]
    assert [p for p, _ in checks.mutable_parts(fresh)] == [
        "config",
        "config.nested",
        "config.nested['a'][0]",
        "config.nested['a'][0].items",
    ]


def test_a_changed_fs_uid_breaks_a_uid_rule_on_that_thread():
    server = snapshot(uid=(U, U, 0, U), eff=("CAP_SYS_ADMIN",), prm=("CAP_SYS_ADMIN",))
    run = make_run(
        "suid",
        [
            hook("hook_enter", "rpc", "config", server),
            hook("hook_return", "rpc", "config", _with_helper(server, uid=[U, U, 0, 0])),
        ],
    )
    verify = checks.Verifier("suid", ["PRIV-RPC-001"], "t")
    checks.check_privileges(verify, run)
    (violation,) = verify.violations["PRIV-RPC-001"]
    assert violation.expected == f"effective uid U ({U}), fs uid U ({U}) in every thread"
    assert violation.observed.startswith(
        f"thread 11 ('helper'): uid real/effective/saved/fs [{U}, {U}, 0, 0]"
    )


def test_an_rpc_thread_in_a_namespace_of_its_own_breaks_ns_001():
    from test_conformance_units import CONTAINER_NS

    stage2 = snapshot(uid=(0, 0, 0, 0), ns=CONTAINER_NS)
    server = snapshot(uid=(0, 0, 0, 0), ns=CONTAINER_NS)
    server["threads"][0]["ns"] = dict(CONTAINER_NS)
    own_uts = _with_helper(server, ns={**CONTAINER_NS, "uts": 4026539999})
    run = make_run(
        "root",
        [
            hook("hook_enter", "rpc", "config", server),
            _rpc_call(_creds(server), _creds(own_uts)),
            hook("hook_enter", "stage2", "start_process", stage2),
        ],
    )
    verify = checks.Verifier("root", ["NS-001"], "t")
    checks.check_rpc_shares_namespaces(verify, run)
    assert verify.checks["NS-001"] == 3  # the hook, the method's entry and return
    (violation,) = verify.violations["NS-001"]
    assert violation.event["kind"] == "rpc_method_return"
    assert violation.observed == (
        f"different: thread 11 ('helper'): uts 4026539999 (stage 2: {CONTAINER_NS['uts']})"
    )


def test_thread_setfsuid_changes_the_calling_thread_only():
    import os
    import threading

    from kit.system import linux

    if os.geteuid() != 0:
        import pytest

        pytest.skip("setfsuid to another uid needs CAP_SETUID")
    seen: list[str] = []

    def change() -> None:
        linux.thread_setfsuid(65534)
        with open("/proc/thread-self/status") as f:
            seen.append(next(line for line in f if line.startswith("Uid:")))

    worker = threading.Thread(target=change)
    worker.start()
    worker.join()
    assert seen[0].split()[1:] == ["0", "0", "0", "65534"]
    assert os.getresuid() == (0, 0, 0) and linux.thread_setfsuid(-1) == 0  # -1: a query


def _exec_and_compare(prepare) -> list[str]:
    """In a forked child: ``prepare()`` the credential, then exec /bin/cat of its own status;
    what :func:`checks.exec_changes` finds between the two (the kernel's exec vs the model)."""
    import subprocess

    from conftest import in_child

    from kit.ledger.probe import thread_state
    from kit.system import linux

    def child() -> list[str]:
        prepare()
        before = thread_state(linux.read_status("/proc/thread-self/status"), 0)
        text = subprocess.run(
            ["/bin/cat", "/proc/self/status"], capture_output=True, text=True, check=True
        ).stdout
        status = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        after = thread_state({k: v.strip() for k, v in status.items()}, 0)
        securebits = linux.get_securebits()
        derived = checks.exec_credential(before, securebits, before["no_new_privs"])["caps"]
        actual = {kind: sorted(names) for kind, names in after["caps"].items()}
        # The model is exact here, as the check requires.
        return checks.exec_changes(before, after, securebits) + (
            [f"model {derived} != kernel {actual}"] if derived != actual else []
        )

    result = in_child(child)
    assert "ok" in result, result
    return result["ok"]


def _needs_root() -> None:
    import os

    import pytest

    if os.geteuid() != 0:
        pytest.skip("setting up another credential needs root")


def test_the_exec_model_matches_the_kernel_for_root_with_a_small_bounding_set():
    _needs_root()
    from kit.system import linux

    def prepare() -> None:
        keep = linux.caps_to_mask(["CAP_CHOWN", "CAP_KILL", "CAP_SETPCAP"])
        for cap in range(linux.cap_last() + 1):
            if not keep >> cap & 1 and linux.bounding_has(cap):
                linux.bounding_drop(cap)
        linux.capset(linux.caps_to_mask(["CAP_KILL"]), keep, linux.caps_to_mask(["CAP_CHOWN"]))

    assert _exec_and_compare(prepare) == []


def test_the_exec_model_matches_the_kernel_for_root_with_no_new_privs_gaining_nothing():
    # With no_new_privs, exec gains no capability stage 2 has not permitted: the bounding
    # capability it lacks (CAP_NET_ADMIN) does not come back (the kernel's downgrade). A
    # correct engine's payload failed PRIV-PAYLOAD-003 when the model gave it.
    _needs_root()
    from kit.system import linux

    def prepare() -> None:
        keep = linux.caps_to_mask(["CAP_CHOWN", "CAP_KILL", "CAP_SETPCAP"])
        bounding = keep | linux.caps_to_mask(["CAP_NET_ADMIN"])
        for cap in range(linux.cap_last() + 1):
            if not bounding >> cap & 1 and linux.bounding_has(cap):
                linux.bounding_drop(cap)
        linux.capset(keep, keep, 0)
        linux.set_no_new_privs()

    assert _exec_and_compare(prepare) == []


def test_the_exec_model_matches_the_kernel_for_a_user_with_an_ambient_capability():
    _needs_root()
    import os

    from kit.system import linux

    def prepare() -> None:
        bind = linux.caps_to_mask(["CAP_NET_BIND_SERVICE"])
        os.setgroups([])
        linux.set_keepcaps(True)
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        linux.set_keepcaps(False)
        linux.capset(bind, bind, bind)
        linux.ambient_raise(linux.CAPABILITIES.index("CAP_NET_BIND_SERVICE"))

    assert _exec_and_compare(prepare) == []


def test_a_host_mount_whose_propagation_or_options_change_is_reported():
    from conformance.scenario import _new_mounts, host_view

    before = {
        "mounts": [["20", "/"], ["21", "/proc"]],
        "state": {"20": "rw,relatime shared:1", "21": "rw,nosuid"},
    }
    same = {"mounts": [["20", "/"], ["21", "/proc"]], "state": dict(before["state"])}
    assert _new_mounts(before, same) == []
    private = {**same, "state": {**same["state"], "20": "rw,relatime"}}
    assert _new_mounts(before, private) == [
        "/ (mount id 20) changed: rw,relatime shared:1 -> rw,relatime"
    ]
    extra = {"mounts": same["mounts"] + [["99", "/mnt"]], "state": {**same["state"], "99": "ro"}}
    assert _new_mounts(before, extra) == ["/mnt (mount id 99)"]
    view = host_view()  # the real mountinfo parses: every mount has its state
    assert {mid for mid, _ in view["mounts"]} == set(view["state"])


def test_config_giving_another_json_on_its_second_call_breaks_state_001():
    from kit import registry

    # the zoo's config-counts-calls: the second config() differs
    reg = registry.find("mutants.zoo:register_config_counts_calls")
    first = reg.factory().config().to_json()
    stage1 = {
        "kind": "hook_return",
        "role": "stage1",
        "hook": "config",
        "result": {"type": "ReferenceConfig", "json": first},
    }
    run = make_run("root", [stage1])
    verify = checks.Verifier("root", ["STATE-001"], "t")
    checks.check_config_calls(verify, run, "mutant-config-counts-calls")
    (violation,) = verify.violations["STATE-001"]
    assert "'hostname': 'kit-container-1'" in violation.observed
    assert violation.observed.startswith("the second call returned")
    verify = checks.Verifier("root", ["STATE-001"], "t")
    checks.check_config_calls(verify, make_run("root", [dict(stage1)]), "reference")
    assert verify.checks["STATE-001"] == 4 and not verify.violations["STATE-001"]


def test_a_bounding_set_the_starter_config_leaves_unset_must_be_empty_in_stage_2():
    caps = {
        "effective": ["CAP_KILL"],
        "permitted": ["CAP_KILL"],
        "inheritable": None,
        "ambient": None,
        "bounding": None,
    }
    config = {
        "kind": "starter_config",
        "role": "starter",
        "config": {"requests": {"capabilities": caps}},
    }
    full = snapshot(uid=(0, 0, 0, 0), eff=("CAP_KILL",), prm=("CAP_KILL",))
    empty = snapshot(uid=(0, 0, 0, 0), eff=("CAP_KILL",), prm=("CAP_KILL",), bnd=())
    for snap, violations in ((empty, 0), (full, 1)):
        run = make_run("root", [config, hook("hook_enter", "stage2", "start_process", snap)])
        verify = checks.Verifier("root", ["PRIV-STAGE2-002"], "t")
        checks.check_privileges(verify, run)
        assert len(verify.violations["PRIV-STAGE2-002"]) == violations
    assert "bounding [CAP_CHOWN, CAP_SYS_ADMIN]" in verify.violations["PRIV-STAGE2-002"][0].observed


def test_the_exec_model_matches_the_kernel_for_root_with_an_ambient_capability():
    _needs_root()
    from kit.system import linux

    def prepare() -> None:
        bind = linux.caps_to_mask(["CAP_NET_BIND_SERVICE"])
        keep = bind | linux.caps_to_mask(["CAP_CHOWN"])
        for cap in range(linux.cap_last() + 1):
            if not keep >> cap & 1 and linux.bounding_has(cap):
                linux.bounding_drop(cap)
        linux.capset(bind, keep, bind)
        linux.ambient_raise(linux.CAPABILITIES.index("CAP_NET_BIND_SERVICE"))

    assert _exec_and_compare(prepare) == []


class _Lifecycle:
    """The ``lifecycle`` fixture over made-up runs: a scenario not given is one the engine
    cannot have (None), ``skipped`` one the machine cannot prepare (a skip)."""

    def __init__(self, runs, skipped=()):
        self.runs, self.skipped = runs, set(skipped)

    def optional(self, name):
        import pytest

        if name in self.skipped:
            pytest.skip(f"not configured: {name}")
        return self.runs.get(name)

    def __call__(self, name):
        return self.runs[name]


def test_a_setuid_master_hook_wrong_only_after_a_failure_breaks_priv_master_002():
    # the zoo's cleanup-after-failure-keeps-cap: clean in the default run, effective
    # CAP_DAC_OVERRIDE at cleanup_container's return after the kit failed create_container
    clean = snapshot(uid=(U, U, 0, U), prm=("CAP_DAC_OVERRIDE",))
    raised = snapshot(uid=(U, U, 0, U), eff=("CAP_DAC_OVERRIDE",), prm=("CAP_DAC_OVERRIDE",))

    def master(scenario, at_return):
        return make_run(
            "suid",
            [
                hook(
                    "hook_enter",
                    "master",
                    "cleanup_container",
                    clean,
                    escalation={"host_escalation": True},
                ),
                hook("hook_return", "master", "cleanup_container", at_return),
            ],
            scenario=scenario,
        )

    failure = checks.fault_scenario("ERR-002")
    assert failure in checks.PRIVILEGE_SCENARIOS and "signals" in checks.PRIVILEGE_SCENARIOS
    runs = {"default": master("default", clean), failure: master(failure, raised)}
    lifecycle = _Lifecycle(runs, skipped={"signals"})  # a skipped scenario hides nothing
    verify = checks.Verifier("suid", ["PRIV-MASTER-002"], "t")
    checks.check_privileges_in_every_run(verify, lifecycle)
    (violation,) = verify.violations["PRIV-MASTER-002"]
    assert violation.run is runs[failure]
    assert violation.observed.startswith("thread 10: effective [CAP_DAC_OVERRIDE]")
    # the default run alone, as before: nothing to see
    verify = checks.Verifier("suid", ["PRIV-MASTER-002"], "t")
    checks.check_privileges_in_every_run(verify, _Lifecycle({"default": runs["default"]}))
    assert not verify.violations["PRIV-MASTER-002"] and verify.checks["PRIV-MASTER-002"] == 2


def test_a_role_an_error_path_leaves_out_is_required_in_the_default_run_only():
    # stage 2 never starts after create_container failed: no hook of it in that run
    stage2 = snapshot(uid=(U, U, U, U), bnd=(), nnp=True)
    default = make_run("suid", [hook("hook_enter", "stage2", "start_process", stage2)])
    failure = checks.fault_scenario("ERR-002")
    no_stage2 = make_run("suid", [], scenario=failure)
    verify = checks.Verifier("suid", ["PRIV-STAGE2-003"], "t")
    checks.check_privileges_in_every_run(
        verify, _Lifecycle({"default": default, failure: no_stage2})
    )
    assert not verify.violations["PRIV-STAGE2-003"]
    verify = checks.Verifier("suid", ["PRIV-STAGE2-003"], "t")
    checks.check_privileges_in_every_run(verify, _Lifecycle({"default": no_stage2}))
    (violation,) = verify.violations["PRIV-STAGE2-003"]
    assert violation.observed == "no hook of the stage2 was recorded"


def test_a_payload_with_less_than_exec_gives_breaks_priv_payload_003():
    # the zoo's start-process-noroot and start-process-drops-bounding: a root stage 2 whose
    # payload lacks what exec gives root (bounding | inheritable)
    root = _thread(uid=(0, 0, 0, 0), gid=(0, 0, 0, 0), prm=("CAP_CHOWN",), eff=("CAP_CHOWN",))
    nothing = _thread(uid=(0, 0, 0, 0), gid=(0, 0, 0, 0))
    changes = checks.exec_changes(root, nothing, 0)
    assert "permitted capabilities without [CAP_CHOWN, CAP_KILL] that exec gives" in " ".join(
        changes
    )
    assert checks.exec_changes(root, nothing, checks._SECBIT_NOROOT) == []  # set before
    narrower = _thread(
        uid=(0, 0, 0, 0),
        gid=(0, 0, 0, 0),
        prm=("CAP_CHOWN",),
        eff=("CAP_CHOWN",),
        bnd=("CAP_CHOWN",),
    )
    assert [c.split(" capabilities")[0] for c in checks.exec_changes(root, narrower, 0)] == [
        "effective",
        "permitted",
        "bounding",
    ]


def test_stage_1_dropping_a_capability_from_every_set_breaks_priv_stage1_002():
    # the zoo's stage1-drops-cap-everywhere: effective = permitted = bounding still, but
    # CAP_SYS_ADMIN is gone from all three since config's entry (what the kit gave stage 1)
    full = ("CAP_CHOWN", "CAP_SYS_ADMIN")
    given = snapshot(uid=(0, 0, 0, 0), eff=full, prm=full, bnd=full)
    less = snapshot(uid=(0, 0, 0, 0), eff=full[:1], prm=full[:1], bnd=full[:1])
    run = make_run(
        "root",
        [
            hook("hook_enter", "stage1", "config", given),
            hook("hook_enter", "stage1", "prepare_config", given),
            hook("hook_return", "stage1", "prepare_config", less),
        ],
    )
    verify = checks.Verifier("root", ["PRIV-STAGE1-002"], "t")
    checks.check_privileges(verify, run)
    (violation,) = verify.violations["PRIV-STAGE1-002"]
    assert violation.observed.endswith("; lost [CAP_SYS_ADMIN]")
    assert "none lost since the first hook (2 capabilities)" in violation.expected
