"""Structured logging: one JSON object per line with the service name and any `extra` fields
(session_id, stream, ...). Transcripts and user text go in `extra`, never in the message text.

Every line is redacted before it is written (`redact`), whoever logged it (uvicorn's "WebSocket
/v1/realtime?..." lines included): query strings keep their parameter names but lose their values
(`?api_key=`, `?client_secret=`, `?primer=` carry keys and user text), and URL passwords
(`redis://:pw@host`) are masked.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

from pythonjsonlogger import json as jsonlogger
from pythonjsonlogger.core import RESERVED_ATTRS

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn duplicates its message with ANSI colours
}


MASK = "***"
# A query string: a "?" inside a token, up to whitespace. Quotes, backslashes and brackets end it only at
# its end (`"WebSocket /p?q" [accepted]`, a JSON string's `\"`, `'/p?q',`): inside, they are part of it,
# since uvicorn logs the raw query and clients send `'` unencoded (JavaScript's encodeURIComponent keeps
# it), so `?primer=don't&api_key=...` is one query. Masked when the token is a path or URL, or the query
# has a "=": "ready?" or "a?b" stay. The look-behind starts a match at a token's start only: linear in
# the line's length.
_QUERY = re.compile(r"(?<![^\s\"'\\<>?])(?P<before>[^\s\"'\\<>?]*)\?(?P<query>\S+)")
_CLOSING = "\"'\\<>()[]{},;"  # what may close the quote, bracket or list around a query
_URL_PASSWORD = re.compile(r"(?<=://)([^\s/:@\"']*):[^\s/@\"']+@")


def _mask_query(match: re.Match[str]) -> str:
    before, whole = match.group("before"), match.group("query")
    query = whole.rstrip(_CLOSING)
    if not query or ("/" not in before and "=" not in query):
        return match.group(0)
    pairs = (pair.partition("=") for pair in query.split("&"))
    masked = "&".join(f"{name}={MASK}" if sep else MASK for name, sep, _ in pairs)
    return before + "?" + masked + whole[len(query) :]


def redact(text: str) -> str:
    """`text` without query values and URL passwords."""
    if "?" in text:
        text = _QUERY.sub(_mask_query, text)
    return without_passwords(text)


def without_passwords(text: str) -> str:
    """`text` with every URL's password replaced by `***` (user names kept): for log lines, and for
    messages that name a Redis URL."""
    return _URL_PASSWORD.sub(rf"\1:{MASK}@", text) if "@" in text else text


class JsonFormatter(jsonlogger.JsonFormatter):
    """One JSON object per line: `ts` (UTC, milliseconds), `level`, `logger`, `msg`, `service`, `exc` when
    there is a traceback, then the record's `extra` fields; the whole line redacted."""

    def __init__(self, service: str) -> None:
        super().__init__(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={
                "asctime": "ts",
                "levelname": "level",
                "name": "logger",
                "message": "msg",
                "exc_info": "exc",
            },
            static_fields={"service": service},
            reserved_attrs=[*RESERVED_ATTRS, "taskName", "color_message"],
            json_default=str,
            json_ensure_ascii=False,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        log_data["level"] = log_data["level"].lower()
        return log_data

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)-7s {service:<8} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        line = super().format(record)
        return redact(line + (" " + " ".join(f"{k}={v}" for k, v in extras.items()) if extras else ""))


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
