"""Benchmark of shardify parquet-to-tar against its baselines, measured in one run.

Makes its own Pixmo-like input (photo-like ~1000px JPEGs, a few % corrupt), then reports:
- the pure image-check rate (the checks alone on bytes in memory, no I/O, one thread);
- shardify with 1 and 2 workers (rows/s, MB/s, peak RSS), as ratios to the check rate;
- a raw-copy baseline (pyarrow batches -> tarfile, no checks): the cost of checking;
- peak RSS on an input 3x larger, to show memory does not grow with input size;
- three image checks (Image.verify, reduced-scale JPEG decode, full decode) on a corruption
  suite: what each catches against what a loader's full decode would fail on, and its speed;
- images by URL (``image_url``) from a loopback server that answers after a fixed latency:
  images/s fetched and converted at the default --fetch-workers against --fetch-workers 1.

Every measurement runs in a fresh child process so its peak RSS is its own.

    python benchmarks/bench_shardify.py [--rows 3000] [--big-factor 3] [--json results.json]
    python benchmarks/bench_shardify.py --fetch-only [--fetch-rows 300] [--fetch-latency-ms 50]
    python benchmarks/bench_shardify.py --ray [--rows 3000] [--ray-unit-mb 48]

``--ray``: the same input through ``--engine local`` with 1 and 2 threads and ``--engine ray``
with 1 and 2 Ray workers (a Ray started by shardify, inside a private network namespace so it
stays on loopback), cut into units of ``--ray-unit-mb``; rows/s without the engine's start-up,
and Ray's cost per unit against a unit's time, projected to the default unit size.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from shardify.checks import check_image  # noqa: E402
from shardify.convert import ConvertOptions, convert  # noqa: E402
from shardify.fetch import FetchOptions  # noqa: E402
from shardify.options import DEFAULT_UNIT_BYTES  # noqa: E402
from shardify.rows import check_media  # noqa: E402

DISTINCT_IMAGES = 96
CORRUPT_FRACTION = 0.03


def pixmo_photo(seed: int, width: int = 1024, height: int = 768) -> bytes:
    """A photo-like JPEG (~1000px, textured like a real photo so entropy decoding costs the same)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(6):
        fx, fy, phase = [*rng.uniform(0.002, 0.05, 2).tolist(), rng.uniform(0, 6.28)]
        image += rng.uniform(20, 50, 3) * np.sin(x * fx + y * fy + phase)[..., None]
    image += 120 + rng.normal(0, 9, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=88)
    return out.getvalue()


def corrupt(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["truncate", "junk", "empty_tail"])
    if kind == "truncate":
        return data[: rng.randint(200, len(data) - 100)]
    if kind == "junk":
        return b"<html>403 Forbidden</html>" * rng.randint(1, 50)
    return data[: len(data) // 3] + bytes(2000)


def make_input(path: Path, rows: int, distinct: list[bytes], seed: int = 0) -> tuple[int, int]:
    """Write a Pixmo-shaped caption parquet; returns (rows, corrupt rows)."""
    rng = random.Random(seed)
    writer = None
    bad = 0
    for start in range(0, rows, 256):
        count = min(256, rows - start)
        images = []
        for _ in range(count):
            data = distinct[rng.randrange(len(distinct))]
            if rng.random() < CORRUPT_FRACTION:
                data, bad = corrupt(data, rng), bad + 1
            images.append(data)
        table = pa.table(
            {
                "sample_id": [f"pixmo-{start + i:08d}" for i in range(count)],
                "caption": [f"A detailed caption of photograph {start + i} " * 8 for i in range(count)],
                "image_bytes": pa.array(images, pa.binary()),
            }
        )
        # No dictionary encoding: the few distinct photos would otherwise be stored once each.
        writer = writer or pq.ParquetWriter(path, table.schema, use_dictionary=["sample_id", "caption"])
        writer.write_table(table, row_group_size=128)
    assert writer is not None
    writer.close()
    return rows, bad


# ---------------------------------------------------------------- child-process measurements


def child_check(source: str, limit: int) -> dict:
    images: list[bytes] = []
    for batch in pq.ParquetFile(source, pre_buffer=False).iter_batches(
        batch_size=128, columns=["image_bytes"]
    ):
        images.extend(batch.column("image_bytes").to_pylist()[: limit - len(images)])
        if len(images) >= limit:
            break
    started, cpu = time.perf_counter(), time.process_time()
    check_media(images, None, 89_478_485, False)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "rows": len(images),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "media_bytes": sum(len(b) for b in images),
    }


