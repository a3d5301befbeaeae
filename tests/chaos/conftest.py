"""Fixtures of the fault-injection suite (`make chaos`): every test builds its own stack of real
processes (it is going to kill some of them) on small checkpoints, with short leases so that what the
issue promises "within the lease" can be checked in seconds. Failover settings are the product's
defaults (heartbeat 0.25 s, presence TTL 1 s, failover poll 0.2 s): those are what is being tested.

A failing test prints the tail of every process's log."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import Observer
from tests.support.stack import ChorusStack

LEASE_S = 3.0
LEASE_RENEW_S = 0.5
SESSION_CHECK_S = 2.0  # the default: how often a worker checks that its sessions are still live
SLOTS = 2

CHAOS_ENV = {
    "CHORUS_SESSION_LEASE_S": str(LEASE_S),
    "CHORUS_SESSION_LEASE_RENEW_S": str(LEASE_RENEW_S),
    "CHORUS_SESSION_CHECK_S": str(SESSION_CHECK_S),
    "CHORUS_DIALOGUE_SLOTS": str(SLOTS),
    "CHORUS_WORKER_TTL_S": "1.0",  # the default (the e2e stack relaxes it to 2 s)
    "CHORUS_HEARTBEAT_INTERVAL_S": "0.25",
    "CHORUS_FAILOVER_POLL_S": "0.2",
}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def make_stack(
    request: pytest.FixtureRequest, redis_url: str, checkpoints: Path, tmp_path: Path
) -> Iterator[Callable[..., ChorusStack]]:
    """`make_stack(redis_url=None, **env)`: a stack (nothing started yet) on the suite's Redis or the
    given one, with the chaos settings plus `env`. Stopped at the end (a paused process is continued)."""
    stacks: list[ChorusStack] = []

    def make(redis: str | None = None, **env: str) -> ChorusStack:
        stack = ChorusStack(
            workdir=tmp_path / f"stack{len(stacks)}",
            redis_url=redis or redis_url,
            checkpoints=checkpoints,
            key_prefix=f"chaos{uuid.uuid4().hex[:6]}:",
            extra_env={**CHAOS_ENV, **env},
        )
        stacks.append(stack)
        return stack

    yield make
    failed = getattr(request.node, "report_call", None) is not None and request.node.report_call.failed
    for stack in stacks:
        if failed:
            for name in stack.processes:
                print(f"--- {name} (log tail)\n{stack.log_tail(name, 6000)}")
        stack.stop_all()


@pytest.fixture
async def observe() -> AsyncIterator[Callable[[ChorusStack], Awaitable[Observer]]]:
    """`await observe(stack)`: an Observer on the stack's Redis (closed at the end)."""
    observers: list[Observer] = []

    async def connect(stack: ChorusStack) -> Observer:
        observers.append(await Observer.connect(stack))
        return observers[-1]

    yield connect
    for observer in observers:
        await observer.close()
