"""Caption shards load in open_clip's own WebDataset pipeline, with no custom code."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardify.convert import ConvertOptions, convert
from tests import factories
from tests.shardify.helpers import read_manifest

ROOT = Path(__file__).resolve().parents[2]


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
        val_data=str(out / f"shard-000000-{{000000..{last:06d}}}.tar"),  # one input: unit 0
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


# -- open_clip's training entry point ---------------------------------------------------------

COMPAT = Path(sys.prefix) / "compat" / "webdataset-0.2.86"
"""webdataset 0.2.86, installed beside the locked version by ``./launch.sh setup``."""
TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {},
}
DRIVER = """
import json, sys, traceback
import webdataset
from open_clip_train.main import main
results = {}
for name, pattern, count in json.loads(sys.argv[1]):
    try:
        main(["--train-data", pattern, "--train-num-samples", str(count), "--dataset-type", "webdataset",
              "--batch-size", "4", "--epochs", "1", "--workers", "0", "--model", "local-dir:" + sys.argv[2],
              "--lr", "1e-3", "--warmup", "1", "--logs", sys.argv[3], "--name", name,
              "--save-frequency", "0", "--report-to", "none", "--seed", "0"])
        results[name] = "trained"
    except Exception as exc:
        results[name] = type(exc).__name__ + ": " + str(exc)
print(json.dumps({"webdataset": webdataset.__version__, "results": results}))
"""


def _train_open_clip(work: Path, shards: list[tuple[str, str, int]], pythonpath: str) -> dict:
    model = work / "tiny_clip"
    model.mkdir(exist_ok=True)
    (model / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}
    logs = work / f"logs-{abs(hash(pythonpath))}"
    process = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(shards), str(model), str(logs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])
    for name, outcome in result["results"].items():
        if outcome == "trained":  # it really stepped: every batch of the epoch logged a loss
            log = (logs / name / "out.log").read_text()
            assert "Train Epoch: 0 [24/24 (100%)]" in log and "Contrastive_loss" in log, log[-2000:]
    return result


@pytest.fixture(scope="module")
def training_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str, int]]]:
    """23 caption rows as shardify shards and as webdataset.ShardWriter shards."""
    import webdataset as wds

    work = tmp_path_factory.mktemp("open_clip_train")
    rows = factories.caption_rows(23)
    convert(
        [str(factories.write_parquet(work / "in.parquet", rows))],
        ConvertOptions(output=str(work / "ours"), max_samples_per_shard=8),
    )
    (work / "writer").mkdir()
    with wds.ShardWriter(str(work / "writer" / "shard-%06d.tar"), maxcount=8, verbose=0) as sink:
        for row in rows:
            sink.write({"__key__": row["sample_id"], "jpg": row["image_bytes"], "txt": row["caption"]})
    shards = [
        ("shardify", str(work / "ours" / "shard-000000-{000000..000002}.tar"), 23),
        ("shardwriter", str(work / "writer" / "shard-{000000..000002}.tar"), 23),
    ]
    return work, shards


@pytest.mark.full  # the suite trains open_clip on shardify shards above
def test_open_clip_training_fails_the_same_way_on_any_shards_with_the_locked_webdataset(
    training_shards,
) -> None:
    """open_clip 3.3's training pipeline reads tar members through its own
    ``group_by_keys_nothrow``, which indexes every item by ``fname``; webdataset >= 0.2.96 ends
    each shard with an end-of-file marker ``{}`` (``tar_file_expander(eof_value={})``), so the
    first shard's end raises KeyError (open_clip #935, webdataset #384). Shards that webdataset
    itself wrote fail identically: nothing in a shard can avoid it."""
    work, shards = training_shards
    result = _train_open_clip(work, shards, str(ROOT))
    assert result["webdataset"] == "1.0.2"
    assert result["results"] == {"shardify": "KeyError: 'fname'", "shardwriter": "KeyError: 'fname'"}


@pytest.mark.skipif(not COMPAT.is_dir(), reason=f"{COMPAT} missing: run ./launch.sh setup")
def test_open_clip_trains_on_shardify_shards_with_webdataset_0_2_86(training_shards) -> None:
    work, shards = training_shards
    result = _train_open_clip(work, shards, f"{COMPAT}{os.pathsep}{ROOT}")
    assert result["webdataset"] == "0.2.86"
    assert result["results"] == {"shardify": "trained", "shardwriter": "trained"}
