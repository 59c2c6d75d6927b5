"""An in-process RPC server for engine authors' unit tests, with dispatch-level faults."""

from __future__ import annotations

import array
import collections
import contextlib
import inspect
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kit import system as kit_system
from kit.contract import Common, Engine, Operations
from kit.registry import RegistryError, find
from kit.rpc.client import RPCClient
from kit.rpc.codec import HEADER, MAX_FDS, FrameError, close_fds, encode_body
from kit.rpc.messages import split_method_name
from kit.rpc.methods import FileDescriptor, MethodSpec, WithFds
from kit.rpc.server import CallRecord, prepare_methods, serve

__all__ = ["Call", "Fault", "MockTransport", "RecordingSystem", "Rule", "SystemCall"]

_PHASES = ("request", "reply")
_FD_SIZE = array.array("i").itemsize


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """What to do to one call when the server dispatches it; build it with the class methods.

    ``phase`` says when: ``"request"`` (before the method runs) or ``"reply"`` (after it ran;
    its reply, or its error, is affected).

    Faults, injected on the Nth call, by method name, or both (:meth:`MockTransport.inject`):

    ==========================  ========================================================
    ``Fault.errno(code)``       the method does not run; the client raises
                                ``OSError(code, strerror)`` (``PermissionError`` for EPERM)
    ``Fault.exception(exc)``    the method does not run; the client gets *exc* as if the
                                method had raised it
    ``Fault.drop()``            the connection is cut before the method runs: the client
                                gets ``ConnectionError``; ``phase="reply"``: the method
                                runs, its reply is lost
    ``Fault.delay(s)``          hold the reply (``phase="request"``: the method's start)
                                *s* seconds
    ``Fault.truncate(keep)``    the method runs; its reply frame is cut after *keep* bytes
                                of its body (default half) and the connection closes: the
                                client raises ``ConnectionError``
    ``Fault.close()``           the method runs and its reply (or error) is sent, then
                                the connection closes: the client gets its result, its
                                next call raises ``ConnectionError``; ``serve`` returns 0
    ==========================  ========================================================

    Request-phase faults apply first, then reply-phase ones, each in injection order; the
    first errno, exception, drop, truncate or close is the last fault applied to the call.
    """

    kind: str
    phase: str
    seconds: float = 0.0
    error: Exception | None = None
    keep: int | None = None

    def __post_init__(self) -> None:
        if self.phase not in _PHASES:
            raise ValueError(
                f"Fault.{self.kind}: phase must be 'request' or 'reply', got {self.phase!r}"
            )

    @classmethod
    def errno(cls, code: int, message: str | None = None) -> Fault:
        """Answer with an error carrying errno *code* (*message* defaults to its strerror)."""
        if isinstance(code, bool) or not isinstance(code, int) or code <= 0:
            raise ValueError(f"Fault.errno: code must be a positive errno number, got {code!r}")
        return cls(
            "errno",
            "request",
            error=OSError(code, os.strerror(code) if message is None else message),
        )

    @classmethod
    def exception(cls, exc: Exception) -> Fault:
        """Raise *exc* in place of the method (the client sees what ``serve`` makes of it)."""
        if not isinstance(exc, Exception):
            raise ValueError(f"Fault.exception: expected an Exception instance, got {exc!r}")
        return cls("exception", "request", error=exc)

    @classmethod
    def drop(cls, phase: str = "request") -> Fault:
        """Cut the connection; ``serve`` then returns 0, as when the client goes away."""
        return cls("drop", phase)

    @classmethod
    def truncate(cls, keep: int | None = None) -> Fault:
        """Send only the first *keep* bytes of the reply's body (None: half of it), then cut
        the connection, as a server that dies while replying."""
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"Fault.truncate: keep must be a byte count >= 0, got {keep!r}")
        return cls("truncate", "reply", keep=keep)

    @classmethod
    def close(cls) -> Fault:
        """Deliver the call's reply, then close the connection, as a server that exits after
        this call: the client gets its result (or its error) and its next call raises
        ``ConnectionError`` (``BrokenPipeError``); requests it had already queued behind
        this one are discarded; ``serve`` returns 0."""
        return cls("close", "reply")

    @classmethod
    def delay(cls, seconds: float, phase: str = "reply") -> Fault:
        """Hold the call *seconds*; a shorter client timeout raises ``TimeoutError``."""
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not 0 <= seconds < 3600
        ):
            raise ValueError(f"Fault.delay: seconds must be within [0, 3600), got {seconds!r}")
        return cls("delay", phase, seconds=float(seconds))


