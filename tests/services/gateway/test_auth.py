"""API keys on REST: 401 problems with a Bearer challenge; open probes; auth off without keys."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.services.gateway.app_client import gateway_client


async def test_v1_routes_require_a_key(redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    async with gateway_client(redis_url, key_prefix, tmp_path, api_keys="k1") as client:
        missing = await client.get("/v1/personas")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["code"] == "unauthorized"
        wrong = await client.get("/v1/personas", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (await client.get("/v1/personas", headers={"Authorization": "Bearer k1"})).status_code == 200
        assert (await client.get("/v1/personas?api_key=k1")).status_code == 200
        assert (await client.get("/healthz")).status_code == 200


async def test_keys_are_read_from_a_mounted_file(redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfrom-file\n")
    async with gateway_client(redis_url, key_prefix, tmp_path, api_keys_file=keys) as client:
        assert (await client.get("/v1/personas")).status_code == 401
        ok = await client.get("/v1/personas", headers={"Authorization": "Bearer from-file"})
        assert ok.status_code == 200


async def test_auth_off_is_announced_loudly(
    redis_url: str, key_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        async with gateway_client(redis_url, key_prefix, tmp_path) as client:
            assert (await client.get("/v1/personas")).status_code == 200
    assert any("AUTH IS OFF" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
