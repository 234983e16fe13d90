"""``shardify stats``: what a shardify output holds, from its manifest plus a sample of the data.

From the manifest: shards, samples, schema, media types, rows skipped by reason, samples marked
broken. From ``--sample`` samples spread over the output: image sizes (checked as conversion
checks them), text lengths per field, and how many of those samples fail to read or decode.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from typing import Any

from shardify.checks import check_audio, check_image
from shardify.peek import Sample, pick_samples, read_manifest

SIZE_BINS = (64, 128, 256, 512, 1024, 2048, 4096)
"""Upper edges of the image side histograms (pixels); the last bin is open."""
LENGTH_BINS = (16, 32, 64, 128, 256, 512, 1024, 4096)
"""Upper edges of the text length histograms (characters); the last bin is open."""
BAR = 40


def histogram(values: list[int], edges: tuple[int, ...]) -> dict[str, int]:
    """Counts per bin, labelled ``"<64"``, ``"64-127"``, ..., ``">=4096"``."""
    labels = [f"<{edges[0]}", *[f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(edges)]]
    labels.append(f">={edges[-1]}")
    counts = dict.fromkeys(labels, 0)
    for value in values:
        slot = next((i for i, edge in enumerate(edges) if value < edge), len(edges))
        counts[labels[slot]] += 1
    return counts


def collect(location: str, sample_size: int) -> dict[str, Any]:
    """The statistics of the output at ``location`` as one JSON-able mapping."""
    manifest, base = read_manifest(location)
    samples = list(pick_samples(manifest, base, sample_size))
    widths, heights, pixels = [], [], []
    lengths: dict[str, list[int]] = {}
    failures: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    for sample in samples:
        _measure(sample, widths, heights, pixels, lengths, failures, formats)
    total = sum(entry.samples for entry in manifest.shards)
    return {
        "location": location,
        "schema": manifest.schema,
        "shards": len(manifest.shards),
        "samples": total,
        "bytes": sum(entry.bytes for entry in manifest.shards),
        "media": dict(manifest.media),
        "rows_read": manifest.rows_read,
        "rows_skipped": manifest.rows_skipped,
        "skipped_by_reason": dict(manifest.skipped_by_reason),
        "broken_samples": sum(len(entry.broken) for entry in manifest.shards),
        "sampled": {
            "samples": len(samples),
            "image_formats": dict(formats),
            "failures": dict(failures),
            "image_width": histogram(widths, SIZE_BINS),
            "image_height": histogram(heights, SIZE_BINS),
            "megapixels_mean": round(sum(pixels) / len(pixels) / 1e6, 4) if pixels else None,
            "text_chars": {name: histogram(values, LENGTH_BINS) for name, values in sorted(lengths.items())},
            "text_chars_mean": {name: round(sum(v) / len(v), 1) for name, v in sorted(lengths.items()) if v},
        },
    }


def _measure(
    sample: Sample,
    widths: list[int],
    heights: list[int],
    pixels: list[int],
    lengths: dict[str, list[int]],
    failures: Counter[str],
    formats: Counter[str],
) -> None:
    if sample.error:
        failures["unreadable"] += 1
        return
    image, audio = sample.image, sample.audio
    if image is not None:
        check = check_image(image[1])
        if not check.ok:
            failures[f"image_{check.reason}"] += 1
        else:
            formats[check.extension] += 1
            widths.append(check.width)
            heights.append(check.height)
            pixels.append(check.width * check.height)
    if audio is not None and not check_audio(audio[1]).ok:
        failures["audio_decode_error"] += 1
    for name, text in sample.texts().items():
        lengths.setdefault(name, []).append(len(text))


def report(stats: dict[str, Any]) -> str:
    """The statistics as text with bar histograms."""
    sampled = stats["sampled"]
    lines = [
        f"{stats['location']}: {stats['samples']:,} samples in {stats['shards']} shards "
        f"({stats['bytes'] / 1e6:,.1f} MB), schema {stats['schema']}",
        f"media: {_counts(stats['media'])}",
        f"rows read {stats['rows_read']:,}, skipped {stats['rows_skipped']:,}"
        + (f" ({_counts(stats['skipped_by_reason'])})" if stats["skipped_by_reason"] else ""),
        f"samples marked broken (shardify index --check): {stats['broken_samples']}",
        f"sampled {sampled['samples']} samples spread over the shards; "
        f"failing to read or decode: {_counts(sampled['failures']) or 'none'}",
    ]
    if sampled["megapixels_mean"] is not None:
        lines.append(
            f"image formats: {_counts(sampled['image_formats'])}; mean {sampled['megapixels_mean']} MP"
        )
        lines += _bars("image width (px)", sampled["image_width"])
        lines += _bars("image height (px)", sampled["image_height"])
    for name, counts in sampled["text_chars"].items():
        lines += _bars(f"{name} length (chars, mean {sampled['text_chars_mean'][name]})", counts)
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items(), key=lambda kv: -kv[1]))


def _bars(title: str, counts: dict[str, int]) -> list[str]:
    peak = max(counts.values()) or 1
    rows = [title]
    rows += [f"  {label:>10} {count:6d} {'#' * round(BAR * count / peak)}" for label, count in counts.items()]
    return rows


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "stats",
        help="what a shardify output holds: counts, media, image sizes, text lengths",
        description="Counts from the manifest (samples, shards, media types, skipped rows by reason, "
        "broken samples) and, from --sample samples spread over the shards, image sizes, text lengths "
        "(histograms) and how many of them fail to read or decode.",
    )
    p.add_argument(
        "shards", metavar="SHARDS", help="a shardify output: directory, s3:// prefix or its manifest.json"
    )
    p.add_argument(
        "--sample", type=int, default=1000, metavar="N", help="samples to read (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")


def main(args: argparse.Namespace) -> int:
    stats = collect(args.shards, max(0, args.sample))
    print(json.dumps(stats, indent=2) if args.json else report(stats))
    return 0