@dataclass
class Rule:
    """An injected fault and when it fires (see :meth:`MockTransport.inject`)."""

    fault: Fault
    method: str | None = None
    on_call: int | None = None
    times: int | None = None
    hits: int = 0

    def exhausted(self) -> bool:
        limit = 1 if self.on_call is not None else self.times
        return limit is not None and self.hits >= limit

    def matches(self, call: Call) -> bool:
        if self.exhausted():
            return False
        if self.method is not None and self.method not in (call.method, call.name):
            return False
        if self.on_call is not None:
            nth = call.index if self.method is None else call.nth
            if nth != self.on_call:
                return False
        return True


# --------------------------------------------------------------------------- recording


@dataclass
class Call:
    """One request the server answered (or that a fault cut off), and what became of it.

    A request the server refused before dispatch (unknown method, bad arguments, a malformed
    frame) is recorded too, with the server's error; faults never fire for it. ``error`` is the
    wire form ``{"type", "errno", "message"}``. ``duration`` is the server's time on the call in
    seconds, injected delays included.
    """

    index: int
    """1-based position among all requests of this transport."""
    method: str | None
    """``"<engine>.<method>"`` as sent; None when the frame did not carry a usable one."""
    args: dict[str, Any] | None = None
    """The arguments as sent (a ``FileDescriptor`` argument is the index of its descriptor)."""
    nth: int = 1
    """1-based position among the calls to the same ``method``."""
    fds: int = 0
    """Number of descriptors the method received."""
    result: Any = None
    error: dict[str, Any] | None = None
    reply_fds: int = 0
    answered: bool = False
    """A reply was produced (a ``drop`` fault in the request phase prevents it)."""
    ran: bool = False
    """The served method was called."""
    duration: float | None = None
    faults: list[str] = field(default_factory=list)

    @property
    def name(self) -> str | None:
        """The method name without the engine (``"mount"``)."""
        return None if self.method is None else self.method.rpartition(".")[2]

    @property
    def ok(self) -> bool:
        return self.answered and self.error is None

    @property
    def errno(self) -> int | None:
        return None if self.error is None else self.error.get("errno")


