"""Elastic resume and mixtures through the real CLI: torchrun (gloo) ranks, killed as a lost node
would be (every process of the tree), resumed on other rank and worker counts.

- Global batch kept (2 ranks x 8 -> 1 rank x 16 -> 2 ranks x 8, workers 2 -> 1 -> 3): every
  step holds exactly the samples of the uninterrupted 2-rank plan (elastic determinism).
- Then the global batch changes (1 rank x 8): the epoch continues with no sample lost or repeated.
- A weighted mixture with a schedule, SIGKILLed and resumed, logs what the uninterrupted run would,
  with each step's exact per-source counts and a small source cycling on its own epochs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import psutil
import pytest

from streamtrain.config.weights import schedule
from streamtrain.data.mixture import apportion
from streamtrain.train import checkpoint
from streamtrain.train.tracking import read_metrics
from tests.faults.s23_runs import RECIPE, Recipe, recipe
from tests.planned import StepLog, planned_steps
from tests.streamtrain.train.conftest import ROOT, by_step, env, tiny_overrides

RUN_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Recipe:
    return recipe(tmp_path_factory, 0)


def _args(tiny: Recipe, out: Path, train: object, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "data.train": train,
        "data.eval": "null",
        "data.sample_log": out / "samples.jsonl",
        "data.shuffle_buffer": 64,
        "model.text.kind": "clip",
        "model.text.path": tiny.text_dir,
        "train.resume": "auto",
        "checkpoint.every_steps": 3,
        "checkpoint.keep_last": 3,
        "eval.every_steps": 0,
        **extra,
    }
    return ["train", str(RECIPE), *tiny_overrides(tiny.shards, out, **values)]


def _command(args: list[str], ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "streamtrain.cli", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        "--monitor_interval",
        "0.5",
        "-m",
        "streamtrain.cli",
        *args,
    ]


def _run(args: list[str], ranks: int) -> None:
    done = subprocess.run(
        _command(args, ranks), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env(), cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-4000:]


def _run_and_kill_tree(args: list[str], ranks: int, out: Path, after_step: int) -> None:
    """Start a job, wait for a checkpoint and a later step, then SIGKILL every process of it."""
    job = subprocess.Popen(
        _command(args, ranks),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
        start_new_session=True,
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    log = out / "samples.jsonl"
    while not (log.exists() and max((s for s, _ in by_step(log)), default=0) >= after_step):
        if job.poll() is not None:
            raise AssertionError(f"the job ended before step {after_step}:\n{job.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the job never reached the kill point"
        time.sleep(0.05)
    # torchrun puts every rank in a session of its own: kill each process, as a lost node would.
    tree = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    job.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)
    assert job.stderr is not None
    job.stderr.close()


def _per_step(log: StepLog) -> dict[int, list[str]]:
    """Each step's samples over all ranks, as a sorted multiset."""
    steps: dict[int, list[str]] = {}
    for (step, _), ids in log.items():
        steps.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in steps.items()}