def child_convert(source: str, workers: int, scratch: str) -> dict:
    return timed_convert(source, scratch, "shards-", workers=workers)


def child_engine(source: str, engine: str, workers: int, unit_bytes: int, scratch: str) -> dict:
    return timed_convert(source, scratch, f"{engine}-", workers=workers, engine=engine, unit_bytes=unit_bytes)


def child_fetch(source: str, fetch_workers: int, scratch: str) -> dict:
    return timed_convert(source, scratch, "fetched-", fetch=FetchOptions(workers=fetch_workers))


def timed_convert(source: str, scratch: str, prefix: str, **options: Any) -> dict:
    """One conversion of ``source`` into a scratch output (removed after), timed."""
    out = tempfile.mkdtemp(dir=scratch, prefix=prefix)
    started, cpu = time.perf_counter(), time.process_time()
    result = convert([source], ConvertOptions(output=out, max_samples_per_shard=500, **options))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    shutil.rmtree(out)
    return {
        "rows": result.rows_this_run,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "media_bytes": result.media_bytes_this_run,
        "written": result.manifest.samples_written,
        "units": result.units,
        "startup_seconds": result.engine_startup_s,
    }


class LatencyServer(http.server.ThreadingHTTPServer):
    """Loopback HTTP server: /N.jpg is ``images[N % len]``, sent after ``latency_s``."""

    daemon_threads = True

    def __init__(self, images: list[bytes], latency_s: float) -> None:
        super().__init__(("127.0.0.1", 0), _LatencyHandler)
        self.images, self.latency_s = images, latency_s


class _LatencyHandler(http.server.BaseHTTPRequestHandler):
    server: LatencyServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        time.sleep(self.server.latency_s)
        body = self.server.images[int(self.path.strip("/").split(".")[0]) % len(self.server.images)]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def measure_fetch(work: Path, distinct: list[bytes], rows: int, latency_ms: float, repeats: int) -> dict:
    """Convert ``rows`` image_url rows served with ``latency_ms`` each, at 16 and at 1 fetch workers."""
    server = LatencyServer(distinct, latency_ms / 1000)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        source = work / "pixmo-urls.parquet"
        table = pa.table(
            {
                "sample_id": [f"u{i}" for i in range(rows)],
                "caption": [f"photo {i}" for i in range(rows)],
                "image_url": [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(rows)],
            }
        )
        pq.write_table(table, source)
        default = FetchOptions().workers
        return {
            "rows": rows,
            "latency_ms": latency_ms,
            "default_workers": default,
            "default": best_of(repeats, "fetch", str(source), str(default), str(work)),
            "one": best_of(repeats, "fetch", str(source), "1", str(work)),
        }
    finally:
        server.shutdown()
        server.server_close()


