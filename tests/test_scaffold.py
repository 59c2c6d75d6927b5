"""``python -m kit new``: names it refuses, directories it will not overwrite, what it writes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kit.cli import main
from kit.scaffold import Names, ScaffoldError, write_package


@pytest.mark.parametrize(
    "name", ["", "My-Engine", "my.engine", "1box", "my engine", "class", "box-", "-box"]
)
def test_a_name_that_cannot_be_a_package_is_refused_naming_it(
    name: str, tmp_path: Path, capsys
) -> None:
    assert main(["new", "--", name, str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"engine name {name!r}" in err and not (tmp_path / "x").exists()


def test_a_non_empty_directory_is_never_written_into(tmp_path: Path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["new", "box", str(tmp_path)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_names_derive_the_package_and_classes() -> None:
    assert Names.of("my-engine") == Names("my-engine", "my_engine", "My")
    assert Names.of("box") == Names("box", "box", "Box")
    with pytest.raises(ScaffoldError):
        Names.of("import")


def test_the_package_has_every_hook_commented_with_where_it_runs(tmp_path: Path) -> None:
    written = write_package("box", tmp_path / "box")
    rel = sorted(str(p.relative_to(tmp_path / "box")) for p in written)
    assert rel == [
        ".github/workflows/conformance.yml",
        "README.md",
        "box/__init__.py",
        "box/engine.py",
        "box/rpc.py",
        "pyproject.toml",
        "tests/test_create_container.py",
    ]
    source = (tmp_path / "box/box/engine.py").read_text()
    tree = ast.parse(source)
    engine = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BoxEngine")
    methods = {f.name: f for f in engine.body if isinstance(f, ast.FunctionDef)}
    lines = source.splitlines()
    for hook in (
        "config",
        "prepare_config",
        "create_container",
        "post_start_process",
        "monitor_container",
        "cleanup_container",
        "start_process",
    ):
        body_start = methods[hook].body[0].lineno
        comment = lines[methods[hook].lineno : body_start]
        assert any(c.strip().startswith("#") for c in comment), f"{hook}: no comment on top"
    for path in written:
        assert (
            "__" + "ENGINE_NAME__" not in path.read_text() and "__BASE__" not in path.read_text()
        ), path
    assert (
        '[project.entry-points."kit.engines"]\nbox = "box:register"'
        in (tmp_path / "box/pyproject.toml").read_text()
    )
