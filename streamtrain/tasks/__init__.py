"""Training phases, by the name a recipe's ``task`` key uses."""

from __future__ import annotations

from streamtrain.tasks.alignment import AlignmentTask
from streamtrain.tasks.vlm_qa import VLMTask

TASKS: dict[str, type] = {"alignment": AlignmentTask, "vlm_qa": VLMTask}


def model_types() -> dict[str, type]:
    """Task name -> the dataclass of its ``model`` section (``streamtrain.config.models.MODEL_TYPES``)."""
    return {name: task.ModelConfig for name, task in TASKS.items()}
