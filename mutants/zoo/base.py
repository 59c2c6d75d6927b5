"""What every mutant declares, and the few helpers mutants share.

A mutant is a subclass of the reference engine (or of its RPC methods) that breaks exactly
one rule of ``SPEC.md``. It says so in four class attributes, read by the kill matrix
(:mod:`mutants.matrix`):

- ``slug``: its name; it is registered as ``mutant-<slug>``;
- ``bug``: one line saying what it does wrong;
- ``killed_by``: the requirement IDs (:mod:`conformance.requirements`) that must fail for it;
- ``flows``: the flows in which its bug shows (the matrix checks it there, and only there;
  one flow is enough for a bug that is the same in every flow);
- ``mechanism``: how it breaks the rule (a key of :data:`MECHANISMS`): the kill matrix counts,
  per requirement, how many mechanisms kill it, so that a check is proven over the whole
  domain of its sentence, not along the one path a first mutant took.

Optional: ``rpc`` (its RPC methods class, default the reference's), ``cooperative`` (wrap it
with :func:`conformance.cooperation.cooperative` so that the suite's fault-injection and
join-only scenarios run), ``hook_timeout`` (seconds, for mutants that hang on purpose: the
matrix passes it to ``--hook-timeout``), ``gap`` (why the suite cannot catch it yet: a known
survivor, reported as such and not counted).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import ClassVar

from kit.run.sandbox import SANDBOX_ENV
from kit.system import current, linux
from reference_engines.minimal import ReferenceConfig, ReferenceEngine, ReferenceRPC

#: Process names the kit gives its processes while their hooks run (SPEC §2), by role.
#: Stage 2 is still the container process, named ``kit-container``, until start_process.
ROLE_BY_NAME = {
    "kit-stage1": "stage1",
    "kit-master": "master",
    "kit-rpc": "rpc",
    "kit-container": "stage2",
}
#: The uid and gid a mutant switches to when it wants "an unprivileged user" (nobody).
NOBODY = 65534

#: How a mutant breaks its rule (issue 14: two mechanisms per MUST rule where two exist).
MECHANISMS: dict[str, str] = {
    "direct": "the plain way: in the hook's own thread, by a library call, at the top level, "
    "on the path as spelled, in the field the rule names",
    "helper-thread": "in a thread the engine starts, not the one that runs the hook",
    "raw-syscall": "by a raw system call through ctypes (a credential change of the calling "
    "thread only, which glibc's wrappers would make on every thread)",
    "child-process": "in a child process the engine starts",
    "nested-value": "in a value nested below the top level",
    "symlink": "through a symbolic link on the way of a path",
    "other-field": "in another field of the same rule than the one a first mutant changes",
    "other-hook": "in another hook or process than the one a first mutant acts in",
    "partial": "on part of the domain only (one of the id maps, some of the signals) where a "
    "first mutant breaks all of it",
    "starter": "in the kit (a starter mutant): a rule only the starter can break",
}


def raise_effective(name: str) -> None:
    """Raise the permitted capability ``name`` into the calling thread's effective set (a
    capability the thread is not permitted stays out: nothing to raise in that flow)."""
    effective, permitted, inheritable = current().capabilities()
    current().set_capabilities(
        effective | (1 << linux.CAP_NUMBERS[name] & permitted), permitted, inheritable
    )


class Mutant(ReferenceEngine):
    """The reference engine plus the declaration of the one rule a subclass breaks."""

    slug: ClassVar[str] = ""
    bug: ClassVar[str] = ""
    killed_by: ClassVar[tuple[str, ...]] = ()
    flows: ClassVar[tuple[str, ...]] = ("root",)
    rpc: ClassVar[type] = ReferenceRPC
    cooperative: ClassVar[bool] = False
    hook_timeout: ClassVar[float | None] = None
    gap: ClassVar[str | None] = None
    mechanism: ClassVar[str] = "direct"

    def reference_config(self) -> ReferenceConfig:
        """This process's engine config, typed as the reference engine's: the kit types
        ``common.engine_config`` as the base EngineConfig, while a mutant's is always the
        ReferenceConfig (or a subclass) that its ``config()`` made."""
        cfg = self.common.engine_config
        if not isinstance(cfg, ReferenceConfig):
            raise TypeError(
                f"mutant-{self.slug}: its engine config is of class {type(cfg).__qualname__}, not "
                "ReferenceConfig: its config() must return a ReferenceConfig (or a subclass)"
            )
        return cfg


def registered_name(mutant: type[Mutant]) -> str:
    """The engine name a mutant is registered under."""
    return f"mutant-{mutant.slug}"


def process_role() -> str | None:
    """The kit process this code runs in (stage1, master, rpc, stage2), from the name the kit
    gives it. Engines have no API for this; mutants that misbehave in one process only use
    it."""
    return ROLE_BY_NAME.get(linux.process_name("self") or "")


def host_is_sandbox() -> bool:
    """True when this process's mount and uts namespaces are those of the kit's host sandbox
    (:mod:`kit.run.sandbox`, which records them in :data:`kit.run.sandbox.SANDBOX_ENV`): a mutant
    that changes "the host" then changes only the sandbox, thrown away after the run."""
    try:
        here = ":".join(str(os.stat(f"/proc/self/ns/{kind}").st_ino) for kind in ("mnt", "uts"))
    except OSError:
        return False
    return os.environ.get(SANDBOX_ENV) == here


class HostDamageRefused(RuntimeError):
    """A mutant that would change the real host refuses to (it is not in a sandbox)."""


def refuse_real_host(slug: str) -> None:
    """Raise unless changing "the host" is harmless here: a fake backend (the model takes the
    change) or the kit's host sandbox."""
    if current().name == "real" and not host_is_sandbox():
        raise HostDamageRefused(
            f"mutant-{slug} changes the host's namespaces on purpose and refuses to outside the "
            "kit's host sandbox: run it as root in the real backend (the kit then runs every "
            "lifecycle in throwaway namespaces)"
        )


def on_helper_thread(action: Callable[[], object], name: str = "engine-helper") -> None:
    """Run ``action`` on a new daemon thread named ``name`` that then stays, blocked, until
    its process ends or execs (the thread a mutant leaves with the wrong privileges); returns
    once ``action`` ran (its error, if any, is raised here; its result is dropped)."""
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        linux.set_name(name)
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 (handed to the caller, who raises it)
            failure.append(exc)
        done.set()
        threading.Event().wait()

    threading.Thread(target=run, name=name, daemon=True).start()
    if not done.wait(10.0):
        raise TimeoutError(f"the helper thread {name} did not run")
    if failure:
        raise failure[0]


def thread_setresuid(ruid: int, euid: int, suid: int) -> bool:
    """setresuid of the calling thread only, by the raw system call, in the real backend
    (the fake backend's model has no per-thread uids): True when it was made."""
    if current().name != "real":
        return False
    linux.thread_setresuid(ruid, euid, suid)
    return True


def thread_setfsuid(fsuid: int) -> bool:
    """setfsuid of the calling thread, in the real backend (the fake backend's model has no
    fs uid of its own): True when it was made."""
    if current().name != "real":
        return False
    linux.thread_setfsuid(fsuid)
    return True
