"""A ring of reused shared step buffers: how dataloader workers hand a step to the loader.

Handing tensors from a worker to the main process the ordinary way costs a fresh shared-memory
segment per tensor (or per gathered field), which the main process maps and faults in page by
page, and then the loader stacks the samples of every micro-batch: a copy of every pixel. Here the
workers write their samples straight into a ring of preallocated step buffers that every process
maps once, and the main process hands each micro-batch out as a view of its buffer.

- **Layout** (``RingLayout``): one *slot* per step in flight, one *row* per sample of a rank's
  step (``per_rank``), and per tensor field of the samples either a fixed shape (decoded images,
  parameter rows) or a byte capacity (1-D fields of varying length: undecoded JPEG files). Sizes
  follow the first step: the loader reads it the ordinary way, derives the layout from its
  samples, creates the ring and announces it to the workers through a small control block they
  were given at start (``RingControl``). A later sample that does not fit (another shape, a
  longer file, a field the layout lacks) is handed over the ordinary way, alone: it still works.
- **Rows in step order**: the loader shuffles a step's samples before cutting it into
  micro-batches (a pure function of the seed, step and rank); a worker writes each sample at its
  place in that order, so every micro-batch is consecutive rows of one buffer, and stacking it is
  a view (``collate.stack``) when no sample of it is missing.
- **Recycling**: step ``s`` goes to slot ``s % slots``. The loader releases a step once it starts
  the step after the next (the batches of the step just before stay valid); a worker waits to
  write step ``s`` until step ``s - slots`` is released. There are ``prefetch + 2`` slots
  (``+ 4`` with device decoding's step-ahead thread), enough for the step being trained, the one
  before it, those read ahead and the workers' prefetch, so a worker waits only when it is that
  far ahead. Where shared memory has no room for the ring, the loader warns once and hands steps
  over the ordinary way.
- **Pinned** where training is on a GPU: the main process registers the ring's pages with CUDA
  once, so copies of its batches to the device are asynchronous DMA.

The ring lives in a file under ``/dev/shm`` (a temporary directory elsewhere). On Linux its name is
removed at once and the workers open it through the loader's descriptor (``/proc/PID/fd/N``), so
nothing is left behind even when the loader is killed; elsewhere the loader removes it when it stops
its workers, and at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import torch

ALIGN = 64
"""Byte alignment of every field and row (any dtype's view of the bytes is aligned)."""
_CONTROL_BYTES = 1 << 16
_WAIT_S = (0.0002, 0.01)
"""A worker waiting for a slot polls at first often, then at most every 10 ms (it is ahead)."""
_SERIAL = count()
_RINGS: set[Path] = set()


@atexit.register
def _remove_rings() -> None:
    for path in list(_RINGS):
        with contextlib.suppress(OSError):
            path.unlink()


@dataclass(frozen=True)
class RingField:
    """One tensor field of the samples as it lies in every row."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    """The field's shape; for a ragged field, ``(capacity,)``: the longest it may be."""
    ragged: bool
    """1-D of varying length (its length travels with the row's description)."""
    offset: int
    """Where the field's rows begin in a slot, in bytes."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def row_bytes(self) -> int:
        return _aligned(_numel(self.shape) * self.torch_dtype.itemsize)


@dataclass(frozen=True)
class RingLayout:
    """What one slot holds: ``rows`` samples of ``fields``; ``slots`` steps in flight."""

    rows: int
    slots: int
    fields: tuple[RingField, ...]

    @property
    def slot_bytes(self) -> int:
        return sum(field.row_bytes for field in self.fields) * self.rows

    @classmethod
    def of(cls, samples: list[Any], rows: int, slots: int) -> RingLayout | None:
        """The layout the tensor fields of ``samples`` (one step's) call for; None if they have none.

        A field is kept when every sample has it as a tensor of one dtype: of one shape, or 1-D
        of varying length (given room for twice the longest, at least 4 KiB).
        """
        if not samples or not all(isinstance(sample, dict) for sample in samples):
            return None
        fields, offset = [], 0
        for name, value in samples[0].items():
            values = [sample.get(name) for sample in samples]
            if not isinstance(value, torch.Tensor) or not all(
                isinstance(v, torch.Tensor) and v.dtype == value.dtype for v in values
            ):
                continue
            dtype = str(value.dtype).removeprefix("torch.")
            if all(v.shape == value.shape for v in values):
                field = RingField(name, dtype, tuple(value.shape), False, offset)
            elif all(v.dim() == 1 for v in values):
                longest = max(v.numel() for v in values) * value.dtype.itemsize
                capacity = _aligned(max(2 * longest, 4096), 4096) // value.dtype.itemsize
                field = RingField(name, dtype, (capacity,), True, offset)
            else:
                continue
            fields.append(field)
            offset += field.row_bytes * rows
        return cls(rows, slots, tuple(fields)) if fields else None

    def to_json(self) -> str:
        return json.dumps({"rows": self.rows, "slots": self.slots, "fields": [vars(f) for f in self.fields]})

    @classmethod
    def from_json(cls, text: str) -> RingLayout:
        data = json.loads(text)
        fields = tuple(
            RingField(f["name"], f["dtype"], tuple(f["shape"]), f["ragged"], f["offset"])
            for f in data["fields"]
        )
        return cls(data["rows"], data["slots"], fields)


class RingControl:
    """The few shared integers (and the announcement) between a loader and its workers.

    Made before the workers start, so they inherit it: the ring's generation (0: none yet),
    the last released step, whether the loader is stopping, and the announced ring as JSON.
    """

    def __init__(self) -> None:
        self.block = torch.zeros(_CONTROL_BYTES, dtype=torch.uint8).share_memory_()
        self.numbers = self.block[:32].view(torch.int64)
        self.numbers[1] = -(1 << 62)  # nothing released yet: steps count from 1

    @property
    def generation(self) -> int:
        return int(self.numbers[0])

    @property
    def released(self) -> int:
        return int(self.numbers[1])

    def release(self, step: int) -> None:
        """Steps up to ``step`` are consumed: their slots may be written again."""
        if step > self.released:
            self.numbers[1] = step

    @property
    def stopping(self) -> bool:
        return bool(self.numbers[2])

    def stop(self) -> None:
        self.numbers[2] = 1

    def announce(self, path: Path, layout: RingLayout) -> None:
        text = json.dumps({"path": str(path), "layout": layout.to_json()}).encode()
        if len(text) > _CONTROL_BYTES - 32:
            raise ValueError("ring layout too large to announce")
        self.block[32 : 32 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        self.numbers[3] = len(text)
        self.numbers[0] = self.generation + 1  # last: a worker reads the text only after it

    def announced(self) -> tuple[Path, RingLayout]:
        size = int(self.numbers[3])
        data = json.loads(bytes(self.block[32 : 32 + size].tolist()).decode())
        return Path(data["path"]), RingLayout.from_json(data["layout"])


class StepRing:
    """The ring's slots mapped in one process (the loader, or a worker)."""

    def __init__(self, path: Path, layout: RingLayout, generation: int) -> None:
        self.path = path
        self.layout = layout
        self.generation = generation
        self.memory = torch.from_file(
            str(path), shared=True, size=layout.slot_bytes * layout.slots, dtype=torch.uint8
        )
        self.fields = {field.name: field for field in layout.fields}
        self.views = [
            {field.name: self._field_view(slot, field) for field in layout.fields}
            for slot in range(layout.slots)
        ]
        self.pinned = False
        self.fd: int | None = None
        """The loader's descriptor of the file (workers open the ring through it)."""

    @classmethod
    def create(cls, layout: RingLayout, control: RingControl, pin: bool) -> StepRing:
        """Make the ring's file, map it, and announce it to the workers.

        OSError when there is no room for it: the space is taken up front, because a mapped
        page that cannot be backed later kills the process that touches it (SIGBUS).
        """
        folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        path = folder / f"streamtrain-ring-{os.getpid()}-{next(_SERIAL)}"
        _RINGS.add(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, layout.slot_bytes * layout.slots)
            ring = cls(path, layout, control.generation + 1)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            _RINGS.discard(path)
            raise
        ring.fd = fd
        by_fd = Path(f"/proc/{os.getpid()}/fd/{fd}")
        if by_fd.exists():
            # Workers open it through this process's descriptor, so the name can go now: a
            # process killed outright leaves nothing behind in /dev/shm.
            path.unlink()
            _RINGS.discard(path)
            ring.path = by_fd
        if pin and torch.cuda.is_available():
            ring._pin()
        control.announce(ring.path, layout)
        return ring

    def _field_view(self, slot: int, field: RingField) -> torch.Tensor:
        start = slot * self.layout.slot_bytes + field.offset
        rows = self.memory[start : start + field.row_bytes * self.layout.rows]
        per_row = rows.view(self.layout.rows, field.row_bytes)
        width = _numel(field.shape) * field.torch_dtype.itemsize
        return per_row[:, :width].view(field.torch_dtype).view(self.layout.rows, *field.shape)

    def _pin(self) -> None:
        """Page-lock the ring for asynchronous copies to the GPU (cudaHostRegister)."""
        memory = self.memory
        result = torch.cuda.cudart().cudaHostRegister(memory.data_ptr(), memory.numel(), 0)
        self.pinned = int(result) == 0

    def write(self, slot: int, row: int, sample: dict[str, Any]) -> dict[str, int]:
        """Copy the fields of ``sample`` that fit into ``row`` of ``slot``; returns them, each
        with its length (ragged) or -1."""
        written = {}
        for name, value in sample.items():
            field = self.fields.get(name)
            if field is None or not isinstance(value, torch.Tensor) or value.dtype != field.torch_dtype:
                continue
            target = self.views[slot][name][row]
            if field.ragged:
                if value.dim() != 1 or value.numel() > field.shape[0]:
                    continue
                target[: value.numel()].copy_(value)
                written[name] = value.numel()
            elif value.shape == target.shape:
                target.copy_(value)
                written[name] = -1
        return written

    def read(self, slot: int, row: int, fields: dict[str, int]) -> dict[str, torch.Tensor]:
        """Views of the fields ``write`` put in ``row`` of ``slot``."""
        views = self.views[slot]
        return {
            name: views[name][row][:length] if length >= 0 else views[name][row]
            for name, length in fields.items()
        }

    def close(self) -> None:
        """Let go of the ring here (views already handed out keep their memory)."""
        if self.pinned:
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(self.memory.data_ptr())
            self.pinned = False
        if self.fd is not None:
            if not str(self.path).startswith("/proc/"):
                with contextlib.suppress(OSError):
                    self.path.unlink()
                _RINGS.discard(self.path)
            os.close(self.fd)
            self.fd = None


class RingWriter:
    """A worker's side: maps the ring once announced, and waits for a step's slot to be free."""

    def __init__(self, control: RingControl) -> None:
        self.control = control
        self.ring: StepRing | None = None
        self.parent = os.getppid()

    def current(self) -> StepRing | None:
        """The ring announced by now (None before the first one)."""
        generation = self.control.generation
        if generation and (self.ring is None or self.ring.generation != generation):
            path, layout = self.control.announced()
            self.ring = StepRing(path, layout, generation)
        return self.ring

    def wait_for_slot(self, ring: StepRing, step: int) -> bool:
        """Wait until step ``step``'s slot is free; False when the loader is stopping."""
        pause = _WAIT_S[0]
        while self.control.released < step - ring.layout.slots:
            if self.control.stopping or os.getppid() != self.parent:
                return False
            time.sleep(pause)
            pause = min(2 * pause, _WAIT_S[1])
        return not self.control.stopping


def slots_for(prefetch_factor: int, ahead: bool) -> int:
    """Slots a ring needs: the step trained and the one before it, the workers' prefetch, and
    with a step-ahead thread (device decoding) the two steps it holds and reads."""
    return prefetch_factor + (4 if ahead else 2)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _aligned(size: int, unit: int = ALIGN) -> int:
    return -(-size // unit) * unit
