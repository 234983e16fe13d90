"""The step ring pinned for a GPU: its micro-batches are page-locked views, copied to the device
asynchronously and equal to the batches read in process (not yet run on a GPU: see the report)."""

from __future__ import annotations

import pytest
import torch

from shardify.convert import ConvertOptions, convert
from streamtrain.config import DataConfig
from streamtrain.data.collate import collate_alignment
from streamtrain.data.decoders import CaptionDecoder
from streamtrain.data.pipeline import resolve_sources, train_loader
from tests import factories

pytestmark = pytest.mark.gpu


def test_the_ring_is_pinned_and_its_batches_reach_the_gpu_intact(tmp_path) -> None:
    factories.write_parquet(tmp_path / "p.parquet", factories.caption_rows(64, size=(40, 30)))
    convert(
        [str(tmp_path / "p.parquet")], ConvertOptions(output=str(tmp_path / "s"), max_samples_per_shard=16)
    )
    batches = {}
    for workers in (0, 2):
        data = DataConfig(train=str(tmp_path / "s"), num_workers=workers, shuffle_buffer=8)
        loader = train_loader(
            data,
            resolve_sources(data.train),
            rank=0,
            world_size=1,
            batch_size=8,
            seed=0,
            decode=CaptionDecoder(image_size=32, train=True),
            collate=collate_alignment,
            pin_memory=True,
        )
        on_device = []
        for _ in range(12):
            batch = next(loader)
            if workers:
                assert batch["image"].is_pinned()
            on_device.append(batch["image"].to("cuda", non_blocking=True))
            torch.cuda.synchronize()
        if workers:
            assert loader._ring is not None and loader._ring.pinned
        loader.shutdown()
        batches[workers] = [image.cpu() for image in on_device]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))
