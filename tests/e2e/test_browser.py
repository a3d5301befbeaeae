"""The browser page in a real headless Chromium with a fake microphone, driven over the DevTools protocol."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from shared.redis_server import free_port
from tests.e2e.conftest import SPEECH_WAV
from tests.e2e.stack import ChorusStack

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (.ci/run installs Debian's chromium)"
)


class DevTools:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return result.get("result", {}).get("value")


def page_websocket(port: int, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as response:
                pages = [t for t in json.loads(response.read()) if t["type"] == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("Chromium's DevTools endpoint did not come up")


async def test_browser_page_talks_through_a_fake_microphone(stack: ChorusStack, tmp_path: Path) -> None:
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
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--remote-debugging-port={port}",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={SPEECH_WAV}",
            "--autoplay-policy=no-user-gesture-required",
            f"{stack.url}/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with connect(page_websocket(port), max_size=1 << 24) as ws:
            tools = DevTools(ws)
            await tools.call("Runtime.enable")
            await _wait(
                tools, "window.chorus && window.chorus.ready === true", "the page to load its pickers"
            )
            voices = await tools.evaluate("[...document.querySelectorAll('#voice option')].map(o => o.value)")
            assert "moshiko" in voices
            await tools.evaluate("document.getElementById('start').click()")
            await _wait(
                tools,
                "window.chorus.audioDeltas > 10 && window.chorus.transcript.length > 0",
                "audio and transcript to come back",
                timeout_s=60,
            )
            state = await tools.evaluate("JSON.stringify(window.chorus)")
            shot = await tools.call("Page.captureScreenshot", format="png")
            (tmp_path / "page.png").write_bytes(base64.b64decode(shot["data"]))
            await tools.evaluate("document.getElementById('stop').click()")
    finally:
        chromium.terminate()
        chromium.wait(10)
    page = json.loads(state)
    assert page["sessionId"].startswith("sess_")
    assert page["sentFrames"] > 10, "the fake microphone's audio was captured and sent"
    assert page["errors"] == []


async def _wait(tools: DevTools, expression: str, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await tools.evaluate(f"Boolean({expression})"):
            return
        await asyncio.sleep(0.25)
    state = await tools.evaluate("JSON.stringify(window.chorus || null)")
    raise AssertionError(f"timed out waiting for {what}; page state: {state}")
