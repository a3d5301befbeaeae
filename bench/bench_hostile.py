"""Hostile clients against a real gateway process (issue 11's targets), each beside a baseline measured in
the same run on the same gateway.

One gateway (`python -m chorus.cli gateway`, as its container runs it) against an embedded redis-server;
no model workers, so no session is ever placed (sockets that ask for one are refused `no_capacity`).

- Fairness: `/healthz` latency seen by another client in its own process (`HealthProbe`, which also calls
  a REST route in turn), idle, then during floods of 80,000 tiny realtime messages sent without reading
  (the requests asked from the flood's first message to the gateway's last answer to it), then during
  the seeded WebSocket fuzz of both protocols. Target: p99 during the flood <= 100 ms.
- Uploads: the gateway's peak RSS (VmHWM, reset before each case) and CPU time, idle for `IDLE_S`, then
  the upload bomb, the largest accepted clip, and eight of those at once, in this order on the same
  gateway (a case's peak includes what the ones before it left resident). Target: peak RSS < 300 MB.

Audio pacing is not measured here: without dialogue workers each append also waits for a session
placement that is then refused, so the time would be `CHORUS_PLACEMENT_WAIT_S`'s, not the pace's
(`tests/security/test_ws_pacing.py` measures the pace against a stack with workers).
"""

from __future__ import annotations

import asyncio
import os
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from chorus.devtools.redis_server import EmbeddedRedis

if TYPE_CHECKING:  # imported where used: the tests' modules import pytest
    from tests.security.conftest import GatewayProcess
    from tests.security.health_probe import ProbeResult

IDLE_S = 3.0
FLOOD_MESSAGES = 80_000
FLOOD_ROUNDS = 3
QUIET_S = 1.0  # no answer for this long: the gateway has handled the whole flood
FUZZ_SEED = 1105
FUZZ_CASES_PER_PROTOCOL = 40
P99_TARGET_MS = 100.0
RSS_TARGET_MB = 300.0
GATEWAY_ENV = {
    "CHORUS_REQUESTS_PER_MINUTE": "100000",  # the probe calls a REST route 50 times a second
    "CHORUS_PLACEMENT_WAIT_S": "1",  # no workers: a socket asking for a session is refused after this
}


def _ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 2) if baseline else None


# --- fairness ---------------------------------------------------------------------------------------


async def _idle(url: str) -> ProbeResult:
    from tests.security.health_probe import HealthProbe

    async with HealthProbe(url) as probe:
        await asyncio.sleep(IDLE_S)
    return probe.result


async def _flood(url: str, ws_url: str) -> tuple[ProbeResult, dict[str, Any]]:
    from tests.security.health_probe import HealthProbe, ProbeResult
    from tests.security.ws_fuzz import flood_without_reading, read_until_quiet

    latencies: list[float] = []
    asked_at: list[float] = []
    statuses: Counter[str] = Counter()
    handled_s, rate_limited = [], 0
    for _ in range(FLOOD_ROUNDS):
        async with HealthProbe(url) as probe:
            started = time.monotonic()
            ws = await flood_without_reading(ws_url, FLOOD_MESSAGES)
            events = await read_until_quiet(ws, QUIET_S)
            handled = time.monotonic() - QUIET_S  # the last answer
            await ws.close()
        during = probe.result.between(started, handled)
        latencies += during.healthz_ms
        asked_at += during.healthz_at
        statuses.update(probe.result.statuses)
        handled_s.append(round(handled - started, 2))
        rate_limited += sum(
            1 for e in events if e["type"] == "error" and e["error"]["code"] == "rate_limited"
        )
    detail = {"rounds": FLOOD_ROUNDS, "handled_s": handled_s, "rate_limited_errors_told": rate_limited}
    return ProbeResult(latencies, dict(statuses), asked_at), detail


async def _fuzz(url: str, ws_url: str) -> tuple[ProbeResult, dict[str, Any]]:
    from tests.security.health_probe import HealthProbe
    from tests.security.ws_fuzz import run_fuzz

    started = time.monotonic()
    async with HealthProbe(url) as probe:
        outcomes = await run_fuzz(ws_url, FUZZ_SEED, FUZZ_CASES_PER_PROTOCOL)
    problems = [p for o in outcomes for p in o.problems()]
    detail = {
        "seed": FUZZ_SEED,
        "sockets": len(outcomes),
        "elapsed_s": round(time.monotonic() - started, 1),
        "problems": len(problems),
    }
    return probe.result, detail


