"""Reward-ranked fine-tuning (``method: raft``): what it keeps, what it trains on, and that it moves a model the
reward's way on the real trainer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slimdit.distill.dpo import DPOLoss
from slimdit.distill.losses import per_sample_mse
from slimdit.distill.raft import RaftLoss, kept_rows
from slimdit.distill.steps import deterministic_sample, group_conditions, guided_prediction, transitions
from slimdit.models import adapter_for
from tests.test_compress import tiny
from tests.test_reward import _batch, _brightness, _decode, _train
from tests.test_steps import V
from tests.test_trainer import _data


def test_kept_rows_are_the_best_of_each_group_above_the_threshold():
    r = torch.tensor([0.2, 0.9, 0.9, 0.1, 0.0, 0.3, 0.1, 0.2])
    assert kept_rows(r, 4, 1, None).tolist() == [1, 5]  # ties go to the earlier row
    assert kept_rows(r, 4, 2, None).tolist() == [1, 2, 5, 7]
    assert kept_rows(r, 4, 2, 0.5).tolist() == [1, 2]  # the second group reaches no threshold
    assert kept_rows(r, 4, 1, 1.0).numel() == 0


def _raft(adapter, data, reward=_brightness, **kw):
    t, s = transitions(V, 4)
    args = dict(null=data.null, guidance=2.0, group=4, threshold=None, draws=2)
    return RaftLoss(adapter, [f"prompt {i}" for i in range(len(data))], reward, _decode, t, s, **{**args, **kw})


def test_the_rollout_is_the_guided_deterministic_sampler():
    model = tiny()
    adapter, data = adapter_for(model, V), _data()
    loss = _raft(adapter, data)
    b = _batch(data)
    x, cond, null, rewards = loss.rollout(model, b)
    noise = torch.randn((2 * 4, *data.latents.shape[1:]), generator=torch.Generator().manual_seed(0))
    c, n = group_conditions(adapter, model, b.cond, data.null, 2.0, 4, "cpu")
    with torch.no_grad():
        ref = deterministic_sample(adapter, model, noise, c, n, 2.0, loss.t, loss.s)
    torch.testing.assert_close(x.float(), ref)
    assert torch.equal(rewards, torch.as_tensor(_brightness(None, _decode(x))))
    assert torch.equal(cond["prompt_embeds"][::4], b.cond["prompt_embeds"])  # each group's own caption
    assert null is not None and null["prompt_embeds"].shape == cond["prompt_embeds"].shape  # sampled with CFG


def test_the_loss_fits_the_guided_prediction_on_the_kept_images():
    """The prediction fitted is CFG's ``u + w (c - u)``, as sampled; not the conditional branch alone."""
    model = tiny()
    adapter, data = adapter_for(model, V), _data()
    loss = _raft(adapter, data, draws=3)
    with torch.no_grad():
        out = loss(model, model, _batch(data))
        b = _batch(data)  # the same draws, replayed in the loss's order: rollout, then noise and timesteps
        x, cond, null, rewards = loss.rollout(model, b)
        rows = kept_rows(rewards, 4, 1, None).repeat_interleave(3)
        x0 = x[rows]
        eps = torch.randn(x0.shape, generator=b.generator)
        t = adapter.objective.sample_t(x0.shape[0], b.generator, adapter.image_tokens(model, x0))
        xt, target = adapter.objective.noise(x0, eps, t)
        c = {k: v[rows] for k, v in cond.items()}
        u = {k: v[rows] for k, v in null.items()}
        guided = guided_prediction(adapter, model, xt, t, c, u, 2.0)
        conditional = guided_prediction(adapter, model, xt, t, c, None, 2.0)
    torch.testing.assert_close(out["task"], per_sample_mse(guided, target).mean())
    assert abs(float(out["task"]) - float(per_sample_mse(conditional, target).mean())) > 1e-4


def test_nothing_kept_is_a_zero_step_and_a_copy_of_its_reference_pays_no_kl():
    teacher = tiny()
    student = copy.deepcopy(teacher).requires_grad_(True)
    adapter, data = adapter_for(student, V), _data()
    out = _raft(adapter, data, reward=lambda c, im: np.zeros(len(c), np.float32), threshold=1.0, kl=1.0)(
        student, teacher, _batch(data))
    assert float(out["total"].detach()) == 0 and float(out["kept"]) == 0
    out["total"].backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in student.parameters())
    student.zero_grad()
    out = _raft(adapter, data, kl=1.0)(student, teacher, _batch(data))
    assert float(out["kl"]) == 0 and float(out["task"]) > 0 and float(out["kept"]) == 0.25  # best of each 4
    out["total"].backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0


def test_a_raft_config_keeps_no_more_than_its_group():
    from slimdit.distill.reward import RewardConfig

    with pytest.raises(ValueError, match=r"keep \(9\) exceeds the group \(8\)"):
        RewardConfig(out="x", method="raft", group=8, keep=9)
    with pytest.raises(ValueError, match="unknown reward"):
        RewardConfig(out="x", method="raft", reward="shapes-embedder")  # a differentiable reward only


