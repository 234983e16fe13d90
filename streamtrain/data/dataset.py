"""What the data is: sources, each an ordered run of shards with exact sample counts.

``data.train: [pixmo, laion]`` resolves (shards.py) to a Dataset of two Sources, each keeping its
name and its shards. The plan reads the shards of all sources laid end to end
(``Dataset.shards``), so sample order, resume state and fingerprint are those of that flat list;
keeping the sources apart is what lets a plan decide how many samples of each a batch holds.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from shardify.tarread import load_checksums
from streamtrain.config.weights import Schedule


@dataclass(frozen=True)
class ShardInfo:
    """One shard and its exact sample count (from the manifest)."""

    url: str
    samples: int
    broken: frozenset[str] = field(default=frozenset(), compare=False)
    """Keys of samples the manifest marks as failing to decode: read past, never decoded."""
    checksums: str | None = field(default=None, compare=False)
    """URL of the shard's member checksums (``<shard>.crc32.json``); None where not recorded."""
    size: int | None = field(default=None, compare=False)
    """Bytes of the tar file, as the manifest records them (bounds read-ahead)."""

    def member_checksums(self) -> Mapping[str, int] | None:
        """What readers verify members against (loaded once per process and shard)."""
        return load_checksums(self.checksums) if self.checksums is not None else None


@dataclass(frozen=True)
class Source:
    """One entry of ``data.train`` / ``data.eval`` and its shards, in order."""

    name: str = field(compare=False)
    """The entry as written (a directory, a manifest, a brace pattern). A label only: the same
    output named by its directory or by its manifest is the same source."""
    shards: tuple[ShardInfo, ...]
    schedule: Schedule | None = None
    """Its weight over the steps when it is one source of a mixture; None otherwise."""

    @cached_property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)


@dataclass(frozen=True)
class Dataset:
    """The sources of one data list, in order."""

    sources: tuple[Source, ...]
    schema: str
    named: bool = False
    """Written as ``{path, weight, name}`` entries: a mixture (train) or named parts (eval)."""
    media: Counter[str] = field(default_factory=Counter, compare=False, hash=False)
    """Samples per media member extension, as the manifests record them (empty where they do not)."""

    @cached_property
    def shards(self) -> tuple[ShardInfo, ...]:
        """Every source's shards, laid end to end in source order."""
        return tuple(itertools.chain.from_iterable(source.shards for source in self.sources))

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def mixture(self) -> bool:
        """Whether the sources are weighted (a mixture) rather than laid end to end."""
        return any(source.schedule is not None for source in self.sources)

    def fingerprint(self) -> str:
        """Identifies the shard list; a resumed run refuses a different one.

        Only the flat list counts (not how it is split into sources), so a loader state saved
        before sources were kept apart resumes unchanged.
        """
        text = "\n".join(f"{s.url}\t{s.samples}" for s in self.shards)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
