"""Scenario 2: training killed with SIGKILL at random steps, some kills inside a checkpoint write,
and resumed each time with ``train.resume=auto``.

What it proves: after every kill the resumed run continues from the newest *complete* checkpoint,
and the finished run is the uninterrupted one — its ``data.sample_log`` is line for line the
reference's (so no sample is lost or repeated), every step's loss and the final
``model.safetensors`` match the reference to float tolerance.

How the faults land. The run is one real ``streamtrain train`` process at a time (the tiny
alignment recipe of ``s23_runs``: two loader workers, a checkpoint every 2 steps, keep_last=2).
A trial is one run of MAX_STEPS steps killed N times (quick: 1 trial, 8 steps, 2 kills; full:
2 trials, 16 steps, 4 kills each). ``fault_rng`` draws the kill moments, increasing steps, half
of them (at least one) inside a checkpoint write:

- *at a step*: the process is killed as soon as its ``metrics.jsonl`` shows that step trained,
  i.e. somewhere in the next step, its data loading or the checkpoint after it. A step before
  the first checkpoint sends the resume back to step 0.
- *inside a checkpoint write*: the test polls (every 0.5 ms) for a random stage of that
  checkpoint's write to be reached — its staging folder ``.tmp-step-XXXXXXXX`` appearing, the
  weights file in it, the trainer state (the last file) in it, or the folder renamed to
  ``step-XXXXXXXX`` before its ``COMPLETE`` marker — and kills the moment it sees it. There is
  no hook in the product: this is the real write, which lasts tens of ms even for this tiny
  model (fsyncs). Whether a kill landed inside is checked afterwards (the staging folder or an
  unmarked step folder is left on disk), and at least one per trial must have. When the kill
  before overshot past the chosen checkpoint, the next checkpoint is aimed at instead.

After every kill the resumed run must start at the newest checkpoint with a COMPLETE marker
(read by the test itself) + 1, and its sample log must already be a prefix of the reference's.

What the sample log holds after a kill. Each rank appends one line per optimizer step
(``{"step", "rank", "sample_ids"}``) when it draws the step's batch, with one ``write`` call (a
SIGKILL cannot cut it; a full disk could, see scenario 3). So a killed run leaves a line for
every step it started, including steps after its last complete checkpoint. The resumed run
rewinds the file to its checkpoint's step — to step 0 when there is none (the suite found that
this case was missing: a run killed before its first checkpoint had its early steps logged
twice) — and appends the steps it trains. The finished file thus keeps, for every step, the
line of the run whose training of that step survived. "Lost" and "repeated" are counted per
step against the reference by sample id (see ``s23_runs.LogDiff``); the test also requires
exactly one whole line per step, in order, equal to the reference's.

Recovery time: from the SIGKILL to the first step the resumed run trains (its first new line in
``metrics.jsonl``), process start-up included.

The VLM task's resume is covered by ``tests/streamtrain/vlm/test_vlm_run.py`` (a packed
conversation QLoRA run killed with SIGKILL and resumed, compared with an uninterrupted one; a
2-rank run killed and resumed on 1 rank); it is not repeated here.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from streamtrain.data.sample_log import read_sample_log
from streamtrain.train import checkpoint
from streamtrain.train.tracking import METRICS_FILE
from tests.faults.conftest import FaultRecord, fault_rng, trials
from tests.faults.s23_runs import (
    CHECKPOINT_EVERY,
    RUN_TIMEOUT_S,
    SAMPLE_LOG,
    Reference,
    assert_matches_reference,
    kill,
    prepare,
    start,
    wait_until,
)

SCENARIO = "2. training killed at random steps"
MAX_STEPS = trials(8, 16)
"""Shared with scenario 3, so that one reference run serves both."""


WRITE_STAGES = {
    "opened": "its staging folder appeared",
    "weights": "model.safetensors is being written in the staging folder",
    "state": "the trainer state, written last, is in the staging folder (fsync, rename, marker to go)",
    "renamed": "the staging folder was renamed to step-XXXXXXXX (its COMPLETE marker may be missing)",
}
"""Where in a checkpoint write a kill lands: the moment the test polls for before it kills."""


@dataclass(frozen=True)
class Kill:
    """One planned fault: kill once ``step`` has trained, or (with a ``stage``) inside the write
    of checkpoint ``step``, as soon as that write reached ``stage`` (see WRITE_STAGES)."""

    step: int
    stage: str | None = None


def plan_kills(trial: int, count: int, max_steps: int) -> list[Kill]:
    """``count`` kills at increasing steps drawn by ``fault_rng``; half of them (at least one)
    inside the write of a checkpoint before the last, at a random stage of it."""
    rng = fault_rng(f"{SCENARIO} #{trial}")
    checkpoints = rng.sample(range(CHECKPOINT_EVERY, max_steps, CHECKPOINT_EVERY), max(1, count // 2))
    steps = rng.sample([s for s in range(1, max_steps) if s not in checkpoints], count - len(checkpoints))
    stages = {step: rng.choice(sorted(WRITE_STAGES)) for step in checkpoints}
    return [Kill(step, stages.get(step)) for step in sorted(checkpoints + steps)]


class Progress:
    """Which steps the *current* process has trained, from the ``metrics.jsonl`` lines it wrote.

    After a kill the file still holds the killed run's lines until the resumed run rewinds it,
    and the resumed run's lines for the same steps carry the same step numbers. A line never
    repeats exactly (each carries its own timings), so this process's lines are those that were
    not in the file when it started.
    """

    def __init__(self, output: Path) -> None:
        self.path = output / METRICS_FILE
        self.before = set(self._lines())
        self.steps: list[int] = []
        self._size = -1

    def _lines(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def latest(self) -> int:
        """The newest step this process has logged (0 before its first)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size != self._size:  # re-read only when the file changed
            self._size = size
            steps = []
            for line in self._lines():
                if line not in self.before:
                    with contextlib.suppress(json.JSONDecodeError):
                        steps.append(int(json.loads(line)["step"]))
            self.steps = steps
        return max(self.steps, default=0)


