from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageOps

from streamtrain.config import AudioConfig
from streamtrain.data import transforms
from streamtrain.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    decode_image,
    drop_text,
    log_mel,
    vision_transform,
)
from tests import factories

UNUSUAL = factories.unusual_images()
BASE = factories.photo(40, 30, seed=7)  # the picture behind every UNUSUAL image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def mean_colour_gap(image: Image.Image, reference: Image.Image) -> float:
    return float(np.abs(pixels(image).mean((0, 1)) - pixels(reference).mean((0, 1))).max())


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return factories.encode(factories.photo(1600, 1200, seed=1), "JPEG", quality=90)


# --- decode_image ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UNUSUAL))
@pytest.mark.parametrize("target_size", [None, 224])
def test_every_unusual_image_decodes_to_rgb(name: str, target_size: int | None) -> None:
    image = decode_image(UNUSUAL[name], target_size)
    assert image.mode == "RGB"
    assert image.size == ((30, 40) if name == "exif_rotated_jpg" else (40, 30))


@pytest.mark.parametrize(
    ("name", "reference", "tolerance"),
    [
        ("cmyk_jpg", BASE, 2.0),
        ("palette_png", BASE, 2.0),
        ("gif", BASE, 2.0),
        ("grayscale_jpg", BASE.convert("L").convert("RGB"), 1.0),
        ("webp", BASE, 2.0),
        ("bmp", BASE, 0.0),
        ("tiff", BASE, 0.0),
        ("rgba_png", BASE, 0.0),  # fully opaque: compositing must not change it
    ],
)
def test_colours_survive_mode_conversion(name: str, reference: Image.Image, tolerance: float) -> None:
    assert mean_colour_gap(decode_image(UNUSUAL[name]), reference) <= tolerance


def test_exif_orientation_is_applied() -> None:
    image = decode_image(UNUSUAL["exif_rotated_jpg"])
    upright = BASE.transpose(Image.Transpose.ROTATE_270)  # orientation 6: rotate 90° clockwise
    upside_down = BASE.transpose(Image.Transpose.ROTATE_90)
    assert np.abs(pixels(image) - pixels(upright)).mean() < 8
    assert np.abs(pixels(image) - pixels(upside_down)).mean() > 30


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_malformed_exif_keeps_the_image() -> None:
    truncated_ifd = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00"
    image = decode_image(factories.encode(BASE, "JPEG", exif=truncated_ifd))
    assert image.mode == "RGB"
    assert image.size == (40, 30)


def test_exif_errors_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_exif(image: Image.Image, **kwargs: object) -> None:
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken_exif)
    image = decode_image(UNUSUAL["exif_rotated_jpg"])
    assert image.mode == "RGB"
    assert image.size == (40, 30)  # orientation unknown: left as stored


def _half_transparent(mode: str) -> bytes:
    """Left half fully transparent over black, right half opaque black."""
    rgba = Image.new("RGBA", (8, 4), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 4, 4))
    if mode == "P":
        palette = Image.new("P", (8, 4), 1)
        palette.putpalette([0, 0, 0] * 256)
        palette.paste(0, (0, 0, 4, 4))
        return factories.encode(palette, "PNG", transparency=0)
    return factories.encode(rgba.convert(mode), "PNG")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(mode: str) -> None:
    image = pixels(decode_image(_half_transparent(mode)))
    assert (image[:, :4] == 255).all()
    assert (image[:, 4:] == 0).all()


