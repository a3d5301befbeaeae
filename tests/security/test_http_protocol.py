"""The gateway's HTTP protocol against hostile clients, on a real gateway process
(services/gateway/http_protocol.py): uvicorn bounded neither a request's head (its line and headers) in
time or size, nor a small body in time, nor a connection once a request was answered early. A client
that connected and sent nothing, sent a header a byte at a time, an empty line after a kept-alive
response, or 64 KiB of JSON a byte at a time held a socket (and, for the body, a request) for as long as
it liked; one endless header was buffered, slowly, as far as the client went. Now each is answered with a
problem and the connection ends; requests pipelined before a refusal are answered first; clients merely
idle between requests, or on a WebSocket, are left alone."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.security.conftest import GatewayProcess, StartGateway
from tests.support.waiting import wait_until_blocking

BOUND_S = 1.0  # the head and body bounds these tests set
ENDED_WITHIN_S = 5.0  # the socket times out if the gateway keeps the connection open past this


@pytest.fixture
def gateway(start_gateway: StartGateway) -> GatewayProcess:
    return start_gateway(
        CHORUS_REQUEST_HEAD_TIMEOUT_S=str(BOUND_S),
        CHORUS_REQUEST_BODY_TIMEOUT_S=str(BOUND_S),
        CHORUS_RESPONSE_STALL_TIMEOUT_S=str(BOUND_S),
    )


def answer_then_end(client: socket.socket, received: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Read until the gateway ends the connection: the answer's status and problem."""
    client.settimeout(ENDED_WITHIN_S)
    while chunk := client.recv(65536):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower(), received[:300]
    return int(head.split()[1]), json.loads(body)


def refusal_of(gateway: GatewayProcess, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send the request whole on a new connection: the status and problem it is answered with."""
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        client.sendall(request)
        return answer_then_end(client)


def trickle(client: socket.socket, data: bytes, every_s: float = 0.2) -> bytes:
    """Send `data` a byte at a time until the gateway answers; what it answered so far."""
    for byte in data:
        client.sendall(bytes([byte]))
        client.settimeout(every_s)
        try:
            if received := client.recv(65536):
                return received
        except TimeoutError:
            continue
    raise AssertionError("the gateway took the whole trickled request without answering")


def one_response(client: socket.socket) -> bytes:
    """One whole response with a Content-Length (its head and body may come in separate reads)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += client.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
        )
    )
    while len(body) < length:
        body += client.recv(65536)
    return received


def metric(gateway: GatewayProcess, sample: str) -> float:
    for line in httpx.get(f"{gateway.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_connects_and_sends_nothing_is_answered_and_closed(gateway: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        started = time.monotonic()
        status, problem = answer_then_end(client)
    assert (status, problem["code"], problem["reason"]) == (408, "request_timeout", "head_too_slow"), problem
    assert time.monotonic() - started >= BOUND_S
    assert metric(gateway, 'chorus_limit_rejections_total{limit="http_head_time"}') == 1


def test_a_head_sent_a_byte_at_a_time_is_cut_off(gateway: GatewayProcess) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"X-Slow: " + b"s" * 200 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        status, problem = answer_then_end(client, trickle(client, head))
    assert (status, problem["reason"]) == (408, "head_too_slow"), problem


OVERSIZED_HEADS = {
    # 70 headers of 1 KB, each line well under the 8 KiB a WebSocket upgrade's parser takes
    "many headers": b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
    + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(70))
    + b"\r\n",
    "a long request line": b"GET /healthz?" + b"q" * 100_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
}


def test_a_head_over_64_kib_is_refused_before_it_is_used(gateway: GatewayProcess) -> None:
    for name, head in OVERSIZED_HEADS.items():
        status, problem = refusal_of(gateway, head)
        assert (status, problem["code"]) == (431, "request_header_fields_too_large"), (name, problem)
        assert problem["limit"] == 64 * 1024 and problem["unit"] == "bytes", name
    assert httpx.get(f"{gateway.url}/healthz", timeout=10).status_code == 200
    assert metric(gateway, 'chorus_limit_rejections_total{limit="http_head_size"}') == 2


