"""VLM QA fine-tuning: a frozen aligned image encoder feeding a causal LM trained with (Q)LoRA or fully.

The encoder comes from an alignment checkpoint (its ``vision.*`` weights and the ``model.vision``
section of its config.yaml; the text encoder is not needed). Its grid tokens go through a
trainable projector into the decoder, ahead of the question in the tokenizer's chat template.
Loss: cross-entropy over the answer and its end token. Evaluation: perplexity (exp of the mean
answer-token loss), and exact match, BLEU and ROUGE-L of greedy answers (see streamtrain.qa_metrics).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from torch import nn

from streamtrain.config import RunConfig
from streamtrain.config.models import VLMModelConfig
from streamtrain.data.collate import IGNORE_INDEX, collate_vlm
from streamtrain.data.decoders import QADecoder
from streamtrain.data.transforms import chat_prompt_ids
from streamtrain.distributed import all_reduce_sum, gather_objects
from streamtrain.errors import UserError
from streamtrain.models.decoder import LoraSettings, load_decoder, resolve_dtype
from streamtrain.models.qwen import load_tokenizer
from streamtrain.models.vision import VisionConfig, VisionEncoder, build_vision_encoder
from streamtrain.models.vlm import VisionLanguageModel
from streamtrain.qa_metrics import answer_metrics
from streamtrain.train import checkpoint
from streamtrain.train.task import Task

logger = logging.getLogger(__name__)
ALIGNMENT_HINT = "train the encoder first: ./launch.sh alignment (it writes runs/alignment/best)"


def find_alignment_checkpoint(path: str) -> Path:
    """The checkpoint folder ``path`` names: itself, or a run's best/, else its newest complete step."""
    found = checkpoint.find_saved_model(path)
    if found is None:
        raise UserError(
            f"model.encoder_checkpoint: {path} holds no alignment checkpoint "
            f"({checkpoint.describe_saved_model()}); {ALIGNMENT_HINT}"
        )
    return found


def check_model_source(key: str, source: str, markers: tuple[str, ...]) -> None:
    """UserError naming ``key`` when ``source`` is a local path that is missing or holds none of ``markers``.

    A source that is not a path on disk is taken as a hub name (loaded from the local Hugging Face
    cache: nothing is downloaded at run time)."""
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1
    if not looks_local:
        return
    if not path.is_dir():
        raise UserError(
            f"{key}: {source} does not exist (give a model directory, or a hub name such as "
            "Qwen/Qwen2.5-0.5B-Instruct that is in the local Hugging Face cache)"
        )
    if not any((path / marker).is_file() for marker in markers):
        raise UserError(
            f"{key}: {source} holds no {' or '.join(markers)}; is it a Hugging Face model directory?"
        )


def aligned_config(directory: Path) -> dict[str, Any]:
    """The saved config of the alignment checkpoint in ``directory``; UserError if it is none."""
    try:
        saved = checkpoint.read_saved_config(directory)
    except ValueError as error:
        raise UserError(f"model.encoder_checkpoint: {error}") from None
    if saved.get("task") != "alignment" or not (saved.get("model") or {}).get("vision"):
        raise UserError(
            f"model.encoder_checkpoint: {directory} is not an alignment checkpoint with a vision encoder"
        )
    return saved


def load_aligned_vision(directory: Path) -> tuple[VisionEncoder, dict[str, Any]]:
    """The vision encoder of the alignment checkpoint in ``directory``, and that run's data section."""
    saved = aligned_config(directory)
    section = saved["model"]["vision"]
    known = {item.name for item in dataclasses.fields(VisionConfig)}
    config = VisionConfig(**{key: value for key, value in section.items() if key in known})
    if config.kind == "torchvision":  # the checkpoint's weights replace any initial ones: fetch none
        config = dataclasses.replace(config, pretrained=False, path=None)
    encoder = build_vision_encoder(config)
    weights = checkpoint.load_saved_weights(directory)
    state = {
        key.removeprefix("vision."): value for key, value in weights.items() if key.startswith("vision.")
    }
    encoder.load_state_dict(state)
    return encoder, saved.get("data") or {}


