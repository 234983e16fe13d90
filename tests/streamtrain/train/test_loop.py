"""The loop alone: a task written for the test (a 5-parameter linear model on synthetic tensors
derived from each sample's id) through the real Trainer, data stream and checkpoint manager.

Steps, gradient accumulation, clipping, logging / evaluation / checkpoint cadences, resume and
best/ selection are checked here in seconds, apart from the alignment and VLM tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from shardify.convert import ConvertOptions, convert
from streamtrain import distributed
from streamtrain.config import RunConfig, build_config
from streamtrain.data.sample_log import read_sample_log
from streamtrain.train import checkpoint
from streamtrain.train.optim import lr_factor
from streamtrain.train.stopping import Stopped
from streamtrain.train.task import Task
from streamtrain.train.tracking import read_metrics
from streamtrain.train.trainer import Trainer
from tests.factories import caption_rows, write_parquet

SAMPLES = 64
TRUE_WEIGHTS = torch.tensor([0.5, -1.0, 2.0, 0.25])


@dataclass
class ToyModelConfig:
    """The toy task's model section."""

    features: int = 4
    """Inputs of the linear model."""


def features(sample_id: str) -> torch.Tensor:
    """Four numbers that depend on the sample id only."""
    seed = int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "little")
    generator = torch.Generator().manual_seed(seed % (1 << 63))
    return torch.randn(4, generator=generator)


