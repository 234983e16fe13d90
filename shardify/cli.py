"""``shardify`` command line."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from typing import TextIO

from tqdm import tqdm

from shardify import show, stats
from shardify.bytestream import ShardReadError
from shardify.checks import DEFAULT_MAX_IMAGE_PIXELS
from shardify.conversations import TEMPLATES
from shardify.convert import (
    ConvertOptions,
    ConvertResult,
    NoSamplesError,
    UnitsFailedError,
    convert,
    default_workers,
)
from shardify.fetch import FetchOptions
from shardify.format import SCHEMAS
from shardify.groups import GROUP_KEYS
from shardify.index_cli import EXIT_FAILURE, EXIT_USER_ERROR, add_index_parser, index_main
from shardify.options import DEFAULT_UNIT_BYTES, ENGINES
from shardify.peek import LookError
from shardify.sources import FIELDS, InputError, parse_column_specs

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}

_FAILURES_LISTED = 20

DESCRIPTION = """\
Convert Pixmo-style parquet rows into validated WebDataset tar shards.

Row schemas (detected from the columns unless --schema is given):
  caption       sample_id, caption, image_bytes      -> KEY.jpg|png|..., KEY.txt, KEY.json
  qa            question, answer, image_bytes [, sample_id]  -> KEY.jpg|png|..., KEY.json
  conversation  messages (or question/answer lists, or --template), image_bytes
                -> KEY.jpg|png|..., KEY.json with messages: [{role: user|assistant, content}, ...]
A messages column may be list<string> (alternating turns), list<struct<role, content>>,
LLaVA's list<struct<from, value>>, or question/answer lists (struct<question: list, answer: list>).
--group-by image_url (or image_sha256, image_bytes) joins every row of one image into one sample.
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


JSON_DESCRIPTION = """\
Convert LLaVA-style JSON/JSONL (an array of objects, or one object per line) with an image
folder into validated WebDataset tar shards of the conversation schema: one sample per object,
KEY.jpg|png|... (the file its "image" path names under --image-root, checked like any image)
and KEY.json holding messages: [{role: user|assistant, content}, ...] from its "conversations"
([{from: human|gpt, value}], the <image> marker removed) and its other fields. "id" is the
sample_id. Other field names are mapped with --column (messages=..., image_path=...).
Checks, skip log, manifest, checksums, units and restarts are parquet-to-tar's."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardify", description="Offline dataset tools for streamtrain.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _add_convert_parser(
        commands,
        "parquet-to-tar",
        "convert parquet files into validated WebDataset tar shards",
        DESCRIPTION,
        "parquet files, directories (searched recursively), globs or s3:// URLs",
    )
    p = _add_convert_parser(
        commands,
        "json-to-tar",
        "convert LLaVA-style JSON/JSONL and an image folder into WebDataset tar shards",
        JSON_DESCRIPTION,
        "JSON or JSONL files, directories (searched recursively for *.json, *.jsonl), globs or s3:// URLs",
    )
    p.add_argument(
        "--image-root",
        required=True,
        metavar="DIR",
        help="the folder (or s3:// prefix) the inputs' image paths are relative to",
    )
    add_index_parser(commands)
    show.add_parser(commands)
    stats.add_parser(commands)
    return parser


def _add_convert_parser(
    commands: argparse._SubParsersAction, name: str, summary: str, description: str, inputs_help: str
) -> argparse.ArgumentParser:
    p = commands.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=inputs_help)
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="output directory or s3://bucket/prefix"
    )
    p.add_argument(
        "--schema",
        choices=SCHEMAS,
        default="conversation" if name == "json-to-tar" else None,
        help="row schema (default: detected from the columns)",
    )
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        default=None,
        help="conversation schema: make each row's question and answer from PixMo's pointing "
        "(label + points in pixels: 'Point to LABEL' -> Molmo's <points x1=.. y1=..> text, 0-100 of "
        "the width and height) or counting columns (label + count: 'How many LABEL are there?' -> N)",
    )
    p.add_argument(
        "--group-by",
        choices=GROUP_KEYS,
        default=None,
        help="conversation schema: every row with the same image (its URL, sha256, bytes or path) "
        "becomes one sample holding every row's turns; the image is fetched and stored once",
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
    return p


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
            template=args.template,
            group_by=args.group_by,
            input_format="json" if args.command == "json-to-tar" else "parquet",
            image_root=getattr(args, "image_root", None),
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
    except NoSamplesError as exc:
        progress.close()
        print(f"shardify: {exc}; no manifest written", file=sys.stderr)
        return EXIT_FAILURE
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
    if m.rows_merged is not None:
        rows.append(("rows merged (--group-by)", m.rows_merged))
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


if __name__ == "__main__":
    sys.exit(main())
