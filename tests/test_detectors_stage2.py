"""Stage 2's fd closing fed real open descriptors: several kept ones (adjacent, apart, high),
the descriptor just after each kept one, all opened inheritable so Python's close-on-exec
default hides nothing; and a whole run whose payload lists what it inherited. Stage 2's ids:
its map arithmetic against the kernel's own translation in a real user namespace, and the
payload's ids in every flow."""

from __future__ import annotations

import json
import os
import resource
import socket
import tempfile
from types import SimpleNamespace

import pytest
from conftest import exit_code_in_child

from kit.run.launcher import run
from kit.run.request import Invoker
from kit.starter.config import StarterConfig
from kit.starter.stage2 import Stage2, _inside_id, _is_mapped
from kit.system import linux

JOIN = "kit_test_engines:JoinEngine"


def _stage2(keep_fds: list[int], ledger_sock: socket.socket) -> Stage2:
    stage2 = Stage2.__new__(Stage2)  # only what close_fds reads: the config and the ledger
    stage2.c = SimpleNamespace(
        sconf=SimpleNamespace(keep_fds=keep_fds), starter=SimpleNamespace(ledger_sock=ledger_sock)
    )
    return stage2


def _inheritable_fd(at: int | None = None) -> int:
    fd = os.open("/dev/null", os.O_RDONLY)
    if at is not None:
        os.dup2(fd, at)
        os.close(fd)
        fd = at
    os.set_inheritable(fd, True)
    return fd


