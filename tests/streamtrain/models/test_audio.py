from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import WhisperModel

from streamtrain.models.audio import (
    AudioEncoderConfig,
    WhisperAudioEncoder,
    build_audio_encoder,
    masked_mean,
)


def mels(batch: int, n_mels: int, frames: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, n_mels, frames, generator=torch.Generator().manual_seed(seed))


def lengths_mask(lengths: list[int], frames: int) -> torch.Tensor:
    return torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]


def test_masked_mean_ignores_masked_frames() -> None:
    frames = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [7.0], [9.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(masked_mean(frames, mask), torch.tensor([[2.0], [7.0]]))
    assert masked_mean(frames, torch.zeros(2, 3, dtype=torch.bool)).eq(0).all()


def test_small_conv_shapes() -> None:
    encoder = build_audio_encoder(AudioEncoderConfig(width=24, n_mels=16))
    assert encoder.output_dim == 24
    mask = lengths_mask([37, 20, 1], 37)
    assert encoder(mels(3, 16, 37, seed=0), mask).shape == (3, 24)
    frames, frame_mask = encoder.forward_frames(mels(3, 16, 37, seed=0), mask)
    assert frames.shape == (3, 10, 24)  # two stride-2 blocks: ceil(ceil(37 / 2) / 2)
    assert frame_mask.sum(dim=1).tolist() == [10, 5, 1]


@pytest.mark.parametrize("training", [False, True])
def test_small_conv_padding_never_changes_the_output(training: bool) -> None:
    encoder = build_audio_encoder(AudioEncoderConfig(width=24, n_mels=16)).train(training)
    lengths, frames = [13, 30, 21], 30
    mask = lengths_mask(lengths, frames)
    clips = mels(3, 16, frames, seed=1)
    noise = mels(3, 16, frames, seed=2) * 50
    other_padding = torch.where(mask[:, None, :], clips, noise)
    with torch.no_grad():
        pooled = encoder(clips, mask)
        torch.testing.assert_close(encoder(other_padding, mask), pooled)
        # Each clip alone, unpadded, gives what it gave inside the padded batch.
        for row, length in enumerate(lengths):
            alone = encoder(clips[row : row + 1, :, :length], torch.ones(1, length, dtype=torch.bool))
            torch.testing.assert_close(alone[0], pooled[row], atol=1e-5, rtol=1e-5)
        # Real frames do matter.
        changed = clips.clone()
        changed[0, :, :5] += 1.0
        assert not torch.allclose(encoder(changed, mask)[0], pooled[0])


def test_whisper_encoder_pads_and_pools_like_the_model(whisper_dir: Path) -> None:
    encoder = build_audio_encoder(AudioEncoderConfig(kind="huggingface", path=str(whisper_dir))).eval()
    assert isinstance(encoder, WhisperAudioEncoder)
    assert encoder.output_dim == 32
    assert encoder.input_frames == 100
    lengths, frames = [40, 17], 40
    mask = lengths_mask(lengths, frames)
    clips = mels(2, 128, frames, seed=3)
    reference = WhisperModel.from_pretrained(whisper_dir).get_encoder().eval()
    with torch.no_grad():
        pooled = encoder(clips, mask)
        padded = torch.nn.functional.pad(clips * mask[:, None, :], (0, 100 - frames))
        hidden = reference(input_features=padded).last_hidden_state
        torch.testing.assert_close(pooled[0], hidden[0, :20].mean(dim=0))
        torch.testing.assert_close(pooled[1], hidden[1, :9].mean(dim=0))  # frame 2t is valid for t < 9
        noisy = torch.where(mask[:, None, :], clips, mels(2, 128, frames, seed=4))
        torch.testing.assert_close(encoder(noisy, mask), pooled)
        # Longer inputs are cropped to Whisper's fixed 100 frames.
        long_clip = mels(1, 128, 160, seed=5)
        cropped = encoder(long_clip[..., :100], torch.ones(1, 100, dtype=torch.bool))
        torch.testing.assert_close(encoder(long_clip, torch.ones(1, 160, dtype=torch.bool)), cropped)


def test_whisper_mel_count_mismatch_is_a_value_error(whisper_dir: Path) -> None:
    with pytest.raises(ValueError, match="n_mels is 80 but the model"):
        build_audio_encoder(AudioEncoderConfig(kind="huggingface", path=str(whisper_dir), n_mels=80))


def test_unloadable_or_non_whisper_path_is_a_value_error(tmp_path: Path, clip_vision_dir: Path) -> None:
    with pytest.raises(ValueError, match="cannot load a Hugging Face model"):
        build_audio_encoder(AudioEncoderConfig(kind="huggingface", path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="is not a Whisper-style model"):
        build_audio_encoder(AudioEncoderConfig(kind="huggingface", path=str(clip_vision_dir)))
