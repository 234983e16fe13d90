"""``shardify index``: a manifest for WebDataset shards that already exist.

Shards from ``webdataset.ShardWriter``, img2dataset or a public set have no manifest, and the
trainer needs one: exact per-shard counts are its epoch plan. Each shard is walked by the
trainer's own tar parser (tarread.py), so the count is the one the trainer will read; only tar
headers are fetched and member payloads are seeked past, except the ``.json`` of the first few
samples of each shard (to tell the schema) and, with ``check``, every sample's members (to decode
its image and record the keys of the samples that fail). The manifest is written last, in one
atomic write; an interrupted run keeps no journal: run again, it redoes the scan (headers are
cheap) and writes the same manifest.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import braceexpand

from shardify.bytestream import ReadStats, ShardReadError
from shardify.checks import DEFAULT_MAX_IMAGE_PIXELS, check_audio, check_image
from shardify.format import (
    AUDIO_EXTENSIONS,
    CHECKSUM_ALGORITHM,
    CHECKSUMS_SUFFIX,
    IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    checksums_json,
)
from shardify.output import WORK_DIR, Output
from shardify.sources import InputError
from shardify.storage import as_user_error, join, storage_for
from shardify.tarread import iter_samples

CREATED_BY = "shardify index"
SCHEMA_SAMPLES = 8
"""Samples at the start of each shard whose ``.json`` is read to tell the schema."""
IMAGE_MEMBERS = (*dict.fromkeys(IMAGE_EXTENSIONS.values()), "jpeg")
AUDIO_MEMBERS = tuple(dict.fromkeys(AUDIO_EXTENSIONS.values()))
MEDIA_MEMBERS = (*IMAGE_MEMBERS, *AUDIO_MEMBERS)
TEXT_MEMBERS = ("txt", "json")


@dataclass
class IndexOptions:
    """How ``shardify index`` runs."""

    output: str | None = None
    """Where manifest.json goes; None: the shards' own directory (which must be writable)."""
    check: bool = False
    """Decode every sample's media: broken samples are listed in the manifest, broken shards left out."""
    workers: int = 4
    """Shards scanned at once (threads)."""
    schema: str | None = None
    """caption, qa or conversation; None: told from the samples."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """With ``check``: larger images are broken (too_large), as parquet-to-tar skips them."""


@dataclass
class ShardScan:
    """What scanning one shard found."""

    url: str
    size: int
    samples: int = 0
    media: Counter[str] = field(default_factory=Counter)
    """Samples per media member extension."""
    members: Counter[str] = field(default_factory=Counter)
    """Samples per member extension, media or not."""
    schema_votes: Counter[str] = field(default_factory=Counter)
    """Per sampled sample: caption, qa or none."""
    broken: dict[str, str] = field(default_factory=dict)
    """Key -> reason, for samples that failed the check."""
    checksums: dict[str, int] = field(default_factory=dict)
    """With ``check``: member basename -> CRC-32 of its bytes (basenames seen twice left out)."""
    problem: str | None = None
    """Why the shard cannot be used (not a tar, truncated, a member without a key)."""
    read: ReadStats = field(default_factory=ReadStats)


@dataclass
class IndexResult:
    """What an index run wrote and what it cost."""

    manifest: Manifest
    manifest_url: str
    scans: list[ShardScan]
    elapsed_s: float

    @property
    def left_out(self) -> list[ShardScan]:
        return [scan for scan in self.scans if scan.problem is not None]

    @property
    def bytes_read(self) -> int:
        return sum(scan.read.bytes_read for scan in self.scans)

    @property
    def shard_bytes(self) -> int:
        return sum(scan.size for scan in self.scans)


class BadShardsError(Exception):
    """Shards that cannot be counted; without ``check`` no manifest is written."""

    def __init__(self, scans: list[ShardScan]) -> None:
        self.scans = scans
        listed = "; ".join(f"{scan.url}: {scan.problem}" for scan in scans[:20])
        more = f" (and {len(scans) - 20} more)" if len(scans) > 20 else ""
        super().__init__(f"{len(scans)} shard(s) cannot be indexed: {listed}{more}")


def list_shards(patterns: list[str]) -> list[tuple[str, int]]:
    """``(url, bytes)`` of the ``.tar`` files that directories (searched recursively), globs,
    brace patterns and file names stand for, in the order given, each once."""
    found: dict[str, int] = {}
    for pattern in patterns:
        for item in braceexpand.braceexpand(pattern):
            storage = storage_for(item)
            with as_user_error(InputError, item):
                fs, path = storage.filesystem(item)
                if glob.has_magic(path):
                    matches = {
                        p: info for p, info in fs.glob(path, detail=True).items() if p.endswith(".tar")
                    }
                elif fs.isdir(path):
                    matches = fs.find(path, detail=True)
                    matches = {p: info for p, info in matches.items() if _listed_shard(p)}
                    if not matches:
                        raise InputError(f"directory {item} holds no *.tar files")
                elif fs.exists(path):
                    info = fs.info(path)
                    matches = {info["name"]: info}
                else:
                    raise InputError(f"shard {item} does not exist")
            files = {p: info for p, info in matches.items() if info.get("type") != "directory"}
            if not files:
                raise InputError(f"no shard matched {item}")
            for path in sorted(files):
                found.setdefault(storage.url(path), int(files[path].get("size") or 0))
    if not found:
        raise InputError("no shards given")
    return list(found.items())


def _listed_shard(path: str) -> bool:
    """Whether a file found in a directory is a shard: ``.tar``, not hidden (scratch files)."""
    return path.endswith(".tar") and not any(part.startswith(".") for part in path.split("/") if part)


def common_base(urls: list[str]) -> str:
    """The deepest directory holding every shard: their names in the manifest are relative to it."""
    parents = [url.rsplit("/", 1)[0].split("/") for url in urls]
    base = parents[0]
    for parts in parents[1:]:
        same = 0
        while same < min(len(base), len(parts)) and base[same] == parts[same]:
            same += 1
        base = base[:same]
    joined = "/".join(base)
    if not joined or joined.endswith(":/") or joined.endswith(":"):
        raise InputError(
            "the shards share no common directory (several buckets or storages): index each apart"
        )
    return joined


def scan_shard(url: str, size: int, options: IndexOptions) -> ShardScan:
    """Count the samples of one shard, tally its members and, with ``check``, decode its media."""
    scan = ShardScan(url, size)

    def fetch(index: int, extension: str) -> bool:
        if options.check:
            return True  # every member: its bytes are decoded or checksummed
        return extension == "json" and index < SCHEMA_SAMPLES

    repeated: set[str] = set()

    try:
        for raw in iter_samples(url, stats=scan.read, fetch=fetch):
            members = [name for name in raw if not name.startswith("__")]
            if not raw["__key__"]:
                scan.problem = (
                    f"member '.{members[0]}' after sample {scan.samples} has no key (its basename "
                    "starts with a dot): webdataset drops it, so no count would be right"
                )
                return scan
            scan.samples += 1
            scan.members.update(members)
            scan.media.update(name for name in members if name in MEDIA_MEMBERS)
            if raw["__index__"] < SCHEMA_SAMPLES:
                scan.schema_votes[_schema_of(raw)] += 1
            if options.check:
                reason = broken_reason(raw, options.max_image_pixels)
                if reason is not None:
                    scan.broken[raw["__key__"]] = reason
                _add_checksums(scan, raw, members, repeated)
    except ShardReadError as exc:
        scan.problem = exc.reason + (f" ({exc.detail})" if exc.detail else "")
        if exc.detail.endswith(" at byte 0"):  # not even one tar header
            scan.problem = f"not a tar file ({exc.detail})"
    return scan


def _add_checksums(scan: ShardScan, raw: dict[str, Any], members: list[str], repeated: set[str]) -> None:
    """Record the CRC-32 of each member, as readers find it (by basename); a basename that
    occurs twice in a shard cannot be told apart, so it is left unverified."""
    for extension in members:
        payload = raw[extension]
        name = f"{raw['__key__']}.{extension}"
        if name in repeated or not isinstance(payload, bytes):
            continue
        if name in scan.checksums:
            repeated.add(name)
            del scan.checksums[name]
            continue
        scan.checksums[name] = zlib.crc32(payload)


def _schema_of(raw: dict[str, Any]) -> str:
    """What one sample holds: conversation (json messages), qa (json question and answer), caption
    (.txt or json caption), none."""
    metadata = _json_of(raw)
    if isinstance(metadata, dict) and isinstance(metadata.get("messages"), list):
        return "conversation"
    if isinstance(metadata, dict) and "question" in metadata and "answer" in metadata:
        return "qa"
    if "txt" in raw or (isinstance(metadata, dict) and "caption" in metadata):
        return "caption"
    return "none"


def _json_of(raw: dict[str, Any]) -> Any:
    data = raw.get("json")
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def broken_reason(raw: dict[str, Any], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """Why a training decoder would fail on this sample (its media, text or json), or None."""
    if "__error__" in raw:
        return "too_large"
    image = next((name for name in IMAGE_MEMBERS if name in raw), None)
    audio = next((name for name in AUDIO_MEMBERS if name in raw), None)
    if image is None and audio is None:
        return "no_media"
    if image is not None:
        verdict = check_image(raw[image], max_pixels, column=f"{raw['__key__']}.{image}")
        if not verdict.ok:
            return verdict.reason
    if audio is not None:
        verdict = check_audio(raw[audio], column=f"{raw['__key__']}.{audio}")
        if not verdict.ok:
            return verdict.reason
    if "json" in raw and _json_of(raw) is None:
        return "bad_json"
    if "txt" in raw:
        try:
            raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return "bad_text"
    return None


def decide_schema(scans: list[ShardScan], requested: str | None) -> str:
    """The requested schema, else the one most sampled samples hold (InputError when none has text)."""
    if requested is not None:
        return requested
    votes: Counter[str] = sum((scan.schema_votes for scan in scans), Counter())
    held = {schema: votes[schema] for schema in ("conversation", "qa", "caption") if votes[schema]}
    if not held:
        raise InputError(
            "no sampled sample has a caption (.txt, or a json 'caption'), a json question/answer or "
            "json messages: pass --schema caption, qa or conversation"
        )
    return max(held, key=lambda schema: held[schema])


def index(
    patterns: list[str],
    options: IndexOptions,
    on_shard: Callable[[ShardScan], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> IndexResult:
    """Scan the shards ``patterns`` name and write their manifest; returns what it found.

    InputError for what the user asked for (no shards, an unwritable destination, a manifest of
    another kind there); BadShardsError when shards cannot be counted and ``check`` is off.
    """
    started = time.monotonic()
    shards = list_shards(patterns)
    base = common_base([url for url, _ in shards])
    destination = options.output or base
    output = _open_destination(destination)
    try:
        if on_plan is not None:
            on_plan(len(shards))
        done = _ScanCache(output, options)
        pool = ThreadPoolExecutor(max(1, options.workers), thread_name_prefix="index")
        try:
            futures = [
                done.get(url, size) or pool.submit(scan_shard, url, size, options) for url, size in shards
            ]
            scans = []
            for future in futures:
                if isinstance(future, ShardScan):  # scanned by an interrupted run
                    scans.append(future)
                else:
                    scans.append(future.result())
                    done.put(scans[-1])
                if on_shard is not None:
                    on_shard(scans[-1])
        finally:  # on Ctrl-C: no queued shard starts
            pool.shutdown(wait=True, cancel_futures=True)
        bad = [scan for scan in scans if scan.problem is not None]
        good = [scan for scan in scans if scan.problem is None]
        if (bad and not options.check) or not good:
            raise BadShardsError(bad)
        manifest = build_manifest(patterns, good, base, destination, options)
        try:
            if options.check:  # checksum files first: the manifest, written last, names them
                for entry, scan in zip(manifest.shards, good, strict=True):
                    name = entry.name + CHECKSUMS_SUFFIX
                    if not output.remote:
                        os.makedirs(os.path.dirname(output.path(name)), exist_ok=True)
                    output.write_text(name, checksums_json(scan.checksums))
            output.write_text(MANIFEST_NAME, manifest.to_json())
        except OSError as exc:
            raise InputError(
                f"cannot write {MANIFEST_NAME} to {destination}: {exc}; pass --output DIR for shards "
                "in a read-only location"
            ) from None
        done.clear()
    finally:
        output.close()
        if not output.remote:  # the scratch folder of the atomic write, unless something else uses it
            with contextlib.suppress(OSError):
                os.rmdir(output.path(WORK_DIR))
    url = join(destination, MANIFEST_NAME)
    return IndexResult(manifest, url, scans, time.monotonic() - started)


class _ScanCache:
    """Shard scans already done, under ``.shardify/index/`` of the destination: an interrupted
    run started again scans only the shards it had not finished (same shard, size and options)."""

    def __init__(self, output: Output, options: IndexOptions) -> None:
        self.output = output
        self.folder = f"{WORK_DIR}/index"
        self.options = json.dumps([options.check, options.max_image_pixels])
        self.writable = True

    def _name(self, url: str, size: int) -> str:
        digest = hashlib.sha256(json.dumps([url, size, self.options]).encode()).hexdigest()[:24]
        return f"{self.folder}/{digest}.json"

    def get(self, url: str, size: int) -> ShardScan | None:
        text = self.output.read_text(self._name(url, size))
        if text is None:
            return None
        raw = json.loads(text)
        counters = {name: Counter(raw[name]) for name in ("media", "members", "schema_votes")}
        return ShardScan(**{**raw, **counters, "read": ReadStats()})

    def put(self, scan: ShardScan) -> None:
        if not self.writable:
            return
        raw = {name: value for name, value in vars(scan).items() if name != "read"}
        try:
            if not self.output.remote:
                os.makedirs(self.output.path(self.folder), exist_ok=True)
            self.output.write_text(self._name(scan.url, scan.size), json.dumps(raw))
        except OSError:  # a read-only destination: the manifest write will say so
            self.writable = False

    def clear(self) -> None:
        if self.writable:
            self.output.remove([self.folder])


def _open_destination(destination: str) -> Output:
    """The manifest's location, refused if it holds a manifest this command did not write."""
    try:
        output = Output(destination)
    except InputError as exc:
        raise InputError(f"{exc}; pass --output DIR for shards in a read-only location") from None
    existing = output.read_text(MANIFEST_NAME)
    if existing is not None:
        try:
            maker = json.loads(existing).get("created_by")
        except (ValueError, AttributeError):
            maker = None
        if maker != CREATED_BY:
            output.close()
            raise InputError(
                f"{destination} already holds a {MANIFEST_NAME} written by {maker or 'something else'}: "
                "it already is a dataset the trainer reads; pass --output DIR to index into another place"
            )
    return output


