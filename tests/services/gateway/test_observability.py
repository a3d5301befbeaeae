"""Probes and metrics: /healthz, /readyz against real presence records, /metrics with route templates."""

from __future__ import annotations

from pathlib import Path

from shared.presence import WorkerPresence
from tests.services.gateway.app_client import gateway_client


async def test_probes_and_metrics_are_open_without_a_key(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with gateway_client(redis_url, key_prefix, tmp_path, api_keys="k") as client:
        assert (await client.get("/healthz")).json()["status"] == "ok"
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/readyz")).status_code in (200, 503)


async def test_readiness_follows_the_workers_present(redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    async with gateway_client(redis_url, key_prefix, tmp_path) as client:
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["redis"] is True
        bus = client._transport.app.state.bus  # type: ignore[attr-defined]
        await WorkerPresence(
            bus, "dialogue", "d1", ttl_s=60, interval_s=5, describe=lambda: {"free_slots": 2}
        ).beat()
        await WorkerPresence(bus, "router", "r1", ttl_s=60, interval_s=5).beat()
        ready = (await client.get("/readyz")).json()
        assert ready["ready"] is True and ready["free_slots"] == 2
        assert ready["cloned_voices"] == "unavailable"  # no TTS worker: reported, not fatal


async def test_http_metrics_are_labelled_by_route_template(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with gateway_client(redis_url, key_prefix, tmp_path) as client:
        await client.get("/v1/personas/does-not-exist")
        body = (await client.get("/metrics")).text
    assert 'route="/v1/personas/{persona_id}"' in body
    assert "does-not-exist" not in body
    assert "chorus_limit_rejections_total" in body or "chorus_http_requests_total" in body


async def test_refusals_before_routing_are_counted_under_their_route(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    async with gateway_client(redis_url, key_prefix, tmp_path, api_keys="k") as client:
        assert (await client.get("/v1/personas")).status_code == 401  # the key check answers, no route ran
        assert (await client.get("/no-such-page")).status_code == 404
        body = (await client.get("/metrics")).text
    assert 'chorus_http_requests_total{method="GET",route="/v1/personas",status="401"}' in body
    assert 'chorus_http_requests_total{method="GET",route="unmatched",status="404"}' in body
