"""Blind engines, round 4: one SPEC §5 StarterConfig bug each (``blind4_config:X``).

Each engine is the reference engine with one mistake in what ``prepare_config`` asks the
starter for (namespaces, maps, capabilities, flags, descriptors, joins), or in how it builds
the request. The kit applies a StarterConfig faithfully: every bug below is in the request.
"""

from __future__ import annotations

import os
import signal
import stat
from dataclasses import dataclass, field

from conformance import Capabilities
from conformance.capabilities import JOIN_FIELD
from kit import system
from kit.contract import ConfigError
from kit.starter.config import StarterConfig
from kit.system import linux
from reference_engines.minimal.engine import (
    GUARDED_NAMESPACES,
    ROOT_DEFAULT_CAPS,
    USERNS_FLOWS,
    ReferenceConfig,
    ReferenceEngine,
    validate_config,
)
from reference_engines.minimal.rpc import ReferenceRPC

#: Decided once, when the starter imports the engine ("is our caller root?"). The starter
#: imports engines before it takes the caller's identity: a setuid starter is euid 0 here.
_EUID_AT_IMPORT = os.geteuid()

#: useradd's default first subordinate id (SUB_UID_MIN) and count (SUB_UID_COUNT).
SUB_ID_MIN = 100000
SUB_ID_COUNT = 65536
PAUSE_SECONDS = 30


def _host_bounding() -> set[str]:
    return set(linux.mask_to_caps(int(linux.read_status()["CapBnd"], 16)))


# --- namespaces and the flags that go with them -------------------------------------------


class RootlessNoNetKeepsLoopback(ReferenceEngine):
    """Rootless flows drop the net namespace after the loopback request was decided.

    SPEC §1: prepare_config "validates the config and fills the StarterConfig"; §5: "Invalid
    combinations ... are rejected before any namespace exists" (the kit's
    set_bring_loopback_interface "needs a network namespace"). Like Apptainer without
    --net, the author gives rootless containers (userns, fakeroot, hybrid) the host's network
    ("no network helper for unprivileged users"): it removes ``net`` from the namespace flags
    after the reference code has already asked for ``lo`` to be brought up (decided from the
    config's namespace list). The default config yields a StarterConfig the starter rejects:
    every userns, fakeroot and hybrid run exits 255 before the container exists."""

    engine_name = "blind4-rootless-no-net-keeps-loopback"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        sc = starter_config
        if sc.flow in USERNS_FLOWS:
            # The bug: set_bring_loopback_interface(True) stays from the reference code.
            sc.set_ns_flags([k for k in sc.ns_flags if k != "net"])


class SuidCallerGetsUserns(ReferenceEngine):
    """Any non-root caller gets a user namespace, the plain setuid flow included.

    SPEC §5: "Invalid combinations (...; a user ns in suid without hybrid; ...) are rejected
    before any namespace exists"; §3 suid: "user namespace: none (requesting one without
    hybrid is rejected)". The author decides "rootless" from the caller's uid
    (``invoker_uid != 0``) instead of the flow: in the suid flow it adds ``user`` to the
    namespace flags with an identity map, and (correctly) asks for the hybrid workflow only in
    the hybrid flow. Every suid run is rejected by the starter, exit 255."""

    engine_name = "blind4-suid-caller-gets-userns"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        sc = starter_config
        if sc.invoker_uid != 0 and not sc.uses_namespace("user"):
            sc.set_ns_flags([*sc.ns_flags, "user"])
            sc.add_uid_mappings([(sc.invoker_uid, sc.invoker_uid, 1)])
            sc.add_gid_mappings([(sc.invoker_gid, sc.invoker_gid, 1)])


@dataclass
class _PauseConfig(ReferenceConfig):
    #: Not an option: stage 1 records the pid of its network "pause" process here.
    pause_pid: int = 0


