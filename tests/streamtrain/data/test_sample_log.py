"""The sample log: whole lines from concurrent ranks, and rewinding to a checkpoint's step."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from streamtrain.data.sample_log import SampleLog, read_sample_log


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


def test_each_rank_rewinds_only_its_own_later_steps(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    _write_steps(str(path), 0, 10)
    _write_steps(str(path), 1, 7)
    rank0 = SampleLog(path, 0)
    rank1 = SampleLog(path, 1)
    assert rank0.rewind(5) == 5
    rank0.record(6, ["again"])  # appends land in the same, rewritten file
    assert rank1.rewind(3) == 4
    rank1.record(4, ["again-1"])
    steps = [(e["rank"], e["step"]) for e in read_sample_log(path)]
    assert sorted(steps) == sorted([(0, s) for s in range(1, 7)] + [(1, s) for s in range(1, 5)])
    assert steps[-2:] == [(0, 6), (1, 4)]


def test_a_line_cut_by_a_crash_is_ignored_and_dropped_on_rewind(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    _write_steps(str(path), 0, 3)
    with open(path, "a") as handle:
        handle.write('{"step": 4, "rank": 0, "sample_')
    assert [e["step"] for e in read_sample_log(path)] == [1, 2, 3]
    assert SampleLog(path, 0).rewind(3) == 1 and path.read_text().endswith("}\n")


def test_a_rewind_killed_while_rewriting_is_finished_by_the_next_one(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    log = SampleLog(path, rank=0)
    for step in (1, 2, 3, 4):
        log.record(step, [f"s{step}"])
    log.close()
    expected = b"".join(line for line in path.read_bytes().splitlines(keepends=True)[:2])
    # The state a kill leaves between saving the kept lines and rewriting the log: a torn log.
    (tmp_path / "samples.jsonl.rewind").write_bytes(expected)
    path.write_bytes(expected[:7])

    log = SampleLog(path, rank=0)
    assert log.rewind(2) == 0
    log.close()
    assert path.read_bytes() == expected
    assert [entry["step"] for entry in read_sample_log(path)] == [1, 2]
    assert not (tmp_path / "samples.jsonl.rewind").exists()


def test_a_rewind_killed_while_saving_its_copy_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    log = SampleLog(path, rank=0)
    for step in (1, 2, 3):
        log.record(step, [f"s{step}"])
    (tmp_path / "samples.jsonl.rewind.tmp").write_bytes(b'{"step": 1, "ra')  # a partial copy
    assert log.rewind(1) == 2
    log.close()
    assert [entry["step"] for entry in read_sample_log(path)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl"]
