"""Turning ``data.train`` / ``data.eval`` into the list of shards and their exact sample counts.

A data source is a shardify output (local directory or ``s3://`` prefix holding
``manifest.json``), a manifest path, a brace pattern (``s3://b/pixmo/shard-{000000..000999}.tar``)
or a single shard; or a list of these. Patterns and single shards take their counts from the
``manifest.json`` beside them: exact counts are what make the epoch plan (and cheap resume)
possible without reading a byte of the shards.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from dataclasses import dataclass

import braceexpand

from shardify.format import MANIFEST_NAME, Manifest
from shardify.storage import as_user_error, filesystem, join
from streamtrain.data.plan import ShardInfo
from streamtrain.errors import UserError


class DataSourceError(UserError):
    """A data source that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Dataset:
    """The shards of one data source list, in order."""

    shards: tuple[ShardInfo, ...]
    schema: str

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def fingerprint(self) -> str:
        """Identifies the shard list; a resumed run refuses a different one."""
        text = "\n".join(f"{s.url}\t{s.samples}" for s in self.shards)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_manifest(url: str) -> Manifest:
    try:
        with as_user_error(DataSourceError, url):
            fs, path = filesystem(url)
            with fs.open(path, "r", encoding="utf-8") as handle:
                text = handle.read()
    except FileNotFoundError:
        raise DataSourceError(f"{url} does not exist") from None
    except OSError as exc:
        raise DataSourceError(f"cannot read {url}: {exc}") from None
    try:
        return Manifest.from_json(text, url)
    except (ValueError, TypeError, KeyError) as exc:
        raise DataSourceError(f"{url} is not a shardify manifest: {exc}") from None


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _resolve_one(source: str) -> tuple[list[ShardInfo], str]:
    if source.endswith(MANIFEST_NAME):
        base, manifest = _parent(source), _read_manifest(source)
        return [ShardInfo(join(base, e.name), e.samples) for e in manifest.shards], manifest.schema
    if source.endswith(".tar") or "{" in source:
        names = list(braceexpand.braceexpand(source))
        manifests: dict[str, Manifest] = {}
        shards = []
        for url in names:
            base = _parent(url)
            if base not in manifests:
                manifests[base] = _read_manifest(join(base, MANIFEST_NAME))
            counts = {e.name: e.samples for e in manifests[base].shards}
            name = posixpath.basename(url)
            if name not in counts:
                raise DataSourceError(f"{url} is not listed in {join(base, MANIFEST_NAME)}")
            shards.append(ShardInfo(url, counts[name]))
        schemas = {m.schema for m in manifests.values()}
        return shards, schemas.pop() if len(schemas) == 1 else "mixed"
    with as_user_error(DataSourceError, source):
        fs, path = filesystem(source)
        found = fs.exists(join(path, MANIFEST_NAME))
    if not found:
        raise DataSourceError(
            f"{source} holds no {MANIFEST_NAME}: point data at a shardify output, its manifest, "
            "or a brace pattern of shards that have a manifest beside them"
        )
    return _resolve_one(join(source, MANIFEST_NAME))


def resolve(sources: str | list[str]) -> Dataset:
    """All shards named by ``sources``, in the order given; the same shard twice is an error."""
    items = [sources] if isinstance(sources, str) else list(sources)
    if not items:
        raise DataSourceError("no data sources given")
    shards: list[ShardInfo] = []
    schemas = set()
    for item in items:
        found, schema = _resolve_one(item)
        shards.extend(found)
        schemas.add(schema)
    duplicated = sorted(url for url, n in Counter(s.url for s in shards).items() if n > 1)
    if duplicated:
        raise DataSourceError(f"shards listed more than once: {', '.join(duplicated[:5])}")
    empty = [s.url for s in shards if s.samples == 0]
    shards = [s for s in shards if s.samples > 0]
    if not shards:
        raise DataSourceError(f"the data sources hold no samples ({len(empty)} empty shards)")
    return Dataset(tuple(shards), schemas.pop() if len(schemas) == 1 else "mixed")
