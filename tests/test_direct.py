"""Direct distillation of the teacher's sampler: the student's unrolled sample is the plain deterministic sampler's,
a copy of the teacher on the pairs' own grid has zero loss, the loss trains, and ``slimdit steps --method direct``
runs on a diffusion teacher end to end (where ``method: reflow`` is refused)."""

from __future__ import annotations

import copy

import pytest
import torch

from slimdit.distill.direct import DirectLoss
from slimdit.distill.losses import Batch
from slimdit.distill.reflow import ode_sample, teacher_pairs
from slimdit.distill.steps import transitions
from slimdit.models import adapter_for
from tests.test_compress import tiny
from tests.test_flux import FLOW, flux_data, tiny_flux
from tests.test_steps import V
from tests.test_trainer import _data


@pytest.mark.parametrize("case", ["pixart-v", "flux-guidance"])
def test_the_students_sample_is_its_deterministic_sampler_and_a_teacher_copy_has_zero_loss(case, tmp_path):
    if case == "pixart-v":
        teacher, sched, data, guidance = tiny(), V, _data(6), None
    else:
        teacher, sched, data, guidance = tiny_flux(1, 1), FLOW, flux_data(0, 6), 3.5
    adapter = adapter_for(teacher, sched)
    t, s = transitions(sched, 2, adapter.image_tokens(teacher, data.latents[:1]))
    # pairs on the student's own grid, without CFG: a copy of the teacher reproduces them exactly
    noise, x0 = teacher_pairs(adapter, teacher, data, tmp_path, t, s, guidance or 1.0, seed=2, progress=False)
    loss = DirectLoss(adapter, noise, t, s, guidance=guidance)
    idx = torch.tensor([4, 1, 3])
    cond = data.take(idx)
    if guidance is not None:
        cond = {**cond, "guidance": torch.full((3,), guidance)}
    batch = Batch(x0[idx], data.take(idx), torch.Generator().manual_seed(0), index=idx)
    with torch.no_grad():
        mine = loss.sample(teacher, noise[idx], cond, batch)
    assert torch.allclose(mine, ode_sample(adapter, teacher, noise[idx], cond, None, 1.0, t, s), atol=1e-5)
    student = copy.deepcopy(teacher)
    assert loss(student, teacher, batch)["total"].item() < 1e-10
    # the gradient reaches the first step too: the loss of a student whose first step alone differs moves
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    out = loss(student, teacher, batch)["total"]
    out.backward()
    assert out.item() > 0 and all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_direct_distillation_trains_a_one_step_student_on_two_step_pairs(tmp_path):
    from slimdit.distill.trainer import Conditioning, TrainConfig, Trainer

    teacher, data = tiny(), _data(8)
    adapter = adapter_for(teacher, V)
    t2, s2 = transitions(V, 2)
    noise, x0 = teacher_pairs(adapter, teacher, data, tmp_path / "pairs", t2, s2, 3.0, seed=0, progress=False)
    t, s = transitions(V, 1)
    loss = DirectLoss(adapter, noise, t, s)
    every = torch.arange(8)

    def measured(model):
        b = Batch(x0, data.take(every), torch.Generator().manual_seed(0), index=every)
        with torch.no_grad():
            return loss(model, teacher, b)["total"].item()

    student = copy.deepcopy(teacher)
    before = measured(student)
    cfg = TrainConfig(steps=30, batch_size=8, warmup_steps=1, lr=3e-3, optimizer="adamw", checkpoint_every=100,
                      log_every=1, val_every=0, caption_dropout=0.0)
    tr = Trainer(adapter, teacher, student, Conditioning(x0, data.cond, data.null), cfg, tmp_path / "run", loss=loss)
    tr.train(progress=False)
    assert measured(tr.student_model()) < 0.5 * before


