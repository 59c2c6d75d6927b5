"""Stage 2: start_process under the payload's credentials, then exec of the payload (SPEC §5)."""

from __future__ import annotations

import os
import posix
import sys
from typing import TYPE_CHECKING, NoReturn

from kit import registry
from kit.ledger.record import LOST_EVENT, lost_event
from kit.starter.common import (
    _REAL_EXIT,
    EXIT_FATAL,
    STAGE2_NAME,
    HookRunner,
    _exit,
    _failure,
    _send,
    _unwrap,
    default_signals,
    rearm_parent_death,
)
from kit.starter.control import Control
from kit.system import linux

if TYPE_CHECKING:
    from kit.starter.container import Container


class Stage2:
    """The container process after setup: target credentials, then start_process."""

    def __init__(self, container: Container) -> None:
        self.c = container
        self.ledger = container.ledger.for_role("stage2")
        self.ledger.on_lost = self._ledger_lost

    def _ledger_lost(self, exc: OSError) -> NoReturn:
        """Told to the master, whose events still reach the supervisor, with the event that
        could not be sent: an engine may close every descriptor it does not know before its
        exec, and when that exec fails, how start_process ended is still the engine's."""
        message = (
            f"engine code closed the ledger socket in stage 2 (or put another file under "
            f"its number): {exc.strerror}"
        )
        lost = lost_event(self.ledger.lost)
        if lost:
            message += f"; {LOST_EVENT} {lost}"
        _send(self.c.sock, _failure(Control.STAGE2_FAILED, message))
        _REAL_EXIT(EXIT_FATAL)

    def target_ids(self) -> tuple[int, list[int]]:
        """(uid, gids) of stage 2 as the container sees them (SPEC §4)."""
        s, flow, u = self.c.sconf, self.c.req.flow, self.c.starter.user
        if flow == "root":
            uid = s.target_uid if s.target_uid is not None else 0
            gids = s.target_gids or [0]
            return uid, gids
        in_userns = s.uses_namespace("user")
        if not in_userns:
            return u.uid, [u.gid]
        # Inside a user namespace: the id that U maps to (or a mapped target id).
        uid = _inside_id(s.uid_mappings, u.uid)
        gid = _inside_id(s.gid_mappings, u.gid)
        if s.target_uid is not None and _is_mapped(s.uid_mappings, s.target_uid):
            uid = s.target_uid
        gids = [gid]
        if s.target_gids and all(_is_mapped(s.gid_mappings, g) for g in s.target_gids):
            gids = list(s.target_gids)
        return uid, gids

    def apply_credentials(self) -> None:
        s, system = self.c.sconf, self.c.system
        # A set left unset is empty at exec, the bounding set too (SPEC §5): a full bounding
        # set would hand a root payload every capability at exec.
        caps = {k: linux.caps_to_mask(v or ()) for k, v in s.capabilities.items()}
        system.limit_bounding(caps["bounding"])
        uid, gids = self.target_ids()
        in_userns = s.uses_namespace("user")
        groups = None  # setuid flows keep U's supplementary groups; a userns may deny them
        if self.c.req.flow == "root" or (in_userns and s.allow_setgroups):
            groups = gids[1:]
        system.become_user(uid, gids[0], groups, keep_caps=True)
        system.set_capabilities(caps["effective"], caps["permitted"], caps["inheritable"])
        system.set_ambient(caps["ambient"])
        if s.no_new_privs:
            system.set_no_new_privs()
        rearm_parent_death(sock=self.c.sock)

    def close_fds(self, master_fd: int) -> None:
        ledger_fd = self.c.starter.ledger_sock.fileno()  # close-on-exec: gone with the exec
        linux.close_fds_except({0, 1, 2, master_fd, ledger_fd, *self.c.sconf.keep_fds})
        for k in self.c.sconf.keep_fds:
            os.set_inheritable(k, True)

    def main(self) -> NoReturn:
        sock = self.c.sock
        try:
            self.apply_credentials()
            default_signals(for_exec=True)
            self.ledger.emit(
                "process_start", ppid=self.c.system.getppid(), nspid=[self.c.system.getpid()]
            )
            hooks = HookRunner(self.ledger, self.c.system, self.c.req.probes)
            engine = registry.make_engine(self.c.req.engine)
            hooks.init_engine(
                engine,
                self.c.common_json["engine_config"],
                self.c.common_json["container_id"],
                False,
            )
            master_fd = sock.fileno()
            self.close_fds(master_fd)
            linux.set_name(STAGE2_NAME)
            me = os.getpid()

            def reported_exit(code: int) -> NoReturn:  # exiting is allowed; tell the master
                if os.getpid() == me:  # not in a child forked by the engine or a probe
                    _send(
                        sock,
                        _failure(
                            Control.STAGE2_FAILED,
                            f"start_process exited with code {code} instead of exec",
                        ),
                    )
                _REAL_EXIT(code)

            # Both names of the one function: posix._exit is os._exit under another module.
            os._exit = posix._exit = reported_exit  # type: ignore[assignment]
            mark = self.c.starter.exec_mark
            master_socket = linux.fd_identity(master_fd)

            def exec_called(event: str, args: tuple[object, ...]) -> None:
                # os.exec* (not a forked child's): tells the master, which may find the
                # container already reaped by the monitor, that exec was called, and
                # whether master_fd was still the master socket then (else the EOF the
                # master took for the exec came before it: SPEC §2, ORDER-009).
                if event == "os.exec" and os.getpid() == me:
                    # Held under any number (an engine may move it): still open at exec.
                    if linux.holds(master_socket) is False:
                        mark[1] = 1
                    mark[0] = 1
                elif mark[0] and os.getpid() == me:
                    mark[0] = 0  # the exec failed: engine code runs again (any audited call)

            sys.addaudithook(exec_called)
            hooks.call("start_process", engine.operations.start_process, master_fd)
            message = "stage 2 returned: start_process must exec the payload or exit"
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            err = _unwrap(exc)
            message = f"start_process failed: {type(err).__name__}: {err}"
        # Back in the kit: an exec was called and failed (the mark tells an attempt).
        held = getattr(getattr(self.c, "starter", None), "exec_mark", None)
        if held is not None:
            held[0] = 0
        _send(sock, _failure(Control.STAGE2_FAILED, message))
        _exit(EXIT_FATAL)


def _inside_id(maps: list[list[int]], host_id: int) -> int:
    for inside, outside, size in maps:
        if outside <= host_id < outside + size:
            return inside + host_id - outside
    return 65534


def _is_mapped(maps: list[list[int]], inside_id: int) -> bool:
    return any(inside <= inside_id < inside + size for inside, _, size in maps)
