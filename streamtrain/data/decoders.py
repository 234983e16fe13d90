"""Per-sample decoders: a raw shard sample (member bytes) -> the tensors and text a phase needs.

A decoder is called in a loader worker as ``decoder(raw, rng)``, where ``rng`` is seeded by the
batch's identity (so text dropout, like the image augmentations, is the same after a resume).
It raises on bytes it cannot use; the stream skips and counts that sample. A decoder may add
counts of its own under ``DECODER_COUNTS`` (logged as ``data/<name>``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from shardify.format import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS
from streamtrain.data.chat import encode_chat
from streamtrain.data.counts import DECODER_COUNTS
from streamtrain.data.images import ImageTransform, encode_for_device
from streamtrain.data.transforms import AudioConfig, decode_image, drop_text, log_mel

_IMAGE_EXTENSIONS = (*dict.fromkeys(IMAGE_EXTENSIONS.values()), "jpeg")
_AUDIO_EXTENSIONS = tuple(dict.fromkeys(AUDIO_EXTENSIONS.values()))


def _first_member(raw: dict[str, Any], extensions: tuple[str, ...]) -> bytes | None:
    for extension in extensions:
        if extension in raw:
            return raw[extension]
    return None


def _metadata(raw: dict[str, Any]) -> dict[str, Any]:
    return json.loads(raw["json"]) if "json" in raw else {}


def image_fields(data: bytes, transform: ImageTransform, on_device: bool) -> dict[str, Any]:
    """A sample's image: ``image`` float [3, S, S] decoded and augmented here, or, when the
    training device decodes (``on_device``), its ``image_data`` bytes and ``image_params``."""
    if not on_device:
        return {"image": transform(decode_image(data, transform.size))}
    encoded = encode_for_device(data, transform)
    return {"image_data": encoded.data, "image_params": encoded.params}


def sample_id(raw: dict[str, Any], metadata: dict[str, Any]) -> str:
    """The row's original sample_id (shardify keeps it in .json), else the tar key."""
    original = metadata.get("sample_id")
    return str(original) if original is not None else raw["__key__"]


@dataclass
class CaptionDecoder:
    """Image and/or audio with a caption, for contrastive alignment."""

    image_size: int = 224
    train: bool = True
    text_dropout_prob: float = 0.0
    audio: AudioConfig | None = None
    """Decode audio members to log-mel when set; images are always decoded when present."""
    horizontal_flip: bool = True
    on_device: bool = False
    """Leave images undecoded for the training device (device_decode.py)."""
    _vision: ImageTransform = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._vision = ImageTransform(self.image_size, self.train, horizontal_flip=self.horizontal_flip)

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        metadata = _metadata(raw)
        text = raw["txt"].decode("utf-8") if "txt" in raw else str(metadata.get("caption", ""))
        if self.train and self.text_dropout_prob:
            text = drop_text(text, self.text_dropout_prob, rng)
        sample: dict[str, Any] = {"sample_id": sample_id(raw, metadata), "text": text}
        image = _first_member(raw, _IMAGE_EXTENSIONS)
        if image is not None:
            sample.update(image_fields(image, self._vision, self.on_device))
        audio = _first_member(raw, _AUDIO_EXTENSIONS) if self.audio is not None else None
        if audio is not None:
            sample["mel"], sample["mel_mask"] = log_mel(audio, self.audio)
        if image is None and "mel" not in sample:
            raise ValueError(f"sample {raw['__key__']} has no image or audio member")
        return sample


def conversation_of(
    raw: dict[str, Any], metadata: dict[str, Any], caption_prompt: str
) -> list[dict[str, str]]:
    """The sample's conversation: its ``.json`` ``messages`` (conversation shards), its question and
    answer (qa shards), or its caption answering ``caption_prompt`` (caption shards)."""
    if "messages" in metadata:
        messages = metadata["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"sample {raw['__key__']}: .json messages is not a list of {{role, content}}")
        return [{"role": str(m.get("role")), "content": m.get("content")} for m in messages]
    if "question" in metadata and "answer" in metadata:
        return [
            {"role": "user", "content": str(metadata["question"])},
            {"role": "assistant", "content": str(metadata["answer"])},
        ]
    caption = raw["txt"].decode("utf-8") if "txt" in raw else metadata.get("caption")
    if caption is None:
        raise ValueError(f"sample {raw['__key__']} has no messages, question/answer or caption")
    return [{"role": "user", "content": caption_prompt}, {"role": "assistant", "content": str(caption)}]


@dataclass
class ChatDecoder:
    """An image with a tokenized conversation, for VLM fine-tuning: a conversation sample's every
    turn, a question and its answer, or a caption as the answer to a caption prompt."""

    tokenizer: Any
    image_size: int = 224
    train: bool = True
    max_question_tokens: int = 128
    max_answer_tokens: int = 128
    max_seq_len: int = 2048
    """Vision tokens and text together; whole turns past it are dropped (and counted)."""
    vision_tokens: int = 0
    """Positions the image takes in the decoder's sequence."""
    caption_prompts: tuple[str, ...] = ("Describe this image.",)
    """A caption sample's question: drawn per sample in training, the first one at evaluation."""
    horizontal_flip: bool = True
    on_device: bool = False
    """Leave images undecoded for the training device (device_decode.py)."""
    _vision: ImageTransform = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._vision = ImageTransform(self.image_size, self.train, horizontal_flip=self.horizontal_flip)

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        metadata = _metadata(raw)
        image = _first_member(raw, _IMAGE_EXTENSIONS)
        if image is None:
            raise ValueError(f"sample {raw['__key__']} has no image member")
        prompt = rng.choice(self.caption_prompts) if self.train else self.caption_prompts[0]
        encoded = encode_chat(
            self.tokenizer,
            conversation_of(raw, metadata, prompt),
            max_tokens=self.max_seq_len - self.vision_tokens,
            max_question_tokens=self.max_question_tokens,
            max_answer_tokens=self.max_answer_tokens,
        )
        sample = {
            "sample_id": sample_id(raw, metadata),
            **image_fields(image, self._vision, self.on_device),
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "questions": encoded.questions,
        }
        if encoded.truncated_turns:
            sample[DECODER_COUNTS] = {"truncated_turns": encoded.truncated_turns}
        return sample
