from __future__ import annotations

import pytest
import torch

from streamtrain.data.collate import IGNORE_INDEX, collate_alignment, collate_vlm

EOS = 2
PAD = 99


def image(value: float, size: int = 8) -> torch.Tensor:
    return torch.full((3, size, size), value)


def vlm_samples() -> list[dict]:
    return [
        {"sample_id": "a", "image": image(0.0), "question_ids": [11, 12, 13], "answer_ids": [21, 22, EOS]},
        {"sample_id": "b", "image": image(1.0), "question_ids": [31], "answer_ids": [41, EOS]},
    ]


def test_collate_vlm_pads_masks_and_labels() -> None:
    batch = collate_vlm(vlm_samples(), pad_token_id=PAD)
    expected_input_ids = torch.tensor([[11, 12, 13, 21, 22, 2], [31, 41, 2, 99, 99, 99]])
    expected_attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    expected_labels = torch.tensor([[-100, -100, -100, 21, 22, 2], [-100, 41, 2, -100, -100, -100]])
    assert torch.equal(batch["input_ids"], expected_input_ids)
    assert torch.equal(batch["attention_mask"], expected_attention_mask)
    assert torch.equal(batch["labels"], expected_labels)
    assert torch.equal(batch["question_lengths"], torch.tensor([3, 1]))
    for key in ("input_ids", "attention_mask", "labels", "question_lengths"):
        assert batch[key].dtype == torch.long, key
    assert batch["sample_ids"] == ["a", "b"]
    assert batch["image"].shape == (2, 3, 8, 8)
    assert torch.equal(batch["image"][1], image(1.0))
    assert IGNORE_INDEX == -100


def test_collate_vlm_pad_equal_to_eos_keeps_the_answer_eos() -> None:
    # Qwen pads with its EOS id: padding must still be masked and ignored, the real EOS learned.
    batch = collate_vlm(vlm_samples(), pad_token_id=EOS)
    assert torch.equal(batch["input_ids"], torch.tensor([[11, 12, 13, 21, 22, 2], [31, 41, 2, 2, 2, 2]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]))
    assert torch.equal(
        batch["labels"], torch.tensor([[-100, -100, -100, 21, 22, 2], [-100, 41, 2, -100, -100, -100]])
    )


def test_collate_vlm_empty_question() -> None:
    samples = [{"sample_id": "a", "image": image(0.0), "question_ids": [], "answer_ids": [5, EOS]}]
    batch = collate_vlm(samples, pad_token_id=PAD)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 2]]))
    assert torch.equal(batch["labels"], torch.tensor([[5, 2]]))
    assert torch.equal(batch["question_lengths"], torch.tensor([0]))


def test_collate_vlm_errors() -> None:
    no_answer = vlm_samples()
    no_answer[1]["answer_ids"] = []
    with pytest.raises(ValueError, match="'b' has no answer tokens"):
        collate_vlm(no_answer, pad_token_id=PAD)
    other_size = vlm_samples()
    other_size[0]["image"] = image(0.0, size=16)
    with pytest.raises(ValueError, match="shapes differ"):
        collate_vlm(other_size, pad_token_id=PAD)
    with pytest.raises(ValueError, match="empty batch"):
        collate_vlm([], pad_token_id=PAD)


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
