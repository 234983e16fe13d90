"""Conversion-time checks: a training loader must never meet a sample that fails to decode.

Every check returns a :class:`MediaCheck`; a failed one carries a short ``reason`` category
(written to ``skipped.jsonl`` and counted in the manifest) and a human ``detail``.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import soundfile
from PIL import Image, UnidentifiedImageError

from shardify.format import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS

# Pillow's own decompression-bomb threshold: above it Image.open warns, at twice it refuses.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# JPEG is checked by decoding at 1/8 scale (libjpeg's DCT scaling): the whole entropy-coded
# stream is still read and validated, but the inverse DCT and colour conversion of the full
# image are skipped. benchmarks/bench_shardify.py measures that it rejects exactly what a full
# decode rejects, at a fraction of the cost.
_JPEG_FORMATS = ("JPEG", "MPO")


@dataclass(frozen=True)
class MediaCheck:
    """The verdict on one image or audio clip."""

    ok: bool
    extension: str = ""
    """Member extension for the detected format (``jpg``, ``flac``, ...), when ok."""
    reason: str = ""
    """Short category when not ok: missing, empty, unidentified, truncated, decode_error, too_large."""
    detail: str = ""
    width: int = 0
    height: int = 0

    @classmethod
    def fail(cls, reason: str, detail: str) -> MediaCheck:
        return cls(ok=False, reason=reason, detail=detail)


def _null_or_empty(data: bytes | None, column: str) -> MediaCheck | None:
    if data is None:
        return MediaCheck.fail("missing", f"{column} is null")
    if len(data) == 0:
        return MediaCheck.fail("empty", f"{column} has zero bytes")
    return None


def check_image(
    data: bytes | None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    full_decode: bool = False,
    column: str = "image_bytes",
) -> MediaCheck:
    """Decode ``data`` far enough to prove a loader can decode it.

    The dimensions are read from the header and checked against ``max_pixels`` before any pixel
    is allocated, so decompression bombs cost nothing. ``full_decode`` disables the reduced-scale
    JPEG decode (used by the benchmark to compare the two).
    """
    missing = _null_or_empty(data, column)
    if missing is not None:
        return missing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            width, height = image.size
            if image.format not in IMAGE_EXTENSIONS:
                return MediaCheck.fail("unidentified", f"unsupported image format {image.format}")
            if width <= 0 or height <= 0:
                return MediaCheck.fail("decode_error", f"invalid dimensions {width}x{height}")
            if width * height > max_pixels:
                return MediaCheck.fail(
                    "too_large", f"{width}x{height} = {width * height} pixels exceeds {max_pixels}"
                )
            if image.format in _JPEG_FORMATS and not full_decode:
                image.draft(None, (max(1, width // 8), max(1, height // 8)))
            image.load()
            extension = IMAGE_EXTENSIONS[image.format]
    except UnidentifiedImageError:
        return MediaCheck.fail("unidentified", f"{column} is not a recognised image ({len(data)} bytes)")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return MediaCheck.fail("too_large", str(exc))
    except OSError as exc:
        text = str(exc)
        return MediaCheck.fail("truncated" if "truncated" in text.lower() else "decode_error", text)
    except (SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError, MemoryError) as exc:
        # Pillow's plugins raise these on malformed headers and chunk tables.
        return MediaCheck.fail("decode_error", f"{type(exc).__name__}: {exc}")
    return MediaCheck(ok=True, extension=extension, width=width, height=height)


def transcode_to_png(data: bytes) -> bytes:
    """Losslessly re-encode a valid image (first frame) as PNG, for readers that only know jpg/png/webp."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        out = io.BytesIO()
        image.save(out, format="PNG")
    return out.getvalue()


def check_audio(data: bytes | None, column: str = "audio_bytes") -> MediaCheck:
    """Decode the whole clip with libsndfile (WAV, FLAC, OGG/Vorbis/Opus, MP3)."""
    missing = _null_or_empty(data, column)
    if missing is not None:
        return missing
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as clip:
            extension = AUDIO_EXTENSIONS.get(clip.format)
            if extension is None:
                return MediaCheck.fail("unidentified", f"unsupported audio format {clip.format}")
            if clip.frames == 0:
                return MediaCheck.fail("empty", f"{column} decodes to zero frames")
            decoded = clip.read(dtype="float32")
            if len(decoded) == 0:
                return MediaCheck.fail("truncated", f"{column} decodes to no samples")
    except soundfile.LibsndfileError as exc:
        text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", column, str(exc))
        reason = "unidentified" if "recognised" in text or "recognized" in text else "decode_error"
        return MediaCheck.fail(reason, text)
    except (RuntimeError, ValueError, TypeError) as exc:
        return MediaCheck.fail("decode_error", f"{type(exc).__name__}: {exc}")
    return MediaCheck(ok=True, extension=extension)


def check_text(value: object, column: str) -> tuple[str, str] | None:
    """``None`` when the text field is usable, else ``(reason, detail)``."""
    if value is None:
        return "missing_text", f"{column} is null"
    if not isinstance(value, str):
        return "missing_text", f"{column} is not text ({type(value).__name__})"
    if not value.strip():
        return "missing_text", f"{column} is empty"
    return None
