"""Storage backends defined by the tests, registered through shardify.storage's scheme table."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from fsspec.implementations.memory import MemoryFileSystem

from shardify.readahead import Answer, RangeReader
from shardify.storage import (
    LocalStorage,
    ObjectInfo,
    ReadableFile,
    StorageBackend,
    register_storage,
    unregister_storage,
)


class MemoryStorage(StorageBackend):
    """``mem://`` objects held in fsspec's in-memory filesystem; every open is recorded."""

    opened: ClassVar[list[str]] = []

    def filesystem(self, url: str) -> tuple[MemoryFileSystem, str]:
        return MemoryFileSystem(), "/" + url.split("://", 1)[1]

    def open(self, url: str) -> tuple[ReadableFile, ObjectInfo]:
        MemoryStorage.opened.append(url)
        return super().open(url)


class FailingLocalStorage(LocalStorage):
    """Local files whose first ``failures`` reads (counted over all opens) fail with a reset."""

    failures = 0
    reads = 0

    def open(self, url: str) -> tuple[ReadableFile, ObjectInfo]:
        file, info = super().open(url)
        return _FailingFile(file), info


class _FailingFile:
    def __init__(self, file: Any) -> None:
        self._file = file

    def seek(self, position: int) -> Any:
        return self._file.seek(position)

    def read(self, size: int) -> bytes:
        FailingLocalStorage.reads += 1
        if FailingLocalStorage.reads <= FailingLocalStorage.failures:
            raise ConnectionResetError("connection reset by peer (injected)")
        return self._file.read(size)

    def close(self) -> None:
        self._file.close()


@contextmanager
def registered(scheme: str, backend: type[StorageBackend]) -> Iterator[str]:
    """``backend`` under ``scheme`` for the block; yields ``scheme://``."""
    register_storage(scheme, backend)
    try:
        yield f"{scheme}://"
    finally:
        unregister_storage(scheme)


@contextmanager
def in_memory(local_dir: Path) -> Iterator[str]:
    """The files of ``local_dir`` copied into ``mem://``; yields their mem:// directory URL."""
    fs = MemoryFileSystem()
    root = f"/{uuid.uuid4().hex}/{local_dir.name}"
    for path in sorted(local_dir.iterdir()):
        if path.is_file():
            fs.pipe(f"{root}/{path.name}", path.read_bytes())
    MemoryStorage.opened = []
    with registered("mem", MemoryStorage):
        try:
            yield f"mem:/{root}"
        finally:
            fs.rm(root.rsplit("/", 1)[0], recursive=True)


class FarLocalStorage(LocalStorage):
    """Local files read as a far store is: byte ranges from many threads (so through the
    read-ahead), each range counted in ``fetched`` (bytes answered, this process)."""

    remote = True
    fetched = 0

    def range_reader(self, url: str) -> RangeReader:
        path = url.split("://", 1)[1]

        def read(start: int, stop: int) -> Answer:
            with open(path, "rb") as handle:
                handle.seek(start)
                data = handle.read(stop - start)
            FarLocalStorage.fetched += len(data)
            return Answer(data, os.path.getsize(path), None)

        return read
