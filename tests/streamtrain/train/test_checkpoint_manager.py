"""The checkpoint manager alone, with fakes for the model state and the Stateful parts: when it
saves, rotation, keep-every, the best/ swap, a crash at every stage of a save, old layouts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from streamtrain.config import CheckpointConfig, RunConfig
from streamtrain.errors import UserError
from streamtrain.train import checkpoint
from streamtrain.train.checkpoint_manager import CheckpointError, CheckpointManager


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even ``except Exception`` handlers."""


class FakeModel:
    """Writes a weights file and an optimizer file; can die while doing either."""

    def __init__(self) -> None:
        self.value = 0
        self.die_in: str | None = None

    def save(self, directory: Path, step: int) -> None:
        (directory / checkpoint.WEIGHTS_FILE).write_text(f"weights {self.value}")
        if self.die_in == "model":
            raise Killed
        (directory / "optimizer.bin").write_text(f"optimizer {self.value}")

    def save_weights(self, directory: Path, step: int) -> None:
        (directory / checkpoint.WEIGHTS_FILE).write_text(f"weights {self.value}")

    def load(self, directory: Path) -> None:
        self.value = int((directory / checkpoint.WEIGHTS_FILE).read_text().split()[1])


class Counter:
    """A Stateful part: one integer; can die while being saved."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.die = False

    def state_dict(self) -> dict[str, Any]:
        if self.die:
            raise Killed
        return {"version": 1, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


class Parts:
    """A manager over fakes, as the trainer builds it."""

    def __init__(self, output: Path, model_section: Any = None, **settings: Any) -> None:
        self.model = FakeModel()
        self.trainer = Counter()
        self.data = Counter()
        self.artifacts_die = False
        config = RunConfig(task="toy", output_dir=str(output), model=model_section or {"width": 3})
        self.manager = CheckpointManager(
            output,
            CheckpointConfig(**settings),
            config,
            self.model,
            global_states={"trainer": self.trainer},
            rank_states={"data": self.data},
            write_artifacts=self._artifacts,
            best_metric=("eval/score", "max"),
        )

    def _artifacts(self, directory: Path) -> None:
        (directory / "adapter.txt").write_text(f"adapter {self.model.value}")
        if self.artifacts_die:
            raise Killed

    def train_to(self, step: int) -> None:
        self.model.value = self.trainer.value = self.data.value = step


def steps(output: Path) -> list[int]:
    return [step for step, path in checkpoint.step_dirs(output) if checkpoint.is_complete(path)]


def test_saves_when_due_or_forced_and_writes_every_part(tmp_path: Path) -> None:
    parts = Parts(tmp_path, every_steps=3, keep_last=10)
    for step in range(1, 8):
        parts.train_to(step)
        parts.manager.save(step, force=step == 7)
    assert steps(tmp_path) == [3, 6, 7]
    folder = tmp_path / "step-00000006"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "COMPLETE",
        "adapter.txt",
        "config.yaml",
        "data/rank-00000.json",
        "model.safetensors",
        "optimizer.bin",
        "trainer_state.json",
    ]
    assert json.loads((folder / "trainer_state.json").read_text())["value"] == 6
    assert checkpoint.read_saved_config(folder)["task"] == "toy"
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_every_steps_zero_saves_only_when_forced(tmp_path: Path) -> None:
    parts = Parts(tmp_path, every_steps=0)
    assert parts.manager.save(5) is None
    assert parts.manager.save(9, force=True) == tmp_path / "step-00000009"
    assert steps(tmp_path) == [9]


def test_rotation_keeps_the_last_and_every_nth(tmp_path: Path) -> None:
    parts = Parts(tmp_path, every_steps=1, keep_last=2, keep_every_steps=4)
    for step in range(1, 11):
        parts.train_to(step)
        parts.manager.save(step)
    assert steps(tmp_path) == [4, 8, 9, 10]
    assert [p.name for _, p in checkpoint.step_dirs(tmp_path)] == [
        "step-00000004",
        "step-00000008",
        "step-00000009",
        "step-00000010",
    ]


def test_resume_restores_every_part_of_the_newest_complete(tmp_path: Path) -> None:
    before = Parts(tmp_path, every_steps=2)
    for step in (2, 4):
        before.train_to(step)
        before.manager.save(step)
    after = Parts(tmp_path, every_steps=2)
    found = after.manager.find_resume("auto")
    assert found == tmp_path / "step-00000004"
    after.manager.load(found)
    assert (after.model.value, after.trainer.value, after.data.value) == (4, 4, 4)
    assert Parts(tmp_path).manager.find_resume(str(tmp_path / "step-00000002")) == tmp_path / "step-00000002"


STAGES = ["model", "rank state", "artifacts", "trainer state", "rename", "marker", "rotate"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_crash_at_any_stage_of_a_save_leaves_the_previous_checkpoint_to_resume(
    tmp_path: Path, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = Parts(tmp_path, every_steps=2, keep_last=1)
    parts.train_to(2)
    parts.manager.save(2)
    parts.train_to(4)
    if stage == "model":
        parts.model.die_in = "model"
    elif stage == "rank state":
        parts.data.die = True
    elif stage == "artifacts":
        parts.artifacts_die = True
    elif stage == "trainer state":
        parts.trainer.die = True
    else:
        real = {
            "rename": checkpoint.os.replace,
            "marker": checkpoint.write_json_atomic,
            "rotate": checkpoint.rotate,
        }

        def dies(*args: Any, **kwargs: Any) -> Any:
            target = Path(args[1] if stage == "rename" else args[0])  # replace(src, dst); write(path, ...)
            # The rename of the staging folder / the marker of step 4; anything else goes through.
            hit = {"rename": target.name == "step-00000004", "marker": target.name == checkpoint.MARKER}
            if stage == "rotate" or hit[stage]:
                raise Killed
            return real[stage](*args, **kwargs)

        where = {"rename": (checkpoint.os, "replace"), "marker": (checkpoint, "write_json_atomic")}
        module, name = where.get(stage, (checkpoint, "rotate"))
        monkeypatch.setattr(module, name, dies)
    with pytest.raises(Killed):
        parts.manager.save(4)
    monkeypatch.undo()

    restarted = Parts(tmp_path, every_steps=2, keep_last=1)
    found = restarted.manager.find_resume("auto")
    # Killed after the marker (during rotation), step 4 is complete; before it, step 2 stands.
    expected = 4 if stage == "rotate" else 2
    assert found == tmp_path / checkpoint.step_dir_name(expected)
    restarted.manager.load(found)
    assert (restarted.model.value, restarted.trainer.value, restarted.data.value) == (expected,) * 3
    # What the killed write left behind was cleared away by the restart.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [name for name in names if name.startswith(".tmp-")], names
    assert steps(tmp_path) == ([2, 4] if stage == "rotate" else [2])


def test_a_failed_write_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    parts = Parts(tmp_path, every_steps=2)
    parts.manager.save(2)

    def full(directory: Path, step: int) -> None:
        (directory / checkpoint.WEIGHTS_FILE).write_text("partial")
        raise OSError(28, "No space left on device")

    parts.model.save = full  # type: ignore[method-assign]
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"\.tmp-step-00000004.*step-00000002.*intact"):
        parts.manager.save(4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]


def test_best_is_swapped_only_for_a_better_finite_value(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    manager = parts.manager
    history = [(1, 0.2, True), (2, 0.5, True), (3, 0.4, False), (4, math.nan, False), (5, 0.9, True)]
    for step, score, better in history:
        parts.train_to(step)
        assert manager.update_best(step, {"eval/score": score, "eval/other": 1.0}) is better
        kept = json.loads((tmp_path / "best" / "metrics.json").read_text())
        assert kept["step"] == max(s for s, v, b in history[:step] if b)
    assert manager.best == {"metric": "eval/score", "value": 0.9, "step": 5}
    best = tmp_path / "best"
    assert (best / checkpoint.WEIGHTS_FILE).read_text() == "weights 5"
    assert (best / "adapter.txt").read_text() == "adapter 5"
    assert checkpoint.find_saved_model(tmp_path) == best
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    with pytest.raises(UserError, match="evaluation has no 'eval/score'; it reports eval/other"):
        manager.update_best(6, {"eval/other": 2.0})


def test_best_survives_a_swap_killed_between_its_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = Parts(tmp_path)
    parts.train_to(1)
    parts.manager.update_best(1, {"eval/score": 0.1})
    real = checkpoint.os.replace

    def dies_on_second_rename(source: Any, target: Any) -> None:
        if Path(target).name == "best":
            raise Killed  # best/ already moved aside, the new one not yet in place
        real(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", dies_on_second_rename)
    parts.train_to(2)
    with pytest.raises(Killed):
        parts.manager.update_best(2, {"eval/score": 0.2})
    monkeypatch.undo()
    assert not (tmp_path / "best").exists()
    Parts(tmp_path).manager.find_resume("auto")  # a restart puts the old best/ back
    assert json.loads((tmp_path / "best" / "metrics.json").read_text())["step"] == 1


def test_refuses_what_it_cannot_resume(tmp_path: Path) -> None:
    parts = Parts(tmp_path, every_steps=1)
    parts.manager.save(1)
    with pytest.raises(
        CheckpointError, match=r"different model .*model: saved \{'width': 3\}, now \{'width': 4\}"
    ):
        Parts(tmp_path, model_section={"width": 4}).manager.find_resume("auto")
    with pytest.raises(UserError, match=r"already holds checkpoints and train\.resume=none"):
        Parts(tmp_path).manager.find_resume("none")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        Parts(tmp_path).manager.find_resume(str(tmp_path / "nowhere"))
    (tmp_path / "step-00000001" / "data" / "rank-00000.json").unlink()
    with pytest.raises(CheckpointError, match="holds no data state for rank 0"):
        Parts(tmp_path).manager.load(tmp_path / "step-00000001")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        Parts(a_file).manager.find_resume("auto")


def test_an_old_layout_checkpoint_resumes(tmp_path: Path) -> None:
    """A step folder as the trainer wrote it before the manager existed (same names; the marker
    holds {"step", "time"}; trainer_state.json version 1): found and loaded unchanged."""
    old = tmp_path / "step-00000120"
    (old / "data").mkdir(parents=True)
    (old / checkpoint.WEIGHTS_FILE).write_text("weights 120")
    (old / "config.yaml").write_text("task: toy\noutput_dir: x\nmodel:\n  width: 3\n")
    (old / "trainer_state.json").write_text(
        json.dumps(
            {"version": 1, "value": 120, "step": 120, "samples_seen": 7680, "best": {}, "last_eval": {}}
        )
    )
    (old / "data" / "rank-00000.json").write_text(json.dumps({"version": 1, "value": 120, "batches": 120}))
    (old / "COMPLETE").write_text(json.dumps({"step": 120, "time": 1764000000.0}))
    parts = Parts(tmp_path)
    found = parts.manager.find_resume("auto")
    assert found == old
    parts.manager.load(found)
    assert (parts.model.value, parts.trainer.value, parts.data.value) == (120, 120, 120)
