"""The reference engine (``reference_engines/minimal``) and its bind-rootfs example
(``reference_engines/bind_rootfs``): config, validation, RPC argument checks, monitor and
cleanup units, and whole lifecycles of both engines in every flow.

Unit tests run in the pytest process (the RPC methods with a recording system interface);
the real-mount tests run the RPC server in a forked child with its own mount namespace; the
in-flow tests go through ``kit.run.launcher``. The soak test runs 100 lifecycles (1,000 with
``KIT_SOAK=1``; 20 with ``KIT_ZYGOTE=0``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kit.contract import Common, ConfigError, Context, Engine, SignalChannel
from kit.rpc import RPCClient, serve
from kit.run import environment
from kit.run.launcher import RunHandle, Zygote, run, start
from kit.run.zygote import idle as zygote_idle
from kit.starter.config import StarterConfig
from kit.system import linux
from reference_engines.bind_rootfs.engine import BIND_DEVICES, BindRootfsEngine
from reference_engines.bind_rootfs.rpc import HOST_BIND_DIRS, ROOT_PREFIX, BindRootfsRPC
from reference_engines.minimal import engine as engine_mod
from reference_engines.minimal.engine import (
    DEFAULT_NAMESPACES,
    ROOT_DEFAULT_CAPS,
    ReferenceConfig,
    ReferenceEngine,
)
from reference_engines.minimal.rpc import ReferenceRPC

FLOWS = ("root", "suid", "userns", "fakeroot", "hybrid")
NON_ROOT = ("suid", "userns", "fakeroot", "hybrid")
U_UID, U_GID = 999, 995  # any unprivileged ids: prepare_config only compares and copies them
BIND_RPC_METHODS = (
    "make_root",
    "mkdir",
    "create_file",
    "symlink",
    "mount",
    "pivot_root",
    "sethostname",
)
ENGINES = ("reference", "reference-bind")


def need_flow(flow: str) -> None:
    ok, why = environment.flows()[flow]
    if not ok:
        pytest.skip(f"flow {flow} cannot run here: {why}")


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def make_engine(
    cfg: ReferenceConfig, cls: type[ReferenceEngine] = ReferenceEngine
) -> ReferenceEngine:
    eng = cls()
    eng.init_config(Common("reference", "kit-test", cfg), False)
    return eng


def starter_config(flow: str) -> StarterConfig:
    return StarterConfig(flow, 0, 0) if flow == "root" else StarterConfig(flow, U_UID, U_GID)


def prepare(flow: str, **fields: Any) -> StarterConfig:
    cfg = ReferenceConfig(argv=["/bin/true"])
    for name, value in fields.items():
        setattr(cfg, name, value)
    sc = starter_config(flow)
    make_engine(cfg).prepare_config(sc)
    return sc


# ============================================================================ config (JSON)


def roundtrip(cfg: ReferenceConfig) -> ReferenceConfig:
    return ReferenceConfig.from_json(json.loads(json.dumps(cfg.to_json())))


def test_default_config_roundtrip_is_exact():
    cfg = ReferenceConfig()
    back = roundtrip(cfg)
    assert back == cfg
    assert back.to_json() == cfg.to_json()
    assert set(cfg.to_json()) == {f.name for f in dataclasses.fields(ReferenceConfig)}


def test_full_config_roundtrip_is_exact():
    cfg = ReferenceConfig(
        argv=["/bin/sh", "-c", "echo 'quoted \"x\"' ünïcode"],
        env={"A": "1", "EMPTY": ""},
        cwd="/usr/lib",
        hostname=None,
        namespaces=["pid", "mount"],
        capabilities=["CAP_KILL", "chown"],
        target_uid=4294967294,
        target_gids=[0, 5, 100],
        mount_proc=False,
        mount_tmp=False,
    )
    back = roundtrip(cfg)
    assert back == cfg
    assert back.to_json() == cfg.to_json()
    # None and empty values survive as themselves, not as defaults.
    assert roundtrip(ReferenceConfig(capabilities=[], target_uid=0)).capabilities == []
    assert roundtrip(ReferenceConfig(capabilities=[], target_uid=0)).target_uid == 0


def test_config_objects_are_fresh():
    eng = ReferenceEngine()
    a, b = eng.config(), eng.config()
    a.env["X"] = "1"
    a.namespaces.append("x")
    assert a is not b and "X" not in b.env and b.namespaces == DEFAULT_NAMESPACES


def test_config_json_type_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"engine config\.target_uid"):
        ReferenceConfig.from_json({"target_uid": "0"})
    with pytest.raises(ConfigError, match=r"unknown field 'rootfs'"):
        ReferenceConfig.from_json({"rootfs": "bind"})  # the bind example is its own engine


# ============================================================ prepare_config: validation

VALIDATION_ERRORS = [
    # (flow, fields, message fragment)
    ("root", {"argv": []}, "argv: the payload command line is empty"),
    ("root", {"argv": ["sh", "-c", "true"]}, "argv[0]: the payload path must be absolute"),
    ("root", {"argv": ["./sh"]}, "argv[0]: the payload path must be absolute"),
    ("userns", {"argv": ["/bin/echo", "a\0b"]}, "argv[1]: contains a NUL byte"),
    ("root", {"env": {"A=B": "x"}}, "env: invalid variable name 'A=B'"),
    ("root", {"env": {"": "x"}}, "env: invalid variable name ''"),
    ("suid", {"env": {"A": "x\0y"}}, "env.A: the value contains a NUL byte"),
    ("root", {"cwd": "tmp"}, "cwd: must be an absolute path"),
    ("root", {"cwd": "/usr/../etc"}, "cwd: must not contain '..' components"),
    ("root", {"cwd": "/usr/"}, "cwd: must be normalised"),
    ("root", {"namespaces": ["mount", "time"]}, "namespaces: unknown namespace 'time'"),
    ("fakeroot", {"namespaces": ["user", "mount"]}, "namespaces: 'user' is chosen by the flow"),
    ("root", {"namespaces": ["pid", "pid"]}, "namespaces: 'pid' is listed twice"),
    (
        "root",
        {"hostname": "h" * 65},
        "hostname: is 65 characters long, the kernel allows at most 64",
    ),
    ("root", {"hostname": ""}, "hostname: must not be empty"),
    ("root", {"hostname": "-bad"}, "hostname: '-bad' is not a valid hostname"),
    ("root", {"hostname": "a b"}, "hostname: 'a b' is not a valid hostname"),
    ("root", {"namespaces": ["mount", "pid"]}, "hostname: setting one needs the 'uts' namespace"),
    (
        "root",
        {"namespaces": ["mount", "uts"]},
        "mount_proc: a new /proc needs the 'mount' and 'pid' namespaces",
    ),
    (
        "root",
        {"namespaces": ["uts", "pid"], "mount_proc": False},
        "mount_tmp: a tmpfs /tmp needs the 'mount' namespace",
    ),
    ("root", {"capabilities": ["CAP_BOGUS"]}, "capabilities: unknown capability 'CAP_BOGUS'"),
    ("root", {"capabilities": ["not_a_cap"]}, "capabilities: unknown capability 'not_a_cap'"),
    (
        "suid",
        {"capabilities": ["sys_admin"]},
        "capabilities: a non-root caller (flow suid) keeps no capabilities; got CAP_SYS_ADMIN",
    ),
    (
        "fakeroot",
        {"capabilities": ["CAP_CHOWN"]},
        "capabilities: a non-root caller (flow fakeroot)",
    ),
    (
        "suid",
        {"target_uid": 0},
        "target_uid/target_gids: only a root caller can choose the container's ids (flow suid)",
    ),
    ("userns", {"target_uid": 1000}, "target_uid/target_gids: only a root caller"),
    ("fakeroot", {"target_gids": [0]}, "target_uid/target_gids: only a root caller"),
    ("hybrid", {"target_uid": 0}, "target_uid/target_gids: only a root caller"),
    ("root", {"target_uid": -1}, "target_uid: -1 is not a valid uid"),
    ("root", {"target_uid": 2**32 - 1}, "target_uid: 4294967295 is not a valid uid"),
    ("root", {"target_gids": [0, -5]}, "target_gids: -5 is not a valid gid"),
]


@pytest.mark.parametrize(
    "flow,fields,message",
    VALIDATION_ERRORS,
    ids=[f"{f}-{m.split(':')[0]}-{i}" for i, (f, _, m) in enumerate(VALIDATION_ERRORS)],
)
def test_prepare_config_rejects_with_the_field_named(flow, fields, message):
    cfg = ReferenceConfig(argv=["/bin/true"])
    for name, value in fields.items():
        setattr(cfg, name, value)
    sc = starter_config(flow)
    untouched = sc.to_json()
    with pytest.raises(ConfigError) as info:
        make_engine(cfg).prepare_config(sc)
    assert message in str(info.value)
    field_name = message.split(":")[0].split("[")[0].split(".")[0].split("/")[0]
    assert str(info.value).startswith(field_name)
    assert sc.to_json() == untouched, "a refused config must not fill the StarterConfig"


def test_the_bind_example_needs_the_mount_namespace():
    cfg = ReferenceConfig(
        argv=["/bin/true"], namespaces=["pid", "uts"], mount_proc=False, mount_tmp=False
    )
    sc = starter_config("root")
    untouched = sc.to_json()
    make_engine(cfg).prepare_config(starter_config("root"))  # fine for the host rootfs
    with pytest.raises(
        ConfigError,
        match=r"^namespaces: the bind root file system needs the "
        r"'mount' namespace",
    ):
        make_engine(cfg, BindRootfsEngine).prepare_config(sc)
    assert sc.to_json() == untouched, "a refused config must not fill the StarterConfig"
    # Everything else is the reference's validation.
    with pytest.raises(ConfigError, match=r"^argv\[0\]: the payload path must be absolute"):
        make_engine(ReferenceConfig(argv=["sh"]), BindRootfsEngine).prepare_config(sc)
    bind_sc = starter_config("fakeroot")
    make_engine(ReferenceConfig(argv=["/bin/true"]), BindRootfsEngine).prepare_config(bind_sc)
    assert bind_sc.to_json() == prepare("fakeroot").to_json()


def test_capability_outside_the_bounding_set_is_rejected(monkeypatch):
    monkeypatch.setattr(engine_mod, "_host_bounding", lambda: set(ROOT_DEFAULT_CAPS))
    with pytest.raises(
        ConfigError,
        match=r"^capabilities: CAP_SYS_TIME not in this host's "
        r"bounding set",
    ):
        prepare("root", capabilities=["CAP_KILL", "sys_time"])


def test_default_root_caps_skip_what_the_host_cannot_grant(monkeypatch):
    monkeypatch.setattr(
        engine_mod, "_host_bounding", lambda: set(ROOT_DEFAULT_CAPS) - {"CAP_MKNOD"}
    )
    sc = prepare("root")
    assert "CAP_MKNOD" not in sc.capabilities["permitted"]
    assert len(sc.capabilities["permitted"]) == len(ROOT_DEFAULT_CAPS) - 1


# ========================================================= prepare_config: what it asks for


@pytest.mark.parametrize("flow", FLOWS)
def test_prepare_config_requests(flow):
    sc = prepare(flow)
    sc.validate()  # what the starter checks before any namespace exists
    expected_ns = {"mount", "pid", "uts", "ipc", "net", "cgroup"}
    if flow in ("userns", "fakeroot", "hybrid"):
        expected_ns.add("user")
    assert set(sc.ns_flags) == expected_ns
    assert sc.bring_loopback_interface is True
    assert sc.mount_propagation == "rprivate"
    assert sc.hybrid_workflow is (flow == "hybrid")
    assert sc.no_new_privs is (flow != "root")
    caps = sc.capabilities
    if flow == "root":
        expected = sorted(set(ROOT_DEFAULT_CAPS) & engine_mod._host_bounding())
        assert sorted(caps["effective"]) == sorted(caps["permitted"]) == expected
        assert sorted(caps["bounding"]) == expected
    else:
        assert caps["effective"] == caps["permitted"] == caps["bounding"] == []
    assert caps["ambient"] is None and caps["inheritable"] is None
    maps = {
        "root": ([], []),
        "suid": ([], []),
        "userns": ([[U_UID, U_UID, 1]], [[U_GID, U_GID, 1]]),
        "fakeroot": ([[0, U_UID, 1]], [[0, U_GID, 1]]),
        "hybrid": ([[0, U_UID, 1]], [[0, U_GID, 1]]),
    }[flow]
    assert (sc.uid_mappings, sc.gid_mappings) == maps
    assert sc.target_uid is None and sc.target_gids == []


def test_prepare_config_root_target_ids_and_explicit_caps():
    sc = prepare("root", target_uid=1000, target_gids=[1000, 27], capabilities=["kill"])
    sc.validate()
    assert sc.target_uid == 1000 and sc.target_gids == [1000, 27]
    assert sc.capabilities["effective"] == ["CAP_KILL"]
    assert prepare("root", capabilities=[]).capabilities["permitted"] == []


def test_prepare_config_without_net_skips_loopback():
    sc = prepare("userns", namespaces=["mount", "pid", "uts"])
    sc.validate()
    assert sc.bring_loopback_interface is False
    assert set(sc.ns_flags) == {"mount", "pid", "uts", "user"}
    sc = prepare("root", namespaces=["uts"], hostname="x", mount_proc=False, mount_tmp=False)
    assert sc.ns_flags == ["uts"] and not sc.bring_loopback_interface
    sc.validate()


# ======================================================= RPC methods: argument checks (unit)


class RecordingSystem:
    """Stands in for kit.system: records privileged calls; mkdir really creates the
    directory (inside the test's own temporary directory), nothing else touches the host."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def mount(self, source, target, fstype=None, flags=(), data=None):
        self.calls.append(("mount", (source, target, fstype, list(flags), data)))

    def umount(self, target, detach=False):
        self.calls.append(("umount", (target, detach)))

    def pivot_root(self, new_root, put_old):
        self.calls.append(("pivot_root", (new_root, put_old)))

    def chdir(self, path):
        self.calls.append(("chdir", (path,)))

    def sethostname(self, name):
        self.calls.append(("sethostname", (name,)))

    def mkdir(self, path, mode=0o755):
        self.calls.append(("mkdir", (path, mode)))
        os.mkdir(path, mode)


@pytest.fixture
def run_tmp(monkeypatch) -> Iterator[str]:
    """A stand-in for the run's temporary directory (tempfile.gettempdir() of the RPC
    server)."""
    base = tempfile.mkdtemp(prefix="kit-ref-test-")
    monkeypatch.setattr(tempfile, "tempdir", base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def make_rpc(cls: type[ReferenceRPC] = BindRootfsRPC, **fields: Any) -> tuple[Any, RecordingSystem]:
    cfg = ReferenceConfig(argv=["/bin/true"])
    for name, value in fields.items():
        setattr(cfg, name, value)
    ops = BindRootfsEngine() if cls is BindRootfsRPC else ReferenceEngine()
    rpc = cls(Engine("reference", ops, Common("reference", "kit-test", cfg)))
    rec = RecordingSystem()
    rpc.system = rec  # type: ignore[assignment]
    return rpc, rec


def tree(path: str) -> list[tuple[str, int]]:
    out = []
    for dirpath, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            full = os.path.join(dirpath, name)
            out.append((os.path.relpath(full, path), os.lstat(full).st_mode))
    return sorted(out)


@pytest.fixture
def made_root(run_tmp) -> tuple[BindRootfsRPC, RecordingSystem, str]:
    """Bind-example RPC methods whose root was made (the tmpfs mount only recorded) and
    populated like the engine does: /usr (dir), /bin -> usr/bin, /dev/null (file), /proc."""
    rpc, rec = make_rpc()
    root = tempfile.mkdtemp(prefix=ROOT_PREFIX)
    rpc.make_root(path=root)
    rpc.mkdir(path="/usr", mode=0o755)
    rpc.mkdir(path="/proc", mode=0o555)
    rpc.mkdir(path="/dev", mode=0o755)
    rpc.symlink(target="usr/bin", path="/bin")
    rpc.symlink(target="/etc", path="/escape")  # would be the host's /etc before pivot
    rpc.create_file(path="/dev/null", mode=0o666)
    rec.calls.clear()
    return rpc, rec, root


@pytest.fixture(params=ENGINES)
def any_rpc(request, run_tmp) -> tuple[ReferenceRPC, RecordingSystem, str | None]:
    """The reference's RPC methods on the host's root, or the bind example's on a made
    root: both have /proc and no /nope."""
    if request.param == "reference":
        rpc, rec = make_rpc(ReferenceRPC)
        return rpc, rec, None
    return request.getfixturevalue("made_root")


# Calls that both engines' RPC methods refuse: (method, kwargs, exception, errno, message).
MOUNT_BAD_CALLS = [
    (
        "mount",
        {"source": "tmpfs", "target": "/proc", "fstype": "tmpfs", "flags": ["bogus"], "data": None},
        ValueError,
        None,
        "unknown mount flags ['bogus']",
    ),
    (
        "mount",
        {"source": "tmpfs", "target": "/proc", "fstype": "tmpfs", "flags": "ro", "data": None},
        ValueError,
        None,
        "flags must be a list",
    ),
    (
        "mount",
        {"source": None, "target": "/proc", "fstype": None, "flags": ["move"], "data": None},
        PermissionError,
        errno.EPERM,
        "['move'] are not allowed",
    ),
    (
        "mount",
        {"source": None, "target": "/proc", "fstype": None, "flags": ["shared"], "data": None},
        PermissionError,
        errno.EPERM,
        "['shared'] are not allowed",
    ),
    (
        "mount",
        {"source": "/dev/vda", "target": "/proc", "fstype": "ext4", "flags": [], "data": None},
        PermissionError,
        errno.EPERM,
        "filesystem type 'ext4' is not allowed",
    ),
    (
        "mount",
        {"source": None, "target": "/proc", "fstype": None, "flags": [], "data": None},
        PermissionError,
        errno.EPERM,
        "filesystem type None is not allowed",
    ),
    (
        "mount",
        {"source": "/dev/vda", "target": "/proc", "fstype": "tmpfs", "flags": [], "data": None},
        ValueError,
        None,
        "source of a tmpfs mount must be null",
    ),
    (
        "mount",
        {"source": "tmpfs", "target": "/proc", "fstype": "tmpfs", "flags": [], "data": "uid=0"},
        ValueError,
        None,
        "tmpfs option 'uid=0' is not allowed",
    ),
    (
        "mount",
        {
            "source": "tmpfs",
            "target": "/proc",
            "fstype": "tmpfs",
            "flags": [],
            "data": "size=1m,mode=0755;x",
        },
        ValueError,
        None,
        "is not allowed",
    ),
    (
        "mount",
        {"source": "tmpfs", "target": "/proc", "fstype": "tmpfs", "flags": [], "data": "size=1\0"},
        ValueError,
        None,
        "data must be a short string",
    ),
    (
        "mount",
        {"source": "tmpfs", "target": "/", "fstype": "tmpfs", "flags": [], "data": None},
        PermissionError,
        errno.EPERM,
        "over the container root",
    ),
    (
        "mount",
        {"source": "tmpfs", "target": "/../proc", "fstype": "tmpfs", "flags": [], "data": None},
        ValueError,
        None,
        "'..' components",
    ),
    (
        "mount",
        {"source": "tmpfs", "target": "proc", "fstype": "tmpfs", "flags": [], "data": None},
        ValueError,
        None,
        "must be an absolute path",
    ),
    (
        "mount",
        {"source": "tmpfs", "target": "/nope", "fstype": "tmpfs", "flags": [], "data": None},
        FileNotFoundError,
        errno.ENOENT,
        "is not a directory",
    ),
    ("sethostname", {"name": "h" * 65}, ValueError, None, "65 characters long"),
    ("sethostname", {"name": ""}, ValueError, None, "must not be empty"),
    ("sethostname", {"name": "bad_name"}, ValueError, None, "not a valid hostname"),
    ("sethostname", {"name": "a\0b"}, ValueError, None, "not a valid hostname"),
]


@pytest.mark.parametrize(
    "method,kwargs,exc,err,message",
    MOUNT_BAD_CALLS,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(MOUNT_BAD_CALLS)],
)
def test_rpc_bad_argument_is_refused_by_both_engines(any_rpc, method, kwargs, exc, err, message):
    rpc, rec, root = any_rpc
    before = tree(root) if root else None
    with pytest.raises(exc) as info:
        getattr(rpc, method)(**kwargs)
    assert type(info.value) is exc
    assert message in str(info.value)
    if err is not None:
        assert info.value.errno == err
    assert rec.calls == [], "a refused call must not reach the system interface"
    assert (tree(root) if root else None) == before


def test_the_host_rootfs_rpc_refuses_bind_mounts_and_remounts():
    rpc, rec = make_rpc(ReferenceRPC)
    for flags in (["bind"], ["bind", "rec"], ["bind", "remount", "ro"], ["remount"]):
        with pytest.raises(
            PermissionError,
            match=r"mount flags \[.*'(bind|remount)'.*\] are "
            r"not allowed",
        ) as info:
            rpc.mount(source="/usr", target="/usr", fstype=None, flags=flags, data=None)
        assert info.value.errno == errno.EPERM
    assert not hasattr(rpc, "make_root") and not hasattr(rpc, "pivot_root")
    assert rec.calls == []


BIND_BAD_CALLS = [
    # (method, kwargs, exception, errno or None, message fragment)
    ("mkdir", {"path": "usr/x", "mode": 0o755}, ValueError, None, "must be an absolute path"),
    ("mkdir", {"path": "/usr/../x", "mode": 0o755}, ValueError, None, "'..' components"),
    ("mkdir", {"path": "/../x", "mode": 0o755}, ValueError, None, "'..' components"),
    ("mkdir", {"path": "/usr//x", "mode": 0o755}, ValueError, None, "must be normalised"),
    ("mkdir", {"path": "/usr/./x", "mode": 0o755}, ValueError, None, "must be normalised"),
    ("mkdir", {"path": "/usr/x\0", "mode": 0o755}, ValueError, None, "NUL byte"),
    ("mkdir", {"path": "/x" * 2100, "mode": 0o755}, ValueError, None, "longer than"),
    ("mkdir", {"path": "/x", "mode": 0o4755}, ValueError, None, "mode must be within"),
    ("mkdir", {"path": "/x", "mode": -1}, ValueError, None, "mode must be within"),
    (
        "mkdir",
        {"path": "/usr", "mode": 0o755},
        FileExistsError,
        errno.EEXIST,
        "'/usr' already exists",
    ),
    (
        "mkdir",
        {"path": "/nope/x", "mode": 0o755},
        FileNotFoundError,
        errno.ENOENT,
        "parent directory of '/nope/x' does not exist",
    ),
    (
        "mkdir",
        {"path": "/bin/x", "mode": 0o755},
        PermissionError,
        errno.EPERM,
        "goes through the symbolic link '/bin'",
    ),
    (
        "mkdir",
        {"path": "/escape/evil", "mode": 0o755},
        PermissionError,
        errno.EPERM,
        "goes through the symbolic link '/escape'",
    ),
    (
        "create_file",
        {"path": "/dev/zero", "mode": 0o777},
        ValueError,
        None,
        "mode must be within 0o0..0o666",
    ),
    (
        "create_file",
        {"path": "/dev/null", "mode": 0o666},
        FileExistsError,
        errno.EEXIST,
        "already exists",
    ),
    (
        "create_file",
        {"path": "/escape/passwd", "mode": 0o666},
        PermissionError,
        errno.EPERM,
        "symbolic link",
    ),
    ("create_file", {"path": "dev/zero", "mode": 0o666}, ValueError, None, "absolute"),
    (
        "symlink",
        {"target": "../../etc", "path": "/x"},
        ValueError,
        None,
        "link target must not contain '..'",
    ),
    ("symlink", {"target": "", "path": "/x"}, ValueError, None, "invalid link target"),
    ("symlink", {"target": "a\0b", "path": "/x"}, ValueError, None, "invalid link target"),
    (
        "symlink",
        {"target": "usr/lib", "path": "/usr"},
        FileExistsError,
        errno.EEXIST,
        "'/usr' already exists",
    ),
    (
        "symlink",
        {"target": "usr/lib", "path": "/bin"},
        PermissionError,
        errno.EPERM,
        "goes through the symbolic link '/bin'",
    ),
    ("symlink", {"target": "x", "path": "/bin/sh"}, PermissionError, errno.EPERM, "symbolic link"),
    (
        "mount",
        {
            "source": None,
            "target": "/proc",
            "fstype": None,
            "flags": ["bind", "shared"],
            "data": None,
        },
        PermissionError,
        errno.EPERM,
        "mount flags ['shared'] are not allowed",
    ),
    (
        "mount",
        {"source": "tmpfs", "target": "/proc", "fstype": "tmpfs", "flags": ["rec"], "data": None},
        ValueError,
        None,
        "'rec' applies to bind mounts only",
    ),
    (
        "mount",
        {
            "source": "tmpfs",
            "target": "/proc",
            "fstype": "tmpfs",
            "flags": ["remount"],
            "data": None,
        },
        ValueError,
        None,
        "only bind mounts can be remounted",
    ),
    (
        "mount",
        {"source": "tmpfs", "target": "/escape", "fstype": "tmpfs", "flags": [], "data": None},
        PermissionError,
        errno.EPERM,
        "symbolic link '/escape'",
    ),
    (
        "mount",
        {"source": "/root", "target": "/usr", "fstype": None, "flags": ["bind"], "data": None},
        PermissionError,
        errno.EPERM,
        "bind source '/root' is not allowed",
    ),
    (
        "mount",
        {
            "source": "/usr/../root",
            "target": "/usr",
            "fstype": None,
            "flags": ["bind"],
            "data": None,
        },
        PermissionError,
        errno.EPERM,
        "not allowed",
    ),
    (
        "mount",
        {"source": "/", "target": "/usr", "fstype": None, "flags": ["bind", "rec"], "data": None},
        PermissionError,
        errno.EPERM,
        "bind source '/' is not allowed",
    ),
    (
        "mount",
        {"source": "/usr", "target": "/usr", "fstype": "tmpfs", "flags": ["bind"], "data": None},
        ValueError,
        None,
        "takes no fstype or data",
    ),
    (
        "mount",
        {"source": "/usr", "target": "/dev/null", "fstype": None, "flags": ["bind"], "data": None},
        ValueError,
        None,
        "must be a directory like '/usr'",
    ),
    (
        "mount",
        {"source": "/dev/null", "target": "/usr", "fstype": None, "flags": ["bind"], "data": None},
        ValueError,
        None,
        "must be a file like '/dev/null'",
    ),
    (
        "mount",
        {
            "source": "/dev/zero",
            "target": "/dev/zero",
            "fstype": None,
            "flags": ["bind"],
            "data": None,
        },
        FileNotFoundError,
        errno.ENOENT,
        "target '/dev/zero' does not exist",
    ),
    (
        "mount",
        {"source": "/usr", "target": "/", "fstype": None, "flags": ["bind"], "data": None},
        PermissionError,
        errno.EPERM,
        "over the container root",
    ),
    (
        "mount",
        {
            "source": "/usr",
            "target": "/usr",
            "fstype": None,
            "flags": ["bind", "remount", "ro"],
            "data": None,
        },
        ValueError,
        None,
        "a remount takes no source",
    ),
    (
        "mount",
        {
            "source": None,
            "target": "/usr",
            "fstype": None,
            "flags": ["bind", "remount", "ro"],
            "data": None,
        },
        ValueError,
        None,
        "'/usr' is not a mount point",
    ),
    (
        "pivot_root",
        {"new_root": "/tmp"},
        PermissionError,
        errno.EPERM,
        "is not the container root made by make_root",
    ),
    ("pivot_root", {"new_root": "relative"}, ValueError, None, "absolute"),
    ("make_root", {"path": "/tmp/x"}, FileExistsError, errno.EEXIST, "is already made"),
]


@pytest.mark.parametrize(
    "method,kwargs,exc,err,message",
    BIND_BAD_CALLS,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(BIND_BAD_CALLS)],
)
def test_bind_rpc_bad_argument_is_refused_and_changes_nothing(
    made_root, method, kwargs, exc, err, message
):
    rpc, rec, root = made_root
    if (
        method == "mount"
        and kwargs.get("source") == "/dev/null"
        and not os.path.exists("/dev/null")
    ):
        pytest.skip("no /dev/null")
    before = tree(root)
    with pytest.raises(exc) as info:
        getattr(rpc, method)(**kwargs)
    assert type(info.value) is exc
    assert message in str(info.value)
    if err is not None:
        assert info.value.errno == err
    assert rec.calls == [], "a refused call must not reach the system interface"
    assert tree(root) == before


