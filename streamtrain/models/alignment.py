"""Contrastive alignment model: media encoders and a text encoder, each projected into one space."""

from __future__ import annotations

from torch import Tensor, nn

from streamtrain.models.audio import AudioEncoder
from streamtrain.models.text import TextEncoder
from streamtrain.models.vision import VisionEncoder


class Projector(nn.Module):
    """Maps encoder outputs to the shared space: Linear, or Linear-GELU-Linear with ``hidden_dim``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        if hidden_dim is None:
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:
            self.layers = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class AlignmentModel(nn.Module):
    """Text plus image and/or audio encoders with projection heads into an ``embed_dim`` space.

    ``forward(batch)`` returns unnormalised ``text_emb`` and, when the batch has them,
    ``image_emb`` and ``audio_emb`` (all [B, embed_dim]), plus ``logit_scale`` from the
    ``logit_scale`` module (any module whose forward() returns a scalar tensor).
    """

    def __init__(
        self,
        text: TextEncoder,
        embed_dim: int,
        logit_scale: nn.Module,
        vision: VisionEncoder | None = None,
        audio: AudioEncoder | None = None,
        projector_hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        if vision is None and audio is None:
            raise ValueError("AlignmentModel needs a vision or an audio encoder (or both)")
        self.text = text
        self.vision = vision
        self.audio = audio
        self.logit_scale = logit_scale
        self.text_proj = Projector(text.output_dim, embed_dim, projector_hidden_dim)
        self.vision_proj = (
            None if vision is None else Projector(vision.output_dim, embed_dim, projector_hidden_dim)
        )
        self.audio_proj = (
            None if audio is None else Projector(audio.output_dim, embed_dim, projector_hidden_dim)
        )

    def encode_image(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> [B, embed_dim], unnormalised."""
        if self.vision is None or self.vision_proj is None:
            raise ValueError("this AlignmentModel has no vision encoder")
        return self.vision_proj(self.vision(images))

    def encode_audio(self, mel: Tensor, mel_mask: Tensor) -> Tensor:
        """mel [B, n_mels, T] with mel_mask [B, T] -> [B, embed_dim], unnormalised."""
        if self.audio is None or self.audio_proj is None:
            raise ValueError("this AlignmentModel has no audio encoder")
        return self.audio_proj(self.audio(mel, mel_mask))

    def encode_text(
        self,
        texts: list[str] | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Raw texts, or token ids from ``self.text.tokenizer`` -> [B, embed_dim], unnormalised."""
        return self.text_proj(self.text(texts=texts, input_ids=input_ids, attention_mask=attention_mask))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        outputs = {
            "text_emb": self.encode_text(
                texts=batch.get("texts"),
                input_ids=batch.get("text_input_ids"),
                attention_mask=batch.get("text_attention_mask"),
            ),
            "logit_scale": self.logit_scale(),
        }
        if "image" in batch:
            outputs["image_emb"] = self.encode_image(batch["image"])
        if "mel" in batch:
            outputs["audio_emb"] = self.encode_audio(batch["mel"], batch["mel_mask"])
        return outputs
