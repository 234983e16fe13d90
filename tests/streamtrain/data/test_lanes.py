"""The elastic plan, as arithmetic: every sample of every epoch exactly once across any sequence of
topology changes, equal counts on every rank, per-step equality when the global batch stays, and
exact mixture proportions."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from fractions import Fraction

import pytest

from streamtrain.config.weights import schedule, silent_steps, weight_problems
from streamtrain.data.dataset import ShardInfo, Source
from streamtrain.data.elastic import Layout, Progress
from streamtrain.data.lanes import Cursor, PlanError, ShardOrder, Windows, position_of
from streamtrain.data.mixture import apportion


def _sources(sizes: list[int], weights: list | None = None, shard: int = 37) -> tuple[Source, ...]:
    """Sources of ``sizes`` samples, cut into shards of ``shard`` (the last one shorter)."""
    found = []
    for i, size in enumerate(sizes):
        counts = [shard] * (size // shard) + ([size % shard] if size % shard else [])
        shards = tuple(ShardInfo(f"s{i}/{k}.tar", n) for k, n in enumerate(counts))
        found.append(Source(f"s{i}", shards, schedule(weights[i]) if weights else None))
    return tuple(found)


def _run(sources, segments, seed=0, buffer=16):
    """Steps of a run whose topology is ``(world, per_rank, steps)`` per life, from one state.

    Returns per step the sorted sample identities ``(source, epoch, position)`` of all ranks,
    each rank's count per step, and the final progress.
    """
    progress = None
    steps, per_rank_counts = [], []
    for world, per_rank, count in segments:
        layout = Layout(sources, seed, world, per_rank, buffer)
        if progress is None:
            progress = Progress.start(layout)
        else:
            progress.fit(layout)
        shapes = layout.shapes()
        for _ in range(count):
            taken = progress.advance(layout, shapes)
            ids, counts = [], []
            for rank in range(world):
                mine = 0
                for i, samples in enumerate(taken):
                    windows = Windows(seed, sources[i].name, buffer)
                    for where in samples:
                        ids.append((i, where.epoch, position_of(windows, rank, where, sources[i].samples)))
                        mine += 1
                counts.append(mine)
            steps.append(sorted(ids))
            per_rank_counts.append(counts)
    return steps, per_rank_counts, progress


def _check_exactly_once(sources, steps, progress) -> None:
    seen = Counter(identity for step in steps for identity in step)
    assert max(seen.values()) == 1  # no sample twice in one of its source's epochs
    for i, cursor in enumerate(progress.cursors):
        for epoch in range(cursor.epoch):  # finished epochs: all but the dropped remainder
            read = {p for s, e, p in seen if s == i and e == epoch}
            assert read <= set(range(sources[i].samples))
            assert sources[i].samples - len(read) < 64  # under one global batch left out


@pytest.mark.parametrize("trial", range(40))
def test_any_sequence_of_topologies_reads_every_sample_once(trial: int) -> None:
    rng = random.Random(trial)
    sources = _sources([rng.randint(60, 400)], shard=rng.randint(5, 90))
    segments = [(rng.randint(1, 4), rng.randint(1, 8), rng.randint(1, 25)) for _ in range(rng.randint(2, 5))]
    steps, counts, progress = _run(sources, segments, seed=trial, buffer=rng.choice([1, 8, 64]))
    _check_exactly_once(sources, steps, progress)
    for (world, per_rank, count), start in zip(segments, _starts(segments), strict=True):
        for step_counts in counts[start : start + count]:
            assert step_counts == [per_rank] * world  # equal ranks, every step


def _starts(segments):
    starts, total = [], 0
    for _, _, count in segments:
        starts.append(total)
        total += count
    return starts


@pytest.mark.parametrize("trial", range(20))
def test_mixtures_read_each_source_once_per_its_epoch_across_topology_changes(trial: int) -> None:
    rng = random.Random(1000 + trial)
    sizes = [rng.randint(40, 300) for _ in range(rng.randint(2, 4))]
    weights = [rng.choice([1, 2, 0.5, {0: 1, 7: 3}, {0: 2, 5: 0, 11: 1}]) for _ in sizes]
    sources = _sources(sizes, weights, shard=rng.randint(5, 50))
    segments = [(rng.randint(1, 3), rng.randint(2, 6), rng.randint(3, 20)) for _ in range(rng.randint(2, 4))]
    try:
        steps, counts, progress = _run(sources, segments, seed=trial)
    except PlanError:
        pytest.skip("a drawn source is smaller than its share of a batch")
    _check_exactly_once(sources, steps, progress)
    for (world, per_rank, count), start in zip(segments, _starts(segments), strict=True):
        for step_counts in counts[start : start + count]:
            assert step_counts == [per_rank] * world


@pytest.mark.parametrize(
    "lives",
    [
        [(2, 4, 9), (1, 8, 6), (2, 4, 30)],  # 2 -> 1 -> 2 ranks
        [(4, 2, 5), (8, 1, 5), (1, 8, 40)],
        [(2, 4, 13), (4, 2, 1), (2, 4, 1), (1, 8, 30)],
    ],
)
def test_same_global_batch_gives_every_step_the_uninterrupted_samples(lives) -> None:
    sources = _sources([203], shard=19)
    total = sum(count for _, _, count in lives)
    uninterrupted, _, _ = _run(sources, [(2, 4, total)])
    elastic, _, _ = _run(sources, lives)
    assert elastic == uninterrupted


def test_a_changed_global_batch_continues_the_epoch_then_follows_the_new_lanes() -> None:
    sources = _sources([203], shard=19)
    steps, _, progress = _run(sources, [(2, 4, 10), (3, 2, 40)])
    _check_exactly_once(sources, steps, progress)
    assert progress.cursors[0].levels[-1][:2] == [3, 2]


def test_mixture_counts_are_exact_shares_within_one_sample_every_step() -> None:
    sched = [schedule(w) for w in (5, 3, 2)]
    carries = [Fraction(0)] * 3
    totals = [0, 0, 0]
    for step in range(1, 500):
        counts, carries = apportion(sched, 7, step, carries)
        assert sum(counts) == 7
        totals = [t + c for t, c in zip(totals, counts, strict=True)]
        for total, weight in zip(totals, (5, 3, 2), strict=True):
            assert abs(total - Fraction(7 * step * weight, 10)) < 1


def test_a_schedule_switches_at_its_step_and_a_source_can_go_off_and_on() -> None:
    sched = [schedule({0: 1}), schedule({0: 1, 10: 0, 20: 3})]
    carries = [Fraction(0)] * 2
    seen = {}
    for step in range(1, 30):
        counts, carries = apportion(sched, 8, step, carries)
        seen[step] = counts
    assert seen[9] == [4, 4] and seen[10] == [8, 0] and seen[19] == [8, 0] and seen[20] == [2, 6]


def test_mixture_proportions_hold_on_every_rank_of_a_run() -> None:
    sources = _sources([500, 200, 90], [2, 1, 1])
    _, _counts, progress = _run(sources, [(2, 8, 60)])
    consumed = [c.consumed for c in progress.cursors]
    assert consumed == [240, 120, 120]  # per rank: 60 steps x 8 samples split 2:1:1
    assert progress.cursors[2].epoch >= 1  # the small source cycled on its own epochs


def test_a_small_source_cycles_evenly() -> None:
    sources = _sources([400, 30], [3, 1])
    steps, _, progress = _run(sources, [(1, 8, 60)])
    small = Counter(p for step in steps for s, e, p in step if s == 1)
    assert max(small.values()) - min(small.values()) <= 1  # every sample as often, give or take one
    assert progress.cursors[1].epoch >= 3


def test_weight_problems_are_named() -> None:
    assert weight_problems(-1, "data.train[0].weight") == [
        "data.train[0].weight: -1 must be a finite number >= 0"
    ]
    assert "not a number" in weight_problems("x", "w")[0]
    assert "ascending" in " ".join(weight_problems({10: 1, 5: 2}, "w"))
    assert "whole number" in " ".join(weight_problems({1.5: 1}, "w"))
    assert silent_steps([schedule({0: 1, 10: 0}), schedule({5: 1, 10: 0, 20: 1})]) == [10]


def test_a_source_smaller_than_its_share_of_a_batch_is_refused() -> None:
    sources = _sources([500, 10], [1, 1])
    with pytest.raises(PlanError, match="fewer than its share"):
        Layout(sources, 0, 4, 8, 16).shapes()


def _trained(sources, world, per_rank, steps, seed=0, buffer=16) -> dict[tuple, set[tuple[int, int]]]:
    """Per (source, epoch), the samples trained, each as (shard, index in shard)."""
    layout = Layout(sources, seed, world, per_rank, buffer)
    progress, shapes = Progress.start(layout), layout.shapes()
    trained: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for _ in range(steps):
        for i, samples in enumerate(progress.advance(layout, shapes)):
            counts = [shard.samples for shard in sources[i].shards]
            windows = Windows(seed, sources[i].name, buffer)
            for where in samples:
                order = ShardOrder.draw(counts, seed, sources[i].name, where.epoch)
                for rank in range(world):
                    position = position_of(windows, rank, where, sources[i].samples)
                    trained.setdefault((i, where.epoch), set()).add(order.locate(position))
    return trained


def test_a_small_source_in_a_mixture_trains_every_sample_over_its_epochs() -> None:
    # The case: 100 samples in one shard, mixed in with batch 16, left 4 out each epoch.
    sources = _sources([1000, 100], [1, 1], shard=100)
    trained = _trained(sources, 1, 16, 12 * 26)  # 26 epochs of the small source (12 steps each)
    small = [trained[(1, epoch)] for epoch in range(25)]
    assert all(len(seen) == 96 for seen in small)  # 4 left out per epoch, as before
    assert [seen for seen in small[1:] if seen != small[0]]  # but not the same 4
    assert set().union(*small) == {(0, k) for k in range(100)}
    for this, following in itertools.pairwise(small):  # any two consecutive epochs: all of it
        assert this | following == {(0, k) for k in range(100)}


@pytest.mark.parametrize(("sizes", "world", "per_rank"), [([203], 2, 8), ([90, 57], 3, 4)])
def test_the_remainder_rotates_for_plain_sources_and_mixtures(sizes, world, per_rank) -> None:
    sources = _sources(sizes, [1] * len(sizes) if len(sizes) > 1 else None, shard=19)
    trained = _trained(sources, world, per_rank, 120)
    for i, source in enumerate(sources):
        everything = {(k, j) for k, shard in enumerate(source.shards) for j in range(shard.samples)}
        epochs = sorted(e for s, e in trained if s == i)[:-1]  # finished epochs
        assert len(epochs) >= 3
        left_out = [everything - trained[(i, e)] for e in epochs]
        assert all(0 < len(out) < world * per_rank for out in left_out)
        for this, following in itertools.pairwise(left_out):
            assert not this & following  # consecutive epochs leave out different samples


def test_a_state_saved_before_the_remainder_rotated_ends_its_epoch_as_it_began() -> None:
    sources = _sources([203], shard=19)
    layout = Layout(sources, 0, 2, 8, 16)
    progress, shapes = Progress.start(layout), layout.shapes()
    for _ in range(15):  # 12 steps an epoch: into the second epoch
        progress.advance(layout, shapes)
    state = progress.cursors[0].to_dict()
    old = Cursor.from_dict(layout.counts(0), layout.windows(0), state, rotating=False)
    new = Cursor.from_dict(layout.counts(0), layout.windows(0), state)
    assert old.epoch == 1 and old.level().runs == ((0, 203),)  # leaves out the tail of its order
    assert new.left_out == progress.cursors[0].left_out != ()
    old.take(8 * 9, shapes[0])
    assert old.epoch == 2 and old.left_out != ()  # the next epoch rotates
