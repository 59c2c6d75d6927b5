"""Mutants that hold the wrong privileges somewhere (SPEC §4): stage 1, the master, the RPC
server, stage 2 and the payload.

Every privileged action goes through the kit's system interface (``kit.system.current()``),
like the reference engine's, so that a fake-backend run acts on the model, never on the host.
"""

from __future__ import annotations

import os
import socket

from kit.contract import Common, Context
from kit.starter.config import StarterConfig
from kit.system import current, linux
from mutants.zoo.base import NOBODY, Mutant, process_role

# --- stage 1 -------------------------------------------------------------------------------


class Stage1KeepsSavedRoot(Mutant):
    slug = "stage1-keeps-saved-root"
    bug = (
        "prepare_config (root flow) switches to nobody for its checks, keeping saved uid 0 "
        "to switch back later, and returns like that"
    )
    killed_by = ("PRIV-STAGE1-001",)
    flows = ("root",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if current().getresuid()[1] == 0:
            current().setresuid(NOBODY, NOBODY, 0)


class Stage1ShrinksItsOwnBoundingSet(Mutant):
    slug = "stage1-shrinks-own-bounding"
    bug = (
        "prepare_config (root flow) drops the capabilities the container will not get from "
        "its own bounding set, instead of asking the starter for them"
    )
    killed_by = ("PRIV-STAGE1-002",)
    flows = ("root",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        keep = starter_config.capabilities["bounding"]
        if starter_config.flow == "root" and keep is not None:
            current().limit_bounding(linux.caps_to_mask(keep))


# --- the master ----------------------------------------------------------------------------


class MasterKeepsEffectiveRoot(Mutant):
    slug = "master-keeps-euid-root"
    bug = (
        "create_container (setuid master) regains effective uid 0 through the saved uid to "
        "work as root, and never drops it again"
    )
    killed_by = ("PRIV-MASTER-001",)
    flows = ("suid", "hybrid")

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        _ruid, euid, suid = current().getresuid()
        if euid != 0 and suid == 0:
            current().setresuid(-1, 0, -1)
        super().create_container(ctx, pid, rpc_conn)


class MasterKeepsEffectiveCapabilities(Mutant):
    slug = "master-keeps-effective-caps"
    bug = (
        "create_container (setuid master) raises every permitted capability into its "
        "effective set and does not lower them before returning"
    )
    killed_by = ("PRIV-MASTER-002",)
    flows = ("suid", "hybrid")

    def create_container(self, ctx: Context, pid: int, rpc_conn: socket.socket) -> None:
        _effective, permitted, inheritable = current().capabilities()
        current().set_capabilities(permitted, permitted, inheritable)
        super().create_container(ctx, pid, rpc_conn)


class MasterGivesUpPrivilege(Mutant):
    slug = "master-gives-up-privilege"
    bug = (
        "init_config 'hardens' the setuid master: drops its saved uid 0 for good and sets "
        "no_new_privs, so no master hook can regain privilege any more"
    )
    killed_by = ("PRIV-MASTER-003",)
    flows = ("suid", "hybrid")

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        if process_role() == "master":
            ruid, _, suid = current().getresuid()
            if suid == 0 and ruid != 0:
                current().setresuid(ruid, ruid, ruid)
                current().set_no_new_privs()  # this thread, and the hook threads it starts


# --- the RPC server ----------------------------------------------------------------------


class RPCServerRegainsRoot(Mutant):
    slug = "rpc-server-regains-root"
    bug = (
        "init_config, in the setuid RPC server, regains effective uid 0 through the saved "
        "uid so that the RPC methods run as root"
    )
    killed_by = ("PRIV-RPC-001",)
    flows = ("suid",)

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        if process_role() == "rpc":
            _, euid, suid = current().getresuid()
            if euid != 0 and suid == 0:
                current().setresuid(-1, 0, -1)


class RPCServerRaisesCapabilities(Mutant):
    slug = "rpc-server-keeps-caps"
    bug = (
        "init_config, in the setuid RPC server, raises every permitted capability into the "
        "effective set for the RPC methods, not only CAP_SYS_ADMIN"
    )
    killed_by = ("PRIV-RPC-002",)
    flows = ("suid", "hybrid")

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        if process_role() == "rpc":
            _effective, permitted, inheritable = current().capabilities()
            current().set_capabilities(permitted, permitted, inheritable)


# --- stage 2 and the payload ---------------------------------------------------------------


class Stage2DropsToNobody(Mutant):
    slug = "stage2-drops-to-nobody"
    bug = (
        "init_config, in stage 2 (root flow), switches the container process to nobody "
        "behind the starter's back, after the starter applied the target uid"
    )
    killed_by = ("PRIV-STAGE2-001",)
    flows = ("root",)

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        if process_role() == "stage2" and current().getresuid()[1] == 0:
            system = current()
            _, permitted, inheritable = system.capabilities()
            system.setresgid(NOBODY, NOBODY, NOBODY)
            system.set_keepcaps(True)
            system.setresuid(NOBODY, NOBODY, NOBODY)
            system.set_keepcaps(False)
            system.set_capabilities(permitted, permitted, inheritable)


class Stage2InheritableCapabilities(Mutant):
    slug = "stage2-inheritable-caps"
    bug = (
        "init_config copies the permitted capabilities into the inheritable set (so that "
        "helpers it execs keep them): stage 2 ends up with capabilities nobody configured"
    )
    killed_by = ("PRIV-STAGE2-002",)
    flows = ("root",)

    def init_config(self, common: Common, privileged_stage1: bool) -> None:
        super().init_config(common, privileged_stage1)
        effective, permitted, inheritable = current().capabilities()
        if permitted & ~inheritable:
            current().set_capabilities(effective, permitted, permitted | inheritable)


class NoNoNewPrivs(Mutant):
    slug = "no-no-new-privs"
    bug = (
        "prepare_config does not ask for no_new_privs for a non-root caller: a setuid "
        "binary in the container could raise the payload's privileges"
    )
    killed_by = ("PRIV-STAGE2-003",)
    flows = ("suid",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        starter_config.set_no_new_privs(False)


class AmbientCapabilitiesForAUser(Mutant):
    slug = "ambient-caps-for-user"
    bug = (
        "prepare_config leaves CAP_NET_BIND_SERVICE in the ambient set of a setuid "
        "caller's container: the unprivileged payload keeps it across exec"
    )
    killed_by = ("PRIV-PAYLOAD-001",)
    flows = ("suid",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.flow == "suid":
            for kind in ("effective", "permitted", "inheritable", "ambient", "bounding"):
                starter_config.set_capabilities(kind, ["CAP_NET_BIND_SERVICE"])


class BoundingSetLeftFull(Mutant):
    slug = "bounding-left-full"
    bug = (
        "prepare_config (root flow) gives the container the host's whole bounding set "
        "instead of the capabilities it grants: a root payload regains every capability "
        "at exec"
    )
    killed_by = ("PRIV-PAYLOAD-002",)
    flows = ("root",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.flow == "root":
            bounding = linux.read_status()["CapBnd"]
            starter_config.set_capabilities("bounding", linux.mask_to_caps(int(bounding, 16)))


class StartProcessBackToRoot(Mutant):
    slug = "start-process-back-to-root"
    bug = (
        "runs the payload as nobody by default (root flow), but start_process switches back "
        "to root before the exec: the payload runs as root although the target is a user"
    )
    killed_by = ("PRIV-PAYLOAD-003",)
    flows = ("root",)

    def prepare_config(self, starter_config: StarterConfig) -> None:
        super().prepare_config(starter_config)
        if starter_config.flow == "root" and starter_config.target_uid is None:
            starter_config.set_target_uid(NOBODY)
            starter_config.set_target_gids([NOBODY])

    def start_process(self, master_fd: int) -> None:
        try:
            current().setresgid(0, 0, 0)
            current().setresuid(0, 0, 0)
        except PermissionError:
            pass  # not the root flow: nothing to regain
        super().start_process(master_fd)


class LeaksADescriptor(Mutant):
    slug = "fd-leak"
    bug = (
        "start_process opens the container's root directory to check it and leaves the "
        "descriptor inheritable: the payload gets an open directory it was never given"
    )
    killed_by = ("FD-001",)
    flows = ("root", "fakeroot")

    def start_process(self, master_fd: int) -> None:
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        os.set_inheritable(fd, True)
        super().start_process(master_fd)


MUTANTS = (
    Stage1KeepsSavedRoot,
    Stage1ShrinksItsOwnBoundingSet,
    MasterKeepsEffectiveRoot,
    MasterKeepsEffectiveCapabilities,
    MasterGivesUpPrivilege,
    RPCServerRegainsRoot,
    RPCServerRaisesCapabilities,
    Stage2DropsToNobody,
    Stage2InheritableCapabilities,
    NoNoNewPrivs,
    AmbientCapabilitiesForAUser,
    BoundingSetLeftFull,
    StartProcessBackToRoot,
    LeaksADescriptor,
)
