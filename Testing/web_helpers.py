"""The browser tests' harness: ``medtuning web`` as a real server process on a free loopback port,
and Debian's Chromium driven by Playwright (never ``playwright install``: its download fails here)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1500, "height": 950}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_chromium() -> str:
    """Chromium's path; skips with a message outside CI when it is missing (the Makefile installs it as root)."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    message = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; 'make test' does as root)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


class WebServer:
    """``python -m MedTuningLib web ... --events jsonl`` started in its own process group."""

    def __init__(self, models: Path, cases: Path, home: Path, token: Optional[str] = None,
                 scans: Optional[Path] = None) -> None:
        self.port = free_port()
        self.argv = [sys.executable, "-m", "MedTuningLib", "web", "--host", "127.0.0.1", f"--port={self.port}",
                     f"--models={models}", f"--cases={cases}", "--device=cpu", "--events", "jsonl"]
        if token is not None:
            self.argv.append(f"--token={token}")
        if scans is not None:
            self.argv.append(f"--scans={scans}")
        self.env = {**os.environ, "MEDTUNING_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow", "PYTHONPATH": str(ROOT)}
        self.events: list[dict] = []
        self.url = ""
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = home / f"web-{self.port}.log"

    def start(self, timeout: float = 120) -> "WebServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True)
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                event = json.loads(line)
                self.events.append(event)
                if event.get("url"):
                    self.url = event["url"]
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or not self.url:
            self.stop()
            raise AssertionError(f"medtuning web did not start: {self.events}\n{self.stderr_tail()}")
        return self

    def stderr_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        kept = [l for l in text.splitlines() if l.strip() and "WindowResizeEvent" not in l and "ConfigureEvent" not in l
                and "vtkObject.cxx" not in l]
        return "\n".join(kept[-lines:])

    def stop(self) -> Optional[int]:
        """SIGTERM (the server stops its jobs and exits), then kill the group if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # backend children of a stopped server, if any
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


@contextmanager
def web_server(*args, **kwargs) -> Iterator[WebServer]:
    server = WebServer(*args, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def chromium() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    path = require_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_for_views(page, timeout_ms: int = 30000) -> None:
    """Every view's image decoded at the size the page gives it (views start 300x300 until resized)."""
    page.wait_for_function(
        """() => { const imgs = [...document.querySelectorAll('img.image-display-area')];
                   return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0 &&
                          Math.abs(i.naturalWidth - i.clientWidth) <= 2 && i.clientWidth > 0); }""",
        timeout=timeout_ms)
    page.wait_for_timeout(400)  # the last frame after the resize


def open_app(browser, url: str):
    page = browser.new_page(viewport=VIEWPORT, accept_downloads=True)
    page.goto(url)
    page.wait_for_selector("#mt-segment", state="attached", timeout=60000)
    wait_for_views(page)
    return page


def text(page, selector: str) -> str:
    element = page.query_selector(selector)
    return element.inner_text() if element is not None else ""


def wait_for_job(page, kind: str, outcome: str = "done", timeout_s: float = 600) -> str:
    """Wait until the job bar says ``<kind>: <outcome>`` (or failed); returns its text."""
    page.wait_for_function(
        f"""() => {{ const t = document.querySelector('#mt-job-text');
                    return t && (t.innerText.includes('{kind}: {outcome}') || t.innerText.includes('{kind}: failed')); }}""",
        timeout=timeout_s * 1000)
    return text(page, "#mt-job-text")


def error_text(page) -> str:
    return text(page, "#mt-error-text") + " " + text(page, "#mt-error-hint")


def shot(page, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    wait_for_views(page)
    page.screenshot(path=str(path))
    return path


def copy_tiny_model(src: Path, models: Path) -> Path:
    models.mkdir(parents=True, exist_ok=True)
    dst = models / src.name
    shutil.copytree(src, dst)
    return dst


def wait_until(predicate, timeout: float = 30, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def publish_screenshots(folder: Path) -> None:
    """Copy the test's screenshots to ``MEDTUNING_WEB_SCREENSHOTS`` when set (docs/screenshots for the README)."""
    target = os.environ.get("MEDTUNING_WEB_SCREENSHOTS")
    if not target:
        return
    Path(target).mkdir(parents=True, exist_ok=True)
    for png in sorted(folder.glob("*.png")):
        shutil.copy(png, Path(target) / png.name)
