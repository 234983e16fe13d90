"""A checkpoint as something to use: finding it, its config, and the trained model it holds."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.utils import set_seed
from torch import nn

from streamtrain.config import RunConfig, load_config
from streamtrain.errors import UserError
from streamtrain.tasks import TASKS, model_types
from streamtrain.train import checkpoint
from streamtrain.train.task import Task


def find_checkpoint(path: str | Path, what: str = "checkpoint") -> Path:
    """The checkpoint ``path`` names: a step folder or best/ itself, or a run folder's best/, else
    its newest complete step. UserError (one line) when there is none."""
    found = checkpoint.find_saved_model(path)
    if found is not None:
        return found
    if not Path(path).exists():
        raise UserError(f"{what}: {path} does not exist")
    raise UserError(
        f"{what}: {path} holds no checkpoint ({checkpoint.describe_saved_model()} in it, in its "
        "best/ or in a complete step-* folder); train first, or name a step folder"
    )


def saved_step(directory: Path) -> int | None:
    """The step the weights in ``directory`` were saved at (a step folder's marker, best/'s metrics)."""
    step = checkpoint.marker_step(directory)
    if step is not None:
        return step
    try:
        return int(json.loads((directory / "metrics.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def saved_config(directory: Path, overrides: list[str] | None = None) -> RunConfig:
    """The resolved config saved beside the weights in ``directory``."""
    return load_config(directory / checkpoint.CONFIG_FILE, overrides or [], model_types())


def check_same_model(config: RunConfig, directory: Path) -> None:
    """UserError unless the checkpoint in ``directory`` was trained with ``config``'s task and model."""
    saved = checkpoint.read_saved_config(directory)
    now = config.to_dict()
    changed = [
        f"{section}: saved {saved.get(section)!r}, now {now[section]!r}"
        for section in ("task", "model")
        if saved.get(section) != now[section]
    ]
    if changed:
        raise UserError(
            f"{directory} is a checkpoint of another model than the config describes ({'; '.join(changed)}); "
            f"give the config it was trained with (it is saved as {directory / checkpoint.CONFIG_FILE})"
        )


def build_task(config: RunConfig) -> Task:
    return TASKS[config.task](config)


def load_trained_model(task: Task, directory: Path) -> nn.Module:
    """The task's model with the weights saved in ``directory`` (frozen parts rebuilt from their
    sources, as the trainer builds them), on the CPU unless the task places parts as they load."""
    set_seed(task.config.train.seed)
    model = task.build_model()
    try:
        weights = checkpoint.load_saved_weights(directory)
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise UserError(f"cannot read the weights in {directory}: {error}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(
            f"the weights in {directory} do not fit the model its config describes "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()