class VLMTask(Task):
    """Visual question answering on a frozen aligned encoder with a (Q)LoRA or fully trained decoder."""

    ModelConfig = VLMModelConfig

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.model_config: VLMModelConfig = config.model
        self.encoder_dir = find_alignment_checkpoint(self.model_config.encoder_checkpoint)
        aligned_config(self.encoder_dir)  # fail on a wrong checkpoint before loading anything
        check_model_source("model.decoder", self.model_config.decoder, ("config.json",))
        key = "model.tokenizer" if self.model_config.tokenizer else "model.decoder"
        source = self.model_config.tokenizer or self.model_config.decoder
        check_model_source(key, source, ("tokenizer_config.json", "tokenizer.json", "tokenizer.model"))
        try:
            self.tokenizer = load_tokenizer(source)
        except (OSError, ValueError) as error:
            raise UserError(f"{key}: cannot load a tokenizer from {source!r}: {error}") from None
        if self.tokenizer.eos_token_id is None:
            raise UserError(f"model.tokenizer: the tokenizer at {source!r} has no end-of-sequence token")
        self.prompt_ids = chat_prompt_ids(self.tokenizer)
        self._examples: list[tuple[str, str]] = []

    def build_model(self) -> nn.Module:
        model_config = self.model_config
        encoder, aligned_data = load_aligned_vision(self.encoder_dir)
        if aligned_data.get("image_size", self.config.data.image_size) != self.config.data.image_size:
            logger.warning(
                "data.image_size is %s but the encoder was aligned at %s",
                self.config.data.image_size,
                aligned_data["image_size"],
            )
        # A 4-bit decoder is quantized onto the device it will run on as it loads.
        device = PartialState().device
        lora = LoraSettings(
            r=model_config.lora_r,
            alpha=model_config.lora_alpha,
            dropout=model_config.lora_dropout,
            target_modules=(
                model_config.lora_target_modules
                if isinstance(model_config.lora_target_modules, str)
                else tuple(model_config.lora_target_modules)
            ),
        )
        decoder = load_decoder(
            model_config.decoder,
            model_config.mode,
            resolve_dtype(model_config.base_dtype, device),
            device,
            lora,
            model_config.gradient_checkpointing,
            model_config.double_quant,
        )
        width = decoder.get_input_embeddings().embedding_dim
        return VisionLanguageModel(
            vision=encoder,
            decoder=decoder,
            stop_token_ids=[self.tokenizer.eos_token_id],
            pad_token_id=self.tokenizer.pad_token_id,
            vision_tokens=model_config.vision_tokens,
            projector_hidden_dim=width if model_config.projector == "mlp2x_gelu" else None,
        )

    def best_metric(self) -> tuple[str, Literal["max", "min"]]:
        return "eval/exact_match", "max"

    def place_model(self, model: nn.Module, device: torch.device) -> bool:
        """Move the model to ``device``, all but a quantized decoder (bitsandbytes placed it on load)."""
        assert isinstance(model, VisionLanguageModel)
        model.place(device)
        return True

    def decoder(self, train: bool, on_device: bool = False) -> QADecoder:
        data = self.config.data
        return QADecoder(
            self.tokenizer,
            image_size=data.image_size,
            train=train,
            max_question_tokens=data.max_question_tokens,
            max_answer_tokens=data.max_answer_tokens,
            horizontal_flip=data.horizontal_flip,
            prompt_ids=self.prompt_ids,
            on_device=on_device,
        )

    def collate(self, samples: list[Any]) -> dict[str, Any]:
        return collate_vlm(samples, self.tokenizer.pad_token_id)

    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch)
        return out["loss"], {"answer_tokens": float(out["answer_tokens"])}

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        # The bare module: a DDP wrapper would sync buffers on every forward, and ranks may
        # hold different numbers of held-out batches. Accelerate's autocast stays on its forward.
        vlm = getattr(model, "module", model)
        loss_sum, tokens = 0.0, 0
        predictions: list[str] = []
        references: list[str] = []
        questions: list[str] = []
        for batch in batches:
            out = vlm(batch, max_new_tokens=self.model_config.max_new_tokens)
            count = int(out["answer_tokens"])
            loss_sum += float(out["loss"]) * count
            tokens += count
            predictions += self.answers(out["generated"])
            references += self.answers(batch["labels"])
            questions += self._questions(batch)
        totals = all_reduce_sum({"loss_sum": loss_sum, "tokens": float(tokens)})
        predictions, references = gather_objects(predictions), gather_objects(references)
        if not predictions:
            raise UserError("the held-out set gave no samples to evaluate")
        mean_loss = totals["loss_sum"] / max(1.0, totals["tokens"])
        self._examples = list(zip(questions[:2], predictions[:2], strict=False))
        scores = answer_metrics(predictions, references)
        return {
            "eval/samples": float(len(predictions)),
            "eval/answer_loss": mean_loss,
            "eval/perplexity": math.exp(min(mean_loss, 80.0)),  # capped: exp overflows past ~709
            **{f"eval/{name}": value for name, value in scores.items()},
        }

    def answers(self, token_rows: torch.Tensor) -> list[str]:
        """Answer texts of generated or label rows: the tokens before the end token, -100 dropped."""
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in token_rows.tolist():
            ids = [token for token in row if token != IGNORE_INDEX]
            ids = ids[: ids.index(eos)] if eos in ids else ids
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return texts

    def _questions(self, batch: dict[str, Any]) -> list[str]:
        before, after = len(self.prompt_ids[0]), len(self.prompt_ids[1])
        return [
            self.tokenizer.decode(row[before : int(length) - after].tolist(), skip_special_tokens=True)
            for row, length in zip(batch["input_ids"], batch["question_lengths"], strict=True)
        ]

    def save_artifacts(self, model: nn.Module, directory: Path) -> None:
        """projector.safetensors (with its input LayerNorm), and adapter/ (peft ``save_pretrained``)
        or, fully fine-tuned, decoder/.

        The tokenizer is not copied: config.yaml names it (model.tokenizer or model.decoder).
        """
        assert isinstance(model, VisionLanguageModel)
        save_file(model.projector_state_dict(), str(directory / "projector.safetensors"))
        from peft import PeftModel

        if isinstance(model.decoder, PeftModel):
            model.decoder.save_pretrained(directory / "adapter")
        else:
            model.decoder.save_pretrained(directory / "decoder")

    def summary(self, metrics: dict[str, float]) -> str:
        examples = "; ".join(f"{question!r} -> {answer!r}" for question, answer in self._examples)
        return (
            f"held-out ({int(metrics.get('eval/samples', 0))} samples): "
            f"exact match {metrics.get('eval/exact_match', float('nan')):.3f}, "
            f"perplexity {metrics.get('eval/perplexity', float('nan')):.3f}, "
            f"BLEU {metrics.get('eval/bleu', float('nan')):.1f}, "
            f"ROUGE-L {metrics.get('eval/rouge_l', float('nan')):.3f}"
            + (f"; e.g. {examples}" if examples else "")
        )