def test_partial_alpha_blends_with_white() -> None:
    image = decode_image(factories.encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG"))
    assert np.allclose(pixels(image), 127, atol=1)


def test_16bit_png_keeps_gradations() -> None:
    image = pixels(decode_image(UNUSUAL["png_16bit"]))
    stored = np.arange(40 * 30).reshape(30, 40) * 50  # what factories wrote, up to 59,950
    assert np.abs(image[..., 0] - stored / 257).max() <= 0.5 + 1e-9
    assert len(np.unique(image)) > 200
    assert image.max() < 255


def test_16bit_full_range_maps_to_full_8bit_range() -> None:
    ramp = Image.fromarray(np.linspace(0, 65535, 256 * 4).astype(np.uint16).reshape(4, 256))
    image = pixels(decode_image(factories.encode(ramp, "PNG")))
    assert image.min() == 0
    assert image.max() == 255
    assert len(np.unique(image)) == 256


def test_bilevel_image_is_black_and_white() -> None:
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.paste(1, (0, 0, 4, 8))
    image = pixels(decode_image(factories.encode(bilevel, "PNG")))
    assert (image[:, :4] == 255).all()
    assert (image[:, 4:] == 0).all()


def test_large_jpeg_decodes_at_reduced_resolution(big_jpeg: bytes) -> None:
    full = decode_image(big_jpeg)
    reduced = decode_image(big_jpeg, target_size=224)
    assert full.size == (1600, 1200)
    assert reduced.size == (400, 300)  # 1/4 scale: short side 300 >= 224 + 32
    evaluate = vision_transform(224, train=False)
    assert (evaluate(full) - evaluate(reduced)).abs().mean() < 0.05


@pytest.mark.parametrize(
    ("width", "height", "target_size"), [(1000, 800, 150), (800, 1000, 100), (1200, 900, 64), (300, 280, 224)]
)
def test_reduced_decode_never_goes_below_the_train_resize(width: int, height: int, target_size: int) -> None:
    data = factories.jpeg(width, height, seed=2)
    image = decode_image(data, target_size)
    assert min(image.size) >= target_size + 32
    assert min(image.size) < 2 * (target_size + 32)  # and it did reduce as far as allowed


def test_reduced_decode_of_rotated_jpeg_is_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = factories.encode(factories.photo(1200, 600, seed=3), "JPEG", exif=exif)
    assert decode_image(data, target_size=96).size == (150, 300)


def test_png_is_not_reduced() -> None:
    data = factories.encode(factories.photo(600, 400, seed=4), "PNG")
    assert decode_image(data, target_size=64).size == (600, 400)


# --- vision_transform ------------------------------------------------------------------------


def test_eval_transform_shape_and_normalisation() -> None:
    evaluate = vision_transform(32, train=False)
    out = evaluate(factories.photo(80, 50))
    assert type(out) is torch.Tensor
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32

    white = evaluate(Image.new("RGB", (40, 40), (255, 255, 255)))
    expected = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    assert torch.allclose(white.mean((1, 2)), torch.tensor(expected), atol=1e-5)


def test_eval_transform_centre_crops() -> None:
    wide = Image.new("RGB", (90, 30), (0, 0, 0))
    wide.paste((255, 255, 255), (30, 0, 60, 30))  # only the centre third is white
    out = vision_transform(30, train=False)(wide)
    assert torch.allclose(out.amin((1, 2)), out.amax((1, 2)))
    assert out[0, 0, 0] > 1.5


def test_train_transform_shape_and_normalisation() -> None:
    train = vision_transform(64, train=True)
    out = train(factories.photo(200, 100))
    assert type(out) is torch.Tensor
    assert out.shape == (3, 64, 64)
    assert out.dtype == torch.float32

    grey = tuple(round(255 * m) for m in CLIP_MEAN)
    centred = vision_transform(64, train=True, color_jitter=0.0)(Image.new("RGB", (90, 90), grey))
    assert centred.abs().max() < 0.01


def test_train_transform_is_reproducible_under_manual_seed() -> None:
    train = vision_transform(48, train=True)
    image = factories.photo(120, 90)
    torch.manual_seed(123)
    first = train(image)
    torch.manual_seed(123)
    again = train(image)
    torch.manual_seed(124)
    other = train(image)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_eval_transform_is_deterministic() -> None:
    evaluate = vision_transform(48, train=False)
    image = factories.photo(120, 90)
    torch.manual_seed(1)
    first = evaluate(image)
    torch.manual_seed(2)
    assert torch.equal(first, evaluate(image))


# --- log_mel -----------------------------------------------------------------------------------


def _frames_at_16k(samples: int, rate: int) -> int:
    return math.ceil(samples * 16000 / rate) // 160 + 1


def _wav_from_array(samples: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples.astype(np.float32), rate, format="WAV", subtype="FLOAT")
    return out.getvalue()


def _tone(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
    return 0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)


def _peak_band(mel: torch.Tensor, mask: torch.Tensor) -> int:
    return int(mel[:, mask].mean(1).argmax())


def test_short_clip_is_padded_and_masked() -> None:
    mel, mask = log_mel(factories.wav(seconds=0.25, rate=22050), AudioConfig())
    assert mel.shape == (128, 1000)
    assert mel.dtype == torch.float32
    assert mask.shape == (1000,)
    assert mask.dtype == torch.bool
    real = _frames_at_16k(int(0.25 * 22050), 22050)
    assert real == 26
    assert mask[:real].all()
    assert not mask[real:].any()
    assert (mel[:, real:] == 0).all()
    assert torch.isfinite(mel).all()
    assert (mel[:, :real] < -1).any()  # log scale: quiet bands are far below zero


def test_every_mel_band_sees_energy() -> None:
    # factories.wav has broadband noise: an all-zero filter would leave its band at log(1e-6).
    mel, mask = log_mel(factories.wav(seconds=0.25, rate=16000), AudioConfig())
    assert (mel[:, mask].mean(1) > math.log(1e-6) + 3).all()


def test_long_clip_is_cropped_to_its_start() -> None:
    data = _wav_from_array(np.concatenate([_tone(1.0, 16000, 440), _tone(2.0, 16000, 2000)]), 16000)
    one_second = AudioConfig(max_seconds=1.0)
    mel, mask = log_mel(data, one_second)
    assert mel.shape == (128, 100)
    assert mask.all()
    whole, whole_mask = log_mel(data, AudioConfig(max_seconds=4.0))
    assert int(whole_mask.sum()) == 301
    # Frames whose window lies inside the first second are identical; the 2 kHz part is gone.
    assert torch.allclose(mel[:, :97], whole[:, :97], atol=1e-4)
    assert _peak_band(mel, mask) == _peak_band(whole[:, :90], whole_mask[:90])
    assert _peak_band(mel, mask) != _peak_band(whole[:, 150:], whole_mask[150:])


def test_stereo_is_mixed_to_mono() -> None:
    tone = _tone(0.5, 16000)
    config = AudioConfig(max_seconds=1.0)
    mono, mono_mask = log_mel(_wav_from_array(tone, 16000), config)
    same, _ = log_mel(_wav_from_array(np.stack([tone, tone], 1), 16000), config)
    cancelled, mask = log_mel(_wav_from_array(np.stack([tone, -tone], 1), 16000), config)
    assert torch.allclose(mono, same, atol=1e-4)
    assert torch.equal(mask, mono_mask)
    assert torch.allclose(cancelled[:, mask], torch.tensor(math.log(1e-6)), atol=1e-3)


@pytest.mark.parametrize(("rate", "seconds"), [(22050, 0.25), (44100, 0.5), (8000, 0.3)])
def test_input_is_resampled_to_16k(rate: int, seconds: float) -> None:
    config = AudioConfig(max_seconds=1.0)
    mel, mask = log_mel(_wav_from_array(_tone(seconds, rate), rate), config)
    reference, reference_mask = log_mel(_wav_from_array(_tone(seconds, 16000), 16000), config)
    assert int(mask.sum()) == _frames_at_16k(int(seconds * rate), rate)
    # Unresampled, a 440 Hz tone read as 16 kHz audio would land in another mel band.
    assert _peak_band(mel, mask) == _peak_band(reference, reference_mask)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "MP3"])
