"""The engine's code never runs in the kit's trusted processes (SPEC §11): only as U in an
inspection child, and in a run's own processes (its sandbox, as root)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kit import preflight
from kit.run.request import Invoker

ROOT = Path(__file__).resolve().parent.parent

#: The engine module: at import, it notes who imported it (a file per process in MARKS) and
#: tries to change the host (a file in HOST, a directory only root can write).
ENGINE = '''
import ctypes, json, os
HOLD = {hold!r}  # a file the test owns: whoever holds it open is of this engine's making
_sig = ctypes.c_int(-1)
ctypes.CDLL(None).prctl(2, ctypes.byref(_sig), 0, 0, 0)  # PR_GET_PDEATHSIG
_fds = {{}}
for _fd in os.listdir("/proc/self/fd"):
    try:
        _fds[_fd] = os.readlink("/proc/self/fd/" + _fd)
    except OSError:
        pass  # the listing's own descriptor, closed by now
for where, name in (({marks!r}, str(os.getpid())), ({host!r}, "from-" + str(os.getpid()))):
    try:
        # Written whole, then renamed: a test reading the marks never sees half of one.
        with open(os.path.join(where, name + ".part"), "w") as f:
            json.dump({{
                "pid": os.getpid(),
                "uid": os.getuid(),
                "comm": open("/proc/self/comm").read().strip(),
                "pidns": os.readlink("/proc/self/ns/pid"),
                "capeff": [
                    int(line.split()[1], 16)
                    for line in open("/proc/self/status")
                    if line.startswith("CapEff:")
                ][0],
                "pdeathsig": _sig.value,
                "fds": _fds,
                "environ": sorted(os.environ),
                "tty": int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[4]),
            }}, f)
        os.rename(os.path.join(where, name + ".part"), os.path.join(where, name))
    except OSError:
        pass
{tail}
'''
REFERENCE = """
from reference_engines.minimal.engine import ReferenceEngine
from reference_engines.minimal.rpc import ReferenceRPC


class MarkedEngine(ReferenceEngine):
    engine_name = "test-marked"
    rpc_methods = ReferenceRPC
"""
HANGING = "import time\ntime.sleep(3600)\n"


@dataclass
class Marked:
    spec: str
    marks: str  # where the module notes each import (every uid may write there)
    host: str  # a host directory only root may write
    module_dir: str
    hold: str  # a file the engine's processes keep open (see holders)

    def imports(self, while_running: bool = False) -> list[dict]:
        """The imports noted so far (each process once). A mark never finished is an import
        too (its process was killed half way through its note, or still writes it): an
        error, unless ``while_running`` (the processes may still be writing; it is left
        out then)."""
        out = []
        for name in os.listdir(self.marks):
            if name.endswith(".part"):
                assert while_running, f"an import whose note was never finished: {name}"
                continue
            with open(os.path.join(self.marks, name)) as f:
                out.append(json.load(f))
        return out


def test_an_unfinished_mark_is_an_import_not_skipped(tmp_path: Path) -> None:
    # A process killed half way through its note imported the engine all the same.
    marked = Marked("m:E", str(tmp_path), "", "", "")
    (tmp_path / "4242.part").write_text('{"pid": 42')
    with pytest.raises(AssertionError, match=r"never finished: 4242\.part"):
        marked.imports()
    assert marked.imports(while_running=True) == []


def holders(path: str) -> list[int]:
    """The processes (host pids) that hold ``path`` open."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                        found.append(int(pid))
                        break
    return found


