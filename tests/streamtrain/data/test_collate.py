from __future__ import annotations

import pytest
import torch

from streamtrain.data.collate import IGNORE_INDEX, answer_spans, collate_alignment, collate_vlm

EOS = 2
PAD = 99


def image(value: float, size: int = 8) -> torch.Tensor:
    return torch.full((3, size, size), value)


def vlm_sample(sample_id: str, value: float, prompt: list[int], answer: list[int], *more: list[int]) -> dict:
    """A sample as ``ChatDecoder`` makes one: prompt ids, then answer ids (learned), then any
    further (prompt, answer) pairs."""
    parts = [prompt, answer, *more]
    input_ids = [token for part in parts for token in part]
    labels = [t if k % 2 else IGNORE_INDEX for k, part in enumerate(parts) for t in part]
    return {
        "sample_id": sample_id,
        "image": image(value),
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "questions": [f"{sample_id}{k}" for k in range(0, len(parts), 2)],
    }


def vlm_samples() -> list[dict]:
    return [vlm_sample("a", 0.0, [11, 12, 13], [21, 22, EOS]), vlm_sample("b", 1.0, [31], [41, EOS])]


def test_collate_vlm_pads_masks_and_labels() -> None:
    batch = collate_vlm(vlm_samples(), pad_token_id=PAD, vision_tokens=2)
    V = PAD  # a vision slot holds the pad id; the model puts the image's tokens there
    expected_input_ids = torch.tensor([[V, V, 11, 12, 13, 21, 22, 2], [V, V, 31, 41, 2, PAD, PAD, PAD]])
    expected_attention_mask = torch.tensor([[1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]])
    expected_labels = torch.tensor(
        [[-100, -100, -100, -100, -100, 21, 22, 2], [-100, -100, -100, 41, 2, -100, -100, -100]]
    )
    assert torch.equal(batch["input_ids"], expected_input_ids)
    assert torch.equal(batch["attention_mask"], expected_attention_mask)
    assert torch.equal(batch["labels"], expected_labels)
    assert batch["vision_mask"].tolist() == [[True, True] + [False] * 6] * 2
    assert batch["position_ids"].tolist() == [list(range(8)), [0, 1, 2, 3, 4, 0, 1, 2]]
    for key in ("input_ids", "attention_mask", "labels", "position_ids", "sample_rows", "sample_starts"):
        assert batch[key].dtype == torch.long, key
    assert batch["sample_ids"] == ["a", "b"] and batch["packed"] is False
    assert batch["sample_rows"].tolist() == [0, 1] and batch["sample_starts"].tolist() == [0, 0]
    assert batch["sample_lengths"].tolist() == [8, 5] and batch["questions"] == ["a0", "b0"]
    assert batch["image"].shape == (2, 3, 8, 8)
    assert torch.equal(batch["image"][1], image(1.0))
    assert answer_spans(batch) == [[(5, 8)], [(3, 5)]]
    assert IGNORE_INDEX == -100


def test_packing_fills_rows_first_fit_longest_first() -> None:
    samples = [
        vlm_sample("a", 0.0, [1, 2], [3, EOS]),  # 2 + 4 = 6 positions
        vlm_sample("b", 1.0, [1, 2, 3, 4, 5], [6, 7, EOS]),  # 10
        vlm_sample("c", 2.0, [1], [2, EOS], [4], [5, EOS]),  # 8, two turns
        vlm_sample("d", 3.0, [1], [EOS]),  # 4
    ]
    batch = collate_vlm(samples, pad_token_id=PAD, vision_tokens=2, pack=True, max_seq_len=14)
    # b (10) opens row 0, c (8) row 1, a (6) joins c, d (4) joins b.
    assert batch["sample_ids"] == ["b", "d", "c", "a"]
    assert batch["sample_rows"].tolist() == [0, 0, 1, 1] and batch["sample_starts"].tolist() == [0, 10, 0, 8]
    assert batch["input_ids"].shape == (2, 14) and batch["packed"] is True
    assert batch["position_ids"].tolist() == [[*range(10), *range(4)], [*range(8), *range(6)]]
    assert batch["attention_mask"].tolist() == [[1] * 14, [1] * 14]
    assert [float(i[0, 0, 0]) for i in batch["image"]] == [1.0, 3.0, 2.0, 0.0]
    assert batch["vision_mask"][0].nonzero().flatten().tolist() == [0, 1, 10, 11]
    assert answer_spans(batch) == [[(7, 10)], [(13, 14)], [(3, 5), (6, 8)], [(12, 14)]]
    assert batch["questions"] == ["b0", "d0", "c0", "c2", "a0"]
    unpacked = collate_vlm(samples, pad_token_id=PAD, vision_tokens=2)
    learned = sorted(unpacked["labels"][unpacked["labels"] != IGNORE_INDEX].tolist())
    assert sorted(batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()) == learned
    alone = collate_vlm(samples, pad_token_id=PAD, vision_tokens=2, pack=True, max_seq_len=9)
    assert alone["input_ids"].shape == (4, 10)  # b is longer than a row: it gets one of its own
    assert alone["sample_ids"] == ["b", "c", "a", "d"]
    # A row that is not full ends in padding that counts its own positions.
    assert alone["position_ids"][3].tolist() == [*range(4), *range(6)]


