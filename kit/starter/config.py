"""StarterConfig: what ``prepare_config`` asks the starter to do (``SPEC.md`` §5)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from kit.contract import ConfigError
from kit.system.linux import CAP_NUMBERS, NAMESPACES, PROPAGATIONS

CAPABILITY_SETS = ("effective", "permitted", "inheritable", "bounding", "ambient")
FLOWS = ("root", "suid", "userns", "fakeroot", "hybrid")


def normalize_capability(name: str, setting: str) -> str:
    """``sys_admin``/``CAP_SYS_ADMIN`` → ``CAP_SYS_ADMIN``; unknown names are an error."""
    if not isinstance(name, str):
        raise ConfigError(f"{setting}: capability name must be a string, got {name!r}")
    canon = name.upper()
    if not canon.startswith("CAP_"):
        canon = "CAP_" + canon
    if canon not in CAP_NUMBERS:
        raise ConfigError(f"{setting}: unknown capability {name!r}")
    return canon


@dataclass
class _State:
    target_uid: int | None = None
    target_gids: list[int] = field(default_factory=list)
    capabilities: dict[str, list[str] | None] = field(
        default_factory=lambda: {k: None for k in CAPABILITY_SETS}
    )
    no_new_privs: bool = False
    hybrid_workflow: bool = False
    allow_setgroups: bool = False
    uid_mappings: list[list[int]] = field(default_factory=list)
    gid_mappings: list[list[int]] = field(default_factory=list)
    ns_flags: list[str] = field(default_factory=list)
    ns_paths: dict[str, str] = field(default_factory=dict)
    mount_propagation: str = "rprivate"
    master_propagate_mount: bool = False
    namespace_join_only: bool = False
    bring_loopback_interface: bool = False
    keep_fds: list[int] = field(default_factory=list)


class StarterConfig:
    """Requests of ``prepare_config`` to the starter, plus read-only facts about the run.

    Read-only facts: ``flow`` (one of root, suid, userns, fakeroot, hybrid), ``is_suid``
    (started through the setuid starter: suid and hybrid), ``invoker_uid``/``invoker_gid``
    (the real ids of the caller, U in every flow but root).

    The engine fills it in stage 1 through the setters; it crosses to the starter as JSON, where
    :meth:`validate` rejects invalid combinations before any namespace exists, with a message naming
    the setting.
    """

    def __init__(self, flow: str, invoker_uid: int, invoker_gid: int) -> None:
        if flow not in FLOWS:
            raise ConfigError(f"unknown flow {flow!r} (known: {', '.join(FLOWS)})")
        self._flow = flow
        self._invoker = (invoker_uid, invoker_gid)
        self._s = _State()

    # -- facts ----------------------------------------------------------------------------
    @property
    def flow(self) -> str:
        return self._flow

    @property
    def is_suid(self) -> bool:
        return self._flow in ("suid", "hybrid")

    @property
    def invoker_uid(self) -> int:
        return self._invoker[0]

    @property
    def invoker_gid(self) -> int:
        return self._invoker[1]

    # -- setters (upstream names in Python style) --------------------------------------------
    def set_target_uid(self, uid: int) -> None:
        """uid of stage 2 and the payload (ignored for a non-root caller, as upstream)."""
        _check_id(uid, "set_target_uid")
        self._s.target_uid = uid

    def set_target_gids(self, gids: Iterable[int]) -> None:
        """Primary gid first, then supplementary groups."""
        gids = list(gids)
        for g in gids:
            _check_id(g, "set_target_gids")
        self._s.target_gids = gids

    def set_capabilities(self, kind: str, names: Iterable[str]) -> None:
        """Capability set ``kind`` (effective, permitted, inheritable, bounding, ambient) of
        stage 2. A set never set is empty when stage 2 execs the payload, the bounding set
        included (SPEC §5)."""
        if kind not in CAPABILITY_SETS:
            raise ConfigError(
                f"set_capabilities: unknown capability set {kind!r} "
                f"(known: {', '.join(CAPABILITY_SETS)})"
            )
        self._s.capabilities[kind] = sorted(
            {normalize_capability(n, f"set_capabilities({kind})") for n in names},
            key=CAP_NUMBERS.__getitem__,
        )

    def set_no_new_privs(self, value: bool = True) -> None:
        self._s.no_new_privs = bool(value)

    def set_hybrid_workflow(self, value: bool = True) -> None:
        """Create the user namespace from the container side only (setuid + fakeroot)."""
        self._s.hybrid_workflow = bool(value)

    def set_allow_setgroups(self, value: bool = True) -> None:
        self._s.allow_setgroups = bool(value)

    def add_uid_mappings(self, mappings: Iterable[tuple[int, int, int]]) -> None:
        """(container id, host id, size) ranges of the user namespace's uid map."""
        self._s.uid_mappings.extend(_check_maps(mappings, "add_uid_mappings"))

    def add_gid_mappings(self, mappings: Iterable[tuple[int, int, int]]) -> None:
        self._s.gid_mappings.extend(_check_maps(mappings, "add_gid_mappings"))

    def set_ns_flags(self, kinds: Iterable[str]) -> None:
        """Namespaces to create: names among user, pid, net, uts, ipc, cgroup, mount."""
        kinds = list(kinds)
        for kind in kinds:
            if kind not in NAMESPACES:
                raise ConfigError(
                    f"set_ns_flags: unknown namespace {kind!r} (known: {', '.join(NAMESPACES)})"
                )
        self._s.ns_flags = [k for k in NAMESPACES if k in kinds]

    def set_ns_path(self, kind: str, path: str) -> None:
        """Join the namespace at ``path`` (e.g. ``/proc/PID/ns/net``); wins over creating."""
        if kind not in NAMESPACES:
            raise ConfigError(
                f"set_ns_path: unknown namespace {kind!r} (known: {', '.join(NAMESPACES)})"
            )
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError(f"set_ns_path({kind}): path must be absolute, got {path!r}")
        self._s.ns_paths[kind] = path

    def set_mount_propagation(self, propagation: str) -> None:
        """Propagation applied to ``/`` in a new mount namespace (default ``rprivate``)."""
        if propagation not in PROPAGATIONS:
            raise ConfigError(
                f"set_mount_propagation: unknown propagation {propagation!r} "
                f"(known: {', '.join(PROPAGATIONS)})"
            )
        self._s.mount_propagation = propagation

    def set_master_propagate_mount(self, value: bool = True) -> None:
        self._s.master_propagate_mount = bool(value)

    def set_namespace_join_only(self, value: bool = True) -> None:
        """Only join namespaces and start the process: no master hooks but start_process."""
        self._s.namespace_join_only = bool(value)

    def set_bring_loopback_interface(self, value: bool = True) -> None:
        """Bring ``lo`` up in a new network namespace (one joined is left as it is: it is
        not the run's)."""
        self._s.bring_loopback_interface = bool(value)

    def keep_file_descriptor(self, fd: int) -> None:
        """Keep ``fd`` open (inheritable) into stage 2 and the payload: one the run inherited,
        opened at the engine's import, or opened by ``prepare_config`` itself (stage 1 hands
        it to the starter under the same number)."""
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise ConfigError(f"keep_file_descriptor: invalid fd {fd!r}")
        if fd not in self._s.keep_fds:
            self._s.keep_fds.append(fd)

    # -- getters ----------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Read access to every requested value, e.g. cfg.ns_flags, cfg.target_uid.
        state = self.__dict__.get("_s")
        if state is not None and name in state.__dataclass_fields__:
            return getattr(state, name)
        raise AttributeError(name)

    def namespaces_created(self) -> list[str]:
        """Kinds created (requested and not joined by path)."""
        return [k for k in self._s.ns_flags if k not in self._s.ns_paths]

    def uses_namespace(self, kind: str) -> bool:
        return kind in self._s.ns_flags or kind in self._s.ns_paths

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"flow": self._flow, "invoker": list(self._invoker), "requests": asdict(self._s)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StarterConfig:
        obj = cls(data["flow"], *data["invoker"])
        obj._s = _State(**data["requests"])
        return obj

    # -- validation -------------------------------------------------------------------------
    def validate(self, kit_fds: dict[int, str] | None = None) -> None:
        """Reject invalid combinations (called by the starter before any namespace exists).
        ``kit_fds``: the starter's own descriptors (number -> what it is), which no payload
        may hold."""
        s = self._s
        caps = {k: set(v or ()) for k, v in s.capabilities.items()}
        if s.capabilities["effective"] is not None and not caps["effective"] <= caps["permitted"]:
            extra = sorted(caps["effective"] - caps["permitted"])
            raise ConfigError(
                "set_capabilities: effective capabilities must be a subset of "
                f"permitted; not permitted: {', '.join(extra)}"
            )
        if not caps["ambient"] <= (caps["permitted"] & caps["inheritable"]):
            extra = sorted(caps["ambient"] - (caps["permitted"] & caps["inheritable"]))
            raise ConfigError(
                "set_capabilities: ambient capabilities must be both permitted "
                f"and inheritable: {', '.join(extra)}"
            )
        if s.capabilities["bounding"] is not None:
            over = sorted((caps["permitted"] | caps["inheritable"]) - caps["bounding"])
            if over:
                raise ConfigError(
                    "set_capabilities: permitted/inheritable capabilities outside "
                    f"the bounding set: {', '.join(over)}"
                )
        wants_userns = self.uses_namespace("user")
        if self.is_suid and wants_userns and not s.hybrid_workflow:
            raise ConfigError(
                "set_ns_flags: a user namespace through the setuid starter "
                "needs set_hybrid_workflow (hybrid flow)"
            )
        if s.hybrid_workflow and not self.is_suid:
            raise ConfigError(
                "set_hybrid_workflow: the hybrid workflow needs the setuid "
                f"starter (flow {self._flow!r})"
            )
        if s.hybrid_workflow and "user" not in s.ns_flags:
            raise ConfigError(
                "set_hybrid_workflow: the hybrid workflow creates a user "
                "namespace; add 'user' to set_ns_flags"
            )
        if (s.uid_mappings or s.gid_mappings) and "user" not in self.namespaces_created():
            raise ConfigError(
                "add_uid_mappings/add_gid_mappings: mappings need a user "
                "namespace that the starter creates (set_ns_flags(['user', …]))"
            )
        if "user" in self.namespaces_created() and not s.uid_mappings:
            raise ConfigError("add_uid_mappings: a new user namespace needs a uid mapping")
        if "user" in self.namespaces_created() and not s.gid_mappings:
            raise ConfigError("add_gid_mappings: a new user namespace needs a gid mapping")
        for name, maps in (
            ("add_uid_mappings", s.uid_mappings),
            ("add_gid_mappings", s.gid_mappings),
        ):
            spans = sorted((c, c + n) for c, _, n in maps)
            if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
                raise ConfigError(f"{name}: container ranges overlap: {maps}")
        if s.hybrid_workflow:
            # The container process of the setuid starter becomes the ids U maps to (the
            # fakeroot map, 0→U): a map without U leaves it nothing to become.
            for name, maps, own, kind in (
                ("add_uid_mappings", s.uid_mappings, self.invoker_uid, "uid"),
                ("add_gid_mappings", s.gid_mappings, self.invoker_gid, "gid"),
            ):
                if maps and not any(h <= own < h + n for _, h, n in maps):
                    raise ConfigError(
                        f"{name}: the hybrid workflow maps the invoking user's {kind} "
                        f"{own} into the container (fakeroot: 0→{own}); {maps} does not"
                    )
        if s.namespace_join_only:
            created = self.namespaces_created()
            if created:
                raise ConfigError(
                    "set_namespace_join_only: a join-only run cannot create "
                    f"namespaces (set_ns_flags asks for {', '.join(created)})"
                )
            if not s.ns_paths:
                raise ConfigError("set_namespace_join_only: no namespace to join (use set_ns_path)")
        if s.bring_loopback_interface and not self.uses_namespace("net"):
            raise ConfigError(
                "set_bring_loopback_interface: needs a network namespace (set_ns_flags(['net', …]))"
            )
        for fd in s.keep_fds:
            if kit_fds and fd in kit_fds:
                raise ConfigError(
                    f"keep_file_descriptor: fd {fd} is the kit's {kit_fds[fd]}: the payload "
                    "may not hold it"
                )
            try:
                os.fstat(fd)
            except OSError:
                raise ConfigError(
                    f"keep_file_descriptor: fd {fd} is not open in the starter"
                ) from None


def _check_id(value: Any, setting: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32 - 1:
        raise ConfigError(f"{setting}: invalid id {value!r}")


def _check_maps(mappings: Iterable[tuple[int, int, int]], setting: str) -> list[list[int]]:
    out = []
    for m in mappings:
        try:
            inside, outside, size = (int(x) for x in m)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{setting}: mapping must be (container id, host id, size), got {m!r}"
            ) from None
        if inside < 0 or outside < 0 or size < 1:
            raise ConfigError(f"{setting}: invalid mapping {m!r}")
        out.append([inside, outside, size])
    return out
