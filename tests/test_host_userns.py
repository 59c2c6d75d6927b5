"""Host privilege by the identity of the launch user namespace, and escalation probes that
try each way on its own (SPEC §4), in both backends; and the kit launched inside a
non-initial user namespace (``0 0 65536``, the full range) still passes the reference engine
and kills the mutants that declare escalation or host-privilege requirements.

The scenarios run in a helper interpreter per backend (a FakeSystem registers fork hooks in
the process that makes it), each in a forked child of it, as root, and report JSON.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
from conftest import in_child

from kit.ledger import probe
from kit.system import linux

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "tests", "userns_launch.py")
U, G = 4242, 4242

HELPER = r'''
import json, os, sys, tempfile
from kit.system import linux
from kit.ledger import probe
from kit import system
from kit.system.fake import FakeSystem

U, G = 4242, 4242
BIND = 1 << 10  # CAP_NET_BIND_SERVICE
SETUID = 1 << 7  # CAP_SETUID


def saved_root(s):  # the setuid master: r=e=U, saved 0, permitted full, effective empty
    s.emulate_setuid_exec(U, G, [])
    s.drop_effective(U)


def only_saved_root(s):  # saved uid 0 and not one capability
    s.become_user(U, G, [], saved_uid=0)
    s.set_capabilities(0, 0, 0)


def permitted_bind(s):  # plain U keeping one permitted capability
    s.become_user(U, G, [], keep_caps=True)
    s.set_capabilities(0, BIND, 0)


def permitted_setuid(s):  # CAP_SETUID permitted, not effective: raising it is one way
    s.become_user(U, G, [], keep_caps=True)
    s.set_capabilities(0, SETUID, 0)


def plain_user(s):
    s.become_user(U, G, [])


def plain_user_nnp(s):
    s.become_user(U, G, [])
    s.set_no_new_privs()


def saved_root_nnp(s):
    saved_root(s)
    s.set_no_new_privs()


def child_userns_root(s):  # root of a child user namespace mapping 0 -> 0: every capability
    s.unshare(["user"])
    s.write_id_maps("self", [[0, 0, 1]], [[0, 0, 1]], True)


def child_userns_user(s):  # U in a user namespace of its own: every capability there
    s.become_user(U, G, [])
    s.unshare(["user"])


def root(s):
    pass


SCENARIOS = [root, saved_root, only_saved_root, permitted_bind, permitted_setuid, plain_user,
             plain_user_nnp, saved_root_nnp, child_userns_root, child_userns_user]


def run(s, scenario):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        out = {}
        try:
            scenario(s)
            before = s.snapshot()
            out["escalation"] = s.escalation()
            after = s.snapshot()
            out["unchanged"] = [t["uid"] for t in before["threads"]] == \
                [t["uid"] for t in after["threads"]] and before["threads"][0]["caps"] == \
                after["threads"][0]["caps"]
            out["host_privilege"] = probe.host_privilege(before)
            out["privileged"] = s.privileged()
            out["uid"] = before["threads"][0]["uid"]
        except BaseException as exc:
            out["error"] = repr(exc)
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


backend = sys.argv[1]
work = tempfile.mkdtemp()
os.chmod(work, 0o755)
try:
    if backend == "real":
        s = system.RealSystem()
        probe.configure(None, probe.provide_setuid_binary(work))
    else:
        s = FakeSystem.create(needs_root=True, directory=work)
        probe.configure(None, probe.SetuidBinary(os.path.join(work, probe.SETUID_DIR, "id")))
    print(json.dumps({f.__name__: run(s, f) for f in SCENARIOS}))
finally:
    if backend == "fake":
        s.close()
    probe.remove_setuid_binary(work)
    os.rmdir(work)
'''


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (setuid-root binary, credential transitions)")


@pytest.fixture(scope="module")
def scenarios() -> dict[str, dict[str, dict]]:
    _needs_root()
    out = {}
    for backend in ("real", "fake"):
        proc = subprocess.run(
            [sys.executable, "-c", HELPER, backend],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        assert proc.returncode == 0, proc.stderr
        out[backend] = json.loads(proc.stdout)
    return out


BACKENDS = ("real", "fake")


def esc(scenarios, backend, name):
    result = scenarios[backend][name]
    assert "error" not in result, result
    assert result["unchanged"], f"{name}: the probe changed the hooked process"
    return result["escalation"]


# --- host privilege: the failing side of each predicate ---------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_a_saved_uid_0_is_host_privilege(scenarios, backend):
    r = scenarios[backend]["only_saved_root"]
    assert r["uid"][:3] == [U, U, 0]
    assert r["host_privilege"] is True
    assert scenarios[backend]["plain_user"]["host_privilege"] is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_permitted_capability_in_the_host_user_namespace_is_host_privilege(scenarios, backend):
    r = scenarios[backend]["permitted_bind"]
    assert r["uid"][:3] == [U, U, U]
    assert r["host_privilege"] is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_uid_0_and_every_capability_in_a_child_user_namespace_is_not(scenarios, backend):
    for name in ("child_userns_root", "child_userns_user"):
        r = scenarios[backend][name]
        assert r["host_privilege"] is False, name
        assert r["privileged"] is False, name
        e = esc(scenarios, backend, name)
        assert e["host_userns"] is False and e["host_escalation"] is False, (name, e)
    root = scenarios[backend]["child_userns_root"]
    assert root["uid"][:3] == [0, 0, 0]
    assert esc(scenarios, backend, "child_userns_root")["setresuid_root"] is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_privileged_agrees_with_host_privilege_of_the_same_state(scenarios, backend):
    r = scenarios[backend]["root"]
    assert r["privileged"] is True and r["host_privilege"] is True
    assert esc(scenarios, backend, "root")["host_userns"] is True
    for name in ("saved_root", "plain_user", "child_userns_root"):
        assert scenarios[backend][name]["privileged"] is False, name


def test_host_privilege_is_judged_against_the_given_identity_not_the_uid_map():
    me = linux.userns_identity()
    snap = {
        "threads": [{"uid": [0, 0, 0, 0], "caps": {"permitted": ["CAP_CHOWN"]}}],
        "uid_map": [[0, 0, 65536]],
        "ns": {"user": me[1]},
    }
    assert probe.host_privilege(snap, me) is True  # launched in a namespace mapping 0 0 65536
    snap_full = dict(snap, uid_map=probe.FULL_MAP)
    assert probe.host_privilege(snap_full, [me[0], me[1] + 1]) is False  # full map, not ours
    assert probe.host_privilege(dict(snap, ns={"user": None}), [me[0], me[1] + 1]) is True


def test_a_full_range_map_in_a_child_namespace_is_not_the_host():
    _needs_root()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        report = {}
        try:
            linux.unshare(linux.ns_flags(["user"]))
            os.write(ready_w, b"u")
            os.read(go_r, 1)
            snap = probe.snapshot()
            report = {
                "uid_map": snap["uid_map"],
                "host": probe.host_privilege(snap),
                "uid": snap["threads"][0]["uid"],
                "escalation": probe.escalation(),
            }
        except BaseException as exc:
            report = {"error": repr(exc)}
        os.write(out_w, json.dumps(report).encode())
        os._exit(0)
    for fd in (ready_w, go_r, out_w):
        os.close(fd)
    try:
        assert os.read(ready_r, 1) == b"u"
        linux.write_id_maps(pid, [(0, 0, 4294967295)], [(0, 0, 4294967295)], False)
        os.write(go_w, b"g")
        with os.fdopen(out_r, "rb") as f:
            report = json.loads(f.read())
    finally:
        os.waitpid(pid, 0)
        for fd in (ready_r, go_w):
            os.close(fd)
    assert report["uid_map"] == probe.FULL_MAP, report
    assert report["uid"][:3] == [0, 0, 0]
    assert report["host"] is False
    assert report["escalation"]["host_userns"] is False
    assert report["escalation"]["host_escalation"] is False


# --- the conformance checks judge against the run's recorded identity ---------------------------

HOST_USER, OTHER_USER = 4026531837, 4026532400


def _stage1_run(host_userns: list[int] | None):
    """A userns-flow ledger whose stage 1 keeps a permitted capability, in user namespace
    HOST_USER, with a uid map of the full range; the run_start records ``host_userns``."""
    from types import SimpleNamespace

    from conformance.runs import Run
    from conformance.scenario import SCENARIOS

    snap = {
        "threads": [
            {
                "tid": 10,
                "uid": [U] * 4,
                "gid": [G] * 4,
                "groups": [],
                "caps": {
                    "effective": [],
                    "permitted": ["CAP_SYS_ADMIN"],
                    "inheritable": [],
                    "bounding": ["CAP_SYS_ADMIN"],
                    "ambient": [],
                },
                "no_new_privs": False,
                "seccomp": 0,
            }
        ],
        "ns": {"user": HOST_USER},
        "uid_map": probe.FULL_MAP,
        "gid_map": [],
        "securebits": 0,
        "dumpable": 1,
        "nspid": [10],
    }
    start = {"kind": "run_start", "role": "supervisor", "invoker": {"uid": U, "gid": G}}
    if host_userns is not None:
        start["host_userns"] = host_userns
    events = [
        start,
        {
            "kind": "hook_enter",
            "role": "stage1",
            "hook": "config",
            "snapshot": snap,
            "escalation": {"host_escalation": False},
        },
    ]
    for i, event in enumerate(events):
        event.update(seq=i, pid=100, tid=10, t=i)
    ledger = SimpleNamespace(events=events, document={"schema_version": 1, "events": events})
    result = SimpleNamespace(
        exit_code=0, reason="exited", ledger=ledger, leaks=[], timed_out=None, stdout="", stderr=""
    )
    return Run("userns", SCENARIOS["default"], "real", result=result)


def test_no_host_privilege_check_fails_a_permitted_capability_in_the_recorded_namespace():
    from conformance import checks

    verify = checks.Verifier("userns", ["PRIV-STAGE1-004"], "t")
    checks.check_privileges(verify, _stage1_run([4, HOST_USER]))
    (_violation,) = verify.violations["PRIV-STAGE1-004"]
    text = verify.render("PRIV-STAGE1-004")
    assert f"user namespace {HOST_USER} (host)" in text and "CAP_SYS_ADMIN" in text
    assert "role: stage1" in text and "hook: config" in text


def test_no_host_privilege_check_passes_the_same_state_in_another_namespace():
    from conformance import checks

    verify = checks.Verifier("userns", ["PRIV-STAGE1-004"], "t")
    # its uid map maps the full range: only the identity says it is not the host's
    checks.check_privileges(verify, _stage1_run([4, OTHER_USER]))
    assert verify.violations["PRIV-STAGE1-004"] == []
    assert verify.checks["PRIV-STAGE1-004"] == 1


def test_a_ledger_without_the_host_identity_is_a_harness_error():
    from conformance import checks
    from conformance.runs import HarnessError

    verify = checks.Verifier("userns", ["PRIV-STAGE1-004"], "t")
    with pytest.raises(HarnessError, match="host user namespace"):
        checks.check_privileges(verify, _stage1_run(None))


# --- escalation: each way tried on its own -----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_setuid_master_can_raise_its_permitted_capabilities_without_regaining_uid_0(
    scenarios, backend
):
    e = esc(scenarios, backend, "saved_root")
    assert len(e["raise_caps"]) >= 30  # every permitted capability (40 here), not []
    assert e["setresuid_root"] is True and e["setuid_exec"] is True
    assert e["host_escalation"] is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_raising_a_capability_is_tried_apart_from_setresuid(scenarios, backend):
    e = esc(scenarios, backend, "permitted_setuid")
    assert e["raise_caps"] == ["CAP_SETUID"]
    assert e["setresuid_root"] is False  # CAP_SETUID raised then lowered before setresuid
    e = esc(scenarios, backend, "permitted_bind")
    assert e["raise_caps"] == ["CAP_NET_BIND_SERVICE"] and e["setresuid_root"] is False
    assert e["host_escalation"] is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_setuid_binary_is_really_executed_even_with_saved_uid_0(scenarios, backend):
    e = esc(scenarios, backend, "only_saved_root")
    assert e["setuid_exec"] is True and e["setuid_exec_euid"] == 0  # was derived: False
    assert e["raise_caps"] == [] and e["setresuid_root"] is True
    e = esc(scenarios, backend, "plain_user")
    assert e == {
        "setresuid_root": False,
        "raise_caps": [],
        "setuid_exec": True,
        "setuid_exec_euid": 0,
        "host_userns": True,
        "host_escalation": True,
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_new_privs_makes_the_setuid_bit_inert(scenarios, backend):
    e = esc(scenarios, backend, "plain_user_nnp")
    assert e == {
        "setresuid_root": False,
        "raise_caps": [],
        "setuid_exec": False,
        "setuid_exec_euid": U,
        "host_userns": True,
        "host_escalation": False,
    }
    e = esc(scenarios, backend, "saved_root_nnp")
    assert e["setuid_exec"] is False and e["setuid_exec_euid"] == U
    assert e["setresuid_root"] is True  # no_new_privs does not stop setresuid


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_setuid_root_binary_is_inert_where_root_is_not_mapped(scenarios, backend):
    e = esc(scenarios, backend, "child_userns_user")
    assert e["setuid_exec"] is False and e["setuid_exec_euid"] == 65534
    e = esc(scenarios, backend, "child_userns_root")  # 0 -> 0 mapped: euid 0 there
    assert e["setuid_exec"] is True and e["host_escalation"] is False


def test_both_backends_give_the_same_verdict_for_every_scenario(scenarios):
    for name in scenarios["real"]:
        real, fake = (dict(scenarios[b][name]) for b in BACKENDS)
        assert real == fake, name


def test_a_nosuid_run_directory_gives_no_binary_and_the_way_is_not_tried(tmp_path):
    _needs_root()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the pipe
        report = {}
        try:
            linux.unshare(linux.ns_flags(["mount"]))
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            linux.mount("tmpfs", str(tmp_path), "tmpfs", linux.MS_NOSUID)
            binary = probe.provide_setuid_binary(str(tmp_path))
            probe.configure(None, binary)
            report = {"unavailable": binary.unavailable, "escalation": probe.escalation()}
        except BaseException as exc:
            report = {"error": repr(exc)}
        os.write(w, json.dumps(report).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = json.loads(f.read())
    os.waitpid(pid, 0)
    assert report.get("unavailable") == "nosuid", report
    assert report["escalation"]["setuid_exec"] is None
    assert report["escalation"]["setuid_exec_untried"] == "no-setuid-binary:nosuid"


def test_another_file_at_the_binary_path_is_not_taken_for_it(tmp_path):
    _needs_root()
    os.chmod(tmp_path, 0o755)
    binary = probe.provide_setuid_binary(str(tmp_path))
    try:
        assert isinstance(probe._spawn_setuid(binary), tuple)  # the real one is started
        probe._setuid_outcome(probe._spawn_setuid(binary))
        other = probe.SetuidBinary(binary.path, binary.dev, binary.ino + 1)
        assert probe._spawn_setuid(other) == "X!unreachable:other-file"
    finally:
        probe.remove_setuid_binary(str(tmp_path))
    assert not os.path.exists(binary.path)


# --- the kit launched inside a non-initial user namespace --------------------------------------

#: Mutants that declare escalation or host-privilege requirements (and the setuid master's
#: credential rule): on a plain host the suite kills them; inside a user namespace too.
PRIVILEGE_MUTANTS = (
    "master-gives-up-privilege",
    "ambient-caps-for-user",
    "starter-userns-flows-as-root",
    "starter-setuid-stage1-keeps-saved-root",
    "master-keeps-euid-root",
)
MAPS = (65536, 4294967295)
MATRIX = (
    "import json, sys; from mutants import matrix as M; "
    "m = M.run_matrix('real', 2, sys.argv[1:], baselines=False); "
    "print(json.dumps(m.entries))"
)


def _environment() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_", "CONFORMANCE_", "COVERAGE_")) and k != "COV_CORE_SOURCE"
    }
    env["PYTHONPATH"] = ROOT
    return env


def in_userns(
    count: int, argv: list[str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``argv`` as root of a new user namespace mapping ``0 0 count`` (uids and gids)."""
    return subprocess.run(
        [sys.executable, LAUNCH, str(count), "--", *argv],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _matrix(count: int | None) -> dict[tuple[str, str], dict]:
    """The kill matrix of :data:`PRIVILEGE_MUTANTS` (real backend), on the plain host
    (``count`` None) or inside a user namespace mapping ``0 0 count``."""
    command = [sys.executable, "-c", MATRIX, *PRIVILEGE_MUTANTS]
    if count is not None:
        proc = in_userns(count, command)
    else:
        proc = subprocess.run(
            command,
            cwd=ROOT,
            env=_environment(),
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = json.loads(proc.stdout.splitlines()[-1])
    return {(e["mutant"], e["flow"]): e for e in entries}


@pytest.fixture(scope="module")
def plain_host_matrix() -> dict[tuple[str, str], dict]:
    _needs_root()
    return _matrix(None)


@pytest.mark.parametrize("count", MAPS)
def test_flows_says_the_kit_runs_inside_a_non_initial_user_namespace(count):
    _needs_root()
    proc = in_userns(count, [sys.executable, "-m", "kit", "flows"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    flows, _, note = proc.stdout.partition("\n\n")
    assert len(flows.splitlines()) == 5
    assert "non-initial user namespace" in note and f"uid_map '0 0 {count}'" in note
    assert "judged relative to this namespace" in note


@pytest.mark.parametrize("count", MAPS)
def test_the_reference_engine_passes_everything_launched_inside_a_user_namespace(count, tmp_path):
    _needs_root()
    report = tmp_path / "report.json"
    os.chmod(tmp_path, 0o755)
    proc = in_userns(
        count,
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "--engine=reference",
            "--backend=real",
            f"--conformance-report={report}",
        ],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    doc = json.loads(report.read_text())
    summary = doc["summary"]
    assert summary.get("failed", 0) == 0 and summary.get("broken", 0) == 0, summary
    assert summary.get("passed", 0) >= 300, summary
    assert {r["backend"] for r in doc["results"]} == {"real"}
    escalation = [
        r
        for r in doc["results"]
        if r["requirement"] == "PRIV-MASTER-003" and r["flow"] in ("suid", "hybrid")
    ]
    assert [r["outcome"] for r in escalation] == ["passed", "passed"]
    # Sandboxed: each run's host diff judged (a run without a sandbox leaves HOST-* not
    # configured).
    host = [r["outcome"] for r in doc["results"] if r["requirement"].startswith("HOST-")]
    assert host and set(host) == {"passed"}, host


#: Run inside the user namespace: the hostile engine, only if the kit sandboxes it by
#: default there (else nothing hostile runs), and the HOST-* verdicts of its result.
ATTACK = r'''
import json, sys
from conformance import checks
from conformance.runs import Run
from conformance.scenario import SCENARIOS
from kit.run import sandbox
from kit.run.launcher import run

config = json.loads(sys.argv[1])
out = {"default_on": sandbox.default_on()}
if out["default_on"]:
    # Plain runs first: the second one adopts a sandbox the zygote built ahead.
    plain = [run("reference", "root", ["/bin/true"]) for _ in range(2)]
    out["plain"] = [[r.exit_code, r.host_changes] for r in plain]
    out["plain_unread"] = [
        e["errors"] for r in plain for e in r.events if e["kind"] == "host_changes"
    ]
    result = run(
        "kit_test_engines:HostAttackEngine", "root", ["/bin/true"], engine_config=config,
        shared_dirs=[config["report_dir"]],
    )
    out.update(
        exit=result.exit_code, problems=result.problems(), changes=result.host_changes,
        sandboxed=result.ledger.document["run"]["sandbox"],
        unread=[e["errors"] for e in result.events if e["kind"] == "host_changes"],
    )
    with open(config["report_dir"] + "/mountinfo") as f:  # the sandbox's, as the run saw it
        out["uppers"] = sorted(line.split()[4] for line in f if " - overlay " in line)
    for req in ("HOST-001", "HOST-003"):
        verify = checks.Verifier("root", [req], "t")
        checks.check_host(verify, Run("root", SCENARIOS["default"], "real", result=result))
        out[req] = "\n".join(v.observed for v in verify.violations[req])
print(json.dumps(out))
'''


@pytest.fixture
def attack_targets(shared_dir):
    """Host paths this test owns for the engine to attack, under a directory it makes in
    /var/tmp: files to write (there, in a subdirectory, and directly in ``/``), files to
    delete; and /mnt, outside every writable place, for the test's child to mount on in a
    mount namespace of its own."""
    base = tempfile.mkdtemp(prefix="kit-usernstest-", dir="/var/tmp")
    os.chmod(base, 0o777)
    plain = os.path.join(base, "plain")
    os.mkdir(plain)
    os.mkdir(os.path.join(base, "mounted"))  # a mount under base: the view is split there
    victims = [os.path.join(base, "victim"), os.path.join(plain, "victim")]
    for victim in victims:
        with open(victim, "w") as f:
            f.write("placed\n")
    unique = f"kit-usernstest-{os.getpid()}-{os.path.basename(base)}"
    written = [os.path.join(base, "written"), os.path.join(plain, "written"), f"/{unique}"]
    try:
        yield {
            "acts": ["write_paths", "delete_paths", "write_read_only", "hostname", "mountinfo"],
            "unique": unique,
            "write_paths": written,
            "delete_paths": victims,
            "read_only_path": "/mnt/written",
            "report_dir": shared_dir,
        }
    finally:
        if os.path.exists(written[-1]):  # only if the sandbox failed
            os.unlink(written[-1])
        shutil.rmtree(base)


@pytest.mark.parametrize("mnt_read_only", [False, True], ids=["mnt-rw", "mnt-ro"])
@pytest.mark.parametrize("var_tmp_mounted", [False, True], ids=["plain", "var-tmp-mounted"])
@pytest.mark.parametrize("count", MAPS)
def test_a_run_launched_inside_a_user_namespace_changes_only_its_sandbox(
    count, var_tmp_mounted, mnt_read_only, attack_targets
):
    """Launched as root of a user namespace, where every mount the kit's sandbox copies is
    locked (no overlay with ``/`` as its lower layer): the run is sandboxed all the same.
    Its writes (in a directory with a mount under it, in one without, directly in ``/``),
    deletions and hostname stay in the sandbox, and the run fails HOST-001 naming each
    path and HOST-003 naming the hostname. The mounts are made in a mount namespace of a
    child of the test only: a tmpfs on /mnt and another one in it (outside the writable
    places: a copy-on-write view in pieces, with the host's flags: with ``mnt_read_only``
    the write there fails, EROFS; else it lands in the sandbox and is in HOST-001); with
    ``var_tmp_mounted``, first /var/tmp bound on itself, a copy-on-write mount point with a
    mount under it."""
    _needs_root()
    config = attack_targets
    mounted = os.path.dirname(config["read_only_path"])
    hostname = socket.gethostname()

    def launch_with_mounts_of_our_own() -> dict[str, object]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        if var_tmp_mounted:
            linux.mount("/var/tmp", "/var/tmp", None, linux.MS_BIND)
        base = os.path.dirname(os.path.dirname(config["write_paths"][1]))
        linux.mount("tmpfs", os.path.join(base, "mounted"), "tmpfs", linux.MS_NOSUID, "size=64k")
        linux.mount("tmpfs", mounted, "tmpfs", linux.MS_NOSUID, "size=64k")
        os.mkdir(os.path.join(mounted, "inner"))
        linux.mount("tmpfs", os.path.join(mounted, "inner"), "tmpfs", 0, "size=64k")
        if mnt_read_only:
            ro = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID
            linux.mount(None, mounted, None, ro)
        env = f"PYTHONPATH={ROOT}:{os.path.join(ROOT, 'tests')}"
        proc = in_userns(count, ["env", env, sys.executable, "-c", ATTACK, json.dumps(config)])
        return {
            "rc": proc.returncode,
            "stdout": proc.stdout,
            "stderr": proc.stderr[-3000:],
            "host_mnt": sorted(os.listdir(mounted)),  # as the host (this child) sees it
        }

    proc = in_child(launch_with_mounts_of_our_own)
    assert "ok" in proc and proc["ok"]["rc"] == 0, proc
    out = json.loads(proc["ok"]["stdout"].splitlines()[-1])
    assert out["default_on"] is True and out["sandboxed"] is True, out
    # The real host, from outside: as it was.
    assert [p for p in config["write_paths"] if os.path.exists(p)] == []
    for victim in config["delete_paths"]:
        with open(victim) as f:
            assert f.read() == "placed\n", victim
    assert socket.gethostname() == hostname
    assert proc["ok"]["host_mnt"] == ["inner"], proc["ok"]["host_mnt"]
    # Each act happened, in the sandbox; a read-only host mount stayed read-only.
    with open(os.path.join(config["report_dir"], "master-create_container.json")) as f:
        assert json.load(f) == {
            "write_paths": "done",
            "delete_paths": "done",
            "write_read_only": "EROFS" if mnt_read_only else "done",
            "hostname": "done",
            "mountinfo": "done",
        }
    assert out["exit"] == 0, out["problems"]
    assert out["unread"] == [{}], out["unread"]  # the diff read every kind
    assert out["plain"] == [[0, []], [0, []]] and out["plain_unread"] == [{}, {}], out
    files = {c["name"]: (c["before"], c["after"]) for c in out["changes"] if c["kind"] == "file"}
    written = [*config["write_paths"], *([] if mnt_read_only else [config["read_only_path"]])]
    assert set(files) == {*written, *config["delete_paths"]}, files
    for path in written:
        assert files[path][0] is None and files[path][1].startswith("file 0644 0:0 8 bytes")
        assert f"file {path} created: file 0644" in out["HOST-001"]
    for path in config["delete_paths"]:
        assert files[path][0].startswith("file 0644 0:0 7 bytes") and files[path][1] is None
        assert f"file {path} removed (was file 0644" in out["HOST-001"]
    assert f"hostname hostname changed: {hostname} -> hostile-{config['unique']}" in out["HOST-003"]
    # Built in pieces: the directory with no mount under it is an overlay of its own.
    assert os.path.dirname(config["write_paths"][1]) in out["uppers"], out["uppers"]
    assert ("/var/tmp" in out["uppers"]) is var_tmp_mounted, out["uppers"]


@pytest.mark.parametrize("count", MAPS)
def test_privilege_mutants_are_killed_inside_a_user_namespace_as_on_the_host(
    count, plain_host_matrix
):
    inside = _matrix(count)
    assert set(inside) == set(plain_host_matrix)
    assert {mutant for mutant, _ in inside} == {f"mutant-{m}" for m in PRIVILEGE_MUTANTS}
    for key, entry in inside.items():
        assert entry["status"] == "killed", (key, entry)
        assert set(entry["declared"]) <= set(entry["failed"]), (key, entry)
        assert entry["failed"] == plain_host_matrix[key]["failed"], key


#: Run inside the user namespace: one sandboxed run of the system's interpreter with the
#: probe and its arguments in argv[1:]; its exit code and output, or why the run could not
#: start.
PROBE_RUN = r"""
import json, sys
from kit.run.launcher import run
try:
    r = run("reference", "root", ["/usr/bin/python3", "-c", *sys.argv[1:]])
    print(json.dumps({"exit": r.exit_code, "out": r.stdout.split()}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""

#: In the sandbox: connect() to the socket argv[1], then the mount source of /mnt.
CONNECT_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as e:
    print(e.errno)
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    if fields[4] == "/mnt":
        print(fields[fields.index("-") + 2])
"""


def _probe_in_userns(setup: Callable[[str, socket.socket], str]) -> dict[str, Any]:
    """:data:`CONNECT_PROBE` run in the sandbox by root of a user namespace mapping 0-65535
    (every mount the sandbox copies locked), from a child of the test in a mount namespace
    of its own: ``setup(base, server)`` (``base``: a tmpfs of the child's in /var/tmp) makes
    the host's mounts, binds ``server`` and listens; it returns the path to connect to."""
    _needs_root()
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 to run the probe in the sandbox")

    def launch_with_mounts_of_our_own() -> dict[str, object]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        base = tempfile.mkdtemp(prefix="kit-usernstest-", dir="/var/tmp")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            linux.mount("tmpfs", base, "tmpfs", linux.MS_NOSUID, "size=64k,mode=0755")
            path = setup(base, server)
            env = f"PYTHONPATH={ROOT}:{os.path.join(ROOT, 'tests')}"
            argv = ["env", env, sys.executable, "-c", PROBE_RUN, CONNECT_PROBE, path]
            proc = in_userns(65536, argv)
        finally:
            server.close()
            linux.umount(base, linux.MNT_DETACH)
            os.rmdir(base)
        return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-3000:]}

    proc = in_child(launch_with_mounts_of_our_own)
    assert "ok" in proc and proc["ok"]["rc"] == 0, proc
    return json.loads(proc["ok"]["stdout"].splitlines()[-1])


def _overlay_on_overlay(base: str, point: str) -> None:
    """An overlay on ``point`` whose lower layer is an overlay (layers in ``base``): a view
    of it would stack a third, the kernel allows two."""
    for name in ("lower", "up1", "work1", "first", "up2", "work2"):
        os.mkdir(os.path.join(base, name))
    layers = f"lowerdir={base}/lower,upperdir={base}/up1,workdir={base}/work1"
    linux.mount("overlay", f"{base}/first", "overlay", 0, layers)
    layers = f"lowerdir={base}/first,upperdir={base}/up2,workdir={base}/work2"
    linux.mount("overlay", point, "overlay", 0, layers)


def test_in_a_user_namespace_a_refused_piece_of_a_split_view_leaves_its_mount_out():
    """An overlay on an overlay on /mnt with a tmpfs mounted in it, and a listening socket
    in a directory beside that tmpfs: the view of /mnt is split (a locked mount under it);
    its skeleton is mounted, then overlayfs refuses the directory's piece (stacked too
    deep). The build goes on, the skeleton unmounted and /mnt left out: an empty read-only
    directory (ENOENT), never the host's bound read-only, whose socket would connect."""

    def setup(base: str, server: socket.socket) -> str:
        _overlay_on_overlay(base, "/mnt")
        os.mkdir("/mnt/dir")
        os.mkdir("/mnt/sub")
        linux.mount("tmpfs", "/mnt/sub", "tmpfs", linux.MS_NOSUID, "size=64k")
        server.bind("/mnt/dir/bus")
        os.chmod("/mnt/dir/bus", 0o777)
        server.listen(1)
        return "/mnt/dir/bus"

    out = _probe_in_userns(setup)
    assert out == {"exit": 0, "out": [str(errno.ENOENT), "kit-left-out"]}, out


def test_in_a_user_namespace_a_host_socket_under_a_directory_bound_whole_is_covered():
    """A socket mounted on a file in a directory the kit cannot list (owner 100000,
    unmapped; mode 0711, so the run can still reach the file) under a tmpfs on /srv: the
    view of /srv is split and that directory bound whole, with the socket's mount, locked.
    A socket of the sandbox's own is mounted over it: nobody listens (ECONNREFUSED)."""

    def setup(base: str, server: socket.socket) -> str:
        server.bind(f"{base}/bus")
        os.chmod(f"{base}/bus", 0o777)
        server.listen(1)
        linux.mount("tmpfs", "/srv", "tmpfs", linux.MS_NOSUID, "size=64k,mode=0755")
        os.mkdir("/srv/unread", 0o711)
        os.chown("/srv/unread", 100000, 100000)
        os.close(os.open("/srv/unread/bus", os.O_WRONLY | os.O_CREAT, 0o644))
        linux.mount(f"{base}/bus", "/srv/unread/bus", None, linux.MS_BIND)
        return "/srv/unread/bus"

    out = _probe_in_userns(setup)
    assert out == {"exit": 0, "out": [str(errno.ECONNREFUSED)]}, out
