"""`POST /v1/realtime/client_secrets`: a short-lived secret a browser opens a WebSocket with, in place of
the API key, which then never reaches the page's URLs or the browser's history.

The shape is OpenAI's (the official SDK's `client.realtime.client_secrets.create()` works against it):
`{"expires_after": {"anchor": "created_at", "seconds": N}, "session": {"type": "realtime", ...}}` in,
`{"value": "ek_...", "expires_at": <unix s>, "session": {...}}` out. Unlike OpenAI's, which opens
sessions until it expires, ours opens one: the socket that presents it deletes it (GETDEL). It lives at
most `CHORUS_CLIENT_SECRET_TTL_S` (60 s by default; a shorter `expires_after.seconds` is honoured) and
belongs to the owner of the key that minted it; a cloned voice in it must be that owner's (checked
when it is minted and again when it is used). The session's `model`, `instructions` and
`audio.output.voice` are what the socket starts with; the client may still change them.

Redis holds the secret's SHA-256, never the secret itself.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.auth import CLIENT_SECRET_PREFIX, Caller, current_owner
from services.gateway.problems import V1_ERRORS, problem_responses
from services.gateway.protocols.session_socket import check_voice_owned
from services.gateway.settings import GatewaySettings
from shared.audio import SAMPLE_RATE
from shared.bus import Bus
from shared.client_secrets import OneUseSecrets
from shared.messages import VoiceName, model_of_voice, native_voice_for

router = APIRouter(prefix="/v1/realtime", tags=["realtime"], responses=V1_ERRORS)
Owner = Annotated[str, Depends(current_owner)]


class ExpiresAfter(BaseModel):
    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(default=600, ge=10, le=7200, description="Capped at CHORUS_CLIENT_SECRET_TTL_S.")


class OutputAudio(BaseModel):
    model_config = ConfigDict(extra="ignore")
    voice: VoiceName | None = None


class SessionAudio(BaseModel):
    model_config = ConfigDict(extra="ignore")
    output: OutputAudio | None = None


class SessionConfig(BaseModel):
    """What the socket opened with the secret starts with; other fields of OpenAI's are ignored."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["realtime"] = "realtime"
    model: str | None = Field(default=None, max_length=100)
    instructions: str | None = Field(default=None, max_length=2000, description="The persona primer.")
    audio: SessionAudio | None = None

    @property
    def voice(self) -> str | None:
        return self.audio.output.voice if self.audio and self.audio.output else None


class ClientSecretRequest(BaseModel):
    expires_after: ExpiresAfter | None = None
    session: SessionConfig | None = None


class SecretSession(BaseModel):
    """OpenAI's `RealtimeSessionCreateResponse`, with the fields Chorus uses."""

    type: Literal["realtime"] = "realtime"
    object: Literal["realtime.session"] = "realtime.session"
    id: str
    model: str
    instructions: str
    expires_at: int
    audio: dict[str, Any]


class ClientSecret(BaseModel):
    value: str = Field(description="`ek_...`: open one WebSocket with `?client_secret=` or `Bearer`.")
    expires_at: int = Field(description="Unix seconds after which the secret opens nothing.")
    session: SecretSession


class ClientSecretStore:
    """Client secrets, each granting its caller one socket (`shared.client_secrets`: one-use, with a TTL)."""

    def __init__(self, bus: Bus) -> None:
        self.stored = OneUseSecrets(bus)

    async def mint(self, caller: Caller, ttl_s: int) -> str:
        secret = CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32)
        grant = {k: v for k, v in vars(caller).items() if v is not None}
        await self.stored.put(secret, grant, ttl_s)
        return secret

    async def redeem(self, secret: str) -> Caller | None:
        """The caller the secret was minted for, or None (unknown, expired or used); usable once."""
        if not secret.startswith(CLIENT_SECRET_PREFIX) or len(secret) > 100:
            return None
        grant = await self.stored.take(secret)
        return None if grant is None else Caller(**grant)


@router.post(
    "/client_secrets", status_code=200, response_model=ClientSecret, responses=problem_responses(400)
)
async def create_client_secret(
    request: Request, owner: Owner, body: ClientSecretRequest | None = None
) -> ClientSecret:
    """A one-use secret that opens `/v1/realtime` or `/api/chat` as the caller, for at most a minute."""
    settings: GatewaySettings = request.app.state.settings
    body = body or ClientSecretRequest()
    config = body.session or SessionConfig()
    requested = body.expires_after.seconds if body.expires_after else settings.client_secret_ttl_s
    ttl_s = min(requested, settings.client_secret_ttl_s)
    model = native_voice_for(config.model)  # another model's name is moshiko, as `?model=` takes it
    if config.voice is not None:  # another key's profile: refused now, like a session.update to it
        await check_voice_owned(request, owner, config.voice)
    # None: the socket decides (its persona's voice, else the native voice that runs: `starting_voice`).
    voice = config.voice or model_of_voice(config.model or "")
    # The model as asked for: one of Moshi's decides the voice; none (or another) leaves it to the persona.
    caller = Caller(owner, model=config.model, instructions=config.instructions, voice=config.voice)
    store: ClientSecretStore = request.app.state.client_secrets
    value = await store.mint(caller, ttl_s)
    expires_at = int(time.time()) + ttl_s
    pcm = {"type": "audio/pcm", "rate": SAMPLE_RATE}
    session = SecretSession(
        id=f"sess_{secrets.token_hex(10)}",
        model=model_of_voice(voice or "") or model,  # what the socket will run: a native voice's own model
        instructions=config.instructions or "",
        expires_at=expires_at,
        audio={"input": {"format": pcm}, "output": {"format": pcm} | ({"voice": voice} if voice else {})},
    )
    return ClientSecret(value=value, expires_at=expires_at, session=session)
