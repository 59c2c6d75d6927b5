"""Headless Chromium for the report's tests and the README's screenshots.

Debian's ``chromium`` (``KIT_WITH_BROWSER=1 ci/setup`` installs it). Every call uses a new,
empty profile directory and no network at all: as root the browser runs in a new network
namespace (``unshare -n``, so only a disconnected loopback exists), and the flags turn off
every background fetch. A page that needs the network therefore renders without it, which
is what the tests want to see.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
    "--disable-default-apps",
    "--disable-sync",
    "--mute-audio",
)
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


class BrowserError(RuntimeError):
    """Chromium is missing or failed."""


def find() -> str | None:
    """The Chromium executable (``$KIT_CHROMIUM`` first), or None."""
    for name in (os.environ.get("KIT_CHROMIUM"), *CANDIDATES):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _offline_prefix() -> list[str]:
    """``unshare -n`` when we may create a network namespace (root), else nothing."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        return ["unshare", "--net", "--"]
    return []


def run(url_or_path: str | Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    exe = find()
    if exe is None:
        raise BrowserError(
            "no chromium found (install Debian's 'chromium', e.g. "
            "KIT_WITH_BROWSER=1 ci/setup, or set KIT_CHROMIUM)"
        )
    target = str(url_or_path)
    if "://" not in target:
        target = Path(target).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="kit-chromium-") as profile:
        argv = [*_offline_prefix(), exe, *FLAGS, f"--user-data-dir={profile}", *args, target]
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, "HOME": profile},
            )
        except subprocess.TimeoutExpired:
            raise BrowserError(f"chromium did not finish within {timeout} s: {argv}") from None
    if proc.returncode != 0:
        raise BrowserError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def dump_dom(path: str | Path, timeout: float = 90) -> str:
    """The DOM of the page after Chromium loaded and laid it out (``--dump-dom``)."""
    return run(path, "--dump-dom", timeout=timeout).stdout


def screenshot(
    path: str | Path, png: str | Path, width: int = 1400, height: int = 1800, timeout: float = 90
) -> Path:
    """A PNG of the page's first ``width`` × ``height`` pixels."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    run(path, f"--screenshot={png}", f"--window-size={width},{height}", timeout=timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise BrowserError(f"chromium wrote no screenshot to {png}")
    return png


def png_size(png: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = Path(png).read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise BrowserError(f"{png} is not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