@pytest.mark.skipif(not os.path.islink("/bin"), reason="/bin is not a symlink on this host")
def test_bind_rpc_refuses_a_symlink_as_bind_source(made_root):
    rpc, rec, _ = made_root
    with pytest.raises(PermissionError, match="is a symbolic link; recreate it with symlink"):
        rpc.mount(source="/bin", target="/usr", fstype=None, flags=["bind"], data=None)
    assert rec.calls == []


def test_bind_rpc_make_root_checks(run_tmp):
    rpc, rec = make_rpc()
    good = tempfile.mkdtemp(prefix=ROOT_PREFIX)
    other = tempfile.mkdtemp(prefix="other-")
    full = tempfile.mkdtemp(prefix=ROOT_PREFIX)
    open(os.path.join(full, "f"), "w").close()
    afile = os.path.join(run_tmp, ROOT_PREFIX + "file")
    open(afile, "w").close()
    link = os.path.join(run_tmp, ROOT_PREFIX + "link")
    os.symlink(good, link)
    foreign = tempfile.mkdtemp(prefix=ROOT_PREFIX)
    cases = [
        ("relative", ValueError, "must be an absolute path"),
        (good + "/../x", ValueError, "'..' components"),
        ("/etc", PermissionError, "is not a reference-root-* directory directly in"),
        (other, PermissionError, "is not a reference-root-* directory"),
        (os.path.join(good, ROOT_PREFIX + "x"), PermissionError, "directly in the run's"),
        (os.path.join(run_tmp, ROOT_PREFIX + "missing"), FileNotFoundError, "does not exist"),
        (afile, NotADirectoryError, "is not a directory"),
        (link, NotADirectoryError, "is not a directory"),
        (full, OSError, "is not empty"),
    ]
    if os.geteuid() == 0:
        os.chown(foreign, 65534, 65534)
        cases.append((foreign, PermissionError, "belongs to uid 65534"))
    before = tree(run_tmp)
    for path, exc, message in cases:
        with pytest.raises(exc) as info:
            rpc.make_root(path=path)
        assert message in str(info.value), path
    assert rec.calls == [] and rpc.root is None and tree(run_tmp) == before
    # Without a mount namespace, nothing is mounted at all.
    rpc_nomnt, rec_nomnt = make_rpc(namespaces=["pid", "uts"])
    with pytest.raises(PermissionError, match="no mount namespace"):
        rpc_nomnt.make_root(path=good)
    assert rec_nomnt.calls == []
    rpc.make_root(path=good)
    assert rec.calls == [
        ("mount", ("tmpfs", good, "tmpfs", ["nosuid", "nodev"], "mode=0755,size=1m,nr_inodes=1024"))
    ]
    assert rpc.root == good


