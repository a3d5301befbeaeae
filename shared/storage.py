"""Durable storage for voice profiles, personas and transcripts, behind a small interface.

`LocalStorage` (a directory, a volume in containers) is the default; an S3-compatible backend only has
to implement `Storage`. Writes are atomic: a crash mid-write leaves the old object or none, never half.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Protocol

from shared.errors import InvalidRequest, NotFound, excerpt


class Storage(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...
    async def append(self, key: str, data: bytes) -> None: ...
    async def get(self, key: str) -> bytes: ...
    async def exists(self, key: str) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def delete_prefix(self, prefix: str) -> None: ...
    async def list(self, prefix: str) -> list[str]: ...
    def scratch(self) -> Path: ...
    async def put_file(self, key: str, source: Path) -> None: ...


class LocalStorage:
    """Keys are '/'-separated relative paths under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not key or key.startswith("/") or not path.is_relative_to(self.root) or path == self.root:
            raise InvalidRequest(f"invalid storage key {excerpt(key, 160)}")
        return path

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX
            _fsync_dir(path.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, key, data)

    def scratch(self) -> Path:
        """A local folder for files being received (uploads), on the store's own disk: `put_file` from it
        is a rename. Its files' names start with a dot; they are their writers' to remove."""
        folder = self.root / ".incoming"
        folder.mkdir(exist_ok=True)
        return folder

    async def sweep_scratch(self, grace_s: float) -> int:
        """Remove the scratch files nobody wrote to for `grace_s` (a crashed writer's: one receiving an
        upload writes to it all along); how many were removed."""

        def sweep() -> int:
            removed = 0
            for path in self.scratch().iterdir():
                with contextlib.suppress(FileNotFoundError):  # its writer finished meanwhile
                    if time.time() - path.stat().st_mtime > grace_s:
                        path.unlink()
                        removed += 1
            return removed

        return await asyncio.to_thread(sweep)

    def _put_file(self, key: str, source: Path) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(source, path)  # atomic on POSIX, and a rename: `source` is on the same disk
        _fsync_dir(path.parent)

    async def put_file(self, key: str, source: Path) -> None:
        """Move the file at `source` (in `scratch()`) to `key`, atomically; `source` is gone after."""
        await asyncio.to_thread(self._put_file, key, source)

    def _append(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: one write() of a small record lands whole after whatever is there, whoever else
        # appends; fsync so a record the caller was told is stored survives a crash.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            before = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(data):  # a full disk takes part of a record, then refuses the rest
                    written += os.write(fd, data[written:])
            except OSError:
                os.ftruncate(fd, before)  # the record whole or not at all: a part would glue onto the next
                raise
            os.fsync(fd)
        finally:
            os.close(fd)

    async def append(self, key: str, data: bytes) -> None:
        """Add `data` at the end of an object (created if missing): for logs written record by record."""
        await asyncio.to_thread(self._append, key, data)

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFound(f"no stored object {excerpt(key, 160)}") from None

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    async def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    async def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        await asyncio.to_thread(shutil.rmtree, path, True)

    async def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root

        def walk() -> list[str]:
            if not base.is_dir():
                return []
            return sorted(
                str(p.relative_to(self.root))
                for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".")
            )

        return await asyncio.to_thread(walk)


def _fsync_dir(folder: Path) -> None:
    """A rename into `folder` survives a crash once the folder itself is synced."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
