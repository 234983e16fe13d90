"""Shared by scenarios 2 and 3: one tiny alignment recipe, its uninterrupted reference run, and
the comparisons of a faulted run's sample log, losses and weights with that reference.

The recipe is the trainer tests' tiny alignment run with a tiny random CLIP text tower in place of
the bundled 90 MB sentence-transformer, so a checkpoint is a few hundred KB and a process lives a
few seconds. The reference is run once per session (``prepared``) and shared by both scenarios.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextModel

from streamtrain.data.sample_log import read_sample_log
from streamtrain.train import checkpoint
from streamtrain.train.tracking import METRICS_FILE
from tests.streamtrain.models.conftest import tiny_clip_text_config, tiny_clip_tokenizer
from tests.streamtrain.train.conftest import ROOT, convert_sample, env, tiny_overrides

RECIPE = ROOT / "configs" / "alignment.yaml"
CHECKPOINT_EVERY = 2
SAMPLE_LOG = "samples.jsonl"
RUN_TIMEOUT_S = 240.0
"""A run that takes longer than this has hung (a tiny run takes seconds)."""


@dataclass(frozen=True)
class Recipe:
    """The shards, the tiny text tower and the overrides every run of scenarios 2 and 3 shares."""

    shards: dict[str, Path]
    text_dir: Path
    max_steps: int

    def args(self, output: Path, **extra: object) -> list[str]:
        """``streamtrain train`` arguments for a run into ``output`` (its sample log inside it)."""
        values: dict[str, object] = {
            "data.num_workers": 2,
            "data.eval": "null",
            "data.sample_log": output / SAMPLE_LOG,
            "model.text.kind": "clip",
            "model.text.path": self.text_dir,
            "train.max_steps": self.max_steps,
            "train.resume": "auto",
            "checkpoint.every_steps": CHECKPOINT_EVERY,
            "eval.every_steps": 0,
            **extra,
        }
        return ["train", str(RECIPE), *tiny_overrides(self.shards, output, **values)]


@dataclass(frozen=True)
class Reference:
    """The uninterrupted run: its sample log lines, per-step losses and final weights."""

    output: Path
    lines: list[dict]
    losses: dict[int, float]
    weights: dict[str, torch.Tensor]


def prepare(tmp_path_factory: pytest.TempPathFactory, max_steps: int) -> tuple[Recipe, Reference]:
    """The recipe and its reference run of ``max_steps`` steps, made once per test session."""
    return _prepared(tmp_path_factory.getbasetemp() / "faults-s23", max_steps)


def recipe(tmp_path_factory: pytest.TempPathFactory, max_steps: int) -> Recipe:
    """The recipe alone (its shards and tiny text tower, made once per session), no reference run."""
    return _recipe(tmp_path_factory.getbasetemp() / "faults-s23", max_steps)


@functools.cache
def _prepared(base: Path, max_steps: int) -> tuple[Recipe, Reference]:
    recipe = _recipe(base, max_steps)
    output = base / f"reference-{max_steps}"
    done = run_to_end(recipe.args(output))
    assert done.returncode == 0, done.stderr[-3000:]
    final = output / checkpoint.step_dir_name(max_steps)
    reference = Reference(
        output=output,
        lines=read_sample_log(output / SAMPLE_LOG),
        losses=losses(output),
        weights=load_file(final / "model.safetensors"),
    )
    assert [line["step"] for line in reference.lines] == list(range(1, max_steps + 1))
    assert sorted(reference.losses) == list(range(1, max_steps + 1))
    return recipe, reference


def _recipe(base: Path, max_steps: int) -> Recipe:
    base.mkdir(parents=True, exist_ok=True)
    text_dir = base / "clip_text"
    if not text_dir.exists():
        tokenizer = tiny_clip_tokenizer()
        torch.manual_seed(0)
        CLIPTextModel(tiny_clip_text_config(tokenizer)).save_pretrained(text_dir)
        tokenizer.save_pretrained(text_dir)
    shards_dir = base / "shards"
    shards = (
        {split: shards_dir / split for split in ("train", "eval")}
        if (shards_dir / "eval").exists()
        else convert_sample(shards_dir)
    )
    return Recipe(shards, text_dir, max_steps)


def command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "streamtrain.cli", *args]


def start(args: Sequence[str], prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    """A ``streamtrain`` process in the background; its stderr (a few lines) is piped."""
    return subprocess.Popen(
        [*prefix, *command(args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
    )


def run_to_end(args: Sequence[str], prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``streamtrain`` to its end; a run past RUN_TIMEOUT_S fails the test as hung."""
    try:
        return subprocess.run(
            [*prefix, *command(args)],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            env=env(),
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"streamtrain hung for {RUN_TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}") from None