def decode_toy(raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    sample_id = json.loads(raw["json"])["sample_id"]
    x = features(sample_id)
    return {"sample_id": sample_id, "x": x, "y": (x @ TRUE_WEIGHTS).reshape(1)}


class Crash(Exception):
    """Stands for the process dying in the middle of a step."""


class ToyTask(Task):
    """Regress y = x . w from x; evaluated by mean squared error."""

    ModelConfig = ToyModelConfig

    def __init__(
        self, config: RunConfig, crash_at_step: int | None = None, signal_at_step: int | None = None
    ) -> None:
        super().__init__(config)
        self.crash_at_step = crash_at_step
        self.signal_at_step = signal_at_step
        self.handlers: list[Any] = []
        """SIGTERM's handler at every loss call."""

    def build_model(self) -> nn.Module:
        return nn.Linear(self.config.model.features, 1)

    def decoder(self, train: bool) -> Any:
        return decode_toy

    def collate(self, samples: list[Any]) -> dict[str, Any]:
        return {
            "sample_ids": [s["sample_id"] for s in samples],
            "x": torch.stack([s["x"] for s in samples]),
            "y": torch.stack([s["y"] for s in samples]),
        }

    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if step == self.crash_at_step:
            raise Crash(f"crashed in step {step + 1}")
        if step == self.signal_at_step:  # preempted in the middle of this step
            os.kill(os.getpid(), signal.SIGTERM)
        self.handlers.append(signal.getsignal(signal.SIGTERM))
        # Scaled up so that gradients are large: clipping has something to do.
        loss = 100.0 * nn.functional.mse_loss(model(batch["x"]), batch["y"])
        return loss, {"toy_extra": float(step)}

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        total, count = 0.0, 0
        for batch in batches:
            total += float(nn.functional.mse_loss(model(batch["x"]), batch["y"], reduction="sum"))
            count += len(batch["sample_ids"])
        sums = distributed.all_reduce_sum({"total": total, "count": float(count)})
        return {"eval/loss": sums["total"] / sums["count"], "eval/samples": sums["count"]}

    def summary(self, metrics: dict[str, float]) -> str:
        return f"toy loss {metrics['eval/loss']:.4f}"

    def best_metric(self) -> tuple[str, Literal["max", "min"]]:
        return "eval/loss", "min"


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    source = write_parquet(root / "rows.parquet", caption_rows(SAMPLES, size=(8, 8)))
    convert([str(source)], ConvertOptions(output=str(root / "shards"), max_samples_per_shard=16))
    return root / "shards"


def toy_config(shards: Path, output: Path, **overrides: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "task": "toy",
        "output_dir": str(output),
        "data": {"train": str(shards), "eval": str(shards), "num_workers": 0, "shuffle_buffer": 8},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 0.05, "warmup_steps": 2, "mixed_precision": "no"},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "eval": {"every_steps": 3, "batch_size": 16},
        "log": {"every_steps": 2, "progress_bar": False},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return build_config(raw, {"toy": ToyModelConfig})


def run(config: RunConfig, crash_at_step: int | None = None) -> dict[str, float]:
    return Trainer(config, ToyTask(config, crash_at_step)).fit()


def test_a_stop_signal_checkpoints_its_step_and_the_resume_equals_an_uninterrupted_run(
    toy_shards: Path, tmp_path: Path
) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    settings = {"checkpoint__every_steps": 0, "eval__every_steps": 0}
    run(toy_config(toy_shards, whole, data__sample_log=str(whole / "samples.jsonl"), **settings))
    config = toy_config(toy_shards, parts, data__sample_log=str(parts / "samples.jsonl"), **settings)
    with pytest.raises(Stopped) as stopped:
        Trainer(config, ToyTask(config, signal_at_step=2)).fit()  # SIGTERM inside step 3
    assert stopped.value.exit_status == 143 and stopped.value.step == 3
    assert "stopped by SIGTERM after step 3" in str(stopped.value)
    assert [path.name for _, path in checkpoint.step_dirs(parts)] == ["step-00000003"]
    assert checkpoint.is_complete(parts / "step-00000003")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    run(config)
    assert read_sample_log(parts / "samples.jsonl") == read_sample_log(whole / "samples.jsonl")
    for name, tensor in load_file(whole / "step-00000006" / "model.safetensors").items():
        torch.testing.assert_close(load_file(parts / "step-00000006" / "model.safetensors")[name], tensor)


@pytest.fixture
def optimizer_steps() -> Iterator[list[float]]:
    """The global gradient norm every optimizer step sees (after clipping), in order."""
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    yield norms
    handle.remove()


def test_steps_accumulation_cadences_and_best(
    toy_shards: Path, tmp_path: Path, optimizer_steps: list[float]
) -> None:
    out = tmp_path / "run"
    config = toy_config(
        toy_shards, out, train__grad_accum_steps=2, data__sample_log=str(out / "samples.jsonl")
    )
    final = run(config)

    # Six optimizer steps of two micro-batches of four: one update per step, 8 samples per step.
    assert len(optimizer_steps) == 6
    log = read_sample_log(out / "samples.jsonl")
    assert [line["step"] for line in log] == [1, 2, 3, 4, 5, 6]
    assert all(len(line["sample_ids"]) == 8 for line in log)
    ids = [sample_id for line in log for sample_id in line["sample_ids"]]
    assert len(set(ids)) == len(ids) == 48  # inside one epoch of 64: nothing repeated

    logged = read_metrics(out)
    train = [m for m in logged if "train/loss" in m]
    assert [m["step"] for m in train] == [2, 4, 6]
    for line in train:  # the scheduler stepped once per optimizer step
        expected = 0.05 * lr_factor(line["step"], 2, 6, 0.0)
        assert line["train/lr"] == pytest.approx(expected)
        assert line["data/samples"] == 8 * line["step"]
        assert line["train/toy_extra"] == line["step"] - 1
    evals = [m for m in logged if "eval/loss" in m]
    assert [m["step"] for m in evals] == [3, 6]
    assert final["eval/samples"] == SAMPLES

    assert [p.name for _, p in checkpoint.step_dirs(out)] == ["step-00000004", "step-00000006"]
    best_step = min(evals, key=lambda m: m["eval/loss"])["step"]
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["step"] == best_step
    state = json.loads((out / "step-00000006" / "trainer_state.json").read_text())
    assert state["best"] == {
        "metric": "eval/loss",
        "value": pytest.approx(best["eval/loss"]),
        "step": best_step,
    }


def test_best_mode_max_keeps_the_largest(toy_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(
        toy_config(
            toy_shards,
            out,
            eval__every_steps=1,
            checkpoint__best_mode="max",
            checkpoint__best_metric="eval/loss",
        )
    )
    evals = [m for m in read_metrics(out) if "eval/loss" in m]
    assert len(evals) == 6
    assert (
        json.loads((out / "best" / "metrics.json").read_text())["step"]
        == max(evals, key=lambda m: m["eval/loss"])["step"]
    )


def test_gradients_are_clipped_to_max_grad_norm(
    toy_shards: Path, tmp_path: Path, optimizer_steps: list[float]
) -> None:
    out = tmp_path / "run"
    run(toy_config(toy_shards, out, train__max_grad_norm=0.01, eval__every_steps=0, log__every_steps=1))
    logged = [m["train/grad_norm"] for m in read_metrics(out) if "train/grad_norm" in m]
    assert len(optimizer_steps) == len(logged) == 6
    assert all(norm <= 0.01 * (1 + 1e-4) for norm in optimizer_steps), optimizer_steps
    assert all(norm > 0.01 for norm in logged), logged  # the norm logged is the one before clipping


def test_resume_from_the_manager_equals_an_uninterrupted_run(toy_shards: Path, tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(toy_config(toy_shards, whole, data__sample_log=str(whole / "samples.jsonl")))
    with pytest.raises(Crash):  # in step 6, after the checkpoint of step 4 (and step 5 trained)
        run(toy_config(toy_shards, parts, data__sample_log=str(parts / "samples.jsonl")), crash_at_step=5)
    assert checkpoint.latest_complete(parts) == parts / "step-00000004"
    assert len(read_sample_log(parts / "samples.jsonl")) == 6  # steps 5 and 6 were drawn, not saved
    resumed = run(toy_config(toy_shards, parts, data__sample_log=str(parts / "samples.jsonl")))

    assert read_sample_log(parts / "samples.jsonl") == read_sample_log(whole / "samples.jsonl")
    losses = {m["step"]: m["train/loss"] for m in read_metrics(whole) if "train/loss" in m}
    resumed_losses = {m["step"]: m["train/loss"] for m in read_metrics(parts) if "train/loss" in m}
    assert resumed_losses == pytest.approx(losses, rel=1e-6)
    expected = load_file(whole / "step-00000006" / "model.safetensors")
    got = load_file(parts / "step-00000006" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)
    assert resumed["eval/loss"] == pytest.approx(
        json.loads((whole / "final_metrics.json").read_text())["eval/loss"], rel=1e-6
    )


def test_checkpoint_on_signal_false_leaves_the_signals_alone(toy_shards: Path, tmp_path: Path) -> None:
    config = toy_config(toy_shards, tmp_path / "run", train__checkpoint_on_signal=False, eval__every_steps=0)
    task = ToyTask(config)
    Trainer(config, task).fit()
    assert task.handlers and all(handler is signal.SIG_DFL for handler in task.handlers)
    config = toy_config(toy_shards, tmp_path / "other", eval__every_steps=0)
    task = ToyTask(config)
    Trainer(config, task).fit()
    assert task.handlers and all(handler is not signal.SIG_DFL for handler in task.handlers)
