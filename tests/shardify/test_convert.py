"""parquet-to-tar end to end on local files: contents, counts, naming, limits, determinism."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest

from shardify.convert import ConvertOptions, convert
from shardify.sources import InputError
from tests import factories
from tests.shardify.helpers import output_files, read_manifest, read_samples, read_shard, read_skipped


def _mixed_rows() -> list[dict]:
    """Caption rows with every kind of corruption and awkward ids mixed in."""
    rows = factories.caption_rows(120)
    for i, (data, _) in enumerate(factories.corrupt_images().values()):
        rows[1 + i * 2]["image_bytes"] = data
    for i, data in enumerate(factories.unusual_images().values()):
        rows[30 + i * 2]["image_bytes"] = data
    rows[100]["caption"] = None
    rows[101]["caption"] = ""
    rows[102]["sample_id"] = "dots.in.id/and slashes/ spaces"
    rows[103]["sample_id"] = "dots.in.id/and slashes/ spaces"
    rows[104]["sample_id"] = None
    rows[105]["caption"] = "日本語のキャプション — ünïcödé 🚀 " + "long " * 20000
    return rows


@pytest.fixture
def mixed_parquet(tmp_path: Path) -> Path:
    return factories.write_parquet(
        tmp_path / "mixed.parquet", _mixed_rows(), row_group_size=16, schema=factories.CAPTION_SCHEMA
    )


def _convert(inputs: list[Path | str], out: Path, **options) -> None:
    convert([str(p) for p in inputs], ConvertOptions(output=str(out), **options))


def test_counts_reconcile_and_manifest_is_exact(mixed_parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _convert([mixed_parquet], out, max_samples_per_shard=25, workers=2)
    manifest = read_manifest(out)
    skipped = read_skipped(out)
    expected_skips = {name: reason for name, (_, reason) in factories.corrupt_images().items()}
    assert manifest["format_version"] == 2
    assert manifest["rows_read"] == 120
    assert manifest["rows_read"] == manifest["samples_written"] + manifest["rows_skipped"]
    assert manifest["rows_skipped"] == len(skipped) == len(expected_skips) + 2
    reasons = {}
    for record in skipped:
        reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
        assert set(record) == {"sample_id", "source", "row", "reason", "detail"}
        assert record["source"] == str(mixed_parquet)
    assert reasons == manifest["skipped_by_reason"]
    assert reasons["missing_text"] == 2
    for entry in manifest["shards"]:
        assert len(read_shard(out / entry["name"])) == entry["samples"]
        assert (out / entry["name"]).stat().st_size == entry["bytes"]
    assert [e["samples"] for e in manifest["shards"]] == [25, 25, 25, 25, manifest["samples_written"] - 100]
    assert manifest["schema"] == "caption" and manifest["inputs"] == [str(mixed_parquet)]
    assert manifest["options"]["max_samples_per_shard"] == 25
    sums = [e["name"] + ".crc32.json" for e in manifest["shards"]]
    assert manifest["checksums"] == "crc32"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [e["name"] for e in manifest["shards"]] + sums + ["manifest.json", "skipped.jsonl"]
    )


def test_skipped_rows_name_their_row_and_id(mixed_parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _convert([mixed_parquet], out)
    by_row = {r["row"]: r for r in read_skipped(out)}
    assert by_row[1] == {**by_row[1], "sample_id": "img-00001", "reason": "missing"}
    assert by_row[100]["reason"] == "missing_text" and "caption" in by_row[100]["detail"]


def test_sample_members_and_original_bytes(mixed_parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _convert([mixed_parquet], out)
    rows = _mixed_rows()
    samples = read_samples(out)
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)
    for sample in samples:
        key = sample["__key__"].decode()
        assert "." not in key and "/" not in key and " " not in key
        meta = json.loads(sample["json"])
        row = rows[int(key.split("-")[1])]
        assert meta == {"sample_id": row["sample_id"], "caption": row["caption"]}
        assert sample["txt"].decode("utf-8") == row["caption"]
        images = [ext for ext in sample if ext not in ("__key__", "txt", "json")]
        assert len(images) == 1
        assert sample[images[0]] == row["image_bytes"]  # untouched, never re-encoded
    by_id = [json.loads(s["json"])["sample_id"] for s in samples]
    assert by_id.count("dots.in.id/and slashes/ spaces") == 2
    assert None in by_id
    extensions = {ext for s in samples for ext in s} - {"__key__", "txt", "json"}
    assert extensions == {"jpg", "png", "gif", "bmp", "tiff", "webp"}


def test_unusual_formats_can_be_transcoded_for_web_readers(mixed_parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _convert([mixed_parquet], out, transcode_uncommon=True)
    samples = read_samples(out)
    extensions = {ext for s in samples for ext in s} - {"__key__", "txt", "json"}
    assert extensions == {"jpg", "png", "webp"}
    assert read_manifest(out)["media"]["png"] > 2


def test_same_output_whatever_the_worker_count(mixed_parquet: Path, tmp_path: Path) -> None:
    second = factories.write_parquet(
        tmp_path / "second.parquet", factories.caption_rows(50, start=500), row_group_size=7
    )
    outputs = []
    for workers in (1, 2, 5):
        out = tmp_path / f"out{workers}"
        _convert(
            [mixed_parquet, second], out, workers=workers, max_samples_per_shard=30, batch_rows=5 + workers
        )
        outputs.append(output_files(out))
    assert outputs[0] == outputs[1] == outputs[2]


def test_shard_byte_limit(tmp_path: Path) -> None:
    source = factories.write_parquet(tmp_path / "in.parquet", factories.caption_rows(60, size=(64, 64)))
    out = tmp_path / "out"
    limit = 30_000
    _convert([source], out, max_shard_bytes=limit)
    shards = read_manifest(out)["shards"]
    assert len(shards) > 3
    assert all(entry["bytes"] <= limit for entry in shards)
    assert sum(e["samples"] for e in shards) == 60


def test_a_sample_larger_than_the_byte_limit_gets_its_own_shard(tmp_path: Path) -> None:
    source = factories.write_parquet(tmp_path / "in.parquet", factories.caption_rows(3, size=(64, 64)))
    out = tmp_path / "out"
    _convert([source], out, max_shard_bytes=1000)
    assert [e["samples"] for e in read_manifest(out)["shards"]] == [1, 1, 1]


def test_qa_schema_detected_and_written(tmp_path: Path) -> None:
    rows = [
        {
            "question": f"What is shown in picture {i}?",
            "answer": f"pattern {i}",
            "image_bytes": factories.jpeg(seed=i),
            "source_dataset": "pixmo-ask",
            "score": i / 10,
        }
        for i in range(10)
    ]
    rows[4]["answer"] = None
    source = factories.write_parquet(tmp_path / "qa.parquet", rows)
    out = tmp_path / "out"
    _convert([source], out)
    manifest = read_manifest(out)
    assert manifest["schema"] == "qa" and manifest["samples_written"] == 9
    assert read_skipped(out)[0]["reason"] == "missing_text" and read_skipped(out)[0]["sample_id"] is None
    sample = read_samples(out)[0]
    assert set(sample) == {"__key__", "jpg", "json"}
    assert json.loads(sample["json"]) == {k: v for k, v in rows[0].items() if k != "image_bytes"}


def test_audio_beside_and_instead_of_images(tmp_path: Path) -> None:
    rows = [
        {
            "sample_id": "both",
            "caption": "a tone",
            "image_bytes": factories.jpeg(),
            "audio_bytes": factories.wav(),
        },
        {
            "sample_id": "audio-only",
            "caption": "a flac tone",
            "image_bytes": None,
            "audio_bytes": factories.wav(fmt="FLAC"),
        },
        {
            "sample_id": "image-only",
            "caption": "a picture",
            "image_bytes": factories.jpeg(),
            "audio_bytes": None,
        },
        {"sample_id": "neither", "caption": "nothing", "image_bytes": None, "audio_bytes": None},
        {
            "sample_id": "bad-audio",
            "caption": "noise",
            "image_bytes": factories.jpeg(),
            "audio_bytes": b"RIFFxxxx",
        },
        {
            "sample_id": "mp3",
            "caption": "mp3 tone",
            "image_bytes": None,
            "audio_bytes": factories.wav(fmt="MP3"),
        },
    ]
    source = factories.write_parquet(tmp_path / "av.parquet", rows)
    out = tmp_path / "out"
    _convert([source], out)
    samples = {json.loads(s["json"])["sample_id"]: s for s in read_samples(out)}
    assert set(samples["both"]) == {"__key__", "jpg", "wav", "txt", "json"}
    assert set(samples["audio-only"]) == {"__key__", "flac", "txt", "json"}
    assert set(samples["mp3"]) == {"__key__", "mp3", "txt", "json"}
    assert samples["both"]["wav"] == rows[0]["audio_bytes"]
    skipped = {r["sample_id"]: r["reason"] for r in read_skipped(out)}
    assert skipped == {"neither": "missing", "bad-audio": "unidentified"}


def test_extra_and_typed_columns_survive_in_json(tmp_path: Path) -> None:
    schema = pa.schema(
        [
            ("sample_id", pa.int64()),
            ("caption", pa.string()),
            ("image_bytes", pa.binary()),
            ("tags", pa.list_(pa.string())),
            ("meta", pa.struct([("w", pa.int32())])),
            ("when", pa.timestamp("s")),
            ("thumb", pa.binary()),
        ]
    )
    rows = [
        {
            "sample_id": 7,
            "caption": "c",
            "image_bytes": factories.jpeg(),
            "tags": ["a", "b"],
            "meta": {"w": 3},
            "when": 0,
            "thumb": b"\x00\x01",
        }
    ]
    source = factories.write_parquet(tmp_path / "typed.parquet", rows, schema=schema)
    out = tmp_path / "out"
    _convert([source], out)
    meta = json.loads(read_samples(out)[0]["json"])
    assert meta == {
        "sample_id": 7,
        "caption": "c",
        "tags": ["a", "b"],
        "meta": {"w": 3},
        "when": "1970-01-01 00:00:00",
    }


def test_directories_and_globs_expand_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    factories.write_parquet(tmp_path / "in" / "b.parquet", factories.caption_rows(3, start=10))
    factories.write_parquet(tmp_path / "in" / "sub" / "a.parquet", factories.caption_rows(2, start=20))
    factories.write_parquet(tmp_path / "in" / "a.parquet", factories.caption_rows(4))
    out = tmp_path / "out"
    _convert([tmp_path / "in"], out)
    assert read_manifest(out)["inputs"] == [
        str(tmp_path / "in" / n) for n in ("a.parquet", "b.parquet", "sub/a.parquet")
    ]
    out2 = tmp_path / "out2"
    _convert([str(tmp_path / "in" / "*.parquet")], out2)
    assert read_manifest(out2)["rows_read"] == 7


def test_rerun_is_a_no_op_and_other_inputs_are_refused(mixed_parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _convert([mixed_parquet], out)
    before = output_files(out)
    result = convert([str(mixed_parquet)], ConvertOptions(output=str(out)))
    assert result.already_complete and output_files(out) == before
    other = factories.write_parquet(tmp_path / "other.parquet", factories.caption_rows(5))
    with pytest.raises(InputError, match="--overwrite"):
        _convert([other], out)
    assert output_files(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no work folder left behind
    _convert([other], out, overwrite=True)
    assert read_manifest(out)["rows_read"] == 5
    assert len(list(out.glob("*.tar"))) == 1


def test_foreign_shards_in_output_are_not_clobbered(tmp_path: Path) -> None:
    source = factories.write_parquet(tmp_path / "in.parquet", factories.caption_rows(3))
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000-000000.tar").write_bytes(b"someone else's data")
    with pytest.raises(InputError, match="already holds"):
        _convert([source], out)
    assert (out / "shard-000000-000000.tar").read_bytes() == b"someone else's data"


def test_webdataset_reads_the_shards(mixed_parquet: Path, tmp_path: Path) -> None:
    import webdataset as wds

    out = tmp_path / "out"
    _convert([mixed_parquet], out, max_samples_per_shard=40)
    urls = [str(out / e["name"]) for e in read_manifest(out)["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    seen = 0
    for sample in dataset:
        image_key = next(
            k for k in sample if k not in ("__key__", "__url__", "__local_path__", "txt", "json")
        )
        sample[image_key].load() if hasattr(sample[image_key], "load") else None
        assert isinstance(sample["txt"], str) and isinstance(sample["json"], dict)
        seen += 1
    assert seen == read_manifest(out)["samples_written"]


def test_tar_is_readable_by_plain_tarfile_with_fixed_metadata(mixed_parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _convert([mixed_parquet], out)
    with tarfile.open(out / "shard-000000-000000.tar") as tar:
        members = tar.getmembers()
    assert all(m.isfile() and m.mtime == 946684800 and m.uid == 0 and len(m.name) < 100 for m in members)
