"""Benchmark of ``shardify index`` against a full read of the same shards, measured in one run.

Makes its own shards with webdataset.ShardWriter (photo-like 1024x768 JPEGs, caption, json: what
shardify index exists for), then reports, with the shards in the page cache for every case:
- the baseline: every shard read front to back by the trainer's tar parser (what counting costs
  without seeking): shards/s and MB read per GB of shards;
- ``shardify index`` (headers only) with 1 and N threads: shards/s, MB read per GB, as ratios;
- the same under the remote cost model (the S3 read path, which fetches 1 MB per seek rather
  than 512 bytes: one range request costs about a megabyte of transfer): MB read per GB;
- ``shardify index --check`` (decodes every image, reduced-scale JPEG): shards/s;
- with a real S3 server (the tests' SeaweedFS on loopback, unless --no-s3): the full read and
  the index of the same shards on ``s3://``, bytes and range requests counted.

    python benchmarks/bench_index.py [--shards 20] [--per-shard 50] [--workers 2] [--no-s3]
                                     [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import webdataset as wds  # noqa: E402

from benchmarks.bench_shardify import pixmo_photo  # noqa: E402
from shardify.bytestream import ReadStats  # noqa: E402
from shardify.index import IndexOptions, index  # noqa: E402
from shardify.storage import LocalStorage, register_storage, unregister_storage  # noqa: E402
from shardify.tarread import iter_samples  # noqa: E402

DISTINCT_PHOTOS = 16


class RemoteModelStorage(LocalStorage):
    """Local files read the way S3 objects are (remote=True: 1 MB fetched per seek)."""

    remote = True


def make_shards(folder: Path, shards: int, per_shard: int) -> None:
    photos = [pixmo_photo(seed) for seed in range(DISTINCT_PHOTOS)]
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "photos-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            caption = f"a photo-like picture number {i}, with a caption of ordinary length"
            meta = {"sample_id": f"photo-{i}", "caption": caption, "url": f"https://example.com/{i}.jpg"}
            sink.write({"__key__": f"{i:09d}", "jpg": photos[i % len(photos)], "txt": caption, "json": meta})


def full_read(folder: Path, base: str | None = None) -> dict:
    """The baseline: every sample of every shard read by the trainer's parser (payloads too)."""
    stats, samples = ReadStats(), 0
    paths = sorted(folder.glob("*.tar"))
    started = time.perf_counter()
    for path in paths:
        url = f"{base}/{path.name}" if base else str(path)
        samples += sum(1 for _ in iter_samples(url, stats=stats))
    figures = _figures(len(paths), samples, stats.bytes_read, time.perf_counter() - started, folder)
    return figures | {"requests": stats.requests}


def on_s3(folder: Path, scratch: Path, workers: int) -> dict:
    """Full read and index of the same shards uploaded to a loopback SeaweedFS S3 server."""
    import s3fs

    from tests.s3server import SeaweedS3

    server = SeaweedS3(scratch / "seaweedfs")
    server.start()
    try:
        os.environ.update(server.environment())
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint})
        fs.mkdir("bench")
        for path in sorted(folder.glob("*.tar")):
            fs.put_file(str(path), f"bench/shards/{path.name}")
        return {
            "s3_full_read": full_read(folder, "s3://bench/shards"),
            "s3_index": run_index(folder, workers, url="s3://bench/shards/"),
        }
    finally:
        server.stop()


def run_index(folder: Path, workers: int, check: bool = False, url: str | None = None) -> dict:
    output = folder.parent / f"index-{workers}-{check}-{url is not None}"
    started = time.perf_counter()
    result = index([url or str(folder)], IndexOptions(output=str(output), check=check, workers=workers))
    elapsed = time.perf_counter() - started
    samples = result.manifest.samples_written
    return _figures(len(result.scans), samples, result.bytes_read, elapsed, folder) | {
        "requests": sum(scan.read.requests for scan in result.scans),
        "broken": result.manifest.rows_skipped,
    }


def _figures(shards: int, samples: int, read: int, seconds: float, folder: Path) -> dict:
    size = sum(p.stat().st_size for p in folder.glob("*.tar"))
    return {
        "shards": shards,
        "samples": samples,
        "seconds": round(seconds, 4),
        "shards_per_s": round(shards / seconds, 1),
        "mb_read_per_gb": round(read / 1e6 / (size / 1e9), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=20, help="shards to make (default: %(default)s)")
    parser.add_argument("--per-shard", type=int, default=50, help="samples per shard (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="index threads")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--no-s3", action="store_true", help="skip the loopback S3 measurements")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-index-") as scratch:
        folder = Path(scratch) / "shards"
        print(f"making {args.shards} shards of {args.per_shard} 1024x768 JPEGs ...", file=sys.stderr)
        make_shards(folder, args.shards, args.per_shard)
        size = sum(p.stat().st_size for p in folder.glob("*.tar"))
        full_read(folder)  # warm the page cache, so that every case reads from memory
        results: dict = {"shard_mb": round(size / 1e6 / args.shards, 1), "total_mb": round(size / 1e6, 1)}
        results["full_read"] = full_read(folder)
        results["index_1"] = run_index(folder, 1)
        results[f"index_{args.workers}"] = run_index(folder, args.workers)
        register_storage("remotemodel", RemoteModelStorage)
        try:
            results["index_remote_model"] = run_index(folder, 1, url=f"remotemodel://{folder}")
        finally:
            unregister_storage("remotemodel")
        results["index_check"] = run_index(folder, args.workers, check=True)
        if not args.no_s3:
            print("measuring on a loopback S3 server ...", file=sys.stderr)
            results |= on_s3(folder, Path(scratch), args.workers)
    print(
        f"\n{args.shards} shards, {results['shard_mb']} MB each ({results['total_mb']} MB), "
        f"{args.per_shard} samples per shard"
    )
    print(f"  {'case':<24} {'shards/s':>10} {'x full read':>12} {'MB read/GB':>11} {'requests':>9}")
    for name, row in results.items():
        if not isinstance(row, dict):
            continue
        # Each case against the full read of the same storage.
        ratio = (
            row["shards_per_s"]
            / results["s3_full_read" if name.startswith("s3") else "full_read"]["shards_per_s"]
        )
        print(
            f"  {name:<24} {row['shards_per_s']:>10,.1f} {ratio:>11.1f}x {row['mb_read_per_gb']:>11,.1f} "
            f"{row['requests']:>9,}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
