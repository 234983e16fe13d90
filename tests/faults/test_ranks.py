"""Scenario 6: two ranks (real torchrun, gloo, CPU) with very uneven data, or one rank's reader failing.

- Uneven data: one big shard, one tiny shard and a few small ones (fewer shards of any one size
  than ranks). The plan gives every rank the same number of batches, so both ranks log every
  step, through an epoch boundary, with no sample on both ranks. Mid-run a shard that only
  rank 1 reads is deleted: rank 1 skips it (batches that lost every sample included) and both
  ranks still train every step; only that shard's samples are missing from the log.
- A rank's dataloader worker is SIGKILLed mid-run: the job must stop with a clear error naming
  the failure, every rank gone, within a bounded time (no rank left waiting in a gloo collective).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from shardify.convert import ConvertOptions, convert
from streamtrain.data.sample_log import read_sample_log
from streamtrain.data.shards import resolve
from streamtrain.train.tracking import read_metrics
from tests import factories
from tests.faults.conftest import FULL, FaultRecord, fault_rng, trials
from tests.faults.s46_logs import by_step, shard_sample_ids
from tests.planned import StepLog, compare_skipping, not_yet_read, occurrences, planned_steps
from tests.streamtrain.train.conftest import ROOT, env, tiny_overrides

SCENARIO = "6. uneven or failing ranks"
RECIPE = ROOT / "configs" / "alignment.yaml"
BATCH = 16
RUN_TIMEOUT_S = 240.0
STOP_BOUND_S = 60.0
"""A failed rank must have ended the whole job within this long."""


@pytest.fixture(scope="module")
def uneven_sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three shardify outputs: one shard of 260 samples, one of 5, and four of 24."""
    base = tmp_path_factory.mktemp("s6")
    images = [factories.encode(factories.photo(8, 8, seed=seed), "PNG") for seed in range(10)]
    sources = []
    for name, count, per_shard in (("big", 260, 260), ("tiny", 5, 5), ("small", 96, 24)):
        rows = [
            {"sample_id": f"{name}-{i}", "caption": f"digit {i % 10}", "image_bytes": images[i % 10]}
            for i in range(count)
        ]
        factories.write_parquet(base / f"{name}.parquet", rows)
        convert(
            [str(base / f"{name}.parquet")],
            ConvertOptions(output=str(base / name), max_samples_per_shard=per_shard),
        )
        sources.append(base / name)
    return sources


def _command(sources: list[Path], out: Path, max_steps: int) -> list[str]:
    data = "[" + ",".join(str(source) for source in sources) + "]"
    overrides = tiny_overrides(
        {"train": data, "eval": "null"},  # type: ignore[dict-item]
        out,
        **{
            "train.max_steps": max_steps,
            "checkpoint.every_steps": 0,
            "data.shuffle_buffer": BATCH,
            "data.sample_log": out / "samples.jsonl",
        },
    )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--monitor_interval",
        "0.5",
        "-m",
        "streamtrain.cli",
        "train",
        str(RECIPE),
        *overrides,
    ]


def _start(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
        cwd=ROOT,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen[str], timeout: float) -> str:
    """The job's output once it ends; a job still running after ``timeout`` is killed and fails."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(
            f"the job hung (still running after {timeout:.0f}s):\n{output[-4000:]}"
        ) from None
    return output


def _rank_steps(log: Path, rank: int) -> int:
    if not log.exists():
        return 0
    return sum(1 for line in read_sample_log(log) if line["rank"] == rank)


def _wait_for_step(log: Path, rank: int, step: int, process: subprocess.Popen[str]) -> None:
    """Wait until ``rank`` has logged ``step`` steps; the job ending first or a hang fails the test."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while _rank_steps(log, rank) < step:
        if process.poll() is not None:
            output = _finish(process, 1)
            raise AssertionError(f"the job ended before rank {rank} step {step}:\n{output[-4000:]}")
        if time.monotonic() > deadline:
            _finish(process, 0.1)
        time.sleep(0.05)


