"""A trained VLM in use: ``load_vlm(DIR)`` on an export, or a VLM run's checkpoint, asked questions.

Both are driven by the VLM task itself (``VLMTask``): its sample decoder and collate turn an image
and a question (with an empty answer, as a held-out sample arrives) into a batch, the model's
greedy generation answers it with the call evaluation makes, and the task decodes the answer. So
what ``ask`` answers is what evaluation scored, and a change to how the task prompts follows here.
An export is read as the task reads a run: its ``encoder/`` is an alignment checkpoint of the
vision encoder alone, its ``decoder/`` a plain causal LM (trained fully, as far as the task knows).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file

from streamtrain.errors import UserError
from streamtrain.inference.encoder import EXPORT_FILE, default_device, read_export
from streamtrain.models.vlm import VisionLanguageModel

ImageInput = Image.Image | bytes | str | Path


@dataclass
class VisionQA:
    """A VLM and the task that prompts it as in training and evaluation."""

    task: Any
    """The ``VLMTask`` of the run (or of the export)."""
    model: VisionLanguageModel
    max_new_tokens: int
    device: torch.device

    @torch.no_grad()
    def ask(
        self, images: Sequence[ImageInput], question: str, max_new_tokens: int | None = None
    ) -> list[str]:
        """The greedy answer to ``question`` about each image (PIL images, encoded bytes or paths)."""
        if not images:
            return []
        decode = self.task.decoder(train=False)
        raw = [_raw_sample(index, image, question) for index, image in enumerate(images)]
        batch = self.task.collate([decode(sample, random.Random(0)) for sample in raw])
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        # Evaluation's generation (VLMTask.evaluate): one turn per image, prompted as in training.
        generated, _, _ = self.model.answer_turns(batch, max_new_tokens or self.max_new_tokens)
        return self.task.answers(generated)


def load_vlm(directory: str | Path, device: str | torch.device | None = None) -> VisionQA:
    """The VLM exported to ``directory`` by ``streamtrain export`` (on the GPU where there is one):
    its decoder with the adapters merged, its vision encoder and projector."""
    from streamtrain.config import build_config
    from streamtrain.config.models import MODEL_TYPES
    from streamtrain.tasks.vlm_qa import VLMTask

    directory = Path(directory)
    meta = read_export(directory, "vlm")
    raw = dict(meta["config"])
    raw["model"] = {
        **raw["model"],
        "encoder_checkpoint": str(directory / "encoder"),
        "decoder": str(directory / "decoder"),
        "tokenizer": None,
        "mode": "full",  # a plain model: nothing quantized, no adapters
        "base_dtype": "auto",
        "gradient_checkpointing": False,
    }
    config = build_config(raw, MODEL_TYPES, source=str(directory / EXPORT_FILE))
    task = VLMTask(config)
    set_seed(config.train.seed)
    model = task.build_model()
    model.load_state_dict(load_file(directory / "projector.safetensors"), strict=False)
    target = torch.device(device) if device is not None else default_device()
    task.place_model(model, target)
    return VisionQA(task, model.eval(), config.model.max_new_tokens, target)


def vlm_from_checkpoint(source: str | Path) -> VisionQA:
    """The VLM of a run folder or checkpoint, as training built it (adapters unmerged)."""
    from streamtrain.inference.saved import build_task, find_checkpoint, load_trained_model, saved_config

    directory = find_checkpoint(source, "RUN_OR_EXPORT")
    config = saved_config(directory)
    if config.task != "vlm_qa":
        raise UserError(f"{directory} is a checkpoint of a {config.task} run; ask needs a VLM (vlm_qa) run")
    task = build_task(config)
    model = load_trained_model(task, directory)
    device = default_device()
    task.place_model(model, device)
    return VisionQA(task, model, config.model.max_new_tokens, device)


def ask(
    source: str | Path, image_paths: list[str], question: str, max_new_tokens: int | None = None
) -> list[str]:
    """``streamtrain ask``: the answer about each image, from an export or a run's checkpoint."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: {max_new_tokens} must be >= 1")
    images = [_image_bytes(path) for path in image_paths]
    vlm = load_vlm(source) if (Path(source) / EXPORT_FILE).exists() else vlm_from_checkpoint(source)
    return vlm.ask(images, question, max_new_tokens)


def _image_bytes(path: str) -> bytes:
    """The file's bytes, checked to decode as an image (UserError in one line when not)."""
    from streamtrain.data.transforms import decode_image

    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"--image {path}: {error.strerror or error}") from None
    try:
        decode_image(data)
    except UnidentifiedImageError:
        raise UserError(f"--image {path}: not an image (Pillow cannot identify its format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"--image {path}: the image does not decode ({error})") from None
    return data


def _raw_sample(index: int, image: ImageInput, question: str) -> dict[str, Any]:
    """A held-out sample as a shard holds one: the image and a question with no answer yet."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")  # lossless: decodes to the same pixels
        data = buffer.getvalue()
    elif isinstance(image, bytes):
        data = image
    else:
        data = Path(image).read_bytes()
    text = json.dumps({"question": question, "answer": ""}).encode()
    return {"__key__": f"ask-{index}", "png": data, "json": text}
