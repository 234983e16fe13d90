"""An exported alignment model in use: ``load_encoder(DIR)`` and its ``embed_images`` / ``embed_texts``.

The export (``streamtrain export`` of an alignment run) holds the vision encoder and both
projection heads in safetensors, the text encoder in its own format under ``text/``, and
``streamtrain_export.json``: the Matryoshka dims and the evaluation image transform. Embeddings
are L2-normalised at the dim asked for, as evaluation compares them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoConfig, AutoModel

from streamtrain.config.models import TextConfig, VisionConfig
from streamtrain.data.images import ImageTransform
from streamtrain.data.transforms import upright_rgb
from streamtrain.errors import UserError
from streamtrain.models.alignment import Projector
from streamtrain.models.text import build_text_encoder
from streamtrain.models.vision import HFVisionEncoder, VisionEncoder, build_vision_encoder

EXPORT_FILE = "streamtrain_export.json"
FORMAT_VERSION = 1


def read_export(directory: str | Path, kind: str) -> dict[str, Any]:
    """The metadata of the export in ``directory``; UserError unless it is an export of ``kind``."""
    path = Path(directory) / EXPORT_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{directory} is not a streamtrain export (no {EXPORT_FILE}); write one with "
            "streamtrain export RUN --output DIR"
        ) from None
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version")
        raise UserError(f"{path}: export format_version {version!r} is not {FORMAT_VERSION}")
    if meta.get("kind") != kind:
        loader = {"encoder": "streamtrain.load_encoder", "vlm": "streamtrain.load_vlm"}.get(meta.get("kind"))
        raise UserError(
            f"{directory} is an export of a {meta.get('task')} run ({meta.get('kind')}), not of the "
            f"{kind} this needs" + (f"; load it with {loader}" if loader else "")
        )
    return meta


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- the vision encoder: config + weights -----------------------------------------------------


def vision_spec(config: VisionConfig, encoder: VisionEncoder) -> dict[str, Any]:
    """What rebuilds ``encoder``'s architecture without its original source (weights come apart)."""
    spec: dict[str, Any] = {**dataclasses.asdict(config), "pretrained": False}
    if isinstance(encoder, HFVisionEncoder):
        model = encoder.model
        spec["hf_config"] = model.config.to_dict()
        spec["hf_tower"] = not hasattr(model, "save_pretrained")  # e.g. CLIPModel's vision_model
    spec["path"] = None
    return spec


def build_vision(spec: dict[str, Any], weights: dict[str, Tensor]) -> VisionEncoder:
    """The vision encoder ``vision_spec`` described, holding ``weights``."""
    if spec.get("kind") == "huggingface":
        hf = dict(spec["hf_config"])
        config = AutoConfig.for_model(hf.pop("model_type"), **hf)
        model = AutoModel.from_config(config)
        encoder: VisionEncoder = HFVisionEncoder(model.vision_model if spec.get("hf_tower") else model)
    else:
        known = {field.name for field in dataclasses.fields(VisionConfig)}
        encoder = build_vision_encoder(VisionConfig(**{k: v for k, v in spec.items() if k in known}))
    encoder.load_state_dict(weights)
    return encoder.eval()


# -- the public API ---------------------------------------------------------------------------


class AlignedEncoder:
    """Images and texts into the aligned space of an alignment run (see ``load_encoder``)."""

    def __init__(self, directory: Path, device: torch.device | None = None) -> None:
        meta = read_export(directory, "encoder")
        self.meta = meta
        self.dims: list[int] = list(meta["mrl_dims"])
        """The Matryoshka dims the model was trained at (any dim up to ``embed_dim`` works)."""
        self.embed_dim: int = int(meta["embed_dim"])
        self.device = device or default_device()
        heads = load_file(directory / "projectors.safetensors")
        hidden = meta.get("projector_hidden_dim")
        self.vision: VisionEncoder | None = None
        self.vision_proj: Projector | None = None
        if meta.get("vision") is not None:
            self.vision = build_vision(meta["vision"], load_file(directory / "vision.safetensors"))
            width = self.vision.output_dim
            self.vision_proj = _projector(heads, "vision_proj.", width, self.embed_dim, hidden)
            self.vision.to(self.device)
            self.vision_proj.to(self.device)
        text = meta["text"]
        self.text = build_text_encoder(
            TextConfig(kind=text["kind"], path=str(directory / "text"), max_tokens=text["max_tokens"])
        ).to(self.device)
        self.text_proj = _projector(heads, "text_proj.", self.text.output_dim, self.embed_dim, hidden)
        self.text_proj.to(self.device)
        self.max_tokens = int(text["max_tokens"])
        self.image_transform = ImageTransform(int(meta["image_transform"]["size"]), train=False)

    def _dim(self, dim: int | None) -> int:
        dim = self.embed_dim if dim is None else dim
        if not 1 <= dim <= self.embed_dim:
            raise ValueError(f"dim {dim} is not in 1..{self.embed_dim} (trained at {self.dims})")
        return dim

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image], dim: int | None = None, batch_size: int = 64) -> Tensor:
        """Unit-length embeddings [N, dim] of PIL images (EXIF-rotated, made RGB, then the
        evaluation transform: short side resized to the trained size, centre crop, CLIP normalisation)."""
        if self.vision is None or self.vision_proj is None:
            raise ValueError("this export has no vision encoder")
        dim = self._dim(dim)
        rows = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = torch.stack([self.image_transform(upright_rgb(image)) for image in chunk])
            rows.append(self.vision_proj(self.vision(pixels.to(self.device))).float())
        return _normalised(rows, dim, self.embed_dim)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], dim: int | None = None, batch_size: int = 64) -> Tensor:
        """Unit-length embeddings [N, dim] of texts."""
        dim = self._dim(dim)
        rows = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            if self.text.tokenizer is None:
                pooled = self.text(texts=chunk)
            else:
                tokens = self.text.tokenizer(
                    chunk, padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt"
                )
                pooled = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            rows.append(self.text_proj(pooled).float())
        return _normalised(rows, dim, self.embed_dim)


def load_encoder(directory: str | Path, device: str | torch.device | None = None) -> AlignedEncoder:
    """The aligned encoder exported to ``directory`` by ``streamtrain export`` (on the GPU where
    there is one, unless ``device`` says otherwise)."""
    return AlignedEncoder(Path(directory), torch.device(device) if device is not None else None)


def _projector(
    weights: dict[str, Tensor], prefix: str, in_dim: int, out_dim: int, hidden: int | None
) -> Projector:
    projector = Projector(in_dim, out_dim, hidden)
    projector.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
    return projector.eval()


def _normalised(rows: list[Tensor], dim: int, width: int) -> Tensor:
    embeddings = torch.cat(rows) if rows else torch.zeros((0, width))
    return F.normalize(embeddings[:, :dim], dim=-1).cpu()
