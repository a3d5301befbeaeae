from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import ChorusStack

DIALOGUE_SLOTS = 4  # the shared stack's CHORUS_DIALOGUE_SLOTS


@pytest.fixture(scope="session")
def stack(
    redis_url: str, checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChorusStack]:
    """One stack shared by the e2e tests (loading models is the slow part). Tests that stop a service
    restart it before they end."""
    chorus = ChorusStack(
        workdir=tmp_path_factory.mktemp("stack"),
        redis_url=redis_url,
        checkpoints=checkpoints,
        key_prefix=f"e2e{uuid.uuid4().hex[:6]}:",
        extra_env={
            "CHORUS_DIALOGUE_SLOTS": str(DIALOGUE_SLOTS),
            "CHORUS_PLACEMENT_WAIT_S": "3",
            "CHORUS_MAX_SESSIONS_PER_KEY": "16",
            # Per-row LoRA on (tests/e2e/test_adapters.py): every session's step runs through it.
            "CHORUS_DIALOGUE_ADAPTER_MEMORY": "50000000",
            "CHORUS_DIALOGUE_ADAPTER_MAX_RANK": "8",
        },
    )
    try:
        yield chorus.start_all()
    finally:
        chorus.stop_all()
