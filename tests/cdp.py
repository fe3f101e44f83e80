"""Test helper: headless Chromium (Debian's `chromium`) driven over the DevTools protocol with aiohttp's websocket.

Nothing is downloaded: the browser is the system's, the client is ~80 lines over the router's own
aiohttp dependency. `Browser.launch(url)` opens one page; `evaluate`, `wait_for` and `screenshot`
are what the status page test needs.

    async with Browser.launch(url, profile_dir) as page:
        await page.wait_for("document.title", what="a title")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_path() -> str | None:
    """The Chromium (or Chrome) binary on PATH, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CdpError(Exception):
    """The browser answered a DevTools command with an error, or a page script threw."""


class Browser:
    """One headless Chromium with one page, spoken to over its DevTools websocket."""

    def __init__(self, proc: subprocess.Popen[bytes], ws: aiohttp.ClientWebSocketResponse,
                 session: aiohttp.ClientSession, log_path: Path) -> None:
        self.proc = proc
        self.ws = ws
        self.session = session
        self.log_path = log_path
        self._ids = itertools.count(1)
        self.console: list[str] = []  # the page's console messages and uncaught exceptions

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, url: str, profile: Path, width: int = 1400, height: int = 1000,
                     timeout: float = 30.0) -> AsyncIterator[Browser]:
        binary = chromium_path()
        if binary is None:
            raise RuntimeError("no chromium on PATH")
        profile.mkdir(parents=True, exist_ok=True)
        log_path = profile.with_suffix(".log")
        argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                f"--window-size={width},{height}", "about:blank"]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))
        try:
            port = await _devtools_port(proc, profile / "DevToolsActivePort", log_path, timeout)
            async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t.get("type") == "page"]
            ws = await session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0, autoping=False)
            page = cls(proc, ws, session, log_path)
            await page.send("Runtime.enable")
            await page.send("Page.enable")
            await page.send("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            await page.send("Page.navigate", {"url": url})
            await page.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'",
                                timeout=timeout, what=f"the page {url} loaded")
            yield page
        finally:
            await session.close()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait(10)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One DevTools command; its result (events that arrive meanwhile are kept in `console`)."""
        msg_id = next(self._ids)
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        while True:
            msg = await self.ws.receive(timeout=30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise CdpError(f"the DevTools connection closed ({msg.type.name}) during {method}")
            data = json.loads(msg.data)
            if data.get("id") == msg_id:
                if "error" in data:
                    raise CdpError(f"{method}: {data['error']}")
                return dict(data.get("result", {}))
            self._event(data)

    def _event(self, data: dict[str, Any]) -> None:
        method, params = data.get("method"), data.get("params", {})
        if method == "Runtime.consoleAPICalled":
            self.console.append(params.get("type", "log") + ": " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append("exception: " + str(details.get("exception", {}).get("description", details)))

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails'].get('exception', result)}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0, what: str = "condition") -> Any:
        """Poll a JavaScript expression until it is truthy (a throw counts as not yet); its value.
        TimeoutError with the page's text, its console and the expression's last error."""
        end = time.monotonic() + timeout
        error: CdpError | None = None
        while True:
            try:
                value = await self.evaluate(expression)
            except CdpError as e:
                value, error = None, e
            if value:
                return value
            if time.monotonic() >= end:
                text = await self.evaluate("document.body ? document.body.innerText : ''")
                raise TimeoutError(f"{what}: not seen within {timeout}s (last error: {error}). The page says:\n"
                                   f"{text}\nConsole:\n" + "\n".join(self.console[-20:]))
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics.get("contentSize") or {}
        shot = await self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size.get("width", 1400), "height": size.get("height", 1000), "scale": 1}})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


async def _devtools_port(proc: subprocess.Popen[bytes], port_file: Path, log_path: Path, timeout: float) -> int:
    """The port Chromium chose (--remote-debugging-port=0 writes it to DevToolsActivePort)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            log = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"chromium exited with {proc.returncode}:\n{log}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(port_file.read_text().split()[0])
        await asyncio.sleep(0.05)
    raise TimeoutError(f"chromium did not open its DevTools port within {timeout}s:\n"
                       f"{log_path.read_text(errors='replace')[-3000:]}")
