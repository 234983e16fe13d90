"""Benchmark: the same photos read from local disk and from S3 far away, by streamtrain and its peers.

A real S3 server (SeaweedFS, tests/s3server.py) runs on loopback behind a latency proxy
(tests/latencyproxy.py) that holds each response's first byte D ms, as a store across a network
does. In one run it measures, cold, one pass over the photos (~200 KB 1024x768 JPEGs, 224 px
train transform, batch 32, K dataloader workers), every loader in a fresh process:

- streamtrain's training loader on local shards, and on the same shards on S3 at D = 0, 40, 100 ms;
- the same at 40 ms with the read-ahead off (``data.read_ahead_mb=0``: one request at a time, what
  streamtrain did before), and with the cache on for two epochs (bytes fetched per epoch);
- Mosaic streaming (its MDS format) and litdata (its own format), each local and through the same
  proxy at 40 and 100 ms, decoding with the same transform;
- the S3 clients streamtrain could use, fetching every shard's bytes in 1 MB ranges with 16 in
  flight at 40 ms: botocore from threads (what streamtrain uses), obstore (Rust) from threads, and
  s3fs's own concurrency (``cat_ranges``): MB/s and CPU seconds per GB;
- ``shardify index`` of the shards on S3 at 40 ms, read-ahead on and off.

Ratios are against streamtrain's own local rate measured in the same run; peak RSS is the loader's
whole process tree. The peers are optional: install them with

    .venv/bin/python -m pip install -e '.[bench]'      # or: uv pip install -e '.[bench]'

(mosaicml-streaming caps transformers and numpy below the lock's versions; ``./launch.sh setup``
puts the locked versions back afterwards). Without them it says so and stops (``--no-peers``
measures streamtrain alone).

    python benchmarks/bench_remote.py [--samples 2000] [--workers 2] [--no-peers] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH = 32
CHUNK = 1 << 20
PEERS = {"streaming": "mosaicml-streaming", "litdata": "litdata"}


# ---------------------------------------------------------------- children (one measurement each)


def _transform() -> Any:
    from streamtrain.data.transforms import vision_transform

    return vision_transform(224, train=True)


def _decode(jpg: bytes, transform: Any) -> Any:
    from streamtrain.data.transforms import decode_image

    return transform(decode_image(jpg, None))


def child_streamtrain(
    url: str, workers: int, samples: int, read_ahead_mb: float, cache: str, epochs: int
) -> dict:
    from benchmarks.bench_loader import tree_cpu_s, tree_mb
    from streamtrain.config import DataConfig
    from streamtrain.data.collate import collate_alignment
    from streamtrain.data.decoders import CaptionDecoder
    from streamtrain.data.pipeline import resolve_sources, train_loader

    started = time.perf_counter()
    data = DataConfig(
        train=url,
        num_workers=workers,
        shuffle_buffer=256,
        read_ahead_mb=read_ahead_mb,
        cache_dir=cache or None,
    )
    loader = train_loader(
        data,
        resolve_sources(url),
        rank=0,
        world_size=1,
        batch_size=BATCH,
        seed=0,
        decode=CaptionDecoder(image_size=224, train=True),
        collate=collate_alignment,
    )
    passes = []
    for epoch in range(epochs):
        began, taken = time.perf_counter(), 0
        for _ in range(loader.batches_per_epoch):
            taken += len(next(loader)["sample_ids"])
        passes.append({"samples": taken, "seconds": time.perf_counter() - began})
        print(json.dumps({"epoch_done": epoch}), flush=True)
    seconds = time.perf_counter() - started
    result = {"samples": passes[0]["samples"], "seconds": seconds - sum(p["seconds"] for p in passes[1:])}
    # Before shutdown: the workers' peaks count (each process's own high-water mark, summed).
    tree = tree_mb("VmHWM")
    own = int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]) / 1024
    result |= {
        "epochs": passes,
        "tree_peak_mb": tree,
        "workers_peak_mb": tree - own,
        "cpu_seconds": tree_cpu_s(),
    }
    loader.shutdown()
    return result


def child_mosaic(remote: str, local: str, workers: int, samples: int) -> dict:
    import torch
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    from benchmarks.bench_loader import tree_mb

    clean_stale_shared_memory()
    transform = _transform()

    class Photos(StreamingDataset):
        def __getitem__(self, index: int) -> Any:
            sample = super().__getitem__(index)
            return _decode(sample["jpg"], transform), sample["txt"]

    started = time.perf_counter()
    dataset = Photos(remote=remote or None, local=local, shuffle=True, batch_size=BATCH, shuffle_seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers)
    taken = sum(len(texts) for _, texts in loader)
    return {"samples": taken, "seconds": time.perf_counter() - started, "tree_peak_mb": tree_mb("VmHWM")}


def child_litdata(url: str, cache: str, workers: int, samples: int) -> dict:
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming import downloader

    from benchmarks.bench_loader import tree_mb

    # litdata gives its obstore client fixed options, so AWS_ALLOW_HTTP does not reach it; a plain
    # http endpoint (the loopback proxy) needs allow_http there too. Its other options are kept.
    downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"}

    transform = _transform()

    class Photos(StreamingDataset):
        def __getitem__(self, index: Any) -> Any:
            sample = super().__getitem__(index)
            return _decode(sample["jpg"], transform), sample["txt"]

    started = time.perf_counter()
    options = {"cache_dir": cache} if url.startswith("s3://") else {}
    dataset = Photos(url, shuffle=True, seed=0, **options)
    loader = StreamingDataLoader(dataset, batch_size=BATCH, num_workers=workers)
    taken = sum(len(texts) for _, texts in loader)
    return {"samples": taken, "seconds": time.perf_counter() - started, "tree_peak_mb": tree_mb("VmHWM")}


def child_client(kind: str, urls_file: str, connections: int) -> dict:
    """Every listed object fetched in 1 MB ranges, ``connections`` in flight, by one client."""
    from concurrent.futures import ThreadPoolExecutor

    listed = json.loads(Path(urls_file).read_text())
    ranges = [
        (url, start, min(size, start + CHUNK)) for url, size in listed for start in range(0, size, CHUNK)
    ]
    cpu, started = time.process_time(), time.perf_counter()
    if kind == "botocore":
        from shardify import s3client

        def fetch(item: tuple[str, int, int]) -> int:
            return len(s3client.get_range(item[0], item[1], item[2], connections).data)

        with ThreadPoolExecutor(connections) as pool:
            total = sum(pool.map(fetch, ranges))
    elif kind == "obstore":
        import obstore
        from obstore.store import S3Store

        stores: dict[str, Any] = {}

        def fetch(item: tuple[str, int, int]) -> int:
            bucket, key = item[0].split("://", 1)[1].split("/", 1)
            if bucket not in stores:
                stores[bucket] = S3Store(bucket, client_options={"allow_http": True})
            return len(obstore.get_range(stores[bucket], key, start=item[1], end=item[2]))

        with ThreadPoolExecutor(connections) as pool:
            total = sum(pool.map(fetch, ranges))
    else:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
        paths = [url.split("://", 1)[1] for url, _, _ in ranges]
        parts = fs.cat_ranges(
            paths, [start for _, start, _ in ranges], [stop for _, _, stop in ranges], batch_size=connections
        )
        total = sum(len(part) for part in parts)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"bytes": total, "seconds": seconds, "cpu_seconds": cpu}


def child_index(url: str, output: str, read_ahead_mb: float, chunk_mb: float) -> dict:
    from shardify import readahead
    from shardify.index import IndexOptions, index

    readahead.configure(budget_bytes=int(read_ahead_mb * 2**20), chunk_bytes=int(chunk_mb * 2**20))
    started = time.perf_counter()
    result = index([url], IndexOptions(output=output, workers=2))
    return {
        "seconds": time.perf_counter() - started,
        "bytes_read": result.bytes_read,
        "shards": len(result.scans),
    }


def child_main(argv: list[str]) -> None:
    from benchmarks.bench_shardify import peak_rss_mb

    mode, *args = argv
    if mode == "streamtrain":
        url, workers, samples, read_ahead, cache, epochs = args
        result = child_streamtrain(url, int(workers), int(samples), float(read_ahead), cache, int(epochs))
    elif mode == "mosaic":
        result = child_mosaic(args[0], args[1], int(args[2]), int(args[3]))
    elif mode == "litdata":
        result = child_litdata(args[0], args[1], int(args[2]), int(args[3]))
    elif mode == "client":
        result = child_client(args[0], args[1], int(args[2]))
    else:
        result = child_index(args[0], args[1], float(args[2]), float(args[3]))
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- the run


class Bench:
    """The S3 server, the proxies, and a child per measurement with the proxy's byte counts."""

    def __init__(self, work: Path, workers: int, samples: int) -> None:
        from tests.s3server import SeaweedS3

        self.work, self.workers, self.samples = work, workers, samples
        self.server = SeaweedS3(work / "seaweedfs")

    def run(self, proxy: Any, *args: str, extra_env: dict[str, str] | None = None) -> dict:
        """One child; ``proxy`` (or None: local) is the endpoint it reads S3 through."""
        env = dict(os.environ) | self.server.environment() | (extra_env or {})
        if proxy is not None:
            env |= {"AWS_ENDPOINT_URL": proxy.endpoint, "S3_ENDPOINT_URL": proxy.endpoint}
            proxy.reset_counts()
        command = [sys.executable, __file__, "_child", *args]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert child.stdout is not None
        marks, last = [], ""
        for line in child.stdout:
            last = line.strip() or last
            if '"epoch_done"' in line and proxy is not None:
                marks.append(proxy.bytes_down)
        if child.wait() != 0:
            raise SystemExit(f"benchmark child {args[:2]} failed with exit code {child.returncode}")
        result = json.loads(last)
        if proxy is not None:
            result |= {"proxy_bytes": proxy.bytes_down, "proxy_requests": proxy.requests}
            result["epoch_bytes"] = [b - a for a, b in zip([0, *marks], marks, strict=False)]
        return result

    def upload(self, local: Path, prefix: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.server.endpoint}, skip_instance_cache=True)
        if not fs.exists("bench"):
            fs.mkdir("bench")
        fs.put(str(local), f"bench/{prefix}", recursive=True)
        return f"s3://bench/{prefix}"


