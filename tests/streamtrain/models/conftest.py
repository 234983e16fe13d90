"""Fixtures for model tests: tiny random Hugging Face models and a tiny tokenizer, saved to disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
    WhisperConfig,
    WhisperForConditionalGeneration,
    WhisperModel,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_VIT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
"""A 32 px, 8 px-patch ViT: 16 patch tokens per image at its native size."""

WORDS = "a an the of on in with and photo picture digit zero one two three four five six seven eight nine"
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"
TEXT_HIDDEN = 48
"""Text width of the tiny CLIP, unlike its vision width (32), so a mixed-up tower shows in shapes."""


@pytest.fixture(scope="package", autouse=True)
def one_thread() -> Iterator[None]:
    # The development machines' two cores are shared; with a second process busy, OpenMP's
    # spinning workers made a small conv step ~40x slower at 2 threads than at 1 (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clip_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with CLIP's special tokens; wraps texts as BOS ... EOS, pads with EOS."""
    vocab = {token: index for index, token in enumerate([BOS, EOS, UNK, *WORDS.split()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS
    )


def tiny_clip_text_config(tokenizer: PreTrainedTokenizerFast) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@pytest.fixture(scope="session")
def clip_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("clip_vision")
    CLIPVisionModel(CLIPVisionConfig(**TINY_VIT)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def siglip_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("siglip_vision")
    SiglipVisionModel(SiglipVisionConfig(**TINY_VIT)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(Dinov2Config(**TINY_VIT)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def clip_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dual-encoder CLIPModel with its tokenizer in the same directory."""
    directory = tmp_path_factory.mktemp("clip_model")
    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=tiny_clip_text_config(tokenizer).to_dict(),
        vision_config=CLIPVisionConfig(**TINY_VIT).to_dict(),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_whisper_config() -> WhisperConfig:
    """128 mel bins like Whisper large-v3, but 50 positions (100 input frames) and one layer each side."""
    return WhisperConfig(
        num_mel_bins=128,
        max_source_positions=50,
        max_target_positions=16,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )


@pytest.fixture(scope="session", params=[WhisperModel, WhisperForConditionalGeneration])
def whisper_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp(request.param.__name__)
    request.param(tiny_whisper_config()).save_pretrained(directory)
    return directory