def test_bind_rpc_without_a_root_creates_nothing_on_the_host(run_tmp):
    rpc, rec = make_rpc()
    before = tree(run_tmp)
    for method, kwargs in (
        ("mkdir", {"path": "/kit-ref-evil", "mode": 0o755}),
        ("create_file", {"path": "/kit-ref-evil", "mode": 0o644}),
        ("symlink", {"target": "x", "path": "/kit-ref-evil"}),
    ):
        with pytest.raises(PermissionError, match="no container root was made"):
            getattr(rpc, method)(**kwargs)
    with pytest.raises(PermissionError, match="not the container root made by make_root"):
        rpc.pivot_root(new_root="/")
    assert not os.path.lexists("/kit-ref-evil")
    assert rec.calls == [] and tree(run_tmp) == before


def test_host_rpc_mounts_on_the_container_namespace_paths():
    # On the host's root, mounts land in the container's own mount namespace (which the
    # config guarantees): /proc and /tmp as the engine asks.
    rpc, rec = make_rpc(ReferenceRPC)
    rpc.mount(source="proc", target="/proc", fstype="proc", flags=["nosuid"], data=None)
    rpc.mount(source=None, target="/tmp", fstype="tmpfs", flags=[], data="mode=1777")
    rpc.sethostname(name="my-host.example")
    assert rec.calls == [
        ("mount", ("proc", "/proc", "proc", ["nosuid"], None)),
        ("mount", ("tmpfs", "/tmp", "tmpfs", [], "mode=1777")),
        ("sethostname", ("my-host.example",)),
    ]


