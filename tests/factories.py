"""Images, audio and Pixmo-shaped parquet files made on the spot for tests and benchmarks."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
from PIL import Image


def photo(width: int = 64, height: int = 48, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth, photo-like image (gradients plus mild noise) that compresses like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6.28, 3)
    channels = [127 + 100 * np.sin(x / (7 + 5 * i) + y / (11 + 3 * i) + phase[i]) for i in range(3)]
    pixels = np.stack(channels, -1) + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def jpeg(width: int = 64, height: int = 48, seed: int = 0, quality: int = 90) -> bytes:
    return encode(photo(width, height, seed), "JPEG", quality=quality)


def unusual_images() -> dict[str, bytes]:
    """Valid images that a careless checker might reject: modes, depths, containers, EXIF."""
    base = photo(40, 30, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW
    sixteen_bit = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    return {
        "grayscale_jpg": encode(base.convert("L"), "JPEG"),
        "cmyk_jpg": encode(base.convert("CMYK"), "JPEG"),
        "palette_png": encode(base.convert("P"), "PNG"),
        "rgba_png": encode(base.convert("RGBA"), "PNG"),
        "png_16bit": encode(sixteen_bit, "PNG"),
        "gif": encode(base.convert("P"), "GIF"),
        "bmp": encode(base, "BMP"),
        "tiff": encode(base, "TIFF"),
        "webp": encode(base, "WEBP", quality=80),
        "exif_rotated_jpg": encode(base, "JPEG", exif=exif),
        "progressive_jpg": encode(base, "JPEG", progressive=True),
    }


def corrupt_images() -> dict[str, tuple[bytes | None, str]]:
    """Bytes that must be skipped, with the reason shardify must give."""
    good_jpg = jpeg(96, 64, seed=3)
    good_png = encode(photo(96, 64, seed=4), "PNG")
    bomb = encode(Image.new("1", (12_000, 9_000)), "PNG")  # 108 Mpx, a few KB of bytes
    return {
        "null": (None, "missing"),
        "empty": (b"", "empty"),
        "text_bytes": (b"this is not an image at all", "unidentified"),
        "html": (b"<html><body>404 Not Found</body></html>", "unidentified"),
        "truncated_jpg": (good_jpg[: len(good_jpg) // 2], "truncated"),
        "truncated_jpg_tail": (good_jpg[:-40], "truncated"),
        "truncated_png": (good_png[: len(good_png) * 2 // 3], "truncated"),
        "header_only_jpg": (good_jpg[:200], "truncated"),
        "broken_png_stream": (_broken_png(good_png), "decode_error"),
        "garbage_after_jpeg_header": (good_jpg[:300] + bytes(200) * 20, "decode_error"),
        "decompression_bomb": (bomb, "too_large"),
    }


def _broken_png(png: bytes) -> bytes:
    """A PNG whose compressed IDAT payload is garbage (chunk framing intact)."""
    start = png.index(b"IDAT") + 4
    return png[:start] + bytes(range(256))[:64] + png[start + 64 :]


def wav(seconds: float = 0.25, rate: int = 22050, fmt: str = "WAV", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    samples = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.normal(size=t.shape)
    out = io.BytesIO()
    subtype = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}[fmt]
    soundfile.write(out, samples.astype(np.float32), rate, format=fmt, subtype=subtype)
    return out.getvalue()


def write_parquet(
    path: Path, rows: Iterable[dict], row_group_size: int = 64, schema: pa.Schema | None = None
) -> Path:
    rows = list(rows)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


CAPTION_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("caption", pa.string()), ("image_bytes", pa.binary())]
)
QA_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("image_bytes", pa.binary()),
    ]
)


def caption_rows(count: int, start: int = 0, size: tuple[int, int] = (48, 32)) -> list[dict]:
    return [
        {
            "sample_id": f"img-{start + i:05d}",
            "caption": f"a photo number {start + i}",
            "image_bytes": jpeg(*size, seed=start + i),
        }
        for i in range(count)
    ]


def webdataset_shards(folder: Path, samples: int, per_shard: int, prefix: str = "wds") -> list[Path]:
    """Shards written by ``webdataset.ShardWriter`` (jpg, txt, json with a sample_id), no manifest."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(folder / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(samples):
            sink.write(
                {
                    "__key__": f"{prefix}{i:05d}",
                    "jpg": jpeg(16, 12, seed=i),
                    "txt": f"{prefix} caption {i}",
                    "json": {"sample_id": f"{prefix}-id-{i}"},
                }
            )
    return sorted(folder.glob(f"{prefix}-*.tar"))


def img2dataset_shards(folder: Path, shards: int, per_shard: int) -> list[Path]:
    """Shards in img2dataset's layout: ``00000.tar`` with ``000000001.jpg/.txt/.json`` members,
    each beside its ``00000_stats.json`` and ``00000.parquet``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in range(per_shard):
                key = f"{shard:05d}{row:04d}"
                meta = {"url": f"https://example.com/{key}.jpg", "caption": f"img2 {key}", "key": key}
                meta["status"] = "success"
                members = {
                    "jpg": jpeg(16, 12, seed=shard * 100 + row),
                    "txt": meta["caption"].encode(),
                    "json": json.dumps(meta).encode(),
                }
                for extension, data in members.items():
                    add_member(tar, f"{key}.{extension}", data)
        (folder / f"{shard:05d}_stats.json").write_text(
            json.dumps({"count": per_shard, "successes": per_shard})
        )
        write_parquet(
            folder / f"{shard:05d}.parquet", [{"key": f"{shard:05d}{r:04d}"} for r in range(per_shard)]
        )
        paths.append(path)
    return paths


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` as regular member ``name`` of an open tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 946684800
    tar.addfile(info, io.BytesIO(data))
