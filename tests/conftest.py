"""Shared fixtures: a loopback S3 server, an endpoint that refuses connections, and clean
fsspec caches between tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import fsspec
import pytest

from tests.s3server import SeaweedS3

FULL_RUN = os.environ.get("STREAMTRAIN_FAULTS", "") == "full"
"""Set by ``./launch.sh faults``: tests marked ``full`` (slower variants of a behaviour the normal
suite covers another way) run only then, so the suite stays within ten minutes on two cores."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if FULL_RUN:
        return
    skip = pytest.mark.skip(reason="a slower variant: run by ./launch.sh faults")
    for item in items:
        if item.get_closest_marker("full") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedS3]:
    """The AWS environment pointing at the loopback server, for this process and its children."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    clear_filesystem_caches()
    yield s3_server
    clear_filesystem_caches()


def clear_filesystem_caches() -> None:
    """Forget cached filesystem instances (each fsspec class keeps its own instance cache)."""
    import s3fs

    from shardify import s3client

    fsspec.AbstractFileSystem.clear_instance_cache()
    s3fs.S3FileSystem.clear_instance_cache()
    s3client.forget_clients()


@pytest.fixture
def s3_bucket(s3_env: SeaweedS3, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket; returns its name."""
    import s3fs

    name = "t" + format(abs(hash(request.node.nodeid)) % 10**10, "010d") + format(os.getpid() % 1000, "03d")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env.endpoint})
    if not fs.exists(name):
        fs.mkdir(name)
    return name


@pytest.fixture
def refused_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3 endpoint on loopback that refuses connections, set as AWS_ENDPOINT_URL (with dummy
    credentials and botocore's default retries) for this process and its children."""
    with socket.socket() as sock:  # a port just bound and closed: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unreachable-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unreachable-test-secret")
    clear_filesystem_caches()
    yield endpoint
    clear_filesystem_caches()
