"""Scenario 5: shards damaged where they lie, read by the real stream and by a short training run.

Damage, drawn from ``fault_rng``: random bytes overwritten at a random offset of a shard (payload,
header, padding or end blocks), a shard cut at a random byte, and a manifest whose count for a
shard is too high or too low. Proves: reading never hangs or crashes; every planned sample is
either delivered or counted (``decode_errors``, ``unreadable_samples``, ``oversized_samples``);
a shard error is counted and its warning names the shard; no sample is delivered twice, and none
that the plan did not hold (a shard with more samples than its manifest lists is reported, its
extra samples are not read). A training run over damaged shards finishes and reports the counts.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from shardify.convert import ConvertOptions, convert
from streamtrain.config import load_config
from streamtrain.data import elastic as stream_module
from streamtrain.data.dataset import Dataset, Source
from streamtrain.data.decoders import CaptionDecoder
from streamtrain.data.elastic import ElasticStream, Layout, Progress, StreamConfig
from streamtrain.data.lanes import ShardOrder
from streamtrain.data.loader import ElasticLoader
from streamtrain.data.shards import resolve
from streamtrain.tasks import TASKS, model_types
from streamtrain.train.tracking import read_metrics
from streamtrain.train.trainer import Trainer
from tests import factories
from tests.faults.conftest import FaultRecord, fault_rng, trials
from tests.shardify.helpers import read_shard
from tests.streamtrain.train.conftest import ROOT, convert_sample, tiny_overrides

SCENARIO = "5. corrupt, truncated or miscounted shards"
DAMAGES = ("bytes", "truncate", "count_high", "count_low")
BATCH = 8
READ_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 captioned 16 px photos in 10 shards of 12."""
    folder = tmp_path_factory.mktemp("s5-clean")
    factories.write_parquet(folder / "rows.parquet", factories.caption_rows(120, size=(16, 16)))
    options = ConvertOptions(output=str(folder / "out"), max_samples_per_shard=12)
    convert([str(folder / "rows.parquet")], options)
    return folder / "out"


def _damage(out: Path, kind: str, rng: random.Random) -> str:
    """Damage one shard of the output ``out`` in place; returns the shard's name."""
    manifest = json.loads((out / "manifest.json").read_text())
    entry = rng.choice(manifest["shards"])
    shard = out / entry["name"]
    data = bytearray(shard.read_bytes())
    if kind == "bytes":
        at = rng.randrange(len(data))
        length = rng.randint(1, 64)
        data[at : at + length] = bytes(rng.randrange(256) for _ in range(length))[: len(data) - at]
        shard.write_bytes(bytes(data))
    elif kind == "truncate":
        shard.write_bytes(bytes(data[: rng.randrange(len(data))]))
    else:
        entry["samples"] += rng.randint(1, 5) * (1 if kind == "count_high" else -1)
        entry["samples"] = max(1, entry["samples"])
        (out / "manifest.json").write_text(json.dumps(manifest))
    return entry["name"]


def _epoch_pieces(dataset: Dataset, layout: Layout) -> list[tuple[int, int, int]]:
    """``(shard, first, stop)`` of the samples the first epoch's lanes hold (its remainder left out)."""
    level = Progress.start(layout).cursors[0].level()
    order = ShardOrder.draw([shard.samples for shard in dataset.shards], layout.seed, "train", 0)
    return [
        piece
        for first, stop in level.epoch_ranges(0, level.rounds * level.shape.lanes)
        for piece in order.pieces(first, stop)
    ]


