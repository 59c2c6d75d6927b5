"""``python -m bench.lifecycle``: what one lifecycle costs, against the kernel's own cost.

Measures, interleaved (A B C … A B C …) after a warm-up, the median wall time of:

* ``unshare``        — util-linux ``unshare -m -p -u -i -n -f /bin/true`` (the kernel's floor);
* ``runc``           — ``runc run`` of a trivial container: a static ``true`` in a minimal bundle
  (``runc spec``'s defaults: the same five namespaces, ``/proc``, ``/dev``…) that the bench
  writes to a temporary directory; the runtime a user would otherwise reach for. Where runc
  is not installed, the bench fetches Debian's package into that directory (``apt-get
  download runc``; nothing is installed; ``--runc PATH`` or ``--runc off`` instead). Skipped,
  with the reason in the JSON (``runc``), when it cannot be had or the bench has no static
  ``true`` for this machine;
* ``ctypes_minimal`` — fork → unshare(same namespaces) → fork → exec ``/bin/true`` from this
  lean process;
* ``process_model``  — the processes of a run and their hand-offs alone, in Python, forked
  from this process (supervisor, starter, stage 1, a container in new namespaces, an RPC
  server answering three calls, the payload exec'd): the floor of the kit's design before
  any of its work (``process_model_vs_runc``; ``no_probes_vs_process_model``: what the
  kit's work multiplies it by);
* ``full``           — one kit lifecycle of the reference engine, root flow, same namespaces,
  payload ``/bin/true``, probes and ledger on, in the host sandbox (:mod:`kit.run.sandbox`);
* ``no_sandbox``     — the same without the host sandbox (its cost is the difference);
* ``no_probes``      — the same without privilege snapshots and escalation probes;
* ``fake``           — the same in the fake backend (when the kit has it);
* ``userns``         — the userns flow (as the unprivileged test user).

Also a one-shot ``python -m kit run`` against ``python -c pass`` (``cli_vs_python``), and the
fake backend's seccomp filter: the time to install it, and what it adds to each
system call it lets through (the ``fake`` case includes both).

Besides wall time, the CPU time of each case (user + system, the bench and every process it
or its zygote forked and reaped; a lifecycle is CPU-bound, and CPU time is less noisy than
wall time on a shared machine): ``cpu_ms``, the mean per run.

It prints each median, the ratios, and where the time of a full lifecycle goes (per stage
and hook, from the ledger's timestamps; probe cost; ledger cost). ``--json FILE`` writes
``{"medians": {...ms}, "cpu_ms": {...}, "ratios": {...}, "samples": N, "runc": {...},
"breakdown": {...}, "loadavg": [before, after], "sandbox_overhead_cpu": ...}``;
``sandbox_overhead`` (in ``ratios``) is the host sandbox's share of a full lifecycle's wall
time (0.10: 10 %), ``sandbox_overhead_cpu`` its share of the CPU time. ``--cases
full,no_sandbox`` times only those cases (no CLI run, no micro-measures): the host
sandbox's cost alone, in a third of the time; ``--cases cli`` the one-shot CLI alone
(``cli_vs_python``). A benchmark, not a test: nothing here asserts
a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from kit.ledger import probe
from kit.ledger.record import LedgerWriter
from kit.run import seccomp
from kit.run.launcher import RunResult, Zygote, start
from kit.run.zygote import TOP_UP_PAUSE
from kit.run.zygote import idle as zygote_idle
from kit.system import linux

NAMESPACES = ["mount", "pid", "uts", "ipc", "net"]
ENGINE_CONFIG = {"namespaces": NAMESPACES}


def _spawn_wait(argv: list[str]) -> None:
    pid = os.posix_spawn(argv[0], argv, os.environ)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"{argv} failed with status {status}")


def bench_unshare() -> None:
    _spawn_wait(
        [
            shutil.which("unshare") or "/usr/bin/unshare",
            "-m",
            "-p",
            "-u",
            "-i",
            "-n",
            "-f",
            "/bin/true",
        ]
    )


def bench_ctypes_minimal() -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            linux.unshare(linux.ns_flags(NAMESPACES))
            child = os.fork()
            if child == 0:
                os.execv("/bin/true", ["/bin/true"])
            _, status = os.waitpid(child, 0)
            code = os.waitstatus_to_exitcode(status)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"minimal lifecycle failed: {status}")


def _child(body: Callable[[], None]) -> int:
    """Fork a child that runs ``body`` and exits 0 (1 if it raised, its traceback on
    stderr: the status alone would not say what went wrong); its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        except BaseException:  # noqa: BLE001 said on stderr, then the status says it failed
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pid


