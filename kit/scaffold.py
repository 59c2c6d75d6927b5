"""``python -m kit new``: write an engine package that passes the conformance suite as is."""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
#: Engine names `kit new` accepts: they become a Python package name too.
_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
#: Template file (under templates/engine) -> where it goes in the new package.
_FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "package/__init__.py.tmpl": "{package}/__init__.py",
    "package/engine.py.tmpl": "{package}/engine.py",
    "package/rpc.py.tmpl": "{package}/rpc.py",
    "tests/test_create_container.py.tmpl": "tests/test_create_container.py",
}


class ScaffoldError(ValueError):
    """A bad engine name or target directory: the message says what to change."""


@dataclass(frozen=True)
class Names:
    engine: str  # the registered name, e.g. my-engine
    package: str  # the Python package, e.g. my_engine
    base: str  # the class-name prefix: MyEngine, MyConfig, MyRPC for my-engine

    @classmethod
    def of(cls, engine: str) -> Names:
        if not _NAME.fullmatch(engine):
            raise ScaffoldError(
                f"engine name {engine!r}: use lower-case letters and digits, words joined by "
                "'-' or '_', starting with a letter (it names the Python package too)"
            )
        package = engine.replace("-", "_")
        if keyword.iskeyword(package):
            raise ScaffoldError(f"engine name {engine!r}: {package!r} is a Python keyword")
        camel = "".join(p.capitalize() for p in package.split("_"))
        return cls(engine, package, camel.removesuffix("Engine") or camel)

    def fill(self, text: str) -> str:
        return (
            text.replace("__ENGINE_NAME__", self.engine)
            .replace("__DIST_NAME__", f"{self.engine}-engine")
            .replace("__PACKAGE__", self.package)
            .replace("__BASE__", self.base)
        )


def _workflow(names: Names) -> str:
    """The GitHub Actions template of the gate, for this engine."""
    text = (TEMPLATES / "ci" / "github-actions.yml").read_text()
    return re.sub(r"(?m)^(  ENGINE: )\S+", rf"\g<1>{names.engine}", text, count=1)


def write_package(engine: str, directory: Path) -> list[Path]:
    """Write the package of engine ``engine`` into ``directory`` (new or empty); return the
    files written."""
    names = Names.of(engine)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ScaffoldError(f"{directory}: exists and is not an empty directory; name a new one")
    contents = {
        rel.format(package=names.package): names.fill((TEMPLATES / "engine" / tmpl).read_text())
        for tmpl, rel in _FILES.items()
    }
    contents[".github/workflows/conformance.yml"] = _workflow(names)
    written = []
    for rel, text in contents.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
