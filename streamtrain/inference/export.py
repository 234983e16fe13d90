"""``streamtrain export``: a checkpoint's model as files that other code loads.

- alignment: ``vision.safetensors`` (the vision encoder), ``projectors.safetensors`` (both
  heads), ``text/`` (the text encoder in its own format: a SentenceTransformer folder or a CLIP
  text model with its tokenizer) and ``streamtrain_export.json`` (dims, image transform, the
  architecture); ``streamtrain.load_encoder`` reads it.
- vlm_qa: ``decoder/`` (the decoder with its adapters merged into plain weights, and the
  tokenizer: ``AutoModelForCausalLM.from_pretrained`` loads it), ``vision.safetensors``,
  ``projector.safetensors`` and ``streamtrain_export.json``; ``streamtrain.load_vlm`` reads it.

The folder is written beside its destination and renamed into place, so a failed export leaves
no half folder; an existing export there is replaced, any other existing content is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from streamtrain.data.transforms import CLIP_MEAN, CLIP_STD
from streamtrain.errors import UserError
from streamtrain.inference.encoder import EXPORT_FILE, FORMAT_VERSION, vision_spec
from streamtrain.inference.saved import (
    build_task,
    find_checkpoint,
    load_trained_model,
    saved_config,
    saved_step,
)
from streamtrain.models.alignment import AlignmentModel
from streamtrain.models.text import CLIPTextEncoder, SentenceTransformerTextEncoder
from streamtrain.models.vlm import VisionLanguageModel
from streamtrain.train import checkpoint


def export(source: str | Path, output: Path) -> Path:
    """Export the checkpoint ``source`` names (a run folder, step folder or best/) to ``output``."""
    directory = find_checkpoint(source, "RUN_OR_CHECKPOINT")
    config = saved_config(directory)
    _check_destination(output)
    staging = output.with_name(f".tmp-{output.name}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        task = build_task(config)
        model = load_trained_model(task, directory)
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "task": config.task,
            "checkpoint": str(directory),
            "step": saved_step(directory),
            "image_transform": _image_transform(config.data.image_size),
        }
        if isinstance(model, AlignmentModel):
            meta |= _export_alignment(model, config.model, staging)
        elif isinstance(model, VisionLanguageModel):
            meta |= _export_vlm(model, task, config, staging)
        else:
            raise UserError(f"export does not know the {config.task} task's model")
        (staging / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _check_destination(output: Path) -> None:
    if output.is_file() or (
        output.is_dir() and any(output.iterdir()) and not (output / EXPORT_FILE).exists()
    ):
        raise UserError(f"--output: {output} exists and is not a streamtrain export; name a new folder")


def _image_transform(size: int) -> dict[str, Any]:
    return {
        "size": size,
        "resize": "short side to size (bilinear, antialiased), then a centre crop of size x size",
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
    }


def _tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _export_alignment(model: AlignmentModel, model_config: Any, folder: Path) -> dict[str, Any]:
    if model.vision is None or model.vision_proj is None:
        raise UserError("export writes the vision encoder of an alignment run, and this run has none")
    save_file(_tensors(model.vision), str(folder / "vision.safetensors"))
    save_file(
        {**_tensors(model.vision_proj, "vision_proj."), **_tensors(model.text_proj, "text_proj.")},
        str(folder / "projectors.safetensors"),
    )
    text = model.text
    if isinstance(text, SentenceTransformerTextEncoder):
        text.backbone.save(str(folder / "text"))
    elif isinstance(text, CLIPTextEncoder):
        text.backbone.save_pretrained(folder / "text")
        text.tokenizer.save_pretrained(folder / "text")
    else:
        raise UserError(f"export does not know the text encoder {type(text).__name__}")
    dims = model_config.loss.mrl_dims
    return {
        "kind": "encoder",
        "mrl_dims": dims,
        "embed_dim": dims[-1],
        "projector_hidden_dim": model_config.projector_hidden_dim,
        "vision": vision_spec(model_config.vision, model.vision),
        "text": {"kind": model_config.text.kind, "max_tokens": model_config.text.max_tokens},
        "logit_scale": float(model.logit_scale().detach()),
    }


def _export_vlm(model: VisionLanguageModel, task: Any, config: Any, folder: Path) -> dict[str, Any]:
    from streamtrain.inference.merge import merged_decoder

    decoder = merged_decoder(model.decoder, config.model.decoder)
    decoder.save_pretrained(folder / "decoder")
    task.tokenizer.save_pretrained(folder / "decoder")
    # The vision encoder as an alignment checkpoint of it alone: the VLM task loads it as it
    # loaded the original (its config.yaml names the architecture).
    encoder = folder / "encoder"
    encoder.mkdir()
    shutil.copyfile(task.encoder_dir / checkpoint.CONFIG_FILE, encoder / checkpoint.CONFIG_FILE)
    save_file(_tensors(model.vision, "vision."), str(encoder / checkpoint.WEIGHTS_FILE))
    save_file(model.projector_state_dict(), str(folder / "projector.safetensors"))
    return {
        "kind": "vlm",
        "vision_tokens": model.vision_tokens,
        "projector_hidden_dim": _projector_hidden(model),
        "max_new_tokens": config.model.max_new_tokens,
        "config": config.to_dict(),
    }


def _projector_hidden(model: VisionLanguageModel) -> int | None:
    layers = model.projector.layers
    return None if len(layers) == 1 else int(layers[0].out_features)