def _marked(tail: str) -> Iterator[Marked]:
    module = f"kit_marked_{uuid.uuid4().hex[:12]}"
    base = tempfile.mkdtemp(prefix="kit-test-marked-", dir="/tmp")
    marks, host, modules = (os.path.join(base, d) for d in ("marks", "host", "modules"))
    for path, mode in ((marks, 0o1777), (host, 0o700), (modules, 0o755)):
        os.mkdir(path)
        os.chmod(path, mode)
    os.chmod(base, 0o755)
    hold = os.path.join(base, "hold")
    Path(hold).write_text("")
    source = ENGINE.format(marks=marks, host=host, hold=hold, tail=tail)
    Path(modules, f"{module}.py").write_text(source)
    sys.path.insert(0, modules)
    try:
        yield Marked(f"{module}:MarkedEngine", marks, host, modules, hold)
    finally:
        for pid in holders(hold):  # what the kit failed to end: ours, found by our file
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sys.path.remove(modules)
        sys.modules.pop(module, None)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def marked() -> Iterator[Marked]:
    yield from _marked(REFERENCE)


@pytest.fixture
def hanging() -> Iterator[Marked]:
    yield from _marked(HANGING)


def _u() -> Invoker | None:
    try:
        return Invoker.resolve()
    except ValueError:
        return None


def _as_u(mark: dict) -> bool:
    """Whether an import ran as the inspection's user (U, or nobody without one), with no
    capability but reading."""
    from kit.system import linux

    u = _u()
    uid = u.uid if u else preflight.NOBODY
    reading = linux.caps_to_mask(preflight.READ_CAPS)
    return mark["uid"] == uid and mark["uid"] != 0 and mark["capeff"] & ~reading == 0


def test_an_inspection_imports_the_engine_in_a_child_as_u(marked):
    found = preflight.inspect(marked.spec)
    assert found.name == "test-marked" and found.failure == "" and found.problems == []
    assert found.rpc_methods == ["mount", "sethostname"]
    assert marked.spec.partition(":")[0] not in sys.modules
    (mark,) = marked.imports()
    assert mark["pid"] != os.getpid() and _as_u(mark)
    assert os.stat(os.path.join(marked.marks, str(mark["pid"]))).st_uid == mark["uid"]
    assert os.listdir(marked.host) == []  # U cannot write there; root could


def test_an_inspection_collects_in_the_child_what_the_caller_asks(marked):
    found = preflight.inspect(
        marked.spec, collect={"where": (lambda reg: [os.getpid(), reg.name], [object])}
    )
    pid, name = found.collected["where"]
    assert name == "test-marked" and pid != os.getpid()
    assert json.loads(json.dumps(found.to_json())) == found.to_json()
    assert preflight.Inspection.from_json(found.to_json()) == found


def test_an_engine_whose_import_hangs_is_named_at_the_inspections_deadline(hanging):
    started = time.monotonic()
    found = preflight.inspect(hanging.spec, timeout=1.0)
    assert found.failure == "timeout" and found.name is None
    (problem,) = found.problems
    assert problem.engine == hanging.spec and problem.hook == "registration"
    assert "importing it did not finish" in problem.message and "within 1 s" in problem.message
    assert time.monotonic() - started < 30  # not the import's hour: killed, reaped
    (mark,) = hanging.imports()
    assert not os.path.exists(f"/proc/{mark['pid']}") or _zombie_free(mark["pid"])


