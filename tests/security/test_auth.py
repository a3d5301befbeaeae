"""Authentication fails closed, against a real gateway process: no keys on a network address is a start-up
error unless `CHORUS_AUTH=off` says so, an empty keys file too, a key removed from the file is refused
without a restart, and a /v1 request's key is checked before its body is read."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.security.conftest import GatewayProcess, StartGateway

START_TIMEOUT_S = 60


def exit_code(gateway: GatewayProcess) -> int:
    return gateway.process.wait(START_TIMEOUT_S)


@pytest.mark.parametrize(
    "env",
    [
        {"CHORUS_HOST": "0.0.0.0"},
        {"CHORUS_HOST": "::"},
        # docker-compose: bound to 0.0.0.0 in the container, published on every interface of the host.
        {"CHORUS_HOST": "127.0.0.1", "CHORUS_PUBLISHED_ADDRESS": "0.0.0.0"},
        {"CHORUS_AUTH": "on"},
    ],
    ids=["ipv4-any", "ipv6-any", "published-to-the-network", "auth-on"],
)
def test_serving_the_network_without_keys_refuses_to_start(
    start_gateway: StartGateway, env: dict[str, str]
) -> None:
    gateway = start_gateway(wait=False, **env)
    assert exit_code(gateway) != 0
    log = gateway.log_text()
    assert "not starting" in log and "CHORUS_API_KEYS" in log
    if env.get("CHORUS_AUTH") != "on":
        assert "CHORUS_AUTH=off" in log, "the message names the explicit way out"


@pytest.mark.parametrize("content", ["", "# keys go here\n\n   \n"], ids=["empty", "comments-only"])
def test_an_empty_keys_file_is_a_start_up_error(
    start_gateway: StartGateway, tmp_path: Path, content: str
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(content)
    gateway = start_gateway(wait=False, CHORUS_API_KEYS_FILE=str(keys))
    assert exit_code(gateway) != 0
    assert "holds no key" in gateway.log_text()


def test_a_missing_keys_file_is_a_start_up_error(start_gateway: StartGateway, tmp_path: Path) -> None:
    gateway = start_gateway(wait=False, CHORUS_API_KEYS_FILE=str(tmp_path / "absent"))
    assert exit_code(gateway) != 0
    assert "cannot be read" in gateway.log_text()


def test_auth_off_on_the_network_must_be_explicit_and_is_announced(start_gateway: StartGateway) -> None:
    gateway = start_gateway(CHORUS_HOST="0.0.0.0", CHORUS_AUTH="off")
    assert httpx.get(f"{gateway.url}/v1/personas", timeout=10).status_code == 200
    assert "AUTH IS OFF (CHORUS_AUTH=off)" in gateway.log_text()


def test_keys_and_auth_off_together_are_a_contradiction(start_gateway: StartGateway) -> None:
    gateway = start_gateway(wait=False, CHORUS_API_KEYS="k1", CHORUS_AUTH="off")
    assert exit_code(gateway) != 0
    assert "CHORUS_AUTH=off, yet API keys are configured" in gateway.log_text()


def test_a_loopback_gateway_without_keys_runs_with_auth_off(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    assert httpx.get(f"{gateway.url}/v1/personas", timeout=10).status_code == 200
    assert "AUTH IS OFF (no CHORUS_API_KEYS configured)" in gateway.log_text()


def test_the_keys_file_is_reread_when_it_changes(start_gateway: StartGateway, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alice\nbob\n")
    reload_s = 0.2
    gateway = start_gateway(CHORUS_API_KEYS_FILE=str(keys), CHORUS_API_KEYS_RELOAD_S=str(reload_s))

    def status(key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.get(f"{gateway.url}/v1/personas", headers=headers, timeout=10).status_code

    assert (status("alice"), status("bob"), status("carol")) == (200, 200, 401)
    replacement = tmp_path / "keys.new"  # as a Kubernetes Secret update: a new file renamed into place
    replacement.write_text("alice\ncarol\n")
    replacement.replace(keys)
    time.sleep(reload_s + 0.3)  # the documented delay: the file is looked at every CHORUS_API_KEYS_RELOAD_S
    assert (status("alice"), status("bob"), status("carol")) == (200, 401, 200)

    keys.write_text("# every key revoked\n")  # emptied while running: nothing is granted, auth stays on
    time.sleep(reload_s + 0.3)
    assert (status("alice"), status("carol")) == (401, 401)
    assert "holds no key" in gateway.log_text()


def test_a_body_is_not_read_before_the_key_is_checked(start_gateway: StartGateway) -> None:
    """A 10 MB JSON body is announced and never sent: the 401 comes at once, so the gateway did not wait
    for (or parse) a body whose key it had not checked."""
    gateway = start_gateway(CHORUS_API_KEYS="k1")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as conn:
        conn.sendall(
            b"POST /v1/personas HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{"
        )
        started = time.monotonic()
        answer = conn.recv(65536).decode()
        elapsed = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 401"), answer
    print(f"\n401 for an unsent 10 MB body after {elapsed * 1000:.1f} ms")


@pytest.mark.parametrize("path", ["/api/chat", "/v1/realtime"])
async def test_websockets_refuse_an_unknown_key_with_a_reason(start_gateway: StartGateway, path: str) -> None:
    gateway = start_gateway(CHORUS_API_KEYS="k1")
    headers = {"Authorization": "Bearer not-a-key"}
    async with connect(f"{gateway.ws_url}{path}", additional_headers=headers, open_timeout=10) as ws:
        first = await ws.recv()
        await ws.wait_closed()
    assert ws.close_code == 1008
    reason = first[1:].decode() if isinstance(first, bytes) else json.loads(first)["error"]["message"]
    assert reason == "unknown API key"


async def test_revoking_a_key_closes_its_open_sockets(start_gateway: StartGateway, tmp_path: Path) -> None:
    """A realtime socket holds no session until its first audio, so this needs no dialogue worker: the
    socket itself is what a revoked key must lose."""
    keys = tmp_path / "keys"
    keys.write_text("alice\nbob\n")
    reload_s = 0.2
    gateway = start_gateway(CHORUS_API_KEYS_FILE=str(keys), CHORUS_API_KEYS_RELOAD_S=str(reload_s))
    url = f"{gateway.ws_url}/v1/realtime"
    async with (
        connect(url, additional_headers={"Authorization": "Bearer alice"}, open_timeout=10) as alice,
        connect(url, additional_headers={"Authorization": "Bearer bob"}, open_timeout=10) as bob,
    ):
        for ws in (alice, bob):
            assert json.loads(await ws.recv())["type"] == "session.created"
        keys.write_text("alice\n")  # bob revoked
        revoked_at = time.monotonic()
        told = json.loads(await asyncio.wait_for(bob.recv(), 10))
        await bob.wait_closed()
        closed_after = time.monotonic() - revoked_at
        await alice.send(json.dumps({"type": "session.update", "session": {"instructions": "still here"}}))
        assert json.loads(await asyncio.wait_for(alice.recv(), 10))["type"] == "session.updated"
    print(f"\na revoked key's socket closed {closed_after:.2f} s after the keys file changed")
    assert told["type"] == "error" and told["error"]["code"] == "unauthorized", told
    assert "revoked" in told["error"]["message"]
    assert bob.close_code == 1008 and bob.close_reason == "unauthorized"