def _reaped_ok(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"process model: pid {pid} ended with status {status}")


def bench_process_model() -> None:
    """The processes of one run and their hand-offs, nothing else: forked from this
    process (which has the kit imported, as the zygote has), a "supervisor" forks a
    "starter", which forks "stage 1" (it writes its config on a pipe and exits), then a
    "container" in a new pid namespace, which enters the other namespaces and forks an
    "RPC server" that answers three calls on a socket pair before the container execs
    ``/bin/true``. No ledger, engine, host sandbox or check: what any kit of this
    process model written in Python pays before its own work."""

    def stage1(w: int) -> None:
        os.write(w, b"config")

    def rpc_server(sock: socket.socket) -> None:
        for _ in range(3):
            sock.recv(64)
            sock.send(b"done")

    def container(sock: socket.socket) -> None:
        linux.unshare(linux.ns_flags([k for k in NAMESPACES if k != "pid"]))
        _reaped_ok(_child(lambda: rpc_server(sock)))
        os.execv("/bin/true", ["/bin/true"])

    def starter() -> None:
        r, w = os.pipe()
        pid = _child(lambda: stage1(w))
        os.close(w)
        os.read(r, 64)
        os.close(r)
        _reaped_ok(pid)
        ours, theirs = socket.socketpair()
        linux.unshare(linux.ns_flags(["pid"]))
        pid = _child(lambda: container(theirs))
        for _ in range(3):
            ours.send(b"call")
            ours.recv(64)
        _reaped_ok(pid)

    _reaped_ok(_child(lambda: _reaped_ok(_child(starter))))


#: ``exit(0)`` on x86-64: mov eax, 60 (exit); xor edi, edi; syscall.
_EXIT0_X86_64 = bytes([0xB8, 0x3C, 0, 0, 0, 0x31, 0xFF, 0x0F, 0x05])


def static_true() -> bytes | None:
    """A static ELF executable that exits 0 (129 bytes, no libc to load), or None when the
    bench has none for this machine's architecture."""
    if os.uname().machine != "x86_64":
        return None
    base, code_at = 0x400000, 64 + 56  # one ELF header, one program header, then the code
    size = code_at + len(_EXIT0_X86_64)
    header = (
        b"\x7fELF"
        + bytes([2, 1, 1, 0])
        + bytes(8)
        + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, base + code_at, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    )
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD r-x
    return header + segment + _EXIT0_X86_64


