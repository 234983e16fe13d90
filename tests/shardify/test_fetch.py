"""parquet-to-tar on Pixmo's published layout (image_url [+ image_sha256]) against a loopback server."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from shardify.convert import ConvertOptions, convert
from shardify.fetch import FetchOptions
from tests import factories
from tests.shardify.helpers import (
    local_committed_rows,
    output_files,
    read_manifest,
    read_samples,
    read_skipped,
)

SLOW_RESPONSE_S = 1.0
URL_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("caption", pa.string()),
        ("image_url", pa.string()),
        ("image_sha256", pa.string()),
    ]
)


def image(seed: int) -> bytes:
    return factories.jpeg(48, 32, seed=seed)


class ImageServer(http.server.ThreadingHTTPServer):
    """Serves /img/SEED.jpg and one path per failure mode; counts requests per path."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.delay_s = 0.0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(self.requests)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that time out and leave are expected here


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ImageServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests[self.path] += 1
            seen = self.server.requests[self.path]
        kind, _, name = self.path.strip("/").partition("/")
        if kind == "img":
            self._send(200, "image/jpeg", image(int(name.split(".")[0])))
        elif kind in ("404", "403", "418", "500"):
            self._send(int(kind), "text/plain", b"no")
        elif kind == "flaky":  # a 500 first, then the image
            self._send(500, "text/plain", b"busy") if seen == 1 else self._send(200, "image/jpeg", image(7))
        elif kind == "limited":  # a 429 (rate limit) first, then the image
            if seen == 1:
                self._send(429, "text/plain", b"slow down")
            else:
                self._send(200, "image/jpeg", image(9))
        elif kind == "slow":
            time.sleep(SLOW_RESPONSE_S)
            self._send(200, "image/jpeg", image(8))
        elif kind == "html":
            self._send(200, "text/html", b"<html><body>Sorry, this image is gone</body></html>")
        elif kind == "reset":  # SO_LINGER 0: close() sends RST instead of FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        time.sleep(self.server.delay_s)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ConnectionLog:
    """Every address this process connects a socket to while recording (an audit hook: real sockets)."""

    def __init__(self) -> None:
        self.addresses: list[object] = []
        self.recording = False
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if event == "socket.connect" and self.recording:
            self.addresses.append(args[1])


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with pytest.MonkeyPatch.context() as patch:
        for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            patch.delenv(name, raising=False)
        instance = ImageServer()
        thread = threading.Thread(target=instance.serve_forever, daemon=True)
        thread.start()
        yield instance
        instance.shutdown()
        instance.server_close()


@pytest.fixture(scope="module")
def connections() -> ConnectionLog:
    return ConnectionLog()


FAST_FETCH = FetchOptions(workers=8, timeout_s=0.5, retries=2, backoff_s=0.05)


def _url_rows(server: ImageServer, paths: list[str], sha256s: dict[int, str] | None = None) -> list[dict]:
    return [
        {
            "sample_id": f"img-{i:03d}",
            "caption": f"photo {i}",
            "image_url": server.url(path),
            "image_sha256": (sha256s or {}).get(i),
        }
        for i, path in enumerate(paths)
    ]


def _convert(source: Path, out: Path, **options: object) -> None:
    convert([str(source)], ConvertOptions(output=str(out), **{"fetch": FAST_FETCH, **options}))


def test_each_failure_is_a_skip_with_its_reason(
    server: ImageServer, connections: ConnectionLog, tmp_path: Path
) -> None:
    paths = {
        "good": "/img/1.jpg",
        "not_found": "/404/a",
        "forbidden": "/403/a",
        "teapot": "/418/a",
        "always_500": "/500/a",
        "flaky": "/flaky/a",
        "slow": "/slow/a",
        "wrong_sha": "/img/2.jpg",
        "right_sha_upper": "/img/3.jpg",
        "html": "/html/a",
        "reset": "/reset/a",
        "good_last": "/img/4.jpg",
        "rate_limited": "/limited/a",
    }
    rows = _url_rows(server, list(paths.values()))
    names = list(paths)
    rows[names.index("wrong_sha")]["image_sha256"] = hashlib.sha256(b"something else").hexdigest()
    rows[names.index("right_sha_upper")]["image_sha256"] = hashlib.sha256(image(3)).hexdigest().upper()
    rows.append({**rows[0], "sample_id": "no-url", "image_url": None})
    source = factories.write_parquet(tmp_path / "urls.parquet", rows, schema=URL_SCHEMA)
    before = server.counts()
    connections.recording = True
    try:
        _convert(source, tmp_path / "out")
    finally:
        connections.recording = False
    requests = server.counts() - before

    skipped = {
        names[r["row"]] if r["row"] < len(names) else "no_url": r for r in read_skipped(tmp_path / "out")
    }
    assert {name: r["reason"] for name, r in skipped.items()} == {
        "not_found": "http_404",
        "forbidden": "http_403",
        "teapot": "http_error",
        "always_500": "http_error",
        "slow": "timeout",
        "wrong_sha": "sha256_mismatch",
        "html": "unidentified",
        "reset": "connection_error",
        "no_url": "missing",
    }
    assert server.url("/404/a") in skipped["not_found"]["detail"]
    assert "HTTP 500 (3 attempts)" in skipped["always_500"]["detail"]
    manifest = read_manifest(tmp_path / "out")
    assert manifest["rows_read"] == 14 and manifest["samples_written"] == 5
    assert manifest["skipped_by_reason"] == dict(
        sorted(Counter(r["reason"] for r in skipped.values()).items())
    )
    # 4xx but 429 are not retried; 429, 5xx, timeouts and resets are, up to --fetch-retries more times.
    assert requests == {
        "/img/1.jpg": 1,
        "/404/a": 1,
        "/403/a": 1,
        "/418/a": 1,
        "/500/a": 3,
        "/flaky/a": 2,
        "/slow/a": 3,
        "/img/2.jpg": 1,
        "/img/3.jpg": 1,
        "/html/a": 1,
        "/reset/a": 3,
        "/img/4.jpg": 1,
        "/limited/a": 2,
    }
    samples = {json.loads(s["json"])["sample_id"]: s for s in read_samples(tmp_path / "out")}
    assert list(samples) == ["img-000", "img-005", "img-008", "img-011", "img-012"]
    assert samples["img-005"]["jpg"] == image(7)  # the 500-then-ok row, converted after one retry
    assert connections.addresses and {address[0] for address in connections.addresses} == {"127.0.0.1"}


