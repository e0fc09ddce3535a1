"""Reward fine-tuning: the stochastic sampler is DDIM with eta and keeps the marginals, the policy gradient is zero
where a group agrees, it raises a reward, a resumed run ends where an uninterrupted one ends, and ``slimdit reward``
tunes, evaluates and cards a model end to end."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slimdit.distill.grpo import GRPOLoss, group_advantages
from slimdit.distill.losses import Batch
from slimdit.distill.objectives import objective_for
from slimdit.distill.steps import deterministic_step, stochastic_step, student_scheduler, transitions
from slimdit.models import adapter_for
from tests.test_compress import tiny
from tests.test_flux import FLOW, flux_data, tiny_flux
from tests.test_steps import STATIC_FLOW, V
from tests.test_trainer import SCHED, _data


@pytest.mark.parametrize("config", [SCHED, V], ids=["eps", "v"])
def test_the_stochastic_step_is_ddim_with_eta(config):
    obj = objective_for(config)
    t, s = transitions(config, 4)
    sched = student_scheduler(config)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for i in range(4):
        pred, z = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
        tt, ss = t[i].expand(3), s[i].expand(3)
        mean, std = stochastic_step(obj, x, pred, tt, ss, eta=1.0)
        theirs = sched.step(pred, sched.timesteps[i], x, eta=1.0, variance_noise=z).prev_sample
        assert torch.allclose(mean + std * z, theirs, atol=1e-5), i
        m0, s0 = stochastic_step(obj, x, pred, tt, ss, eta=0.0)
        assert float(s0.max()) == 0 and torch.allclose(m0, deterministic_step(obj, x, pred, tt, ss), atol=1e-6)
        x = theirs
    assert float(std.max()) == 0  # the last step lands on the clean end, deterministically


@pytest.mark.parametrize("config", [V, STATIC_FLOW], ids=["v", "flow"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_the_stochastic_step_keeps_the_marginals(config, eta):
    """With the exact prediction for a known x0, ``x_s`` is distributed as the forward process puts it: mean
    ``alpha_s x0`` and variance ``sigma_s^2``, whatever eta."""
    obj = objective_for(config)
    t, s = transitions(config, 4)
    g = torch.Generator().manual_seed(0)
    n, x0 = 20000, torch.full((1, 1, 1, 1), 0.7)
    for i in range(3):
        tt, ss = t[i].expand(n), s[i].expand(n)
        xt, pred = obj.noise(x0.expand(n, 1, 1, 1), torch.randn(n, 1, 1, 1, generator=g), tt)
        mean, std = stochastic_step(obj, xt, pred, tt, ss, eta)
        xs = mean + std * torch.randn(n, 1, 1, 1, generator=g)
        a_s, s_s = obj.coefficients(ss[:1], x0)
        assert float(xs.mean()) == pytest.approx(float(a_s * x0), abs=0.02)
        assert float(xs.var()) == pytest.approx(float(s_s ** 2), rel=0.05)


def test_group_advantages_are_standardised_within_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    a = group_advantages(r, 4)
    assert torch.equal(a[:4], torch.zeros(4))  # a group that agrees teaches nothing
    assert torch.allclose(a[4:], torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-3)


def _brightness(captions, images):
    return images.astype(np.float32).mean((1, 2, 3)) / 255


def _decode(z):  # latents as pixels: the first three channels, in [-1, 1]
    return np.clip(np.rint((z[:, :3].permute(0, 2, 3, 1).float().numpy() + 1) * 127.5), 0, 255).astype(np.uint8)


def _loss(adapter, data, reward=_brightness, **kw):
    t, s = transitions(V, 4)
    args = dict(null=data.null, guidance=2.0, group=4, train_steps=2)
    return GRPOLoss(adapter, [f"prompt {i}" for i in range(len(data))], reward, _decode, t, s, **{**args, **kw})


def _batch(data, seed=0, rows=(0, 1)):
    idx = torch.tensor(rows)
    return Batch(data.latents[idx], data.take(idx), torch.Generator().manual_seed(seed), index=idx)


def test_no_gradient_where_every_group_agrees_and_the_student_is_its_reference():
    teacher = tiny()
    student = copy.deepcopy(teacher).requires_grad_(True)
    adapter, data = adapter_for(student, V), _data()
    loss = _loss(adapter, data, reward=lambda c, im: np.ones(len(c), np.float32), kl=0.5)
    out = loss(student, teacher, _batch(data))
    assert float(out["total"].detach()) == 0 and float(out["kl"]) == 0 and float(out["reward"]) == 1
    out["total"].backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in student.parameters())
    # a reward that tells images apart gives a gradient; a student that left its reference pays the KL
    student.zero_grad()
    out = _loss(adapter, data)(student, teacher, _batch(data))
    out["total"].backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert float(_loss(adapter, data, kl=1.0)(student, teacher, _batch(data))["kl"]) > 0


def test_a_rollout_needs_the_batch_rows():
    teacher = tiny()
    data = _data()
    b = Batch(data.latents[:2], data.take(torch.tensor([0, 1])), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="batch.index"):
        _loss(adapter_for(teacher, V), data)(teacher, teacher, b)


def _train(tmp_path, steps, max_steps=None, make_loss=None):
    """Tune a tiny model with ``make_loss(adapter, data, kl=...)`` (default: GRPO's) on the real trainer."""
    from slimdit.distill.trainer import TrainConfig, Trainer

    teacher = tiny()
    student = copy.deepcopy(teacher)
    adapter, data = adapter_for(student, V), _data()
    cfg = TrainConfig(steps=steps, batch_size=2, warmup_steps=1, lr=3e-3, optimizer="adamw", grad_clip=1.0,
                      weight_decay=0.0, checkpoint_every=2, log_every=1, val_every=0, caption_dropout=0.0)
    tr = Trainer(adapter, teacher, student, data, cfg, tmp_path, loss=(make_loss or _loss)(adapter, data, kl=0.01))
    tr.train(max_steps=max_steps, progress=False)
    return tr, data


def test_grpo_raises_the_reward_and_a_resumed_run_ends_where_an_uninterrupted_one_ends(tmp_path):
    tr, data = _train(tmp_path / "a", 24)
    loss = _loss(tr.adapter, data, group=16)

    def mean_reward(model):
        with torch.no_grad():
            r = loss.rollout(model, _batch(data, seed=123, rows=tuple(range(8))))
        return float(r["rewards"].mean())

    assert mean_reward(tr.student_model()) > mean_reward(tiny()) + 0.02  # brighter images after tuning
    part, _ = _train(tmp_path / "b", 4, max_steps=2)  # stopped after its step-2 checkpoint
    resumed, _ = _train(tmp_path / "b", 4)
    whole, _ = _train(tmp_path / "c", 4)
    for p, q in zip(resumed.student_model().parameters(), whole.student_model().parameters()):
        assert torch.equal(p, q)


def test_the_shapes_reward_scores_training_prompts_and_refuses_evaluation_prompts():
    from slimdit.registry import REWARDS
    from slimdit.worlds.shapes.prompts import eval_prompts, render_prompt, sample_training_prompt

    reward = REWARDS["shapes-geneval"]()
    rng = np.random.default_rng(0)
    prompts = [sample_training_prompt(rng) for _ in range(4)]
    truth = np.stack([render_prompt(p, rng) for p in prompts])
    blank = np.zeros_like(truth)
    assert reward([p.text for p in prompts], truth).tolist() == [1.0] * 4  # ground-truth renders hold
    assert reward([p.text for p in prompts], blank).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="training prompts only"):
        reward([eval_prompts()[0].text], truth[:1])


