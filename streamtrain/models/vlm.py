"""Vision-language model: a frozen aligned image encoder, a trainable projector and a causal LM decoder.

The encoder's grid tokens (``forward_features``, optionally pooled to fewer tokens) pass through
the projector into the decoder's embedding width and are placed before the conversation, once:

    [vision_1 .. vision_V] [user turn 1] [answer 1 .. end] [user turn 2] [answer 2 .. end] [padding]
    labels: -100 ...  -100   -100 ...     answer 1 .. end    -100 ...     answer 2 .. end   -100 ...

Several such samples may share a row (``data.pack``), each attending only to itself.

Logits are computed only at positions where a label is learned (the decoder's output head applied
to those hidden states), so a 150k-token vocabulary costs [answer tokens, vocab], not
[batch, length, vocab].
Generation is a greedy loop of decoder forward passes with a KV cache, not Hugging Face's
``generate()``: peft LoRA on a 4-bit model stops training once ``generate()`` has run on that
model object (see ENVIRONMENT.md), and the loop keeps the vision prefix in one code path.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from streamtrain.data.collate import IGNORE_INDEX, answer_spans
from streamtrain.models.alignment import Projector
from streamtrain.models.decoder import four_bit_layers, is_quantized
from streamtrain.models.vision import VisionEncoder


def pool_grid(tokens: Tensor, num_tokens: int | None) -> Tensor:
    """Average-pool grid tokens [B, N, C] to ``num_tokens`` (square grids pool in 2-D); None keeps all."""
    count = tokens.shape[1]
    if num_tokens is None or num_tokens >= count:
        return tokens
    side, target = math.isqrt(count), math.isqrt(num_tokens)
    if side * side == count and target * target == num_tokens:
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        return F.adaptive_avg_pool2d(grid, target).flatten(2).transpose(1, 2)
    return F.adaptive_avg_pool1d(tokens.transpose(1, 2), num_tokens).transpose(1, 2)


class VisionLanguageModel(nn.Module):
    """Frozen ``vision`` encoder -> LayerNorm + projector (trainable) -> ``decoder`` (a causal LM).

    ``forward(batch)`` takes a ``collate_vlm`` batch and returns ``loss`` (mean cross-entropy
    over answer tokens, see ``answer_loss_sum``), ``labels`` [answer tokens] and ``answer_tokens``.
    ``answer_turns`` generates an answer to every turn of a batch, and ``generate_answers`` to any
    prompts (``streamtrain.data.chat.encode_chat`` makes them).

    Checkpoints (``state_dict``) hold only the trainable parameters: the frozen encoder and a
    frozen (possibly 4-bit) decoder base are rebuilt from their sources, so a QLoRA checkpoint of
    a large decoder is its adapters and projector, not gigabytes of unchanged quantized weights.
    """

    def __init__(
        self,
        vision: VisionEncoder,
        decoder: nn.Module,
        stop_token_ids: list[int],
        pad_token_id: int,
        vision_tokens: int | None = None,
        projector_hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        if not stop_token_ids:
            raise ValueError("VisionLanguageModel needs at least one stop token id")
        self.vision = vision.requires_grad_(False).eval()
        self.decoder = decoder
        embed_dim = decoder.get_input_embeddings().embedding_dim
        # Frozen encoders' grid features differ in scale by orders of magnitude (a BatchNorm CNN's
        # ~0.01 to a ViT's ~1): normalised first, the projector starts from the same footing.
        self.feature_norm = nn.LayerNorm(vision.output_dim)
        self.projector = Projector(vision.output_dim, embed_dim, projector_hidden_dim)
        self.vision_tokens = vision_tokens
        self.register_buffer("stop_token_ids", torch.tensor(stop_token_ids), persistent=False)
        self.pad_token_id = pad_token_id
        # Recent transformers releases renamed the KV cache argument; older ones call it past_key_values.
        backbone_inputs = inspect.signature(decoder.get_decoder().forward).parameters
        self._cache_argument = "cache" if "cache" in backbone_inputs else "past_key_values"
        self._four_bit_layers = four_bit_layers(decoder)
        for layer in self._four_bit_layers:  # see train()
            layer.training = True
        self.register_state_dict_post_hook(_keep_trainable)
        self.register_load_state_dict_post_hook(_frozen_not_missing)

    def train(self, mode: bool = True) -> VisionLanguageModel:
        # A parent's .train() recurses into every child; the frozen encoder keeps BatchNorm statistics.
        super().train(mode)
        self.vision.eval()
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights for inference the
        # first time it runs in eval mode without grad, and LoRA training through it fails after
        # that (ENVIRONMENT.md's "not after generate()"). The layers behave the same otherwise, so
        # they stay in training mode and evaluation between training steps never repacks them.
        for layer in self._four_bit_layers:
            layer.training = True
        return self

    def place(self, device: torch.device) -> VisionLanguageModel:
        """Move to ``device``, all but a quantized decoder: bitsandbytes put it on its device as it
        loaded, and moving 4-bit weights again is not supported everywhere."""
        if not is_quantized(self.decoder):
            return self.to(device)
        for child in self.children():
            if child is not self.decoder:
                child.to(device)
        self.stop_token_ids = self.stop_token_ids.to(device)
        return self

    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> vision tokens [B, V, embed_dim] in the decoder's input space."""
        with torch.no_grad():
            grid = pool_grid(self.vision.forward_features(images), self.vision_tokens)
        grid = grid.to(self.feature_norm.weight.dtype)
        return self.projector(self.feature_norm(grid))

    def projector_state_dict(self) -> dict[str, Tensor]:
        """The trainable vision-to-decoder mapping (``feature_norm.*``, ``projector.*``), on the CPU."""
        return {
            f"{part}.{name}": tensor.detach().cpu().contiguous()
            for part in ("feature_norm", "projector")
            for name, tensor in getattr(self, part).state_dict().items()
        }

    def _embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.decoder.get_input_embeddings()(input_ids)

    def training_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's rows as ``inputs_embeds`` (each sample's vision tokens in its vision slots,
        its text after them), the decoder's attention arguments, and the labels.

        One sample per row: the padding mask. Packed rows: no mask, but position ids that restart
        at every sample, from which the decoder's attention keeps each sample to itself
        (transformers' packed-sequence masks; flash attention reads them as sequence bounds).
        """
        vision = self.encode_images(batch["image"])
        text = self._embed_tokens(batch["input_ids"])
        slots = batch["vision_mask"]
        if int(slots.sum()) != vision.shape[0] * vision.shape[1]:
            raise ValueError(
                f"the batch has {int(slots.sum())} vision slots for {vision.shape[0]} images of "
                f"{vision.shape[1]} tokens: collate with vision_tokens={vision.shape[1]}"
            )
        embeds = text.masked_scatter(slots.unsqueeze(-1), vision.to(text.dtype))
        if batch.get("packed"):
            attention = {"attention_mask": None, "position_ids": batch["position_ids"]}
        else:
            attention = {"attention_mask": batch["attention_mask"]}
        return {"inputs_embeds": embeds, **attention, "labels": batch["labels"]}

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        inputs = self.training_inputs(batch)
        labels = inputs.pop("labels")
        # Position t predicts token t + 1: the output head runs only at the positions whose next
        # token is learned, row by row (a packed row's learned positions are many and scattered:
        # the union over rows that ``logits_to_keep`` takes would cost several times as much).
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        hidden = self.decoder.get_decoder()(**inputs, use_cache=False).last_hidden_state
        targets = labels[:, 1:][predicts[:, :-1]]
        summed = answer_loss_sum(self.decoder.get_output_embeddings(), hidden[predicts], targets)
        return {
            "loss": summed / max(1, targets.numel()),
            "labels": targets,
            "answer_tokens": torch.tensor(targets.numel(), device=targets.device),
        }

    @torch.no_grad()
    def answer_turns(
        self, batch: dict[str, Any], max_new_tokens: int, chunk: int = 64
    ) -> tuple[Tensor, list[Tensor], list[int]]:
        """Greedy answers to every assistant turn of a ``collate_vlm`` batch, each prompted with its
        image and its conversation up to that turn (the earlier answers as the data gives them).

        Returns the generated ids [turns, max_new_tokens], each turn's reference (its label ids:
        the answer and its end token) and its index in its conversation, turns in row order.
        """
        vision_tokens = int(batch["vision_mask"].sum()) // len(batch["sample_ids"])
        prompts, references, samples, indices = [], [], [], []
        starts = batch["sample_starts"].tolist()
        for sample, (row, spans) in enumerate(
            zip(batch["sample_rows"].tolist(), answer_spans(batch), strict=True)
        ):
            text = starts[sample] + vision_tokens
            for index, (begin, end) in enumerate(spans):
                prompts.append(batch["input_ids"][row, text:begin])
                references.append(batch["labels"][row, begin:end])
                samples.append(sample)
                indices.append(index)
        generated = []
        for first in range(0, len(prompts), chunk):
            part = prompts[first : first + chunk]
            lengths = torch.tensor([len(p) for p in part], device=batch["input_ids"].device)
            padded = nn.utils.rnn.pad_sequence(part, batch_first=True, padding_value=self.pad_token_id)
            images = batch["image"][
                torch.tensor(samples[first : first + chunk], device=batch["image"].device)
            ]
            generated.append(self.generate_answers(images, padded, lengths, max_new_tokens))
        if not generated:
            return torch.empty((0, max_new_tokens), dtype=torch.long), [], []
        return torch.cat(generated), references, indices

    @torch.no_grad()
    def generate_answers(
        self, images: Tensor, input_ids: Tensor, prompt_lengths: Tensor, max_new_tokens: int
    ) -> Tensor:
        """Greedy answers [B, max_new_tokens] to prompts ``input_ids[b, :prompt_lengths[b]]``.

        Prompts are left-padded (positions counted from each row's first real token, as in
        training), decoded with a KV cache; a row stops at its first stop token, which it keeps,
        and is ``pad_token_id`` after it.
        """
        vision = self.encode_images(images)
        batch_size, count = vision.shape[:2]
        longest = int(prompt_lengths.max())
        width = count + longest
        embed_dim = vision.shape[-1]
        text = self._embed_tokens(input_ids[:, :longest])
        embeds = text.new_zeros((batch_size, width, embed_dim))
        mask = torch.zeros((batch_size, width), dtype=torch.long, device=input_ids.device)
        for row in range(batch_size):
            length = int(prompt_lengths[row])
            start = width - count - length
            embeds[row, start : start + count] = vision[row].to(text.dtype)
            embeds[row, start + count :] = text[row, :length]
            mask[row, start:] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = {self._cache_argument: DynamicCache(config=self.decoder.config)}
        generated = torch.full(
            (batch_size, max_new_tokens), self.pad_token_id, dtype=torch.long, device=input_ids.device
        )
        done = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            logits = self.decoder(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **cache,
                logits_to_keep=1,
            ).logits[:, -1]
            token = logits.argmax(dim=-1)
            generated[:, step] = torch.where(done, self.pad_token_id, token)
            done |= torch.isin(token, self.stop_token_ids)
            if bool(done.all()):
                break
            embeds = self._embed_tokens(token[:, None])
            mask = torch.cat([mask, mask.new_ones((batch_size, 1))], dim=1)
            positions = positions[:, -1:] + 1
        return generated


LOSS_CHUNK_LOGITS = 1 << 25
"""Logits alive at once in the answer loss (float32: 128 MiB): 220 positions of a 151,936-token
vocabulary. Without chunks, [answer tokens, vocab] would be the largest tensor of a step and grow
with every token a step learns (2.4 GB for 4,000 answer tokens)."""


def answer_loss_sum(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of ``head(hidden)`` [N, vocab] against ``targets`` [N], computed in
    chunks of positions whose logits are recomputed in backward instead of kept (activation
    checkpointing): the memory of a step no longer grows with the tokens it learns."""
    vocab = head.weight.shape[0]
    size = max(1, LOSS_CHUNK_LOGITS // vocab)

    def chunk_loss(part: Tensor, part_targets: Tensor) -> Tensor:
        return F.cross_entropy(head(part).float(), part_targets, reduction="sum")

    if len(targets) <= size:
        return chunk_loss(hidden, targets)
    chunks = [(hidden[i : i + size], targets[i : i + size]) for i in range(0, len(targets), size)]
    if not torch.is_grad_enabled():
        return sum((chunk_loss(part, t) for part, t in chunks), torch.zeros((), device=hidden.device))
    return sum(
        (checkpoint(chunk_loss, part, t, use_reentrant=False) for part, t in chunks),
        torch.zeros((), device=hidden.device),
    )


def _keep_trainable(module: nn.Module, state_dict: dict[str, Any], prefix: str, _metadata: Any) -> None:
    """State-dict post hook: drop every entry that is not a trainable parameter."""
    trainable = {prefix + name for name, parameter in module.named_parameters() if parameter.requires_grad}
    for key in [key for key in state_dict if key.startswith(prefix) and key not in trainable]:
        del state_dict[key]


def _frozen_not_missing(module: nn.Module, incompatible: Any) -> None:
    """Load post hook: frozen entries are rebuilt from their sources, so their absence is expected."""
    trainable = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    frozen_missing = [key for key in incompatible.missing_keys if _strip_wrappers(key) not in trainable]
    for key in frozen_missing:
        incompatible.missing_keys.remove(key)


def _strip_wrappers(key: str) -> str:
    # load_state_dict reports keys relative to the module it was called on, which may be a
    # DDP wrapper (``module.``) around this model.
    return key.removeprefix("module.")
