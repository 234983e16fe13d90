"""Batch collation: lists of transformed samples -> padded, stacked tensors for each phase."""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from streamtrain.data.device_decode import EncodedImages

IGNORE_INDEX = -100
"""Label of positions that carry no loss (question tokens and padding); torch's cross-entropy default."""


def collate_alignment(samples: list[dict], text_tokenizer=None, max_text_tokens: int = 77) -> dict:
    """Collate alignment samples (media + caption) into a batch.

    Each sample has ``sample_id``, ``text`` and an ``image`` [3, H, W] and/or a ``mel``
    [n_mels, frames] with its ``mel_mask`` [frames]. Every sample must carry the same media.

    Samples decoded for the training device carry ``image_data`` and ``image_params`` instead of
    ``image``; the batch's ``image`` is then ``EncodedImages``, decoded by the loader.

    The batch has ``sample_ids``, ``image`` [B, 3, H, W] and/or ``mel`` [B, n_mels, frames] and
    ``mel_mask`` [B, frames], and the captions: ``texts`` (list of str, for a SentenceTransformer)
    when ``text_tokenizer`` is None, else ``text_input_ids`` and ``text_attention_mask`` [B, T]
    from the tokenizer, padded to the longest and truncated to ``max_text_tokens``.
    """
    if not samples:
        raise ValueError("collate_alignment: empty batch")
    sample_ids = [sample["sample_id"] for sample in samples]
    has_image = _present_in_all(samples, "image", sample_ids) or _present_in_all(
        samples, "image_data", sample_ids
    )
    has_mel = _present_in_all(samples, "mel", sample_ids)
    if not (has_image or has_mel):
        raise ValueError(
            f"collate_alignment: samples have neither 'image' nor 'mel' (keys: {sorted(samples[0])})"
        )

    batch: dict = {"sample_ids": sample_ids}
    if has_image:
        batch["image"] = _images(samples, sample_ids)
    if has_mel:
        if not _present_in_all(samples, "mel_mask", sample_ids):
            raise ValueError("collate_alignment: samples with 'mel' must also have 'mel_mask'")
        batch["mel"] = _stack(samples, "mel", sample_ids)
        batch["mel_mask"] = _stack(samples, "mel_mask", sample_ids).bool()

    texts = [sample["text"] for sample in samples]
    if text_tokenizer is None:
        batch["texts"] = texts
    else:
        encoded = text_tokenizer(
            texts, padding="longest", truncation=True, max_length=max_text_tokens, return_tensors="pt"
        )
        batch["text_input_ids"] = encoded["input_ids"].long()
        batch["text_attention_mask"] = encoded["attention_mask"].long()
    return batch


def collate_vlm(samples: list[dict], pad_token_id: int) -> dict:
    """Collate VLM question-answer samples into a right-padded batch.

    Each sample has ``sample_id``, ``image`` [3, H, W], ``question_ids`` and ``answer_ids``
    (ending in EOS). Per row, ``input_ids`` is the question then the answer, right-padded with
    ``pad_token_id`` to the longest row; ``attention_mask`` is 1 on those real tokens;
    ``labels`` is the answer ids on answer positions and ``IGNORE_INDEX`` elsewhere, so the loss
    covers the answer including its EOS. Also returns ``image`` [B, 3, H, W],
    ``question_lengths`` [B] and ``sample_ids``. All integer tensors are ``torch.long``.
    """
    if not samples:
        raise ValueError("collate_vlm: empty batch")
    sample_ids = [sample["sample_id"] for sample in samples]
    for sample in samples:
        if not sample["answer_ids"]:
            raise ValueError(
                f"collate_vlm: sample {sample['sample_id']!r} has no answer tokens to learn from"
            )
    length = max(len(sample["question_ids"]) + len(sample["answer_ids"]) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    question_lengths = torch.zeros(len(samples), dtype=torch.long)
    for row, sample in enumerate(samples):
        question = torch.as_tensor(sample["question_ids"], dtype=torch.long)
        answer = torch.as_tensor(sample["answer_ids"], dtype=torch.long)
        q_len, total = len(question), len(question) + len(answer)
        input_ids[row, :q_len] = question
        input_ids[row, q_len:total] = answer
        attention_mask[row, :total] = 1
        labels[row, q_len:total] = answer
        question_lengths[row] = q_len
    return {
        "image": _images(samples, sample_ids),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "question_lengths": question_lengths,
        "sample_ids": sample_ids,
    }


def _present_in_all(samples: list[dict], key: str, sample_ids: list[str]) -> bool:
    """Whether every sample has ``key``; a batch where only some do is an error."""
    missing = [
        sample_id for sample_id, sample in zip(sample_ids, samples, strict=True) if sample.get(key) is None
    ]
    if missing and len(missing) < len(samples):
        raise ValueError(
            f"mixed batch: {len(samples) - len(missing)} of {len(samples)} samples have {key!r}, "
            f"these do not: {missing[:5]}"
        )
    return not missing


def _images(samples: list[dict], sample_ids: list[str]) -> torch.Tensor | EncodedImages:
    """The batch's images: stacked, or still encoded when the training device decodes them
    (the loader's ``finish_batch`` turns those into a tensor on the device)."""
    if "image_data" not in samples[0]:
        return _stack(samples, "image", sample_ids)
    if not _present_in_all(samples, "image_data", sample_ids):
        raise ValueError("collate: samples have no 'image_data'")
    return EncodedImages([s["image_data"] for s in samples], _stack(samples, "image_params", sample_ids))


def _stack(samples: list[dict], key: str, sample_ids: list[str]) -> torch.Tensor:
    tensors = [sample[key] for sample in samples]
    shapes = {tuple(tensor.shape) for tensor in tensors}
    if len(shapes) > 1:
        by_id = [
            (sample_id, tuple(tensor.shape)) for sample_id, tensor in zip(sample_ids, tensors, strict=True)
        ]
        raise ValueError(f"cannot stack {key!r}: shapes differ across the batch: {by_id[:8]}")
    return stack(tensors)


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``, as a view without a copy when they already lie as consecutive,
    equally spaced rows of one buffer (a micro-batch in the loader's step ring, ring.py).

    A view shares its buffer: the loader's ring reuses it two steps later, so a batch kept
    longer than that must be copied (``.clone()``).
    """
    view = _rows_view(tensors)
    if view is not None:
        return view
    # default_collate stacks straight into shared memory inside a dataloader worker, saving the
    # copy that sending an ordinary tensor to the main process would make.
    return default_collate(tensors)


def _rows_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    first = tensors[0]
    if len(tensors) < 2 or first.dim() == 0:
        return None
    storage = first.untyped_storage().data_ptr()
    spacing = tensors[1].storage_offset() - first.storage_offset()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(first.shape, first.stride(), strict=True))
    if spacing < extent:  # rows would overlap (or run backwards)
        return None
    for k, tensor in enumerate(tensors):
        if (
            tensor.untyped_storage().data_ptr() != storage
            or tensor.storage_offset() != first.storage_offset() + k * spacing
            or tensor.shape != first.shape
            or tensor.stride() != first.stride()
            or tensor.dtype != first.dtype
        ):
            return None
    return first.as_strided((len(tensors), *first.shape), (spacing, *first.stride()), first.storage_offset())
