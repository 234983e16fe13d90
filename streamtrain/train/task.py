"""The contract between the phase-agnostic trainer and a training phase (``streamtrain.tasks``).

It lives here, beside the loop that calls it, so that imports point one way: tasks import this
contract, the trainer never imports a task. Every hook the trainer calls is declared below;
those with a body are optional and their body is the default.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from streamtrain.config import RunConfig

Decode = Any
"""``(raw sample, random.Random) -> sample``; see streamtrain.data.decoders."""


class Task:
    """A training phase: its model, how samples are decoded and batched, its loss and evaluation.

    Subclasses are constructed with the resolved config and raise ``streamtrain.errors.UserError``
    for settings they cannot use, before any model is built.
    """

    ModelConfig: ClassVar[type]
    """The dataclass of the recipe's ``model`` section."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    # -- required ------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """The model, on CPU, with frozen parts already frozen."""
        raise NotImplementedError

    def decoder(self, train: bool, on_device: bool = False) -> Decode:
        """Per-sample decoder for training (augmenting) or evaluation (deterministic); with
        ``on_device``, images are left as bytes and parameters for the training device to decode
        (``streamtrain.data.decoders.image_fields``). The trainer passes ``on_device`` only when
        the device decodes, so a task without the parameter works wherever workers decode."""
        raise NotImplementedError

    def collate(self, samples: list[Any]) -> dict[str, Any]:
        """Decoded samples -> one batch; it carries ``"sample_ids"``."""
        raise NotImplementedError

    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch at optimizer step ``step`` (0-based), plus scalars to log."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Metrics over this rank's held-out batches, gathered so every rank returns the same."""
        raise NotImplementedError

    def summary(self, metrics: dict[str, float]) -> str:
        """A short human-readable report of evaluation metrics."""
        raise NotImplementedError

    # -- optional ------------------------------------------------------------------------------

    def best_metric(self) -> tuple[str, Literal["max", "min"]]:
        """The evaluation metric that picks ``best/``, and whether larger is better, unless
        ``checkpoint.best_metric`` names another."""
        return "eval/loss", "min"

    def place_model(self, model: nn.Module, device: torch.device) -> bool:
        """Put ``model`` on ``device`` before it is wrapped for training.

        Return True when the task placed it itself, because some parts must not be moved by a
        blanket ``.to()`` (bitsandbytes-quantized weights go to their device as they load); the
        default returns False and the accelerator moves the whole model.
        """
        return False

    def save_artifacts(self, model: nn.Module, directory: Path) -> None:
        """Files beyond the weights that a user of a checkpoint needs (adapters, a projector).

        Called on the main process for every checkpoint and ``best/``, with the unwrapped model.
        """
