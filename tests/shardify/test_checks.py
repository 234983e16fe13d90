"""Image, audio and text checks: every corruption rejected with its reason, every oddity kept."""

from __future__ import annotations

import resource
import struct
import zlib

import pytest

from shardify.checks import check_audio, check_image, check_text
from tests import factories

UNUSUAL = factories.unusual_images()
CORRUPT = factories.corrupt_images()


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_valid_unusual_images_pass(name: str) -> None:
    verdict = check_image(UNUSUAL[name])
    assert verdict.ok, verdict
    expected = {"gif": "gif", "bmp": "bmp", "tiff": "tiff", "webp": "webp"}.get(name)
    assert verdict.extension == (expected or ("png" if "png" in name else "jpg"))


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_images_are_rejected_with_reason(name: str) -> None:
    data, reason = CORRUPT[name]
    verdict = check_image(data)
    assert not verdict.ok
    assert verdict.reason == reason, verdict.detail
    assert verdict.detail


@pytest.mark.parametrize("name", sorted(n for n in CORRUPT if CORRUPT[n][0]))
def test_reduced_scale_check_agrees_with_full_decode(name: str) -> None:
    data, _ = CORRUPT[name]
    assert check_image(data).reason == check_image(data, full_decode=True).reason


def _png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (never decodable cheaply)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_rejected_without_allocating_pixels() -> None:
    bomb = _png_header_bomb(60_000, 60_000)  # 3.6 Gpx: 3.6 GB if it were ever decoded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    verdict = check_image(bomb)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert verdict.reason == "too_large"
    assert grown_mb < 50


def test_pixel_limit_is_configurable() -> None:
    data = factories.jpeg(100, 100)
    assert check_image(data, max_pixels=100 * 100).ok
    verdict = check_image(data, max_pixels=100 * 100 - 1)
    assert verdict.reason == "too_large" and "100x100" in verdict.detail


def test_mpo_and_jpeg_share_the_jpg_extension() -> None:
    assert check_image(factories.jpeg()).extension == "jpg"


@pytest.mark.parametrize("fmt, extension", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg"), ("MP3", "mp3")])
def test_audio_formats_decode(fmt: str, extension: str) -> None:
    verdict = check_audio(factories.wav(fmt=fmt))
    assert verdict.ok and verdict.extension == extension


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "missing"),
        (b"", "empty"),
        (b"definitely not audio, just some text bytes here", "unidentified"),
        (factories.wav(fmt="FLAC")[:2000], "decode_error"),
        (factories.wav(fmt="OGG")[:1500], "decode_error"),
    ],
)
def test_bad_audio_rejected(data: bytes | None, reason: str) -> None:
    verdict = check_audio(data)
    assert not verdict.ok and verdict.reason == reason
    assert "BytesIO" not in verdict.detail


def test_image_bytes_fed_as_audio_are_unidentified() -> None:
    assert check_audio(factories.jpeg()).reason == "unidentified"


@pytest.mark.parametrize("value", [None, "", "   \n", 42])
def test_missing_text(value: object) -> None:
    problem = check_text(value, "caption")
    assert problem is not None and problem[0] == "missing_text" and "caption" in problem[1]


@pytest.mark.parametrize("value", ["ok", "日本語のキャプション 🚀", "x" * 200_000])
def test_present_text(value: str) -> None:
    assert check_text(value, "caption") is None
