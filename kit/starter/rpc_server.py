"""The RPC server process: serves the engine's RPC methods with the privileges SPEC §5 gives it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from kit import registry
from kit.starter.common import (
    EXIT_FATAL,
    HookRunner,
    _exit,
    describe_error,
    own_thread,
    rearm_parent_death,
    wire_snapshot,
)
from kit.system import linux

if TYPE_CHECKING:
    from kit.starter.container import Container


#: Capabilities the RPC server keeps permitted (and bounding) in the setuid flows.
RPC_SERVER_CAPS = (
    "CAP_SYS_ADMIN",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_NET_ADMIN",
    "CAP_SETPCAP",
)


class RPCServerProcess:
    """The RPC server: shares the container's namespaces, root and cwd (CLONE_FS)."""

    def __init__(self, container: Container, parent: int) -> None:
        self.c = container
        self.parent = parent
        self.ledger = container.ledger.for_role("rpc")
        #: Why the last read of the credentials failed (the rpc_call event says it).
        self.unread: str | None = None

    def drop_privileges(self) -> None:
        req, system = self.c.req, self.c.system
        if req.flow in ("suid", "hybrid"):
            keep = linux.caps_to_mask(RPC_SERVER_CAPS)
            system.limit_bounding(keep)
            # As the real uid: U, or in the hybrid workflow the id U maps to in the
            # container's user namespace (the container side became it, r=e=s). Never the
            # effective one: a hybrid-flow engine that asks for no user namespace leaves us
            # in the host's, with the setuid starter's euid 0.
            ruid = system.getresuid()[0]
            # e=U with keep-caps: permitted survives, effective cleared; then only
            # CAP_SYS_ADMIN effective (a method may raise more on its own thread).
            system.set_keepcaps(True)
            system.setresuid(ruid, ruid, -1)
            system.set_keepcaps(False)
            system.set_capabilities(linux.caps_to_mask(["CAP_SYS_ADMIN"]), keep, 0)
        rearm_parent_death(self.parent)

    def _creds(self) -> dict[str, Any] | None:
        """The calling thread's credentials (uids, gids, capability sets, no_new_privs), the
        process's root directory, and every thread's whole credential; None when they could
        not be read (:attr:`unread` says why)."""
        if not self.c.req.probes:
            return None
        try:
            snap = wire_snapshot(self.c.system)
        except Exception as exc:  # noqa: BLE001 a probe failure: no credentials to record
            self.unread = f"the kit's read failed: {type(exc).__name__}: {exc}"
            return None
        me = own_thread(snap)
        if me is None:
            self.unread = "the kit's read did not find the serving thread in /proc"
            return None
        # Every thread and the user namespace's map too: the privilege rules hold for every
        # thread around every method (SPEC §4), not only for the one serving it.
        return {
            **{k: me.get(k) for k in ("uid", "gid", "groups", "caps", "no_new_privs", "seccomp")},
            "root": snap.get("root"),
            "threads": snap["threads"],
            "uid_map": snap.get("uid_map"),
            "securebits": snap.get("securebits"),
        }

    def main(self) -> NoReturn:
        code = EXIT_FATAL
        try:
            linux.set_name("kit-rpc")
            self.drop_privileges()
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
            observed: list[dict[str, Any]] = []

            def around(method: Callable[..., Any]) -> Callable[..., Any]:
                @functools.wraps(method)
                def observed_method(*args: Any, **kwargs: Any) -> Any:
                    before = self._creds()
                    try:
                        return method(*args, **kwargs)
                    finally:
                        observed.append({"before": before, "after": self._creds()})

                return observed_method

            def on_call(record: dict[str, Any]) -> None:
                if observed:
                    creds = observed.pop()
                else:  # refused before any method ran: as it found them, and left them
                    now = self._creds()
                    creds = {"before": now, "after": now}
                observed.clear()
                if self.unread is not None:
                    creds["unread"], self.unread = self.unread, None
                # The credentials the method left are confirmed from outside as a hook's
                # snapshot is (engine code in this process could dress them up): read again
                # when another thread changed its own meanwhile.
                self.ledger.emit("rpc_call", refresh=self._creds, **record, creds=creds)

            code = registry.serve_rpc_requests(
                engine,
                self.c.rpc_sock,
                on_call=on_call,
                around=around,
                reserved_fds=(self.c.starter.ledger_sock.fileno(),),
            )
        except BaseException as exc:  # noqa: BLE001 engine code may raise anything
            self.ledger.emit(
                "starter_error", stage="rpc_server", message=describe_error(exc)["traceback"]
            )
        _exit(code)
