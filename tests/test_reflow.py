"""Reflow: the teacher's pairs are its deterministic samples, reproducible per row and reused from disk; the loss is
flow matching on the pairs' noise; ``slimdit steps --method reflow`` runs on a tiny FluxPipeline end to end (a
diffusion teacher is refused: tests/test_direct.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from slimdit.distill.losses import Batch, per_sample_mse
from slimdit.distill.reflow import ReflowLoss, ode_sample, teacher_pairs
from slimdit.distill.steps import transitions
from slimdit.models import adapter_for
from tests.test_flux import FLOW, flux_data, tiny_flux


def test_pairs_are_the_teachers_samples_per_row_and_reused_from_disk(tmp_path):
    teacher = tiny_flux(1, 1)
    adapter, data = adapter_for(teacher, FLOW), flux_data(0, 6)
    t, s = transitions(FLOW, 3, adapter.image_tokens(teacher, data.latents[:1]))
    noise, x0 = teacher_pairs(adapter, teacher, data, tmp_path, t, s, 3.5, seed=1, batch_size=4, progress=False)
    assert noise.shape == x0.shape == data.latents.shape
    cond = {**data.take(torch.tensor([4])), "guidance": torch.full((1,), 3.5)}
    alone = ode_sample(adapter, teacher, noise[4:5], cond, None, 3.5, t, s)
    assert torch.allclose(alone, x0[4:5], atol=1e-5)  # row 4 does not depend on its batch
    with torch.no_grad():
        for p in teacher.parameters():
            p.zero_()
    again = teacher_pairs(adapter, teacher, data, tmp_path, t, s, 3.5, seed=1, progress=False)
    assert torch.equal(again[0], noise) and torch.equal(again[1], x0)  # read from disk, not made again


def test_pairs_made_otherwise_or_without_a_record_are_refused_before_any_is_made(tmp_path):
    """``pairs.json`` records what made the shards; another guidance, grid, seed, row count or teacher is refused by
    name (pairs copied in from another run, or left by a changed run), and so are shards with no record."""
    import json

    teacher = tiny_flux(1, 1)
    adapter, data = adapter_for(teacher, FLOW), flux_data(0, 6)
    tokens = adapter.image_tokens(teacher, data.latents[:1])
    t, s = transitions(FLOW, 3, tokens)
    made = {"teacher": "fingerprint-a", "data.real": "shapes-train:6", "data.synth": None}
    noise, x0 = teacher_pairs(adapter, teacher, data, tmp_path, t, s, 3.5, seed=1, progress=False, made_by=made)
    record = json.loads((tmp_path / "pairs.json").read_text())
    assert record["made_by"] == made and record["guidance"] == 3.5 and record["seed"] == 1 and record["rows"] == 6
    assert record["t"] == t.tolist() and record["latent"] == list(data.latents.shape[1:])
    again = teacher_pairs(adapter, teacher, data, tmp_path, t, s, 3.5, seed=1, progress=False, made_by=made)
    assert torch.equal(again[1], x0)  # made the same way: reused
    t2, s2 = transitions(FLOW, 2, tokens)
    changed = [((t, s, 5.0, 1, data, made), "guidance: 3.5 -> 5.0"), ((t, s, 3.5, 2, data, made), "seed: 1 -> 2"),
               ((t2, s2, 3.5, 1, data, made), "t: "), ((t, s, 3.5, 1, flux_data(0, 8), made), "rows: 6 -> 8"),
               ((t, s, 3.5, 1, data, {**made, "teacher": "fingerprint-b"}), "made_by.teacher")]
    for (tt, ss, w, seed, d, by), field in changed:
        with pytest.raises(ValueError, match=f"made otherwise .*{field}"):
            teacher_pairs(adapter, teacher, d, tmp_path, tt, ss, w, seed=seed, progress=False, made_by=by)
    (tmp_path / "pairs.json").unlink()
    with pytest.raises(ValueError, match="1 teacher pair shards but no pairs.json"):
        teacher_pairs(adapter, teacher, data, tmp_path, t, s, 3.5, seed=1, progress=False, made_by=made)
    assert [p.name for p in tmp_path.iterdir()] == ["pairs_00000.safetensors"]  # refused, nothing written or lost
    fresh = tmp_path / "stopped"  # a run stopped before its first shard left only its record: a new config takes over
    fresh.mkdir()
    (fresh / "pairs.json").write_text(json.dumps({**record, "guidance": 5.0}))
    teacher_pairs(adapter, teacher, data, fresh, t, s, 3.5, seed=1, progress=False, made_by=made)
    assert json.loads((fresh / "pairs.json").read_text())["guidance"] == 3.5


def test_the_reflow_loss_is_flow_matching_on_the_pairs_noise_and_trains(tmp_path):
    from slimdit.distill.trainer import Conditioning, TrainConfig, Trainer

    teacher = tiny_flux(1, 1)
    adapter, data = adapter_for(teacher, FLOW), flux_data(0, 8)
    noise = torch.randn(data.latents.shape, generator=torch.Generator().manual_seed(3))
    loss = ReflowLoss(adapter, noise, guidance=3.5)
    idx = torch.tensor([5, 2])
    g = torch.Generator().manual_seed(7)
    got = loss(teacher, teacher, Batch(data.latents[idx], data.take(idx), g, index=idx))["total"]
    g.manual_seed(7)
    t = adapter.objective.sample_t(2, g, adapter.image_tokens(teacher, data.latents[:1]))
    xt, target = adapter.objective.noise(data.latents[idx], noise[idx], t)
    pred = adapter.predict(teacher, xt, t, {**data.take(idx), "guidance": torch.full((2,), 3.5)})
    assert torch.allclose(got, per_sample_mse(pred, noise[idx] - data.latents[idx]).mean(), atol=1e-6)
    assert torch.allclose(target, noise[idx] - data.latents[idx])
    student = copy.deepcopy(teacher)
    cfg = TrainConfig(steps=30, batch_size=8, warmup_steps=1, lr=3e-3, optimizer="adamw", checkpoint_every=100,
                      log_every=1, val_every=0, caption_dropout=0.0)
    tr = Trainer(adapter, teacher, student, Conditioning(data.latents, data.cond, data.null), cfg, tmp_path,
                 loss=loss)
    every = torch.arange(8)

    def measured(model):  # the same pairs and timesteps before and after
        b = Batch(data.latents, data.take(every), torch.Generator().manual_seed(11), index=every)
        with torch.no_grad():
            return loss(model, teacher, b)["total"].item()

    before = measured(student)
    tr.train(progress=False)
    assert measured(tr.student_model()) < 0.85 * before  # random pairs: much of the loss cannot be learnt


def test_slimdit_steps_reflow_on_a_flux_pipeline(tiny_flux_pipeline, tmp_path):
    import json

    import yaml

    from slimdit.cli import main
    from slimdit.pipelines.loading import load_sampler, sampling_defaults

    cfg = {"teacher": str(tiny_flux_pipeline), "out": str(tmp_path / "run"), "method": "reflow", "steps": 1,
           "pair_steps": 2, "data": {"real": "shapes-train:6"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "caption_dropout": 0.0},
           "eval": {"benchmark": None, "bench": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["steps", "--config", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "pairs").iterdir()) == ["pairs.json", "pairs_00000.safetensors"]
    done = json.loads((run / "rounds" / "00_1steps" / "done.json").read_text())
    assert done["method"] == "reflow" and done["teacher_steps"] == 2
    student = str(run / "student")
    d = sampling_defaults(student)
    assert d["num_inference_steps"] == 1 and d["guidance_scale"] == sampling_defaults(str(tiny_flux_pipeline))[
        "guidance_scale"]  # the guidance input the pairs were made at
    sampler = load_sampler(student)
    assert type(sampler.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert sampler.generate(["a red circle"], [0], progress=False).shape[0] == 1
    assert "rectified-flow reflow" in (run / "student" / "README.md").read_text()
    cfg["train"]["caption_dropout"] = 0.1
    with pytest.raises(ValueError, match="caption_dropout: 0"):
        from slimdit.distill.fewstep import StepsConfig

        StepsConfig(**cfg)
