"""shardify index on shards it did not write: webdataset.ShardWriter and img2dataset layouts,
exact counts from headers alone, broken shards and samples, reruns, --output, and S3."""

from __future__ import annotations

import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import s3fs
import webdataset

from shardify.cli import main
from shardify.index import IndexOptions, index
from shardify.sources import InputError
from tests import factories
from tests.conftest import clear_filesystem_caches
from tests.shardify.helpers import read_manifest


def _entries(manifest: dict) -> list[tuple[str, int]]:
    return [(entry["name"], entry["samples"]) for entry in manifest["shards"]]


def _webdataset_count(shard: Path) -> int:
    """Samples as webdataset itself groups them."""
    return sum(1 for _ in webdataset.WebDataset(str(shard), shardshuffle=False, empty_check=False))


def test_shardwriter_shards_are_counted_as_webdataset_groups_them(tmp_path: Path, capsys) -> None:
    shards = factories.webdataset_shards(tmp_path / "wds", samples=25, per_shard=10)
    assert main(["index", str(tmp_path / "wds"), "-q", "--workers", "2"]) == 0
    manifest = read_manifest(tmp_path / "wds")
    assert _entries(manifest) == [(p.name, _webdataset_count(p)) for p in shards]
    assert _entries(manifest) == [("wds-000000.tar", 10), ("wds-000001.tar", 10), ("wds-000002.tar", 5)]
    assert [entry["bytes"] for entry in manifest["shards"]] == [p.stat().st_size for p in shards]
    assert manifest["schema"] == "caption" and manifest["media"] == {"jpg": 25}
    assert manifest["created_by"] == "shardify index" and manifest["samples_written"] == 25
    assert "base" not in manifest and all("broken" not in entry for entry in manifest["shards"])
    assert "25 samples in 3 shards (0 broken, 0 shards left out)" in capsys.readouterr().out
    assert not (tmp_path / "wds" / ".shardify").exists()


def test_only_tar_headers_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    payload = random.Random(0).randbytes(300_000)
    with webdataset.ShardWriter(str(folder / "big-%06d.tar"), maxcount=20, verbose=0) as sink:
        for i in range(40):
            sink.write({"__key__": f"s{i:03d}", "jpg": payload, "txt": f"c{i}", "json": {"i": i}})
    result = index([str(folder)], IndexOptions())
    assert [entry.samples for entry in result.manifest.shards] == [20, 20]
    assert result.manifest.schema == "caption"
    # Headers (ShardWriter gives each member a pax header too) and 8 json members per shard:
    # 1.5 KB per member, under 2 % of the 12 MB of shards.
    assert result.bytes_read * 50 < result.shard_bytes
    assert result.scans[0].read.bytes_skipped > result.scans[0].size * 0.95


def test_img2dataset_layout_counts_shards_and_ignores_the_sidecars(tmp_path: Path) -> None:
    folder = tmp_path / "img2"
    factories.img2dataset_shards(folder, shards=2, per_shard=7)
    assert {p.suffix for p in folder.iterdir()} == {".tar", ".json", ".parquet"}
    assert main(["index", f"{folder}/{{00000..00001}}.tar", "-q"]) == 0
    manifest = read_manifest(folder)
    assert _entries(manifest) == [("00000.tar", 7), ("00001.tar", 7)]
    assert manifest["schema"] == "caption" and manifest["media"] == {"jpg": 14}


def test_question_answer_json_makes_a_qa_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "qa"
    folder.mkdir()
    with webdataset.ShardWriter(str(folder / "qa-%06d.tar"), maxcount=50, verbose=0) as sink:
        for i in range(6):
            meta = {"sample_id": f"q{i}", "question": "what?", "answer": str(i)}
            sink.write({"__key__": f"q{i:03d}", "jpg": factories.jpeg(8, 8, seed=i), "json": meta})
    assert index([str(folder / "*.tar")], IndexOptions()).manifest.schema == "qa"