def build_manifest(
    patterns: list[str], scans: list[ShardScan], base: str, destination: str, options: IndexOptions
) -> Manifest:
    """The manifest of ``scans`` (shards that could be counted): a pure function of what was found."""
    shards = [
        ShardEntry(scan.url[len(base) + 1 :], scan.samples, scan.size, sorted(scan.broken)) for scan in scans
    ]
    broken = Counter(reason for scan in scans for reason in scan.broken.values())
    media: Counter[str] = sum((scan.media for scan in scans), Counter())
    samples = sum(scan.samples for scan in scans)
    recorded = {
        "check": options.check,
        "schema": options.schema,
        "max_image_pixels": options.max_image_pixels,
    }
    here = _same_place(base, destination)
    listing = [(entry.name, entry.bytes) for entry in shards]
    fingerprint = hashlib.sha256(json.dumps([base, listing, recorded]).encode()).hexdigest()[:16]
    return Manifest(
        schema=decide_schema(scans, options.schema),
        shards=shards,
        rows_read=samples,
        samples_written=samples,
        rows_skipped=sum(broken.values()),
        skipped_by_reason=dict(sorted(broken.items())),
        inputs=list(patterns),
        options=recorded,
        media=dict(media.most_common()),
        fingerprint=fingerprint,
        created_by=CREATED_BY,
        base=None if here else base,
        checksums=CHECKSUM_ALGORITHM if options.check else None,
    )


def _same_place(base: str, destination: str) -> bool:
    if "://" in base or "://" in destination:
        return base.rstrip("/") == destination.rstrip("/")
    return os.path.abspath(base) == os.path.abspath(destination)
