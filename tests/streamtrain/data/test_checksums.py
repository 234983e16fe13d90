"""Every member verified at read time: shardify records a CRC-32 of each member it writes, the
training and held-out streams skip (and count) a sample whose bytes changed — even when they still
decode — and shards without checksums still read. ``shardify index --check`` adds checksums to
shards written elsewhere."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from shardify.convert import ConvertOptions, convert
from shardify.index import IndexOptions, index
from streamtrain.config import DataConfig, EvalConfig
from streamtrain.data.collate import collate_alignment
from streamtrain.data.decoders import CaptionDecoder
from streamtrain.data.pipeline import held_out_reader, resolve_sources, train_loader
from tests import factories

ROWS = 24


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("checksums")
    factories.write_parquet(folder / "rows.parquet", factories.caption_rows(ROWS, size=(64, 48)))
    convert(
        [str(folder / "rows.parquet")], ConvertOptions(output=str(folder / "out"), max_samples_per_shard=8)
    )
    return folder / "out"


def flip_byte(shard: Path, member_suffix: str, nth: int = 0) -> str:
    """Flip one bit in the middle of the ``nth`` member ending in ``member_suffix``; its key."""
    with tarfile.open(shard) as archive:
        member = [m for m in archive.getmembers() if m.name.endswith(member_suffix)][nth]
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return member.name.split(".", 1)[0]


@pytest.fixture
def damaged(clean: Path, tmp_path: Path) -> tuple[Path, set[str]]:
    """A copy of the shards with one bit flipped in an image, a caption and a json member."""
    out = tmp_path / "damaged"
    shutil.copytree(clean, out)
    keys = {
        flip_byte(out / "shard-000000-000000.tar", ".jpg", 1),
        flip_byte(out / "shard-000000-000001.tar", ".txt", 2),
        flip_byte(out / "shard-000000-000002.tar", ".json", 3),
    }
    return out, keys


def one_epoch(shards: Path, rows: int = ROWS) -> tuple[list[str], Counter[str]]:
    """The sample ids of one epoch through the training loader, and its read counts."""
    loader = train_loader(
        DataConfig(train=str(shards), num_workers=1, shuffle_buffer=4),
        resolve_sources(str(shards)),
        rank=0,
        world_size=1,
        batch_size=4,
        seed=0,
        decode=CaptionDecoder(image_size=16, train=False),
        collate=collate_alignment,
    )
    ids = []
    for _ in range(rows // 4):
        batch = next(loader)
        ids += batch["sample_ids"] if batch is not None else []
    stats = Counter(loader.read_stats)
    loader.shutdown()
    return ids, stats


def test_shardify_records_a_checksum_of_every_member(clean: Path) -> None:
    manifest = json.loads((clean / "manifest.json").read_text())
    assert manifest["checksums"] == "crc32"
    for entry in manifest["shards"]:
        recorded = json.loads((clean / f"{entry['name']}.crc32.json").read_text())
        with tarfile.open(clean / entry["name"]) as archive:
            names = [m.name for m in archive.getmembers()]
        assert recorded["algorithm"] == "crc32" and list(recorded["members"]) == names


def test_a_flipped_byte_in_each_member_kind_is_a_counted_skip(damaged: tuple[Path, set[str]]) -> None:
    shards, keys = damaged
    ids, stats = one_epoch(shards)
    assert stats["checksum_errors"] == 3 and stats["decode_errors"] == 0
    assert stats["samples"] == ROWS - 3 and len(ids) == ROWS - 3
    damaged_ids = {f"img-{int(key.split('-')[1]):05d}" for key in keys}
    assert not damaged_ids & set(ids)  # sample_id of row r is img-0000r


def test_held_out_batches_verify_too(damaged: tuple[Path, set[str]]) -> None:
    shards, _ = damaged
    counts: Counter[str] = Counter()
    reader = held_out_reader(
        DataConfig(train=str(shards), num_workers=0),
        EvalConfig(batch_size=5),
        resolve_sources(str(shards)),
        rank=0,
        world_size=1,
        decode=CaptionDecoder(image_size=16, train=False),
        collate=collate_alignment,
    )
    for _, batch_counts in reader.batches():
        counts.update(batch_counts)
    assert counts["checksum_errors"] == 3 and counts["samples"] == ROWS - 3


def test_shards_without_checksums_still_read(damaged: tuple[Path, set[str]], tmp_path: Path) -> None:
    """An older output (no checksum files, no manifest field): read as before, damage and all."""
    shards, _ = damaged
    older = tmp_path / "older"
    shutil.copytree(shards, older, ignore=shutil.ignore_patterns("*.crc32.json"))
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["checksums"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    _, stats = one_epoch(older)
    assert stats["checksum_errors"] == 0 and stats["samples"] + stats["decode_errors"] == ROWS


def test_a_missing_checksum_file_reads_the_shard_unverified(damaged: tuple[Path, set[str]]) -> None:
    shards, _ = damaged
    (shards / "shard-000000-000000.tar.crc32.json").unlink()
    _, stats = one_epoch(shards)
    assert stats["checksum_errors"] == 2  # the two damaged shards that still have theirs
    assert stats["samples"] + stats["decode_errors"] == ROWS - 2


def test_index_check_adds_checksums_to_foreign_shards(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    shards = factories.webdataset_shards(foreign, 12, 6)
    out = tmp_path / "index"
    index([str(foreign)], IndexOptions(output=str(out), check=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checksums"] == "crc32" and (out / f"{shards[1].name}.crc32.json").is_file()
    assert not list(foreign.glob("*.crc32.json"))  # nothing written beside read-only shards
    flip_byte(shards[1], ".jpg", 0)
    ids, stats = one_epoch(out, 12)
    assert stats["checksum_errors"] == 1 and len(ids) == 11