def _broken_set(folder: Path) -> dict[str, str]:
    """Two good shards (one with two undecodable images) and three that cannot be counted."""
    good = factories.webdataset_shards(folder, samples=20, per_shard=10)
    with webdataset.ShardWriter(str(folder / "bad-images-%06d.tar"), maxcount=50, verbose=0) as sink:
        for i in range(6):
            image = factories.jpeg(16, 12, seed=i)
            image = {1: b"<html>403</html>", 4: image[: len(image) // 2]}.get(i, image)
            sink.write({"__key__": f"b{i}", "jpg": image, "txt": "c", "json": {"sample_id": f"b{i}"}})
    data = good[0].read_bytes()
    (folder / "truncated.tar").write_bytes(data[: len(data) // 2])
    (folder / "not-a-tar.tar").write_bytes(b"PAR1" + bytes(range(256)) * 8)
    with tarfile.open(folder / "keyless.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        factories.add_member(tar, "k1.jpg", factories.jpeg(8, 8))
        factories.add_member(tar, "k1.txt", b"a caption")
        factories.add_member(tar, "images/.jpg", factories.jpeg(8, 8))
    return {"truncated.tar": "truncated", "not-a-tar.tar": "not a tar", "keyless.tar": "no key"}


def test_broken_shards_fail_the_run_and_check_leaves_them_out(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mixed"
    bad = _broken_set(folder)
    assert main(["index", str(folder), "-q"]) == 1
    errors = capsys.readouterr().err
    for name, problem in bad.items():
        assert any(name in line and problem in line for line in errors.splitlines()), (name, errors)
    assert "bad-images" not in errors  # undecodable images are no reason to fail without --check
    assert not (folder / "manifest.json").exists()

    assert main(["index", str(folder), "--check"]) == 0
    out = capsys.readouterr().out
    manifest = read_manifest(folder)
    assert _entries(manifest) == [
        ("bad-images-000000.tar", 6),
        ("wds-000000.tar", 10),
        ("wds-000001.tar", 10),
    ]
    assert manifest["shards"][0]["broken"] == ["b1", "b4"]
    assert manifest["rows_skipped"] == 2 and sum(manifest["skipped_by_reason"].values()) == 2
    assert all("broken" not in entry for entry in manifest["shards"][1:])
    for name in bad:
        assert f"left out: {folder / name}" in out


def test_a_rerun_writes_the_same_manifest_and_a_foreign_one_is_kept(tmp_path: Path) -> None:
    folder = tmp_path / "again"
    factories.webdataset_shards(folder, samples=12, per_shard=5)
    assert main(["index", str(folder), "-q"]) == 0
    first = (folder / "manifest.json").read_bytes()
    assert main(["index", str(folder), "-q", "--workers", "1"]) == 0
    assert (folder / "manifest.json").read_bytes() == first
    converted = tmp_path / "converted"
    shutil.copytree(folder, converted)
    foreign = json.loads(first) | {"created_by": "shardify"}
    (converted / "manifest.json").write_text(json.dumps(foreign))
    assert main(["index", str(converted), "-q"]) == 2
    assert json.loads((converted / "manifest.json").read_text()) == foreign


def test_output_elsewhere_names_the_shards_location(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    factories.webdataset_shards(folder, samples=8, per_shard=4)
    before = sorted(p.name for p in folder.iterdir())
    assert main(["index", str(folder / "wds-*.tar"), "--output", str(tmp_path / "out"), "-q"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == before
    manifest = read_manifest(tmp_path / "out")
    assert manifest["base"] == str(folder) and _entries(manifest) == [
        ("wds-000000.tar", 4),
        ("wds-000001.tar", 4),
    ]


@pytest.mark.s3
def test_s3_prefix_indexed_into_output_with_ranged_reads(
    s3_bucket: str, s3_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env.endpoint}, skip_instance_cache=True)
    local = tmp_path / "local"
    factories.webdataset_shards(local, samples=15, per_shard=10)
    payload = random.Random(1).randbytes(3 << 20)
    with webdataset.ShardWriter(str(local / "large-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(4):
            sink.write({"__key__": f"l{i}", "jpg": payload, "json": {"caption": "large"}})
    for path in sorted(local.glob("*.tar")):
        fs.put_file(str(path), f"{s3_bucket}/public/{path.name}")
    listed = sorted(fs.ls(f"{s3_bucket}/public", refresh=True))
    # From here on the prefix is read-only: credentials that may only read and list.
    for name, value in s3_env.environment(read_only=True).items():
        monkeypatch.setenv(name, value)
    clear_filesystem_caches()
    with pytest.raises(InputError, match="pass --output DIR"):
        index([f"s3://{s3_bucket}/public/"], IndexOptions())
    result = index([f"s3://{s3_bucket}/public/"], IndexOptions(output=str(tmp_path / "out")))
    assert sorted(fs.ls(f"{s3_bucket}/public", refresh=True)) == listed  # nothing written there
    manifest = read_manifest(tmp_path / "out")
    assert manifest["base"] == f"s3://{s3_bucket}/public"
    assert _entries(manifest) == [("large-000000.tar", 4), ("wds-000000.tar", 10), ("wds-000001.tar", 5)]
    large = result.scans[0]
    # Seeks are range requests: 1 MB per header (the store's cost of one request), not the 12 MB.
    assert large.read.bytes_read <= 4 * (1 << 20) + 65536 < large.size // 2
    assert large.read.bytes_skipped > 8 * (1 << 20)


def test_an_interrupted_index_scans_only_what_it_had_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardify import index as indexing

    factories.webdataset_shards(tmp_path / "shards", samples=60, per_shard=10)
    scanned: list[str] = []
    real_scan = indexing.scan_shard

    def counting_scan(url: str, size: int, options: IndexOptions):
        scanned.append(url)
        return real_scan(url, size, options)

    monkeypatch.setattr(indexing, "scan_shard", counting_scan)

    def interrupt_after_three(scan) -> None:
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(scan.url)

    seen: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        index([str(tmp_path / "shards")], IndexOptions(workers=1), on_shard=interrupt_after_three)
    assert not (tmp_path / "shards" / "manifest.json").exists()
    first_run = list(scanned)
    scanned.clear()
    result = index([str(tmp_path / "shards")], IndexOptions(workers=1))
    assert len(result.scans) == 6 and result.manifest.samples_written == 60
    assert not set(scanned) & set(first_run[:3])  # the three finished scans were not redone
    assert not (tmp_path / "shards" / ".shardify").exists()
    reference = tmp_path / "reference"
    shutil.copytree(tmp_path / "shards", reference, ignore=shutil.ignore_patterns("manifest.json"))
    index([str(reference)], IndexOptions(workers=2))
    assert read_manifest(reference)["shards"] == read_manifest(tmp_path / "shards")["shards"]
