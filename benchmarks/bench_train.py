"""Benchmark of the alignment training loop on the bundled sample recipe (configs/alignment.yaml).

Runs ``streamtrain train`` in fresh processes — one process, then two (torchrun, gloo) — for a
fixed number of steps with evaluation and checkpoints off, and reports from each run's
metrics.jsonl (skipping the first logging window, which holds start-up):
- training samples/s (all ranks together) and the ratio 2 processes / 1 process;
- the fraction of step time spent waiting for data at the recipe's default workers
  (goal: under 5%), and, as the baseline the workers are measured against, the same run
  with ``data.num_workers=0`` (decoding in the training process);
- peak memory (PSS, summed over trainer processes and dataloader workers), sampled every 0.2 s.

    python benchmarks/bench_train.py [--steps 120] [--json results.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.training_run import measure  # noqa: E402
from tests.streamtrain.train.conftest import convert_sample  # noqa: E402

RECIPE = ROOT / "configs" / "alignment.yaml"
LOG_EVERY = 10


def run(label: str, nproc: int, overrides: list[str], work: Path) -> dict[str, Any]:
    output = work / label
    module = ["-m", "streamtrain.cli", "train", str(RECIPE), f"output_dir={output}", *overrides]
    if nproc == 1:
        command = [sys.executable, *module]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            *module,
        ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))}
    result = measure(label, command, env, ROOT, output)
    result["processes"] = nproc
    samples_per_s, wait, peak = result["samples_per_s"], result["data_wait_fraction"], result["peak_pss_mb"]
    print(
        f"{label:<28} {samples_per_s:8.1f} samples/s   data wait {100 * wait:5.2f}%   "
        f"peak PSS {peak:7.0f} MB   ({result['wall_s']:.0f} s)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, e.g. data.num_workers=4")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        shards = convert_sample(work / "digits")
        common = [
            f"data.train={shards['train']}",
            f"data.eval={shards['eval']}",
            f"train.max_steps={args.steps}",
            "eval.every_steps=0",
            "checkpoint.every_steps=0",
            f"log.every_steps={LOG_EVERY}",
            "log.progress_bar=false",
            "train.warmup_steps=5",
            *args.overrides,
        ]
        # Evaluation and the final checkpoint run after the last step; they are not in the windows.
        single = run("1 process", 1, common, work)
        double = run("2 processes (gloo)", 2, common, work)
        inline = run("1 process, num_workers=0", 1, [*common, "data.num_workers=0"], work)
    scaling = double["samples_per_s"] / single["samples_per_s"]
    print(f"\n2 processes / 1 process: {scaling:.2f}x samples/s (on {os.cpu_count()} cores)")
    print(
        f"data wait at the default workers: {100 * single['data_wait_fraction']:.2f}% (1 process), "
        f"{100 * double['data_wait_fraction']:.2f}% (2 processes); goal < 5%. "
        f"Baseline without workers: {100 * inline['data_wait_fraction']:.1f}%"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": [single, double, inline], "scaling": scaling}, indent=2))


if __name__ == "__main__":
    main()
