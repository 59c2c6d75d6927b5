"""RPC methods of the bind-rootfs example: build a container root, then pivot into it."""

from __future__ import annotations

import errno
import os
import stat
import tempfile

from kit.contract import Engine
from reference_engines.minimal.rpc import (
    MOUNT_OPTIONS,
    PATH_MAX,
    ReferenceRPC,
    check_flags,
    check_path,
    refuse,
)

#: Host directories that may be bind-mounted into the container (exactly these).
HOST_BIND_DIRS = ("/bin", "/sbin", "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
HOST_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")
HOST_BIND_SOURCES = HOST_BIND_DIRS + HOST_DEVICES
#: A new mount's flags, plus those of a bind mount and of a bind remount.
BIND_FLAGS = (*MOUNT_OPTIONS, "bind", "rec", "remount")
#: Name prefix of the directory the master makes for the container root.
ROOT_PREFIX = "reference-root-"
#: The tmpfs that becomes the container root (read-only once built).
ROOT_TMPFS_DATA = "mode=0755,size=1m,nr_inodes=1024"


class BindRootfsRPC(ReferenceRPC):
    """Served as ``reference-bind.<method>``; where and with which privileges: as
    :class:`ReferenceRPC`. With CAP_SYS_ADMIN alone (suid) it can populate the root because
    it mounted that tmpfs itself and owns it.

    Container paths resolve inside :attr:`root` (None until make_root) and may not pass
    through a symbolic link: a link made in the new root could aim the next call at the
    host. Nothing is created on the host, and no host path is bound after pivot_root.
    """

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.root: str | None = None  # the container root, as this process sees it
        self.pivoted = False

    def _host_path(self, path: str, what: str) -> str:
        check_path(path, what)
        root = self.root or "/"
        parts = path.split("/")[1:] if path != "/" else []
        step = root
        for part in parts:
            step = os.path.join(step, part)
            try:
                st = os.lstat(step)
            except FileNotFoundError:
                break  # neither this component nor the next ones exist yet
            if stat.S_ISLNK(st.st_mode):
                raise refuse(
                    f"{what}: {path!r} goes through the symbolic link "
                    f"{step[len(root.rstrip('/')) :]!r}; links are not followed"
                )
        return os.path.join(root, *parts)

    def _need_root(self, what: str) -> str:
        if self.root is None:
            raise refuse(
                f"{what}: no container root was made; refusing to create files on the host"
            )
        return self.root

    def _new_entry(self, path: str, what: str) -> str:
        """Where to create ``path`` inside the root: absent, its parent a directory."""
        self._need_root(what)
        full = self._host_path(path, what)
        if os.path.lexists(full):
            raise FileExistsError(errno.EEXIST, f"{what}: {path!r} already exists")
        if not os.path.isdir(os.path.dirname(full)):
            raise FileNotFoundError(
                errno.ENOENT, f"{what}: the parent directory of {path!r} does not exist"
            )
        return full

    def make_root(self, path: str) -> None:
        """Mount a tmpfs on ``path`` and make it the container root. ``path`` is the empty
        directory the master made (prefix ROOT_PREFIX, directly in the run's temporary
        directory, owned by this process's euid); the host only ever sees it empty."""
        what = "make_root"
        check_path(path, what)
        self._need_namespace("mount", what)
        if self.root is not None:
            raise FileExistsError(
                errno.EEXIST, f"{what}: the container root {self.root!r} is already made"
            )
        base = tempfile.gettempdir()
        if os.path.dirname(path) != base or not os.path.basename(path).startswith(ROOT_PREFIX):
            raise refuse(
                f"{what}: {path!r} is not a {ROOT_PREFIX}* directory directly in "
                f"the run's temporary directory {base!r}"
            )
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{what}: {path!r} does not exist") from None
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, f"{what}: {path!r} is not a directory")
        if st.st_uid != os.geteuid():
            raise refuse(
                f"{what}: {path!r} belongs to uid {st.st_uid}, not to the caller ({os.geteuid()})"
            )
        if os.listdir(path):
            raise OSError(errno.ENOTEMPTY, f"{what}: {path!r} is not empty")
        if st.st_dev != os.lstat(base).st_dev:
            raise OSError(errno.EBUSY, f"{what}: {path!r} is already a mount point")
        self.system.mount("tmpfs", path, "tmpfs", ["nosuid", "nodev"], ROOT_TMPFS_DATA)
        self.root = path

    def mkdir(self, path: str, mode: int) -> None:
        """Create directory ``path`` in the container root."""
        if isinstance(mode, bool) or not 0 <= mode <= 0o1777:
            raise ValueError(
                f"mkdir: mode must be within 0o0..0o1777 (no setuid/setgid bits), got {mode!r}"
            )
        self.system.mkdir(self._new_entry(path, "mkdir"), mode)

    def create_file(self, path: str, mode: int) -> None:
        """Create an empty file ``path`` in the container root (a device's mount point)."""
        if isinstance(mode, bool) or not 0 <= mode <= 0o666:
            raise ValueError(f"create_file: mode must be within 0o0..0o666, got {mode!r}")
        full = self._new_entry(path, "create_file")
        # Unprivileged: a file in the tmpfs this process mounted and owns.
        os.close(
            os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        )

    def symlink(self, target: str, path: str) -> None:
        """Create link ``path`` -> ``target`` in the container root; ``target`` is only
        followed inside the container, after pivot_root."""
        if not isinstance(target, str) or not target or "\0" in target or len(target) >= PATH_MAX:
            raise ValueError(f"symlink: invalid link target {target!r}")
        if ".." in target.split("/"):
            raise ValueError(f"symlink: link target must not contain '..' components: {target!r}")
        os.symlink(target, self._new_entry(path, "symlink"))  # unprivileged, as create_file

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        """As :meth:`ReferenceRPC.mount`, and two more shapes: a bind mount (``"bind"`` in
        ``flags``, ``source`` from HOST_BIND_SOURCES, only before pivot_root; ro, nosuid,
        nodev, noexec are applied by a remount right after) and a remount of an existing
        mount (``["bind", "remount", …]``, ``source`` None)."""
        what = "mount"
        check_flags(flags, BIND_FLAGS, what)
        if "bind" not in flags:
            if "remount" in flags:
                raise ValueError(
                    f"{what}: only bind mounts can be remounted here (flags ['bind', 'remount', …])"
                )
            if "rec" in flags:
                raise ValueError(f"{what}: 'rec' applies to bind mounts only")
            super().mount(source, target, fstype, flags, data)
            return
        if fstype is not None or data is not None:
            raise ValueError(f"{what}: a bind mount or remount takes no fstype or data")
        self._need_namespace("mount", what)
        full = self._host_path(target, f"{what} target")
        if "remount" in flags:
            if source is not None:
                raise ValueError(f"{what}: a remount takes no source")
            if not os.path.ismount(full):
                raise ValueError(f"{what}: {target!r} is not a mount point")
            self.system.mount(None, full, None, self._with_locked(full, flags))
            return
        if source not in HOST_BIND_SOURCES:
            raise refuse(
                f"{what}: bind source {source!r} is not allowed "
                f"(allowed: {', '.join(HOST_BIND_SOURCES)})"
            )
        if self.pivoted:
            raise refuse(f"{what}: the host's {source} is out of reach after pivot_root")
        try:
            src = os.lstat(source)
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, f"{what}: bind source {source!r} does not exist on this host"
            ) from None
        if stat.S_ISLNK(src.st_mode):
            raise refuse(
                f"{what}: bind source {source!r} is a symbolic link; recreate it "
                "with symlink instead"
            )
        if source in HOST_DEVICES and not stat.S_ISCHR(src.st_mode):
            raise refuse(f"{what}: bind source {source!r} is not a character device")
        if not os.path.lexists(full):
            raise FileNotFoundError(errno.ENOENT, f"{what}: target {target!r} does not exist")
        if stat.S_ISDIR(src.st_mode) != os.path.isdir(full):
            kind = "a directory" if stat.S_ISDIR(src.st_mode) else "a file"
            raise ValueError(f"{what}: target {target!r} must be {kind} like {source!r}")
        if target == "/":
            raise refuse(f"{what}: refusing to mount over the container root")
        # mount(2) ignores ro, nosuid… on the bind itself: a remount applies them.
        self.system.mount(source, full, None, [f for f in ("bind", "rec") if f in flags])
        if extra := [f for f in MOUNT_OPTIONS if f in flags]:
            self.system.mount(
                None, full, None, self._with_locked(full, ["bind", "remount", *extra])
            )

    @staticmethod
    def _with_locked(full: str, flags: list[str]) -> list[str]:
        """``flags`` plus the per-mount flags ``full`` has: a remount in a user namespace
        must keep the flags locked on the source (EPERM otherwise)."""
        have = os.statvfs(full).f_flag
        kept = [
            name
            for bit, name in (
                (os.ST_NOSUID, "nosuid"),
                (os.ST_NODEV, "nodev"),
                (os.ST_NOEXEC, "noexec"),
                (os.ST_RDONLY, "ro"),
            )
            if have & bit and name not in flags
        ]
        return [*flags, *kept]

    def pivot_root(self, new_root: str) -> None:
        """Make the root made by make_root the root of this process and so of the container
        process (CLONE_FS); the host's root is detached from the container's namespace."""
        what = "pivot_root"
        check_path(new_root, what)
        self._need_namespace("mount", what)
        if self.pivoted:
            raise refuse(f"{what}: already done")
        if self.root is None or new_root != self.root:
            raise refuse(
                f"{what}: {new_root!r} is not the container root made by make_root ({self.root!r})"
            )
        # pivot_root(".", ".") stacks the old root on the new one; detaching it leaves the
        # new root alone, with no put_old directory needed in the read-only root.
        self.system.chdir(new_root)
        self.system.pivot_root(".", ".")
        self.system.umount(".", detach=True)
        self.system.chdir("/")
        self.root = "/"
        self.pivoted = True