def test_the_partial_credit_is_one_exactly_when_the_verdict_holds_and_counts_what_is_right():
    from dataclasses import replace

    from slimdit.registry import REWARDS
    from slimdit.worlds.shapes.detector import detect, prompt_credit, prompt_holds
    from slimdit.worlds.shapes.prompts import eval_prompts, parse_prompt, render_prompt, sample_training_prompt

    reward = REWARDS["shapes-geneval-credit"]()
    rng = np.random.default_rng(1)
    prompts = [sample_training_prompt(rng) for _ in range(12)]
    truth = np.stack([render_prompt(p, rng) for p in prompts])
    assert reward([p.text for p in prompts], truth).tolist() == [1.0] * 12
    assert reward([p.text for p in prompts], np.zeros_like(truth)).tolist() == [0.0] * 12
    with pytest.raises(ValueError, match="training prompts only"):
        reward([eval_prompts()[0].text], truth[:1])
    two = next(p for p in eval_prompts() if p.category == "color_attr")
    dets = detect(render_prompt(two, rng))
    assert prompt_holds(two, dets) and prompt_credit(two, dets) == 1.0
    # a wrong colour on one object: 1 of its 2 asked attributes, so half a share of two objects' shares
    wrong = [replace(dets[0], color="none")] + dets[1:]
    assert not prompt_holds(two, wrong) and prompt_credit(two, wrong) == pytest.approx(0.75)
    assert prompt_credit(two, dets[:1]) == pytest.approx(0.5)  # one object missing
    assert prompt_credit(two, dets + [dets[0]]) == pytest.approx(2 / 3)  # one object too many
    rel = next(p for p in eval_prompts() if p.relation is not None)
    rdets = detect(render_prompt(rel, rng))
    assert prompt_credit(rel, rdets) == 1.0
    swapped = [replace(rdets[0], cx=rdets[1].cx, cy=rdets[1].cy), replace(rdets[1], cx=rdets[0].cx, cy=rdets[0].cy)]
    assert not prompt_holds(rel, swapped) and prompt_credit(rel, swapped) == pytest.approx(2 / 3)
    assert parse_prompt(rel.text) == rel


