"""data.decode_device from the command line: a GPU asked for where training runs on the CPU, or a
value that is not one, ends with one clear line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.streamtrain.train.conftest import ROOT, streamtrain, tiny_overrides


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_decode_without_a_gpu_is_refused(digits_shards, tmp_path: Path) -> None:
    args = tiny_overrides(digits_shards, tmp_path / "run", **{"data.decode_device": "cuda"})
    result = streamtrain(["train", str(ROOT / "configs" / "alignment.yaml"), *args])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "data.decode_device is cuda, but training runs on cpu" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_unknown_decode_device_is_refused(digits_shards, tmp_path: Path) -> None:
    args = tiny_overrides(digits_shards, tmp_path / "run", **{"data.decode_device": "gpu"})
    result = streamtrain(["train", str(ROOT / "configs" / "alignment.yaml"), *args])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "data.decode_device" in result.stderr and "'cuda'" in result.stderr