def _zombie_free(pid: int) -> bool:
    """The pid, if it exists, is not our inspection child (it was reaped and reused)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) != os.getpid()
    except OSError:
        return True


def _python(
    code: str, *args: str, unset: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    paths = [p for p in sys.path if p]
    env = {**{k: v for k, v in os.environ.items() if k not in unset}, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**env, "PYTHONPATH": os.pathsep.join(paths)},
    )


def test_a_conformance_configure_never_imports_the_engine(marked):
    code = (
        "import json, os, sys, pytest\n"
        "from conformance.plugin import SUITE_DIR\n"
        "code = pytest.main(['-q', '--collect-only', '-p', 'no:randomly', '-p', 'no:cacheprovider',"
        " '--engine', sys.argv[1], '--flow', 'root', str(SUITE_DIR)])\n"
        "print(json.dumps({'code': int(code), 'pid': os.getpid(),"
        " 'imported': sys.argv[1].split(':')[0] in sys.modules}))\n"
    )
    proc = _python(code, marked.spec)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and not result["imported"], proc.stdout[-2000:]
    marks = marked.imports()
    assert marks and all(m["pid"] != result["pid"] and _as_u(m) for m in marks)
    assert os.listdir(marked.host) == []


def test_a_cli_run_never_imports_the_engine_outside_the_run(marked):
    code = (
        "import json, os, sys\n"
        "from kit import cli\n"
        "code = cli.main(['run', '--engine', sys.argv[1], '--flow', 'root', '--', '/bin/true'])\n"
        "print(json.dumps({'code': code, 'pid': os.getpid(),"
        " 'imported': sys.argv[1].split(':')[0] in sys.modules}))\n"
    )
    proc = _python(code, marked.spec)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and not result["imported"], proc.stderr[-2000:]
    # The run's own import writes its mark in the sandbox (MARKS is not shared with it).
    _only_inspections_and_the_run(marked, {result["pid"]}, shared=False)


def test_a_run_through_the_zygote_imports_the_engine_in_its_starter(marked, shared_dir):
    from kit.run.launcher import Zygote, start

    zygote = Zygote.get()
    handle = start(
        marked.spec,
        "root",
        ["/bin/true"],
        shared_dirs=[marked.marks],
    )
    result = handle.wait()
    assert result.exit_code == 0, result.reason
    trusted = {os.getpid(), zygote.proc.pid, handle.supervisor_pid}
    _only_inspections_and_the_run(marked, trusted, shared=True)


def _only_inspections_and_the_run(marked: Marked, trusted: set[int], shared: bool) -> None:
    """Every import of the engine happened as U (an inspection) or in the run's starter (as
    root: in the run's sandbox, when there is one), never in ``trusted``; ``shared``: the run
    could write MARKS (its starter's mark is there)."""
    from kit.run.sandbox import default_on

    host_pidns = os.readlink("/proc/self/ns/pid")
    marks = marked.imports()
    assert any(_as_u(m) for m in marks)  # the inspection
    for mark in marks:
        assert mark["pid"] not in trusted or mark["pidns"] != host_pidns, mark
        assert _as_u(mark) or mark["comm"] == "kit-starter", mark
    if shared and os.geteuid() == 0:
        (starter,) = [m for m in marks if m["comm"] == "kit-starter"]
        assert starter["uid"] == 0
        if default_on():
            assert starter["pidns"] != host_pidns  # in the run's sandbox
    assert os.listdir(marked.host) == []  # the sandbox's writes never reach the host


def test_state_001_calls_config_in_an_inspection_child_not_in_the_suite(marked):
    from test_conformance_units import make_run

    from conformance import checks
    from reference_engines.minimal.engine import ReferenceConfig

    stage1 = {
        "kind": "hook_return",
        "role": "stage1",
        "hook": "config",
        "result": {"type": "ReferenceConfig", "json": ReferenceConfig().to_json()},
    }
    verify = checks.Verifier("root", ["STATE-001"], "t")
    checks.check_config_calls(verify, make_run("root", [stage1]), marked.spec)
    assert verify.checks["STATE-001"] == 4 and not verify.violations["STATE-001"]
    assert marked.spec.partition(":")[0] not in sys.modules
    marks = marked.imports()
    assert len(marks) == 1 and all(m["pid"] != os.getpid() and _as_u(m) for m in marks)


def test_the_runs_import_of_the_engine_writes_no_bytecode_into_its_sandbox(marked):
    # The first import of an engine module with no __pycache__ beside it happens in a run's
    # starter: were bytecode written there, the sandbox's copy-on-write layer would list a
    # new __pycache__ and the host diff would blame the run for the kit's own import. (The
    # kit compiles an engine's bytecode outside its runs, tests/test_bytecode.py; switched
    # off here, so that any __pycache__ is the run's.)
    code = (
        "import json, sys\n"
        "from kit import cli\n"
        "code = cli.main(['run', '--engine', sys.argv[1], '--flow', 'root',"
        " '--ledger', sys.argv[2], '--', '/bin/true'])\n"
        "print(json.dumps({'code': code}))\n"
    )
    ledger = os.path.join(marked.marks, "ledger.json")
    proc = _python(
        code, marked.spec, ledger, unset=("PYTHONDONTWRITEBYTECODE",), env={"KIT_BYTECODE": "0"}
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1])["code"] == 0, proc.stderr[-2000:]
    assert "__pycache__" not in proc.stderr, proc.stderr[-2000:]
    with open(ledger) as f:
        events = json.load(f)["events"]
    changes = [e for e in events if e["kind"] == "host_changes"]
    if changes:  # sandboxed: the diff ran and found nothing of the kit's own
        assert not any("__pycache__" in json.dumps(c) for c in changes), changes
    assert not os.path.exists(os.path.join(marked.module_dir, "__pycache__"))


