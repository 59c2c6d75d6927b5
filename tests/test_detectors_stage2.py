"""Stage 2's fd closing fed real open descriptors: several kept ones (adjacent, apart, high),
the descriptor just after each kept one, all opened inheritable so Python's close-on-exec
default hides nothing; and a whole run whose payload lists what it inherited."""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

from kit.run.launcher import run
from kit.starter.stage2 import Stage2

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


def close_fds_in_child(layout: dict[str, int | None]) -> dict[str, object]:
    """In a forked child: open an inheritable fd per name of ``layout`` (at that number, or
    the next free one), keep the names starting with "keep", call Stage2.close_fds with a
    pipe as the master fd, and report over it which fds are left and which inheritable."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            ledger_a, ledger_b = socket.socketpair()
            ledger_b.close()
            fds = {name: _inheritable_fd(at) for name, at in layout.items()}
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