class RuncCase:
    """``runc run`` of a trivial container in a bundle of its own (a temporary directory the
    bench removes; runc's state lives there too, not in ``/run/runc``)."""

    def __init__(self, runc: str, work: str) -> None:
        self.runc = runc
        self.work = work
        self.bundle = os.path.join(work, "bundle")
        self.state = os.path.join(work, "state")
        self.count = 0

    @classmethod
    def setup(cls, choice: str = "auto") -> tuple[RuncCase | None, dict[str, Any]]:
        """(the case, what the JSON says about runc), or (None, the reason it is skipped).
        ``choice``: ``auto`` (runc on PATH, else Debian's package fetched into the bench's
        temporary directory, never installed), a path to a runc binary, or ``off``."""
        if choice == "off":
            return None, {"skipped": "--runc off"}
        binary = static_true()
        if binary is None:
            return None, {"skipped": f"no static true for {os.uname().machine} in the bench"}
        work = tempfile.mkdtemp(prefix="kit-bench-runc-")
        try:
            case, info = cls._set_up(choice, work, binary)
        except BaseException:  # Ctrl-C in a download, say: nothing is left behind
            shutil.rmtree(work, ignore_errors=True)
            raise
        if case is None:
            shutil.rmtree(work, ignore_errors=True)
        return case, info

    @classmethod
    def _set_up(
        cls, choice: str, work: str, binary: bytes
    ) -> tuple[RuncCase | None, dict[str, Any]]:
        runc = choice if choice != "auto" else shutil.which("runc")
        source = "given" if choice != "auto" else "installed"
        if runc is None:
            runc, why = _fetch_debian_runc(work)
            source = "Debian's package, fetched by the bench (apt-get download runc)"
            if runc is None:
                return None, {
                    "skipped": f"runc is not installed and could not be fetched ({why}); "
                    "Debian: apt-get install -y --no-install-recommends runc, or --runc PATH"
                }
        case = cls(runc, work)
        try:
            version = subprocess.run(
                [runc, "--version"], capture_output=True, text=True, check=True, timeout=30
            ).stdout.splitlines()
            rootfs = os.path.join(case.bundle, "rootfs")
            os.makedirs(rootfs)
            with open(os.path.join(rootfs, "true"), "wb") as f:
                f.write(binary)
            os.chmod(os.path.join(rootfs, "true"), 0o755)
            subprocess.run(
                [runc, "spec", "--bundle", case.bundle],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            )
            path = os.path.join(case.bundle, "config.json")
            with open(path) as f:
                spec = json.load(f)
            spec["process"]["terminal"] = False  # no console: stdio inherited, as in the kit
            spec["process"]["args"] = ["/true"]
            with open(path, "w") as f:
                json.dump(spec, f)
            case.once()
        except (OSError, subprocess.SubprocessError, RuntimeError, KeyError, ValueError) as exc:
            said = str(getattr(exc, "stderr", None) or "").strip()[-200:]  # runc's own words
            return None, {
                "skipped": f"runc ({runc}) cannot run the bench's bundle here: {exc}"
                + (f": {said}" if said else "")
            }
        return case, {
            "version": version[0] if version else "",
            "source": source,
            "bundle": "runc spec, terminal off, args /true (a static exit(0))",
        }

    def once(self) -> None:
        self.count += 1
        _spawn_wait(
            [
                self.runc,
                "--root",
                self.state,
                "run",
                "--bundle",
                self.bundle,
                f"kit-bench-{os.getpid()}-{self.count}",
            ]
        )

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def _fetch_debian_runc(work: str) -> tuple[str | None, str]:
    """Debian's runc package downloaded into ``work`` and unpacked there (nothing is
    installed): (the binary, "") or (None, why not)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None, "no apt-get and dpkg-deb here"
    print("runc: not installed; fetching Debian's package (apt-get download runc)", flush=True)
    try:
        offline_soon = ["-o", "Acquire::Retries=0", "-o", "Acquire::http::Timeout=15"]
        subprocess.run(
            ["apt-get", "download", "-q", *offline_soon, "runc"],  # offline: fail soon
            cwd=work,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        (deb,) = [name for name in os.listdir(work) if name.endswith(".deb")]
        unpacked = os.path.join(work, "runc-package")
        subprocess.run(
            ["dpkg-deb", "-x", os.path.join(work, deb), unpacked],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.CalledProcessError as exc:
        return None, f"{' '.join(exc.cmd[:2])}: {(exc.stderr or '').strip()[-200:]}"
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    for where in ("usr/sbin/runc", "usr/bin/runc"):
        binary = os.path.join(unpacked, where)
        if os.access(binary, os.X_OK):
            return binary, ""
    return None, "the package holds no runc binary"


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, its reaped children, and the zygote with
    its reaped children (the supervisors of the lifecycles: the zygote is not reaped until
    the bench ends, so its own counters are read from ``/proc``, in clock ticks)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    zygote = Zygote.get_existing()
    if zygote is not None:
        total += _zygote_ticks(zygote.proc.pid) / os.sysconf("SC_CLK_TCK")
    return total


def _zygote_ticks(zygote: int) -> int:
    with open(f"/proc/{zygote}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime: fields 14-17 of proc(5), 12-15 after "pid (comm)".
    return sum(int(x) for x in fields[11:15])


def _lifecycle(flow: str, **options: Any) -> Callable[[], RunResult]:
    def once() -> RunResult:
        handle = start("reference", flow, ["/bin/true"], engine_config=ENGINE_CONFIG, **options)
        result = handle.wait()
        if result.exit_code != 0:
            raise RuntimeError(f"{flow} lifecycle failed: {result}")
        _reaped.append(handle.supervisor_pid)
        return result

    return once


#: Supervisors whose run is over but which the zygote may not have reaped yet.
_reaped: list[int] = []


def await_reaped(timeout: float = 60.0) -> None:
    """Wait until the zygote has reaped the supervisors of the runs measured so far, and has
    settled (it ends a run's host sandbox after its supervisor is gone): until then their
    CPU time is not in the zygote's counters (:func:`cpu_seconds`), and would be counted in
    the next case. The wait is not timed; on a loaded machine (the kit's tests under
    coverage, beside another worker) the sandboxes the zygote builds at nice 19 took more
    than 5 s to be built."""
    deadline = time.monotonic() + timeout
    while _reaped:
        if linux.process_state(_reaped[-1]) is None:
            _reaped.pop()
        elif time.monotonic() > deadline:
            raise RuntimeError(f"the zygote did not reap supervisor {_reaped[-1]} in {timeout} s")
        else:
            time.sleep(0.0002)
    zygote = Zygote.get_existing()
    if zygote is not None:
        _await_settled(zygote.proc.pid, deadline)


def _await_settled(
    zygote: int, deadline: float, quiet: int = int(TOP_UP_PAUSE / 0.005) + 3
) -> None:
    """Until the zygote is idle (:func:`kit.run.zygote.idle`: the sandboxes it builds
    between runs are built) and its CPU counters stay the same for ``quiet`` reads 5 ms
    apart (they count in clock ticks), longer than the zygote waits before it starts
    building (:data:`kit.run.zygote.TOP_UP_PAUSE`)."""
    last, same = -1, 0
    while same < quiet:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the zygote (pid {zygote}) did not settle after a run")
        busy = not zygote_idle(zygote)
        now = _zygote_ticks(zygote)
        same = 0 if busy or now != last else same + 1
        last = now
        time.sleep(0.005)


def _loadavg() -> str:
    """The 1, 5 and 15 minute load averages (a shared machine's wall times depend on them)."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def fake_available() -> bool:
    try:
        import kit.system.fake  # noqa: F401, PLC0415  (the probe itself: does it import here?)
    except ImportError:
        return False
    return True


def ledger_cost(n: int = 2000) -> float:
    """Median µs to emit one hook event (with a typical snapshot) to a SEQPACKET socket."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    w = LedgerWriter(writer, "master")
    snap = probe.snapshot()
    samples = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            w.emit("hook_return", hook="create_container", snapshot=snap, result=None)
            samples.append(time.perf_counter() - t)
            reader.recv(1 << 20)
    finally:
        reader.close()
        writer.close()
    return statistics.median(samples) * 1e6


def probe_cost(n: int = 200) -> dict[str, float]:
    """Median ms of one snapshot and one escalation probe in this process (with a setuid
    binary to exec, as in a run, where this process can provide one)."""

    out = {}
    work = tempfile.mkdtemp(prefix="kit-bench-")
    os.chmod(work, 0o755)
    previous = probe.setuid_binary()
    probe.configure(None, probe.provide_setuid_binary(work))
    try:
        for name, fn in (("snapshot", probe.snapshot), ("escalation", probe.escalation)):
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t)
            out[name] = statistics.median(samples) * 1000
    finally:
        probe.configure(None, previous)
        shutil.rmtree(work, ignore_errors=True)
    return out


def seccomp_cost(batches: int = 200, per_batch: int = 500) -> dict[str, float | str]:
    """The fake backend's filter (kit/run/seccomp.py), measured in a forked child: ms to build
    and install it with its listener, and ns it adds to each system call it lets through
    (getppid, median per-call time of batches, after minus before); ``{"error": ...}`` when
    the child failed."""

    def per_call() -> float:
        samples = []
        for _ in range(batches):
            t = time.perf_counter_ns()
            for _ in range(per_batch):
                os.getppid()
            samples.append((time.perf_counter_ns() - t) / per_batch)
        return statistics.median(samples)

    seccomp.warm()  # as the zygote does
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out: dict[str, float | str]  # the costs, or {"error": ...}
        try:
            before = per_call()
            t = time.perf_counter()
            listener = seccomp.install(seccomp.FAKE_RULES)
            if listener is not None:
                os.close(listener)
            install_ms = (time.perf_counter() - t) * 1000
            out = {
                "install_ms": round(install_ms, 3),
                "per_syscall_ns": round(per_call() - before, 1),
                "syscall_ns_unfiltered": round(before, 1),
            }
        except Exception as exc:  # noqa: BLE001 the child reports any failure as JSON
            out = {"error": repr(exc)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    costs: dict[str, float | str] = json.loads(data)
    return costs


def breakdown(result: RunResult) -> dict[str, Any]:
    """Where the time of one lifecycle went, from the ledger's monotonic timestamps."""
    events = result.ledger.events
    t0 = events[0]["t"]

    def at(pred: Callable[[dict[str, Any]], bool]) -> float | None:
        for e in events:
            if pred(e):
                return float((e["t"] - t0) / 1e6)
        return None

    marks = {
        "starter started": at(lambda e: e["kind"] == "process_start" and e["role"] == "starter"),
        "stage 1 done": at(
            lambda e: e["kind"] == "process_exit" and e.get("child_role") == "stage1"
        ),
        "namespaces ready": at(lambda e: e["kind"] == "namespaces"),
        "create_container returned": at(
            lambda e: e["kind"] == "hook_return" and e.get("hook") == "create_container"
        ),
        "payload exec'd": at(lambda e: e["kind"] == "stage2_exec"),
        "cleanup returned": at(
            lambda e: e["kind"] == "hook_return" and e.get("hook") == "cleanup_container"
        ),
        "run over": (events[-1]["t"] - t0) / 1e6,
    }
    hooks: dict[str, float] = {}
    open_: dict[tuple[str, str], int] = {}
    for e in events:
        key = (e["role"], e.get("hook", ""))
        if e["kind"] == "hook_enter":
            open_[key] = e["t"]
        elif e["kind"] in ("hook_return", "hook_raise") and key in open_:
            hooks[f"{key[0]}.{key[1]}"] = round((e["t"] - open_.pop(key)) / 1e6, 3)
    return {
        "marks_ms": {k: round(v, 3) if v is not None else None for k, v in marks.items()},
        "hooks_ms": hooks,
    }


def suite_scaling(engine: str, repeats: int = 3) -> dict[str, float]:
    """Median wall seconds of the whole conformance suite with ``-n 0`` (``wall_s``, the
    issue's measure; also ``n0_s``) and ``-n 2`` (interleaved), the speed-up, and the
    collection alone (``collect_s``: ``--collect-only``, the same process start)."""
    times: dict[str, list[float]] = {"n0": [], "n2": [], "collect": []}
    cases = (("n0", ["-n", "0"]), ("n2", ["-n", "2"]), ("collect", ["-n", "0", "--collect-only"]))
    for _ in range(repeats):
        for key, extra in cases:
            t = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    f"--engine={engine}",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    *extra,
                ],
                capture_output=True,
                text=True,
                cwd="/",
            )
            times[key].append(time.perf_counter() - t)
            if proc.returncode not in (0, 1):
                raise RuntimeError(f"suite run failed ({proc.returncode}): {proc.stdout[-500:]}")
    n0, n2 = statistics.median(times["n0"]), statistics.median(times["n2"])
    return {
        "wall_s": round(n0, 2),
        "collect_s": round(statistics.median(times["collect"]), 2),
        "n0_s": round(n0, 2),
        "n2_s": round(n2, 2),
        "speedup": round(n0 / n2, 2),
    }


