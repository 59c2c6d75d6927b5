"""The container process: pid 1 of the run's namespaces (SPEC §3)."""

from __future__ import annotations

import os
import signal
import socket
from typing import TYPE_CHECKING, Any, NoReturn

from kit.starter.common import (
    CONTAINER_NAME,
    EXIT_FATAL,
    _exit,
    _failure,
    _recv_control,
    _send,
    rearm_parent_death,
)
from kit.starter.config import StarterConfig
from kit.starter.control import Control
from kit.starter.rpc_server import RPCServerProcess
from kit.starter.stage2 import Stage2, _inside_id
from kit.system import linux

if TYPE_CHECKING:
    from kit.starter.stage1 import Starter


#: The order the container process enters its namespaces in, after user and pid (entered in
#: the starter, before the fork): joined by path or created, one kind at a time (SPEC §5).
CONTAINER_NS_ORDER = ("net", "uts", "ipc", "cgroup", "mount")


class Container:
    """The container process (pid 1 of a new pid namespace): namespace setup, the RPC
    server, then stage 2."""

    def __init__(
        self,
        starter: Starter,
        common_json: dict[str, Any],
        sconf: StarterConfig,
        sock: socket.socket,
        rpc_server_sock: socket.socket,
    ) -> None:
        self.starter = starter
        self.req = starter.req
        self.system = starter.system
        self.common_json = common_json
        self.sconf = sconf
        self.sock = sock
        self.rpc_sock = rpc_server_sock
        self.ledger = starter.ledger.for_role("container")

    def main(self) -> NoReturn:
        try:
            linux.set_name(CONTAINER_NAME)
            linux.set_parent_death_signal(signal.SIGKILL)
            kind, _ = _recv_control(self.sock)  # uid maps are written
            if kind != Control.MAPS_WRITTEN:
                _exit(EXIT_FATAL)
            if self.sconf.hybrid_workflow:
                # Cloned by the setuid starter (kuids U, 0, 0): become the id U maps to in
                # the new user namespace, which drops host root for good.
                u = self.starter.user
                gid = _inside_id(self.sconf.gid_mappings, u.gid)
                uid = _inside_id(self.sconf.uid_mappings, u.uid)
                self.system.become_user(uid, gid, None)
                rearm_parent_death(sock=self.sock)
            self.ledger.emit(
                "process_start", ppid=self.system.getppid(), nspid=[self.system.getpid()]
            )
            self.setup_namespaces()
        except BaseException as exc:  # noqa: BLE001 the container reports any failure, then exits
            _send(
                self.sock,
                _failure(
                    Control.SETUP_FAILED, f"namespace setup failed: {type(exc).__name__}: {exc}"
                ),
            )
            _exit(EXIT_FATAL)
        rpc_pid = None
        if not self.sconf.namespace_join_only:
            parent = os.getpid()
            rpc_pid = self.system.clone(share_fs=True)
            if rpc_pid == 0:
                self.sock.close()
                RPCServerProcess(self, parent).main()
        self.rpc_sock.close()
        _send(self.sock, Control.READY)
        if rpc_pid is not None:
            _, status = os.waitpid(rpc_pid, 0)
            self.ledger.emit("process_exit", child_role="rpc", child_pid=rpc_pid, status=status)
        if self.sock.recv(1) != Control.GO.encode():
            _exit(EXIT_FATAL)  # create_container failed: stage 2 never starts
        Stage2(self).main()

    def setup_namespaces(self) -> None:
        """Join or create each namespace in :data:`CONTAINER_NS_ORDER`, one at a time (a
        path wins over creating), then set the propagation of / in a new mount namespace;
        records the order and the propagation / then has."""
        s, system = self.sconf, self.system
        created = s.namespaces_created()
        order: list[list[str]] = []
        for kind in CONTAINER_NS_ORDER:
            if kind in s.ns_paths:
                system.setns(kind, s.ns_paths[kind])
                order.append(["setns", kind])
            elif kind in created:
                system.unshare([kind])
                order.append(["unshare", kind])
        propagation = None
        if "mount" in created:
            system.set_propagation("/", s.mount_propagation)
            propagation = system.propagation("/")
        if s.bring_loopback_interface and "net" in created:  # a joined one is not the run's
            system.link_up("lo")
        self.ledger.emit(
            "namespaces",
            created=created,
            joined=dict(s.ns_paths),
            order=order,
            propagation=propagation,
            ns={k: system.ns_inode(k) for k in linux.NAMESPACES},
        )
