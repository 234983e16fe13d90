"""The VLM on hand-checked sequences: prompt and labels, greedy decoding, QLoRA's frozen parts, placement."""

from __future__ import annotations

import json
import random
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from streamtrain.config import ConfigError, build_config
from streamtrain.data.chat import encode_chat
from streamtrain.data.collate import IGNORE_INDEX, collate_vlm
from streamtrain.data.decoders import ChatDecoder
from streamtrain.models.decoder import LoraSettings, load_decoder
from streamtrain.models.qwen import tiny_qwen2, tiny_qwen2_config
from streamtrain.models.vision import SmallCNNEncoder
from streamtrain.models.vlm import VisionLanguageModel, pool_grid
from streamtrain.tasks import model_types
from streamtrain.tasks.vlm_qa import VLMTask
from tests import factories

IM_START, IM_END, NEWLINE = 151644, 151645, 198
# "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", token by token.
SYSTEM_AND_USER = [
    IM_START,
    8948,
    NEWLINE,
    2610,
    525,
    264,
    10950,
    17847,
    13,
    IM_END,
    NEWLINE,
    IM_START,
    872,
    NEWLINE,
]
ASSISTANT = [IM_END, NEWLINE, IM_START, 77091, NEWLINE]  # "<|im_end|>\n<|im_start|>assistant\n"
WHAT_DIGIT = [3838, 15723, 374, 5326, 1588, 30]  # "What digit is written here?"
SEVEN, ODD = 80185, 14556
VISION_TOKENS = 16  # a 32 px image through the small CNN: a 4x4 grid
PROJECTOR = ("projector.", "feature_norm.")  # the trainable vision-to-decoder mapping


def raw_sample(key: str, question: str, answer: str, seed: int) -> dict:
    metadata = {"question": question, "answer": answer, "sample_id": key}
    return {"__key__": key, "json": json.dumps(metadata).encode(), "jpg": factories.jpeg(32, 32, seed=seed)}


def build_vlm(decoder_dir: Path, mode: str, tokenizer, seed: int = 0) -> VisionLanguageModel:
    """The VLM over a fixed random encoder (as if loaded from one checkpoint); ``seed`` draws the rest."""
    torch.manual_seed(0)
    encoder = SmallCNNEncoder(16)
    torch.manual_seed(seed)
    decoder = load_decoder(
        str(decoder_dir), mode, torch.float32, torch.device("cpu"), LoraSettings(dropout=0.0), False
    )
    return VisionLanguageModel(encoder, decoder, [tokenizer.eos_token_id], tokenizer.pad_token_id, None, 32)


def qa_batch(tokenizer, pack: bool = False) -> tuple[list[dict], dict]:
    decoder = ChatDecoder(tokenizer, image_size=32, train=False, vision_tokens=VISION_TOKENS)
    samples = [
        decoder(raw_sample("a", "What digit is written here?", "seven", 0), random.Random(0)),
        decoder(raw_sample("b", "Is this digit odd or even?", "odd", 1), random.Random(0)),
        decoder(
            raw_sample("c", "Which number does this image show? Look closely.", "two", 2), random.Random(0)
        ),
    ]
    return samples, collate_vlm(samples, tokenizer.pad_token_id, VISION_TOKENS, pack, 512)


