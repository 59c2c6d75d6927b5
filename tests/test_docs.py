"""The documentation runs: every code block of the READMEs says how it is tested, and is."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = (
    "README.md",
    "conformance/README.md",
    "reference_engines/minimal/README.md",
    "reference_engines/bind_rootfs/README.md",
)
FLOWS = ("root", "suid", "userns", "fakeroot", "hybrid")
MARKER = re.compile(r"<!-- doc-test: (?P<spec>.*?) -->")
#: How a block is tested: the first word of its marker.
KINDS = ("engine", "sh", "text", "skip:")
#: The README's engine, its module path in the package the test builds.
README_ENGINE = "mine"
#: The engine `python -m kit new` writes in the test.
NEW_ENGINE = "box-engine"


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    spec: str | None  # the marker's text; None: the block has no marker
    code: str

    @property
    def kind(self) -> str:
        return (self.spec or "").split(" ", 1)[0]

    def option(self, name: str) -> str | None:
        for word in shlex.split(self.spec or ""):
            key, eq, value = word.partition("=")
            if eq and key == name:
                return value
        return None

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: str) -> Iterator[Block]:
    """The fenced code blocks of ``doc``, each with the marker on the line before it."""
    lines = (ROOT / doc).read_text().splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        found = MARKER.fullmatch(previous.strip())
        yield Block(
            doc, start + 1, found["spec"] if found else None, "\n".join(lines[start + 1 : i]) + "\n"
        )
        i += 1


ALL_BLOCKS = [b for doc in DOCS for b in blocks(doc)]


def test_every_code_block_says_how_it_is_tested() -> None:
    problems = []
    for block in ALL_BLOCKS:
        if block.spec is None:
            problems.append(f"{block.where()}: no '<!-- doc-test: … -->' line before the block")
        elif block.kind not in KINDS:
            problems.append(
                f"{block.where()}: unknown doc-test kind {block.kind!r} (known: {', '.join(KINDS)})"
            )
        elif block.kind == "skip:" and not block.spec.removeprefix("skip:").strip():
            problems.append(f"{block.where()}: a skipped block must say why")
    assert not problems, "\n".join(problems)
    assert any(b.kind == "engine" for b in ALL_BLOCKS), "the README lost its engine"


def test_the_contract_shipped_in_the_package_is_the_teams() -> None:
    shared = ROOT.parent / "shared" / "SPEC.md"
    if not shared.exists():
        pytest.skip("no shared/SPEC.md beside the checkout")
    assert (ROOT / "conformance" / "SPEC.md").read_text() == shared.read_text(), (
        "conformance/SPEC.md differs from the team's shared/SPEC.md: copy it again"
    )


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COVERAGE", "PYTEST", "KIT_ENGINE")) and k != "PYTHONPATH"
    }
    env.update(extra)
    return env


def _run_sh(
    block: Block, cwd: Path, env: dict[str, str], engine: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``block`` with a /tmp of its own (a mount namespace of its own, a directory of
    the test's bound there) and a ``TMPDIR`` of its own, both removed after it; assert it
    succeeded, and left nothing in /tmp: an example that did would leave it in the real
    one of whoever runs it (and of every run of this test)."""
    code = block.code if engine is None else block.code.replace("myengine", engine)
    top = Path(tempfile.mkdtemp(prefix="kit-docs-sh-", dir="/var/tmp"))
    try:
        top.chmod(0o755)
        tmp, tmpdir = top / "tmp", top / "tmpdir"
        for made in (tmp, tmpdir):
            made.mkdir()
            made.chmod(0o1777)
        kept = _kept_under_tmp(cwd)
        # Imported here, not in the child: an import between fork and exec may wait forever
        # on a lock another thread of the test's process held at the fork.
        from kit.system import linux

        proc = subprocess.run(
            ["/bin/bash", "-c", code],
            cwd=cwd,
            env={**env, "TMPDIR": str(tmpdir)},
            capture_output=True,
            text=True,
            timeout=600,
            preexec_fn=lambda: _tmp_of_its_own(linux, tmp, kept),
        )
        left = sorted(set(os.listdir(tmp)) - set(kept))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    expect = block.option("expect")
    out = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and (expect is None or (out and out[-1] == expect)), (
        f"{block.where()}: exit {proc.returncode}, expected last line {expect!r}\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert not left, f"{block.where()}: left {left} in /tmp (write under $TMPDIR)"
    return proc


def _kept_under_tmp(cwd: Path) -> list[str]:
    """The entries of the real /tmp a block needs under its own: where the checkout, the
    working directory and the interpreter are (a virtual environment's, and the one it was
    made from, whose standard library it uses), when under /tmp (a CI's checkout)."""
    kept = set()
    for path in (ROOT, cwd, Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable)):
        parts = path.resolve().parts
        if len(parts) > 2 and parts[:2] == ("/", "tmp"):
            kept.add(parts[2])
    return sorted(kept)


