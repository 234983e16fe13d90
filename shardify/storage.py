"""Where bytes live: a table from URL scheme to the storage backend that reads and writes them.

Plain paths and ``file://`` URLs are local files, ``s3://`` URLs S3 or an S3-compatible store;
another store (GCS, Azure, HTTP) is one StorageBackend subclass and one
``register_storage("gs", GcsStorage)`` line. A backend hands out an fsspec filesystem (listing,
writing), opens an object for reads at any offset, says what the object is (its size and a tag
such as the ETag, so a reader can refuse an object that changed under it), and classifies its
own errors (missing, denied, transient, unreachable), so the retry loop in bytestream.py needs
no client library. Both packages use it: the converter for its inputs and outputs, the trainer
for manifests and shards.
"""

from __future__ import annotations

import enum
import functools
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import fsspec

from shardify import s3client
from shardify.readahead import RangeReader

try:  # only S3 needs these; a local-only install may lack them
    import aiohttp
    import botocore.exceptions
    import urllib3.exceptions

    _CLIENT_ERRORS: tuple[type[BaseException], ...] = (botocore.exceptions.ClientError,)
    _CONNECT_ERRORS: tuple[type[BaseException], ...] = (
        botocore.exceptions.ConnectionError,  # refused, DNS, connect timeout, proxy
        aiohttp.ClientConnectorError,
    )
    _TRANSIENT_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
        botocore.exceptions.BotoCoreError,
        aiohttp.ClientError,
        urllib3.exceptions.HTTPError,  # a body cut off mid-read (botocore wraps most of them)
    )
except ImportError:
    _CLIENT_ERRORS = _CONNECT_ERRORS = _TRANSIENT_LIBRARY_ERRORS = ()

_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class Failure(enum.StrEnum):
    """What kind of storage error an exception is."""

    MISSING = "missing"
    DENIED = "denied"
    TRANSIENT = "transient"
    """Worth another try: timeouts, resets, throttling, 5xx answers."""
    UNREACHABLE = "unreachable"
    """The service itself could not be reached (refused, unknown host, connect timeout). Mid-read it
    is retried like any transient error (a store restarting looks exactly like this); where a
    command starts, it ends the command with one line naming the endpoint."""

    @property
    def retried(self) -> bool:
        return self in (Failure.TRANSIENT, Failure.UNREACHABLE)


@dataclass(frozen=True)
class ObjectInfo:
    """What a stored object is, as far as a reader resuming it must know."""

    size: int | None
    """Bytes in the object, where the store says."""
    etag: str | None
    """The store's version tag (S3's ETag); None where it has none (local files)."""


class ReadableFile(Protocol):
    """An object opened for reading; ``read`` after ``seek`` fetches that range."""

    def seek(self, position: int) -> Any: ...

    def read(self, size: int) -> bytes: ...

    def close(self) -> None: ...


