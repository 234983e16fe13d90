"""Step checkpoint folders: naming, atomic publication, the completion marker, rotation, best/.

A checkpoint is ``output_dir/step-00001200/``. It is written under ``.tmp-step-00001200``,
renamed into place, and only then gets its completion marker (``COMPLETE``); a folder without
the marker (a crash between rename and marker, or a half-deleted one) is never chosen for
resume. "Latest" is the highest step whose folder has the marker — the step comes from the
marker's content, checked against the name, never from the folder name alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from streamtrain.errors import TrainingError

MARKER = "COMPLETE"
BEST = "best"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = ".tmp-"
CONFIG_FILE = "config.yaml"
"""The resolved config, in output_dir and in every checkpoint."""
WEIGHTS_FILE = "model.safetensors"
"""The model's weights in a checkpoint (unwrapped; gathered under ZeRO)."""
FULL_BELOW_BYTES = 1 << 20
"""A failed write with less free space than this is reported as a full filesystem."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: object) -> None:
    """Write ``path`` through a temporary file + fsync + rename, so readers see old or new."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def staging_dir(output_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before publication (emptied first)."""
    staging = output_dir / f"{TMP_PREFIX}{step_dir_name(step)}"
    if staging.exists():
        shutil.rmtree(staging)
    return staging


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(directory) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def publish(staging: Path, output_dir: Path, step: int) -> Path:
    """Rename a fully written staging folder to ``step-XXXXXXXX`` and mark it complete."""
    _fsync_tree(staging)
    final = output_dir / step_dir_name(step)
    if final.exists():  # an incomplete leftover of an interrupted run at the same step
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(output_dir)
    write_json_atomic(final / MARKER, {"step": step, "time": time.time()})
    _fsync_dir(final)
    return final


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (disk full, quota, I/O error); older ones are untouched."""


def discard_failed_write(
    staging: Path, output_dir: Path, step: int, cause: BaseException
) -> CheckpointWriteError:
    """Remove what a failed write of checkpoint ``step`` left behind; the error to report."""
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        free = None
    # torch.save reports a full disk only as "unexpected pos ..."; the free space tells.
    if free is not None and free < FULL_BELOW_BYTES:
        reason = f"its filesystem is full ({free / 2**20:.1f} MiB free)"
    elif free is not None:
        reason = f"{free / 2**20:.1f} MiB free on its filesystem"
    else:
        reason = "the free space on its filesystem is unknown"
    final = output_dir / step_dir_name(step)
    for partial in (staging, final):
        if partial.is_dir() and not is_complete(partial):
            shutil.rmtree(partial, ignore_errors=True)
    previous = latest_complete(output_dir)
    resume = (
        f"the newest complete checkpoint, {previous}, is intact and train.resume=auto continues from it"
        if previous is not None
        else "there is no complete checkpoint yet, so train.resume=auto starts over"
    )
    return CheckpointWriteError(
        f"could not write checkpoint {staging}: {reason} ({type(cause).__name__}: {cause}). "
        f"The partial checkpoint was removed; {resume} once there is room."
    )


def is_complete(directory: Path) -> bool:
    step = marker_step(directory)
    match = _STEP_DIR.match(directory.name)
    return step is not None and (match is None or int(match.group(1)) == step)


def marker_step(directory: Path) -> int | None:
    """The step recorded by ``directory``'s completion marker, or None when it has none."""
    try:
        payload = json.loads((directory / MARKER).read_text())
        return int(payload["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def step_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """Every ``step-*`` folder, complete or not, by step."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_complete(output_dir: Path) -> Path | None:
    """The newest checkpoint whose completion marker exists, or None."""
    complete = [path for _, path in step_dirs(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def remove_stale(output_dir: Path) -> list[Path]:
    """Delete staging folders and unmarked step folders left by an interrupted run."""
    removed = []
    if not output_dir.is_dir():
        return removed
    for child in list(output_dir.iterdir()):
        if child.name.startswith(f"{TMP_PREFIX}old-"):  # a replace_dir (best/) killed half-way
            restore_replaced(output_dir / child.name.removeprefix(f"{TMP_PREFIX}old-"))
    for child in output_dir.iterdir():
        stale = child.name.startswith(TMP_PREFIX) or (
            _STEP_DIR.match(child.name) is not None and child.is_dir() and not is_complete(child)
        )
        if stale:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def rotate(output_dir: Path, keep_last: int, keep_every_steps: int) -> list[Path]:
    """Delete complete checkpoints but the newest ``keep_last`` and multiples of ``keep_every_steps``."""
    complete = [(step, path) for step, path in step_dirs(output_dir) if is_complete(path)]
    keep = {step for step, _ in complete[-keep_last:]}
    if keep_every_steps:
        keep |= {step for step, _ in complete if step % keep_every_steps == 0}
    removed = []
    for step, path in complete:
        if step not in keep:
            # Unmark first: a crash mid-delete must not leave a half folder that looks complete.
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def restore_replaced(target: Path) -> None:
    """Put back ``target`` when a ``replace_dir`` was killed between its two renames."""
    old = target.with_name(f"{TMP_PREFIX}old-{target.name}")
    if old.is_dir() and not target.exists():
        os.replace(old, target)


def replace_dir(staging: Path, target: Path) -> None:
    """Atomically-as-possible swap ``target`` for the fully written ``staging`` folder."""
    _fsync_tree(staging)
    old = target.with_name(f"{TMP_PREFIX}old-{target.name}")
    restore_replaced(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


# -- reading a saved model (a step folder or best/) ---------------------------------------------


def describe_saved_model() -> str:
    """What a folder needs to hold to be read as a saved model, for messages."""
    return f"{CONFIG_FILE} + {WEIGHTS_FILE}"


def find_saved_model(path: str | os.PathLike[str]) -> Path | None:
    """The folder of saved weights ``path`` names: itself, a run's best/, else its newest complete step."""
    root = Path(path)
    for candidate in (root, root / BEST, latest_complete(root)):
        if (
            candidate is not None
            and (candidate / CONFIG_FILE).is_file()
            and (candidate / WEIGHTS_FILE).is_file()
        ):
            return candidate
    return None


def read_saved_config(directory: Path) -> dict[str, Any]:
    """The resolved config saved in ``directory`` as a plain mapping; ValueError if unreadable."""
    path = directory / CONFIG_FILE
    try:
        saved = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except yaml.YAMLError:
        raise ValueError(f"{path} is not valid YAML") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} does not hold a run config")
    return saved


def load_saved_weights(directory: Path) -> dict[str, Any]:
    """The model weights saved in ``directory`` (name -> tensor, on CPU)."""
    from safetensors.torch import load_file

    return load_file(directory / WEIGHTS_FILE)
