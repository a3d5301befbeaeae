"""The suite's harness itself: a real gateway process answers, and its memory can be read."""

from __future__ import annotations

import urllib.request

from tests.security.conftest import StartGateway


def test_a_gateway_process_starts_answers_and_reports_its_memory(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    with urllib.request.urlopen(f"{gateway.url}/healthz", timeout=5) as response:
        assert response.status == 200
    assert gateway.rss_mb() > 10
