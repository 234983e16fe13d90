"""Using a VLM run: `streamtrain eval` of its checkpoint, `export` (adapters merged), `load_vlm`, `ask`.

One in-process QLoRA run for the module, on an encoder that tells the digits apart, long enough
that some held-out answers are right and some wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from shardify.format import MANIFEST_NAME
from shardify.tarread import iter_samples
from streamtrain import cli, load_encoder, load_vlm
from streamtrain.config import load_config
from streamtrain.errors import UserError
from streamtrain.inference.evaluate import evaluate_checkpoint
from streamtrain.inference.export import export
from streamtrain.qa_metrics import answer_metrics
from streamtrain.tasks import TASKS, model_types
from streamtrain.train.tracking import read_metrics
from streamtrain.train.trainer import Trainer
from tests.streamtrain.train.conftest import ROOT, env
from tests.streamtrain.vlm.conftest import fit_digit_encoder, write_alignment_checkpoint
from tests.streamtrain.vlm.test_vlm_run import vlm_overrides

RECIPE = ROOT / "configs" / "vlm_qa.yaml"
STEPS, EVAL_SAMPLES = 30, 24

PLAIN_TRANSFORMERS = """
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, inputs, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
given = load_file(inputs)
questions = ["What digit is written here?", "Is this digit odd or even?"]
text = tokenizer(questions, return_tensors="pt", padding=True)
with torch.no_grad():
    embeds = model(inputs_embeds=given["inputs_embeds"], attention_mask=given["attention_mask"]).logits
    tokens = model(**text).logits
assert not [name for name in sys.modules if name.split(".")[0] in ("streamtrain", "shardify")]
save_file({"embeds": embeds, "tokens": tokens, **{k: v.contiguous() for k, v in text.items()}}, out)
"""


@pytest.fixture(scope="module")
def run(qa_shards: dict[str, Path], tiny_decoder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("vlm-use")
    encoder = write_alignment_checkpoint(folder / "alignment" / "best", width=32, encoder=fit_digit_encoder())
    out = folder / "run"
    overrides = vlm_overrides(
        qa_shards,
        encoder,
        tiny_decoder,
        out,
        **{
            "train.max_steps": STEPS,
            "train.warmup_steps": 5,
            "model.gradient_checkpointing": "false",
            "checkpoint.every_steps": STEPS,
            "eval.every_steps": STEPS,
            "eval.max_samples": EVAL_SAMPLES,
            "log.every_steps": 10,
        },
    )
    config = load_config(RECIPE, overrides, model_types())
    task = TASKS["vlm_qa"](config)
    trainer = Trainer(config, task)
    trainer.fit()
    final = out / f"step-{STEPS:08d}"
    return {
        "out": out,
        "final": final,
        "overrides": overrides,
        "task": task,
        "model": trainer.backend.unwrapped(),
    }


@pytest.fixture(scope="module")
def exported(run: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(run["final"], tmp_path_factory.mktemp("vlm-export") / "vlm")


def logged_eval(out: Path, step: int) -> dict[str, float]:
    (record,) = [m for m in read_metrics(out) if m["step"] == step and "eval/samples" in m]
    return {key: value for key, value in record.items() if key != "step"}


def held_out(folder: Path, count: int) -> list[dict]:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    samples = [s for shard in manifest["shards"] for s in iter_samples(str(folder / shard["name"]))]
    return samples[:count]


def test_eval_reproduces_the_logged_metrics(run: dict) -> None:
    config = load_config(RECIPE, run["overrides"], model_types())
    report = evaluate_checkpoint(config, str(run["final"]))
    assert report.step == STEPS and report.metrics == logged_eval(run["out"], STEPS)


def test_exported_decoder_loads_in_plain_transformers_with_the_training_logits(
    run: dict, exported: Path, qa_shards: dict[str, Path], tmp_path: Path
) -> None:
    task, model = run["task"], run["model"].eval()
    decode = task.decoder(train=False)
    batch = task.collate([decode(raw, None) for raw in held_out(qa_shards["eval"], 4)])
    with torch.no_grad():
        inputs = model.training_inputs(batch)
    save_file(
        {"inputs_embeds": inputs["inputs_embeds"].contiguous(), "attention_mask": inputs["attention_mask"]},
        str(tmp_path / "inputs.safetensors"),
    )
    files = [str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")]
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN_TRANSFORMERS,
            str(exported / "decoder"),
            *files,
        ],
        capture_output=True,
        text=True,
        env={**env(), "PYTHONPATH": ""},
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plain = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        embeds = model.decoder(**inputs, use_cache=False).logits
        tokens = model.decoder(
            input_ids=plain["input_ids"], attention_mask=plain["attention_mask"], use_cache=False
        ).logits
    assert embeds.abs().max() > 1.0  # a trained, confident head, not all-zero logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(plain["embeds"][real], embeds[real], rtol=1e-4, atol=1e-4)
    real = plain["attention_mask"].bool()
    torch.testing.assert_close(plain["tokens"][real], tokens[real], rtol=1e-4, atol=1e-4)


def test_ask_answers_held_out_questions_with_the_accuracy_eval_reports(
    run: dict, exported: Path, qa_shards: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    by_question: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for index, raw in enumerate(held_out(qa_shards["eval"], EVAL_SAMPLES)):
        row = json.loads(raw["json"])
        image = tmp_path / f"{index:03d}.{'png' if 'png' in raw else 'jpg'}"
        image.write_bytes(raw.get("png") or raw["jpg"])
        by_question[row["question"]].append((image, row["answer"]))
    predictions, references = [], []
    for question, items in by_question.items():
        images = [arg for image, _ in items for arg in ("--image", str(image))]
        assert cli.main(["ask", str(exported), *images, question]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split(": ", 1)[0] for line in lines] == [str(image) for image, _ in items]
        predictions += [line.split(": ", 1)[1] for line in lines]
        references += [answer for _, answer in items]
    accuracy = answer_metrics(predictions, references)["exact_match"]
    logged = logged_eval(run["out"], STEPS)["eval/exact_match"]
    assert 0 < logged < 1 and accuracy == logged, (accuracy, logged)

    # The run folder itself (its best/: the same step, adapters unmerged) answers as its export.
    question, items = next(iter(by_question.items()))
    images = [arg for image, _ in items for arg in ("--image", str(image))]
    assert cli.main(["ask", str(run["out"]), *images, question]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"{image}: {answer}" for (image, _), answer in zip(items, predictions, strict=False)]


def test_an_export_of_the_wrong_phase_or_a_broken_image_is_refused(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UserError, match=r"load it with streamtrain\.load_vlm"):
        load_encoder(exported)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    assert cli.main(["ask", str(exported), "--image", str(broken), "What digit is written here?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"streamtrain: error: --image {broken}") and err.count("\n") == 1
    vlm = load_vlm(exported, device="cpu")
    assert vlm.max_new_tokens == 8 and vlm.ask([], "What digit is written here?") == []
    (answer,) = vlm.ask([Image.new("RGB", (64, 64), "white")], "What digit is written here?")
    assert isinstance(answer, str)
