"""Correct engines of the third blind round (SPEC §1, §2, §7 and the error paths), loaded as
``blind3_flow_correct:NAME`` (``tests/`` on ``PYTHONPATH``): shapes SPEC.md allows that the
reference does not take; any failure is a false failure of a check (or a disputed reading,
said in the docstring)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass, field

from kit.contract import ConfigError
from reference_engines.minimal.engine import (
    FORWARDED_SIGNALS,
    MONITOR_POLL,
    ReferenceConfig,
    ReferenceEngine,
)
from reference_engines.minimal.rpc import ReferenceRPC


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # gone already: the wait collects it


def _reap_nohang(pid: int) -> int | None:
    """The container's wait status if it has ended (reaped now), else None."""
    wpid, status = os.waitpid(pid, os.WNOHANG)
    return status if wpid == pid else None


@dataclass
class _ForwardConfig(ReferenceConfig):
    """The reference's options plus the signals to forward, by name (default SPEC §7's)."""

    forward_signals: list[str] = field(
        default_factory=lambda: sorted(s.name for s in FORWARDED_SIGNALS)
    )
    #: Not an option: prepare_config resolves ``forward_signals`` here, for the master.
    forward_signums: list[int] = field(default_factory=list)


class ForwardTableInConfigEngine(ReferenceEngine):
    """SPEC §2 rule 3: "Only JSON-visible fields of the engine config cross from stage 1 to
    later processes" -- so prepare_config (stage 1) validates a ``forward_signals`` option
    (names; default SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2, the five of §7) and resolves
    it into a config field, ``forward_signums``, that the master's monitor_container reads:
    the decision made in stage 1 reaches the master as JSON, not in a global. With the
    default config it forwards exactly what §7 names and reaps only the container. Legal."""

    engine_name = "blind3-ok-forward-table-in-config"
    rpc_methods = ReferenceRPC

    def config(self) -> _ForwardConfig:
        return _ForwardConfig()

    def prepare_config(self, starter_config):  # type: ignore[no-untyped-def]
        cfg: _ForwardConfig = self.common.engine_config  # type: ignore[assignment]
        signums = []
        for name in cfg.forward_signals:
            try:
                sig = signal.Signals[name]
            except KeyError:
                raise ConfigError(f"forward_signals: unknown signal {name!r}") from None
            if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
                raise ConfigError(f"forward_signals: {name} cannot be forwarded")
            signums.append(int(sig))
        super().prepare_config(starter_config)
        cfg.forward_signums = sorted(set(signums))

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        cfg: _ForwardConfig = self.common.engine_config  # type: ignore[assignment]
        forward = frozenset(cfg.forward_signums)
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in forward:
                _kill(pid, sig)
            status = _reap_nohang(pid)
            if status is not None:
                return status


class ExitsLikeShellEngine(ReferenceEngine):
    """SPEC §1: start_process "becomes the payload: it must exec or exit, never return" --
    when the payload cannot be started this one exits, as a shell does, with 127 (not
    found: the payload or the cwd) or 126 (found, not executable), after a message on
    stderr, instead of raising. It never returns and never execs a second time; the kit
    tells the master that stage 2 exited instead of exec (no post_start_process, SPEC §2
    rule 6), and cleanup_container gets (None, exited 127). The run then exits 127: rule 8
    "The run's exit code equals the payload's ...; 255 when a fatal error occurred" and §7
    "The run exits with the container's code" -- an exit of stage 2 is the container's
    code, not a fatal error (the error table's 255 is the row "start_process raises").
    Legal (a disputed reading only if a check wants 255 for every missing payload)."""

    engine_name = "blind3-ok-exits-like-shell"
    rpc_methods = ReferenceRPC

    def start_process(self, master_fd):  # type: ignore[no-untyped-def]
        try:
            super().start_process(master_fd)
        except FileNotFoundError as exc:
            code, message = 127, str(exc)
        except OSError as exc:
            code, message = 126, str(exc)
        print(f"{self.common.engine_name}: {message}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(code)


class DeferredForwardingEngine(ReferenceEngine):
    """SPEC §7: a conformant monitor_container "forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2
    to the container, reaps only the container pid, and returns its wait status"; §10: the
    channel "must not lose ... a forwarded signal"; no latency is set -- this monitor holds
    the signals that come before the payload was exec'd (until post_start_process ran, in
    the master) and forwards them, in order, right after: the kit's code in stage 2 never
    gets a signal meant for the payload. Signals after the exec go on at once; held ones
    are dropped only when the container ends without exec (stage 2 failed: there is no
    payload to get them). It reaps the container whatever happens (post_start_process may
    never run). Legal."""

    engine_name = "blind3-ok-deferred-forwarding"
    rpc_methods = ReferenceRPC

    def init_config(self, common, privileged_stage1):  # type: ignore[no-untyped-def]
        super().init_config(common, privileged_stage1)
        self.payload_started = threading.Event()

    def post_start_process(self, ctx, pid):  # type: ignore[no-untyped-def]
        self.payload_started.set()

    def monitor_container(self, pid, signals):  # type: ignore[no-untyped-def]
        held: list[int] = []
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                held.append(sig)
            if held and self.payload_started.is_set():
                for pending in held:
                    _kill(pid, pending)
                held.clear()
            status = _reap_nohang(pid)
            if status is not None:
                return status


ENGINES = (
    ForwardTableInConfigEngine,
    ExitsLikeShellEngine,
    DeferredForwardingEngine,
)
