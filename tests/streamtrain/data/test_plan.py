"""The epoch plan: exactly-once coverage, equal batches per rank, purity, splitting inside shards,
and the recorded order."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from streamtrain.data.dataset import Dataset, ShardInfo, Source
from streamtrain.data.plan import (
    PlanError,
    Topology,
    batches_per_rank,
    epoch_plan,
    shard_order,
    worker_batches,
    worker_pieces,
)


def _samples(shards: list[ShardInfo], topology: Topology, seed: int, epoch: int) -> dict[int, list[tuple]]:
    """Every (shard, index) each worker of topology.rank reads in the epoch."""
    return {
        worker: [
            (piece.shard, i)
            for piece in worker_pieces(shards, topology, seed, epoch, worker)
            for i in range(piece.start, piece.stop)
        ]
        for worker in range(topology.readers)
    }


UNEVEN = [ShardInfo(f"s{i}", n) for i, n in enumerate([100, 7, 64, 1, 250, 33, 90])]


@pytest.mark.parametrize("world, workers, batch", [(1, 0, 8), (2, 2, 5), (3, 4, 7), (4, 3, 16), (8, 4, 3)])
@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_every_sample_at_most_once_and_ranks_equal(world: int, workers: int, batch: int, epoch: int) -> None:
    total = sum(s.samples for s in UNEVEN)
    seen: Counter = Counter()
    per_rank_batches = set()
    for rank in range(world):
        topology = Topology(world, rank, workers, batch)
        readings = _samples(UNEVEN, topology, seed=3, epoch=epoch)
        counts = [len(r) for r in readings.values()]
        assert all(c % batch == 0 for c in counts)  # workers read whole batches
        per_rank_batches.add(sum(counts) // batch)
        seen.update(itertools.chain.from_iterable(readings.values()))
    assert len(per_rank_batches) == 1  # every rank yields the same number of batches
    assert max(seen.values()) == 1  # no sample twice, across ranks and workers
    dropped = total - len(seen)
    assert 0 <= dropped < world * batch  # less than one batch per rank left out
    assert all(0 <= i < UNEVEN[s].samples for s, i in seen)


def test_fewer_shards_than_readers_are_split_by_sample_index() -> None:
    shards = [ShardInfo("only", 96)]
    readings = {}
    for rank in range(2):
        readings.update({(rank, w): r for w, r in _samples(shards, Topology(2, rank, 3, 4), 0, 0).items()})
    assert all(len(r) == 16 for r in readings.values())  # 96 samples / 6 readers, all from one shard
    assert len({i for r in readings.values() for _, i in r}) == 96


def test_plan_is_a_pure_function_and_epochs_differ() -> None:
    topology = Topology(2, 1, 2, 4)
    first = _samples(UNEVEN, topology, seed=11, epoch=2)
    assert first == _samples(UNEVEN, topology, seed=11, epoch=2)
    assert first != _samples(UNEVEN, topology, seed=11, epoch=3)
    assert first != _samples(UNEVEN, topology, seed=12, epoch=2)
    assert shard_order(50, 1, 0) != shard_order(50, 1, 1)


def test_leftover_batches_rotate_between_workers() -> None:
    # 5 batches over 3 workers: 2,2,1 — and the worker with one fewer changes each epoch.
    counts = {epoch: [worker_batches(5, 3, w, epoch)[1] for w in range(3)] for epoch in range(3)}
    assert all(sum(c) == 5 and sorted(c) == [1, 2, 2] for c in counts.values())
    assert len({tuple(c) for c in counts.values()}) > 1
    # one batch, four workers: every worker gets it within four epochs
    owners = {next(w for w in range(4) if worker_batches(1, 4, w, e)[1]) for e in range(4)}
    assert owners == {0, 1, 2, 3}
    # first-batch offsets tile the rank's batches without gaps
    for epoch in range(3):
        spans = sorted(worker_batches(7, 3, w, epoch) for w in range(3))
        assert [first for first, _ in spans] == [0, spans[0][1], spans[0][1] + spans[1][1]]


def test_too_little_data_is_a_clear_error() -> None:
    with pytest.raises(PlanError, match="one batch of 64"):
        batches_per_rank([ShardInfo("a", 100)], Topology(world_size=2, batch_size=64))


# Pieces (shard, start, stop) per worker, recorded from the plan before it was one function
# (commit 64bdba4, UNEVEN, seed 3): sample order must never move under a refactor.
RECORDED = {
    (Topology(2, 1, 2, 5), 1): [[(4, 15, 150)], [(4, 150, 250), (1, 0, 7), (5, 0, 28)]],
    (Topology(3, 0, 4, 7), 5): [[(6, 0, 42)], [(6, 42, 90), (4, 0, 1)], [(4, 1, 43)], [(4, 43, 85)]],
}


@pytest.mark.parametrize(("topology", "epoch"), list(RECORDED))
def test_epoch_plan_is_pure_and_keeps_the_recorded_order(topology: Topology, epoch: int) -> None:
    plan = epoch_plan(UNEVEN, topology, 3, epoch)
    assert [[(p.shard, p.start, p.stop) for p in w.pieces] for w in plan.workers] == RECORDED[topology, epoch]
    assert plan == epoch_plan(UNEVEN, topology, 3, epoch)
    assert plan.workers == epoch_plan(tuple(UNEVEN), topology, 3, epoch).workers
    # The workers' batches tile the rank's batches, in worker order.
    assert sum(w.batches for w in plan.workers) == plan.batches_per_rank
    assert [w.first_batch for w in plan.workers] == [
        sum(w.batches for w in plan.workers[:i]) for i in range(topology.readers)
    ]
    assert [plan.batches(i) for i in range(topology.readers)] == [w.batches for w in plan.workers]


def test_a_dataset_of_sources_is_planned_as_its_shards_end_to_end() -> None:
    sources = (Source("a", tuple(UNEVEN[:3])), Source("b", ()), Source("c", tuple(UNEVEN[3:])))
    dataset = Dataset(sources, "caption")
    assert dataset.shards == tuple(UNEVEN) and dataset.samples == sum(s.samples for s in UNEVEN)
    for topology, epoch in RECORDED:
        assert (
            epoch_plan(dataset, topology, 3, epoch).workers == epoch_plan(UNEVEN, topology, 3, epoch).workers
        )
