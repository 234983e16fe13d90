"""Scenario 9: runs stopped, orphaned or doubled — SIGTERM to one rank or to the launcher, the
launcher SIGKILLed alone, and a second job started on the output_dir of a live one.

- *Two ranks, five lives* (the normal suite): SIGTERM to rank 1 only (on several nodes a signal
  often reaches some ranks first) — both stop after the same step, one checkpoint holding both
  ranks' data state, exit 143; resumed, SIGTERM to the launcher (``python -m streamtrain.launch``,
  torchrun underneath; what a scheduler sends) — the same; resumed, the launcher alone SIGKILLed
  — its ranks, in sessions of their own, must all be gone within 15 s, the sample log stop
  growing and the newest checkpoint stay as it was; resumed, every process SIGKILLed at once
  under a parent that never reaps them (a container without an init), so the claim's holder
  is a zombie; started again at once and resumed to the end (taking over the dead job's claim).
  The sample log must then be the plan's, step for step and rank for rank.
- *One process* (full runs): SIGTERM at a random step between checkpoints → the checkpoint of
  that step, exit 143; the resumed run equals the uninterrupted reference (log, losses, weights).
- *A second job on a live output_dir* (full runs; the first one frozen with SIGSTOP, so the race
  is not timing-dependent): refused at start, exit 2, naming the holder; the first then finishes
  normally. A claim left by a job SIGKILLed with all its processes is taken over at once.

Recovery time: a SIGTERM → the job's exit (its stop-time checkpoint included); the launcher's
SIGKILL → no rank left; the second job → its refusal.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from streamtrain.config import load_config
from streamtrain.data.decoders import sample_id
from streamtrain.data.pipeline import resolve_sources, train_loader
from streamtrain.data.sample_log import read_sample_log
from streamtrain.tasks import model_types
from streamtrain.train import checkpoint
from streamtrain.train.claim import CLAIM_FILE
from tests.faults.conftest import FULL, FaultRecord, fault_rng
from tests.faults.s23_runs import (
    RECIPE,
    RUN_TIMEOUT_S,
    SAMPLE_LOG,
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


NON_REAPING_INIT = """\
import ctypes, subprocess, sys, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
subprocess.Popen(sys.argv[1:])
time.sleep(3600)  # never waits: the orphans it adopts stay zombies, as under a container's init
"""
"""A parent that adopts the job's orphaned processes and never reaps them."""


