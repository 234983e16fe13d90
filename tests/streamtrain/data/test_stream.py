"""The rank's batch stream (the elastic loader over one source): exactly-once epochs, equal
ranks, exact mid-epoch resume, failures counted, the sample log, and storage backends."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from shardify.bytestream import RetryPolicy
from shardify.convert import ConvertOptions, convert
from streamtrain.data.dataset import ShardInfo, Source
from streamtrain.data.elastic import ElasticStream, Layout, StreamConfig
from streamtrain.data.loader import ElasticLoader
from streamtrain.data.sample_log import SampleLog
from streamtrain.data.shards import Dataset, resolve
from tests import factories


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    folder = tmp_path_factory.mktemp("stream-shards")
    rows = factories.caption_rows(150, size=(16, 16))
    rows[40]["sample_id"] = "duplicate-id"
    factories.write_parquet(folder / "a.parquet", rows[:90], row_group_size=10)
    factories.write_parquet(folder / "b.parquet", rows[90:], row_group_size=10)
    convert([str(folder)], ConvertOptions(output=str(folder / "out"), max_samples_per_shard=23))
    return resolve(str(folder / "out"))


def decode(raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    meta = json.loads(raw["json"])
    if meta["sample_id"] == "img-00077":
        raise ValueError("pretend this one is corrupt")
    return {"id": raw["__key__"], "aug": rng.random()}


def collate(samples: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(s["id"], s["aug"]) for s in samples]


def make_loader(
    dataset: Dataset,
    rank: int = 0,
    world: int = 1,
    workers: int = 2,
    batch: int = 4,
    buffer: int = 16,
    seed: int = 5,
    collate: Any = collate,
    retry: RetryPolicy | None = None,
    sample_log: SampleLog | None = None,
    accum: int = 1,
) -> ElasticLoader:
    """The loader training builds (pipeline.train_loader), over ``dataset``'s shards as one source."""
    layout = Layout((Source("train", dataset.shards),), seed, world, batch * accum, buffer)
    settings = StreamConfig(seed=seed, shuffle_buffer=buffer)
    stream = ElasticStream(layout, rank, workers, decode, settings, retry)
    return ElasticLoader(stream, collate, batch, accum, sample_log=sample_log)


def take(loader: ElasticLoader, count: int) -> list[Any]:
    return [next(loader) for _ in range(count)]


def test_one_epoch_reads_every_sample_once(shards: Dataset) -> None:
    loader = make_loader(shards, workers=2, batch=4)
    per_epoch = loader.batches_per_epoch
    assert per_epoch == 150 // 4
    keys = [key for batch in take(loader, per_epoch) for key, _ in batch]
    assert len(keys) == len(set(keys)) == per_epoch * 4 - 1  # one sample fails to decode
    assert loader.read_stats["decode_errors"] == 1
    assert loader.read_stats["samples"] == len(keys)


def test_resume_mid_epoch_and_across_epochs_equals_uninterrupted(shards: Dataset) -> None:
    reference = take(make_loader(shards), 100)  # 2.7 epochs
    for stop in (1, 18, 37, 55):
        first = make_loader(shards)
        head = take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        first.close()
        resumed = make_loader(shards)
        resumed.load_state_dict(state)
        assert head + take(resumed, 100 - stop) == reference, f"stopped at {stop}"


def test_order_is_a_pure_function_of_seed(shards: Dataset) -> None:
    assert take(make_loader(shards, workers=0), 12) == take(make_loader(shards, workers=0), 12)
    assert take(make_loader(shards, seed=1), 12) != take(make_loader(shards, seed=2), 12)


def test_ranks_are_disjoint_and_equal(shards: Dataset) -> None:
    per_rank = []
    for rank in range(3):
        loader = make_loader(shards, rank=rank, world=3, workers=2, batch=5)
        per_rank.append([k for batch in take(loader, loader.batches_per_epoch) for k, _ in batch])
        assert loader.batches_per_epoch == 150 // 15
        assert len(per_rank[-1]) == 50 - (rank == 1)  # img-00077 (rank 1 here) does not decode
    assert not set(per_rank[0]) & set(per_rank[1]) and not set(per_rank[1]) & set(per_rank[2])


