"""The fake backend (``SPEC.md`` §9): the whole lifecycle unprivileged, on a kernel model."""

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
    request: Any, initial: tuple[dict[str, Any], Any] | None = None, directory: str | None = None
) -> Iterator[FakeSystem]:
    """Make a :class:`FakeSystem` for ``request`` (a :class:`kit.run.request.RunRequest`) the
    system interface of this process and of everything it forks until the block ends; the
    model is removed afterwards. ``initial``: what :func:`prepare` returned (in this
    process or in its parent, just before the fork); ``directory``: where the model is kept
    (the run's directory, which the host sandbox shares with the run)."""
    fake = FakeSystem.create(
        needs_root=request.flow in ROOT_FLOWS, directory=directory, initial=initial
    )
    previous = kit_system.current()
    kit_system.use(fake)
    try:
        yield fake
    finally:
        kit_system.use(previous)
        fake.close()