def test_fetched_output_equals_the_bytes_layout(server: ImageServer, tmp_path: Path) -> None:
    """Same shards byte for byte as the same rows holding their bytes, at any fetch concurrency."""
    rows = _url_rows(server, [f"/img/{100 + i}.jpg" for i in range(40)])
    for i, row in enumerate(rows):
        row["image_sha256"] = hashlib.sha256(image(100 + i)).hexdigest() if i % 3 else None
    urls = factories.write_parquet(tmp_path / "urls.parquet", rows, row_group_size=16, schema=URL_SCHEMA)
    with_bytes = [{**row, "image_bytes": image(100 + i)} for i, row in enumerate(rows)]
    inline = factories.write_parquet(tmp_path / "bytes.parquet", with_bytes, row_group_size=16)
    outputs = {}
    for name, source, fetch_workers in (("bytes", inline, 1), ("fetch1", urls, 1), ("fetch8", urls, 8)):
        fetch = FetchOptions(workers=fetch_workers, timeout_s=5, retries=0)
        _convert(source, tmp_path / name, max_samples_per_shard=12, batch_rows=4, fetch=fetch)
        files = output_files(tmp_path / name)
        outputs[name] = {k: v for k, v in files.items() if k.startswith("shard-")}
    assert len(outputs["bytes"]) >= 4 and outputs["fetch1"] == outputs["bytes"] == outputs["fetch8"]
    first = read_samples(tmp_path / "fetch8")[0]
    assert set(first) == {"__key__", "jpg", "txt", "json"}
    assert json.loads(first["json"])["image_url"] == server.url("/img/100.jpg")


class _Interrupt(Exception):
    pass


def test_restart_does_not_fetch_committed_rows(server: ImageServer, tmp_path: Path) -> None:
    rows = _url_rows(server, [f"/img/{200 + i}.jpg" for i in range(60)])
    source = factories.write_parquet(tmp_path / "urls.parquet", rows, row_group_size=16, schema=URL_SCHEMA)
    shaping = {"max_samples_per_shard": 8, "batch_rows": 4}
    _convert(source, tmp_path / "reference", **shaping)

    written = 0

    def interrupt_after_20_rows(count: int) -> None:
        nonlocal written
        written += count
        if written >= 20:
            raise _Interrupt

    out = tmp_path / "out"
    with pytest.raises(_Interrupt):
        convert(
            [str(source)],
            ConvertOptions(output=str(out), fetch=FAST_FETCH, **shaping),
            on_rows=interrupt_after_20_rows,
        )
    committed = local_committed_rows(out)
    assert committed == 16 and not (out / "manifest.json").exists()

    before = server.counts()
    _convert(source, out, **shaping)
    refetched = server.counts() - before
    assert refetched == Counter({f"/img/{200 + i}.jpg": 1 for i in range(committed, 60)})
    assert output_files(out) == output_files(tmp_path / "reference")

    before = server.counts()
    _convert(source, out, **shaping)  # finished: nothing to do, nothing fetched
    assert server.counts() == before


def test_bad_url_scheme_is_never_opened(server: ImageServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image(1))
    good, local = _url_rows(server, ["/img/1.jpg", "/unused"])
    rows = [good, {**local, "image_url": secret.as_uri()}]
    source = factories.write_parquet(tmp_path / "urls.parquet", rows, schema=URL_SCHEMA)
    _convert(source, tmp_path / "out")
    assert [(r["row"], r["reason"]) for r in read_skipped(tmp_path / "out")] == [(1, "bad_url")]
