"""The must-show of the fake backend: the whole lifecycle, in every flow, launched by an
unprivileged uid in an environment where namespace creation is denied.

The pytest process never changes credentials (the conftest guard), so a helper interpreter
does it: it forks a child that installs a seccomp filter making ``unshare``/``clone`` with
CLONE_NEWUSER fail with EPERM (and ``clone3`` with ENOSYS, so that glibc falls back to
``clone``), drops to the test user U, proves that creating a user namespace now fails — by
the raw system call and with util-linux's ``unshare -U`` — and then runs
``python -m kit run --backend fake --flow F -- /bin/sh -c 'exit 7'`` for every flow, plus
``python -m kit flows`` (``auto`` must choose fake everywhere).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from kit.run.request import Invoker
from kit.starter.config import FLOWS

HELPER = r'''
import ctypes, json, os, platform, struct, subprocess, sys

python, workdir, uid, gid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
flows = sys.argv[5].split(",")
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER = 0x10000000
ARCH = {"x86_64": (0xC000003E, 272, 56, 435), "aarch64": (0xC00000B7, 97, 220, 435)}


def seccomp_deny_userns():
    audit_arch, nr_unshare, nr_clone, nr_clone3 = ARCH[platform.machine()]
    LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
    ALLOW, ERRNO = 0x7FFF0000, 0x00050000
    prog = [
        (LD, 0, 0, 4),                      # 0: arch
        (JEQ, 0, 4, audit_arch),            # 1: other arch -> allow
        (LD, 0, 0, 0),                      # 2: syscall number
        (JEQ, 3, 0, nr_unshare),            # 3: -> 7
        (JEQ, 2, 0, nr_clone),              # 4: -> 7
        (JEQ, 5, 0, nr_clone3),             # 5: -> 11
        (RET, 0, 0, ALLOW),                 # 6
        (LD, 0, 0, 16),                     # 7: args[0], low 32 bits
        (JSET, 0, 1, CLONE_NEWUSER),        # 8
        (RET, 0, 0, ERRNO | 1),             # 9: EPERM
        (RET, 0, 0, ALLOW),                 # 10
        (RET, 0, 0, ERRNO | 38),            # 11: ENOSYS (glibc falls back to clone)
    ]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
    ul = ctypes.c_ulong
    if libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ul(SECCOMP_MODE_FILTER),
                  ul(ctypes.addressof(fbuf)), ul(0), ul(0)) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def child(w):
    report = {}
    seccomp_deny_userns()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    report["ids"] = [os.getresuid(), os.getresgid()]
    with open("/proc/self/status") as f:
        status = dict(l.split(":", 1) for l in f if ":" in l)
    report["seccomp"] = status["Seccomp"].strip()
    report["cap_eff"] = status["CapEff"].strip()
    rc = libc.unshare(ctypes.c_int(CLONE_NEWUSER))
    report["unshare_rc"], report["unshare_errno"] = rc, ctypes.get_errno()
    p = subprocess.run(["unshare", "-U", "true"], capture_output=True, text=True)
    report["unshare_cmd"] = [p.returncode, p.stderr.strip()]
    p = subprocess.run([python, "-m", "kit", "flows"], capture_output=True, text=True,
                       cwd=workdir)
    report["flows"] = [p.returncode, p.stdout, p.stderr[-2000:]]
    report["runs"] = {}
    for flow in flows:
        ledger = os.path.join(workdir, f"ledger-{flow}.json")
        p = subprocess.run([python, "-m", "kit", "run", "--backend", "fake", "--engine",
                            "reference", "--flow", flow, "--ledger", ledger, "--",
                            "/bin/sh", "-c", "exit 7"], capture_output=True, text=True,
                           cwd=workdir, timeout=120)
        report["runs"][flow] = {"code": p.returncode, "stderr": p.stderr[-3000:],
                                "ledger": ledger if os.path.exists(ledger) else None}
    suite_report = os.path.join(workdir, "suite.json")
    p = subprocess.run([python, "-m", "pytest", "--engine=reference", "--backend=auto",
                        "-p", "no:cacheprovider", "-q", f"--conformance-report={suite_report}"],
                       capture_output=True, text=True, cwd=workdir, timeout=600)
    report["suite"] = {"code": p.returncode, "tail": p.stdout[-3000:] + p.stderr[-2000:],
                       "report": suite_report if os.path.exists(suite_report) else None}
    os.write(w, json.dumps(report).encode())


r, w = os.pipe()
pid = os.fork()
if pid == 0:
    code = 0
    try:
        os.close(r)
        child(w)
    except BaseException as exc:
        os.write(w, json.dumps({"error": repr(exc)}).encode())
        code = 1
    os._exit(code)
os.close(w)
data = b""
while chunk := os.read(r, 65536):
    data += chunk
_, status = os.waitpid(pid, 0)
print(data.decode())
'''


@pytest.fixture(scope="module")
def unprivileged_report():
    if os.geteuid() != 0:
        pytest.skip("needs root to set up the unprivileged, namespace-less launcher")
    try:
        user = Invoker.resolve()
    except ValueError as exc:
        pytest.skip(str(exc))
    workdir = tempfile.mkdtemp(prefix="kit-fake-unpriv-", dir="/tmp")
    os.chmod(workdir, 0o777)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                HELPER,
                sys.executable,
                workdir,
                str(user.uid),
                str(user.gid),
                ",".join(FLOWS),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=workdir,
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert "error" not in report, report
        for run in report["runs"].values():
            if run["ledger"]:
                with open(run["ledger"]) as f:
                    run["ledger"] = json.load(f)
        if report.get("suite", {}).get("report"):
            with open(report["suite"]["report"]) as f:
                report["suite"]["report"] = json.load(f)
        report["user"] = user
        yield report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_launcher_is_unprivileged_and_cannot_create_namespaces(unprivileged_report):
    r = unprivileged_report
    u = r["user"]
    assert r["ids"] == [[u.uid] * 3, [u.gid] * 3]
    assert int(r["cap_eff"], 16) == 0
    assert r["seccomp"] == "2"  # a filter is loaded
    # The proof: unshare(CLONE_NEWUSER) fails (EPERM), by the raw call and by the tool.
    assert r["unshare_rc"] == -1 and r["unshare_errno"] == 1
    assert r["unshare_cmd"][0] != 0 and "Operation not permitted" in r["unshare_cmd"][1]


def test_auto_chooses_fake_for_every_flow_there(unprivileged_report):
    code, stdout, stderr = unprivileged_report["flows"]
    assert code == 0, stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in stdout.splitlines()}
    assert set(rows) == set(FLOWS)
    for flow, (backend, why) in rows.items():
        assert backend == "fake", (flow, why)
    assert "Operation not permitted" in rows["userns"][1]


@pytest.mark.parametrize("flow", FLOWS)
def test_every_flow_runs_in_fake_mode_unprivileged(unprivileged_report, flow):
    run = unprivileged_report["runs"][flow]
    assert run["code"] == 7, run["stderr"]
    ledger = run["ledger"]
    assert ledger is not None, run["stderr"]
    start = ledger["events"][0]
    assert start["kind"] == "run_start" and start["backend"] == "fake"
    u = unprivileged_report["user"]
    assert start["invoker"]["uid"] == u.uid  # the launcher itself is U
    hooks = [(e["role"], e["hook"]) for e in ledger["events"] if e["kind"] == "hook_enter"]
    assert len({h for _, h in hooks}) == 8
    leaks = [e for e in ledger["events"] if e["kind"] == "leak"]
    assert leaks == []
    stage2 = next(
        e for e in ledger["events"] if e["kind"] == "hook_enter" and e["hook"] == "start_process"
    )
    assert stage2["pid"] == 1 and stage2["snapshot"]["nspid"] == [1]
    stage1 = next(
        e for e in ledger["events"] if e["kind"] == "hook_enter" and e["role"] == "stage1"
    )
    # The model, not the real process, is root where the flow needs it.
    expected_stage1_uid = 0 if flow == "root" else u.uid
    assert stage1["snapshot"]["threads"][0]["uid"][0] == expected_stage1_uid


def test_the_conformance_suite_passes_in_fake_mode_unprivileged(unprivileged_report):
    """`pytest --engine=reference` as U, namespaces denied: every flow runs on the fake
    backend, 0 failed, 0 broken; kernel-only checks are not-configured, never passed."""
    suite = unprivileged_report["suite"]
    assert suite["code"] == 0, suite["tail"]
    doc = suite["report"]
    assert doc is not None, suite["tail"]
    assert doc["summary"]["failed"] == 0 and doc["summary"]["broken"] == 0, doc["summary"]
    assert doc["summary"]["passed"] > 100
    assert {r["flow"] for r in doc["results"]} == set(FLOWS)
    assert {r["backend"] for r in doc["results"]} == {"fake"}
    assert set(doc["environment"]["backend"].values()) == {"fake"}
    payload = [r for r in doc["results"] if r["requirement"].startswith("PRIV-PAYLOAD")]
    assert payload and all(r["outcome"] == "not-configured" for r in payload)
