"""Outputs of the format-1 layout (one run of shards across all inputs, ``shard-000000.tar``):
the trainer reads them as they are; the current shardify refuses to add to them, saying why.

``tests/data/format1`` and ``tests/data/format1-unfinished`` were written by the shardify of
commit d9a73aa (format 1): 12 caption rows of 8x8 JPEGs, row 4 not an image, 5 samples per shard;
the unfinished one was stopped after its second shard. Only the input's path was shortened.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from streamtrain.config import DataConfig, EvalConfig
from streamtrain.data.collate import collate_alignment
from streamtrain.data.decoders import CaptionDecoder
from streamtrain.data.pipeline import held_out_reader, resolve_sources
from streamtrain.data.shards import resolve
from tests import factories

DATA = Path(__file__).resolve().parent.parent / "data"


def test_a_format_1_output_is_read_by_the_trainer_with_its_checksums() -> None:
    source = resolve(str(DATA / "format1"))
    assert [(Path(shard.url).name, shard.samples) for shard in source.shards] == [
        ("shard-000000.tar", 5),
        ("shard-000001.tar", 5),
        ("shard-000002.tar", 1),
    ]
    assert source.schema == "caption" and source.samples == 11
    ids, counts = [], Counter()
    reader = held_out_reader(
        DataConfig(train=str(DATA / "format1"), num_workers=0),
        EvalConfig(batch_size=4),
        resolve_sources(str(DATA / "format1")),
        rank=0,
        world_size=1,
        decode=CaptionDecoder(image_size=16, train=False),
        collate=collate_alignment,
    )
    for batch, batch_counts in reader.batches():
        ids += batch["sample_ids"]
        counts.update(batch_counts)
    assert sorted(ids) == [f"img-{row:05d}" for row in range(12) if row != 4]
    assert counts["samples"] == 11 and counts["checksum_errors"] == 0 and counts["decode_errors"] == 0


@pytest.mark.parametrize(
    "fixture, message",
    [
        ("format1", "holds a finished conversion by an older shardify (manifest format 1"),
        ("format1-unfinished", "holds an unfinished conversion begun by an older shardify"),
    ],
)
def test_converting_into_a_format_1_output_is_refused_and_changes_nothing(
    fixture: str, message: str, tmp_path: Path
) -> None:
    out = tmp_path / fixture
    shutil.copytree(DATA / fixture, out)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    factories.write_parquet(tmp_path / "train.parquet", factories.caption_rows(12, size=(8, 8)))
    command = [sys.executable, "-m", "shardify", "parquet-to-tar", str(tmp_path / "train.parquet")]
    result = subprocess.run([*command, "-o", str(out), "--quiet"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"shardify: error: {out} {message}"), result.stderr
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before

    replaced = subprocess.run([*command, "-o", str(out), "--quiet", "--overwrite"], capture_output=True)
    assert replaced.returncode == 0, replaced.stderr
    names = sorted(path.name for path in out.iterdir())
    assert names == [
        "manifest.json",
        "shard-000000-000000.tar",
        "shard-000000-000000.tar.crc32.json",
        "skipped.jsonl",
    ]
