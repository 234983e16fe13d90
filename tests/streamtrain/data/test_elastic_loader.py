"""The elastic loader in process: resume with other workers or batch splits, small versioned
state, refusals of other data and of version-1 states, a mixture's per-source counts, the
rotating remainder, and the steps recorded before the step ring."""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from shardify.convert import ConvertOptions, convert
from streamtrain.config import DataConfig, SourceSpec
from streamtrain.data.loader import LoaderStateError
from streamtrain.data.pipeline import resolve_sources, train_loader
from tests import factories


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("elastic")
    outputs = []
    for name, count in (("big", 90), ("small", 21)):
        rows = factories.caption_rows(count, size=(8, 8))
        for row in rows:
            row["sample_id"] = f"{name}-{row['sample_id']}"
        factories.write_parquet(folder / f"{name}.parquet", rows)
        convert(
            [str(folder / f"{name}.parquet")],
            ConvertOptions(output=str(folder / name), max_samples_per_shard=10),
        )
        outputs.append(folder / name)
    return outputs[0], outputs[1]


def decode(raw: dict[str, Any], rng: random.Random) -> str:
    return json.loads(raw["json"])["sample_id"]


def _loader(
    train: Any, *, workers: int = 0, batch: int = 4, accum: int = 1, world: int = 1, rank: int = 0, seed=0
):
    data = DataConfig(train=train, num_workers=workers, shuffle_buffer=8)
    return train_loader(
        data,
        resolve_sources(train),
        rank=rank,
        world_size=world,
        batch_size=batch,
        seed=seed,
        decode=decode,
        collate=lambda ids: {"sample_ids": ids},
        batches_per_step=accum,
    )


def _steps(loader, count: int, accum: int) -> list[list[str]]:
    steps = []
    for _ in range(count):
        ids = [i for _ in range(accum) for i in next(loader)["sample_ids"]]
        steps.append(sorted(ids))
    return steps


def test_resume_with_other_workers_and_batch_split_gives_the_same_steps(two_sets) -> None:
    big, _ = two_sets
    reference = _loader(str(big), batch=8)
    expected = _steps(reference, 30, 1)  # crosses epochs: 90 samples are 11 steps of 8
    reference.shutdown()

    first = _loader(str(big), workers=2, batch=8)
    got = _steps(first, 7, 1)
    state = first.state_dict()
    first.shutdown()
    assert len(json.dumps(state)) < 4096 and state["version"] == 3
    second = _loader(str(big), workers=3, batch=2, accum=4)
    second.load_state_dict(state)
    got += _steps(second, 12, 4)
    state = second.state_dict()
    second.shutdown()
    third = _loader(str(big), workers=1, batch=4, accum=2)
    third.load_state_dict(state)
    got += _steps(third, 11, 2)
    third.shutdown()
    assert got == expected


def test_a_state_for_other_data_or_another_seed_is_refused(two_sets) -> None:
    big, small = two_sets
    loader = _loader(str(big))
    _steps(loader, 2, 1)
    state = loader.state_dict()
    loader.shutdown()
    with pytest.raises(LoaderStateError, match="dataset: saved"):
        _loader(str(small)).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="seed: saved 0, now 5"):
        _loader(str(big), seed=5).load_state_dict(state)
    mixture = [SourceSpec(path=str(big), weight=1), SourceSpec(path=str(small), weight=1)]
    with pytest.raises(LoaderStateError, match="dataset: saved"):  # a mixture of the same shards
        _loader(mixture).load_state_dict(state)


def test_a_version_1_state_is_refused_naming_the_release_that_resumes_it(two_sets) -> None:
    big, _ = two_sets
    # What the fixed-topology loader of earlier versions saved after 3 batches.
    state = {"version": 1, "seed": 0, "world_size": 1, "num_workers": 0, "batch_size": 4, "batches": 3}
    with pytest.raises(LoaderStateError) as refused:
        _loader(str(big)).load_state_dict(state)
    message = str(refused.value)
    assert "\n" not in message and "fixed-topology loader" in message
    assert "resume it with streamtrain 6c741cc" in message