def _tmp_of_its_own(linux: ModuleType, tmp: Path, kept: list[str]) -> None:
    """In the block's shell, before it runs: ``tmp`` bound on /tmp in a mount namespace of
    its own, with the ``kept`` entries of the real one bound back in it (``linux``:
    kit.system.linux, imported by the parent before the fork)."""
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    real = os.open("/tmp", os.O_PATH | os.O_DIRECTORY)  # of this namespace: bound from
    linux.mount(str(tmp), "/tmp", None, linux.MS_BIND)
    for name in kept:
        os.mkdir(f"/tmp/{name}")
        linux.mount(
            f"/proc/self/fd/{real}/{name}", f"/tmp/{name}", None, linux.MS_BIND | linux.MS_REC
        )
    os.close(real)


def test_the_interpreter_a_block_needs_under_tmp_is_kept(monkeypatch, tmp_path):
    """A virtual environment under /tmp made from a Python that is under /tmp too (a CI's
    checkout and toolchain): both stay visible under the block's own /tmp."""
    monkeypatch.setattr(sys, "prefix", "/tmp/ci-venv")
    monkeypatch.setattr(sys, "base_prefix", "/tmp/ci-python/3.11")
    assert {"ci-venv", "ci-python"} <= set(_kept_under_tmp(tmp_path))


@pytest.mark.parametrize(
    "block",
    [b for b in ALL_BLOCKS if b.kind == "sh" and b.option("engine") is None],
    ids=lambda b: b.where(),
)
def test_a_shell_block_runs_from_the_checkout(block: Block) -> None:
    if os.getuid() != 0:
        pytest.skip("the documented commands are run as root")
    bindir = os.path.dirname(sys.executable)
    _run_sh(block, ROOT, _clean_env(PATH=f"{bindir}:{os.environ['PATH']}"))


# -- the README's engine and `kit new`, installed from the kit's wheel ------------------------


@dataclass
class Venv:
    root: Path
    work: Path  # an unrelated directory to run from

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def env(self) -> dict[str, str]:
        # No compiler on PATH: a fresh install must not need one.
        return _clean_env(
            PATH=f"{self.bin}:/nonexistent",
            CC="/bin/false",
            KIT_PYTHON=str(self.bin / "python"),
            VIRTUAL_ENV=str(self.root),
            HOME=str(self.work),
        )

    def run(self, *argv: str | Path, cwd: Path | None = None) -> str:
        proc = subprocess.run(
            [str(a) for a in argv],
            cwd=cwd or self.work,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, (
            f"{argv}: exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
        return proc.stdout


def _build_wheel(wheels: Path) -> Path:
    """The kit's wheel, built from the checkout into ``wheels``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
        cwd=wheels.parent,
    )
    (wheel,) = wheels.glob("engine_kit-*.whl")
    return wheel


def test_the_wheel_carries_no_mutant_module_and_no_mutant_entry_point(tmp_path: Path) -> None:
    """The mutant zoo and the kill matrix are the kit's own test apparatus (mutants/, run from
    a checkout): a pip install gets neither the modules nor an engine name of theirs."""
    import configparser
    import zipfile

    with zipfile.ZipFile(_build_wheel(tmp_path / "wheels")) as wheel:
        names = wheel.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = wheel.read(entry_points).decode()
    assert names and not [n for n in names if "mutant" in n.lower()], names
    assert {n.split("/", 1)[0] for n in names if n.endswith(".py")} == {
        "kit",
        "conformance",
        "reference_engines",
    }
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # names keep their case
    parser.read_string(text)
    assert dict(parser["kit.engines"]) == {
        "reference": "reference_engines.minimal:register",
        "reference-bind": "reference_engines.bind_rootfs:register",
    }
    assert "mutant" not in text.lower()


@pytest.fixture
def wheel_venv() -> Iterator[Venv]:
    """A fresh virtualenv of Debian's python3 with the kit installed from its built wheel,
    in a directory every uid of the flows can traverse."""
    if os.getuid() != 0:
        pytest.skip("checking all five flows needs root")
    top = Path(tempfile.mkdtemp(prefix="kit-docs-", dir="/var/tmp"))
    try:
        top.chmod(0o755)
        work = top / "work"
        work.mkdir()
        wheel = _build_wheel(top / "wheels")
        subprocess.run(
            ["/usr/bin/python3", "-m", "venv", str(top / "venv")], check=True, timeout=120
        )
        venv = Venv(top / "venv", work)
        venv.run(venv.bin / "python", "-m", "pip", "install", "-q", wheel)
        yield venv
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _readme_engine_package(where: Path) -> Path:
    """The README's engine block, as the package the README describes."""
    (block,) = [b for b in ALL_BLOCKS if b.kind == "engine"]
    name, module = block.spec.split()[1:3]
    assert name == README_ENGINE, block.spec
    package = where / "readme-engine"
    (package / Path(module).parent).mkdir(parents=True)
    (package / module).write_text(block.code)
    (package / Path(module).parent / "__init__.py").write_text("")
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "mypkg"\nversion = "0.1.0"\ndependencies = ["engine-kit"]\n'
        f'[project.entry-points."kit.engines"]\n{name} = "mypkg.engine:register"\n'
        '[tool.setuptools]\npackages = ["mypkg"]\n'
    )
    return package


