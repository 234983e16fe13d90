"""The shard contract shared by the converter and the trainer.

A shardify output (a local directory or an ``s3://`` prefix) holds:

- ``{prefix}-000000.tar``, ... WebDataset shards. Every sample is a run of members sharing one
  key: the media under its detected extension (``.jpg``, ``.png``, ``.wav``, ...), ``.txt`` (the
  caption, caption schema only) and ``.json`` (every non-binary column of the source row; for the
  conversation schema, ``messages: [{role: user|assistant, content}, ...]`` too).
- ``manifest.json``: the ordered shard list with exact per-shard sample counts (written last).
- ``skipped.jsonl``: one line per source row that was not converted, with its reason.

This module knows nothing of conversion, training or storage (storage.py says how a location
is addressed and read); both sides import it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.jsonl"
CHECKSUMS_SUFFIX = ".crc32.json"
"""``shard-000000.tar.crc32.json``, beside the manifest: the CRC-32 of every member of that shard."""
CHECKSUM_ALGORITHM = "crc32"
MANIFEST_FORMAT_VERSION = 2
"""2: each unit of work has its own run of shards ({prefix}-{unit:06d}-{part:06d}.tar); 1 (still
read): one run of shards across all inputs."""
READABLE_FORMAT_VERSIONS = (1, 2)
SCHEMAS = ("caption", "qa", "conversation")

# Why a fixed timestamp: shards are byte-identical whatever the worker count or restarts.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_]+")
_KEY_SLUG_LEN = 48

# PIL format name -> member extension. Only formats listed here are accepted as images.
IMAGE_EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",  # multi-picture JPEG from phone cameras: a valid JPEG to every reader
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
}
# The extensions every WebDataset image reader understands (open_clip reads exactly these).
COMMON_IMAGE_EXTENSIONS = ("jpg", "png", "webp")

# soundfile (libsndfile) major format -> member extension.
AUDIO_EXTENSIONS = {
    "WAV": "wav",
    "WAVEX": "wav",
    "FLAC": "flac",
    "OGG": "ogg",
    "MP3": "mp3",
}


def sample_key(source_index: int, row: int, sample_id: object) -> str:
    """The tar member key of one sample: unique, deterministic and safe for every tar reader.

    WebDataset splits a member name at the first dot of its basename and treats slashes as
    directories, so the key holds neither; ``source_index`` and ``row`` make it unique even when
    sample_ids repeat; a slug of the sample_id keeps it readable. The original id is in ``.json``.
    """
    key = f"{source_index:05d}-{row:09d}"
    if sample_id is None:
        return key
    slug = _UNSAFE_KEY_CHARS.sub("_", str(sample_id)).strip("_")[:_KEY_SLUG_LEN]
    return f"{key}-{slug}" if slug else key


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def checksums_json(checksums: dict[str, int]) -> str:
    """A shard's checksum file: member basename -> CRC-32 of its payload, in tar order."""
    return json.dumps({"algorithm": CHECKSUM_ALGORITHM, "members": checksums}, separators=(",", ":"))


def parse_checksums(text: str) -> dict[str, int]:
    raw = json.loads(text)
    if raw.get("algorithm") != CHECKSUM_ALGORITHM:
        raise ValueError(f"checksum algorithm {raw.get('algorithm')!r} is not {CHECKSUM_ALGORITHM!r}")
    return {str(name): int(value) for name, value in raw["members"].items()}


@dataclass
class ShardEntry:
    """One shard as the manifest lists it."""

    name: str
    """File name relative to the output directory."""
    samples: int
    """Exact number of samples in the shard."""
    bytes: int
    """Size of the tar file in bytes."""
    broken: list[str] = field(default_factory=list)
    """Keys of samples that fail to decode (``shardify index --check``): they keep their place in
    the count and readers skip them unread. Written only when not empty."""


@dataclass
class Manifest:
    """What a shardify output holds; the trainer relies on its exact per-shard counts."""

    schema: str
    shards: list[ShardEntry]
    rows_read: int
    samples_written: int
    rows_skipped: int
    skipped_by_reason: dict[str, int]
    inputs: list[str]
    options: dict[str, Any]
    media: dict[str, int] = field(default_factory=dict)
    """Samples written per member extension (``{"jpg": 980, "png": 20}``)."""
    fingerprint: str = ""
    """Digest of the inputs and options; a rerun with the same ones finds the work done."""
    format_version: int = MANIFEST_FORMAT_VERSION
    created_by: str = "shardify"
    base: str | None = None
    """Where the shards are (a directory or ``s3://`` prefix) when not beside the manifest
    (``shardify index --output`` for read-only shards). Written only when set."""
    checksums: str | None = None
    """``"crc32"`` when every shard has its member checksums beside the manifest, in
    ``<shard name>.crc32.json`` (readers verify every member they read); None: not recorded.
    Written only when set."""
    rows_merged: int | None = None
    """Rows joined to the sample of their image's first row (``--group-by``), so that
    ``rows_read == samples_written + rows_skipped + rows_merged``. Written only when grouping."""

    def to_json(self) -> str:
        # Optional fields are left out when unset, so readers predating them read the manifest.
        raw = asdict(self)
        for optional in ("base", "checksums", "rows_merged"):
            if raw[optional] is None:
                del raw[optional]
        for entry in raw["shards"]:
            if not entry["broken"]:
                del entry["broken"]
        return json.dumps(raw, indent=2, ensure_ascii=False) + "\n"

    def shard_base(self, manifest_url: str) -> str:
        """The directory the shard names are relative to, for the manifest at ``manifest_url``."""
        if self.base is not None:
            return self.base
        return manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else "."

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> Manifest:
        """Parse a manifest, refusing versions this code does not understand."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        version = raw.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"{where}: manifest format_version {version!r} is not supported "
                f"(this version reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))})"
            )
        raw["shards"] = [ShardEntry(**entry) for entry in raw["shards"]]
        return cls(**raw)
