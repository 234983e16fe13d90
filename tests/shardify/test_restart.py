"""A conversion killed with SIGKILL at random moments, then restarted, ends exactly like a clean one."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import factories
from tests.shardify.helpers import (
    convert_command,
    local_committed_rows,
    output_files,
    read_manifest,
    read_shard,
)


@pytest.fixture(scope="module")
def slow_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough rows of 640x480 photos that a conversion takes a few seconds on one worker."""
    folder = tmp_path_factory.mktemp("restart-input")
    distinct = [factories.jpeg(640, 480, seed=s) for s in range(40)]
    for part in range(2):
        rows = [
            {
                "sample_id": f"p{part}-{i}",
                "caption": f"caption {part} {i}",
                "image_bytes": b"not an image" if i % 97 == 5 else distinct[i % len(distinct)],
            }
            for i in range(2000)
        ]
        factories.write_parquet(folder / f"part-{part}.parquet", rows, row_group_size=100)
    return folder


def _assert_only_complete_shards_visible(out: Path) -> int:
    """Every visible *.tar is a whole archive (the converter never exposes a partial one)."""
    visible = sorted(out.glob("*.tar")) if out.exists() else []
    last_of_unit = {shard.name.rsplit("-", 1)[0]: shard for shard in visible}
    for shard in visible:
        samples = read_shard(shard)  # raises on a cut archive
        data = shard.read_bytes()  # and a cut at a member boundary still lacks the end blocks
        assert len(data) % 10240 == 0 and data[-1024:] == bytes(1024)
        # Only a unit's final shard may be short (each input here is one unit).
        assert len(samples) == 150 or last_of_unit[shard.name.rsplit("-", 1)[0]] == shard
    return len(visible)


@pytest.mark.full  # the suite: tests/faults/test_shardify_killed.py, test_s3.py
def test_killed_conversion_resumes_to_identical_output(slow_input: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(convert_command(slow_input, reference, 2, 150), check=True, timeout=300)
    rng = random.Random(1234)
    out = tmp_path / "killed"
    kills = 0
    progress = []
    resumed = 0
    for attempt in range(4):
        process = subprocess.Popen(
            convert_command(slow_input, out, 1 + attempt % 2, 150), stderr=subprocess.PIPE, text=True
        )
        # Kill once the journal has moved past this attempt's mark, plus a random few ms, so the
        # kill lands at an arbitrary point of writing, publishing or journaling.
        mark = 700 * (attempt + 1)
        while process.poll() is None and local_committed_rows(out) < mark:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
        resumed += "resuming an interrupted conversion" in process.stderr.read()
        progress.append(_assert_only_complete_shards_visible(out))
        if (out / "manifest.json").exists():  # killed after finishing: the manifest must be whole
            listed = [entry["name"] for entry in read_manifest(out)["shards"]]
            assert sorted(listed) == sorted(p.name for p in out.glob("*.tar"))
    assert kills >= 3, "the conversion finished before it could be killed; make the input slower"
    assert progress[-1] > 0, "no shard was ever committed before a kill"
    assert resumed >= 1 and progress == sorted(progress), progress
    final = subprocess.run(
        convert_command(slow_input, out, 2, 150), capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stderr
    assert output_files(out) == output_files(reference)
    manifest = read_manifest(out)
    assert manifest["rows_read"] == 4000 == manifest["samples_written"] + manifest["rows_skipped"]
    assert not (out / ".shardify").exists()
