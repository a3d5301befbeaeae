"""Request bodies are capped per route, against a real gateway process: small for JSON, the upload cap for
`POST /v1/voices` only; refused by Content-Length or while streaming, before anything parses them."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.security.conftest import GatewayProcess, StartGateway
from tests.support.tts import SPEECH

JSON_CAP = 64 * 1024  # the default CHORUS_MAX_BODY_BYTES
UPLOAD_CAP = 1024 * 1024  # CHORUS_VOICE_MAX_UPLOAD_BYTES, lowered to keep the bodies small
ENDED_WITHIN_S = 3.0  # generous: an answered connection is ended at once


@pytest.fixture
def gateway(start_gateway: StartGateway) -> GatewayProcess:
    return start_gateway(CHORUS_VOICE_MAX_UPLOAD_BYTES=str(UPLOAD_CAP))


def persona(primer_bytes: int) -> bytes:
    return b'{"name": "big", "primer": "' + b"y" * primer_bytes + b'"}'


def chunked(body: bytes) -> Iterator[bytes]:
    """The body without a Content-Length (chunked): the cap is enforced on the bytes as they arrive."""
    for i in range(0, len(body), 16 * 1024):
        yield body[i : i + 16 * 1024]


def assert_too_large(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["code"], problem["reason"], problem["unit"]) == (
        "payload_too_large",
        "too_large",
        "bytes",
    )
    assert problem["limit"] == limit
    assert problem["measured"] > limit
    assert str(limit) in problem["detail"]


@pytest.mark.parametrize("send", ["content_length", "chunked"])
def test_a_json_body_over_the_small_cap_is_refused_before_it_is_parsed(
    gateway: GatewayProcess, send: str
) -> None:
    body = persona(JSON_CAP)  # past the JSON cap, far below the upload cap
    content = body if send == "content_length" else chunked(body)
    response = httpx.post(
        f"{gateway.url}/v1/personas",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert_too_large(response, JSON_CAP)
    listed = httpx.get(f"{gateway.url}/v1/personas", timeout=10).json()["items"]
    assert [p["name"] for p in listed if not p["builtin"]] == [], "nothing was created"
    assert "Traceback" not in gateway.log_text()


def test_a_request_answered_before_its_body_arrived_ends_its_connection(gateway: GatewayProcess) -> None:
    """Refused by its declared length, the body still coming: the 413 is followed by the end of the stream
    while the client sends on (uvicorn kept reading the body, and the client's next byte stopped its
    keep-alive timer: the socket stayed open for as long as the client liked). Then it is served again."""
    head = (
        b"POST /v1/personas HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {10 * JSON_CAP}\r\n\r\n".encode()
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=ENDED_WITHIN_S) as client:
        client.sendall(head + b'{"name": "')
        received = client.recv(65536)
        client.sendall(b"y" * 1000)  # the client sends on
        while chunk := client.recv(65536):  # times out if the gateway keeps the socket open
            received += chunk
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert b'"code":"payload_too_large"' in received
    assert httpx.get(f"{gateway.url}/healthz", timeout=10).status_code == 200


def test_a_json_body_under_the_cap_is_accepted(gateway: GatewayProcess) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/personas",
        content=persona(1500),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("send", ["content_length", "chunked"])
def test_the_upload_cap_applies_to_voice_uploads_only(gateway: GatewayProcess, send: str) -> None:
    """A clip of 240 KB passes the upload route's cap though it is far over the JSON one; a body past
    the upload cap is refused there too, and that cap holds nowhere else."""
    clip = SPEECH.read_bytes()
    assert JSON_CAP < len(clip) < UPLOAD_CAP
    accepted = httpx.post(
        f"{gateway.url}/v1/voices",
        files={"file": ("speech.wav", clip)},
        data={"name": "me", "consent": "true"},
        timeout=60,
    )
    assert accepted.status_code == 201, accepted.text

    boundary = "chorus-boundary"
    big = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.wav"\r\n\r\n'.encode()
        + bytes(UPLOAD_CAP + 128 * 1024)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    refused = httpx.post(
        f"{gateway.url}/v1/voices",
        content=big if send == "content_length" else chunked(big),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    assert_too_large(refused, UPLOAD_CAP)

    elsewhere = httpx.post(
        f"{gateway.url}/v1/voices/{accepted.json()['id']}/preview",
        content=b'{"text": "' + b"a" * len(clip) + b'"}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert_too_large(elsewhere, JSON_CAP)
    assert "Traceback" not in gateway.log_text()