def wait_until(
    predicate: Callable[[], bool], process: subprocess.Popen[str], what: str, poll_s: float
) -> None:
    """Poll ``predicate`` until it holds; the process ending first or a hang fails the test."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not predicate():
        if process.poll() is not None:
            stderr = process.stderr.read() if process.stderr else ""
            raise AssertionError(
                f"the run ended (exit {process.returncode}) before {what}:\n{stderr[-3000:]}"
            )
        if time.monotonic() > deadline:
            kill(process)
            raise AssertionError(f"{what}: not reached in {RUN_TIMEOUT_S} s")
        time.sleep(poll_s)


def kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL: no handler runs, nothing is flushed or cleaned up."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    if process.stderr:
        process.stderr.close()


def losses(output: Path) -> dict[int, float]:
    """Per-step training loss from ``metrics.jsonl`` (a line cut by a kill is skipped)."""
    found = {}
    for line in (output / METRICS_FILE).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if "train/loss" in entry:
                found[int(entry["step"])] = float(entry["train/loss"])
    return found


@dataclass(frozen=True)
class LogDiff:
    """How a faulted run's sample log differs from the reference's.

    Per step s, the reference trained on the sample ids R_s; the faulted run's log holds the ids
    G_s of every line it has for step s (all of them, however many). ``lost`` counts ids of R_s
    missing from G_s and ``repeated`` ids of G_s beyond R_s (both as multisets), summed over steps:
    a step whose line is missing loses its batch, a step logged twice repeats it.
    """

    lost: int
    repeated: int


def compare_log(lines: list[dict], reference: list[dict]) -> LogDiff:
    got: dict[int, Counter[str]] = {}
    for line in lines:
        got.setdefault(int(line["step"]), Counter()).update(line["sample_ids"])
    want = {int(line["step"]): Counter(line["sample_ids"]) for line in reference}
    lost = sum(sum((ids - got.get(step, Counter())).values()) for step, ids in want.items())
    repeated = sum(sum((ids - want.get(step, Counter())).values()) for step, ids in got.items())
    return LogDiff(lost=lost, repeated=repeated)


def assert_matches_reference(output: Path, reference: Reference, max_steps: int) -> LogDiff:
    """The faulted run's log, losses and final weights equal the reference's; the log's diff."""
    lines = read_sample_log(output / SAMPLE_LOG)
    diff = compare_log(lines, reference.lines)
    assert diff == LogDiff(0, 0), diff
    # Stronger than no sample lost or repeated: the file is line for line the uninterrupted one
    # (one line per step, in step order, no line cut by a kill).
    raw = (output / SAMPLE_LOG).read_text().splitlines()
    assert len(raw) == len(lines) == max_steps, f"{len(raw)} lines, {len(lines)} whole, {max_steps} steps"
    assert lines == reference.lines
    got = losses(output)
    assert sorted(got) == sorted(reference.losses)
    for step, loss in reference.losses.items():
        assert abs(got[step] - loss) <= 1e-5 + 1e-5 * abs(loss), (step, got[step], loss)
    weights = load_file(output / checkpoint.step_dir_name(max_steps) / "model.safetensors")
    assert weights.keys() == reference.weights.keys()
    for name, tensor in reference.weights.items():
        assert torch.allclose(weights[name], tensor, rtol=1e-5, atol=1e-6), name
    return diff
