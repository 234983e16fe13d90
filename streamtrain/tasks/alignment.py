"""Alignment phase: vision and/or audio encoders aligned to a text encoder.

Loss: symmetric InfoNCE over the global batch (negatives from every rank), in Matryoshka form
over ``loss.mrl_dims``. Evaluation: Recall@1/5/10 media->text and text->media over the held-out
set at every Matryoshka dim, where every sample whose caption text equals the query's counts as
a correct match (see streamtrain.metrics for ties and the chance level).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from streamtrain.config import RunConfig
from streamtrain.config.models import AlignmentModelConfig
from streamtrain.data.collate import collate_alignment
from streamtrain.data.decoders import CaptionDecoder
from streamtrain.distributed import gather_objects, gather_variable
from streamtrain.errors import UserError
from streamtrain.losses import LogitScale, matryoshka_info_nce, pick_mrl_dim
from streamtrain.metrics import retrieval_metrics
from streamtrain.models.alignment import AlignmentModel
from streamtrain.models.audio import build_audio_encoder
from streamtrain.models.text import build_text_encoder
from streamtrain.models.vision import build_vision_encoder
from streamtrain.train.task import Task

KS = (1, 5, 10)


class AlignmentTask(Task):
    """Contrastive + Matryoshka alignment of media encoders to a text encoder."""

    ModelConfig = AlignmentModelConfig

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.model_config: AlignmentModelConfig = config.model
        if self.model_config.audio is not None and config.data.audio is None:
            raise UserError("model.audio is set but data.audio is not: set data.audio to decode audio")
        self.media = "image" if self.model_config.vision is not None else "audio"
        self.dims = self.model_config.loss.mrl_dims
        self._text_tokenizer: Any = None

    def best_metric(self) -> tuple[str, Literal["max", "min"]]:
        """Media-to-text Recall@1 at the full embedding width."""
        return f"{self.media}_to_text/R@1/dim{self.dims[-1]}", "max"

    def build_model(self) -> nn.Module:
        model_config, loss = self.model_config, self.model_config.loss
        text = build_text_encoder(model_config.text)
        self._text_tokenizer = text.tokenizer
        return AlignmentModel(
            text=text,
            embed_dim=self.dims[-1],
            logit_scale=LogitScale(
                loss.temperature,
                learnable=loss.temperature_mode == "learnable",
                min_temperature=loss.min_temperature,
            ),
            vision=build_vision_encoder(model_config.vision) if model_config.vision else None,
            audio=build_audio_encoder(model_config.audio) if model_config.audio else None,
            projector_hidden_dim=model_config.projector_hidden_dim,
        )

    def decoder(self, train: bool, on_device: bool = False) -> CaptionDecoder:
        data = self.config.data
        return CaptionDecoder(
            image_size=data.image_size,
            train=train,
            text_dropout_prob=data.text_dropout_prob,
            horizontal_flip=data.horizontal_flip,
            audio=data.audio if self.model_config.audio is not None else None,
            on_device=on_device,
        )

    def collate(self, samples: list[Any]) -> dict[str, Any]:
        return collate_alignment(samples, self._text_tokenizer, self.model_config.text.max_tokens)

    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch)
        scale = out["logit_scale"]
        single = (
            pick_mrl_dim(self.dims, self.config.train.seed, step)
            if self.model_config.loss.sample_single_mrl_dim
            else None
        )
        total = torch.zeros((), device=scale.device)
        extras: dict[str, float] = {"temperature": 1.0 / float(scale.detach())}
        for media in ("image", "audio"):
            if f"{media}_emb" not in out:
                continue
            loss, per_dim = matryoshka_info_nce(
                out[f"{media}_emb"], out["text_emb"], scale, self.dims, single
            )
            total = total + loss
            extras.update({f"loss_{media}/dim{dim}": value for dim, value in per_dim.items()})
        return total, extras

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        media_rows: dict[str, list[torch.Tensor]] = {"image": [], "audio": []}
        text_rows: list[torch.Tensor] = []
        texts: list[str] = []
        for batch in batches:
            out = model(batch)
            for media, rows in media_rows.items():
                if f"{media}_emb" in out:
                    rows.append(out[f"{media}_emb"].float())
            text_rows.append(out["text_emb"].float())
            texts.extend(batch.get("texts") or self._decode_texts(batch))
        device = next(model.parameters()).device
        width = self.dims[-1]
        all_texts = gather_objects(texts)
        if not all_texts:
            raise UserError("the held-out set gave no samples to evaluate")
        text_emb = gather_variable(_cat(text_rows, width, device))
        metrics: dict[str, float] = {"eval/samples": float(len(all_texts))}
        for media, rows in media_rows.items():
            if rows or (media == self.media):
                media_emb = gather_variable(_cat(rows, width, device))
                if len(media_emb) == len(all_texts):
                    metrics |= retrieval_metrics(
                        media_emb.cpu(), text_emb.cpu(), all_texts, self.dims, media, KS
                    )
        return metrics

    def _decode_texts(self, batch: dict[str, Any]) -> list[str]:
        return self._text_tokenizer.batch_decode(batch["text_input_ids"], skip_special_tokens=True)

    def summary(self, metrics: dict[str, float]) -> str:
        dim = self.dims[-1]
        parts = []
        for direction in (f"{self.media}_to_text", f"text_to_{self.media}"):
            recalls = "/".join(f"{metrics.get(f'{direction}/R@{k}/dim{dim}', float('nan')):.3f}" for k in KS)
            chance = "/".join(f"{metrics.get(f'{direction}/chance@{k}', float('nan')):.3f}" for k in KS)
            parts.append(f"{direction} R@1/5/10 {recalls} (chance {chance})")
        return f"held-out ({int(metrics.get('eval/samples', 0))} samples, dim {dim}): " + "; ".join(parts)


def _cat(rows: list[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
    return torch.cat(rows) if rows else torch.zeros((0, width), device=device)
