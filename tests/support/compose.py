"""docker-compose.yml run as local processes: the compose file's wiring tested without a Docker engine.

Each service runs its compose `command` with the environment compose would give its container
(`.env.example` copied to `.env`, `env_file`, `environment`, `${...}` interpolation, the CPU override
merged on), started in `depends_on` order and waited on with its own `healthcheck` command. What a
container has and a process on this machine does not is translated, and only that:

- a service the test provides itself (Redis: the suite's redis-server) is not started; URLs that name it
  (`redis://redis:6379/0`) point at the test's server instead;
- every container has its own network namespace, these processes share one: each port a service
  listens on (exposed, published, or set by an `environment:` variable named `*_PORT`, such as a
  worker's health port on its container's loopback) gets a free local port, and an `environment:` value
  equal to that port is rewritten to it; binding every interface (`0.0.0.0`) becomes binding loopback;
- named volumes become directories under the stack's workdir, and `environment:` paths under a mount
  point follow (only `environment:` is translated: it is the wiring, .env holds plain settings);
- `chorus ...` runs as `python -m chorus.cli ...` and `python` as this interpreter, so the checkout
  under test is what runs.

The test adds only what a test must: its key prefix (the suite shares one redis-server) and local
checkpoints (CHORUS_MOSHI_DIR / CHORUS_TTS_DIR) in place of the hub downloads.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from chorus.devtools.compose import load_project, read_env_file, service_environment
from chorus.devtools.redis_server import free_port
from tests.support.paths import REPO_ROOT
from tests.support.stack import LOOPBACK, ProcessStack
from tests.support.waiting import wait_until_blocking

COMPOSE_FILES = (REPO_ROOT / "docker-compose.yml", REPO_ROOT / "compose.cpu.yml")
ENV_EXAMPLE = REPO_ROOT / ".env.example"
# A health check's own budget can be long (the dialogue's start_period allows a 15 GB download); local
# checkpoints load in seconds, so waits are capped, and never shorter than a loaded CI machine needs.
MAX_WAIT_S = 300.0
MIN_WAIT_S = 120.0


def duration_s(value: str | int | float | None, default: float) -> float:
    """A compose duration ("1m30s", "900s", "500ms") in seconds."""
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a compose duration: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


@dataclass(frozen=True)
class HealthCheck:
    argv: list[str]
    interval_s: float
    timeout_s: float
    retries: int
    start_period_s: float

    @property
    def budget_s(self) -> float:
        """How long compose waits before it calls the service unhealthy."""
        return self.start_period_s + self.retries * (self.interval_s + self.timeout_s)


@dataclass
class LocalService:
    name: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: HealthCheck | None
    depends_on: dict[str, str]
    ports: dict[int, int]


def container_ports(service: Mapping[str, Any]) -> list[int]:
    ports = [int(str(p).split("/")[0]) for p in service.get("expose", [])]
    ports += [
        int(v) for k, v in service.get("environment", {}).items() if k.endswith("_PORT") and str(v).isdigit()
    ]
    for entry in service.get("ports", []):
        target = entry["target"] if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1]
        ports.append(int(str(target).split("/")[0]))
    return ports


def volume_mounts(service: Mapping[str, Any], volumes_dir: Path) -> dict[str, Path]:
    """Mount point in the container -> local directory."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = (
            (entry["source"], entry["target"]) if isinstance(entry, dict) else entry.split(":")[:2]
        )
        mounts[target] = volumes_dir / source
    return mounts


def local_argv(command: Sequence[str]) -> list[str]:
    program, *args = command
    if program == "chorus":
        return [sys.executable, "-m", "chorus.cli", *args]
    if program in ("python", "python3"):
        return [sys.executable, *args]
    raise ValueError(f"no local translation for the command {list(command)}")


def local_healthcheck(spec: Mapping[str, Any] | None) -> HealthCheck | None:
    if not spec or spec.get("disable"):
        return None
    test = spec["test"]
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if test[0] == "NONE":
        return None
    argv = local_argv(test[1:]) if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]
    return HealthCheck(
        argv=argv,
        interval_s=duration_s(spec.get("interval"), 30),
        timeout_s=duration_s(spec.get("timeout"), 30),
        retries=int(spec.get("retries", 3)),
        start_period_s=duration_s(spec.get("start_period"), 0),
    )


def translate(
    value: str,
    substitutes: Mapping[str, str],
    ports: Mapping[int, int],
    mounts: Mapping[str, Path],
) -> str:
    """A container's environment value, as the same setting reads on this machine (module docstring)."""
    url = urlsplit(value)
    if url.scheme and url.hostname in substitutes:
        return urlunsplit(url._replace(netloc=urlsplit(substitutes[url.hostname]).netloc))
    if value == "0.0.0.0":
        return LOOPBACK
    if value.isdigit() and int(value) in ports:
        return str(ports[int(value)])
    for target, local in mounts.items():
        if value == target or value.startswith(target.rstrip("/") + "/"):
            return str(local / value[len(target) :].lstrip("/"))
    return value


