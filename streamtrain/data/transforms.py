"""Per-sample transforms: image decoding and augmentation, log-mel audio features, caption dropout."""

from __future__ import annotations

import contextlib
import functools
import io
import random
import struct
import warnings
from collections.abc import Callable

import numpy as np
import soundfile
import torch
import torchaudio
from PIL import Image, ImageOps
from torchvision.transforms import v2

from streamtrain.config import AudioConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def train_resize(size: int) -> int:
    """Short side the train transform resizes to before its random ``size`` crop.

    ``size + 32`` at 224 (the usual 256 -> 224), scaled with the size below that: at 32 px a
    fixed +32 margin would crop a quarter of the image and cut most digits in half.
    """
    return size + min(32, round(size / 7))


_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
# Pillow raised these from malformed EXIF in past releases; a bad tag must not cost the sample.
EXIF_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error)


def decode_image(data: bytes, target_size: int | None = None) -> Image.Image:
    """Decode image bytes to an upright RGB image.

    EXIF orientation is applied (malformed EXIF is ignored). Alpha is composited onto white,
    16-bit and 32-bit grayscale are scaled to 8 bits by their bit depth, and palette, CMYK and
    bilevel images are converted to RGB.

    With ``target_size``, a JPEG much larger than needed is decoded at a reduced scale (1/2, 1/4
    or 1/8, by libjpeg's DCT scaling) whose short side is still at least
    ``train_resize(target_size)``. After the transforms resize to ``target_size`` the
    result equals that of a full decode within resize tolerance, for far less decoding work.
    """
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a few KB of PNG can ask
        # for gigabytes there, so such an image is refused (and the sample skipped) too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
    if target_size is not None and image.format in ("JPEG", "MPO"):
        need = train_resize(target_size)
        # Requesting (need, need) picks the largest scale keeping min(w, h) / scale >= need.
        image.draft("RGB", (need, need))
    image.load()  # pixel errors propagate; only the EXIF below is optional
    with contextlib.suppress(*EXIF_ERRORS):
        ImageOps.exif_transpose(image, in_place=True)
    return _to_rgb(image)


def upright_rgb(image: Image.Image) -> Image.Image:
    """An opened image as ``decode_image`` gives it: EXIF orientation applied, converted to RGB."""
    image = image.copy()
    with contextlib.suppress(*EXIF_ERRORS):
        ImageOps.exif_transpose(image, in_place=True)
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_rgb(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a single-channel integer or float image to 8 bits without clipping its range."""
    pixels = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        # Float images are conventionally in [0, 1]; anything else is taken as 8-bit values.
        scale = 255.0 if pixels.size and pixels.max() <= 1.0 else 1.0
    else:
        scale = 255.0 / (2 ** _bit_depth(image, pixels) - 1)
    gray = np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def _bit_depth(image: Image.Image, pixels: np.ndarray) -> int:
    if image.mode.startswith("I;16"):
        return 16
    if image.format == "PNG":
        return 16  # PNG has no 32-bit samples; older Pillow opened 16-bit grayscale as mode "I"
    if image.format == "TIFF":
        bits = image.tag_v2.get(258)  # BitsPerSample
        if bits:
            return int(bits[0] if isinstance(bits, tuple) else bits)
    peak = int(pixels.max()) if pixels.size else 0
    return next(bits for bits in (8, 16, 32) if peak < 2**bits)


def vision_transform(
    size: int, train: bool, color_jitter: float = 0.4, horizontal_flip: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """The image transform: RGB PIL image -> float32 tensor [3, size, size], CLIP-normalised.

    Train: resize the short side to ``train_resize(size)`` (``size + 32`` at 224), random ``size``
    crop, horizontal flip (unless ``horizontal_flip`` is False: text and digits change meaning
    mirrored), colour jitter (brightness, contrast, saturation).
    Eval: resize the short side to ``size``, centre crop.

    The random draws come from torch's global generator (torchvision draws no other way), so
    ``torch.manual_seed`` reproduces them; DataLoader workers each get a distinct seed from it.
    """
    if train:
        steps: list[torch.nn.Module] = [
            v2.Resize(train_resize(size)),
            v2.RandomCrop(size),
            *([v2.RandomHorizontalFlip()] if horizontal_flip else []),
            v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter),
        ]
    else:
        steps = [v2.Resize(size), v2.CenterCrop(size)]
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)


@functools.lru_cache(maxsize=8)
def _mel_spectrogram(config: AudioConfig) -> torchaudio.transforms.MelSpectrogram:
    # Building the transform computes the mel filterbank and window; done once per config.
    # Slaney scale and norm are Whisper's (librosa's) filterbank; torchaudio's HTK default leaves
    # 4 of 128 low bands with all-zero filters at n_fft=400.
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=config.sample_rate,
        n_fft=config.n_fft,
        hop_length=config.hop_length,
        n_mels=config.n_mels,
        mel_scale="slaney",
        norm="slaney",
    )


def log_mel(data: bytes, config: AudioConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode audio bytes (WAV, FLAC, OGG, MP3) to a log-mel spectrogram of fixed length.

    Channels are averaged to mono, resampled to ``config.sample_rate``, and the power mel
    spectrogram (Slaney filterbank, as Whisper's) becomes ``log(mel + 1e-6)``. The result has
    exactly ``config.max_frames`` frames: longer clips are cropped, shorter ones are padded with
    zeros (which is not the log of silence, about -13.8, so padded frames must be masked).

    Returns ``(mel [n_mels, max_frames] float32, mask [max_frames] bool)``, the mask True on
    frames computed from real audio.
    """
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if samples.shape[0] == 0:
        raise ValueError("audio has no samples")
    waveform = torch.from_numpy(samples.mean(axis=1))
    if rate != config.sample_rate:
        waveform = torchaudio.functional.resample(waveform, rate, config.sample_rate)
    waveform = waveform[: config.max_samples]  # crop before the STFT: no work on dropped audio
    with torch.no_grad():
        mel = torch.log(_mel_spectrogram(config)(waveform) + 1e-6)[:, : config.max_frames]
    frames = mel.shape[1]
    padded = torch.zeros(config.n_mels, config.max_frames, dtype=torch.float32)
    padded[:, :frames] = mel
    mask = torch.zeros(config.max_frames, dtype=torch.bool)
    mask[:frames] = True
    return padded, mask


def drop_text(text: str, prob: float, rng: random.Random) -> str:
    """Return ``""`` with probability ``prob``, else ``text`` (caption dropout)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {prob}")
    return "" if rng.random() < prob else text
