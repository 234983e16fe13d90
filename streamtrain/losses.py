"""Contrastive losses over the global batch: InfoNCE, its Matryoshka form and the logit scale."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

from streamtrain import distributed


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' rows of `x` concatenated in rank order, differentiable; identity in a single process.

    The backward pass sums each rank's gradient for a slot back into the rank that owns it
    (a reduce-scatter), so every rank's loss reaches every rank's embeddings, as in open_clip.
    Ranks may hold different numbers of rows (a batch that lost unreadable samples).
    """
    return _gather_rows(x)[0]


def _gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """``gather_with_grad(x)`` and the global index of this rank's first row."""
    if distributed.world_size() == 1:
        return x, 0
    # all_gather needs one shape on every rank: pad to the largest batch, then trim each slot.
    sizes = distributed.gather_sizes(x.shape[0])
    padded = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))])
    parts = dist_fn.all_gather(padded)
    gathered = torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)
    return gathered, sum(sizes[: distributed.rank()])


class LogitScale(nn.Module):
    """The learnable (or fixed) inverse temperature that multiplies cosine similarities.

    It is stored as a log so that gradient steps stay positive; the scale is clamped at
    `1 / min_temperature` (CLIP clamps at 100) so it cannot sharpen the softmax without bound.
    """

    log_scale: Tensor

    def __init__(self, temperature: float = 0.07, learnable: bool = True, min_temperature: float = 0.01):
        super().__init__()
        if not 0 < min_temperature <= temperature:
            raise ValueError(
                f"need 0 < min_temperature <= temperature, got {min_temperature=} and {temperature=}"
            )
        # Shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views, which
        # a 0-dim tensor cannot give.
        log_scale = torch.tensor([math.log(1.0 / temperature)])
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_scale = 1.0 / min_temperature

    def forward(self) -> Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale).squeeze(0)

    @property
    def temperature(self) -> float:
        """The current temperature 1/scale, for logging."""
        return 1.0 / float(self.forward().detach())


def _gather_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, int]:
    """Both sides' global batches (one collective for the two) and this rank's first global row."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"need two [B, D] embeddings of one shape, got {list(a.shape)} and {list(b.shape)}")
    gathered, first_row = _gather_rows(torch.cat([a, b], dim=1))
    a_all, b_all = gathered.split(a.shape[1], dim=1)
    return a_all, b_all, first_row


def _info_nce_gathered(
    a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor, logit_scale: Tensor, first_row: int
) -> Tensor:
    """Symmetric InfoNCE of the local rows `a`, `b` against the gathered columns; inputs unnormalized."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    a_all, b_all = F.normalize(a_all, dim=-1), F.normalize(b_all, dim=-1)
    targets = torch.arange(first_row, first_row + a.shape[0], device=a.device)
    a_to_b = F.cross_entropy(logit_scale * a @ b_all.T, targets)
    b_to_a = F.cross_entropy(logit_scale * b @ a_all.T, targets)
    return (a_to_b + b_to_a) / 2


def info_nce(a: Tensor, b: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE of this rank's pairs (row i of `a` with row i of `b`) over the global batch.

    Each local row is scored against every rank's rows. With equal batch sizes the mean over
    ranks of this local loss is the single-process loss of the global batch, and DDP's
    gradient averaging then gives exactly the single-process gradients.
    """
    a_all, b_all, first_row = _gather_pair(a, b)
    return _info_nce_gathered(a, b, a_all, b_all, logit_scale, first_row)


def matryoshka_info_nce(
    a: Tensor, b: Tensor, logit_scale: Tensor, dims: Sequence[int], dim: int | None = None
) -> tuple[Tensor, dict[int, float]]:
    """InfoNCE of the first d features for each d in `dims`, equally weighted (only `dim` if given).

    Returns the loss and each dim's detached loss value.
    """
    used_dims = list(dims) if dim is None else [dim]
    if not used_dims or not all(0 < d <= a.shape[1] for d in used_dims):
        raise ValueError(f"Matryoshka dims must be in 1..{a.shape[1]}, got {used_dims}")
    # Gather the full embeddings once and slice them per dim: one collective per step, not per dim.
    a_all, b_all, first_row = _gather_pair(a, b)
    losses = torch.stack(
        [
            _info_nce_gathered(a[:, :d], b[:, :d], a_all[:, :d], b_all[:, :d], logit_scale, first_row)
            for d in used_dims
        ]
    )
    per_dim = dict(zip(used_dims, losses.detach().tolist(), strict=True))  # one device sync for all dims
    return losses.mean(), per_dim


def pick_mrl_dim(dims: Sequence[int], seed: int, step: int) -> int:
    """One of `dims`, uniformly, as a pure function of (seed, step): equal on all ranks and after a resume."""
    return random.Random(seed * 1_000_003 + step).choice(list(dims))
