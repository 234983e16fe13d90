"""Fixtures for streamtrain tests: a real Qwen2 tokenizer built offline, a tiny CLIP text tower."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, CLIPTextModel

from streamtrain.models.qwen import QWEN2_SPECIAL_TOKENS
from streamtrain.models.qwen import qwen2_tokenizer as build_qwen2_tokenizer
from tests.streamtrain.models.conftest import tiny_clip_text_config, tiny_clip_tokenizer


@pytest.fixture(scope="session")
def qwen2_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """Qwen2's base-model tokenizer (EOS <|endoftext|>) from the bundled BPE ranks, saved and reloaded."""
    directory = tmp_path_factory.mktemp("qwen2_tokenizer")
    build_qwen2_tokenizer(eos_token="<|endoftext|>").save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)

    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tokenizer.convert_tokens_to_ids(list(QWEN2_SPECIAL_TOKENS)) == list(QWEN2_SPECIAL_TOKENS.values())
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 151643
    return tokenizer


@pytest.fixture(scope="session")
def clip_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIPTextModel with its tokenizer in the same directory."""
    directory = tmp_path_factory.mktemp("clip_text")
    tokenizer = tiny_clip_tokenizer()
    CLIPTextModel(tiny_clip_text_config(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
