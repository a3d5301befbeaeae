"""The one exception hierarchy. Mapped once to HTTP problem details (gateway) and once to protocol errors."""

from __future__ import annotations

from typing import Any, ClassVar

MAX_INSTANCE = 256  # a problem's `instance` (the request path) is cut to this many characters


def excerpt(value: object, limit: int = 64) -> str:
    """A client's value quoted in an error, cut short: an error never echoes a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def problem_instance(path: str) -> str:
    """A problem's `instance`, the request path, cut short: a path can be kilobytes (an id no route
    accepts), and the detail quotes what it needs of it."""
    return path if len(path) <= MAX_INSTANCE else path[:MAX_INSTANCE] + "..."


class ChorusError(Exception):
    """Base error. `code` is stable and machine-readable; `status` is the HTTP status it maps to."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    retryable: ClassVar[bool] = False

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        """RFC 9457 problem details body."""
        body: dict[str, Any] = {
            "type": f"https://chorus.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            "retryable": self.retryable,
        }
        if instance:
            body["instance"] = problem_instance(instance)
        body.update(self.extra)
        return body


class MalformedMessage(ChorusError):
    code = "malformed_message"
    status = 400
    title = "Malformed message"


class InvalidRequest(ChorusError):
    code = "invalid_request"
    status = 400
    title = "Invalid request"


class Unauthorized(ChorusError):
    code = "unauthorized"
    status = 401
    title = "Missing or invalid API key"


class RequestTimeout(ChorusError):
    """A request that does not arrive in time: its head, or its body (a small one too slow, an upload's
    trickled or stalled)."""

    code = "request_timeout"
    status = 408
    title = "Request too slow"


class HeadTooLarge(ChorusError):
    """A request's line and headers (or a chunked body's trailers) over the gateway's bound in bytes or in
    headers, refused before any of it is used."""

    code = "request_header_fields_too_large"
    status = 431
    title = "Request head too large"


class Forbidden(ChorusError):
    """A browser request from an origin the gateway does not serve (CSRF, a page driving a local gateway)."""

    code = "forbidden_origin"
    status = 403
    title = "Origin not allowed"


class MisdirectedRequest(ChorusError):
    """A Host name the gateway does not answer for (DNS rebinding): `CHORUS_ALLOWED_HOSTS`."""

    code = "unknown_host"
    status = 421
    title = "Host not allowed"


class NotFound(ChorusError):
    code = "not_found"
    status = 404
    title = "Not found"


class Conflict(ChorusError):
    code = "conflict"
    status = 409
    title = "Conflict"


class QuotaExceeded(Conflict):
    """The caller has as many voices, personas... as its quota allows; it must delete one first. A 409,
    not a 429 (waiting does not help) nor a 507 (the disk is not full: the quota is the caller's)."""

    code = "quota_exceeded"
    title = "Quota exceeded"


class PayloadTooLarge(ChorusError):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class UnsupportedMedia(ChorusError):
    code = "unsupported_media_type"
    status = 415
    title = "Unsupported media type"


class Unprocessable(ChorusError):
    code = "unprocessable"
    status = 422
    title = "Unprocessable content"


class RateLimited(ChorusError):
    code = "rate_limited"
    status = 429
    title = "Too many requests"
    retryable = True


class ClientNotReading(ChorusError):
    """A WebSocket client stopped reading what it is sent (errors, text, events) past its socket's send
    queue bound: the session ends and the socket closes with 1008 (policy violation) and the reason."""

    code = "client_not_reading"
    status = 429
    title = "Client does not read"


class NoCapacity(ChorusError):
    code = "no_capacity"
    status = 503
    title = "No capacity"
    retryable = True


class ServiceUnavailable(ChorusError):
    code = "service_unavailable"
    status = 503
    title = "Service unavailable"
    retryable = True


class CloningUnavailable(ServiceUnavailable):
    """No TTS worker holds Pocket TTS's voice-cloning weights (gated on the hub): clips cannot become
    voices. Catalog voices still work. Not retryable: an operator has to give the workers access."""

    code = "cloning_unavailable"
    title = "Voice cloning unavailable"
    retryable = False
    TERMS_URL = "https://huggingface.co/kyutai/pocket-tts"

    def __init__(self, detail: str = "", **extra: Any) -> None:
        detail = detail or (
            "no TTS worker can clone voices: Pocket TTS's voice-cloning weights are gated. Accept the "
            f"terms at {self.TERMS_URL}, give the TTS workers a token (HF_TOKEN, or `hf auth login`) and "
            "restart them; catalog voices (catalog:<name>) work meanwhile"
        )
        super().__init__(detail, **{"terms_url": self.TERMS_URL, **extra})


class SessionLost(ChorusError):
    """A live session is over without its client asking: its state was lost (Redis restarted without
    persistence) or a worker ended it. The client may start a new one."""

    code = "session_lost"
    status = 410
    title = "Session lost"
    retryable = True


class LifetimeReached(ChorusError):
    """A session's lifetime policy ended it (the gateway enforces them): a normal end, not a failure. The
    socket closes with 1000 and the code as its reason; the client may start a new session."""

    code = "lifetime_reached"
    status = 410
    title = "Session lifetime reached"


class SessionExpired(LifetimeReached):
    """The session reached its maximum length (`CHORUS_MAX_SESSION_S`)."""

    code = "session_expired"
    title = "Session expired"


class IdleTimeout(LifetimeReached):
    """No user speech for the session's idle timeout (`CHORUS_IDLE_TIMEOUT_S`, or realtime
    `idle_timeout_ms`)."""

    code = "idle_timeout"
    title = "Idle timeout"


class GatewayTimeout(ChorusError):
    """A worker the request needs did not answer in time (busy, or gone meanwhile)."""

    code = "timeout"
    status = 504
    title = "Gateway timeout"
    retryable = True


class InsufficientStorage(ChorusError):
    """The data volume is full (ENOSPC) or over its quota (EDQUOT): nothing was stored."""

    code = "insufficient_storage"
    status = 507
    title = "Insufficient storage"
    retryable = True


class StorageUnavailable(ServiceUnavailable):
    """The data volume cannot be read or written (an I/O error, remounted read-only, permissions): an
    operator's problem, logged at ERROR; retryable, as it is once the volume is mended."""

    code = "storage_unavailable"
    title = "Storage unavailable"


class ModelLoadError(ChorusError):
    code = "model_load_error"
    status = 503
    title = "Model could not be loaded"


def error_for_code(code: str, detail: str, **extra: Any) -> ChorusError:
    """Rebuild an error that crossed a process boundary as its `code` (unknown codes: a 500)."""
    pending: list[type[ChorusError]] = [ChorusError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls(detail, **extra)
        pending.extend(cls.__subclasses__())
    return ChorusError(detail, **extra)