def close_fds_in_child(
    layout: dict[str, int | None], limit: int | None = None, limit_after: int | None = None
) -> dict[str, object]:
    """In a forked child: open an inheritable fd per name of ``layout`` (at that number, or
    the next free one), keep the names starting with "keep", call Stage2.close_fds with a
    pipe as the master fd, and report over it which fds are left and which inheritable.
    With ``limit``: RLIMIT_NOFILE (soft and hard) set to it for the opening; with
    ``limit_after``: lowered to it before the closing (the fds above it stay open, as the
    kernel leaves them, as an engine's init_engine may do)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            ledger_a, ledger_b = socket.socketpair()
            ledger_b.close()
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            fds = {name: _inheritable_fd(at) for name, at in layout.items()}
            if limit_after is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit_after, limit_after))
            keep = [fd for name, fd in fds.items() if name.startswith("keep")]
            for fd in keep:
                os.set_inheritable(fd, False)  # close_fds must make them inheritable
            _stage2(keep, ledger_a).close_fds(w)
            left = sorted(int(x) for x in os.listdir("/proc/self/fd"))
            report = {
                "fds": fds,
                "left": left,
                "master": w,
                "ledger": ledger_a.fileno(),
                "inheritable": {str(fd): os.get_inheritable(fd) for fd in keep},
            }
            os.write(w, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, status
    return json.loads(data)


def expected_left(report: dict) -> list[int]:
    kept = [fd for name, fd in report["fds"].items() if name.startswith("keep")]
    # the listing of /proc/self/fd opens one more fd: the lowest free one
    return sorted({0, 1, 2, report["master"], report["ledger"], *kept})


def check(report: dict) -> None:
    left = report["left"]
    want = expected_left(report)
    extra = sorted(set(left) - set(want))
    # exactly one extra: the descriptor os.listdir itself had open (the lowest free one)
    assert len(extra) == 1 and set(want) <= set(left), (left, want, report["fds"])
    closed = [
        name
        for name, fd in report["fds"].items()
        if not name.startswith("keep") and fd in left and fd not in extra
    ]
    assert closed == [], f"not closed: {closed}"
    assert all(report["inheritable"].values()), report["inheritable"]


def test_several_kept_fds_stay_and_the_fd_after_each_is_closed():
    report = close_fds_in_child(
        {
            "a": None,
            "keep1": None,
            "after_keep1": None,
            "b": None,
            "keep2": None,
            "keep3": None,
            "after_keep3": None,
            "c": None,
            "keep_high": 300,
            "after_high": 301,
            "way_up": 5000,
        }
    )
    check(report)
    fds = report["fds"]
    # the layout is what the test means: adjacent kept fds, each followed by a closed one
    assert fds["after_keep1"] == fds["keep1"] + 1 and fds["keep3"] == fds["keep2"] + 1
    assert fds["after_keep3"] == fds["keep3"] + 1


def test_no_kept_fd_closes_everything_above_the_standard_ones():
    report = close_fds_in_child({"a": None, "b": None, "high": 1000, "top": 19999})
    check(report)


def test_a_kept_fd_at_the_top_of_the_fd_table_stays():
    top = int(os.sysconf("SC_OPEN_MAX")) - 1
    report = close_fds_in_child({"below": top - 1, "keep_top": top})
    check(report)
    assert top in report["left"] and top - 1 not in report["left"]


HARD_FDS = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
#: a hard fd limit above 65536, the fixed floor the closing once stopped at
HIGH_LIMIT = 70002


def _can_raise_fd_limit(to: int) -> bool:
    """Whether a process may raise its hard fd limit to ``to`` (CAP_SYS_RESOURCE, and
    fs.nr_open at least that): tried in a forked child."""

    def raise_it() -> int:
        resource.setrlimit(resource.RLIMIT_NOFILE, (to, to))
        return 0

    return exit_code_in_child(raise_it) == 0


def test_an_fd_above_a_hard_limit_lowered_after_it_was_opened_is_closed():
    # An engine's init_engine runs in stage 2 before the closing and may lower the limit;
    # the fds it leaves above the new limit must not reach the payload.
    layout = {"a": None, "keep_mid": 3000, "mid": 5000, "top": HARD_FDS - 1}
    report = close_fds_in_child(layout, limit_after=1024)
    check(report)
    assert HARD_FDS - 1 not in report["left"] and 3000 in report["left"]


def test_an_fd_above_65536_and_a_hard_limit_lowered_after_it_was_opened_is_closed():
    if not _can_raise_fd_limit(HIGH_LIMIT):
        pytest.skip(f"the hard fd limit ({HARD_FDS}) cannot be raised to {HIGH_LIMIT} here")
    layout = {"a": None, "keep_low": 3000, "high": 70000, "top": HIGH_LIMIT - 1}
    report = close_fds_in_child(layout, limit=HIGH_LIMIT, limit_after=1024)
    check(report)
    assert 70000 not in report["left"] and HIGH_LIMIT - 1 not in report["left"]


def test_kept_fds_below_three_do_not_disturb_the_rest():
    report = close_fds_in_child({"a": None, "keep_b": None, "c": None})
    check(report)


def test_a_whole_run_hands_the_payload_exactly_the_kept_fds():
    pipes = [os.pipe() for _ in range(3)]
    kept = [pipes[0][1], pipes[2][1]]  # write ends of the first and third pipe
    passed = tuple(fd for p in pipes for fd in p)
    for fd in passed:
        os.set_inheritable(fd, True)
    try:
        script = (
            "; ".join(f"echo ok{fd} > /proc/self/fd/{fd}" for fd in kept) + "; ls /proc/self/fd"
        )
        result = run(
            JOIN,
            "root",
            ["/bin/sh", "-c", script],
            engine_config={"keep_fds": kept},
            pass_fds=passed,
        )
        assert result.exit_code == 0, result.stderr
        assert os.read(pipes[0][0], 100) == f"ok{kept[0]}\n".encode()
        assert os.read(pipes[2][0], 100) == f"ok{kept[1]}\n".encode()
        fds = sorted(int(x) for x in result.stdout.split())
        others = [fd for fd in passed if fd not in kept]
        assert not set(others) & set(fds), (fds, others)
        assert set(kept) <= set(fds)
        # 0-2, the kept fds, and the one ls opened on /proc/self/fd
        assert len(fds) == 3 + len(kept) + 1, fds
    finally:
        for fd in passed:
            try:
                os.close(fd)
            except OSError:
                pass


# No range where inside equals outside, so that every term of the arithmetic counts; inside
# starts and sizes that share bits (51 and 5, 1001 and 24) so that no "|" or "^" passes for
# "+"; a range longer than its host start (2, 10) so that no "%" passes for "-".
MAPS = [[0, 100000, 10], [51, 3000, 5], [1001, 70000, 24], [5000, 2, 10]]
# Each range's edges from both sides, an id inside each, and ids no range covers.
HOST_IDS = [0, 1, 2, 4, 11, 12, 2999, 3000, 3001, 3004, 3005, 12345, 69999, 70000, 70019]
HOST_IDS += [70023, 70024, 99999, 100000, 100009, 100010]
INSIDE_IDS = [0, 9, 10, 50, 51, 55, 56, 1000, 1001, 1017, 1024, 1025, 4999, 5000, 5009, 5010]
INSIDE_IDS += [65534]


def kernel_view(maps: list[list[int]]) -> dict[str, dict[str, object]]:
    """What the kernel makes of ``maps`` as the uid map of a real user namespace (written by
    this root process, as a runtime's privileged helper writes a child's map): the uid a file
    owned by each of HOST_IDS shows inside, and whether each of INSIDE_IDS is mapped (a
    process in the namespace may setresuid to it)."""
    with tempfile.TemporaryDirectory() as tmp:
        for host_id in HOST_IDS:
            path = os.path.join(tmp, str(host_id))
            open(path, "w").close()
            os.chown(path, host_id, 0)
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd in (ready_r, go_w, out_r):
                    os.close(fd)
                linux.unshare(linux.CLONE_NEWUSER)  # single-threaded: a fresh fork
                os.write(ready_w, b"u")
                assert os.read(go_r, 1) == b"g"
                # The file's owner as seen inside; tmp stays reachable: the creds are unchanged.
                inside = {str(h): os.stat(os.path.join(tmp, str(h))).st_uid for h in HOST_IDS}
                mapped = {}
                for inside_id in INSIDE_IDS:
                    probe = os.fork()
                    if probe == 0:
                        try:  # EINVAL for an id the map does not cover
                            os.setresuid(inside_id, inside_id, inside_id)
                            os._exit(0)
                        except OSError:
                            os._exit(1)
                    mapped[str(inside_id)] = os.waitpid(probe, 0)[1] == 0
                os.write(out_w, json.dumps({"inside": inside, "mapped": mapped}).encode())
                code = 0
            finally:
                os._exit(code)
        for fd in (ready_w, go_r, out_w):
            os.close(fd)
        try:
            assert os.read(ready_r, 1) == b"u"
            with open(f"/proc/{pid}/uid_map", "w") as f:
                f.write("".join(f"{i} {o} {n}\n" for i, o, n in maps))
            os.write(go_w, b"g")
            with os.fdopen(out_r, "rb") as f:
                data = f.read()
        finally:
            for fd in (ready_r, go_w):
                os.close(fd)
            _, status = os.waitpid(pid, 0)
        assert status == 0 and data, status
        return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="writing a multi-range uid map needs root")
def test_the_id_arithmetic_is_the_kernels_translation():
    seen = kernel_view(MAPS)
    # the kernel's own answer: an id outside every range is the overflow id
    with open("/proc/sys/kernel/overflowuid") as f:
        assert seen["inside"]["12345"] == int(f.read())
    assert {str(h): _inside_id(MAPS, h) for h in HOST_IDS} == seen["inside"]
    assert {str(i): _is_mapped(MAPS, i) for i in INSIDE_IDS} == seen["mapped"]
    # the sample means what it says: each range's first and last id seen, the rest overflow
    assert sorted(set(seen["inside"].values())) == [
        *(0, 9, 51, 52, 55, 1001, 1020, 1024, 5000, 5002, 5009, 65534)
    ]
    mapped = [int(i) for i, ok in seen["mapped"].items() if ok]
    assert mapped == [0, 9, 51, 55, 1001, 1017, 1024, 5000, 5009]


def _target_stage2(sconf: StarterConfig, uid: int, gid: int) -> Stage2:
    stage2 = Stage2.__new__(Stage2)  # only what target_ids reads: the config, flow and U
    stage2.c = SimpleNamespace(
        sconf=sconf,
        req=SimpleNamespace(flow=sconf.flow),
        starter=SimpleNamespace(user=SimpleNamespace(uid=uid, gid=gid)),
    )
    return stage2


def _userns_config(target_uid: int | None, target_gids: list[int]) -> StarterConfig:
    sconf = StarterConfig("fakeroot", 4000, 4100)
    sconf.set_ns_flags(["user"])
    sconf.add_uid_mappings([(0, 4000, 1), (100, 200000, 10)])
    sconf.add_gid_mappings([(0, 4100, 1), (100, 300000, 10)])
    if target_uid is not None:
        sconf.set_target_uid(target_uid)
    if target_gids:
        sconf.set_target_gids(target_gids)
    return sconf


@pytest.mark.parametrize(
    "target_uid,target_gids,want",
    [
        (None, [], (0, [0])),  # U's inside ids
        (109, [100, 109], (109, [100, 109])),  # the last id of a range is mapped
        (110, [100, 110], (0, [0])),  # one past it is not: U's ids stay
        (99, [109, 99], (0, [0])),  # one below a range, and a gid list not wholly mapped
        (0, [0, 105], (0, [0, 105])),
    ],
)
def test_a_target_id_inside_a_user_namespace_is_used_only_when_mapped(
    target_uid, target_gids, want
):
    stage2 = _target_stage2(_userns_config(target_uid, target_gids), 4000, 4100)
    assert stage2.target_ids() == want


def test_without_a_user_namespace_a_non_root_stage2_is_u_whatever_the_target():
    sconf = StarterConfig("suid", 4000, 4100)
    sconf.set_target_uid(0)
    sconf.set_target_gids([0, 5])
    assert _target_stage2(sconf, 4000, 4100).target_ids() == (4000, [4100])


def test_the_root_flow_defaults_to_uid_and_gid_0():
    sconf = StarterConfig("root", 0, 0)
    assert _target_stage2(sconf, 0, 0).target_ids() == (0, [0])
    sconf.set_target_gids([7, 8])
    assert _target_stage2(sconf, 0, 0).target_ids() == (0, [7, 8])
    sconf.set_target_uid(9)
    assert _target_stage2(sconf, 0, 0).target_ids() == (9, [7, 8])


STATUS = ["/bin/sh", "-c", "grep -E '^(Uid|Gid|Groups)' /proc/self/status"]


def test_the_payload_runs_with_the_ids_of_its_flow(flow):
    """SPEC §4, stage 2: root: 0 and no supplementary group; suid and userns: U (mapped to
    itself in userns), with U's own groups in suid; fakeroot and hybrid: 0 in the namespace."""
    result = run("reference", flow, STATUS)
    assert result.exit_code == 0, result.stderr
    status = {
        k: v.split() for k, _, v in (line.partition(":") for line in result.stdout.splitlines())
    }
    u = Invoker.resolve()
    if flow == "root":
        uid, gid, groups = 0, 0, []
    elif flow in ("suid", "userns"):
        uid, gid = u.uid, u.gid
        groups = [str(g) for g in u.groups] if flow == "suid" else []
    else:
        uid, gid, groups = 0, 0, []
    assert status["Uid"] == [str(uid)] * 4, status
    assert status["Gid"] == [str(gid)] * 4, status
    if flow != "userns":  # a userns shows unmapped groups as the overflow gid
        assert sorted(status["Groups"]) == sorted(groups), status


