"""`chorus up` as a user runs it: every service as a child process, embedded redis, children restarted
when they die, one line when everything is ready, clean SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.chorus_up import SERVICES, ChorusUp, get_json, wait_answering


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


def test_chorus_up_says_ready_once_serves_and_stops_everything_on_sigterm(
    start_up: Callable[..., ChorusUp],
) -> None:
    up = start_up()
    line = f"chorus is ready: http://127.0.0.1:{up.ports['gateway']} (router, tts, dialogue, gateway)"
    up.wait_for_line(re.escape(line), 60)
    assert get_json(up.url("gateway", "/readyz"))[0] == 200, "the line comes once /readyz answered 200"
    assert get_json(up.url("gateway", "/healthz"))[1]["status"] == "ok"
    ready = wait_answering(up.url("gateway", "/readyz"), 60, up.process)
    assert ready["dialogue_workers"] == 1 and ready["tts_workers"] == 1 and ready["router_workers"] == 1
    time.sleep(2)  # four more polls of a ready gateway
    assert sum(line in logged for logged in up.up_lines()) == 1
    assert not any("not ready" in logged for logged in up.up_lines())
    assert up.stop() == 0
    output = up.output()
    assert "all services stopped" in output
    for service in SERVICES:
        assert f"{service} stopped" in output, f"{service} did not shut down cleanly:\n{output[-3000:]}"
    assert not any(pid_exists(pid) for pid in up.pids().values())


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
    wait_answering(up.url("gateway", "/readyz"), 60, up.process)
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
