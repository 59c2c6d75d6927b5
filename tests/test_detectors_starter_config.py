"""StarterConfig validation fed every invalid value and combination (SPEC §5), with the
boundaries of its limits; each rejection names the setting and the offending value."""

from __future__ import annotations

import os

import pytest

from kit.contract import ConfigError
from kit.starter.config import (
    CAPABILITY_SETS,
    FLOWS,
    StarterConfig,
    normalize_capability,
)
from kit.system.linux import CAP_NUMBERS, NAMESPACES, PROPAGATIONS, split_propagation


def sc(flow: str = "root") -> StarterConfig:
    return StarterConfig(flow, 1000, 1000)


def userns(s: StarterConfig, uid_maps=((0, 1000, 1),), gid_maps=((0, 1000, 1),)) -> None:
    s.set_ns_flags(["user"])
    s.add_uid_mappings(uid_maps)
    s.add_gid_mappings(gid_maps)


# -- facts -------------------------------------------------------------------------------------


def test_an_unknown_flow_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"unknown flow 'setuid' \(known: root, suid, userns"):
        StarterConfig("setuid", 0, 0)


@pytest.mark.parametrize("flow", FLOWS)
def test_facts_of_each_flow(flow):
    s = StarterConfig(flow, 1001, 1002)
    assert (s.flow, s.invoker_uid, s.invoker_gid) == (flow, 1001, 1002)
    assert s.is_suid is (flow in ("suid", "hybrid"))


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError) as info:
        sc().target_euid  # noqa: B018
    assert info.value.args == ("target_euid",)
    bare = StarterConfig.__new__(StarterConfig)  # before __init__ (copy, unpickling)
    with pytest.raises(AttributeError) as info:
        bare.target_uid  # noqa: B018
    assert info.value.args == ("target_uid",)
    assert sc().mount_propagation == "rprivate" and sc().target_uid is None


# -- setters: bad values -------------------------------------------------------------------


@pytest.mark.parametrize("setter", ["set_target_uid", "set_target_gids"])
@pytest.mark.parametrize("bad", [-1, 2**32 - 1, 2**32, True, False, "0", 1.0, None])
def test_ids_out_of_range_or_not_ints_are_refused(setter, bad):
    s = sc()
    with pytest.raises(ConfigError, match=f"^{setter}: invalid id {bad!r}$"):
        getattr(s, setter)(bad if setter == "set_target_uid" else [0, bad])
    assert s.target_uid is None and s.target_gids == []


@pytest.mark.parametrize("good", [0, 1, 2**32 - 2])
def test_ids_at_the_limits_are_accepted(good):
    s = sc()
    s.set_target_uid(good)
    s.set_target_gids([good, 0])
    assert s.target_uid == good and s.target_gids == [good, 0]


def test_target_gids_take_any_iterable_and_replace():
    s = sc()
    s.set_target_gids(iter([5, 6]))
    s.set_target_gids((7,))
    assert s.target_gids == [7]


def test_an_unknown_capability_set_is_refused_naming_it():
    with pytest.raises(
        ConfigError,
        match=r"^set_capabilities: unknown capability set "
        r"'effectiv' \(known: effective, permitted, "
        r"inheritable, bounding, ambient\)$",
    ):
        sc().set_capabilities("effectiv", [])


@pytest.mark.parametrize("kind", CAPABILITY_SETS)
def test_an_unknown_capability_is_refused_naming_the_set_and_the_name(kind):
    with pytest.raises(
        ConfigError,
        match=rf"^set_capabilities\({kind}\): unknown capability "
        r"'sys_adminn'$",
    ):
        sc().set_capabilities(kind, ["chown", "sys_adminn"])
    with pytest.raises(
        ConfigError,
        match=rf"^set_capabilities\({kind}\): capability name must "
        r"be a string, got 21$",
    ):
        sc().set_capabilities(kind, [21])


def test_capability_names_are_normalized_deduplicated_and_sorted_by_number():
    s = sc()
    s.set_capabilities("permitted", ["SYS_ADMIN", "cap_chown", "chown", "CAP_KILL"])
    assert s.capabilities["permitted"] == ["CAP_CHOWN", "CAP_KILL", "CAP_SYS_ADMIN"]
    assert normalize_capability("net_raw", "x") == "CAP_NET_RAW"
    assert normalize_capability("CAP_NET_RAW", "x") == "CAP_NET_RAW"
    with pytest.raises(ConfigError, match=r"^x: unknown capability 'CAP_'$"):
        normalize_capability("CAP_", "x")
    last = max(CAP_NUMBERS, key=CAP_NUMBERS.__getitem__)
    assert normalize_capability(last.lower(), "x") == last
    s.set_capabilities("ambient", [])
    assert s.capabilities["ambient"] == [] and s.capabilities["bounding"] is None