def complete_steps(output: Path) -> list[int]:
    """Steps of the checkpoint folders that have their COMPLETE marker (read here, not by the product)."""
    return [
        int(path.name.removeprefix("step-"))
        for path in output.glob("step-*")
        if (path / "COMPLETE").is_file()
    ]


def half_written(output: Path, step: int) -> bool:
    """Whether checkpoint ``step`` was left half written (its staging folder, or renamed but unmarked)."""
    staging = output / f"{checkpoint.TMP_PREFIX}{checkpoint.step_dir_name(step)}"
    final = output / checkpoint.step_dir_name(step)
    return staging.exists() or (final.is_dir() and not (final / "COMPLETE").exists())


def kill_at(process: subprocess.Popen[str], output: Path, progress: Progress, target: Kill) -> bool:
    """SIGKILL the run at ``target``; whether the kill landed inside a checkpoint write."""
    if target.stage is None:
        wait_until(lambda: progress.latest() >= target.step, process, f"step {target.step}", poll_s=0.005)
    else:
        staging = output / f"{checkpoint.TMP_PREFIX}{checkpoint.step_dir_name(target.step)}"
        reached = {
            "opened": staging,
            "weights": staging / "model.safetensors",
            "state": staging / "trainer_state.json",  # CheckpointManager.save writes it last
            "renamed": output / checkpoint.step_dir_name(target.step),
        }[target.stage]
        # Coarse polling up to the step before, then every 0.5 ms; the progress is checked too so
        # that a leftover of an earlier run does not count.
        wait_until(lambda: progress.latest() >= target.step - 1, process, "the step before", poll_s=0.005)
        wait_until(
            lambda: reached.exists() and progress.latest() >= target.step,
            process,
            f"checkpoint {target.step}'s write: {WRITE_STAGES[target.stage]}",
            poll_s=0.0005,
        )
    kill(process)
    return target.stage is not None and half_written(output, target.step)


def resume(
    args: list[str], output: Path, reference: Reference, max_steps: int
) -> tuple[subprocess.Popen[str], Progress, int]:
    """Restart the killed run; returns once it trained its first step, checked against the reference,
    with the step it resumed from.

    It must continue from the newest complete checkpoint (its first step is that checkpoint's + 1)
    with the sample log rewound to it: the log is then a prefix of the reference's.
    """
    resumed_step = max(complete_steps(output), default=0)
    progress = Progress(output)
    process = start(args)
    if resumed_step == max_steps:  # killed after its last checkpoint: nothing left to train
        return process, progress, resumed_step
    wait_until(lambda: progress.latest() > 0, process, "the resumed run's first step", poll_s=0.005)
    assert min(progress.steps) == resumed_step + 1, (progress.steps, sorted(output.iterdir()))
    lines = read_sample_log(output / SAMPLE_LOG)
    assert lines == reference.lines[: len(lines)], f"sample log diverged from the reference:\n{lines}"
    return process, progress, resumed_step


@pytest.mark.scenario(SCENARIO)
@pytest.mark.parametrize("trial", range(trials(1, 2)))
def test_training_killed_at_random_steps_resumes_exactly(
    trial: int, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, fault_record: FaultRecord
) -> None:
    recipe, reference = prepare(tmp_path_factory, MAX_STEPS)
    output = tmp_path / "killed"
    args = recipe.args(output)

    progress = Progress(output)
    process = start(args)
    landed_inside = resumed_step = 0
    for target in plan_kills(trial, trials(2, 4), MAX_STEPS):
        if resumed_step == MAX_STEPS:
            break  # the kill before landed after the last checkpoint: nothing left to train
        if target.stage is not None and target.step <= resumed_step:
            # The kill before landed after this checkpoint was written: aim at the next one.
            target = Kill(resumed_step + CHECKPOINT_EVERY, target.stage)
        with fault_record.recovering():  # from the kill to the resumed run's first new step
            landed_inside += kill_at(process, output, progress, target)
            fault_record.faults += 1
            process, progress, resumed_step = resume(args, output, reference, MAX_STEPS)
        fault_record.survived += 1
    assert landed_inside >= 1, "no kill landed inside a checkpoint write"

    try:
        _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill(process)
        raise AssertionError(f"the last resumed run hung for {RUN_TIMEOUT_S} s") from None
    assert process.returncode == 0, stderr[-3000:]
    diff = assert_matches_reference(output, reference, MAX_STEPS)
    fault_record.lost, fault_record.repeated = diff.lost, diff.repeated
    fault_record.trials = 1
