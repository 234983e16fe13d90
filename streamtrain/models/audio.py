"""Audio encoders: log-mel frames [B, n_mels, T] with a frame mask -> one embedding per clip.

Padding frames never influence the result: they are zeroed before the backbone (so their
content is irrelevant) and left out of the masked mean over time.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, PreTrainedModel

from streamtrain.config.models import AudioEncoderConfig
from streamtrain.errors import UserError


def masked_mean(frames: Tensor, mask: Tensor) -> Tensor:
    """Mean of frames [B, T, D] over the positions where mask [B, T] is True; all-padding rows give 0."""
    weights = mask.to(frames.dtype).unsqueeze(-1)
    return (frames * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class AudioEncoder(nn.Module):
    """mel [B, n_mels, T] + mel_mask [B, T] (True on real frames) -> pooled [B, output_dim]."""

    output_dim: int

    def encode_frames(self, mel: Tensor, mel_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone frames [B, T', output_dim] and their mask [B, T'], for zero-padded ``mel``."""
        raise NotImplementedError

    def forward_frames(self, mel: Tensor, mel_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frame features [B, T', output_dim] and their validity mask [B, T'] (bool)."""
        mel_mask = mel_mask.bool()
        mel = mel.masked_fill(~mel_mask.unsqueeze(1), 0.0)
        return self.encode_frames(mel, mel_mask)

    def forward(self, mel: Tensor, mel_mask: Tensor) -> Tensor:
        frames, frame_mask = self.forward_frames(mel, mel_mask)
        return masked_mean(frames, frame_mask)


class _ConvBlock(nn.Module):
    """Conv1d over time, LayerNorm over channels per frame, GELU.

    The norm is per frame (not BatchNorm/GroupNorm over time) so that padding frames cannot
    leak into the statistics of real ones.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        # Zeroed padding equals the conv's own zero padding, so a padded clip gives the same
        # values on its real frames as the same clip unpadded.
        x = self.conv(x * mask.unsqueeze(1).to(x.dtype))
        # Output frame t is centred on input frame stride * t.
        mask = mask[:, :: self.stride]
        x = F.gelu(self.norm(x.transpose(1, 2))).transpose(1, 2)
        return x, mask


class SmallConvAudioEncoder(AudioEncoder):
    """Four 1-D conv blocks over time (n_mels input channels), two of them stride 2."""

    def __init__(self, n_mels: int = 128, width: int = 128) -> None:
        super().__init__()
        if width < 1 or n_mels < 1:
            raise UserError(f"AudioEncoderConfig: width and n_mels must be positive, got {width}, {n_mels}")
        self.blocks = nn.ModuleList(
            [
                _ConvBlock(n_mels, width, 1),
                _ConvBlock(width, width, 2),
                _ConvBlock(width, width, 2),
                _ConvBlock(width, width, 1),
            ]
        )
        self.output_dim = width

    def encode_frames(self, mel: Tensor, mel_mask: Tensor) -> tuple[Tensor, Tensor]:
        x, mask = mel, mel_mask
        for block in self.blocks:
            x, mask = block(x, mask)
        return x.transpose(1, 2), mask


class WhisperAudioEncoder(AudioEncoder):
    """The encoder of a Whisper model; frames are padded with zeros or cropped to its fixed input length.

    Whisper's encoder takes no attention mask and attends over all its positions, as in its
    training, so only the pooling is masked; zeroing padding still makes its content irrelevant.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        config = encoder.config
        # Whisper's two stem convs reduce time by the product of their strides (2 in released models).
        self.time_stride = encoder.conv1.stride[0] * encoder.conv2.stride[0]
        self.input_frames = config.max_source_positions * self.time_stride
        self.n_mels = int(config.num_mel_bins)
        self.output_dim = int(config.d_model)

    def encode_frames(self, mel: Tensor, mel_mask: Tensor) -> tuple[Tensor, Tensor]:
        if mel.shape[1] != self.n_mels:
            raise ValueError(f"Whisper encoder expects {self.n_mels} mel bins, got {mel.shape[1]}")
        frames = mel.shape[-1]
        if frames < self.input_frames:
            mel = F.pad(mel, (0, self.input_frames - frames))
            mel_mask = F.pad(mel_mask, (0, self.input_frames - frames), value=False)
        else:
            mel, mel_mask = mel[..., : self.input_frames], mel_mask[:, : self.input_frames]
        hidden = self.encoder(input_features=mel).last_hidden_state
        return hidden, mel_mask[:, :: self.time_stride]


def load_whisper_encoder(path: str) -> nn.Module:
    """The encoder of the Whisper model at ``path`` (WhisperModel or WhisperForConditionalGeneration)."""
    try:
        model: PreTrainedModel = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(
            f"AudioEncoderConfig.path: cannot load a Hugging Face model from {path!r}: {error}"
        ) from error
    config = model.config
    if not (hasattr(config, "max_source_positions") and hasattr(config, "num_mel_bins")):
        raise UserError(
            f"AudioEncoderConfig.path: {type(model).__name__} at {path!r} is not a Whisper-style "
            "model (its config lacks max_source_positions / num_mel_bins)"
        )
    return model.get_encoder()


def build_audio_encoder(config: AudioEncoderConfig) -> AudioEncoder:
    """The audio encoder described by ``config``; ValueError for a bad kind, path or mel count."""
    if config.kind == "small_conv":
        return SmallConvAudioEncoder(config.n_mels, config.width)
    if config.kind == "huggingface":
        if config.path is None:
            raise UserError("AudioEncoderConfig.path: required for kind 'huggingface'")
        encoder = WhisperAudioEncoder(load_whisper_encoder(config.path))
        if encoder.n_mels != config.n_mels:
            raise UserError(
                f"AudioEncoderConfig.n_mels is {config.n_mels} but the model at {config.path!r} "
                f"takes {encoder.n_mels} mel bins"
            )
        return encoder
    raise UserError(f"AudioEncoderConfig.kind: unknown {config.kind!r}; allowed: 'small_conv', 'huggingface'")