def test_a_small_body_sent_a_byte_at_a_time_is_cut_off(gateway: GatewayProcess) -> None:
    body = json.dumps({"name": "slow", "primer": "t" * 400}).encode()
    head = (
        b"POST /v1/personas HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        client.sendall(head)
        status, problem = answer_then_end(client, trickle(client, body))
    assert (status, problem["code"], problem["reason"]) == (408, "request_timeout", "body_too_slow"), problem
    listed = httpx.get(f"{gateway.url}/v1/personas", timeout=10).json()["items"]
    assert [p["name"] for p in listed if not p["builtin"]] == [], "nothing was created"
    assert "Traceback" not in gateway.log_text()


def test_a_kept_alive_connection_idle_between_requests_is_still_served(gateway: GatewayProcess) -> None:
    """The head's bound runs from a request's first byte: the wait between requests is the keep-alive's."""
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=ENDED_WITHIN_S) as client:
        for _ in range(2):
            client.sendall(request)
            assert one_response(client).startswith(b"HTTP/1.1 200 ")
            time.sleep(BOUND_S * 1.5)


async def test_a_websocket_outlives_the_head_bound(gateway: GatewayProcess) -> None:
    async with connect(f"{gateway.ws_url}/v1/realtime?model=moshiko", open_timeout=10) as ws:
        assert '"session.created"' in str(await ws.recv())
        await asyncio.sleep(BOUND_S * 1.5)
        await ws.send(json.dumps({"type": "input_audio_buffer.clear", "event_id": "e1"}))
        assert "input_audio_buffer.cleared" in str(await ws.recv())


UNPARSABLE = {
    "a header without a colon": b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nno colon here\r\n\r\n",
    "a bad protocol": b"GET /healthz HTTQ/1.1\r\nHost: localhost\r\n\r\n",
}


def test_a_request_the_parser_refuses_gets_a_problem(gateway: GatewayProcess) -> None:
    """uvicorn answered these with a plain-text 400; every refusal is a problem."""
    for name, request in UNPARSABLE.items():
        status, problem = refusal_of(gateway, request)
        assert (status, problem["code"]) == (400, "invalid_request"), (name, problem)


def test_an_empty_line_after_a_kept_alive_answer_starts_the_heads_clock(gateway: GatewayProcess) -> None:
    """The parser skips empty lines between requests without starting one, and uvicorn's keep-alive
    timer stopped at the first byte: one CRLF held the socket for good."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=ENDED_WITHIN_S) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert one_response(client).startswith(b"HTTP/1.1 200 ")
        client.sendall(b"\r\n")
        status, problem = answer_then_end(client)
    assert (status, problem["reason"]) == (408, "head_too_slow"), problem


def test_an_endless_header_is_refused_once_past_the_bound_not_buffered(gateway: GatewayProcess) -> None:
    """httptools buffers a header until its end: the bound counts the bytes as they arrive."""
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Endless: ")
        for _ in range(20):  # 80 KiB in 4 KiB pieces, far faster than the head's time
            client.sendall(b"a" * 4096)
        status, problem = answer_then_end(client)
    assert (status, problem["limit"], problem["unit"]) == (431, 64 * 1024, "bytes"), problem


def test_over_256_headers_are_refused(gateway: GatewayProcess) -> None:
    many = b"".join(b"a%d:\r\n" % i for i in range(300))  # 2 KB: small, but a parse each
    status, problem = refusal_of(gateway, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + many + b"\r\n")
    assert (status, problem["limit"], problem["unit"]) == (431, 256, "headers"), problem


@pytest.mark.parametrize(
    "then",
    [
        b"BAD REQUEST\x00\r\n\r\n",
        b"GET /v1/realtime HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ],
    ids=["malformed", "websocket-upgrade"],
)
def test_a_refusal_pipelined_behind_a_request_comes_after_its_answer(
    gateway: GatewayProcess, then: bytes
) -> None:
    """Both in one packet: the first request is answered, then the second refused; the refusal wrote
    before the first answer (the client read it as that answer) and the first request's handler failed
    with an ERROR in the log. An upgrade pipelined so was closed by the first answer's keep-alive timer."""
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" + then)
        client.settimeout(ENDED_WITHIN_S)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    first, _, rest = received.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 "), received[:300]
    assert b"HTTP/1.1 400 " in rest and b"invalid_request" in rest, received[:600]
    log = gateway.log_text()
    assert '"level": "error"' not in log and "Traceback" not in log, log[-2000:]


