"""What the trainer asks of the data layer: resolved sources, a training loader, held-out batches.

The trainer knows a rank, a world size and a task's decode/collate; everything about shards,
plans, workers and retries stays behind these three calls.
"""

from __future__ import annotations

from collections import Counter

import torch

from shardify.bytestream import RetryPolicy
from shardify.format import IMAGE_EXTENSIONS
from streamtrain.config import DataConfig, EvalConfig, SourceSpec, source_name
from streamtrain.config.sections import cache_limit_bytes
from streamtrain.config.weights import schedule
from streamtrain.data.counts import Collate, Decode
from streamtrain.data.dataset import Dataset, Source
from streamtrain.data.elastic import ElasticStream, Layout, StreamConfig
from streamtrain.data.eval import EvalReader, EvalStream
from streamtrain.data.loader import ElasticLoader
from streamtrain.data.remote import RemoteReads
from streamtrain.data.sample_log import SampleLog
from streamtrain.data.shards import DataSourceError, resolve
from streamtrain.errors import UserError

IMAGE_MEMBERS = {*IMAGE_EXTENSIONS.values(), "jpeg"}


def resolve_sources(sources: str | list[str | SourceSpec], key: str = "data.train") -> Dataset:
    """The shards config key ``key`` names, with exact counts; DataSourceError naming ``key`` if not.

    Plain entries are sources laid end to end; ``{path, weight, name}`` entries are the named
    sources of a mixture (weighted under ``data.train``).
    """
    if not isinstance(sources, list) or not any(isinstance(item, SourceSpec) for item in sources):
        try:
            return resolve(sources)  # type: ignore[arg-type]
        except DataSourceError as exc:
            raise DataSourceError(f"{key}: {exc}") from None
    found = []
    for i, spec in enumerate(sources):
        assert isinstance(spec, SourceSpec)  # config load refuses plain entries among mappings
        try:
            part = resolve(spec.path)
        except DataSourceError as exc:
            raise DataSourceError(f"{key}[{i}].path: {exc}") from None
        weight = schedule(spec.weight) if key == "data.train" else None
        found.append((Source(source_name(spec), part.shards, weight), part.schema, part.media))
    listed = Counter(shard.url for source, _, _ in found for shard in source.shards)
    duplicated = sorted(url for url, n in listed.items() if n > 1)
    if duplicated:
        raise DataSourceError(f"{key}: shards listed in more than one source: {', '.join(duplicated[:5])}")
    schemas = {schema for _, schema, _ in found}
    schema = schemas.pop() if len(schemas) == 1 else "mixed"
    media = sum((part for _, _, part in found), Counter())
    return Dataset(tuple(source for source, _, _ in found), schema, named=True, media=media)


def train_loader(
    data: DataConfig,
    dataset: Dataset,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    decode: Decode,
    collate: Collate,
    batches_per_step: int = 1,
    pin_memory: bool = False,
    decode_device: torch.device | None = None,
) -> ElasticLoader:
    """This rank's endless batches of ``dataset``, resumable on any topology (PlanError when
    the data cannot give every rank a step)."""
    sources = dataset.sources if dataset.mixture else (Source("train", dataset.shards),)
    layout = Layout(sources, seed, world_size, batch_size * batches_per_step, data.shuffle_buffer)
    settings = StreamConfig(
        seed=seed, shuffle_buffer=data.shuffle_buffer, max_member_bytes=_member_bytes(data)
    )
    stream = ElasticStream(
        layout, rank, data.num_workers, decode, settings, retry_policy(data), remote_reads(data)
    )
    sample_log = SampleLog(data.sample_log, rank) if data.sample_log else None

    return ElasticLoader(
        stream,
        collate,
        batch_size,
        batches_per_step,
        prefetch_factor=data.prefetch_factor,
        pin_memory=pin_memory,
        sample_log=sample_log,
        decode_device=decode_device,
    )


def held_out_reader(
    data: DataConfig,
    settings: EvalConfig,
    dataset: Dataset,
    *,
    rank: int,
    world_size: int,
    decode: Decode,
    collate: Collate,
    decode_device: torch.device | None = None,
) -> EvalReader:
    """This rank's reader of ``dataset`` and its named parts (``eval_parts``), its loader workers
    started now; images the decoder left undecoded are decoded on ``decode_device`` (default: the
    CPU). Close it when the run ends."""
    stream = EvalStream(
        dataset,
        rank,
        world_size,
        settings.batch_size,
        decode,
        collate,
        max_samples=settings.max_samples,
        retry=retry_policy(data),
        max_member_bytes=_member_bytes(data),
    )
    return EvalReader(stream, data.num_workers, decode_device)


def decode_device(data: DataConfig, device: torch.device, dataset: Dataset) -> torch.device | None:
    """Where training decodes images: None for the loader workers' CPUs, else the device that
    decodes whole batches in the main process (``data.decode_device``; ``auto``: the training
    device when it is a GPU and most images of ``dataset`` are JPEG, or its manifests do not say)."""
    if data.decode_device == "cpu":
        return None
    if data.decode_device == "cuda":
        if device.type != "cuda":
            raise UserError(
                f"data.decode_device is cuda, but training runs on {device.type}: "
                "use data.decode_device=auto (or cpu)"
            )
        return device
    images = {ext: n for ext, n in dataset.media.items() if ext in IMAGE_MEMBERS}
    jpeg = images.get("jpg", 0) + images.get("jpeg", 0)
    mostly_jpeg = not images or jpeg * 2 >= sum(images.values())
    return device if device.type == "cuda" and mostly_jpeg else None


def remote_reads(data: DataConfig) -> RemoteReads:
    """How workers read remote shards: ``data.read_ahead_mb``, ``data.cache_dir``, ``data.cache_limit``."""
    return RemoteReads(
        read_ahead_bytes=int(data.read_ahead_mb * 2**20),
        cache_dir=data.cache_dir,
        cache_limit_bytes=cache_limit_bytes(data.cache_limit),
    )


def retry_policy(data: DataConfig) -> RetryPolicy:
    """How the streams ride out transient storage errors: ``data.retries`` and its backoffs."""
    return RetryPolicy(
        attempts=data.retries,
        initial_backoff_s=data.retry_backoff_s,
        max_backoff_s=data.retry_max_backoff_s,
    )


def _member_bytes(data: DataConfig) -> int:
    return int(data.max_member_mb * 2**20)
