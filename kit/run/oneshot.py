"""A one-shot run forked from the calling process, its preparations made side by side."""

from __future__ import annotations

from typing import IO, Any

from kit import preflight
from kit.run import bytecode, supervisor
from kit.run.launcher import LaunchError, RunHandle
from kit.run.request import RunRequest

#: How long a run waits for the compiling child before it is killed (it has had the
#: inspection's time already: the reference engine's modules take a few milliseconds).
COMPILE_WAIT = 1.0


class OneShot:
    """A run of ``request`` that this process (single-threaded, with nothing else to do:
    ``kit run``) forks itself. What a run waits for before its supervisor can be forked,
    each in a child of its own, starts at once: the engine's inspection as U (the
    preflight verdict) and the run's host sandbox (its init builds it), while this process
    reads what the run needs (:func:`kit.run.supervisor.warm`) and then the sandbox, ahead.
    The engine's code runs in the inspection's child alone until :meth:`problems` has said
    there are none; only then does :meth:`start` fork the run. A third child compiles the
    engine's modules meanwhile (:mod:`kit.run.bytecode`), reaped before the run starts.
    :meth:`cancel` ends the children and removes what they made; every way out of this
    class that does not hand the sandbox over to a run does the same."""

    def __init__(self, request: RunRequest) -> None:
        self.request = request
        self.inspecting = preflight.Inspecting(request.engine, request.engine_config)
        self.ahead: supervisor.Ahead | None = None
        self.compiling: int | None = None
        try:
            self.compiling = bytecode.start(request.engine, request.sys_path)
            if supervisor.fits_ahead(request):
                self.ahead = supervisor.start_ahead()
            # Unprimed when a sandbox is being built: primed from it as it is read ahead,
            # which waits for its init; the inspection goes on meanwhile.
            supervisor.warm(request, prime=self.ahead is None)
            if self.ahead is not None:
                self.ahead = self._finished(self.ahead)
        except Exception as exc:  # what the zygote would answer with {"error": ...}
            self.cancel()
            raise LaunchError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.cancel()
            raise

    @staticmethod
    def _finished(ahead: supervisor.Ahead) -> supervisor.Ahead:
        """``ahead``, built and read; an init given up on is reaped here (this process, its
        builder, has no reaping loop as the zygote has)."""
        try:
            return supervisor.finish_ahead(ahead, reap=True)
        except BaseException:
            ahead.drop(reap=True)  # interrupted before finish_ahead gave it up, else nothing
            raise

    def problems(self) -> list[preflight.Problem]:
        """What preflight finds (:func:`kit.preflight.check`): empty, go ahead."""
        try:
            return self.inspecting.result().problems
        except BaseException:
            self.cancel()
            raise

    def start(self, stdin: int | IO[Any] | None = None) -> RunHandle:
        """Fork the run's supervisor, which takes over the sandbox made for it; the payload
        inherits this process's stdout and stderr. LaunchError while preflight finds a
        problem (the verdict is waited for here if it was not asked for)."""
        problems = self.problems()
        if problems:
            self.cancel()
            raise LaunchError("; ".join(str(problem) for problem in problems))
        self._reap_compiling(COMPILE_WAIT)  # the starter's import reads what it wrote
        ahead, self.ahead = self.ahead, None
        try:
            return RunHandle(self.request, capture=False, stdin=stdin, fork_here=True, ahead=ahead)
        except BaseException:
            if ahead is not None:
                ahead.drop(reap=True)  # a no-op once the supervisor has it
            raise

    def _reap_compiling(self, timeout: float) -> None:
        pid = self.compiling
        if pid is not None:
            try:
                bytecode.wait(pid, timeout)  # killed and reaped, even if interrupted
            finally:
                self.compiling = None  # reaped: the pid may name another process soon

    def cancel(self) -> None:
        """Unused (a problem found, interrupted): the inspection ends, the sandbox goes,
        its init killed and reaped here (gone when this returns, not when this exits)."""
        self._reap_compiling(0)
        try:
            self.inspecting.cancel()
        finally:
            ahead, self.ahead = self.ahead, None
            if ahead is not None:
                ahead.drop(reap=True)
