"""What a dataloader worker sends the loader for one step, and where each sample goes in it.

A rank's step is ``per_rank`` samples, shuffled (a pure function of seed, step and rank) and cut
into micro-batches. Every process works out the same shuffle, so a worker knows each of its
samples' *row*, its place in the shuffled step: it writes the sample's tensors into that row of
the step's ring slot (ring.py) and sends only a description (``Packed``): which rows it filled,
the samples' other fields (ids, captions), and, gathered the ordinary way, whatever did not fit
the ring (before the ring exists, that is everything). The loader puts the rows together and
cuts micro-batches as consecutive rows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from streamtrain.data.lanes import derive_seed
from streamtrain.data.ring import StepRing


def step_order(seed: int, step: int, rank: int, size: int) -> list[int]:
    """The step's slots (sources in order, each source's samples in ``t`` order) as shuffled:
    ``order[row]`` is the slot at ``row``."""
    order = list(range(size))
    random.Random(derive_seed("step-order", seed, step, rank)).shuffle(order)
    return order


def step_rows(seed: int, step: int, rank: int, size: int) -> list[int]:
    """Per slot, its row in the shuffled step (the inverse of ``step_order``)."""
    rows = [0] * size
    for row, slot in enumerate(step_order(seed, step, rank, size)):
        rows[slot] = row
    return rows


@dataclass
class Packed:
    """One worker's samples of a step: rows, fields in the ring, and the rest gathered.

    Tensor fields not in the ring are gathered one tensor per field (one shared-memory segment
    each, not one per sample): fields of one shape are stacked, 1-D fields of differing lengths
    are laid end to end. The loader takes them apart as views.
    """

    rows: list[int]
    stacked: dict[str, torch.Tensor]
    rest: list[Any]
    """Per row: the sample's other fields (a dict), or the sample itself when not a dict."""
    lengths: dict[str, list[int]] = field(default_factory=dict)
    """Per field laid end to end: each sample's length."""
    ring: int = 0
    """Generation of the ring holding fields of these samples (0: none)."""
    in_ring: list[dict[str, int]] = field(default_factory=list)
    """Per row: the fields written to the ring, with their lengths (``StepRing.write``)."""

    @classmethod
    def of(cls, placed: list[tuple[int, Any]], in_worker: bool, ring: StepRing | None, step: int) -> Packed:
        """``placed``: (row, sample or None); the samples' fields that fit go into ``ring``'s
        slot of ``step``, the rest is gathered (into shared memory ``in_worker``)."""
        kept = [(row, sample) for row, sample in placed if sample is not None]
        in_ring: list[dict[str, int]] = []
        if ring is not None:
            slot = step % ring.layout.slots
            for k, (row, sample) in enumerate(kept):
                written = ring.write(slot, row, sample) if isinstance(sample, dict) else {}
                in_ring.append(written)
                if written:
                    kept[k] = (row, {key: v for key, v in sample.items() if key not in written})
        samples = [sample for _, sample in kept]
        stacked: dict[str, torch.Tensor] = {}
        lengths: dict[str, list[int]] = {}
        if samples and all(isinstance(sample, dict) for sample in samples):
            for key, value in samples[0].items():
                if not isinstance(value, torch.Tensor):
                    continue
                values = [sample.get(key) for sample in samples]
                if not all(isinstance(v, torch.Tensor) and v.dtype == value.dtype for v in values):
                    continue
                if all(v.shape == value.shape for v in values):
                    stacked[key] = _gathered(values, (len(values), *value.shape), torch.stack, in_worker)
                elif all(v.dim() == 1 for v in values):
                    total = (sum(len(v) for v in values),)
                    stacked[key] = _gathered(values, total, torch.cat, in_worker)
                    lengths[key] = [len(v) for v in values]
            rest = [{k: v for k, v in sample.items() if k not in stacked} for sample in samples]
        else:
            rest = samples
        generation = ring.generation if ring is not None else 0
        return cls([row for row, _ in kept], stacked, rest, lengths, generation, in_ring)

    def items(self, ring: StepRing | None, step: int) -> list[tuple[int, Any]]:
        """``(row, sample)`` pairs again: fields in the ring and gathered fields come back as views."""
        fields: dict[str, Sequence[torch.Tensor]] = {}
        for key, tensor in self.stacked.items():
            fields[key] = tensor.split(self.lengths[key]) if key in self.lengths else tensor.unbind()
        if self.ring and (ring is None or ring.generation != self.ring):
            raise RuntimeError(
                f"a data worker wrote into step ring {self.ring}, which the loader does not have"
            )
        pairs = []
        for k, (row, rest) in enumerate(zip(self.rows, self.rest, strict=True)):
            sample = rest
            if fields:
                sample = {**rest, **{key: parts[k] for key, parts in fields.items()}}
            if self.ring and self.in_ring[k]:
                assert ring is not None
                sample = {**sample, **ring.read(step % ring.layout.slots, row, self.in_ring[k])}
            pairs.append((row, sample))
        return pairs


def _gathered(
    values: list[torch.Tensor], shape: tuple[int, ...], gather: Any, in_worker: bool
) -> torch.Tensor:
    out = torch.empty(shape, dtype=values[0].dtype)
    if in_worker:  # straight into shared memory, as default_collate does in a worker
        out.share_memory_()
    return gather(values, out=out)