@dataclass(frozen=True)
class SystemCall:
    """One call made on a :class:`RecordingSystem`."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class RecordingSystem(kit_system.System):
    """A ``kit.system`` interface that records every call and does nothing.

    Every operation (``mount``, ``sethostname``, ``pivot_root``…) is accepted, appended to
    :attr:`calls` and returns None, or ``results[name]`` (a value, or a callable called with
    the arguments), or raises ``errors[name]`` (an exception instance or class). Nothing
    touches the host unless a ``results`` callable does so on purpose. Thread-safe.
    """

    name = "recording"

    def __init__(
        self,
        *,
        results: Mapping[str, Any] | None = None,
        errors: Mapping[str, BaseException | type[BaseException]] | None = None,
    ) -> None:
        self.calls: list[SystemCall] = []
        self._results = dict(results or {})
        self._errors = dict(errors or {})
        self._lock = threading.Lock()

    def __getattr__(self, item: str) -> Callable[..., Any]:
        if item.startswith("_"):
            raise AttributeError(item)

        def operation(*args: Any, **kwargs: Any) -> Any:
            return self._record(item, args, kwargs)

        operation.__name__ = operation.__qualname__ = item
        return operation

    def _record(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._lock:
            self.calls.append(SystemCall(name, args, kwargs))
        if name in self._errors:
            raise self._errors[name]
        result = self._results.get(name)
        return result(*args, **kwargs) if callable(result) else result

    def names(self) -> list[str]:
        """The names of the operations called, in order."""
        with self._lock:
            return [c.name for c in self.calls]

    def __repr__(self) -> str:
        return f"<RecordingSystem {len(self.calls)} call(s)>"


# --------------------------------------------------------------------------- helpers


def _public_methods(obj: Any) -> dict[str, Callable[..., Any]]:
    """The public methods of an instance, as the registry serves them."""
    return {
        attr: getattr(obj, attr)
        for attr, _ in inspect.getmembers(type(obj), inspect.isfunction)
        if not attr.startswith("_")
    }


def _as_engine(name: str, engine: Any) -> Any:
    """A :class:`kit.contract.Engine` from an Engine or an Operations instance (whose
    ``init_config`` ran)."""
    if engine is None or isinstance(engine, Engine):
        return engine
    if isinstance(engine, Operations):
        return Engine(name=name, operations=engine, common=getattr(engine, "common", None))
    raise TypeError(
        f"engine must be a kit.contract.Engine or Operations instance, got {type(engine).__name__}"
    )


# --------------------------------------------------------------------------- the transport


def _send_cut_reply(sock: socket.socket, result: Any, keep: int | None) -> None:
    """The start of a reply frame: its header announces the whole body, *keep* bytes of it
    follow (fewer than all)."""
    try:
        body = encode_body({"id": None, "result": result})
    except FrameError:
        body = encode_body({"id": None, "result": None})
    keep = len(body) // 2 if keep is None else min(keep, len(body) - 1)
    with contextlib.suppress(OSError):
        sock.sendall(HEADER.pack(len(body)) + body[:keep])


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close_after_reply(sock: socket.socket) -> None:
    """Let the reply about to be sent through, and nothing after it: the server's receiving
    side is shut, so the client's next request fails (``EPIPE``) and ``serve`` reads EOF and
    returns; requests already queued behind this call are discarded, as by a server that
    exits after replying. ``_serve`` shuts the rest down once ``serve`` returned."""
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        return
    # After SHUT_RD nothing more can arrive; what is queued is read and thrown away (with
    # the descriptors it carries; any beyond the buffer the kernel never installs) until
    # the EOF, without blocking.
    ancbuf = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
    while True:
        try:
            data, ancdata, _, _ = sock.recvmsg(
                1 << 16, ancbuf, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
            )
        except InterruptedError:
            continue
        except OSError:
            return
        for level, ctype, payload in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _FD_SIZE
                close_fds(list(array.array("i", payload[:usable])))
        if not data:
            return


class MockTransport:
    """An RPC server for *engine_name* in a thread of this process, behind a real socket.

    *methods* is what to serve, as ``"<engine_name>.<method>"``:

    - a class (like the one given to ``register_rpc_methods``): instantiated as
      ``methods(engine)``; its public methods are served;
    - an instance: its public methods are served;
    - a mapping ``{name or "<engine_name>.<name>": callable}``.

    *engine* is a :class:`kit.contract.Engine`, or an ``Operations`` instance after
    ``init_config`` (wrapped in an Engine). *system*, when given, replaces the system
    interface of the served class/instance: ``kit.system.current()`` returns it while the
    transport is open, and the instance's ``system`` attribute is set to it (how
    ``ReferenceRPC`` and engines modelled on it reach the kernel). *timeout* is set on
    :attr:`client_socket` (``settimeout``). Methods are validated before anything starts
    (``RPCMethodError``), so a failing constructor leaves no thread or descriptor behind.

    It lets an engine author test ``create_container`` and the engine's RPC methods without
    namespaces, forks or root (SPEC §6)::

        with MockTransport.for_engine("reference", engine=eng, system=RecordingSystem()) as t:
            t.inject(Fault.errno(errno.EPERM), method="mount")
            eng.create_container(Context(), 4242, t.client_socket)   # raises PermissionError
            assert [c.name for c in t.calls] == ["sethostname", "mount"]

    :attr:`client_socket` is one end of an ``AF_UNIX`` socketpair, what the kit hands to
    ``create_container``; :func:`kit.rpc.server.serve` reads the other end in a thread, so the
    codec, the schema checks and the dispatch are the ones a real RPC server runs. Faults are
    applied where the server calls a method (:class:`Fault`). :attr:`calls` records every
    request as a :class:`Call`, complete before the client sees the reply (or the connection
    a fault cuts);
    :attr:`server_records` has the server's own ``on_call`` records (calls a fault answered
    included). Closing the transport (``close()`` or the ``with`` block) stops the thread and
    closes both ends.
    """

    def __init__(
        self,
        engine_name: str,
        methods: type | object | Mapping[str, Callable[..., Any]],
        *,
        engine: Any = None,
        system: kit_system.System | None = None,
        timeout: float | None = None,
    ) -> None:
        split_method_name(f"{engine_name}.x")  # ProtocolError for an invalid engine name
        self.engine_name = engine_name
        self.engine = _as_engine(engine_name, engine)
        self.system = system
        self.instance: Any = None
        table = self._method_table(methods)
        self._specs = {
            name: replace(spec, func=self._dispatcher(spec))
            for name, spec in prepare_methods(table).items()
        }
        # While the transport is open the system interface is the recorder for everything in
        # this process, so a method that looks it up at call time (not only in __init__)
        # records too: nothing may reach the host's kernel from a unit test.
        self._outer_system: kit_system.System | None = None
        if system is not None:
            self._outer_system = kit_system.current()
            kit_system.use(system)

        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._per_method: collections.Counter[str | None] = collections.Counter()
        self._rules: list[Rule] = []
        self._dispatched: Call | None = None  # the call in the server's hands, until on_call
        self._cut: Fault | None = None  # the drop/truncate/close for _on_call to apply
        self.server_records: list[CallRecord] = []
        """The server's ``on_call`` records (see :data:`kit.rpc.server.CallRecord`)."""
        self.exit_code: int | None = None
        """What ``serve`` returned (0 once the connection ended), None while it runs."""
        self.server_error: BaseException | None = None
        self._stop = threading.Event()
        self._closed = False

        self.client_socket, self._server_sock = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_STREAM
        )
        if timeout is not None:
            self.client_socket.settimeout(timeout)
        self._server_thread = threading.Thread(
            target=self._serve, name=f"kit-rpc-mock-server[{engine_name}]", daemon=True
        )
        try:
            self._server_thread.start()
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_engine(
        cls,
        name: str,
        *,
        engine: Any = None,
        config: Any = None,
        system: kit_system.System | None = None,
        timeout: float | None = None,
    ) -> MockTransport:
        """Serve the RPC methods registered for engine *name* (registry name or entry point),
        like ``serve_rpc_requests`` does in the RPC server process.

        *engine*: an Engine or an ``Operations`` instance after ``init_config``; by default
        a fresh one is made from the registration, with *config* (default: the engine's
        ``config()``) as its engine config and container id ``"mock"``.
        """
        reg = find(name)
        if reg.rpc_methods is None:
            raise RegistryError(f"engine {reg.name!r} registers no RPC methods")
        if engine is None:
            ops = reg.factory()
            ops.init_config(
                Common(reg.name, "mock", ops.config() if config is None else config), False
            )
            engine = Engine(name=reg.name, operations=ops, common=ops.common)
        elif config is not None:
            raise TypeError("for_engine: give engine= or config=, not both")
        return cls(reg.name, reg.rpc_methods, engine=engine, system=system, timeout=timeout)

    def _method_table(self, methods: Any) -> dict[str, Callable[..., Any]]:
        if isinstance(methods, Mapping):
            if self.system is not None:
                raise TypeError(
                    "system= replaces the system interface of a methods class or instance, "
                    "not of a mapping"
                )
            table = {}
            for key, func in methods.items():
                if not isinstance(key, str):
                    raise TypeError(f"method names must be strings, got {key!r}")
                engine, dot, _ = key.rpartition(".")
                if dot and engine != self.engine_name:
                    raise ValueError(
                        f"method {key!r} does not belong to engine {self.engine_name!r}"
                    )
                table[key if dot else f"{self.engine_name}.{key}"] = func
            return table
        if isinstance(methods, type):
            previous = kit_system.current()
            if self.system is not None:
                kit_system.use(self.system)
            try:
                instance = methods(self.engine)
            finally:
                kit_system.use(previous)
        else:
            instance = methods
        if self.system is not None:
            instance.system = self.system
        self.instance = instance
        table = {
            f"{self.engine_name}.{attr}": func for attr, func in _public_methods(instance).items()
        }
        if not table:
            raise TypeError(f"{type(instance).__qualname__} has no public methods to serve")
        return table

    # -- the server thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            self.exit_code = serve(self._server_sock, self._specs, on_call=self._on_call)
        except BaseException as exc:  # noqa: BLE001 surfaced by wait_server() and close()
            self.server_error = exc
        finally:
            # Like the RPC server process exiting: the client sees EOF (close() closes it,
            # once no thread can touch the descriptor any more).
            _shutdown(self._server_sock)

    def _new_call(self, method: str | None, **fields: Any) -> Call:
        with self._lock:
            self._per_method[method] += 1
            call = Call(
                index=len(self._calls) + 1, method=method, nth=self._per_method[method], **fields
            )
            self._calls.append(call)
        return call

    def _dispatcher(self, spec: MethodSpec) -> Callable[..., Any]:
        def dispatch(**kwargs: Any) -> Any:
            return self._dispatch(spec, kwargs)

        return dispatch

    def _dispatch(self, spec: MethodSpec, kwargs: dict[str, Any]) -> Any:
        """Run one call the server has checked, with the faults that match it.

        A fault that cuts the connection (drop, truncate, close) is only noted here and
        applied by :meth:`_on_call`, once the call's record is complete."""
        passed = [v for v in kwargs.values() if isinstance(v, FileDescriptor)]
        call = self._dispatched = self._new_call(spec.name, fds=len(passed))
        self._cut = None
        with self._lock:
            rules = [rule for rule in self._rules if rule.matches(call)]
        for rule in (r for r in rules if r.fault.phase == "request"):
            fault = rule.fault
            self._applied(rule, call)
            if fault.kind == "delay" and self._hold(fault.seconds):
                continue
            close_fds(passed)  # the method owns them, and it will not run
            if fault.error is not None:
                raise fault.error.with_traceback(None)  # one Fault may fire many times
            if fault.kind == "drop":
                self._cut = fault
            # serve() answers this with an error reply that goes nowhere, then ends.
            raise ConnectionAbortedError(f"the mock dropped the connection at {spec.name!r}")
        call.ran = True
        try:
            result = spec.func(**kwargs)
            if isinstance(result, WithFds):
                call.result, call.reply_fds = result.value, len(result.fds)
            else:
                call.result = result
            return result
        finally:
            for rule in (r for r in rules if r.fault.phase == "reply"):
                self._applied(rule, call)
                if rule.fault.kind != "delay":
                    self._cut = rule.fault  # the first cut decides; later rules do not apply
                    break
                if not self._hold(rule.fault.seconds):
                    break  # the transport is closing: the connection is already cut

    def _applied(self, rule: Rule, call: Call) -> None:
        """Count *rule* as hit by *call*: only a fault that takes effect uses up a hit."""
        with self._lock:
            rule.hits += 1
        call.faults.append(rule.fault.kind)

    def _hold(self, seconds: float) -> bool:
        """Wait; False, with the connection cut, when the transport is closed meanwhile."""
        if self._stop.wait(seconds):
            _shutdown(self._server_sock)
            return False
        return True

    def _on_call(self, record: CallRecord) -> None:
        """Complete the record of the call the server just answered, then apply the cut its
        faults asked for (serve() sends the reply after this returns)."""
        self.server_records.append(record)
        call, self._dispatched = self._dispatched, None
        cut, self._cut = self._cut, None
        if call is None:  # refused before dispatch
            call = self._new_call(record["method"])
        call.args = record["args"]
        call.duration = record["duration_ms"] / 1000.0
        if call.ran or "drop" not in call.faults:
            call.answered = True
            call.error = record["error"]
        # Only now may the client learn what became of the call: its record is complete.
        if cut is None:
            return
        if cut.kind == "truncate":
            _send_cut_reply(self._server_sock, call.result, cut.keep)
        if cut.kind == "close":
            _close_after_reply(self._server_sock)
        else:  # drop, truncate: the reply serve() is about to send goes nowhere
            _shutdown(self._server_sock)

    # -- public API ----------------------------------------------------------------------------
    def client(self) -> RPCClient:
        """An :class:`RPCClient` on :attr:`client_socket` (closing it closes the socket)."""
        return RPCClient(self.client_socket, self.engine_name)

    def inject(
        self,
        fault: Fault,
        *,
        on_call: int | None = None,
        method: str | None = None,
        times: int | None = None,
    ) -> Rule:
        """Apply *fault* to matching calls; returns the :class:`Rule` (``rule.hits`` counts
        the calls it hit).

        - *method*: only calls to this method (``"mount"`` or ``"reference.mount"``);
        - *on_call*: only the Nth call (1-based): the Nth call of the transport, or with
          *method* the Nth call to that method; counted from the transport's start, so a
          rule injected late for a call already made never fires. Fires once;
        - *times*: fire at most this many times (default: unlimited without *on_call*).

        Several rules may hit one call: request-phase faults apply first, then reply-phase
        ones, each in injection order, and the first errno, exception, drop, truncate or
        close is the last one applied. A rule counts (``hits``, *times*) only the calls its
        fault was applied to: a rule that an earlier one pre-empted keeps its hit.
        """
        if not isinstance(fault, Fault):
            raise TypeError(f"inject: expected a Fault, got {fault!r}")
        if on_call is not None and (
            isinstance(on_call, bool) or not isinstance(on_call, int) or on_call < 1
        ):
            raise ValueError(f"inject: on_call must be an integer >= 1, got {on_call!r}")
        if times is not None and (
            isinstance(times, bool) or not isinstance(times, int) or times < 1
        ):
            raise ValueError(f"inject: times must be an integer >= 1, got {times!r}")
        if method is not None and (not isinstance(method, str) or not method):
            raise ValueError(f"inject: method must be a method name, got {method!r}")
        rule = Rule(fault, method=method, on_call=on_call, times=times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_faults(self) -> None:
        """Remove every injected rule."""
        with self._lock:
            self._rules.clear()

    @property
    def calls(self) -> list[Call]:
        """Every request so far, in order (a copy of the list; the records are live)."""
        with self._lock:
            return list(self._calls)

    @property
    def names(self) -> list[str | None]:
        """The short method names of :attr:`calls`, in order."""
        return [c.name for c in self.calls]

    def calls_to(self, method: str) -> list[Call]:
        """The calls to *method* (``"mount"`` or ``"reference.mount"``)."""
        return [c for c in self.calls if method in (c.method, c.name)]

    def wait_server(self, timeout: float = 5.0) -> int:
        """Wait for ``serve`` to return (the connection ended) and return its exit code.
        Raises ``TimeoutError`` if it still runs, or what ``serve`` raised."""
        self._server_thread.join(timeout)
        if self._server_thread.is_alive():
            raise TimeoutError(
                f"the mock RPC server of {self.engine_name!r} still runs after {timeout} s"
            )
        if self.server_error is not None:
            raise self.server_error
        assert self.exit_code is not None
        return self.exit_code

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Close the client socket, end the server (a delay fault ends at once) and close its
        socket. Idempotent.

        Raises ``RuntimeError`` if the server thread does not stop within *timeout* (a served
        method that does not return); nothing is closed behind its back then, and calling
        ``close`` again once the method returned finishes the job. Raises what ``serve``
        raised, if it raised."""
        if self._closed:
            return
        self.client_socket.close()  # the server sees EOF, as when the kit closes rpc_conn
        self._stop.set()
        # A copy of the client's descriptor may still be open elsewhere (an engine that kept
        # a dup): the server must end all the same.
        _shutdown(self._server_sock)
        if self._server_thread.ident is not None:
            self._server_thread.join(timeout)
            if self._server_thread.is_alive():
                raise RuntimeError(
                    f"MockTransport.close: {self._server_thread.name} did not stop within "
                    f"{timeout} s (a served method does not return?)"
                )
        self._closed = True
        if self._outer_system is not None and kit_system.current() is self.system:
            kit_system.use(self._outer_system)
        self._server_sock.close()
        if self.server_error is not None:
            raise self.server_error

    def __enter__(self) -> MockTransport:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 the with block's exception is the interesting one
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MockTransport {self.engine_name!r} {state}, {len(self._calls)} call(s)>"
