"""Fixtures of the hostile-client suite: a real gateway process (`python -m chorus.cli gateway`, as its
container runs it) against the suite's redis-server, reached over real sockets. Tests that need a whole
conversation start the other services too (`tests/support/stack.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chorus.devtools.redis_server import free_port
from tests.support.paths import REPO_ROOT
from tests.support.stack import ChorusStack, ProcessStack
from tests.support.waiting import wait_until_blocking


@dataclass(kw_only=True)
class GatewayProcess(ProcessStack):
    """A stack of one: the gateway process alone (tests/support/stack.py launches and stops it)."""

    port: int
    key_prefix: str
    data_dir: Path
    process: subprocess.Popen[bytes] = field(init=False)

    @property
    def gateway_port(self) -> int:
        return self.port

    @property
    def log(self) -> Path:
        return self.workdir / "gateway.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def rss_mb(self) -> float:
        """Resident memory now (Linux)."""
        return self._status_mb("VmRSS:")

    def peak_rss_mb(self) -> float:
        """The most resident memory since the process started, or since `reset_peak_rss` (Linux)."""
        return self._status_mb("VmHWM:")

    def reset_peak_rss(self) -> None:
        """Start measuring the peak afresh: the peak becomes the memory resident now (Linux >= 4.0)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def _status_mb(self, name: str) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1]) / 1024
        return 0.0


StartGateway = Callable[..., GatewayProcess]


class GatewayNotHealthy(RuntimeError):
    """The gateway exited, or did not answer /healthz in time (the message ends with its log)."""


def launch_gateway(
    redis_url: str, workdir: Path, name: str, env: dict[str, str] | None = None, wait: bool = True
) -> GatewayProcess:
    """A gateway process with these CHORUS_* settings added, its data and log under `workdir`; up (its
    /healthz answers) when this returns, unless `wait` is false. `stop_gateway` stops it."""
    port = free_port()
    prefix = f"sec{uuid.uuid4().hex[:8]}:"
    gateway = GatewayProcess(
        workdir=workdir / f"gateway-{name}", port=port, key_prefix=prefix, data_dir=workdir / f"data-{name}"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    environment.update(
        {
            "CHORUS_REDIS_URL": redis_url,
            "CHORUS_KEY_PREFIX": prefix,
            "CHORUS_DATA_DIR": str(gateway.data_dir),
            "CHORUS_PORT": str(port),
            "CHORUS_LOG_FORMAT": "text",
            **(env or {}),
        }
    )
    gateway.process = gateway.launch(
        "gateway", [sys.executable, "-m", "chorus.cli", "gateway"], environment, REPO_ROOT
    )
    if wait:
        try:
            wait_healthy(gateway)
        except GatewayNotHealthy:
            stop_gateway(gateway)
            raise
    return gateway


def stop_gateway(gateway: GatewayProcess) -> None:
    gateway.stop_all()


def wait_healthy(gateway: GatewayProcess, timeout_s: float = 60) -> None:
    def answers() -> bool:
        if gateway.process.poll() is not None:
            raise GatewayNotHealthy(
                f"the gateway exited with {gateway.process.returncode}:\n{gateway.log_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{gateway.url}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    try:
        wait_until_blocking(answers, "the gateway answering /healthz", timeout_s, every_s=0.1)
    except AssertionError as timeout:
        raise GatewayNotHealthy(f"{timeout}:\n{gateway.log_text()[-3000:]}") from None


@pytest.fixture
def start_gateway(redis_url: str, tmp_path: Path) -> Iterator[StartGateway]:
    """`start_gateway(**env)`: a gateway process with these CHORUS_* settings added; it is up (its
    /healthz answers) when this returns, or the test fails with its log. Stopped at the end."""
    started: list[GatewayProcess] = []

    def start(wait: bool = True, **env: str) -> GatewayProcess:
        gateway = launch_gateway(redis_url, tmp_path, str(len(started)), env, wait=False)
        started.append(gateway)
        if wait:
            try:
                wait_healthy(gateway)
            except GatewayNotHealthy as exc:
                pytest.fail(str(exc))
        return gateway

    yield start
    for gateway in started:
        stop_gateway(gateway)


@pytest.fixture(scope="session")
def socket_stack(
    redis_url: str, checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChorusStack]:
    """A gateway with real dialogue and router workers (small generated checkpoints; no TTS worker), for
    the socket tests whose sessions must really be placed, primed, paced and stopped. Short leases, so a
    leaked session would show within seconds."""
    stack = ChorusStack(
        workdir=tmp_path_factory.mktemp("socket-stack"),
        redis_url=redis_url,
        checkpoints=checkpoints,
        key_prefix=f"ws{uuid.uuid4().hex[:6]}:",
        extra_env={
            "CHORUS_DIALOGUE_SLOTS": "4",
            "CHORUS_PLACEMENT_WAIT_S": "3",
            "CHORUS_MAX_SESSIONS_PER_KEY": "16",
            "CHORUS_SESSION_LEASE_S": "5",
            "CHORUS_SESSION_LEASE_RENEW_S": "1",
            "CHORUS_REQUESTS_PER_MINUTE": "100000",  # the latency probe calls a REST route 50 times a second
        },
    )
    try:
        for service in ("dialogue", "router", "gateway"):
            stack.start(service)
        stack.wait_ready(120, need_tts=False)
        yield stack
    finally:
        stack.stop_all()


def upgrade_request(path: str, host: str = "localhost", origin: str | None = None) -> bytes:
    """A raw WebSocket upgrade request with these Host and Origin headers (what no client library sends)."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *([f"Origin: {origin}"] if origin else []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
