"""Images decoded on the training device, run here with device="cpu" through the same code: the
parameters equal vision_transform's draws, the device path matches the CPU path within resize
tolerance, mixed and undecodable batches, and exact resume in bytes-only mode."""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shardify.convert import ConvertOptions, convert
from streamtrain.config import DataConfig, EvalConfig
from streamtrain.data.collate import collate_alignment, collate_vlm
from streamtrain.data.dataset import Dataset
from streamtrain.data.decoders import CaptionDecoder, ChatDecoder
from streamtrain.data.device_decode import EncodedImages, finish_batch
from streamtrain.data.handover import Packed
from streamtrain.data.images import KIND_JPEG, KIND_PIXELS, Encoded, ImageTransform, encode_for_device
from streamtrain.data.pipeline import decode_device, held_out_reader, resolve_sources, train_loader
from streamtrain.data.transforms import CLIP_STD, decode_image, vision_transform
from streamtrain.errors import UserError
from tests import factories

STD = torch.tensor(CLIP_STD).view(-1, 3, 1, 1)


def pixel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two normalised batches, in [0, 1] pixel units."""
    return float(((a - b) * STD).abs().mean())


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    return factories.encode(factories.photo(1024, 768, seed=3), "JPEG", quality=90)


def seeded(seed: int, make, *args):
    torch.manual_seed(seed)
    return make(*args)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [(1024, 768), (300, 500), (230, 240), (640, 100)])
def test_parameters_are_vision_transforms_draws(train: bool, size: tuple[int, int]) -> None:
    data = factories.jpeg(*size, seed=1)
    for flip in (True, False):
        ours = ImageTransform(32 if size[1] == 100 else 224, train, horizontal_flip=flip)
        theirs = vision_transform(ours.size, train, horizontal_flip=flip)
        image = decode_image(data, ours.size)
        for seed in range(4):
            expected = seeded(seed, theirs, image)
            after_theirs = torch.rand(1)
            got = seeded(seed, ours, image)
            assert torch.equal(got, expected)
            assert torch.equal(torch.rand(1), after_theirs)  # the same draws, no more, no fewer


@pytest.mark.parametrize("train", [True, False])
def test_device_path_matches_the_cpu_path_within_resize_tolerance(photo_jpeg: bytes, train: bool) -> None:
    transform = ImageTransform(224, train)
    cpu = torch.stack([seeded(s, transform, decode_image(photo_jpeg, 224)) for s in range(6)])
    encoded = [seeded(s, encode_for_device, photo_jpeg, transform) for s in range(6)]
    assert all(int(e.params[0]) == KIND_JPEG for e in encoded)
    images, kept, fallbacks = EncodedImages.of(encoded).decode("cpu")
    assert images is not None and images.shape == (6, 3, 224, 224) and images.dtype == torch.float32
    assert kept == list(range(6)) and fallbacks == 0
    # Measured: 0.0053 (train, colour jitter on float vs Pillow's 8-bit steps), 0.0019 (eval);
    # full-scale decode + antialiased resize against 1/2-scale DCT decode + Pillow resize.
    assert pixel_gap(images, cpu) < (0.008 if train else 0.004)
    # Same crops and flips: each device image is far closer to its own CPU twin than to the others.
    if train:
        for row in range(6):
            gaps = [pixel_gap(images[row : row + 1], cpu[other : other + 1]) for other in range(6)]
            assert min(gaps) == gaps[row]


def test_every_kind_of_image_joins_one_batch() -> None:
    unusual = factories.unusual_images()
    names = ["grayscale_jpg", "cmyk_jpg", "palette_png", "rgba_png", "png_16bit", "gif", "bmp", "tiff"]
    names += ["webp", "exif_rotated_jpg", "progressive_jpg"]
    transform = ImageTransform(16, train=False)
    encoded = [encode_for_device(unusual[name], transform) for name in names]
    kinds = {name: int(e.params[0]) for name, e in zip(names, encoded, strict=True)}
    on_device = {name for name, kind in kinds.items() if kind == KIND_JPEG}
    assert on_device == {"grayscale_jpg", "exif_rotated_jpg"}  # the rest: decoded by the worker
    assert all(kinds[name] == KIND_PIXELS for name in set(names) - on_device)
    images, kept, _ = EncodedImages.of(encoded).decode("cpu")
    assert images is not None and kept == list(range(len(names)))
    cpu = torch.stack([transform(decode_image(unusual[name], 16)) for name in names])
    for row, name in enumerate(names):
        assert pixel_gap(images[row : row + 1], cpu[row : row + 1]) < 0.03, name


def test_exif_orientation_is_applied_on_the_device() -> None:
    base = factories.photo(96, 48, seed=5)
    transform = ImageTransform(48, train=False)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = factories.encode(base, "JPEG", quality=95, exif=exif)
        encoded = encode_for_device(data, transform)
        assert int(encoded.params[1]) == orientation
        images, _, _ = EncodedImages.of([encoded]).decode("cpu")
        expected = transform(decode_image(data, 48)).unsqueeze(0)
        assert pixel_gap(images, expected) < 0.02, orientation


def test_an_image_no_decoder_reads_is_dropped_with_its_row(photo_jpeg: bytes) -> None:
    good = factories.jpeg(64, 48, seed=1)
    truncated = good[: len(good) // 2]  # its header reads: the worker passes it on as a JPEG
    decoder = CaptionDecoder(image_size=16, train=False, on_device=True)
    samples = []
    for i, data in enumerate([good, truncated, good]):
        raw = {"__key__": f"k{i}", "jpg": data, "txt": f"caption {i}".encode()}
        samples.append(decoder(raw, random.Random(0)))
    batch = collate_alignment(samples)
    assert isinstance(batch["image"], EncodedImages)
    finished, counts = finish_batch(batch, "cpu")
    assert counts == {"decode_errors": 1, "samples": -1}
    assert finished["sample_ids"] == ["k0", "k2"] and finished["texts"] == ["caption 0", "caption 2"]
    assert finished["image"].shape == (2, 3, 16, 16)
    nothing, counts = finish_batch(collate_alignment(samples[1:2]), "cpu")
    assert nothing is None and counts["decode_errors"] == 1


def test_a_file_the_device_refuses_is_decoded_on_the_cpu() -> None:
    """A file passed on as a JPEG that the device decoder refuses (here: a PNG under a JPEG's
    kind) is read by Pillow in the main process and counted."""
    transform = ImageTransform(16, train=False)
    png = factories.encode(factories.photo(40, 30, seed=2), "PNG")
    honest = encode_for_device(png, transform)
    jpeg_like = Encoded(
        torch.frombuffer(bytearray(png), dtype=torch.uint8),
        honest.params.clone().index_fill_(0, torch.tensor([0]), KIND_JPEG),
    )
    images, kept, fallbacks = EncodedImages.of(
        [jpeg_like, encode_for_device(factories.jpeg(), transform)]
    ).decode("cpu")
    assert kept == [0, 1] and fallbacks == 1
    expected = transform(decode_image(png, 16)).unsqueeze(0)
    assert pixel_gap(images[:1], expected) < 0.02


def test_vlm_batches_decode_on_the_device_too(qwen2_tokenizer) -> None:
    decoder = ChatDecoder(qwen2_tokenizer, image_size=16, train=True, vision_tokens=4, on_device=True)
    raws = [
        {
            "__key__": f"q{i}",
            "jpg": factories.jpeg(40, 30, seed=i),
            "json": b'{"question": "what?", "answer": "this"}',
        }
        for i in range(3)
    ]
    batch = collate_vlm([decoder(raw, random.Random(0)) for raw in raws], qwen2_tokenizer.pad_token_id, 4)
    finished, counts = finish_batch(batch, "cpu")
    assert counts == {} and finished["image"].shape == (3, 3, 16, 16)
    assert finished["input_ids"].shape[0] == 3


def test_ragged_fields_travel_in_one_tensor() -> None:
    samples = [
        (slot, {"image_data": torch.arange(n, dtype=torch.uint8), "id": slot}) for slot, n in [(0, 3), (2, 5)]
    ]
    packed = Packed.of([*samples, (1, None)], in_worker=False, ring=None, step=1)
    assert set(packed.stacked) == {"image_data"} and packed.stacked["image_data"].shape == (8,)
    back = packed.items(None, 1)
    assert [slot for slot, _ in back] == [0, 2]
    assert [sample["image_data"].tolist() for _, sample in back] == [[0, 1, 2], [0, 1, 2, 3, 4]]


def test_auto_decodes_on_a_gpu_only_when_the_images_are_mostly_jpeg() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    jpegs = Dataset((), "caption", media=Counter({"jpg": 9, "png": 1}))
    pngs = Dataset((), "caption", media=Counter({"jpg": 1, "png": 9, "wav": 50}))
    unknown = Dataset((), "caption")
    auto = DataConfig(train="x")
    assert decode_device(auto, cuda, jpegs) == cuda and decode_device(auto, cuda, unknown) == cuda
    assert decode_device(auto, cuda, pngs) is None and decode_device(auto, cpu, jpegs) is None
    assert decode_device(DataConfig(train="x", decode_device="cpu"), cuda, jpegs) is None
    assert decode_device(DataConfig(train="x", decode_device="cuda"), cuda, pngs) == cuda
    with pytest.raises(UserError, match="decode_device is cuda, but training runs on cpu"):
        decode_device(DataConfig(train="x", decode_device="cuda"), cpu, jpegs)


# -- the loader in bytes-only mode ------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("device")
    rows = factories.caption_rows(40, size=(96, 64))
    rows[5]["image_bytes"] = factories.encode(factories.photo(96, 64, seed=5), "PNG")
    factories.write_parquet(folder / "rows.parquet", rows)
    convert(
        [str(folder / "rows.parquet")], ConvertOptions(output=str(folder / "out"), max_samples_per_shard=8)
    )
    return folder / "out"


def _loader(shards: Path, on_device: bool, workers: int = 0, batch: int = 4):
    data = DataConfig(train=str(shards), num_workers=workers, shuffle_buffer=8)
    dataset = resolve_sources(str(shards))
    assert dataset.media == {"jpg": 39, "png": 1}
    return train_loader(
        data,
        dataset,
        rank=0,
        world_size=1,
        batch_size=batch,
        seed=3,
        decode=CaptionDecoder(image_size=32, train=True, on_device=on_device),
        collate=collate_alignment,
        decode_device=torch.device("cpu") if on_device else None,
    )


def _take(loader, steps: int) -> list[dict]:
    return [next(loader) for _ in range(steps)]


def test_bytes_only_loader_gives_the_cpu_paths_batches_and_resumes_exactly(jpeg_shards: Path) -> None:
    cpu_loader = _loader(jpeg_shards, on_device=False)
    on_cpu = _take(cpu_loader, 14)  # crosses the 10-step epoch
    cpu_loader.shutdown()
    device_loader = _loader(jpeg_shards, on_device=True, workers=2)
    first = _take(device_loader, 6)
    state = device_loader.state_dict()
    # Steps prepared ahead (in the decode thread) are neither in the position nor in the counts.
    assert state["step"] == 6 and state["read_stats"]["samples"] == 6 * 4
    device_loader.shutdown()
    resumed = _loader(jpeg_shards, on_device=True, workers=1)
    resumed.load_state_dict(state)
    rest = _take(resumed, 8)
    resumed.shutdown()
    for expected, got in zip(on_cpu, first + rest, strict=True):
        assert got["sample_ids"] == expected["sample_ids"] and got["texts"] == expected["texts"]
        assert pixel_gap(got["image"], expected["image"]) < 0.02
    again = _loader(jpeg_shards, on_device=True, workers=2)
    for expected, got in zip(first + rest, _take(again, 14), strict=True):
        assert torch.equal(got["image"], expected["image"])  # no randomness on the device side
    again.shutdown()


def test_the_worker_hands_over_bytes_not_pixels(photo_jpeg: bytes) -> None:
    raw = {"__key__": "k", "jpg": photo_jpeg, "txt": b"a photo"}
    sample = CaptionDecoder(image_size=224, train=True, on_device=True)(raw, random.Random(0))
    assert "image" not in sample and sample["image_data"].dtype == torch.uint8
    assert bytes(sample["image_data"].numpy()) == photo_jpeg
    header = Image.open(io.BytesIO(photo_jpeg))
    assert header.size == (1024, 768) and np.isfinite(sample["image_params"].numpy()).all()


def test_held_out_batches_decode_on_the_device_with_the_eval_transform(jpeg_shards: Path) -> None:
    data = DataConfig(train=str(jpeg_shards), num_workers=1)
    dataset = resolve_sources(str(jpeg_shards))
    passes = {}
    for on_device in (False, True):
        reader = held_out_reader(
            data,
            EvalConfig(batch_size=8),
            dataset,
            rank=0,
            world_size=1,
            decode=CaptionDecoder(image_size=32, train=False, on_device=on_device),
            collate=collate_alignment,
            decode_device=torch.device("cpu") if on_device else None,
        )
        with reader:
            passes[on_device] = list(reader.batches())
    assert len(passes[True]) == len(passes[False]) == 5
    for (expected, _), (got, counts) in zip(passes[False], passes[True], strict=True):
        assert got["sample_ids"] == expected["sample_ids"] and counts["samples"] == 8
        assert pixel_gap(got["image"], expected["image"]) < 0.01
