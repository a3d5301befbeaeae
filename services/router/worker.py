"""`chorus router`: wiring only; the core loop is `services/router/routing.py`, the policy `mixer.py`."""

from __future__ import annotations

import asyncio

from services.router.routing import Router
from services.router.settings import RouterSettings, get_settings
from shared.runtime import ServiceRuntime


async def serve(runtime: ServiceRuntime) -> None:
    settings = runtime.settings if isinstance(runtime.settings, RouterSettings) else get_settings()
    router = Router(runtime.bus, settings)  # loads the speech detector's model
    runtime.describe = router.describe
    await runtime.mark_serving()
    await router.run(runtime.stop)


def main() -> None:
    settings = get_settings()
    runtime = ServiceRuntime(
        "router", settings, http_host=settings.router_http_host, http_port=settings.router_http_port or None
    )
    asyncio.run(runtime.run(serve))
