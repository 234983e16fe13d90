"""What the trainer asks of the data layer: resolved sources, a training loader, held-out batches.

The trainer knows a rank, a world size and a task's decode/collate; everything about shards,
plans, workers and retries stays behind these three calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from shardify.bytestream import RetryPolicy
from streamtrain.config import DataConfig, EvalConfig
from streamtrain.data.dataset import Dataset
from streamtrain.data.eval import EvalStream, eval_batches
from streamtrain.data.loader import StreamLoader
from streamtrain.data.plan import Topology
from streamtrain.data.sample_log import SampleLog
from streamtrain.data.shards import DataSourceError, resolve
from streamtrain.data.stream import Collate, Decode, ShardStream, StreamConfig


def resolve_sources(sources: str | list[str], key: str = "data.train") -> Dataset:
    """The shards config key ``key`` names, with exact counts; DataSourceError naming ``key`` if not."""
    try:
        return resolve(sources)
    except DataSourceError as exc:
        raise DataSourceError(f"{key}: {exc}") from None


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
) -> StreamLoader:
    """This rank's endless, resumable batches of ``dataset``."""
    topology = Topology(world_size=world_size, rank=rank, num_workers=data.num_workers, batch_size=batch_size)
    stream = ShardStream(
        dataset,
        topology,
        decode,
        collate,
        StreamConfig(seed=seed, shuffle_buffer=data.shuffle_buffer, max_member_bytes=_member_bytes(data)),
        retry_policy(data),
    )
    return StreamLoader(
        stream,
        prefetch_factor=data.prefetch_factor,
        pin_memory=pin_memory,
        sample_log=SampleLog(data.sample_log, rank) if data.sample_log else None,
        batches_per_step=batches_per_step,
    )


def held_out_batches(
    data: DataConfig,
    settings: EvalConfig,
    dataset: Dataset,
    *,
    rank: int,
    world_size: int,
    decode: Decode,
    collate: Collate,
) -> Iterator[tuple[Any, dict[str, int]]]:
    """One pass over this rank's share of ``dataset`` as ``(batch or None, read counts)`` pairs."""
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
    return eval_batches(stream, data.num_workers)


def retry_policy(data: DataConfig) -> RetryPolicy:
    """How the streams ride out transient storage errors: ``data.retries`` and its backoffs."""
    return RetryPolicy(
        attempts=data.retries,
        initial_backoff_s=data.retry_backoff_s,
        max_backoff_s=data.retry_max_backoff_s,
    )


def _member_bytes(data: DataConfig) -> int:
    return int(data.max_member_mb * 2**20)
