"""Single-process checks of the contrastive losses, the logit scale and the Matryoshka dim schedule."""

from __future__ import annotations

import math
import random

import pytest
import torch

from streamtrain.losses import LogitScale, gather_with_grad, info_nce, matryoshka_info_nce, pick_mrl_dim


def reference_info_nce(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """Symmetric InfoNCE written out row by row: -log softmax of the matching pair, both ways."""
    a = [row / row.norm() for row in a.double()]
    b = [row / row.norm() for row in b.double()]
    total = 0.0
    for queries, candidates in ((a, b), (b, a)):
        for i, query in enumerate(queries):
            logits = [scale * float(query @ candidate) for candidate in candidates]
            total += -logits[i] + math.log(sum(math.exp(logit) for logit in logits))
    return total / (2 * len(a))


def test_info_nce_matches_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    loss = info_nce(a, b, torch.tensor(4.0))
    assert loss.item() == pytest.approx(reference_info_nce(a, b, 4.0), abs=1e-5)
    # Not symmetric in the rows: shuffling b's rows breaks the pairs and changes the loss.
    assert info_nce(a, b.flip(0), torch.tensor(4.0)).item() != pytest.approx(loss.item(), abs=1e-3)


def test_info_nce_of_matching_pairs_with_a_sharp_scale_is_near_zero() -> None:
    pairs = torch.eye(4) * 3.0  # normalized inside: scale does not matter, orthogonal rows do
    assert info_nce(pairs, pairs, torch.tensor(100.0)).item() < 1e-6
    # The same pairs with the columns shuffled are all wrong: about the whole margin of 100.
    assert info_nce(pairs, pairs.roll(1, dims=0), torch.tensor(100.0)).item() > 99


def test_gather_with_grad_is_identity_in_one_process() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x


def test_logit_scale_learnable_fixed_and_clamped() -> None:
    learnable = LogitScale(temperature=0.07)
    assert [name for name, _ in learnable.named_parameters()] == ["log_scale"]
    assert learnable().item() == pytest.approx(1 / 0.07)
    assert learnable.temperature == pytest.approx(0.07)

    fixed = LogitScale(temperature=0.05, learnable=False)
    assert list(fixed.parameters()) == []
    assert "log_scale" in dict(fixed.named_buffers()) and "log_scale" in fixed.state_dict()
    assert fixed().item() == pytest.approx(20.0)

    with torch.no_grad():
        learnable.log_scale.fill_(math.log(1000.0))  # as if training had pushed it past the clamp
    scale = learnable()
    assert scale.item() == pytest.approx(100.0)
    assert learnable.temperature == pytest.approx(0.01)
    scale.backward()
    assert learnable.log_scale.grad.item() == 0.0  # clamped: no push further

    with pytest.raises(ValueError, match="min_temperature"):
        LogitScale(temperature=0.005, min_temperature=0.01)


def test_logit_scale_gets_a_gradient_through_the_loss() -> None:
    logit_scale = LogitScale(temperature=0.1)
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    info_nce(a, b, logit_scale()).backward()
    assert logit_scale.log_scale.grad is not None and logit_scale.log_scale.grad.item() != 0.0


def test_matryoshka_averages_dims_and_selects_one() -> None:
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    scale = torch.tensor(10.0)
    per_dim = {d: info_nce(a[:, :d], b[:, :d], scale).item() for d in (2, 4, 8)}
    assert len({round(v, 4) for v in per_dim.values()}) == 3  # the prefixes really differ

    loss, values = matryoshka_info_nce(a, b, scale, dims=(2, 4, 8))
    assert values == pytest.approx(per_dim)
    assert loss.item() == pytest.approx(sum(per_dim.values()) / 3)

    loss, values = matryoshka_info_nce(a, b, scale, dims=(2, 4, 8), dim=4)
    assert values == pytest.approx({4: per_dim[4]})
    assert loss.item() == pytest.approx(per_dim[4])

    with pytest.raises(ValueError, match=r"1\.\.8"):
        matryoshka_info_nce(a, b, scale, dims=(4, 16))


def test_pick_mrl_dim_is_a_pure_function_of_seed_and_step() -> None:
    dims = (64, 128, 256, 512)
    picks = [pick_mrl_dim(dims, seed=7, step=step) for step in range(200)]
    random.seed(123)  # global RNG state must not matter
    torch.manual_seed(123)
    assert [pick_mrl_dim(dims, seed=7, step=step) for step in range(200)] == picks
    assert set(picks) == set(dims)
    assert max(picks.count(d) for d in dims) < 80  # roughly uniform: 50 expected each
    assert [pick_mrl_dim(dims, seed=8, step=step) for step in range(200)] != picks
    assert pick_mrl_dim(dims, seed=7, step=150) == picks[150]  # a resumed run picks the same
