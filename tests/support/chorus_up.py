"""`chorus up` as a user runs it (the supervisor starts every service itself), on tiny checkpoints, with
its own ports and its log in a file: what tests of the supervisor, and of what it serves, start."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from chorus.devtools.redis_server import free_port
from tests.support.stack import ProcessStack
from tests.support.waiting import wait_until_blocking

SERVICES = ("dialogue", "tts", "router")


def get_json(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_answering(url: str, timeout_s: float, process: subprocess.Popen[bytes]) -> dict[str, object]:
    """The JSON body once `url` answers 200; fails at once if `chorus up` exits meanwhile."""

    def ready() -> dict[str, object] | None:
        assert process.poll() is None, f"chorus up exited early with {process.returncode}"
        try:
            status, body = get_json(url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
        return body if status == 200 else None

    return wait_until_blocking(ready, f"{url} ready", timeout_s)


class ChorusUp:
    """A running `chorus up` on tiny checkpoints, with its own ports and its log in a file."""

    def __init__(self, tmp_path: Path, checkpoints: Path, extra_env: dict[str, str]) -> None:
        self.ports: dict[str, int] = {}
        for name in ("gateway", *SERVICES):
            self.ports[name] = free_port(self.ports.values())
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
        argv = [sys.executable, "-m", "chorus.cli", "up", "--port", str(self.ports["gateway"])]
        self.process = ProcessStack(workdir=tmp_path).launch("up", argv, env)

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def up_lines(self) -> list[str]:
        """What `chorus up` itself logged (the services log to the same terminal)."""
        return [line for line in self.output().splitlines() if " up       " in line]

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match[str]:
        def logged() -> re.Match[str] | None:
            assert self.process.poll() is None, f"chorus up exited with {self.process.returncode}"
            return next((m for line in self.up_lines() if (m := re.search(pattern, line))), None)

        return wait_until_blocking(
            logged, f"a line like {pattern!r}", timeout_s, every_s=0.05, seen=lambda: self.output()[-3000:]
        )

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
            assert wait_answering(self.url(service, "/readyz"), 120, self.process)["ready"] is True, service
        wait_answering(self.url("gateway", "/readyz"), 60, self.process)

    def stop(self, timeout_s: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the embedded Redis dies with it (PDEATHSIG)
            self.process.wait()