@pytest.mark.parametrize("method", ["raft", "dpo"])
def test_slimdit_reward_runs_raft_and_dpo_end_to_end(tiny_teacher, tmp_path, method):
    import json

    import yaml

    from slimdit.cli import main
    from slimdit.pipelines.loading import load_pipeline

    cfg = {"teacher": tiny_teacher, "out": str(tmp_path / "run"), "method": method,
           "reward": "shapes-geneval-credit", "threshold": None, "group": 2, "sample_steps": 3,
           "data": {"real": "shapes-train:8"}, "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 1,
                                                         "lr": 1e-3}, "eval": {"benchmark": None}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["reward", "--config", str(tmp_path / "c.yaml")]) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["method"] == method and [step for step, _ in s["reward_curve"]] == [1, 2]
    assert all(0 <= r <= 1 for _, r in s["reward_curve"])  # the detector's partial credit
    before = load_pipeline(tiny_teacher, "cpu").transformer.state_dict()
    after = load_pipeline(str(tmp_path / "run" / "student"), "cpu").transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the kept images moved the student


# ---- online Diffusion-DPO (method: dpo), on the same rollouts


def _dpo(adapter, data, reward=_brightness, **kw):
    t, s = transitions(V, 4)
    args = dict(null=data.null, guidance=2.0, group=4, draws=2, beta=500.0)
    return DPOLoss(adapter, [f"prompt {i}" for i in range(len(data))], reward, _decode, t, s, **{**args, **kw})


def test_preference_pairs_are_each_group_s_best_and_worst_where_they_differ():
    from slimdit.distill.dpo import preference_pairs

    r = torch.tensor([0.2, 0.9, 0.9, 0.1, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 1.0])
    win, lose = preference_pairs(r, 4)
    assert win.tolist() == [1, 8] and lose.tolist() == [3, 9]  # the group that agrees makes no pair
    win, lose = preference_pairs(r, 4, threshold=1.0)
    assert win.tolist() == [8] and lose.tolist() == [9]


def test_dpo_starts_at_log_2_pushes_the_preferred_image_and_is_zero_where_groups_agree():
    teacher = tiny()
    student = copy.deepcopy(teacher).requires_grad_(True)
    adapter, data = adapter_for(student, V), _data()
    out = _dpo(adapter, data, reward=lambda c, im: np.ones(len(c), np.float32))(student, teacher, _batch(data))
    assert float(out["total"].detach()) == 0 and float(out["pairs"]) == 0
    out["total"].backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in student.parameters())
    student.zero_grad()
    out = _dpo(adapter, data)(student, teacher, _batch(data))  # a copy of its reference: no margin yet
    assert float(out["margin"]) == 0 and float(out["pairs"]) == 1
    torch.testing.assert_close(out["total"].detach(), torch.tensor(np.log(2.0), dtype=torch.float32))
    out["total"].backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0


def test_raft_draws_its_groups_from_the_frozen_reference_unless_told_the_model():
    teacher = tiny()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter, data = adapter_for(student, V), _data()
    for sampler, model in (("reference", teacher), ("model", student)):
        loss = _raft(adapter, data, sampler=sampler)
        with torch.no_grad():
            drawn = loss.rollout(model, _batch(data))[-1].mean()
            out = loss(student, teacher, _batch(data))
        assert float(out["reward"]) == float(drawn)
    with pytest.raises(ValueError, match="sampler"):
        _raft(adapter, data, sampler="nope")


def _dpo_kl(adapter, data, kl):  # DPO holds its reference inside its loss: no separate KL term
    return _dpo(adapter, data)


@pytest.mark.parametrize("method", ["raft", "dpo"])
def test_raft_and_dpo_raise_the_reward_and_a_resumed_run_ends_where_an_uninterrupted_one_ends(tmp_path, method):
    make = _raft if method == "raft" else _dpo_kl
    tr, data = _train(tmp_path / "a", 24, make_loss=make)
    loss = _raft(tr.adapter, data, group=16)  # its deterministic guided rollout scores either

    def mean_reward(model):
        return float(loss.rollout(model, _batch(data, seed=123, rows=tuple(range(8))))[-1].mean())

    assert mean_reward(tr.student_model()) > mean_reward(tiny()) + 0.02  # brighter images after tuning
    _train(tmp_path / "b", 4, max_steps=2, make_loss=make)  # stopped after its step-2 checkpoint
    resumed, _ = _train(tmp_path / "b", 4, make_loss=make)
    whole, _ = _train(tmp_path / "c", 4, make_loss=make)
    for p, q in zip(resumed.student_model().parameters(), whole.student_model().parameters()):
        assert torch.equal(p, q)
