"""The suite's harness itself: a real gateway process answers, and its memory can be read."""

from __future__ import annotations

import urllib.request

import httpx

from tests.security.conftest import StartGateway


def test_a_gateway_process_starts_answers_and_reports_its_memory(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    with urllib.request.urlopen(f"{gateway.url}/healthz", timeout=5) as response:
        assert response.status == 200
    assert gateway.rss_mb() > 10


def test_the_probes_answer_head_as_load_balancers_send_it(start_gateway: StartGateway) -> None:
    """Found by an attack: HEAD /healthz was 405, so a monitor probing with HEAD saw a broken gateway."""
    gateway = start_gateway()
    for path, status in (("/healthz", 200), ("/readyz", 503)):  # no workers here: not ready
        get = httpx.get(f"{gateway.url}{path}", timeout=5)
        head = httpx.head(f"{gateway.url}{path}", timeout=5)
        assert (get.status_code, head.status_code) == (status, status), path
        assert head.content == b"" and get.content
