"""Host and Origin checks on a real gateway process: a page that rebinds its DNS name to 127.0.0.1 cannot
use a loopback gateway (421), and pages of other origins can neither open its WebSockets nor post to it
(403). Clients that are not browsers (no Origin) and the probes are unaffected."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from tests.security.conftest import GatewayProcess, StartGateway, upgrade_request

SOCKETS = ["/api/chat", "/v1/realtime"]
EVIL = "http://evil.example"


def upgrade_status(
    gateway: GatewayProcess, path: str, host: str, origin: str | None = None
) -> tuple[int, str]:
    """Status and body of a WebSocket upgrade request sent with these Host and Origin headers."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as conn:
        conn.sendall(upgrade_request(path, host, origin))
        answer = conn.recv(65536).decode(errors="replace")
    status = int(answer.split(" ", 2)[1])
    return status, answer.partition("\r\n\r\n")[2]


def test_requests_for_a_foreign_host_name_are_refused(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    port = gateway.port

    def get(path: str, host: str) -> httpx.Response:
        return httpx.get(f"{gateway.url}{path}", headers={"Host": host}, timeout=10)

    rebound = get("/v1/personas", f"rebind.attacker.example:{port}")
    assert rebound.status_code == 421
    assert rebound.json()["code"] == "unknown_host"
    assert "CHORUS_ALLOWED_HOSTS" in rebound.json()["detail"]
    assert get("/", f"rebind.attacker.example:{port}").status_code == 421, "the page too"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert get("/v1/personas", host).status_code == 200, host
    # Probes and scrapers address a pod by its IP: they are answered whatever the Host.
    for probe in ("/healthz", "/metrics"):
        assert get(probe, "10.1.2.3:8000").status_code == 200


def test_allowed_hosts_are_configurable(start_gateway: StartGateway) -> None:
    gateway = start_gateway(CHORUS_ALLOWED_HOSTS="chorus.example.com, LAN-box")
    for host, status in [("chorus.example.com", 200), ("lan-box:8000", 200), ("other.example.com", 421)]:
        response = httpx.get(f"{gateway.url}/v1/personas", headers={"Host": host}, timeout=10)
        assert response.status_code == status, host


@pytest.mark.parametrize("path", SOCKETS)
def test_a_rebound_name_cannot_open_a_websocket(start_gateway: StartGateway, path: str) -> None:
    gateway = start_gateway()
    rebound = f"rebind.attacker.example:{gateway.port}"
    status, body = upgrade_status(gateway, path, rebound, origin=f"http://{rebound}")
    assert status == 421
    assert json.loads(body)["code"] == "unknown_host"


@pytest.mark.parametrize("path", SOCKETS)
def test_websockets_from_foreign_origins_are_refused(start_gateway: StartGateway, path: str) -> None:
    gateway = start_gateway()
    host = f"127.0.0.1:{gateway.port}"
    for origin in (EVIL, "null", f"http://evil.example:{gateway.port}"):
        status, body = upgrade_status(gateway, path, host, origin)
        assert status == 403, origin
        assert json.loads(body)["code"] == "forbidden_origin"
    # The page's own origin, any localhost page, and clients that are not browsers (no Origin) connect.
    for origin in (f"http://{host}", "http://localhost:3000", "https://[::1]", None):
        assert upgrade_status(gateway, path, host, origin)[0] == 101, origin


async def test_the_websocket_client_library_sees_the_refusal(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{gateway.ws_url}/v1/realtime", origin=Origin(EVIL), open_timeout=10):
            pass
    assert refused.value.response.status_code == 403


def test_allowed_origins_are_configurable(start_gateway: StartGateway) -> None:
    gateway = start_gateway(CHORUS_ALLOWED_ORIGINS="https://app.example.com")
    host = f"127.0.0.1:{gateway.port}"
    assert upgrade_status(gateway, "/v1/realtime", host, "https://app.example.com")[0] == 101
    assert upgrade_status(gateway, "/v1/realtime", host, "https://other.example.com")[0] == 403


def test_cross_site_posts_are_refused(start_gateway: StartGateway) -> None:
    """A page elsewhere could otherwise submit a form to a local gateway with auth off (CSRF)."""
    gateway = start_gateway()
    persona = {"name": "Mallory", "primer": "planted"}

    def post(origin: str | None) -> int:
        headers = {"Origin": origin} if origin else {}
        return httpx.post(f"{gateway.url}/v1/personas", json=persona, headers=headers, timeout=10).status_code

    assert post(EVIL) == 403
    assert post(gateway.url) == 201
    assert post(None) == 201
    # Reading needs no Origin check: without CORS headers a foreign page never sees the answer.
    assert httpx.get(f"{gateway.url}/v1/personas", headers={"Origin": EVIL}, timeout=10).status_code == 200
