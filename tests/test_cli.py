"""``python -m kit``: run, flows, engines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import require_flow

from kit.run import environment
from kit.run.launcher import LaunchError, start
from kit.starter.config import FLOWS


def kit(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kit", *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_run_exits_with_the_payloads_code_and_writes_the_ledger(flow, tmp_path):
    ledger = tmp_path / "ledger.json"
    proc = kit(
        "run",
        "--engine",
        "reference",
        "--flow",
        flow,
        "--ledger",
        str(ledger),
        "--",
        "/bin/sh",
        "-c",
        "exit 7",
    )
    assert proc.returncode == 7, proc.stderr
    doc = json.loads(ledger.read_text())
    hooks = [(e["role"], e["hook"]) for e in doc["events"] if e["kind"] == "hook_enter"]
    assert ("stage1", "prepare_config") in hooks and ("stage2", "start_process") in hooks
    assert len({h for _, h in hooks}) == 8


def test_run_reports_engine_errors_on_stderr():
    proc = kit(
        "run",
        "--engine",
        "reference",
        "--flow",
        "root",
        "--config",
        '{"hostname": ""}',
        "--",
        "/bin/true",
    )
    assert proc.returncode == 255
    assert "prepare_config raised ConfigError: hostname" in proc.stderr


def test_run_rejects_unknown_engine_and_bad_config():
    proc = kit("run", "--engine", "nope", "--flow", "root", "--", "/bin/true")
    assert proc.returncode == 2 and "unknown engine 'nope'" in proc.stderr
    proc = kit(
        "run", "--engine", "reference", "--flow", "root", "--config", "[1]", "--", "/bin/true"
    )
    assert proc.returncode == 2 and "--config" in proc.stderr


def test_flows_lists_every_flow_with_a_reason():
    proc = kit("flows")
    assert proc.returncode == 0
    lines = proc.stdout.split("\n\n")[0].splitlines()  # then a user namespace note, if any
    assert [line.split()[0] for line in lines] == ["root", "suid", "hybrid", "userns", "fakeroot"]
    assert all(len(line.split(None, 2)) == 3 for line in lines)


def test_engines_lists_name_then_origin():
    proc = kit("engines")
    assert proc.returncode == 0
    rows = dict(line.split("\t") for line in proc.stdout.splitlines())
    assert "reference" in rows and "reference_engines.minimal" in rows["reference"]


def test_help_names_the_subcommands():
    proc = kit("--help")
    assert proc.returncode == 0
    for word in ("run", "flows", "engines"):
        assert word in proc.stdout


def test_a_run_forks_its_supervisor_from_the_cli_process_itself():
    # The payload waits on its stdin (the CLI's, handed through) while the test looks at the
    # CLI's children: the run's supervisor, and no zygote (a second interpreter).
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kit",
            "run",
            "--engine",
            "reference",
            "--flow",
            "root",
            "--",
            "/bin/sh",
            "-c",
            "read line; exit 3",
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        names: list[str] = []
        deadline = time.monotonic() + 60
        while not {"kit-supervisor", "kit-zygote"} & set(names) and time.monotonic() < deadline:
            names = [_comm(pid) for pid in _children(proc.pid)]
            time.sleep(0.01)
        assert "kit-supervisor" in names and "kit-zygote" not in names, names
        _, err = proc.communicate("go\n", timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 3, err


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def test_fork_here_refuses_a_process_with_other_threads():
    release = threading.Event()
    helper = threading.Thread(target=release.wait)
    helper.start()
    try:
        with pytest.raises(
            LaunchError,
            match=r"single-threaded launcher, this process has "
            r"\d+ threads",
        ):
            start("reference", "root", ["/bin/true"], fork_here=True)
    finally:
        release.set()
        helper.join()


def test_probes_run_only_when_the_ledger_is_kept_unless_asked(tmp_path):
    def snapshots(*options: str) -> int:
        ledger = tmp_path / "ledger.json"
        proc = kit(
            "run",
            "--engine",
            "reference",
            "--flow",
            "root",
            "--ledger",
            str(ledger),
            *options,
            "--",
            "/bin/true",
        )
        assert proc.returncode == 0, proc.stderr
        return sum(1 for e in json.loads(ledger.read_text())["events"] if e.get("snapshot"))

    assert snapshots() > 0
    assert snapshots("--no-probes") == 0
    help_text = kit("run", "--help").stdout
    assert "--probes" in help_text and "with --ledger" in help_text


def test_auto_probes_only_the_flow_asked_for(monkeypatch):
    probed: list[str] = []
    real_probe = environment._probe

    def recording(name, *args):
        probed.append(name)
        return real_probe(name, *args)

    monkeypatch.setattr(environment, "_probe", recording)
    flows = environment.Flows()
    flows["root"]
    assert probed == ["root"] if os.geteuid() == 0 else probed == []
    flows["root"], flows["suid"]  # decided once; suid needs nothing more than root and U
    assert len(probed) == (1 if os.geteuid() == 0 else 0)
    flows["userns"], flows["fakeroot"], flows["hybrid"]  # one user namespace probe for all
    assert len(probed) == (2 if os.geteuid() == 0 else 1)
    assert next(n for n in probed if n != "root").startswith("user namespace as uid")
    assert list(flows) == list(environment.SHOWN_ORDER)
    assert sorted(environment.SHOWN_ORDER) == sorted(FLOWS)
    with pytest.raises(KeyError):
        flows["rootless"]


def test_fork_here_reports_an_engine_it_cannot_load_as_a_launch_error():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from kit.run.launcher import LaunchError, start\n"
            "try:\n    start('no-such-engine', 'root', ['/bin/true'], fork_here=True)\n"
            "except LaunchError as exc:\n    print('LaunchError:', exc)\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("LaunchError: RegistryError:") and "no-such-engine" in proc.stdout


def test_run_reports_a_failure_of_the_kit_itself_in_one_message_not_a_traceback():
    # A supervisor that dies of a bug of the kit leaves no result: the CLI says so, names
    # the kit as the culprit and exits 2 (no payload status to pass on). The supervisor is
    # forked from the CLI's process, so a bug planted here reaches it.
    require_flow("root")
    code = (
        "import sys\n"
        "from kit import cli\n"
        "from kit.run import supervisor\n"
        "def broken(self, *args, **kwargs):\n"
        "    raise NameError('planted')\n"
        "supervisor.Supervisor.admit = broken\n"
        "args = ['run', '--engine', 'reference', '--flow', 'root', '--', '/bin/true']\n"
        "sys.exit(cli.main(args))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("kit run:")]
    assert line.startswith("kit run: the kit failed, not the engine:") and "planted" in line


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM,), (signal.SIGUSR1,), (signal.SIGINT,), (signal.SIGTERM, signal.SIGHUP)],
)
def test_a_signal_before_the_run_starts_ends_what_was_prepared(signals):
    # The engine's import hangs, so the CLI waits for its inspection beside the sandbox it
    # builds: a signal then (which the run would have had forwarded) ends both and removes
    # the run's directory, instead of killing the CLI and leaving the directory behind; a
    # second one at once does not cut that short.
    if os.geteuid() != 0:
        pytest.skip("the host sandbox is built as root")
    from kit.run.sandbox import INIT_NAME
    from kit.system import linux

    # Where the inspection's user can read the module (pytest's tmp_path is root's alone).
    base = Path(tempfile.mkdtemp(prefix="kit-test-cli-", dir="/tmp"))
    try:
        base.chmod(0o755)
        modules, work = base / "modules", base / "tmp"
        for d in (modules, work):
            d.mkdir()
            d.chmod(0o755)
        (modules / "kit_cli_hanging.py").write_text("import time\ntime.sleep(3600)\n")
        command = [sys.executable, "-m", "kit", "run", "--engine", "kit_cli_hanging:Engine"]
        proc = subprocess.Popen(
            [*command, "--flow", "root", "--", "/bin/true"],
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "TMPDIR": str(work),
                "PYTHONPATH": os.pathsep.join([str(modules), *(p for p in sys.path if p)]),
            },
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not {INIT_NAME, "python"} <= {
                linux.process_name(p) for p in linux.children(proc.pid)
            }:
                time.sleep(0.01)  # the sandbox's init and the inspection's child
            prepared = linux.descendants(proc.pid)
            assert INIT_NAME in {linux.process_name(p) for p in prepared}, prepared
            assert any(p.name.startswith("kit-") for p in work.iterdir())
            for sig in signals:
                proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
        left = sorted(p.name for p in work.iterdir())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    # Two pending at once are taken lowest number first: either may be the one that stops.
    assert proc.returncode in {128 + sig for sig in signals}, err
    first = signal.Signals(proc.returncode - 128).name
    assert f"{first} before the run started" in err and err.count("before the run") == 1, err
    assert not [p for p in prepared if linux.process_alive(p)]
    assert left == []