def test_bad_reward_configs_are_refused_before_any_work():
    from slimdit.distill.reward import RewardConfig

    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardConfig(out="x", reward="nope")
    with pytest.raises(ValueError, match="caption_dropout must be 0"):
        RewardConfig(out="x", train={"caption_dropout": 0.1})
    with pytest.raises(ValueError, match="train_steps"):
        RewardConfig(out="x", sample_steps=4, train_steps=4)
    with pytest.raises(ValueError, match="grpo needs sample_steps"):
        RewardConfig(out="x", sample_steps=1, train_steps=1)
    with pytest.raises(ValueError, match="eta"):
        RewardConfig(out="x", eta=1.5)


def test_slimdit_reward_tunes_evaluates_and_cards_a_model(tiny_teacher, tmp_path):
    import json

    import yaml

    from slimdit.cli import main
    from slimdit.pipelines.loading import load_pipeline, sampling_defaults

    cfg = {"teacher": tiny_teacher, "out": str(tmp_path / "run"), "group": 2, "sample_steps": 3, "train_steps": 1,
           "baseline": tiny_teacher, "data": {"real": "shapes-train:8"},
           "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 1},
           "eval": {"limit": 4, "images_per_prompt": 1, "steps": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["reward", "--config", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    assert [step for step, _ in s["reward_curve"]] == [1, 2] and s["images_per_step"] == 4
    for name in ("before", "after", "baseline"):
        assert {"overall", "fid", "cmmd", "single_object"} <= set(s[f"{name}_metrics"])
    assert "fid_change" in s and s["before_metrics"] == s["baseline_metrics"]  # the same model, the same images
    student = str(run / "student")
    assert sampling_defaults(student) == sampling_defaults(tiny_teacher)  # it samples as before
    load_pipeline(student, "cpu")
    card = (run / "student" / "README.md").read_text()
    assert "reward-tuned with slimdit" in card and "- reward-tuning" in card
    assert "| baseline | before | after |" in card
    before = (run / "summary.json").read_text()
    assert main(["reward", "--config", str(tmp_path / "c.yaml")]) == 0  # a rerun continues: nothing left to do
    assert json.loads((run / "summary.json").read_text())["reward_curve"] == json.loads(before)["reward_curve"]


def test_the_core_registers_rewards_from_its_scorers():
    from slimdit.metrics.rewards import scorer_reward
    from slimdit.registry import REWARDS

    assert {"clip", "imagereward", "hpsv2", "shapes-geneval"} <= set(REWARDS)
    seen = []

    def scorer(images, prompts):  # a benchmark scorer's shape: PIL images and their prompts
        seen.append((images[0].size, images[0].mode, prompts))
        return [float(np.asarray(im).mean()) for im in images]

    images = np.stack([np.full((6, 4, 3), v, np.uint8) for v in (10, 200)])
    r = scorer_reward(scorer)(["a", "b"], images)
    assert r.dtype == np.float32 and r.tolist() == [10.0, 200.0] and seen == [((4, 6), "RGB", ["a", "b"])]


# --- direct reward fine-tuning (DRaFT) ---------------------------------------------------------------------------

def _bright(captions, images):  # differentiable brightness of (N, 3, H, W) images in [-1, 1]
    return images.float().mean((1, 2, 3))


def _draft(adapter, data, reward=_bright, **kw):
    from slimdit.distill.draft import DraftLoss

    t, s = transitions(V, 4)
    args = dict(null=data.null, guidance=2.0, group=2, grad_steps=2)
    return DraftLoss(adapter, [f"prompt {i}" for i in range(len(data))], reward, lambda z: z[:, :3].clamp(-1, 1),
                     t, s, **{**args, **kw})


def test_draft_samples_with_the_deterministic_sampler_and_its_gradient_flows_through_the_last_steps():
    teacher = tiny()
    student = copy.deepcopy(teacher).requires_grad_(True)
    adapter, data = adapter_for(student, V), _data()
    loss = _draft(adapter, data, kl=0.5)
    batch = _batch(data)
    out = loss(student, teacher, batch)
    assert float(out["kl"]) == 0  # the student is its reference
    out["total"].backward()
    full = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert full and sum(float(g.abs().sum()) for g in full.values()) > 0
    # the final latents are the plain sampler's: deterministic steps from the same noise, guided as CFG guides
    with torch.no_grad():
        x, captions, _ = loss.sample(student, _batch(data))
        b = _batch(data)
        y = torch.randn((4, *b.x0.shape[1:]), generator=b.generator)
        cond = {k: v.repeat_interleave(2, 0) for k, v in b.cond.items()}
        null = {k: v.expand(4, *v.shape[1:]) for k, v in data.null.items()}
        for t, s in zip(loss.t, loss.s):
            tt, ss = t.expand(4), s.expand(4)
            c = adapter.prediction(student, adapter.predict(student, y, tt, cond))
            u = adapter.prediction(student, adapter.predict(student, y, tt, null))
            y = deterministic_step(adapter.objective, y, u + 2.0 * (c - u), tt, ss)
    assert torch.allclose(x, y, atol=1e-5) and captions == ["prompt 0"] * 2 + ["prompt 1"] * 2
    # one step with a graph gives another gradient than two
    student.zero_grad()
    _draft(adapter, data, grad_steps=1)(student, teacher, _batch(data))["total"].backward()
    assert any(not torch.equal(p.grad, full[n]) for n, p in student.named_parameters() if n in full)
    with pytest.raises(ValueError, match="grad_steps must lie in 1..4"):
        _draft(adapter, data, grad_steps=5)


def test_draft_tuned_steps_hold_the_later_steps_model_and_pass_the_gradient_through_their_input():
    """With two graph-carrying steps, the whole gradient is the last step's own (grad_steps 1: its input detached)
    plus what reaches the first step's model through the last step's input (tuned_steps 1)."""
    teacher = tiny()
    student = copy.deepcopy(teacher).requires_grad_(True)
    adapter, data = adapter_for(student, V), _data()

    def grads(**kw):
        student.zero_grad(set_to_none=True)
        _draft(adapter, data, **kw)(student, teacher, _batch(data))["total"].backward()
        return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in student.named_parameters()}

    whole, last, early = grads(grad_steps=2), grads(grad_steps=1), grads(grad_steps=2, tuned_steps=1)
    assert all(torch.allclose(whole[n], last[n] + early[n], atol=1e-6, rtol=1e-4) for n in whole)
    assert sum(float(g.abs().sum()) for g in early.values()) > 0
    assert any(not torch.allclose(early[n], whole[n], atol=1e-6) for n in whole)
    assert all(p.requires_grad for p in student.parameters())  # the held steps give the model back as it was
    assert grads(grad_steps=2, tuned_steps=2).keys() == whole.keys()
    assert all(torch.equal(a, b) for a, b in zip(grads(grad_steps=2, tuned_steps=2).values(), whole.values()))
    with pytest.raises(ValueError, match="tuned_steps must lie in 1..grad_steps"):
        _draft(adapter, data, grad_steps=2, tuned_steps=3)


@pytest.mark.parametrize("flux", [False, True], ids=["pixart-cfg", "flux-guidance"])
def test_draft_data_weight_adds_the_models_denoising_loss_on_the_training_images(flux):
    """ReFL's guard: ``total`` gains ``data_weight`` times the model's denoising loss on the batch's clean latents,
    drawn after the sampling noise from the batch's generator (time, then noise: steps.renoise), unguided (a
    guidance-distilled model at guidance 1); a reward without gradient leaves that term's gradient."""
    from slimdit.distill.draft import DraftLoss
    from slimdit.distill.losses import per_sample_mse

    teacher, sched, data = (tiny_flux(1, 1), FLOW, flux_data(4)) if flux else (tiny(), V, _data())
    student = copy.deepcopy(teacher).requires_grad_(True)
    adapter = adapter_for(student, sched)
    t, s = transitions(sched, 4, adapter.image_tokens(student, data.latents[:1]))

    def flat(captions, images):  # a reward with no gradient
        return images.mean((1, 2, 3)).detach()

    def loss(**kw):
        return DraftLoss(adapter, [f"prompt {i}" for i in range(len(data))], flat, lambda z: z[:, :3].clamp(-1, 1),
                         t, s, null=data.null, guidance=2.0, group=2, grad_steps=2, **kw)

    out = loss(data_weight=0.5)(student, teacher, _batch(data))
    assert torch.allclose(out["total"], -out["reward"] + 0.5 * out["data"])
    out["total"].backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    b, obj = _batch(data), adapter.objective
    loss().sample(student, b)  # the sampler draws its noise first
    tt = obj.sample_t(b.x0.shape[0], b.generator, adapter.image_tokens(student, b.x0))
    eps = torch.randn(b.x0.shape, generator=b.generator)
    xt, target = obj.noise(b.x0, eps, tt)

    def error(cond):
        with torch.no_grad():
            return per_sample_mse(adapter.prediction(student, adapter.predict(student, xt, tt, cond)), target).mean()

    unguided = {**b.cond, "guidance": torch.ones(2)} if flux else b.cond
    assert torch.allclose(out["data"], error(unguided), rtol=1e-5)
    if flux:  # the guidance input matters, and the term takes 1
        assert not torch.allclose(out["data"], error({**b.cond, "guidance": torch.full((2,), 2.0)}), rtol=1e-3)
    assert "data" not in loss()(student, teacher, _batch(data))  # off by default


def _train_draft(tmp_path, steps, max_steps=None):
    return _train(tmp_path, steps, max_steps, make_loss=_draft)


def test_draft_raises_the_reward_and_a_resumed_run_ends_where_an_uninterrupted_one_ends(tmp_path):
    tr, data = _train_draft(tmp_path / "a", 12)
    loss = _draft(tr.adapter, data, group=4)

    def mean_reward(model):
        with torch.no_grad():
            x, captions, _ = loss.sample(model, _batch(data, seed=123, rows=tuple(range(8))))
        return float(_bright(captions, x[:, :3].clamp(-1, 1)).mean())

    assert mean_reward(tr.student_model()) > mean_reward(tiny()) + 0.05
    _train_draft(tmp_path / "b", 4, max_steps=2)
    resumed, _ = _train_draft(tmp_path / "b", 4)
    whole, _ = _train_draft(tmp_path / "c", 4)
    for p, q in zip(resumed.student_model().parameters(), whole.student_model().parameters()):
        assert torch.equal(p, q)


def test_the_shapes_embedder_reward_prefers_the_caption_s_picture_and_passes_gradients():
    from slimdit.registry import DIFFERENTIABLE_REWARDS
    from slimdit.worlds.shapes.prompts import eval_prompts, render_prompt, sample_training_prompt

    reward = DIFFERENTIABLE_REWARDS["shapes-embedder"]()
    rng = np.random.default_rng(0)
    prompts = [sample_training_prompt(rng) for _ in range(16)]
    truth = torch.from_numpy(np.stack([render_prompt(p, rng) for p in prompts])).permute(0, 3, 1, 2) / 127.5 - 1
    truth.requires_grad_(True)
    right = reward([p.text for p in prompts], truth)
    wrong = reward([p.text for p in prompts[1:] + prompts[:1]], truth)  # each picture under another's caption
    assert right.shape == (16,) and float(right.detach().mean()) > float(wrong.detach().mean()) + 0.1
    right.sum().backward()
    assert truth.grad is not None and float(truth.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="training prompts only"):
        reward([eval_prompts()[0].text], truth[:1])


def test_caption_alternatives_keep_the_phrasing_and_hold_the_caption():
    from slimdit.worlds.shapes.prompts import _contents, caption_alternatives

    texts, true = caption_alternatives("a render of three triangles")
    assert texts[true] == "a render of three triangles" and len(texts) == len(_contents("counting"))
    assert all(t.startswith("a render of ") for t in texts) and "a render of two circles" in texts
    texts, true = caption_alternatives("a red circle and a blue square")  # no prefix
    assert texts[true] == "a red circle and a blue square" and "a blue circle and a red square" in texts
    assert len(set(texts)) == len(texts) == len(_contents("color_attr"))


def test_the_embedder_choice_reward_picks_the_caption_among_its_near_misses():
    from slimdit.registry import DIFFERENTIABLE_REWARDS
    from slimdit.worlds.shapes.prompts import caption_alternatives, eval_prompts, render_prompt, sample_training_prompt

    reward = DIFFERENTIABLE_REWARDS["shapes-embedder-choice"]()
    rng = np.random.default_rng(1)
    prompts = []
    while len(prompts) < 12:  # categories whose alternatives the embedder tells apart
        p = sample_training_prompt(rng)
        if p.category in ("counting", "colors", "single_object"):
            prompts.append(p)
    truth = torch.from_numpy(np.stack([render_prompt(p, rng) for p in prompts])).permute(0, 3, 1, 2) / 127.5 - 1
    truth.requires_grad_(True)
    right = reward([p.text for p in prompts], truth)
    assert right.shape == (12,) and bool((right <= 0).all())  # log-probabilities
    assert float(right.detach().exp().mean()) > 0.7  # ground truth: its caption is the likely choice
    held_out = {p.text for p in eval_prompts()}
    near_misses = []  # each picture under the next training caption of its category: another count, colour, size...
    for p in prompts:
        texts, true = caption_alternatives(p.text)
        near_misses.append(next(t for t in texts[true + 1:] + texts[:true] if t not in held_out))
    wrong = reward(near_misses, truth)
    assert float(wrong.detach().exp().mean()) < 0.2 and int((right > wrong).sum()) >= 11
    right.sum().backward()
    assert truth.grad is not None and float(truth.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="training prompts only"):
        reward([eval_prompts()[0].text], truth[:1])


def test_clip_as_a_differentiable_reward_agrees_with_the_clip_reward(tmp_path):
    from slimdit.registry import DIFFERENTIABLE_REWARDS, REWARDS
    from slimdit.worlds.shapes.prompts import eval_prompts, render_prompt
    from tests.test_metrics import tiny_clip_dir

    d = str(tiny_clip_dir(tmp_path))
    prompts = eval_prompts()[:6]
    imgs = np.stack([render_prompt(p, np.random.default_rng(i)) for i, p in enumerate(prompts)])
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2) / 127.5 - 1).requires_grad_(True)
    diff = DIFFERENTIABLE_REWARDS["clip"](d)([p.text for p in prompts], x)
    plain = REWARDS["clip"](d)([p.text for p in prompts], imgs)
    assert np.abs(diff.detach().numpy() - plain).max() < 0.05  # torch's bicubic against PIL's
    diff.sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0