@pytest.mark.parametrize("cls", [ReferenceRPC, BindRootfsRPC])
def test_rpc_refuses_to_touch_host_namespaces(cls):
    rpc, rec = make_rpc(cls, namespaces=["ipc"], hostname=None)
    with pytest.raises(PermissionError, match="no mount namespace; refusing to change the host's"):
        rpc.mount(source="tmpfs", target="/tmp", fstype="tmpfs", flags=[], data=None)
    with pytest.raises(PermissionError, match="no uts namespace"):
        rpc.sethostname(name="evil")
    rpc2, rec2 = make_rpc(cls, namespaces=["mount"])
    with pytest.raises(PermissionError, match="no pid namespace"):
        rpc2.mount(source="proc", target="/proc", fstype="proc", flags=[], data=None)
    assert rec.calls == [] and rec2.calls == []


def test_bind_rpc_good_calls_reach_the_system_interface(made_root):
    rpc, rec, root = made_root
    rpc.sethostname(name="my-host.example")
    rpc.mount(
        source="tmpfs", target="/dev", fstype="tmpfs", flags=["nosuid"], data="mode=0755,size=64k"
    )
    rpc.mount(source="/usr", target="/usr", fstype=None, flags=["bind", "ro", "nodev"], data=None)
    assert rec.calls[0] == ("sethostname", ("my-host.example",))
    assert rec.calls[1] == (
        "mount",
        ("tmpfs", root + "/dev", "tmpfs", ["nosuid"], "mode=0755,size=64k"),
    )
    assert rec.calls[2] == ("mount", ("/usr", root + "/usr", None, ["bind"], None))
    op, (src, target, fstype, flags, _data) = rec.calls[3]
    assert (op, src, target, fstype) == ("mount", None, root + "/usr", None)
    assert flags[:4] == ["bind", "remount", "ro", "nodev"]  # plus flags kept from the source
    rec.calls.clear()
    rpc.pivot_root(new_root=root)
    assert rec.calls == [
        ("chdir", (root,)),
        ("pivot_root", (".", ".")),
        ("umount", (".", True)),
        ("chdir", ("/",)),
    ]
    assert rpc.root == "/" and rpc.pivoted
    rec.calls.clear()
    with pytest.raises(PermissionError, match="already done"):
        rpc.pivot_root(new_root=root)
    with pytest.raises(PermissionError, match="out of reach after pivot_root"):
        rpc.mount(source="/usr", target="/usr", fstype=None, flags=["bind"], data=None)
    assert rec.calls == []


