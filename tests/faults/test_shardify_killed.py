"""Scenario 1: the real ``shardify parquet-to-tar`` process SIGKILLed at random moments, N times
in a row, then run to completion.

Proves: after every kill only whole shards are visible under final names (each byte-identical to
the same shard of a clean conversion; partial files exist only under ``.shardify/`` temp names),
the published shard count never goes back, and the completed output equals a clean conversion
byte for byte, with rows read = samples written + rows skipped (and every skip logged).
tests/shardify/test_restart.py covers resuming with a different worker count; this scenario adds
many kills in a row at moments drawn from ``fault_rng`` (during start-up, resume, writing,
publishing and journaling) and the per-kill comparison with the reference.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests import factories
from tests.faults.conftest import FaultRecord, fault_rng, trials
from tests.shardify.helpers import (
    convert_command,
    local_committed_rows,
    output_files,
    read_manifest,
    read_samples,
    read_shard,
    read_skipped,
)

SCENARIO = "1. shardify killed (SIGKILL)"
ROWS = 1200
SHARD_SAMPLES = 60
FINAL_NAMES = re.compile(
    r"^(shard-\d{6}-\d{6}\.tar(\.crc32\.json)?|manifest\.json|skipped\.jsonl|\.shardify)$"
)
TEMP_NAMES = re.compile(r"\.(partial|writing)$")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two parquet files of photos with a corrupt image every 53 rows (so skips must reconcile)."""
    folder = tmp_path_factory.mktemp("s1-input")
    distinct = [factories.jpeg(320, 240, seed=s) for s in range(20)]
    rows = [
        {
            "sample_id": f"r{i}",
            "caption": f"caption {i}",
            "image_bytes": b"not an image" if i % 53 == 7 else distinct[i % len(distinct)],
        }
        for i in range(ROWS)
    ]
    factories.write_parquet(folder / "part-0.parquet", rows[: ROWS // 2], row_group_size=50)
    factories.write_parquet(folder / "part-1.parquet", rows[ROWS // 2 :], row_group_size=50)
    return folder


def _start(source: Path, out: Path, workers: int, stderr: Path) -> subprocess.Popen[bytes]:
    command = convert_command(source, out, workers, SHARD_SAMPLES)
    with stderr.open("ab") as log:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)


def _check_visible(out: Path, reference: dict[str, bytes]) -> int:
    """What a reader can see now is whole: every final-named file equals the clean conversion's."""
    if not out.exists():
        return 0
    names = sorted(p.name for p in out.iterdir())
    stray = [n for n in names if not FINAL_NAMES.match(n)]
    assert not stray, f"files under non-final names are visible in {out}: {stray}"
    for name in names:
        if name.endswith((".tar", ".crc32.json")) or name in ("manifest.json", "skipped.jsonl"):
            assert (out / name).read_bytes() == reference[name], f"{name} differs from a clean conversion"
    for shard in out.glob("*.tar"):  # a visible shard always has its checksums (published first)
        assert (out / f"{shard.name}.crc32.json").is_file(), f"{shard.name} is visible without its checksums"
    if (out / "manifest.json").exists():  # finished before the kill: everything must be there
        listed = [entry["name"] for entry in read_manifest(out)["shards"]]
        assert sorted(listed) == sorted(p.name for p in out.glob("*.tar"))
    return len(list(out.glob("*.tar")))


@pytest.mark.scenario(SCENARIO)
def test_shardify_killed_repeatedly_then_completed(
    source: Path, tmp_path: Path, fault_record: FaultRecord
) -> None:
    rng = fault_rng(SCENARIO)
    reference_dir = tmp_path / "reference"
    clean = _start(source, reference_dir, 2, tmp_path / "reference.log")
    assert clean.wait(timeout=120) == 0, (tmp_path / "reference.log").read_text()
    reference = output_files(reference_dir)

    kills = trials(quick=2, full=10)
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    published: list[int] = []
    killed_at: tuple[float, int] | None = None  # (monotonic time, journal rows) of the last kill

    def note_recovery() -> None:
        """Once the restarted process commits past the kill point, the fault is recovered."""
        nonlocal killed_at
        if killed_at is not None and local_committed_rows(out) > killed_at[1]:
            fault_record.recovery_s.append(time.monotonic() - killed_at[0])
            killed_at = None

    while fault_record.faults < kills:
        process = _start(source, out, rng.choice((1, 2)), log)
        started = time.monotonic()
        # Half the kills land at a random instant after start (start-up, resume, scratch clean-up);
        # the rest once the journal passes a random row, plus a random few ms, so they fall at an
        # arbitrary point of writing, publishing or journaling a shard.
        if rng.random() < 0.5:
            target_rows, delay = -1, rng.uniform(0.0, 1.2)
        else:
            target_rows, delay = rng.randrange(local_committed_rows(out), ROWS), rng.uniform(0.0, 0.04)
        deadline = started + 120
        while process.poll() is None and time.monotonic() < deadline:
            note_recovery()
            if target_rows < 0 and time.monotonic() - started >= delay:
                break
            if target_rows >= 0 and local_committed_rows(out) >= target_rows:
                time.sleep(delay)
                break
            time.sleep(0.005)
        assert time.monotonic() < deadline, "shardify neither progressed nor finished in 120 s"
        if process.poll() is not None:  # it finished first: not a fault; start over on a fresh output
            assert process.returncode == 0, log.read_text()
            assert output_files(out) == reference, "the resumed conversion differs from a clean one"
            fault_record.trials += 1
            shutil.rmtree(out)
            published.clear()
            continue
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        killed_at = (time.monotonic(), local_committed_rows(out))
        fault_record.faults += 1
        published.append(_check_visible(out, reference))
        assert published == sorted(published), f"published shards went back: {published}"
        fault_record.survived += 1

    final = _start(source, out, 2, log)
    while final.poll() is None:
        note_recovery()
        time.sleep(0.005)
    assert final.wait(timeout=120) == 0, log.read_text()
    if killed_at is not None:  # the last kill came after the final commit: finishing is recovering
        fault_record.recovery_s.append(time.monotonic() - killed_at[0])

    assert output_files(out) == reference, "the resumed conversion differs from a clean one"
    assert not (out / ".shardify").exists() and not [p for p in out.rglob("*") if TEMP_NAMES.search(p.name)]
    manifest = read_manifest(out)
    samples = read_samples(out)
    skipped = read_skipped(out)
    assert [entry["samples"] for entry in manifest["shards"]] == [
        len(read_shard(out / entry["name"])) for entry in manifest["shards"]
    ]
    assert manifest["rows_read"] == ROWS == manifest["samples_written"] + manifest["rows_skipped"]
    assert len(samples) == manifest["samples_written"] and len(skipped) == manifest["rows_skipped"] > 0
    # Every input row, as (input index, row), must be in exactly one shard or the skipped log.
    inputs = manifest["inputs"]
    seen = Counter(tuple(int(part) for part in s["__key__"].decode().split("-")[:2]) for s in samples)
    seen.update((inputs.index(record["source"]), record["row"]) for record in skipped)
    expected = {(index, row) for index in range(len(inputs)) for row in range(ROWS // len(inputs))}
    fault_record.lost = len(expected - set(seen))
    fault_record.repeated = sum(count - 1 for count in seen.values()) + len(set(seen) - expected)
    fault_record.trials += 1
    assert fault_record.lost == 0 and fault_record.repeated == 0, (fault_record.lost, fault_record.repeated)