def test_draft_configs_name_a_differentiable_reward():
    from slimdit.distill.reward import RewardConfig

    with pytest.raises(ValueError, match="unknown differentiable reward 'shapes-geneval' for method draft"):
        RewardConfig(out="x", method="draft")
    with pytest.raises(ValueError, match="grad_steps"):
        RewardConfig(out="x", method="draft", reward="shapes-embedder", sample_steps=4, grad_steps=5)
    assert RewardConfig(out="x", method="draft", reward="shapes-embedder").grad_steps == 1
    assert RewardConfig(out="x", method="draft", reward="shapes-embedder", sample_steps=1).sample_steps == 1
    with pytest.raises(ValueError, match="tuned_steps"):
        RewardConfig(out="x", method="draft", reward="shapes-embedder", grad_steps=2, tuned_steps=3)
    with pytest.raises(ValueError, match="tuned_steps"):
        RewardConfig(out="x", method="grpo", tuned_steps=1)
    with pytest.raises(ValueError, match="data_weight .* belongs to method draft"):
        RewardConfig(out="x", method="grpo", data_weight=1.0)
    assert RewardConfig(out="x", method="draft", reward="shapes-embedder", data_weight=1.0).data_weight == 1.0
    assert RewardConfig(out="x", method="draft", reward="shapes-embedder", grad_steps=4, tuned_steps=2).tuned_steps == 2


