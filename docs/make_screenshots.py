"""Regenerate the README's screenshots of report.html (headless Chromium, no network).

    .venv/bin/python docs/make_screenshots.py        # as root, with chromium installed

Runs the gate against a broken engine of the kit's tests (``gate_engines:SloppyMasterEngine``:
its setuid master keeps effective uid 0 after ``create_container``) in the root and suid flows,
then photographs two views of its report.html: the top of the page with the first failure
expanded to its ledger events, and the suid lifecycle's sequence diagram. The views only add
CSS (hide other sections) and the ``open`` attribute; the page is otherwise the real report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT / "ci"))

import browser  # noqa: E402

OVERVIEW_CSS = """
details.flow, h2#sequence, h2#sequence ~ * { display: none !important; }
"""
SEQUENCE_CSS = """
body > *:not(h1):not(h2#sequence):not(.legend):not(details.flow) { display: none !important; }
details.flow:not([data-flow="suid"]) { display: none !important; }
"""


def view(html: str, css: str, open_first_failure: bool) -> str:
    if open_first_failure:
        html = html.replace('<details class="failure"', '<details open class="failure"', 1)
    return html.replace("</head>", f"<style>{css}</style></head>", 1)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kit-docs-") as tmp:
        out = Path(tmp) / "out"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
        proc = subprocess.run(
            [
                str(ROOT / "ci" / "gate"),
                "--engine",
                "gate_engines:SloppyMasterEngine",
                "--flow",
                "root,suid",
                "--out",
                str(out),
                "-q",
            ],
            env=env,
            cwd=ROOT,
        )
        if proc.returncode != 1:
            print(f"expected the gate to reject the engine (exit 1), got {proc.returncode}")
            return 1
        html = (out / "report.html").read_text()
        pages = {
            "report-overview": (OVERVIEW_CSS, True, 1280, 1300),
            "report-sequence": (SEQUENCE_CSS, False, 1460, 1180),
        }
        for name, (css, open_first, width, height) in pages.items():
            page = Path(tmp) / f"{name}.html"
            page.write_text(view(html, css, open_first))
            png = browser.screenshot(page, DOCS / f"{name}.png", width, height)
            print(f"wrote {png.relative_to(ROOT)} ({png.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
