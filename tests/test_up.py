"""`chorus up` as a user runs it: every service as a child process, embedded redis, clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from shared.redis_server import free_port


def get_json(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(url: str, timeout_s: float, process: subprocess.Popen[bytes]) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"chorus up exited early with {process.returncode}"
        try:
            status, body = get_json(url)
            if status == 200:
                return body
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready within {timeout_s}s")


def test_chorus_up_serves_health_and_stops_everything_on_sigterm(tmp_path: Path, checkpoints: Path) -> None:
    ports = {name: free_port() for name in ("gateway", "dialogue", "tts", "router")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    env.update(
        {
            "CHORUS_DATA_DIR": str(tmp_path / "data"),
            "CHORUS_MOSHI_DIR": str(checkpoints / "moshi"),
            "CHORUS_TTS_DIR": str(checkpoints / "tts"),
            "CHORUS_DIALOGUE_HTTP_PORT": str(ports["dialogue"]),
            "CHORUS_TTS_HTTP_PORT": str(ports["tts"]),
            "CHORUS_ROUTER_HTTP_PORT": str(ports["router"]),
            "CHORUS_LOG_FORMAT": "text",
        }
    )
    log = (tmp_path / "up.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "chorus.cli", "up", "--port", str(ports["gateway"])],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert wait_for(f"http://127.0.0.1:{ports['gateway']}/healthz", 60, process)["status"] == "ok"
        for service in ("dialogue", "tts", "router"):
            body = wait_for(f"http://127.0.0.1:{ports[service]}/readyz", 120, process)
            assert body["ready"] is True, service
        ready = wait_for(f"http://127.0.0.1:{ports['gateway']}/readyz", 60, process)
        assert ready["dialogue_workers"] == 1 and ready["tts_workers"] == 1 and ready["router_workers"] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = (tmp_path / "up.log").read_text(errors="replace")
    assert "all services stopped" in output
    for service in ("dialogue", "tts", "router"):
        assert f"{service} stopped" in output, f"{service} did not shut down cleanly:\n{output[-3000:]}"
