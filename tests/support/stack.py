"""A whole Chorus stack as real processes (`python -m chorus.cli <service>`), as containers run them,
against the suite's redis-server, with small generated checkpoints. Tests talk to it over real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared.redis_server import free_port

SERVICES = ("dialogue", "tts", "router", "gateway")


@dataclass
class ChorusStack:
    redis_url: str
    checkpoints: Path
    workdir: Path
    key_prefix: str
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SERVICES:
            self.ports[name] = free_port(self.ports.values())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ports['gateway']}"

    def env(self, service: str, instance: str | None = None) -> dict[str, str]:
        instance = instance or service
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
        env.update(
            {
                "CHORUS_REDIS_URL": self.redis_url,
                "CHORUS_KEY_PREFIX": self.key_prefix,
                "CHORUS_DATA_DIR": str(self.workdir / "data"),
                "CHORUS_MOSHI_DIR": str(self.checkpoints / "moshi"),
                "CHORUS_TTS_DIR": str(self.checkpoints / "tts"),
                "CHORUS_PORT": str(self.ports["gateway"]),
                "CHORUS_DIALOGUE_HTTP_PORT": str(self.ports["dialogue"]),
                "CHORUS_TTS_HTTP_PORT": str(self.ports["tts"]),
                "CHORUS_ROUTER_HTTP_PORT": str(self.ports["router"]),
                "CHORUS_WORKER_ID": f"{instance}-{self.key_prefix.rstrip(':')}",
                "CHORUS_LOG_FORMAT": "text",
                "CHORUS_WORKER_TTL_S": "2",
                "CHORUS_CLAIM_IDLE_MS": "2000",
            }
        )
        if instance != service:  # a second worker of a service: its own health port
            self.ports.setdefault(instance, free_port(self.ports.values()))
            env[f"CHORUS_{service.upper()}_HTTP_PORT"] = str(self.ports[instance])
        env.update(self.extra_env)
        return env

    def start(self, service: str, instance: str | None = None, **env: str) -> None:
        """Start `chorus <service>`; `instance` names a further worker of the same service ("dialogue-2")."""
        instance = instance or service
        log = (self.workdir / f"{instance}.log").open("ab")
        self.processes[instance] = subprocess.Popen(
            [sys.executable, "-m", "chorus.cli", service],
            env={**self.env(service, instance), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def send_signal(self, instance: str, sig: int) -> None:
        """Send a signal to a running service process (SIGKILL, SIGSTOP, SIGCONT...)."""
        os.killpg(self.processes[instance].pid, sig)

    def worker_id(self, instance: str) -> str:
        return f"{instance}-{self.key_prefix.rstrip(':')}"

    def start_all(self, timeout_s: float = 180) -> ChorusStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for service in SERVICES:
            self.start(service)
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 180, *, need_tts: bool = True) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        body: dict[str, object] = {}
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                    body = json.loads(response.read())
                    # 200 means the dialogue and router models are loaded and warmed up; cloned voices
                    # also need the TTS worker, which readiness reports on its own.
                    if not need_tts or body.get("cloned_voices") == "available":
                        return body
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.3)
        raise AssertionError(
            f"stack not ready in {timeout_s}s: {body}\n"
            + "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in self.processes)
        )

    def stop(self, instance: str, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        process = self.processes.pop(instance)
        if process.poll() is None:
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def stop_all(self) -> None:
        for service in reversed(list(self.processes)):
            self.stop(service)

    def log_tail(self, instance: str, chars: int = 4000) -> str:
        path = self.workdir / f"{instance}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""
