"""Faults the kit injects into its own processes around an engine's hooks (RunRequest.inject)."""

from __future__ import annotations

import functools
import pickle
import threading
from collections.abc import Callable
from typing import Any

from kit.registry import find
from kit.rpc.codec import HEADER, MAX_FRAME, encode_body, recv_frame, send_body
from kit.rpc.messages import make_request

#: What the kit does for each value of ``RunRequest.inject`` (the same names as the
#: engine-side protocol, conformance.capabilities.FAULTS, so one error path has one name).
#: The part before ":" is the hook around which the kit acts.
INJECTIONS: dict[str, str] = {
    "prepare_config": "the kit raises after the engine's prepare_config returned",
    "prepare_config:invalid": "the kit makes the StarterConfig invalid after the engine's "
    "prepare_config returned: effective capabilities not a subset "
    "of permitted",
    "create_container": "the kit raises in place of the engine's create_container (nothing "
    "set up: cleanup_container must cope with that)",
    "create_container:hang": "the kit blocks in place of the engine's create_container, until "
    "the hook timeout",
    "create_container:rpc-probe": "the kit sends the RPC server what it must refuse and "
    "survive before the engine's create_container, and a frame "
    "too large to read after it",
    "start_process": "the kit raises in place of the engine's start_process",
    "start_process:return": "the kit returns in place of the engine's start_process (no exec)",
    "post_start_process": "the kit raises after the engine's post_start_process returned",
    "monitor_container": "the kit raises in place of the engine's monitor_container (before "
    "waiting)",
    "cleanup_container": "the kit raises after the engine's cleanup_container returned",
}

#: What the kit's RPC probe sends first, in this order (the suite finds the server's record
#: of each by position: RPC-005, RPC-006).
RPC_PROBES = ("unknown-method", "unknown-argument", "malformed-json", "pickle")
#: The method name of the unknown-method probe (after ``<engine>.``).
PROBE_METHOD = "conformance_no_such_method"

# Faults in which the engine's hook is not called at all: it would block (monitor, a hang)
# or exec (start_process), so nothing could be injected after it.
# create_container too: its failure before any setup is what cleanup_container must cope
# with (CLEAN-002), as an engine whose create_container fails at its start would leave it.
_INSTEAD = frozenset(
    {
        "create_container",
        "create_container:hang",
        "start_process",
        "start_process:return",
        "monitor_container",
    }
)


class InjectedFault(RuntimeError):
    """Raised by the kit itself, never by the engine: the run request asked for it."""


#: The fault of this run, set by the starter before it forks any process of the run (every
#: process inherits it); None: nothing to inject.
_armed: str | None = None


def validate(fault: str | None) -> None:
    """Raise ValueError naming ``fault`` unless it is None or a key of INJECTIONS."""
    if fault is not None and fault not in INJECTIONS:
        raise ValueError(f"inject: unknown fault {fault!r} (known: {', '.join(INJECTIONS)})")


def arm(fault: str | None) -> None:
    """Inject ``fault`` around the engine's hooks in this process and those it forks."""
    global _armed  # one run per starter process: the setting of that run
    validate(fault)
    _armed = fault


def wrap(
    hook: str,
    original: Callable[..., Any],
    ledger: Any,
    by_kit: Callable[[], bool] = lambda: True,
) -> Callable[..., Any]:
    """``original`` (the engine's ``hook``), or, when the armed fault is around ``hook``, a
    function that injects it the first time the kit calls it (``by_kit()`` true at the call)
    and records that in ``ledger`` as a ``kit_injected`` event (so the failure is never
    taken for the engine's). An engine calling its own hook elsewhere (start_process calling
    post_start_process in stage 2) gets the hook as it is: the fault belongs to the kit's
    call, in the process the kit calls it in."""
    if _armed is None or _armed.split(":")[0] != hook:
        return original
    fault = _armed
    fired = threading.Event()

    def record(where: str) -> None:
        # Written at the moment the kit acts: a hook that failed on its own before that is
        # the engine's failure, not the kit's.
        ledger.emit(
            "kit_injected",
            hook=hook,
            fault=fault,
            detail=f"{INJECTIONS[fault]} ({where} the engine's hook)",
        )

    @functools.wraps(original)
    def injected(*args: Any, **kwargs: Any) -> Any:
        if fired.is_set() or not by_kit():  # once, on the kit's call: the rest is the engine's
            return original(*args, **kwargs)
        fired.set()
        if fault in _INSTEAD:
            record("instead of")
            if fault == "create_container:hang":
                threading.Event().wait()  # the supervisor's hook timeout ends the run
            if fault == "start_process:return":
                return None
            raise InjectedFault(f"{hook} fails: injected by the kit (RunRequest.inject)")
        if fault == "create_container:rpc-probe":
            record("around")
            name = _engine_name(original)
            probe_rpc_server(args[2], name, "before")
            result = original(*args, **kwargs)
            probe_rpc_server(args[2], name, "after")
            return result
        result = original(*args, **kwargs)
        record("after")
        if fault == "prepare_config:invalid":
            args[0].set_capabilities("permitted", [])
            args[0].set_capabilities("effective", ["CAP_SYS_ADMIN"])
            return result
        raise InjectedFault(
            f"{hook} fails: injected by the kit (RunRequest.inject), after "
            "the engine's hook returned"
        )

    return injected


def _engine_name(hook: Callable[..., Any]) -> str:
    """The registered name of the engine whose bound ``hook`` this is (the prefix of its RPC
    methods; the run request may name the engine by an import path instead)."""
    common = getattr(getattr(hook, "__self__", None), "common", None)
    name = getattr(common, "engine_name", None)
    if not isinstance(name, str):
        raise RuntimeError(
            "kit.starter.inject: create_container is not a method of an initialised "
            "engine (no common.engine_name): cannot name its RPC methods"
        )
    return name


def probe_rpc_server(conn: Any, engine_name: str, phase: str) -> list[dict[str, Any]]:
    """Send the RPC server, on the connection create_container got, what it must answer with
    an error and survive (``phase="before"`` the engine's own calls: :data:`RPC_PROBES`), or
    a frame header announcing more than the maximum size (``phase="after"``: the server
    answers with an error and ends the connection). Returns the replies read."""
    if phase == "after":
        conn.sendall(HEADER.pack(MAX_FRAME + 1))
        reply = recv_frame(conn)
        return [reply[0]] if reply else []
    if phase != "before":
        raise ValueError(f"probe_rpc_server: phase {phase!r} is neither 'before' nor 'after'")
    served = sorted(find(engine_name).rpc_specs)
    # A method the engine serves, given an argument it does not take (or, for an engine
    # without RPC methods, another unknown method).
    known = f"{engine_name}.{served[0] if served else PROBE_METHOD}"
    bodies = [
        encode_body(make_request(1, f"{engine_name}.{PROBE_METHOD}", {})),
        encode_body(make_request(2, known, {"conformance_no_such_argument": 1})),
        b'{"id": 3, "method": ',
        pickle.dumps(make_request(4, known, {})),
    ]
    replies = []
    for body in bodies:
        send_body(conn, body)
        reply = recv_frame(conn)
        if reply is None:
            break  # the server hung up: the suite sees it in the ledger
        replies.append(reply[0])
    return replies
