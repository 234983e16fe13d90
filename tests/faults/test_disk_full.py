"""Scenario 3: the disk fills up while a checkpoint is being written.

What it proves: the run stops with a clear error (exit status 1, one message naming the checkpoint
folder and the cause, no traceback) and removes its partial checkpoint; the previous complete
checkpoint is intact byte for byte and is what ``train.resume=auto`` picks; once space is freed
the resumed run finishes exactly as the uninterrupted reference (sample log line for line,
losses, final weights). A second test proves the sample log itself never keeps a line cut by a
full disk.

Trials: quick 1, full 4 (one test each, its own small disk and fault moment). The full disk is
genuine: a tmpfs of a few MiB, mounted by ``unshare`` in a private user + mount
namespace (no root needed where unprivileged user namespaces are allowed; where they are not,
the tests skip and say why). The training process writes its output_dir through
``/proc/<holder>/root/...``, a path into that namespace, so it runs unmodified and the kernel
itself answers ENOSPC at whichever write runs out of room — no hook in the product.

How the fault lands: ``fault_rng`` picks a checkpoint after the first. The test polls for that
checkpoint's staging folder, stops the process (SIGSTOP) the moment it appears, fills the disk
with a ballast file leaving a random number of pages free — fewer than the checkpoint still
needs — and lets the process continue (SIGCONT). The write then fails in whichever file the
room runs out (weights, optimizer, RNG state, the small JSON files or the marker). torch.save
reports that only as "unexpected pos ...", so the product names the cause from the free space.

Recovery time: from the disk filling (SIGCONT) to the run's exit with its error.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from streamtrain.data.sample_log import SampleLog, read_sample_log
from streamtrain.train import checkpoint
from tests.faults.conftest import FaultRecord, fault_rng, trials
from tests.faults.s23_runs import (
    CHECKPOINT_EVERY,
    RUN_TIMEOUT_S,
    Recipe,
    Reference,
    assert_matches_reference,
    kill,
    prepare,
    run_to_end,
    start,
    wait_until,
)
from tests.faults.test_training_killed import MAX_STEPS, Progress, complete_steps

SCENARIO = "3. disk full during checkpoint write"
PAGE = 4096
"""tmpfs hands out space in pages."""
DISK_BYTES = 16 << 20
"""Room for a run (its checkpoints take ~0.4 MB each) before the ballast fills it."""


@contextmanager
def small_disk(size: int) -> Iterator[Path]:
    """A real tmpfs of ``size`` bytes in a private mount namespace; yields its path as seen from here."""
    mountpoint = Path(tempfile.mkdtemp(prefix="streamtrain-small-disk-"))
    holder = subprocess.Popen(
        [
            *("unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"),
            *("sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "$0" && echo mounted && exec sleep 3600'),
            str(mountpoint),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stderr is not None
        if holder.stdout.readline().strip() != "mounted":  # "" once it exits: no namespaces here
            holder.wait(timeout=30)
            pytest.skip(f"cannot mount a small tmpfs in a user namespace: {holder.stderr.read().strip()}")
        yield Path(f"/proc/{holder.pid}/root{mountpoint}")
    finally:
        holder.kill()
        holder.wait(timeout=30)
        mountpoint.rmdir()


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def pages(directory: Path) -> int:
    """Pages the files under ``directory`` take on a tmpfs."""
    return sum(-(-path.stat().st_size // PAGE) for path in directory.rglob("*") if path.is_file())


def digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free on ``disk``."""
    ballast = disk / "ballast"
    with ballast.open("wb") as handle:
        handle.write(bytes(free_bytes(disk) - leave))
    assert free_bytes(disk) == leave
    return ballast


