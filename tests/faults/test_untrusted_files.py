"""Scenario 8: hostile files — a shard with escaping and absolute member names, links, a huge
member and a decompression-bomb image; a parquet of bomb images; pickles crafted to run code.

Proves: streamtrain never extracts a tar (reading and training over the hostile shard create no
file outside the run's output directory); a huge member is skipped unread and counted (memory
stays small) and a bomb image is refused and counted, while every intact sample is delivered
once; shardify skips bomb images as ``too_large`` without decoding them; and resuming from a
checkpoint whose ``optimizer.bin``, ``scheduler.bin`` or ``random_states_0.pkl`` would run code
when unpickled stops with a clear error naming the checkpoint, the code never running.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import uuid
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from shardify.format import Manifest, ShardEntry
from streamtrain.config import load_config
from streamtrain.data.dataset import Source
from streamtrain.data.decoders import CaptionDecoder
from streamtrain.data.elastic import ElasticStream, Layout, StreamConfig
from streamtrain.data.loader import ElasticLoader
from streamtrain.data.shards import resolve
from streamtrain.tasks import TASKS, model_types
from streamtrain.train import checkpoint
from streamtrain.train.checkpoint_manager import CheckpointError
from streamtrain.train.trainer import Trainer
from tests import factories
from tests.faults.conftest import FULL, FaultRecord, fault_rng, trials
from tests.shardify.helpers import read_skipped
from tests.streamtrain.train.conftest import ROOT, convert_sample, streamtrain, tiny_overrides

SCENARIO = "8. untrusted files"
RECIPE = ROOT / "configs" / "alignment.yaml"
HUGE_MEMBER = 2 << 30  # sparse on disk; read whole it would take 2 GiB
MEMORY_LIMIT = 64 << 20


def png_bomb(width: int, height: int, rgb: bool = False) -> bytes:
    """A valid PNG of zeros: a few hundred KB at most that decodes to ``width * height`` pixels."""
    row = 1 + (3 * width if rgb else (width + 7) // 8)
    compressor = zlib.compressobj(9)
    rows_per_chunk = max(1, (1 << 22) // row)
    zeros = bytes(row * rows_per_chunk)
    parts = []
    for first in range(0, height, rows_per_chunk):
        parts.append(compressor.compress(zeros[: row * min(rows_per_chunk, height - first)]))
    parts.append(compressor.flush())

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8 if rgb else 1, 2 if rgb else 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )


def _member(
    handle: Any, name: str, payload: bytes | int, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> None:
    """Append one member; an int payload is that many bytes of sparse zeros (nothing is written)."""
    info = tarfile.TarInfo(name)
    info.size = payload if isinstance(payload, int) else len(payload)
    info.type, info.linkname = kind, link
    if kind != tarfile.REGTYPE:
        info.size = 0
    handle.write(info.tobuf(format=tarfile.GNU_FORMAT))
    if isinstance(payload, int) and info.size:
        handle.seek(info.size, os.SEEK_CUR)
    elif info.size:
        handle.write(payload)
    handle.write(bytes(-info.size % tarfile.BLOCKSIZE))


def hostile_shard(folder: Path, outside: Path, images: list[bytes]) -> dict[str, str]:
    """A shard (and manifest) of hostile members around intact samples; returns key -> fate."""
    folder.mkdir(parents=True)
    fates: dict[str, str] = {}
    with (folder / "shard-000000-000000.tar").open("wb") as handle:

        def sample(key: str, path: str, image: bytes | int, extension: str = "png") -> None:
            _member(handle, f"{path}{key}.{extension}", image)
            _member(handle, f"{path}{key}.txt", f"caption of {key}".encode())

        sample("ok-0", "", images[0])
        sample("escape-up", "../../", images[1])
        fates["escape-up"] = fates["ok-0"] = "delivered"
        sample("escape-abs", f"{outside}/", images[2])
        fates["escape-abs"] = "delivered"
        _member(handle, "link-out.png", b"", tarfile.SYMTYPE, "/etc/passwd")
        _member(handle, "hard-out.png", b"", tarfile.LNKTYPE, "../../../etc/passwd")
        _member(handle, "../dir-out/", b"", tarfile.DIRTYPE)
        sample("huge", "", HUGE_MEMBER)
        fates["huge"] = "oversized"
        sample("bomb", "", png_bomb(11_000, 11_000))
        fates["bomb"] = "decode_error"
        for index in range(1, 4):
            sample(f"ok-{index}", "", images[2 + index])
            fates[f"ok-{index}"] = "delivered"
        handle.write(bytes(2 * tarfile.BLOCKSIZE))
        handle.truncate(handle.tell())
    manifest = Manifest(
        schema="caption",
        shards=[
            ShardEntry(
                "shard-000000-000000.tar", len(fates), (folder / "shard-000000-000000.tar").stat().st_size
            )
        ],
        rows_read=len(fates),
        samples_written=len(fates),
        rows_skipped=0,
        skipped_by_reason={},
        inputs=["crafted"],
        options={},
    )
    (folder / "manifest.json").write_text(manifest.to_json())
    return fates


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return convert_sample(tmp_path_factory.mktemp("s8-digits"))


@pytest.mark.scenario(SCENARIO)
def test_hostile_shard_is_read_and_trained_on_without_extracting(
    digits: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault_record: FaultRecord
) -> None:
    images = [factories.encode(factories.photo(16, 16, seed=s), "PNG") for s in range(6)]
    outside = Path("/tmp") / f"streamtrain-escape-{uuid.uuid4().hex}"
    fates = hostile_shard(tmp_path / "hostile", outside, images)
    fault_record.faults += 6  # two escaping names, two links, a directory, a huge member; the bomb below
    fault_record.faults += 1
    workdir = tmp_path / "cwd" / "a" / "b"  # ``../../`` from here is tmp_path / "cwd"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    before = _tree(tmp_path)

    dataset = resolve(str(tmp_path / "hostile"))
    batch = len(fates) // 2
    decoder = CaptionDecoder(image_size=16)

    def decode(raw: dict[str, Any], rng: random.Random) -> str:
        decoder(raw, rng)
        return raw["__key__"]

    layout = Layout((Source("train", dataset.shards),), 0, 1, batch, 1)
    loader = ElasticLoader(ElasticStream(layout, 0, 0, decode, StreamConfig(shuffle_buffer=1)), list, batch)
    tracemalloc.start()
    with fault_record.recovering():
        batches = [next(loader) for _ in range(loader.batches_per_epoch)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    loader.shutdown()
    delivered = Counter(key for batch in batches if batch is not None for key in batch)
    assert peak < MEMORY_LIMIT, f"reading the hostile shard took {peak >> 20} MiB"
    assert delivered == Counter(key for key, fate in fates.items() if fate == "delivered")
    stats = loader.read_stats
    assert stats["oversized_samples"] == 1 and stats["decode_errors"] == 1, dict(stats)

    # A short training run over it (and the real digits for evaluation) writes only its output.
    out = tmp_path / "run"
    overrides = tiny_overrides(
        {"train": tmp_path / "hostile", "eval": digits["eval"]},
        out,
        **{"train.max_steps": 2, "train.batch_size": 3, "eval.every_steps": 0, "checkpoint.every_steps": 0},
    )
    config = load_config(RECIPE, overrides, model_types())
    Trainer(config, TASKS["alignment"](config)).fit()
    created = sorted(name for name in _tree(tmp_path) - before if not name.startswith("run"))
    assert not created, f"files appeared outside the output directory: {created}"
    assert not outside.exists() and not (tmp_path / "cwd" / "escape-up.png").exists()
    assert not (tmp_path / "cwd" / "dir-out").exists()
    fault_record.trials += 1
    fault_record.survived += 7
    fault_record.lost += sum(1 for key, fate in fates.items() if fate == "delivered" and key not in delivered)
    fault_record.repeated += sum(count - 1 for count in delivered.values())


@pytest.mark.scenario(SCENARIO)
def test_shardify_skips_bomb_images_without_decoding_them(tmp_path: Path, fault_record: FaultRecord) -> None:
    rows = factories.caption_rows(6, size=(16, 16))
    bombs = {"bomb-warn": png_bomb(12_000, 12_000, rgb=True), "bomb-error": png_bomb(20_000, 20_000)}
    for name, data in bombs.items():
        rows.append({"sample_id": name, "caption": name, "image_bytes": data})
    factories.write_parquet(tmp_path / "rows.parquet", rows)
    # The real CLI in a fresh interpreter that reports its own peak memory (VmHWM: ru_maxrss would
    # count the forked image of this test process too).
    report_peak = (
        "import sys\nfrom shardify.cli import main\ncode = main(sys.argv[1:])\n"
        "print(*[line for line in open('/proc/self/status') if line.startswith('VmHWM')], file=sys.stderr)\n"
        "sys.exit(code)"
    )
    command = [sys.executable, "-c", report_peak, "parquet-to-tar", str(tmp_path / "rows.parquet")]
    fault_record.faults += len(bombs)
    with fault_record.recovering():
        done = subprocess.run(
            [*command, "-o", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 0, done.stderr
    peak_kib = int(done.stderr.split("VmHWM:")[1].split()[0])
    # Decoding the first bomb alone would take 432 MB; the converter itself needs about 90 MB.
    assert peak_kib < 250 << 10, f"shardify peaked at {peak_kib >> 10} MiB"
    skipped = {record["sample_id"]: record["reason"] for record in read_skipped(tmp_path / "out")}
    assert skipped == dict.fromkeys(bombs, "too_large")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["samples_written"] == 6 and manifest["rows_read"] == 8
    fault_record.trials += 1
    fault_record.survived += len(bombs)


class _RunsCode:
    """Unpickling this creates ``marker``: what a hostile checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


