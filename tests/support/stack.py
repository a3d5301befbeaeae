"""Chorus as real processes, as containers run them, against a redis-server the test provides, with small
generated checkpoints; tests talk to them over real sockets.

`ProcessStack` is the one harness: named processes, each in its own process group with its log under
the stack's workdir, signalled, stopped (SIGTERM, then SIGKILL), and waited on through the gateway's
/readyz. What differs between suites is only where each process's command and environment come from:
`ChorusStack` (here) runs `chorus <service>` with settings the test chooses (e2e, chaos, security);
`tests/support/compose.py` runs the commands and environment the compose file declares (deploy).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chorus.devtools.redis_server import free_port
from tests.support.waiting import wait_until_blocking

SERVICES = ("dialogue", "tts", "router", "gateway")
LOOPBACK = "127.0.0.1"

Readiness = tuple[int, dict[str, Any]]  # /readyz's status (0: no answer) and body


@dataclass
class ProcessStack:
    workdir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def gateway_port(self) -> int:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.gateway_port}"

    # --- processes ------------------------------------------------------------------------------------

    def launch(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `argv` as the process `name` (its own process group, so signals reach its children)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.processes[name]

    def send_signal(self, name: str, sig: int) -> None:
        """Send a signal to a running process (SIGKILL, SIGSTOP, SIGCONT...)."""
        os.killpg(self.processes[name].pid, sig)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def stop_all(self, timeout_s: float = 20) -> None:
        """Stop everything, the last started first; a paused process is continued so it can end."""
        for name in reversed(list(self.processes)):
            if self.processes[name].poll() is None:
                self.send_signal(name, signal.SIGCONT)
            self.stop(name, timeout_s=timeout_s)

    def assert_running(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def log_tails(self, chars: int = 4000) -> str:
        return "\n".join(f"--- {name}\n{self.log_tail(name, chars)}" for name in self.processes)

    # --- readiness -------------------------------------------------------------------------------------

    def readiness(self) -> Readiness:
        """The gateway's /readyz, whatever its status; (0, {}) while it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                return response.status, dict(json.loads(response.read()))
        except urllib.error.HTTPError as error:
            try:
                return error.code, dict(json.loads(error.read()))
            except json.JSONDecodeError:
                return error.code, {}
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return 0, {}

    def wait_readiness(
        self, accept: Callable[[int, dict[str, Any]], bool], what: str, timeout_s: float
    ) -> dict[str, Any]:
        """Poll /readyz until `accept(status, body)`; returns the body. Fails at once, with its log, if a
        process exits meanwhile; on timeout with the last body and every log."""
        last: list[Readiness] = [(0, {})]

        def accepted() -> dict[str, Any] | None:
            self.assert_running()
            last[0] = self.readiness()
            return last[0][1] if accept(*last[0]) else None

        return wait_until_blocking(accepted, what, timeout_s, seen=lambda: f"{last[0]}\n{self.log_tails()}")

    def wait_ready(self, timeout_s: float = 180, *, need_tts: bool = True) -> dict[str, Any]:
        """/readyz 200: the dialogue and router models are loaded and warmed up. Cloned voices also need
        the TTS worker, which readiness reports on its own (`need_tts`)."""
        return self.wait_readiness(
            lambda status, body: status == 200 and (not need_tts or body.get("cloned_voices") == "available"),
            "the stack ready" + (" with cloned voices" if need_tts else ""),
            timeout_s,
        )

    def wait_serving(self, timeout_s: float = 120, **serving: int) -> dict[str, Any]:
        """Wait until readiness counts at least `serving[service]` serving workers of each service
        (dialogue=2, router=1, tts=1...): their models loaded and warmed up."""

        def enough(_: int, body: dict[str, Any]) -> bool:
            services = body.get("services") or {}
            return bool(body) and all(services.get(s, {}).get("serving", 0) >= n for s, n in serving.items())

        return self.wait_readiness(enough, f"serving {serving}", timeout_s)


@dataclass(kw_only=True)
class ChorusStack(ProcessStack):
    """`chorus <service>` processes with the settings a test chooses: `extra_env` for every process,
    more per `start`. Further workers of a service are instances ("dialogue-2") with their own ports."""

    redis_url: str
    checkpoints: Path
    key_prefix: str
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SERVICES:
            self.ports[name] = free_port(self.ports.values())

    @property
    def gateway_port(self) -> int:
        return self.ports["gateway"]

    def worker_id(self, instance: str) -> str:
        return f"{instance}-{self.key_prefix.rstrip(':')}"

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
                "CHORUS_WORKER_ID": self.worker_id(instance),
                "CHORUS_LOG_FORMAT": "text",
                "CHORUS_WORKER_TTL_S": "2",
                "CHORUS_CLAIM_IDLE_MS": "2000",
            }
        )
        if instance != service:  # a further worker of a service: its own health port
            self.ports.setdefault(instance, free_port(self.ports.values()))
            env[f"CHORUS_{service.upper()}_HTTP_PORT"] = str(self.ports[instance])
        env.update(self.extra_env)
        return env

    def start(self, service: str, instance: str | None = None, **env: str) -> None:
        """Start `chorus <service>`; `instance` names a further worker of the same service ("dialogue-2")."""
        instance = instance or service
        argv = [sys.executable, "-m", "chorus.cli", service]
        self.launch(instance, argv, {**self.env(service, instance), **env})

    def start_all(self, timeout_s: float = 180) -> ChorusStack:
        for service in SERVICES:
            self.start(service)
        self.wait_ready(timeout_s)
        return self

    def start_services(self, *instances: str, timeout_s: float = 120) -> None:
        """Start worker instances ("dialogue", "dialogue-2", "router"...) and the gateway, and wait until
        every one of them is serving."""
        wanted: dict[str, int] = {}
        for instance in instances:
            service = instance.split("-")[0]
            self.start(service, instance)
            wanted[service] = wanted.get(service, 0) + 1
        self.start("gateway")
        self.wait_serving(timeout_s, **wanted)

    def instance_of(self, worker_id: str) -> str:
        """The instance ("dialogue-2") running the worker with this id."""
        matches = [name for name in self.processes if self.worker_id(name) == worker_id]
        assert matches, f"no instance runs worker {worker_id!r}"
        return matches[0]
