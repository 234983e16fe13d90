"""Batches of images decoded and augmented on the training device, in the main process.

With ``data.decode_device: cuda`` the loader workers send each image as ``Encoded`` bytes and
parameters (images.py). The collate gathers them into ``EncodedImages``; before the loader hands
the batch out, ``finish_batch`` decodes every JPEG of it in one ``torchvision.io.decode_jpeg``
call on the device, orients, resizes, crops and flips each, and then jitters and normalises the
whole batch at once. The same code runs with ``device="cpu"`` (libjpeg-turbo instead of nvJPEG),
which is how the suite tests it on machines without a GPU.

A JPEG the device refuses is tried on the CPU (Pillow, which reads what libjpeg reads); one that
no decoder reads is dropped from the batch and counted as a ``decode_error``, as a worker would.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from streamtrain.data.images import KIND_JPEG, Augment, Encoded
from streamtrain.data.transforms import CLIP_MEAN, CLIP_STD, decode_image

log = logging.getLogger(__name__)


@dataclass
class EncodedImages:
    """The images of a batch, undecoded: one uint8 buffer and one parameter row each."""

    data: list[torch.Tensor]
    params: torch.Tensor
    """float64 [B, 2 + AUGMENT_WIDTH]: kind, orientation, Augment."""

    @classmethod
    def of(cls, images: Sequence[Encoded]) -> EncodedImages:
        return cls([image.data for image in images], torch.stack([image.params for image in images]))

    def __len__(self) -> int:
        return len(self.data)

    def decode(self, device: torch.device | str) -> tuple[torch.Tensor | None, list[int], int]:
        """``(images [B', 3, S, S] float32 on device, rows kept, fallbacks)``; rows no decoder
        could read are left out (None when none is left); ``fallbacks``: JPEGs that the device
        refused and the CPU decoded."""
        device = torch.device(device)
        rows = self.params.tolist()  # one conversion for the batch, not a tensor index per value
        kinds = [int(row[0]) for row in rows]
        augments = [Augment.from_values(row[2:]) for row in rows]
        jpeg_rows = [row for row, kind in enumerate(kinds) if kind == KIND_JPEG]
        decoded, fallbacks = _decode_jpegs([self.data[row] for row in jpeg_rows], device)
        crops: list[torch.Tensor | None] = [None] * len(self)
        for row, (pixels, upright) in zip(jpeg_rows, decoded, strict=True):
            if pixels is not None:
                orientation = 1 if upright else int(rows[row][1])
                crops[row] = _geometry(pixels, orientation, augments[row])
        for row, kind in enumerate(kinds):
            if kind != KIND_JPEG:
                size = augments[row].size
                crops[row] = self.data[row].view(3, size, size).to(device, non_blocking=True)
        kept = [row for row, crop in enumerate(crops) if crop is not None]
        if not kept:
            return None, [], fallbacks
        batch = torch.stack([crops[row] for row in kept]).to(torch.float32).div_(255.0)
        batch = _jitter(batch, [augments[row] for row in kept])
        mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        return batch.sub_(mean).div_(std), kept, fallbacks


def finish_batch(batch: Any, device: torch.device | str) -> tuple[Any, dict[str, int]]:
    """Decode a batch's ``EncodedImages`` on ``device``; the batch (None if nothing is left) and
    the counts to add to the read stats (``decode_errors``, ``device_decode_fallbacks``, and
    ``samples`` made negative by the rows dropped)."""
    if not isinstance(batch, dict) or not any(isinstance(v, EncodedImages) for v in batch.values()):
        return batch, {}
    counts: dict[str, int] = {}
    finished = dict(batch)
    for key, value in batch.items():
        if not isinstance(value, EncodedImages):
            continue
        images, kept, fallbacks = value.decode(device)
        if fallbacks:
            counts["device_decode_fallbacks"] = counts.get("device_decode_fallbacks", 0) + fallbacks
        dropped = len(value) - len(kept)
        if dropped:
            counts["decode_errors"] = counts.get("decode_errors", 0) + dropped
            counts["samples"] = counts.get("samples", 0) - dropped
            if images is None:
                return None, counts
            finished = _keep_rows(finished, kept, len(value))
        finished[key] = images
    return finished, counts


def _keep_rows(batch: dict[str, Any], kept: list[int], rows: int) -> dict[str, Any]:
    """The batch's per-sample fields (tensors and lists with ``rows`` entries) at ``kept`` only."""
    index = torch.tensor(kept)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
            out[key] = value.index_select(0, index.to(value.device))
        elif isinstance(value, list) and len(value) == rows:
            out[key] = [value[row] for row in kept]
        else:
            out[key] = value  # EncodedImages are replaced by the caller
    return out


Decoded = tuple[torch.Tensor | None, bool]
"""uint8 [3, H, W] pixels (None where unreadable), and whether they are already upright."""


def _decode_jpegs(files: list[torch.Tensor], device: torch.device) -> tuple[list[Decoded], int]:
    """Each file's pixels, decoded on ``device`` in one call; and how many needed the CPU."""
    if not files:
        return [], 0
    try:
        return [(pixels, False) for pixels in decode_jpeg(files, mode=ImageReadMode.RGB, device=device)], 0
    except RuntimeError:
        pass  # one bad file fails the whole call: find it by decoding one at a time
    out: list[Decoded] = []
    fallbacks = 0
    for data in files:
        try:
            out.append((decode_jpeg(data, mode=ImageReadMode.RGB, device=device), False))
            continue
        except RuntimeError:
            pass
        try:
            image = decode_image(data.numpy().tobytes())  # applies EXIF orientation itself
        except Exception as exc:  # any failure of an untrusted file is a skip
            log.warning("dropping an image no decoder reads: %r", exc)
            out.append((None, False))
            continue
        fallbacks += 1
        out.append((F.pil_to_tensor(image).to(device), True))
    return out, fallbacks


def _geometry(pixels: torch.Tensor, orientation: int, augment: Augment) -> torch.Tensor:
    out = F.resize(_orient(pixels, orientation), list(augment.resized), antialias=True)
    out = out[:, augment.top : augment.top + augment.size, augment.left : augment.left + augment.size]
    return out.flip(-1) if augment.flip else out


def _orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation as Pillow's ``exif_transpose`` does."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-1, -2)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:
        return pixels.transpose(-1, -2)
    if orientation == 6:
        return pixels.rot90(-1, (-2, -1))
    if orientation == 7:
        return pixels.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return pixels.rot90(1, (-2, -1))
    return pixels


_GRAY = (0.2989, 0.587, 0.114)


def _jitter(images: torch.Tensor, rows: list[Augment]) -> torch.Tensor:
    """Colour jitter of a float [B, 3, H, W] batch in [0, 1], each image with its own operation
    order and factors (torchvision's float kernels, batched): at each of the order's places, an
    image whose operation there is not ``op`` gets factor 1, which leaves it unchanged."""
    places = max((len(a.order) for a in rows), default=0)
    for place in range(places):
        for op in range(3):
            factors = [a.factors[op] if len(a.order) > place and a.order[place] == op else 1.0 for a in rows]
            if all(f == 1.0 for f in factors):
                continue
            factor = torch.tensor(factors, dtype=images.dtype).view(-1, 1, 1, 1).to(images.device)
            images = _JITTER_OPS[op](images, factor)
    return images


def _brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images.mul(factor).clamp_(0, 1)


def _gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(-3)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(-3)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return images.mul(factor).add_(other * (1.0 - factor)).clamp_(0, 1)


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _gray(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def _saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _gray(images), factor)


_JITTER_OPS = (_brightness, _contrast, _saturation)