def make_peer_data(shards: str, work: Path) -> dict[str, str]:
    """The same photos (bytes identical) in Mosaic's MDS and litdata's format, on local disk."""
    from streaming import MDSWriter

    from shardify.tarread import iter_samples
    from streamtrain.data.shards import resolve

    raw = [
        (sample["jpg"], sample.get("txt", b"").decode())
        for shard in resolve(shards).shards
        for sample in iter_samples(shard.url)
    ]
    mds = work / "mds"
    with MDSWriter(out=str(mds), columns={"jpg": "bytes", "txt": "str"}, size_limit=1 << 24) as out:
        for jpg, txt in raw:
            out.write({"jpg": jpg, "txt": txt})
    from litdata import optimize

    lit = work / "litdata"
    optimize(
        fn=_litdata_samples,
        inputs=[shard.url for shard in resolve(shards).shards],
        output_dir=str(lit),
        chunk_bytes="16MB",
        num_workers=1,
    )
    return {"mds": str(mds), "litdata": str(lit)}


def _litdata_samples(url: str) -> Any:
    from shardify.tarread import iter_samples

    for sample in iter_samples(url):
        yield {"jpg": sample["jpg"], "txt": sample.get("txt", b"").decode()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2000, help="photos (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers (default: %(default)s)")
    parser.add_argument("--delays", default="0,40,100", help="first-byte delays in ms (default: %(default)s)")
    parser.add_argument("--no-peers", action="store_true", help="measure streamtrain alone")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the rate runs; fastest kept")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    missing = [package for module, package in PEERS.items() if importlib.util.find_spec(module) is None]
    if missing and not args.no_peers:
        raise SystemExit(
            f"bench_remote: the peers {', '.join(missing)} are not installed. Install them with "
            "`.venv/bin/python -m pip install -e '.[bench]'` (then `./launch.sh setup` restores the "
            "locked versions), or run with --no-peers to measure streamtrain alone."
        )
    from benchmarks.bench_loader import make_shards
    from benchmarks.bench_shardify import pixmo_photo
    from tests.latencyproxy import LatencyProxy

    delays = [int(d) for d in args.delays.split(",")]
    k, n = str(args.workers), str(args.samples)
    results: dict[str, Any] = {"samples": args.samples, "workers": args.workers, "load": os.getloadavg()}
    results["repeats"] = args.repeats
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-remote-") as scratch:
        work = Path(scratch)
        print(f"making {args.samples} photos ...", file=sys.stderr)
        photos = [pixmo_photo(seed) for seed in range(48)]
        local = make_shards(work, "photos", args.samples, photos, max(1, args.samples // 24), True)
        bench = Bench(work, args.workers, args.samples)
        bench.server.start()
        os.environ.update(bench.server.environment())
        try:
            remote = bench.upload(Path(local), "photos")
            peers = {} if args.no_peers else make_peer_data(local, work)
            for name, path in list(peers.items()):
                peers[name + "_s3"] = bench.upload(Path(path), name)
            # Rounds of every loader in turn, the fastest of each kept: a machine whose load moves
            # during the run slows some passes, and not always the same loader's.
            for round_ in range(args.repeats):
                print(f"round {round_ + 1} of {args.repeats} ...", file=sys.stderr)
                keep(results, "local", bench.run(None, "streamtrain", local, k, n, "32", "", "1"))
                for delay in delays:
                    with LatencyProxy(bench.server.endpoint, delay / 1000) as proxy:
                        run = bench.run(proxy, "streamtrain", remote, k, n, "32", "", "1")
                        keep(results, f"s3_{delay}", run)
                if peers:
                    peer_rates = measure_peers(
                        bench, peers, work / f"round-{round_}", k, n, [d for d in delays if d]
                    )
                    for key, run in peer_rates.items():
                        keep(results.setdefault("peers", {}), key, run)
            with LatencyProxy(bench.server.endpoint, 0.04) as proxy:
                results["s3_40_no_read_ahead"] = bench.run(proxy, "streamtrain", remote, k, n, "0", "", "1")
                cache = str(work / "cache")
                results["s3_40_cache"] = bench.run(proxy, "streamtrain", remote, k, n, "32", cache, "2")
                results["clients"] = measure_clients(bench, proxy, remote, work)
                results["index"] = {
                    name: bench.run(proxy, "index", remote + "/", str(work / f"index-{name}"), mb, chunk)
                    for name, mb, chunk in (("read_ahead", "32", "4"), ("one_request", "0", "1"))
                }
        finally:
            bench.server.stop()
    results["load_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    report(results)


def keep(results: dict, key: str, run: dict) -> None:
    """Keep the faster of ``run`` and the one already under ``key``; note every rate."""
    rates = [*results.get(key, {}).get("rates", []), run["samples"] / run["seconds"]]
    if (
        key not in results
        or run["samples"] / run["seconds"] > results[key]["samples"] / results[key]["seconds"]
    ):
        results[key] = run
    results[key]["rates"] = rates


def measure_clients(bench: Bench, proxy: Any, remote: str, work: Path) -> dict:
    from streamtrain.data.shards import resolve

    listed = [(shard.url, shard.size) for shard in resolve(remote).shards]
    urls = work / "urls.json"
    urls.write_text(json.dumps(listed))
    kinds = ["botocore", "s3fs"] + (["obstore"] if importlib.util.find_spec("obstore") else [])
    return {kind: bench.run(proxy, "client", kind, str(urls), "16") for kind in kinds}


def measure_peers(bench: Bench, peers: dict[str, str], work: Path, k: str, n: str, delays: list[int]) -> dict:
    from tests.latencyproxy import LatencyProxy

    out: dict[str, Any] = {}
    work.mkdir(parents=True, exist_ok=True)
    out["mosaic_local"] = bench.run(None, "mosaic", "", peers["mds"], k, n)
    out["litdata_local"] = bench.run(None, "litdata", peers["litdata"], "", k, n)
    for delay in delays:
        with LatencyProxy(bench.server.endpoint, delay / 1000) as proxy:
            local = str(work / f"mosaic-cache-{delay}")
            out[f"mosaic_{delay}"] = bench.run(proxy, "mosaic", peers["mds_s3"], local, k, n)
            cache = str(work / f"litdata-cache-{delay}")
            allow = {"AWS_ALLOW_HTTP": "true"}
            out[f"litdata_{delay}"] = bench.run(
                proxy, "litdata", peers["litdata_s3"], cache, k, n, extra_env=allow
            )
    return out


def report(r: dict) -> None:
    def rate(m: dict) -> float:
        return m["samples"] / m["seconds"]

    local = rate(r["local"])
    print(
        f"\n## Reading from a far store ({r['samples']} photos of ~200 KB, {r['workers']} workers, "
        f"batch {BATCH}, cold, one pass, fastest of {r['repeats']}; load {r['load'][0]:.1f} at the start, "
        f"{r['load_end'][0]:.1f} at the end)\n"
    )
    print(
        "| loader | where | samples/s | x streamtrain local | peak RSS MB (tree) | MB fetched in the pass |"
    )
    print("|---|---|---:|---:|---:|---:|")

    def row(name: str, where: str, m: dict) -> None:
        # streamtrain's workers run on into the next epoch: count what came during the pass.
        counted = m["epoch_bytes"][0] if m.get("epoch_bytes") else m.get("proxy_bytes")
        fetched = f"{counted / 1e6:,.0f}" if counted is not None else "-"
        rounds = ", ".join(f"{v:,.0f}" for v in m.get("rates", [rate(m)]))
        print(
            f"| {name} | {where} | {rate(m):,.0f} ({rounds}) | {rate(m) / local:.2f}x | "
            f"{m.get('tree_peak_mb', 0):,.0f} | {fetched} |"
        )

    row("streamtrain", "local disk", r["local"])
    for key in sorted(k for k in r if k.startswith("s3_") and k[3:].isdigit()):
        row("streamtrain", f"S3, {key[3:]} ms", r[key])
    row("streamtrain, read_ahead_mb=0", "S3, 40 ms", r["s3_40_no_read_ahead"])
    peers = r.get("peers", {})
    for key, m in peers.items():
        name, where = key.split("_", 1)
        row({"mosaic": "Mosaic streaming (MDS)", "litdata": "litdata"}[name], _where(where), m)
    cache = r["s3_40_cache"]
    print(
        f"\ncache on (S3 at 40 ms, two epochs): epoch 1 {cache['epoch_bytes'][0] / 1e6:,.1f} MB fetched, "
        f"epoch 2 {cache['epoch_bytes'][1] / 1e6:,.3f} MB fetched; epoch 2 at "
        f"{cache['epochs'][1]['samples'] / cache['epochs'][1]['seconds']:,.0f} samples/s"
    )
    for delay in ("40", "100"):
        if f"s3_{delay}" in r:
            growth = r[f"s3_{delay}"]["workers_peak_mb"] - r["local"]["workers_peak_mb"]
            print(
                f"loader workers' peak RSS (summed) from S3 at {delay} ms minus local: {growth:+,.0f} MB; "
                f"read-ahead budget {r['workers']} workers x 32 MB = {32 * r['workers']} MB"
            )
    cpu = {key: r[key]["cpu_seconds"] / r[key]["samples"] * 1000 for key in ("local", "s3_40") if key in r}
    print(f"CPU per sample, whole loader: local {cpu['local']:.1f} ms, S3 at 40 ms {cpu['s3_40']:.1f} ms")
    s3_40 = rate(r["s3_40"])
    goals = [f"S3 40 ms / local = {s3_40 / local:.2f} (goal >= 0.9)"]
    if "s3_100" in r:
        goals.append(f"S3 100 ms / local = {rate(r['s3_100']) / local:.2f} (goal >= 0.8)")
    remote_peers = [rate(m) for key, m in peers.items() if key.endswith("_40")]
    if remote_peers:
        goals.append(f"S3 40 ms / fastest peer at 40 ms = {s3_40 / max(remote_peers):.2f} (goal >= 1.3)")
    print("goals: " + "; ".join(goals))
    print("\nS3 clients, every shard in 1 MB ranges, 16 in flight, at 40 ms:\n")
    print("| client | MB/s | CPU s per GB |")
    print("|---|---:|---:|")
    for kind, m in r["clients"].items():
        gb = m["bytes"] / 1e9
        print(f"| {kind} | {m['bytes'] / 1e6 / m['seconds']:,.0f} | {m['cpu_seconds'] / gb:.2f} |")
    index = r["index"]
    print(
        f"\nshardify index on S3 at 40 ms: {index['read_ahead']['seconds']:.1f} s with read-ahead, "
        f"{index['one_request']['seconds']:.1f} s one 1 MB request at a time (as before) "
        f"({index['one_request']['seconds'] / index['read_ahead']['seconds']:.1f}x); MB read "
        f"{index['read_ahead']['bytes_read'] / 1e6:,.0f} vs {index['one_request']['bytes_read'] / 1e6:,.0f}"
    )


def _where(key: str) -> str:
    return "local disk" if key == "local" else f"S3, {key} ms"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
    else:
        main()
