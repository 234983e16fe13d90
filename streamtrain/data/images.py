"""The image transform, split so that decoding can happen where it is cheapest.

An image's transform is two parts: its random parameters (``Augment``: the resized size, crop box,
flip and colour-jitter factors), drawn by ``ImageTransform.draw`` from torch's generator in the
order and with the calls ``vision_transform`` makes, and the pixel work that applies them. The
pixel work runs either

- on the CPU in the loader worker (``ImageTransform.apply``: Pillow, exactly ``vision_transform``'s
  output for the same seed), or
- on the training device in the main process (device_decode.py): the worker only reads the
  header and draws the parameters, and a whole batch of JPEGs is decoded in one
  ``torchvision.io.decode_jpeg`` call and transformed there.

Both draw the same parameters for the same sample, so exact resume does not depend on the path.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from streamtrain.data.transforms import CLIP_MEAN, CLIP_STD, EXIF_ERRORS, decode_image, train_resize

ORIENTATION_TAG = 0x0112
_TRANSPOSED = {5, 6, 7, 8}
"""EXIF orientations that swap width and height."""


@dataclass(frozen=True)
class Augment:
    """One image's transform parameters, in the coordinates of its (oriented) decoded image."""

    resized: tuple[int, int]
    """(height, width) the image is resized to before the crop."""
    top: int
    left: int
    size: int
    """Side of the square crop."""
    flip: bool = False
    order: tuple[int, ...] = ()
    """Colour-jitter operations in the order applied: 0 brightness, 1 contrast, 2 saturation
    (3, hue, is never drawn)."""
    factors: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Brightness, contrast and saturation factors."""

    def to_tensor(self) -> torch.Tensor:
        """A fixed-length float64 row (exact for the ints and for the float32-drawn factors)."""
        order = [*self.order, *[-1] * (4 - len(self.order))]
        values = [*self.resized, self.top, self.left, self.size, float(self.flip), *order, *self.factors]
        return torch.tensor(values, dtype=torch.float64)

    @classmethod
    def from_values(cls, v: list[float]) -> Augment:
        """From the values of ``to_tensor()``."""
        ints = [int(x) for x in v[:10]]
        return cls(
            resized=(ints[0], ints[1]),
            top=ints[2],
            left=ints[3],
            size=ints[4],
            flip=bool(ints[5]),
            order=tuple(i for i in ints[6:10] if i >= 0),
            factors=(v[10], v[11], v[12]),
        )


AUGMENT_WIDTH = 13
"""Length of ``Augment.to_tensor()``."""


@dataclass(frozen=True)
class ImageTransform:
    """``vision_transform``'s train or eval transform, with its parameters drawn apart from the pixels."""

    size: int
    train: bool
    color_jitter: float = 0.4
    horizontal_flip: bool = True
    _jitter: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        strength = self.color_jitter
        jitter = v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength)
        object.__setattr__(self, "_jitter", jitter)

    @property
    def resize_to(self) -> int:
        """Short side before the crop."""
        return train_resize(self.size) if self.train else self.size

    def draw(self, height: int, width: int) -> Augment:
        """The parameters for an image of ``height`` × ``width``, drawn from torch's generator
        exactly as ``vision_transform`` draws them (torchvision's own ``make_params``)."""
        resized = resized_size(height, width, self.resize_to)
        if not self.train:
            top = round((resized[0] - self.size) / 2.0)  # CenterCrop's rounding
            left = round((resized[1] - self.size) / 2.0)
            return Augment(resized, top, left, self.size)
        # torchvision's RandomCrop, RandomHorizontalFlip and ColorJitter make_params, call for
        # call on torch's generator (asserted against them in test_device_decode), without the
        # tv_tensors they would wrap around a picture of this size.
        top = int(torch.randint(0, resized[0] - self.size + 1, size=())) if resized[0] > self.size else 0
        left = int(torch.randint(0, resized[1] - self.size + 1, size=())) if resized[1] > self.size else 0
        # RandomHorizontalFlip(p=0.5) flips unless torch.rand(1) >= 0.5.
        flip = self.horizontal_flip and bool(torch.rand(1) < 0.5)
        permutation = torch.randperm(4).tolist()
        jitter = self._jitter
        ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        order = tuple(int(i) for i in permutation if i < 3 and ranges[i] is not None)
        drawn = [1.0 if r is None else torch.empty(1).uniform_(r[0], r[1]).item() for r in ranges]
        factors = (drawn[0], drawn[1], drawn[2])
        return Augment(resized, top, left, self.size, flip, order, factors)

    def apply(self, image: Image.Image, augment: Augment) -> torch.Tensor:
        """The CPU path: an RGB image -> float32 [3, size, size], CLIP-normalised (Pillow's pixels,
        as ``vision_transform``)."""
        pixels = geometry(image, augment)
        for op in augment.order:
            factor = augment.factors[op]
            pixels = _PIL_JITTER[op](pixels, factor)
        tensor = F.to_dtype(F.to_image(pixels), torch.float32, scale=True)
        return F.normalize(tensor, mean=list(CLIP_MEAN), std=list(CLIP_STD)).as_subclass(torch.Tensor)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        height, width = image.height, image.width
        return self.apply(image, self.draw(height, width))


