"""What a parquet-to-tar conversion is asked to do: the options, validated once."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from shardify.checks import DEFAULT_MAX_IMAGE_PIXELS
from shardify.conversations import TEMPLATES
from shardify.fetch import FetchOptions
from shardify.groups import GROUP_KEYS
from shardify.sources import InputError, column_problems

_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
ENGINES = ("local", "ray")
DEFAULT_UNIT_BYTES = 2 << 30
"""Parquet bytes per unit of work: half a minute to a minute of checking on one core for 1024x768
photos (57-83 MB/s of JPEG per core measured by benchmarks/bench_shardify.py), so that Ray's cost per
task is noise and a lost unit costs little to redo."""


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass
class ConvertOptions:
    """How to convert. The options in :meth:`shaping` determine the output; the rest (engine,
    workers, fetching, overwrite, batch_rows) only how fast or where it is made."""

    output: str
    """Local directory or s3://bucket/prefix."""
    schema: str | None = None
    """caption, qa or conversation; None detects it from the columns."""
    max_samples_per_shard: int = 5000
    max_shard_bytes: int = 1 << 30
    prefix: str = "shard"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    transcode_uncommon: bool = False
    """Re-encode GIF/BMP/TIFF images as PNG so readers that know only jpg/png/webp see them."""
    columns: dict[str, str] = field(default_factory=dict)
    """Field -> the column to read it from (``--column FIELD=COLUMN``); unmapped fields use their name."""
    template: str | None = None
    """Conversation schema: make each row's turns with a built-in template (``pixmo-points``,
    ``pixmo-count``) from PixMo's pointing and counting columns."""
    group_by: str | None = None
    """Conversation schema: rows with the same value of this field (``image_url``, ``image_sha256``,
    ``image_bytes``, ``image_path``) become one sample, their turns one after another."""
    input_format: str = "parquet"
    """``parquet`` (parquet-to-tar) or ``json`` (json-to-tar: JSON/JSONL files of LLaVA's layout)."""
    image_root: str | None = None
    """json-to-tar: the folder (or ``s3://`` prefix) the inputs' image paths are relative to. Not
    part of the fingerprint: the same images moved elsewhere give the same samples."""
    unit_bytes: int = DEFAULT_UNIT_BYTES
    """Inputs are cut into units of about this many parquet bytes (whole row groups, never across
    files); each unit becomes its own run of shards, so units convert independently, anywhere."""
    workers: int = field(default_factory=default_workers)
    """Check threads per unit being converted (local engine); Ray tasks use one each."""
    engine: str = "local"
    """``local`` (this process) or ``ray`` (tasks on a Ray cluster)."""
    ray_address: str | None = None
    """The cluster to join (``host:port``); None: ``RAY_ADDRESS``, else a Ray started here."""
    fetch: FetchOptions = field(default_factory=FetchOptions)
    """Downloading of ``image_url`` rows. Not part of the fingerprint: a rerun may change them."""
    overwrite: bool = False
    batch_rows: int = 32

    def validate(self) -> None:
        problems = []
        limits = ("max_samples_per_shard", "max_shard_bytes", "max_image_pixels", "unit_bytes")
        for name in (*limits, "workers", "batch_rows"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not _PREFIX_PATTERN.match(self.prefix):
            problems.append(f"--prefix {self.prefix!r} may hold only letters, digits, '_' and '-'")
        if self.engine not in ENGINES:
            problems.append(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.ray_address is not None and self.engine != "ray":
            problems.append("--ray-address is only for --engine ray")
        if self.input_format not in ("parquet", "json"):
            problems.append(f"input format {self.input_format!r} is not parquet or json")
        if self.input_format == "json" and not self.image_root:
            problems.append("json-to-tar needs --image-root, the folder the images' paths are relative to")
        if self.template is not None and self.template not in TEMPLATES:
            problems.append(f"--template {self.template!r}: choose one of {', '.join(TEMPLATES)}")
        if self.group_by is not None and self.group_by not in GROUP_KEYS:
            problems.append(f"--group-by {self.group_by!r}: choose one of {', '.join(GROUP_KEYS)}")
        if (self.template or self.group_by) and self.schema not in (None, "conversation"):
            problems.append(f"--template and --group-by make conversations, not the {self.schema} schema")
        problems += column_problems(self.columns) + self.fetch.problems()
        if problems:
            raise InputError("; ".join(problems))

    def shaping(self) -> dict[str, Any]:
        """The options that determine the output (recorded in the manifest)."""
        shaping: dict[str, Any] = {
            "max_samples_per_shard": self.max_samples_per_shard,
            "max_shard_bytes": self.max_shard_bytes,
            "prefix": self.prefix,
            "max_image_pixels": self.max_image_pixels,
            "transcode_uncommon": self.transcode_uncommon,
            "unit_bytes": self.unit_bytes,
        }
        # Only when given, so conversions without a mapping keep the fingerprint they always had.
        if self.columns:
            shaping["columns"] = dict(sorted(self.columns.items()))
        for name in ("template", "group_by"):
            if getattr(self, name) is not None:
                shaping[name] = getattr(self, name)
        return shaping
