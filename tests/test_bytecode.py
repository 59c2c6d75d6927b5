"""The engine's bytecode, compiled ahead outside its runs (kit.run.bytecode)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from kit import registry
from kit.run import bytecode
from kit.run.launcher import run
from kit.run.request import Invoker

#: Executed, it would leave a file beside itself: compiling must not execute it.
RUNS_IF_EXECUTED = "open(__file__ + '.ran', 'w').close()\n"


@pytest.fixture
def writes_bytecode(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process writes bytecode (the development machine sets PYTHONDONTWRITEBYTECODE)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    monkeypatch.setattr(bytecode, "_started", set())


def _compile(spec: str, path: list[str]) -> None:
    pid = bytecode.start(spec, path)
    assert pid is not None
    bytecode.wait(pid, 60)


def _package(root: Path, name: str) -> Path:
    pkg = root / name
    (pkg / "sub").mkdir(parents=True)
    for rel in ("__init__.py", "engine.py", "sub/__init__.py", "sub/deep.py"):
        (pkg / rel).write_text(RUNS_IF_EXECUTED)
    return pkg


def _compiled(pkg: Path) -> set[str]:
    return {
        str(p.relative_to(pkg)).replace("__pycache__/", "").split(".")[0]
        for p in pkg.rglob("*.pyc")
    }


def test_every_module_of_the_package_is_compiled_and_none_runs(tmp_path, writes_bytecode):
    pkg = _package(tmp_path, "bc_pkg_all")
    _compile("bc_pkg_all.engine:Engine", [str(tmp_path)])
    assert _compiled(pkg) == {"__init__", "engine", "sub/__init__", "sub/deep"}
    assert not list(tmp_path.rglob("*.ran"))  # compiled, never executed


def test_links_large_files_and_the_cap_are_left_to_the_starter(
    tmp_path, writes_bytecode, monkeypatch
):
    pkg = _package(tmp_path, "bc_pkg_limits")
    outside = tmp_path / "outside.py"
    outside.write_text("x = 1\n")
    (pkg / "linked.py").symlink_to(outside)
    (pkg / "large.py").write_text("x = 1\n" * 100)
    (pkg / ".hidden").mkdir()
    (pkg / ".hidden" / "h.py").write_text("x = 1\n")
    monkeypatch.setattr(bytecode, "MAX_SOURCE_BYTES", 200)
    _compile("bc_pkg_limits:Engine", [str(tmp_path)])
    assert _compiled(pkg) == {"__init__", "engine", "sub/__init__", "sub/deep"}
    linked_package = tmp_path / "bc_pkg_linked"
    linked_package.symlink_to(pkg)
    assert bytecode.sources("bc_pkg_linked", [str(tmp_path)]) == []
    monkeypatch.setattr(bytecode, "MAX_FILES", 2)
    assert len(bytecode.sources("bc_pkg_limits", [str(tmp_path)])) == 2


def test_the_child_imports_nothing_from_the_engines_path(tmp_path, writes_bytecode, monkeypatch):
    # The zygote puts a run's import path before the standard library: a compileall.py of
    # the engine's there, imported by the compiling child, would run outside any sandbox.
    pkg = _package(tmp_path, "bc_pkg_planted")
    for name in ("compileall", "py_compile", "filecmp"):
        (tmp_path / f"{name}.py").write_text(RUNS_IF_EXECUTED)
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    _compile("bc_pkg_planted:Engine", [str(tmp_path)])
    assert _compiled(pkg) == {"__init__", "engine", "sub/__init__", "sub/deep"}
    assert not list(tmp_path.rglob("*.ran"))


@pytest.mark.skipif(os.geteuid() != 0, reason="root's own rules: what others may write")
def test_root_writes_no_bytecode_through_a_link_or_into_what_others_may_write(
    tmp_path, writes_bytecode
):
    pkg = _package(tmp_path, "bc_pkg_guarded")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (pkg / "sub" / "__pycache__").symlink_to(elsewhere)  # a swapped __pycache__
    (pkg / "open").mkdir()
    (pkg / "open" / "mod.py").write_text(RUNS_IF_EXECUTED)
    (pkg / "open").chmod(0o777)  # any user could swap its entries
    _compile("bc_pkg_guarded:Engine", [str(tmp_path)])
    assert _compiled(pkg) == {"__init__", "engine"}
    assert list(elsewhere.iterdir()) == []


def test_nothing_is_compiled_when_switched_off_or_the_engine_is_not_found(
    tmp_path, writes_bytecode, monkeypatch
):
    _package(tmp_path, "bc_pkg_switch")
    monkeypatch.setenv(bytecode.SWITCH_ENV, "0")
    assert bytecode.start("bc_pkg_switch:Engine", [str(tmp_path)]) is None
    monkeypatch.delenv(bytecode.SWITCH_ENV)
    assert bytecode.start("bc_pkg_missing:Engine", [str(tmp_path)]) is None
    # An entry point's module is known only from metadata this process read already.
    monkeypatch.setattr(registry, "entry_points_read", lambda: None)
    assert bytecode.engine_module("an-entry-point-name") is None
    assert not list(tmp_path.rglob("*.pyc"))


def test_a_module_in_no_package_is_compiled_alone(tmp_path, writes_bytecode):
    (tmp_path / "bc_single.py").write_text(RUNS_IF_EXECUTED)
    (tmp_path / "bc_neighbour.py").write_text(RUNS_IF_EXECUTED)
    _compile("bc_single:Engine", [str(tmp_path)])
    assert [p.name for p in (tmp_path / "__pycache__").iterdir()] == [
        f"bc_single.{sys.implementation.cache_tag}.pyc"
    ]
    assert not list(tmp_path.rglob("*.ran"))


def test_nothing_is_written_where_bytecode_is_off_or_done(tmp_path, monkeypatch):
    _package(tmp_path, "bc_pkg_off")
    monkeypatch.setattr(bytecode, "_started", set())
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert bytecode.start("bc_pkg_off:Engine", [str(tmp_path)]) is None
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    _compile("bc_pkg_off:Engine", [str(tmp_path)])
    assert bytecode.start("bc_pkg_off:Engine", [str(tmp_path)]) is None  # once per spec


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to see the files owned by another user")
def test_root_compiles_as_the_owner_of_the_engines_directory(writes_bytecode):
    try:
        user = Invoker.resolve()
    except ValueError:
        pytest.skip("no unprivileged user on this machine")
    # Where the owner can reach it (pytest's tmp_path is in a directory of root's alone).
    root = Path(tempfile.mkdtemp(prefix="kit-test-bytecode-", dir="/tmp"))
    try:
        root.chmod(0o755)
        pkg = _package(root, "bc_pkg_owned")
        for path in [pkg, *pkg.rglob("*")]:
            os.chown(path, user.uid, user.gid)
        _compile("bc_pkg_owned:Engine", [str(root)])
        written = [*pkg.rglob("__pycache__"), *pkg.rglob("*.pyc")]
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in written}
    finally:
        shutil.rmtree(root)
    assert len(written) == 6
    assert owners == {(user.uid, user.gid)}


def test_a_runs_starter_imports_the_bytecode_compiled_ahead(tmp_path, writes_bytecode):
    # The source is changed after compiling, keeping its size and time: Python trusts the
    # bytecode then, so which of the two the starter ran tells whether it read the bytecode.
    module = tmp_path / "bc_run_engine.py"
    source = (
        "import sys\n"
        "print('VARIANT-{}', file=sys.stderr)\n"
        "from reference_engines.minimal.engine import ReferenceEngine\n"
        "from reference_engines.minimal.rpc import ReferenceRPC\n"
        "class BytecodeEngine(ReferenceEngine):\n"
        "    engine_name = 'bytecode-test'\n"
        "    rpc_methods = ReferenceRPC\n"
    )
    module.write_text(source.format("A"))
    spec = "bc_run_engine:BytecodeEngine"
    _compile(spec, [str(tmp_path)])
    before = module.stat()
    module.write_text(source.format("B"))
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    sys.path.insert(0, str(tmp_path))
    try:
        result = run(spec, "root", ["/bin/true"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("bc_run_engine", None)
    assert result.exit_code == 0, result.reason
    assert "VARIANT-A" in result.stderr and "VARIANT-B" not in result.stderr, result.stderr