class Stage1PauseNetns(ReferenceEngine):
    """prepare_config creates the container's net namespace (a "pause" process) and joins it.

    SPEC §2 rule 2: "prepare_config runs once, in stage 1, before any container namespace
    exists"; §5: "Order: user, pid (in the starter, before the fork), then net, uts, ipc,
    cgroup, mount in the container side". Like a pod's infra container, in the root flow
    stage 1 starts a pause process (``sleep``) in a new network namespace and asks the
    starter to join ``/proc/PID/ns/net`` instead of creating one: the container's network
    namespace exists before prepare_config returns, before the pid namespace. The pid is
    kept in the config (JSON) and cleanup_container kills the pause process. Root flow only
    (stage 1 has no privilege elsewhere), real backend (where the pause process cannot make
    its namespace, the engine lets the starter create one, as the reference does)."""

    engine_name = "blind4-stage1-pause-netns"
    rpc_methods = ReferenceRPC

    def config(self) -> _PauseConfig:
        return _PauseConfig()

    def prepare_config(self, starter_config: StarterConfig) -> None:
        cfg: _PauseConfig = self.common.engine_config  # type: ignore[assignment]
        if cfg.pause_pid:
            raise ConfigError("pause_pid: recorded by the engine itself, not a user option")
        super().prepare_config(starter_config)
        sc = starter_config
        if sc.flow == "root" and "net" in sc.ns_flags:
            try:
                cfg.pause_pid = _start_pause()
            except OSError:
                return  # no pause process (e.g. refused): the starter creates the namespace
            sc.set_ns_path("net", f"/proc/{cfg.pause_pid}/ns/net")

    def cleanup_container(self, ctx, fatal, status):  # type: ignore[no-untyped-def]
        pid = self.common.engine_config.pause_pid  # type: ignore[attr-defined]
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)  # ours only if the master adopted it (a subreaper)
            except ChildProcessError:
                pass
        super().cleanup_container(ctx, fatal, status)


def _start_pause() -> int:
    """A ``sleep`` in a network namespace of its own; its pid once the namespace exists."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            linux.unshare(linux.CLONE_NEWNET)
            os.write(w, b"x")
            os.close(w)
            os.execv("/bin/sleep", ["sleep", str(PAUSE_SECONDS)])
        finally:
            os._exit(1)
    os.close(w)
    ready = os.read(r, 1)
    os.close(r)
    if not ready:
        os.waitpid(pid, 0)
        raise OSError("the pause process could not create its network namespace")
    return pid


# --- user namespace maps ------------------------------------------------------------------


class HybridDefaultSubordinateRange(ReferenceEngine):
    """hybrid maps a made-up subordinate range (100000-165535) when /etc/subuid has none.

    SPEC §3 fakeroot: "map 0→U (+ subordinate range when newuidmap is available)"; hybrid is
    "fakeroot requested", with the privileged master writing the maps. Like newuidmap, the
    engine adds U's subordinate ranges from /etc/subuid and /etc/subgid; where U has none
    (here: the files are empty and newuidmap is not installed) it falls back to useradd's
    default first range, SUB_UID_MIN=100000, 65536 ids, for both maps -- host ids that
    belong to nobody in particular, handed to U. Hybrid flow only."""

    engine_name = "blind4-hybrid-default-subordinate-range"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        sc = starter_config
        if sc.flow != "hybrid":
            return
        for path, own, add in (
            ("/etc/subuid", sc.invoker_uid, sc.add_uid_mappings),
            ("/etc/subgid", sc.invoker_gid, sc.add_gid_mappings),
        ):
            start, count = _subordinate(path, own) or (SUB_ID_MIN, SUB_ID_COUNT)  # the bug
            add([(1, start, count)])


def _subordinate(path: str, own: int) -> tuple[int, int] | None:
    """The first ``start:count`` of ``own`` (by number) in a subordinate-id file."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] == str(own):
                    return int(parts[1]), int(parts[2])
    except (OSError, ValueError):
        pass
    return None


