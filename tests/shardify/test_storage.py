"""The storage layer: the scheme table, backends seen by the tar reader, an unreachable store."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import s3fs

from shardify.convert import ConvertOptions, convert
from shardify.readahead import RangeReader
from shardify.sources import InputError
from shardify.storage import (
    LocalStorage,
    ObjectInfo,
    ReadableFile,
    S3Storage,
    UnknownStorageError,
    filesystem,
    is_remote,
    register_storage,
    storage_for,
)
from shardify.tarread import iter_samples
from tests import factories
from tests.storage_backends import MemoryStorage, in_memory, registered


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shardify output of 30 samples in 3 shards."""
    folder = tmp_path_factory.mktemp("storage")
    factories.write_parquet(folder / "in.parquet", factories.caption_rows(30, size=(16, 16)))
    options = ConvertOptions(output=str(folder / "out"), max_samples_per_shard=10)
    convert([str(folder / "in.parquet")], options)
    return folder / "out"


def _payloads(samples: Any) -> list[tuple[str, int, bytes]]:
    return [(s["__key__"], s["__index__"], s["jpg"]) for s in samples]


def test_local_paths_and_s3_urls_resolve_through_the_table() -> None:
    for url in ("relative/shard.tar", "/abs/shard.tar", "file:///abs/shard.tar"):
        assert type(storage_for(url)) is LocalStorage and not is_remote(url), url
    assert filesystem("file:///abs/shard.tar")[1] == filesystem("/abs/shard.tar")[1] == "/abs/shard.tar"
    s3 = storage_for("s3://bucket/pixmo/shard-000000-000000.tar")
    assert type(s3) is S3Storage and is_remote("s3://bucket/x")
    assert (
        filesystem("s3://bucket/pixmo/shard-000000-000000.tar")[1] == "bucket/pixmo/shard-000000-000000.tar"
    )
    assert s3.url("bucket/pixmo/a.parquet") == "s3://bucket/pixmo/a.parquet"


def test_unknown_scheme_names_it_and_the_registered_ones(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownStorageError) as error:
        storage_for("gs://bucket/shard-000000-000000.tar")
    message = str(error.value)
    assert all(name in message for name in ("gs://", "file://", "s3://", "register_storage")), message
    with pytest.raises(InputError, match=r"no storage for gs:// URLs \(registered: .*s3://"):
        convert(["gs://bucket/in.parquet"], ConvertOptions(output=str(tmp_path / "out")))
    with pytest.raises(InputError, match="no storage for hdfs://"):
        convert([str(shards.parent / "in.parquet")], ConvertOptions(output="hdfs://cluster/out"))


def test_registering_needs_a_scheme_and_replacing_needs_asking() -> None:
    with pytest.raises(ValueError, match="not a URL scheme"):
        register_storage("Bad Scheme", MemoryStorage)
    with pytest.raises(ValueError, match="already registered"):
        register_storage("s3", MemoryStorage)
    with registered("mem", MemoryStorage):
        register_storage("mem", MemoryStorage)  # the same again is no conflict
        assert type(storage_for("mem://x/y")) is MemoryStorage
    with pytest.raises(UnknownStorageError):
        storage_for("mem://x/y")


def test_a_registered_backend_serves_the_tar_reader(shards: Path) -> None:
    local = str(shards / "shard-000000-000001.tar")
    with in_memory(shards) as base:
        url = f"{base}/shard-000000-000001.tar"
        assert _payloads(iter_samples(url)) == _payloads(iter_samples(local))
        assert _payloads(iter_samples(url, 3, 7)) == _payloads(iter_samples(local, 3, 7))
        assert MemoryStorage.opened == [url, url]
        assert storage_for(url).stat(url) == ObjectInfo(Path(local).stat().st_size, None)


class _RecordingLocal(LocalStorage):
    opened: ClassVar[list[str]] = []

    def open(self, url: str) -> tuple[ReadableFile, ObjectInfo]:
        _RecordingLocal.opened.append(url)
        return super().open(url)


class _RecordingS3(S3Storage):
    """S3 whose range reads (the read-ahead's requests) are recorded."""

    opened: ClassVar[list[str]] = []

    def range_reader(self, url: str) -> RangeReader:
        _RecordingS3.opened.append(url)
        return super().range_reader(url)


def test_local_reads_go_through_the_table(shards: Path) -> None:
    url = str(shards / "shard-000000-000000.tar")
    expected = _payloads(iter_samples(url))
    register_storage("file", _RecordingLocal, replace=True)
    try:
        assert _payloads(iter_samples(url)) == expected
    finally:
        register_storage("file", LocalStorage, replace=True)
    assert _RecordingLocal.opened == [url]


@pytest.mark.s3
def test_s3_reads_go_through_the_table(shards: Path, s3_env: Any, s3_bucket: str) -> None:
    local = shards / "shard-000000-000002.tar"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env.endpoint}, skip_instance_cache=True)
    fs.put_file(str(local), f"{s3_bucket}/out/{local.name}")
    url = f"s3://{s3_bucket}/out/{local.name}"
    register_storage("s3", _RecordingS3, replace=True)
    try:
        assert _payloads(iter_samples(url)) == _payloads(iter_samples(str(local)))
        info = storage_for(url).stat(url)
    finally:
        register_storage("s3", S3Storage, replace=True)
    assert _RecordingS3.opened == [url]
    assert info.size == local.stat().st_size and info.etag


def test_unreachable_endpoint_ends_shardify_with_one_line(refused_endpoint: str, tmp_path: Path) -> None:
    started = time.monotonic()
    source = "s3://bucket/pixmo/in.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "shardify", "parquet-to-tar", source, "-o", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardify: error: cannot reach the S3 endpoint"), lines
    line = lines[0]
    for needle in (refused_endpoint, "AWS_ENDPOINT_URL", source, "credentials", "network"):
        assert needle in line, line
    waited = re.search(r"no connection after (\d+) tries in ([0-9.]+) s", line)
    assert waited is not None, line  # botocore's own tries (5 by default in its legacy mode)
    assert int(waited.group(1)) > 1 and float(waited.group(2)) < 40 and elapsed < 60, (line, elapsed)