def test_a_mixture_counts_each_source_and_cycles_the_small_one(two_sets) -> None:
    big, small = two_sets
    mixture = [
        SourceSpec(path=str(big), weight=1, name="big"),
        SourceSpec(path=str(small), weight={0: 1, 5: 3}, name="small"),
    ]
    loader = _loader(mixture, batch=8)
    steps = _steps(loader, 20, 1)
    stats, metrics = loader.read_stats, loader.source_metrics()
    loader.shutdown()
    for number, ids in enumerate(steps, start=1):
        small_count = sum(i.startswith("small") for i in ids)
        assert small_count == (4 if number < 5 else 6), number
    assert stats["big/samples"] + stats["small/samples"] == stats["samples"] == 160
    assert metrics["data/small/epoch"] > 5 and metrics["data/big/epoch"] < 1


@pytest.mark.parametrize("damage", ["truncated", "missing", "garbage"])
def test_a_damaged_shard_is_skipped_counted_and_never_stops_the_epoch(
    two_sets, tmp_path: Path, damage
) -> None:
    big, _ = two_sets
    copy = tmp_path / "big"
    shutil.copytree(big, copy)
    victim = sorted(copy.glob("*.tar"))[3]
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(b"not a tar at all" * 100)
    loader = _loader(str(copy), workers=2, batch=8)
    steps = 90 // 8  # one epoch: 11 steps, 2 samples left out
    delivered = [i for _ in range(steps) for i in (next(loader) or {"sample_ids": []})["sample_ids"]]
    stats = loader.read_stats
    loader.shutdown()
    assert len(delivered) == len(set(delivered)) == stats["samples"]
    assert stats["shard_errors"] >= 1
    assert stats["samples"] + stats["unreadable_samples"] + stats["decode_errors"] == steps * 8
    assert stats["unreadable_samples"] + stats["decode_errors"] <= 10  # at most the damaged shard's samples


def test_a_small_source_mixed_in_for_many_epochs_trains_every_one_of_its_samples(two_sets, tmp_path) -> None:
    big, _ = two_sets
    rows = factories.caption_rows(20, size=(8, 8))
    for row in rows:
        row["sample_id"] = f"tiny-{row['sample_id']}"
    factories.write_parquet(tmp_path / "tiny.parquet", rows)
    convert([str(tmp_path / "tiny.parquet")], ConvertOptions(output=str(tmp_path / "tiny")))  # one shard
    mixture = [
        SourceSpec(path=str(big), weight=1, name="big"),
        SourceSpec(path=str(tmp_path / "tiny"), weight=1, name="tiny"),
    ]
    loader = _loader(mixture, workers=2, batch=8)
    # tiny: 4 samples a step on 8 lanes of 2 rounds, so an epoch is 4 steps and leaves 4 out.
    epochs = [[i for step in _steps(loader, 4, 1) for i in step if i.startswith("tiny")] for _ in range(6)]
    loader.shutdown()
    everything = {row["sample_id"] for row in rows}
    assert all(len(ids) == len(set(ids)) == 16 for ids in epochs)  # each epoch: once each, 4 left out
    assert len({frozenset(ids) for ids in epochs}) > 1  # not the same 4 every epoch
    for this, following in itertools.pairwise(epochs):
        assert set(this) | set(following) == everything


def test_steps_are_those_the_loader_gave_before_the_step_ring_and_the_rotating_remainder(two_sets) -> None:
    """The first epoch of a plain source and of a mixture, micro-batch by micro-batch, as recorded
    from the loader of 6c741cc (later epochs changed on purpose: the remainder rotates)."""
    recorded = json.loads((Path(__file__).parent / "recorded_steps.json").read_text())
    big, small = two_sets
    mixture = [
        SourceSpec(path=str(big), weight=1, name="big"),
        SourceSpec(path=str(small), weight=1, name="small"),
    ]
    for name, train in (("plain", str(big)), ("mixture", mixture)):
        loader = _loader(train, workers=2, batch=4, accum=2)
        got = [next(loader)["sample_ids"] for _ in range(len(recorded[name]))]
        loader.shutdown()
        assert got == recorded[name], name
