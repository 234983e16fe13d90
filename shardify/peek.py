"""Reading a few samples of a shardify output (or indexed shards) to look at them: ``show``, ``stats``.

Samples are picked evenly over the whole output in manifest order (the ``i``-th of ``n`` is sample
``(i + 1/2) * total / n``), so a look covers every part of it; within a shard, payloads of the
samples not picked are seeked past (tar headers only).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from shardify.format import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, MANIFEST_NAME, Manifest
from shardify.storage import as_user_error, filesystem, join
from shardify.tarread import iter_samples

IMAGE_MEMBERS = (*dict.fromkeys(IMAGE_EXTENSIONS.values()), "jpeg")
AUDIO_MEMBERS = tuple(dict.fromkeys(AUDIO_EXTENSIONS.values()))


class LookError(ValueError):
    """The shards to look at cannot be read as asked (one line, exit 2)."""


@dataclass
class Sample:
    """One sample as a person reads it."""

    key: str
    shard: str
    index: int
    """Its position in its shard."""
    media: dict[str, bytes] = field(default_factory=dict)
    """Image and audio members by extension."""
    caption: str | None = None
    question: str | None = None
    answer: str | None = None
    messages: list[tuple[str, str]] = field(default_factory=list)
    """A conversation's turns as (role, text)."""
    error: str | None = None
    """Why the sample could not be read (a member over the size limit, a checksum mismatch)."""

    @property
    def image(self) -> tuple[str, bytes] | None:
        return next(((ext, self.media[ext]) for ext in IMAGE_MEMBERS if ext in self.media), None)

    @property
    def audio(self) -> tuple[str, bytes] | None:
        return next(((ext, self.media[ext]) for ext in AUDIO_MEMBERS if ext in self.media), None)

    def texts(self) -> dict[str, str]:
        """Each text field by name (conversations joined turn by turn), for lengths and display."""
        found = {"caption": self.caption, "question": self.question, "answer": self.answer}
        if self.messages:
            found["conversation"] = "\n".join(f"{role}: {text}" for role, text in self.messages)
        return {name: text for name, text in found.items() if text is not None}


def read_manifest(location: str) -> tuple[Manifest, str]:
    """The manifest of a shardify output (directory, ``s3://`` prefix or its manifest.json) and
    the base URL its shard names are relative to."""
    url = location if location.endswith(MANIFEST_NAME) else join(location, MANIFEST_NAME)
    try:
        with as_user_error(LookError, url):
            fs, path = filesystem(url)
            with fs.open(path, "r", encoding="utf-8") as handle:
                text = handle.read()
    except FileNotFoundError:
        raise LookError(
            f"{location} holds no {MANIFEST_NAME}: give a shardify output, or index the shards first "
            "(shardify index SHARDS)"
        ) from None
    except OSError as exc:
        raise LookError(f"cannot read {url}: {exc}") from None
    try:
        manifest = Manifest.from_json(text, url)
    except (ValueError, TypeError, KeyError) as exc:
        raise LookError(f"{url} is not a shardify manifest: {exc}") from None
    return manifest, manifest.shard_base(url)


def spread(total: int, count: int) -> list[int]:
    """``count`` positions spread evenly over ``range(total)`` (all of them when fewer)."""
    if count >= total:
        return list(range(total))
    return sorted({int((i + 0.5) * total / count) for i in range(count)})


def pick_samples(manifest: Manifest, base: str, count: int) -> Iterator[Sample]:
    """About ``count`` samples spread over the output, in manifest order."""
    wanted: dict[int, list[int]] = defaultdict(list)
    starts, start = [], 0
    for entry in manifest.shards:
        starts.append(start)
        start += entry.samples
    shard_of = 0
    for position in spread(start, count):
        while shard_of + 1 < len(starts) and starts[shard_of + 1] <= position:
            shard_of += 1
        wanted[shard_of].append(position - starts[shard_of])
    for shard_index, indices in sorted(wanted.items()):
        entry = manifest.shards[shard_index]
        chosen = set(indices)
        for raw in iter_samples(
            join(base, entry.name),
            min(indices),
            max(indices) + 1,
            fetch=lambda i, _ext, chosen=chosen: i in chosen,
        ):
            if raw["__index__"] in chosen:
                yield to_sample(raw, entry.name)


def to_sample(raw: dict[str, Any], shard: str) -> Sample:
    """A raw tar sample (member extension -> bytes) as text fields and media."""
    sample = Sample(str(raw["__key__"]), shard, int(raw["__index__"]))
    sample.error = raw.get("__error__") or raw.get("__checksum_error__")
    for ext in (*IMAGE_MEMBERS, *AUDIO_MEMBERS):
        if raw.get(ext) is not None:
            sample.media[ext] = raw[ext]
    metadata: dict[str, Any] = {}
    if raw.get("json") is not None:
        try:
            loaded = json.loads(raw["json"])
            metadata = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            sample.error = sample.error or "its .json does not parse"
    if raw.get("txt") is not None:
        sample.caption = raw["txt"].decode("utf-8", errors="replace")
    elif isinstance(metadata.get("caption"), str):
        sample.caption = metadata["caption"]
    for name in ("question", "answer"):
        if metadata.get(name) is not None:
            setattr(sample, name, str(metadata[name]))
    messages = metadata.get("messages")
    if isinstance(messages, list):
        sample.messages = [
            (str(turn.get("role", "?")), _content_text(turn.get("content")))
            for turn in messages
            if isinstance(turn, dict)
        ]
    return sample


def _content_text(content: Any) -> str:
    """A message's content: a string, or a list of parts ({"type": "text", "text": ...}, images)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in ("image", "audio"):
                parts.append(f"<{part['type']}>")
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return "" if content is None else str(content)
