"""A trained VLM in use: ``load_vlm(DIR)`` on an export, or a VLM run's checkpoint, asked questions.

Questions are turned into token ids by the VLM task's own sample decoder and collate (an image
and a question with an empty answer, as a held-out sample would arrive), and answered by the
model's greedy generation, the same call evaluation makes: what ``ask`` answers is what
evaluation scored.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file

from streamtrain.errors import UserError
from streamtrain.inference.encoder import EXPORT_FILE, build_vision, default_device, read_export
from streamtrain.models.vlm import VisionLanguageModel

ImageInput = Image.Image | bytes | str | Path


@dataclass
class VisionQA:
    """A VLM with the sample decoder and collate that prompt it as in training."""

    model: VisionLanguageModel
    tokenizer: Any
    decode: Callable[[dict[str, Any], random.Random], dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    max_new_tokens: int
    device: torch.device

    @torch.no_grad()
    def ask(
        self, images: Sequence[ImageInput], question: str, max_new_tokens: int | None = None
    ) -> list[str]:
        """The greedy answer to ``question`` about each image (PIL images, encoded bytes or paths)."""
        from streamtrain.tasks.vlm_qa import answer_texts

        samples = [
            self.decode(_raw_sample(i, image, question), random.Random(0)) for i, image in enumerate(images)
        ]
        batch = self.collate(samples)
        generated = self.model.generate_answers(
            batch["image"].to(self.device),
            batch["input_ids"].to(self.device),
            batch["question_lengths"].to(self.device),
            max_new_tokens or self.max_new_tokens,
        )
        return answer_texts(self.tokenizer, generated)


def load_vlm(directory: str | Path, device: str | torch.device | None = None) -> VisionQA:
    """The VLM exported to ``directory`` by ``streamtrain export`` (on the GPU where there is one):
    a plain decoder with its adapters merged, the vision encoder and the projector."""
    from transformers import AutoModelForCausalLM

    from streamtrain.config import build_config
    from streamtrain.models.qwen import load_tokenizer
    from streamtrain.tasks import model_types
    from streamtrain.tasks.vlm_qa import qa_decoder

    directory = Path(directory)
    meta = read_export(directory, "vlm")
    target = torch.device(device) if device is not None else default_device()
    config = build_config(meta["config"], model_types(), source=str(directory / EXPORT_FILE))
    tokenizer = load_tokenizer(str(directory / "decoder"))
    decoder = AutoModelForCausalLM.from_pretrained(directory / "decoder")
    vision = build_vision(meta["vision"], load_file(directory / "vision.safetensors"))
    model = VisionLanguageModel(
        vision=vision,
        decoder=decoder,
        stop_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        vision_tokens=meta["vision_tokens"],
        projector_hidden_dim=meta["projector_hidden_dim"],
    )
    model.load_state_dict(load_file(directory / "projector.safetensors"), strict=False)
    model.to(target).eval()
    decode = qa_decoder(tokenizer, config.data, train=False)

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        from streamtrain.data.collate import collate_vlm

        return collate_vlm(samples, tokenizer.pad_token_id)

    return VisionQA(model, tokenizer, decode, collate, int(meta["max_new_tokens"]), target)


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
    return VisionQA(
        model, task.tokenizer, task.decoder(train=False), task.collate, config.model.max_new_tokens, device
    )


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
    """A held-out sample as a shard would hold it: the image and a question with no answer yet."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")  # lossless: decodes to the same pixels
        data = buffer.getvalue()
    elif isinstance(image, bytes):
        data = image
    else:
        data = Path(image).read_bytes()
    return {
        "__key__": f"ask-{index}",
        "png": data,
        "json": json.dumps({"question": question, "answer": ""}).encode(),
    }
