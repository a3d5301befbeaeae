"""The one mapping of errors to RFC 9457 problem details."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import ChorusError

PROBLEM_JSON = "application/problem+json"


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
    401: "Missing or invalid API key (`WWW-Authenticate: Bearer`)",
    404: "Not found for this API key",
    409: "Conflict with the resource's state",
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


# Every /v1 route can answer these: auth, body size and the per-key request rate.
V1_ERRORS = problem_responses(401, 413, 422, 429)


def problem_response(error: ChorusError, instance: str | None = None) -> JSONResponse:
    # RFC 6750: a 401 names the scheme the client should use.
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(
        error.problem(instance), status_code=error.status, media_type=PROBLEM_JSON, headers=headers
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(ChorusError)
    async def chorus_error(request: Request, exc: ChorusError) -> JSONResponse:
        return problem_response(exc, request.url.path)

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
            "instance": request.url.path,
        }
        return JSONResponse(body, status_code=422, media_type=PROBLEM_JSON)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {
            "type": "about:blank",
            "title": str(exc.detail),
            "status": exc.status_code,
            "detail": str(exc.detail),
            "instance": request.url.path,
        }
        return JSONResponse(
            body, status_code=exc.status_code, media_type=PROBLEM_JSON, headers=getattr(exc, "headers", None)
        )
