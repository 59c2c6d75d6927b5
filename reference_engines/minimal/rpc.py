"""RPC methods of the reference engine: the privileged work, done in the RPC server.

The RPC server runs in the container's namespaces with the privileges of SPEC §4. Every
argument comes from another process and is checked before use: paths are absolute, stay
inside the container root (no ``..``), flags and filesystem types come from fixed lists.
"""

from __future__ import annotations

import errno
import os

from kit import system
from kit.contract import Engine
from kit.linux import MOUNT_FLAGS

#: Filesystem types create_container may ask for.
ALLOWED_FSTYPES = {"proc", "tmpfs", "sysfs", "devpts", "mqueue"}
HOSTNAME_MAX = 64


def checked_path(path: str, root: str = "/") -> str:
    """``path`` if it is absolute, normalised and inside ``root``; else ValueError."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"path must be absolute: {path!r}")
    if "\0" in path:
        raise ValueError(f"path contains a NUL byte: {path!r}")
    parts = path.split("/")
    if ".." in parts or "." in parts[1:]:
        raise ValueError(f"path must not contain '.' or '..' components: {path!r}")
    full = os.path.normpath(os.path.join(root, path.lstrip("/")))
    if full != root.rstrip("/") and not full.startswith(root.rstrip("/") + "/") and root != "/":
        raise ValueError(f"path escapes the container root {root!r}: {path!r}")
    return full


class ReferenceRPC:
    """Served as ``reference.<method>``; instantiated in the RPC server with the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.system = system.current()

    def sethostname(self, name: str) -> None:
        """Set the container's hostname (its own uts namespace)."""
        if not 0 < len(name) <= HOSTNAME_MAX or any(c.isspace() or c == "\0" for c in name):
            raise ValueError(f"invalid hostname {name!r}")
        self.system.sethostname(name)

    def mount(self, source: str | None, target: str, fstype: str | None, flags: list[str],
              data: str | None) -> None:
        """mount(2) inside the container's mount namespace."""
        target = checked_path(target)
        unknown = [f for f in flags if f not in MOUNT_FLAGS]
        if unknown:
            raise ValueError(f"unknown mount flags {unknown} (known: {', '.join(MOUNT_FLAGS)})")
        if "bind" in flags:
            if source is None:
                raise ValueError("a bind mount needs a source path")
            source = checked_path(source)
        elif fstype not in ALLOWED_FSTYPES:
            raise ValueError(f"filesystem type {fstype!r} not allowed "
                             f"(allowed: {', '.join(sorted(ALLOWED_FSTYPES))})")
        if not os.path.isdir(target):
            raise FileNotFoundError(errno.ENOENT, f"mount target {target} is not a directory")
        self.system.mount(source, target, fstype, flags, data)

    def mkdir(self, path: str, mode: int) -> None:
        """Create a directory inside the container root."""
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"invalid mode {mode:o}")
        self.system.mkdir(checked_path(path), mode)
