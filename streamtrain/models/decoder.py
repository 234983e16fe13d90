"""Loading a Hugging Face causal LM as the VLM's decoder, for QLoRA, LoRA or full fine-tuning.

- qlora: the base is quantized to 4-bit NF4 by bitsandbytes as it loads, straight onto the
  device it will run on (bitsandbytes places quantized weights itself; they must not be moved
  afterwards), prepared with peft's ``prepare_model_for_kbit_training`` and given LoRA adapters.
- lora: the base in ``dtype``, frozen, with LoRA adapters.
- full: every weight trains, in float32 (mixed precision comes from the trainer's autocast).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from streamtrain.errors import UserError

if TYPE_CHECKING:  # peft pulls in bitsandbytes and torch's compiler (seconds): imported on use
    from peft import PeftModel

DecoderMode = Literal["qlora", "lora", "full"]
# Non-reentrant checkpointing needs no input that requires grad, which a frozen embedding lacks.
_CHECKPOINTING = {"use_reentrant": False}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape (see peft.LoraConfig)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a CUDA device that supports it, else float32."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_decoder(
    path: str,
    mode: DecoderMode,
    dtype: torch.dtype,
    device: torch.device,
    lora: LoraSettings,
    gradient_checkpointing: bool,
    double_quant: bool = True,
) -> PreTrainedModel | PeftModel:
    """The causal LM at ``path`` (local directory or hub name), ready to train in ``mode``.

    Only a qlora decoder is on ``device`` already; the others are on the CPU for the caller to move.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    kwargs: dict = {"dtype": torch.float32 if mode == "full" else dtype}
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=double_quant,
        )
        index = device.index if device.index is not None else (0 if device.type == "cuda" else None)
        kwargs["device_map"] = {"": device.type if index is None else f"{device.type}:{index}"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(f"model.decoder: cannot load a causal LM from {path!r}: {error}") from error
    model.config.use_cache = False  # training never reuses a cache; generation passes its own
    if mode == "full":
        if gradient_checkpointing:
            _enable_checkpointing(model)
        return model.requires_grad_(True)
    if mode == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=_CHECKPOINTING,
        )
    else:
        model.requires_grad_(False)
        if gradient_checkpointing:
            _enable_checkpointing(model)
    targets = lora.target_modules
    adapters = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, adapters)


def _enable_checkpointing(model: PreTrainedModel) -> None:
    # Recent transformers deprecate gradient_checkpointing_enable; older ones lack the new name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=_CHECKPOINTING)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_CHECKPOINTING)


def is_quantized(decoder: torch.nn.Module) -> bool:
    """Whether the decoder holds bitsandbytes-quantized weights (which place themselves)."""
    return bool(getattr(decoder, "is_loaded_in_4bit", False) or getattr(decoder, "is_loaded_in_8bit", False))


def four_bit_layers(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's bitsandbytes 4-bit linear layers (none unless it is quantized)."""
    if not is_quantized(decoder):
        return []
    import bitsandbytes as bnb  # only quantized decoders need it

    return [module for module in decoder.modules() if isinstance(module, bnb.nn.Linear4bit)]