def test_collate_vlm_errors() -> None:
    no_answer = vlm_samples()
    no_answer[1]["labels"] = torch.full_like(no_answer[1]["labels"], IGNORE_INDEX)
    with pytest.raises(ValueError, match="'b' has no answer tokens"):
        collate_vlm(no_answer, pad_token_id=PAD)
    other_size = vlm_samples()
    other_size[0]["image"] = image(0.0, size=16)
    with pytest.raises(ValueError, match="shapes differ"):
        collate_vlm(other_size, pad_token_id=PAD)
    with pytest.raises(ValueError, match="empty batch"):
        collate_vlm([], pad_token_id=PAD)
    with pytest.raises(ValueError, match="packing needs max_seq_len"):
        collate_vlm(vlm_samples(), pad_token_id=PAD, pack=True)


def alignment_samples(with_image: bool = True, with_mel: bool = False) -> list[dict]:
    samples = []
    for index, text in enumerate(["Hello world", "Hello"]):
        sample: dict = {"sample_id": f"s{index}", "text": text}
        if with_image:
            sample["image"] = image(float(index))
        if with_mel:
            sample["mel"] = torch.full((4, 6), float(index))
            sample["mel_mask"] = torch.arange(6) < 3 + index
        samples.append(sample)
    return samples


def test_collate_alignment_without_tokenizer_keeps_texts() -> None:
    batch = collate_alignment(alignment_samples())
    assert set(batch) == {"image", "texts", "sample_ids"}
    assert batch["texts"] == ["Hello world", "Hello"]
    assert batch["sample_ids"] == ["s0", "s1"]
    assert torch.equal(batch["image"], torch.stack([image(0.0), image(1.0)]))


def test_collate_alignment_with_tokenizer(qwen2_tokenizer) -> None:
    batch = collate_alignment(alignment_samples(), text_tokenizer=qwen2_tokenizer)
    assert set(batch) == {"image", "text_input_ids", "text_attention_mask", "sample_ids"}
    assert torch.equal(batch["text_input_ids"], torch.tensor([[9707, 1879], [9707, 151643]]))
    assert torch.equal(batch["text_attention_mask"], torch.tensor([[1, 1], [1, 0]]))
    assert batch["text_input_ids"].dtype == batch["text_attention_mask"].dtype == torch.long

    truncated = collate_alignment(alignment_samples(), text_tokenizer=qwen2_tokenizer, max_text_tokens=1)
    assert torch.equal(truncated["text_input_ids"], torch.tensor([[9707], [9707]]))
    assert torch.equal(truncated["text_attention_mask"], torch.tensor([[1], [1]]))


def test_collate_alignment_audio_and_image() -> None:
    batch = collate_alignment(alignment_samples(with_image=True, with_mel=True))
    assert set(batch) == {"image", "mel", "mel_mask", "texts", "sample_ids"}
    assert batch["mel"].shape == (2, 4, 6)
    assert torch.equal(batch["mel"][1], torch.ones(4, 6))
    assert batch["mel_mask"].dtype == torch.bool
    expected_mask = torch.tensor(
        [[True, True, True, False, False, False], [True, True, True, True, False, False]]
    )
    assert torch.equal(batch["mel_mask"], expected_mask)

    audio_only = collate_alignment(alignment_samples(with_image=False, with_mel=True))
    assert set(audio_only) == {"mel", "mel_mask", "texts", "sample_ids"}


def test_collate_alignment_rejects_mixed_presence() -> None:
    mixed_image = alignment_samples()
    del mixed_image[1]["image"]
    with pytest.raises(ValueError, match=r"mixed batch: 1 of 2 samples have 'image', these do not: \['s1'\]"):
        collate_alignment(mixed_image)
    mixed_mel = alignment_samples(with_mel=True)
    del mixed_mel[0]["mel"]
    with pytest.raises(ValueError, match=r"mixed batch.*'mel'"):
        collate_alignment(mixed_mel)


def test_collate_alignment_errors() -> None:
    no_mask = alignment_samples(with_image=False, with_mel=True)
    for sample in no_mask:
        del sample["mel_mask"]
    with pytest.raises(ValueError, match="mel_mask"):
        collate_alignment(no_mask)
    with pytest.raises(ValueError, match="neither 'image' nor 'mel'"):
        collate_alignment(alignment_samples(with_image=False))
    with pytest.raises(ValueError, match="empty batch"):
        collate_alignment([])
