"""End-to-end alignment runs on CPU: in-process, and two DeepSpeed processes saving and resuming.

Killed-and-resumed runs and user mistakes are the fault suite's (tests/faults/: scenarios 2 and 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from streamtrain.config import load_config
from streamtrain.data.sample_log import read_sample_log
from streamtrain.tasks import TASKS, model_types
from streamtrain.train import checkpoint
from streamtrain.train.tracking import read_metrics
from streamtrain.train.trainer import Trainer
from tests.streamtrain.train.conftest import ROOT, by_step, streamtrain, tiny_overrides

RECIPE = ROOT / "configs" / "alignment.yaml"


def test_in_process_run_trains_evaluates_and_checkpoints(
    digits_shards: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    overrides = tiny_overrides(
        digits_shards,
        out,
        **{
            "train.max_steps": 6,
            "checkpoint.every_steps": 2,
            "checkpoint.keep_last": 2,
            "eval.every_steps": 3,
            "data.sample_log": out / "samples.jsonl",
        },
    )
    config = load_config(RECIPE, overrides, model_types())
    metrics = Trainer(config, TASKS["alignment"](config)).fit()

    assert [p.name for _, p in checkpoint.step_dirs(out)] == ["step-00000004", "step-00000006"]
    last = out / "step-00000006"
    assert checkpoint.is_complete(last)
    for name in (
        "model.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        "config.yaml",
        "trainer_state.json",
        "data/rank-00000.json",
    ):
        assert (last / name).exists(), name
    weights = load_file(last / "model.safetensors")
    assert any(key.startswith("vision_proj") for key in weights)
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 6
    assert json.loads((last / "data" / "rank-00000.json").read_text())["step"] == 6

    logged = read_metrics(out)
    train = [m for m in logged if "train/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5, 6]
    for key in (
        "train/lr",
        "train/grad_norm",
        "train/temperature",
        "train/samples_per_s",
        "train/data_wait_fraction",
        "data/samples",
    ):
        assert key in train[-1], key
    assert train[-1]["data/samples"] == 6 * 16
    evals = [m for m in logged if "image_to_text/R@1/dim32" in m]
    assert [m["step"] for m in evals] == [3, 6]
    assert metrics["eval/samples"] == 64
    assert {"image_to_text/R@10/dim16", "text_to_image/R@5/dim32", "image_to_text/chance@1"} <= set(metrics)
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["step"] in (3, 6) and (out / "best" / "model.safetensors").exists()
    assert len(read_sample_log(out / "samples.jsonl")) == 6
    assert (out / "config.yaml").exists() and (out / "final_metrics.json").exists()

    # Running again with the same max_steps finds the last checkpoint and has nothing to do.
    config = load_config(RECIPE, overrides, model_types())
    assert Trainer(config, TASKS["alignment"](config)).fit()["eval/samples"] == 64


@pytest.mark.timeout(900)  # a fresh clone JIT-builds DeepSpeed's CPU comm op first (1-4 min here)
def test_two_process_deepspeed_zero2_saves_and_resumes(
    digits_shards: dict[str, Path], clip_text_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ds"
    common = {
        "train.deepspeed": ROOT / "configs" / "deepspeed" / "zero2.json",
        # A tiny frozen text tower: what ZeRO-2 does with frozen weights, in a checkpoint of KBs.
        "model.text.kind": "clip",
        "model.text.path": clip_text_dir,
        "checkpoint.every_steps": 3,
        "eval.every_steps": 0,
        "data.sample_log": out / "s.jsonl",
    }
    first = streamtrain(
        ["train", str(RECIPE), *tiny_overrides(digits_shards, out, **common, **{"train.max_steps": 3})],
        nproc=2,
        timeout=400,
    )
    assert first.returncode == 0, first.stderr[-4000:]
    # Third-party notices (DeepSpeed's, transformers' deprecations) go to run.log, not the console.
    console = first.stdout + first.stderr
    for notice in ("Setting accelerator", "FutureWarning", "DeprecationWarning", "[WARNING]", "[INFO]"):
        assert notice not in console, console[-4000:]
    assert "DeepSpeed" in (out / "run.log").read_text() or "deepspeed" in (out / "run.log").read_text()
    step3 = out / "step-00000003"
    assert checkpoint.is_complete(step3)
    assert (step3 / "data" / "rank-00000.json").exists() and (step3 / "data" / "rank-00001.json").exists()
    assert any(path.is_dir() for path in step3.iterdir() if path.name.startswith("pytorch_model"))
    weights = load_file(step3 / "model.safetensors")  # gathered from ZeRO's partitions
    assert {"vision_proj.layers.0.weight", "logit_scale.log_scale"} <= set(weights)

    # The resumed run also evaluates at its end: held-out samples split across the two ranks and gathered.
    second = streamtrain(
        [
            "train",
            str(RECIPE),
            *tiny_overrides(digits_shards, out, **{**common, "train.max_steps": 5, "eval.every_steps": 5}),
        ],
        nproc=2,
        timeout=400,
    )
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stderr + second.stdout
    log = by_step(out / "s.jsonl")
    assert sorted(log) == [(step, rank) for step in range(1, 6) for rank in (0, 1)]
    ids = [i for ids in log.values() for i in ids]
    assert len(ids) == len(set(ids)) == 5 * 2 * 16  # no sample repeated across steps or ranks
    assert json.loads((out / "step-00000005" / "trainer_state.json").read_text())["step"] == 5
    assert json.loads((out / "final_metrics.json").read_text())["eval/samples"] == 64  # none lost or doubled


def test_bundled_recipe_learns(digits_shards: dict[str, Path], tmp_path: Path) -> None:
    """The shipped recipe, shortened: held-out image->text Recall@1 at least 5x its chance level."""
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"data.train={digits_shards['train']}",
        f"data.eval={digits_shards['eval']}",
        "train.max_steps=60",
        "train.warmup_steps=10",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
        "log.progress_bar=false",
    ]
    config = load_config(RECIPE, overrides, model_types())
    metrics = Trainer(config, TASKS["alignment"](config)).fit()
    recall, chance = metrics["image_to_text/R@1/dim128"], metrics["image_to_text/chance@1"]
    assert metrics["eval/samples"] == 297
    assert recall >= 5 * chance, metrics
    assert metrics["text_to_image/R@1/dim128"] >= 5 * metrics["text_to_image/chance@1"], metrics


def test_audio_alignment_runs(tmp_path: Path) -> None:
    from shardify.convert import ConvertOptions, convert
    from tests import factories

    for split, count in (("train", 32), ("eval", 12)):
        rows = [
            {
                "sample_id": f"{split}-{i}",
                "caption": ["a low hum", "a loud tone", "a quiet beep"][i % 3],
                "audio_bytes": factories.wav(seconds=0.2, seed=i),
            }
            for i in range(count)
        ]
        factories.write_parquet(tmp_path / f"{split}.parquet", rows)
        convert([str(tmp_path / f"{split}.parquet")], ConvertOptions(output=str(tmp_path / split)))
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"data.train={tmp_path / 'train'}",
        f"data.eval={tmp_path / 'eval'}",
        "data.audio={max_seconds: 0.5, n_mels: 32}",
        "data.num_workers=0",
        "model.vision=null",
        "model.audio={kind: small_conv, width: 16, n_mels: 32}",
        "model.loss.mrl_dims=[8,16]",
        "train.batch_size=8",
        "train.max_steps=3",
        "checkpoint.every_steps=0",
        "log.progress_bar=false",
    ]
    config = load_config(RECIPE, overrides, model_types())
    metrics = Trainer(config, TASKS["alignment"](config)).fit()
    assert metrics["eval/samples"] == 12
    assert {"audio_to_text/R@1/dim16", "text_to_audio/R@5/dim8", "audio_to_text/chance@1"} <= set(metrics)
