"""Fixtures for VLM tests: the QA sample as shards, a tiny Qwen2 decoder and an alignment checkpoint."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from streamtrain.config import build_config
from streamtrain.data.transforms import decode_image, vision_transform
from streamtrain.models.qwen import load_tokenizer, write_tiny_qwen2
from streamtrain.models.vision import SmallCNNEncoder
from streamtrain.tasks import model_types
from tests.streamtrain.train.conftest import ROOT, convert_sample, digits_shards  # noqa: F401  (a fixture)


def write_alignment_checkpoint(
    directory: Path,
    width: int = 16,
    image_size: int = 32,
    seed: int = 0,
    encoder: SmallCNNEncoder | None = None,
) -> Path:
    """An alignment checkpoint as the trainer lays one out (config.yaml + model.safetensors of the
    whole model, vision encoder under ``vision.``), holding ``encoder`` or a random small CNN."""
    directory.mkdir(parents=True, exist_ok=True)
    config = build_config(
        {
            "task": "alignment",
            "output_dir": str(directory.parent),
            "data": {"train": "unused", "image_size": image_size},
            "model": {"vision": {"kind": "small_cnn", "width": width}, "text": {"kind": "clip", "path": "x"}},
        },
        model_types(),
    )
    (directory / "config.yaml").write_text(config.to_yaml())
    if encoder is None:
        torch.manual_seed(seed)
        encoder = SmallCNNEncoder(width)
    weights = {f"vision.{name}": tensor for name, tensor in encoder.state_dict().items()}
    weights["vision_proj.layers.0.weight"] = torch.randn(8, encoder.output_dim)  # not the VLM's
    save_file(weights, str(directory / "model.safetensors"))
    return directory


def fit_digit_encoder(width: int = 32, steps: int = 60, seed: int = 0) -> SmallCNNEncoder:
    """A small CNN that tells the sample's digits apart, fitted to their labels in seconds.

    It stands in for an aligned encoder (alignment to captions that name the digit teaches the
    same), which takes minutes to train; only the sample's train split is used, never eval.
    """
    transform = vision_transform(32, train=False)
    rows = pq.read_table(ROOT / "sample" / "digits_caption" / "train.parquet").to_pylist()
    images, labels = [], []
    for row in rows:
        try:
            images.append(transform(decode_image(row["image_bytes"], 32)))
        except Exception:  # the sample's deliberately broken rows
            continue
        labels.append(row["label"])
    inputs, targets = torch.stack(images), torch.tensor(labels)
    torch.manual_seed(seed)
    encoder = SmallCNNEncoder(width)
    head = torch.nn.Linear(encoder.output_dim, 10)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (128,))
        loss = torch.nn.functional.cross_entropy(head(encoder(inputs[batch])), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return encoder.eval()


@pytest.fixture(scope="session")
def qa_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return convert_sample(tmp_path_factory.mktemp("digits_qa"), "digits_qa")


@pytest.fixture(scope="session")
def conversation_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled digits conversations (three questions per image) as shards."""
    return convert_sample(tmp_path_factory.mktemp("digits_conversation"), "digits_conversation")


def question_only_baseline(train: Path, held_out: Path) -> dict[int, float]:
    """Exact match per turn index that the questions alone allow: each held-out turn answered with
    the answer its question most often has in the train split."""
    answers: dict[str, Counter[str]] = {}
    for messages in shard_conversations(train):
        for question, answer in zip(messages[::2], messages[1::2], strict=True):
            answers.setdefault(question["content"], Counter())[answer["content"]] += 1
    best = {question: counts.most_common(1)[0][0] for question, counts in answers.items()}
    hits: dict[int, list[bool]] = {}
    for messages in shard_conversations(held_out):
        for turn, (question, answer) in enumerate(zip(messages[::2], messages[1::2], strict=True)):
            hits.setdefault(turn, []).append(best.get(question["content"]) == answer["content"])
    return {turn: sum(found) / len(found) for turn, found in sorted(hits.items())}


def shard_conversations(folder: Path) -> list[list[dict]]:
    from shardify.tarread import iter_samples

    return [
        json.loads(sample["json"])["messages"]
        for shard in sorted(folder.glob("*.tar"))
        for sample in iter_samples(str(shard))
    ]


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2ForCausalLM with the Qwen2 tokenizer (ChatML template), saved."""
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def chat_tokenizer(tiny_decoder: Path):
    """Qwen2-Instruct's tokenizer as saved beside the decoder: ChatML template, turns end in <|im_end|>."""
    return load_tokenizer(str(tiny_decoder))


@pytest.fixture(scope="session")
def alignment_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_alignment_checkpoint(tmp_path_factory.mktemp("alignment") / "best")
