"""Rebuild the bundled samples: small Pixmo-shaped parquet files of real images.

The images are scikit-learn's handwritten digits (8x8 scans, 1,797 of them), upscaled to 64x64
and stored as JPEG or PNG bytes. Two datasets share them, each split into train (the first
1,500 scans) and eval (the other 297):

- ``digits_caption/{train,eval}.parquet`` (sample_id, caption, image_bytes, label): captions
  that describe what is in the image — the digit and its stroke ("a bold handwritten seven",
  "a thin handwritten seven": more or less ink than the median scan of that digit), so 20
  distinct captions, each fully determined by its image. A few train rows are deliberately
  broken (truncated, not an image, no caption) so the sample shows shardify's skip log at work.
- ``digits_qa/{train,eval}.parquet`` (sample_id, question, answer, image_bytes): questions
  about the digit ("What digit is written here?" -> "seven", "Is this digit odd or even?" -> "odd").
- ``digits_conversation/{train,eval}.parquet`` (sample_id, messages, image_bytes): three questions
  about each image in one conversation, ``messages`` a list of ``{role, content}`` (the chat
  format): three of "What digit is written here?", "Is this digit odd or even?", "Is it greater
  than four?" and "Which digit comes after it?", in a random order.

    .venv/bin/python sample/make_sample.py   # rewrites the parquet files under sample/
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
QUESTIONS = [
    ("What digit is written here?", lambda label: WORDS[label]),
    ("Which number does this image show?", lambda label: WORDS[label]),
    ("Is this digit odd or even?", lambda label: "odd" if label % 2 else "even"),
]
CONVERSATION_QUESTIONS = [
    ("What digit is written here?", lambda label: WORDS[label]),
    ("Is this digit odd or even?", lambda label: "odd" if label % 2 else "even"),
    ("Is it greater than four?", lambda label: "yes" if label > 4 else "no"),
    ("Which digit comes after it?", lambda label: WORDS[(label + 1) % 10]),
]
TURNS = 3
HERE = Path(__file__).parent
TRAIN_ROWS = 1500


def _images() -> list[tuple[bytes, int, str]]:
    """(image bytes, digit, stroke) per scan; stroke compares the scan's ink to its digit's median."""
    digits = load_digits()
    ink = digits.images.sum(axis=(1, 2))
    median = {label: float(np.median(ink[digits.target == label])) for label in range(10)}
    images = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        gray = (pixels / 16.0 * 255).astype(np.uint8)
        image = Image.fromarray(gray, "L").resize((64, 64), Image.Resampling.BICUBIC).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, "PNG" if index % 5 == 0 else "JPEG", quality=92)
        stroke = "bold" if ink[index] > median[int(label)] else "thin"
        images.append((buffer.getvalue(), int(label), stroke))
    return images


def _write(rows: list[dict], schema: pa.Schema, folder: str) -> None:
    out = HERE / folder
    out.mkdir(exist_ok=True)
    for split, part in (("train", rows[:TRAIN_ROWS]), ("eval", rows[TRAIN_ROWS:])):
        path = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=schema), path, row_group_size=256)
        print(f"wrote {len(part)} rows to {path} ({path.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    images = _images()
    rng = random.Random(0)
    captions = [
        {
            "sample_id": f"digits-{index:04d}",
            "caption": f"a {stroke} handwritten {WORDS[label]}",
            "image_bytes": data,
            "label": label,
        }
        for index, (data, label, stroke) in enumerate(images)
    ]
    captions[17]["image_bytes"] = captions[17]["image_bytes"][:150]  # truncated download
    captions[401]["image_bytes"] = b"<html><body>403 Forbidden</body></html>"  # an error page
    captions[902]["caption"] = None  # no caption
    caption_schema = pa.schema(
        [
            ("sample_id", pa.string()),
            ("caption", pa.string()),
            ("image_bytes", pa.binary()),
            ("label", pa.int64()),
        ]
    )
    _write(captions, caption_schema, "digits_caption")

    qa = []
    for index, (data, label, _) in enumerate(images):
        question, answer = QUESTIONS[rng.randrange(len(QUESTIONS))]
        qa.append(
            {
                "sample_id": f"digits-qa-{index:04d}",
                "question": question,
                "answer": answer(label),
                "image_bytes": data,
            }
        )
    qa_schema = pa.schema(
        [
            ("sample_id", pa.string()),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("image_bytes", pa.binary()),
        ]
    )
    _write(qa, qa_schema, "digits_qa")
    _write_conversations(images)


def _write_conversations(images: list[tuple[bytes, int, str]]) -> None:
    rng = random.Random(1)
    rows = []
    for index, (data, label, _) in enumerate(images):
        messages = []
        for question, answer in rng.sample(CONVERSATION_QUESTIONS, TURNS):
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer(label)},
            ]
        rows.append({"sample_id": f"digits-chat-{index:04d}", "messages": messages, "image_bytes": data})
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema(
        [("sample_id", pa.string()), ("messages", pa.list_(message)), ("image_bytes", pa.binary())]
    )
    _write(rows, schema, "digits_conversation")


if __name__ == "__main__":
    main()
