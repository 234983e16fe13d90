"""``data.sample_log``: which samples every optimizer step of every rank trained on.

One JSON line per (step, rank): ``{"step": s, "rank": r, "sample_ids": [...]}`` with the rows'
original sample_ids, so anyone can check order, coverage and resume against the manifest.
All ranks share one file. Appends and rewinds hold a POSIX lock on it (``lockf`` works on NFS
too), and a rewind rewrites the file in place, so every rank keeps appending to the same file.
A rank resumed from the checkpoint of step ``s`` rewinds its own lines past ``s`` — those the
interrupted run wrote after that checkpoint — so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class SampleLog:
    """This rank's writer to the shared log file."""

    def __init__(self, path: str | os.PathLike[str], rank: int) -> None:
        self.path = Path(path)
        self.rank = rank
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def record(self, step: int, sample_ids: list[str]) -> None:
        line = json.dumps({"step": step, "rank": self.rank, "sample_ids": sample_ids}, ensure_ascii=False)
        with self._locked():
            os.write(self._fd, (line + "\n").encode("utf-8"))

    def rewind(self, step: int) -> int:
        """Drop this rank's lines of steps after ``step``; returns how many were dropped."""
        with self._locked():
            os.lseek(self._fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(self._fd, 1 << 20):
                chunks.append(chunk)
            lines = b"".join(chunks).decode("utf-8").splitlines()
            kept = [line for line in lines if not self._is_later_own_line(line, step)]
            os.ftruncate(self._fd, 0)
            os.write(self._fd, "".join(line + "\n" for line in kept).encode("utf-8"))
        return len(lines) - len(kept)

    def _is_later_own_line(self, line: str, step: int) -> bool:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return True  # a line cut by a crash mid-write: drop it
        return entry.get("rank") == self.rank and entry.get("step", 0) > step

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_sample_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete line, in file order (a line cut by a crash mid-write is ignored)."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entries.append(json.loads(line))
    return entries
