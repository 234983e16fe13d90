"""The step ring (ring.py, handover.py): steps handed over through it equal those read in process,
micro-batches are views of it, samples that do not fit still arrive, slots wait to be released,
and the ring's file goes with the loader."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from shardify.convert import ConvertOptions, convert
from streamtrain.config import DataConfig, SourceSpec
from streamtrain.data.collate import collate_alignment, stack
from streamtrain.data.decoders import CaptionDecoder
from streamtrain.data.handover import Packed, step_order, step_rows
from streamtrain.data.pipeline import resolve_sources, train_loader
from streamtrain.data.ring import RingControl, RingLayout, RingWriter, StepRing
from tests import factories


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ring")
    outputs = []
    for name, count, size in (("a", 48, (40, 30)), ("b", 20, (24, 36))):
        rows = factories.caption_rows(count, size=size)
        for row in rows:
            row["sample_id"] = f"{name}-{row['sample_id']}"
        factories.write_parquet(folder / f"{name}.parquet", rows)
        convert(
            [str(folder / f"{name}.parquet")],
            ConvertOptions(output=str(folder / name), max_samples_per_shard=10),
        )
        outputs.append(folder / name)
    return outputs[0], outputs[1]


def _loader(train, workers: int, on_device: bool = False):
    data = DataConfig(train=train, num_workers=workers, shuffle_buffer=8)
    return train_loader(
        data,
        resolve_sources(train),
        rank=0,
        world_size=1,
        batch_size=4,
        seed=0,
        decode=CaptionDecoder(image_size=16, train=True, on_device=on_device),
        collate=collate_alignment,
        batches_per_step=2,
        decode_device=torch.device("cpu") if on_device else None,
    )


def _batches(loader, count: int) -> list[dict]:
    """``count`` batches, copied (a batch kept past the next step must be: ring.py)."""
    out = []
    for _ in range(count):
        batch = next(loader)
        out.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return out


@pytest.mark.parametrize("on_device", [False, True], ids=["decoded", "bytes-only"])
def test_steps_through_the_ring_equal_those_read_in_process(photos, on_device: bool) -> None:
    a, b = photos
    mixture = [SourceSpec(path=str(a), weight=2, name="a"), SourceSpec(path=str(b), weight=1, name="b")]
    in_process = _loader(mixture, 0, on_device)
    expected = _batches(in_process, 24)  # 12 steps: past the first epoch of b
    in_process.shutdown()
    loader = _loader(mixture, 2, on_device)
    got = _batches(loader, 23)
    last = next(loader)
    ring = loader._ring
    assert ring is not None and ring.path.exists()  # open through the loader's descriptor ...
    assert not list(Path("/dev/shm").glob(f"streamtrain-ring-{os.getpid()}-*"))  # ... its name gone
    if not on_device:  # the micro-batch is rows of the ring, not a copy
        start = ring.memory.data_ptr()
        assert start <= last["image"].data_ptr() < start + ring.memory.numel()
    got.append(last)
    loader.shutdown()
    for want, have in zip(expected, got, strict=True):
        assert want["sample_ids"] == have["sample_ids"]
        assert torch.equal(want["image"], have["image"])


def _sample(n_bytes: int, value: int = 1) -> dict:
    return {
        "sample_id": f"s{n_bytes}",
        "image_data": torch.full((n_bytes,), value, dtype=torch.uint8),
        "image_params": torch.full((15,), float(value), dtype=torch.float64),
    }


def test_a_sample_larger_than_its_slot_or_of_another_shape_still_arrives(tmp_path: Path) -> None:
    control = RingControl()
    layout = RingLayout.of([_sample(1000), _sample(3000)], rows=4, slots=3)
    assert layout is not None and [f.name for f in layout.fields] == ["image_data", "image_params"]
    assert layout.fields[0].ragged and layout.fields[0].shape == (8192,)  # twice the longest, in 4 KiB
    ring = StepRing.create(layout, control, pin=False)
    writer = RingWriter(control)
    worker_side = writer.current()
    assert worker_side is not None and worker_side.generation == ring.generation == 1
    odd = {**_sample(100, 3), "image_params": torch.zeros(7, dtype=torch.float64)}
    placed = [(2, _sample(500, 5)), (0, _sample(20_000, 7)), (1, None), (3, odd)]
    packed = Packed.of(placed, in_worker=False, ring=worker_side, step=5)
    assert packed.in_ring == [
        {"image_data": 500, "image_params": -1},
        {"image_params": -1},  # 20,000 bytes do not fit 8,192: gathered the ordinary way
        {"image_data": 100},  # params of another shape: gathered
    ]
    back = dict(packed.items(ring, 5))
    assert sorted(back) == [0, 2, 3]
    for row, want in ((2, _sample(500, 5)), (0, _sample(20_000, 7)), (3, odd)):
        assert back[row]["sample_id"] == want["sample_id"]
        assert torch.equal(back[row]["image_data"], want["image_data"])
        assert torch.equal(back[row]["image_params"], want["image_params"])
    ring.close()


def test_consecutive_rows_stack_as_a_view_and_anything_else_as_a_copy() -> None:
    rows = torch.randn(6, 15, dtype=torch.float64)[:, :13]  # rows with a gap between them
    view = stack(list(rows[1:4]))
    assert view.data_ptr() == rows[1].data_ptr() and torch.equal(view, rows[1:4])
    shuffled = stack([rows[3], rows[1]])
    assert shuffled.data_ptr() not in (rows[3].data_ptr(), rows[1].data_ptr())
    assert torch.equal(shuffled, torch.stack([rows[3], rows[1]]))
    assert torch.equal(stack([rows[2], rows[2]]), torch.stack([rows[2], rows[2]]))  # never overlapping


def test_a_worker_waits_for_its_slot_until_the_step_is_released() -> None:
    control = RingControl()
    ring = StepRing.create(RingLayout.of([_sample(10)], rows=2, slots=3), control, pin=False)
    writer = RingWriter(control)
    control.release(4)
    assert writer.wait_for_slot(ring, 7)  # slot of step 4, released
    released = threading.Timer(0.05, control.release, args=(5,))
    began = time.monotonic()
    released.start()
    assert writer.wait_for_slot(ring, 8) and time.monotonic() - began >= 0.04
    threading.Timer(0.05, control.stop).start()
    assert not writer.wait_for_slot(ring, 20)  # the loader stopping ends the wait
    ring.close()


def test_rows_are_the_places_of_the_shuffled_step() -> None:
    order = step_order(3, 17, 1, 12)
    rows = step_rows(3, 17, 1, 12)
    assert sorted(order) == list(range(12)) and [order[rows[slot]] for slot in range(12)] == list(range(12))


def test_without_room_for_the_ring_steps_come_the_ordinary_way(photos, monkeypatch, caplog) -> None:
    a, _ = photos

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("streamtrain.data.ring.os.posix_fallocate", full)
    in_process = _loader(str(a), 0)
    expected = _batches(in_process, 8)
    in_process.shutdown()
    loader = _loader(str(a), 2)
    got = _batches(loader, 8)
    assert loader._ring is None and "no room for the loader's step ring" in caplog.text
    loader.shutdown()
    assert all(torch.equal(w["image"], h["image"]) for w, h in zip(expected, got, strict=True))