def _decode(decoder: CaptionDecoder) -> Any:
    def decode(raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        return {**decoder(raw, rng), "key": raw["__key__"]}

    return decode


def _keys(samples: list[dict[str, Any]]) -> list[str]:
    return [sample["key"] for sample in samples]


@contextmanager
def _warnings(path: Path) -> Iterator[Path]:
    """Appends the stream's warnings to ``path`` while the block runs.

    A file, because loader workers are forked processes: their records never reach a list here.
    """
    handler = logging.FileHandler(path)
    handler.setLevel(logging.WARNING)
    stream_module.log.addHandler(handler)
    try:
        yield path
    finally:
        stream_module.log.removeHandler(handler)
        handler.close()


def _read_epoch(loader: ElasticLoader) -> list[list[str] | None]:
    """One epoch of batches, read on a thread: a hang fails the test instead of blocking it."""
    batches: list[list[str] | None] = []
    failure: list[BaseException] = []

    def read() -> None:
        try:
            batches.extend(next(loader) for _ in range(loader.batches_per_epoch))
        except BaseException as exc:  # surfaced below with the test's message
            failure.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(READ_TIMEOUT_S)
    assert not reader.is_alive(), f"reading damaged shards hung for {READ_TIMEOUT_S} s"
    assert not failure, f"reading damaged shards crashed: {failure[0]!r}"
    return batches


@pytest.mark.scenario(SCENARIO)
def test_damaged_shards_are_skipped_and_counted(
    clean: Path, tmp_path: Path, fault_record: FaultRecord
) -> None:
    rng = fault_rng(SCENARIO)
    truth = {entry.name: [s["__key__"].decode() for s in read_shard(entry)] for entry in clean.glob("*.tar")}
    decoder = CaptionDecoder(image_size=16)
    for trial in range(trials(quick=len(DAMAGES), full=6 * len(DAMAGES))):
        kind = DAMAGES[trial % len(DAMAGES)]
        out = tmp_path / f"trial-{trial}"
        shutil.copytree(clean, out)
        damaged = _damage(out, kind, rng)
        fault_record.faults += 1
        dataset = resolve(str(out))
        workers = trial % 2
        layout = Layout((Source("train", dataset.shards),), trial, 1, BATCH, 16)
        config = StreamConfig(seed=trial, shuffle_buffer=16, warn_every_s=0)
        stream = ElasticStream(layout, 0, workers, _decode(decoder), config)
        loader = ElasticLoader(stream, _keys, BATCH)
        with _warnings(tmp_path / f"trial-{trial}.log") as log, fault_record.recovering():
            batches = _read_epoch(loader)
        loader.shutdown()

        # What the plan holds this epoch: real keys, and positions past a shard's real end.
        planned: list[str] = []
        phantom = 0
        for shard, start, stop in _epoch_pieces(dataset, layout):
            keys = truth[Path(dataset.shards[shard].url).name]
            planned += keys[start : min(stop, len(keys))]
            phantom += max(0, stop - max(start, len(keys)))
        delivered = Counter(key for batch in batches if batch is not None for key in batch)
        stats = loader.read_stats
        counted = stats["decode_errors"] + stats["unreadable_samples"] + stats["oversized_samples"]
        assert sum(delivered.values()) + counted == len(planned) + phantom, (kind, dict(stats))
        assert stats["samples"] == sum(delivered.values())
        unplanned = set(delivered) - set(planned)
        assert not unplanned, f"{kind}: delivered samples the plan does not hold: {sorted(unplanned)[:5]}"
        repeated = sum(count - 1 for count in delivered.values())
        missing = set(planned) - set(delivered)
        lost = max(0, len(missing) - (counted - phantom))
        if stats["shard_errors"]:
            assert damaged in log.read_text(), f"no warning names {damaged}:\n{log.read_text()}"
        if kind == "count_low":  # the extra samples are never silently dropped
            listed = next(s.samples for s in dataset.shards if s.url.endswith(damaged))
            assert stats["shard_errors"] == 1 and len(missing) == 0, (listed, dict(stats))
        if kind == "count_high" and phantom:
            assert stats["shard_errors"] == 1 and stats["unreadable_samples"] == phantom
        fault_record.lost += lost
        fault_record.repeated += repeated
        fault_record.trials += 1
        fault_record.survived += lost == 0 and repeated == 0
    assert fault_record.lost == 0 and fault_record.repeated == 0


@pytest.mark.scenario(SCENARIO)
def test_training_over_damaged_shards_finishes_and_counts(tmp_path: Path, fault_record: FaultRecord) -> None:
    """A real run (one loader worker): a shard cut near its start, one with corrupt bytes."""
    rng = fault_rng(SCENARIO + ":train")
    shards = convert_sample(tmp_path / "digits")
    train = shards["train"]
    listed = resolve(str(train)).shards
    order = ShardOrder.draw([shard.samples for shard in listed], 0, "train", 0).order
    first, second = int(order[0]), int(order[1])  # read first in epoch 0 under train.seed=0
    cut, corrupt = Path(listed[first].url), Path(listed[second].url)
    cut.write_bytes(cut.read_bytes()[: rng.randrange(2048, 8192)])
    data = bytearray(corrupt.read_bytes())
    for _ in range(20):  # overwrite a few payloads and headers
        at = rng.randrange(len(data) - 16)
        data[at : at + 16] = bytes(rng.randrange(256) for _ in range(16))
    corrupt.write_bytes(bytes(data))
    fault_record.faults += 2
    out = tmp_path / "run"
    overrides = tiny_overrides(
        shards,
        out,
        **{"train.max_steps": 24, "eval.every_steps": 0, "checkpoint.every_steps": 0, "log.every_steps": 24},
    )
    config = load_config(ROOT / "configs" / "alignment.yaml", overrides, model_types())
    Trainer(config, TASKS["alignment"](config)).fit()  # the run never stops: nothing to recover
    last = [m for m in read_metrics(out) if "train/loss" in m][-1]
    assert last["step"] == 24
    assert last["data/shard_errors"] >= 1 and last["data/unreadable_samples"] > 0, last
    trained = last["data/samples"]
    counted = last["data/unreadable_samples"] + last.get("data/decode_errors", 0)
    assert trained + counted == 24 * 16, last  # every planned sample trained on or counted
    fault_record.trials += 1
    fault_record.survived += 2