#: An import that closes every descriptor it may (the pipe to the caller among them: EOF
#: there), then hangs holding the test's file.
CLOSES_AND_HANGS = "import time\nos.closerange(3, 4096)\n_h = open(HOLD)\ntime.sleep(3600)\n"
#: An import that leaves a daemon of its own behind (a new session, holding the test's file),
#: then registers as usual.
DAEMON = (
    "import time\n_h = open(HOLD)\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        time.sleep(3600)\n"
    "    os._exit(0)\n"
    "_h.close()\n" + REFERENCE
)


#: An import that writes ``{answer}`` (Python source of bytes) on the inspection's pipe, as
#: valid JSON of the wrong shape, and exits.
WRONG_SHAPE = (
    "for _fd in os.listdir('/proc/self/fd'):\n"
    "    try:\n"
    "        if int(_fd) >= 3 and os.readlink('/proc/self/fd/' + _fd).startswith('pipe:'):\n"
    "            os.write(int(_fd), {answer})\n"
    "    except OSError:\n"
    "        pass\n"
    "os._exit(0)\n"
)
#: A well-formed inspection of this engine, with what STATE-001 collects in the wrong shape.
FORGED_CONFIG_CALLS = (
    'json.dumps({"spec": __name__ + ":MarkedEngine", "name": "x", "origin": "", "failure": "",'
    ' "failure_message": "", "rpc_methods": [], "problems": [],'
    ' "collected": {"config_calls": {"json": {}, "same": "no"}}}).encode()'
)


def _inspect_into(box: list[preflight.Inspection], spec: str, timeout: float) -> None:
    box.append(preflight.inspect(spec, timeout=timeout))


def test_an_import_that_closes_the_pipe_and_hangs_is_killed_at_the_deadline():
    for engine in _marked(CLOSES_AND_HANGS):
        box: list[preflight.Inspection] = []
        worker = threading.Thread(target=_inspect_into, args=(box, engine.spec, 1.0))
        worker.start()
        worker.join(60)  # the old code waited for the child for ever: an hour here
        hung = worker.is_alive()
        for pid in holders(engine.hold):
            os.kill(pid, signal.SIGKILL)  # lets a hung inspection go (its child dies)
        worker.join()
        assert not hung
        (found,) = box
        assert found.failure == "timeout" and "importing it did not finish" in found.failure_message
        assert holders(engine.hold) == []


def test_an_imports_own_daemon_ends_with_the_inspection():
    for engine in _marked(DAEMON):
        found = preflight.inspect(engine.spec)
        assert found.failure == "" and found.name == "test-marked", found.failure_message
        assert holders(engine.hold) == []  # its session and host pid are no escape
        (mark,) = engine.imports()
        assert mark["pidns"] != os.readlink("/proc/self/ns/pid")


def test_an_inspection_child_dies_with_its_caller_after_the_drop(marked):
    preflight.inspect(marked.spec)
    (mark,) = marked.imports()
    assert _as_u(mark) and mark["pdeathsig"] == signal.SIGKILL  # re-armed after setresuid


def test_the_zygote_waits_longer_than_an_inspection():
    from kit.run.launcher import ZYGOTE_ANSWER_TIMEOUT

    assert ZYGOTE_ANSWER_TIMEOUT >= 2 * preflight.INSPECT_TIMEOUT


