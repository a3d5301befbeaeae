"""The browser page in a real headless Chromium with a fake microphone, driven over the DevTools protocol."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tests.support.audio import SPEECH_WAV
from tests.support.browser import MEDIA_FLAGS, chromium_page, needs_chromium
from tests.support.stack import ChorusStack

pytestmark = needs_chromium


async def test_browser_page_talks_through_a_fake_microphone(stack: ChorusStack, tmp_path: Path) -> None:
    microphone = f"--use-file-for-fake-audio-capture={SPEECH_WAV}"
    async with chromium_page(tmp_path / "profile", f"{stack.url}/", *MEDIA_FLAGS, microphone) as page:
        await page.call("Runtime.enable")
        await page.wait_for(
            "window.chorus && window.chorus.ready === true", "the page to load its pickers", 20
        )
        voices = await page.evaluate("[...document.querySelectorAll('#voice option')].map(o => o.value)")
        assert "moshiko" in voices
        assert "catalog:alba" in voices, "the TTS workers' catalog voices are offered"
        kinds = await page.evaluate("document.getElementById('voiceKinds').textContent")
        assert kinds == "Voices available now: native, catalog, cloned."
        await page.evaluate("document.getElementById('start').click()")
        await page.wait_for(
            "window.chorus.audioDeltas > 10 && window.chorus.transcript.length > 0",
            "audio and transcript to come back",
            timeout_s=60,
        )
        state = await page.evaluate("JSON.stringify(window.chorus)")
        shot = await page.call("Page.captureScreenshot", format="png")
        (tmp_path / "page.png").write_bytes(base64.b64decode(shot["data"]))
        await page.evaluate("document.getElementById('stop').click()")
    page_state = json.loads(state)
    assert page_state["sessionId"].startswith("sess_")
    assert page_state["sentFrames"] > 10, "the fake microphone's audio was captured and sent"
    assert page_state["errors"] == []
