"""The peer loaders of bench_loader: Mosaic streaming (MDS) and litdata, each on the same photos
converted to its own format, with the same decode and torchvision transform, read through its own
dataset class by a PyTorch DataLoader of the same workers and batch size.

They are optional (the ``bench`` extra of pyproject.toml). mosaicml-streaming 0.13 pins
numpy<2.2 and transformers<5, which this project's lock does not allow, but reading MDS needs
neither, so it is installed without its dependencies and the few it imports are named:

    uv pip install --python .venv/bin/python litdata==0.2.76 boto3==<botocore's version> \\
        brotli python-snappy zstd catalogue
    uv pip install --python .venv/bin/python --no-deps mosaicml-streaming==0.13.0

(``boto3`` at the version of the installed ``botocore``, which aiobotocore pins: e.g. 1.43.117.)
"""

from __future__ import annotations

import io
import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from shardify.tarread import iter_samples
from streamtrain.data.shards import resolve
from streamtrain.data.transforms import vision_transform

INSTALL = (
    "the peer loaders are not installed: see benchmarks/loader_peers.py for the two install commands "
    "(the 'bench' extra of pyproject.toml lists them), or run with --peers 0"
)


def missing() -> str | None:
    """Why the peers cannot be measured here (None: they can)."""
    try:
        import litdata  # noqa: F401
        import streaming  # noqa: F401
    except ImportError as exc:
        return f"{INSTALL} ({exc})"
    return None


def _raw(shards: str) -> Iterator[dict[str, Any]]:
    for shard in resolve(shards).shards:
        yield from iter_samples(shard.url)


def to_mds(shards: str, out: Path) -> str:
    """The photos as Mosaic's MDS shards (JPEG bytes and caption, uncompressed like the tars)."""
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"jpg": "bytes", "txt": "str"}, size_limit="64mb") as writer:
        for raw in _raw(shards):
            writer.write({"jpg": raw["jpg"], "txt": raw["txt"].decode()})
    return str(out)


def to_litdata(shards: str, out: Path) -> str:
    """The photos as litdata's chunks (JPEG bytes and caption), written by its own writer."""
    from litdata.streaming.writer import BinaryWriter

    out.mkdir(parents=True, exist_ok=True)
    writer = BinaryWriter(str(out), chunk_bytes="64MB")
    for index, raw in enumerate(_raw(shards)):
        writer.add_item(index, {"jpg": raw["jpg"], "txt": raw["txt"].decode()})
    writer.done()
    writer.merge()
    return str(out)


def _photo(data: bytes) -> Image.Image:
    """What webdataset's ``decode("pil")`` does with a JPEG."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([image for image, _ in items]), [text for _, text in items]


def _epochs(loader: DataLoader) -> Iterator[Any]:
    """Batches over epoch after epoch (each peer's own epoch end, persistent workers)."""
    for _ in itertools.count():
        yield from loader


def _transformed(sample: dict[str, Any]) -> tuple[torch.Tensor, str]:
    global _TRANSFORM
    if _TRANSFORM is None:
        _TRANSFORM = vision_transform(224, train=True)
    return _TRANSFORM(_photo(sample["jpg"])), sample["txt"]


_TRANSFORM: Any = None


def mosaic_batches(folder: str, workers: int, batch: int) -> Iterator[Any]:
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    dataset = _mosaic_class()(local=folder, shuffle=True, shuffle_seed=0, batch_size=batch)
    loader = DataLoader(
        dataset, batch_size=batch, num_workers=workers, collate_fn=_collate, persistent_workers=True
    )
    return _epochs(loader)


def litdata_batches(folder: str, workers: int, batch: int) -> Iterator[Any]:
    from litdata import StreamingDataLoader

    dataset = _litdata_class()(folder, shuffle=True, seed=0)
    loader = StreamingDataLoader(
        dataset, batch_size=batch, num_workers=workers, collate_fn=_collate, persistent_workers=True
    )
    return _epochs(loader)


def _mosaic_class() -> type:
    from streaming import StreamingDataset

    global MosaicPhotos

    class MosaicPhotos(StreamingDataset):  # type: ignore[no-redef]
        """Decoded and transformed photos from MDS (module level: workers may be spawned)."""

        def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
            return _transformed(super().__getitem__(index))

    MosaicPhotos.__qualname__ = "MosaicPhotos"
    return MosaicPhotos


def _litdata_class() -> type:
    from litdata import StreamingDataset

    global LitdataPhotos

    class LitdataPhotos(StreamingDataset):  # type: ignore[no-redef]
        """Decoded and transformed photos from litdata's chunks."""

        def __getitem__(self, index: Any) -> tuple[torch.Tensor, str]:
            return _transformed(super().__getitem__(index))

    LitdataPhotos.__qualname__ = "LitdataPhotos"
    return LitdataPhotos


MosaicPhotos: Any = None
LitdataPhotos: Any = None


def remove(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
