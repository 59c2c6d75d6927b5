"""Blind round 13, theme ``cve``: buggy engines, each modelled on a published vulnerability
of a container runtime (runc, crun, Apptainer/Singularity, bubblewrap, LXC, Docker) and
re-expressed in this contract's hooks. Written from ``SPEC.md`` alone (and the kit's public
API), as an outside engine author would. Each subclasses a correct engine of
``blind13_cve_correct`` and makes exactly one plausible mistake; every run still completes:

- ``LeakyWorkdirEngine`` (``blind13-cve-leaky-workdir``): runc "Leaky Vessels"
  (CVE-2024-21626): the descriptor stage 2 opens (raw ``openat2``) to enter the payload's
  working directory lacks ``O_CLOEXEC``, so the payload inherits it.
- ``SymlinkSecretEngine`` (``blind13-cve-symlink-secret``): symlink-following on set-up
  (runc CVE-2021-30465, Docker CVE-2018-15664 class): run-time files are written at
  ``staging + container path``, so ``/var/run -> /run`` is followed against the RPC
  server's root and the secret lands in the host's ``/run`` (root flow).
- ``RsharedEngine`` (``blind13-cve-rshared``): a mount propagating back to the host
  (Docker's ``:rshared`` vs ``:rslave`` confusion): ``set_mount_propagation("rshared")``
  makes the container's ``/run`` tmpfs appear in the host's mount table (root, suid).
- ``CleanupUmountEngine`` (``blind13-cve-cleanup-umount``): host resources altered during
  cleanup: ``cleanup_container`` (the master, in the host's mount namespace) "undoes" the
  container's volumes by path and unmounts the host's ``/dev/mqueue`` and ``/dev/shm``
  (root flow).
- ``HostnameEngine`` (``blind13-cve-hostname``): the container's hostname set on the host:
  the UTS namespace is requested only for an explicit hostname, but the default name is
  set anyway (root, suid).
- ``NoNewPrivsEngine`` (``blind13-cve-no-nnp``): a setuid runtime that does not set
  ``no_new_privs`` (Singularity/bubblewrap setuid class): it is requested only with a user
  namespace, so in the suid flow the payload can exec a setuid-root binary and be root.
- ``DropOrderEngine`` (``blind13-cve-drop-order``): privileges dropped in the wrong order
  (Apptainer CVE-2023-38496 class): the RPC method that borrowed root restores the uids
  before the gids, the gid restore fails unseen and the RPC server keeps gid 0 (suid).
"""

from __future__ import annotations

import os
from typing import Any

import blind13_cve_correct as correct

from kit import system

# --- 1. runc "Leaky Vessels" -------------------------------------------------------------------


class LeakyWorkdirEngine(correct.RootfsEngine):
    """SPEC §5: "`StarterConfig` setters ...: ..., `keep_file_descriptor`." — the only way
    the contract gives a descriptor into the payload (the kit's setter: "Keep fd open
    (inheritable) into stage 2 and the payload"); every other descriptor stays out, as
    ``start_process`` "becomes the payload" (§1).

    How: ``open_workdir`` calls the raw ``openat2`` without ``O_CLOEXEC`` (the author is used
    to ``os.open`` adding it), and the descriptor is deliberately left open until the exec
    (``fchdir`` needs it until then): the payload inherits an ``O_PATH`` descriptor of its
    working directory, as runc's payload inherited a host cgroup directory. Every flow.
    """

    engine_name = "blind13-cve-leaky-workdir"

    def open_workdir(self) -> int:
        root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return correct.open_in_root(root, self.cfg.cwd, os.O_PATH | os.O_DIRECTORY)
        finally:
            os.close(root)


# --- 2. a symlink in the root followed on the host side -------------------------------------


class SymlinkSecretRPC(correct.RootfsRPC):
    def inject_file(self, staging: str, path: str, content: str) -> bool:
        target = os.path.join(staging, path.lstrip("/"))
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as f:
                f.write(content)
        except PermissionError:
            return False
        return True


class SymlinkSecretEngine(correct.RootfsEngine):
    """SPEC §11: "After a run the host is as it was before: files, mounts (and their options
    and propagation), hostname and domainname, ..." (and "a run changes nothing on the host
    that outlives it").

    How: the RPC server writes the run-time files at ``os.path.join(staging, path)`` before
    ``pivot_root``. ``/var/run`` in the bound root is Debian's absolute symlink ``/run``,
    which the kernel resolves against the server's current root, the host's: the secret
    ``/var/run/secrets/blind13/token`` is created in the host's ``/run`` (root flow; in the
    other flows the host's ``/run`` refuses the unprivileged server and the optional file is
    skipped with a warning).
    """

    engine_name = "blind13-cve-symlink-secret"
    rpc_methods = SymlinkSecretRPC


# --- 3. a mount that propagates back to the host --------------------------------------------