def test_an_inspection_child_has_no_descriptor_nor_secret_of_the_callers(marked, monkeypatch):
    monkeypatch.setenv("KIT_TEST_SECRET_TOKEN", "hunter2")
    found = preflight.inspect(marked.spec)
    assert found.failure == "", found.failure_message
    (mark,) = marked.imports()
    fds = mark["fds"]
    assert all(fds[fd] == os.devnull for fd in ("0", "1", "2")), fds
    assert [fd for fd in fds if int(fd) > 2 and fds[fd].startswith("pipe:")] == list(fds)[3:], fds
    assert len(fds) == 4, fds  # 0-2 and the answer pipe
    assert "KIT_TEST_SECRET_TOKEN" not in mark["environ"] and "PATH" in mark["environ"]


def test_an_inspection_child_has_no_controlling_terminal(marked):
    code = (
        "import fcntl, json, sys, termios\n"
        "from kit import preflight\n"
        "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
        "found = preflight.inspect(sys.argv[1])\n"
        "print(json.dumps(found.failure or 'ok'))\n"
    )
    leader, follower = os.openpty()
    try:
        paths = [p for p in sys.path if p]
        proc = subprocess.run(
            [sys.executable, "-c", code, marked.spec],
            stdin=follower,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
            start_new_session=True,
        )
    finally:
        os.close(leader)
        os.close(follower)
    assert proc.stdout.strip() == '"ok"', proc.stderr[-2000:]
    (mark,) = marked.imports()
    assert mark["tty"] == 0  # TIOCSTI into the caller's terminal: no terminal to type in


#: prepare_config closes every descriptor it may (EOF on the pipe), then hangs holding the
#: test's file.
PREPARE_CLOSES_AND_HANGS = (
    REFERENCE
    + """

class HangingEngine(MarkedEngine):
    def prepare_config(self, starter_config):
        import time
        os.closerange(3, 4096)
        _h = open(HOLD)
        time.sleep(3600)
"""
)


def _starter_configs_into(box: list[list[preflight.Problem]], spec: str) -> None:
    u = _u()
    assert u is not None
    box.append(preflight.starter_configs(spec, ["userns"], u.uid, u.gid, list(u.groups)))


def test_preflights_stage_1_child_is_contained_as_an_inspection(monkeypatch):
    if _u() is None:
        pytest.skip("no unprivileged invoking user here")
    monkeypatch.setattr(preflight, "PREPARE_TIMEOUT", 1.0)
    for engine in _marked(PREPARE_CLOSES_AND_HANGS):
        spec = engine.spec.replace(":MarkedEngine", ":HangingEngine")
        box: list[list[preflight.Problem]] = []
        worker = threading.Thread(target=_starter_configs_into, args=(box, spec))
        worker.start()
        worker.join(60)  # the old code waited for the child for ever: an hour here
        hung = worker.is_alive()
        for pid in holders(engine.hold):
            os.kill(pid, signal.SIGKILL)  # lets a hung preflight go (its child dies)
        worker.join()
        assert not hung and box == [[]]  # no verdict on a hook that hangs
        assert holders(engine.hold) == []
        (mark,) = engine.imports()
        assert mark["pdeathsig"] == signal.SIGKILL and mark["tty"] == 0
        assert mark["pidns"] != os.readlink("/proc/self/ns/pid")


def test_an_answer_of_the_wrong_shape_is_an_inspection_failure():
    answers = (b"[]", b'{"spec": 1}', b'{"spec": "x", "problems": [{"engine": 1}]}')
    for answer in answers:
        for engine in _marked(WRONG_SHAPE.format(answer=repr(answer))):
            found = preflight.inspect(engine.spec)
            assert found.failure == "child" and found.name is None, answer
            (problem,) = found.problems
            assert problem.engine == engine.spec and "the kit's shape" in problem.message


