"""Where the suite's inputs live."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Small random-weight checkpoints in the published layouts, generated once and kept across runs.
CHECKPOINT_CACHE = REPO_ROOT / ".cache" / "checkpoints"
FIXTURE_AUDIO = REPO_ROOT / "tests" / "fixtures" / "audio"
