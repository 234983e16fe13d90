"""``data.sample_log``: which samples every optimizer step of every rank trained on.

One JSON line per (step, rank): ``{"step": s, "rank": r, "sample_ids": [...]}`` with the rows'
original sample_ids, so anyone can check order, coverage and resume against the manifest.
All ranks append to one file; each line is a single ``O_APPEND`` write, which the kernel never
interleaves with another. A run resumed from the checkpoint of step ``s`` first calls
``rewind(path, s)`` (one process, before any rank writes) to drop the lines that the
interrupted run wrote after that checkpoint, so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class SampleLog:
    """Appends this rank's lines to the shared log file."""

    def __init__(self, path: str | os.PathLike[str], rank: int) -> None:
        self.path = Path(path)
        self.rank = rank
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(self, step: int, sample_ids: list[str]) -> None:
        line = json.dumps({"step": step, "rank": self.rank, "sample_ids": sample_ids}, ensure_ascii=False)
        os.write(self._fd, (line + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_sample_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete line, in file order (a line cut by a crash mid-write is ignored)."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def rewind(path: str | os.PathLike[str], step: int) -> int:
    """Drop every line of a step after ``step``; returns how many were dropped. Atomic."""
    path = Path(path)
    if not path.exists():
        return 0
    entries = read_sample_log(path)
    kept = [entry for entry in entries if entry["step"] <= step]
    scratch = path.with_name(path.name + ".rewinding")
    scratch.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept), encoding="utf-8")
    os.replace(scratch, path)
    return len(entries) - len(kept)
