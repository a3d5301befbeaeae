"""`chorus up`: every service on one machine, as child processes, with an embedded redis-server.

Each service runs exactly the command its container runs (`chorus <service>`), so this is also the
cheapest check that the services work as separate processes.

A child that exits while `chorus up` is not stopping is restarted after a backoff of its own (0.5 s,
doubling up to 30 s, back to 0.5 s once it stayed up 60 s): a crash is logged, not a reason to stop
everything, and a child that cannot start (a configuration error) retries every 30 s, loudly. The
embedded redis-server is restarted the same way on the same port with the same password (generated for
this run; it reaches the services in CHORUS_REDIS_URL, their environment, never a command line or a log
line), so clients keep their URL; its streams are not persisted, so live sessions are lost. SIGTERM /
Ctrl-C stops everything in reverse order (gateway first, so clients are told, then workers, then Redis)
and exits 0.

A thread polls the gateway's /readyz and says once when the stack is ready, and once when it is not
any more.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic_settings import BaseSettings

from chorus.devtools.redis_server import EmbeddedRedis, free_port
from shared.settings import CommonSettings

log = logging.getLogger("chorus.up")

SERVICE_ORDER = ("router", "tts", "dialogue", "gateway")
TICK_S = 0.2


@dataclass
class Backoff:
    """How long to wait before starting a child again: doubles per crash in a row, up to `max_s`."""

    initial_s: float = 0.5
    max_s: float = 30.0
    reset_after_s: float = 60.0
    crashes_in_a_row: int = 0

    def after_exit(self, uptime_s: float) -> float:
        """The delay before restarting a child that ran `uptime_s` before it exited."""
        if uptime_s >= self.reset_after_s:
            self.crashes_in_a_row = 0
        self.crashes_in_a_row += 1
        return min(self.max_s, self.initial_s * 2.0 ** min(self.crashes_in_a_row - 1, 32))


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class Child:
    """One supervised process: how to start it, the running process, when to start it again."""

    name: str
    spawn: Callable[[], subprocess.Popen[bytes]]
    lost_on_exit: str = ""  # what its exit costs, said in the log line
    backoff: Backoff = field(default_factory=Backoff)
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float = 0.0  # when `process` is None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def service_child(name: str, env: dict[str, str]) -> Child:
    return Child(name, lambda: subprocess.Popen([sys.executable, "-m", "chorus.cli", name], env=env))


def redis_child(redis: EmbeddedRedis) -> Child:
    def spawn() -> subprocess.Popen[bytes]:
        process = redis.start().process
        assert process is not None
        return process

    return Child(
        "redis-server",
        spawn,
        lost_on_exit=f"live sessions are lost (streams are not persisted); it comes back on {redis.safe_url}",
    )


@dataclass
class Supervisor:
    services: list[Child]
    redis: Child | None = None
    stopping: bool = False  # set by SIGTERM/SIGINT; nothing is started once it is

    @property
    def children(self) -> list[Child]:
        return ([self.redis] if self.redis else []) + self.services

    def start(self) -> None:
        for child in self.children:
            if not self.stopping:
                self._spawn(child, time.monotonic())
                log.info("started %s (pid %d)", child.name, self._pid(child))

    def run(self) -> None:
        """Restart children that exit, until a signal sets `stopping`."""
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                self._supervise(child, now)
            time.sleep(TICK_S)

    def _supervise(self, child: Child, now: float) -> None:
        if child.process is None:
            if now >= child.restart_at and not self.stopping:
                self._restart(child, now)
            return
        code = child.process.poll()
        if code is not None:
            child.process = None
            uptime_s = now - child.started_at
            self._schedule_restart(child, now, uptime_s, f"{describe_exit(code)} after {uptime_s:.1f} s")

    def _schedule_restart(self, child: Child, now: float, uptime_s: float, why: str) -> None:
        delay = child.backoff.after_exit(uptime_s)
        child.restart_at = now + delay
        lost = f"; {child.lost_on_exit}" if child.lost_on_exit else ""
        log.error(
            "%s is down (%s); restarting it in %.1f s (crash %d in a row)%s",
            child.name,
            why,
            delay,
            child.backoff.crashes_in_a_row,
            lost,
        )

    def _restart(self, child: Child, now: float) -> None:
        try:
            self._spawn(child, now)
        except (OSError, RuntimeError) as error:
            self._schedule_restart(child, now, 0.0, f"could not start: {error}")
            return
        log.warning("restarted %s (pid %d)", child.name, self._pid(child))

    @staticmethod
    def _spawn(child: Child, now: float) -> None:
        child.process = child.spawn()
        child.started_at = now

    @staticmethod
    def _pid(child: Child) -> int:
        return child.process.pid if child.process else -1

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to every service at once (each drains on its own), then, once they exited, the Redis they
        drained against."""
        self.stopping = True
        terminate(list(reversed(self.services)), timeout_s)
        if self.redis:
            terminate([self.redis], 5.0)