def test_slimdit_steps_direct_on_a_pixart_pipeline_and_reflow_refuses_it(tiny_teacher, tmp_path):
    import json
    import shutil

    from slimdit.distill.fewstep import StepsConfig, run_steps
    from slimdit.pipelines.loading import load_sampler, sampling_defaults

    cfg = {"teacher": tiny_teacher, "out": str(tmp_path / "run"), "method": "direct", "steps": 1, "pair_steps": 2,
           "data": {"real": "shapes-train:6"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "caption_dropout": 0.0},
           "eval": {"benchmark": None, "bench": False}}
    run = run_steps(StepsConfig(**cfg), progress=False)
    assert sorted(p.name for p in (run / "pairs").iterdir()) == ["pairs.json", "pairs_00000.safetensors"]
    made_by = json.loads((run / "pairs" / "pairs.json").read_text())["made_by"]
    assert made_by["teacher"] == json.loads((run / "inputs.json").read_text())["teacher"]
    done = json.loads((run / "rounds" / "00_1steps" / "done.json").read_text())
    assert done["method"] == "direct" and done["teacher_steps"] == 2
    student = str(run / "student")
    assert sampling_defaults(student)["num_inference_steps"] == 1 and sampling_defaults(student)["guidance_scale"] == 1
    sampler = load_sampler(student)
    assert type(sampler.pipe.scheduler).__name__ == "DDIMScheduler"
    assert sampler.generate(["a red circle"], [0], progress=False).shape[0] == 1
    assert "Luhman & Luhman" in (run / "student" / "README.md").read_text()
    copied = tmp_path / "copied"  # the pairs copied into a run that would make them at another guidance
    shutil.copytree(run / "pairs", copied / "pairs")
    with pytest.raises(ValueError, match="made otherwise .*guidance: "):
        run_steps(StepsConfig(**{**cfg, "out": str(copied), "guidance": 2.0}), progress=False)
    assert not (copied / "student").exists() and not list(copied.glob("rounds/*/checkpoints/*"))
    with pytest.raises(ValueError, match="caption_dropout: 0"):
        StepsConfig(**{**cfg, "train": {**cfg["train"], "caption_dropout": 0.1}})
    with pytest.raises(ValueError, match="reflow is for flow teachers"):
        run_steps(StepsConfig(**{**cfg, "method": "reflow", "out": str(tmp_path / "reflow")}), progress=False)
    assert not (tmp_path / "reflow" / "pairs").exists()  # refused before any pair was made


def test_a_cfg_scale_below_one_is_refused_before_anything_is_cached(tiny_teacher, tiny_flux_pipeline, tmp_path):
    """PixArt's pipeline (and Flux's true CFG) guides only above 1: a step or reward run at 0.5 would distil
    guidance its student never samples with. A guidance-distilled Flux takes any scale as its input."""
    from slimdit.distill.fewstep import StepsConfig, run_steps
    from slimdit.distill.reward import RewardConfig, run_reward
    from slimdit.distill.steps import check_cfg_scale
    from slimdit.pipelines.loading import load_pipeline

    train = {"steps": 1, "batch_size": 2, "warmup_steps": 1, "caption_dropout": 0.0}
    with pytest.raises(ValueError, match="guidance 0.5: teacher .* above 1"):
        run_steps(StepsConfig(teacher=tiny_teacher, out=str(tmp_path / "s"), guidance=0.5, steps=1, start=2,
                              data={"real": "shapes-train:4"}, train=train), progress=False)
    assert not (tmp_path / "s" / "cache").exists()
    with pytest.raises(ValueError, match="guidance 0.5: model .* above 1"):
        run_reward(RewardConfig(teacher=tiny_teacher, out=str(tmp_path / "r"), guidance=0.5, group=2, sample_steps=2,
                                train_steps=1, data={"real": "shapes-train:4"}, train=train), progress=False)
    assert not (tmp_path / "r" / "cache").exists()
    flux = load_pipeline(str(tiny_flux_pipeline), "cpu").transformer  # guidance-embedded
    check_cfg_scale(adapter_for(flux), flux, 0.5, "flux")  # its input, not CFG: allowed


