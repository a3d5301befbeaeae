"""`chorus talk` as a user runs it against a running stack: both protocols, native and cloned voices;
`chorus voices list`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sphn

from tests.support.audio import SPEECH_WAV
from tests.support.clients import upload_voice
from tests.support.stack import ChorusStack


@pytest.mark.parametrize(("protocol", "cloned"), [("moshi", False), ("realtime", True)])
async def test_chorus_talk_saves_the_reply_and_transcript(
    stack: ChorusStack, tmp_path: Path, protocol: str, cloned: bool
) -> None:
    voice = f"profile:{await upload_voice(stack.url, str(SPEECH_WAV))}" if cloned else "moshiko"
    said = tmp_path / "said.wav"  # 2.5 s of the speech clip: `talk` streams it in real time
    speech, rate = sphn.read(str(SPEECH_WAV))
    sphn.write_wav(str(said), speech[0, : int(2.5 * rate)], rate)
    out = tmp_path / "reply.wav"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "chorus.cli",
            "talk",
            str(said),
            "--out",
            str(out),
            "--voice",
            voice,
            "--protocol",
            protocol,
            "--url",
            stack.url,
            "--tail",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    audio, rate = sphn.read(str(out))
    assert rate == 24_000 and audio.shape[-1] > 24_000, "at least a second of reply audio"
    transcript = json.loads(out.with_suffix(".json").read_text())
    assert transcript["session_id"].startswith("sess_")
    assert transcript["voice"] == voice and transcript["protocol"] == protocol
    assert transcript["text"], "the transcript holds what Chorus said"


def test_chorus_voices_list_shows_profiles_the_catalog_and_what_works_now(stack: ChorusStack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chorus.cli", "voices", "list", "--url", stack.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "voice kinds available now: native, catalog, cloned"
    assert "catalog:alba\tenglish catalog voice (local)" in lines
