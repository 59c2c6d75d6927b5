"""RPC methods of the reference engine: its privileged work, done by the RPC server."""

from __future__ import annotations

import errno
import os
import posixpath
import re

from kit import system
from kit.contract import Engine
from kit.system.linux import MOUNT_FLAGS

#: Flags a new mount may carry; bind, remount, move and propagation changes are refused.
MOUNT_OPTIONS = ("ro", "nosuid", "nodev", "noexec")
#: Filesystem types a new mount may have, each with the options its ``data`` may set.
ALLOWED_FSTYPES: dict[str, frozenset[str]] = {
    "proc": frozenset({"hidepid", "subset"}),
    "tmpfs": frozenset({"mode", "size", "nr_inodes"}),
    "sysfs": frozenset(),
    "mqueue": frozenset(),
}
HOSTNAME_MAX = 64
PATH_MAX = 4096
_HOSTNAME_RE = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_MOUNT_DATA_RE = re.compile(r"[A-Za-z0-9_]+(=[A-Za-z0-9_.%+-]*)?")


def hostname_error(name: object) -> str | None:
    """Why ``name`` is not a valid hostname (RFC 1123 labels, at most 64 bytes), or None."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "must not be empty"
    if len(name) > HOSTNAME_MAX:
        return f"is {len(name)} characters long, the kernel allows at most {HOSTNAME_MAX}"
    if not _HOSTNAME_RE.fullmatch(name):
        return (
            f"{name!r} is not a valid hostname (letters, digits and '-' in labels "
            "separated by '.'; no leading or trailing '-')"
        )
    return None


def path_error(path: object) -> str | None:
    """Why ``path`` is not an absolute, normalised path, or None."""
    if not isinstance(path, str):
        return f"must be a string, got {type(path).__name__}"
    if not path.startswith("/"):
        return f"must be an absolute path, got {path!r}"
    if "\0" in path:
        return f"contains a NUL byte: {path!r}"
    if len(path) >= PATH_MAX:
        return f"is longer than {PATH_MAX - 1} bytes"
    if ".." in path.split("/"):
        return f"must not contain '..' components: {path!r}"
    if posixpath.normpath(path) != path:
        return f"must be normalised (no '.', '//' or trailing '/'): {path!r}"
    return None


def check_path(path: object, what: str) -> str:
    """``path`` if absolute and normalised, else ``ValueError`` naming ``what``."""
    why = path_error(path)
    if why is not None:
        raise ValueError(f"{what}: {why}")
    return path  # type: ignore[return-value]


def check_flags(flags: object, allowed: tuple[str, ...], what: str) -> list[str]:
    """``flags`` if a list of mount flag names within ``allowed``; ValueError when malformed
    or unknown, PermissionError (EPERM) when known but not allowed."""
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise ValueError(f"{what}: flags must be a list of names")
    unknown = [f for f in flags if f not in MOUNT_FLAGS]
    if unknown:
        raise ValueError(f"{what}: unknown mount flags {unknown} (known: {', '.join(MOUNT_FLAGS)})")
    refused = [f for f in flags if f not in allowed]
    if refused:
        raise refuse(
            f"{what}: mount flags {refused} are not allowed (allowed: {', '.join(allowed)})"
        )
    return flags


def refuse(message: str) -> PermissionError:
    """The error for what policy refuses: PermissionError with errno EPERM."""
    return PermissionError(errno.EPERM, message)


class ReferenceRPC:
    """Served as ``reference.<method>`` by the RPC server, built there as
    ``ReferenceRPC(engine)`` after init_config.

    Where: the container's namespaces, sharing root and cwd with the container process
    (CLONE_FS). Privileges: root flow uid 0; suid e=U with only CAP_SYS_ADMIN effective;
    userns inside the user namespace; fakeroot its root; hybrid as suid, inside the user
    namespace. No host privilege outside root and suid. Arguments come from another process
    and are checked before anything is touched. Errors are typed (ValueError: malformed;
    PermissionError, EPERM: refused; OSError: errno set); the kit carries class, errno and
    message back to create_container.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Taken once: the fake backend and the rpc_mock fixture put their own in its place.
        self.system = system.current()

    def _need_namespace(self, kind: str, what: str) -> None:
        """Refuse work that would change the host's ``kind`` namespace: one the config did
        not ask for, or one still the host's (prepare_config recorded the host's inodes)."""
        cfg = self.engine.common.engine_config  # type: ignore[union-attr]
        if kind not in cfg.namespaces:
            raise refuse(
                f"{what}: the container has no {kind} namespace; refusing to change the host's"
            )
        host = cfg.host_namespaces
        if kind in host and self.system.ns_inode(kind) == host[kind]:
            raise refuse(
                f"{what}: the {kind} namespace is still the host's (the starter did "
                "not create the one prepare_config asked for); refusing to change "
                "the host's"
            )

    def _host_path(self, path: str, what: str) -> str:
        """Where container path ``path`` is for this process: the same path (the host's root)."""
        return check_path(path, what)

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        """Mount a new ``fstype`` file system (one of ALLOWED_FSTYPES, with its options in
        ``data``, flags from MOUNT_OPTIONS) on container path ``target``, in the container's
        mount namespace. ``source`` is None or the fstype's name."""
        what = "mount"
        check_flags(flags, MOUNT_OPTIONS, what)
        if data is not None and (not isinstance(data, str) or len(data) > 256 or "\0" in data):
            raise ValueError(f"{what}: data must be a short string, got {data!r}")
        self._need_namespace("mount", what)
        if fstype not in ALLOWED_FSTYPES:
            raise refuse(
                f"{what}: filesystem type {fstype!r} is not allowed "
                f"(allowed: {', '.join(ALLOWED_FSTYPES)})"
            )
        if source not in (None, fstype):
            raise ValueError(
                f"{what}: the source of a {fstype} mount must be null or {fstype!r}, got {source!r}"
            )
        for option in data.split(",") if data else ():
            if (
                not _MOUNT_DATA_RE.fullmatch(option)
                or option.split("=")[0] not in ALLOWED_FSTYPES[fstype]
            ):
                raise ValueError(
                    f"{what}: {fstype} option {option!r} is not allowed "
                    f"(allowed: {', '.join(sorted(ALLOWED_FSTYPES[fstype]))})"
                )
        if fstype == "proc":
            self._need_namespace("pid", f"{what} proc")
        full = self._host_path(target, f"{what} target")
        if target == "/":
            raise refuse(f"{what}: refusing to mount over the container root")
        if not os.path.isdir(full):
            raise FileNotFoundError(errno.ENOENT, f"{what}: target {target!r} is not a directory")
        self.system.mount(fstype, full, fstype, flags, data)

    def sethostname(self, name: str) -> None:
        """Set the container's hostname, in its own uts namespace only."""
        why = hostname_error(name)
        if why is not None:
            raise ValueError(f"sethostname: {why}")
        self._need_namespace("uts", "sethostname")
        self.system.sethostname(name)