def test_an_endless_trailer_after_a_chunked_body_is_refused_once_past_the_bound(
    gateway: GatewayProcess,
) -> None:
    """httptools buffers a trailer as it does a header: an endless one held a core until the body's bound."""
    head = (
        b"POST /v1/personas HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Endless: "
    )
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        client.sendall(head)
        time.sleep(0.05)  # the last chunk's header read apart from the trailer
        for _ in range(20):  # 80 KiB, well within the body's bound
            client.sendall(b"a" * 4096)
        status, problem = answer_then_end(client)
    assert (status, problem["limit"], problem["unit"]) == (431, 64 * 1024, "bytes"), problem
    assert "trailers" in problem["detail"]


def test_a_chunked_body_in_large_chunks_is_taken(gateway: GatewayProcess) -> None:
    body = json.dumps({"name": "chunked", "primer": "p" * 1900}).encode()
    chunks = [body[i : i + 500] for i in range(0, len(body), 500)]
    response = httpx.post(
        f"{gateway.url}/v1/personas", content=iter(chunks), headers={"content-type": "application/json"}
    )
    assert response.status_code == 201, response.text


def test_a_head_pipelined_behind_another_in_one_read_is_counted_from_its_own_start(
    gateway: GatewayProcess,
) -> None:
    """The first head's bytes moved the bound's cut: a second head just under 64 KiB was refused 431."""
    first = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    second = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Pad: "
    second += b"p" * (64 * 1024 - len(second) - 40) + b"\r\n\r\n"  # with the first, over 64 KiB
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=ENDED_WITHIN_S) as client:
        client.sendall(first + second)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 ") == 2, received[:600]


def test_a_client_that_stops_reading_its_answers_is_dropped(gateway: GatewayProcess) -> None:
    """uvicorn has no write timeout: a client that pipelined requests and never read their answers held
    its socket, and the answers buffered for it, for good. Now answers that make no way out for
    CHORUS_RESPONSE_STALL_TIMEOUT_S end the connection; a client that reads is left alone."""
    request = b"GET /static/app.js HTTP/1.1\r\nHost: localhost\r\n\r\n"
    size = len(httpx.get(f"{gateway.url}/static/app.js", timeout=10).content)
    count = 8 * 1024 * 1024 // size  # past what the kernels' buffers and the transport's hold
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", gateway.port))
        client.sendall(request * count)
        dropped = 'chorus_limit_rejections_total{limit="http_write_stall"}'
        wait_until_blocking(lambda: metric(gateway, dropped) == 1, "the stalled connection dropped", 20)
        client.settimeout(ENDED_WITHIN_S)
        received, reset = bytearray(), False
        try:
            while chunk := client.recv(65536):
                received += chunk
        except ConnectionResetError:
            reset = True
    answers = received.count(b"HTTP/1.1 200 ")
    assert reset and answers < count, (reset, answers, count)  # a reset: the kernel's queue dropped too
    with socket.socket() as reader:  # reads slowly, but reads: every answer, over several stall bounds
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        reader.connect(("127.0.0.1", gateway.port))
        reader.settimeout(ENDED_WITHIN_S)
        reader.sendall(request * count + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        started, received = time.monotonic(), bytearray()
        while chunk := reader.recv(32768):
            received += chunk
            time.sleep(0.01)
    assert received.count(b"HTTP/1.1 200 ") == count + 1
    assert time.monotonic() - started > 2 * BOUND_S  # the writes paused for longer than the bound
    assert metric(gateway, dropped) == 1
