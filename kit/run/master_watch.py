"""The master's own bookkeeping, done again from the supervisor, where engine code cannot reach."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from kit.system import linux

#: The master's hooks whose end the master always sends before it reaps the sentinel itself
#: (it joins their threads first). monitor_container's end comes first too, unless the run
#: failed (a fatal error, recorded before the master gives up on the monitor).
_BEFORE_THE_KITS_REAP = ("create_container", "post_start_process")
#: The master's own copies of the RPC connection while create_container returns
#: (kit.starter.master: ``rpc_kit_fd`` and the creation watch's ``rpc_watch_fd``).
KIT_COPIES = 2


class MasterWatch:
    """Two checks the master makes about itself, in the process engine code runs in (where a
    hook can patch them away), made again from outside while the master waits for the
    supervisor's check of a hook's end (a confirmed send).

    Stage 1 names what they need in ``container_start``, sent from the master's process
    before any engine code runs there: the container's pid, the sentinel's (a child older
    than the container that exits at once) and the RPC connection's socket (its inode and
    the engine's descriptor number of it), and where the kit's own descriptors go
    (:func:`kit.system.linux.fd_base`).

    - **The sentinel** (SPEC §7: a monitor reaps only the container): the master reaps it
      only once the hooks above have ended; when one of them ends and the sentinel is no
      longer its child, engine code reaped it (a ``waitpid(-1)``).
    - **Copies of the RPC connection** (SPEC §2 rule 5: stage 2 starts once
      create_container returned and the connection closed): when create_container returns,
      the master may hold the engine's ``rpc_conn`` at its number and the kit's copies high
      up; any other descriptor of the socket in the master, or one in a process the master
      started (but the container), is a copy engine code kept.
    """

    def __init__(self) -> None:
        self.master: int | None = None  # the starter's kernel pid
        self.number: int | None = None  # the sentinel's pid as the starter numbers it
        self.container: int | None = None  # the container's, the same way
        self.rpc_inode: int | None = None
        self.rpc_fd: int | None = None
        self.fd_base: int | None = None
        self.failed = False  # a fatal error of the master's came: its reap may come early
        #: A join-only run (no master hooks): its starter reaps the sentinel and closes the
        #: connection at once, without waiting for the supervisor.
        self.join_only = False
        self.reaped = False  # found reaped (once: the first finding is the one reported)

    def note(self, sender: int, role: str | None, event: dict[str, Any]) -> None:
        """Every event admitted; ``role``: its sender's process role."""
        kind = event["kind"]
        if kind == "container_start" and role == "starter" and self.master is None:
            self.master = sender
            fields = {k: event.get(k) for k in ("sentinel_pid", "container_pid", "rpc_conn")}
            if isinstance(fields["sentinel_pid"], int):
                self.number = fields["sentinel_pid"]
            if isinstance(fields["container_pid"], int):
                self.container = fields["container_pid"]
            conn = fields["rpc_conn"]
            if isinstance(conn, dict) and all(
                isinstance(conn.get(k), int) for k in ("inode", "fd", "fd_base")
            ):
                self.rpc_inode, self.rpc_fd, self.fd_base = (
                    conn["inode"],
                    conn["fd"],
                    conn["fd_base"],
                )
        elif kind == "fatal" and event.get("role") == "master":
            self.failed = True
        elif kind == "starter_config" and role == "starter":
            config = event.get("config")
            requests = config.get("requests") if isinstance(config, dict) else None
            if isinstance(requests, dict):
                self.join_only = bool(requests.get("namespace_join_only"))

    def check_start(self, sender: int, event: dict[str, Any]) -> str | None:
        """Why the ``container_start`` the starter sent cannot be what the kernel shows of it
        (import-time engine code runs in that process before it is sent): the sentinel is a
        child of the master, the connection's descriptor is that socket, and ``fd_base`` is
        what the master's own limit gives; None when it is, or when the event is another.
        Read before the master goes on: its next event is a hook's, sent with a snapshot the
        supervisor confirms (with probes on, the only runs this looks at)."""
        if event["kind"] != "container_start" or sender != self.master or self.join_only:
            return None
        if self.number is None or self.rpc_inode is None:
            return "it does not name the sentinel and the RPC connection the kit made"
        if linux.child_numbered(sender, self.number) is None:
            return f"its sentinel, pid {self.number}, is not a child of the master"
        if linux.fd_target(sender, self.rpc_fd or 0) != f"socket:[{self.rpc_inode}]":
            return f"fd {self.rpc_fd} of the master is not the RPC connection it names"
        soft = linux.nofile_soft(sender)
        if soft is not None and linux.fd_base_for(soft) != self.fd_base:
            return f"its fd_base {self.fd_base} is not the master's ({linux.fd_base_for(soft)})"
        return None

    def _the_kits_end(self, sender: int, event: dict[str, Any], confirmed: bool) -> str | None:
        """The hook ``event`` ends, when it is the end of one of the master's hooks called
        by the kit that the master waits on; else None."""
        if (
            not confirmed
            or sender != self.master
            or event["kind"] not in ("hook_return", "hook_raise")
            or event.get("role") != "master"
            or event.get("caller", "kit") != "kit"  # engine code's own calls: any time
        ):
            return None
        hook = event.get("hook")
        return hook if isinstance(hook, str) else None

    def reaped_at(self, sender: int, event: dict[str, Any], confirmed: bool) -> bool:
        """Whether ``event``, a hook's end the master waits on (``confirmed``), finds the
        sentinel reaped: the first time only."""
        hook = self._the_kits_end(sender, event, confirmed)
        if self.reaped or self.number is None or hook is None:
            return False
        if hook not in _BEFORE_THE_KITS_REAP and (hook != "monitor_container" or self.failed):
            return False
        self.reaped = linux.child_numbered(sender, self.number) is None
        return self.reaped

    def rpc_copies_at(
        self,
        sender: int,
        event: dict[str, Any],
        confirmed: bool,
        orphans: Callable[[], Iterable[int]] = tuple,
    ) -> list[dict[str, Any]]:
        """The copies of the RPC connection engine code kept, when ``event`` is the return
        of create_container the master waits on: ``{"pid", "fd", "process"}`` each, the
        pid as the supervisor numbers it, the process ``master``, ``child`` (of the master,
        at any depth) or ``orphan``. ``orphans``: the run's processes no longer below
        the master (a helper whose parent exited went to a reaper), looked at too."""
        if (
            self._the_kits_end(sender, event, confirmed) != "create_container"
            or event["kind"] != "hook_return"
            or self.rpc_inode is None
            or self.rpc_fd is None
            or self.fd_base is None
        ):
            return []
        container = None
        if self.container is not None:
            container = linux.child_numbered(sender, self.container)
        skip = set() if container is None else {container}
        below = linux.descendants(sender, skip)
        inside = set() if container is None else {container, *linux.descendants(container)}
        away = [p for p in orphans() if p not in inside and p != sender and p not in below]
        # The kit's own copies are the master's two lowest high up (its own copy and the
        # creation watch's, both close-on-exec, made at the first free numbers from fd_base);
        # a child forked by a hook has them at the same numbers. The engine's rpc_conn is
        # the master's at its number.
        mine = linux.socket_fds(sender, self.rpc_inode)
        kits = set(sorted(fd for fd in mine if fd >= self.fd_base)[:KIT_COPIES])
        found: list[dict[str, Any]] = []
        for pid in [sender, *below, *away]:
            for fd in mine if pid == sender else linux.socket_fds(pid, self.rpc_inode):
                if fd in kits or (pid == sender and fd == self.rpc_fd):
                    continue
                where = "master" if pid == sender else "child" if pid in below else "orphan"
                found.append({"pid": pid, "fd": fd, "process": where})
        return found
