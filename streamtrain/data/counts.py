"""The read counts both streams report with every batch, counted one way.

Each stream yields ``(batch, counts)``; the trainer sums the counts over ranks into its log lines
as ``data/<key>`` (``eval/data/<key>`` for a held-out pass):

- ``samples``: decoded and delivered in a batch.
- ``decode_errors``: the decoder raised (or gave nothing) for a sample; it is skipped.
- ``oversized_samples``: a sample with a tar member over ``max_member_bytes`` (never read).
- ``unreadable_samples``: planned samples that a failed shard made unreadable.
- ``broken_samples``: samples the manifest lists as broken (``shardify index --check``), skipped
  undecoded.
- ``shard_errors``: shards (or their rest) skipped: missing, truncated, corrupt, miscounted.
- ``empty_batches``: training batches with nothing decoded, delivered as None in their place.
- ``read_retries``: failed storage reads that were tried again (``data.retries`` bounds them).
- ``read_reopens``: objects reopened at the byte where a failed read stopped.
- ``checksum_errors``: a member whose bytes differ from the CRC-32 shardify recorded (rot on
  disk, damage in transfer); the sample is skipped, even when it would still decode.
- ``device_decode_fallbacks``: JPEGs the training device's decoder refused, decoded by Pillow in
  the training process instead (device_decode.py).
- ``truncated_turns`` (VLM): whole conversation turns dropped to fit ``data.max_seq_len``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from shardify.bytestream import RateLimitedLog, ReadStats

DECODER_COUNTS = "__counts__"
"""A decoded sample may carry ``{name: n}`` under this key: counts of its own (``truncated_turns``),
added to the stream's and logged as ``data/<name>``."""

Decode = Callable[[dict[str, Any], random.Random], Any]
"""``(raw sample, rng) -> sample``; raises on bytes it cannot use."""
Collate = Callable[[list[Any]], Any]


def decode_samples(
    raw_samples: Iterable[dict[str, Any] | None],
    decode: Decode,
    rng: random.Random,
    counts: Counter[str],
    warnings: RateLimitedLog,
) -> list[Any]:
    """The decoded samples of ``raw_samples``, in order; what cannot be used is skipped and counted.

    None stands for a sample the reader could not read (already counted there). A bad sample
    must never stop training or evaluation, so every exception of the decoder is caught.
    """
    decoded = []
    for raw in raw_samples:
        if raw is None:
            continue
        if "__error__" in raw:  # the tar reader left a member over the size limit unread
            counts["oversized_samples"] += 1
            warnings.warn(f"skipping sample {raw['__key__']} of {raw['__url__']}: {raw['__error__']}")
            continue
        if "__checksum_error__" in raw:  # bytes that changed since shardify recorded them
            counts["checksum_errors"] += 1
            problem = raw["__checksum_error__"]
            warnings.warn(f"skipping sample {raw['__key__']} of {raw['__url__']}: {problem}")
            continue
        try:
            sample = decode(raw, rng)
        except Exception as exc:
            counts["decode_errors"] += 1
            warnings.warn(f"skipping sample {raw.get('__key__')} of {raw.get('__url__')}: {exc!r}")
            continue
        if sample is None:
            counts["decode_errors"] += 1
            continue
        if isinstance(sample, dict) and DECODER_COUNTS in sample:
            counts.update(sample.pop(DECODER_COUNTS))
        decoded.append(sample)
    counts["samples"] += len(decoded)
    return decoded


def count_reads(read: ReadStats, counts: Counter[str]) -> None:
    """Move the retries and reopens ``read`` tallied since the last call into ``counts``."""
    if read.retries:
        counts["read_retries"] += read.retries
    if read.reopens:
        counts["read_reopens"] += read.reopens
    read.retries = read.reopens = 0