def test_a_pair_reward_keeps_the_pairs_it_passes_row_for_row_and_keeping_all_trains_as_without(tiny_teacher,
                                                                                                 monkeypatch, tmp_path):
    """Rejection sampling of the teacher's pairs: the kept rows are the passing captions' noise, sample and text
    conditioning, in order; the scores are computed once (a continued run reads them back; scores kept beside
    another pairs record are made again); a reward that passes every pair trains exactly as no reward does; a
    config that cannot use it is refused by name."""
    import json
    import shutil

    from slimdit import registry
    from slimdit.data.datasets import load_dataset
    from slimdit.distill.fewstep import StepsConfig, run_steps
    from slimdit.distill.pair_reward import kept_pairs, pair_scores
    from slimdit.distill.trainer import Conditioning
    from slimdit.io import load_tensors
    from slimdit.models.storage import load_model
    from slimdit.pipelines.loading import load_pipeline

    calls = []

    def squares(captions, images):  # passes the captions that ask for squares
        calls.append(len(captions))
        assert images.dtype.name == "uint8" and images.shape[0] == len(captions) and images.shape[-1] == 3
        return [float("square" in c) for c in captions]

    monkeypatch.setitem(registry.REWARDS, "test-squares", lambda: squares)
    monkeypatch.setitem(registry.REWARDS, "test-all", lambda: lambda captions, images: [1.0] * len(captions))
    cfg = {"teacher": tiny_teacher, "method": "direct", "steps": 1, "pair_steps": 2, "data": {"real": "shapes-train:8"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "caption_dropout": 0.0, "checkpoint_every": 100},
           "eval": {"benchmark": None, "bench": False}}
    run = run_steps(StepsConfig(**cfg, out=str(tmp_path / "squares"), pair_reward="test-squares"), progress=False)
    kept = json.loads((run / "pairs" / "kept.json").read_text())
    assert kept == {"reward": "test-squares", "min": 1.0, "kept": 3, "of": 8}  # rows 0, 4 and 6 ask for squares
    assert json.loads((run / "pairs" / "reward-test-squares.json").read_text())["scores"] == [1, 0, 0, 0, 1, 0, 1, 0]
    scored = sum(calls)
    run_steps(StepsConfig(**cfg, out=str(tmp_path / "squares"), pair_reward="test-squares"), progress=False)
    assert sum(calls) == scored == 8  # the continued run read the scores back
    assert json.loads((run / "summary.json").read_text())["pairs_kept"] == kept
    # the scores are of the pairs their record names: beside pairs made otherwise they are made again
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run / "pairs" / "reward-test-squares.json", other)
    (other / "pairs.json").write_text(json.dumps({**json.loads((run / "pairs" / "pairs.json").read_text()), "seed": 9}))
    x0 = torch.cat([load_tensors(f)["x0"] for f in sorted((run / "pairs").glob("pairs_*.safetensors"))])
    scores = pair_scores(load_pipeline(tiny_teacher, "cpu"), load_dataset("shapes-train:8").captions, x0,
                         "test-squares", other, progress=False)
    assert sum(calls) == 16 and scores.tolist() == [1, 0, 0, 0, 1, 0, 1, 0]

    # row for row: the kept view holds the passing rows' noise, sample and conditioning
    noise, x0 = torch.randn(5, 2), torch.randn(5, 3)
    cond = {"text": torch.arange(5 * 4.0).view(5, 4)}
    n, data, count = kept_pairs(noise, Conditioning(x0, cond, {"text": torch.zeros(1, 4)}),
                                torch.tensor([0.2, 1.0, 0.9, 1.0, 0.0]), 0.9)
    assert count == len(data) == 3 and torch.equal(n, noise[[1, 2, 3]]) and torch.equal(data.latents, x0[[1, 2, 3]])
    assert torch.equal(data.take(torch.tensor([2, 0]))["text"], cond["text"][[3, 1]])
    with pytest.raises(ValueError, match="no pair's sample scores at least 2"):
        kept_pairs(noise, Conditioning(x0, cond, {}), torch.ones(5), 2.0)

    # a reward that passes every pair changes nothing
    plain = run_steps(StepsConfig(**cfg, out=str(tmp_path / "plain")), progress=False)
    every = run_steps(StepsConfig(**cfg, out=str(tmp_path / "all"), pair_reward="test-all"), progress=False)
    a, b = (load_model(r / "student" / "transformer").state_dict() for r in (plain, every))
    assert all(torch.equal(a[k], b[k]) for k in a)
    squares_model = load_model(run / "student" / "transformer").state_dict()
    assert not all(torch.equal(a[k], squares_model[k]) for k in a)  # fewer rows, other batches

    with pytest.raises(ValueError, match="pair_reward filters the teacher's pairs"):
        StepsConfig(**{**cfg, "method": "ladd"}, out="x", pair_reward="test-all")
    with pytest.raises(ValueError, match="unknown pair_reward 'nope'"):
        StepsConfig(**cfg, out="x", pair_reward="nope")
    with pytest.raises(ValueError, match="pair_reward_min set without pair_reward"):
        StepsConfig(**cfg, out="x", pair_reward_min=0.5)
    StepsConfig(**{**cfg, "method": "dmd2"}, regression_weight=0.5, out="x", pair_reward="test-all")  # DMD1's pairs
