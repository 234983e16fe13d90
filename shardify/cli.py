"""``shardify`` command line."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections import Counter
from typing import TextIO

from tqdm import tqdm

from shardify import show, stats
from shardify.bytestream import ShardReadError
from shardify.checks import DEFAULT_MAX_IMAGE_PIXELS
from shardify.convert import ConvertOptions, ConvertResult, UnitsFailedError, convert, default_workers
from shardify.fetch import FetchOptions
from shardify.index import BadShardsError, IndexOptions, IndexResult, ShardScan, index
from shardify.options import DEFAULT_UNIT_BYTES, ENGINES
from shardify.peek import LookError
from shardify.sources import FIELDS, InputError, parse_column_specs

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
_FAILURES_LISTED = 20

DESCRIPTION = """\
Convert Pixmo-style parquet rows into validated WebDataset tar shards.

Row schemas (detected from the columns unless --schema is given):
  caption  sample_id, caption, image_bytes      -> KEY.jpg|png|..., KEY.txt, KEY.json
  qa       question, answer, image_bytes [, sample_id]  -> KEY.jpg|png|..., KEY.json
An audio_bytes column (wav/flac/ogg/mp3) may stand beside or instead of image_bytes.
Media columns may also be Hugging Face Image/Audio structs (struct<bytes, path>). Instead of
image_bytes, an image_url column (+ optional image_sha256, Pixmo's published layout) has each
image downloaded, verified and checked; failed downloads are skipped with their own reason.
Columns named otherwise are mapped with --column FIELD=COLUMN.
Every image and clip is decoded at conversion time; rows that fail are skipped and logged
in OUT/skipped.jsonl. OUT/manifest.json, written last, lists each shard's exact sample count.
The inputs are cut into units of work (--unit-size of parquet, whole row groups); each unit
becomes its own shards, PREFIX-UNIT-PART.tar, so the output is the same whatever the engine
(--engine local: threads here; --engine ray: tasks on a Ray cluster), the worker count or
the restarts. A run that is interrupted resumes where it stopped when started again with the
same arguments; a unit that fails is reported and the others are kept.
S3 uses the standard AWS environment; set AWS_ENDPOINT_URL for S3-compatible stores (Ray
tasks get the driver's AWS_* settings)."""


def parse_size(text: str) -> int:
    """``"512MB"`` -> 512_000_000, ``"1GiB"`` -> 1_073_741_824, ``"4096"`` -> 4096."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1000000, 500MB, 1GiB)")
    number, unit, binary = match.groups()
    base = 1024 if binary or (unit and text.strip()[-1] not in "bB") else 1000
    return int(float(number) * base ** _SIZE_POWERS[unit.lower()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardify", description="Offline dataset tools for streamtrain.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "parquet-to-tar",
        help="convert parquet files into validated WebDataset tar shards",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="parquet files, directories (searched recursively), globs or s3:// URLs",
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="output directory or s3://bucket/prefix"
    )
    p.add_argument(
        "--schema",
        choices=("caption", "qa"),
        default=None,
        help="row schema (default: detected from the columns)",
    )
    p.add_argument(
        "--max-samples-per-shard",
        type=int,
        default=5000,
        metavar="N",
        help="start a new shard after N samples (default: %(default)s)",
    )
    p.add_argument(
        "--max-shard-bytes",
        type=parse_size,
        default=1 << 30,
        metavar="SIZE",
        help="start a new shard before it would exceed SIZE, e.g. 500MB, 1GiB (default: 1GiB)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        metavar="N",
        help="threads decoding images in parallel (default: CPU count, %(default)s here)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: units one after another in this process; ray: one Ray task per unit, on the "
        "cluster of --ray-address (default: %(default)s)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="with --engine ray: the cluster to join, HOST:PORT of its head (default: $RAY_ADDRESS; "
        "without either, a Ray with --workers CPUs is started here)",
    )
    p.add_argument(
        "--unit-size",
        type=parse_size,
        default=DEFAULT_UNIT_BYTES,
        metavar="SIZE",
        help="parquet bytes per unit of work, half a minute to a minute on one core for photos; each unit "
        "makes its own shards (default: 2GiB)",
    )
    p.add_argument(
        "--prefix",
        default="shard",
        metavar="NAME",
        help="shard file prefix: NAME-UNIT-PART.tar, e.g. NAME-000000-000000.tar (default: %(default)s)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metavar="N",
        help="skip images with more pixels as too_large; checked from the header before "
        "decoding, so decompression bombs cost nothing (default: %(default)s)",
    )
    p.add_argument(
        "--transcode-uncommon",
        action="store_true",
        help="store GIF/BMP/TIFF images as lossless PNG so readers that only know "
        "jpg/png/webp (open_clip) see them; JPEG/PNG/WebP are never re-encoded",
    )
    p.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="read FIELD from the column COLUMN (repeatable); the sample's .json names it FIELD. "
        f"Fields: {', '.join(FIELDS)}",
    )
    fetch_defaults = FetchOptions()
    p.add_argument(
        "--fetch-workers",
        type=int,
        default=fetch_defaults.workers,
        metavar="N",
        help="concurrent downloads for image_url rows (default: %(default)s)",
    )
    p.add_argument(
        "--fetch-timeout",
        type=float,
        default=fetch_defaults.timeout_s,
        metavar="S",
        help="seconds to wait for a connection and for each read of a download (default: %(default)s)",
    )
    p.add_argument(
        "--fetch-retries",
        type=int,
        default=fetch_defaults.retries,
        metavar="N",
        help="retries, with exponential backoff, after a 5xx or 429 status, a timeout or a dropped "
        "connection; other 4xx statuses are not retried (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace whatever conversion OUT already holds")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, one summary line")
    _add_index_parser(commands)
    show.add_parser(commands)
    stats.add_parser(commands)
    return parser


INDEX_DESCRIPTION = """\
Write manifest.json for WebDataset shards that already exist (webdataset.ShardWriter,
img2dataset, public sets), so streamtrain trains on them as they are.

Every shard is counted exactly by the trainer's own tar parser (members grouped by the key
before the first dot of their basename) from its tar headers alone: member payloads are seeked
past (ranged reads on S3), except the .json of a few samples per shard, read to tell the schema
(qa: json question/answer; caption: .txt or a json caption). Non-.tar files are ignored.
A shard that is not a tar, is truncated or has a member without a key is an error (exit 1,
no manifest) unless --check, which leaves it out and reports it.
The manifest goes beside the shards, or into --output for shards in a read-only place (it then
names their location). No journal: an interrupted run is simply run again (same manifest)."""


def _add_index_parser(commands: argparse._SubParsersAction) -> None:
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
        choices=("caption", "qa"),
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "index":
        return index_main(args)
    if args.command in ("show", "stats"):
        try:
            return (show if args.command == "show" else stats).main(args)
        except (LookError, OSError, ShardReadError) as exc:
            print(f"shardify: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
    progress = _ProgressBar(enabled=not args.quiet and sys.stderr.isatty())
    try:
        options = ConvertOptions(
            output=args.output,
            schema=args.schema,
            max_samples_per_shard=args.max_samples_per_shard,
            max_shard_bytes=args.max_shard_bytes,
            prefix=args.prefix,
            max_image_pixels=args.max_image_pixels,
            transcode_uncommon=args.transcode_uncommon,
            columns=parse_column_specs(args.column),
            workers=args.workers,
            fetch=FetchOptions(args.fetch_workers, args.fetch_timeout, args.fetch_retries),
            overwrite=args.overwrite,
            unit_bytes=args.unit_size,
            engine=args.engine,
            ray_address=args.ray_address,
        )
        result = convert(args.inputs, options, on_rows=progress.rows, on_plan=progress.plan)
    except InputError as exc:
        print(f"shardify: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nshardify: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except UnitsFailedError as exc:
        progress.close()
        print(f"shardify: {len(exc.failures)} of {exc.units} units failed:", file=sys.stderr)
        for failure in exc.failures[:_FAILURES_LISTED]:
            print(f"  {failure.describe()}", file=sys.stderr)
        if len(exc.failures) > _FAILURES_LISTED:
            print(f"  ... and {len(exc.failures) - _FAILURES_LISTED} more", file=sys.stderr)
        print(
            "shardify: every other unit is converted and kept; run the same command again to redo "
            "only what is missing",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"shardify: failed: {exc}", file=sys.stderr)
        print("shardify: completed shards are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        progress.close()
    print_summary(result, options.output, sys.stdout, brief=args.quiet)
    return 0


class _ProgressBar:
    """A rows/s bar on a terminal; silent in logs."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    def plan(self, total: int, done: int) -> None:
        if done:
            print(
                f"shardify: resuming an interrupted conversion at row {done:,} of {total:,}", file=sys.stderr
            )
        if self.enabled:
            # A terminal that reports no size (some CI ptys) would get an empty bar from tqdm.
            size = shutil.get_terminal_size(fallback=(100, 24))
            self.bar = tqdm(
                total=total,
                initial=done,
                unit="rows",
                desc="converting",
                ncols=size.columns or 100,
                nrows=size.lines or 24,
            )

    def rows(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def print_summary(result: ConvertResult, output: str, out: TextIO, brief: bool = False) -> None:
    m = result.manifest
    if result.already_complete:
        print(
            f"shardify: {output} already holds this conversion: {m.samples_written:,} samples in "
            f"{len(m.shards)} shards; nothing to do",
            file=out,
        )
        return
    seconds = max(result.elapsed_s, 1e-9)
    rate = result.rows_this_run / seconds
    mb_rate = result.media_bytes_this_run / seconds / 1e6
    if brief:
        print(
            f"shardify: {m.rows_read:,} rows -> {m.samples_written:,} samples in {len(m.shards)} shards, "
            f"{m.rows_skipped:,} skipped; {rate:,.0f} rows/s; {output}",
            file=out,
        )
        return
    rows = [
        ("rows read", m.rows_read),
        ("samples written", m.samples_written),
        ("rows skipped", m.rows_skipped),
    ]
    rows += [(f"  {reason}", count) for reason, count in m.skipped_by_reason.items()]
    width = max(len(label) for label, _ in rows)
    print(
        f"\nshardify: {output}  (schema {m.schema}, {len(m.shards)} shards from {result.units:,} units, "
        f"{sum(s.bytes for s in m.shards) / 1e6:,.1f} MB)",
        file=out,
    )
    for label, count in rows:
        print(f"  {label:<{width}}  {count:>12,}", file=out)
    media = ", ".join(f"{ext} {count:,}" for ext, count in m.media.items())
    print(f"  {'media':<{width}}  {media}", file=out)
    print(
        f"  {'throughput':<{width}}  {rate:>12,.1f} rows/s, {mb_rate:,.1f} MB/s of media "
        f"({result.elapsed_s:.1f} s)",
        file=out,
    )
    if result.resumed_at_row:
        print(f"  resumed: {result.resumed_at_row:,} rows were already committed by an earlier run", file=out)
    if m.rows_skipped:
        print(f"  details of skipped rows: {output.rstrip('/')}/skipped.jsonl", file=out)


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


if __name__ == "__main__":
    sys.exit(main())