class UsernsGidInsideIsUid(ReferenceEngine):
    """userns gid map puts U's gid at the container gid numbered like U's uid.

    SPEC §3 userns: "map U→U" (and §4 stage 2 userns: "r=e=s=U mapped"). The identity gid
    map is written by copy-paste from the uid line: ``(invoker_uid, invoker_gid, 1)``. The
    host side is right (the unprivileged starter accepts it), the container side is not:
    inside, U's group is gid U-uid (999 for kit-test, whose gid is 995), so stage 2 and the
    payload run with a gid that is not U's. Userns flow, only where U's uid and gid differ
    (kit-test; not nobody, 65534/65534)."""

    engine_name = "blind4-userns-gid-inside-is-uid"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        sc = starter_config
        if sc.flow != "userns":
            super().prepare_config(sc)
            return
        # The reference body for the userns flow, with the identity maps written out.
        cfg: ReferenceConfig = self.common.engine_config  # type: ignore[assignment]
        caps = validate_config(cfg, sc)
        host = system.current()
        cfg.host_namespaces = {kind: host.ns_inode(kind) for kind in GUARDED_NAMESPACES}
        namespaces = [*cfg.namespaces, "user"]
        sc.add_uid_mappings([(sc.invoker_uid, sc.invoker_uid, 1)])
        sc.add_gid_mappings([(sc.invoker_uid, sc.invoker_gid, 1)])  # the bug: inside = uid
        sc.set_ns_flags(namespaces)
        if "net" in namespaces:
            sc.set_bring_loopback_interface()
        if "mount" in namespaces:
            sc.set_mount_propagation("rprivate")
        for kind in ("effective", "permitted", "bounding"):
            sc.set_capabilities(kind, caps)
        sc.set_no_new_privs()


# --- capabilities and no_new_privs --------------------------------------------------------


class RootBoundingBeforeFilter(ReferenceEngine):
    """Root bounding set gets the capability list from before the host filter.

    SPEC §4 stage 2, root: "caps exactly as configured"; §5: set_capabilities(kind, names)
    "for effective/permitted/inheritable/bounding/ambient". The engine's root default is
    Docker's list plus CAP_SYS_RESOURCE ("so the container may raise its rlimits"); it
    filters the list by the host's bounding set for effective and permitted, but passes the
    list computed before that filter to the bounding set ("the bounding set is only a
    limit"). This host lacks CAP_SYS_RESOURCE in its bounding set: stage 2 cannot hold the
    bounding set the StarterConfig asks for, and runs with one capability fewer than
    configured. Root flow, on hosts whose bounding set lacks CAP_SYS_RESOURCE."""

    engine_name = "blind4-root-bounding-before-filter"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        sc = starter_config
        cfg: ReferenceConfig = self.common.engine_config  # type: ignore[assignment]
        if sc.flow != "root" or cfg.capabilities is not None:
            return
        wanted = [*ROOT_DEFAULT_CAPS, "CAP_SYS_RESOURCE"]
        host = _host_bounding()
        granted = [c for c in wanted if c in host]
        sc.set_capabilities("effective", granted)
        sc.set_capabilities("permitted", granted)
        sc.set_capabilities("bounding", wanted)  # the bug: the unfiltered list


class SuidNnpFromImportEuid(ReferenceEngine):
    """no_new_privs is skipped for a "root caller" judged by the euid at import time.

    SPEC §4 stage 2, suid: "r=e=s=U ...; caps as configured (default none); no_new_privs
    set; no saved uid 0". The author lets a root caller run setuid tools in the container
    (no no_new_privs) and decides "root caller" once, when the module is imported, from
    ``os.geteuid()``: the setuid starter imports the engine before it takes the caller's
    identity, with euid 0. In the suid flow the StarterConfig asks for no no_new_privs, so
    stage 2 and the payload run without it (escalation through a setuid-root binary is not
    blocked by it). Suid flow, real backend (the starter is root there); the other flows do
    not need the flag."""

    engine_name = "blind4-suid-nnp-from-import-euid"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if _EUID_AT_IMPORT == 0:  # the bug: the starter's euid, not the caller's uid
            starter_config.set_no_new_privs(False)


# --- descriptors --------------------------------------------------------------------------


class KeepsInheritedSockets(ReferenceEngine):
    """Every socket stage 1 inherited is kept for the payload ("socket activation").

    SPEC §5: keep_file_descriptor ("Keep fd open (inheritable) into stage 2 and the
    payload") with §8: "Every process of a run appends events to one ledger, which the
    launcher collects" -- the payload is not one of them. Like systemd socket activation
    without reading LISTEN_FDS, prepare_config keeps every socket open in stage 1 above fd
    2. The only one there is the kit's ledger socket (inherited from the starter, open there
    too, so the starter accepts it): stage 2 makes it inheritable and the payload holds a
    connected socket to the run's ledger. Every flow, every run."""

    engine_name = "blind4-keeps-inherited-sockets"
    rpc_methods = ReferenceRPC

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd <= 2:
                continue
            try:
                mode = os.fstat(fd).st_mode
            except OSError:
                continue  # the directory listing's own descriptor, closed by now
            if stat.S_ISSOCK(mode):
                starter_config.keep_file_descriptor(fd)