def _assert_conformant_in_every_flow(venv: Venv, engine: str) -> None:
    report = venv.work / f"{engine}.json"
    venv.run(
        venv.bin / "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--engine={engine}",
        f"--conformance-report={report}",
    )
    doc = json.loads(report.read_text())
    flows = doc["environment"]["flows"]
    assert {f for f in FLOWS if flows[f]["selected"] and flows[f]["backend"] == "real"} == set(
        FLOWS
    ), flows
    # A kit requirement that only the kit-only runs decide is checked in one flow
    # (--kit-self-check=one) and not-configured in the others; an engine's never.
    bad = [
        (r["requirement"], r["flow"], r["outcome"])
        for r in doc["results"]
        if r["outcome"] not in ("passed", "not-supported")
        and not (
            r["subject"] == "kit"
            and r["outcome"] == "not-configured"
            and "--kit-self-check=all" in r["message"]
        )
    ]
    assert not bad, bad
    assert {r["flow"] for r in doc["results"] if r["outcome"] == "passed"} == set(FLOWS)


def test_the_readme_engine_and_a_kit_new_package_from_the_wheel_pass_every_flow(
    wheel_venv: Venv,
) -> None:
    # One test, not three: under pytest-xdist a module fixture would be built per worker.
    out = wheel_venv.run(wheel_venv.bin / "python", "-m", "conformance", "spec")
    assert out.startswith("# The engine contract") and "## 11. The host" in out
    out = wheel_venv.run(wheel_venv.bin / "python", "-m", "kit", "engines")
    assert out == (
        "reference\tentry point reference_engines.minimal:register\n"
        "reference-bind\tentry point reference_engines.bind_rootfs:register\n"
    )  # no mutant

    package = _readme_engine_package(wheel_venv.work.parent)
    wheel_venv.run(wheel_venv.bin / "python", "-m", "pip", "install", "-q", package)
    _assert_conformant_in_every_flow(wheel_venv, README_ENGINE)
    for block in (b for b in ALL_BLOCKS if b.kind == "sh" and b.option("engine")):
        assert block.option("engine") == README_ENGINE, block.where()
        (wheel_venv.work / "ci").unlink(missing_ok=True)
        (wheel_venv.work / "ci").symlink_to(ROOT / "ci")  # the blocks say ci/gate
        _run_sh(block, wheel_venv.work, wheel_venv.env(), engine=README_ENGINE)

    new = wheel_venv.work.parent / NEW_ENGINE
    out = wheel_venv.run(wheel_venv.bin / "python", "-m", "kit", "new", NEW_ENGINE, new)
    assert "conformance.yml" in out
    assert f"ENGINE: {NEW_ENGINE} " in (new / ".github/workflows/conformance.yml").read_text()
    wheel_venv.run(wheel_venv.bin / "python", "-m", "pip", "install", "-q", new)
    wheel_venv.run(wheel_venv.bin / "pytest", "-q", "-p", "no:cacheprovider", new / "tests")
    _assert_conformant_in_every_flow(wheel_venv, NEW_ENGINE)
