"""Turning ``data.train`` / ``data.eval`` into sources: their shards and exact sample counts.

A data source is a shardify output (local directory or ``s3://`` prefix holding
``manifest.json``), a manifest path, a brace pattern (``s3://b/pixmo/shard-{000000..000999}.tar``)
or a single shard; or a list of these, each of which stays a Source of its own. Patterns and
single shards take their counts from the ``manifest.json`` beside them: exact counts are what
make the epoch plan (and cheap resume) possible without reading a byte of the shards.
"""

from __future__ import annotations

import posixpath
from collections import Counter

import braceexpand

from shardify.format import CHECKSUMS_SUFFIX, MANIFEST_NAME, Manifest, ShardEntry
from shardify.storage import as_user_error, filesystem, join
from streamtrain.data.dataset import Dataset, ShardInfo, Source
from streamtrain.errors import UserError


class DataSourceError(UserError):
    """A data source that cannot be used; the message names it and says why."""


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


def _shard_info(url: str, entry: ShardEntry, manifest: Manifest, manifest_dir: str) -> ShardInfo:
    """One listed shard; its checksum file lies beside the manifest (which may not be where the
    shards are: ``shardify index --output``)."""
    checksums = join(manifest_dir, entry.name + CHECKSUMS_SUFFIX) if manifest.checksums else None
    return ShardInfo(url, entry.samples, frozenset(entry.broken), checksums, entry.bytes or None)


def _resolve_one(source: str) -> tuple[list[ShardInfo], str, Counter[str]]:
    """The shards of one entry, their schema, and their samples per media extension."""
    if source.endswith(MANIFEST_NAME):
        manifest = _read_manifest(source)
        base = manifest.shard_base(source)  # `shardify index --output` names the shards' own place
        here = _parent(source)
        shards = [_shard_info(join(base, e.name), e, manifest, here) for e in manifest.shards]
        return shards, manifest.schema, Counter(manifest.media)
    if source.endswith(".tar") or "{" in source:
        names = list(braceexpand.braceexpand(source))
        manifests: dict[str, Manifest] = {}
        shards = []
        for url in names:
            base = _parent(url)
            if base not in manifests:
                manifests[base] = _read_manifest(join(base, MANIFEST_NAME))
            entries = {e.name: e for e in manifests[base].shards}
            name = posixpath.basename(url)
            if name not in entries:
                raise DataSourceError(f"{url} is not listed in {join(base, MANIFEST_NAME)}")
            shards.append(_shard_info(url, entries[name], manifests[base], base))
        schemas = {m.schema for m in manifests.values()}
        media = sum((Counter(m.media) for m in manifests.values()), Counter())
        return shards, schemas.pop() if len(schemas) == 1 else "mixed", media
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
    """One Source per entry of ``sources``, in the order given; the same shard twice is an error.

    Shards without samples are left out (a source may end up with none).
    """
    items = [sources] if isinstance(sources, str) else list(sources)
    if not items:
        raise DataSourceError("no data sources given")
    found: list[tuple[str, list[ShardInfo]]] = []
    schemas = set()
    media: Counter[str] = Counter()
    for item in items:
        shards, schema, counts = _resolve_one(item)
        found.append((item, shards))
        schemas.add(schema)
        media.update(counts)
    listed = Counter(shard.url for _, shards in found for shard in shards)
    duplicated = sorted(url for url, n in listed.items() if n > 1)
    if duplicated:
        raise DataSourceError(f"shards listed more than once: {', '.join(duplicated[:5])}")
    dataset = Dataset(
        tuple(Source(name, tuple(s for s in shards if s.samples > 0)) for name, shards in found),
        schemas.pop() if len(schemas) == 1 else "mixed",
        media=media,
    )
    if not dataset.shards:
        empty = sum(len(shards) for _, shards in found)
        raise DataSourceError(f"the data sources hold no samples ({empty} empty shards)")
    return dataset
