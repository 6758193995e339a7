"""Open an HTML file in Debian's headless chromium: the rendered DOM, the console, a screenshot.

``find_chromium`` returns the browser, installing it with apt when absent and allowed (running
as root with network), or the reason it cannot, for ``pytest.skip``. Every run gets a fresh
profile folder and the flags that keep chromium from reaching the network on its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")
TIMEOUT_S = 90


def _present() -> str | None:
    for path in CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def find_chromium() -> tuple[str | None, str]:
    """(path, "") when chromium is usable, else (None, why not)."""
    path = _present()
    if path:
        return path, ""
    if os.name != "posix" or os.geteuid() != 0:
        return None, "chromium is not installed and installing it needs root: apt-get install -y chromium"
    if shutil.which("apt-get") is None:
        return None, "chromium is not installed and apt-get is not available to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=300)
        subprocess.run(APT_INSTALL, env=env, check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        tail = (getattr(exc, "stderr", b"") or b"").decode(errors="replace")[-300:]
        return None, f"chromium is not installed and 'apt-get install -y chromium' failed (no network?): {tail}"
    path = _present()
    return (path, "") if path else (None, "apt-get installed chromium but no chromium binary was found")


@dataclass
class PageRun:
    dom: str
    console: str


def _run(chromium: str, args: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="sparsec-chromium-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)


def dump_dom(chromium: str, page: Path, fragment: str = "") -> PageRun:
    """Load ``page`` (with ``#fragment``), run its script, return the final DOM and console log."""
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    done = _run(chromium, ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", "--dump-dom", url])
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return PageRun(dom=done.stdout, console=done.stderr)


def screenshot(chromium: str, page: Path, out: Path, size: tuple[int, int] = (1400, 1000),
               fragment: str = "") -> None:
    """Save a PNG of ``page`` (with ``#fragment``) at ``size`` pixels."""
    out = out.resolve()
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    done = _run(chromium, [f"--screenshot={out}", f"--window-size={size[0]},{size[1]}",
                           "--virtual-time-budget=3000", url])
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"chromium screenshot failed ({done.returncode}): {done.stderr[-2000:]}")


def console_errors(console: str) -> list[str]:
    """Lines of chromium's log that report a page error: console messages at error level,
    uncaught exceptions, and resources the page tried to load (blocked or not)."""
    markers = ("Uncaught", "CONSOLE", "Refused to", "Failed to load", "net::ERR")
    return [line for line in console.splitlines() if any(m in line for m in markers)]