@pytest.mark.parametrize("setter", ["set_ns_flags", "set_ns_path"])
def test_an_unknown_namespace_is_refused_naming_it(setter):
    args = (["net", "time"],) if setter == "set_ns_flags" else ("time", "/proc/1/ns/time")
    with pytest.raises(ConfigError, match=rf"^{setter}: unknown namespace 'time' \(known: "):
        getattr(sc(), setter)(*args)


def test_ns_flags_are_kept_in_the_kit_order():
    s = sc()
    s.set_ns_flags(["mount", "user", "net", "mount"])
    assert s.ns_flags == [k for k in NAMESPACES if k in ("mount", "user", "net")]
    s.set_ns_flags(iter(["pid"]))
    assert s.ns_flags == ["pid"]


@pytest.mark.parametrize("path", ["proc/1/ns/net", "", None, 3, b"/proc/1/ns/net"])
def test_a_namespace_path_that_is_not_absolute_is_refused(path):
    with pytest.raises(
        ConfigError,
        match=rf"^set_ns_path\(net\): path must be absolute, "
        rf"got {path!r}",
    ):
        sc().set_ns_path("net", path)


def test_a_path_wins_over_creating():
    s = sc()
    s.set_ns_flags(["net", "uts"])
    s.set_ns_path("net", "/proc/1/ns/net")
    s.set_ns_path("ipc", "/proc/1/ns/ipc")
    assert s.namespaces_created() == ["uts"]
    assert s.uses_namespace("net") and s.uses_namespace("ipc") and s.uses_namespace("uts")
    assert not s.uses_namespace("pid")


@pytest.mark.parametrize("bad", ["rslaves", "", "RPRIVATE", None])
def test_an_unknown_propagation_is_refused_naming_it(bad):
    with pytest.raises(
        ConfigError,
        match=rf"^set_mount_propagation: unknown propagation "
        rf"{bad!r}",
    ):
        sc().set_mount_propagation(bad)


@pytest.mark.parametrize("name", PROPAGATIONS)
def test_every_propagation_is_accepted_and_split(name):
    s = sc()
    s.set_mount_propagation(name)
    assert s.mount_propagation == name
    assert split_propagation(name) == (name.removeprefix("r"), name.startswith("r"))


def test_an_unknown_propagation_splits_as_itself():
    assert split_propagation("rbogus") == ("rbogus", False)


@pytest.mark.parametrize("setter", ["add_uid_mappings", "add_gid_mappings"])
@pytest.mark.parametrize("bad", [(0, 1000), (0, 1000, 1, 1), (0, "x", 1), None, 5])
def test_a_mapping_that_is_not_a_triple_is_refused(setter, bad):
    with pytest.raises(
        ConfigError,
        match=rf"^{setter}: mapping must be \(container id, host "
        rf"id, size\), got ",
    ):
        getattr(sc(), setter)([bad])


@pytest.mark.parametrize("setter", ["add_uid_mappings", "add_gid_mappings"])
@pytest.mark.parametrize("bad", [(-1, 1000, 1), (0, -1, 1), (0, 1000, 0), (0, 1000, -5)])
def test_a_mapping_out_of_range_is_refused(setter, bad):
    with pytest.raises(ConfigError, match=rf"^{setter}: invalid mapping "):
        getattr(sc(), setter)([bad])


def test_mappings_at_the_limits_are_accepted_and_accumulate():
    s = sc()
    s.add_uid_mappings([(0, 0, 1)])
    s.add_uid_mappings([["1", 1, 65535]])
    assert s.uid_mappings == [[0, 0, 1], [1, 1, 65535]]
    s.add_gid_mappings([])
    assert s.gid_mappings == []


@pytest.mark.parametrize("bad", [-1, True, "3", 3.0, None])
def test_a_bad_fd_to_keep_is_refused(bad):
    with pytest.raises(ConfigError, match=rf"^keep_file_descriptor: invalid fd {bad!r}$"):
        sc().keep_file_descriptor(bad)


def test_fds_to_keep_are_kept_once_in_order():
    s = sc()
    for fd in (0, 2, 0, 1):
        s.keep_file_descriptor(fd)
    assert s.keep_fds == [0, 2, 1]


@pytest.mark.parametrize(
    "setter,field",
    [
        ("set_no_new_privs", "no_new_privs"),
        ("set_hybrid_workflow", "hybrid_workflow"),
        ("set_allow_setgroups", "allow_setgroups"),
        ("set_master_propagate_mount", "master_propagate_mount"),
        ("set_namespace_join_only", "namespace_join_only"),
        ("set_bring_loopback_interface", "bring_loopback_interface"),
    ],
)
def test_flags_default_to_false_and_set_to_a_bool(setter, field):
    s = sc()
    assert getattr(s, field) is False
    getattr(s, setter)()
    assert getattr(s, field) is True
    getattr(s, setter)(0)
    assert getattr(s, field) is False
    getattr(s, setter)("yes")
    assert getattr(s, field) is True


