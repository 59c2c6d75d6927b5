"""The bind-rootfs example: the reference engine with a container root of its own."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile

from kit.contract import ConfigError, Context, WaitStatus
from kit.rpc import RPCClient
from kit.starter.config import StarterConfig
from reference_engines.bind_rootfs.rpc import HOST_BIND_DIRS, ROOT_PREFIX
from reference_engines.minimal.engine import ReferenceConfig, ReferenceEngine

#: Device nodes bound from the host into the container's minimal /dev.
BIND_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
DEV_LINKS = {
    "/dev/fd": "/proc/self/fd",
    "/dev/stdin": "/proc/self/fd/0",
    "/dev/stdout": "/proc/self/fd/1",
    "/dev/stderr": "/proc/self/fd/2",
}


class BindRootfsEngine(ReferenceEngine):
    """The payload sees a read-only tmpfs root holding read-only binds of the host's /usr,
    /etc (and /bin, /sbin, /lib* where they are directories), a new /proc and /tmp and a
    minimal /dev. Hooks not defined here are the reference's, with their privileges."""

    def __init__(self) -> None:
        self._root_dir: str | None = None  # master only: the directory the root is built on

    def prepare_config(self, starter_config: StarterConfig) -> None:
        """Stage 1, privileges as the reference's: also needs the mount namespace."""
        if "mount" not in self.common.engine_config.namespaces:
            raise ConfigError("namespaces: the bind root file system needs the 'mount' namespace")
        super().prepare_config(starter_config)

    def prepare_rootfs(self, rpc: RPCClient, cfg: ReferenceConfig) -> None:
        """Master, from create_container (privileges as there): build the root through the
        RPC server, then pivot into it; the RPC server shares its root with the container
        process (CLONE_FS), so that becomes the payload's root."""
        # Made here, in the host's mount namespace as the invoking user, so that
        # cleanup_container (also the master) can remove it.
        self._root_dir = tempfile.mkdtemp(prefix=ROOT_PREFIX)
        rpc.make_root(path=self._root_dir)
        for path in HOST_BIND_DIRS:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):  # /bin -> usr/bin on merged-/usr systems
                rpc.symlink(target=os.readlink(path), path=path)
            elif stat.S_ISDIR(st.st_mode):
                rpc.mkdir(path=path, mode=0o755)
                rpc.mount(
                    source=path,
                    target=path,
                    fstype=None,
                    flags=["bind", "ro", "nosuid", "nodev"],
                    data=None,
                )
        for path, mode in (("/proc", 0o555), ("/tmp", 0o1777), ("/dev", 0o755)):
            rpc.mkdir(path=path, mode=mode)
        super().prepare_rootfs(rpc, cfg)  # /proc and /tmp, now inside the new root
        rpc.mount(
            source="tmpfs",
            target="/dev",
            fstype="tmpfs",
            flags=["nosuid", "noexec"],
            data="mode=0755,size=64k,nr_inodes=64",
        )
        for device in BIND_DEVICES:
            if os.path.exists(device):
                rpc.create_file(path=device, mode=0o666)
                rpc.mount(
                    source=device,
                    target=device,
                    fstype=None,
                    flags=["bind", "nosuid", "noexec"],
                    data=None,
                )
        for link, target in DEV_LINKS.items():
            rpc.symlink(target=target, path=link)
        # Built: the root and /dev become read-only (/tmp stays writable).
        for path in ("/dev", "/"):
            rpc.mount(
                source=None, target=path, fstype=None, flags=["bind", "remount", "ro"], data=None
            )
        rpc.pivot_root(new_root=self._root_dir)

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        """Master, exactly once, privileges as create_container: remove the root's directory
        if it was made. Its mounts lived in the container's mount namespace only."""
        path, self._root_dir = self._root_dir, None
        if path is None:
            return
        try:
            os.rmdir(path)  # empty on the host side
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY or os.path.ismount(path):
                raise
            shutil.rmtree(path)  # files on the host's file system: not a mount point here