def test_rpc_errors_keep_their_type_and_errno_over_the_wire(made_root):
    rpc, rec, root = made_root
    methods = {f"reference.{m}": getattr(rpc, m) for m in BIND_RPC_METHODS}
    server_sock, client_sock = socket.socketpair()
    thread = threading.Thread(target=serve, args=(server_sock, methods), daemon=True)
    thread.start()
    client = RPCClient(client_sock, "reference")
    try:
        with pytest.raises(PermissionError) as info:
            client.mount(source="/root", target="/usr", fstype=None, flags=["bind"], data=None)
        assert info.value.errno == errno.EPERM and "not allowed" in str(info.value)
        with pytest.raises(ValueError, match=r"'..' components"):
            client.mkdir(path="/../x", mode=0o755)
        with pytest.raises(FileNotFoundError) as info:
            client.mkdir(path="/a/b", mode=0o755)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(TypeError):  # the kit checks the signature: a missing argument
            client.mkdir(path="/x")
        client.mkdir(path="/x", mode=0o700)  # still serving after errors
    finally:
        client.close()
        thread.join(5)
        server_sock.close()
    assert os.path.isdir(os.path.join(root, "x"))
    assert [c[0] for c in rec.calls] == ["mkdir"]


# ====================================================== real mounts: RPC server in a child