# --- joins --------------------------------------------------------------------------------


class _JoinCapabilities(Capabilities):
    @property
    def join_only(self) -> bool:
        return True


@dataclass
class _JoinConfig(ReferenceConfig):
    conformance_join: dict[str, str] = field(default_factory=dict)


class _JoinEngine(ReferenceEngine):
    """Declares the join-only capability; subclasses decide how they honour a join."""

    rpc_methods = ReferenceRPC
    conformance_capabilities = _JoinCapabilities

    def config(self) -> _JoinConfig:
        return _JoinConfig()

    def join_paths(self) -> dict[str, str]:
        return dict(getattr(self.common.engine_config, JOIN_FIELD) or {})


class CreateWinsOverJoin(_JoinEngine):
    """A namespace path is used only for kinds the engine does not create anyway.

    SPEC §5: "Each is either created (a flag) or joined (a path such as /proc/PID/ns/net);
    join wins over create." The author reads a path as "share this namespace instead of
    none" and keeps its own flag where it has one: it calls set_ns_path only for kinds
    missing from its flags, and makes the run join-only when anything is left to join. Its
    default flags hold mount, pid, uts, ipc, net and cgroup, so a join of uts, ipc or net is
    dropped: the run creates fresh namespaces (and runs every master hook). Join runs, every
    flow that has them."""

    engine_name = "blind4-create-wins-over-join"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        sc = starter_config
        for kind, path in self.join_paths().items():
            if kind not in sc.ns_flags:  # the bug: the flag wins
                sc.set_ns_path(kind, path)
        if sc.ns_paths:
            sc.set_ns_flags([k for k in sc.ns_flags if k in sc.ns_paths])
            sc.set_bring_loopback_interface(False)
            sc.set_namespace_join_only()


class JoinWithoutJoinOnly(_JoinEngine):
    """Join runs set the paths but never set_namespace_join_only: the master hooks run.

    SPEC §5: "Join-only runs (set_namespace_join_only) call only config/init_config,
    prepare_config and start_process." The engine claims the join-only capability and joins
    what it is given (the path wins over its flag), but keeps its other flags and forgets
    set_namespace_join_only: the starter runs a full lifecycle, create_container,
    post_start_process, monitor_container and cleanup_container included, and
    create_container sets the container's hostname in the joined uts namespace, which is
    not the run's. Join runs."""

    engine_name = "blind4-join-without-join-only"

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        sc = starter_config
        paths = self.join_paths()
        if not paths:
            return
        for kind, path in paths.items():
            sc.set_ns_path(kind, path)
        if "net" in paths:
            sc.set_bring_loopback_interface(False)
        # The bug: no sc.set_namespace_join_only().


class JoinOnlyKeepsLoopback(_JoinEngine):
    """A join-only run keeps the loopback request: lo goes up in the joined net namespace.

    SPEC §5: set_bring_loopback_interface ("Bring lo up in a new network namespace", the
    kit's setter) and "Join-only runs ... call only config/init_config, prepare_config and
    start_process"; §11: the host's "network links" are as they were. A correct join-only
    engine, but the loopback request of the reference code (made because its flags include
    net) stays: the starter brings ``lo`` up in the network namespace it joined, which
    belongs to someone else (the host's, when the join names it). Join runs that join net."""

    engine_name = "blind4-join-only-keeps-loopback"
    escapes: str = (
        "harmless with this kit since this engine found it: the starter brings lo up only "
        "in a network namespace the run creates, never in one it joins "
        "(tests/test_join_and_fds.py shows the joined namespace's lo left down)"
    )

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        sc = starter_config
        paths = self.join_paths()
        if not paths:
            return
        for kind, path in paths.items():
            sc.set_ns_path(kind, path)
        sc.set_ns_flags([k for k in sc.ns_flags if k in paths])
        sc.set_namespace_join_only()
        # The bug: no sc.set_bring_loopback_interface(False).
