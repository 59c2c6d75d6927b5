"""RunRequest: everything one lifecycle run needs, as JSON (launcher → supervisor)."""

from __future__ import annotations

import os
import pwd
from dataclasses import asdict, dataclass, field
from typing import Any

from kit.ledger.probe import host_userns
from kit.run.sandbox import check_join_kinds, default_on
from kit.starter.config import FLOWS
from kit.starter.inject import validate as validate_injection

DEFAULT_HOOK_TIMEOUT = 5.0
DEFAULT_RUN_TIMEOUT = 60.0
TEST_USER_ENV = "KIT_TEST_USER"
DEFAULT_TEST_USERS = ("kit-test", "nobody")


@dataclass
class Invoker:
    """The unprivileged user U who invokes the non-root flows."""

    uid: int
    gid: int
    groups: list[int]
    name: str = ""

    @classmethod
    def resolve(cls, user: str | int | None = None) -> Invoker:
        """U from ``user`` (name or uid), else ``$KIT_TEST_USER``, else the first of
        ``kit-test``/``nobody`` that exists; a non-root caller is always U itself."""
        if os.getuid() != 0:
            entry = _pw(os.getuid())
            return cls(
                os.getuid(),
                os.getgid(),
                sorted(set(os.getgroups()) - {os.getgid()}),
                entry.pw_name if entry else str(os.getuid()),
            )
        candidates = (
            [user]
            if user is not None
            else (
                [os.environ[TEST_USER_ENV]]
                if os.environ.get(TEST_USER_ENV)
                else list(DEFAULT_TEST_USERS)
            )
        )
        for cand in candidates:
            entry = _pw(cand)
            if entry is not None:
                if entry.pw_uid == 0:
                    raise ValueError(
                        f"invoking user {cand!r} is root; the non-root flows "
                        "need an unprivileged user"
                    )
                groups = sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid)) - {entry.pw_gid})
                return cls(entry.pw_uid, entry.pw_gid, groups, entry.pw_name)
        raise ValueError(
            f"no such user: {', '.join(map(str, candidates))} "
            f"(set {TEST_USER_ENV} or create one with ci/setup)"
        )


def _pw(user: str | int) -> pwd.struct_passwd | None:
    try:
        if isinstance(user, int) or str(user).isdigit():
            return pwd.getpwuid(int(user))
        return pwd.getpwnam(str(user))
    except KeyError:
        if isinstance(user, int) or str(user).isdigit():
            return pwd.struct_passwd((str(user), "x", int(user), int(user), "", "/", ""))
        return None


@dataclass
class RunRequest:
    """One lifecycle: which engine, which flow, which payload and limits."""

    engine: str
    flow: str
    argv: list[str]
    engine_config: dict[str, Any] = field(default_factory=dict)
    invoker: dict[str, Any] | None = None
    backend: str = "real"
    container_id: str = "kit-run"
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT
    run_timeout: float = DEFAULT_RUN_TIMEOUT
    probes: bool = True
    sys_path: list[str] = field(default_factory=list)
    #: (device, inode) of the host user namespace (SPEC §4): the launcher's, recorded where
    #: the run is requested and carried to every process of the run.
    host_userns: list[int] | None = None
    #: Run inside the kit's host sandbox (:mod:`kit.run.sandbox`). None: yes when launched as
    #: root, in either backend, unless ``KIT_SANDBOX=0`` (non-root launches are not
    #: sandboxed).
    sandbox: bool | None = None
    #: Host directories the run may write when sandboxed (bound in read-write); the run's
    #: temporary directory and the coverage directory always are.
    shared_dirs: list[str] = field(default_factory=list)
    #: Namespaces made for the run to join (kind -> path as the launcher sees it; uts, ipc,
    #: net): in the host sandbox the run finds them at ``kit.run.sandbox.join_path`` (nothing
    #: else of the host's namespaces is reachable from there); unsandboxed, at the path.
    join_namespaces: dict[str, str] = field(default_factory=dict)
    #: A fault the kit injects into its own processes around the engine's hooks (a key of
    #: :data:`kit.starter.inject.INJECTIONS`), to exercise the starter's error paths without the
    #: engine's cooperation; the ledger records it as a ``kit_injected`` event.
    inject: str | None = None

    def __post_init__(self) -> None:
        validate_injection(self.inject)
        if self.host_userns is None:
            self.host_userns = list(host_userns())
        if self.flow not in FLOWS:
            raise ValueError(f"unknown flow {self.flow!r} (known: {', '.join(FLOWS)})")
        if self.backend == "auto":  # resolved here, once, where the run is requested
            # kit.run.environment imports this module (Invoker): imported here, not at the top.
            from kit.run.environment import backend_for  # noqa: PLC0415  (import cycle)

            self.backend = backend_for(self.flow)[0]
        if self.backend not in ("real", "fake"):
            raise ValueError(f"unknown backend {self.backend!r} (known: real, fake, auto)")
        if self.hook_timeout <= 0 or self.run_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.sandbox is None:  # resolved where the run is requested, like the backend
            self.sandbox = default_on()
        if self.join_namespaces:
            check_join_kinds(self.join_namespaces)

    def user(self) -> Invoker:
        if self.invoker is None:
            raise ValueError("RunRequest.invoker is not set")
        return Invoker(**self.invoker)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRequest:
        return cls(**data)