def terminate(children: Sequence[Child], timeout_s: float) -> None:
    """SIGTERM every running child without waiting in between, then wait for all of them; kill those that
    outstay `timeout_s`."""
    running = [c for c in children if c.alive]
    for child in running:
        assert child.process is not None
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in running:
        assert child.process is not None
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", child.name)
            child.process.kill()
            child.process.wait()


def probe_ready(url: str, timeout_s: float, workers: Sequence[str] = ()) -> tuple[bool, str]:
    """(ready, why not) from one GET of the gateway's /readyz: it answers ready, and each of `workers`
    (the worker services `chorus up` started) has a worker serving. The gateway's own readiness does not
    wait for a TTS worker (native voices need none); the ready line, which names every service, does."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(url, timeout=timeout_s) as response:
            body = json.loads(response.read())
            if response.status != 200 or body.get("ready") is not True:
                return False, f"/readyz answered {response.status} without ready: true"
            services = body.get("services") or {}
            waiting = [name for name in workers if not (services.get(name) or {}).get("ready")]
            return not waiting, f"no {' or '.join(waiting)} worker serves yet" if waiting else ""
    except urllib.error.HTTPError as error:
        return False, f"/readyz answered {error.code} {error.read()[:300].decode(errors='replace')}"
    except (OSError, ValueError) as error:  # refused, timed out, not JSON
        return False, f"the gateway does not answer /readyz ({error})"


class ReadinessWatch:
    """Polls /readyz in a thread of its own (the supervision loop never waits on HTTP) and logs the
    ready line once, the not-ready line once, and the ready line again once it is back."""

    def __init__(
        self,
        url: str,
        ready_line: str,
        workers: Sequence[str] = (),
        interval_s: float = 0.5,
        timeout_s: float = 1.0,
        misses_before_not_ready: int = 2,  # one slow answer is not an outage
    ) -> None:
        self.url = url
        self.ready_line = ready_line
        self.workers = workers
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.misses_before_not_ready = misses_before_not_ready
        self.ready = False
        self.misses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout_s + 1.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            ready, why = probe_ready(self.url, self.timeout_s, self.workers)
            if not self._stop.is_set():
                self.observe(ready, why)

    def observe(self, ready: bool, why: str) -> None:
        if ready:
            self.misses = 0
            if not self.ready:
                self.ready = True
                log.info("%s", self.ready_line)
            return
        self.misses += 1
        if self.ready and self.misses >= self.misses_before_not_ready:
            self.ready = False
            log.warning("chorus is not ready any more: %s", why)


class GatewayAddress(BaseSettings):
    """The two gateway settings `chorus up` needs, read as the gateway reads them (the rest is the
    gateway's to validate: a bad one makes it exit, and it is restarted and logged like any crash)."""

    model_config = CommonSettings.model_config
    host: str = "127.0.0.1"
    port: int = 8000

    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def service_ports(env: dict[str, str], gateway: GatewayAddress) -> set[int]:
    """The ports the services will listen on (the gateway's, each worker's `CHORUS_*_PORT`): the embedded
    Redis, started first on a port of its own choosing, must not take one of them."""
    configured = (v for k, v in env.items() if k.startswith("CHORUS_") and k.endswith("_PORT"))
    return {gateway.port, *(int(v) for v in configured if v.isdigit())}


def up(port: int | None, services: Sequence[str] = SERVICE_ORDER) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s up       %(message)s")
    settings = CommonSettings()
    env = dict(os.environ)
    if port is not None:
        env["CHORUS_PORT"] = str(port)
    gateway = GatewayAddress(port=port) if port is not None else GatewayAddress()
    redis = None
    if not settings.redis_url:
        redis = EmbeddedRedis(own_process_group=True, port=free_port(taken=service_ports(env, gateway)))
        env["CHORUS_REDIS_URL"] = redis.url
    supervisor = Supervisor(
        services=[service_child(name, env) for name in services],
        redis=redis_child(redis) if redis else None,
    )
    watch = None
    if "gateway" in services:
        ready_line = f"chorus is ready: {gateway.base_url()} ({', '.join(services)})"
        workers = [name for name in services if name != "gateway"]
        watch = ReadinessWatch(f"{gateway.base_url()}/readyz", ready_line, workers)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if redis is not None:
        log.info(
            "embedded redis-server on %s (password generated for this run; set CHORUS_REDIS_URL to use "
            "your own)",
            redis.safe_url,
        )
    try:
        supervisor.start()
        if watch is not None:
            log.info("waiting for %s", watch.url)
            watch.start()
        supervisor.run()
    finally:
        if watch is not None:
            watch.stop()
        supervisor.stop()
        if redis is not None:
            redis.stop()
    log.info("all services stopped")
    return 0
