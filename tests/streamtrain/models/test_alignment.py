from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamtrain.models.alignment import AlignmentModel, Projector
from streamtrain.models.audio import AudioEncoderConfig, build_audio_encoder
from streamtrain.models.text import TextConfig, TextEncoder, build_text_encoder
from streamtrain.models.vision import VisionConfig, build_vision_encoder

CAPTIONS = ["a handwritten seven", "a handwritten two", "a spoken word", "a photo of a cat"]


class FixedLogitScale(nn.Module):
    """A learnable log-temperature; stands in for streamtrain.losses.LogitScale."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()


def clip_loss(outputs: dict[str, torch.Tensor], media: str) -> torch.Tensor:
    media_emb = F.normalize(outputs[media], dim=-1)
    text_emb = F.normalize(outputs["text_emb"], dim=-1)
    logits = outputs["logit_scale"] * media_emb @ text_emb.T
    targets = torch.arange(len(logits))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    """The frozen MiniLM; shared, as no test may change it."""
    return build_text_encoder(TextConfig())


def media_batch() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "texts": CAPTIONS,
        "image": torch.randn(4, 3, 32, 32, generator=generator),
        "mel": torch.randn(4, 16, 30, generator=generator),
        "mel_mask": torch.arange(30)[None, :] < torch.tensor([30, 12, 20, 7])[:, None],
    }


def test_projector_shapes() -> None:
    linear, mlp = Projector(12, 8), Projector(12, 8, hidden_dim=20)
    assert [type(layer) for layer in linear.layers] == [nn.Linear]
    assert [type(layer) for layer in mlp.layers] == [nn.Linear, nn.GELU, nn.Linear]
    assert mlp.layers[0].out_features == 20
    assert linear(torch.randn(3, 12)).shape == mlp(torch.randn(3, 12)).shape == (3, 8)


def test_frozen_text_encoder_stays_fixed_while_the_rest_trains(minilm: TextEncoder) -> None:
    torch.manual_seed(0)
    model = AlignmentModel(
        text=minilm,
        embed_dim=16,
        logit_scale=FixedLogitScale(),
        vision=build_vision_encoder(VisionConfig(kind="small_cnn", width=8)),
        audio=build_audio_encoder(AudioEncoderConfig(width=12, n_mels=16)),
        projector_hidden_dim=24,
    )
    assert sum(p.numel() for p in model.text.parameters() if p.requires_grad) == 0
    model.train()
    assert model.vision.training and model.text_proj.training
    assert not any(module.training for module in model.text.backbone.modules())

    text_before = {name: p.detach().clone() for name, p in model.text.named_parameters()}
    projector_before = {name: p.detach().clone() for name, p in model.text_proj.named_parameters()}
    vision_before = {name: p.detach().clone() for name, p in model.vision.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    outputs = model(media_batch())
    assert {name: tuple(value.shape) for name, value in outputs.items()} == {
        "text_emb": (4, 16),
        "image_emb": (4, 16),
        "audio_emb": (4, 16),
        "logit_scale": (),
    }
    loss = clip_loss(outputs, "image_emb") + clip_loss(outputs, "audio_emb")
    loss.backward()
    optimizer.step()

    assert all(p.grad is None for p in model.text.parameters())
    for name, p in model.text.named_parameters():
        assert torch.equal(p, text_before[name]), name
    for before, after in ((projector_before, model.text_proj), (vision_before, model.vision)):
        changed = [not torch.equal(p, before[name]) for name, p in after.named_parameters()]
        assert all(changed)
    assert model.logit_scale.log_scale.grad is not None


def test_encode_methods_match_forward(minilm: TextEncoder) -> None:
    torch.manual_seed(0)
    model = AlignmentModel(
        text=minilm,
        embed_dim=8,
        logit_scale=FixedLogitScale(),
        vision=build_vision_encoder(VisionConfig(kind="small_cnn", width=8)),
        audio=build_audio_encoder(AudioEncoderConfig(width=12, n_mels=16)),
    ).eval()
    batch = media_batch()
    with torch.no_grad():
        outputs = model(batch)
        torch.testing.assert_close(model.encode_text(texts=batch["texts"]), outputs["text_emb"])
        torch.testing.assert_close(model.encode_image(batch["image"]), outputs["image_emb"])
        torch.testing.assert_close(model.encode_audio(batch["mel"], batch["mel_mask"]), outputs["audio_emb"])
    torch.testing.assert_close(outputs["logit_scale"], torch.tensor(2.0).exp())


def test_trainable_clip_text_with_token_ids(clip_text_dir: Path) -> None:
    text = build_text_encoder(TextConfig(kind="clip", path=str(clip_text_dir), trainable=True))
    model = AlignmentModel(
        text=text,
        embed_dim=8,
        logit_scale=FixedLogitScale(),
        vision=build_vision_encoder(VisionConfig(kind="small_cnn", width=8)),
    )
    assert model.audio is None and model.audio_proj is None
    assert text.tokenizer is not None
    tokens = text.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    batch = {
        "image": media_batch()["image"],
        "text_input_ids": tokens["input_ids"],
        "text_attention_mask": tokens["attention_mask"],
    }
    outputs = model(batch)
    assert set(outputs) == {"text_emb", "image_emb", "logit_scale"}
    clip_loss(outputs, "image_emb").backward()
    assert all(p.grad is not None for p in model.text.parameters())


def test_missing_encoders_are_value_errors(minilm: TextEncoder) -> None:
    with pytest.raises(ValueError, match="needs a vision or an audio encoder"):
        AlignmentModel(text=minilm, embed_dim=8, logit_scale=FixedLogitScale())
    model = AlignmentModel(
        text=minilm,
        embed_dim=8,
        logit_scale=FixedLogitScale(),
        audio=build_audio_encoder(AudioEncoderConfig(width=12, n_mels=16)),
    )
    with pytest.raises(ValueError, match="has no vision encoder"):
        model(media_batch())
