"""Using an alignment run: `streamtrain eval` of its checkpoints, `export`, and `load_encoder`.

One tiny in-process run for the module (6 steps, evaluated and checkpointed at 3 and 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from shardify.format import MANIFEST_NAME
from shardify.tarread import iter_samples
from streamtrain import cli, load_encoder, load_vlm
from streamtrain.config import load_config
from streamtrain.data.images import ImageTransform
from streamtrain.data.transforms import decode_image
from streamtrain.errors import UserError
from streamtrain.inference.evaluate import evaluate_checkpoint
from streamtrain.inference.export import export
from streamtrain.metrics import retrieval_metrics
from streamtrain.tasks import TASKS, model_types
from streamtrain.train.tracking import read_metrics
from streamtrain.train.trainer import Trainer
from tests.streamtrain.train.conftest import ROOT, tiny_overrides

RECIPE = ROOT / "configs" / "alignment.yaml"
EVAL_SAMPLES, EVAL_BATCH, IMAGE_SIZE, DIMS = 64, 32, 16, (16, 32)


@pytest.fixture(scope="module")
def run(digits_shards: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("alignment-use") / "run"
    steps = {
        "train.max_steps": 6,
        "checkpoint.every_steps": 3,
        "eval.every_steps": 3,
        "checkpoint.keep_last": 3,
    }
    overrides = tiny_overrides(digits_shards, out, **steps)
    config = load_config(RECIPE, overrides, model_types())
    trainer = Trainer(config, TASKS["alignment"](config))
    final = trainer.fit()
    return {"out": out, "overrides": overrides, "model": trainer.backend.unwrapped().eval(), "final": final}


def logged_eval(out: Path, step: int) -> dict[str, float]:
    (record,) = [m for m in read_metrics(out) if m["step"] == step and "eval/samples" in m]
    return {key: value for key, value in record.items() if key != "step"}


def test_eval_reproduces_the_metrics_the_run_logged(run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = run["out"]
    config = load_config(RECIPE, run["overrides"], model_types())
    report = evaluate_checkpoint(config, str(out / "step-00000003"))
    assert report.step == 3
    assert report.metrics == logged_eval(out, 3)  # every logged number, exactly

    assert (
        cli.main(
            ["eval", str(RECIPE), *run["overrides"], "--checkpoint", str(out / "step-00000006"), "--json"]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["step"] == 6 and printed["metrics"] == logged_eval(out, 6)


def test_eval_on_another_held_out_set_prints_a_table(
    run: dict, digits_shards: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    other = [f"data.eval={digits_shards['train']}", "eval.max_samples=32"]
    assert cli.main(["eval", str(RECIPE), *run["overrides"], *other]) == 0  # best/ of output_dir
    table = capsys.readouterr().out
    assert "image_to_text R@1/5/10" in table.splitlines()[0] and "(step " in table.splitlines()[0]
    rows = dict(line.split() for line in table.splitlines()[2:])
    assert float(rows["eval/samples"]) == 32 and "image_to_text/R@1/dim32" in rows


def _held_out_samples(folder: Path, count: int) -> list[dict]:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    samples = [s for shard in manifest["shards"] for s in iter_samples(str(folder / shard["name"]))]
    return samples[:count]


def test_exported_encoder_embeds_as_the_trained_model_and_recalls_as_eval(
    run: dict, digits_shards: dict[str, Path], tmp_path: Path
) -> None:
    exported = export(run["out"] / "step-00000006", tmp_path / "encoder")
    encoder = load_encoder(exported, device="cpu")
    assert encoder.dims == list(DIMS) and encoder.embed_dim == DIMS[-1]

    samples = _held_out_samples(digits_shards["eval"], EVAL_SAMPLES)  # what eval reads, in its order
    images = [decode_image(s.get("jpg") or s["png"], IMAGE_SIZE) for s in samples]
    texts = [s["txt"].decode() for s in samples]
    image_emb = encoder.embed_images(images, batch_size=EVAL_BATCH)
    text_emb = encoder.embed_texts(texts, batch_size=EVAL_BATCH)
    assert image_emb.shape == text_emb.shape == (EVAL_SAMPLES, DIMS[-1])
    assert torch.allclose(image_emb.norm(dim=1), torch.ones(EVAL_SAMPLES))

    model, transform = run["model"], ImageTransform(IMAGE_SIZE, train=False)
    with torch.no_grad():
        pixels = torch.stack([transform(image) for image in images])
        trained_image = torch.cat([model.encode_image(chunk) for chunk in pixels.split(EVAL_BATCH)])
        trained_text = torch.cat(
            [model.encode_text(texts=texts[i : i + EVAL_BATCH]) for i in range(0, 64, 32)]
        )
    for dim in DIMS:
        assert torch.equal(
            encoder.embed_images(images, dim, EVAL_BATCH), F.normalize(trained_image[:, :dim], dim=1)
        )
        assert torch.equal(
            encoder.embed_texts(texts, dim, EVAL_BATCH), F.normalize(trained_text[:, :dim], dim=1)
        )

    recalls = retrieval_metrics(image_emb, text_emb, texts, DIMS, "image")
    for dim in DIMS:
        for direction in ("image_to_text", "text_to_image"):
            assert recalls[f"{direction}/R@1/dim{dim}"] == run["final"][f"{direction}/R@1/dim{dim}"]
    with pytest.raises(ValueError, match="dim 64"):
        encoder.embed_texts(["a thin handwritten one"], dim=64)
    with pytest.raises(UserError, match=r"load it with streamtrain\.load_encoder"):
        load_vlm(exported)  # an export of the other phase


def test_user_mistakes_are_one_line_and_exit_2(
    run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty-run"
    empty.mkdir()
    image = tmp_path / "digit.png"
    Image.new("RGB", (8, 8), "white").save(image)
    cases = [
        ["eval", str(RECIPE), *run["overrides"], "--checkpoint", str(empty)],
        ["export", str(empty), "--output", str(tmp_path / "x")],
        ["export", str(run["out"]), "--output", str(RECIPE.parent)],  # a folder holding other files
        ["ask", str(run["out"]), "--image", str(RECIPE), "what is this?"],  # not an image
        ["ask", str(run["out"]), "--image", str(image), "what is this?"],  # not a VLM run
    ]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("streamtrain: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    with pytest.raises(Exception, match="not a streamtrain export"):
        load_encoder(empty)