_PIL_JITTER = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)


def geometry(image: Image.Image, augment: Augment) -> Image.Image:
    """Resize, crop and flip a Pillow image (the worker-side part of a fallback)."""
    out = F.resize(image, list(augment.resized))
    out = F.crop(out, augment.top, augment.left, augment.size, augment.size)
    return F.horizontal_flip(out) if augment.flip else out


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to ``short`` (torchvision's rounding)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


# -- the worker's side of device decoding ---------------------------------------------------------

KIND_JPEG = 0
"""``image_data`` holds the JPEG file; the device decodes, orients, resizes, crops and flips it."""
KIND_PIXELS = 1
"""``image_data`` holds uint8 [3, size, size] already resized, cropped and flipped on the CPU."""


@dataclass(frozen=True)
class Encoded:
    """What a worker hands over for one image when the device decodes: bytes and parameters."""

    data: torch.Tensor
    """uint8, 1-D: the JPEG's bytes or the cropped pixels (see ``kind``)."""
    params: torch.Tensor
    """float64 [AUGMENT_WIDTH + 2]: kind, EXIF orientation, then ``Augment.to_tensor()``."""


def encode_for_device(data: bytes, transform: ImageTransform) -> Encoded:
    """Read an image's header, draw its parameters and hand over its bytes for device decode.

    A baseline JPEG (RGB or grayscale) is passed on undecoded; anything the device's JPEG
    decoder does not take (PNG, WebP, GIF, …, CMYK or progressive JPEG) is decoded here on the CPU
    and passed as pixels, resized, cropped and flipped — the device still jitters it with the rest.
    Parameters are drawn at the size a CPU decode would have (reduced-scale for large JPEGs,
    after EXIF orientation), so both paths crop the same part of the picture.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        header = Image.open(io.BytesIO(data))
    if device_decodable(header):
        need = train_resize(transform.size)
        header.draft("RGB", (need, need))  # only the size changes: nothing is decoded
        width, height = header.size
        orientation = _orientation(header)
        if orientation in _TRANSPOSED:
            width, height = height, width
        augment = transform.draw(height, width)
        with warnings.catch_warnings():
            # A view of the bytes, not a copy (gathering a worker's step copies it once, into
            # shared memory); torch warns that bytes are read-only, and nothing writes to it.
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.frombuffer(data, dtype=torch.uint8)
        return Encoded(payload, _params(KIND_JPEG, orientation, augment))
    image = decode_image(data, transform.size)
    augment = transform.draw(image.height, image.width)
    pixels = np.asarray(geometry(image, augment), dtype=np.uint8).transpose(2, 0, 1)
    payload = torch.from_numpy(np.ascontiguousarray(pixels).reshape(-1))
    return Encoded(payload, _params(KIND_PIXELS, 1, augment))


def device_decodable(header: Image.Image) -> bool:
    """Whether nvJPEG (torchvision's ``decode_jpeg`` on CUDA) takes this JPEG: baseline or
    extended sequential, RGB/YCbCr or grayscale. CMYK/YCCK and progressive files are decoded on
    the CPU instead, as are arithmetic-coded and lossless ones (Pillow opens none of those)."""
    return (
        header.format in ("JPEG", "MPO")
        and header.mode in ("RGB", "L")
        and not header.info.get("progressive")
        and not header.info.get("progression")
    )


def _orientation(header: Image.Image) -> int:
    with contextlib.suppress(*EXIF_ERRORS):
        value = header.getexif().get(ORIENTATION_TAG, 1)
        if isinstance(value, int) and 1 <= value <= 8:
            return value
    return 1


def _params(kind: int, orientation: int, augment: Augment) -> torch.Tensor:
    return torch.cat([torch.tensor([kind, orientation], dtype=torch.float64), augment.to_tensor()])
