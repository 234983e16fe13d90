"""Images decoded on the GPU (data.decode_device: cuda): nvJPEG output against the CPU path, a
mixed batch, both loader paths side by side onto the GPU, batched decode rate, and the data wait
of a short alignment run with each path.

Figures are printed and, when $OUT is set, written to $OUT/gpu_device_decode.json.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from shardify.convert import ConvertOptions, convert
from streamtrain.config import DataConfig, load_config
from streamtrain.data.collate import collate_alignment
from streamtrain.data.decoders import CaptionDecoder
from streamtrain.data.device_decode import EncodedImages, finish_batch
from streamtrain.data.images import ImageTransform, encode_for_device
from streamtrain.data.pipeline import resolve_sources, train_loader
from streamtrain.data.transforms import CLIP_STD, decode_image
from streamtrain.tasks import TASKS, model_types
from streamtrain.train.tracking import read_metrics
from streamtrain.train.trainer import Trainer
from tests import factories
from tests.gpu.test_alignment_gpu import RECIPE, overrides, setup  # noqa: F401 - the fixture

pytestmark = pytest.mark.gpu
RESULTS: dict[str, object] = {}
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def pixel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.cpu() - b.cpu()) * STD).abs().mean())


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 samples of 32 distinct 1024x768 photo-like JPEGs, as shardify shards."""
    folder = tmp_path_factory.mktemp("photos")
    images = [factories.encode(factories.photo(1024, 768, seed=s), "JPEG", quality=90) for s in range(32)]
    rows = [
        {"sample_id": f"p{i:04d}", "caption": f"photo {i % 32}", "image_bytes": images[i % 32]}
        for i in range(512)
    ]
    factories.write_parquet(folder / "photos.parquet", rows)
    convert(
        [str(folder / "photos.parquet")], ConvertOptions(output=str(folder / "out"), max_samples_per_shard=64)
    )
    return folder / "out"


def test_nvjpeg_matches_the_cpu_path() -> None:
    data = factories.encode(factories.photo(1024, 768, seed=1), "JPEG", quality=90)
    gaps = {}
    for train in (True, False):
        transform = ImageTransform(224, train)
        cpu, encoded = [], []
        for seed in range(8):
            torch.manual_seed(seed)
            cpu.append(transform(decode_image(data, 224)))
            torch.manual_seed(seed)
            encoded.append(encode_for_device(data, transform))
        images, kept, fallbacks = EncodedImages.of(encoded).decode("cuda")
        assert images is not None and images.is_cuda and kept == list(range(8)) and fallbacks == 0
        gaps["train" if train else "eval"] = pixel_gap(images, torch.stack(cpu))
    RESULTS["mean_abs_difference_0_1"] = gaps
    print(f"nvJPEG path vs CPU path, mean |difference| in [0, 1] pixel units: {gaps}")
    assert gaps["train"] < 0.01 and gaps["eval"] < 0.006
    _write()


def test_a_mixed_batch_decodes_on_the_gpu() -> None:
    unusual = factories.unusual_images()
    transform = ImageTransform(16, train=False)
    names = sorted(unusual)
    encoded = [encode_for_device(unusual[name], transform) for name in names]
    images, kept, fallbacks = EncodedImages.of(encoded).decode("cuda")
    assert images is not None and kept == list(range(len(names)))
    cpu = torch.stack([transform(decode_image(unusual[name], 16)) for name in names])
    for row, name in enumerate(names):
        assert pixel_gap(images[row : row + 1], cpu[row : row + 1]) < 0.03, name
    RESULTS["mixed_batch_fallbacks"] = fallbacks


def test_batched_decode_rate_on_the_gpu() -> None:
    """1024x768 JPEGs -> 224 px train transform, decoded and augmented on the GPU, 256 per call."""
    files = [factories.encode(factories.photo(1024, 768, seed=s), "JPEG", quality=90) for s in range(32)]
    transform = ImageTransform(224, train=True)
    batches = [
        collate_alignment(
            [
                {"sample_id": str(i), "text": "", **_fields(encode_for_device(files[i % 32], transform))}
                for i in range(256)
            ]
        )
        for _ in range(4)
    ]
    finish_batch(batches[0], "cuda")  # nvJPEG handles, CUDA context
    torch.cuda.synchronize()
    started, images = time.perf_counter(), 0
    for _ in range(5):
        for batch in batches:
            finished, _ = finish_batch(batch, "cuda")
            images += finished["image"].shape[0]
    torch.cuda.synchronize()
    rate = images / (time.perf_counter() - started)
    assert images == 5 * 4 * 256 and finished["image"].is_cuda
    assert finished["image"].shape == (256, 3, 224, 224) and torch.isfinite(finished["image"]).all()
    RESULTS["gpu_decode_images_per_s"] = rate
    print(f"batched GPU decode + augment: {rate:,.0f} images/s (goal >= 8,000)")
    _write()


def _fields(encoded) -> dict:
    return {"image_data": encoded.data, "image_params": encoded.params}


def test_both_loader_paths_onto_the_gpu(photos: Path) -> None:
    workers = min(8, os.cpu_count() or 1)
    figures = {}
    for name, on_device in (("cpu_decode", False), ("gpu_decode", True)):
        data = DataConfig(train=str(photos), num_workers=workers, shuffle_buffer=256)
        loader = train_loader(
            data,
            resolve_sources(data.train),
            rank=0,
            world_size=1,
            batch_size=64,
            seed=0,
            decode=CaptionDecoder(image_size=224, train=True, on_device=on_device),
            collate=collate_alignment,
            pin_memory=True,
            decode_device=torch.device("cuda") if on_device else None,
        )
        for _ in range(workers):
            next(loader)
        started, samples = time.perf_counter(), 0
        for _ in range(40):
            image = next(loader)["image"].to("cuda", non_blocking=True)
            samples += image.shape[0]
        torch.cuda.synchronize()
        figures[name] = samples / (time.perf_counter() - started)
        loader.close()
        assert image.is_cuda and image.shape[1:] == (3, 224, 224)
    RESULTS["loader_to_gpu"] = {"workers": workers, **figures}
    print(f"loader -> GPU at 224 px, {workers} workers: {figures}")
    _write()


def test_data_wait_of_a_short_alignment_run(setup, photos: Path, tmp_path: Path) -> None:  # noqa: F811
    waits = {}
    for mode in ("cpu", "cuda"):
        extra = {
            "data.train": photos,
            "data.eval": "null",
            "data.decode_device": mode,
            "data.image_size": 224,
            "data.num_workers": min(8, os.cpu_count() or 1),
            "train.batch_size": 64,
            "train.max_steps": 40,
            "eval.every_steps": 0,
            "checkpoint.every_steps": 0,
        }
        config = load_config(RECIPE, overrides(setup, tmp_path / mode, **extra), model_types())
        trainer = Trainer(config, TASKS["alignment"](config))
        trainer.fit()
        assert (trainer.decode_on is not None) == (mode == "cuda")
        rows = [m for m in read_metrics(tmp_path / mode) if "train/data_wait_fraction" in m]
        assert [m["step"] for m in rows] == list(range(1, 41))
        assert all(math.isfinite(m["train/loss"]) for m in rows) and rows[-1]["data/samples"] > 0
        waits[mode] = sum(m["train/data_wait_fraction"] for m in rows[5:]) / max(1, len(rows[5:]))
    RESULTS["alignment_data_wait_fraction"] = waits
    print(f"alignment data wait (fraction of step time, after warm-up): {waits} (goal for cuda < 0.02)")
    _write()


def _write() -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_device_decode.json").write_text(json.dumps(RESULTS, indent=2, default=float))
