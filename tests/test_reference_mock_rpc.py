"""Example: unit-testing an engine's ``create_container`` with the mock RPC transport.

This is the pattern to copy for your own engine. No namespaces, no fork, no root needed:

1. Build the engine as the master would: ``ReferenceEngine()`` then ``init_config`` with a
   :class:`~kit.contract.Common` carrying the config under test.
2. ``rpc_mock("reference", engine=eng)`` (fixture from ``kit.testing.fixtures``) serves the
   engine's registered RPC class -- the real methods, real argument checks, real codec and
   server dispatch -- with its system interface replaced by a
   :class:`~kit.testing.rpc_mock.RecordingSystem`: the privileged calls the methods would make
   (mount, sethostname…) are recorded, never performed.
3. Call ``create_container(ctx, pid, transport.client_socket)``: ``client_socket`` is a real
   connected unix socket, what the kit passes as ``rpc_conn``.
4. Assert on ``transport.calls`` (what crossed the wire: method, args, result or error) and
   ``transport.system.calls`` (what the RPC methods asked of the kernel).
5. ``transport.inject(Fault...)`` makes a call fail (an errno, an exception, a dropped
   connection, a delay, a truncated reply, a reply and then a closed connection) to test the
   engine's error paths.

The ``host_untouched`` fixture below makes the kernel's mount and hostname calls fail the test
if anything reached them, and checks that the host's mounts and hostname did not change.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kit.contract import Common, Context
from kit.system import linux
from kit.testing.rpc_mock import Fault, MockTransport, RecordingSystem
from reference_engines.minimal.engine import ReferenceConfig, ReferenceEngine

CONTAINER_PID = 4242  # any number: the reference engine's create_container does not use it


def make_engine(**fields: Any) -> ReferenceEngine:
    """The engine as the master sees it: config decoded, ``init_config`` done."""
    cfg = ReferenceConfig(argv=["/bin/true"], **fields)
    eng = ReferenceEngine()
    eng.init_config(Common("reference", "id", cfg), False)
    return eng


def host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


@pytest.fixture
def host_untouched(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any mount, umount, pivot_root or sethostname reaching the kernel fails the test; the
    host's mount table and hostname must be unchanged afterwards."""

    def forbidden(name: str) -> Callable[..., None]:
        def call(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"{name}{args} reached the host")

        return call

    for name in ("mount", "umount", "pivot_root"):
        monkeypatch.setattr(linux, name, forbidden(f"kit.system.linux.{name}"))
    monkeypatch.setattr(socket, "sethostname", forbidden("socket.sethostname"))
    mounts, hostname = host_mounts(), socket.gethostname()
    yield
    assert host_mounts() == mounts
    assert socket.gethostname() == hostname


def run_create_container(eng: ReferenceEngine, transport: MockTransport) -> None:
    eng.create_container(Context(), CONTAINER_PID, transport.client_socket)


# --------------------------------------------------------------------------- the happy path


def test_create_container_sets_the_hostname_and_mounts_proc_and_tmp(
    rpc_mock: Any, host_untouched: None
) -> None:
    eng = make_engine()  # the host's root, hostname "kit-container", mount_proc, mount_tmp
    transport = rpc_mock("reference", engine=eng)

    run_create_container(eng, transport)

    # What crossed the wire: every call succeeded; the hostname comes first.
    assert transport.calls, "create_container made no RPC call"
    assert all(call.ok for call in transport.calls), [c for c in transport.calls if not c.ok]
    assert transport.names[0] == "sethostname"
    assert transport.calls[0].args == {"name": "kit-container"}
    mounts = {call.args["target"]: call.args for call in transport.calls_to("mount")}
    assert mounts["/proc"]["fstype"] == "proc"
    assert {"nosuid", "nodev", "noexec"} <= set(mounts["/proc"]["flags"])
    assert mounts["/tmp"]["fstype"] == "tmpfs" and "mode=1777" in mounts["/tmp"]["data"]

    # What the real RPC methods asked of the kernel (recorded only).
    rec: RecordingSystem = transport.system
    assert rec.calls[0].name == "sethostname" and rec.calls[0].args == ("kit-container",)
    kernel_mounts = {c.args[1]: c.args for c in rec.calls if c.name == "mount"}
    assert kernel_mounts["/proc"][:3] == ("proc", "/proc", "proc")
    assert kernel_mounts["/tmp"][:3] == ("tmpfs", "/tmp", "tmpfs")

    # The kit closes rpc_conn when create_container returns: the RPC server then exits 0.
    transport.client_socket.close()
    assert transport.wait_server() == 0