def test_resume_on_other_ranks_and_workers_keeps_every_step_then_the_epoch(
    tiny: Recipe, tmp_path: Path
) -> None:
    train = tiny.shards["eval"]  # 297 samples: 18 steps of 16 per epoch, so the run crosses two
    out = tmp_path / "run"
    kept, changed = 24, 40
    lives = [  # (ranks, per-device batch, workers, max_steps)
        (2, 8, 2, 100),  # killed after the checkpoint of step 6
        (1, 16, 3, kept),
        (1, 8, 2, changed),  # global batch 16 -> 8
    ]
    ranks, batch, workers, max_steps = lives[0]
    args = _args(tiny, out, train, **{"train.batch_size": batch, "data.num_workers": workers})
    _run_and_kill_tree([*args, f"train.max_steps={max_steps}"], ranks, out, after_step=7)
    assert checkpoint.latest_complete(out) is not None
    for ranks, batch, workers, max_steps in lives[1:]:
        extra = {"train.batch_size": batch, "data.num_workers": workers, "train.max_steps": max_steps}
        _run(_args(tiny, out, train, **extra), ranks)

    logged = _per_step(by_step(out / "samples.jsonl"))
    assert sorted(logged) == list(range(1, changed + 1))
    reference = _per_step(planned_steps(str(train), kept, world_size=2, batch_size=8))
    assert {step: logged[step] for step in range(1, kept + 1)} == reference  # every step, exactly

    in_order = [i for step in range(1, changed + 1) for i in logged[step]]
    first_epoch, rest = in_order[: 18 * 16], in_order[18 * 16 :]
    assert len(set(first_epoch)) == len(first_epoch) == 297 - 9  # 9 left out: under one global batch
    assert len(set(rest)) == len(rest) == 6 * 16 + 16 * 8  # the second epoch, across the change
    final = [m for m in read_metrics(out) if "data/samples" in m][-1]
    assert final["data/dropped_samples"] == 9


def test_a_mixture_with_a_schedule_resumes_after_sigkill_as_if_never_stopped(
    tiny: Recipe, tmp_path: Path
) -> None:
    big, small = tiny.shards["train"], tiny.shards["eval"]  # 1500 and 297 samples
    train = f"[{{path: {big}, weight: 1, name: big}}, {{path: {small}, weight: {{0: 1, 9: 3}}, name: small}}]"
    out = tmp_path / "mix"
    steps = 30
    held_out = f"[{{path: {small}}}, {{path: {big}, name: big_eval}}]"  # named: reported apart too
    extra = {"train.batch_size": 16, "train.max_steps": steps, "data.eval": held_out}
    args = _args(tiny, out, train, **extra)
    _run_and_kill_tree(args, 1, out, after_step=7)
    _run(args, 1)

    weights = [schedule(1), schedule({0: 1, 9: 3})]
    carries = [Fraction(0)] * 2
    logged = by_step(out / "samples.jsonl")
    sources = {i: name for name, folder in (("big", big), ("small", small)) for i in _ids(folder)}
    small_seen: Counter[str] = Counter()
    for step in range(1, steps + 1):
        counts, carries = apportion(weights, 16, step, carries)
        got = Counter(sources[i] for i in logged[(step, 0)])
        assert [got["big"], got["small"]] == counts, step
        small_seen.update(i for i in logged[(step, 0)] if sources[i] == "small")
    assert len(small_seen) >= 297 - 9  # all of its first epoch (less its remainder), then more
    assert max(small_seen.values()) - min(small_seen.values()) <= 1  # the small source cycles evenly
    reference = planned_steps(train_list(big, small), steps, world_size=1, batch_size=16)
    assert logged == reference  # the same samples, in the same order, as an uninterrupted run
    final = [m for m in read_metrics(out) if "data/small/epoch" in m][-1]
    assert 1 < final["data/small/epoch"] < 2 and final["data/big/epoch"] < 1
    assert final["data/small/samples"] + final["data/big/samples"] == final["data/samples"] == steps * 16
    evaluated = [m for m in read_metrics(out) if any(k.startswith("eval/") for k in m)][-1]
    for name in ("eval", "big_eval"):  # each named held-out source, beside the overall metrics
        assert any(key.startswith(f"eval/{name}/") for key in evaluated), sorted(evaluated)
    assert any(key.startswith("eval/") and key.count("/") == 1 for key in evaluated)


def train_list(big: Path, small: Path) -> list:
    from streamtrain.config import SourceSpec

    return [
        SourceSpec(path=str(big), weight=1, name="big"),
        SourceSpec(path=str(small), weight={0: 1, 9: 3}, name="small"),
    ]


def _ids(folder: Path) -> set[str]:
    from tests.faults.s46_logs import shard_sample_ids

    return {i for shard in sorted(folder.glob("*.tar")) for i in shard_sample_ids(str(shard))}
