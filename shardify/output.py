"""The output location (local directory or ``s3://`` prefix) with atomic publication.

A file becomes visible under its final name only when complete: locally it is written under
``.shardify/`` (same filesystem) and renamed; on S3 it is written to a local temporary file and
uploaded with one PUT, which S3 makes visible atomically.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable

from shardify.sources import InputError
from shardify.storage import as_user_error, filesystem, is_remote, join, storage_for

WORK_DIR = ".shardify"


class Output:
    """Where shards, the skipped log and the manifest go."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") if url != "/" else url
        with as_user_error(InputError, url):
            self.remote = is_remote(url)
            self.fs, self.root = filesystem(self.url)
        if self.remote:
            self._scratch = tempfile.mkdtemp(prefix="shardify-")
        else:
            self._scratch = os.path.join(self.root, WORK_DIR)
        try:
            if not self.remote:
                os.makedirs(self.root, exist_ok=True)
                probe = os.path.join(self.root, ".shardify-write-test")
                with open(probe, "wb"):
                    pass
                os.remove(probe)
            else:
                with as_user_error(InputError, url):
                    bucket_exists = self.fs.exists(self.root.split("/", 1)[0])
                if not bucket_exists:
                    raise InputError(f"output bucket of {url} does not exist")
        except OSError as exc:
            raise InputError(f"cannot write to output {url}: {exc.strerror or exc}") from None

    def path(self, name: str) -> str:
        return join(self.root, name)

    def scratch_path(self, name: str) -> str:
        """A local path for a file being written; publish() moves it to its final name."""
        os.makedirs(self._scratch, exist_ok=True)
        return os.path.join(self._scratch, name)

    def publish(self, scratch_name: str, name: str) -> None:
        local = self.scratch_path(scratch_name)
        if self.remote:
            storage_for(self.url).upload(local, f"{self.url}/{name}")
            os.remove(local)
        else:
            _fsync(local)
            if "/" in name:
                os.makedirs(os.path.dirname(self.path(name)), exist_ok=True)
            os.replace(local, self.path(name))

    def write_text(self, name: str, text: str) -> None:
        """Atomically replace ``name`` with ``text``."""
        scratch = name.replace("/", "_") + ".writing"
        with open(self.scratch_path(scratch), "w", encoding="utf-8") as handle:
            handle.write(text)
        self.publish(scratch, name)

    def read_text(self, name: str) -> str | None:
        try:
            with self.fs.open(self.path(name), "r", encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        """Files directly under the output."""
        try:
            listing = (
                self.fs.ls(self.root, detail=False, refresh=True) if self.remote else os.listdir(self.root)
            )
        except FileNotFoundError:
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in listing)

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(name), recursive=True)

    def clear_scratch(self) -> None:
        """Drop partial files left by an interrupted run; they are never visible as results."""
        if os.path.isdir(self._scratch):
            for entry in os.listdir(self._scratch):
                if entry.endswith((".partial", ".writing")):
                    os.remove(os.path.join(self._scratch, entry))

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self._scratch, ignore_errors=True)


def _fsync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