#: Well-formed inspections of this engine that break its rules: a success that collected
#: nothing of what was asked, a failure with no problem.
FORGED_INCONSISTENT = (
    'json.dumps({"spec": __name__ + ":MarkedEngine", "name": "x", "origin": "", "failure":'
    ' "", "failure_message": "", "failure_traceback": "", "rpc_methods": [], "problems": [],'
    ' "collected": {}}).encode()',
    'json.dumps({"spec": __name__ + ":MarkedEngine", "name": None, "origin": "", "failure":'
    ' "import", "failure_message": "", "failure_traceback": "", "rpc_methods": [],'
    ' "problems": [], "collected": {}}).encode()',
)


def test_an_inconsistent_answer_is_an_inspection_failure():
    from conformance import gate

    for answer in FORGED_INCONSISTENT:
        for engine in _marked(WRONG_SHAPE.format(answer=answer)):
            collect = {"classes": (gate.engine_classes, gate.ENGINE_CLASSES)}
            found = preflight.inspect(engine.spec, collect=collect)
            assert found.failure == "child" and found.problems, answer


def test_collected_json_of_the_wrong_shape_fails_state_001_not_the_suite():
    from test_conformance_units import make_run

    from conformance import checks

    for engine in _marked(WRONG_SHAPE.format(answer=FORGED_CONFIG_CALLS)):
        verify = checks.Verifier("root", ["STATE-001"], "t")
        checks.check_config_calls(verify, make_run("root", []), engine.spec)
        (violation,) = verify.violations["STATE-001"]
        assert "the inspection failed" in str(violation), violation


#: In a caller as ``nobody``: inspect the engine argv[1]; with argv[2] == "subreaper", as
#: where the kernel refuses unprivileged user namespaces (every unshare refused).
AS_NOBODY = """
import errno, json, sys
from kit import preflight
from kit.system import linux

def refuse(flags):
    raise OSError(errno.EPERM, "refused by the test")

if sys.argv[2] == "subreaper":
    linux.unshare = refuse
found = preflight.inspect(sys.argv[1], timeout=60)
print(json.dumps([found.failure, found.failure_message]))
"""


@pytest.mark.parametrize("mode", ["userns", "subreaper"])
def test_a_non_root_callers_inspection_ends_the_imports_daemons(mode):
    if os.geteuid() != 0:
        pytest.skip("needs root to start a caller as nobody")
    for engine in _marked(DAEMON):
        os.chmod(engine.hold, 0o644)
        proc = subprocess.run(
            [sys.executable, "-c", AS_NOBODY, engine.spec, mode],
            capture_output=True,
            text=True,
            timeout=300,
            cwd="/",
            env={"PATH": os.environ["PATH"], "PYTHONPATH": f"{ROOT}:{engine.module_dir}"},
            user=preflight.NOBODY,
            group=preflight.NOBODY,
            extra_groups=[],
        )
        assert proc.stdout.strip() == '["", ""]', proc.stderr[-2000:]
        assert holders(engine.hold) == []  # the subreaper, or pid 1's end, took the daemon
        (mark,) = engine.imports()
        assert mark["uid"] == preflight.NOBODY and mark["tty"] == 0
        if mode == "subreaper":
            assert mark["pidns"] == os.readlink("/proc/self/ns/pid")  # the fallback ran


def test_an_import_error_comes_back_with_its_traceback():
    tail = "def _where():\n    raise ValueError('the engine module fails here')\n_where()\n"
    for engine in _marked(tail):
        found = preflight.inspect(engine.spec)
        assert found.failure == "registry" and "ValueError" in found.failure_message
        assert "the engine module fails here" in found.failure_traceback
        assert (
            f"{engine.module_dir}/" in found.failure_traceback
            and "_where" in found.failure_traceback
        )


def test_an_import_killed_by_a_signal_is_reported_so():
    for engine in _marked("import ctypes\nctypes.string_at(0)\n"):  # SIGSEGV, forced
        found = preflight.inspect(engine.spec)
        assert found.failure == "child", found.failure_message
        assert f"killed by signal {signal.SIGSEGV}" in found.failure_message


