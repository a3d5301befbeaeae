"""Fixtures shared by the whole suite: one real redis-server per test session, a fresh key prefix per
test (so tests never see each other's streams), and a Bus connected to it."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from chorus.devtools.redis_server import EmbeddedRedis
from shared.bus import Bus
from shared.streams import StreamNames
from tests.support.paths import CHECKPOINT_CACHE, REPO_ROOT

# Child processes the tests start (`python -m chorus.cli ...`) import this checkout, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
# Two cores are shared by everything the suite runs; one torch thread per model keeps ticks predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, the int8 cache's Triton kernel runs in Triton's interpreter. Triton reads this when it
# is first imported (its own library functions are jitted then), so it is set before anything imports
# it; never on an NVIDIA machine, where it would put torch.compile's Triton kernels in the interpreter
# too. (The driver's device file says so without importing torch, which would read OMP_NUM_THREADS now.)
if not Path("/dev/nvidiactl").exists():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of the test's own, which it may pause, kill and start again (same port)."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def key_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def names(key_prefix: str) -> StreamNames:
    return StreamNames(key_prefix)


@pytest.fixture
async def bus(redis_url: str, names: StreamNames) -> AsyncIterator[Bus]:
    bus = await Bus.connect(redis_url, names, session_maxlen=200, control_maxlen=200)
    try:
        yield bus
    finally:
        await bus.close()


@pytest.fixture(scope="session")
def checkpoints() -> Path:
    """Small random-weight checkpoints in the published layouts (generated once, cached in .cache/)."""
    from chorus.devtools.checkpoints import make_checkpoints

    make_checkpoints(CHECKPOINT_CACHE)
    return CHECKPOINT_CACHE


@pytest.fixture(scope="session")
def moshi_dir(checkpoints: Path) -> Path:
    return checkpoints / "moshi"


@pytest.fixture(scope="session")
def tts_dir(checkpoints: Path) -> Path:
    return checkpoints / "tts"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: a data volume that really fills up (ENOSPC). Mounting one needs root."""
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a tiny tmpfs, and mounting one needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)]
    mounted = subprocess.run(command, check=False, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
