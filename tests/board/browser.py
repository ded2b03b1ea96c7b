"""Real-browser helpers of the board's tests: Debian's headless chromium driven by Selenium through
Debian's /usr/bin/chromedriver (named explicitly, so Selenium Manager never downloads a browser or
a driver), the board as a real `kubetune board` process on a free port, and screenshots.

Screenshots go to a temporary folder, or to $KUBETUNE_BOARD_SCREENSHOTS (e.g. `docs/board`) when
set: that is how docs/board/*.png are made, and CI leaves the tree clean."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from cluster.util import stop_process_group

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]


def require_browser() -> None:
    """Fail (not skip) when the browser is missing: scripts/test.sh installs it."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver "
                    "(bash scripts/debian-packages.sh chromium chromium-driver; scripts/test.sh does)")


def chrome(width: int = 1360, height: int = 1000):
    """A headless chromium (Selenium WebDriver) with its console log kept for `console_errors`."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--disable-extensions", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--force-color-profile=srgb", "--hide-scrollbars"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def console_errors(driver) -> list[str]:
    """The page's console errors since the last call (a JavaScript exception shows here)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what: str, fn: Callable[[], Any], timeout: float, interval: float = 0.25, on_timeout: Callable[[], str] | None = None):
    """Poll `fn` until it returns something truthy (returned); a timeout fails naming `what`."""
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 - a page mid-update (stale element) is retried
            last_err = err
        time.sleep(interval)
    extra = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         f"{f' (last error: {last_err!r})' if last_err else ''}\n{extra}")


class Board:
    """`kubetune board ...` as a child process on a free localhost port; its output in a file."""

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"board-{self.port}.log"
        exe = shutil.which("kubetune", path=str(Path(sys.executable).parent)) or "kubetune"
        self.argv = [exe, "board", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(self.argv, cwd=workdir, env={**os.environ, **(env or {})},
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        wait(f"the board at {self.url} ({' '.join(self.argv)})", self._up, 60, on_timeout=self.tail)

    def _up(self) -> bool:
        assert self.proc.poll() is None, f"kubetune board exited ({self.proc.returncode}):\n{self.tail()}"
        return bool(self.api("/api/info"))

    def api(self, path: str, body: Any = None, method: str | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def tail(self, n: int = 40) -> str:
        try:
            return "--- kubetune board log ---\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process_group(self.proc, 15)


def screenshot_dir(tmp_path: Path) -> Path:
    """$KUBETUNE_BOARD_SCREENSHOTS (relative to the repository) when set, else a temporary folder."""
    chosen = os.environ.get("KUBETUNE_BOARD_SCREENSHOTS")
    folder = (REPO / chosen) if chosen and not os.path.isabs(chosen) else Path(chosen) if chosen else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(driver, folder: Path, name: str, full: bool = True, max_height: int = 2400) -> Path:
    """A PNG of the page (`full`: as tall as its content, up to max_height; else the viewport as it
    is scrolled), checked to be a real image."""
    if full:
        height = driver.execute_script(
            "return Math.ceil(document.querySelector('main').getBoundingClientRect().bottom + window.scrollY)")
        size = driver.get_window_size()
        inner = driver.execute_script("return window.innerHeight")  # the window is taller by its frame
        driver.set_window_size(size["width"], min(height + 16 + size["height"] - inner, max_height))
        driver.execute_script("window.scrollTo(0, 0)")
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, path
    return path