def test_an_inspection_interrupted_while_reading_ends_its_child(monkeypatch):
    def interrupted(rfd: int, deadline: float) -> tuple[bytes, bool]:
        until = time.monotonic() + 60
        while not holders(engine.hold) and time.monotonic() < until:
            time.sleep(0.05)  # a condition with a deadline: the import has begun
        raise RuntimeError("interrupted by the test")

    for engine in _marked("import time\n_h = open(HOLD)\ntime.sleep(3600)\n"):
        monkeypatch.setattr(preflight, "_read_until", interrupted)
        with pytest.raises(RuntimeError, match="interrupted by the test"):
            preflight.inspect(engine.spec)
        assert holders(engine.hold) == []


DEATHLESS = (
    "import ctypes, time\n"
    "ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG 0: no death signal\n"
    "time.sleep(3600)\n"
)


@pytest.fixture
def deathless() -> Iterator[Marked]:
    yield from _marked(DEATHLESS)


def _in_pid_namespace(inode: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == inode:
                    found.append(int(name))
            except OSError:  # gone meanwhile
                pass
    return found


def test_an_engine_clearing_its_death_signal_dies_with_the_inspecting_caller(deathless):
    # The inspection's child may clear its own parent-death signal; when the caller is
    # killed, the intermediate's own death signal (SIGTERM, handled) ends it from outside.
    code = "import sys\nfrom kit import preflight\npreflight.inspect(sys.argv[1], timeout=600)\n"
    caller = subprocess.Popen(
        [sys.executable, "-c", code, deathless.spec],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    engine: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not deathless.imports(while_running=True):
            assert time.monotonic() < deadline, "the engine was never imported"
            time.sleep(0.02)
        (mark,) = deathless.imports()
        assert mark["pidns"] != os.readlink("/proc/self/ns/pid")  # pid 1 of its own
        engine = _in_pid_namespace(mark["pidns"])
        assert engine, "the engine's process is not to be found"
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 20
        while _in_pid_namespace(mark["pidns"]):
            assert time.monotonic() < deadline, "the engine outlived its caller"
            time.sleep(0.02)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
        for pid in engine:  # a failed test leaves nothing behind either
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _keyctl(*args: int) -> int:
    import ctypes

    number = {"x86_64": 250, "aarch64": 219}[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    assert result > 0, os.strerror(ctypes.get_errno())
    return int(result)


def _session_keyring() -> int:
    """The serial of the calling process's session keyring (KEYCTL_GET_KEYRING_ID of
    KEY_SPEC_SESSION_KEYRING, not created)."""
    return _keyctl(0, -3, 0)


def test_the_inspection_does_not_possess_the_callers_session_keyring(marked):
    # A process keeps its session keyring across setresuid: the caller's keys (credentials
    # a login or a service linked there) would be the engine's to read.
    from conftest import in_child

    def inspect_from_a_session_of_our_own() -> list[int]:
        own = _keyctl(1, 0)  # KEYCTL_JOIN_SESSION_KEYRING, anonymous
        found = preflight.inspect(
            marked.spec, collect={"keyring": (lambda reg: _session_keyring(), int)}
        )
        return [own, found.collected["keyring"]]

    got = in_child(inspect_from_a_session_of_our_own)
    assert "ok" in got, got
    own, theirs = got["ok"]
    assert theirs != own


def test_an_inspection_pipe_above_fd_setsize_is_read_to_its_end():
    # A process (pytest with a thousand files open) whose inspection pipe lies above 1024,
    # where select() cannot wait: the child's whole answer is still read.
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard descriptor limit ({hard}) is below 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    held: list[int] = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.dup(0))
        rfd, wfd = os.pipe()
        held += [rfd, wfd]
        assert rfd > 1024
        os.write(wfd, b"the answer")
        os.close(held.pop())
        assert preflight._read_until(rfd, time.monotonic() + 10) == (b"the answer", True)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
