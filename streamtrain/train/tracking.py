"""Metric trackers: a plain JSONL file in output_dir, plus Accelerate's tensorboard and wandb.

The JSONL file is kept by the main process itself rather than as an Accelerate tracker, since
Accelerate builds tracker objects on every rank before ranks are known, and rewinding the file
on resume must happen once.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from streamtrain.distributed import all_reduce_sum, world_size

METRICS_FILE = "metrics.jsonl"


class JsonlTracker:
    """One JSON line per ``log`` call: ``{"step": s, name: value, ...}`` in ``output_dir/metrics.jsonl``.

    Created with the step the run resumes from, it first drops the lines an interrupted run
    wrote after that step, so the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: str | os.PathLike[str], resume_step: int = 0) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rewind(resume_step)
        self._handle = open(self.path, "a")

    def rewind(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
        # Written beside and renamed over: a kill at any moment leaves the old file or the new one.
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, values: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def finish(self) -> None:
        self._handle.close()


class StepWindow:
    """Counters of the optimizer steps since the last log line, on this rank."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.samples = 0
        self.data_wait = 0.0
        self.elapsed = 0.0
        self.grad_norm: float | None = None

    def metrics(
        self, read_stats: dict[str, int], lr: float, epoch: float, extras: dict[str, float]
    ) -> dict[str, float]:
        """The log line of this window, summed over ranks (a collective: every rank calls it)."""
        totals = all_reduce_sum(
            {
                "loss": sum(self.losses),
                "steps": len(self.losses),
                "samples": self.samples,
                "data_wait": self.data_wait,
                "elapsed": self.elapsed,
                **{f"data/{key}": value for key, value in read_stats.items()},
            }
        )
        metrics = {
            "train/loss": totals.pop("loss") / max(1.0, totals.pop("steps")),
            "train/lr": lr,
            "train/samples_per_s": totals["samples"] / max(1e-9, totals["elapsed"] / world_size()),
            "train/data_wait_fraction": totals["data_wait"] / max(1e-9, totals["elapsed"]),
            "train/epoch": epoch,
            **{f"train/{key}": value for key, value in extras.items()},
            **{key: value for key, value in totals.items() if key.startswith("data/")},
        }
        if self.grad_norm is not None:
            metrics["train/grad_norm"] = self.grad_norm
        return metrics


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accelerate_trackers(names: list[str], output_dir: Path) -> list[str]:
    """The names for ``Accelerator(log_with=...)``; wandb stays offline unless the user logged in."""
    trackers = []
    for name in names:
        if name == "wandb":
            if not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists()):
                os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_DIR", str(output_dir))
        if name != "jsonl":
            trackers.append(name)
    return trackers
