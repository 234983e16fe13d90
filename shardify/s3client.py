"""The S3 client that moves shard bytes: botocore (boto3's core) range GETs, from many threads.

Chosen on figures (benchmarks/bench_remote.py, docs/benchmarks.md): botocore with a thread per
outstanding request keeps up with obstore's Rust client on a dataloader worker's budget, while
obstore's tokio runtime cannot survive ``fork()`` (a dataloader worker forked after the training
process used it hangs on its first request), and s3fs puts every request of a process on one
asyncio loop whose tasks outlive forked workers ("attached to a different loop" at exit).

One client per process: a client made before a fork holds the parent's connections, so each
forked dataloader worker makes its own on first use. Clients are thread-safe; their connection
pool is sized to the read-ahead's concurrency.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from shardify.readahead import Answer

_LOCK = threading.Lock()
_CLIENTS: dict[tuple[int, int], Any] = {}
DEFAULT_CONNECTIONS = 16


def client(connections: int = DEFAULT_CONNECTIONS) -> Any:
    """This process's S3 client, with a pool of at least ``connections`` connections.

    The standard AWS environment applies (credentials, profile, region, ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL``, ``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``).
    """
    import boto3
    from botocore.config import Config

    key = (os.getpid(), connections)
    with _LOCK:
        found = _CLIENTS.get(key)
        if found is None:
            config = Config(max_pool_connections=connections, s3={"addressing_style": "auto"})
            found = boto3.session.Session().client("s3", config=config)
            _CLIENTS.clear()  # a parent's clients are no use in a forked child
            _CLIENTS[key] = found
        return found


def forget_clients() -> None:
    """Drop the clients made so far (the environment changed: another endpoint or identity)."""
    with _LOCK:
        _CLIENTS.clear()


def split(url: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``."""
    bucket, _, key = url.split("://", 1)[1].partition("/")
    return bucket, key


def get_range(url: str, start: int, stop: int, connections: int = DEFAULT_CONNECTIONS) -> Answer:
    """Bytes ``[start, stop)`` of ``url`` (fewer at the end of the object, none past it)."""
    import botocore.exceptions

    bucket, key = split(url)
    try:
        answer = client(connections).get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416:
            return Answer(b"", None, None)  # a range that starts at or past the end
        raise
    body = answer["Body"]
    try:
        data = body.read()
    finally:
        body.close()
    span, _, total = answer.get("ContentRange", "").removeprefix("bytes ").partition("/")
    size = int(total) if total.isdigit() else answer.get("ContentLength")
    first, _, last = span.partition("-")
    if first.isdigit() and last.isdigit() and len(data) != int(last) - int(first) + 1:
        # A body cut short (a connection closed half-way, a proxy that ended it cleanly) must not
        # read as the object's end: a transient error, so the range is asked again.
        expected = int(last) - int(first) + 1
        raise botocore.exceptions.IncompleteReadError(actual_bytes=len(data), expected_bytes=expected)
    return Answer(data, size, answer.get("ETag"))


def head(url: str) -> tuple[int | None, str | None]:
    """(size, ETag) of ``url``."""
    bucket, key = split(url)
    answer = client().head_object(Bucket=bucket, Key=key)
    return answer.get("ContentLength"), answer.get("ETag")


def get_bytes(url: str) -> bytes:
    """All of ``url`` (a small object: a manifest, a checksum file)."""
    bucket, key = split(url)
    body = client().get_object(Bucket=bucket, Key=key)["Body"]
    try:
        return body.read()
    finally:
        body.close()


def upload(local_path: str, url: str) -> None:
    """``local_path`` uploaded to ``url``, in concurrent parts when large (visible when complete)."""
    import boto3.exceptions

    bucket, key = split(url)
    try:
        client().upload_file(local_path, bucket, key)
    except boto3.exceptions.S3UploadFailedError as exc:
        # As s3fs did: the errors writers already handle (a read-only prefix, a missing bucket).
        text = str(exc)
        if "AccessDenied" in text or "Forbidden" in text:
            raise PermissionError(text) from exc
        if "NoSuchBucket" in text:
            raise FileNotFoundError(text) from exc
        raise OSError(text) from exc


def configured_tries() -> int | None:
    """How often botocore tries one request itself (AWS_MAX_ATTEMPTS, or its mode's default)."""
    try:
        retries = client().meta.config.retries or {}
    except Exception:  # no client could be made: nothing to report
        return None
    return retries.get("total_max_attempts") or {"legacy": 5, "standard": 3}.get(retries.get("mode", ""))
