"""The probes are open to anyone (no key, any Host: kubelets and scrapers address a pod by its IP), so
what one request costs must not grow with Redis: `/readyz` looks for workers by scanning Redis's
keyspace, and anonymous callers asking for it as fast as they can must not make it scan that fast."""

from __future__ import annotations

import time

import httpx
import redis

from tests.security.conftest import StartGateway

REQUESTS = 200


def scans(redis_url: str) -> int:
    stats = redis.Redis.from_url(redis_url).info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


def test_readyz_scans_redis_at_most_once_a_second_however_often_it_is_asked(
    start_gateway: StartGateway, redis_url: str
) -> None:
    gateway = start_gateway()
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        first = client.get("/readyz")
        before, started = scans(redis_url), time.monotonic()
        answers = [client.get("/readyz") for _ in range(REQUESTS)]
        elapsed, scanned = time.monotonic() - started, scans(redis_url) - before
    print(f"\n{REQUESTS} /readyz in {elapsed:.2f} s: {scanned} SCAN calls")
    assert all(a.status_code == first.status_code and a.json() == first.json() for a in answers)
    # Three services, one SCAN each (a keyspace this small fits one call), at most once a second.
    assert scanned <= 3 * (elapsed + 1), scanned
