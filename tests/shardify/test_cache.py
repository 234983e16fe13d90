"""The local shard cache: one download per node, verified copies, LRU within the limit."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from shardify.cache import ShardCache
from shardify.convert import ConvertOptions, convert
from shardify.format import parse_checksums
from tests import factories
from tests.storage_backends import FarLocalStorage, registered


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shardify output of 40 samples in 4 shards, with checksums."""
    folder = tmp_path_factory.mktemp("cache")
    factories.write_parquet(folder / "in.parquet", factories.caption_rows(40, size=(32, 32)))
    convert(
        [str(folder / "in.parquet")], ConvertOptions(output=str(folder / "out"), max_samples_per_shard=10)
    )
    return folder / "out"


def _checksums(shard: Path) -> dict[str, int]:
    return parse_checksums(Path(f"{shard}.crc32.json").read_text())


def test_a_shard_is_fetched_once_then_read_locally(shards: Path, tmp_path: Path) -> None:
    shard = sorted(shards.glob("*.tar"))[0]
    with registered("far", FarLocalStorage):
        url = f"far://{shard}"
        cache = ShardCache(tmp_path / "cache", 10 << 20)
        FarLocalStorage.fetched = 0
        first = cache.local_copy(url, _checksums(shard), shard.stat().st_size)
        assert first is not None and first.read_bytes() == shard.read_bytes()
        assert FarLocalStorage.fetched == shard.stat().st_size
        again = ShardCache(tmp_path / "cache", 10 << 20)  # another process's view: verifies, then reuses
        assert again.local_copy(url, _checksums(shard)) == first
        assert FarLocalStorage.fetched == shard.stat().st_size and again.hits == 1


def test_a_copy_that_does_not_match_its_checksums_is_fetched_again(shards: Path, tmp_path: Path) -> None:
    shard = sorted(shards.glob("*.tar"))[1]
    with registered("far", FarLocalStorage):
        url = f"far://{shard}"
        copy = ShardCache(tmp_path / "cache", 10 << 20).local_copy(url, _checksums(shard))
        assert copy is not None
        damaged = bytearray(copy.read_bytes())
        damaged[2000] ^= 0xFF  # inside the first member's payload
        copy.write_bytes(bytes(damaged))
        FarLocalStorage.fetched = 0
        cache = ShardCache(tmp_path / "cache", 10 << 20)
        assert cache.local_copy(url, _checksums(shard)) == copy
        assert cache.rejected == 1 and FarLocalStorage.fetched == shard.stat().st_size
        assert copy.read_bytes() == shard.read_bytes()


def test_least_recently_used_copies_go_past_the_limit(shards: Path, tmp_path: Path) -> None:
    tars = sorted(shards.glob("*.tar"))
    size = max(t.stat().st_size for t in tars)
    cache = ShardCache(tmp_path / "cache", 2 * size + 100)  # room for two
    with registered("far", FarLocalStorage):
        a, b, c = (f"far://{t}" for t in tars[:3])
        cache.local_copy(a, _checksums(tars[0]))
        cache.local_copy(b, _checksums(tars[1]))
        os.utime(cache.path_of(a), (1, cache.path_of(a).stat().st_mtime))  # a: long unused
        cache.local_copy(c, _checksums(tars[2]))
        assert not cache.path_of(a).exists() and cache.path_of(b).exists() and cache.path_of(c).exists()
        assert cache.size_bytes() <= cache.limit_bytes
        # Larger than the whole limit: not cached, read from the store.
        assert ShardCache(tmp_path / "small", size // 2).local_copy(a, None, tars[0].stat().st_size) is None


def _fetch_in_a_process(url: str, directory: str, limit: int, out: multiprocessing.Queue) -> None:
    cache = ShardCache(directory, limit)
    FarLocalStorage.fetched = 0
    path = cache.local_copy(url, None)
    out.put((cache.downloads, FarLocalStorage.fetched, str(path)))


def test_processes_of_a_node_download_a_shard_once(shards: Path, tmp_path: Path) -> None:
    shard = sorted(shards.glob("*.tar"))[3]
    context = multiprocessing.get_context("fork")
    with registered("far", FarLocalStorage):
        results: multiprocessing.Queue = context.Queue()
        workers = [
            context.Process(
                target=_fetch_in_a_process, args=(f"far://{shard}", str(tmp_path / "c"), 10 << 20, results)
            )
            for _ in range(4)
        ]
        for worker in workers:
            worker.start()
        found = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(30)
    assert sum(downloads for downloads, _, _ in found) == 1
    assert sum(fetched for _, fetched, _ in found) == shard.stat().st_size
    assert len({path for _, _, path in found}) == 1
    assert not list((tmp_path / "c").glob("*.partial"))
