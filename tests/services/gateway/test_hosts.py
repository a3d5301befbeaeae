"""Which Host names and browser origins the gateway accepts: the edge cases of the allow-lists (the
process-level behaviour is in tests/security/test_hosts_and_origins.py)."""

from __future__ import annotations

import pytest

from services.gateway.hosts import AllowedOrigins
from services.gateway.settings import GatewaySettings


def allowed(**settings: str) -> AllowedOrigins:
    return AllowedOrigins(GatewaySettings(redis_url="redis://unused", **settings))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost:8000", True),
        ("LOCALHOST.", True),  # case and the root label's dot do not make a new name
        ("127.0.0.1", True),
        ("[::1]:8000", True),
        ("localhost.attacker.example", False),
        ("127.0.0.1.nip.io:8000", False),
        ("", False),
        ("[::1", False),  # unparseable
        ("localhost:port", False),
    ],
)
def test_loopback_host_names(host: str, expected: bool) -> None:
    assert allowed().allows_host(host) is expected


def test_the_bind_and_published_addresses_and_listed_names_are_hosts() -> None:
    hosts = allowed(host="10.0.0.5", published_address="192.168.1.20", allowed_hosts="Chorus.Example.com")
    assert hosts.allows_host("10.0.0.5:8000") and hosts.allows_host("192.168.1.20")
    assert hosts.allows_host("chorus.example.com:443")
    assert not hosts.allows_host("0.0.0.0:8000")
    assert not allowed(host="0.0.0.0").allows_host("0.0.0.0"), "a wildcard bind is no name"
    assert allowed(allowed_hosts="*").allows_host("anything.example")


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("http://chorus.example.com:8000", True),  # the page's own origin
        ("http://localhost:3000", True),
        ("https://[::1]", True),
        ("http://127.0.0.1:5173", True),
        ("http://localhost.attacker.example", False),
        ("http://127.0.0.1.nip.io", False),
        ("http://chorus.example.com:9000", False),  # another port is another origin
        ("null", False),
        ("file://", False),
        ("chrome-extension://abcdef", False),
        ("http://[::1", False),
    ],
)
def test_origins(origin: str, expected: bool) -> None:
    origins = allowed(allowed_hosts="chorus.example.com")
    assert origins.allows_origin(origin, "chorus.example.com:8000") is expected


def test_listed_origins_match_exactly() -> None:
    origins = allowed(allowed_origins="https://app.example.com/, https://Other.example.com")
    host = "127.0.0.1:8000"
    assert origins.allows_origin("https://app.example.com", host)
    assert origins.allows_origin("https://other.example.com", host)
    assert not origins.allows_origin("http://app.example.com", host), "the scheme is part of an origin"
    assert not origins.allows_origin("https://app.example.com.evil.example", host)
    assert allowed(allowed_origins="*").allows_origin("https://anywhere.example", host)
