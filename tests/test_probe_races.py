"""Probes read /proc while the hooked process's threads come and go: never an error."""

from __future__ import annotations

import threading
import time

from kit import probe


def test_snapshot_survives_threads_exiting_while_it_reads():
    def short() -> None:
        time.sleep(0.0002)

    deadline = time.monotonic() + 1.5
    count = 0
    while time.monotonic() < deadline:
        threads = [threading.Thread(target=short) for _ in range(4)]
        for t in threads:
            t.start()
        snap = probe.snapshot()  # raised ProcessLookupError (ESRCH) before the fix
        assert snap["threads"]
        for t in threads:
            t.join()
        count += 1
    assert count > 50
