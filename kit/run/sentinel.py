"""The master's sentinel child, watched from the supervisor: reaping it breaks SPEC §7."""

from __future__ import annotations

from typing import Any

from kit.system import linux

#: The master's hooks whose end the master always sends before it reaps the sentinel itself
#: (it joins their threads first). monitor_container's end comes first too, unless the run
#: failed (a fatal error, recorded before the master gives up on the monitor).
_BEFORE_THE_KITS_REAP = ("create_container", "post_start_process")


class SentinelWatch:
    """Stage 1 gives the master a child older than the container that exits at once (the
    sentinel) and names it in ``container_start``, before engine code runs in that process;
    the master reaps it only once the hooks above have ended. A monitor that reaps any
    child (``waitpid(-1)``) takes it first. While the master waits for the supervisor's
    outside check of one of those hooks' end (a confirmed send), the sentinel must still
    be its child, a zombie: if it is not, engine code reaped it. The master records the same
    from inside (``foreign_reap``), where engine code could stop it; this does not depend on
    anything that runs in the master."""

    def __init__(self) -> None:
        self.master: int | None = None  # the starter's kernel pid
        self.number: int | None = None  # the sentinel's pid as the starter numbers it
        self.failed = False  # a fatal error of the master's came: its reap may come early
        self.reaped = False  # found reaped (once: the first finding is the one reported)

    def note(self, sender: int, role: str | None, event: dict[str, Any]) -> None:
        """Every event admitted; ``role``: its sender's process role."""
        kind = event["kind"]
        if kind == "container_start" and role == "starter" and self.master is None:
            sentinel = event.get("sentinel_pid")
            if isinstance(sentinel, int):
                self.master, self.number = sender, sentinel
        elif kind == "fatal" and event.get("role") == "master":
            self.failed = True

    def reaped_at(self, sender: int, event: dict[str, Any], confirmed: bool) -> bool:
        """Whether ``event``, a hook's end the master waits on (``confirmed``), finds the
        sentinel reaped: the first time only."""
        if (
            self.reaped
            or not confirmed
            or sender != self.master
            or self.number is None
            or event["kind"] not in ("hook_return", "hook_raise")
            or event.get("role") != "master"
            or event.get("caller", "kit") != "kit"  # engine code's own calls: any time
        ):
            return False
        hook = event.get("hook")
        if hook not in _BEFORE_THE_KITS_REAP and (hook != "monitor_container" or self.failed):
            return False
        self.reaped = linux.child_numbered(sender, self.number) is None
        return self.reaped