@pytest.mark.scenario(SCENARIO)
def test_resume_refuses_checkpoint_files_that_would_run_code(
    digits: dict[str, Path], tmp_path: Path, fault_record: FaultRecord
) -> None:
    rng = fault_rng(SCENARIO)
    out = tmp_path / "run"

    def config(steps: int) -> Any:
        overrides = tiny_overrides(
            digits,
            out,
            **{
                "train.max_steps": steps,
                "eval.every_steps": 0,
                "checkpoint.every_steps": 2,
                "data.num_workers": 0,
            },
        )
        return load_config(RECIPE, overrides, model_types())

    first = config(2)
    Trainer(first, TASKS["alignment"](first)).fit()
    saved = checkpoint.latest_complete(out)
    assert saved is not None
    pristine = tmp_path / "pristine"
    shutil.copytree(saved, pristine)

    # The crafted file does run code when unpickled freely: the test could not pass by accident.
    control = tmp_path / "control-marker"
    torch.save(_RunsCode(control), tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists()

    targets = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"]
    rng.shuffle(targets)
    for name in targets[: trials(quick=len(targets), full=len(targets))]:
        shutil.rmtree(saved)
        shutil.copytree(pristine, saved)
        marker = tmp_path / f"ran-{name}"
        torch.save(_RunsCode(marker), saved / name)
        fault_record.faults += 1
        resumed = config(4)
        with fault_record.recovering(), pytest.raises(CheckpointError) as refused:
            Trainer(resumed, TASKS["alignment"](resumed)).fit()
        assert not marker.exists(), f"unpickling {name} ran code"
        message = str(refused.value)
        assert str(saved) in message and "not a plain tensor checkpoint" in message, message
        fault_record.trials += 1
        fault_record.survived += 1


@pytest.mark.skipif(not FULL, reason="a DeepSpeed run and two resumes (~1 min): run by ./launch.sh faults")
@pytest.mark.scenario(SCENARIO)
def test_deepspeed_resume_refuses_checkpoint_files_that_would_run_code(
    digits: dict[str, Path], tmp_path: Path, fault_record: FaultRecord
) -> None:
    """DeepSpeed reads its own checkpoint files with ``weights_only=False``; the trainer makes
    those loads weights-only too, so a crafted optimizer or model-state file runs nothing."""
    out = tmp_path / "run"
    common = {
        "train.deepspeed": ROOT / "configs" / "deepspeed" / "zero2.json",
        "eval.every_steps": 0,
        "checkpoint.every_steps": 2,
        "data.num_workers": 0,
    }
    first = streamtrain(
        ["train", str(RECIPE), *tiny_overrides(digits, out, **common, **{"train.max_steps": 2})]
    )
    assert first.returncode == 0, first.stderr[-2000:]
    saved = out / "step-00000002"
    pristine = tmp_path / "pristine"
    shutil.copytree(saved, pristine)
    for name in sorted(p.name for p in (saved / "pytorch_model").glob("*.pt")):
        shutil.rmtree(saved)
        shutil.copytree(pristine, saved)
        marker = tmp_path / f"ran-{name}"
        torch.save(_RunsCode(marker), saved / "pytorch_model" / name)
        fault_record.faults += 1
        with fault_record.recovering():
            resumed = streamtrain(
                ["train", str(RECIPE), *tiny_overrides(digits, out, **common, **{"train.max_steps": 4})]
            )
        assert not marker.exists(), f"unpickling {name} ran code"
        assert resumed.returncode == 2, resumed.stderr[-2000:]
        assert "not a plain tensor checkpoint" in resumed.stderr and "Traceback" not in resumed.stderr
        fault_record.trials += 1
        fault_record.survived += 1