def fill_during_checkpoint(
    recipe: Recipe, reference: Reference, disk: Path, output: Path, rng: random.Random, record: FaultRecord
) -> None:
    """One trial: the disk fills during a checkpoint's write; clear error, then resume to the end."""
    max_steps = recipe.max_steps
    args = recipe.args(output)
    step = rng.choice(range(2 * CHECKPOINT_EVERY, max_steps + 1, CHECKPOINT_EVERY))
    previous = output / checkpoint.step_dir_name(step - CHECKPOINT_EVERY)
    staging = output / f"{checkpoint.TMP_PREFIX}{checkpoint.step_dir_name(step)}"

    progress = Progress(output)
    process = start(args)
    wait_until(lambda: progress.latest() >= step - 1, process, f"step {step - 1}", poll_s=0.005)
    wait_until(
        lambda: staging.exists() and progress.latest() >= step,
        process,
        f"checkpoint {step}'s write",
        poll_s=0.0005,
    )
    os.kill(process.pid, signal.SIGSTOP)
    assert max(complete_steps(output)) == step - CHECKPOINT_EVERY
    before = digests(previous)
    # Fewer free pages than the checkpoint still needs (its marker, written last, takes one more).
    still_needed = pages(reference.output / checkpoint.step_dir_name(max_steps)) - pages(staging) + 1
    ballast = fill(disk, rng.randrange(0, still_needed - 1) * PAGE)
    record.faults += 1
    with record.recovering():  # from the disk filling to the run's clear error
        os.kill(process.pid, signal.SIGCONT)
        try:
            _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill(process)
            raise AssertionError("the run hung on the full disk") from None

    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith(f"streamtrain: error: could not write checkpoint {staging}: "), message
    assert "its filesystem is full" in message, message
    assert f"the newest complete checkpoint, {previous}, is intact" in message, message
    assert digests(previous) == before
    left = [path.name for path in output.iterdir() if path.name.startswith(checkpoint.TMP_PREFIX)]
    assert left == [] and not (output / checkpoint.step_dir_name(step)).exists(), (
        f"the partial checkpoint was left behind: {sorted(output.iterdir())}"
    )

    ballast.unlink()
    resumed = run_to_end(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {previous} at step {step - CHECKPOINT_EVERY}" in resumed.stdout + resumed.stderr
    diff = assert_matches_reference(output, reference, max_steps)
    record.lost += diff.lost
    record.repeated += diff.repeated
    record.survived += 1
    record.trials += 1


@pytest.mark.scenario(SCENARIO)
@pytest.mark.parametrize("trial", range(trials(1, 4)))
def test_disk_full_during_checkpoint_keeps_the_previous_one(
    trial: int, tmp_path_factory: pytest.TempPathFactory, fault_record: FaultRecord
) -> None:
    recipe, reference = prepare(tmp_path_factory, MAX_STEPS)
    with small_disk(DISK_BYTES) as disk:
        fill_during_checkpoint(
            recipe, reference, disk, disk / "run", fault_rng(f"{SCENARIO} #{trial}"), fault_record
        )
    # fill_during_checkpoint asserts each step of the contract; the trial must have counted.
    record = fault_record
    assert (record.trials, record.survived, record.lost, record.repeated) == (1, 1, 0, 0)


@pytest.mark.scenario(SCENARIO)
def test_sample_log_keeps_whole_lines_on_a_full_disk(fault_record: FaultRecord) -> None:
    """Appending to the sample log until the disk is full: the append that does not fit fails
    (ENOSPC) and leaves no cut line behind, so every line the log holds is whole and in order."""
    rng = fault_rng(f"{SCENARIO} sample log")
    with small_disk(64 * PAGE) as disk:
        fill(disk, rng.randrange(1, 8) * PAGE)
        log = SampleLog(disk / "samples.jsonl", rank=0)
        step = 0
        with pytest.raises(OSError) as failure:
            while step < 10_000:
                step += 1
                log.record(step, [f"sample-{step}-{i}" for i in range(rng.randrange(5, 40))])
        log.close()
        fault_record.faults += 1
        assert failure.value.errno == errno.ENOSPC
        text = (disk / "samples.jsonl").read_text()
        assert text.endswith("\n")
        lines = read_sample_log(disk / "samples.jsonl")
        assert len(lines) == len(text.splitlines()) == step - 1  # every line whole, the failed one absent
        assert [line["step"] for line in lines] == list(range(1, step))
        fault_record.survived += 1
        fault_record.trials += 1
