"""Rebuild the bundled sample: a small Pixmo-shaped caption parquet of real images.

The images are scikit-learn's handwritten digits (8x8 scans, 1,797 of them), upscaled to 64x64
and stored as JPEG or PNG bytes, with captions that describe them. A few rows are deliberately
broken (truncated, not an image, no caption) so the sample shows shardify's skip log at work.

    .venv/bin/python sample/make_sample.py   # rewrites sample/pixmo_digits_caption.parquet
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from sklearn.datasets import load_digits

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STYLES = [
    "a handwritten digit {w}",
    "the number {w}, written by hand",
    "a scanned {w} on a dark background",
    "handwriting: the digit {w}",
]
OUT = Path(__file__).with_name("pixmo_digits_caption.parquet")


def main() -> None:
    digits = load_digits()
    rng = random.Random(0)
    rows = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        gray = (pixels / 16.0 * 255).astype(np.uint8)
        image = Image.fromarray(gray, "L").resize((64, 64), Image.Resampling.BICUBIC).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, "PNG" if index % 5 == 0 else "JPEG", quality=92)
        word = WORDS[int(label)]
        rows.append(
            {
                "sample_id": f"digits-{index:04d}",
                "caption": rng.choice(STYLES).format(w=word),
                "image_bytes": buffer.getvalue(),
                "label": int(label),
            }
        )
    rows[17]["image_bytes"] = rows[17]["image_bytes"][:150]  # truncated download
    rows[401]["image_bytes"] = b"<html><body>403 Forbidden</body></html>"  # an error page, not an image
    rows[902]["caption"] = None  # no caption
    schema = pa.schema(
        [
            ("sample_id", pa.string()),
            ("caption", pa.string()),
            ("image_bytes", pa.binary()),
            ("label", pa.int64()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), OUT, row_group_size=256)
    print(f"wrote {len(rows)} rows to {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
