"""Which files and folders any process opens, seen by the kernel (Linux inotify): proof from outside a
real process of what it reads, with no hook inside it."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path
from types import TracebackType

IN_ACCESS = 0x001
IN_OPEN = 0x020
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of NUL-padded name


class FileAccessWatch:
    """Opens and reads of the files in the watched folders, and of the folders themselves (a listing)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._folders: dict[int, Path] = {}

    def watch(self, *folders: Path) -> FileAccessWatch:
        for folder in folders:
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(folder), IN_OPEN | IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"cannot watch {folder}")
            self._folders[wd] = folder
        return self

    def accessed(self) -> set[Path]:
        """Every path opened or read since the last call: a file, or a folder listed (its own path)."""
        paths: set[Path] = set()
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return paths
            except OSError as error:
                if error.errno == errno.EAGAIN:
                    return paths
                raise
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw_name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                folder = self._folders.get(wd)
                if folder is not None:
                    paths.add(folder / os.fsdecode(raw_name) if raw_name else folder)
                offset += _EVENT.size + length

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FileAccessWatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