def test_the_payload_starts_with_no_signal_ignored_or_blocked():
    # Every process of the kit is CPython, which ignores SIGPIPE and SIGXFSZ; an ignored
    # signal stays ignored across exec, so stage 2 restores them just before the payload
    # (a payload writing to a closed pipe must die of SIGPIPE, as when started by a shell).
    result = run(
        "reference", "root", ["/bin/sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status"]
    )
    assert result.exit_code == 0, result.stderr
    masks = dict(line.split(":\t") for line in result.stdout.splitlines())
    assert masks == {"SigIgn": "0" * 16, "SigBlk": "0" * 16}, masks


def test_a_container_proc_without_proc_sys_leaves_stage_2_its_capability_count():
    """An engine may mount the container's /proc with subset=pid (no /proc/sys): stage 2
    still drops the bounding set, which needs the kernel's highest capability number,
    read before any namespace (blind round 6 found the run failed)."""
    result = run("blind6_kit_correct:ProcSubsetPid", "root", ["/bin/sh", "-c", "ls /proc/sys"])
    assert result.exit_code != 0 and "No such file" in result.stderr, result  # no /proc/sys
    assert not result.ledger.select("stage2_failed"), result
    assert result.ledger.select("stage2_exec"), result


def test_start_process_exiting_is_reported_by_stage_2_outside_a_pid_namespace_too():
    # Without a new pid namespace, nor the host sandbox's, stage 2's pid is a host pid, not
    # 1 or another number CPython caches: the report must hang on the pid's value only.
    result = run(
        "kit_test_engines:FaultEngine",
        "root",
        ["/bin/true"],
        sandbox=False,
        engine_config={
            "fault_hook": "start_process",
            "fault_action": "exit",
            "namespaces": ["mount", "uts"],
            "mount_proc": False,
        },
    )
    assert result.exit_code == 3, result.stderr
    assert result.ledger.first("process_start", role="stage2")["nspid"][0] > 256
    assert result.ledger.first("stage2_failed")["message"] == (
        "start_process exited with code 3 instead of exec"
    )


def test_init_config_hears_privileged_stage1_only_in_stage_1_of_a_setuid_flow():
    # An engine may trust privileged_stage1 to do privileged setup (contract.init_config):
    # stage 2 runs engine code after the drop to the payload's credentials.
    result = run("reference", "suid", ["/bin/true"])
    assert result.exit_code == 0, result.stderr
    told = {
        e["role"]: e["args"]["privileged_stage1"]
        for e in result.ledger.select("hook_enter", hook="init_config")
    }
    assert told == {"stage1": True, "master": False, "rpc": False, "stage2": False}, told


def test_a_child_of_start_process_exiting_is_not_reported_as_stage_2_exiting():
    # os._exit is stage 2's reporting one in every child the engine forks from it: only
    # stage 2 itself says it exited instead of exec'ing. A child's pid is above its parent's.
    result = run(
        "kit_test_engines:FaultEngine",
        "root",
        ["/bin/sh", "-c", "exit 4"],
        engine_config={"fault_hook": "start_process", "fault_action": "child_exits"},
    )
    assert result.exit_code == 4, (result.reason, result.stderr)
    assert result.ledger.select("stage2_failed") == []
