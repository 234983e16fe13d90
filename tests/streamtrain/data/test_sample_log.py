"""The sample log: whole lines from concurrent ranks, and rewinding to a checkpoint's step."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from streamtrain.data.sample_log import SampleLog, read_sample_log, rewind


def _write_steps(path: str, rank: int, steps: int) -> None:
    log = SampleLog(path, rank)
    for step in range(1, steps + 1):
        log.record(step, [f"r{rank}-s{step}-{i}-" + "x" * 300 for i in range(64)])  # ~20 KB lines
    log.close()


def test_concurrent_ranks_never_interleave_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "logs" / "samples.jsonl")
    processes = [multiprocessing.Process(target=_write_steps, args=(path, rank, 50)) for rank in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    entries = read_sample_log(path)
    assert len(entries) == 150 == len(Path(path).read_text().splitlines())
    for rank in range(3):
        mine = [e for e in entries if e["rank"] == rank]
        assert [e["step"] for e in mine] == list(range(1, 51))
        assert all(e["sample_ids"][0].startswith(f"r{rank}-s{e['step']}-0-") for e in mine)


def test_rewind_drops_steps_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    _write_steps(str(path), 0, 10)
    _write_steps(str(path), 1, 7)
    assert rewind(path, 5) == (10 - 5) + (7 - 5)
    assert sorted((e["rank"], e["step"]) for e in read_sample_log(path)) == [
        (rank, step) for rank in (0, 1) for step in range(1, 6)
    ]
    assert rewind(tmp_path / "absent.jsonl", 3) == 0


def test_a_line_cut_by_a_crash_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    _write_steps(str(path), 0, 3)
    with open(path, "a") as handle:
        handle.write('{"step": 4, "rank": 0, "sample_')
    assert [e["step"] for e in read_sample_log(path)] == [1, 2, 3]
    assert rewind(path, 3) == 0 and path.read_text().endswith("}\n")