class StorageBackend:
    """One kind of store, addressed by ``scheme://`` URLs. Subclasses provide ``filesystem``;
    ``open``, ``stat`` and ``failure`` have fsspec-based defaults to refine."""

    remote: ClassVar[bool] = True
    """Reads cross a network: skipping fetches whole blocks rather than seeking 512 bytes at a
    time, and a missing object is tried again (a fresh object can be listed before it is readable)."""
    open_options: ClassVar[dict[str, Any]] = {}
    """Passed to the filesystem's ``open`` by ``open()``."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem holding ``url`` and the path inside it."""
        raise NotImplementedError

    def url(self, path: str) -> str:
        """The URL of a path this backend's filesystem returned (listings give bare paths)."""
        return f"{self.scheme}://{path}"

    def open(self, url: str) -> tuple[ReadableFile, ObjectInfo]:
        """``url`` opened for reads at any offset, and what it is."""
        fs, path = self.filesystem(url)
        file = fs.open(path, "rb", **self.open_options)
        details = getattr(file, "details", None) or {}
        return file, ObjectInfo(getattr(file, "size", None), details.get("ETag"))

    def stat(self, url: str) -> ObjectInfo:
        """Size and tag of ``url`` without opening it."""
        fs, path = self.filesystem(url)
        info = fs.info(path)
        return ObjectInfo(info.get("size"), info.get("ETag"))

    def range_reader(self, url: str) -> RangeReader | None:
        """A function that reads one byte range of ``url`` per call, from any thread: readers
        then keep several requests in flight (readahead.py). None: read through ``open``."""
        return None

    def read_bytes(self, url: str) -> bytes:
        """All of ``url`` (a small object: a manifest, a checksum file)."""
        fs, path = self.filesystem(url)
        return fs.cat_file(path)

    def upload(self, local_path: str, url: str) -> None:
        """``local_path`` stored as ``url``, visible only when complete."""
        fs, path = self.filesystem(url)
        fs.put_file(local_path, path)

    def failure(self, exc: BaseException) -> Failure | None:
        """The kind of storage error ``exc`` is; None for anything else (a bug: re-raise it)."""
        if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
            return Failure.MISSING
        if isinstance(exc, PermissionError):
            return Failure.DENIED
        if isinstance(exc, ConnectionRefusedError):
            return Failure.UNREACHABLE
        if isinstance(exc, OSError | EOFError):
            return Failure.TRANSIENT  # timeouts, resets, and fsspec's translations of server errors
        return None

    def unreachable(self, url: str, exc: BaseException, waited_s: float) -> str:
        """One line for a store that could not be reached: where, how long, what to check."""
        return (
            f"cannot reach the storage of {url} (gave up after {waited_s:.1f} s: {type(exc).__name__}: "
            f"{exc}); check the URL, the credentials and the network"
        )


class LocalStorage(StorageBackend):
    """Local paths and ``file://`` URLs (a subclass registered under another scheme reads the
    local path after ``scheme://``)."""

    remote = False

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        path = url if self.scheme == "file" else url.split("://", 1)[1]
        fs, local = fsspec.core.url_to_fs(path)
        return fs, local

    def url(self, path: str) -> str:
        return path if self.scheme == "file" else super().url(path)


class S3Storage(StorageBackend):
    """S3 with the standard AWS environment (credentials, profile, region); an S3-compatible
    store is named with ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``. Object bytes move
    through botocore range GETs from many threads (s3client.py); listings and small writes go
    through s3fs's filesystem."""

    # No read-ahead cache: a reader asks for exactly the ranges it wants (and resumes them).
    open_options: ClassVar[dict[str, Any]] = {"cache_type": "none"}

    def range_reader(self, url: str) -> RangeReader:
        return functools.partial(s3client.get_range, url)

    def stat(self, url: str) -> ObjectInfo:
        size, etag = s3client.head(url)
        return ObjectInfo(size, etag)

    def read_bytes(self, url: str) -> bytes:
        return s3client.get_bytes(url)

    def upload(self, local_path: str, url: str) -> None:
        s3client.upload(local_path, url)  # concurrent parts when large; one object when done

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        options: dict[str, Any] = {}
        endpoint = _configured_endpoint()
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint[1]}
        return fsspec.filesystem("s3", **options), url.split("://", 1)[1]

    def failure(self, exc: BaseException) -> Failure | None:
        if isinstance(exc, _CLIENT_ERRORS):
            response: dict[str, Any] = getattr(exc, "response", {})
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if error.get("Code") in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
                return Failure.MISSING
            if status in (401, 403):
                return Failure.DENIED
            throttled = status in (408, 429) or "SlowDown" in str(exc)
            return Failure.TRANSIENT if status >= 500 or throttled else None
        # Before the OSError rule: some connect errors (aiohttp's, botocore's timeouts) are OSErrors.
        if isinstance(exc, _CONNECT_ERRORS):
            return Failure.UNREACHABLE
        if isinstance(exc, _TRANSIENT_LIBRARY_ERRORS):
            return Failure.TRANSIENT
        return super().failure(exc)

    def unreachable(self, url: str, exc: BaseException, waited_s: float) -> str:
        configured = _configured_endpoint()
        tried = str(getattr(exc, "kwargs", {}).get("endpoint_url", ""))
        if tried:  # the URL of the failed request: keep scheme and host
            parts = urlsplit(tried)
            endpoint = f"{parts.scheme}://{parts.netloc}"
        else:
            endpoint = configured[1] if configured else "the AWS S3 endpoint"
        named = f" (from {configured[0]})" if configured else ""
        tries = s3client.configured_tries()
        counted = f"{tries} {'try' if tries == 1 else 'tries'} in " if tries else ""
        return (
            f"cannot reach the S3 endpoint {endpoint}{named} for {url}: no connection after {counted}"
            f"{waited_s:.1f} s ({type(exc).__name__}); check the endpoint URL, the credentials "
            "and the network"
        )


