"""Reading a shardify output back, independently of the converter's code; the CLI command line."""

from __future__ import annotations

import json
import os
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

from shardify.journal import UNITS_DIR


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def read_skipped(out: Path) -> list[dict]:
    path = out / "skipped.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def read_samples(out: Path) -> list[dict[str, bytes]]:
    """Every sample of every shard listed in the manifest, in order, as {extension: payload}."""
    samples: list[dict[str, bytes]] = []
    for entry in read_manifest(out)["shards"]:
        samples.extend(read_shard(out / entry["name"]))
    return samples


def read_shard(path: Path) -> list[dict[str, bytes]]:
    samples: list[dict[str, bytes]] = []
    current_key = None
    with tarfile.open(path) as tar:
        for member in tar:
            base = member.name.rsplit("/", 1)[-1]
            key, extension = base.split(".", 1)
            if key != current_key:
                samples.append({"__key__": key.encode()})
                current_key = key
            payload = tar.extractfile(member).read()
            assert extension not in samples[-1], f"duplicate member {member.name}"
            samples[-1][extension] = payload
    return samples


def output_files(out: Path) -> dict[str, bytes]:
    """Every visible file of an output (recursively), for byte-for-byte comparisons."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def committed_rows(read: Callable[[str], str | bytes], listing: Callable[[str], list[str]]) -> int:
    """Rows a running conversion's unit journals and done records say are committed (0 before any).

    ``read(name)`` returns the text of a file of the output, ``listing(folder)`` the file names
    in a folder of it, wherever the output lives.
    """
    try:
        names = listing(UNITS_DIR)
    except FileNotFoundError:
        return 0
    done = {name.split(".")[0] for name in names if name.endswith(".done.json")}
    total = 0
    for name in names:
        unit, _, rest = name.partition(".")
        if rest == "done.json" or (rest == "json" and unit not in done):
            try:
                total += json.loads(read(f"{UNITS_DIR}/{name}"))["rows_read"]
            except (FileNotFoundError, ValueError, KeyError):
                continue  # replaced by its done record meanwhile: counted on the next look
    return total


def local_committed_rows(out: Path) -> int:
    """:func:`committed_rows` of a conversion running into the local folder ``out``."""
    return committed_rows(lambda name: (out / name).read_text(), lambda folder: os.listdir(out / folder))


def convert_command(source: Path, out: Path, workers: int, per_shard: int) -> list[str]:
    """The ``shardify parquet-to-tar`` command line (this interpreter, no progress bar)."""
    return [
        sys.executable,
        "-m",
        "shardify",
        "parquet-to-tar",
        str(source),
        "-o",
        str(out),
        "--max-samples-per-shard",
        str(per_shard),
        "--workers",
        str(workers),
        "--quiet",
    ]
