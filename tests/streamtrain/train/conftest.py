"""Fixtures for trainer tests: the bundled digits sample as shards, and a runner for the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shardify.convert import ConvertOptions, convert

ROOT = Path(__file__).resolve().parents[3]


def convert_sample(out: Path, name: str = "digits_caption") -> dict[str, Path]:
    """The bundled sample ``sample/<name>`` converted by shardify: {"train": dir, "eval": dir}."""
    shards = {}
    for split in ("train", "eval"):
        shards[split] = out / split
        convert(
            [str(ROOT / "sample" / name / f"{split}.parquet")],
            ConvertOptions(output=str(shards[split]), max_samples_per_shard=250),
        )
    return shards


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return convert_sample(tmp_path_factory.mktemp("digits"))


def tiny_overrides(shards: dict[str, Path], output: Path, **extra: object) -> list[str]:
    """The alignment recipe shrunk to seconds: 16 px digits, a narrow CNN, short evals."""
    values: dict[str, object] = {
        "output_dir": output,
        "data.train": shards["train"],
        "data.eval": shards["eval"],
        "data.image_size": 16,
        "data.num_workers": 1,
        "data.shuffle_buffer": 64,
        "model.vision.width": 16,
        "model.loss.mrl_dims": "[16,32]",
        "train.batch_size": 16,
        "train.warmup_steps": 2,
        "log.every_steps": 1,
        "log.progress_bar": "false",
        "eval.max_samples": 64,
        "eval.batch_size": 32,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
    }


def streamtrain(args: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``streamtrain train`` in real processes (torchrun for several), output captured."""
    if nproc == 1:
        command = [sys.executable, "-m", "streamtrain.cli", *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "streamtrain.cli",
            *args,
        ]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"streamtrain hung; output:\n{exc.stdout}\n{exc.stderr}") from None


def losses(output: Path) -> dict[int, float]:
    """Each step's train/loss from a run's metrics.jsonl."""
    from streamtrain.train.tracking import read_metrics

    return {m["step"]: m["train/loss"] for m in read_metrics(output) if "train/loss" in m}


def by_step(log: Path) -> dict[tuple[int, int], list[str]]:
    """A sample log as {(step, rank): sample_ids}."""
    from streamtrain.data.sample_log import read_sample_log

    return {(line["step"], line["rank"]): line["sample_ids"] for line in read_sample_log(log)}


def wait_for(predicate: Callable[[], bool], process: subprocess.Popen[str], timeout: float) -> None:
    """Poll ``predicate`` until true; fail if ``process`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            stderr = process.stderr.read() if process.stderr else ""
            raise AssertionError(f"run ended before the kill point:\n{stderr}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.05)