# -- validate: invalid combinations ----------------------------------------------------------


def rejects(s: StarterConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        s.validate()


def test_a_default_config_is_valid_in_every_flow():
    for flow in FLOWS:
        if flow != "hybrid":
            sc(flow).validate()


def test_effective_not_within_permitted_names_the_extra_capabilities():
    s = sc()
    s.set_capabilities("permitted", ["chown"])
    s.set_capabilities("effective", ["kill", "chown", "sys_admin"])
    rejects(
        s,
        r"^set_capabilities: effective capabilities must be a subset of permitted; "
        r"not permitted: CAP_KILL, CAP_SYS_ADMIN$",
    )


def test_effective_equal_to_permitted_or_empty_is_valid():
    s = sc()
    s.set_capabilities("effective", ["chown"])
    s.set_capabilities("permitted", ["chown"])
    s.validate()
    s.set_capabilities("effective", [])
    s.validate()


def test_effective_with_permitted_unset_is_rejected():
    s = sc()
    s.set_capabilities("effective", ["chown"])
    rejects(s, "not permitted: CAP_CHOWN$")


@pytest.mark.parametrize(
    "permitted,inheritable", [(["chown"], []), ([], ["chown"]), (None, None), (["kill"], ["chown"])]
)
def test_ambient_outside_permitted_and_inheritable_names_it(permitted, inheritable):
    s = sc()
    for kind, names in (("permitted", permitted), ("inheritable", inheritable)):
        if names is not None:
            s.set_capabilities(kind, names)
    s.set_capabilities("ambient", ["chown"])
    rejects(
        s,
        r"^set_capabilities: ambient capabilities must be both permitted and "
        r"inheritable: CAP_CHOWN$",
    )


def test_ambient_within_permitted_and_inheritable_is_valid():
    s = sc()
    for kind in ("permitted", "inheritable", "ambient"):
        s.set_capabilities(kind, ["chown"])
    s.validate()


@pytest.mark.parametrize("kind", ["permitted", "inheritable"])
def test_a_capability_outside_a_set_bounding_set_is_named(kind):
    s = sc()
    s.set_capabilities(kind, ["chown", "kill"])
    s.set_capabilities("bounding", ["chown"])
    rejects(
        s,
        r"^set_capabilities: permitted/inheritable capabilities outside the bounding "
        r"set: CAP_KILL$",
    )
    s.set_capabilities("bounding", ["chown", "kill"])
    s.validate()


def test_an_unset_bounding_set_bounds_nothing():
    s = sc()
    s.set_capabilities("permitted", ["chown", "kill"])
    s.set_capabilities("inheritable", ["kill"])
    s.validate()


@pytest.mark.parametrize("flow", ["suid"])
@pytest.mark.parametrize("how", ["flag", "path"])
def test_a_user_namespace_through_the_setuid_starter_needs_hybrid(flow, how):
    s = sc(flow)
    if how == "flag":
        userns(s)
    else:
        s.set_ns_path("user", "/proc/1/ns/user")
    rejects(
        s,
        r"^set_ns_flags: a user namespace through the setuid starter needs "
        r"set_hybrid_workflow \(hybrid flow\)$",
    )


@pytest.mark.parametrize("flow", ["root", "userns", "fakeroot"])
def test_hybrid_outside_the_setuid_starter_is_rejected_naming_the_flow(flow):
    s = sc(flow)
    userns(s)
    s.set_hybrid_workflow()
    rejects(
        s,
        rf"^set_hybrid_workflow: the hybrid workflow needs the setuid starter "
        rf"\(flow '{flow}'\)$",
    )


@pytest.mark.parametrize("flow", ["suid", "hybrid"])
def test_hybrid_without_creating_a_user_namespace_is_rejected(flow):
    s = sc(flow)
    s.set_hybrid_workflow()
    rejects(
        s,
        r"^set_hybrid_workflow: the hybrid workflow creates a user namespace; add "
        r"'user' to set_ns_flags$",
    )


@pytest.mark.parametrize("flow", ["suid", "hybrid"])
def test_hybrid_through_the_setuid_starter_with_a_user_namespace_is_valid(flow):
    s = sc(flow)
    userns(s)
    s.set_hybrid_workflow()
    s.validate()


@pytest.mark.parametrize("setter", ["add_uid_mappings", "add_gid_mappings"])
@pytest.mark.parametrize("user", ["none", "joined"])
def test_mappings_without_a_created_user_namespace_are_rejected(setter, user):
    s = sc()
    if user == "joined":
        s.set_ns_flags(["user"])
        s.set_ns_path("user", "/proc/1/ns/user")
    getattr(s, setter)([(0, 0, 1)])
    rejects(
        s,
        r"^add_uid_mappings/add_gid_mappings: mappings need a user namespace that the "
        r"starter creates",
    )


@pytest.mark.parametrize("missing", ["uid", "gid"])
def test_a_new_user_namespace_without_a_map_is_rejected_naming_which(missing):
    s = sc("userns")
    s.set_ns_flags(["user"])
    if missing != "uid":
        s.add_uid_mappings([(0, 1000, 1)])
    if missing != "gid":
        s.add_gid_mappings([(0, 1000, 1)])
    rejects(s, rf"^add_{missing}_mappings: a new user namespace needs a {missing} mapping$")


@pytest.mark.parametrize("which", ["uid", "gid"])
def test_overlapping_container_ranges_are_rejected_and_adjacent_ones_are_not(which):
    maps = [(0, 100000, 10), (10, 200000, 5)]  # adjacent: [0,10) and [10,15)
    s = sc()
    userns(s, maps, maps)
    s.validate()
    over = [(0, 100000, 10), (9, 200000, 5)]  # one id (9) in both
    s = sc()
    userns(s, over if which == "uid" else maps, over if which == "gid" else maps)
    rejects(s, rf"^add_{which}_mappings: container ranges overlap: ")


def test_overlap_is_found_whatever_the_order_of_the_ranges():
    s = sc()
    userns(s, [(20, 1, 5), (0, 2, 3), (22, 3, 1)], [(0, 1000, 1)])
    rejects(s, r"^add_uid_mappings: container ranges overlap")


def test_join_only_creating_a_namespace_is_rejected_naming_it():
    s = sc()
    s.set_namespace_join_only()
    s.set_ns_path("net", "/proc/1/ns/net")
    s.set_ns_flags(["uts", "ipc", "net"])
    rejects(
        s,
        r"^set_namespace_join_only: a join-only run cannot create namespaces "
        r"\(set_ns_flags asks for uts, ipc\)$",
    )


def test_join_only_without_a_namespace_to_join_is_rejected():
    s = sc()
    s.set_namespace_join_only()
    rejects(s, r"^set_namespace_join_only: no namespace to join \(use set_ns_path\)$")
    s.set_ns_path("uts", "/proc/1/ns/uts")
    s.validate()


def test_loopback_without_a_network_namespace_is_rejected():
    s = sc()
    s.set_bring_loopback_interface()
    s.set_ns_flags(["uts"])
    rejects(s, r"^set_bring_loopback_interface: needs a network namespace")
    s.set_ns_path("net", "/proc/1/ns/net")
    s.validate()
    s = sc()
    s.set_bring_loopback_interface()
    s.set_ns_flags(["net"])
    s.validate()


def test_a_kept_fd_that_is_not_open_is_rejected_naming_it():
    r, w = os.pipe()
    os.close(w)
    s = sc()
    s.keep_file_descriptor(r)
    s.validate()
    s.keep_file_descriptor(w)
    rejects(s, rf"^keep_file_descriptor: fd {w} is not open in the starter$")
    os.close(r)


def test_validation_runs_on_the_config_as_it_crossed_in_json():
    s = sc("suid")
    userns(s)
    s.set_capabilities("effective", ["chown"])
    copy = StarterConfig.from_json(s.to_json())
    assert copy.to_json() == s.to_json()
    assert copy.flow == "suid" and copy.invoker_uid == 1000 and copy.is_suid
    rejects(copy, "effective capabilities must be a subset")


def test_only_the_capabilities_outside_are_named():
    # sets that overlap both ways: the message names the difference, nothing else
    s = sc()
    s.set_capabilities("permitted", ["chown", "net_raw"])
    s.set_capabilities("effective", ["chown", "kill"])
    rejects(s, r"not permitted: CAP_KILL$")
    s = sc()
    s.set_capabilities("permitted", ["chown", "kill", "net_raw"])
    s.set_capabilities("inheritable", ["kill", "net_raw"])
    s.set_capabilities("ambient", ["chown", "kill"])
    rejects(s, r"must be both permitted and inheritable: CAP_CHOWN$")


def test_a_capability_both_permitted_and_inheritable_is_bounded_too():
    s = sc()
    s.set_capabilities("permitted", ["chown", "kill"])
    s.set_capabilities("inheritable", ["kill"])
    s.set_capabilities("bounding", ["chown"])
    rejects(s, r"outside the bounding set: CAP_KILL$")


def test_ranges_apart_or_adjacent_at_large_ids_do_not_overlap():
    s = sc()
    userns(
        s,
        [(0, 100000, 5), (10, 200000, 5), (1000, 300000, 500), (1500, 400000, 100)],
        [(0, 1000, 1)],
    )
    s.validate()
