"""The probes are open to anyone (no key, any Host: kubelets and scrapers address a pod by its IP), so
what one request costs Redis must not grow with what Redis holds: `/readyz` finds the workers through
each service's index, never by scanning the keyspace (it used to: three SCANs over every key a call)."""

from __future__ import annotations

import time

import httpx
import redis

from tests.security.conftest import StartGateway

REQUESTS = 200
FILLER_KEYS = 20_000  # what a busy store holds besides workers: sessions, streams, counters, secrets


def commands(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


def test_readyz_costs_redis_a_few_commands_whatever_the_keyspace_holds(
    start_gateway: StartGateway, redis_url: str
) -> None:
    gateway = start_gateway()
    store = redis.Redis.from_url(redis_url)
    with store.pipeline(transaction=False) as pipe:
        for i in range(FILLER_KEYS):
            pipe.set(f"{gateway.key_prefix}filler:{i}", "x", ex=300)
        pipe.execute()
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        client.get("/readyz")
        before, started = commands(store), time.monotonic()
        answers = [client.get("/readyz") for _ in range(REQUESTS)]
        elapsed, after = time.monotonic() - started, commands(store)
    spent = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    per_request = sum(spent.values()) / REQUESTS
    print(
        f"\n{REQUESTS} /readyz, {elapsed:.2f} s, {FILLER_KEYS} other keys: {per_request:.1f} commands a call"
    )
    assert all(a.status_code in (200, 503) and "services" in a.json() for a in answers)
    assert "scan" not in spent and "keys" not in spent
    # A ping and one index read per service (no worker runs here): the count follows the workers.
    assert per_request <= 6, spent
