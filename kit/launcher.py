"""The launcher: starts a lifecycle run from any process (pytest, the CLI) and collects it.

The run itself happens in a fresh, lean supervisor process (:mod:`kit.supervisor`), never in
the caller: no thread of the caller ever calls unshare, setns or setresuid.

>>> result = run("reference", "root", ["/bin/sh", "-c", "exit 7"])
>>> result.exit_code
7
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import IO, Any

from kit.ledger import Ledger
from kit.request import DEFAULT_HOOK_TIMEOUT, DEFAULT_RUN_TIMEOUT, Invoker, RunRequest


class LaunchError(RuntimeError):
    """The supervisor could not run at all (not an engine failure)."""


@dataclass
class RunResult:
    """What one run produced."""

    exit_code: int
    reason: str
    ledger: Ledger
    leaks: list[dict[str, Any]] = field(default_factory=list)
    timed_out: dict[str, Any] | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.ledger.events


class RunHandle:
    """A run in progress: :meth:`send_signal` to the master, :meth:`wait` for the result."""

    def __init__(self, request: RunRequest, *, capture: bool = True,
                 stdin: int | IO[Any] | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.request = request
        self.capture = capture
        req_r, req_w = os.pipe()
        res_r, self._res_w = os.pipe()
        self._out = tempfile.TemporaryFile() if capture else None
        self._err = tempfile.TemporaryFile() if capture else None
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kit.supervisor", str(req_r), str(self._res_w)],
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=self._out, stderr=self._err,
                pass_fds=(req_r, self._res_w, *pass_fds),
                cwd="/", start_new_session=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(request.sys_path)})
        finally:
            os.close(req_r)
            os.close(self._res_w)
        with os.fdopen(req_w, "wb") as f:
            f.write(json.dumps(request.to_json()).encode())
        self._result = os.fdopen(res_r, "rb")
        line = self._result.readline()
        self.starter_pid: int | None = int(line.split()[1]) if line.startswith(b"started") \
            else None
        self._first = b"" if self.starter_pid is not None else line

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the master (the starter process) of the run."""
        if self.starter_pid is None:
            raise LaunchError("the run has no starter process")
        os.kill(self.starter_pid, signum)

    def wait(self) -> RunResult:
        data = self._first + self._result.read()
        self._result.close()
        self.proc.wait()
        stdout = stderr = ""
        if self._out is not None and self._err is not None:
            for f in (self._out, self._err):
                f.seek(0)
            stdout = self._out.read().decode(errors="replace")
            stderr = self._err.read().decode(errors="replace")
            self._out.close()
            self._err.close()
        try:
            doc = json.loads(data)
        except ValueError:
            raise LaunchError(f"supervisor exited {self.proc.returncode} without a result; "
                              f"stderr: {stderr[-2000:]}") from None
        if doc.get("ledger") is None:
            raise LaunchError(f"{doc.get('reason')}; stderr: {stderr[-2000:]}")
        return RunResult(doc["exit_code"], doc["reason"], Ledger(doc["ledger"]),
                         doc["leaks"], doc["timed_out"], stdout, stderr)

    def kill(self) -> None:
        """Kill the supervisor (its run dies with it: parent-death signals)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)


def make_request(engine: str, flow: str, argv: list[str], *,
                 engine_config: dict[str, Any] | None = None, user: str | int | None = None,
                 backend: str = "real", hook_timeout: float = DEFAULT_HOOK_TIMEOUT,
                 run_timeout: float = DEFAULT_RUN_TIMEOUT, probes: bool = True,
                 container_id: str | None = None) -> RunRequest:
    invoker = Invoker.resolve(user)
    return RunRequest(
        engine=engine, flow=flow, argv=list(argv), engine_config=dict(engine_config or {}),
        invoker=invoker.__dict__, backend=backend,
        container_id=container_id or f"kit-{uuid.uuid4().hex[:12]}",
        hook_timeout=hook_timeout, run_timeout=run_timeout, probes=probes,
        sys_path=[os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)])


def start(engine: str, flow: str, argv: list[str], *, capture: bool = True,
          stdin: int | IO[Any] | None = None, pass_fds: tuple[int, ...] = (),
          **options: Any) -> RunHandle:
    """Start a run without waiting; see :func:`run` for the options."""
    return RunHandle(make_request(engine, flow, argv, **options), capture=capture, stdin=stdin,
                     pass_fds=tuple(pass_fds))


def run(engine: str, flow: str, argv: list[str], *, capture: bool = True,
        stdin: int | IO[Any] | None = None, pass_fds: tuple[int, ...] = (),
        **options: Any) -> RunResult:
    """Run one lifecycle of ``engine`` in ``flow`` with payload ``argv`` and wait for it.

    Options: ``engine_config`` (dict merged into the engine config), ``user`` (the invoking
    user U), ``backend``, ``hook_timeout``, ``run_timeout``, ``probes``, ``container_id``.
    ``capture`` collects the payload's stdout/stderr into the result (else inherited).
    ``pass_fds`` are open in the starter under the same numbers (for
    ``StarterConfig.keep_file_descriptor``).
    """
    return start(engine, flow, argv, capture=capture, stdin=stdin, pass_fds=pass_fds,
                 **options).wait()
