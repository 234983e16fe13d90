"""``streamtrain eval``: a checkpoint's held-out metrics, computed as its run computed them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from streamtrain.config import RunConfig
from streamtrain.data.pipeline import decode_device, held_out_reader, resolve_sources
from streamtrain.errors import UserError
from streamtrain.inference.saved import (
    build_task,
    check_same_model,
    find_checkpoint,
    load_trained_model,
    saved_step,
)
from streamtrain.train.backend import Backend
from streamtrain.train.evaluation import evaluate_sources, held_out


@dataclass
class EvalReport:
    checkpoint: Path
    step: int | None
    metrics: dict[str, float]
    """Named as the run logs them (``eval/...``, ``image_to_text/R@1/dim128``, ...)."""
    summary: str
    """The task's one-line report, as the run prints it."""

    def to_dict(self) -> dict[str, object]:
        return {"checkpoint": str(self.checkpoint), "step": self.step, "metrics": self.metrics}

    def table(self) -> str:
        width = max(len(name) for name in self.metrics)
        step = "" if self.step is None else f" (step {self.step})"
        lines = [f"{self.checkpoint}{step}: {self.summary}", f"{'metric':<{width}}  value"]
        lines += [f"{name:<{width}}  {value:.6g}" for name, value in sorted(self.metrics.items())]
        return "\n".join(lines)


def evaluate_checkpoint(config: RunConfig, checkpoint_path: str | None = None) -> EvalReport:
    """Held-out metrics of the checkpoint (default: ``output_dir``'s best/, else its newest step)
    on ``config.data.eval``, with the config's eval settings."""
    directory = find_checkpoint(checkpoint_path or config.output_dir, "--checkpoint")
    check_same_model(config, directory)
    if not config.data.eval:
        raise UserError("data.eval is not set: name the held-out set, e.g. data.eval=PATH")
    eval_data = resolve_sources(config.data.eval, "data.eval")
    # Evaluation needs neither DeepSpeed's engine nor the run's trackers.
    config = dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, deepspeed=None),
        log=dataclasses.replace(config.log, trackers=[]),
    )
    backend = Backend(config, Path(config.output_dir))
    task = build_task(config)
    model = load_trained_model(task, directory)
    placed = task.place_model(model, backend.device)
    model = backend.prepare_for_eval(model, placed)
    decode_on = decode_device(config.data, backend.device, eval_data)
    decode = task.decoder(train=False) if decode_on is None else task.decoder(train=False, on_device=True)
    acc = backend.accelerator
    reader = held_out_reader(
        config.data,
        config.eval,
        eval_data,
        rank=acc.process_index,
        world_size=acc.num_processes,
        decode=decode,
        collate=task.collate,
        decode_device=decode_on,
    )
    with reader:
        _, logged, summary = evaluate_sources(
            eval_data, lambda part: held_out(task, model, reader, part, backend.to_device), task.summary
        )
    return EvalReport(directory, saved_step(directory), logged, summary)
