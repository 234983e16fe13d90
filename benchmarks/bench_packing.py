"""Benchmark of sequence packing (``data.pack``) against one sample per row, at equal peak memory.

A stream of synthetic VLM samples whose lengths follow a PixMo-like mix (short questions, multi-turn
conversations, document Q/A lists, long captions, pointing answers; ``MIX`` below) goes through the
real ``collate_vlm`` and a real model: the small CNN encoder (64 px images, 64 vision tokens), a
small Qwen2 decoder of Qwen2's vocabulary (``--width``, ``--layers``; LoRA, float32) and the VLM's
forward and backward pass, as in training.

- unpacked: ``--batch`` samples a step, each row padded to the step's longest sample;
- packed: rows of ``--max-seq-len`` filled first-fit decreasing, with as many samples a step as
  keep every step's batch tensor (rows x width) within the unpacked run's widest: the same
  largest activations. The answer loss runs in chunks (``answer_loss_sum``), so the logits of a
  150k vocabulary do not grow with the tokens a step learns, and peak memory follows the batch
  tensor.

Each mode runs in a fresh process (its peak RSS is its own), on the same sample stream, for
``--steps`` timed steps after one warm-up step. Reported: real (non-pad) tokens per step, tokens/s
(real tokens over wall time of forward + backward), padded positions per step, and peak RSS; then
the ratios packed / unpacked.

    python benchmarks/bench_packing.py [--steps 8] [--batch 8] [--max-seq-len 1024] [--width 128]
                                       [--layers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from streamtrain.data.chat import IGNORE_INDEX  # noqa: E402
from streamtrain.data.collate import collate_vlm, pack_rows  # noqa: E402

VISION_TOKENS = 64  # the small CNN's 8x8 grid at 64 px
SYSTEM_TOKENS = 20  # ChatML's default system turn
TURN_TOKENS = 10  # the template's tokens around one question and its answer
MIX = [  # (share, name, turns, question tokens, answer tokens): PixMo's sets, roughly
    (0.35, "ask-model-anything", (1, 1), (10, 60), (20, 150)),
    (0.25, "cap-qa", (2, 6), (10, 30), (10, 60)),
    (0.15, "docs", (5, 15), (15, 40), (3, 20)),
    (0.15, "cap", (1, 1), (6, 12), (100, 350)),
    (0.10, "points", (1, 4), (8, 12), (5, 40)),
]


def sample_lengths(rng: random.Random, max_seq_len: int) -> list[tuple[int, int]]:
    """One sample's turns as (prompt, answer) token counts, whole turns dropped past max_seq_len."""
    pick, chosen = rng.random(), MIX[-1]
    for entry in MIX:
        pick -= entry[0]
        if pick <= 0:
            chosen = entry
            break
    _, _, turns, question, answer = chosen
    parts = [(TURN_TOKENS + rng.randint(*question), rng.randint(*answer)) for _ in range(rng.randint(*turns))]
    room = max_seq_len - VISION_TOKENS - SYSTEM_TOKENS
    kept = []
    for prompt, reply in parts:
        if sum(p + a for p, a in kept) + prompt + reply > room:
            break
        kept.append((prompt, reply))
    if not kept:
        kept = [(parts[0][0], room - parts[0][0])]
    kept[0] = (kept[0][0] + SYSTEM_TOKENS, kept[0][1])
    return kept


def make_sample(index: int, turns: list[tuple[int, int]], rng: random.Random, image: torch.Tensor) -> dict:
    ids, labels = [], []
    for prompt, reply in turns:
        tokens = [rng.randrange(150_000) for _ in range(prompt + reply)]
        ids += tokens
        labels += [IGNORE_INDEX] * prompt + tokens[prompt:]
    return {
        "sample_id": str(index),
        "image": image,
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
    }


def stream(seed: int, max_seq_len: int) -> Any:
    rng = random.Random(seed)
    index = 0
    while True:
        yield index, sample_lengths(rng, max_seq_len)
        index += 1


def _steps_of(size: int, steps: int, max_seq_len: int, seed: int) -> list[list[int]]:
    """Each step's sample lengths (vision tokens included), warm-up step first."""
    source = stream(seed, max_seq_len)
    return [
        [VISION_TOKENS + sum(p + a for p, a in next(source)[1]) for _ in range(size)]
        for _ in range(steps + 1)
    ]


def widest_unpacked(batch: int, steps: int, max_seq_len: int, seed: int) -> int:
    """The largest batch tensor (rows x width) of the unpacked run: its peak of memory."""
    return max(batch * max(lengths) for lengths in _steps_of(batch, steps, max_seq_len, seed))


def packed_batch_size(steps: int, widest: int, max_seq_len: int, seed: int) -> int:
    """The most samples a step whose packed rows never make a tensor wider than ``widest``."""
    size = 1
    while True:
        for lengths in _steps_of(size + 1, steps, max_seq_len, seed):
            rows = pack_rows(lengths, max_seq_len)
            if len(rows) * max(sum(lengths[i] for i in row) for row in rows) > widest:
                return size
        size += 1


