"""The WebSocket fuzzer (`tests/security/ws_fuzz.py`) against a real gateway process with real dialogue
and router workers: hostile and broken clients of both protocols, four sockets at once, while another
client times `/healthz` and calls a REST route from its own process.

What must hold afterwards: the gateway is alive and healthy (0 crashes, nothing logged as unexpected),
REST answered no 5xx meanwhile, every error and every close the server made carries a reason (none is an
internal error), and no session leaked: the owner's live-session set is empty and every dialogue slot is
free again within the session lease. The seed is `CHORUS_FUZZ_SEED` (default below); a failing case
prints its protocol, index and steps, and the same seed replays it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import httpx
import pytest

from shared.bus import Bus
from shared.presence import list_workers
from shared.streams import StreamNames
from tests.security.health_probe import HealthProbe
from tests.security.ws_fuzz import Outcome, run_fuzz
from tests.support.stack import ChorusStack

SEED = int(os.environ.get("CHORUS_FUZZ_SEED", "1105"))
CASES_PER_PROTOCOL = 40
LONG_CASES_PER_PROTOCOL = 400
LEASE_S = 5.0  # the stack's CHORUS_SESSION_LEASE_S


async def test_hostile_sockets_never_crash_leak_or_go_unexplained(socket_stack: ChorusStack) -> None:
    await _fuzz_and_check(socket_stack, SEED, CASES_PER_PROTOCOL)


@pytest.mark.chaos
@pytest.mark.timeout(1200)
async def test_a_long_fuzz_of_both_protocols(socket_stack: ChorusStack) -> None:
    """`pytest -m chaos tests/security`: ten times the cases, from three seeds."""
    for seed in (SEED, SEED + 1, SEED + 2):
        await _fuzz_and_check(socket_stack, seed, LONG_CASES_PER_PROTOCOL)


async def _fuzz_and_check(stack: ChorusStack, seed: int, cases: int) -> None:
    started = time.monotonic()
    async with HealthProbe(stack.url) as probe:
        outcomes = await run_fuzz(stack.ws_url, seed, cases)
    elapsed_s = time.monotonic() - started
    print(f"\nfuzz seed {seed}: {len(outcomes)} sockets in {elapsed_s:.1f} s; {_tally(outcomes)}")
    print(f"/healthz meanwhile: {probe.result.summary()}")

    assert stack.processes["gateway"].poll() is None, stack.log_tail("gateway")
    async with httpx.AsyncClient(base_url=stack.url, timeout=5) as client:
        assert (await client.get("/healthz")).status_code == 200
    log = (stack.workdir / "gateway.log").read_text(errors="replace")
    for sign in ("Traceback", "unexpectedly"):
        assert sign not in log, log[max(0, log.index(sign) - 1500) : log.index(sign) + 3000]
    assert probe.result.failures == {}
    problems = {o.case.describe(): o.problems() for o in outcomes if o.problems()}
    assert not problems, f"seed {seed}: {problems}"
    await _no_session_left(stack)
    assert probe.result.p99_ms < 1000  # generous: the machine is shared; the figure is printed above


def _tally(outcomes: list[Outcome]) -> str:
    closes = Counter(f"{o.close_code} {o.close_reason}".strip() for o in outcomes if o.closed_by_server)
    errors = sum(len(o.errors) for o in outcomes)
    refused = sum(1 for o in outcomes if o.case.protocol == "moshi" and not o.opened)
    return f"{errors} errors told; server closes {dict(closes)}; moshi sessions refused {refused}"


async def _no_session_left(stack: ChorusStack) -> None:
    """Within the lease (plus a heartbeat), the anonymous owner has no live session and every dialogue
    slot is free."""
    names = StreamNames(stack.key_prefix)
    bus = await Bus.connect(stack.redis_url, names)
    try:
        deadline = time.monotonic() + LEASE_S + 3
        while True:
            live = await bus.redis.smembers(names.owner_sessions(""))
            workers = await list_workers(bus, "dialogue")
            busy = {w.worker_id: w.fields for w in workers if w.fields["free_slots"] != w.fields["capacity"]}
            if not live and workers and not busy:
                return
            assert time.monotonic() < deadline, f"leaked: live sessions {live}, busy workers {busy}"
            await asyncio.sleep(0.2)
    finally:
        await bus.close()
