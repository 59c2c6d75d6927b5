"""The ledger's privilege snapshots agree with the kernel's own report.

The report engine has separate programs (/bin/cat, /usr/bin/stat) read
/proc/PID/task/TID/status and /proc/PID/ns/* from inside each hook; the snapshot the kit
took at that hook's entry must say the same.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

from kit.ledger import probe
from kit.run.launcher import run
from kit.system import linux

REPORT = "kit_test_engines:ReportEngine"
NS_NAMES = {"mnt": "mount"}


def parse_status(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def caps(field: str) -> list[str]:
    return linux.mask_to_caps(int(field, 16))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return {}


def report_run(flow, shared_dir):
    result = run(
        REPORT,
        flow,
        ["/bin/true"],
        shared_dirs=[shared_dir],
        engine_config={"report_dir": shared_dir, "mount_tmp": False},
    )
    assert result.exit_code == 0, result.reason
    return result


def test_snapshots_match_the_kernel(flow, shared_dir):
    result = report_run(flow, shared_dir)
    files = sorted(glob.glob(os.path.join(shared_dir, "*.status")))
    checked, ns_checked = set(), set()
    for path in files:
        role, hook = os.path.basename(path)[: -len(".status")].split("-", 1)
        with open(path) as f:
            status = parse_status(f.read())
        with open(path[: -len(".status")] + ".ns") as f:
            ns = {
                NS_NAMES.get(p.split()[0].rsplit("/", 1)[1], p.split()[0].rsplit("/", 1)[1]): int(
                    p.split()[1]
                )
                for p in f.read().splitlines()
            }
        event = result.ledger.first("hook_enter", role=role, hook=hook)
        assert event is not None, (role, hook)
        snap = event["snapshot"]
        tid = int(status["Pid"])
        thread = next(t for t in snap["threads"] if t["tid"] == tid)
        where = f"{flow} {role} {hook}"
        assert thread["uid"] == [int(x) for x in status["Uid"].split()], where
        assert thread["gid"] == [int(x) for x in status["Gid"].split()], where
        assert thread["groups"] == [int(x) for x in status["Groups"].split()], where
        for key, field in (
            ("effective", "CapEff"),
            ("permitted", "CapPrm"),
            ("inheritable", "CapInh"),
            ("bounding", "CapBnd"),
            ("ambient", "CapAmb"),
        ):
            assert thread["caps"][key] == caps(status[field]), (where, key)
        assert thread["no_new_privs"] == (status["NoNewPrivs"] == "1"), where
        assert thread["seccomp"] == int(status["Seccomp"]), where
        if len(ns) == 7:  # a non-dumpable process (the setuid master) hides its ns links
            assert snap["ns"] == ns, where
            ns_checked.add((role, hook))
        checked.add((role, hook))
    assert checked == {
        ("stage1", "prepare_config"),
        ("master", "create_container"),
        ("master", "post_start_process"),
        ("master", "cleanup_container"),
        ("stage2", "start_process"),
    }
    if flow == "root":
        assert ns_checked == checked


def test_snapshot_reads_every_thread():
    # The master runs hooks in threads besides its main thread (its poll loop): a hook's
    # snapshot lists both, and the thread of the hook itself.
    result = run("reference", "root", ["/bin/true"])
    event = result.ledger.first("hook_enter", role="master", hook="post_start_process")
    tids = [t["tid"] for t in event["snapshot"]["threads"]]
    assert event["tid"] != event["pid"] and {event["tid"], event["pid"]} <= set(tids), tids


def test_escalation_probe_says_possible_only_where_privilege_remains(flow):
    result = run("reference", flow, ["/bin/true"])
    stage1 = result.ledger.first("hook_enter", role="stage1", hook="prepare_config")
    master = result.ledger.first("hook_enter", role="master", hook="create_container")
    stage2 = result.ledger.first("hook_enter", role="stage2", hook="start_process")
    if flow != "root":  # stage 2 has no_new_privs and no saved root in every other flow
        assert stage2["escalation"]["host_escalation"] is False
    if flow == "root":
        assert stage1["escalation"]["host_userns"] is True
    elif flow in ("suid", "hybrid"):
        assert stage1["escalation"]["host_escalation"] is False
        # The setuid master keeps saved uid 0: setresuid(0) from a child works.
        assert master["escalation"]["setresuid_root"] is True
        assert master["escalation"]["host_escalation"] is True
        assert master["snapshot"]["threads"][0]["uid"][2] == 0
        assert master["snapshot"]["threads"][0]["caps"]["effective"] == []
    else:
        assert master["escalation"]["host_userns"] is False
        assert master["escalation"]["host_escalation"] is False
        # Stage 1 is plain U: no host privilege (a setuid binary could still be exec'd).
        assert not probe.host_privilege(stage1["snapshot"])
        assert stage1["escalation"]["setuid_exec"] is True


def test_the_setuid_probe_binary_prints_the_effective_uid_it_runs_with(tmp_path):
    """Whatever the kit puts there (its own static program, or a copy of id), it answers
    as ``id -u`` does: the effective uid, which its set-user-ID bit makes 0."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("only root can make a setuid-root binary")
    tmp_path.chmod(0o755)
    binary = probe.provide_setuid_binary(str(tmp_path))
    assert binary.unavailable == "" and os.stat(binary.path).st_mode & 0o4000

    def as_nobody(*extra: str) -> str:
        proc = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                *extra,
                binary.path,
                "-u",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert as_nobody() == "0\n"  # the set-user-ID bit counts
    assert as_nobody("--no-new-privs") == "65534\n"  # and here it does not
    program = probe.euid_program()
    if program is not None:
        assert Path(binary.path).read_bytes() == program
        for uid in (7, 10, 1234567):  # every digit, carried and not
            plain = tmp_path / "plain"
            plain.write_bytes(program)
            plain.chmod(0o755)
            out = subprocess.run(
                ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", str(plain)],
                capture_output=True,
                text=True,
            ).stdout
            assert out == f"{uid}\n"


