"""What a training phase provides to the (phase-agnostic) trainer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from streamtrain.config import RunConfig


class Task(Protocol):
    """A training phase: its model, how samples are decoded and batched, its loss and evaluation."""

    ModelConfig: ClassVar[type]
    """The dataclass of the recipe's ``model`` section."""
    default_best_metric: ClassVar[str]
    """Evaluation metric that picks ``best/`` unless checkpoint.best_metric names another."""
    default_best_mode: ClassVar[str]

    def __init__(self, config: RunConfig) -> None: ...

    def build_model(self) -> nn.Module:
        """The model, on CPU, with frozen parts already frozen."""
        ...

    def decoder(self, train: bool) -> Any:
        """Per-sample decoder ``(raw, rng) -> sample`` (see streamtrain.data.decoders)."""
        ...

    def collate(self, samples: list[Any]) -> dict[str, Any]: ...

    def loss(
        self, model: nn.Module, batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch at optimizer step ``step`` (0-based), plus scalars to log."""
        ...

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Metrics over this rank's held-out batches, gathered so every rank returns the same."""
        ...

    def save_artifacts(self, model: nn.Module, directory: Path) -> None:
        """Extra files a user of the checkpoint needs (main process only; may do nothing)."""
        ...

    def summary(self, metrics: dict[str, float]) -> str:
        """A short human-readable report of final metrics."""
        ...
