"""RPC methods of the reference engine: the privileged work, done in the RPC server.

The RPC server runs in the container's namespaces (SPEC §4): root in the root flow; e=U with
only CAP_SYS_ADMIN effective in suid; namespace root without host privilege in the user
namespace flows. It shares its root directory and cwd with the container process (CLONE_FS),
so a ``pivot_root`` here is the container's new root.

Every argument comes from another process and is checked before anything is touched:

- container paths are strings, absolute, normalised (no ``.``/``..`` component, no ``//``),
  without NUL, and resolved *inside* the container root; no component of an existing path may
  be a symbolic link (a link made in the new root could otherwise point the next mount at the
  host);
- mount flags come from a fixed list, filesystem types and their options from another, bind
  sources from a short allow-list of host paths;
- files and directories are only ever created inside the tmpfs root made by
  :meth:`ReferenceRPC.make_root`: with ``rootfs: "host"`` nothing is created on the host.

Bad input raises ``ValueError`` (malformed), ``PermissionError`` (refused by policy, errno
EPERM), ``FileNotFoundError``/``FileExistsError``/``NotADirectoryError`` (errno set); the kit
sends the class, errno and message back to ``create_container``.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat
import tempfile

from kit import system
from kit.contract import Engine
from kit.linux import MOUNT_FLAGS

#: Mount flags a caller may pass (all known to :data:`kit.linux.MOUNT_FLAGS`); the others
#: (move, shared, slave, private, unbindable) change propagation or move mounts: refused.
ALLOWED_MOUNT_FLAGS = ("ro", "nosuid", "nodev", "noexec", "bind", "rec", "remount")
#: Filesystem types a new mount may have, with the options its ``data`` may set.
ALLOWED_FSTYPES: dict[str, frozenset[str]] = {
    "proc": frozenset({"hidepid", "subset"}),
    "tmpfs": frozenset({"mode", "size", "nr_inodes"}),
    "sysfs": frozenset(),
    "mqueue": frozenset(),
}
#: Host paths that may be bind-mounted into the container (exactly these, never below).
HOST_BIND_DIRS = ("/bin", "/sbin", "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
HOST_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
                "/dev/tty")
HOST_BIND_SOURCES = HOST_BIND_DIRS + HOST_DEVICES
#: Name prefix of the directory the master makes for ``rootfs: "bind"``.
ROOT_PREFIX = "reference-root-"
#: Options of the tmpfs that becomes the container root (read-only once built).
ROOT_TMPFS_DATA = "mode=0755,size=1m,nr_inodes=1024"
HOSTNAME_MAX = 64
PATH_MAX = 4096
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_MOUNT_DATA_RE = re.compile(r"[A-Za-z0-9_]+(=[A-Za-z0-9_.%+-]*)?")


# --- argument checks (pure functions: also used by prepare_config and the tests) ----------

def hostname_error(name: object) -> str | None:
    """Why ``name`` is not a valid hostname (RFC 1123 labels, at most 64 bytes), or None."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "must not be empty"
    if len(name) > HOSTNAME_MAX:
        return f"is {len(name)} characters long, the kernel allows at most {HOSTNAME_MAX}"
    if not _HOSTNAME_RE.fullmatch(name):
        return (f"{name!r} is not a valid hostname (letters, digits and '-' in labels "
                "separated by '.'; no leading or trailing '-')")
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


def _refuse(message: str) -> PermissionError:
    return PermissionError(errno.EPERM, message)


