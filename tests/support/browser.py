"""A real headless Chromium for the tests that drive the bundled page, over the DevTools protocol."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from chorus.devtools.redis_server import free_port
from tests.support.waiting import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (.ci/run installs Debian's chromium)"
)

# The page's microphone is Chromium's fake device (a file, or a beep); it may play audio unprompted.
MEDIA_FLAGS = (
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
)


class Page:
    """Just enough of the DevTools protocol: calls, and the events that arrive meanwhile."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            if "method" in message:
                self.events.append(message)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return result.get("result", {}).get("value")

    async def wait_for(self, condition: str, what: str = "", timeout_s: float = 30) -> None:
        """Until the page's `condition` holds; past the timeout, fail with the page's `window.chorus`."""
        try:
            await wait_until(lambda: self.evaluate(f"Boolean({condition})"), what or condition, timeout_s)
        except AssertionError as never:
            state = await self.evaluate("JSON.stringify(window.chorus || null)")
            raise AssertionError(f"the page never got there ({never}); page state: {state}") from None


@contextlib.asynccontextmanager
async def chromium_page(profile: Path, url: str = "about:blank", *flags: str) -> AsyncIterator[Page]:
    """A headless Chromium showing `url`, its first tab driven as a `Page`; terminated on exit."""
    assert CHROMIUM is not None
    port = free_port()
    chromium = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={port}",
            *flags,
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with connect(await _page_websocket(port), max_size=1 << 24) as ws:
            yield Page(ws)
    finally:
        chromium.terminate()
        chromium.wait(10)


async def _page_websocket(port: int, timeout_s: float = 20) -> str:
    async with httpx.AsyncClient(timeout=1) as devtools:

        async def page_url() -> str | None:
            try:
                listing = (await devtools.get(f"http://127.0.0.1:{port}/json/list")).json()
            except httpx.HTTPError:
                return None
            pages = [t for t in listing if t["type"] == "page"]
            return str(pages[0]["webSocketDebuggerUrl"]) if pages else None

        return await wait_until(page_url, "Chromium's DevTools endpoint", timeout_s, every_s=0.2)
