"""The elastic loader reading its shards from S3 far away (a latency proxy in front of the loopback
server): the same steps as from local disk, across resumes on other topologies, in a mixture,
through transient faults, and from the local cache with no bytes fetched in a later epoch."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import s3fs

from streamtrain.config import DataConfig, SourceSpec
from streamtrain.data.pipeline import resolve_sources, train_loader
from tests.conftest import clear_filesystem_caches
from tests.faults.s4_s3proxy import FaultProxy
from tests.latencyproxy import LatencyProxy
from tests.s3server import SeaweedS3
from tests.streamtrain.data.test_elastic_loader import _steps, decode, two_sets  # noqa: F401

DELAY_S = 0.02


@pytest.fixture(scope="module")
def far_sets(two_sets: tuple[Path, Path], s3_server: SeaweedS3) -> tuple[str, str]:  # noqa: F811
    """The two shard sets uploaded to the loopback S3 server."""
    fs = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": s3_server.endpoint},
        key=s3_server.environment()["AWS_ACCESS_KEY_ID"],
        secret=s3_server.environment()["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
    )
    bucket = f"far{os.getpid()}"
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    urls = []
    for local in two_sets:
        fs.put(str(local), f"{bucket}/{local.name}", recursive=True)
        urls.append(f"s3://{bucket}/{local.name}")
    return urls[0], urls[1]


@pytest.fixture
def far(s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[LatencyProxy]:
    """A latency proxy (first byte held 20 ms) in front of the S3 server, as the AWS endpoint."""
    with LatencyProxy(s3_env.endpoint, DELAY_S) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        clear_filesystem_caches()
        yield proxy
    clear_filesystem_caches()


def _loader(train: Any, *, workers: int = 0, batch: int = 4, accum: int = 1, **reads: Any):
    data = DataConfig(train=train, num_workers=workers, shuffle_buffer=8, **reads)
    return train_loader(
        data,
        resolve_sources(train),
        rank=0,
        world_size=1,
        batch_size=batch,
        seed=0,
        decode=decode,
        collate=lambda ids: {"sample_ids": ids},
        batches_per_step=accum,
    )


def _local_steps(train: Any, count: int, batch: int = 8) -> list[list[str]]:
    reference = _loader(train, batch=batch)
    try:
        return _steps(reference, count, 1)
    finally:
        reference.shutdown()


@pytest.mark.s3
def test_resumes_from_a_far_store_give_the_local_steps(two_sets, far_sets, far: LatencyProxy) -> None:  # noqa: F811
    expected = _local_steps(str(two_sets[0]), 30)
    first = _loader(far_sets[0], workers=2, batch=8)
    got = _steps(first, 7, 1)
    state = first.state_dict()
    first.shutdown()
    second = _loader(far_sets[0], workers=3, batch=2, accum=4, read_ahead_mb=0.25)  # a tight budget
    second.load_state_dict(state)
    got += _steps(second, 12, 4)
    state = second.state_dict()
    second.shutdown()
    third = _loader(far_sets[0], workers=1, batch=4, accum=2, read_ahead_mb=0)  # one request at a time
    third.load_state_dict(state)
    got += _steps(third, 11, 2)
    third.shutdown()
    assert got == expected
    assert far.requests > 0  # it did read through the proxy


@pytest.mark.s3
def test_a_mixture_from_a_far_store_gives_the_local_steps(two_sets, far_sets, far: LatencyProxy) -> None:  # noqa: F811
    def mixture(big: Any, small: Any) -> list[SourceSpec]:
        return [
            SourceSpec(path=str(big), weight=1, name="big"),
            SourceSpec(path=str(small), weight={0: 1, 5: 3}, name="small"),
        ]

    expected = _local_steps(mixture(*two_sets), 20)
    loader = _loader(mixture(*far_sets), workers=2, batch=8)
    got = _steps(loader, 20, 1)
    loader.shutdown()
    assert got == expected


@pytest.mark.s3
def test_transient_faults_behind_latency_keep_the_steps(
    two_sets,  # noqa: F811
    far_sets: tuple[str, str],
    s3_env: SeaweedS3,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Errors and connection resets while every answer also comes 20 ms late: the same steps."""
    expected = _local_steps(str(two_sets[0]), 22)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the faults reach the read-ahead, not only botocore
    with FaultProxy(s3_env.endpoint) as faults, LatencyProxy(faults.endpoint, DELAY_S) as far:
        monkeypatch.setenv("AWS_ENDPOINT_URL", far.endpoint)
        clear_filesystem_caches()
        loader = _loader(far_sets[0], workers=2, batch=8, retry_backoff_s=0.05, retry_max_backoff_s=0.2)
        got = _steps(loader, 3, 1)
        hit = []
        for kind in ("error", "reset"):
            fault = faults.arm(kind, 0.5)
            got += _steps(loader, 4, 1)
            hit.append(fault.hits)
        got += _steps(loader, 11, 1)
        stats = loader.read_stats
        loader.shutdown()
    clear_filesystem_caches()
    assert got == expected, stats
    assert stats.get("shard_errors", 0) == 0
    if all(hits == 0 for hits in hit):  # the workers had read ahead past every fault
        pytest.skip("no request met a fault (read ahead of them)")
    assert stats["read_retries"] > 0


@pytest.mark.s3
def test_with_the_cache_a_second_epoch_fetches_nothing(
    two_sets,  # noqa: F811
    far_sets: tuple[str, str],
    far: LatencyProxy,
    tmp_path: Path,
) -> None:
    epoch = 90 // 8  # steps of one epoch of the big set
    expected = _local_steps(str(two_sets[0]), 2 * epoch)
    cache = tmp_path / "cache"
    loader = _loader(far_sets[0], workers=2, batch=8, cache_dir=str(cache), cache_limit="10MB")
    got = _steps(loader, epoch, 1)
    after_first, asked = far.bytes_down, len(far.request_lines)
    got += _steps(loader, epoch, 1)
    loader.shutdown()
    assert got == expected
    shard_bytes = sum(p.stat().st_size for p in two_sets[0].glob("*.tar"))
    assert shard_bytes <= after_first
    assert far.request_lines[asked:] == []  # the second epoch came from local disk
    assert far.bytes_down == after_first
    assert len(list(cache.glob("*.tar"))) == len(list(two_sets[0].glob("*.tar")))


@pytest.mark.s3
def test_workers_reading_s3_exit_without_event_loop_errors(
    far_sets: tuple[str, str], s3_env: SeaweedS3
) -> None:
    """s3fs in forked workers printed "attached to a different loop" task errors at exit."""
    script = (
        "from streamtrain.config import DataConfig\n"
        "from streamtrain.data.pipeline import resolve_sources, train_loader\n"
        f"url = {far_sets[0]!r}\n"
        "loader = train_loader(DataConfig(train=url, num_workers=2), resolve_sources(url), rank=0,\n"
        "    world_size=1, batch_size=8, seed=0, decode=lambda raw, rng: raw['__key__'],\n"
        "    collate=lambda ids: {'sample_ids': ids})\n"
        "steps = [next(loader) for _ in range(5)]\n"
        "print('read', len(steps))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "read 5" in done.stdout, done.stderr
    for symptom in ("different loop", "Task was destroyed", "Traceback"):
        assert symptom not in done.stderr, done.stderr
