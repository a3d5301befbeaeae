from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.stack import ChorusStack

SPEECH_WAV = Path(__file__).resolve().parents[1] / "fixtures" / "audio" / "speech.wav"
DIALOGUE_SLOTS = 4  # the shared stack's CHORUS_DIALOGUE_SLOTS


@pytest.fixture(scope="session")
def stack(
    redis_url: str, checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChorusStack]:
    """One stack shared by the e2e tests (loading models is the slow part). Tests that stop a service
    restart it before they end."""
    chorus = ChorusStack(
        redis_url,
        checkpoints,
        tmp_path_factory.mktemp("stack"),
        key_prefix=f"e2e{uuid.uuid4().hex[:6]}:",
        extra_env={
            "CHORUS_DIALOGUE_SLOTS": str(DIALOGUE_SLOTS),
            "CHORUS_PLACEMENT_WAIT_S": "3",
            "CHORUS_MAX_SESSIONS_PER_KEY": "16",
        },
    )
    try:
        yield chorus.start_all()
    finally:
        chorus.stop_all()


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, modulated signal (a stand-in when no recorded speech fixture is needed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24_000)) / 24_000
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.5 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 24_000) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
