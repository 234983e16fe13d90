"""Two real processes (torchrun, gloo) on uneven shards: disjoint samples, equal batch counts, no hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shardify.convert import ConvertOptions, convert
from tests import factories

ROOT = Path(__file__).resolve().parents[3]


def test_two_ranks_read_disjoint_samples_and_equal_batches(tmp_path: Path) -> None:
    # 7 shards of very different sizes, fewer than ranks x workers would like.
    sizes = [40, 3, 17, 1, 29, 8, 11]
    for i, size in enumerate(sizes):
        rows = factories.caption_rows(size, start=1000 * i, size=(8, 8))
        factories.write_parquet(tmp_path / f"part-{i}.parquet", rows)
    convert(
        [str(tmp_path / f"part-{i}.parquet") for i in range(len(sizes))],
        ConvertOptions(output=str(tmp_path / "shards"), max_samples_per_shard=40),
    )
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                str(Path(__file__).with_name("distributed_reader.py")),
                str(tmp_path / "shards"),
                str(out),
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the two ranks hung; their output:\n{exc.stdout}\n{exc.stderr}") from None
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    per_epoch = ranks[0]["per_epoch"]
    assert per_epoch == ranks[1]["per_epoch"] == sum(sizes) // 8
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 2 * per_epoch
    for epoch in range(2):
        seen = [
            [i for batch in rank["batches"][epoch * per_epoch : (epoch + 1) * per_epoch] for i in batch]
            for rank in ranks
        ]
        assert all(len(ids) == len(set(ids)) == per_epoch * 4 for ids in seen)
        assert not set(seen[0]) & set(seen[1])
        assert sum(sizes) - len(set(seen[0]) | set(seen[1])) < 2 * 4  # under one batch per rank left out