class ReferenceRPC:
    """Served as ``reference.<method>``; instantiated in the RPC server as
    ``ReferenceRPC(engine)`` (the engine's ``init_config`` already ran there).

    State kept between calls of one run: :attr:`root`, the container root on the host side
    (None: ``rootfs: "host"``, paths resolve against ``/``), and :attr:`pivoted`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.system = system.current()
        self.root: str | None = None
        self.pivoted = False

    # -- helpers (private: never served) ----------------------------------------------------
    def _namespaces(self) -> list[str]:
        common = self.engine.common
        return list(getattr(common.engine_config, "namespaces", ())) if common else []

    def _need_namespace(self, kind: str, what: str) -> None:
        """Refuse work that would hit the host because the run has no ``kind`` namespace:
        not asked for, or asked for and still the host's (a starter that did not create it;
        prepare_config recorded the host's namespaces)."""
        if kind not in self._namespaces():
            raise _refuse(f"{what}: the container has no {kind} namespace; refusing to "
                          "change the host's")
        common = self.engine.common
        host = getattr(common.engine_config, "host_namespaces", None) if common else None
        if host and kind in host and self.system.ns_inode(kind) == host[kind]:
            raise _refuse(f"{what}: the {kind} namespace is still the host's (the starter did "
                          "not create the one prepare_config asked for); refusing to change "
                          "the host's")

    def _need_root(self, what: str) -> str:
        if self.root is None:
            raise _refuse(f"{what}: no container root was made (rootfs 'host'); refusing "
                          "to create files on the host")
        return self.root

    def _resolve(self, path: str, what: str) -> str:
        """The host-side path of container path ``path``: inside the root, no symlink on
        the way (the last component may not exist yet)."""
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
                raise _refuse(f"{what}: {path!r} goes through the symbolic link "
                              f"{step[len(root.rstrip('/')):]!r}; links are not followed")
        return os.path.join(root, *parts)

    @staticmethod
    def _absent(full: str, path: str, what: str) -> None:
        if os.path.lexists(full):
            raise FileExistsError(errno.EEXIST, f"{what}: {path!r} already exists")

    @staticmethod
    def _parent_dir(full: str, path: str, what: str) -> None:
        parent = os.path.dirname(full)
        if not os.path.isdir(parent):
            raise FileNotFoundError(errno.ENOENT, f"{what}: the parent directory of {path!r} "
                                    "does not exist")

    # -- the container root -------------------------------------------------------------------
    def make_root(self, path: str) -> None:
        """Mount a fresh tmpfs on ``path`` and make it the container root.

        ``path`` is the empty directory the master made with ``tempfile.mkdtemp`` (prefix
        :data:`ROOT_PREFIX`) directly in the run's temporary directory, owned by this
        process's effective uid. The tmpfs lives in the container's mount namespace only:
        the host sees an empty directory, which ``cleanup_container`` removes.
        """
        what = "make_root"
        check_path(path, what)
        self._need_namespace("mount", what)
        if self.root is not None:
            raise FileExistsError(errno.EEXIST, f"{what}: the container root {self.root!r} "
                                  "is already made")
        base = tempfile.gettempdir()
        if (os.path.dirname(path) != base
                or not os.path.basename(path).startswith(ROOT_PREFIX)):
            raise _refuse(f"{what}: {path!r} is not a {ROOT_PREFIX}* directory directly in "
                          f"the run's temporary directory {base!r}")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{what}: {path!r} does not exist") from None
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, f"{what}: {path!r} is not a directory")
        if st.st_uid != os.geteuid():
            raise _refuse(f"{what}: {path!r} belongs to uid {st.st_uid}, not to the caller "
                          f"({os.geteuid()})")
        if os.listdir(path):
            raise OSError(errno.ENOTEMPTY, f"{what}: {path!r} is not empty")
        if st.st_dev != os.lstat(base).st_dev:
            raise OSError(errno.EBUSY, f"{what}: {path!r} is already a mount point")
        self.system.mount("tmpfs", path, "tmpfs", ["nosuid", "nodev"], ROOT_TMPFS_DATA)
        self.root = path

    def mkdir(self, path: str, mode: int) -> None:
        """Create directory ``path`` (container path) in the container root."""
        what = "mkdir"
        if isinstance(mode, bool) or not 0 <= mode <= 0o1777:
            raise ValueError(f"{what}: mode must be within 0o0..0o1777 (no setuid/setgid "
                             f"bits), got {mode!r}")
        self._need_root(what)
        full = self._resolve(path, what)
        self._absent(full, path, what)
        self._parent_dir(full, path, what)
        self.system.mkdir(full, mode)

    def create_file(self, path: str, mode: int) -> None:
        """Create an empty regular file ``path`` in the container root (the target of a
        device bind mount)."""
        what = "create_file"
        if isinstance(mode, bool) or not 0 <= mode <= 0o666:
            raise ValueError(f"{what}: mode must be within 0o0..0o666, got {mode!r}")
        self._need_root(what)
        full = self._resolve(path, what)
        self._absent(full, path, what)
        self._parent_dir(full, path, what)
        # Not privileged (a file in the tmpfs this process mounted and owns); the system
        # interface has no call for it.
        os.close(os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, mode))

    def symlink(self, target: str, path: str) -> None:
        """Create symbolic link ``path`` -> ``target`` in the container root (``target`` is
        read inside the container only, after ``pivot_root``)."""
        what = "symlink"
        if not isinstance(target, str) or not target or "\0" in target \
                or len(target) >= PATH_MAX:
            raise ValueError(f"{what}: invalid link target {target!r}")
        if ".." in target.split("/"):
            raise ValueError(f"{what}: link target must not contain '..' components: "
                             f"{target!r}")
        self._need_root(what)
        full = self._resolve(path, what)
        self._absent(full, path, what)
        self._parent_dir(full, path, what)
        os.symlink(target, full)  # unprivileged, inside our own tmpfs (see create_file)

    # -- mounts -------------------------------------------------------------------------------
    def mount(self, source: str | None, target: str, fstype: str | None, flags: list[str],
              data: str | None) -> None:
        """mount(2) in the container's mount namespace, on container path ``target``.

        Three shapes:

        - a new filesystem: ``fstype`` from :data:`ALLOWED_FSTYPES`, ``source`` None or the
          fstype's name, ``data`` a comma-separated list of that fstype's options;
        - a bind mount: ``"bind"`` in ``flags``, ``source`` one of
          :data:`HOST_BIND_SOURCES` (a directory or character device, not a symlink), only
          before ``pivot_root``; with ``ro``/``nosuid``/``nodev``/``noexec`` this method
          does the bind and then the remount that applies them (mount(2) ignores them on
          the bind itself), keeping the flags the kernel locked on the source mount;
        - a remount of an existing mount: ``["bind", "remount", …]``, ``source`` None.
        """
        what = "mount"
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise ValueError(f"{what}: flags must be a list of names")
        unknown = [f for f in flags if f not in MOUNT_FLAGS]
        if unknown:
            raise ValueError(f"{what}: unknown mount flags {unknown} "
                             f"(known: {', '.join(MOUNT_FLAGS)})")
        refused = [f for f in flags if f not in ALLOWED_MOUNT_FLAGS]
        if refused:
            raise _refuse(f"{what}: mount flags {refused} are not allowed "
                          f"(allowed: {', '.join(ALLOWED_MOUNT_FLAGS)})")
        if data is not None and (not isinstance(data, str) or len(data) > 256
                                 or "\0" in data):
            raise ValueError(f"{what}: data must be a short string, got {data!r}")
        self._need_namespace("mount", what)
        full = self._resolve(target, f"{what} target")
        remount = "remount" in flags
        if "bind" in flags:
            if fstype is not None or data is not None:
                raise ValueError(f"{what}: a bind mount or remount takes no fstype or data")
            if remount:
                if source is not None:
                    raise ValueError(f"{what}: a remount takes no source")
                if not os.path.ismount(full):
                    raise ValueError(f"{what}: {target!r} is not a mount point")
                self.system.mount(None, full, None, self._with_locked(full, flags))
                return
            self._bind(source, target, full, flags)
            return
        if remount:
            raise ValueError(f"{what}: only bind mounts can be remounted here "
                             "(flags ['bind', 'remount', …])")
        if "rec" in flags:
            raise ValueError(f"{what}: 'rec' applies to bind mounts only")
        if fstype not in ALLOWED_FSTYPES:
            raise _refuse(f"{what}: filesystem type {fstype!r} is not allowed "
                          f"(allowed: {', '.join(ALLOWED_FSTYPES)})")
        if source not in (None, fstype):
            raise ValueError(f"{what}: the source of a {fstype} mount must be null or "
                             f"{fstype!r}, got {source!r}")
        for option in (data.split(",") if data else ()):
            if not _MOUNT_DATA_RE.fullmatch(option) \
                    or option.split("=")[0] not in ALLOWED_FSTYPES[fstype]:
                raise ValueError(f"{what}: {fstype} option {option!r} is not allowed "
                                 f"(allowed: {', '.join(sorted(ALLOWED_FSTYPES[fstype]))})")
        if fstype == "proc":
            self._need_namespace("pid", f"{what} proc")
        if full == (self.root or "/"):
            raise _refuse(f"{what}: refusing to mount over the container root")
        if not os.path.isdir(full):
            raise FileNotFoundError(errno.ENOENT, f"{what}: target {target!r} is not a "
                                    "directory")
        self.system.mount(source or fstype, full, fstype, flags, data)

    def _bind(self, source: str | None, target: str, full: str, flags: list[str]) -> None:
        what = "mount"
        if source not in HOST_BIND_SOURCES:
            raise _refuse(f"{what}: bind source {source!r} is not allowed "
                          f"(allowed: {', '.join(HOST_BIND_SOURCES)})")
        if self.pivoted:
            raise _refuse(f"{what}: the host's {source} is out of reach after pivot_root")
        try:
            src = os.lstat(source)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"{what}: bind source {source!r} does not "
                                    "exist on this host") from None
        if stat.S_ISLNK(src.st_mode):
            raise _refuse(f"{what}: bind source {source!r} is a symbolic link; recreate it "
                          "with symlink instead")
        if source in HOST_DEVICES and not stat.S_ISCHR(src.st_mode):
            raise _refuse(f"{what}: bind source {source!r} is not a character device")
        if not os.path.lexists(full):
            raise FileNotFoundError(errno.ENOENT, f"{what}: target {target!r} does not exist")
        if stat.S_ISDIR(src.st_mode) != os.path.isdir(full):
            kind = "a directory" if stat.S_ISDIR(src.st_mode) else "a file"
            raise ValueError(f"{what}: target {target!r} must be {kind} like {source!r}")
        if self.root is not None and full == self.root:
            raise _refuse(f"{what}: refusing to mount over the container root")
        self.system.mount(source, full, None, [f for f in ("bind", "rec") if f in flags])
        extra = [f for f in ("ro", "nosuid", "nodev", "noexec") if f in flags]
        if extra:
            self.system.mount(None, full, None,
                              self._with_locked(full, ["bind", "remount", *extra]))

    @staticmethod
    def _with_locked(full: str, flags: list[str]) -> list[str]:
        """``flags`` plus the per-mount flags ``full`` already has: a remount in a user
        namespace must keep the flags locked on the source (EPERM otherwise)."""
        have = os.statvfs(full).f_flag
        kept = [name for bit, name in ((os.ST_NOSUID, "nosuid"), (os.ST_NODEV, "nodev"),
                                       (os.ST_NOEXEC, "noexec"), (os.ST_RDONLY, "ro"))
                if have & bit and name not in flags]
        return [*flags, *kept]

    def pivot_root(self, new_root: str) -> None:
        """Make the container root (``new_root``, as given to :meth:`make_root`) the root of
        the RPC server and therefore of the container process (CLONE_FS); the host's root is
        detached from the container's mount namespace."""
        what = "pivot_root"
        check_path(new_root, what)
        self._need_namespace("mount", what)
        if self.pivoted:
            raise _refuse(f"{what}: already done")
        if self.root is None or new_root != self.root:
            raise _refuse(f"{what}: {new_root!r} is not the container root made by make_root "
                          f"({self.root!r})")
        # pivot_root(".", ".") stacks the old root on the new one; detaching it leaves the
        # new root alone (no put_old directory needed inside the read-only root).
        self.system.chdir(new_root)
        self.system.pivot_root(".", ".")
        self.system.umount(".", detach=True)
        self.system.chdir("/")
        self.root = "/"
        self.pivoted = True

    # -- other namespaces -------------------------------------------------------------------
    def sethostname(self, name: str) -> None:
        """Set the container's hostname (in its own uts namespace only)."""
        why = hostname_error(name)
        if why is not None:
            raise ValueError(f"sethostname: {why}")
        self._need_namespace("uts", "sethostname")
        self.system.sethostname(name)
