"""The seam the trainer calls: data.retries and its backoffs reach the streams, retries are counted."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shardify import bytestream
from shardify.bytestream import RetryPolicy
from shardify.convert import ConvertOptions, convert
from streamtrain.config import DataConfig, EvalConfig, SourceSpec
from streamtrain.data.pipeline import (
    held_out_reader,
    resolve_sources,
    retry_policy,
    train_loader,
)
from tests import factories
from tests.storage_backends import FailingLocalStorage, registered

FAILURES = 3
"""Consecutive failed reads the backend injects before it reads normally."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pipeline")
    factories.write_parquet(folder / "in.parquet", factories.caption_rows(24, size=(8, 8)))
    convert(
        [str(folder / "in.parquet")], ConvertOptions(output=str(folder / "out"), max_samples_per_shard=12)
    )
    return folder / "out"


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(bytestream.time, "sleep", waits.append)
    return waits


def decode(raw: dict[str, Any], rng: random.Random) -> str:
    return json.loads(raw["json"])["sample_id"]


def data_config(**overrides: Any) -> DataConfig:
    return DataConfig(train="unused", num_workers=0, shuffle_buffer=4, **overrides)


def epoch(data: DataConfig, source: str) -> tuple[list[Any], Counter[str]]:
    loader = train_loader(
        data, resolve_sources(source), rank=0, world_size=1, batch_size=4, seed=1, decode=decode, collate=list
    )
    batches = [next(loader) for _ in range(loader.batches_per_epoch)]
    loader.shutdown()
    return batches, loader.read_stats


def test_the_default_retry_keys_are_the_policy_defaults() -> None:
    assert retry_policy(DataConfig()) == RetryPolicy()


def test_retries_beyond_the_failures_ride_them_out_and_are_counted(shards: Path, no_sleep: list) -> None:
    reference, clean = epoch(data_config(), str(shards))
    assert "read_retries" not in clean
    with registered("failing", FailingLocalStorage):
        FailingLocalStorage.failures, FailingLocalStorage.reads = FAILURES, 0
        data = data_config(retries=FAILURES + 1, retry_backoff_s=0.25, retry_max_backoff_s=0.5)
        batches, stats = epoch(data, f"failing://{shards}")
    assert batches == reference  # the same samples in the same order
    assert stats["read_retries"] == stats["read_reopens"] == FAILURES and "shard_errors" not in stats
    assert len(no_sleep) == FAILURES and all(0.125 <= wait <= 0.5 for wait in no_sleep)


def test_retries_up_to_the_failures_give_the_shard_up(shards: Path, no_sleep: list) -> None:
    with registered("failing", FailingLocalStorage):
        FailingLocalStorage.failures, FailingLocalStorage.reads = FAILURES, 0
        batches, stats = epoch(data_config(retries=FAILURES), f"failing://{shards}")
    assert stats["shard_errors"] == 1 and stats["unreadable_samples"] == 12  # one whole shard
    assert stats["read_retries"] == FAILURES - 1 == len(no_sleep)
    assert sum(len(b) for b in batches if b is not None) == 12


def test_held_out_reads_use_the_retry_keys_too(shards: Path, no_sleep: list) -> None:
    with registered("failing", FailingLocalStorage):
        FailingLocalStorage.failures, FailingLocalStorage.reads = FAILURES, 0
        reader = held_out_reader(
            data_config(retries=FAILURES + 1),
            EvalConfig(batch_size=5),
            resolve_sources(f"failing://{shards}"),
            rank=0,
            world_size=1,
            decode=decode,
            collate=list,
        )
        results = list(reader.batches())
    totals = sum((Counter(stats) for _, stats in results), Counter())
    assert totals["read_retries"] == FAILURES and totals["samples"] == 24
    assert [len(batch) for batch, _ in results] == [5, 5, 5, 5, 4]


def id_and_reader(raw: dict[str, Any], rng: random.Random) -> tuple[str, int]:
    return json.loads(raw["json"])["sample_id"], os.getpid()


def test_every_held_out_pass_reads_its_part_through_workers_forked_once(shards: Path, tmp_path: Path) -> None:
    """A run evaluates many times: its eval workers are forked once, at setup, never mid-run
    (a fork while training threads run can deadlock the child on CPython < 3.11.8)."""
    factories.write_parquet(tmp_path / "b.parquet", factories.caption_rows(6, start=100, size=(8, 8)))
    convert(
        [str(tmp_path / "b.parquet")], ConvertOptions(output=str(tmp_path / "b"), max_samples_per_shard=4)
    )
    dataset = resolve_sources(
        [SourceSpec(path=str(shards), name="a"), SourceSpec(path=str(tmp_path / "b"), name="b")], "data.eval"
    )
    reader = held_out_reader(
        DataConfig(train="unused", num_workers=2),
        EvalConfig(batch_size=5),
        dataset,
        rank=0,
        world_size=1,
        decode=id_and_reader,
        collate=list,
    )
    with reader:
        workers = {process.pid for process in reader._iterator._workers}
        assert len(workers) == 2 and os.getpid() not in workers
        passes = {part: [reader.batches(part) for _ in range(2)] for part in (None, "b", "a")}
        seen = {
            part: [[s for b, _ in p if b is not None for s in b] for p in ps] for part, ps in passes.items()
        }
    assert sorted(i for i, _ in seen["a"][0]) == [f"img-{n:05d}" for n in range(24)]
    assert sorted(i for i, _ in seen["b"][0]) == [f"img-{n:05d}" for n in range(100, 106)]
    assert sorted(i for i, _ in seen[None][0]) == sorted(i for i, _ in seen["a"][0] + seen["b"][0])
    for runs in seen.values():
        assert sorted(runs[0]) == sorted(runs[1])  # every pass whole, in the same workers
        assert {pid for _, pid in runs[0]} == workers
    assert all(not process.is_alive() for process in reader.loader._iterator._workers)
