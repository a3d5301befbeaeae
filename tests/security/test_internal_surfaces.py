"""Internal surfaces of a real `chorus up` (every service a process, the embedded redis-server): the
workers' /healthz, /readyz and /metrics listen on loopback only, and Redis wants a password that only the
services' environment carries."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from chorus.devtools.redis_server import EmbeddedRedis, free_port
from tests.support.audio import SPEECH_WAV, speech_like
from tests.support.chorus_up import SERVICES, ChorusUp
from tests.support.clients import MoshiClient, upload_voice
from tests.support.paths import REPO_ROOT
from tests.support.waiting import wait_until_blocking

pytestmark = pytest.mark.timeout(300)


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one besides loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def listening_addresses(port: int) -> set[str]:
    """Addresses with a TCP socket listening on `port` (Linux /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _remote, state = line.split()[1:4]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            if len(address) == 8:
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
            else:
                words = [bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, 32, 8)]
                found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


def refuses_connections(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def redis_reply(port: int, *commands: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"".join(commands))
        time.sleep(0.2)
        return sock.recv(4096)


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode(errors="replace").split("=", 1) for entry in raw if b"=" in entry)


@pytest.fixture(scope="module")
def chorus_up(tmp_path_factory: pytest.TempPathFactory, checkpoints: Path) -> Iterator[ChorusUp]:
    up = ChorusUp(tmp_path_factory.mktemp("up"), checkpoints, {})
    try:
        up.wait_for_line("chorus is ready", 120)
        up.wait_until_ready()  # every worker's /readyz answers 200 on 127.0.0.1
        yield up
    finally:
        up.kill()


def test_worker_health_servers_listen_on_loopback_only(chorus_up: ChorusUp) -> None:
    outward = outward_address()
    for service in SERVICES:
        port = chorus_up.ports[service]
        assert listening_addresses(port) == {"127.0.0.1"}, service
        if outward is not None:
            assert refuses_connections(outward, port), f"{service}'s /metrics answers on {outward}"
    print(f"worker health ports {[chorus_up.ports[s] for s in SERVICES]}: 127.0.0.1 only; {outward} refused")


def test_the_embedded_redis_refuses_clients_without_its_password(chorus_up: ChorusUp) -> None:
    port = chorus_up.redis_port()
    assert redis_reply(port, b"PING\r\n").startswith(b"-NOAUTH")
    assert redis_reply(port, b"XADD chorus:control * kind start\r\n").startswith(b"-NOAUTH")
    assert redis_reply(port, b"AUTH guess\r\n").startswith(b"-WRONGPASS")

    url = environment_of(chorus_up.pids()["gateway"])["CHORUS_REDIS_URL"]
    password = re.fullmatch(r"redis://:([^@]+)@127\.0\.0\.1:(\d+)/0", url)
    assert password and int(password[2]) == port, url
    assert len(password[1]) >= 32
    auth = f"AUTH {password[1]}\r\nPING\r\n".encode()
    assert redis_reply(port, auth) == b"+OK\r\n+PONG\r\n", "the services' URL carries the password"

    # Where other local users could read it: command lines (ps) and the log.
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert password[1].encode() not in command_line, f"the password is on the command line of {pid}"
    assert password[1] not in chorus_up.output()


def test_a_worker_told_its_pod_ip_answers_there_and_not_on_loopback(redis_url: str, key_prefix: str) -> None:
    """What the Kubernetes manifests do: CHORUS_<SERVICE>_HTTP_HOST = the pod IP."""
    outward = outward_address()
    if outward is None:
        pytest.skip("this machine has no address besides loopback")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    env.update(
        CHORUS_REDIS_URL=redis_url,
        CHORUS_KEY_PREFIX=key_prefix,
        CHORUS_ROUTER_HTTP_HOST=outward,
        CHORUS_ROUTER_HTTP_PORT=str(port),
    )
    router = subprocess.Popen(
        [sys.executable, "-m", "chorus.cli", "router"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def health_server_up() -> bool:
            assert router.poll() is None, "the router exited"
            return listening_addresses(port) == {outward}

        wait_until_blocking(health_server_up, "the router's health server", 60, every_s=0.2)
        with urllib.request.urlopen(f"http://{outward}:{port}/healthz", timeout=5) as response:
            assert response.status == 200
        assert refuses_connections("127.0.0.1", port)
    finally:
        os.killpg(router.pid, signal.SIGTERM)
        router.wait(30)


# The user docs/deploy.md tells operators to create on their own Redis: Chorus's keys only, no admin
# command, no other dangerous one but INFO (the gateway reads `INFO memory` to refuse sessions early), and
# the two CLIENT subcommands redis-py sends on connect (it names itself and asks for maintenance notices;
# both are ignored where the server lacks them, but CLIENT is an admin command before Redis 7.2).
CHORUS_ACL = (
    "on ~chorus:* resetchannels +@all -@admin -@dangerous +info +client|setinfo +client|maint_notifications"
)


class RedisWithAclUser(EmbeddedRedis):
    """A redis-server whose default user (the operator's, with `password`) is admin, plus a `chorus` user
    with CHORUS_ACL and its own password: a real Redis set up as docs/deploy.md says."""

    def __init__(self) -> None:
        super().__init__()
        self.chorus_password = secrets.token_urlsafe(24)

    def _write_config(self) -> None:
        super()._write_config()
        with self.config_path.open("a", encoding="ascii") as config:
            config.write(f"user chorus {CHORUS_ACL} >{self.chorus_password}\n")

    @property
    def chorus_url(self) -> str:
        return f"redis://chorus:{self.chorus_password}@127.0.0.1:{self.port}/0"


async def converse(gateway_port: int) -> MoshiClient:
    """A voice upload (the TTS worker computes its state) and two seconds of conversation."""
    await upload_voice(f"http://127.0.0.1:{gateway_port}", str(SPEECH_WAV))
    client = await MoshiClient.open(f"ws://127.0.0.1:{gateway_port}", voice="moshiko")
    await client.send_audio(speech_like(2.0))
    await client.drain(1.0)
    await client.ws.close()
    return client


def test_every_service_runs_on_a_redis_user_limited_to_chorus_keys_without_admin_commands(
    tmp_path: Path, checkpoints: Path
) -> None:
    server = RedisWithAclUser().start()
    admin = redis.Redis(port=server.port, password=server.password)
    up = ChorusUp(tmp_path, checkpoints, {"CHORUS_REDIS_URL": server.chorus_url})
    try:
        up.wait_for_line("chorus is ready", 120)
        up.wait_until_ready()
        client = asyncio.run(converse(up.ports["gateway"]))
        denied = admin.acl_log()
        chorus_keys = admin.keys("chorus:*")
        other_keys = [k for k in admin.keys("*") if not k.startswith(b"chorus:")]
    finally:
        up.kill()
        admin.close()
        server.stop()
    assert client.errors == [] and client.audio_seconds > 0, client.errors
    assert denied == [], f"commands or keys the documented ACL refused: {denied}"
    assert chorus_keys and other_keys == []
    assert server.chorus_password not in up.output()
    print(f"chorus ACL user: {len(chorus_keys)} keys, {client.audio_seconds:.1f} s of audio back, 0 denials")
