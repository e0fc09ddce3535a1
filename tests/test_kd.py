"""KD losses and the feature map."""

from __future__ import annotations

import pytest
import torch

from slimdit.distill.feature_map import feature_map
from slimdit.distill.losses import PRESETS, kd_loss, normalized_kd

T = [f"block.{i}" for i in range(8)]


def test_feature_map_for_svd_is_identity():
    assert feature_map(T, T) == [(f"block.{i}", f"block.{i}") for i in range(8)]


@pytest.mark.parametrize("kept, expect", [
    # gap in the middle: teacher 3,4 removed -> the last kept unit before it (teacher 2, student 2) <-> teacher 4
    (["block.0", "block.1", "block.2", "block.5", "block.6", "block.7"],
     [("block.0", "block.0"), ("block.1", "block.1"), ("block.2", "block.4"), ("block.3", "block.5"),
      ("block.4", "block.6"), ("block.5", "block.7")]),
    # gap at the start: nothing before it to match
    (["block.2", "block.3", "block.4", "block.5", "block.6", "block.7"],
     [(f"block.{j}", f"block.{j + 2}") for j in range(6)]),
    # gap at the end: the last kept unit is matched to the teacher's last unit
    (["block.0", "block.1", "block.2", "block.3", "block.4", "block.5"],
     [(f"block.{j}", f"block.{j}") for j in range(5)] + [("block.5", "block.7")]),
])
def test_feature_map_for_removal_gaps(kept, expect):
    assert feature_map(T, kept) == expect


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_kd_term_is_zero_for_identical_models(preset):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 3, 8, 8, generator=g)
    feats = [torch.randn(4, 16, 32, generator=g) for _ in range(3)]
    task = torch.rand(4, generator=g)
    terms = kd_loss(preset, task, out, out.clone(), feats, [f.clone() for f in feats])
    assert terms["out"] == 0 and terms["feat"] == 0
    p = PRESETS[preset]
    assert torch.allclose(terms["total"], p.lambda_task * task.mean() if p.task else torch.zeros(()))


def test_normalisation_matches_a_hand_computed_example():
    # B = 2 samples, L = 2 units, D = 2 features each
    t = [torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.0, 2.0]])]
    s = [torch.tensor([[0.0, 1.0], [2.0, 2.0]]), torch.tensor([[3.0, 2.0], [1.0, 1.0]])]
    task = torch.tensor([0.5, 2.0])
    eps = 1e-8
    # L_il = ||T-S||^2 / D
    Lil = [[0.5, 2.0], [2.0, 1.0]]
    # eta_il = sqrt(||T||^2 / D)
    eta = [[1.0, (25 / 2) ** 0.5], [2 ** 0.5, 2 ** 0.5]]
    expect = 0.0
    for i in range(2):
        for l in range(2):
            w = (task[i].item() / (Lil[i][l] + eps)) * (sum(eta[i]) / (2 * eta[i][l] + eps))
            expect += w * Lil[i][l] / 2 / 2
    assert normalized_kd(task, t, s).item() == pytest.approx(expect, rel=1e-5)


def test_normalisation_weights_carry_no_gradient():
    t = [torch.randn(3, 5)]
    s = [torch.randn(3, 5, requires_grad=True)]
    task = torch.rand(3, requires_grad=True)
    normalized_kd(task, t, s).backward()
    assert task.grad is None
    # with constant weights the gradient is w * dL/dS: w_i = task_i / L_i (one unit, eta ratio 1)
    L = (t[0] - s[0].detach()).pow(2).mean(1)
    expect = (task.detach() / L)[:, None] * 2 * (s[0].detach() - t[0]) / 5 / 3
    assert torch.allclose(s[0].grad, expect, rtol=1e-4)
