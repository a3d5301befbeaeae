from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.compose import ComposeStack, checkpoint_env, compose_stack

# The generators `checkpoints` imports; without them the stack cannot load a model. Only their absence
# skips the compose test: any other failure to make checkpoints is an error.
CHECKPOINT_GENERATORS = ("chorus.devtools.moshi_checkpoint", "chorus.devtools.tts_checkpoint")


@pytest.fixture(scope="module")
def stack_checkpoints(request: pytest.FixtureRequest) -> Path:
    try:
        path: Path = request.getfixturevalue("checkpoints")
    except ModuleNotFoundError as error:
        if error.name in CHECKPOINT_GENERATORS:
            pytest.skip(f"{error.name} is not in this checkout, so no checkpoint for the workers to load")
        raise
    return path


@pytest.fixture(scope="module")
def running_compose_stack(
    redis_url: str, stack_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComposeStack]:
    """docker-compose.yml + compose.cpu.yml as local processes, every service healthy. Shared by the
    tests of a module (loading the models is the slow part); a test that stops a service restarts it."""
    with compose_stack(
        redis_url,
        tmp_path_factory.mktemp("compose"),
        key_prefix=f"compose{uuid.uuid4().hex[:6]}:",
        service_env=checkpoint_env(stack_checkpoints),
    ) as stack:
        yield stack