def child_rawcopy(source: str, scratch: str) -> dict:
    """The floor: read the same batches and write every row to tar members, checking nothing."""
    out = tempfile.mkdtemp(dir=scratch, prefix="raw-")
    started, cpu = time.perf_counter(), time.process_time()
    rows = media = 0
    parquet = pq.ParquetFile(source, pre_buffer=False)  # as shardify reads it: streamed
    Path(out).mkdir(parents=True, exist_ok=True)
    with tarfile.open(Path(out) / "raw-000000.tar", "w") as tar:
        for batch in parquet.iter_batches(batch_size=32):
            ids = batch.column("sample_id").to_pylist()
            captions = batch.column("caption").to_pylist()
            for sid, caption, image in zip(
                ids, captions, batch.column("image_bytes").to_pylist(), strict=True
            ):
                for ext, payload in (
                    ("jpg", image),
                    ("txt", caption.encode()),
                    ("json", json.dumps({"sample_id": sid, "caption": caption}).encode()),
                ):
                    info = tarfile.TarInfo(f"{sid}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                rows += 1
                media += len(image)
        tar.fileobj.flush()
        os.fsync(tar.fileobj.fileno())
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    shutil.rmtree(out)
    return {"rows": rows, "seconds": seconds, "cpu_seconds": cpu, "media_bytes": media}


def child_variants(source: str, limit: int) -> dict:
    """Speed of three checks on valid images, and their verdicts on a corruption suite."""
    images = pq.read_table(source, columns=["image_bytes"]).column("image_bytes").to_pylist()
    valid = [b for b in images if check_image(b, full_decode=True).ok][:limit]
    rng = random.Random(7)
    suite = []
    for data in valid[:40]:
        cut = rng.randint(300, len(data) - 2)
        suite.append(data[:cut])  # truncated anywhere
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 40)):
            flipped[rng.randint(700, len(data) - 3)] = rng.randrange(256)
        suite.append(bytes(flipped))  # bit rot in the entropy-coded data
        start = rng.randint(700, len(data) - 5000)
        suite.append(data[:start] + bytes(4096) + data[start + 4096 :])  # a zeroed disk block
        suite.append(data[:600] + os.urandom(len(data) - 600))  # a scrambled payload

    def loader_fails(data: bytes) -> bool:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB").load()
        except Exception:
            return True
        return False

    def verify_only(data: bytes) -> bool:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except Exception:
            return False
        return True

    checks = {
        "Image.verify (no decode)": verify_only,
        "reduced-scale JPEG decode (shardify)": lambda d: check_image(d).ok,
        "full decode": lambda d: check_image(d, full_decode=True).ok,
    }
    truth = [loader_fails(d) for d in suite]
    report = {"suite": len(suite), "loader_failures": sum(truth), "variants": {}}
    for name, accepts in checks.items():
        started = time.perf_counter()
        for data in valid:
            accepts(data)
        rate = len(valid) / (time.perf_counter() - started)
        verdicts = [not accepts(d) for d in suite]
        report["variants"][name] = {
            "images_per_s": rate,
            "caught": sum(v and t for v, t in zip(verdicts, truth, strict=True)),
            "missed": sum(t and not v for v, t in zip(verdicts, truth, strict=True)),
            "rejected_loadable": sum(v and not t for v, t in zip(verdicts, truth, strict=True)),
        }
    return report


def run_child(*args: str, isolated: bool = False) -> dict:
    """Run one measurement in a fresh interpreter; returns its JSON result, with its peak RSS.

    ``isolated``: in a private network namespace holding only loopback (Ray would otherwise
    listen on the host's interface address).
    """
    command = [sys.executable, __file__, "_child", *args]
    if isolated:
        command = ["unshare", "-rn", "bash", "-c", 'ip link set lo up && exec "$@"', "bash", *command]
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=environment)
    if process.returncode != 0:
        raise SystemExit(f"benchmark child {args} failed with exit code {process.returncode}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM; getrusage would include the forking parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_main(argv: list[str]) -> None:
    mode, *rest = argv
    if mode == "check":
        result = child_check(rest[0], int(rest[1]))
    elif mode == "convert":
        result = child_convert(rest[0], int(rest[1]), rest[2])
    elif mode == "rawcopy":
        result = child_rawcopy(rest[0], rest[1])
    elif mode == "fetch":
        result = child_fetch(rest[0], int(rest[1]), rest[2])
    elif mode == "engine":
        result = child_engine(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4])
    else:
        result = child_variants(rest[0], int(rest[1]))
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# ---------------------------------------------------------------- the report


