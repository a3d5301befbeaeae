"""The browser page at `/` (plain HTML + an ES module: no build step) and its static files.

The page keeps the pasted API key in this browser only and sends it in Authorization headers; its
WebSockets use one-use client secrets (static/app.js). Its Content-Security-Policy lets it load and
connect to this gateway alone, so an injected script could not send the key elsewhere; no other site
may frame it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"

# blob: for the microphone's AudioWorklet module; inline styles for the page's one <style>.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' blob:; "
    "style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
