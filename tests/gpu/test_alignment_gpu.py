"""Alignment on CUDA: bf16 mixed precision and DeepSpeed ZeRO-2 save/resume (loader -> GPU
throughput, both decode paths: test_device_decode_gpu.py).

Self-contained (no MiniLM: a tiny CLIP text encoder built here), so they run on a bare GPU machine.
Figures are printed and, when $OUT is set, written to $OUT/gpu_alignment.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from streamtrain.config import load_config
from streamtrain.tasks import TASKS, model_types
from streamtrain.train import checkpoint
from streamtrain.train.tracking import read_metrics
from streamtrain.train.trainer import Trainer
from tests.streamtrain.models.conftest import tiny_clip_text_config, tiny_clip_tokenizer
from tests.streamtrain.train.conftest import ROOT, convert_sample, streamtrain

pytestmark = pytest.mark.gpu
RECIPE = ROOT / "configs" / "alignment.yaml"
RESULTS: dict[str, object] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import CLIPTextModel

    out = tmp_path_factory.mktemp("gpu")
    paths = convert_sample(out)
    tokenizer = tiny_clip_tokenizer()
    paths["text"] = out / "clip_text"
    CLIPTextModel(tiny_clip_text_config(tokenizer)).save_pretrained(paths["text"])
    tokenizer.save_pretrained(paths["text"])
    return paths


def overrides(paths: dict[str, Path], output: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "output_dir": output,
        "data.train": paths["train"],
        "data.eval": paths["eval"],
        "model.text.kind": "clip",
        "model.text.path": paths["text"],
        "model.text.trainable": "true",
        "train.max_steps": 30,
        "checkpoint.every_steps": 15,
        "eval.every_steps": 15,
        "log.every_steps": 1,
        "log.progress_bar": "false",
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def test_bf16_on_cuda(setup: dict[str, Path], tmp_path: Path) -> None:
    config = load_config(RECIPE, overrides(setup, tmp_path / "run"), model_types())
    trainer = Trainer(config, TASKS["alignment"](config))
    metrics = trainer.fit()
    assert trainer.backend.accelerator.mixed_precision == "bf16"
    assert trainer.backend.accelerator.device.type == "cuda"
    losses = [m["train/loss"] for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns in bf16 too
    assert checkpoint.is_complete(tmp_path / "run" / "step-00000030")
    RESULTS["bf16"] = {"first_losses": losses[:5], "last_losses": losses[-5:], **metrics}
    _write()


def test_deepspeed_zero2_on_cuda_saves_and_resumes(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    common = {
        "train.deepspeed": ROOT / "configs" / "deepspeed" / "zero2.json",
        "eval.every_steps": 0,
        "checkpoint.every_steps": 5,
    }
    first = streamtrain(
        ["train", str(RECIPE), *overrides(setup, out, **common, **{"train.max_steps": 5})],
        nproc=1,
        timeout=400,
    )
    assert first.returncode == 0, first.stderr[-4000:]
    assert checkpoint.is_complete(out / "step-00000005")
    second = streamtrain(
        ["train", str(RECIPE), *overrides(setup, out, **common, **{"train.max_steps": 10})],
        nproc=1,
        timeout=400,
    )
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stdout + second.stderr
    steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert steps == list(range(1, 11))
    RESULTS["deepspeed_zero2_cuda"] = "saved at 5, resumed to 10"
    _write()


def _write() -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_alignment.json").write_text(json.dumps(RESULTS, indent=2, default=float))
