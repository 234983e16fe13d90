"""--column FIELD=COLUMN and Hugging Face Image/Audio struct columns: same samples as the canonical layout."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from shardify.cli import main
from shardify.convert import ConvertOptions, convert
from shardify.sources import InputError
from tests import factories
from tests.shardify.helpers import output_files, read_manifest, read_samples, read_skipped

HF_MEDIA = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _shards(out: Path) -> dict[str, bytes]:
    return {name: data for name, data in output_files(out).items() if name.startswith("shard-")}


def _convert(source: Path, out: Path, **options: object) -> None:
    convert([str(source)], ConvertOptions(output=str(out), max_samples_per_shard=10, **options))


def _canonical_caption(tmp_path: Path, rows: list[dict]) -> Path:
    source = factories.write_parquet(tmp_path / "canonical.parquet", rows, schema=factories.CAPTION_SCHEMA)
    _convert(source, tmp_path / "canonical")
    return tmp_path / "canonical"


@pytest.fixture
def caption_rows() -> list[dict]:
    rows = factories.caption_rows(30)
    rows[4]["image_bytes"] = None
    rows[9]["image_bytes"] = b"not an image"
    return rows


def test_renamed_columns_give_the_canonical_samples(tmp_path: Path, caption_rows: list[dict]) -> None:
    renamed = [{"id": r["sample_id"], "text": r["caption"], "img": r["image_bytes"]} for r in caption_rows]
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("img", pa.binary())])
    source = factories.write_parquet(tmp_path / "renamed.parquet", renamed, schema=schema)
    columns = {"sample_id": "id", "caption": "text", "image_bytes": "img"}
    _convert(source, tmp_path / "out", columns=columns)
    canonical = _canonical_caption(tmp_path, caption_rows)
    assert _shards(tmp_path / "out") == _shards(canonical) and len(_shards(canonical)) >= 3
    assert read_manifest(tmp_path / "out")["options"]["columns"] == dict(sorted(columns.items()))
    assert "columns" not in read_manifest(canonical)["options"]  # unmapped: the fingerprint of old
    skipped = read_skipped(tmp_path / "out")
    assert [(r["row"], r["reason"]) for r in skipped] == [(4, "missing"), (9, "unidentified")]
    assert skipped == [{**r, "source": str(source)} for r in read_skipped(canonical)]


def test_qa_from_renamed_columns_and_a_mapped_field_replaces_its_namesake(tmp_path: Path) -> None:
    rows = [
        {
            "question": f"short {i}",
            "prompt": f"what is in photo {i}?",
            "response": f"answer {i}",
            "image_bytes": factories.jpeg(32, 24, seed=i),
            "extra": i,
        }
        for i in range(6)
    ]
    source = factories.write_parquet(tmp_path / "qa.parquet", rows)
    _convert(source, tmp_path / "out", columns={"question": "prompt", "answer": "response"})
    assert read_manifest(tmp_path / "out")["schema"] == "qa"
    metadata = [json.loads(s["json"]) for s in read_samples(tmp_path / "out")]
    assert metadata[2] == {"question": "what is in photo 2?", "answer": "answer 2", "extra": 2}


def test_hf_image_struct_gives_the_canonical_samples(tmp_path: Path, caption_rows: list[dict]) -> None:
    hf_rows = [
        {
            "sample_id": r["sample_id"],
            "caption": r["caption"],
            "image": None if r["image_bytes"] is None else {"bytes": r["image_bytes"], "path": f"{i}.jpg"},
        }
        for i, r in enumerate(caption_rows)
    ]
    hf_rows[5]["image"] = {"bytes": None, "path": "5.jpg"}  # only a path: the missing skip
    caption_rows[5]["image_bytes"] = None
    schema = pa.schema([("sample_id", pa.string()), ("caption", pa.string()), ("image", HF_MEDIA)])
    source = factories.write_parquet(tmp_path / "hf.parquet", hf_rows, schema=schema)
    _convert(source, tmp_path / "out", columns={"image_bytes": "image"})
    assert _shards(tmp_path / "out") == _shards(_canonical_caption(tmp_path, caption_rows))
    assert [r["row"] for r in read_skipped(tmp_path / "out") if r["reason"] == "missing"] == [4, 5]


def test_hf_audio_struct_under_the_canonical_name(tmp_path: Path) -> None:
    clips = [factories.wav(0.1, seed=i) for i in range(3)]
    rows = [{"caption": f"clip {i}", "audio_bytes": {"bytes": c, "path": None}} for i, c in enumerate(clips)]
    schema = pa.schema([("caption", pa.string()), ("audio_bytes", HF_MEDIA)])
    source = factories.write_parquet(tmp_path / "audio.parquet", rows, schema=schema)
    _convert(source, tmp_path / "out")
    samples = read_samples(tmp_path / "out")
    assert [s["wav"] for s in samples] == clips
    assert json.loads(samples[0]["json"]) == {"caption": "clip 0"}


def test_struct_without_bytes_is_an_error_naming_the_column(tmp_path: Path) -> None:
    schema = pa.schema([("caption", pa.string()), ("picture", pa.struct([("path", pa.string())]))])
    source = factories.write_parquet(
        tmp_path / "paths.parquet", [{"caption": "a", "picture": {"path": "a.jpg"}}], schema=schema
    )
    with pytest.raises(
        InputError, match=r"column picture \(image_bytes\) is a struct without a binary 'bytes'"
    ):
        _convert(source, tmp_path / "out", columns={"image_bytes": "picture"})


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--column", "colour=text"], "--column colour=text: unknown field 'colour'"),
        (["--column", "caption=text", "--column", "caption=alt"], "--column caption given twice"),
        (["--column", "caption"], "expected FIELD=COLUMN"),
        (["--column", "caption=nope"], "--column caption=nope: no column named 'nope'"),
        (
            ["--column", "question=text", "--column", "answer=text"],
            "column 'text' is given for more than one",
        ),
    ],
)
def test_bad_mappings_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    rows = [{"text": "a caption", "image_bytes": factories.jpeg(seed=1)}]
    source = factories.write_parquet(tmp_path / "in.parquet", rows)
    code = main(["parquet-to-tar", str(source), "-o", str(tmp_path / "out"), "--quiet", *arguments])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("shardify: error:") and message in error, error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "out" / "manifest.json").exists()


class _Interrupt(Exception):
    pass


def test_another_mapping_is_another_conversion(tmp_path: Path) -> None:
    rows = [
        {"text": f"short {i}", "alt": f"long {i}", "image_bytes": factories.jpeg(seed=i)} for i in range(20)
    ]
    source = factories.write_parquet(tmp_path / "in.parquet", rows)
    done, partial = tmp_path / "done", tmp_path / "partial"
    _convert(source, done, columns={"caption": "text"})
    _convert(source, done, columns={"caption": "text"})  # same mapping: already done
    with pytest.raises(InputError, match="finished conversion of other inputs or options"):
        _convert(source, done, columns={"caption": "alt"})

    def interrupt(count: int) -> None:
        raise _Interrupt

    options = ConvertOptions(
        output=str(partial), max_samples_per_shard=4, batch_rows=4, columns={"caption": "text"}
    )
    with pytest.raises(_Interrupt):
        convert([str(source)], options, on_rows=interrupt)
    with pytest.raises(InputError, match="unfinished conversion of other inputs or options"):
        _convert(source, partial, columns={"caption": "alt"})


def test_help_names_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["parquet-to-tar", "--help"])
    text = capsys.readouterr().out
    assert exited.value.code == 0
    for needle in (
        "--column FIELD=COLUMN",
        "image_sha256",
        "--fetch-workers",
        "--fetch-timeout",
        "--fetch-retries",
    ):
        assert needle in text
