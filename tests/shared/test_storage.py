"""`LocalStorage.append` on a full disk: a record is stored whole or not at all. A disk that takes part of
a record and refuses the rest (ENOSPC, or here a file size limit, which a test can set without root) left
the part behind: the next record, once there was room, was glued onto it and both were lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO_ROOT

FILLING = """
import asyncio, resource, signal, sys
from pathlib import Path
from shared.storage import LocalStorage

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: a short write, then EFBIG, not a kill
root = Path(sys.argv[1])
storage = LocalStorage(root)
first, second = b"a" * 59 + b"\\n", b"b" * 59 + b"\\n"
asyncio.run(storage.append("log.jsonl", first))
resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))  # 40 bytes of room left
try:
    asyncio.run(storage.append("log.jsonl", second))
except OSError as exc:
    print("refused", exc.errno)
"""


def test_a_record_the_disk_cannot_take_whole_is_not_stored_in_part(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FILLING, str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.startswith("refused"), done.stdout + done.stderr
    assert (tmp_path / "log.jsonl").read_bytes() == b"a" * 59 + b"\n", (
        "the first record, and nothing of the second"
    )
