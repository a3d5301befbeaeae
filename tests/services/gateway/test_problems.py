"""Which failures from below have a meaning for clients (`outage_error`), and how problems carry it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from redis.exceptions import BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.gateway.conversation import new_session_id
from services.gateway.problems import outage_error, problem_response
from shared.errors import GatewayTimeout, NotFound
from tests.services.gateway.app_client import gateway_client

SCRIPT_OOM = (
    "Error running script (call to f_8045): @user_script:2: @user_script: 2: "
    "-OOM command not allowed when used memory > 'maxmemory'."
)


@pytest.mark.parametrize(
    "exc",
    [
        RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        RedisTimeoutError("Timeout reading from 127.0.0.1:6379"),
        BusyLoadingError("Redis is loading the dataset in memory"),
        ConnectionResetError(104, "Connection reset by peer"),
        ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
        ResponseError(SCRIPT_OOM),
        ResponseError("READONLY You can't write against a read only replica."),
    ],
    ids=["refused", "timeout", "loading", "reset", "oom", "oom_in_script", "readonly"],
)
def test_redis_that_cannot_serve_now_is_a_retryable_503(exc: Exception) -> None:
    error = outage_error(exc)
    assert error is not None
    assert (error.status, error.code, error.retryable) == (503, "service_unavailable", True)
    assert "127.0.0.1" not in error.detail, "no internals in what clients see"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_data_volume_is_a_retryable_507(code: int) -> None:
    error = outage_error(OSError(code, "No space left on device"))
    assert error is not None
    assert (error.status, error.code, error.retryable) == (507, "insufficient_storage", True)


@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR])
def test_a_failing_data_volume_is_a_retryable_503_for_the_operator(code: int) -> None:
    error = outage_error(OSError(code, "volume fault", "/data/transcripts/sess_x/meta.json"))
    assert error is not None
    assert (error.status, error.code, error.retryable) == (503, "storage_unavailable", True)
    assert "/data" not in error.detail, "no internals in what clients see"
    assert problem_response(error).headers["retry-after"] == "30"


async def test_a_data_volume_that_fails_a_read_answers_503_and_logs_an_error(
    redis_url: str, key_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file where the transcripts' folder should be (a volume restored wrong): every read under it fails
    with ENOTDIR. The export was a bare 500; it is a problem that says the volume is at fault."""
    (tmp_path / "transcripts").write_text("not a folder")
    async with gateway_client(redis_url, key_prefix, tmp_path) as client:
        answer = await client.get(f"/v1/sessions/{new_session_id()}/transcript")
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "storage_unavailable" and answer.headers["retry-after"] == "30"
    assert any(r.levelname == "ERROR" and "storage_unavailable" in r.getMessage() for r in caplog.records), (
        "the operator is told"
    )


@pytest.mark.parametrize(
    "exc",
    [
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        ValueError("a bug"),
    ],
)
def test_anything_else_stays_a_bug(exc: Exception) -> None:
    assert outage_error(exc) is None


def test_every_retryable_problem_says_when_to_retry() -> None:
    timeout = problem_response(GatewayTimeout("busy", retry_after_s=7))
    assert (timeout.status_code, timeout.headers["retry-after"]) == (504, "7")
    assert timeout.media_type == "application/problem+json"
    assert "retry-after" not in problem_response(NotFound("gone")).headers


async def test_unknown_routes_and_methods_are_problems_with_a_code(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """Starlette's own 404 and 405 carry a `code` too, as docs/api.md promises of every problem."""
    async with gateway_client(redis_url, key_prefix, tmp_path) as client:
        missing = await client.get("/v1/no-such-route")
        wrong_method = await client.put("/v1/voices")
    for response, status, code in ((missing, 404, "not_found"), (wrong_method, 405, "method_not_allowed")):
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert (body["code"], body["retryable"], body["detail"]) == (code, False, body["title"])


async def test_a_body_that_cannot_be_parsed_is_an_invalid_request_problem(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """Not UTF-8, nested past the parser, an integer past its digits, cut short: each is our documented
    `invalid_request` problem (FastAPI's own 400 was `about:blank` with a code of its own), and an unknown
    route's `instance` is cut short as every problem's is."""
    bodies = [b'\xff\xfe{"name": "a"}', b"[" * 20_000, b'{"name": 1' + b"0" * 5000 + b"}", b"{"]
    async with gateway_client(redis_url, key_prefix, tmp_path) as client:
        answers = [
            await client.post("/v1/personas", content=body, headers={"content-type": "application/json"})
            for body in bodies
        ]
        unknown = await client.get("/v1/" + "x" * 5000)
    for answer in answers:
        body = answer.json()
        assert answer.status_code in (400, 422), body
        assert (body["type"], body["code"]) == (
            "https://chorus.dev/problems/invalid_request",
            "invalid_request",
        )
    assert unknown.status_code == 404 and len(unknown.json()["instance"]) < 300