def test_snapshot_masks_on_the_wire_are_names_in_the_ledger():
    """Datagrams carry capability masks (a fifth of the JSON); a Ledger shows names, for the
    snapshot's threads and the RPC credentials alike, and leaves anything else alone."""
    from kit.ledger.record import Ledger

    wire = probe.snapshot(masks=True)
    names = probe.snapshot()
    mine = wire["threads"][0]["caps"]
    assert all(type(v) is int for v in mine.values())
    assert probe.named_caps(mine) == names["threads"][0]["caps"]
    effective = linux.caps_to_mask(["CAP_CHOWN", "CAP_KILL"])
    creds = {
        "caps": {"effective": effective, "bounding": ["CAP_KILL"]},
        "threads": [{"tid": 1, "caps": {"permitted": 1, "ambient": True, "inheritable": -1}}],
    }
    ledger = Ledger(
        {
            "schema_version": 1,
            "events": [
                {
                    "kind": "hook_enter",
                    "snapshot": {"threads": [{"tid": 1, "caps": {"effective": 0}}]},
                },
                {"kind": "rpc_call", "creds": {"before": creds, "after": None}},
                {"kind": "hook_return", "snapshot": {"probe_error": "x"}},
            ],
        }
    )
    first, call, last = ledger.events
    assert first["snapshot"]["threads"][0]["caps"] == {"effective": []}
    before = call["creds"]["before"]
    assert before["caps"] == {"effective": ["CAP_CHOWN", "CAP_KILL"], "bounding": ["CAP_KILL"]}
    # A mask is a non-negative integer: a boolean or a negative number stays as sent.
    assert before["threads"][0]["caps"] == {
        "permitted": ["CAP_CHOWN"],
        "ambient": True,
        "inheritable": -1,
    }
    assert last["snapshot"] == {"probe_error": "x"}