def _configured_endpoint() -> tuple[str, str] | None:
    """(variable, value) of the S3 endpoint the environment names, if it names one."""
    for name in _ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return name, os.environ[name]
    return None


_BACKENDS: dict[str, type[StorageBackend]] = {"file": LocalStorage, "s3": S3Storage}
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")  # RFC 3986


class UnknownStorageError(ValueError):
    """A URL whose scheme no backend is registered for."""


def register_storage(scheme: str, backend: type[StorageBackend], *, replace: bool = False) -> None:
    """Route ``scheme://`` URLs to ``backend``; replacing a registered scheme must be asked for.

    Dataloader workers must see the registration too: make it before they start (forked workers
    inherit it) or in a module they import (workers started by spawn import modules afresh).
    """
    if not _SCHEME.match(scheme):
        raise ValueError(f"not a URL scheme: {scheme!r}")
    if scheme in _BACKENDS and not replace and _BACKENDS[scheme] is not backend:
        raise ValueError(f"storage for {scheme}:// is already registered ({_BACKENDS[scheme].__name__})")
    _BACKENDS[scheme] = backend


def unregister_storage(scheme: str) -> None:
    """Forget ``scheme://`` (the built-in schemes stay)."""
    if scheme in ("file", "s3"):
        raise ValueError(f"{scheme}:// is built in")
    _BACKENDS.pop(scheme, None)


def registered_schemes() -> list[str]:
    return sorted(_BACKENDS)


def storage_for(url: str) -> StorageBackend:
    """The backend for ``url``; a plain path is local."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    backend = _BACKENDS.get(scheme)
    if backend is None:
        schemes = ", ".join(f"{name}://" for name in registered_schemes())
        raise UnknownStorageError(
            f"{url}: no storage for {scheme}:// URLs (registered: local paths, {schemes}; "
            "shardify.storage.register_storage adds one)"
        )
    return backend(scheme)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it."""
    return storage_for(url).filesystem(url)


def is_remote(url: str) -> bool:
    """Whether ``url`` is not on local disk (written through its filesystem, not os)."""
    return storage_for(url).remote


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


@contextmanager
def as_user_error(error: Callable[[str], Exception], url: str) -> Iterator[None]:
    """Inside the block, an unknown scheme or a store that cannot be reached becomes ``error``.

    For where a command starts (listing inputs, reading a manifest): a store that refuses
    connections before anything was read is a wrong endpoint or a network problem to report in
    one line, not a bug's traceback. The wait is the client's own tries (botocore: about 10 s).
    """
    started = time.monotonic()
    try:
        yield
    except UnknownStorageError as exc:
        raise error(str(exc)) from None
    except Exception as exc:
        backend = storage_for(url)
        if backend.failure(exc) is not Failure.UNREACHABLE:
            raise
        raise error(backend.unreachable(url, exc, time.monotonic() - started)) from None
