"""Benchmark of the VLM QA training loop on the bundled tiny recipe (configs/vlm_qa.yaml): LoRA vs QLoRA.

Runs ``streamtrain train`` in a fresh process per decoder mode — LoRA on a float32 base (the
baseline), then QLoRA (4-bit NF4 base) — for a fixed number of steps with evaluation off, and
reports from each run's metrics.jsonl (skipping the first logging window, which holds start-up):
- training samples/s and tokens/s (vision + prompt + answer tokens, and answer tokens alone,
  from the sample's mean sequence), and the ratio QLoRA / LoRA;
- the fraction of step time spent waiting for data (``train/data_wait_fraction``);
- peak memory (PSS of the trainer and its dataloader workers), sampled every 0.2 s.

The encoder is runs/alignment/best when it exists (./launch.sh alignment), else a random small
CNN laid out as an alignment checkpoint (speed does not depend on what it learned).

    python benchmarks/bench_vlm.py [--steps 60] [--json results.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.training_run import measure  # noqa: E402
from streamtrain.data.chat import IGNORE_INDEX, encode_chat  # noqa: E402
from streamtrain.models.qwen import load_tokenizer, write_tiny_qwen2  # noqa: E402
from tests.streamtrain.train.conftest import convert_sample  # noqa: E402
from tests.streamtrain.vlm.conftest import write_alignment_checkpoint  # noqa: E402

RECIPE = ROOT / "configs" / "vlm_qa.yaml"
LOG_EVERY = 10
VISION_TOKENS = 16  # the small CNN's 4x4 grid at the recipe's 32 px


def mean_tokens(decoder: Path) -> tuple[float, float]:
    """Mean tokens per training sample (vision, chat template, question, answer) and answer tokens."""
    tokenizer = load_tokenizer(str(decoder))
    rows = pq.read_table(ROOT / "sample" / "digits_qa" / "train.parquet", columns=["question", "answer"])
    total = answers = 0
    for row in rows.to_pylist():
        turn = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        encoded = encode_chat(tokenizer, turn, max_question_tokens=64, max_answer_tokens=16)
        total += VISION_TOKENS + len(encoded.input_ids)
        answers += sum(label != IGNORE_INDEX for label in encoded.labels)
    return total / rows.num_rows, answers / rows.num_rows


def run(label: str, overrides: list[str], work: Path, tokens: tuple[float, float]) -> dict[str, Any]:
    output = work / label
    command = [
        sys.executable,
        "-m",
        "streamtrain.cli",
        "train",
        str(RECIPE),
        f"output_dir={output}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = measure(label, command, env, ROOT, output)
    samples_per_s, wait, peak = result["samples_per_s"], result["data_wait_fraction"], result["peak_pss_mb"]
    result["tokens_per_s"] = samples_per_s * tokens[0]
    result["answer_tokens_per_s"] = samples_per_s * tokens[1]
    print(
        f"{label:<8} {samples_per_s:7.1f} samples/s  {result['tokens_per_s']:8.0f} tokens/s "
        f"({result['answer_tokens_per_s']:6.1f} answer tokens/s)  data wait {100 * wait:5.2f}%  "
        f"peak PSS {peak:6.0f} MB  ({result['wall_s']:.0f} s)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, e.g. data.num_workers=4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_vlm_") as tmp:
        work = Path(tmp)
        shards = convert_sample(work / "digits_qa", "digits_qa")
        decoder = write_tiny_qwen2(work / "tiny-qwen2")
        encoder = ROOT / "runs" / "alignment" / "best"
        if not (encoder / "model.safetensors").is_file():
            encoder = write_alignment_checkpoint(work / "alignment" / "best", width=64)
        print(f"encoder: {encoder}")
        tokens = mean_tokens(decoder)
        print(f"mean tokens per sample: {tokens[0]:.1f} ({tokens[1]:.2f} answer tokens)")
        common = [
            f"data.train={shards['train']}",
            "data.eval=null",
            f"model.encoder_checkpoint={encoder}",
            f"model.decoder={decoder}",
            f"train.max_steps={args.steps}",
            "checkpoint.every_steps=0",
            f"log.every_steps={LOG_EVERY}",
            "log.progress_bar=false",
            "train.warmup_steps=5",
            *args.overrides,
        ]
        # The final checkpoint is written after the last step; it is not in the windows.
        lora = run("lora", [*common, "model.mode=lora"], work, tokens)
        qlora = run("qlora", [*common, "model.mode=qlora"], work, tokens)
    ratio = qlora["samples_per_s"] / lora["samples_per_s"]
    print(f"\nQLoRA / LoRA: {ratio:.2f}x samples/s (on {os.cpu_count()} cores)")
    if args.json:
        args.json.write_text(json.dumps({"runs": [lora, qlora], "qlora_over_lora": ratio}, indent=2))


if __name__ == "__main__":
    main()
