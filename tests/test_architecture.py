"""What the import contracts of `make lint` (`[tool.importlinter]` in pyproject.toml) cannot say: no
service reaches a Redis client, not even one handed to it through the bus (`Bus.redis` is for the stores
of `shared/`). Services call Bus and store methods with names from the domain."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ATTRIBUTES = {"redis", "_redis"}


def client_accesses(source: str) -> list[tuple[int, str]]:
    """(line, attribute) of every access of an attribute that holds a Redis client."""
    return sorted(
        (node.lineno, node.attr)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr in CLIENT_ATTRIBUTES
    )


def test_no_service_reaches_a_redis_client() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line} .{attr}"
        for path in sorted((ROOT / "services").rglob("*.py"))
        for line, attr in client_accesses(path.read_text())
    ]
    assert not found, f"services must use Bus and store methods, not the Redis client: {found}"


def test_the_scan_finds_the_accesses_services_used_to_make() -> None:
    source = "async def f(bus, self):\n    await bus.redis.hdel('k', 'f')\n    return self.bus._redis\n"
    assert client_accesses(source) == [(2, "redis"), (3, "_redis")]