def _host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


def _child_rpc_server(sock: socket.socket, report_w: int, cfg: ReferenceConfig) -> None:
    """Forked child: own mount and uts namespaces, serve BindRootfsRPC like the kit's RPC
    server, then report what its root looks like after the pivot."""
    code = 1
    try:
        from kit.system import current

        linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWUTS)
        current().set_propagation("/", "rprivate")
        eng = Engine("reference", BindRootfsEngine(), Common("reference", "kit-test", cfg))
        rpc = BindRootfsRPC(eng)
        serve(sock, {f"reference.{m}": getattr(rpc, m) for m in BIND_RPC_METHODS})
        report = {
            "ls": sorted(os.listdir("/")),
            "dev": sorted(os.listdir("/dev")),
            "hostname": socket.gethostname(),
            "sh": os.path.exists("/usr/bin/sh"),
            "bin": os.readlink("/bin") if os.path.islink("/bin") else None,
            "root_ro": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
            "usr_ro": bool(os.statvfs("/usr").f_flag & os.ST_RDONLY),
            "tmp_rw": not os.statvfs("/tmp").f_flag & os.ST_RDONLY,
            "null_chr": stat.S_ISCHR(os.stat("/dev/null").st_mode),
            "pivoted": rpc.pivoted,
        }
        os.write(report_w, json.dumps(report).encode())
        code = 0
    except BaseException as exc:  # reported to the parent through the pipe
        os.write(report_w, json.dumps({"error": repr(exc)}).encode())
    os._exit(code)


def test_bind_example_create_container_with_real_mounts(run_tmp):
    """The master's create_container (here in pytest, unprivileged work only) against a
    real RPC server in a child with its own mount namespace: the root is built, pivoted
    into, and nothing shows on the host; cleanup_container removes the directory."""
    need_root()
    os.chmod(run_tmp, 0o755)
    cfg = ReferenceConfig(argv=["/bin/true"], hostname="ref-real")
    mounts_before, hostname_before = _host_mounts(), socket.gethostname()
    master_sock, server_sock = socket.socketpair()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        master_sock.close()
        os.close(report_r)
        _child_rpc_server(server_sock, report_w, cfg)
    server_sock.close()
    os.close(report_w)
    eng = make_engine(cfg, BindRootfsEngine)
    ctx = Context()
    try:
        eng.create_container(ctx, pid, master_sock)
        root_dir = eng._root_dir
        assert root_dir is not None and os.path.dirname(root_dir) == run_tmp
        # After the pivot, the host is out of reach and every check still holds.
        client = RPCClient(master_sock, "reference")
        with pytest.raises(PermissionError, match="out of reach after pivot_root"):
            client.mount(source="/usr", target="/usr", fstype=None, flags=["bind"], data=None)
        with pytest.raises(ValueError, match=r"'..' components"):
            client.mkdir(path="/../etc/evil", mode=0o755)
    finally:
        master_sock.close()
        with os.fdopen(report_r, "rb") as f:
            report = json.loads(f.read() or b"{}")
        _, status = os.waitpid(pid, 0)
    assert status == 0, report
    assert report["pivoted"] and report["hostname"] == "ref-real"
    assert report["sh"] and report["root_ro"] and report["usr_ro"] and report["tmp_rw"]
    assert report["null_chr"]
    assert {"usr", "etc", "proc", "tmp", "dev"} <= set(report["ls"])
    assert not {"work", "root", "home", "var"} & set(report["ls"])
    if os.path.islink("/bin"):
        assert report["bin"] == os.readlink("/bin")
    assert {os.path.basename(d) for d in BIND_DEVICES} <= set(report["dev"])
    assert {"fd", "stdin", "stdout", "stderr"} <= set(report["dev"])
    # On the host: no mount, same hostname, and an empty directory that cleanup removes.
    assert _host_mounts() == mounts_before
    assert socket.gethostname() == hostname_before
    assert os.listdir(root_dir) == []
    eng.cleanup_container(ctx, None, 0)
    assert os.listdir(run_tmp) == []
    eng.cleanup_container(ctx, None, 0)  # idempotent


# ======================================================= monitor_container, cleanup (unit)


def _fork_child(body) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body()
        finally:
            os._exit(code)
    return pid


def test_monitor_forwards_only_the_usual_signals_and_returns_the_status():
    ready_r, ready_w = os.pipe()

    def container() -> int:
        signal.signal(signal.SIGWINCH, lambda *_: os._exit(99))  # must not be forwarded
        signal.signal(signal.SIGTERM, lambda *_: os._exit(42))
        os.write(ready_w, b"x")
        while True:
            time.sleep(1)

    pid = _fork_child(container)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    channel = SignalChannel()
    channel.put(signal.SIGWINCH)
    channel.put(signal.SIGTERM)
    status = ReferenceEngine().monitor_container(pid, channel)
    assert os.waitstatus_to_exitcode(status) == 42


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2])
def test_monitor_forwards_each_usual_signal(sig):
    ready_r, ready_w = os.pipe()

    def container() -> int:
        signal.signal(sig, lambda *_: os._exit(sig))
        os.write(ready_w, b"x")
        while True:
            time.sleep(1)

    pid = _fork_child(container)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    channel = SignalChannel()
    channel.put(sig)
    assert os.waitstatus_to_exitcode(ReferenceEngine().monitor_container(pid, channel)) == sig


