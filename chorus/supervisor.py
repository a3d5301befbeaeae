"""`chorus up`: every service on one machine, as child processes, with an embedded redis-server.

Each service runs exactly the command its container runs (`chorus <service>`), so this is also the
cheapest check that the services work as separate processes. SIGTERM / Ctrl-C stops them in reverse
order (gateway first, so clients are told, then workers, then Redis).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.redis_server import EmbeddedRedis
from shared.settings import CommonSettings

log = logging.getLogger("chorus.up")

SERVICE_ORDER = ("router", "tts", "dialogue", "gateway")


@dataclass
class Supervisor:
    services: Sequence[str] = SERVICE_ORDER
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stopping: bool = False

    def start(self) -> None:
        for name in self.services:
            cmd = [sys.executable, "-m", "chorus.cli", name]
            self.children[name] = subprocess.Popen(cmd, env=self.env)
            log.info("started %s (pid %d)", name, self.children[name].pid)

    def wait(self) -> int:
        """Block until a signal or until a child dies; returns the exit code for `chorus up`."""
        while not self.stopping:
            for name, child in self.children.items():
                code = child.poll()
                if code is not None:
                    log.error("%s exited with %s; stopping everything", name, code)
                    return code or 1
            time.sleep(0.2)
        return 0

    def stop(self, timeout_s: float = 15.0) -> None:
        for name in reversed(list(self.children)):
            child = self.children[name]
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, child in self.children.items():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", name)
                child.kill()
                child.wait()


def up(port: int | None, services: Sequence[str] = SERVICE_ORDER) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s up       %(message)s")
    settings = CommonSettings()
    env = dict(os.environ)
    if port is not None:
        env["CHORUS_PORT"] = str(port)
    redis = None
    if not settings.redis_url:
        redis = EmbeddedRedis().start()
        env["CHORUS_REDIS_URL"] = redis.url
        log.info("embedded redis-server on %s (set CHORUS_REDIS_URL to use your own)", redis.url)
    supervisor = Supervisor(services=services, env=env)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        supervisor.start()
        log.info(
            "gateway on http://%s:%s", env.get("CHORUS_HOST", "127.0.0.1"), env.get("CHORUS_PORT", "8000")
        )
        code = supervisor.wait()
    finally:
        supervisor.stop()
        if redis is not None:
            redis.stop()
    log.info("all services stopped")
    return code
