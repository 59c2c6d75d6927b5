"""``python -m bench.sandbox_build``: what building and adopting one host sandbox costs here.

    python -m bench.sandbox_build [--samples 20]
    python tests/userns_launch.py 65536 -- python -m bench.sandbox_build  # in a user namespace

Each sample, in a forked child (adopting moves a process into the sandbox's pid namespace,
once): :func:`kit.run.sandbox.build` then :func:`~kit.run.sandbox.adopt` (wall time until
the sandbox is ready), then :func:`~kit.run.sandbox.end` (its teardown, timed apart). Prints
JSON: the medians in ms, the number of copy-on-write upper layers (1 where ``/`` is one
overlay, more where it is split in pieces) and whether this is the initial user namespace.
Needs root. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from kit.run import sandbox
from kit.system import linux


def _sample() -> dict[str, float]:
    """One build, adopt and end, timed, in this (forked) process."""
    start = time.perf_counter()
    box = sandbox.adopt(sandbox.build([]))
    ready = time.perf_counter()
    uppers = len(box.upper_dirs)
    sandbox.end(box)
    return {
        "build_adopt_ms": (ready - start) * 1000,
        "end_ms": (time.perf_counter() - ready) * 1000,
        "uppers": uppers,
    }


def _in_child() -> dict[str, float]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.write(w, json.dumps(_sample()).encode())
        except BaseException as exc:  # noqa: BLE001 reported by the parent
            os.write(w, json.dumps({"error": repr(exc)}).encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = json.loads(f.read())
    os.waitpid(pid, 0)
    if "error" in out:
        raise RuntimeError(out["error"])
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args(argv)
    _in_child()  # warm-up: the page cache, the kernel's slabs
    samples = [_in_child() for _ in range(args.samples)]
    print(
        json.dumps(
            {
                "initial_user_namespace": linux.in_initial_user_namespace(),
                "samples": args.samples,
                "uppers": samples[0]["uppers"],
                "build_adopt_ms": round(statistics.median(s["build_adopt_ms"] for s in samples), 2),
                "end_ms": round(statistics.median(s["end_ms"] for s in samples), 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