def test_prompt_and_labels_on_hand_checked_sequences(chat_tokenizer, tiny_decoder: Path) -> None:
    samples, batch = qa_batch(chat_tokenizer)
    first = samples[0]
    prompt = SYSTEM_AND_USER + WHAT_DIGIT + ASSISTANT
    assert first["input_ids"].tolist() == [*prompt, SEVEN, IM_END]
    assert first["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + [SEVEN, IM_END]
    assert samples[1]["labels"].tolist()[-2:] == [ODD, IM_END]
    # Tokenizing the template's parts apart gives exactly the chat template's own tokens.
    messages = [{"role": "user", "content": "What digit is written here?"}]
    templated = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert prompt == list(templated["input_ids"])

    model = build_vlm(tiny_decoder, "lora", chat_tokenizer)
    inputs = model.training_inputs(batch)
    width = inputs["labels"].shape[1]
    assert width == VISION_TOKENS + max(len(s["input_ids"]) for s in samples)
    for row, sample in enumerate(samples):
        padding = width - VISION_TOKENS - len(sample["input_ids"])
        expected = [IGNORE_INDEX] * VISION_TOKENS + sample["labels"].tolist() + [IGNORE_INDEX] * padding
        assert inputs["labels"][row].tolist() == expected, row
        assert inputs["attention_mask"][row].tolist() == [1] * (width - padding) + [0] * padding
    assert inputs["inputs_embeds"].shape == (3, width, 128)
    # The image's tokens sit in each row's vision slots, the text's embeddings after them.
    vision = model.encode_images(batch["image"])
    assert torch.equal(inputs["inputs_embeds"][:, :VISION_TOKENS], vision)
    text = model._embed_tokens(samples[1]["input_ids"][None])[0]
    assert torch.equal(inputs["inputs_embeds"][1, VISION_TOKENS : VISION_TOKENS + len(text)], text)

    out = model(batch)
    answers = [s["labels"][s["labels"] != IGNORE_INDEX].tolist() for s in samples]
    assert out["labels"].tolist() == [SEVEN, IM_END, ODD, IM_END, *answers[2]]
    assert int(out["answer_tokens"]) == sum(len(a) for a in answers)
    # The same loss from all logits of a plain forward pass, shifted by hand.
    full = model.decoder(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"])
    reference = F.cross_entropy(
        full.logits[:, :-1].reshape(-1, 151936).float(), inputs["labels"][:, 1:].reshape(-1)
    )
    assert float(out["loss"]) == pytest.approx(float(reference), rel=1e-5)


def _greedy_without_cache(model: VisionLanguageModel, image, prompt_ids, steps: int) -> list[int]:
    """One row, no padding, no KV cache: the whole sequence re-run for every new token."""
    embeds = torch.cat([model.encode_images(image[None]), model._embed_tokens(prompt_ids[None])], dim=1)
    tokens = []
    for _ in range(steps):
        token = model.decoder(inputs_embeds=embeds).logits[0, -1].argmax()
        tokens.append(int(token))
        embeds = torch.cat([embeds, model._embed_tokens(token.view(1, 1))], dim=1)
    return tokens


@pytest.fixture(scope="module")
def untied_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny decoder whose output head is not its input embedding: with a tied head, a random
    model mostly repeats its last input token, which would make any decoding loop look right."""
    config = tiny_qwen2_config()
    config.tie_word_embeddings = False
    directory = tmp_path_factory.mktemp("untied")
    tiny_qwen2(config, seed=3).save_pretrained(directory)
    return directory


@torch.no_grad()
def test_greedy_generation_with_cache_and_left_padding_matches_a_plain_loop(
    chat_tokenizer, untied_decoder: Path
) -> None:
    samples, batch = qa_batch(chat_tokenizer)
    model = build_vlm(untied_decoder, "lora", chat_tokenizer).eval()
    prompts = [s["input_ids"][s["labels"] == IGNORE_INDEX] for s in samples]  # the prompt: all but the answer
    for prompt, sample in zip(prompts, samples, strict=True):
        question = [{"role": "user", "content": sample["questions"][0]}]
        assert prompt.tolist() == encode_chat(chat_tokenizer, question, add_generation_prompt=True).input_ids
    lengths = torch.tensor([len(p) for p in prompts])
    assert len(set(lengths.tolist())) == 3  # every row is padded differently
    padded = torch.nn.utils.rnn.pad_sequence(
        prompts, batch_first=True, padding_value=chat_tokenizer.pad_token_id
    )
    expected = [_greedy_without_cache(model, batch["image"][row], prompts[row], 6) for row in range(3)]
    assert len({token for row in expected for token in row}) > 3  # a loop that copies would differ
    generated = model.generate_answers(batch["image"], padded, lengths, 6)
    assert generated.tolist() == expected

    # A row stops at its first stop token, keeps it, and is padding after it.
    stop = expected[0][2]
    model.stop_token_ids = torch.tensor([stop])
    stopped = model.generate_answers(batch["image"], padded, lengths, 6).tolist()
    pad = chat_tokenizer.pad_token_id
    for row in range(3):
        cut = expected[row].index(stop) + 1 if stop in expected[row] else 6
        assert stopped[row] == expected[row][:cut] + [pad] * (6 - cut)
    assert stopped[0][-1] == pad

    # Every turn of a batch, packed or not, is answered from its own prompt.
    model.stop_token_ids = torch.tensor([IM_END])
    reference = model.generate_answers(batch["image"], padded, lengths, 6).tolist()
    for packed in (False, True):
        _, batch = qa_batch(chat_tokenizer, pack=packed)
        turns, references, indices = model.answer_turns(batch, 6, chunk=2)
        by_id = dict(zip(batch["sample_ids"], turns.tolist(), strict=True))
        assert [by_id[key] for key in "abc"] == reference
        assert indices == [0, 0, 0] and all(r[-1] == IM_END for r in references)


def conversation_samples(tokenizer, count: int = 7) -> list[dict]:
    """Samples of one to three turns with answers of different lengths, as the decoder makes them."""
    decoder = ChatDecoder(tokenizer, image_size=32, train=False, vision_tokens=VISION_TOKENS)
    rng = random.Random(5)
    samples = []
    for index in range(count):
        messages = []
        for turn in range(1 + index % 3):
            messages.append({"role": "user", "content": f"Question {turn} about picture {index}?"})
            words = " ".join(
                rng.choice(["red", "seven", "a bold stroke", "odd"]) for _ in range(1 + rng.randrange(9))
            )
            messages.append({"role": "assistant", "content": words})
        metadata = {"sample_id": f"s{index}", "messages": messages}
        raw = {
            "__key__": f"s{index}",
            "json": json.dumps(metadata).encode(),
            "jpg": factories.jpeg(32, 32, seed=index),
        }
        samples.append(decoder(raw, random.Random(0)))
    return samples


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_same_summed_loss_and_gradients(
    chat_tokenizer, tiny_decoder: Path, attention: str
) -> None:
    samples = conversation_samples(chat_tokenizer)
    model = build_vlm(tiny_decoder, "lora", chat_tokenizer)
    model.decoder.set_attn_implementation(attention)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A without a gradient
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    results = {}
    for pack in (False, True):
        batch = collate_vlm(samples, chat_tokenizer.pad_token_id, VISION_TOKENS, pack, max_seq_len=200)
        model.zero_grad()
        out = model(batch)
        summed = out["loss"] * out["answer_tokens"]  # the mean over answer tokens, times their count
        summed.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[pack] = (summed.detach(), grads, batch)
    (unpacked, unpacked_grads, plain), (packed, packed_grads, rows) = results[False], results[True]
    assert (
        len(rows["input_ids"]) < len(plain["input_ids"]) == len(samples) and rows["input_ids"].shape[1] <= 200
    )
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)
    assert set(packed_grads) == set(unpacked_grads) and any("lora_A" in n for n in packed_grads)
    for name, grad in unpacked_grads.items():  # equal up to float32 summation order
        assert grad.norm() > 0 and (packed_grads[name] - grad).norm() / grad.norm() < 1e-5, name
    # The same rows with samples seeing each other (one causal mask per row) give another loss.
    with torch.no_grad():
        leaky = model({**rows, "packed": False})
    assert abs(float(leaky["loss"] * leaky["answer_tokens"]) - float(packed)) > 1e-2


def test_qlora_trains_adapters_and_projector_only_and_survives_generation(
    chat_tokenizer, tiny_decoder: Path
) -> None:
    _, batch = qa_batch(chat_tokenizer)
    model = build_vlm(tiny_decoder, "qlora", chat_tokenizer)
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in model.decoder.modules())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith(PROJECTOR) for name in trainable)
    encoder_before = {name: t.clone() for name, t in model.vision.state_dict().items()}
    adapters_before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def train_step() -> float:
        model.train()
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss)

    losses = [train_step() for _ in range(3)]
    model.eval()
    # bitsandbytes would repack an eval-mode 4-bit layer for CPU inference (on AVX512-BF16 CPUs),
    # breaking later training; the model keeps those layers in training mode to rule that out.
    assert all(m.training for m in model.decoder.modules() if isinstance(m, bnb.nn.Linear4bit))
    model.answer_turns(batch, 3)  # evaluation generates on this very model object ...
    losses.append(train_step())  # ... and training carries on afterwards
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert not model.vision.training  # .train() leaves the frozen encoder in eval mode
    for name, tensor in model.vision.state_dict().items():
        assert torch.equal(tensor, encoder_before[name]), name  # bit-identical, BN statistics included
    assert all(
        not torch.equal(p, adapters_before[n]) for n, p in model.named_parameters() if n in adapters_before
    )

    # Checkpoints hold the trainable tensors only, and a fresh model takes them strictly.
    state = model.state_dict()
    assert set(state) == trainable
    fresh = build_vlm(tiny_decoder, "qlora", chat_tokenizer, seed=1)
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(batch)["loss"], model(batch)["loss"])
    with pytest.raises(RuntimeError, match="projector"):
        fresh.load_state_dict({k: v for k, v in state.items() if not k.startswith("projector.")})


def test_place_moves_everything_but_a_quantized_decoder(chat_tokenizer, tiny_decoder: Path) -> None:
    meta = torch.device("meta")  # a device nothing is computed on: where each part went is all we read
    quantized = build_vlm(tiny_decoder, "qlora", chat_tokenizer).place(meta)
    assert {p.device.type for p in quantized.vision.parameters()} == {"meta"}
    assert {p.device.type for p in quantized.projector.parameters()} == {"meta"}
    assert quantized.stop_token_ids.device.type == "meta"
    assert {p.device.type for p in quantized.decoder.parameters()} == {"cpu"}
    plain = build_vlm(tiny_decoder, "lora", chat_tokenizer).place(meta)
    assert {p.device.type for p in plain.parameters()} == {"meta"}


def test_pool_grid_averages_square_blocks() -> None:
    tokens = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # a 4x4 grid, row-major
    assert pool_grid(tokens, 4).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_grid(tokens, None) is tokens and pool_grid(tokens, 16) is tokens
    assert pool_grid(tokens, 8).shape == (1, 8, 1)  # not square: pooled along the sequence


def _config(**model: object):
    raw = {"task": "vlm_qa", "output_dir": "out", "data": {"train": "x"}, "model": model}
    return build_config(raw, model_types())


def test_model_config_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        _config(lora_r=0, lora_dropout=1.5, mode="full", base_dtype="bfloat16", max_new_tokens=0)
    text = str(caught.value)
    for expected in ("model.lora_r", "model.lora_dropout", "model.base_dtype", "model.max_new_tokens"):
        assert expected in text
    with pytest.raises(ConfigError, match=r"model\.mode"):
        _config(mode="int8")


def test_missing_encoder_says_what_to_run_first(tmp_path: Path, tiny_decoder: Path) -> None:
    config = _config(encoder_checkpoint=str(tmp_path / "nowhere"), decoder=str(tiny_decoder))
    with pytest.raises(ValueError, match=r"\./launch\.sh alignment"):
        VLMTask(config)


def test_encoder_checkpoint_may_name_the_alignment_run(
    tmp_path: Path, alignment_checkpoint: Path, tiny_decoder: Path
) -> None:
    run = alignment_checkpoint.parent
    task = VLMTask(_config(encoder_checkpoint=str(run), decoder=str(tiny_decoder)))
    assert task.encoder_dir == alignment_checkpoint
    assert task.stop_token_ids == [IM_END]
    assert task.vision_tokens == (224 // 8) ** 2  # the small CNN's grid at the default 224 px


def test_full_fine_tuning_makes_the_decoder_trainable_and_saves_it(
    tmp_path: Path, alignment_checkpoint: Path, tiny_decoder: Path
) -> None:
    task = VLMTask(
        _config(encoder_checkpoint=str(alignment_checkpoint), decoder=str(tiny_decoder), mode="full")
    )
    model = task.build_model()
    decoder_parameters = list(model.decoder.parameters())
    assert all(p.requires_grad for p in decoder_parameters)
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert set(model.state_dict()) >= {f"decoder.{name}" for name, _ in model.decoder.named_parameters()}
    task.save_artifacts(model, tmp_path)
    assert (tmp_path / "decoder" / "config.json").exists() and not (tmp_path / "adapter").exists()
    assert set(load_file(tmp_path / "projector.safetensors")) == set(model.projector_state_dict())


def test_the_answer_loss_in_chunks_equals_one_pass_and_its_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamtrain.models import vlm

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    whole = F.cross_entropy(head(hidden), targets, reduction="sum")
    expected = torch.autograd.grad(whole, [hidden, head.weight])
    monkeypatch.setattr(vlm, "LOSS_CHUNK_LOGITS", 5 * 50)  # chunks of 5 positions
    chunked = vlm.answer_loss_sum(head, hidden, targets)
    torch.testing.assert_close(chunked, whole)
    for got, want in zip(torch.autograd.grad(chunked, [hidden, head.weight]), expected, strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(vlm.answer_loss_sum(head, hidden, targets), whole.detach())