def best_of(repeats: int, *args: str) -> dict:
    runs = [run_child(*args) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["seconds"])
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows", type=int, default=3000, help="rows in the main input (default: %(default)s)"
    )
    parser.add_argument(
        "--big-factor",
        type=int,
        default=3,
        help="the memory run uses an input this many times larger (0 skips it)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the fastest counts")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--fetch-rows", type=int, default=300, help="image_url rows (0 skips the fetch run)")
    parser.add_argument(
        "--fetch-latency-ms", type=float, default=50, help="the server's delay before each response"
    )
    parser.add_argument("--fetch-only", action="store_true", help="run only the image_url measurement")
    parser.add_argument("--ray", action="store_true", help="run only the engine comparison (local vs Ray)")
    parser.add_argument("--ray-unit-mb", type=float, default=48, help="unit size of the engine comparison")
    args = parser.parse_args()
    if args.ray:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-shardify-") as scratch:
            engines = measure_engines(Path(scratch), args.rows, int(args.ray_unit_mb * 1e6), args.repeats)
        if args.json:
            Path(args.json).write_text(json.dumps({"engines": engines}, indent=2))
        report_engines(engines)
        return
    if args.fetch_only:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-shardify-") as scratch:
            distinct = [pixmo_photo(seed) for seed in range(DISTINCT_IMAGES // 4)]
            fetch = measure_fetch(
                Path(scratch), distinct, args.fetch_rows, args.fetch_latency_ms, args.repeats
            )
        if args.json:
            Path(args.json).write_text(json.dumps({"fetch": fetch}, indent=2))
        report_fetch(fetch)
        return

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-shardify-") as scratch:
        work = Path(scratch)
        print(f"making {DISTINCT_IMAGES} distinct 1024x768 photos ...", file=sys.stderr)
        distinct = [pixmo_photo(seed) for seed in range(DISTINCT_IMAGES)]
        source = work / "pixmo.parquet"
        rows, bad = make_input(source, args.rows, distinct)
        size_mb = source.stat().st_size / 1e6
        print(f"input: {rows} rows, {bad} corrupt, {size_mb:.0f} MB", file=sys.stderr)

        results: dict = {
            "input": {
                "rows": rows,
                "corrupt": bad,
                "mb": size_mb,
                "mean_image_kb": sum(map(len, distinct)) / len(distinct) / 1e3,
            },
            "cpus": os.cpu_count(),
        }
        results["check"] = best_of(args.repeats, "check", str(source), str(min(rows, 1000)))
        results["rawcopy"] = best_of(args.repeats, "rawcopy", str(source), str(work))
        for workers in (1, 2):
            results[f"shardify_{workers}w"] = best_of(
                args.repeats, "convert", str(source), str(workers), str(work)
            )
        if args.big_factor:
            big = work / "pixmo-big.parquet"
            make_input(big, rows * args.big_factor, distinct, seed=1)
            source.unlink()
            results["big"] = run_child("convert", str(big), "2", str(work))
            results["big"]["mb"] = big.stat().st_size / 1e6
        results["variants"] = run_child(
            "variants", str(work / "pixmo-big.parquet" if args.big_factor else source), "150"
        )
        if args.fetch_rows:
            results["fetch"] = measure_fetch(
                work, distinct, args.fetch_rows, args.fetch_latency_ms, args.repeats
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    report(results)


def measure_engines(work: Path, rows: int, unit_bytes: int, repeats: int) -> dict:
    """Both engines with 1 and 2 workers at ``unit_bytes``, and with 1 worker at a quarter of it:
    the extra time per extra unit (the slope) is an engine's cost per unit, free of its fixed costs."""
    print(f"making {DISTINCT_IMAGES} distinct 1024x768 photos ...", file=sys.stderr)
    distinct = [pixmo_photo(seed) for seed in range(DISTINCT_IMAGES)]
    source = work / "pixmo.parquet"
    make_input(source, rows, distinct)
    runs: dict = {"rows": rows, "mb": source.stat().st_size / 1e6, "unit_bytes": unit_bytes}
    for engine in ("local", "ray"):
        variants = ((1, unit_bytes, "1"), (2, unit_bytes, "2"), (1, unit_bytes // 4, "1_small"))
        for workers, unit, key in variants:
            measured = [
                run_child("engine", str(source), engine, str(workers), str(unit), str(work), isolated=True)
                for _ in range(repeats)
            ]
            runs[f"{engine}_{key}"] = min(measured, key=working_seconds)
    return runs


def working_seconds(m: dict) -> float:
    """A conversion's time without its engine's start-up (joining or starting Ray, checking nodes)."""
    return m["seconds"] - m["startup_seconds"]


def per_unit_seconds(e: dict, engine: str) -> float:
    big, small = e[f"{engine}_1"], e[f"{engine}_1_small"]
    return (working_seconds(small) - working_seconds(big)) / (small["units"] - big["units"])


def report_engines(e: dict) -> None:
    local1, ray1 = e["local_1"], e["ray_1"]
    units = local1["units"]
    print(
        f"\n## engines: {e['rows']} rows of 1024x768 JPEGs, {e['mb']:.0f} MB of parquet, {units} units "
        f"of {e['unit_bytes'] / 1e6:.0f} MB ({e['local_1_small']['units']} at a quarter of that)\n"
    )
    print("| engine | workers | units | rows/s (working) | start-up s | end to end s | ratio | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for key in ("local_1", "local_2", "local_1_small", "ray_1", "ray_2", "ray_1_small"):
        m = e[key]
        engine, workers = key.split("_")[:2]
        ratio = f"{working_seconds(local1) / working_seconds(m):.2f}x local 1 thread"
        print(
            f"| {engine} | {workers} | {m['units']} | {m['rows'] / working_seconds(m):,.0f} | "
            f"{m['startup_seconds']:.1f} | {m['seconds']:.1f} | {ratio} | {m['peak_rss_mb']:.0f} |"
        )
    local_unit, ray_unit = per_unit_seconds(e, "local"), per_unit_seconds(e, "ray")
    overhead = ray_unit - local_unit
    fixed = working_seconds(ray1) - working_seconds(local1) - units * overhead
    mb_per_s = local1["media_bytes"] / working_seconds(local1) / 1e6
    default_unit_s = DEFAULT_UNIT_BYTES / 1e6 / mb_per_s
    print(
        f"\nCost per extra unit (slope between the two unit sizes): local {local_unit * 1000:+.0f} ms, "
        f"Ray {ray_unit * 1000:+.0f} ms; Ray's own: {overhead * 1000:+.0f} ms per unit, plus "
        f"{fixed:.1f} s once per run (its worker processes starting; the driver's start-up, "
        f"{ray1['startup_seconds']:.1f} s, aside). A unit of the default size "
        f"({DEFAULT_UNIT_BYTES / 2**30:.0f} GiB of parquet) is {default_unit_s:.0f} s of work at this "
        f"machine's {mb_per_s:.0f} MB/s per worker: Ray's per-unit overhead is "
        f"{100 * overhead / default_unit_s:+.2f}% of it (goal < 5%)."
    )
    report_projection(e, overhead / default_unit_s)


def report_projection(e: dict, overhead: float) -> None:
    """A cluster's rate from one worker's, and what that figure takes for granted."""
    local1, ray1, ray2 = e["local_1"], e["ray_1"], e["ray_2"]
    rows_per_worker = local1["rows"] / working_seconds(local1) / (1 + overhead)
    mb_per_worker = local1["media_bytes"] / working_seconds(local1) / 1e6 / (1 + overhead)
    scaling = working_seconds(ray1) / working_seconds(ray2)
    nodes, cores, dataset_tb = 16, 32, 100
    workers = nodes * cores
    hours = dataset_tb * 1e6 / (mb_per_worker * workers) / 3600
    print(
        f"\nCluster projection: one Ray worker (a task of num_cpus=1, one per core) converts "
        f"{rows_per_worker:,.0f} rows/s ({mb_per_worker:.0f} MB/s of media: this machine's one-thread "
        f"rate less Ray's per-unit overhead at the default unit size); {nodes} nodes x {cores} cores = "
        f"{workers * rows_per_worker:,.0f} rows/s, {dataset_tb} TB of media in {hours:.1f} h. "
        f"It assumes: the work stays CPU-bound and scales with cores (measured here only up to 2 Ray "
        f"workers: {scaling:.2f}x one, on 2 cores shared with Ray's own daemons and the driver); every "
        f"node reads and writes its storage at {cores * mb_per_worker * 8 / 1000:.0f} Gbit/s or more; "
        f"a core of the cluster is as fast as one here; there are more units than cores "
        f"({dataset_tb} TB / {DEFAULT_UNIT_BYTES / 2**30:.0f} GiB = "
        f"{dataset_tb * 1e12 / DEFAULT_UNIT_BYTES:,.0f} units); the fixed start-up is small beside hours."
    )


def report_fetch(f: dict) -> None:
    default, one = f["default"], f["one"]
    print(
        f"\nimages by URL: {f['rows']} rows of 1024x768 JPEGs from a loopback server answering after "
        f"{f['latency_ms']:g} ms:\n"
    )
    print("| --fetch-workers | images/s (fetched + checked + written) | CPU ms/row | ratio |")
    print("|---:|---:|---:|---|")
    for label, m, ratio in (
        (
            f"{f['default_workers']} (default)",
            default,
            f"{one['seconds'] / default['seconds']:.1f}x workers=1",
        ),
        ("1", one, f"1.00x; latency bound {1000 / f['latency_ms']:.0f}/s"),
    ):
        cpu_ms = 1000 * m["cpu_seconds"] / m["rows"]
        print(f"| {label} | {m['rows'] / m['seconds']:,.0f} | {cpu_ms:.2f} | {ratio} |")


def report(r: dict) -> None:
    def rate(m: dict) -> float:
        return m["rows"] / m["seconds"]

    def mbs(m: dict) -> float:
        return m["media_bytes"] / m["seconds"] / 1e6

    check = rate(r["check"])
    one, two, raw = rate(r["shardify_1w"]), rate(r["shardify_2w"]), rate(r["rawcopy"])
    i = r["input"]
    print(
        f"\n## shardify benchmark ({i['rows']} rows, {i['corrupt']} corrupt, {i['mb']:.0f} MB input, "
        f"mean JPEG {i['mean_image_kb']:.0f} KB, {r['cpus']} CPUs)\n"
    )
    print("| run | rows/s | MB/s | CPU ms/row | peak RSS MB | ratio |")
    print("|---|---:|---:|---:|---:|---|")
    rows = [
        ("pure image check (1 thread, in memory)", r["check"], "1.00x check"),
        ("shardify --workers 1", r["shardify_1w"], f"{one / check:.2f}x check (goal >= 0.9)"),
        (
            "shardify --workers 2",
            r["shardify_2w"],
            f"{two / one:.2f}x workers=1 (goal >= 1.8); {two / check:.2f}x check",
        ),
        (
            "raw copy, no checks (pyarrow -> tarfile)",
            r["rawcopy"],
            f"shardify 1w runs at {one / raw:.2f}x of it",
        ),
    ]
    for label, m, ratio in rows:
        cpu_ms = 1000 * m["cpu_seconds"] / m["rows"]
        print(
            f"| {label} | {rate(m):,.0f} | {mbs(m):,.0f} | {cpu_ms:.2f} | {m['peak_rss_mb']:,.0f} | {ratio} |"
        )
    if "big" in r:
        b = r["big"]
        print(
            f"\nmemory: a {b['mb']:,.0f} MB input converted with 2 workers at {rate(b):,.0f} rows/s, "
            f"peak RSS {b['peak_rss_mb']:,.0f} MB "
            f"(the {i['mb']:,.0f} MB input: {r['shardify_2w']['peak_rss_mb']:,.0f} MB)"
        )
    v = r["variants"]
    print(
        f"\ncheck variants on a corruption suite of {v['suite']} damaged JPEGs "
        f"({v['loader_failures']} of which a loader's full decode fails on):\n"
    )
    print("| check | valid images/s | caught | missed | rejected but loadable |")
    print("|---|---:|---:|---:|---:|")
    for name, m in v["variants"].items():
        print(
            f"| {name} | {m['images_per_s']:,.0f} | {m['caught']} | {m['missed']} "
            f"| {m['rejected_loadable']} |"
        )
    if "fetch" in r:
        report_fetch(r["fetch"])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
    else:
        main()
