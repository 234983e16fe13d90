"""The one decode-and-count path, on plain lists, as the training and the held-out streams use it."""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

import pytest

from shardify import bytestream
from shardify.bytestream import RateLimitedLog
from streamtrain.data import eval as eval_module
from streamtrain.data import remote as remote_module
from streamtrain.data.counts import decode_samples
from streamtrain.data.dataset import Dataset, ShardInfo, Source
from streamtrain.data.elastic import ElasticStream, Layout, StreamConfig
from streamtrain.data.eval import EvalStream
from streamtrain.data.loader import ElasticLoader

log = logging.getLogger(__name__)


def raw(index: int, **extra: Any) -> dict[str, Any]:
    return {"__key__": f"k{index}", "__index__": index, "__url__": "plain.tar", "txt": b"x", **extra}


def decode(sample: dict[str, Any], rng: random.Random) -> Any:
    if sample["__index__"] % 5 == 3:
        raise ValueError("undecodable")
    if sample["__index__"] % 5 == 4:
        return None  # a decoder that gives nothing: counted like one that raised
    return sample["__key__"]


# Positions: 0 ok, 1 unreadable (None), 2 oversized | 3 raises, 4 gives None, 5 unreadable |
# 6 ok, 7 oversized, 8 raises.
RAWS: list[dict[str, Any] | None] = [
    raw(0),
    None,
    raw(2, __error__="member k2.jpg has 9 bytes, over the limit of 8"),
    raw(3),
    raw(4),
    None,
    raw(6),
    raw(7, __error__="member k7.jpg has 9 bytes, over the limit of 8"),
    raw(8),
]
TOTALS = {"samples": 2, "oversized_samples": 2, "decode_errors": 3}


def test_decode_samples_keeps_order_and_counts_each_skip() -> None:
    counts: Counter[str] = Counter()
    got = decode_samples(RAWS, decode, random.Random(0), counts, RateLimitedLog(log, 0.0))
    assert got == ["k0", "k6"]
    assert counts == TOTALS


def test_decode_samples_warns_at_a_limited_rate(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=__name__):
        decode_samples(RAWS, decode, random.Random(0), Counter(), RateLimitedLog(log, 3600.0))
    assert len(caplog.records) == 1 and "k2" in caplog.text and "over the limit" in caplog.text


def test_training_batches_count_through_it_and_keep_their_size(monkeypatch: pytest.MonkeyPatch) -> None:
    readable = [sample for sample in RAWS if sample is not None]  # a reader yields no None

    def plain_list(url: str, first: int, stop: int | None, retry: Any = None, **options: Any) -> Any:
        return iter(readable[first:stop])

    monkeypatch.setattr(remote_module, "iter_samples", plain_list)
    source = Source("plain", (ShardInfo("plain.tar", len(readable)),))
    # Batch 3: three lanes of two rounds, read in order (shuffle buffer 1); k8 is the remainder.
    stream = ElasticStream(Layout((source,), 0, 1, 3, 1), 0, 0, decode, StreamConfig(shuffle_buffer=1))
    loader = ElasticLoader(stream, sorted, 3)
    batches, counts = [], []
    for _ in range(2):
        batches.append(next(loader))
        counts.append(dict(loader.read_stats - sum((Counter(c) for c in counts), Counter())))
    # A training batch is the planned samples: skipped ones make it smaller, never refilled.
    assert batches == [["k0", "k6"], None]
    assert counts == [
        {"samples": 2, "decode_errors": 1},
        {"oversized_samples": 2, "decode_errors": 1, "empty_batches": 1, "dropped_samples": 1},
    ]
    loader.shutdown()


def test_held_out_batches_count_through_it_and_are_refilled(monkeypatch: pytest.MonkeyPatch) -> None:
    readable = [sample for sample in RAWS if sample is not None]  # a reader yields no None

    def plain_list(url: str, first: int, stop: int, retry: Any = None, **options: Any) -> Any:
        return iter(readable[first:stop])

    monkeypatch.setattr(eval_module, "iter_samples", plain_list)
    dataset = Dataset((Source("plain", (ShardInfo("plain.tar", len(readable)),)),), "caption")
    # Held-out batches are filled with decoded samples, never dropped: the last may be partial,
    # and counts after the last sample arrive with a None batch.
    for batch_size, expected in ((2, [["k0", "k6"], None]), (3, [["k0", "k6"]]), (1, [["k0"], ["k6"], None])):
        got = list(EvalStream(dataset, 0, 1, batch_size, decode, list))
        assert [batch for batch, _ in got] == expected, batch_size
        assert sum((Counter(counts) for _, counts in got), Counter()) == TOTALS, batch_size


def test_the_warner_reports_how_many_it_held_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [100.0]
    monkeypatch.setattr(bytestream.time, "monotonic", lambda: clock[0])
    warnings = RateLimitedLog(log, 30.0)
    with caplog.at_level(logging.WARNING, logger=__name__):
        for second in (0, 1, 2, 29, 31, 32):
            clock[0] = 100.0 + second
            warnings.warn(f"at {second}")
    assert [r.getMessage() for r in caplog.records] == ["at 0", "at 31 (3 similar warnings suppressed)"]
