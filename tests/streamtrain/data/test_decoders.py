"""Decoders on real shardify samples, and the whole pipeline: shards -> stream -> decoded batches."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from shardify.convert import ConvertOptions, convert
from shardify.tarread import iter_samples
from streamtrain.config import AudioConfig, DataConfig
from streamtrain.data.collate import collate_alignment, collate_vlm
from streamtrain.data.decoders import CaptionDecoder, QADecoder
from streamtrain.data.pipeline import train_loader
from streamtrain.data.shards import resolve
from tests import factories


@pytest.fixture(scope="module")
def caption_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("decoders")
    rows = factories.caption_rows(24, size=(40, 30))
    for row in rows[:3]:
        row["audio_bytes"] = factories.wav(seconds=0.5)
    factories.write_parquet(folder / "in.parquet", rows)
    convert(
        [str(folder / "in.parquet")], ConvertOptions(output=str(folder / "out"), max_samples_per_shard=10)
    )
    return folder / "out"


def test_caption_decoder_gives_normalised_image_text_and_id(caption_out: Path) -> None:
    raw = next(iter_samples(str(caption_out / "shard-000000-000000.tar")))
    sample = CaptionDecoder(image_size=32, train=False)(raw, random.Random(0))
    assert sample["sample_id"] == "img-00000" and sample["text"] == "a photo number 0"
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert "mel" not in sample


def test_caption_decoder_audio_and_text_dropout(caption_out: Path) -> None:
    raw = next(iter_samples(str(caption_out / "shard-000000-000000.tar")))
    decoder = CaptionDecoder(
        image_size=32, train=True, text_dropout_prob=0.5, audio=AudioConfig(max_seconds=1.0)
    )
    texts = [decoder(raw, random.Random(seed))["text"] for seed in range(200)]
    assert 60 < texts.count("") < 140 and set(texts) == {"", "a photo number 0"}
    assert texts == [decoder(raw, random.Random(seed))["text"] for seed in range(200)]
    sample = decoder(raw, random.Random(0))
    assert sample["mel"].shape == (128, 100) and sample["mel_mask"].sum() < 100


def test_eval_decoder_never_drops_text(caption_out: Path) -> None:
    raw = next(iter_samples(str(caption_out / "shard-000000-000000.tar")))
    decoder = CaptionDecoder(image_size=32, train=False, text_dropout_prob=1.0)
    assert decoder(raw, random.Random(0))["text"] == "a photo number 0"


def test_alignment_pipeline_end_to_end(caption_out: Path) -> None:
    data = DataConfig(train=str(caption_out), num_workers=2, shuffle_buffer=8)
    loader = train_loader(
        data,
        resolve(str(caption_out)),
        rank=0,
        world_size=1,
        batch_size=4,
        seed=1,
        decode=CaptionDecoder(image_size=32, train=True),
        collate=collate_alignment,
    )
    batches = [next(loader) for _ in range(loader.batches_per_epoch)]
    loader.shutdown()
    assert all(b["image"].shape == (4, 3, 32, 32) and len(b["texts"]) == 4 for b in batches)
    ids = [i for b in batches for i in b["sample_ids"]]
    assert len(set(ids)) == len(ids) == 24


def test_qa_decoder_and_vlm_collate(tmp_path: Path, qwen2_tokenizer) -> None:
    rows = [
        {
            "question": f"What number is shown in picture {i}?",
            "answer": f"number {i}",
            "image_bytes": factories.jpeg(seed=i),
        }
        for i in range(6)
    ]
    factories.write_parquet(tmp_path / "qa.parquet", rows)
    convert([str(tmp_path / "qa.parquet")], ConvertOptions(output=str(tmp_path / "out")))
    decoder = QADecoder(qwen2_tokenizer, image_size=32, train=False, max_answer_tokens=4)
    samples = [
        decoder(raw, random.Random(0))
        for raw in iter_samples(str(tmp_path / "out" / "shard-000000-000000.tar"))
    ]
    assert all(
        s["answer_ids"][-1] == qwen2_tokenizer.eos_token_id and len(s["answer_ids"]) <= 4 for s in samples
    )
    batch = collate_vlm(samples, pad_token_id=qwen2_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["image"].shape == (6, 3, 32, 32)
    learned = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert learned == samples[0]["answer_ids"]
