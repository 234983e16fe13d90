"""One benchmarked training run: a ``streamtrain train`` command in a fresh process, its peak
memory sampled every 0.2 s, its speed read from the run's metrics.jsonl.

Shared by bench_train.py and bench_vlm.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil


def tree_pss_mb(process: psutil.Process) -> float:
    """Proportional set size of the process tree: forked workers share pages, RSS would count them twice."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_full_info().pss
        except psutil.Error:
            continue
    return total / 1e6


def measure(label: str, command: list[str], env: dict[str, str], cwd: Path, output: Path) -> dict[str, Any]:
    """Run ``command`` (a training run writing ``output``/metrics.jsonl) to its end; returns the
    mean samples/s and data-wait fraction of its logging windows (the first, which holds
    start-up, left out), its peak PSS in MB and its wall time. Exits with its stderr if it fails."""
    started = time.perf_counter()
    child = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    watcher, peak = psutil.Process(child.pid), 0.0
    while child.poll() is None:
        peak = max(peak, tree_pss_mb(watcher))
        time.sleep(0.2)
    if child.returncode != 0:
        raise SystemExit(f"{label} failed:\n{child.stderr.read()[-3000:]}")  # type: ignore[union-attr]
    windows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "train/samples_per_s" in w][1:]
    return {
        "label": label,
        "samples_per_s": sum(w["train/samples_per_s"] for w in windows) / len(windows),
        "data_wait_fraction": sum(w["train/data_wait_fraction"] for w in windows) / len(windows),
        "peak_pss_mb": peak,
        "wall_s": time.perf_counter() - started,
    }
