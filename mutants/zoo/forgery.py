"""Mutants that hide what they break from the kit's own view (blind round 6, §4, §7, §8): the
snapshot a process reads of itself, the master's own records, which engine code there can bend."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from kit.contract import Context, SignalChannel, WaitStatus
from kit.rpc import MAX_FRAME, RPCClient
from kit.starter import master as kit_master
from kit.starter import rpc_server
from kit.system import linux
from mutants.zoo.base import Mutant, raise_effective
from reference_engines.minimal import ReferenceConfig, ReferenceRPC
from reference_engines.minimal.engine import FORWARDED_SIGNALS, MONITOR_POLL

#: What each mutant's hidden thread or method keeps effective.
_KEPT = "CAP_DAC_OVERRIDE"


class _HiddenThreadRPC(ReferenceRPC):
    """After the /tmp mount: a thread that keeps CAP_DAC_OVERRIDE raised for good, and an
    empty directory mounted over its ``/proc/PID/task/TID`` in the container's mount
    namespace, where the RPC server's own snapshots read /proc."""

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        super().mount(source, target, fstype, flags, data)
        if target != "/tmp":
            return
        ready, tids = threading.Event(), []

        def keeps() -> None:
            tids.append(linux.proc_tid())  # as the container's /proc numbers it
            raise_effective(_KEPT)
            ready.set()
            threading.Event().wait()

        threading.Thread(target=keeps, name="watch", daemon=True).start()
        ready.wait(5)
        empty = "/tmp/.hidden"
        os.makedirs(empty, exist_ok=True)
        linux.mount(empty, f"/proc/{os.getpid()}/task/{tids[0]}", None, linux.MS_BIND)


class RPCServerHidesAThreadUnderAMount(Mutant):
    slug = "rpc-server-hides-a-thread-under-a-mount"
    bug = (
        "an RPC method leaves a thread with CAP_DAC_OVERRIDE raised and mounts an empty "
        "directory over its /proc/PID/task/TID in the container, so that the RPC server's "
        "snapshots, read inside, leave it out"
    )
    killed_by = ("LEDGER-003",)
    mechanism = "helper-thread"
    flows = ("suid",)  # where the RPC server has CAP_DAC_OVERRIDE permitted, not effective
    rpc = _HiddenThreadRPC


def _scrubbed(original: Any) -> Any:
    """RPCServerProcess._creds with the effective set of every thread cut down to
    CAP_SYS_ADMIN (what the setuid RPC server is given)."""
    admin = linux.caps_to_mask(["CAP_SYS_ADMIN"])

    def creds(self: Any) -> Any:
        out = original(self)
        for entry in [out, *out.get("threads", ())] if isinstance(out, dict) else ():
            caps = entry.get("caps")
            if isinstance(caps, dict) and isinstance(caps.get("effective"), int):
                caps["effective"] &= admin
        return out

    return creds


class _PatchedRecordRPC(ReferenceRPC):
    """Every method leaves CAP_DAC_OVERRIDE raised on its thread; the kit's record of the
    RPC server's credentials is replaced, in its process, by :meth:`_patched` of it."""

    @staticmethod
    def _patched(original: Any) -> Any:
        raise NotImplementedError

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        rpc_server.RPCServerProcess._creds = self._patched(  # type: ignore[method-assign]
            rpc_server.RPCServerProcess._creds
        )

    def mount(
        self,
        source: str | None,
        target: str,
        fstype: str | None,
        flags: list[str],
        data: str | None,
    ) -> None:
        raise_effective(_KEPT)
        super().mount(source, target, fstype, flags, data)


class _ScrubbingRPC(_PatchedRecordRPC):
    """The record says every thread has CAP_SYS_ADMIN effective at most."""

    _patched = staticmethod(_scrubbed)


class RPCServerScrubsItsRecordedCredentials(Mutant):
    slug = "rpc-server-scrubs-its-recorded-credentials"
    bug = (
        "RPC methods leave CAP_DAC_OVERRIDE raised, and the engine patches the kit's "
        "RPCServerProcess._creds in the RPC server so that each rpc_call reports only "
        "CAP_SYS_ADMIN effective"
    )
    killed_by = ("LEDGER-003",)
    mechanism = "other-field"
    flows = ("suid",)  # where the RPC server has CAP_DAC_OVERRIDE permitted, not effective
    rpc = _ScrubbingRPC