@pytest.mark.parametrize(
    "fields, absent",
    [
        ({"hostname": None}, ("sethostname", None)),
        ({"mount_tmp": False}, ("mount", "/tmp")),
        ({"mount_proc": False}, ("mount", "/proc")),
    ],
)
def test_the_config_decides_the_calls(
    rpc_mock: Any, host_untouched: None, fields: dict, absent: tuple
) -> None:
    eng = make_engine(**fields)
    transport = rpc_mock("reference", engine=eng)
    run_create_container(eng, transport)
    method, target = absent
    made = [(c.name, (c.args or {}).get("target")) for c in transport.calls]
    assert (method, target) not in made, made
    assert made, "the other settings still produce calls"


# --------------------------------------------------------------------------- error paths


def test_mount_refused_with_eperm_raises_a_permission_error(
    rpc_mock: Any, host_untouched: None
) -> None:
    eng = make_engine()
    transport = rpc_mock("reference", engine=eng)
    transport.inject(Fault.errno(errno.EPERM), method="mount")

    with pytest.raises(PermissionError) as info:
        run_create_container(eng, transport)

    assert info.value.errno == errno.EPERM
    refused = transport.calls_to("mount")
    assert len(refused) == 1, "create_container stops at the first failed call"
    assert refused[0].faults == ["errno"] and refused[0].errno == errno.EPERM
    # The refused mount never reached the RPC method, let alone the kernel.
    assert "mount" not in transport.system.names()


def test_dropped_connection_raises_a_connection_error(rpc_mock: Any, host_untouched: None) -> None:
    eng = make_engine()
    transport = rpc_mock("reference", engine=eng)
    transport.inject(Fault.drop(), on_call=2)  # the call after sethostname

    with pytest.raises(ConnectionError):
        run_create_container(eng, transport)

    assert transport.names[:2] == ["sethostname", "mount"]
    assert transport.calls[1].faults == ["drop"] and not transport.calls[1].answered
    assert transport.system.names() == ["sethostname"]
    assert transport.wait_server() == 0  # the RPC server saw the connection end and exited 0


def test_a_failing_system_call_comes_back_typed(rpc_mock: Any, host_untouched: None) -> None:
    """Not an injected transport fault: the real method runs and its system call fails."""
    eng = make_engine()
    rec = RecordingSystem(errors={"mount": OSError(errno.EBUSY, "Device or resource busy")})
    transport = rpc_mock("reference", engine=eng, system=rec)

    with pytest.raises(OSError) as info:
        run_create_container(eng, transport)

    assert info.value.errno == errno.EBUSY
    assert transport.calls_to("mount")[0].error["type"] == "OSError"
    assert rec.names() == ["sethostname", "mount"]


def test_the_rpc_methods_own_checks_run(rpc_mock: Any, host_untouched: None) -> None:
    """A config that skipped prepare_config's validation: the RPC method itself refuses to
    set the host's hostname (no uts namespace) with EPERM."""
    eng = make_engine(namespaces=["mount", "pid"])
    transport = rpc_mock("reference", engine=eng)

    with pytest.raises(PermissionError, match="no uts namespace") as info:
        run_create_container(eng, transport)

    assert info.value.errno == errno.EPERM
    assert transport.system.calls == []


def test_a_slow_rpc_server_times_out(rpc_mock: Any, host_untouched: None) -> None:
    eng = make_engine()
    transport = rpc_mock("reference", engine=eng, timeout=0.1)
    transport.inject(Fault.delay(2), on_call=1)

    with pytest.raises(TimeoutError):
        run_create_container(eng, transport)


def test_the_rpc_methods_refuse_a_namespace_that_is_still_the_hosts(
    rpc_mock: Any, host_untouched: None
) -> None:
    """prepare_config recorded the host's namespaces; a starter that did not create the uts
    namespace asked for (here: the system says the RPC server's is the host's) gets EPERM
    instead of a changed host hostname."""
    host = {"mount": 4026531841, "uts": 4026531838}
    eng = make_engine(host_namespaces=host)
    recording = RecordingSystem(results={"ns_inode": lambda kind, *args: host[kind]})
    transport = rpc_mock("reference", engine=eng, system=recording)

    with pytest.raises(PermissionError, match="uts namespace is still the host's") as info:
        run_create_container(eng, transport)

    assert info.value.errno == errno.EPERM
    assert recording.names() == ["ns_inode"]  # asked, then refused: nothing else reached it


def test_prepare_config_records_the_host_namespaces_and_users_cannot_set_them() -> None:
    from kit.contract import ConfigError
    from kit.starter.config import StarterConfig
    from reference_engines.minimal.engine import GUARDED_NAMESPACES, validate_config

    eng = make_engine()
    sc = StarterConfig("root", 0, 0)
    eng.prepare_config(sc)
    assert eng.common.engine_config.host_namespaces == {
        kind: linux.ns_inode(kind) for kind in GUARDED_NAMESPACES
    }
    with pytest.raises(ConfigError, match=r"^host_namespaces: "):
        validate_config(ReferenceConfig(argv=["/bin/true"], host_namespaces={"uts": 1}), sc)