def test_monitor_reaps_only_the_container():
    other = _fork_child(lambda: 3)
    container = _fork_child(lambda: (time.sleep(0.3), 5)[1])
    channel = SignalChannel()
    channel.put(signal.SIGCHLD)  # the other child's exit: not ours
    status = ReferenceEngine().monitor_container(container, channel)
    assert os.waitstatus_to_exitcode(status) == 5
    # The other child is still there to be reaped by its owner.
    wpid, other_status = os.waitpid(other, 0)
    assert wpid == other and os.waitstatus_to_exitcode(other_status) == 3


def test_monitor_reports_a_container_reaped_by_someone_else():
    pid = _fork_child(lambda: 0)
    os.waitpid(pid, 0)
    with pytest.raises(ChildProcessError, match=f"container process {pid} was reaped"):
        ReferenceEngine().monitor_container(pid, SignalChannel())


def test_host_cleanup_has_nothing_to_undo(run_tmp):
    eng = make_engine(ReferenceConfig())
    before = tree(run_tmp)
    eng.cleanup_container(Context(), None, None)
    eng.cleanup_container(Context(), RuntimeError("container creation failed"), 0)
    assert tree(run_tmp) == before


def test_bind_cleanup_is_idempotent_and_tolerates_partial_setup(run_tmp):
    ctx = Context()
    eng = make_engine(ReferenceConfig(), BindRootfsEngine)
    eng.cleanup_container(ctx, None, None)  # nothing was made
    eng.cleanup_container(ctx, RuntimeError("container creation failed"), None)
    eng._root_dir = tempfile.mkdtemp(prefix=ROOT_PREFIX)  # made, make_root never ran
    eng.cleanup_container(ctx, RuntimeError("x"), None)
    assert os.listdir(run_tmp) == []
    eng.cleanup_container(ctx, None, 0)
    eng._root_dir = os.path.join(run_tmp, ROOT_PREFIX + "gone")  # already removed
    eng.cleanup_container(ctx, None, 0)
    path = tempfile.mkdtemp(prefix=ROOT_PREFIX)  # files on the host side (not a mount)
    os.mkdir(os.path.join(path, "usr"))
    open(os.path.join(path, "usr", "f"), "w").close()
    eng._root_dir = path
    eng.cleanup_container(ctx, None, 0)
    assert os.listdir(run_tmp) == []


def test_start_process_reports_a_missing_payload_and_cwd(tmp_path):
    cwd = os.getcwd()
    not_executable = tmp_path / "data"
    not_executable.write_text("not a program")
    not_executable.chmod(0o644)
    eng = make_engine(ReferenceConfig(argv=["/nonexistent/payload"], cwd=cwd))
    with pytest.raises(
        FileNotFoundError,
        match=r"payload '/nonexistent/payload' not found in "
        r"the container's root file system",
    ):
        eng.start_process(-1)
    eng = make_engine(ReferenceConfig(argv=["/bin/true"], cwd="/nonexistent/dir"))
    with pytest.raises(FileNotFoundError, match="cwd: cannot enter '/nonexistent/dir'"):
        eng.start_process(-1)
    eng = make_engine(ReferenceConfig(argv=[str(not_executable)], cwd=cwd))
    with pytest.raises(PermissionError, match=r"cannot execute payload '.*/data': Permission"):
        eng.start_process(-1)
    assert os.getcwd() == cwd


# ================================================================== whole lifecycles


def invoker_uid(result) -> int:
    return result.ledger.first("run_start")["invoker"]["uid"]


def status_fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in (
            "Pid",
            "NSpid",
            "Uid",
            "Gid",
            "CapEff",
            "CapPrm",
            "CapBnd",
            "NoNewPrivs",
        ):
            out[key] = value.strip()
    return out


PAYLOAD = (
    "hostname; echo $$; echo ---; cat /proc/self/status; echo ---; ls /proc; echo ---; ls /; exit 7"
)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("flow", FLOWS)
def test_lifecycle_in_every_flow(flow, engine):
    need_flow(flow)
    hostname = f"{engine}-{flow}"
    result = run(engine, flow, ["/bin/sh", "-c", PAYLOAD], engine_config={"hostname": hostname})
    assert result.exit_code == 7, (result.reason, result.stderr)
    assert result.leaks == []
    head, status, procs, root = result.stdout.split("---\n")
    assert head.split() == [hostname, "1"], "the configured hostname; the shell is pid 1"
    fields = status_fields(status)
    # A /proc of the container's pid namespace: one level of NSpid, a small pid for cat.
    assert fields["NSpid"] == fields["Pid"] and int(fields["Pid"]) < 10
    pids = [p for p in procs.split() if p.isdigit()]
    assert "1" in pids
    assert len(pids) <= 3, f"a new /proc shows only the container's processes: {pids}"
    uid = {"root": 0, "fakeroot": 0, "hybrid": 0}.get(flow, invoker_uid(result))
    assert fields["Uid"].split() == [str(uid)] * 4
    if flow == "root":
        expected = sorted(set(ROOT_DEFAULT_CAPS) & engine_mod._host_bounding())
        assert linux.mask_to_caps(int(fields["CapEff"], 16)) == sorted(
            expected, key=linux.CAP_NUMBERS.__getitem__
        )
        assert fields["NoNewPrivs"] == "0"
    else:
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
        assert fields["NoNewPrivs"] == "1"
    top = set(root.split())
    if engine == "reference-bind":
        assert top == {p.lstrip("/") for p in HOST_BIND_DIRS if os.path.lexists(p)} | {
            "dev",
            "proc",
            "tmp",
        }
    else:
        assert "work" in top and "home" in top
    hooks = [h for h in result.ledger.hooks() if h[0] == "master"]
    assert ("master", "cleanup_container") in hooks


def container_pid(handle: RunHandle) -> int | None:
    for pid in linux.descendants(handle.starter_pid):
        if os.path.exists(f"/proc/{pid}/root/tmp/ready"):
            return pid
    return None


def signalled_run(flow: str, engine: str, sig: int) -> tuple[Any, int]:
    code = 40 + sig
    name = signal.Signals(sig).name[3:]
    script = f'trap "exit {code}" {name}; touch /tmp/ready; while :; do sleep 0.05; done'
    handle = start(engine, flow, ["/bin/sh", "-c", script], probes=False)
    try:
        deadline = time.monotonic() + 20
        while container_pid(handle) is None:
            assert time.monotonic() < deadline, "the payload never started"
            assert handle.poll() is None, "the run ended before the payload started"
            time.sleep(0.02)
        handle.send_signal(sig)
        return handle.wait(), code
    except BaseException:
        handle.kill()
        raise


