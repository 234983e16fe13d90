"""``shardify show``: a contact sheet of samples, as one self-contained HTML page or a PNG.

Each sample is shown with its image (a thumbnail; a box saying why when it does not decode) or
its audio, its caption, question and answer or conversation, its key and its shard.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from shardify.peek import LookError, Sample, pick_samples, read_manifest

THUMBNAIL = 256
"""Longest side of a thumbnail, in pixels (also the PNG's cell width)."""
PNG_COLUMNS = 6
PNG_HEADER = 32
PNG_TEXT_LINES = 8
PNG_LINE = 15
PNG_CELL = (THUMBNAIL, THUMBNAIL + 8 + PNG_TEXT_LINES * PNG_LINE)
"""Width and height of one sample in the PNG."""
SHARDS_HELP = "a shardify output: directory, s3:// prefix or its manifest.json"
MAX_INLINE_AUDIO = 2 << 20
AUDIO_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg", "mp3": "audio/mpeg"}


def thumbnail(data: bytes) -> Image.Image:
    """The image, upright and RGB, scaled to fit THUMBNAIL (never enlarged); raises if it does not decode."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (THUMBNAIL, THUMBNAIL))  # JPEG: decode at a reduced scale
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA", "P"):
        background = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(background, image.convert("RGBA"))
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return image


def png_size(count: int) -> tuple[int, int]:
    """The size of the PNG sheet of ``count`` samples."""
    columns = max(1, min(count, PNG_COLUMNS))
    rows = max(1, -(-count // columns))
    return columns * PNG_CELL[0], PNG_HEADER + rows * PNG_CELL[1]


def _lines(sample: Sample) -> list[str]:
    lines = [f"{name}: {text}" for name, text in sample.texts().items() if name != "conversation"]
    lines += [f"{role}: {text}" for role, text in sample.messages]
    return lines


def _image_html(sample: Sample) -> str:
    if sample.error:
        return f'<div class="broken">unreadable: {html.escape(sample.error)}</div>'
    image = sample.image
    if image is not None:
        try:
            with Image.open(io.BytesIO(image[1])) as header:
                size = f"{header.width}×{header.height} {image[0]}"
            small = thumbnail(image[1])
        except Exception as exc:  # any decoder error is what the sheet should show
            return f'<div class="broken">{image[0]} does not decode: {html.escape(str(exc))}</div>'
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=85)
        data = base64.b64encode(buffer.getvalue()).decode()
        return (
            f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(sample.key)}" '
            f'width="{small.width}" height="{small.height}"><div class="size">{size}</div>'
        )
    audio = sample.audio
    if audio is not None:
        if len(audio[1]) > MAX_INLINE_AUDIO:
            return f'<div class="broken">{audio[0]} audio, {len(audio[1]) >> 10} KiB</div>'
        data = base64.b64encode(audio[1]).decode()
        return f'<audio controls src="data:{AUDIO_TYPES[audio[0]]};base64,{data}"></audio>'
    return '<div class="broken">no image or audio</div>'


def _text_html(sample: Sample) -> str:
    parts = []
    for name in ("caption", "question", "answer"):
        text = getattr(sample, name)
        if text is not None:
            parts.append(f'<p class="{name}"><b>{name}</b> {html.escape(text)}</p>')
    if sample.messages:
        turns = "".join(
            f'<li class="turn {html.escape(role)}"><b>{html.escape(role)}</b> {html.escape(text)}</li>'
            for role, text in sample.messages
        )
        parts.append(f'<ol class="conversation">{turns}</ol>')
    return "".join(parts)


STYLE = """
body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; background: #fafafa; }
.sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(272px, 1fr)); gap: 12px; }
figure { margin: 0; padding: 8px; background: white; border: 1px solid #ddd; border-radius: 6px; }
figure img { display: block; margin: 0 auto; max-width: 100%; height: auto; image-rendering: pixelated; }
.size, .where { color: #777; font-size: 11px; text-align: center; }
.key { font-family: monospace; font-size: 11px; word-break: break-all; }
.broken { padding: 24px 8px; background: #fee; color: #900; text-align: center; }
p { margin: 4px 0; } ol.conversation { margin: 4px 0; padding-left: 18px; }
"""


def sheet_html(samples: list[Sample], title: str) -> str:
    """One self-contained page (images inline as data: URLs)."""
    cards = []
    for sample in samples:
        cards.append(
            f'<figure class="sample" data-key="{html.escape(sample.key)}">{_image_html(sample)}'
            f'<figcaption><div class="key">{html.escape(sample.key)}</div>'
            f'<div class="where">{html.escape(sample.shard)} #{sample.index}</div>{_text_html(sample)}'
            "</figcaption></figure>"
        )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<div class="sheet">{"".join(cards)}</div></body></html>\n'
    )


def sheet_png(samples: list[Sample], title: str) -> Image.Image:
    """The same sheet drawn by Pillow: PNG_COLUMNS cells a row, each a thumbnail and its text."""
    width, height = png_size(len(samples))
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    draw.text((8, 8), title, fill="black", font=font)
    columns = max(1, min(len(samples), PNG_COLUMNS))
    chars = PNG_CELL[0] // 7
    for number, sample in enumerate(samples):
        left = (number % columns) * PNG_CELL[0]
        top = PNG_HEADER + (number // columns) * PNG_CELL[1]
        image, note = sample.image, None
        try:
            if sample.error:
                raise ValueError(sample.error)
            if image is None:
                note = "audio" if sample.audio else "no image or audio"
            else:
                small = thumbnail(image[1])
                sheet.paste(
                    small, (left + (THUMBNAIL - small.width) // 2, top + (THUMBNAIL - small.height) // 2)
                )
        except Exception as exc:  # drawn as a note in the cell instead of the image
            note = f"does not decode: {exc}"
        if note is not None:
            draw.rectangle((left + 4, top + 4, left + THUMBNAIL - 4, top + THUMBNAIL - 4), outline="#c00")
            draw.multiline_text((left + 10, top + 10), textwrap.fill(note, chars - 2), fill="#c00", font=font)
        text = [sample.key, f"{sample.shard} #{sample.index}", *_lines(sample)]
        wrapped = [line for item in text for line in textwrap.wrap(item, chars) or [""]][:PNG_TEXT_LINES]
        for row, line in enumerate(wrapped):
            y = top + THUMBNAIL + 4 + row * PNG_LINE
            draw.text((left + 4, y), line, fill="#555" if row < 2 else "black", font=font)
    return sheet


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "show",
        help="a contact sheet of samples (HTML or PNG) to look at before training",
        description="Write a contact sheet of N samples spread over the shards: each image (or audio) "
        "with its caption, question/answer or conversation, its key and its shard. --output ending "
        "in .html gives one self-contained page (images inline), .png one image.",
    )
    p.add_argument(
        "shards", metavar="SHARDS", help="a shardify output (directory, s3:// prefix or its manifest.json)"
    )
    p.add_argument(
        "-n", "--n", type=int, default=24, metavar="N", help="samples to show (default: %(default)s)"
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="sheet.html or sheet.png")


def main(args: argparse.Namespace) -> int:
    """``shardify show``; LookError for what was asked wrongly."""
    output = Path(args.output)
    if output.suffix.lower() not in (".html", ".htm", ".png"):
        raise LookError(f"--output {output}: name an .html or a .png file")
    if args.n < 1:
        raise LookError(f"--n {args.n}: must be at least 1")
    manifest, base = read_manifest(args.shards)
    total = sum(entry.samples for entry in manifest.shards)
    samples = list(pick_samples(manifest, base, args.n))
    title = f"{args.shards}: {len(samples)} of {total} samples ({manifest.schema})"
    if output.suffix.lower() == ".png":
        sheet_png(samples, title).save(output)
    else:
        output.write_text(sheet_html(samples, title), encoding="utf-8")
    print(f"shardify: wrote {output} ({len(samples)} of {total} samples)")
    return 0