class RsharedEngine(correct.VolumesEngine):
    """SPEC §11: "a run changes nothing on the host that outlives it, and a few things
    (hostname, mount table: NS-010, NS-011) not even while it runs. After a run the host is
    as it was before: ..., mounts (and their options and propagation), ...".

    How: the author wants volumes the host mounts later to reach the running container and
    asks for ``rshared`` where ``rslave`` was meant. The container's mount namespace stays a
    peer of the host's ``/``, so its ``/run`` tmpfs and the ``resolv.conf`` bind appear in
    the host's mount table, and stay there after the container is gone (root and suid: in
    the user-namespace flows the kernel demotes the copy to a slave).
    """

    engine_name = "blind13-cve-rshared"

    def propagation(self) -> str:
        # Host mounts made after start (hot-plugged volumes) must show up in the container.
        return "rshared"


# --- 4. cleanup that acts on the host ---------------------------------------------------------


class CleanupUmountEngine(correct.VolumesEngine):
    """SPEC §11: "a run changes nothing on the host that outlives it, and a few things
    (hostname, mount table: NS-010, NS-011) not even while it runs. After a run the host is
    as it was before: ..., mounts ...".

    How: ``cleanup_container`` ("tears everything down", §1) unmounts the container's
    volumes by path, forgetting that the master never entered the container's mount
    namespace (§2: the container side "creates/joins net, uts, ipc, cgroup, mount
    namespaces"; the master stays where the kit started it, the host's). ``/run`` and
    ``/etc/resolv.conf`` are no mounts there (EINVAL, ignored as "partial set-up"), but
    ``/dev/mqueue`` and ``/dev/shm`` are the host's own, and go (root flow; EPERM, ignored,
    elsewhere).
    """

    engine_name = "blind13-cve-cleanup-umount"

    def cleanup_container(self, ctx: Any, fatal: Any, status: Any) -> None:
        for target in ("/etc/resolv.conf", *reversed(correct.VOLUMES)):
            try:
                system.current().umount(target, detach=True)
            except OSError:
                pass  # never mounted (partial set-up) or already gone


# --- 5. the container's name given to the host -----------------------------------------------


class HostnameEngine(correct.VolumesEngine):
    """SPEC §11: "a run changes nothing on the host that outlives it, and a few things
    (hostname, mount table: NS-010, NS-011) not even while it runs."

    How: ``prepare_config`` asks for a UTS namespace only when the user gave a hostname,
    while ``create_container`` names every container (after its id when no hostname is
    given, as Docker does). With the default config the RPC server is in the host's UTS
    namespace and renames the host (root and suid, where it holds CAP_SYS_ADMIN there; in
    the user-namespace flows the kernel refuses and the cosmetic name is skipped).
    """

    engine_name = "blind13-cve-hostname"

    def namespaces(self, sc: Any) -> list[str]:
        namespaces = ["mount", "pid", "ipc", "net"]
        if self.cfg.hostname and not self.cfg.share_host_uts:
            namespaces.append("uts")
        return namespaces


# --- 6. no no_new_privs in the setuid flow ----------------------------------------------------


class NoNewPrivsEngine(correct.PrivdropEngine):
    """SPEC §4, stage 2 in the suid flow: "r=e=s=U (a target uid is ignored for a non-root
    caller); caps as configured (default none); no_new_privs set; no saved uid 0", and the
    payload after exec: "no host privilege in every flow but `root`".

    How: ``no_new_privs`` is requested only when the container has a user namespace (the
    author thinks of setuid binaries owned by a mapped root), so in the suid flow — no user
    namespace — the payload runs without it and regains uid 0 by executing any setuid-root
    binary of the host.
    """

    engine_name = "blind13-cve-no-nnp"

    def wants_no_new_privs(self, sc: Any, namespaces: list[str]) -> bool:
        # Only a user namespace can turn a setuid binary into root of the container.
        return "user" in namespaces


# --- 7. privileges dropped in the wrong order ------------------------------------------------


class DropOrderRPC(correct.PrivdropRPC):
    def _restore_steps(self, ids: Any, caps: tuple[int, int, int]) -> list[Any]:
        (ruid, euid, suid), (rgid, egid, sgid) = ids
        # Undo what _as_root did: the user ids, the group ids, the capabilities.
        return [
            ("uids", lambda: correct.linux.thread_setresuid(ruid, euid, suid)),
            ("gids", lambda: correct.thread_setresgid(rgid, egid, sgid)),
            ("capabilities", lambda: correct.linux.capset(*caps)),
        ]


class DropOrderEngine(correct.PrivdropEngine):
    """SPEC §4, RPC server in suid: "e=U, only CAP_SYS_ADMIN effective and a small bounding
    set; a method may raise more on its own thread and must restore them", with "Every rule
    of this table holds for every thread of the process ... at every RPC method entry and
    return. A rule that says a hook "changes no credential" compares the whole credential:
    uids and gids (r/e/s/fs), ...".

    How: the method that borrowed root (r=e=s=0 for uids and gids) gives the uids back
    first; with euid U the kernel clears the effective set, so the following
    ``setresgid(U's gid...)`` fails with EPERM, which the best-effort restore only logs. The
    capabilities are restored, the uids are right, but the RPC server's thread keeps real,
    effective, saved and fs gid 0 for the rest of its life (suid flow only: elsewhere the
    server is root already or cannot become it).
    """

    engine_name = "blind13-cve-drop-order"
    rpc_methods = DropOrderRPC
