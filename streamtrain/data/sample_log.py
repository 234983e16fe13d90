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
        data = memoryview((line + "\n").encode("utf-8"))
        with self._locked():
            end = os.fstat(self._fd).st_size
            try:
                while data:  # a write to a filling disk can be short before it fails outright
                    data = data[os.write(self._fd, data) :]
            except OSError:
                os.ftruncate(self._fd, end)  # no cut line for the next append to run into
                raise

    def rewind(self, step: int, world_size: int | None = None) -> int:
        """Drop this rank's lines of steps after ``step``; returns how many were dropped.

        With ``world_size``, lines after ``step`` of ranks at or above it go too: a run resumed
        on fewer ranks has no rank left to rewind them.

        The kept lines are first saved beside the log (``<log>.rewind``, published by rename), then
        the log is rewritten in place and the copy removed: a rewind killed half-way is finished
        from the copy by the next one, so the log is never left torn or empty.
        """
        with self._locked():
            self._finish_interrupted_rewind()
            lines = self._read().decode("utf-8").splitlines()
            kept = [line for line in lines if not self._is_later_own_line(line, step, world_size)]
            if len(kept) == len(lines):
                return 0
            data = "".join(line + "\n" for line in kept).encode("utf-8")
            pending, saved = self._rewind_copies()
            with open(pending, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(pending, saved)
            self._overwrite(data)
            saved.unlink()
        return len(lines) - len(kept)

    def _rewind_copies(self) -> tuple[Path, Path]:
        saved = self.path.with_name(self.path.name + ".rewind")
        return saved.with_name(saved.name + ".tmp"), saved

    def _finish_interrupted_rewind(self) -> None:
        pending, saved = self._rewind_copies()
        pending.unlink(missing_ok=True)  # killed while saving the copy: the log itself is intact
        if saved.exists():  # killed while rewriting the log: the copy is what it should hold
            self._overwrite(saved.read_bytes())
            saved.unlink()

    def _read(self) -> bytes:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def _overwrite(self, data: bytes) -> None:
        os.ftruncate(self._fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def _is_later_own_line(self, line: str, step: int, world_size: int | None) -> bool:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            return True  # a line cut by a crash mid-write: drop it
        rank = entry.get("rank")
        gone = world_size is not None and isinstance(rank, int) and rank >= world_size
        return (rank == self.rank or gone) and entry.get("step", 0) > step

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