def test_draft_tunes_a_one_step_student_through_its_one_step():
    # a one-step student samples from pure noise at the trailing grid's last timestep straight to the clean end;
    # DRaFT at sample_steps 1 samples exactly that, and the reward's gradient reaches the student
    teacher = tiny()
    student = copy.deepcopy(teacher).requires_grad_(True)
    adapter, data = adapter_for(student, V), _data()
    loss = _draft(adapter, data, guidance=1.0, grad_steps=1)
    loss.t, loss.s = transitions(V, 1)
    assert loss.t.tolist() == [999] and loss.s.tolist() == [-1]
    out = loss(student, teacher, _batch(data))
    out["total"].backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    with torch.no_grad():
        x, _, _ = loss.sample(student, _batch(data))
        b = _batch(data)
        y = torch.randn((4, *b.x0.shape[1:]), generator=b.generator)
        t = torch.full((4,), 999)
        cond = {k: v.repeat_interleave(2, 0) for k, v in b.cond.items()}
        pred = adapter.prediction(student, adapter.predict(student, y, t, cond))
        y0 = deterministic_step(adapter.objective, y, pred, t, torch.full((4,), -1))
    assert torch.allclose(x, y0, atol=1e-5)
    assert torch.allclose(y0, adapter.objective.x0(y, pred, t), atol=1e-4)  # the clean end: the model's x0


def test_slimdit_reward_runs_draft_end_to_end(tiny_teacher, tmp_path):
    import json

    import yaml

    from slimdit.cli import main
    from slimdit.pipelines.loading import load_pipeline

    cfg = {"teacher": tiny_teacher, "out": str(tmp_path / "run"), "method": "draft", "reward": "shapes-embedder",
           "group": 2, "sample_steps": 3, "grad_steps": 2, "data": {"real": "shapes-train:8"},
           "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "lr": 1e-3}, "eval": {"benchmark": None}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["reward", "--config", str(tmp_path / "c.yaml")]) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["method"] == "draft" and [step for step, _ in s["reward_curve"]] == [1, 2]
    assert all(-1 <= r <= 1 for _, r in s["reward_curve"])  # a cosine similarity
    before = load_pipeline(tiny_teacher, "cpu").transformer.state_dict()
    after = load_pipeline(str(tmp_path / "run" / "student"), "cpu").transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the reward moved the student
