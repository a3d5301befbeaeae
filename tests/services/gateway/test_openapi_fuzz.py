"""Schema-driven fuzzing of every REST operation (schemathesis) against the real app and redis-server.

Bounded: a few derandomized examples per operation. Any 5xx, or a status the schema does not
document, fails the test.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, reject, settings
from starlette.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings

KEY = "fuzz-key"


def fuzz_operation(client: TestClient, operation: Any) -> None:
    documented = set(operation.definition.raw.get("responses", {}))

    @settings(
        max_examples=8,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def fuzz(case: Any) -> None:
        kwargs = case.as_transport_kwargs(headers={"Authorization": f"Bearer {KEY}"})
        kwargs.pop("base_url", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            request = client.build_request(**kwargs)
            try:  # a generated multipart part the HTTP client itself cannot encode is no server input
                request.read()
            except (TypeError, AttributeError, ValueError):
                reject()
            response = client.send(request)
        where = f"{case.method} {case.formatted_path}"
        # /readyz's documented 503 is its answer (no workers run here), not a server error.
        expected_unavailable = case.formatted_path == "/readyz" and response.status_code == 503
        assert response.status_code < 500 or expected_unavailable, (
            f"{where}: {response.status_code} {response.text}"
        )
        assert str(response.status_code) in documented, f"{where}: undocumented {response.status_code}"

    fuzz()


def test_no_operation_answers_with_a_server_error(redis_url: str, key_prefix: str, tmp_path: Path) -> None:
    app = create_app(
        GatewaySettings(
            redis_url=redis_url,
            key_prefix=key_prefix,
            data_dir=tmp_path,
            api_keys=KEY,
            allowed_hosts="testserver",  # the name Starlette's test client sends
        )
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    with TestClient(app, raise_server_exceptions=False) as client:
        for operation in operations:
            fuzz_operation(client, operation)
