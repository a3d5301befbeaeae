"""The one mapping of errors to RFC 9457 problem details.

Besides our own `ChorusError`s, three failures from below have a meaning for clients: Redis away (a
connection error, a timeout, or a "not now" reply such as `OOM command not allowed` or `LOADING`) is a
retryable `503 service_unavailable`, a full data volume (ENOSPC, EDQUOT) a `507 insufficient_storage`, and
a data volume that fails (EIO, remounted read-only, permissions, a file where a folder should be) a
retryable `503 storage_unavailable`, logged at ERROR: an operator has to mend it.
`outage_error` says which; REST answers it here, the rate limit middleware and the WebSockets use it too.
Every retryable problem carries `Retry-After`.
"""

from __future__ import annotations

import errno
import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import (
    ChorusError,
    InsufficientStorage,
    InvalidRequest,
    ServiceUnavailable,
    StorageUnavailable,
    problem_instance,
)
from shared.retry import StoreError, is_retryable

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = 5  # for a retryable problem that names no delay of its own
REDIS_RETRY_AFTER_S = 2  # a restarted Redis answers within seconds; the client reconnects by itself

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_VOLUME_FAULTS = (errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)
STORAGE_RETRY_AFTER_S = 30  # an operator mends a volume in minutes, not seconds


def outage_error(exc: BaseException) -> ChorusError | None:
    """What a failure of Redis or of the data volume means to a client; None: it is a bug (500)."""
    if is_retryable(exc):
        return ServiceUnavailable(
            "the session store is unavailable right now; retry shortly", retry_after_s=REDIS_RETRY_AFTER_S
        )
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return InsufficientStorage("the data volume is full: nothing was stored; retry later")
    if isinstance(exc, OSError) and exc.errno in _VOLUME_FAULTS:
        return StorageUnavailable(
            "the data volume cannot be read or written right now (logged for the operator); retry later",
            retry_after_s=STORAGE_RETRY_AFTER_S,
        )
    return None


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error answer."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str | None = None
    retryable: bool | None = None
    instance: str | None = None


_DESCRIPTIONS = {
    400: "Invalid request",
    415: "Unsupported media type",
    503: "Redis or a needed worker is unavailable (`Retry-After` says when to retry)",
    401: "Missing or invalid API key (`WWW-Authenticate: Bearer`)",
    404: "Not found for this API key",
    408: "The upload's body stalled or came too slowly (CHORUS_UPLOAD_STALL_S, CHORUS_UPLOAD_TIMEOUT_S)",
    409: "Conflict with the resource's state, or a per-key quota reached (`quota_exceeded`)",
    504: "A worker did not answer in time (`Retry-After` says when to retry)",
    507: "The data volume is full; nothing was stored",
    413: "Request body too large",
    422: "Invalid request",
    429: "Rate limit reached (`Retry-After` says when to retry)",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` documenting error statuses with the problem-details body."""
    return {
        status: {"model": Problem, "description": _DESCRIPTIONS[status], "content": {PROBLEM_JSON: {}}}
        for status in statuses
    }


# Every /v1 route can answer these: auth, body size, the per-key request rate, and Redis being away.
V1_ERRORS = problem_responses(401, 413, 422, 429, 503)


class ProblemJSONResponse(JSONResponse):
    """A problem body, escaped to ASCII: a detail may quote what the client sent, a lone surrogate
    included (valid in JSON's escapes, not in UTF-8), which starlette's UTF-8 rendering cannot encode."""

    media_type = PROBLEM_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode("ascii")


def problem_response(error: ChorusError, instance: str | None = None) -> JSONResponse:
    headers = {}
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"  # RFC 6750: a 401 names the scheme to use
    if error.retryable:
        headers["Retry-After"] = str(error.extra.get("retry_after_s", RETRY_AFTER_S))
    return ProblemJSONResponse(error.problem(instance), status_code=error.status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ChorusError)
    async def chorus_error(request: Request, exc: ChorusError) -> JSONResponse:
        return problem_response(exc, request.url.path)

    # OSError covers the builtin ConnectionError too; anything outage_error does not know stays a 500.
    @app.exception_handler(StoreError)
    @app.exception_handler(OSError)
    async def outage(request: Request, exc: Exception) -> JSONResponse:
        error = outage_error(exc)
        if error is None:
            raise exc
        level = logging.ERROR if isinstance(error, StorageUnavailable) else logging.WARNING
        log.log(level, "%s %s: %s (%r)", request.method, request.url.path, error.code, exc)
        return problem_response(error, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        body = {
            "type": "https://chorus.dev/problems/invalid_request",
            "title": "Invalid request",
            "status": 422,
            "detail": errors[0]["msg"] if errors else "invalid request",
            "code": "invalid_request",
            "errors": errors,
            "instance": problem_instance(request.url.path),
        }
        return ProblemJSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's: a body it could not parse (not UTF-8, nested too deep)
            return problem_response(
                InvalidRequest(f"the request body could not be parsed: {exc.detail}"), request.url.path
            )
        # Starlette's own answers (no route: 404, a wrong method: 405) carry a code like ours.
        try:
            code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            code = "http_error"
        body = {
            "type": "about:blank",
            "title": str(exc.detail),
            "status": exc.status_code,
            "detail": str(exc.detail),
            "code": code,
            "retryable": exc.status_code in (429, 503),
            "instance": problem_instance(request.url.path),
        }
        return ProblemJSONResponse(body, status_code=exc.status_code, headers=exc.headers)
