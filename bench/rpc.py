"""Round-trip benchmark of the RPC transport: the in-process mock vs a real socketpair.

    python -m bench.rpc [--samples 31] [--calls 200] [--warmup 500] [--payload 64] [--json FILE]

- *real*: a ``socket.socketpair()`` with :func:`kit.rpc.server.serve` in a forked child (the
  shape of a real run: client in the master, server in another process);
- *mock*: :class:`kit.testing.rpc_mock.MockTransport` (its server in a thread of this process).

Both serve the same ``bench.echo(data: str) -> str`` and are driven by an
:class:`~kit.rpc.client.RPCClient`. After a warm-up on each, samples alternate A B A B (mock,
real, mock, real…) so that drift (CPU frequency, other load) hits both alike; a sample times
``--calls`` sequential calls with the garbage collector paused. Reported: the median calls per
second over the samples (at least 30), the quartiles, and the ratio mock / real. Not a test:
nothing is asserted beyond the replies being right.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from kit.rpc import RPCClient, serve
from kit.testing.rpc_mock import MockTransport

ENGINE = "bench"
MIN_SAMPLES = 30


def echo(data: str) -> str:
    return data


METHODS = {f"{ENGINE}.echo": echo}


def start_real_server() -> tuple[RPCClient, int]:
    """A server in a forked child on one end of a socketpair; returns the client and the pid.
    Fork before any thread exists in this process (the mock's threads come later)."""
    parent_end, child_end = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # child: serve until the parent closes its end
        code = 1
        try:
            parent_end.close()
            code = serve(child_end, METHODS)
        finally:
            os._exit(code)
    child_end.close()
    return RPCClient(parent_end, ENGINE), pid


def run_sample(client: RPCClient, calls: int, payload: str) -> float:
    """Time *calls* round trips; returns calls per second."""
    call = client.echo
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            call(data=payload)
        elapsed = time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return calls / elapsed


def warm_up(client: RPCClient, calls: int, payload: str) -> None:
    for _ in range(calls):
        if client.echo(data=payload) != payload:
            raise RuntimeError("the echo server returned something else")


def summary(values: list[float]) -> dict[str, Any]:
    q1, _, q3 = statistics.quantiles(values, n=4)
    median = statistics.median(values)
    return {
        "median_calls_per_s": median,
        "p25_calls_per_s": q1,
        "p75_calls_per_s": q3,
        "min_calls_per_s": min(values),
        "max_calls_per_s": max(values),
        "median_us_per_call": 1e6 / median,
        "samples_calls_per_s": values,
    }


def bench(
    samples: int,
    calls: int,
    warmup: int,
    payload_size: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    payload = "x" * payload_size
    real_client, pid = start_real_server()
    mock = None
    try:
        mock = MockTransport(ENGINE, METHODS)
        mock_client = mock.client()
        clients = {"mock": mock_client, "real": real_client}
        for client in clients.values():
            warm_up(client, warmup, payload)
        results: dict[str, list[float]] = {"mock": [], "real": []}
        for i in range(samples):
            for name in ("mock", "real"):  # A B A B …
                results[name].append(run_sample(clients[name], calls, payload))
            if progress is not None and (i + 1) % 10 == 0:
                progress(f"  {i + 1}/{samples} samples")
    finally:
        real_client.close()  # the child sees EOF and exits 0
        _, status = os.waitpid(pid, 0)
        if mock is not None:
            mock.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"the forked RPC server exited with {code}")
    mock_s, real_s = summary(results["mock"]), summary(results["real"])
    return {
        "benchmark": "kit.rpc round trips: MockTransport vs socketpair with a forked server",
        "samples": samples,
        "calls_per_sample": calls,
        "warmup_calls": warmup,
        "payload_bytes": payload_size,
        "order": "interleaved: mock, real, mock, real, ...",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "mock": mock_s,
        "real": real_s,
        "ratio_mock_over_real": mock_s["median_calls_per_s"] / real_s["median_calls_per_s"],
        "mock_overhead_us_per_call": mock_s["median_us_per_call"] - real_s["median_us_per_call"],
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        f"RPC round trips: {result['samples']} samples x {result['calls_per_sample']} calls, "
        f"payload {result['payload_bytes']} bytes, warm-up {result['warmup_calls']} calls each, "
        "interleaved mock/real",
        f"{'transport':<28}{'median calls/s':>15}{'p25':>10}{'p75':>10}"
        f"{'min':>10}{'max':>10}{'us/call':>9}",
    ]
    for name, label in (("mock", "mock (MockTransport)"), ("real", "real (socketpair + fork)")):
        s = result[name]
        lines.append(
            f"{label:<28}{s['median_calls_per_s']:>15,.0f}{s['p25_calls_per_s']:>10,.0f}"
            f"{s['p75_calls_per_s']:>10,.0f}{s['min_calls_per_s']:>10,.0f}{s['max_calls_per_s']:>10,.0f}"
            f"{s['median_us_per_call']:>9.1f}"
        )
    lines.append(
        f"ratio mock/real (median calls/s): {result['ratio_mock_over_real']:.2f}  "
        f"(the mock adds {result['mock_overhead_us_per_call']:+.1f} us per call)"
    )
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rpc", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--samples",
        type=_positive,
        default=31,
        help=f"samples per transport (at least {MIN_SAMPLES}; default 31)",
    )
    parser.add_argument(
        "--calls", type=_positive, default=200, help="calls per sample (default 200)"
    )
    parser.add_argument(
        "--warmup", type=int, default=500, help="warm-up calls per transport (default 500)"
    )
    parser.add_argument(
        "--payload", type=int, default=64, help="size of the echoed string in bytes (default 64)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    if args.samples < MIN_SAMPLES:
        parser.error(f"--samples must be at least {MIN_SAMPLES} (the median needs them)")
    if args.warmup < 0 or args.payload < 0:
        parser.error("--warmup and --payload must be >= 0")
    result = bench(
        args.samples,
        args.calls,
        args.warmup,
        args.payload,
        progress=lambda msg: print(msg, file=sys.stderr),
    )
    print(report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
