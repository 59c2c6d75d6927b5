"""Lifecycle scenarios: which payload and engine config a run uses, and how it is driven."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import kit
from conformance.capabilities import FAULT_FIELD, FAULTS, JOIN_FIELD
from conformance.expectations import ERROR_PATHS, FORWARDED_SIGNALS
from conformance.requirements import KIT, subject_of
from kit.run import launcher
from kit.run.sandbox import default_on, join_path
from kit.starter.inject import INJECTIONS
from kit.system import linux

#: Exit code of the signal-forwarding payload when every forwarded signal arrived.
ALL_SIGNALS_ARRIVED = 42
#: Exit code base of that payload when some did not: 10 + bit mask (bit i = signal i arrived).
SIGNAL_MASK_BASE = 10
#: The suite sends every forwarded signal this many times, a round at a time (SPEC §7 forwards
#: every one, §10 loses none: a monitor that forwards each kind once must fail).
SIGNAL_ROUNDS = 2
#: Exit code base when the first round arrived whole and the second did not: 50 + the mask of
#: the signals that arrived twice.
SECOND_ROUND_MASK_BASE = 50
#: How :func:`decode_signal_exit` names a signal that did not arrive a second time.
AGAIN = " (again)"
#: The payload ignores this signal once the first round arrived: the suite reads it in the
#: payload's SigIgn and sends the second round (never before: two of a kind would merge).
ROUND_DONE_MARK = signal.SIGURG


def fault_scenario_name(requirement: str) -> str:
    """``inject:FAULT`` when the kit makes the error path of ``requirement`` (a kit
    requirement), else ``fault:FAULT`` (the engine fails on request)."""
    path = ERROR_PATHS[requirement]
    return f"{'inject' if subject_of(path.requirement) == KIT else 'fault'}:{path.fault}"


def _python() -> str:
    """An interpreter any uid can exec (Debian's; a pyenv shim under /root cannot be)."""
    for path in ("/usr/bin/python3", os.path.realpath(sys.executable)):
        if os.access(path, os.X_OK):
            return path
    return "/usr/bin/python3"


def _signal_script() -> str:
    """Counts each forwarded signal; marks the first round done (ROUND_DONE_MARK ignored),
    then waits for the second; exits ALL_SIGNALS_ARRIVED, or a base plus the mask of the
    signals that arrived (once: SIGNAL_MASK_BASE; twice: SECOND_ROUND_MASK_BASE)."""
    names = [s[3:] for s in FORWARDED_SIGNALS]  # HUP INT USR1 USR2 TERM
    counts = [f"c{i}" for i in range(len(names))]
    traps = "; ".join(
        f"trap '{c}=$(({c}+1))' {name}" for c, name in zip(counts, names, strict=True)
    )

    def arrived(times: int) -> str:  # how many signals arrived at least ``times`` times
        return "+".join(f"({c}>={times})" for c in counts)

    def mask(times: int) -> str:
        return "+".join(f"{1 << i}*({c}>={times})" for i, c in enumerate(counts))

    def wait(times: int) -> str:
        return (
            f"n=0; while [ $(({arrived(times)})) -lt {len(counts)} ] && [ $n -lt 250 ]; "
            "do sleep 0.02; n=$((n+1)); done"
        )

    mark = ROUND_DONE_MARK.name[3:]
    return (
        f"{' '.join(f'{c}=0' for c in counts)}; {traps}; {wait(1)}; "
        f"[ $(({arrived(1)})) -eq {len(counts)} ] || exit $(({SIGNAL_MASK_BASE}+{mask(1)})); "
        f"trap '' {mark}; {wait(SIGNAL_ROUNDS)}; "
        f"[ $(({arrived(SIGNAL_ROUNDS)})) -eq {len(counts)} ] && exit {ALL_SIGNALS_ARRIVED}; "
        f"exit $(({SECOND_ROUND_MASK_BASE}+{mask(SIGNAL_ROUNDS)}))"
    )


def decode_signal_exit(code: int) -> list[str] | None:
    """The signals the payload did *not* receive (a second time: "SIGHUP (again)"), from its
    exit code (None: the code is not one the payload exits with)."""
    if code == ALL_SIGNALS_ARRIVED:
        return []
    full = (1 << len(FORWARDED_SIGNALS)) - 1
    for base, suffix in ((SIGNAL_MASK_BASE, ""), (SECOND_ROUND_MASK_BASE, AGAIN)):
        mask = code - base
        if 0 <= mask < full:
            return [name + suffix for i, name in enumerate(FORWARDED_SIGNALS) if not mask >> i & 1]
    return None


@dataclass(frozen=True)
class Scenario:
    """One kind of lifecycle run.

    Each scenario is run at most once per flow and process (see :mod:`conformance.runs`); many tests
    read the same run. Scenarios that need an engine capability name it in ``requires``.
    """

    name: str
    description: str
    argv: tuple[str, ...]
    expected_exit: int | None  # None: depends on the engine (read the ledger)
    engine_config: tuple[tuple[str, Any], ...] = ()
    requires: tuple[str, ...] = ("host_payloads",)
    flows: tuple[str, ...] | None = None  # None: every flow
    short_hook_timeout: bool = False  # the hang scenarios: a 1 s hook timeout
    fault: str | None = None
    #: A fault the kit injects into its own processes (RunRequest.inject): no capability
    #: needed, and the ledger marks it as the kit's.
    inject: str | None = None

    @property
    def kit_self_check(self) -> bool:
        """Whether the kit injects a fault into its own processes in this run. Such a run
        checks the kit, and the engine's code after the fault where an engine test reads it:
        ``--kit-self-check`` limits only those no engine test reads by name
        (:func:`conformance.runs.one_flow_scenarios`)."""
        return self.inject is not None

    def config(self) -> dict[str, Any]:
        return dict(self.engine_config)

    def start(self, engine: str, flow: str, options: dict[str, Any]) -> tuple[Any, dict]:
        """Run it; returns (RunResult, notes). Subclasses drive the run."""
        return launcher.run(
            engine, flow, list(self.argv), engine_config=self.config(), **options
        ), {}


@dataclass(frozen=True)
class SignalScenario(Scenario):
    """Sends each forwarded signal to the master, as soon as the payload has installed its
    traps (read from its own ``/proc/PID/status`` SigCgt), then again once the payload marks
    the first round received (ROUND_DONE_MARK in its SigIgn), and waits for the run."""

    def start(self, engine: str, flow: str, options: dict[str, Any]) -> tuple[Any, dict]:
        handle = launcher.start(
            engine, flow, list(self.argv), engine_config=self.config(), **options
        )
        notes: dict[str, Any] = {"sent": [], "payload_pid": None}
        done = threading.Event()
        pidfd = None
        if handle.starter_pid is not None:
            try:
                pidfd = os.pidfd_open(handle.starter_pid)
            except OSError as exc:
                notes["error"] = f"pidfd_open of the master failed: {exc}"
        wanted = 0
        for name in FORWARDED_SIGNALS:
            wanted |= 1 << (signal.Signals[name].value - 1)

        def send_round(pidfd: int) -> bool:
            for name in FORWARDED_SIGNALS:
                try:
                    signal.pidfd_send_signal(pidfd, signal.Signals[name].value)
                    notes["sent"].append(name)
                except OSError as exc:
                    notes["error"] = f"sending {name} to the master: {exc}"
                    return False
            return True

        mark = 1 << (ROUND_DONE_MARK.value - 1)

        def drive(starter_pid: int, pidfd: int) -> None:
            deadline = time.monotonic() + 20
            while not done.is_set() and time.monotonic() < deadline:
                for pid in linux.descendants(starter_pid):
                    if _caught_mask(pid) & wanted == wanted:
                        notes["payload_pid"] = pid
                        # A shell keeps a signal ignored at its start ignored: a marker
                        # already set would say "first round in" before it is.
                        inherited = _status_mask(pid, "SigIgn") & mark
                        if send_round(pidfd):
                            if inherited:
                                notes["second_round"] = (
                                    f"not sent: the payload started with {ROUND_DONE_MARK.name} "
                                    "ignored, the mark of its first round"
                                )
                            else:
                                second_round(pid, pidfd)
                        return
                done.wait(0.005)
            notes.setdefault("error", "the payload never installed its signal traps")

        def second_round(pid: int, pidfd: int) -> None:
            deadline = time.monotonic() + 20  # its own: the first may have come late
            while not done.is_set() and time.monotonic() < deadline:
                if _status_mask(pid, "SigIgn") & mark:
                    if not send_round(pidfd):
                        notes["second_round"] = f"not sent whole: {notes.get('error')}"
                    return
                done.wait(0.005)
            # The payload exits with the mask of the first round (what it lacked), or marked
            # it too late for us.
            notes["second_round"] = "not sent: the payload did not mark its first round in time"

        driver = None
        if pidfd is not None and handle.starter_pid is not None:
            driver = threading.Thread(
                target=drive,
                args=(handle.starter_pid, pidfd),
                name="conformance-signals",
                daemon=True,
            )
            driver.start()
        try:
            result = handle.wait()
        finally:
            done.set()
            if driver is not None:
                driver.join()
            if pidfd is not None:
                os.close(pidfd)
        return result, notes


def _caught_mask(pid: int) -> int:
    return _status_mask(pid, "SigCgt")


def _status_mask(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


@dataclass(frozen=True)
class JoinScenario(Scenario):
    """Starts a helper process in new uts, ipc and net namespaces and asks the engine for a
    join-only run into them (``conformance_join``): every kind the kit's host sandbox lets a
    run join (``kit.run.sandbox.JOIN_KINDS``), so an engine that drops any of them is seen."""

    join_kinds: tuple[str, ...] = ("uts", "ipc", "net")

    def start(self, engine: str, flow: str, options: dict[str, Any]) -> tuple[Any, dict]:
        flags = {"uts": 0x04000000, "ipc": 0x08000000, "net": 0x40000000}
        mask = sum(flags[k] for k in self.join_kinds)
        code = (
            "import ctypes, os, sys\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            f"if libc.unshare({mask}) != 0:\n"
            "    print('error', os.strerror(ctypes.get_errno()), flush=True); sys.exit(1)\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n"
        )
        helper = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert helper.stdin is not None and helper.stdout is not None  # both are PIPE
        try:
            ready, _, _ = select.select([helper.stdout], [], [], 10)
            line = helper.stdout.readline().strip() if ready else "timeout"
            if line != "ready":
                raise HelperError(f"could not create namespaces to join: {line}")
            paths = {k: f"/proc/{helper.pid}/ns/{k}" for k in self.join_kinds}
            notes = {"targets": {k: os.stat(p).st_ino for k, p in paths.items()}, "paths": paths}
            # The request gives the run these namespaces; in the kit's host sandbox (which
            # reaches no host process's namespaces) they are under another path.
            sandboxed = _sandboxed(options)
            config = {
                **self.config(),
                JOIN_FIELD: {k: join_path(k, p, sandboxed) for k, p in paths.items()},
            }
            result = launcher.run(
                engine,
                flow,
                list(self.argv),
                engine_config=config,
                join_namespaces=paths,
                **options,
            )
            return result, notes
        finally:
            helper.stdin.close()
            try:
                helper.wait(5)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()


def _sandboxed(options: dict[str, Any]) -> bool:
    """Whether the kit runs a lifecycle with these launcher options in its host sandbox."""
    if options.get("sandbox") is not None:
        return bool(options["sandbox"])
    return default_on()


#: Marker in the host-view payload's command line, so the suite can find the payload.
HOST_VIEW_MARKER = "conformance-host-view"


#: The host's hostname when the suite started, before any run (a run of an engine that
#: changes it would otherwise spoil the "before" of the next).
SESSION_HOSTNAME = socket.gethostname()


def host_view(pid: int | None = None, uts: _UtsReader | None = None) -> dict[str, Any]:
    """What the launcher sees of the host: its hostname, the mounts of its mount namespace
    (mount id, mount point) and each mount's options and propagation (mount id -> the
    mountinfo fields between the mount point and the "-"); with ``pid`` (the kit's host
    sandbox's init) and ``uts`` (a reader in its uts namespace), of the host the run sees."""
    with open(f"/proc/{pid or 'self'}/mountinfo") as f:
        lines = [line.split() for line in f]
    mounts = sorted({(fields[0], fields[4]) for fields in lines})
    state = {
        fields[0]: " ".join(fields[5 : fields.index("-")]) for fields in lines if "-" in fields
    }
    hostname = socket.gethostname() if uts is None else uts.hostname()
    return {"hostname": hostname, "mounts": mounts, "state": state}


class _UtsReader:
    """A helper process in another process's uts namespace that answers each newline on
    its stdin with that namespace's hostname (no thread of the suite's process may enter a
    namespace)."""

    _CODE = (
        "import os, sys\n"
        "from kit import linux\n"
        "linux.setns(os.open(sys.argv[1], os.O_RDONLY), linux.CLONE_NEWUTS)\n"
        "print('ready', flush=True)\n"
        "for _ in sys.stdin:\n"
        "    print(os.uname().nodename, flush=True)\n"
    )

    def __init__(self, pid: int) -> None:
        path = os.path.dirname(os.path.dirname(os.path.abspath(kit.__file__)))
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", self._CODE, f"/proc/{pid}/ns/uts"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=launcher.environment(PYTHONPATH=path),
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None  # both are PIPE
        self._stdin, self._stdout = self._proc.stdin, self._proc.stdout
        if self._stdout.readline().strip() != "ready":
            self.close()
            raise OSError(f"cannot read the hostname of process {pid}'s uts namespace")

    def hostname(self) -> str:
        with self._lock:
            try:
                self._stdin.write("\n")
                self._stdin.flush()
            except (BrokenPipeError, ValueError):
                raise OSError("the uts reader is gone") from None
            line = self._stdout.readline()
        if not line:
            raise OSError("the uts reader is gone")
        return line.rstrip("\n")

    def close(self) -> None:
        with self._lock:
            self._proc.kill()
            self._proc.wait()
            for f in (self._stdin, self._stdout):
                f.close()


def _new_mounts(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Mounts that are new, and mounts whose options or propagation changed (SPEC §11: the
    host's mount table does not change while a run lasts)."""
    old = {tuple(m) for m in before["mounts"]}
    out = [f"{point} (mount id {mid})" for mid, point in now["mounts"] if (mid, point) not in old]
    was, points = before.get("state") or {}, dict(map(tuple, now["mounts"]))
    out += [
        f"{points.get(mid, '?')} (mount id {mid}) changed: {was[mid]} -> {state}"
        for mid, state in (now.get("state") or {}).items()
        if mid in was and was[mid] != state
    ]
    return out


def _payload_running(starter_pid: int | None, marker: str) -> int | None:
    """The pid of the run's payload, found by the marker in its command line (before the exec
    stage 2 still has the kit's command line)."""
    if starter_pid is None:
        return None
    for pid in linux.descendants(starter_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read().split(b"\0"):
                    return pid
        except OSError:
            continue
    return None


class _HostWatcher:
    """Looks at the host (:func:`host_view`) every few milliseconds in a thread, and keeps
    every hostname and every new mount it saw."""

    def __init__(self, before: dict[str, Any], sandboxed: bool = False) -> None:
        self.before = before
        #: The run's host will be the kit's host sandbox: the launcher's own host (shared
        #: with whatever else runs on the machine) is not the run's to answer for.
        self.sandboxed = sandboxed
        self.hostnames: list[str] = []
        self.mounts: list[str] = []
        self.looks = 0
        self.sandbox_pid: int | None = None
        self._uts: _UtsReader | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="conformance-host-view", daemon=True)
        self._thread.start()

    def follow(self, sandbox: dict[str, Any] | None) -> None:
        """Watch the kit's host sandbox of the run from now on (the host the run sees),
        from its state before the starter was forked."""
        if sandbox is None:
            return
        try:
            uts = _UtsReader(sandbox["sandbox_pid"])
            # Options and propagation from now: the supervisor sent the mounts only.
            state = host_view(sandbox["sandbox_pid"])["state"]
        except OSError:  # the run is already over: nothing to follow
            return
        with self._lock:
            self.before = {
                "hostname": self.before["hostname"],
                "mounts": [tuple(m) for m in sandbox["sandbox_mounts"]],
                "state": state,
            }
            self._uts = uts
            self.sandbox_pid = sandbox["sandbox_pid"]

    def look(self) -> None:
        if self.sandboxed and self.sandbox_pid is None:
            return
        try:
            now = host_view(self.sandbox_pid, self._uts)
        except OSError:  # the sandbox is gone: the run is over
            return
        with self._lock:
            self.looks += 1
            if now["hostname"] != self.before["hostname"] and now["hostname"] not in self.hostnames:
                self.hostnames.append(now["hostname"])
            for mount in _new_mounts(self.before, now):
                if mount not in self.mounts:
                    self.mounts.append(mount)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.look()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.look()
        if self._uts is not None:
            self._uts.close()


@dataclass(frozen=True)
class HostViewScenario(Scenario):
    """Watches the host (the launcher's hostname and mount namespace) for the whole run, and
    once more while the payload runs (it waits for a line on its standard input, which the
    suite writes once it has looked). The notes hold what changed."""

    def start(self, engine: str, flow: str, options: dict[str, Any]) -> tuple[Any, dict]:
        before = {**host_view(), "hostname": SESSION_HOSTNAME}
        watcher = _HostWatcher(before, _sandboxed(options))
        notes: dict[str, Any] = {"hostname_before": before["hostname"], "payload_pid": None}
        try:
            read_end, write_end = os.pipe()
            try:
                handle = launcher.start(
                    engine,
                    flow,
                    list(self.argv),
                    engine_config=self.config(),
                    stdin=read_end,
                    **options,
                )
            except BaseException:
                os.close(write_end)
                raise
            finally:
                os.close(read_end)
            watcher.follow(handle.sandbox)
            try:
                notes.update(self._while_the_payload_runs(handle, watcher))
            finally:
                os.close(write_end)  # the payload reads EOF and exits
            result = handle.wait()
        finally:
            watcher.stop()
        after = host_view()
        notes.update(
            hostnames_during=watcher.hostnames,
            new_mounts_during=watcher.mounts,
            looks=watcher.looks,
            hostname_after=after["hostname"],
            new_mounts_after=_new_mounts(before, after),
        )
        return result, notes

    @staticmethod
    def _while_the_payload_runs(handle: Any, watcher: _HostWatcher) -> dict[str, Any]:
        # The master's end tells when the run is over (RunHandle.poll cannot: the supervisor
        # only exits once its result, larger than a pipe, is read).
        master = None
        if handle.starter_pid is not None:
            try:
                master = os.pidfd_open(handle.starter_pid)
            except OSError:
                pass
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                pid = _payload_running(handle.starter_pid, HOST_VIEW_MARKER)
                if pid is not None:
                    watcher.look()
                    return {"payload_pid": pid}
                if master is None or select.select([master], [], [], 0.005)[0]:
                    return {"error": "the run ended before its payload ran"}
            return {"error": "the payload did not run within 20 s"}
        finally:
            if master is not None:
                os.close(master)


_FDS_SCRIPT = (
    "import os\n"
    "for name in sorted(os.listdir('/proc/self/fd'), key=int):\n"
    "    fd = int(name)\n"
    "    try:\n"
    "        os.fstat(fd)\n"
    "    except OSError:\n"
    "        continue  # the descriptor listdir used for /proc/self/fd\n"
    "    try:\n"
    "        target = os.readlink('/proc/self/fd/%d' % fd)\n"
    "    except OSError:\n"
    "        target = '?'\n"
    "    print('fd', fd, target)\n"
    "for name in ('mnt', 'pid', 'net', 'uts', 'ipc', 'user', 'cgroup'):\n"
    "    try:\n"
    "        print('ns', name, os.stat('/proc/self/ns/' + name).st_ino)\n"
    "    except OSError:\n"
    "        pass\n"
    # After the listing (these open descriptors of their own): the payload's credential,
    # securebits included, which /proc/self/status does not show (PR_GET_SECUREBITS = 27).
    "import ctypes\n"
    "print('securebits', ctypes.CDLL(None, use_errno=True).prctl(27, 0, 0, 0, 0))\n"
    "for name in ('status', 'uid_map'):\n"
    "    with open('/proc/self/' + name) as f:\n"
    "        print(f.read(), end='')\n"
)
#: The names of the payload's ``/proc/self/ns`` links, by namespace kind.
_NS_LINKS = {"mnt": "mount"}


def parse_fds(stdout: str) -> dict[int, str] | None:
    """The fds the ``fds`` payload reported (None: it reported nothing)."""
    found = {}
    for line in stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "fd" and parts[1].isdigit():
            found[int(parts[1])] = parts[2]
    return found or None


def parse_payload_ns(stdout: str) -> dict[str, int] | None:
    """The namespaces (kind -> inode) the ``fds`` payload reported (None: it reported none)."""
    found = {}
    for line in stdout.splitlines():
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == "ns" and parts[2].isdigit():
            found[_NS_LINKS.get(parts[1], parts[1])] = int(parts[2])
    return found or None


class HelperError(RuntimeError):
    """The suite could not prepare a scenario (not the engine's fault)."""


_EXIT_7 = ("/bin/sh", "-c", "exit 7")

_LIST: list[Scenario] = [
    Scenario(
        "default",
        "a payload that prints its own /proc/self/status and uid_map, exit 0",
        ("/bin/cat", "/proc/self/status", "/proc/self/uid_map"),
        0,
    ),
    Scenario("exit-code", "a payload that exits 7", _EXIT_7, 7),
    SignalScenario(
        "signals",
        "a payload that traps the forwarded signals; the suite sends "
        "each of them twice to the master, a round at a time",
        ("/bin/sh", "-c", _signal_script()),
        ALL_SIGNALS_ARRIVED,
    ),
    Scenario(
        "signal-death",
        "a payload that dies of SIGSEGV",
        (
            _python(),
            "-S",
            "-c",
            "import ctypes, resource; "
            "resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); ctypes.string_at(0)",
        ),
        128 + signal.SIGSEGV,
    ),
    HostViewScenario(
        "host-view",
        "a payload that waits while the suite watches the host's hostname and mount namespace",
        ("/bin/sh", "-c", "read line; exit 0", HOST_VIEW_MARKER),
        0,
    ),
    Scenario(
        "fds",
        "a payload that lists its own open file descriptors and namespaces, then prints "
        "its securebits, /proc/self/status and uid_map",
        (_python(), "-S", "-I", "-c", _FDS_SCRIPT),
        0,
    ),
    Scenario(
        "exec-failure",
        "a payload path that does not exist",
        ("/nonexistent/conformance-payload",),
        None,
        requires=(),
    ),
    JoinScenario(
        "join",
        "a join-only run into a helper's uts, ipc and net namespaces whose payload prints "
        "its own /proc/self/status and uid_map (its privileges are checked as the default "
        "run's)",
        ("/bin/cat", "/proc/self/status", "/proc/self/uid_map"),
        0,
        requires=("host_payloads", "join_only"),
        flows=("root", "suid"),
    ),
]
# An error path of a kit requirement is made by the kit itself (RunRequest.inject), in every
# engine's run; one of an engine requirement needs the engine's own failure (its cooperation,
# capability fault_injection).
for _req, _path in ERROR_PATHS.items():
    assert _path.fault in FAULTS and _path.fault in INJECTIONS, _path.fault
    _name = fault_scenario_name(_req)
    if _name in {s.name for s in _LIST}:
        continue  # ORDER-008 is ERR-007's run
    _by_kit = subject_of(_req) == KIT
    _LIST.append(
        Scenario(
            _name,
            (
                f"the kit injects a fault: {INJECTIONS[_path.fault]}"
                if _by_kit
                else f"the engine fails on request: {FAULTS[_path.fault]}"
            ),
            _EXIT_7,
            7 if _path.exit_code is None else _path.exit_code,
            engine_config=() if _by_kit else ((FAULT_FIELD, _path.fault),),
            requires=("host_payloads",) if _by_kit else ("host_payloads", "fault_injection"),
            short_hook_timeout=_path.fault.endswith(":hang"),
            fault=_path.fault,
            inject=_path.fault if _by_kit else None,
        )
    )

# RPC-005 and RPC-006 are the kit's: its RPC server is probed from the kit's side.
_LIST.append(
    Scenario(
        "rpc-probe",
        "the kit sends the RPC server an unknown method, an unknown argument, "
        "malformed JSON and a pickle before the engine's create_container, and an oversized frame "
        "after it",
        ("/bin/true",),
        0,
        fault="create_container:rpc-probe",
        inject="create_container:rpc-probe",
    )
)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in _LIST}


def fault_scenario(requirement: str) -> str:
    """The scenario name that makes the error path of ``requirement`` happen."""
    name = fault_scenario_name(requirement)
    if name not in SCENARIOS:
        raise KeyError(f"no scenario makes the error path of {requirement!r}")
    return name
