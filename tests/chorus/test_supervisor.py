"""The parts of `chorus up` that decide without processes: backoff delays and what the ready watch says.
tests/test_up.py runs the real thing."""

from __future__ import annotations

import http.server
import json
import logging
import threading

import pytest

from chorus.devtools.redis_server import free_port
from chorus.supervisor import (
    Backoff,
    GatewayAddress,
    ReadinessWatch,
    describe_exit,
    probe_ready,
    service_ports,
)


def test_backoff_doubles_per_crash_in_a_row_up_to_30_s() -> None:
    backoff = Backoff()
    delays = [backoff.after_exit(uptime_s=1.0) for _ in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_backoff_starts_over_after_a_child_stayed_up_a_minute() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff.after_exit(uptime_s=1.0)
    assert backoff.after_exit(uptime_s=60.0) == 0.5
    assert backoff.after_exit(uptime_s=1.0) == 1.0


def test_backoff_stays_bounded_however_long_a_child_keeps_failing() -> None:
    backoff = Backoff()
    assert max(backoff.after_exit(uptime_s=0.0) for _ in range(5000)) == 30.0


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(-9) == "killed by SIGKILL"


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_ready_is_said_once_then_not_ready_once_then_ready_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chorus.up")
    watch = ReadinessWatch("http://127.0.0.1:1/readyz", "chorus is ready: here")
    for ready in (False, True, True, True, False, False, False, True, True):
        watch.observe(ready, "" if ready else "down")
    assert said(caplog) == [
        "chorus is ready: here",
        "chorus is not ready any more: down",
        "chorus is ready: here",
    ]


def test_one_missed_poll_is_not_an_outage(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chorus.up")
    watch = ReadinessWatch("http://127.0.0.1:1/readyz", "chorus is ready: here")
    for ready in (True, False, True, False, True):
        watch.observe(ready, "" if ready else "slow")
    assert said(caplog) == ["chorus is ready: here"]


def test_a_gateway_that_does_not_answer_is_not_ready() -> None:
    ready, why = probe_ready(f"http://127.0.0.1:{free_port()}/readyz", timeout_s=0.5)
    assert not ready
    assert "does not answer" in why


def test_the_ready_line_waits_for_every_worker_service_started_not_only_for_the_gateways_readiness() -> None:
    """The gateway is ready without a TTS worker (native voices need none), but the ready line names tts:
    it came while the TTS worker was still loading."""
    body = {"ready": True, "services": {"dialogue": {"ready": True}, "router": {"ready": True}, "tts": {}}}

    class Readyz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the handler's name is http.server's)
            payload = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Readyz) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/readyz"
        assert probe_ready(url, 2.0, ["router", "tts", "dialogue"]) == (False, "no tts worker serves yet")
        assert probe_ready(url, 2.0, ["router", "dialogue"]) == (True, "")
        body["services"]["tts"] = {"ready": True}
        assert probe_ready(url, 2.0, ["router", "tts", "dialogue"]) == (True, "")
        server.shutdown()


def test_the_embedded_redis_avoids_every_port_a_service_is_configured_with() -> None:
    env = {"CHORUS_DIALOGUE_HTTP_PORT": "25001", "CHORUS_TTS_HTTP_PORT": "0", "CHORUS_KEY_PREFIX": "x:"}
    ports = service_ports(env, GatewayAddress(port=25000))
    assert ports == {25000, 25001, 0}
    assert free_port(taken=ports) not in ports
