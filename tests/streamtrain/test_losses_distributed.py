"""Two real processes (torchrun, gloo): the global-batch loss and its gradients equal one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from streamtrain import distributed
from tests.streamtrain.losses_worker import GLOBAL_BATCH, build, loss_and_grads

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Each rank's results from one 2-process run of losses_worker.py."""
    out = tmp_path_factory.mktemp("losses_distributed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    try:
        result = subprocess.run(
            [*command, str(Path(__file__).with_name("losses_worker.py")), str(out)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the two ranks hung; their output:\n{exc.stdout}\n{exc.stderr}") from None
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def single_process(rows: slice = slice(None)) -> tuple[float, dict[int, float], dict[str, torch.Tensor]]:
    model, media, text = build()
    loss, per_dim = loss_and_grads(model, media[rows], text[rows])
    return loss.item(), per_dim, {name: param.grad for name, param in model.named_parameters()}


def test_two_rank_loss_and_gradients_equal_the_global_batch(ranks: list[dict[str, Any]]) -> None:
    loss, per_dim, grads = single_process()
    assert sum(r["loss"]["loss"] for r in ranks) / 2 == pytest.approx(loss, abs=1e-6)
    for d, value in per_dim.items():
        assert sum(r["loss"]["per_dim"][str(d)] for r in ranks) / 2 == pytest.approx(value, abs=1e-6)
    assert "logit_scale.log_scale" in grads and grads["logit_scale.log_scale"].abs() > 1e-3
    for rank in ranks:
        assert rank["loss"]["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(
                torch.tensor(rank["loss"]["grads"][name], dtype=torch.float64), grad, atol=1e-5, rtol=0
            )


def test_rank_local_losses_would_give_other_gradients() -> None:
    # Guards the tolerance above: without the global batch (each half against itself only),
    # the averaged gradients are far from the single-process ones.
    half = GLOBAL_BATCH // 2
    _, _, grads = single_process()
    _, _, first = single_process(slice(0, half))
    _, _, second = single_process(slice(half, None))
    gaps = [((first[n] + second[n]) / 2 - grads[n]).abs().max().item() for n in grads]
    assert max(gaps) > 1e-2


def test_gather_helpers_on_uneven_ranks(ranks: list[dict[str, Any]]) -> None:
    rows = [torch.arange(3 * 2).reshape(3, 2), torch.arange(5 * 2).reshape(5, 2) + 100]
    gathered = torch.cat(rows).tolist()
    for r, rank in enumerate(ranks):
        helpers = rank["helpers"]
        assert (helpers["rank"], helpers["world_size"]) == (r, 2)
        assert helpers["gathered"] == gathered
        assert helpers["gathered_requires_grad"] is False
        assert helpers["gathered_with_empty"] == rows[1].tolist()
        assert helpers["objects"] == [f"rank0-item{i}" for i in range(3)] + [
            f"rank1-item{i}" for i in range(5)
        ]
        assert helpers["sums"] == {"skipped": 3.0, "seen": 31.5}
        assert helpers["with_grad"] == gathered and helpers["with_grad_requires_grad"] is True


def test_helpers_are_no_ops_in_one_process() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    distributed.barrier()
    assert torch.equal(distributed.gather_variable(x), x) and not distributed.gather_variable(x).requires_grad
    assert distributed.gather_objects(["a", "b"]) == ["a", "b"]
    assert distributed.all_reduce_sum({"skipped": 2.0}) == {"skipped": 2.0}
