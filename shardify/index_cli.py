"""``shardify index``: manifests for WebDataset shards that exist already (its command line)."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from typing import TextIO

from tqdm import tqdm

from shardify.checks import DEFAULT_MAX_IMAGE_PIXELS
from shardify.format import SCHEMAS
from shardify.index import BadShardsError, IndexOptions, IndexResult, ShardScan, index
from shardify.options import default_workers
from shardify.sources import InputError

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


INDEX_DESCRIPTION = """\
Write manifest.json for WebDataset shards that already exist (webdataset.ShardWriter,
img2dataset, public sets), so streamtrain trains on them as they are.

Every shard is counted exactly by the trainer's own tar parser (members grouped by the key
before the first dot of their basename) from its tar headers alone: member payloads are seeked
past (ranged reads on S3), except the .json of a few samples per shard, read to tell the schema
(conversation: json messages; qa: json question/answer; caption: .txt or a json caption).
Non-.tar files are ignored.
A shard that is not a tar, is truncated or has a member without a key is an error (exit 1,
no manifest) unless --check, which leaves it out and reports it.
The manifest goes beside the shards, or into --output for shards in a read-only place (it then
names their location). No journal: an interrupted run is simply run again (same manifest)."""


def add_index_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "index",
        help="write manifest.json for existing WebDataset tar shards",
        description=INDEX_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "shards",
        nargs="+",
        metavar="SHARDS",
        help="directories (searched recursively) and globs, of which the *.tar files count; "
        "brace patterns (shard-{000000..000099}.tar) or files; local or s3://",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        default=None,
        help="write manifest.json here instead of beside the shards (for read-only locations); "
        "it names the shards' real location, and data.train points at DIR",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="also decode every sample's image/audio (and parse its json): broken samples are "
        "listed in the manifest and skipped by the trainer undecoded; broken shards are left out",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        metavar="N",
        help="shards scanned in parallel, threads (default: CPU count, %(default)s here)",
    )
    p.add_argument(
        "--schema",
        choices=SCHEMAS,
        default=None,
        help="dataset schema (default: told from the json/txt of a few samples per shard)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metavar="N",
        help="with --check: larger images count as broken (too_large) (default: %(default)s)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, one summary line")


def index_main(args: argparse.Namespace) -> int:
    """``shardify index``: scan, write the manifest, print the summary; the exit status."""
    options = IndexOptions(
        output=args.output,
        check=args.check,
        workers=args.workers,
        schema=args.schema,
        max_image_pixels=args.max_image_pixels,
    )
    bar: tqdm | None = None
    enabled = not args.quiet and sys.stderr.isatty()

    def plan(total: int) -> None:
        nonlocal bar
        if enabled:
            size = shutil.get_terminal_size(fallback=(100, 24))
            bar = tqdm(total=total, unit="shards", desc="indexing", ncols=size.columns or 100)

    def scanned(scan: ShardScan) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(samples=scan.samples, refresh=False)

    try:
        result = index(args.shards, options, on_shard=scanned, on_plan=plan)
    except InputError as exc:
        print(f"shardify: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BadShardsError as exc:
        if bar is not None:
            bar.close()
        print(f"shardify: {len(exc.scans)} shard(s) cannot be counted; no manifest written:", file=sys.stderr)
        for scan in exc.scans:
            print(f"  {scan.url}: {scan.problem}", file=sys.stderr)
        print("shardify: repair or remove them, or pass --check to leave them out", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("\nshardify: interrupted; no manifest written: run the same command again", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    print_index_summary(result, sys.stdout, brief=args.quiet)
    return 0


def print_index_summary(result: IndexResult, out: TextIO, brief: bool = False) -> None:
    m = result.manifest
    seconds = max(result.elapsed_s, 1e-9)
    per_gb = result.bytes_read / 1e6 / max(result.shard_bytes / 1e9, 1e-9)
    broken = m.rows_skipped
    if brief:
        print(
            f"shardify: {m.samples_written:,} samples in {len(m.shards)} shards ({broken:,} broken, "
            f"{len(result.left_out)} shards left out); {len(result.scans) / seconds:,.1f} shards/s; "
            f"{result.manifest_url}",
            file=out,
        )
        return
    rows = [
        ("shards listed", f"{len(m.shards):,}"),
        ("samples", f"{m.samples_written:,}"),
        ("broken samples", f"{broken:,}"),
    ]
    rows += [(f"  {reason}", f"{count:,}") for reason, count in m.skipped_by_reason.items()]
    rows.append(("shards left out", f"{len(result.left_out):,}"))
    rows.append(("media", ", ".join(f"{ext} {count:,}" for ext, count in m.media.items()) or "none"))
    members: Counter[str] = sum((scan.members for scan in result.scans), Counter())
    rows.append(("members", ", ".join(f"{ext} {count:,}" for ext, count in members.most_common())))
    rows.append(
        (
            "read",
            f"{result.bytes_read / 1e6:,.1f} MB of {result.shard_bytes / 1e6:,.1f} MB "
            f"({per_gb:,.1f} MB per GB)",
        )
    )
    rows.append(("throughput", f"{len(result.scans) / seconds:,.1f} shards/s ({result.elapsed_s:.1f} s)"))
    width = max(len(label) for label, _ in rows)
    print(f"\nshardify index: {result.manifest_url}  (schema {m.schema})", file=out)
    if m.base:
        print(f"  shards in {m.base}", file=out)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}", file=out)
    for scan in result.left_out:
        print(f"  left out: {scan.url}: {scan.problem}", file=out)