def resolve_services(
    workdir: Path,
    substitutes: Mapping[str, str],
    *,
    files: Sequence[Path] = COMPOSE_FILES,
    env_file: Path = ENV_EXAMPLE,
) -> dict[str, LocalService]:
    """Every compose service not in `substitutes`, translated to run here."""
    project_dir = workdir / "project"
    project_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(env_file, project_dir / ".env")
    dotenv = read_env_file(project_dir / ".env")
    project = load_project(files, dotenv)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    services = {}
    for name, spec in project["services"].items():
        if name in substitutes:
            continue
        ports = {port: free_port() for port in container_ports(spec)}
        mounts = volume_mounts(spec, workdir / "volumes")
        for local in mounts.values():
            local.mkdir(parents=True, exist_ok=True)
        env = service_environment(spec, project_dir, dotenv)
        # Only the wiring (`environment:`) names addresses, ports and paths; .env holds plain settings.
        for key in spec.get("environment", {}):
            if key in env:
                env[key] = translate(env[key], substitutes, ports, mounts)
        services[name] = LocalService(
            name=name,
            argv=local_argv(spec["command"]),
            env={**base_env, **env},
            healthcheck=local_healthcheck(spec.get("healthcheck")),
            depends_on={dep: cond["condition"] for dep, cond in spec.get("depends_on", {}).items()},
            ports=ports,
        )
    return services


def start_order(services: Mapping[str, LocalService]) -> list[str]:
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order or name not in services:
            return
        if name in path:
            raise ValueError(f"depends_on cycle: {' -> '.join((*path, name))}")
        for dep in services[name].depends_on:
            visit(dep, (*path, name))
        order.append(name)

    for name in services:
        visit(name, ())
    return order


@dataclass(kw_only=True)
class ComposeStack(ProcessStack):
    """The compose services as the one process harness runs them (tests/support/stack.py), started in
    `depends_on` order and waited on with their own health checks."""

    services: dict[str, LocalService]

    def port(self, service: str, container_port: int) -> int:
        return self.services[service].ports[container_port]

    @property
    def gateway_port(self) -> int:
        return self.port("gateway", 8000)

    def start_all(self) -> ComposeStack:
        for name in start_order(self.services):
            for dep, condition in self.services[name].depends_on.items():
                self.wait_for(dep, condition)
            self.start(name)
        for name in self.services:
            self.wait_healthy(name)
        return self

    def start(self, name: str) -> None:
        service = self.services[name]
        # The images' WORKDIR holds no .env; neither does this (pydantic-settings would read one).
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.launch(name, service.argv, service.env, cwd=home)

    def wait_for(self, name: str, condition: str) -> None:
        if name not in self.services:  # provided by the test (Redis), up before the stack
            return
        if condition == "service_healthy":
            self.wait_healthy(name)
        elif condition == "service_completed_successfully":
            assert self.processes[name].wait(MAX_WAIT_S) == 0, self.log_tail(name)

    def healthy(self, name: str) -> bool:
        """One run of the service's own health check, as Docker runs it in the container."""
        check = self.services[name].healthcheck
        if check is None:
            return self.processes[name].poll() is None
        try:
            result = subprocess.run(
                check.argv,
                env=self.services[name].env,
                capture_output=True,
                timeout=check.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def wait_healthy(self, name: str) -> None:
        check = self.services[name].healthcheck
        budget = min(MAX_WAIT_S, max(MIN_WAIT_S, check.budget_s if check else 0.0))

        def running_and_healthy() -> bool:
            code = self.processes[name].poll()
            if code is not None:
                raise AssertionError(f"{name} exited with {code}:\n{self.log_tail(name)}")
            return self.healthy(name)

        wait_until_blocking(
            running_and_healthy,
            f"{name} healthy",
            budget,
            every_s=min(check.interval_s if check else 1.0, 1.0),
            seen=lambda: self.log_tail(name),
        )

    def wait_gateway_ready(self, timeout_s: float = MIN_WAIT_S) -> dict[str, Any]:
        """The gateway's /readyz body once it is ready (dialogue and router models loaded) and cloned
        voices are available (the TTS worker too: this stack runs every service)."""
        return self.wait_ready(timeout_s, need_tts=True)

    def stop_all(self, timeout_s: float = 30) -> None:
        super().stop_all(timeout_s)


@contextmanager
def compose_stack(
    redis_url: str,
    workdir: Path,
    *,
    key_prefix: str,
    service_env: Mapping[str, Mapping[str, str]] | None = None,
    files: Sequence[Path] = COMPOSE_FILES,
) -> Iterator[ComposeStack]:
    """The compose services running here against `redis_url`, all healthy; stopped on exit.

    `service_env` adds test-only settings per service (e.g. CHORUS_MOSHI_DIR for "dialogue"); every
    service gets `key_prefix`, so stacks sharing one redis-server never see each other's keys."""
    services = resolve_services(workdir, {"redis": redis_url}, files=files)
    for name, service in services.items():
        service.env.update({"CHORUS_KEY_PREFIX": key_prefix, **(service_env or {}).get(name, {})})
    stack = ComposeStack(workdir=workdir, services=services)
    try:
        yield stack.start_all()
    finally:
        stack.stop_all()


def checkpoint_env(checkpoints: Path) -> dict[str, dict[str, str]]:
    """Local small checkpoints in place of the hub downloads of the real deployment."""
    return {
        "dialogue": {"CHORUS_MOSHI_DIR": str(checkpoints / "moshi")},
        "tts": {"CHORUS_TTS_DIR": str(checkpoints / "tts")},
    }
