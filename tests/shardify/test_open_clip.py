"""Caption shards load in open_clip's own WebDataset pipeline, with no custom code."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from shardify.convert import ConvertOptions, convert
from tests import factories
from tests.shardify.helpers import read_manifest


@pytest.mark.parametrize("transcode", [False, True])
def test_open_clip_reads_every_sample(tmp_path: Path, transcode: bool) -> None:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    rows = factories.caption_rows(23)
    unusual = factories.unusual_images()
    rows[1]["image_bytes"] = unusual["rgba_png"]
    rows[2]["image_bytes"] = unusual["webp"]
    rows[3]["image_bytes"] = unusual["cmyk_jpg"]
    rows[4]["image_bytes"] = unusual["gif"]
    rows[5]["image_bytes"] = b"corrupt"
    source = factories.write_parquet(tmp_path / "in.parquet", rows)
    out = tmp_path / "out"
    convert(
        [str(source)], ConvertOptions(output=str(out), max_samples_per_shard=8, transcode_uncommon=transcode)
    )
    manifest = read_manifest(out)
    last = len(manifest["shards"]) - 1
    args = argparse.Namespace(
        val_data=str(out / f"shard-{{000000..{last:06d}}}.tar"),
        val_num_samples=manifest["samples_written"],
        batch_size=4,
        workers=0,
    )
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.get_tokenizer("RN50")
    data = get_wds_dataset(args, preprocess, is_train=False, tokenizer=tokenizer)
    images = 0
    for image_batch, text_batch in data.dataloader:
        assert image_batch.shape[1:] == (3, 32, 32) and text_batch.shape[0] == image_batch.shape[0]
        images += image_batch.shape[0]
    # open_clip reads jpg/png/jpeg/webp only: a GIF is invisible to it unless transcoded.
    assert images == manifest["samples_written"] - (0 if transcode else 1)
    assert manifest["samples_written"] == 22
