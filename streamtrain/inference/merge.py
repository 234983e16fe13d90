"""A trained VLM decoder as one plain causal LM: LoRA adapters merged, 4-bit weights dequantized.

A QLoRA decoder trained and was evaluated on its NF4 weights as bitsandbytes dequantizes them,
plus its adapters; the merged weight of a layer is exactly that dequantized weight plus the
adapter's ``scale * B @ A``, so the plain model computes what the trained one computed (up to
float rounding), not what the original full-precision base plus the adapters would.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from streamtrain.errors import UserError


def merged_decoder(decoder: nn.Module, source: str) -> PreTrainedModel:
    """``decoder`` (a peft LoRA model, possibly on a 4-bit base, or a fully trained causal LM) as
    a plain ``PreTrainedModel`` on the CPU; ``source`` is the base it was loaded from (its config
    and architecture)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    if not isinstance(decoder, PeftModel):
        return decoder.cpu()
    inner = decoder.get_base_model()
    dtype = _compute_dtype(inner)
    try:
        plain = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UserError(
            f"model.decoder: cannot load the base decoder {source!r} to merge into: {error}"
        ) from None
    inner_modules = dict(inner.named_modules())
    merged: dict[str, torch.Tensor] = {}
    for name, module in plain.named_modules():
        trained = inner_modules.get(name)
        if not isinstance(module, nn.Linear) or trained is None:
            continue
        if isinstance(trained, LoraLayer):
            base = trained.get_base_layer()
            weight = dequantize_module_weight(base).detach().float()
            for adapter in trained.active_adapters:
                weight = weight + trained.get_delta_weight(adapter).float()
        else:
            base, weight = trained, dequantize_module_weight(trained).detach().float()
        merged[f"{name}.weight"] = weight.reshape(module.weight.shape)
        if module.bias is not None and base.bias is not None:
            merged[f"{name}.bias"] = base.bias.detach().float()
    # Embeddings and norms stayed frozen: taken as the training model holds them.
    state = {key: merged[key] if key in merged else _trained_tensor(inner, key) for key in plain.state_dict()}
    plain.load_state_dict({k: v.to(dtype).cpu() for k, v in state.items()})
    plain.config.use_cache = True
    return plain


def _trained_tensor(model: nn.Module, key: str) -> torch.Tensor:
    try:
        return model.get_parameter(key).detach()
    except AttributeError:
        return model.get_buffer(key).detach()


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the decoder computed in: bitsandbytes' compute dtype, else its embeddings'."""
    quantization = getattr(model.config, "quantization_config", None)
    compute = getattr(quantization, "bnb_4bit_compute_dtype", None) if quantization is not None else None
    if isinstance(compute, torch.dtype):
        return compute
    if isinstance(compute, str):
        return getattr(torch, compute)
    return model.get_input_embeddings().weight.dtype