def test_missing_shard_is_skipped_and_counted(shards: Dataset, tmp_path: Path) -> None:
    gone = Source("gone", (ShardInfo(str(tmp_path / "gone.tar"), 30),))
    broken = Dataset((*shards.sources, gone), shards.schema)
    retry = RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
    loader = make_loader(broken, workers=0, buffer=8, retry=retry)
    batches = take(loader, loader.batches_per_epoch)
    assert loader.read_stats["shard_errors"] == 1
    assert loader.read_stats["unreadable_samples"] == 30
    # A batch whose every sample was unreadable arrives as None, keeping its place in the order.
    assert len(batches) == loader.batches_per_epoch == 180 // 4
    assert sum(len(b) for b in batches if b is not None) == 180 // 4 * 4 - 30 - 1


@pytest.mark.s3
def test_streams_from_s3_like_from_disk(shards: Dataset, s3_env, s3_bucket: str) -> None:
    import s3fs

    local_dir = Path(shards.shards[0].url).parent
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env.endpoint}, skip_instance_cache=True)
    for path in sorted(local_dir.iterdir()):
        fs.put_file(str(path), f"{s3_bucket}/pixmo/{path.name}")
    remote = resolve(f"s3://{s3_bucket}/pixmo")
    assert [s.samples for s in remote.shards] == [s.samples for s in shards.shards]
    assert take(make_loader(remote, workers=2), 45) == take(make_loader(shards, workers=2), 45)


def _dict_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"sample_ids": [s["id"] for s in samples]}


def test_sample_log_of_an_interrupted_run_equals_an_uninterrupted_one(
    shards: Dataset, tmp_path: Path
) -> None:
    from streamtrain.data.sample_log import read_sample_log

    def loader(path: Path) -> ElasticLoader:
        log = SampleLog(path, rank=0)
        return make_loader(shards, workers=2, seed=3, collate=_dict_collate, sample_log=log, accum=2)

    reference = loader(tmp_path / "reference.jsonl")
    take(reference, 60)
    interrupted = tmp_path / "interrupted.jsonl"
    first = loader(interrupted)
    take(first, 20)  # checkpoint at step 10 ...
    state = first.state_dict()
    take(first, 9)  # ... then 4.5 more steps that the crash loses
    first.shutdown()
    resumed = loader(interrupted)
    resumed.load_state_dict(state)
    take(resumed, 40)
    reference.shutdown()
    resumed.shutdown()
    expected = read_sample_log(tmp_path / "reference.jsonl")
    assert read_sample_log(interrupted) == expected
    assert [e["step"] for e in expected] == list(range(1, 31))
    assert all(len(e["sample_ids"]) in (7, 8) for e in expected)


def test_each_shard_piece_is_opened_once_per_epoch(shards: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    import streamtrain.data.remote as stream_module

    opened = []
    real = stream_module.iter_samples

    def counting(url: str, first: int, stop: int | None, retry: Any = None, **options: Any):
        opened.append((url, first))
        return real(url, first, stop, retry, **options)

    monkeypatch.setattr(stream_module, "iter_samples", counting)
    loader = make_loader(shards, workers=0, batch=4, buffer=4)  # many windows per shard
    take(loader, loader.batches_per_epoch)
    # Each of the 4 lanes is a run of the epoch's order: a shard is cut where a lane ends and
    # around the samples the epoch leaves out, and each piece is opened once.
    assert len(opened) == len(set(opened)) <= len(shards.shards) + 4 + 2


def test_a_registered_storage_backend_streams_like_local_disk(shards: Dataset) -> None:
    from tests.storage_backends import MemoryStorage, in_memory

    local_dir = Path(shards.shards[0].url).parent
    with in_memory(local_dir) as base:
        held = resolve(base)  # the manifest, too, is read through the backend
        assert [s.url for s in held.shards] == [f"{base}/{Path(s.url).name}" for s in shards.shards]
        assert take(make_loader(held, workers=0), 20) == take(make_loader(shards, workers=0), 20)
        assert MemoryStorage.opened and all(url.startswith("mem://") for url in MemoryStorage.opened)
        # Forked loader workers inherit the registration (and here the in-memory objects).
        assert take(make_loader(held, workers=2), 20) == take(make_loader(shards, workers=2), 20)
