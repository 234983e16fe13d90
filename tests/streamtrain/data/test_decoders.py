"""Decoders on real shardify samples, and the whole pipeline: shards -> stream -> decoded batches."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from shardify.bytestream import RateLimitedLog
from shardify.convert import ConvertOptions, convert
from shardify.tarread import iter_samples
from streamtrain.config import AudioConfig, DataConfig
from streamtrain.data.collate import collate_alignment, collate_vlm
from streamtrain.data.counts import DECODER_COUNTS, decode_samples
from streamtrain.data.decoders import CaptionDecoder, ChatDecoder
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


def test_chat_decoder_reads_qa_caption_and_conversation_shards(tmp_path: Path, qwen2_tokenizer) -> None:
    qa_rows = [
        {
            "question": f"What number is shown in picture {i}?",
            "answer": f"number {i}",
            "image_bytes": factories.jpeg(seed=i),
        }
        for i in range(3)
    ]
    conversation = [
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "a photo"},
        {"role": "user", "content": "Which colours?"},
        {"role": "assistant", "content": "many colours in stripes"},
    ]
    chat_rows = [{"messages": conversation, "image_bytes": factories.jpeg(seed=9)}]
    samples = []
    prompts = ("Describe it.", "Caption it.")
    for name, rows in (
        ("qa", qa_rows),
        ("caption", factories.caption_rows(2, size=(40, 30))),
        ("chat", chat_rows),
    ):
        factories.write_parquet(tmp_path / f"{name}.parquet", rows)
        convert([str(tmp_path / f"{name}.parquet")], ConvertOptions(output=str(tmp_path / name)))
        decoder = ChatDecoder(
            qwen2_tokenizer,
            image_size=32,
            train=True,
            max_answer_tokens=4,
            vision_tokens=16,
            caption_prompts=prompts,
        )
        raws = list(iter_samples(str(tmp_path / name / "shard-000000-000000.tar")))
        samples += [decoder(raw, random.Random(i)) for i, raw in enumerate(raws)]
    for sample in samples:
        learned = sample["labels"][sample["labels"] != -100]
        assert learned[-1] == qwen2_tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert sample["image"].shape == (3, 32, 32) and len(sample["input_ids"]) == len(sample["labels"])
    assert [s["questions"] for s in samples[:3]] == [
        [f"What number is shown in picture {i}?"] for i in range(3)
    ]
    assert {s["questions"][0] for s in samples[3:5]} <= set(prompts)  # captions answer a caption prompt
    assert samples[5]["questions"] == ["What is it?", "Which colours?"]
    batch = collate_vlm(samples, pad_token_id=qwen2_tokenizer.pad_token_id, vision_tokens=16)
    assert batch["input_ids"].shape[0] == 6 and batch["image"].shape == (6, 3, 32, 32)
    assert int(batch["vision_mask"].sum()) == 6 * 16
    assert batch["questions"][-2:] == ["What is it?", "Which colours?"]


def test_chat_decoder_drops_whole_turns_past_max_seq_len_and_counts_them(qwen2_tokenizer) -> None:
    turns = [
        {"role": r, "content": f"{r} says something {i}"} for i in range(5) for r in ("user", "assistant")
    ]
    raw = {"__key__": "k", "jpg": factories.jpeg(seed=1), "json": json.dumps({"messages": turns}).encode()}
    full = ChatDecoder(qwen2_tokenizer, image_size=16, vision_tokens=4)(raw, random.Random(0))
    assert DECODER_COUNTS not in full and len(full["questions"]) == 5
    short = ChatDecoder(
        qwen2_tokenizer, image_size=16, vision_tokens=4, max_seq_len=4 + len(full["input_ids"]) - 1
    )
    cut = short(raw, random.Random(0))
    assert len(cut["questions"]) == 4 and cut[DECODER_COUNTS] == {"truncated_turns": 1}
    counts: Counter[str] = Counter()
    decoded = decode_samples(
        [raw], short, random.Random(0), counts, RateLimitedLog(logging.getLogger("t"), 60.0)
    )
    assert counts == {"samples": 1, "truncated_turns": 1} and DECODER_COUNTS not in decoded[0]
    tiny = ChatDecoder(qwen2_tokenizer, image_size=16, vision_tokens=4, max_seq_len=20)
    counts.clear()
    assert (
        decode_samples([raw], tiny, random.Random(0), counts, RateLimitedLog(logging.getLogger("t"), 60.0))
        == []
    )
    assert counts["decode_errors"] == 1 and not counts["samples"]
