"""Log redaction: query values and URL passwords never reach a log line, whatever logged it."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from shared.logging import JsonFormatter, TextFormatter, redact


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            '127.0.0.1:5 - "WebSocket /v1/realtime?model=moshiko&api_key=sk-1" [accepted]',
            '127.0.0.1:5 - "WebSocket /v1/realtime?model=***&api_key=***" [accepted]',
        ),
        ("GET /api/chat?primer=my%20secret HTTP/1.1", "GET /api/chat?primer=*** HTTP/1.1"),
        ("ws://h:8000/v1/realtime?client_secret=ek_abc", "ws://h:8000/v1/realtime?client_secret=***"),
        ("/v1/realtime?sk-bare-key", "/v1/realtime?***"),
        ("redis://:hunter2@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
        ("rediss://user:pw@redis.example:6380", "rediss://user:***@redis.example:6380"),
        ("is the slot free? not yet", "is the slot free? not yet"),
        ('"is it free?" she asked', '"is it free?" she asked'),
        # uvicorn logs the raw query: quotes and backslashes inside it do not end it.
        (
            '127.0.0.1:5 - "WebSocket /api/chat?primer=don\'t&api_key=sk-1" [accepted]',
            '127.0.0.1:5 - "WebSocket /api/chat?primer=***&api_key=***" [accepted]',
        ),
        ('"WebSocket /v1/realtime?x=a"b&api_key=sk-1" 403', '"WebSocket /v1/realtime?x=***&api_key=***" 403'),
        ('"WebSocket /v1/realtime?x=a\\b&api_key=sk-1"', '"WebSocket /v1/realtime?x=***&api_key=***"'),
        ("['/v1/x?a=b<c>&api_key=sk-1', 'next']", "['/v1/x?a=***&api_key=***', 'next']"),
        ("really?yes", "really?yes"),
    ],
)
def test_redact(line: str, expected: str) -> None:
    assert redact(line) == expected


@pytest.mark.parametrize("formatter", [JsonFormatter("gateway"), TextFormatter("gateway")])
def test_formatters_redact_messages_extras_and_tracebacks(formatter: logging.Formatter) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    log = logging.getLogger("test_redaction")
    log.addHandler(handler)
    try:
        log.warning("open %s", "/api/chat?api_key=k1", extra={"url": "/v1/x?primer=p1"})
        log.warning('"WebSocket %s" [accepted]', "/v1/realtime?x=\"\\&primer=don't&api_key=k2")
        try:
            raise ValueError("bad url /v1/realtime?client_secret=s1")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    for secret in ("k1", "k2", "p1", "s1"):
        assert f"={secret}" not in text
    assert "api_key=***" in text and "primer=***" in text and "client_secret=***" in text
    if isinstance(formatter, JsonFormatter):
        assert all(json.loads(line) for line in text.splitlines() if line.startswith("{"))


def test_json_lines_carry_time_level_service_logger_message_extras_and_traceback() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("router"))
    log = logging.getLogger("test_json_fields")
    log.addHandler(handler)
    try:
        log.warning("slot %s free", 3, extra={"session_id": "sess_1", "color_message": "dup"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first == {
        "ts": first["ts"],
        "level": "warning",
        "service": "router",
        "logger": "test_json_fields",
        "msg": "slot 3 free",
        "session_id": "sess_1",
    }
    assert second["level"] == "error" and second["msg"] == "failed"
    assert second["exc"].startswith("Traceback") and "ValueError: boom" in second["exc"]
