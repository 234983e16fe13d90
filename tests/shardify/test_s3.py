"""S3 in and out against a real S3 server (SeaweedFS) on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs

from tests import factories
from tests.shardify.helpers import committed_rows, output_files

pytestmark = pytest.mark.s3


def _fs(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def _shardify(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardify", "parquet-to-tar", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def _inputs(tmp_path: Path, rows: int = 60) -> Path:
    local = tmp_path / "in"
    local.mkdir()
    data = factories.caption_rows(rows)
    data[7]["image_bytes"] = data[7]["image_bytes"][:100]
    factories.write_parquet(local / "a.parquet", data[: rows // 2], row_group_size=8)
    factories.write_parquet(local / "b.parquet", data[rows // 2 :], row_group_size=8)
    return local


def test_s3_round_trip_matches_local_conversion(s3_bucket: str, s3_env, tmp_path: Path) -> None:
    fs = _fs(s3_env.endpoint)
    local = _inputs(tmp_path)
    for name in ("a.parquet", "b.parquet"):
        fs.put_file(str(local / name), f"{s3_bucket}/pixmo/{name}")
    result = _shardify(
        f"s3://{s3_bucket}/pixmo/", "-o", f"s3://{s3_bucket}/shards", "--max-samples-per-shard", "20"
    )
    assert result.returncode == 0, result.stderr
    reference = tmp_path / "local-out"
    assert _shardify(str(local), "-o", str(reference), "--max-samples-per-shard", "20").returncode == 0
    download = tmp_path / "download"
    fs.get(f"{s3_bucket}/shards/", str(download), recursive=True)
    remote_files = output_files(download)
    local_files = output_files(reference)
    assert (
        sorted(remote_files)
        == sorted(local_files)
        == [
            "manifest.json",
            # one unit per input, two shards each: 29 samples (one truncated image) and 30
            *[
                f"shard-00000{unit}-00000{part}.tar{suffix}"
                for unit in range(2)
                for part in range(2)
                for suffix in ("", ".crc32.json")
            ],
            "skipped.jsonl",
        ]
    )
    for name in local_files:
        if name.endswith(".tar"):
            assert remote_files[name] == local_files[name]
    assert b"s3://" + s3_bucket.encode() + b"/pixmo/a.parquet" in remote_files["manifest.json"]
    assert b'"truncated"' in remote_files["skipped.jsonl"]
    glob_run = _shardify(
        f"s3://{s3_bucket}/pixmo/*.parquet",
        "-o",
        f"s3://{s3_bucket}/shards",
        "-q",
        "--max-samples-per-shard",
        "20",
    )
    assert glob_run.returncode == 0 and "already holds this conversion" in glob_run.stdout


def test_s3_conversion_killed_and_resumed(s3_bucket: str, s3_env, tmp_path: Path) -> None:
    fs = _fs(s3_env.endpoint)
    distinct = [factories.jpeg(320, 240, seed=s) for s in range(20)]
    rows = [{"sample_id": f"s{i}", "caption": f"c{i}", "image_bytes": distinct[i % 20]} for i in range(2500)]
    factories.write_parquet(tmp_path / "big.parquet", rows, row_group_size=100)
    fs.put_file(str(tmp_path / "big.parquet"), f"{s3_bucket}/in/big.parquet")
    args = [
        f"s3://{s3_bucket}/in/big.parquet",
        "-o",
        f"s3://{s3_bucket}/out",
        "--max-samples-per-shard",
        "100",
        "--workers",
        "1",
        "-q",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "shardify", "parquet-to-tar", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + 60
    while (
        time.monotonic() < deadline
        and committed_rows(
            lambda name: fs.cat(f"{s3_bucket}/out/{name}"),
            lambda folder: [p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/out/{folder}", refresh=True)],
        )
        == 0
    ):
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    visible = fs.glob(f"{s3_bucket}/out/shard-*.tar", refresh=True)
    assert visible and not fs.exists(f"{s3_bucket}/out/manifest.json")
    resumed = _shardify(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming an interrupted conversion" in resumed.stderr
    assert (
        _shardify(
            str(tmp_path / "big.parquet"), "-o", str(tmp_path / "ref"), "--max-samples-per-shard", "100", "-q"
        ).returncode
        == 0
    )
    download = tmp_path / "download"
    fs.get(f"{s3_bucket}/out/", str(download), recursive=True)
    ours, reference = output_files(download), output_files(tmp_path / "ref")
    assert {k: v for k, v in ours.items() if k.endswith(".tar")} == {
        k: v for k, v in reference.items() if k.endswith(".tar")
    }
    assert not fs.exists(f"{s3_bucket}/out/.shardify/progress.json")


def test_missing_bucket_is_a_clear_error(s3_env, tmp_path: Path) -> None:
    local = _inputs(tmp_path, rows=10)
    result = _shardify(str(local), "-o", "s3://no-such-bucket-here/out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no-such-bucket-here" in result.stderr
    missing_input = _shardify("s3://no-such-bucket-here/x.parquet", "-o", str(tmp_path / "o"))
    assert missing_input.returncode == 2 and "does not exist" in missing_input.stderr
