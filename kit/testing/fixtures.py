"""pytest fixtures for :mod:`kit.testing.rpc_mock`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kit.testing.rpc_mock import MockTransport

# pytest loads this module (entry point pytest11) in every session of an environment where
# the kit is installed; the mock (~10 ms of imports) is imported only when a test asks for it.

__all__ = ["MockFactory", "rpc_mock"]

_DEFAULT: Any = object()


class MockFactory:
    """Makes :class:`MockTransport` objects and closes them all in :meth:`close`.

    ``factory(engine_name)`` serves the RPC methods registered for *engine_name*
    (:meth:`MockTransport.for_engine`; keyword options ``engine``, ``config``, ``timeout``);
    ``factory(engine_name, methods)`` serves *methods* (a class, an instance or a mapping, see
    :class:`MockTransport`).

    ``system`` defaults to a fresh :class:`RecordingSystem` for a registered engine or a
    methods class/instance, so nothing reaches the host; pass ``system=None`` to keep the
    served object's own system interface. ``timeout`` defaults to 10 s on the client socket so
    that a hung call fails the test instead of hanging it.
    """

    def __init__(self) -> None:
        self.made: list[MockTransport] = []

    def __call__(
        self,
        engine_name: str,
        methods: Any = None,
        *,
        system: Any = _DEFAULT,
        timeout: float | None = 10.0,
        **options: Any,
    ) -> MockTransport:
        from kit.testing.rpc_mock import MockTransport, RecordingSystem  # noqa: PLC0415

        if system is _DEFAULT:
            system = None if isinstance(methods, Mapping) else RecordingSystem()
        if methods is None:
            transport = MockTransport.for_engine(
                engine_name, system=system, timeout=timeout, **options
            )
        else:
            transport = MockTransport(
                engine_name, methods, system=system, timeout=timeout, **options
            )
        self.made.append(transport)
        return transport

    def close(self) -> None:
        """Close every transport (all of them, even if one fails); re-raise the first error."""
        first: BaseException | None = None
        while self.made:
            try:
                self.made.pop().close()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                first = first or exc
        if first is not None:
            raise first


@pytest.fixture
def rpc_mock() -> Iterator[Callable[..., MockTransport]]:
    """A factory of :class:`~kit.testing.rpc_mock.MockTransport` objects, closed at teardown (see
    :class:`MockFactory`).

    Load it in a test module with ``pytest_plugins = ["kit.testing.fixtures"]`` (or register this
    module as a plugin)::

        def test_create_container(rpc_mock):
            transport = rpc_mock("reference", engine=eng)        # system: a fresh RecordingSystem
            eng.create_container(Context(), 4242, transport.client_socket)
            assert transport.names[0] == "sethostname"
            assert transport.system.names() == ["sethostname", "mount", "mount"]

    A transport whose threads do not stop at teardown fails the test there.
    """
    factory = MockFactory()
    try:
        yield factory
    finally:
        factory.close()