async def fairness(url: str, ws_url: str) -> dict[str, Any]:
    idle = await _idle(url)
    flood, flood_detail = await _flood(url, ws_url)
    fuzz, fuzz_detail = await _fuzz(url, ws_url)
    base = idle.summary()
    cases = {"idle": (idle, {}), "flood": (flood, flood_detail), "fuzz": (fuzz, fuzz_detail)}
    results: dict[str, Any] = {}
    for name, (result, detail) in cases.items():
        summary = result.summary()
        results[name] = {
            **summary,
            "p99_to_idle": _ratio(summary["healthz_p99_ms"], base["healthz_p99_ms"]),
            "max_to_idle": _ratio(summary["healthz_max_ms"], base["healthz_max_ms"]),
            "failures": result.failures,
            **detail,
        }
    results["target"] = {
        "flood_p99_ms_at_most": P99_TARGET_MS,
        "met": results["flood"]["healthz_p99_ms"] <= P99_TARGET_MS,
    }
    return results


# --- uploads ----------------------------------------------------------------------------------------


def uploads(gateway: GatewayProcess) -> dict[str, Any]:
    from tests.security.test_uploads import bomb, largest_accepted_clip, measured, post_clip

    bomb_data, clip = bomb(), largest_accepted_clip()

    def idle() -> list[httpx.Response]:
        time.sleep(IDLE_S)
        return []

    def eight_at_once() -> list[httpx.Response]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda i: post_clip(gateway, clip, f"clip {i}"), range(8)))

    cases: dict[str, tuple[str, Callable[[], list[httpx.Response]]]] = {
        "idle": (f"idle {IDLE_S:g} s", idle),
        "bomb": (
            f"bomb: {len(bomb_data) / 1e3:.0f} KB FLAC, 8 ch, 655350 Hz, 30 s",
            lambda: [post_clip(gateway, bomb_data)],
        ),
        "largest_clip": (
            f"largest accepted clip: {len(clip) / 1e6:.1f} MB WAV, 30 s, 48 kHz stereo 24-bit",
            lambda: [post_clip(gateway, clip)],
        ),
        "eight_largest_at_once": ("8 largest clips at once", eight_at_once),
    }
    results: dict[str, Any] = {}
    for name, (label, upload) in cases.items():
        responses, figures = measured(gateway, label, upload)
        results[name] = {
            "statuses": dict(Counter(str(r.status_code) for r in responses)),
            "peak_rss_mb": round(figures.peak_rss_mb, 1),
            "cpu_s": round(figures.cpu_s, 2),
        }
    base = results["idle"]["peak_rss_mb"]
    for figures in results.values():
        figures["peak_rss_to_idle"] = _ratio(figures["peak_rss_mb"], base)
        figures["peak_rss_above_idle_mb"] = round(figures["peak_rss_mb"] - base, 1)
    results["target"] = {
        "peak_rss_mb_below": RSS_TARGET_MB,
        "met": all(f["peak_rss_mb"] < RSS_TARGET_MB for f in results.values() if "peak_rss_mb" in f),
    }
    return results


# --- the run ----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def run() -> dict[str, Any]:
    from tests.security.conftest import launch_gateway, stop_gateway

    with EmbeddedRedis() as redis, tempfile.TemporaryDirectory(prefix="chorus-bench-hostile-") as workdir:
        gateway = launch_gateway(redis.url, Path(workdir), "bench", GATEWAY_ENV)
        try:
            upload_figures = uploads(gateway)  # first: the bomb's peak is read on a gateway no flood grew
            fair = asyncio.run(fairness(gateway.url, gateway.ws_url))
            crashed = gateway.process.poll() is not None
        finally:
            stop_gateway(gateway)
    for name in ("idle", "flood", "fuzz"):
        f = fair[name]
        print(
            f"   /healthz {name}: p50 {f['healthz_p50_ms']} ms, p99 {f['healthz_p99_ms']} ms "
            f"(x{f['p99_to_idle']} idle), max {f['healthz_max_ms']} ms, {f['healthz_requests']} requests",
            flush=True,
        )
    return {
        "machine": machine(),
        "gateway_env": GATEWAY_ENV,
        "gateway_crashed": crashed,
        "fairness": fair,
        "uploads": upload_figures,
        "pacing": "not measured: without dialogue workers each append also waits for a refused placement",
    }