class _DroppingRPC(_PatchedRecordRPC):
    """The record holds no credentials at all."""

    _patched = staticmethod(lambda original: lambda self: None)


class RPCServerDropsItsRecordedCredentials(Mutant):
    slug = "rpc-server-drops-its-recorded-credentials"
    bug = (
        "RPC methods leave CAP_DAC_OVERRIDE raised, and the engine patches the kit's "
        "RPCServerProcess._creds in the RPC server to return None, so that no rpc_call "
        "carries credentials to check"
    )
    killed_by = ("PRIV-RPC-004",)
    mechanism = "direct"
    flows = ("suid",)  # where the RPC server has CAP_DAC_OVERRIDE permitted, not effective
    rpc = _DroppingRPC


class _LongNoteRPC(ReferenceRPC):
    def note(self, text: str) -> None:
        """Takes a long text, and leaves CAP_DAC_OVERRIDE raised."""
        raise_effective(_KEPT)


class RPCMethodPushesItsCredentialsOut(Mutant):
    slug = "rpc-method-pushes-its-credentials-out"
    bug = (
        "an RPC method leaves CAP_DAC_OVERRIDE raised; create_container calls it with an "
        "argument just short of the RPC frame limit, so that its rpc_call event, with the "
        "credentials, is past the ledger's datagram limit and is cut"
    )
    killed_by = ("PRIV-RPC-004",)
    mechanism = "direct"
    flows = ("suid",)  # where the RPC server has CAP_DAC_OVERRIDE permitted, not effective
    rpc = _LongNoteRPC

    def prepare_rootfs(self, rpc: RPCClient, cfg: ReferenceConfig) -> None:
        super().prepare_rootfs(rpc, cfg)
        # The request's own framing is well under 400 bytes; the event's credentials are
        # well over it.
        rpc.note(text="x" * (MAX_FRAME - 400))


class MonitorReapsEveryChildUnrecorded(Mutant):
    slug = "monitor-reaps-every-child-unrecorded"
    bug = (
        "monitor_container reaps every child of the master (waitpid(-1)) until the container "
        "is among them, and patches the kit's Master._check_sentinel, in the master, so that "
        "the master records nothing of the sentinel it took"
    )
    killed_by = ("SIG-004",)
    flows = ("root", "suid")

    def monitor_container(self, pid: int, signals: SignalChannel) -> WaitStatus:
        kit_master.Master._check_sentinel = lambda self: None  # type: ignore[method-assign]
        while True:
            sig = signals.get(timeout=MONITOR_POLL)
            if sig in FORWARDED_SIGNALS:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            while True:  # every child that has ended; the container's status is returned
                try:
                    wpid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    wpid = 0
                if wpid == pid:
                    return status
                if wpid == 0:
                    break


class _HelperHoldsRpcConn:
    """A forked helper of create_container that holds every descriptor it inherited (the
    engine's rpc_conn among them) until cleanup_container closes its pipe."""

    def __init__(self) -> None:
        self.stop_r, self.stop_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self.stop_w)
                os.read(self.stop_r, 1)
            finally:
                os._exit(0)
        os.close(self.stop_r)

    def stop(self) -> None:
        os.close(self.stop_w)
        os.waitpid(self.pid, 0)


class CreateHelperHoldsRpcUnrecorded(Mutant):
    slug = "create-helper-holds-rpc-unrecorded"
    bug = (
        "create_container forks a helper that lives until cleanup_container with rpc_conn "
        "inherited, and patches the kit's Master._record_rpc_copies, in the master, so that "
        "the master records no copy"
    )
    killed_by = ("RPC-001",)
    mechanism = "child-process"
    flows = ("root", "suid")

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        kit_master.Master._record_rpc_copies = lambda self: None  # type: ignore[method-assign]
        super().create_container(ctx, pid, rpc_conn)
        self.helper = _HelperHoldsRpcConn()

    def cleanup_container(
        self, ctx: Context, fatal: BaseException | None, status: WaitStatus | None
    ) -> None:
        helper = getattr(self, "helper", None)
        if helper is not None:
            helper.stop()
        super().cleanup_container(ctx, fatal, status)


MUTANTS = (
    CreateHelperHoldsRpcUnrecorded,
    MonitorReapsEveryChildUnrecorded,
    RPCServerHidesAThreadUnderAMount,
    RPCServerScrubsItsRecordedCredentials,
    RPCServerDropsItsRecordedCredentials,
    RPCMethodPushesItsCredentialsOut,
)
