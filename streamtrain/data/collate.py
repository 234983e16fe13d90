"""Batch collation: lists of transformed samples -> padded, stacked tensors for each phase."""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from streamtrain.data.chat import IGNORE_INDEX
from streamtrain.data.device_decode import EncodedImages

__all__ = ["IGNORE_INDEX", "answer_spans", "collate_alignment", "collate_vlm", "pack_rows"]


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


def collate_vlm(
    samples: list[dict],
    pad_token_id: int,
    vision_tokens: int = 0,
    pack: bool = False,
    max_seq_len: int | None = None,
) -> dict:
    """Collate VLM samples (``encode_chat`` ids and labels, one image each) into rows.

    Each sample has ``sample_id``, ``image`` [3, H, W] (or ``image_data``/``image_params``),
    ``input_ids`` and ``labels`` (1-D, the same length) and optionally ``questions``. In a row, a
    sample takes ``vision_tokens`` slots for its image (``vision_mask`` True, input id
    ``pad_token_id``, label ``IGNORE_INDEX``) then its text. Unpacked, each row holds one sample;
    with ``pack``, samples go into rows of at most ``max_seq_len`` positions, longest first, each
    into the first row with room (first-fit decreasing: a pure function of the samples).

    Returns ``input_ids``, ``labels``, ``attention_mask`` (1 on every sample's positions),
    ``position_ids`` (counted from 0 at each sample's first position and again over a row's
    padding, so that a packed row's samples are told apart) and ``vision_mask``, all [R, W] and
    right-padded to the longest row; ``image`` [N, 3, H, W], ``sample_ids``, ``sample_rows``,
    ``sample_starts`` and ``sample_lengths`` [N] in row order (the order samples are laid out,
    which packing changes), ``questions`` (every sample's, in that order), and ``packed``.
    """
    if not samples:
        raise ValueError("collate_vlm: empty batch")
    for sample in samples:
        if not any(label != IGNORE_INDEX for label in _ids(sample["labels"])):
            raise ValueError(
                f"collate_vlm: sample {sample['sample_id']!r} has no answer tokens to learn from"
            )
    lengths = [vision_tokens + len(sample["input_ids"]) for sample in samples]
    rows = pack_rows(lengths, max_seq_len) if pack else [[i] for i in range(len(samples))]
    order = [i for row in rows for i in row]
    laid_out = [samples[i] for i in order]
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    vision_mask = torch.zeros(shape, dtype=torch.bool)
    sample_rows, sample_starts = [], []
    for row_index, row in enumerate(rows):
        start = 0
        for i in row:
            sample, end = samples[i], start + lengths[i]
            text = start + vision_tokens
            input_ids[row_index, text:end] = torch.as_tensor(_ids(sample["input_ids"]), dtype=torch.long)
            labels[row_index, text:end] = torch.as_tensor(_ids(sample["labels"]), dtype=torch.long)
            attention_mask[row_index, start:end] = 1
            position_ids[row_index, start:end] = torch.arange(lengths[i])
            vision_mask[row_index, start:text] = True
            sample_rows.append(row_index)
            sample_starts.append(start)
            start = end
        position_ids[row_index, start:] = torch.arange(width - start)
    sample_ids = [sample["sample_id"] for sample in laid_out]
    return {
        "image": _images(laid_out, sample_ids),
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "vision_mask": vision_mask,
        "sample_ids": sample_ids,
        "sample_rows": torch.tensor(sample_rows, dtype=torch.long),
        "sample_starts": torch.tensor(sample_starts, dtype=torch.long),
        "sample_lengths": torch.tensor([lengths[i] for i in order], dtype=torch.long),
        "questions": [question for sample in laid_out for question in sample.get("questions", ())],
        "packed": pack,
    }


def pack_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing into rows of ``capacity`` positions (a sample
    longer than that gets a row of its own); ties keep the samples' order."""
    if capacity is None:
        raise ValueError("collate_vlm: packing needs max_seq_len")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        fits = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if fits is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[fits].append(i)
            room[fits] -= lengths[i]
    return rows


def answer_spans(batch: dict) -> list[list[tuple[int, int]]]:
    """For each sample of a ``collate_vlm`` batch (row order), the ``[start, end)`` positions in its
    row of each learned run: one per assistant turn, its answer and end token."""
    labels = batch["labels"]
    spans = []
    for row, start, length in zip(
        batch["sample_rows"].tolist(),
        batch["sample_starts"].tolist(),
        batch["sample_lengths"].tolist(),
        strict=True,
    ):
        learned = (labels[row, start : start + length] != IGNORE_INDEX).tolist()
        runs, open_at = [], None
        for offset, is_learned in enumerate([*learned, False]):
            if is_learned and open_at is None:
                open_at = offset
            elif not is_learned and open_at is not None:
                runs.append((start + open_at, start + offset))
                open_at = None
        spans.append(runs)
    return spans


def _ids(values: torch.Tensor | list[int]) -> list[int]:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


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
