"""`python -m tests.security.health_probe URL`: another client of the gateway, in its own process (a probe
in the attacker's process would measure the attacker's own event loop). Until its standard input closes it
asks `URL/healthz` and a REST route (`URL/v1/personas`) in turn, every 10 ms; then it prints one JSON
line: the /healthz latencies in ms, when each was asked (`time.monotonic()`, the system's clock on Linux,
so a caller can cut out a window of its own) and the status codes of both.

`HealthProbe` runs it from a test or a benchmark, returns once the first answer came (so what the caller
does next is probed from its start), and sums it up (p50/p99/max, any 5xx).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

INTERVAL_S = 0.01


def probe(url: str, stop: threading.Event) -> dict[str, Any]:
    latencies_ms: list[float] = []
    asked_at: list[float] = []
    statuses: Counter[str] = Counter()
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            for path in ("/healthz", "/v1/personas"):
                asked, started = time.monotonic(), time.perf_counter()
                try:
                    status = str(client.get(path).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if path == "/healthz":
                    latencies_ms.append((time.perf_counter() - started) * 1000)
                    asked_at.append(asked)
                    if len(asked_at) == 1:
                        print("probing", flush=True)
                statuses[f"{path} {status}"] += 1
                time.sleep(INTERVAL_S)
    return {"healthz_ms": latencies_ms, "healthz_at": asked_at, "statuses": dict(statuses)}


def main() -> None:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print(json.dumps(probe(sys.argv[1], stop)), flush=True)


@dataclass
class ProbeResult:
    healthz_ms: list[float]
    statuses: dict[str, int] = field(default_factory=dict)
    healthz_at: list[float] = field(default_factory=list)  # when each was asked (time.monotonic())

    def between(self, start: float, end: float) -> ProbeResult:
        """The /healthz requests asked from `start` to `end` (the statuses stay whole)."""
        inside = [
            (ms, at) for ms, at in zip(self.healthz_ms, self.healthz_at, strict=True) if start <= at <= end
        ]
        return ProbeResult([ms for ms, _ in inside], self.statuses, [at for _, at in inside])

    def summary(self) -> dict[str, Any]:
        arr = np.asarray(self.healthz_ms or [0.0])
        return {
            "healthz_requests": len(self.healthz_ms),
            "healthz_p50_ms": round(float(np.percentile(arr, 50)), 1),
            "healthz_p99_ms": round(float(np.percentile(arr, 99)), 1),
            "healthz_max_ms": round(float(arr.max()), 1),
            "statuses": self.statuses,
        }

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(np.asarray(self.healthz_ms or [0.0]), 99))

    @property
    def failures(self) -> dict[str, int]:
        """Server errors (5xx) and requests with no answer at all (a 4xx such as a 429 is an answer)."""
        return {k: n for k, n in self.statuses.items() if k.split()[-1][:1] not in "234"}


class HealthProbe:
    """`async with HealthProbe(url) as probe: ...`, then `probe.result`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.result = ProbeResult([])
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> HealthProbe:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.security.health_probe",
            self.url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._process.stdout is not None
        await asyncio.wait_for(self._process.stdout.readline(), 60)  # "probing": the first answer came
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._process is not None
        out, _ = await asyncio.wait_for(self._process.communicate(b""), 60)
        data = json.loads(out.decode().strip().splitlines()[-1])
        self.result = ProbeResult(data["healthz_ms"], data["statuses"], data["healthz_at"])


if __name__ == "__main__":
    main()
