"""What every worker process shares: logging, the Redis bus, a stop event set by SIGTERM/SIGINT,
presence heartbeats, and a small HTTP server for /healthz, /readyz and /metrics.

That server answers on loopback unless the service's `*_HTTP_HOST` setting names another interface: its
readiness and metrics are for the probes and the scraper of this machine or pod (Kubernetes sets the
pod IP), not for whoever can reach the host.

A service's `worker.py` builds a `ServiceRuntime` and hands it a way to open its `Service`; nothing else.
Every service plugs in the same way: the runtime owns presence and readiness, opens the service (loading
its model while the heartbeats say `loading`), warms it up, asks it to describe itself from then on, and
runs it until the stop signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Generator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared import metrics
from shared.bus import Bus, make_bus_kwargs
from shared.errors import ModelLoadError, ServiceUnavailable
from shared.logging import configure_logging
from shared.presence import WorkerFields, WorkerPresence
from shared.retry import Backoff, sleep_unless_stopped
from shared.settings import CommonSettings
from shared.streams import StreamNames

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]

# How long the core loop gets to drain after SIGTERM before it is cancelled. The deploy files' grace
# periods (docker-compose.yml stop_grace_period, Kubernetes terminationGracePeriodSeconds) are derived
# from it; tests/deploy checks that they stay longer.
DRAIN_TIMEOUT_S = 10.0


class Service(Protocol):
    """What a worker process serves, as the runtime sees it."""

    def describe(self) -> WorkerFields:
        """Its presence fields (capacity, free slots, model, ...); the runtime adds `state` and beats them."""
        ...

    async def warmup(self) -> None:
        """Whatever must happen before the first session (kernels built); `serving` once it returns."""
        ...

    async def run(self, stop: asyncio.Event) -> None:
        """The core loop, until `stop` is set (it drains before returning)."""
        ...


# Opens a service on the runtime's bus (loads its model) and closes what it holds when it is done.
OpenService = Callable[["ServiceRuntime"], AbstractAsyncContextManager[Service]]


class EmbeddedUvicorn(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process (we own SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def cancel_and_wait(*tasks: asyncio.Task[Any], retry_s: float = 0.1) -> None:
    """Cancel tasks and wait until they are done, cancelling again if needed.

    One cancel can be lost on Python 3.11: `asyncio.wait_for` (redis-py wraps socket writes in it)
    returns normally when the cancellation arrives just as its inner future completes, and the task
    carries on (fixed in 3.12). A task cancelled in the middle of a Redis command would then hang.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
    await asyncio.gather(*tasks, return_exceptions=True)


def health_app(service: str, ready: ReadyCheck) -> Starlette:
    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok", "service": service})

    async def readyz(_: Request) -> Response:
        ok, detail = await ready()
        return JSONResponse({"ready": ok, "service": service, **detail}, status_code=200 if ok else 503)

    async def metrics_endpoint(_: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return Starlette(
        routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics_endpoint)]
    )


class ServiceRuntime:
    def __init__(
        self,
        service: str,
        settings: CommonSettings,
        *,
        http_host: str = "127.0.0.1",
        http_port: int | None = None,
        loading: WorkerFields | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.http_host = http_host
        self.http_port = http_port
        self.stop = asyncio.Event()
        self.names = StreamNames(settings.key_prefix)
        self._bus: Bus | None = None
        self.ready_check: ReadyCheck = self._default_ready
        # What presence says while the service is opened and warmed up (say, its capacity, none free).
        self.loading: WorkerFields = loading or {}
        self._service: Service | None = None
        self.presence: WorkerPresence | None = None
        self.serving = False

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("bus used before ServiceRuntime.run connected it")
        return self._bus

    async def mark_serving(self) -> None:
        """The service can take work now (its model is loaded and warmed up): /readyz says so, and so
        does its presence (rewritten at once), which placement and the gateway's readiness read."""
        self.serving = True
        log.info("%s ready", self.service, extra={"worker_id": self.settings.worker_id})
        if self.presence is not None:
            await self.presence.refresh()

    def _presence_fields(self) -> WorkerFields:
        if self._service is None:
            return {**self.loading, "state": "loading"}
        return {**self._service.describe(), "state": "serving" if self.serving else "loading"}

    async def _serve(self, open_service: OpenService) -> None:
        async with contextlib.AsyncExitStack() as opened:
            try:
                service = await opened.enter_async_context(open_service(self))
                await service.warmup()
            except ModelLoadError as exc:
                log.critical("%s cannot start: %s", self.service, exc.detail)  # then the traceback
                raise
            self._service = service
            await self.mark_serving()
            await service.run(self.stop)

    async def _default_ready(self) -> tuple[bool, dict[str, Any]]:
        redis = self._bus is not None and await self._bus.ping()
        return redis and self.serving, {"redis": redis, "state": "serving" if self.serving else "loading"}

    async def _connect(self) -> Bus | None:
        """Connect to Redis, waiting (with backoff) while it is unreachable; None if stopped meanwhile."""
        s = self.settings
        backoff = Backoff(first_s=0.2, cap_s=2.0)
        while not self.stop.is_set():
            try:
                return await Bus.connect(s.require_redis_url(), self.names, **make_bus_kwargs(s))
            except ServiceUnavailable as exc:
                log.warning("%s; retrying", exc.detail)
                await sleep_unless_stopped(self.stop, backoff.next_delay())
        return None

    async def run(self, open_service: OpenService) -> None:
        """Connect, start heartbeat + HTTP, open and serve the service until it returns or a stop signal
        arrives."""
        s = self.settings
        configure_logging(self.service, s.log_level, s.log_format)
        install_stop_signals(self.stop)
        self._bus = await self._connect()
        if self._bus is None:
            return
        self.presence = WorkerPresence(
            self.bus,
            self.service,
            s.worker_id,
            ttl_s=s.worker_ttl_s,
            interval_s=s.heartbeat_interval_s,
            describe=self._presence_fields,
        )
        server = None
        if self.http_port is not None:
            config = uvicorn.Config(
                health_app(self.service, self.ready_check),
                host=self.http_host,
                port=self.http_port,
                log_level="warning",
                lifespan="off",
            )
            server = EmbeddedUvicorn(config)
        log.info(
            "%s starting",
            self.service,
            extra={"worker_id": s.worker_id, "http_host": self.http_host, "http_port": self.http_port},
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.presence.run(self.stop), name="presence")
                if server is not None:
                    tasks.create_task(server.serve(), name="http")
                main_task = tasks.create_task(self._serve(open_service), name="main")
                main_task.add_done_callback(lambda _: self.stop.set())
                await self.stop.wait()
                log.info("%s stopping", self.service)
                # The core loop sees `stop` and drains (tells its sessions, leaves streams consistent).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(main_task), timeout=DRAIN_TIMEOUT_S)
                main_task.cancel()
                if server is not None:
                    server.should_exit = True
        finally:
            await self.presence.leave()
            await self.bus.close()
            log.info("%s stopped", self.service)