def child(
    mode: str, batch: int, steps: int, max_seq_len: int, seed: int, width: int, layers: int
) -> dict[str, Any]:
    from streamtrain.models.decoder import LoraSettings, load_decoder
    from streamtrain.models.qwen import tiny_qwen2_config, write_tiny_qwen2
    from streamtrain.models.vision import SmallCNNEncoder
    from streamtrain.models.vlm import VisionLanguageModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        write_tiny_qwen2(
            folder,
            tiny_qwen2_config(hidden_size=width, layers=layers, heads=width // 32, kv_heads=width // 64),
        )
        decoder = load_decoder(folder, "lora", torch.float32, torch.device("cpu"), LoraSettings(), False)
    model = VisionLanguageModel(SmallCNNEncoder(16), decoder, [151645], 151643, None, width).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng, source, image = random.Random(seed + 1), stream(seed, max_seq_len), torch.zeros(3, 64, 64)
    totals = {"real_tokens": 0, "padded_positions": 0, "samples": 0, "rows": 0, "seconds": 0.0, "widest": 0}
    for step in range(steps + 1):
        samples = [make_sample(i, turns, rng, image) for i, turns in (next(source) for _ in range(batch))]
        rows = collate_vlm(samples, 151643, VISION_TOKENS, mode == "packed", max_seq_len)
        started = time.perf_counter()
        loss = model(rows)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            continue  # warm-up: allocations, kernels
        totals["seconds"] += time.perf_counter() - started
        totals["real_tokens"] += int(rows["sample_lengths"].sum())
        totals["padded_positions"] += rows["input_ids"].numel()
        totals["samples"] += len(samples)
        totals["rows"] += len(rows["input_ids"])
        totals["widest"] = max(totals["widest"], rows["input_ids"].numel())
    return {
        "mode": mode,
        "batch": batch,
        "real_tokens_per_step": totals["real_tokens"] / steps,
        "padded_positions_per_step": totals["padded_positions"] / steps,
        "samples_per_step": totals["samples"] / steps,
        "rows_per_step": totals["rows"] / steps,
        "widest_batch_positions": totals["widest"],
        "tokens_per_s": totals["real_tokens"] / totals["seconds"],
        "seconds_per_step": totals["seconds"] / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode (default: %(default)s)")
    parser.add_argument(
        "--batch", type=int, default=8, help="unpacked samples (rows) a step (default: %(default)s)"
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=1024, help="positions a row (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=128, help="decoder hidden size (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", choices=("packed", "unpacked"), help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        found = child(
            args.child, args.child_batch, args.steps, args.max_seq_len, args.seed, args.width, args.layers
        )
        print(json.dumps(found))
        return
    widest = widest_unpacked(args.batch, args.steps, args.max_seq_len, args.seed)
    packed_batch = packed_batch_size(args.steps, widest, args.max_seq_len, args.seed)
    results = []
    for mode, batch in (("unpacked", args.batch), ("packed", packed_batch)):
        command = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--child-batch",
            str(batch),
            "--steps",
            str(args.steps),
            "--max-seq-len",
            str(args.max_seq_len),
            "--seed",
            str(args.seed),
            "--width",
            str(args.width),
            "--layers",
            str(args.layers),
        ]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    unpacked, packed = results
    header = ("mode", "samples", "rows", "widest", "real tok", "padded", "tok/s", "peak RSS")
    print("{:<9} {:>7} {:>5} {:>7} {:>9} {:>8} {:>8} {:>9}".format(*header))
    for r in results:
        print(
            f"{r['mode']:<9} {r['samples_per_step']:7.1f} {r['rows_per_step']:5.1f} "
            f"{r['widest_batch_positions']:7d} {r['real_tokens_per_step']:9.0f} "
            f"{r['padded_positions_per_step']:8.0f} {r['tokens_per_s']:8.0f} {r['peak_rss_mb']:7.0f} MB"
        )
    ratios = {
        "real_tokens_per_step": packed["real_tokens_per_step"] / unpacked["real_tokens_per_step"],
        "tokens_per_s": packed["tokens_per_s"] / unpacked["tokens_per_s"],
        "peak_rss": packed["peak_rss_mb"] / unpacked["peak_rss_mb"],
        "widest_batch": packed["widest_batch_positions"] / unpacked["widest_batch_positions"],
    }
    print(
        f"packed / unpacked: real tokens per step {ratios['real_tokens_per_step']:.2f}x (goal >= 1.8), "
        f"tokens/s {ratios['tokens_per_s']:.2f}x, peak RSS {ratios['peak_rss']:.2f}x, "
        f"widest batch tensor {ratios['widest_batch']:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
