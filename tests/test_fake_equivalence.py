"""Ledger equivalence: for the reference engine, a fake run's ledger equals the real run's,
field by field and event by event, once the identities that differ between any two runs are
normalised.

What is normalised, and why:

- ``seq``, ``t``: arrival order and clock of a particular run.
- ``tid`` of events and of snapshot threads, pids that are host pids (≥ 100: the kit's
  processes never get a host pid that small), ``child_pid`` of ``process_exit``, ``sender``
  of ``signal``, ``run_dir``: identities of a run. Namespace-local pids (1 for the
  container and stage 2, 2 for the RPC server, also in ``nspid``) are compared as they are.
  ``child_pid`` is normalised even for the RPC server, whose pid the real ``clone`` returns
  in the container's namespace (2) and the fake's ``clone`` as the real pid (the starter
  waits for it with the real ``waitpid``).
- ``ppid`` while the starter reads it with ``os.getppid()`` (the kernel answers 0 for pid 1
  of a new pid namespace; the fake cannot interpose): compared like a pid once the starter
  uses ``system.getppid()``.
- namespace inode numbers: relabelled ``host`` (the namespace stage 1 is in) or
  ``new-KIND-N`` in order of first appearance (per role, in a fixed role order).
- ``backend`` of ``run_start`` (the one intended difference, with the seccomp filter that
  follows from it: ``filter`` and ``syscalls`` of ``seccomp_filter``), ``duration_ms`` of RPC calls,
  the Python object ``id`` in a hook's result summary, the run's ``container_id`` wherever
  it appears (hook arguments), the host pid of the container wherever it appears
  (``container_pid``, hook arguments ``pid``), the sentinel's pid and the RPC socket's inode
  (``container_start``).
- ``cached`` of an escalation verdict: the starter re-runs the escalation probe only when
  the calling thread's snapshot changed, matching the thread by its tid — which the real RPC
  server cannot do (its tid is namespace-local, its snapshot lists host tids), the fake can;
  the verdict itself is compared.
- the *number* of threads a snapshot lists: a master thread that has returned from its hook
  may or may not have exited yet, in either backend. Snapshots are compared as the set of
  distinct thread states (every field but the tid). (Tids are not even comparable within a
  real ledger: an event's tid is the thread's id in its own pid namespace, a snapshot's
  tids are those of the proc mounted on ``/proc``, the host's until the container mounts
  its own.)
- order: events are compared per stream — one stream per (role, thread), named by its first
  event — in order within the stream. Streams of different processes (master, RPC server,
  container/stage 2) and of the master's threads run concurrently and interleave
  differently in any two runs; their relative order is checked by tests/test_lifecycle.py
  and tests/test_fake_lifecycle.py instead.
- ``signal`` events are compared as the set of distinct signal names, SIGCHLD left out:
  SIGCHLD is a standard signal, so the kernel merges pending ones — the container's with
  those of the real master's probe children (which the master filters out) — and identical
  real runs recorded the container's SIGCHLD a varying number of times (one to three).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from conftest import ALL_FLOWS, require_flow

import kit.starter
from kit.run.launcher import run

PAYLOAD = ["/bin/sh", "-c", "exit 7"]
ROLE_ORDER = ("supervisor", "starter", "stage1", "master", "container", "rpc", "stage2")
HOST_PID_MIN = 100
STARTER_REPORTS_MODEL_PPID = "system.getppid()" in inspect.getsource(kit.starter)


def _pid(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value >= HOST_PID_MIN:
        return "<pid>"
    return value


class Normaliser:
    """Normalises one ledger (see the module docstring)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.events = document["events"]
        self.container_id = document["run"]["container_id"]
        self.labels: dict[tuple[str, int], str] = {}
        host = next(e for e in self.events if e["kind"] == "hook_enter" and e["role"] == "stage1")[
            "snapshot"
        ]["ns"]
        for kind, ino in host.items():
            self.labels[(kind, ino)] = "host"
        counters: dict[str, int] = {}
        ordered = sorted(self.events, key=lambda e: (ROLE_ORDER.index(e["role"]), e["seq"]))
        for e in ordered:
            for ns in self._ns_dicts(e):
                for kind, ino in sorted(ns.items(), key=lambda item: item[0]):
                    if ino is None:
                        self.labels[(kind, ino)] = "unreadable"
                    elif (kind, ino) not in self.labels:
                        counters[kind] = counters.get(kind, 0) + 1
                        self.labels[(kind, ino)] = f"new-{kind}-{counters[kind]}"

    @staticmethod
    def _ns_dicts(e: dict[str, Any]) -> list[dict[str, int]]:
        out = []
        if isinstance(e.get("snapshot"), dict):
            out.append(e["snapshot"]["ns"])
            out.extend(t["ns"] for t in e["snapshot"]["threads"] if "ns" in t)
        if e["kind"] == "namespaces":
            out.append(e["ns"])
        if e["kind"] == "rpc_call":  # every thread of the RPC server around the method
            for seen in (e.get("creds") or {}).values():
                if isinstance(seen, dict):
                    out.extend(t["ns"] for t in seen.get("threads") or [] if "ns" in t)
        return out

    def ns(self, ns: dict[str, int]) -> dict[str, str]:
        return {kind: self.labels[(kind, ino)] for kind, ino in ns.items()}

    def threads(self, threads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The distinct thread states (every field but the tid)."""
        states = {
            json.dumps(
                {k: (self.ns(v) if k == "ns" else v) for k, v in t.items() if k != "tid"},
                sort_keys=True,
            )
            for t in threads
        }
        return [json.loads(s) for s in sorted(states)]

    def snapshot(self, snap: dict[str, Any] | None) -> dict[str, Any] | None:
        if snap is None:
            return None
        out = self.value(dict(snap))
        out["threads"] = self.threads(snap["threads"])
        out["ns"] = self.ns(snap["ns"])
        out["nspid"] = [_pid(p) for p in snap["nspid"]]
        return out

    def event(self, e: dict[str, Any]) -> dict[str, Any]:
        out = self.value({k: v for k, v in e.items() if k not in ("seq", "t", "tid")})
        if "snapshot" in e:
            out["snapshot"] = self.snapshot(e["snapshot"])
        kind = e["kind"]
        if kind == "run_start":
            out.pop("backend")
            out.pop("sandbox_left_out", None)  # the real backend's host sandbox only
            out["run_dir"] = "<run_dir>"
        elif kind == "process_start":
            out["ppid"] = _pid(e["ppid"]) if STARTER_REPORTS_MODEL_PPID else "<ppid>"
        elif kind == "rpc_call":
            out.pop("duration_ms")
            for moment, seen in (e.get("creds") or {}).items():
                if isinstance(seen, dict) and "threads" in seen:
                    out["creds"][moment]["threads"] = self.threads(seen["threads"])
        elif kind == "seccomp_filter":  # fake: containment + host-global; real: host-global
            out.pop("filter", None)
            out.pop("syscalls", None)
        elif kind == "namespaces":
            out["ns"] = self.ns(e["ns"])
        elif kind == "hook_return" and isinstance(e.get("result"), dict):
            out["result"] = {k: v for k, v in out["result"].items() if k != "id"}
        if isinstance(out.get("escalation"), dict):
            out["escalation"].pop("cached", None)
        return out

    def value(self, v: Any, key: str = "") -> Any:
        """Identities anywhere in an event: host pids (``pid``, ``container_pid``,
        ``nspid``…), always-real pids (``child_pid``, ``sender``), the container id."""
        if isinstance(v, dict):
            return {k: self.value(x, k) for k, x in v.items()}
        if isinstance(v, list):
            return [self.value(x, key) for x in v]
        if key in ("child_pid", "sender", "sentinel_pid"):
            return "<pid>"
        if key == "inode":  # container_start's RPC socket: a new one every run
            return "<inode>"
        if key in ("pid", "ppid", "container_pid", "hook_pid", "nspid"):
            return _pid(v)
        if isinstance(v, str) and v == self.container_id:
            return "<container_id>"
        return v

    def streams(self) -> dict[str, Any]:
        """``"role: first event"`` -> the stream's normalised events, in order; plus
        ``"signals"``: the names of the signals the master recorded, but SIGCHLD."""
        by_thread: dict[tuple[str, int], list[dict[str, Any]]] = {}
        signals: set[str] = set()
        for e in self.events:
            if e["kind"] == "signal":
                if e["name"] != "SIGCHLD":
                    signals.add(e["name"])
                continue
            by_thread.setdefault((e["role"], e["tid"]), []).append(e)
        out: dict[str, Any] = {"signals": sorted(signals)}
        for (role, _), events in by_thread.items():
            first = events[0]
            name = f"{role}: {first['kind']} {first.get('hook') or ''}".strip()
            assert name not in out, f"two streams named {name!r}"
            out[name] = [self.event(e) for e in events]
        return out


def _diff(real: dict[str, Any], fake: dict[str, Any]) -> list[str]:
    """Field-by-field differences, as readable lines (empty: equal)."""
    lines: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if k not in a or k not in b:
                    lines.append(
                        f"{path}.{k}: real {a.get(k, '<absent>')!r} fake {b.get(k, '<absent>')!r}"
                    )
                else:
                    walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        elif path.endswith(".threads") and isinstance(a, list) and isinstance(b, list):
            only = [[t for t in side if t not in other] for side, other in ((a, b), (b, a))]
            real_only, fake_only = (json.dumps(side) for side in only)
            lines.append(f"{path}: only in real {real_only}, only in fake {fake_only}")
        elif a != b:
            lines.append(f"{path}: real {json.dumps(a)[:300]} fake {json.dumps(b)[:300]}")

    walk(real, fake, "")
    return lines


@pytest.fixture(scope="module")
def ledgers() -> dict[tuple[str, str], Any]:
    return {}


def both(flow: str, cache: dict) -> tuple[Any, Any]:
    for backend in ("real", "fake"):
        if (flow, backend) not in cache:
            # The model stands for the kernel, not for the host sandbox around a run
            # (its own pid numbering, the host diff's event): the real side runs without it.
            cache[(flow, backend)] = run("reference", flow, PAYLOAD, backend=backend, sandbox=False)
    return cache[(flow, "real")], cache[(flow, "fake")]


@pytest.mark.parametrize("flow", ALL_FLOWS)
def test_fake_ledger_equals_real_ledger(flow, ledgers):
    require_flow(flow)
    real, fake = both(flow, ledgers)
    assert real.exit_code == fake.exit_code == 7, (str(real), str(fake))
    assert real.ledger.first("run_start")["backend"] == "real"
    assert fake.ledger.first("run_start")["backend"] == "fake"
    r = Normaliser(real.ledger.document).streams()
    f = Normaliser(fake.ledger.document).streams()
    assert sorted(r) == sorted(f), "different event streams"
    problems = []
    for name in r:
        if len(r[name]) != len(f[name]):
            problems.append(
                f"{name}: real has {len(r[name])} events, fake {len(f[name])}: "
                f"{[e['kind'] if isinstance(e, dict) else e for e in r[name]]} vs "
                f"{[e['kind'] if isinstance(e, dict) else e for e in f[name]]}"
            )
            continue
        problems += [f"{name}{line}" for line in _diff(r[name], f[name])]
    assert not problems, f"flow {flow}: fake differs from real:\n" + "\n".join(problems[:40])


@pytest.mark.parametrize("flow", ALL_FLOWS)
def test_every_hook_snapshot_and_escalation_is_compared(flow, ledgers):
    # The normalisation keeps what the suite asserts on: all credentials, caps, maps,
    # namespace identities (as labels) and escalation verdicts of every hook.
    require_flow(flow)
    real, _ = both(flow, ledgers)
    streams = Normaliser(real.ledger.document).streams()
    hooks = [
        e
        for events in streams.values()
        for e in events
        if isinstance(e, dict) and e["kind"] == "hook_enter"
    ]
    assert len(hooks) == len(real.ledger.select("hook_enter"))
    for e in hooks:
        assert e["snapshot"]["threads"] and e["escalation"] is not None
        assert set(e["snapshot"]["threads"][0]) >= {
            "uid",
            "gid",
            "groups",
            "caps",
            "no_new_privs",
            "seccomp",
        }
