"""`chorus up` as a user runs it: every service as a child process, embedded redis, children restarted
when they die, one line when everything is ready, clean SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.redis_server import free_port
from tests.support.waiting import wait_until_blocking

SERVICES = ("dialogue", "tts", "router")


def get_json(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(url: str, timeout_s: float, process: subprocess.Popen[bytes]) -> dict[str, object]:
    def ready() -> dict[str, object] | None:
        assert process.poll() is None, f"chorus up exited early with {process.returncode}"
        try:
            status, body = get_json(url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
        return body if status == 200 else None

    return wait_until_blocking(ready, f"{url} ready", timeout_s)


def redis_refuses_ping_without_password(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"-NOAUTH")
    except OSError:
        return False


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ChorusUp:
    """A running `chorus up` on tiny checkpoints, with its own ports and its log in a file."""

    def __init__(self, tmp_path: Path, checkpoints: Path, extra_env: dict[str, str]) -> None:
        self.ports = {name: free_port() for name in ("gateway", *SERVICES)}
        self.log_path = tmp_path / "up.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
        env.update(
            {
                "CHORUS_DATA_DIR": str(tmp_path / "data"),
                "CHORUS_MOSHI_DIR": str(checkpoints / "moshi"),
                "CHORUS_TTS_DIR": str(checkpoints / "tts"),
                **{f"CHORUS_{name.upper()}_HTTP_PORT": str(self.ports[name]) for name in SERVICES},
                "CHORUS_LOG_FORMAT": "text",
                **extra_env,
            }
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "chorus.cli", "up", "--port", str(self.ports["gateway"])],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def up_lines(self) -> list[str]:
        """What `chorus up` itself logged (the services log to the same terminal)."""
        return [line for line in self.output().splitlines() if " up       " in line]

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"chorus up exited with {self.process.returncode}"
            for line in self.up_lines():
                if match := re.search(pattern, line):
                    return match
            time.sleep(0.05)
        raise AssertionError(f"no line like {pattern!r} within {timeout_s}s:\n{self.output()[-3000:]}")

    def pids(self) -> dict[str, int]:
        """The pid each child was last started with, as `chorus up` logged it."""
        return {
            m[1]: int(m[2])
            for line in self.up_lines()
            if (m := re.search(r"started (\S+) \(pid (\d+)\)", line))
        }

    def redis_port(self) -> int:
        return int(self.wait_for_line(r"embedded redis-server on redis://:\*\*\*@127\.0\.0\.1:(\d+)/", 10)[1])

    def wait_until_ready(self) -> None:
        for service in SERVICES:
            assert wait_for(self.url(service, "/readyz"), 120, self.process)["ready"] is True, service
        wait_for(self.url("gateway", "/readyz"), 60, self.process)

    def stop(self, timeout_s: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the embedded Redis dies with it (PDEATHSIG)
            self.process.wait()


@pytest.fixture
def start_up(tmp_path: Path, checkpoints: Path) -> Iterator[Callable[..., ChorusUp]]:
    started: list[ChorusUp] = []

    def start(**extra_env: str) -> ChorusUp:
        up = ChorusUp(tmp_path, checkpoints, extra_env)
        started.append(up)
        return up

    yield start
    for up in started:
        up.kill()


def test_chorus_up_serves_health_and_stops_everything_on_sigterm(start_up: Callable[..., ChorusUp]) -> None:
    up = start_up()
    assert wait_for(up.url("gateway", "/healthz"), 60, up.process)["status"] == "ok"
    up.wait_until_ready()
    ready = wait_for(up.url("gateway", "/readyz"), 60, up.process)
    assert ready["dialogue_workers"] == 1 and ready["tts_workers"] == 1 and ready["router_workers"] == 1
    assert up.stop() == 0
    output = up.output()
    assert "all services stopped" in output
    for service in SERVICES:
        assert f"{service} stopped" in output, f"{service} did not shut down cleanly:\n{output[-3000:]}"
    assert not any(pid_exists(pid) for pid in up.pids().values())


def test_the_ready_line_is_logged_once_after_readyz_answered_200(start_up: Callable[..., ChorusUp]) -> None:
    up = start_up()
    line = f"chorus is ready: http://127.0.0.1:{up.ports['gateway']} (router, tts, dialogue, gateway)"
    up.wait_for_line(re.escape(line), 60)
    assert get_json(up.url("gateway", "/readyz"))[0] == 200
    time.sleep(2)  # four more polls of a ready gateway
    assert sum(line in logged for logged in up.up_lines()) == 1
    assert not any("not ready" in logged for logged in up.up_lines())
    assert up.stop() == 0


def test_a_worker_killed_with_sigkill_is_restarted_and_the_stack_is_ready_again(
    start_up: Callable[..., ChorusUp],
) -> None:
    up = start_up()
    up.wait_for_line("chorus is ready", 60)
    old_pid = up.pids()["dialogue"]
    os.kill(old_pid, signal.SIGKILL)
    up.wait_for_line(r"dialogue is down \(killed by SIGKILL after .*\); restarting it in 0\.5 s", 10)
    new_pid = int(up.wait_for_line(r"restarted dialogue \(pid (\d+)\)", 10)[1])
    assert new_pid != old_pid
    up.wait_until_ready()
    assert up.process.poll() is None
    assert up.stop() == 0


def test_the_ready_line_comes_again_once_after_the_gateway_was_restarted(
    start_up: Callable[..., ChorusUp],
) -> None:
    up = start_up()
    up.wait_for_line("chorus is ready", 60)
    os.kill(up.pids()["gateway"], signal.SIGKILL)
    up.wait_for_line(r"restarted gateway \(pid \d+\)", 10)
    up.wait_for_line("chorus is not ready any more: the gateway does not answer", 10)
    wait_for(up.url("gateway", "/readyz"), 60, up.process)
    time.sleep(1.5)  # the watch polls every 0.5 s
    lines = up.up_lines()
    said = [line.split(" up       ")[1].split(":")[0] for line in lines if "chorus is" in line]
    assert said == ["chorus is ready", "chorus is not ready any more", "chorus is ready"], lines
    assert up.stop() == 0


def test_redis_killed_with_sigkill_comes_back_on_the_same_port_with_the_same_password(
    start_up: Callable[..., ChorusUp],
) -> None:
    up = start_up()
    up.wait_for_line("chorus is ready", 60)
    port = up.redis_port()
    children = up.pids()
    os.kill(children["redis-server"], signal.SIGKILL)
    up.wait_for_line(r"redis-server is down \(killed by SIGKILL .*live sessions are lost", 10)
    up.wait_for_line(r"restarted redis-server \(pid \d+\)", 15)
    assert redis_refuses_ping_without_password(port)
    up.wait_until_ready()  # every worker and the gateway answer again: same port, same password
    assert up.process.poll() is None
    assert all(pid_exists(pid) for pid in up.pids().values())
    assert up.stop() == 0


def test_sigterm_during_a_restart_backoff_stops_everything_and_exits_0(
    start_up: Callable[..., ChorusUp],
) -> None:
    up = start_up(CHORUS_ROUTER_BUDGET_FRAMES="0")  # a configuration error: the router exits at once
    up.wait_for_line(r"router is down \(exit code 1 .*\); restarting it in 2\.0 s \(crash 3 in a row\)", 60)
    assert up.process.poll() is None, "a crashing child must not stop everything"
    assert up.stop() == 0
    lines = up.up_lines()
    stop_began = next(i for i, line in enumerate(lines) if "received SIGTERM" in line)
    assert not any("started" in line for line in lines[stop_began:]), "\n".join(lines[stop_began:])
    assert "all services stopped" in lines[-1]
    assert not any(pid_exists(pid) for pid in up.pids().values())
