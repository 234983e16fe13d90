"""Training on shards streamtrain did not write, after ``shardify index``: sample ids from the
json's sample_id or the tar key, captions from .txt, broken samples skipped undecoded and
counted, and a manifest written elsewhere (``--output``) that names shards on S3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import s3fs
import webdataset

from shardify.cli import main
from streamtrain.config import DataConfig
from streamtrain.data.decoders import CaptionDecoder
from streamtrain.data.pipeline import resolve_sources, train_loader
from tests import factories


def _collate(samples: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {"ids": [s["sample_id"] for s in samples], "texts": [s["text"] for s in samples]}


def _epoch(train: Any, batch: int) -> tuple[dict[str, str], dict[str, int]]:
    """One epoch of the real training stream as {sample_id: caption}, and its read counts."""
    dataset = resolve_sources(train)
    loader = train_loader(
        DataConfig(train=train, num_workers=0, shuffle_buffer=8),
        dataset,
        rank=0,
        world_size=1,
        batch_size=batch,
        seed=0,
        decode=CaptionDecoder(image_size=16, train=False),
        collate=_collate,
    )
    seen: dict[str, str] = {}
    for _ in range(dataset.samples // batch):
        step = next(loader) or {"ids": [], "texts": []}
        for sample_id, text in zip(step["ids"], step["texts"], strict=True):
            assert sample_id not in seen
            seen[sample_id] = text
    stats = dict(loader.read_stats)
    loader.shutdown()
    return seen, stats


def test_shardwriter_and_img2dataset_shards_train_after_index(tmp_path: Path) -> None:
    factories.webdataset_shards(tmp_path / "wds", samples=25, per_shard=10)
    factories.img2dataset_shards(tmp_path / "img2", shards=2, per_shard=7)
    assert main(["index", str(tmp_path / "wds"), "-q"]) == 0
    assert main(["index", str(tmp_path / "img2"), "-q"]) == 0
    seen, stats = _epoch([str(tmp_path / "wds"), str(tmp_path / "img2" / "manifest.json")], batch=3)
    expected = {f"wds-id-{i}": f"wds caption {i}" for i in range(25)}
    # img2dataset's json has no sample_id: the tar key is the id; the caption is the .txt.
    expected |= {f"{s:05d}{r:04d}": f"img2 {s:05d}{r:04d}" for s in range(2) for r in range(7)}
    assert seen == expected
    assert stats["samples"] == 39 and not stats.get("decode_errors")


def test_broken_samples_found_by_check_are_skipped_and_counted(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    with webdataset.ShardWriter(str(folder / "b-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(20):
            image = factories.jpeg(16, 12, seed=i)
            image = {3: b"<html>403 Forbidden</html>", 14: image[: len(image) // 2]}.get(i, image)
            sink.write(
                {"__key__": f"k{i:03d}", "jpg": image, "txt": f"c{i}", "json": {"sample_id": f"id{i}"}}
            )
    assert main(["index", str(folder), "--check", "-q"]) == 0
    seen, stats = _epoch(str(folder), batch=4)
    assert set(seen) == {f"id{i}" for i in range(20)} - {"id3", "id14"}
    # Never handed to the decoder: without the manifest's list they would be decode errors.
    assert stats["broken_samples"] == 2 and not stats.get("decode_errors") and stats["samples"] == 18


@pytest.mark.s3
def test_s3_shards_train_from_an_output_manifest(s3_bucket: str, s3_env, tmp_path: Path) -> None:
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env.endpoint}, skip_instance_cache=True)
    for path in factories.webdataset_shards(tmp_path / "local", samples=12, per_shard=5):
        fs.put_file(str(path), f"{s3_bucket}/readonly/{path.name}")
    out = tmp_path / "index"
    assert main(["index", f"s3://{s3_bucket}/readonly/wds-{{000000..000002}}.tar", "-o", str(out), "-q"]) == 0
    assert resolve_sources(str(out)).shards[0].url == f"s3://{s3_bucket}/readonly/wds-000000.tar"
    seen, stats = _epoch(str(out / "manifest.json"), batch=4)
    assert seen == {f"wds-id-{i}": f"wds caption {i}" for i in range(12)} and stats["samples"] == 12