@contextlib.contextmanager
def non_reaping_init(args: Sequence[str], nproc: int) -> Iterator[subprocess.Popen[str]]:
    """The job under a parent that adopts its orphans and never reaps them; killed after."""
    init = subprocess.Popen(
        [sys.executable, "-c", NON_REAPING_INIT, *command(args, nproc)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env(),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        yield init
    finally:
        with contextlib.suppress(psutil.Error):
            for member in psutil.Process(init.pid).children(recursive=True):
                member.kill()
        init.kill()  # its zombies go to the real init, which reaps them
        init.wait(timeout=30)


def claimed_under(init: subprocess.Popen[str], out: Path) -> bool:
    """Whether a process of the job under ``init`` holds the output_dir's claim."""
    try:
        holder = json.loads((out / CLAIM_FILE).read_text())["pid"]
        return holder in {p.pid for p in psutil.Process(init.pid).children(recursive=True)}
    except (OSError, ValueError, KeyError, psutil.Error):
        return False


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return False


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


def planned_log(args: Sequence[str], world_size: int, steps: int) -> dict[tuple[int, int], list[str]]:
    """The sample ids every (step, rank) of an uninterrupted run trains on, from the data layer
    alone (the order is a pure function of the plan): no training run needed as the reference."""
    config = load_config(RECIPE, list(args[2:]), model_types())
    data = dataclasses.replace(config.data, sample_log=None)  # the run's log is what is compared
    dataset = resolve_sources(data.train)
    planned = {}
    for rank in range(world_size):
        loader = train_loader(
            data,
            dataset,
            rank=rank,
            world_size=world_size,
            batch_size=config.train.batch_size,
            seed=config.train.seed,
            decode=lambda raw, rng: sample_id(raw, json.loads(raw["json"])),
            collate=lambda ids: {"sample_ids": ids},
        )
        for step in range(1, steps + 1):
            planned[(step, rank)] = next(loader)["sample_ids"]
        loader.shutdown()
    return planned


@pytest.mark.scenario(SCENARIO)
@pytest.mark.skipif(not FULL, reason="one process (~1 min): run by ./launch.sh faults; two ranks below")
def test_sigterm_writes_the_checkpoint_of_the_agreed_step_and_the_resume_is_exact(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, fault_record: FaultRecord
) -> None:
    nproc = 1
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
    diff = assert_matches_reference(out, reference, MAX_STEPS)
    fault_record.lost, fault_record.repeated = diff.lost, diff.repeated
    fault_record.trials += 1
    fault_record.survived += 1


def sigterm_and_wait(target: psutil.Process | subprocess.Popen[str], process: subprocess.Popen[str]) -> str:
    target.send_signal(signal.SIGTERM)
    status = process.wait(timeout=90)
    stderr = process.stderr.read() if process.stderr else ""
    assert status == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr


@pytest.mark.scenario(SCENARIO)
def test_two_ranks_stopped_by_one_rank_by_the_launcher_and_orphaned_resume_exactly(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, fault_record: FaultRecord
) -> None:
    """One two-rank run, five lives: SIGTERM to rank 1 only; resumed, SIGTERM to the launcher;
    resumed, the launcher SIGKILLed alone; resumed, the whole tree SIGKILLed with its ranks left
    zombies; started again at once and resumed to the end. Then the sample log must be the plan's,
    step for step and rank for rank."""
    recipe, _ = prepare(tmp_path_factory, MAX_STEPS)
    out = tmp_path / "run"
    args = recipe.args(out, **NO_CHECKPOINT)
    rng = fault_rng(f"{SCENARIO} two ranks")
    first, second = sorted(rng.sample(range(1, MAX_STEPS - 3), 2))

    # 1. Only rank 1 is signalled: both ranks stop after the same step, one checkpoint for both.
    with job(args, nproc=2) as process:
        wait_until(lambda: trained(out) >= first, process, f"step {first}", poll_s=0.005)
        ranks = {
            child.environ().get("RANK"): child
            for child in psutil.Process(process.pid).children()
            if "streamtrain.cli" in " ".join(child.cmdline())
        }
        assert set(ranks) == {"0", "1"}, ranks
        fault_record.faults += 1
        with fault_record.recovering():
            stopped_at = stop_step(sigterm_and_wait(ranks["1"], process))
    assert first <= stopped_at and complete_steps(out) == [stopped_at]
    for rank in ("00000", "00001"):
        assert (out / checkpoint.step_dir_name(stopped_at) / "data" / f"rank-{rank}.json").exists()
    logged = log_by_rank(out)
    assert {r: max(s for s, rank in logged if rank == r) for r in (0, 1)} == {0: stopped_at, 1: stopped_at}
    fault_record.survived += 1

    # 2. Resumed, then SIGTERM to the launcher (what a scheduler does): passed to both ranks.
    with job(args, nproc=2) as process:
        target = max(second, stopped_at + 1)
        wait_until(lambda: trained(out) >= target, process, f"step {target}", poll_s=0.005)
        fault_record.faults += 1
        with fault_record.recovering():
            stopped_again = stop_step(sigterm_and_wait(process, process))  # type: ignore[arg-type]
    assert stopped_again > stopped_at and complete_steps(out) == [stopped_at, stopped_again]
    fault_record.survived += 1

    # 3. Resumed, then the launcher alone SIGKILLed: its ranks (sessions of their own) must go.
    marker = (out / checkpoint.step_dir_name(stopped_again) / checkpoint.MARKER).read_bytes()
    with job(args, nproc=2) as process:
        wait_until(lambda: trained(out) >= stopped_again + 1, process, "a resumed step", poll_s=0.005)
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
    assert complete_steps(out) == [stopped_at, stopped_again]
    assert (out / checkpoint.step_dir_name(stopped_again) / checkpoint.MARKER).read_bytes() == marker
    fault_record.survived += 1

    # 4. Resumed, then every process of the job SIGKILLed at once (a node crash, an OOM kill) in a
    # container whose init reaps late or never: rank 0, the claim's holder, stays a zombie.
    with non_reaping_init(args, nproc=2) as init:
        wait_until(
            lambda: claimed_under(init, out) and trained(out) > stopped_again, init, "the claim", poll_s=0.01
        )
        fault_record.faults += 1
        with fault_record.recovering():
            for member in psutil.Process(init.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            holder = json.loads((out / CLAIM_FILE).read_text())["pid"]
            deadline = time.monotonic() + 30
            while not zombie(holder):
                assert time.monotonic() < deadline, f"rank 0 (pid {holder}) did not become a zombie"
                time.sleep(0.05)
            newest = max(complete_steps(out))

            # 5. Started again at once: the zombie's claim is taken over; resumed to the end,
            # exactly the plan's samples.
            finished = run_job(args, nproc=2)
        assert zombie(holder), "the holder was reaped before the restart: the scenario did not happen"
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "is in use by another run" not in finished.stderr
    assert f"resumed from {out / checkpoint.step_dir_name(newest)}" in finished.stdout
    fault_record.survived += 1
    # One line per (step, rank), equal to the plan's: nothing lost, nothing repeated.
    assert len(read_sample_log(out / SAMPLE_LOG)) == 2 * MAX_STEPS, "one line per step and rank"
    assert log_by_rank(out) == planned_log(args, world_size=2, steps=MAX_STEPS)
    fault_record.trials += 1


@pytest.mark.scenario(SCENARIO)
@pytest.mark.skipif(not FULL, reason="four runs (~1.5 min): run by ./launch.sh faults; claims: test_claim.py")
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
        started = time.monotonic()
        with fault_record.recovering():
            second = run_job(args)
        refused_in = time.monotonic() - started
        os.killpg(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "is in use by another run" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert refused_in < 30, f"refused only after {refused_in:.1f} s"  # before the slow imports
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
