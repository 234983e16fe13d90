"""The checkpoint manager: when to save, how a step folder is written, which folders stay, best/,
which checkpoint a run resumes from, and loading it safely. The loop only calls ``save(step)``,
``update_best(step, metrics)``, ``find_resume()`` and ``load(directory)``.

A checkpoint is made of parts handed to the manager:

- the **model state** (model, optimizer, scheduler, RNG: whatever the training engine keeps,
  written by every rank; see ``ModelState``),
- **global states**: ``Stateful`` parts equal on every rank, written once by the main process as
  ``<name>_state.json`` (the trainer's counters: ``trainer_state.json``, written last),
- **rank states**: ``Stateful`` parts of each rank, ``<name>/rank-RRRRR.json`` (each rank's data
  stream position: ``data/rank-00000.json``),
- the resolved config (``config.yaml``) and the task's artifacts (adapters, projector).

Every part goes into ``.tmp-step-XXXXXXXX`` first; the main process renames the folder into
place and writes the completion marker last (see ``checkpoint.publish``). ``best/`` is staged
the same way and swapped in whole.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from safetensors import SafetensorError

from streamtrain import distributed
from streamtrain.config import CheckpointConfig, RunConfig
from streamtrain.errors import UserError
from streamtrain.train import checkpoint


class Stateful(Protocol):
    """A part of training state that round-trips through JSON-able values."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelState(Protocol):
    """The engine-held part of a checkpoint: weights, optimizer, scheduler, RNG."""

    def save(self, directory: Path, step: int) -> None:
        """Called on every rank; writes ``checkpoint.WEIGHTS_FILE`` among its files."""
        ...

    def save_weights(self, directory: Path, step: int) -> None:
        """Called on every rank (gathering may be a collective); the main process writes
        ``checkpoint.WEIGHTS_FILE`` only."""
        ...

    def load(self, directory: Path) -> None:
        """Called on every rank; loads tensors and plain values only (pickle.UnpicklingError else)."""
        ...


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed: incomplete, of another model or topology, or unsafe."""


class CheckpointManager:
    """Owns ``output_dir``'s step folders and ``best/`` for one run."""

    def __init__(
        self,
        output_dir: Path,
        settings: CheckpointConfig,
        run_config: RunConfig,
        model: ModelState,
        *,
        global_states: dict[str, Stateful],
        rank_states: dict[str, Stateful],
        write_artifacts: Callable[[Path], None] = lambda directory: None,
        best_metric: tuple[str, str],
    ) -> None:
        """``best_metric``: (metric name, "max" or "min") that picks best/."""
        self.output_dir = output_dir
        self.settings = settings
        self.run_config = run_config
        self.model = model
        self.global_states = global_states
        self.rank_states = rank_states
        self.write_artifacts = write_artifacts
        self.best_metric, self.best_mode = best_metric
        self.best: dict[str, Any] = {}
        """{"metric", "value", "step"} of the weights in best/ (part of the trainer's state)."""

    # -- saving --------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        every = self.settings.every_steps
        return bool(every) and step % every == 0

    def save(self, step: int, *, force: bool = False) -> Path | None:
        """Write the checkpoint of ``step`` if one is due (or ``force``); its folder, or None.

        Every rank calls it. A failed write (full disk, quota, I/O error) removes what it left
        and raises CheckpointWriteError naming the folder; the previous checkpoint stays intact.
        """
        if not (force or self.due(step)):
            return None
        name = checkpoint.step_dir_name(step)
        staging = self.output_dir / f"{checkpoint.TMP_PREFIX}{name}"
        try:
            self._stage(name)
            self._write_parts(staging, step)
            distributed.barrier()
            if distributed.rank() == 0:
                checkpoint.publish(staging, self.output_dir, step)
        except (OSError, RuntimeError, SafetensorError) as exc:
            raise checkpoint.discard_failed_write(staging, self.output_dir, step, exc) from exc
        if distributed.rank() == 0:
            checkpoint.rotate(self.output_dir, self.settings.keep_last, self.settings.keep_every_steps)
        distributed.barrier()
        return self.output_dir / name

    def _stage(self, name: str) -> Path:
        """An empty staging folder for ``name``, created by the main process, seen by every rank."""
        staging = self.output_dir / f"{checkpoint.TMP_PREFIX}{name}"
        if distributed.rank() == 0:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        distributed.barrier()
        return staging

    def _write_parts(self, staging: Path, step: int) -> None:
        rank = distributed.rank()
        self.model.save(staging, step)
        for name, state in self.rank_states.items():
            (staging / name).mkdir(exist_ok=True)
            checkpoint.write_json_atomic(_rank_file(staging, name, rank), state.state_dict())
        if rank == 0:
            self.write_artifacts(staging)
            (staging / checkpoint.CONFIG_FILE).write_text(self.run_config.to_yaml())
            for name, state in self.global_states.items():  # the trainer's counters come last
                checkpoint.write_json_atomic(staging / _global_file(name), state.state_dict())

    def update_best(self, step: int, metrics: dict[str, float]) -> bool:
        """Keep ``step``'s weights in best/ when ``metrics`` beat the best so far; every rank calls it."""
        if self.best_metric not in metrics:
            raise UserError(
                f"checkpoint.best_metric: evaluation has no {self.best_metric!r}; "
                f"it reports {', '.join(sorted(metrics))}"
            )
        value = metrics[self.best_metric]
        previous = self.best.get("value")
        if not math.isfinite(value) or not (previous is None or _better(value, previous, self.best_mode)):
            return False
        self.best = {"metric": self.best_metric, "value": value, "step": step}
        staging = self._stage(checkpoint.BEST)
        self.model.save_weights(staging, step)
        if distributed.rank() == 0:
            self.write_artifacts(staging)
            (staging / checkpoint.CONFIG_FILE).write_text(self.run_config.to_yaml())
            checkpoint.write_json_atomic(staging / "metrics.json", {"step": step, **metrics})
            checkpoint.replace_dir(staging, self.output_dir / checkpoint.BEST)
        distributed.barrier()
        return True

    # -- resuming ------------------------------------------------------------------------------

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint ``train.resume`` (auto, none or a path) names, checked to be this model's."""
        output = self.output_dir
        if output.exists() and not output.is_dir():
            raise UserError(f"output_dir: {output} exists and is not a directory")
        if resume == "none":
            if checkpoint.latest_complete(output) is not None:
                raise UserError(
                    f"{output} already holds checkpoints and train.resume=none: pick another output_dir, "
                    "or train.resume=auto to continue that run"
                )
            return None
        if resume == "auto":
            if distributed.rank() == 0:
                checkpoint.remove_stale(output)
            distributed.barrier()
            found = checkpoint.latest_complete(output)
        else:
            found = Path(resume)
            if not checkpoint.is_complete(found):
                raise CheckpointError(
                    f"train.resume={resume}: not a complete checkpoint (no {checkpoint.MARKER})"
                )
        if found is not None:
            self._check_same_model(found)
        return found

    def _check_same_model(self, found: Path) -> None:
        try:
            saved = checkpoint.read_saved_config(found)
        except ValueError as exc:
            raise CheckpointError(f"cannot read the config saved in {found}: {exc}") from None
        now = self.run_config.to_dict()
        changed = [
            f"{section}: saved {saved.get(section)!r}, now {now[section]!r}"
            for section in ("task", "model")
            if saved.get(section) != now[section]
        ]
        if changed:
            raise CheckpointError(
                f"{found} is a checkpoint of a different model ({'; '.join(changed)}). "
                "Use another output_dir, or train.resume=none in a fresh one."
            )

    def load(self, directory: Path) -> None:
        """Restore every part from ``directory``; nothing but tensors and plain values is unpickled."""
        rank = distributed.rank()
        for name, state in self.rank_states.items():
            if not _rank_file(directory, name, rank).exists() and not getattr(state, "elastic", False):
                raise CheckpointError(
                    f"{directory} holds no {name} state for rank {rank}: it was saved by a run "
                    "with fewer processes. Resume with the original number of processes."
                )
        try:
            self.model.load(directory)
        except pickle.UnpicklingError as exc:
            named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            why = f"it names {named.group(1)}" if named else "it holds more than tensors and plain values"
            raise CheckpointError(
                f"{directory} holds a file that is not a plain tensor checkpoint ({why}); refusing to "
                "unpickle it, as that could run code. Resume from a checkpoint you trust."
            ) from None
        for name, state in self.global_states.items():
            state.load_state_dict(json.loads((directory / _global_file(name)).read_text()))
        for name, state in self.rank_states.items():
            if getattr(state, "elastic", False):
                _load_elastic(state, directory / name, rank, distributed.world_size())
            else:
                state.load_state_dict(json.loads(_rank_file(directory, name, rank).read_text()))


def _load_elastic(state: Any, folder: Path, rank: int, world_size: int) -> None:
    """A part saved on any number of ranks: this rank's file, or rank 0's for a rank the saved
    run did not have; rank 0 also takes in the files of saved ranks this run no longer has."""
    own = folder / f"rank-{rank:05d}.json"
    saved = json.loads((own if own.exists() else folder / "rank-00000.json").read_text())
    absorbed = []
    if rank == 0:
        for path in sorted(folder.glob("rank-*.json")):
            if int(path.stem.split("-")[1]) >= world_size:
                absorbed.append(json.loads(path.read_text()))
    state.load_state_dict(saved, absorbed)


def _global_file(name: str) -> str:
    return f"{name}_state.json"


def _rank_file(directory: Path, name: str, rank: int) -> Path:
    return directory / name / f"rank-{rank:05d}.json"


def _better(value: float, previous: float, mode: str) -> bool:
    return value > previous if mode == "max" else value < previous
