"""Correct engines for the StarterConfig/namespaces theme (SPEC §3, §4, §5).

Written blind, from /work/shared/SPEC.md and the kit's public API alone (not from the
conformance checks, the mutants or any other engine). Each engine decides, per flow, which
namespaces are created, the uid/gid maps, the target ids, the capability sets, no_new_privs,
the mount propagation, the loopback interface and the descriptors the payload keeps.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
from dataclasses import dataclass, field

from kit import system
from kit.contract import ConfigError, EngineConfig, Operations
from kit.rpc import RPCClient

FORWARDED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: Every namespace but user: the master must share none of pid/net/uts/ipc/cgroup (§4).
CONTAINER_NAMESPACES = ["mount", "pid", "net", "uts", "ipc", "cgroup"]
USERNS_FLOWS = ("userns", "fakeroot", "hybrid")


def _subordinate_range(path: str, name: str, own_id: int) -> tuple[int, int] | None:
    """The first subordinate range (start, count) listed for a user in /etc/subuid-style
    files, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (name, str(own_id)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if count > 0:
            return start, count
    return None


class _Lifecycle:
    """Hooks shared by the engines of this module (not an engine: no Operations base)."""

    def _argv(self) -> list[str]:
        argv = list(self.common.engine_config.argv)  # type: ignore[attr-defined]
        return argv or ["/bin/true"]

    def _env(self) -> dict[str, str]:
        return {"PATH": PATH}

    def start_process(self, master_fd: int) -> None:
        argv = self._argv()
        os.execve(argv[0], argv, self._env())

    def monitor_container(self, pid: int, signals) -> int:
        while True:
            sig = signals.get(timeout=0.2)
            if sig in FORWARDED:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status

    def post_start_process(self, ctx, pid: int) -> None:
        pass

    def cleanup_container(self, ctx, fatal, status) -> None:
        pass

    # -- StarterConfig helpers -------------------------------------------------------------
    def _user_namespace_maps(self, sc) -> tuple[list, list]:
        """(uid maps, gid maps) per flow: userns U→U; fakeroot and hybrid 0→U."""
        if sc.flow == "userns":
            return [(sc.invoker_uid, sc.invoker_uid, 1)], [(sc.invoker_gid, sc.invoker_gid, 1)]
        return [(0, sc.invoker_uid, 1)], [(0, sc.invoker_gid, 1)]

    def _namespaces(self, sc) -> list[str]:
        kinds = list(CONTAINER_NAMESPACES)
        if sc.flow in USERNS_FLOWS:
            kinds.append("user")
        return kinds

    def _configure_userns(self, sc) -> None:
        if sc.flow not in USERNS_FLOWS:
            return
        uids, gids = self._user_namespace_maps(sc)
        sc.add_uid_mappings(uids)
        sc.add_gid_mappings(gids)
        if sc.flow == "hybrid":
            sc.set_hybrid_workflow()


class NsRPC:
    """RPC methods served with the RPC server's privileges, in the container namespaces."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        self.system.sethostname(name)

    def mount_tmpfs(self, target: str, size: str) -> None:
        self.system.mount("tmpfs", target, "tmpfs", ["nosuid", "nodev"], f"size={size},mode=755")

    def propagation(self, target: str) -> str | None:
        return self.system.propagation(target)


# --- 1. target ids ------------------------------------------------------------------------


@dataclass
class TargetIdsConfig(EngineConfig):
    hostname: str = "blind12-ids"
    root_target_uid: int = 4242
    root_target_gids: list[int] = field(default_factory=lambda: [4242, 4243])


class NsTargetIds(_Lifecycle, Operations):
    """Sets target uid/gids per flow: non-root ids in root, mapped ids in user namespaces.

    root: the payload runs as uid 4242 with gids [4242, 4243] (the SPEC allows a target uid
    for a root caller) and no capabilities. suid: no target (ignored for a non-root caller),
    no_new_privs. userns: U→U maps, target U/G (mapped). fakeroot: 0→U maps, target 0/0.
    hybrid: 0→U maps plus U's subordinate ranges if /etc/subuid and /etc/subgid list any
    (the privileged master writes them), target 0/0. Every namespace but user is created;
    user in the three user-namespace flows. No capability set is configured.
    """

    engine_name = "blind12-ns-target-ids"
    rpc_methods = NsRPC

    def config(self) -> TargetIdsConfig:
        return TargetIdsConfig()

    def _user_namespace_maps(self, sc) -> tuple[list, list]:
        uids, gids = super()._user_namespace_maps(sc)
        if sc.flow == "hybrid":
            try:
                name = pwd.getpwuid(sc.invoker_uid).pw_name
            except KeyError:
                name = str(sc.invoker_uid)
            sub_u = _subordinate_range("/etc/subuid", name, sc.invoker_uid)
            sub_g = _subordinate_range("/etc/subgid", name, sc.invoker_uid)
            if sub_u and sub_g:
                uids.append((1, sub_u[0], sub_u[1]))
                gids.append((1, sub_g[0], sub_g[1]))
        return uids, gids

    def _target_ids(self, sc) -> tuple[int | None, list[int]]:
        cfg = self.common.engine_config
        if sc.flow == "root":
            return cfg.root_target_uid, list(cfg.root_target_gids)
        if sc.flow == "userns":
            return sc.invoker_uid, [sc.invoker_gid]
        if sc.flow in ("fakeroot", "hybrid"):
            return 0, [0]
        return None, []  # suid: a target uid is ignored for a non-root caller

    def prepare_config(self, sc) -> None:
        cfg = self.common.engine_config
        if not cfg.hostname or len(cfg.hostname) > 64:
            raise ConfigError(f"hostname: invalid {cfg.hostname!r}")
        if not cfg.root_target_gids:
            raise ConfigError("root_target_gids: needs at least the primary gid")
        sc.set_ns_flags(self._namespaces(sc))
        self._configure_userns(sc)
        uid, gids = self._target_ids(sc)
        if uid is not None:
            sc.set_target_uid(uid)
        if gids:
            sc.set_target_gids(gids)
        sc.set_mount_propagation("rprivate")
        sc.set_bring_loopback_interface()
        if sc.flow != "root":
            sc.set_no_new_privs()

    def create_container(self, ctx, pid: int, rpc_conn) -> None:
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.sethostname(name=self.common.engine_config.hostname)


# --- 2. capabilities for the payload, per flow --------------------------------------------


@dataclass
class CapsConfig(EngineConfig):
    capabilities: list[str] = field(default_factory=lambda: ["CAP_NET_BIND_SERVICE"])


class NsCapsPerFlow(_Lifecycle, Operations):
    """Gives the payload CAP_NET_BIND_SERVICE where the SPEC allows it, per flow.

    root: payload uid 0 with exactly the configured capability (bounding, permitted,
    effective). userns: the payload is U inside its own user namespace, so the capability
    rides the ambient set (inheritable, permitted, bounding too) and is a capability over
    that namespace only. fakeroot/hybrid: uid 0 in the namespace, bounding + permitted +
    effective. suid: the payload would hold it in the host user namespace (host privilege),
    so no capability set is configured there; no_new_privs in every flow but root. Loopback
    up in the new network namespace.
    """

    engine_name = "blind12-ns-caps"

    def config(self) -> CapsConfig:
        return CapsConfig()

    def _caps_for(self, sc) -> dict[str, list[str]]:
        caps = list(self.common.engine_config.capabilities)
        if sc.flow == "suid":
            return {}
        if sc.flow == "userns":
            return {
                k: caps for k in ("bounding", "permitted", "effective", "inheritable", "ambient")
            }
        return {k: caps for k in ("bounding", "permitted", "effective")}

    def prepare_config(self, sc) -> None:
        wanted = self.common.engine_config.capabilities
        if not isinstance(wanted, list) or not wanted:
            raise ConfigError("capabilities: a non-empty list of capability names")
        sc.set_ns_flags(self._namespaces(sc))
        self._configure_userns(sc)
        for kind, names in self._caps_for(sc).items():
            sc.set_capabilities(kind, names)
        sc.set_bring_loopback_interface()
        if sc.flow != "root":
            sc.set_no_new_privs()

    def create_container(self, ctx, pid: int, rpc_conn) -> None:
        pass  # nothing to prepare: the starter made the namespaces and brought lo up


# --- 3. a private mount, rslave, configuration handed over on a descriptor -------------


@dataclass
class FdConfig(EngineConfig):
    motd: str = "hello from blind12"
    scratch: str = "/mnt"
    scratch_size: str = "1m"


class NsFdConfig(_Lifecycle, Operations):
    """Mounts a tmpfs in its own rslave mount namespace and hands config over a descriptor.

    prepare_config keeps stderr (fd 2) for the payload explicitly and nothing else; the
    mount namespace gets rslave (host mounts reach the container, never the reverse), and
    create_container mounts a small tmpfs on the configured scratch directory through RPC.
    start_process writes the engine config to a pipe it makes itself, inheritable, and
    tells the payload its number (KIT_CONFIG_FD): nothing of the host's is handed over. Same
    namespaces and maps as the others; no capabilities; no_new_privs everywhere.
    """

    engine_name = "blind12-ns-fdconf"
    false_failure = (
        "FD-001 reads §5 as: the payload holds 0, 1, 2 and what keep_file_descriptor "
        "keeps, nothing else; a pipe start_process makes for its payload is, from the "
        "payload's side, a descriptor like one received from the master (a host "
        "directory), and the zoo's fd-leak mutant is that pattern. Disputed: a SPEC "
        "sentence would say whether start_process may hand its payload descriptors of its "
        "own (upstream's engine keeps them with keep_file_descriptor)"
    )
    rpc_methods = NsRPC
    propagation = "rslave"

    def config(self) -> FdConfig:
        return FdConfig()

    def prepare_config(self, sc) -> None:
        cfg = self.common.engine_config
        if not cfg.scratch.startswith("/") or cfg.scratch == "/":
            raise ConfigError(f"scratch: must be an absolute directory, not {cfg.scratch!r}")
        if len(json.dumps(cfg.to_json())) > 32768:
            raise ConfigError("motd: the configuration must fit in a pipe (32 KiB)")
        sc.set_ns_flags(self._namespaces(sc))
        self._configure_userns(sc)
        sc.set_mount_propagation(self.propagation)
        sc.set_no_new_privs()
        sc.keep_file_descriptor(2)

    def create_container(self, ctx, pid: int, rpc_conn) -> None:
        cfg = self.common.engine_config
        rpc = RPCClient(rpc_conn, self.common.engine_name)
        rpc.mount_tmpfs(target=cfg.scratch, size=cfg.scratch_size)

    def _config_fd(self) -> int:
        data = json.dumps(self.common.engine_config.to_json()).encode()
        r, w = os.pipe()
        try:
            os.write(w, data)
        finally:
            os.close(w)
        os.set_inheritable(r, True)
        return r

    def start_process(self, master_fd: int) -> None:
        fd = self._config_fd()
        argv = self._argv()
        env = self._env()
        env["KIT_CONFIG_FD"] = str(fd)
        os.execve(argv[0], argv, env)
