"""docker-compose.yml's services started as local processes with the environment compose gives them,
waited on with the health checks it declares (tests/support/compose.py says what is translated)."""

from __future__ import annotations

import pytest

from chorus.devtools.compose import load_project, read_env_file
from tests.support.compose import COMPOSE_FILES, ENV_EXAMPLE, ComposeStack

pytestmark = pytest.mark.timeout(600)


def test_every_compose_service_runs_as_a_process_except_the_redis_the_test_provides(
    running_compose_stack: ComposeStack,
) -> None:
    declared = set(load_project(COMPOSE_FILES, read_env_file(ENV_EXAMPLE))["services"])
    assert set(running_compose_stack.processes) == declared - {"redis"}
    assert {"gateway", "router", "dialogue", "tts"} <= set(running_compose_stack.processes)


def test_every_compose_service_passes_its_own_health_check(running_compose_stack: ComposeStack) -> None:
    for name in running_compose_stack.services:
        assert running_compose_stack.services[name].healthcheck is not None, f"{name} declares no healthcheck"
        assert running_compose_stack.healthy(name), running_compose_stack.log_tail(name)


def test_the_gateway_is_ready_and_sees_every_worker_through_the_same_redis(
    running_compose_stack: ComposeStack,
) -> None:
    body = running_compose_stack.wait_gateway_ready()
    assert body["ready"] is True
    assert body["redis"] is True
    assert body["dialogue_workers"] == 1 and body["free_slots"] > 0
    assert body["router_workers"] == 1
    assert body["tts_workers"] == 1


async def test_a_conversation_through_the_compose_wired_gateway(running_compose_stack: ComposeStack) -> None:
    """The wiring is proven by use: audio in through the gateway, Moshi's audio and text back out."""
    from tests.support.audio import speech_like
    from tests.support.clients import MoshiClient

    running_compose_stack.wait_gateway_ready()
    client = await MoshiClient.open(running_compose_stack.ws_url, voice="moshiko")
    await client.send_audio(speech_like(2.0))
    await client.drain(1.0)
    await client.ws.close()
    assert client.audio_seconds > 1.0 and client.text and not client.errors
