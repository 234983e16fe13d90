"""Scenario 9: runs stopped, orphaned or doubled — SIGTERM to the launcher or to one rank, the
launcher SIGKILLed alone, and a second job started on the output_dir of a live one.

- *SIGTERM* (what Slurm and Kubernetes send before SIGKILL) at a random step between
  checkpoints, to the one process or to the launcher of two ranks (``python -m
  streamtrain.launch``, torchrun underneath): every rank finishes its step, they agree on it,
  the checkpoint of that step is written and the job exits 143 with one line. The resumed run
  must equal the uninterrupted reference (sample log; one process: losses and weights too).
- *SIGTERM to one rank only* (on several nodes a signal often reaches some ranks first): both
  ranks stop after the same step, with one checkpoint holding both ranks' data state.
- *SIGKILL to the launcher alone*: its ranks live in sessions of their own and would train on
  as orphans; every rank process must be gone within 15 s, the sample log stop growing and the
  newest checkpoint stay as it was.
- *A second job on a live output_dir* (the first one frozen with SIGSTOP, so the race is not
  timing-dependent): refused at start, exit 2, naming the holder; the first then finishes
  normally. A claim left by a job SIGKILLed with all its processes is taken over at once.

Recovery time: SIGTERM → the job's exit (the stop-time checkpoint included); the launcher's
SIGKILL → no rank left; the second job → its refusal.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest

from streamtrain.data.sample_log import read_sample_log
from streamtrain.train import checkpoint
from streamtrain.train.claim import CLAIM_FILE
from tests.faults.conftest import FULL, FaultRecord, fault_rng
from tests.faults.s23_runs import (
    RUN_TIMEOUT_S,
    SAMPLE_LOG,
    Recipe,
    assert_matches_reference,
    compare_log,
    losses,
    prepare,
    wait_until,
)
from tests.faults.test_training_killed import MAX_STEPS
from tests.streamtrain.train.conftest import ROOT, env

SCENARIO = "9. stopped, orphaned or doubled jobs"
NO_CHECKPOINT = {"checkpoint.every_steps": 100}
"""Only the stop-time checkpoint is written: the signal lands between checkpoints."""
ORPHAN_BOUND_S = 15.0


def command(args: Sequence[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "streamtrain.cli", *args]
    launcher = ["-m", "streamtrain.launch", "--standalone", "--nproc_per_node", str(nproc)]
    return [sys.executable, *launcher, "-m", "streamtrain.cli", *args]


@contextlib.contextmanager
def job(args: Sequence[str], nproc: int = 1) -> Iterator[subprocess.Popen[str]]:
    """A job in the background (in a process group of its own); whatever is left is killed after."""
    process = subprocess.Popen(
        command(args, nproc),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
        start_new_session=True,
    )
    family = psutil.Process(process.pid)
    try:
        yield process
    finally:
        with contextlib.suppress(psutil.Error):
            for member in [family, *family.children(recursive=True)]:
                member.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)


def run_job(args: Sequence[str], nproc: int = 1) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command(args, nproc), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env(), cwd=ROOT
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the job hung:\n{exc.stderr}") from None


def trained(output: Path) -> int:
    """The newest step the run in ``output`` logged (0 before it logged one)."""
    return max(losses(output), default=0) if (output / "metrics.jsonl").exists() else 0


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def complete_steps(output: Path) -> list[int]:
    return [step for step, path in checkpoint.step_dirs(output) if checkpoint.is_complete(path)]


def stop_step(stderr: str) -> int:
    found = re.search(r"stopped by SIGTERM after step (\d+)", stderr)
    assert found, stderr[-3000:]
    return int(found.group(1))


def log_by_rank(output: Path) -> dict[tuple[int, int], list[str]]:
    return {(line["step"], line["rank"]): line["sample_ids"] for line in read_sample_log(output / SAMPLE_LOG)}


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recipe, dict]:
    recipe, _ = prepare(tmp_path_factory, MAX_STEPS)
    output = tmp_path_factory.mktemp("s9") / "reference-2-ranks"
    done = run_job(recipe.args(output), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return recipe, log_by_rank(output)


@pytest.mark.scenario(SCENARIO)
@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.skipif(not FULL, reason="full")), 2])
def test_sigterm_writes_the_checkpoint_of_the_agreed_step_and_the_resume_is_exact(
    nproc: int,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    two_rank_reference: tuple[Recipe, dict],
    fault_record: FaultRecord,
) -> None:
    recipe, reference = prepare(tmp_path_factory, MAX_STEPS)
    out = tmp_path / "run"
    at = fault_rng(f"{SCENARIO} sigterm {nproc}").randint(2, MAX_STEPS - 3)
    with job(recipe.args(out, **NO_CHECKPOINT), nproc) as process:
        wait_until(lambda: trained(out) >= at, process, f"step {at}", poll_s=0.005)
        fault_record.faults += 1
        with fault_record.recovering():
            process.send_signal(signal.SIGTERM)  # the launcher, when there are two ranks
            status = process.wait(timeout=90)
        stderr = process.stderr.read() if process.stderr else ""
    assert status == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    stopped_at = stop_step(stderr)
    assert at <= stopped_at <= MAX_STEPS
    assert complete_steps(out) == [stopped_at], "one checkpoint: the stop-time one"
    steps_logged = {step for step, _ in log_by_rank(out)}
    assert max(steps_logged) == stopped_at, "no step started after the agreed one"

    resumed = run_job(recipe.args(out, **NO_CHECKPOINT), nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if stopped_at < MAX_STEPS:
        assert f"resumed from {out / checkpoint.step_dir_name(stopped_at)}" in resumed.stdout
    if nproc == 1:
        diff = assert_matches_reference(out, reference, MAX_STEPS)
        fault_record.lost, fault_record.repeated = diff.lost, diff.repeated
    else:
        assert log_by_rank(out) == two_rank_reference[1]
    fault_record.trials += 1
    fault_record.survived += 1


@pytest.mark.scenario(SCENARIO)
def test_sigterm_to_one_rank_stops_both_then_a_sigkilled_launcher_leaves_no_orphan(
    tmp_path: Path,
    two_rank_reference: tuple[Recipe, dict],
    fault_record: FaultRecord,
) -> None:
    recipe, reference = two_rank_reference
    out = tmp_path / "run"
    at = fault_rng(f"{SCENARIO} one rank").randint(2, MAX_STEPS - 4)
    with job(recipe.args(out, **NO_CHECKPOINT), nproc=2) as process:
        wait_until(lambda: trained(out) >= at, process, f"step {at}", poll_s=0.005)
        ranks = {
            child.environ().get("RANK"): child
            for child in psutil.Process(process.pid).children()
            if "streamtrain.cli" in " ".join(child.cmdline())
        }
        assert set(ranks) == {"0", "1"}, ranks
        fault_record.faults += 1
        with fault_record.recovering():
            ranks["1"].send_signal(signal.SIGTERM)
            status = process.wait(timeout=90)
        stderr = process.stderr.read() if process.stderr else ""
    assert status == 143, stderr[-3000:]
    stopped_at = stop_step(stderr)
    assert complete_steps(out) == [stopped_at]
    for rank in ("00000", "00001"):
        assert (out / checkpoint.step_dir_name(stopped_at) / "data" / f"rank-{rank}.json").exists()
    logged = log_by_rank(out)
    assert {rank: max(s for s, r in logged if r == rank) for rank in (0, 1)} == {0: stopped_at, 1: stopped_at}
    assert logged == {key: ids for key, ids in reference.items() if key[0] <= stopped_at}
    fault_record.survived += 1

    # The same run resumed, then its launcher SIGKILLed: torchrun cannot pass anything on.
    marker = (out / checkpoint.step_dir_name(stopped_at) / checkpoint.MARKER).read_bytes()
    with job(recipe.args(out, **NO_CHECKPOINT), nproc=2) as process:
        wait_until(lambda: trained(out) >= stopped_at + 2, process, "two resumed steps", poll_s=0.005)
        family = psutil.Process(process.pid).children(recursive=True)
        fault_record.faults += 1
        with fault_record.recovering():
            process.kill()
            deadline = time.monotonic() + ORPHAN_BOUND_S
            while alive := [p for p in family if running(p)]:
                assert time.monotonic() < deadline, f"{len(alive)} processes left: {alive}"
                time.sleep(0.1)
    size = (out / SAMPLE_LOG).stat().st_size
    time.sleep(2.0)
    assert (out / SAMPLE_LOG).stat().st_size == size, "the sample log kept growing"
    assert complete_steps(out) == [stopped_at]
    assert (out / checkpoint.step_dir_name(stopped_at) / checkpoint.MARKER).read_bytes() == marker
    fault_record.trials += 1
    fault_record.survived += 1


@pytest.mark.scenario(SCENARIO)
def test_a_second_job_is_refused_and_a_dead_jobs_claim_is_taken_over(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, fault_record: FaultRecord
) -> None:
    recipe, reference = prepare(tmp_path_factory, MAX_STEPS)
    out = tmp_path / "live"
    # A long lease: the frozen first job must stay the holder however slow the second one starts.
    args = recipe.args(out, **{"train.claim_lease_s": 900})
    with job(args) as first:
        wait_until(lambda: trained(out) >= 1, first, "the first step", poll_s=0.01)
        os.killpg(first.pid, signal.SIGSTOP)  # frozen mid-run, claim held
        fault_record.faults += 1
        with fault_record.recovering():
            second = run_job(args)
        os.killpg(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "is in use by another run" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.wait(timeout=RUN_TIMEOUT_S) == 0
    assert_matches_reference(out, reference, MAX_STEPS)
    assert not (out / CLAIM_FILE).exists(), "the claim is given back at the end"
    fault_record.survived += 1

    dead = tmp_path / "dead"
    with job(recipe.args(dead)) as holder:
        wait_until(lambda: 2 in complete_steps(dead), holder, "the first checkpoint", poll_s=0.01)
        for member in [psutil.Process(holder.pid), *psutil.Process(holder.pid).children(recursive=True)]:
            member.kill()
        holder.wait(timeout=30)
    assert json.loads((dead / CLAIM_FILE).read_text())["pid"] == holder.pid  # left behind, stale
    fault_record.faults += 1
    taken_over = run_job(recipe.args(dead))
    assert taken_over.returncode == 0, taken_over.stderr[-3000:]
    diff = assert_matches_reference(dead, reference, MAX_STEPS)
    fault_record.lost, fault_record.repeated = diff.lost, diff.repeated
    assert compare_log(read_sample_log(dead / SAMPLE_LOG), reference.lines) == diff
    fault_record.trials += 1
    fault_record.survived += 1