BIND = "reference-bind"
SIGNAL_CASES = [
    ("root", "reference", signal.SIGTERM),
    ("root", BIND, signal.SIGINT),
    ("suid", BIND, signal.SIGTERM),
    ("suid", "reference", signal.SIGHUP),
    ("userns", BIND, signal.SIGTERM),
    ("userns", "reference", signal.SIGUSR1),
    ("fakeroot", BIND, signal.SIGTERM),
    ("fakeroot", "reference", signal.SIGUSR2),
    ("hybrid", BIND, signal.SIGTERM),
    ("hybrid", "reference", signal.SIGHUP),
]


@pytest.mark.parametrize(
    "flow,engine,sig",
    SIGNAL_CASES,
    ids=[f"{f}-{e}-{signal.Signals(s).name}" for f, e, s in SIGNAL_CASES],
)
def test_signals_reach_the_payload(flow, engine, sig):
    need_flow(flow)
    result, code = signalled_run(flow, engine, sig)
    assert result.exit_code == code, (result.reason, result.stderr)
    assert result.leaks == []
    forwarded = [e for e in result.ledger.select("signal") if e["signum"] == sig]
    assert forwarded, "the master saw the signal"


def test_env_and_cwd_reach_the_payload():
    need_flow("suid")
    result = run(
        BIND,
        "suid",
        ["/bin/sh", "-c", 'echo "$FOO|$PATH|${HOME-unset}|$(pwd)"'],
        engine_config={"cwd": "/usr/lib", "env": {"FOO": "bar baz", "PATH": "/usr/bin:/bin"}},
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "bar baz|/usr/bin:/bin|unset|/usr/lib"
    assert result.leaks == []


def test_missing_payload_is_a_clear_stage2_failure():
    need_flow("userns")
    host_only = os.path.realpath(__file__)  # exists on the host, not in the bind rootfs
    result = run(BIND, "userns", [host_only])
    assert result.exit_code == 255
    failed = result.ledger.select("stage2_failed")
    assert (
        failed
        and f"payload {host_only!r} not found in the container's root file system"
        in failed[0]["message"]
    )
    hooks = [h[1] for h in result.ledger.hooks() if h[0] == "master"]
    assert "post_start_process" not in hooks and "cleanup_container" in hooks
    assert result.leaks == []


def test_invalid_config_stops_in_stage1():
    result = run(BIND, "root", ["/bin/true"], engine_config={"hostname": "x" * 70})
    assert result.exit_code == 255
    error = result.ledger.first("hook_raise")
    assert error["hook"] == "prepare_config" and error["role"] == "stage1"
    assert error["error"]["message"].startswith("hostname: is 70 characters long")
    assert not result.ledger.select("namespaces")
    assert result.leaks == []


class BrokenPivotRPC(BindRootfsRPC):
    def pivot_root(self, new_root: str) -> None:
        raise OSError(errno.EIO, "injected pivot_root failure")


class BrokenPivotEngine(BindRootfsEngine):
    """The bind example whose last RPC step fails: everything else is mounted."""

    engine_name = "reference-broken-pivot"
    rpc_methods = BrokenPivotRPC


@pytest.mark.parametrize("flow", ["root", "fakeroot"])
def test_failed_create_container_leaves_nothing(flow):
    need_flow(flow)
    result = run(f"{__name__}:BrokenPivotEngine", flow, ["/bin/true"])
    assert result.exit_code == 255
    fatal = result.ledger.first("fatal")["message"]
    assert "container creation failed" in fatal and "injected pivot_root failure" in fatal
    assert not [e for e in result.ledger.select("hook_raise") if e["hook"] == "cleanup_container"]
    assert result.leaks == []  # the root directory is gone, no mount, no process


# ============================================================================ soak


def living_descendants() -> list[int]:
    """This process's living descendants, zombies and exiting ones left out (the launcher's
    zygote reaps the last run's supervisor only when it forks the next one), and the host
    sandboxes the zygote holds (the next run's, built ahead, is a new one after every
    sandboxed run)."""
    from conftest import zygotes_sandbox

    return sorted(
        p
        for p in linux.descendants(os.getpid())
        if linux.process_alive(p) and not zygotes_sandbox(p)
    )


def test_consecutive_runs_leak_nothing():
    """Lifecycles back to back, cycling through the flows and both engines: no leak
    reported by the kit (processes, host mounts, files left in the run's temporary
    directory), every run's temporary directory gone, and the test process's fds, the host's
    mounts, this process's children and the number of the zygote's fds as before. 100 runs
    (ten of each flow and engine; about 10 s, 30 s under CI's coverage: every count above is
    exact, so a leak of one thing a run shows at once); 1,000 with KIT_SOAK=1; 20 when the
    launcher starts a fresh interpreter per run (KIT_ZYGOTE=0, ~3x slower)."""
    slow_launcher = os.environ.get("KIT_ZYGOTE", "1") == "0"
    runs = 1000 if os.environ.get("KIT_SOAK") == "1" else 20 if slow_launcher else 100
    flows = [f for f in FLOWS if environment.flows()[f][0]]
    if not flows:
        pytest.skip("no flow can run here")
    # A first run starts whatever the launcher keeps between runs (its zygote), so that
    # the snapshots below compare steady states.
    assert run("reference", flows[0], ["/bin/true"], probes=False).exit_code == 0
    fds_before = sorted(os.listdir("/proc/self/fd"))
    mounts_before = _host_mounts()
    children_before = living_descendants()
    zygote = Zygote.get_existing()
    zygote_fds = None if zygote is None else _settled_fd_count(zygote.proc.pid)
    run_dirs = []
    for i in range(runs):
        flow = flows[i % len(flows)]
        engine = ENGINES[(i // len(flows)) % 2]
        result = run(engine, flow, ["/bin/sh", "-c", f"exit {i % 7}"], probes=False)
        assert (result.exit_code, result.leaks) == (i % 7, []), (
            i,
            flow,
            engine,
            result.reason,
            result.stderr,
        )
        run_dirs.append(result.ledger.first("run_start")["run_dir"])
    assert [d for d in run_dirs if os.path.lexists(d)] == []
    assert sorted(os.listdir("/proc/self/fd")) == fds_before
    assert _host_mounts() == mounts_before
    # Nothing new survives (the last run's supervisor may take a moment to exit).
    deadline = time.monotonic() + 5
    while not set(living_descendants()) <= set(children_before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(living_descendants()) <= set(children_before)
    if zygote is not None:
        # What the zygote holds for a run (its copies of the sandbox's sysctl files, init's
        # pidfd) goes once the supervisor is reaped; it may be building the next sandbox:
        # counted once it is idle again, as before the runs.
        assert _settled_fd_count(zygote.proc.pid) == zygote_fds


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settled_fd_count(pid: int, timeout: float = 10.0) -> int:
    """The number of the zygote ``pid``'s fds once it is idle (it may be building a sandbox
    ahead, half a thousand sysctl files to open, when asked) and the same three reads 50 ms
    apart."""
    deadline = time.monotonic() + timeout
    counts = [-1]
    while not (len(counts) >= 3 and len(set(counts[-3:])) == 1 and zygote_idle(pid)):
        assert time.monotonic() < deadline, f"the fds of {pid} never settled: {counts[-5:]}"
        time.sleep(0.05)
        counts.append(_fd_count(pid))
    return counts[-1]