def test_compressed_formats_decode(fmt: str) -> None:
    config = AudioConfig(max_seconds=1.0)
    mel, mask = log_mel(factories.wav(seconds=0.25, rate=22050, fmt=fmt), config)
    wav_mel, wav_mask = log_mel(factories.wav(seconds=0.25, rate=22050), config)
    assert mel.shape == (128, 100)
    assert abs(int(mask.sum()) - int(wav_mask.sum())) <= 12  # MP3 adds encoder padding
    assert _peak_band(mel, mask) == _peak_band(wav_mel, wav_mask)


def test_mel_transform_is_built_once_per_config() -> None:
    config = AudioConfig(n_mels=40, max_seconds=0.5)
    log_mel(factories.wav(), config)
    built = transforms._mel_spectrogram(config)
    log_mel(factories.wav(seed=1), AudioConfig(n_mels=40, max_seconds=0.5))
    assert transforms._mel_spectrogram(AudioConfig(n_mels=40, max_seconds=0.5)) is built
    assert transforms._mel_spectrogram(AudioConfig(n_mels=64, max_seconds=0.5)) is not built


def test_custom_config_shapes() -> None:
    mel, mask = log_mel(factories.wav(seconds=0.1), AudioConfig(n_mels=40, hop_length=320, max_seconds=2.0))
    assert mel.shape == (40, 100)
    assert mask.shape == (100,)


def test_empty_audio_is_an_error() -> None:
    with pytest.raises(ValueError, match="no samples"):
        log_mel(_wav_from_array(np.zeros(0), 16000), AudioConfig())


# --- drop_text -----------------------------------------------------------------------------------


def test_drop_text_rate_matches_probability() -> None:
    rng = random.Random(0)
    kept = [drop_text("a caption", 0.3, rng) for _ in range(20_000)]
    assert set(kept) == {"", "a caption"}
    assert abs(kept.count("") / len(kept) - 0.3) < 0.015


def test_drop_text_extremes_and_reproducibility() -> None:
    rng = random.Random(1)
    assert all(drop_text("x", 0.0, rng) == "x" for _ in range(1000))
    assert all(drop_text("x", 1.0, rng) == "" for _ in range(1000))
    seeded = random.Random(7)
    first = [drop_text("x", 0.5, seeded) for _ in range(50)]
    seeded = random.Random(7)
    again = [drop_text("x", 0.5, seeded) for _ in range(50)]
    assert first == again
    assert set(first) == {"", "x"}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_text("x", 1.5, rng)