#: The ``--cases`` name of :func:`cli_vs_python`.
CLI_CASE = "cli"


def cli_vs_python(samples: int = 30, warmup: int = 2) -> dict[str, float]:
    """A one-shot ``python -m kit run --engine reference --flow root -- /bin/true`` against a
    bare ``python -c pass`` of the same interpreter, interleaved: median wall ms of each and
    ``ratio`` (the issue's ``cli_vs_python``), with ``cpu_ratio`` from the CPU time of each
    process tree. Bytecode caches are used (``PYTHONDONTWRITEBYTECODE`` unset), as on a user's
    machine; the first, cache-writing runs are part of the warm-up."""
    cases = {
        "python": [sys.executable, "-c", "pass"],
        "cli": [
            sys.executable,
            "-m",
            "kit",
            "run",
            "--engine",
            "reference",
            "--flow",
            "root",
            "--",
            "/bin/true",
        ],
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(warmup + samples):
        for name, argv in cases.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            code = subprocess.run(argv, env=env, cwd="/", stdin=subprocess.DEVNULL).returncode
            elapsed = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if code != 0:
                raise RuntimeError(f"{' '.join(argv)} exited {code}")
            if i >= warmup:
                wall[name].append(elapsed * 1000)
                cpu[name].append(
                    (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
                )
    med = {name: statistics.median(v) for name, v in wall.items()}
    cpu_med = {name: statistics.median(v) for name, v in cpu.items()}
    return {
        "cli_ms": round(med["cli"], 2),
        "python_ms": round(med["python"], 2),
        "ratio": round(med["cli"] / med["python"], 2),
        "cpu_ratio": round(cpu_med["cli"] / cpu_med["python"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lifecycle", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--samples", type=int, default=30, help="samples per case (≥ 30)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="write medians and ratios as JSON")
    parser.add_argument(
        "--suite", metavar="ENGINE", help="also time the whole conformance suite with -n 0 and -n 2"
    )
    parser.add_argument(
        "--cases",
        metavar="NAME,...",
        help="time only these cases (e.g. full,no_sandbox: the host sandbox's cost; cli: the "
        "one-shot CLI against python -c pass) and skip the micro-measures; ratios of cases "
        "left out are n/a",
    )
    parser.add_argument(
        "--runc",
        default="auto",
        metavar="auto|PATH|off",
        help="the runc to compare with: auto (the one on PATH, else Debian's package fetched "
        "into a temporary directory, not installed), a binary, or off",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.lifecycle: needs root (the root flow and util-linux unshare)", file=sys.stderr)
        return 2

    wanted = args.cases is None or "runc" in args.cases.split(",")
    runc: RuncCase | None = None
    try:
        runc, runc_info = RuncCase.setup(args.runc if wanted else "off")
        return _measure(args, runc, runc_info)
    finally:
        if runc is not None:
            runc.close()


def _measure(args: argparse.Namespace, runc: RuncCase | None, runc_info: dict[str, Any]) -> int:
    cases: dict[str, Callable[[], Any]] = {"unshare": bench_unshare}
    if runc is not None:
        cases["runc"] = runc.once
    cases.update(
        {
            "ctypes_minimal": bench_ctypes_minimal,
            "process_model": bench_process_model,
            "full": _lifecycle("root"),
            "no_sandbox": _lifecycle("root", sandbox=False),
            "no_probes": _lifecycle("root", probes=False),
        }
    )
    if fake_available():
        cases["fake"] = _lifecycle("root", backend="fake")
    cases["userns"] = _lifecycle("userns")
    only = args.cases.split(",") if args.cases else None
    cli = only is None or CLI_CASE in only  # the one-shot CLI: a case of its own
    if only is not None:
        only = [name for name in only if name != CLI_CASE]
        unknown = sorted(set(only) - set(cases))
        if unknown:
            print(f"bench.lifecycle: unknown case(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        cases = {name: fn for name, fn in cases.items() if name in only}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, float] = {name: 0.0 for name in cases}
    loadavg = [_loadavg()]
    for _ in range(args.warmup):
        for fn in cases.values():
            fn()
    await_reaped()
    last_full: RunResult | None = None
    for i in range(args.samples):
        for name, fn in cases.items():
            c = cpu_seconds()
            t = time.perf_counter()
            out = fn()
            samples[name].append((time.perf_counter() - t) * 1000)
            waiting = time.process_time()
            await_reaped()  # not timed: the zygote reaps after the run is over
            waiting = time.process_time() - waiting  # the bench's own reads of /proc
            cpu[name] += cpu_seconds() - c - waiting
            if name == "full":
                last_full = out
        if sys.stderr.isatty():
            print(f"\rsample {i + 1}/{args.samples}", end="", file=sys.stderr)
    if sys.stderr.isatty():
        print(file=sys.stderr)

    loadavg.append(_loadavg())
    medians = {name: round(statistics.median(v), 3) for name, v in samples.items()}
    cpu_ms = {name: round(1000 * v / args.samples, 2) for name, v in cpu.items()}

    def ratio(a: str, b: str, of: dict[str, float] = medians) -> float | None:
        return round(of[a] / of[b], 2) if a in of and b in of and of[b] > 0 else None

    def share(a: str, b: str, of: dict[str, float]) -> float | None:
        """What ``a`` adds to ``b``, as a share of ``a`` (0.10: 10 % of a lifecycle)."""
        return round((of[a] - of[b]) / of[a], 3) if a in of and b in of and of[a] > 0 else None

    ratios = {
        "full_vs_runc": ratio("full", "runc"),
        "no_probes_vs_runc": ratio("no_probes", "runc"),
        "full_vs_unshare": ratio("full", "unshare"),
        "full_vs_minimal": ratio("full", "ctypes_minimal"),
        "process_model_vs_runc": ratio("process_model", "runc"),
        "no_probes_vs_process_model": ratio("no_probes", "process_model"),
        "no_probes_vs_unshare": ratio("no_probes", "unshare"),
        "fake_vs_full": ratio("fake", "full"),
        "sandbox_vs_no_sandbox": ratio("full", "no_sandbox"),
        "sandbox_overhead": share("full", "no_sandbox", medians),
        "cpu_full_vs_runc": ratio("full", "runc", cpu_ms),
        "cpu_no_probes_vs_runc": ratio("no_probes", "runc", cpu_ms),
    }
    report: dict[str, Any] = {
        "samples": args.samples,
        "medians": medians,
        "cpu_ms": cpu_ms,
        "ratios": ratios,
        "runc": runc_info,
        "loadavg": loadavg,
        "sandbox_overhead_cpu": share("full", "no_sandbox", cpu_ms),
        "breakdown": breakdown(last_full) if last_full else {},
    }
    if cli:
        report_cli = cli_vs_python(args.samples, args.warmup)
        loadavg[-1] = _loadavg()  # after everything timed
        ratios["cli_vs_python"] = report_cli["ratio"]
        report["cli"] = report_cli
    if only is None:
        report.update(
            probe_ms=probe_cost(),
            ledger_event_us=round(ledger_cost(), 2),
            seccomp=seccomp_cost(),
        )

    print(f"{'case':16} {'median ms':>10} {'cpu ms':>8}")
    for name, value in medians.items():
        print(f"{name:16} {value:10.2f} {cpu_ms[name]:8.2f}")
    if "skipped" in runc_info:
        print(f"runc: skipped: {runc_info['skipped']}")
    print()
    for name, ratio_value in ratios.items():
        print(f"{name:26} {'n/a' if ratio_value is None else f'{ratio_value:.2f}'}")
    if "cli" in report:
        print(
            f"one-shot CLI {report['cli']['cli_ms']} ms, python -c pass "
            f"{report['cli']['python_ms']} ms (CPU ratio {report['cli']['cpu_ratio']})"
        )
    print(f"load average before and after: {loadavg[0]} / {loadavg[1]}")
    print()
    print("where a full lifecycle's time goes (ms since the supervisor's first event):")
    for name, value in report["breakdown"].get("marks_ms", {}).items():
        print(f"  {name:28} {value}")
    print("hook durations (ms, probes included):")
    for name, value in report["breakdown"].get("hooks_ms", {}).items():
        print(f"  {name:34} {value}")
    if "full" in medians and "no_sandbox" in medians:
        cost = medians["full"] - medians["no_sandbox"]
        cpu_cost = cpu_ms["full"] - cpu_ms["no_sandbox"]
        report["sandbox_cost_ms"] = round(cost, 3)
        report["sandbox_cost_cpu_ms"] = round(cpu_cost, 3)
        print(
            f"host sandbox: {cost:+.2f} ms per lifecycle, {100 * cost / medians['full']:+.1f} % "
            f"of one with it (CPU {cpu_cost:+.2f} ms, {100 * cpu_cost / cpu_ms['full']:+.1f} %)"
        )
    if "probe_ms" in report:
        print(
            f"one snapshot: {report['probe_ms']['snapshot']:.2f} ms, one escalation probe: "
            f"{report['probe_ms']['escalation']:.2f} ms, one ledger event: "
            f"{report['ledger_event_us']:.1f} µs"
        )
        sc = report["seccomp"]
        print(
            f"the fake backend's seccomp filter: install {sc.get('install_ms')} ms, "
            f"+{sc.get('per_syscall_ns')} ns per system call let through "
            f"(getppid unfiltered {sc.get('syscall_ns_unfiltered')} ns)"
        )
    if args.suite:
        report["suite"] = suite_scaling(args.suite)
        print(
            f"conformance suite ({args.suite}): -n 0 {report['suite']['n0_s']} s "
            f"(collection {report['suite']['collect_s']} s), -n 2 {report['suite']['n2_s']} s, "
            f"speed-up {report['suite']['speedup']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
