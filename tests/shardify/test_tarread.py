"""Reading samples out of tar shards (tarread through bytestream): ranges, skipping, truncation,
foreign tars, retries, S3 and restarts."""

from __future__ import annotations

import io
import logging
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import s3fs

from shardify import bytestream, readahead, s3client
from shardify.bytestream import ReadStats, RetryPolicy, ShardReadError
from shardify.convert import ConvertOptions, convert
from shardify.storage import LocalStorage
from shardify.tarread import iter_samples
from tests import factories

FAST_RETRY = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.005)


def _make_shard(directory: Path, rows: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    factories.write_parquet(directory / "in.parquet", rows)
    options = ConvertOptions(output=str(directory / "out"), max_samples_per_shard=len(rows))
    convert([str(directory / "in.parquet")], options)
    return directory / "out" / "shard-000000-000000.tar"


def tarfile_samples(data: bytes) -> list[dict[str, Any]]:
    """The reference: the same grouping done with the standard library's tar reader."""
    samples: list[dict[str, Any]] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if not member.isfile() or "." not in member.name.rsplit("/", 1)[-1]:
                continue
            key, extension = member.name.rsplit("/", 1)[-1].split(".", 1)
            if not samples or samples[-1]["__key__"] != key or extension in samples[-1]:
                samples.append({"__key__": key, "__index__": len(samples)})
            samples[-1][extension] = tar.extractfile(member).read()
    return samples


def read(url: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """iter_samples as a list, checking ``__url__`` and dropping it for comparisons."""
    samples = list(iter_samples(url, *args, **kwargs))
    assert all(sample.pop("__url__") == url for sample in samples)
    return samples


@pytest.fixture(scope="module")
def image_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 samples with ~25 KB images."""
    return _make_shard(tmp_path_factory.mktemp("images"), factories.caption_rows(100, size=(300, 250)))


@pytest.fixture(scope="module")
def small_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_shard(tmp_path_factory.mktemp("small"), factories.caption_rows(8))


@pytest.fixture(scope="module")
def reference(image_shard: Path) -> list[dict[str, Any]]:
    return tarfile_samples(image_shard.read_bytes())


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Records the backoff waits instead of sleeping."""
    waits: list[float] = []
    monkeypatch.setattr(bytestream.time, "sleep", waits.append)
    return waits


def test_every_sample_matches_tarfile(image_shard: Path, reference: list, no_sleep: list) -> None:
    stats = ReadStats()
    samples = read(str(image_shard), stats=stats)
    assert len(samples) == 100 and samples == reference
    assert sorted(samples[0]) == ["__index__", "__key__", "jpg", "json", "txt"]
    assert stats.bytes_read == image_shard.stat().st_size and stats.retries == 0
    assert no_sleep == []


@pytest.mark.parametrize("block_size", [bytestream.DEFAULT_BLOCK_SIZE, 1000])
@pytest.mark.parametrize(
    ("first", "stop"),
    [(0, None), (0, 1), (37, 52), (99, None), (99, 100), (90, 500), (100, None), (250, None), (40, 40)],
)
def test_sample_ranges(
    image_shard: Path, reference: list, first: int, stop: int | None, block_size: int
) -> None:
    samples = read(str(image_shard), first, stop, block_size=block_size)
    assert samples == reference[first:stop]
    assert [sample["__index__"] for sample in samples] == list(range(first, min(stop or 100, 100)))


def test_bad_ranges_are_refused(image_shard: Path) -> None:
    with pytest.raises(ValueError, match="bad sample range"):
        iter_samples(str(image_shard), -1)
    with pytest.raises(ValueError, match="bad sample range"):
        iter_samples(str(image_shard), 5, 4)


def test_skipping_and_stopping_read_little(image_shard: Path, reference: list) -> None:
    size = image_shard.stat().st_size
    tail = ReadStats()
    assert read(str(image_shard), 90, 100, stats=tail) == reference[90:]
    assert tail.bytes_read < size / 5
    assert tail.bytes_skipped > size / 2
    head = ReadStats()
    assert read(str(image_shard), 0, 3, block_size=64 << 10, stats=head) == reference[:3]
    assert head.bytes_read <= 2 * (64 << 10)


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def test_truncated_shard_yields_complete_samples_then_raises(small_shard: Path, tmp_path: Path) -> None:
    data = small_shard.read_bytes()
    reference = tarfile_samples(data)
    members = _members(data)
    keys = [member.name.split(".")[0] for member in members]
    starts = [m for i, m in enumerate(members) if i == 0 or keys[i] != keys[i - 1]]
    assert len(starts) == len(reference) == 8
    data_end = members[-1].offset_data + -(-members[-1].size // 512) * 512
    third = starts[3]
    second_member = members[members.index(third) + 1]
    assert second_member.size % 512 and keys[members.index(third) + 1] == keys[members.index(third)]
    # cut -> samples a reader may trust: those whose next header (or end block) is whole
    cuts = {
        0: 0,
        third.offset: 2,  # between samples: sample 2 may have had more members
        third.offset + 100: 2,  # inside a header
        third.offset_data + 10: 3,  # inside a payload
        second_member.offset: 3,  # between the members of one sample
        second_member.offset_data + second_member.size + 1: 3,  # inside the padding
        data_end: 7,
        data_end + 100: 7,  # inside the end-of-archive block
    }
    for cut, complete in cuts.items():
        path = tmp_path / f"cut-{cut}.tar"
        path.write_bytes(data[:cut])
        got: list[dict] = []
        with pytest.raises(ShardReadError) as error:
            got.extend(sample for sample in iter_samples(str(path), block_size=700))
        assert error.value.reason == "truncated" and str(path) in str(error.value), cut
        assert [{k: v for k, v in s.items() if k != "__url__"} for s in got] == reference[:complete], cut
    (tmp_path / "one-end-block.tar").write_bytes(data[: data_end + 512])
    assert len(read(str(tmp_path / "one-end-block.tar"))) == 8
    (tmp_path / "late.tar").write_bytes(data[: starts[6].offset_data + 5])
    indices: list[int] = []
    with pytest.raises(ShardReadError, match="truncated"):
        indices.extend(sample["__index__"] for sample in iter_samples(str(tmp_path / "late.tar"), 2, 7))
    assert indices == [2, 3, 4, 5]


def _foreign_tar(path: Path, tar_format: int) -> list[tuple[str, dict[str, bytes]]]:
    """A tar written by tarfile with long names, odd paths and non-file members; returns the samples."""
    long_dir = "data/" + "d" * 120
    members: list[tuple[str, bytes]] = [
        ("a.jpg", b"A" * 5000),
        ("a.txt", b"caption a"),
        (f"{long_dir}/b.jpg", b"B" * 1500),
        (f"{long_dir}/b.seg.json", b"{}"),
        ("../c.txt", b"c"),
        ("/abs/c.jpg", b"C"),
        ("d.txt", b"first d"),
        ("d.txt", b"second d"),  # a repeated key must not merge the two samples
    ]
    expected = [
        ("a", {"jpg": b"A" * 5000, "txt": b"caption a"}),
        ("b", {"jpg": b"B" * 1500, "seg.json": b"{}"}),
        ("c", {"txt": b"c", "jpg": b"C"}),
        ("d", {"txt": b"first d"}),
        ("d", {"txt": b"second d"}),
    ]
    if tar_format != tarfile.USTAR_FORMAT:  # basenames over 100 bytes need pax or GNU records
        members += [("k" * 150 + ".jpg", b"K" * 700), ("ünïcode-名前.txt", "ü".encode())]
        expected += [("k" * 150, {"jpg": b"K" * 700}), ("ünïcode-名前", {"txt": "ü".encode()})]
    pax_headers = {"comment": "a global header"} if tar_format == tarfile.PAX_FORMAT else None
    with tarfile.open(path, "w", format=tar_format, pax_headers=pax_headers) as tar:
        directory = tarfile.TarInfo(long_dir)
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("z.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
        readme = tarfile.TarInfo("README")
        readme.size = 3
        tar.addfile(readme, io.BytesIO(b"hi\n"))
    return expected


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_foreign_tars_group_samples_by_key(tmp_path: Path, tar_format: int) -> None:
    path = tmp_path / "foreign.tar"
    expected = _foreign_tar(path, tar_format)
    samples = read(str(path), block_size=1024)
    assert [(s.pop("__key__"), s.pop("__index__")) for s in samples] == [
        (key, i) for i, (key, _) in enumerate(expected)
    ]
    assert samples == [payloads for _, payloads in expected]
    assert read(str(path), 1, 3) == [
        {"__key__": key, "__index__": i + 1, **payloads} for i, (key, payloads) in enumerate(expected[1:3])
    ]


class _FlakyFile:
    """A real file whose reads fail with a connection reset on the chosen read calls."""

    def __init__(self, path: str, storage: _FlakyStorage) -> None:
        self._file = open(path, "rb")
        self._storage = storage

    def seek(self, position: int) -> None:
        self._file.seek(position)

    def read(self, size: int) -> bytes:
        self._storage.reads += 1
        if self._storage.reads in self._storage.failing or self._storage.reads > self._storage.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return self._file.read(size)

    def close(self) -> None:
        self._file.close()


class _FlakyStorage:
    def __init__(self, failing: frozenset[int] = frozenset(), fail_after: float = float("inf")) -> None:
        self.failing = failing
        self.fail_after = fail_after
        self.reads = 0
        self.opens = 0

    def open(self, path: str, mode: str) -> _FlakyFile:
        self.opens += 1
        return _FlakyFile(path, self)


def _flaky(monkeypatch: pytest.MonkeyPatch, storage: _FlakyStorage) -> None:
    monkeypatch.setattr(LocalStorage, "filesystem", lambda self, url: (storage, url))


def test_transient_errors_resume_at_the_same_offset(
    image_shard: Path,
    reference: list,
    monkeypatch: pytest.MonkeyPatch,
    no_sleep: list,
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = _FlakyStorage(failing=frozenset({3, 4, 9, 10, 40}))
    _flaky(monkeypatch, storage)
    stats = ReadStats()
    policy = RetryPolicy(attempts=3, initial_backoff_s=0.1, max_backoff_s=0.3)
    with caplog.at_level(logging.WARNING, logger=bytestream.__name__):
        assert read(str(image_shard), retry=policy, block_size=50_000, stats=stats) == reference
    assert stats.retries == len(no_sleep) == 5 and stats.reopens == 5 and storage.opens == 6
    assert stats.reopened_bytes > 0
    clean = ReadStats()
    monkeypatch.setattr(LocalStorage, "filesystem", lambda self, url: (_FlakyStorage(), url))
    read(str(image_shard), block_size=50_000, stats=clean)
    assert stats.bytes_read == clean.bytes_read and clean.retries == 0  # nothing was fetched twice
    assert all(0.05 <= wait <= 0.3 for wait in no_sleep)
    assert len(caplog.records) == 1 and "retry 1 of 2" in caplog.text


def test_consecutive_failures_give_up(
    image_shard: Path, reference: list, monkeypatch: pytest.MonkeyPatch, no_sleep: list
) -> None:
    _flaky(monkeypatch, _FlakyStorage(fail_after=20))
    got: list[dict] = []
    with pytest.raises(ShardReadError) as error:
        got.extend(iter_samples(str(image_shard), retry=RetryPolicy(attempts=4), block_size=50_000))
    assert error.value.reason == "unavailable" and "ConnectionResetError" in str(error.value)
    assert len(no_sleep) == 3
    assert 0 < len(got) < 100 and [s["jpg"] for s in got] == [s["jpg"] for s in reference[: len(got)]]


def test_missing_local_shard_fails_at_once(tmp_path: Path, no_sleep: list) -> None:
    with pytest.raises(ShardReadError, match=r"gone\.tar: missing") as error:
        list(iter_samples(str(tmp_path / "gone.tar")))
    assert error.value.reason == "missing" and no_sleep == []


def _upload(s3_env: Any, local: Path, key: str) -> str:
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env.endpoint}, skip_instance_cache=True)
    fs.put_file(str(local), key)
    return f"s3://{key}"


@pytest.mark.s3
def test_s3_reads_like_local(s3_env: Any, s3_bucket: str, image_shard: Path, reference: list) -> None:
    url = _upload(s3_env, image_shard, f"{s3_bucket}/shards/shard-000000-000000.tar")
    stats = ReadStats()
    assert read(url, stats=stats) == reference
    assert stats.bytes_read == image_shard.stat().st_size and stats.retries == 0
    assert read(url, 37, 52, block_size=10_000) == reference[37:52]
    assert read(url, 97) == reference[97:]


@pytest.mark.s3
def test_s3_missing_object_fails_fast(s3_env: Any, s3_bucket: str) -> None:
    started = time.monotonic()
    for url in (f"s3://{s3_bucket}/no-such-shard.tar", "s3://no-such-bucket-x/shard.tar"):
        with pytest.raises(ShardReadError) as error:
            list(iter_samples(url, retry=FAST_RETRY))
        assert error.value.reason == "missing" and url in str(error.value)
    assert time.monotonic() - started < 10


@pytest.fixture(scope="module")
def big_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 samples of ~200 KB images (about 20 MB)."""
    images = [factories.jpeg(640, 640, seed=seed, quality=95) for seed in range(20)]
    rows = [
        {"sample_id": f"big-{i}", "caption": f"big {i}", "image_bytes": images[i % 20]} for i in range(100)
    ]
    return _make_shard(tmp_path_factory.mktemp("big"), rows)


@pytest.mark.s3
def test_s3_server_restart_mid_stream(
    s3_env: Any, s3_bucket: str, big_shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _upload(s3_env, big_shard, f"{s3_bucket}/big/shard-000000-000000.tar")
    expected = tarfile_samples(big_shard.read_bytes())
    # Without this botocore retries refused connections itself and the outage never reaches us.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    s3client.forget_clients()
    # A read-ahead of 256 KB: the outage must come while most of the shard is still unread.
    readahead.configure(budget_bytes=256 << 10, chunk_bytes=64 << 10)
    stats = ReadStats()
    policy = RetryPolicy(attempts=100, initial_backoff_s=0.05, max_backoff_s=0.2)
    failures: list[BaseException] = []

    def start_later() -> None:
        time.sleep(0.5)
        try:
            s3_env.start()
        except BaseException as exc:
            failures.append(exc)

    restarter = threading.Thread(target=start_later)
    samples = []
    try:
        for sample in iter_samples(url, retry=policy, block_size=64 << 10, stats=stats):
            samples.append(sample)
            if len(samples) == 30:  # the stream holds part of sample 30 in its buffer here
                s3_env.stop()
                restarter.start()
    finally:
        if restarter.ident is not None:
            restarter.join()
        if s3_env.process is None:
            s3_env.start()
        s3fs.S3FileSystem.clear_instance_cache()  # later tests must not get the retry-less client
        s3client.forget_clients()
        readahead.configure(readahead.DEFAULT_BUDGET_BYTES, readahead.DEFAULT_CHUNK_BYTES)
    assert not failures
    assert [s["__index__"] for s in samples] == list(range(100))
    assert [(s["__key__"], s["jpg"], s["json"]) for s in samples] == [
        (s["__key__"], s["jpg"], s["json"]) for s in expected
    ]
    assert stats.retries > 0 and stats.reopens > 0 and stats.reopened_bytes > 0
    assert stats.bytes_read + stats.bytes_skipped <= big_shard.stat().st_size  # nothing fetched twice