@pytest.mark.scenario(SCENARIO)
def test_uneven_ranks_and_a_lost_shard_keep_equal_steps(
    uneven_sources: list[Path], tmp_path: Path, fault_record: FaultRecord
) -> None:
    shards = resolve([str(s) for s in uneven_sources]).shards
    per_rank = sum(s.samples for s in shards) // (2 * BATCH)
    max_steps = per_rank + 3  # across the epoch boundary
    reference = _planned_order(uneven_sources, max_steps)
    first_epoch = [i for (step, _), ids in reference.items() if step <= per_rank for i in ids]
    assert len(first_epoch) == len(set(first_epoch)) == per_rank * 2 * BATCH

    rng = fault_rng(SCENARIO + "/lost shard")
    for trial in range(trials(1, 3)):
        sources = [tmp_path / f"trial-{trial}" / s.name for s in uneven_sources]
        for source, original in zip(sources, uneven_sources, strict=True):
            source.parent.mkdir(exist_ok=True)
            subprocess.run(["cp", "-r", str(original), str(source)], check=True)
        out = tmp_path / f"trial-{trial}" / "run"
        delete_after = rng.randint(0, 1)
        shard_ids = {
            shard.url: shard_sample_ids(shard.url) for shard in resolve([str(s) for s in sources]).shards
        }
        # Lanes read every region of the epoch at once, and a reader that has a shard open reads
        # on after it is deleted; a shard the next epoch opens again is certain to be missed then.
        candidates = not_yet_read(reference, shard_ids, after_step=0, margin=0, from_step=per_rank + 1)
        assert candidates, "the next epoch's first steps open no shard"
        victim = rng.choice(candidates)
        victim_ids = shard_ids[victim]
        process = _start(_command(sources, out, max_steps))
        _wait_for_step(out / "samples.jsonl", 1, delete_after, process)
        Path(victim).unlink()
        deleted = time.monotonic()
        output = _finish(process, RUN_TIMEOUT_S)
        assert process.returncode == 0, output[-4000:]

        result = compare_skipping(reference, by_step(out / "samples.jsonl"), victim_ids)
        final = [m for m in read_metrics(out) if "data/samples" in m][-1]
        fault_record.trials += 1
        fault_record.faults += 1
        fault_record.lost += result.lost
        fault_record.repeated += result.repeated
        assert result.same_order, "equal steps on both ranks, in the reference's order"
        assert (result.lost, result.repeated) == (0, 0), result
        assert 0 < result.skipped <= occurrences(reference, victim_ids), (result, deleted)
        assert final["data/shard_errors"] >= 1  # once per lane that reached it
        assert final["data/unreadable_samples"] == result.skipped
        assert victim in output and "missing" in output, output[-4000:]
        fault_record.survived += 1


def _planned_order(sources: list[Path], max_steps: int) -> StepLog:
    """Each rank's uninterrupted sample order, read by the real loader in this process (no training)."""
    return planned_steps(
        [str(s) for s in sources], max_steps, world_size=2, batch_size=BATCH, shuffle_buffer=BATCH
    )


def _rank_process(job: subprocess.Popen[str], rank: int) -> psutil.Process:
    for child in psutil.Process(job.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") != str(rank) or "streamtrain.cli" not in " ".join(child.cmdline()):
                continue
            parent = child.parent()
            if parent is not None and parent.environ().get("RANK") != str(rank):  # not a loader worker
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank} under the job")


@pytest.mark.skipif(not FULL, reason="two torchrun jobs' worth of time: run by ./launch.sh faults")
@pytest.mark.scenario(SCENARIO)
def test_a_killed_reader_stops_every_rank_with_a_clear_error(
    uneven_sources: list[Path], tmp_path: Path, fault_record: FaultRecord
) -> None:
    rng = fault_rng(SCENARIO + "/killed reader")
    for trial in range(trials(1, 3)):
        out = tmp_path / f"trial-{trial}"
        rank, at_step = rng.randint(0, 1), rng.randint(1, 6)
        process = _start(_command(uneven_sources, out, 10_000))
        _wait_for_step(out / "samples.jsonl", rank, at_step, process)
        trainer = _rank_process(process, rank)
        ranks = [trainer, _rank_process(process, 1 - rank)]
        workers = trainer.children()
        assert workers, f"rank {rank} has no dataloader worker"
        fault_record.faults += 1
        killed = time.monotonic()
        os.kill(workers[0].pid, signal.SIGKILL)
        output = _finish(process, STOP_BOUND_S)
        stopped_s = time.monotonic() - killed
        fault_record.trials += 1
        assert process.returncode != 0
        assert f"DataLoader worker (pid {workers[0].pid}) is killed by signal" in output, output[-4000:]
        assert f"rank      : {rank}" in output or f"rank: {rank}" in output, output[-4000:]
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
        fault_record.recovery_s.append(stopped_s)
        fault_record.survived += 1


@pytest.mark.skipif(not FULL, reason="waits out a collective timeout: run by ./launch.sh faults")
@pytest.mark.scenario(SCENARIO)
def test_a_stuck_rank_ends_the_job_after_the_collective_timeout(
    uneven_sources: list[Path], tmp_path: Path, fault_record: FaultRecord
) -> None:
    """A rank that stops answering (SIGSTOP: alive, holding its sockets, doing nothing) must not
    hold the others in a gloo collective forever: after ``train.collective_timeout_s`` the
    waiting rank fails, and torchrun ends the job."""
    rng = fault_rng(SCENARIO + "/stuck rank")
    timeout_s = 15
    out = tmp_path / "stuck"
    rank, at_step = rng.randint(0, 1), rng.randint(1, 4)
    process = _start([*_command(uneven_sources, out, 10_000), f"train.collective_timeout_s={timeout_s}"])
    _wait_for_step(out / "samples.jsonl", rank, at_step, process)
    stuck = _rank_process(process, rank)
    fault_record.faults += 1
    stopped = time.monotonic()
    stuck.suspend()
    try:
        output = _finish(process, timeout_s + STOP_BOUND_S + 40)  # torchrun's SIGTERM grace is 30 s
    finally:
        with contextlib.suppress(psutil.Error):
            stuck.kill()
    ended_s = time.monotonic() - stopped
    fault_record.trials += 1
    assert process.returncode != 0
    assert "timed out" in output.lower() or "timeout" in output.lower(), output[-4000:]
    fault_record.recovery_s.append(ended_s)
    fault_record.survived += 1
