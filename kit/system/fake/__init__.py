"""The fake backend (``SPEC.md`` §9): the whole lifecycle as an ordinary user, with no
namespace and no privilege, against a model of the kernel.

:class:`FakeSystem` implements every method of :class:`kit.system.RealSystem` on a model
instead of the kernel. The starter, the engine and the probes call it exactly as they call
the real one; the processes, order, sockets, RPC and ledger of a run are the real ones.

Design
------
- **The model** (:mod:`kit.system.fake.model`): the kernel's rules as functions over JSON data —
  user namespaces with their owner, level, uid/gid maps and ``setgroups`` state; kernel ids
  (kuids) translated through the maps; ``cap_capable`` (a capability in one's own user
  namespace, or ownership of a child namespace); the credential transitions
  (``setresuid``/``setresgid`` with the capability effects of capabilities(7) "Effect of
  user ID changes on capabilities", keep-caps, no-op calls; ``setgroups``; ``capset``'s
  subset rules; bounding drop needing CAP_SETPCAP; ambient raise needing
  permitted ∩ inheritable; no_new_privs; dumpable reset by ``commit_creds``); namespace
  creation (``create_user_ns`` giving every capability in the new namespace, CAP_SYS_ADMIN
  over the current or new user namespace for the others, copied mount tables that are
  locked in a less privileged namespace) and joining (the ``*_install`` checks of
  ``setns``); the id-map files (one write each, ``new_idmap_permitted``, ``setgroups``
  deny before an unprivileged gid map, the DAC check of ``/proc/PID/*`` owned per
  ``task_dump_owner``); ``/proc/PID/ns`` access (``ptrace_may_access``); mount, umount,
  propagation, pivot_root and chroot on per-mount-namespace tables; hostname per uts
  namespace; interfaces per network namespace. Refusals are ``OSError`` with the kernel's
  errno.
- **Shared state** (:mod:`kit.system.fake.store`): namespaces, the registry that maps real pids
  to their model namespaces, pids and credentials (for ``/proc/PID/ns/KIND`` paths and
  ``write_id_maps(PID)``) and the fs structs live in one document of JSON data that every
  process of the run reaches (a private file created by the supervisor before it forks the
  starter; ``lockf`` + a thread lock; reopened per transaction so that closing every fd,
  as stage 2 does, is harmless; ``marshal``-encoded with a generation number, so that a
  process decodes it again only after another process wrote it).
- **Per-process state** (:class:`kit.system.fake.system.ProcState`): credentials of each thread,
  namespaces, pid namespace for children, model pids, dumpable — in the process, copied
  by ``fork`` like the kernel copies them (``os.register_at_fork``).
- ``clone`` really forks (``clone(CLONE_FS)`` for ``share_fs``: no privilege needed) and
  gives the child the new model namespaces; ``getpid``/``getppid`` answer in the model's
  pid namespaces (1 for the first process of a new one). ``mkdir`` is real only inside the
  run's temporary directory; ``chdir`` is real when the directory exists (harmless).
- **Initial state**: the real supervisor's credentials, namespaces (their real inode
  numbers), hostname, interfaces and mount table — except that a flow that needs root
  (root, suid, hybrid) run by a non-root user starts the model as uid/gid 0 with every
  capability of the real bounding set (the set a real root has on this machine).
- **Probes**: :meth:`FakeSystem.snapshot` and :meth:`FakeSystem.escalation` return the
  structures of :func:`kit.ledger.probe.snapshot` and :func:`kit.ledger.probe.escalation`,
  computed from the model (threads listed by real tid; no probe child is forked): each
  escalation way by its own rule (setresuid, capset, and ``bprm_fill_uid`` for the run's
  setuid-root binary, which exists in the model only), relative to the model's initial user
  namespace, the one the kit was launched in.

Containment: calls that bypass the model
----------------------------------------
An engine that makes a privileged call itself (not through the system interface) would act
on the real kernel: every process of a fake run is under the seccomp filter of
:mod:`kit.run.seccomp` (installed by the starter before anything else), so the call fails with
EPERM, the supervisor records it and HOST-050 fails. The kit's own fake code needs none of
the refused calls: credentials, namespaces, mounts and hostnames are the model's; it forks
(plain ``fork``, ``clone(CLONE_FS)``) and starts threads, which stay allowed.

Out of scope: what only the kernel can decide
----------------------------------------------
A fake run proves the lifecycle and the privilege *decisions* of the starter and of an
engine that works through :mod:`kit.system`; it cannot show what the kernel would do to
real processes. Report these as not-configured in fake mode, never as passed:

- everything the payload observes after exec: it runs with the real (unprivileged, or
  root) credentials of the launcher, in the host's namespaces — its ``hostname``, ``id``,
  ``/proc/self/status``, ``/proc`` and mounts, network interfaces and pid are the host's;
  capabilities the kernel would derive at exec (ambient, file capabilities, setuid bits)
  are not computed;
- anything an engine reads from the kernel directly instead of through the system
  interface (``os.getuid()``, ``/proc/self/*``, ``os.path.ismount``, ``os.statvfs``,
  ``os.stat`` of a mounted filesystem, files created in a filesystem the model mounted —
  e.g. the bind-rootfs example engine (``reference-bind``), which checks mount points with
  ``os.path.ismount``): the model's mounts do not exist for the real VFS;
- pid namespace teardown (the kernel kills every process of a pid namespace when its
  pid 1 exits; the model only refuses later forks into it with ENOMEM), signal delivery
  across pid namespaces, reparenting to a namespace's pid 1, ``clone`` returning the pid
  in the caller's namespace (the fake returns the real pid: the starter waits for it with
  the real ``waitpid``);
- file permission checks against the model's credentials are done for the calls the
  system interface offers (mkdir, chdir, chroot, /proc id-map files), not for other file
  access; seccomp, LSMs (AppArmor, SELinux, Yama), rlimits and ``user.max_*_namespaces``
  limits are not modelled (seccomp mode is read from the real process: 2, under the kit's
  own filter);
- mount propagation between peers, mount visibility (a model tmpfs does not hide what
  is under it), ``mount_too_revealing`` for proc/sysfs in a user namespace, ``CLONE_FS``
  sharing of a real fs struct after an ``unshare(CLONE_NEWNS)``;
- per-thread credentials are modelled for changes made through the interface
  (capset, prctl act on the calling thread; set*id on every thread, like glibc), but a
  thread created after a thread-local change inherits the process's default state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from kit import system as kit_system  # not "system": that name is kit.system.fake.system
from kit.system.fake.model import Cred, Model
from kit.system.fake.system import FakeSystem, initial_state

#: Flows whose starter begins as root (real or emulated setuid).
ROOT_FLOWS = ("root", "suid", "hybrid")

__all__ = ["ROOT_FLOWS", "Cred", "FakeSystem", "Model", "installed", "prepare"]


def prepare(request: Any) -> tuple[dict[str, Any], Any]:
    """The model :func:`installed` starts from (:func:`kit.system.fake.system.initial_state`),
    computed ahead of time: the zygote computes it just before it forks the run's
    supervisor, which has its credentials, namespaces and view of the host."""
    return initial_state(request.flow in ROOT_FLOWS)


@contextlib.contextmanager
def installed(
    request: Any, initial: tuple[dict[str, Any], Any] | None = None
) -> Iterator[FakeSystem]:
    """Make a :class:`FakeSystem` for ``request`` (a :class:`kit.run.request.RunRequest`) the
    system interface of this process and of everything it forks until the block ends; the
    model is removed afterwards. ``initial``: what :func:`prepare` returned (in this
    process or in its parent, just before the fork)."""
    fake = FakeSystem.create(needs_root=request.flow in ROOT_FLOWS, initial=initial)
    previous = kit_system.current()
    kit_system.use(fake)
    try:
        yield fake
    finally:
        kit_system.use(previous)
        fake.close()
