"""Few-step students: the grid a student trains on is the grid its scheduler samples on, and progressive
distillation's target makes one step land where the teacher's two land."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slimdit.distill.losses import Batch
from slimdit.distill.objectives import objective_for
from slimdit.distill.progressive import ProgressiveLoss
from slimdit.distill.steps import deterministic_step, midpoints, student_scheduler, transitions
from slimdit.models import adapter_for
from tests.test_compress import tiny
from tests.test_flux import FLOW, flux_data, tiny_flux
from tests.test_trainer import SCHED, _data

V = {**SCHED, "prediction_type": "v_prediction"}
STATIC_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}


@pytest.mark.parametrize("config", [SCHED, V, STATIC_FLOW, FLOW], ids=["eps", "v", "flow", "flux"])
@pytest.mark.parametrize("steps", [1, 3, 4])
def test_training_steps_are_the_schedulers_steps(config, steps):
    """Stepping with the scheduler a student saves with, from each grid point, equals the training's step."""
    obj = objective_for(config)
    t, s = transitions(config, steps, tokens=16)
    assert len(t) == steps and (s < t).all()
    sched = student_scheduler(config)
    if "shift" in config:
        import numpy as np

        from slimdit.distill.objectives import _calculate_shift
        mu = {"mu": _calculate_shift(16, 256, 4096, 0.5, 1.15)} if config.get("use_dynamic_shifting") else {}
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **mu)
    else:
        sched.set_timesteps(steps)
    assert torch.allclose(sched.timesteps.float(), t.float())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i in range(steps):
        pred = torch.randn(2, 4, 8, 8, generator=g)
        mine = deterministic_step(obj, x, pred, t[i].expand(2), s[i].expand(2))
        theirs = sched.step(pred, sched.timesteps[i], x).prev_sample
        assert torch.allclose(mine, theirs, atol=1e-5), i
        x = theirs
    assert s[-1] <= 0  # the last step lands on the clean end


@pytest.mark.parametrize("case", ["pixart-cfg", "flux-guidance"])
def test_one_step_on_the_target_lands_where_two_teacher_steps_land(case):
    if case == "pixart-cfg":
        teacher, sched, data = tiny(), V, _data()
    else:
        teacher, sched, data = tiny_flux(1, 1), FLOW, flux_data(4)
    adapter = adapter_for(teacher, sched)
    t, s = transitions(sched, 2, tokens=adapter.image_tokens(teacher, data.latents[:2]))
    loss = ProgressiveLoss(adapter, t, s, null=data.null, guidance=3.0)
    obj = adapter.objective
    x0 = data.latents[:2]
    tt, ss = t, s
    xt, _ = obj.noise(x0, torch.randn_like(x0), tt)
    cond = {k: v[:2] for k, v in data.cond.items()}
    null = None
    if adapter.takes_guidance(teacher):
        cond["guidance"] = torch.full((2,), 3.0)
    else:
        null = {k: v.expand(2, *v.shape[1:]) for k, v in data.null.items()}
    tokens = adapter.image_tokens(teacher, data.latents[:2])
    mid = midpoints(sched, 2, tokens)  # the teacher's own 4-step grid between the student's points
    if case == "flux-guidance":  # shifted: its grid's odd points are not the halfway points
        assert not torch.allclose(mid, obj.midpoint(t, s))
        assert torch.allclose(transitions(sched, 4, tokens)[0][::2], t)  # its even points are the student's
    with torch.no_grad():
        target = loss.target(teacher, xt, tt, ss, cond, null, mid)
        two = deterministic_step(obj, xt, loss._teacher(teacher, xt, tt, cond, null), tt, mid)
        two = deterministic_step(obj, two, loss._teacher(teacher, two, mid, cond, null), mid, ss)
    assert torch.allclose(deterministic_step(obj, xt, target, tt, ss), two, atol=1e-4)


def test_progressive_distillation_trains(tmp_path):
    import copy

    from slimdit.distill.trainer import TrainConfig, Trainer

    teacher = tiny()
    student = copy.deepcopy(teacher)
    adapter = adapter_for(student, V)
    t, s = transitions(V, 2)
    data = _data()
    loss = ProgressiveLoss(adapter, t, s, null=data.null, guidance=3.0)
    cfg = TrainConfig(steps=30, batch_size=8, warmup_steps=1, lr=1e-3, optimizer="adamw", checkpoint_every=100,
                      log_every=1, val_every=0, caption_dropout=0.0)
    tr = Trainer(adapter, teacher, student, data, cfg, tmp_path, loss=loss)

    def measured():
        g = torch.Generator().manual_seed(9)
        return loss(tr.student, teacher, Batch(data.latents[:8], {k: v[:8] for k, v in data.cond.items()}, g))

    before = measured()["total"].item()
    tr.train(progress=False)
    assert measured()["total"].item() < 0.5 * before


def test_slimdit_steps_halves_in_rounds_and_the_student_samples_with_its_own_scheduler(tiny_teacher, tmp_path):
    import json

    import yaml

    from slimdit.cli import main
    from slimdit.pipelines.loading import load_pipeline, sampling_defaults

    cfg = {"teacher": tiny_teacher, "out": str(tmp_path / "run"), "steps": 2, "start": 8,
           "data": {"real": "shapes-train:8"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 1},
           "eval": {"benchmark": "shapes-geneval", "limit": 4, "images_per_prompt": 1, "bench": True}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["steps", "--config", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "rounds").iterdir()) == ["00_4steps", "01_2steps"]
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 2 and s["teacher_steps"] == 20 and "retained_overall" in s
    assert s["bench"]["flop_ratio"] == pytest.approx(2 / (20 * 2))  # 2 passes against 20 steps x 2 (CFG)
    student = str(run / "student")
    assert sampling_defaults(student)["num_inference_steps"] == 2 and sampling_defaults(student)["guidance_scale"] == 1
    pipe = load_pipeline(student, "cpu")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.timestep_spacing == "trailing"
    card = (run / "student" / "README.md").read_text()
    assert "few-step" in card and "| 1 | progressive | 2 | 4 | 2 |" in card
    assert "samples in 2 deterministic steps" in card
    import re

    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("path/to/student", student)
    scope: dict = {}
    exec(code.replace("<your prompt>", "a red circle"), scope)  # plain diffusers, with the saved DDIM scheduler
    assert type(scope["pipe"].scheduler).__name__ == "DDIMScheduler"
    assert scope["pipe"].scheduler.num_inference_steps == 2
    # a rerun finds every round done and trains nothing
    before = (run / "rounds" / "01_2steps" / "done.json").read_text()
    assert main(["steps", "--config", str(tmp_path / "c.yaml")]) == 0
    assert (run / "rounds" / "01_2steps" / "done.json").read_text() == before


def test_a_start_that_is_not_steps_times_a_power_of_two_is_refused():
    from slimdit.distill.fewstep import StepsConfig

    with pytest.raises(ValueError, match="power of 2"):
        StepsConfig(out="x", steps=4, start=12)
    assert StepsConfig(out="x", steps=1, start=8).model_dump()["start"] == 8
    with pytest.raises(ValueError, match="solver_steps"):
        StepsConfig(out="x", method="consistency", steps=8, solver_steps=4)
    with pytest.raises(ValueError, match="gan_weight: the GAN head belongs to method: dmd2"):
        StepsConfig(out="x", method="progressive", gan_weight=0.01)
    with pytest.raises(ValueError, match="gan_unit set without gan_weight > 0"):
        StepsConfig(out="x", method="dmd2", gan_unit="block.1")
    with pytest.raises(ValueError, match="method consistency has no halvings to refine"):
        StepsConfig(out="x", method="consistency", refine={"steps": 10})
    assert StepsConfig(out="x", refine={"steps": 10}, gan_weight=0.01).refine.lr == 3e-5  # the head may refine
    with pytest.raises(ValueError, match=r"refine \(dmd2\) runs a drawn number"):
        StepsConfig(out="x", refine={"steps": 10}, train={"sharding": "fsdp", "optimizer": "adamw"})
    with pytest.raises(ValueError, match="method: ladd runs a drawn number"):
        StepsConfig(out="x", method="ladd", train={"sharding": "fsdp", "optimizer": "adamw"})
    with pytest.raises(ValueError, match="disc_lr: the discriminator heads belong to method: ladd"):
        StepsConfig(out="x", method="dmd2", disc_lr=1e-4)
    with pytest.raises(ValueError, match="mismatch_weight: the discriminator heads belong to method: ladd"):
        StepsConfig(out="x", method="direct", mismatch_weight=1.0)
    with pytest.raises(ValueError, match=r"caption dropout \(train.caption_dropout: 0.1\) may have emptied"):
        StepsConfig(out="x", method="ladd", mismatch_weight=1.0, train={"caption_dropout": 0.1})
    with pytest.raises(ValueError, match="mismatch_weight needs at least 2 images per micro-batch"):
        StepsConfig(out="x", method="ladd", mismatch_weight=1.0, train={"caption_dropout": 0.0, "batch_size": 2,
                                                                         "grad_accum": 2})
    # a refining round trains without caption dropout whatever the halvings use
    assert StepsConfig(out="x", refine={"method": "ladd"}, mismatch_weight=1.0).mismatch_weight == 1.0
    with pytest.raises(ValueError, match="gan_weight: the GAN head belongs to method: dmd2"):
        StepsConfig(out="x", refine={"method": "ladd"}, gan_weight=0.01)
    with pytest.raises(ValueError, match="fake_lr: the fake score belongs to method: dmd2"):
        StepsConfig(out="x", method="ladd", fake_lr=1e-4)
    with pytest.raises(ValueError, match="fake_updates: the fake score belongs to method: dmd2"):
        StepsConfig(out="x", refine={"method": "ladd"}, fake_updates=3)
    assert StepsConfig(out="x", refine={"method": "dmd2"}, fake_lr=1e-4).fake_lr == 1e-4
    assert StepsConfig(out="x", refine={"method": "ladd"}, disc_units=["block.0"]).disc_units == ["block.0"]
    from slimdit.distill.fewstep import describe_rounds

    assert describe_rounds(StepsConfig(out="x", steps=4, start=16, refine={})) == "16 -> 8 -> 4 -> 4 (dmd2) steps"
    ladd = StepsConfig(out="x", steps=2, start=4, refine={"method": "ladd"})
    assert describe_rounds(ladd) == "4 -> 2 -> 2 (ladd) steps"
    for method in ("dmd2", "progressive", "ladd"):  # a saved config names every field: it reads back as it was
        saved = StepsConfig(out="x", method=method).model_dump(mode="json")
        assert StepsConfig.model_validate(saved).model_dump(mode="json") == saved


def test_a_partial_train_section_keeps_the_runs_own_defaults():
    """A config naming one field of a section keeps the others as its run class sets them (a step run's train is
    AdamW at 1e-4), in a file and through --set alike."""
    from slimdit.config import load_config
    from slimdit.demo import DemoConfig
    from slimdit.distill.fewstep import StepsConfig

    cfg = load_config({"out": "x", "train": {"steps": 7}}, StepsConfig)
    assert (cfg.train.steps, cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size) == (7, "adamw", 1e-4, 32)
    demo = load_config({"teacher": "shapes-pixart", "out": "x"}, DemoConfig, overrides={"fewstep.train.steps": 3})
    assert (demo.fewstep.train.steps, demo.fewstep.train.optimizer, demo.fewstep.train.warmup_steps) == (3, "adamw", 20)


@pytest.mark.parametrize("config", [SCHED, V], ids=["eps", "v"])
def test_the_consistency_function_is_what_lcm_scheduler_samples_with(config):
    """Training's grid holds LCMScheduler's sampling timesteps, and its consistency function at each of them is
    the scheduler's ``denoised``; at the clean end it is the identity."""
    from slimdit.distill.consistency import ConsistencyLoss, lcm_scheduler

    teacher = tiny()
    adapter = adapter_for(teacher, config)
    t, s = transitions(config, 50)
    assert t[0] == 999 and t[-1] == 19 and (t - s == 20).all()
    loss = ConsistencyLoss(adapter, t, s)
    sched = lcm_scheduler(config, 50)
    data = _data()
    cond = {k: v[:2] for k, v in data.cond.items()}
    for n in (1, 2, 4, 8):
        sched.set_timesteps(n)
        assert set(sched.timesteps.tolist()) <= set(t.tolist())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        for step in sched.timesteps:
            tt = step.expand(2)
            pred = adapter.prediction(teacher, adapter.predict(teacher, x, tt, cond))
            out = sched.step(pred, step, x, generator=g)
            assert torch.allclose(loss.consistency(teacher, x, tt, cond), out.denoised, atol=1e-5)
            x = out.prev_sample
        clean = torch.full((2,), -1)
        assert torch.equal(loss.consistency(teacher, x, clean, cond), x)


@pytest.mark.parametrize("flux", [False, True], ids=["pixart-v-cfg", "flux-guidance-input"])
def test_consistency_distillation_trains_on_diffusion_and_flow_teachers(tmp_path, flux):
    from slimdit.distill.consistency import ConsistencyLoss
    from slimdit.distill.trainer import TrainConfig, Trainer

    teacher = tiny_flux(1, 1) if flux else tiny()
    student = copy.deepcopy(teacher)
    config = FLOW if flux else V
    adapter = adapter_for(student, config)
    data = flux_data(3, 16) if flux else _data()
    t, s = transitions(config, 50, adapter.image_tokens(teacher, data.latents[:1]))
    guide = dict(guidance=3.5, guidance_input=True) if flux else dict(null=data.null, guidance=3.0)
    loss = ConsistencyLoss(adapter, t, s, **guide)
    b = Batch(data.latents[:8], {k: v[:8] for k, v in data.cond.items()}, torch.Generator().manual_seed(9))
    cfg = TrainConfig(steps=30, batch_size=8, warmup_steps=1, lr=1e-3, optimizer="adamw", checkpoint_every=100,
                      log_every=1, val_every=0, caption_dropout=0.0)
    before = loss(student, teacher, b)["total"].item()
    tr = Trainer(adapter, teacher, student, data, cfg, tmp_path, loss=loss)
    tr.train(progress=False)
    b.generator.manual_seed(9)
    assert loss(tr.student, teacher, b)["total"].item() < 0.7 * before


def test_slimdit_steps_consistency_saves_an_lcm_student_that_samples_in_any_count(tiny_teacher, tmp_path):
    import yaml

    from slimdit.cli import main
    from slimdit.pipelines.loading import load_sampler, sampling_defaults

    cfg = {"teacher": tiny_teacher, "out": str(tmp_path / "run"), "method": "consistency", "steps": 2,
           "data": {"real": "shapes-train:8"}, "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1},
           "eval": {"benchmark": None, "bench": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["steps", "--config", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "run"
    assert [p.name for p in (run / "rounds").iterdir()] == ["00_2steps"]
    student = str(run / "student")
    assert sampling_defaults(student)["num_inference_steps"] == 2 and sampling_defaults(student)["guidance_scale"] == 1
    for n in (1, 4):
        sampler = load_sampler(student, steps=n)
        assert type(sampler.pipe.scheduler).__name__ == "LCMScheduler"
        assert sampler.generate(["a red circle"], [0], progress=False).shape[0] == 1
        assert sampler.pipe.scheduler.num_inference_steps == n
    card = (run / "student" / "README.md").read_text()
    assert "latent consistency distillation" in card and "consistency-distillation" in card


def test_slimdit_steps_consistency_on_a_flux_pipeline_samples_with_flow_match_lcm(tiny_flux_pipeline, tiny_teacher,
                                                                                   tmp_path):
    """A guidance-embedded Flux teacher, with LCM's EMA target and w-conditioning: the student saves with
    ``FlowMatchLCMScheduler``, samples in any count, and each image depends on its seed alone (the scheduler's
    noise included, which FluxPipeline does not seed); w-conditioning on a CFG teacher, or settings of consistency
    given to another method, are refused before anything is cached."""
    import yaml

    from slimdit.cli import main
    from slimdit.distill.fewstep import StepsConfig
    from slimdit.pipelines.loading import load_sampler, sampling_defaults

    w = sampling_defaults(str(tiny_flux_pipeline))["guidance_scale"]
    cfg = {"teacher": str(tiny_flux_pipeline), "out": str(tmp_path / "run"), "method": "consistency", "steps": 2,
           "solver_steps": 8, "target_ema": 0.9, "guidance_range": [1.0, w + 1],
           "data": {"real": "shapes-train:8"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 1},
           "eval": {"benchmark": None, "bench": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["steps", "--config", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "run"
    assert (run / "rounds" / "00_2steps" / "checkpoints" / "step_0000002" / "loss.safetensors").exists()
    student = str(run / "student")
    d = sampling_defaults(student)
    assert d["num_inference_steps"] == 2 and d["guidance_scale"] == w
    for n in (1, 4):
        sampler = load_sampler(student, steps=n)
        assert type(sampler.pipe.scheduler).__name__ == "FlowMatchLCMScheduler"
        both = sampler.generate(["a red circle", "two blue squares"], [0, 1], progress=False)
        alone = sampler.generate(["two blue squares"], [1], progress=False)
        assert sampler.pipe.scheduler.num_inference_steps == n
        # the same image up to one grey level: batched and single products round differently at some thread counts
        assert np.abs(both[1].astype(int) - alone[0].astype(int)).max() <= 1
    card = (run / "student" / "README.md").read_text()
    assert "FlowMatchLCMScheduler saved beside it" in card and "8-point Euler trajectories" in card
    assert f"trained at every scale in [1.0, {w + 1}]" in card
    again = load_sampler(student, steps=4).generate(["two blue squares"], [2], progress=False)
    assert np.abs(again[0].astype(int) - alone[0].astype(int)).max() > 1  # another seed, another image

    bad = {**cfg, "teacher": tiny_teacher, "out": str(tmp_path / "bad")}  # w-conditioning, a CFG teacher
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(bad))
    assert main(["steps", "--config", str(tmp_path / "b.yaml")]) == 2
    assert not (tmp_path / "bad" / "cache").exists()
    with pytest.raises(ValueError, match="target_ema.*method: consistency"):
        StepsConfig(out="x", method="progressive", target_ema=0.5)
    with pytest.raises(ValueError, match="guidance_range"):
        StepsConfig(out="x", method="consistency", guidance_range=(4.0, 2.0))


def test_a_compressed_student_learns_the_original_teachers_steps(tiny_teacher, tiny_flux_pipeline, tmp_path):
    """``student:`` starts the few-step student from another model (here a compressed one) while the teacher's
    guided steps stay the target; at a vanishing learning rate it ends as the compressed model, and a student from
    another base
    pipeline is refused before anything is cached."""
    import json

    import torch
    import yaml

    from slimdit.cli import main
    from slimdit.models.storage import load_model

    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"units": {"block.1": "remove", "block.2": {"svd": {"mlp": 0.5}}}}))
    small = tmp_path / "small"
    assert main(["compress", "--model", tiny_teacher, "--plan", str(plan), "--out", str(small)]) == 0
    cfg = {"teacher": tiny_teacher, "student": str(small), "out": str(tmp_path / "run"), "steps": 2, "start": 4,
           "data": {"real": "shapes-train:8"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 1, "lr": 1e-12},
           "eval": {"benchmark": None}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["steps", "--config", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "run"
    got = load_model(run / "student" / "transformer").state_dict()
    want = load_model(small / "transformer").state_dict()
    assert got.keys() == want.keys()  # the compressed architecture (a removed block, low-rank factors)
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-9) for k in want)
    assert json.loads((run / "summary.json").read_text())["started_from"] == str(small)

    other = {**cfg, "student": str(tiny_flux_pipeline), "out": str(tmp_path / "other")}
    (tmp_path / "o.yaml").write_text(yaml.safe_dump(other))
    assert main(["steps", "--config", str(tmp_path / "o.yaml")]) == 2
    assert not (tmp_path / "other" / "cache").exists()


def test_the_flow_consistency_function_is_what_flow_match_lcm_scheduler_samples_with():
    """For a flow teacher the consistency function is ``x - sigma v``, the identity at the clean end, and diffusers'
    ``FlowMatchLCMScheduler``, stepped on the grid FluxPipeline sets, takes exactly it and noises it again to the
    next sigma with the generator's noise."""
    import numpy as np

    from slimdit.distill.consistency import ConsistencyLoss, lcm_scheduler
    from slimdit.distill.objectives import _calculate_shift

    teacher = tiny_flux(1, 1)
    adapter = adapter_for(teacher, FLOW)
    data = flux_data(3)
    tokens = adapter.image_tokens(teacher, data.latents[:1])
    t, s = transitions(FLOW, 50, tokens)
    assert t[0] == 1000 and s[-1] == 0 and torch.equal(t[1:], s[:-1])
    loss = ConsistencyLoss(adapter, t, s, guidance=3.5, guidance_input=True)
    cond = {**{k: v[:2] for k, v in data.cond.items()}, "guidance": torch.full((2,), 3.5)}
    mu = _calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    for n in (1, 2, 4):
        sched = lcm_scheduler(FLOW, 50)
        assert type(sched).__name__ == "FlowMatchLCMScheduler"
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)  # as FluxPipeline sets them
        assert torch.allclose(sched.timesteps, transitions(FLOW, n, tokens)[0])
        g = torch.Generator().manual_seed(n)
        x = torch.randn(2, 4, 8, 8, generator=g)
        with torch.no_grad():
            for j, step in enumerate(sched.timesteps):
                tt = step.expand(2)
                f = loss.consistency(teacher, x, tt, cond)
                pred = adapter.prediction(teacher, adapter.predict(teacher, x, tt, cond))
                noise = torch.randn(x.shape, generator=torch.Generator().set_state(g.get_state()))
                out = sched.step(pred, step, x, generator=g).prev_sample
                sig = sched.sigmas[j + 1]
                assert torch.allclose(out, (1 - sig) * f + sig * noise, atol=1e-5)
                x = out
        assert torch.equal(loss.consistency(teacher, x, torch.zeros(2), cond), x)


def _consistency_run(run, loss, steps=4, max_steps=None, flux=True):
    from slimdit.distill.trainer import TrainConfig, Trainer

    teacher = tiny_flux(1, 1) if flux else tiny()
    data = flux_data(3) if flux else _data()
    cfg = TrainConfig(steps=steps, batch_size=4, warmup_steps=1, lr=1e-3, optimizer="adamw", checkpoint_every=2,
                      log_every=1, val_every=0, caption_dropout=0.0)
    tr = Trainer(loss.adapter, teacher, copy.deepcopy(teacher), data, cfg, run, loss=loss)
    tr.train(max_steps=max_steps, progress=False)
    return tr


def _flow_loss(**kw):
    from slimdit.distill.consistency import ConsistencyLoss, EMATargetConsistencyLoss

    adapter = adapter_for(tiny_flux(1, 1), FLOW)
    t, s = transitions(FLOW, 10, 16)
    cls = EMATargetConsistencyLoss if "target_ema" in kw else ConsistencyLoss
    return cls(adapter, t, s, guidance=3.5, guidance_input=True, **kw)


def test_an_ema_target_at_decay_zero_trains_as_the_student_target_and_follows_the_student(tmp_path):
    """LCM's EMA target: at decay 0 it is the student after every step, so training is bit-identical to the
    stop-gradient target's; at decay 0.5 one update moves it halfway to the student."""
    plain = _consistency_run(tmp_path / "plain", _flow_loss())
    ema = _consistency_run(tmp_path / "ema0", _flow_loss(target_ema=0.0))
    for p, q in zip(plain.student_model().parameters(), ema.student_model().parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(next(plain.student_model().parameters()), next(tiny_flux(1, 1).parameters()))

    loss = _flow_loss(target_ema=0.5)
    student = tiny_flux(1, 1)
    before = copy.deepcopy(loss._target(student))  # made at the first update: a copy of the student
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    loss.after_step(student)
    for e, b, p in zip(loss.target.parameters(), before.parameters(), student.parameters(), strict=True):
        assert torch.allclose(e, (b + p) / 2)
        assert not e.requires_grad


def test_a_resumed_consistency_run_with_an_ema_target_ends_where_an_uninterrupted_one_ends(tmp_path):
    _consistency_run(tmp_path / "a", _flow_loss(target_ema=0.9), max_steps=2)
    resumed = _consistency_run(tmp_path / "a", _flow_loss(target_ema=0.9))
    whole = _consistency_run(tmp_path / "b", _flow_loss(target_ema=0.9))
    for p, q in zip(resumed.student_model().parameters(), whole.student_model().parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(resumed.loss.target.parameters(), whole.loss.target.parameters(), strict=True):
        assert torch.equal(p, q)
    # the target lags the student: neither the start nor the student
    first = next(whole.loss.target.parameters())
    assert not torch.equal(first, next(tiny_flux(1, 1).parameters()))
    assert not torch.equal(first, next(whole.student_model().parameters()))
    assert (tmp_path / "a" / "checkpoints" / "step_0000004" / "loss.safetensors").exists()


def test_w_conditioning_gives_teacher_and_student_one_drawn_scale_per_sample():
    """LCM's w-conditioning: each sample's w is drawn from the range, and the teacher's step and the student's
    prediction both take it; a teacher without a guidance input is refused."""
    from slimdit.distill.consistency import ConsistencyLoss

    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.config = model.config

        def forward(self, *args, guidance=None, **kwargs):
            seen.append(guidance.clone())
            return self.model(*args, guidance=guidance, **kwargs)

    loss = _flow_loss(guidance_range=(1.0, 6.0))
    data = flux_data(3)
    teacher, student = Spy(tiny_flux(1, 1)), Spy(tiny_flux(1, 1))
    b = Batch(data.latents[:8], data.cond, torch.Generator().manual_seed(0))
    loss(student, teacher, b)
    assert len(seen) >= 2 and all(torch.equal(w, seen[0]) for w in seen)
    w = seen[0]
    assert w.shape == (8,) and (w >= 1).all() and (w <= 6).all() and w.std() > 0.5
    with pytest.raises(ValueError, match="guidance input"):
        ConsistencyLoss(adapter_for(tiny(), V), *transitions(V, 50), guidance_range=(1.0, 6.0))


def test_the_memory_plan_counts_the_ema_target_and_nothing_else(tiny_teacher):
    from slimdit.compress.plan import Plan
    from slimdit.distill.fewstep import StepsConfig
    from slimdit.speed.memory import config_memory_plan
    from slimdit.speed.shapes import build_component, component_configs, param_count

    def plan(method="consistency", **kw):
        c = StepsConfig(teacher=tiny_teacher, out="x", method=method, steps=2, **kw,
                        train={"steps": 1, "batch_size": 2, "caption_dropout": 0.0})
        return config_memory_plan(c, Plan(ops=[]), "cpu").items

    n_teacher = param_count(build_component(*component_configs(tiny_teacher)["transformer"]))
    plain, ema = plan(target_ema=None), plan()  # LCM's EMA target by default
    assert "consistency EMA target" not in plan(method="direct")  # the default decay is consistency's alone
    assert ema.pop("consistency EMA target") == 4 * n_teacher  # a copy of the student in fp32, no gradients
    assert ema == plain


def test_a_consistency_run_saved_before_target_ema_existed_reads_as_the_student_target(tiny_teacher, tmp_path):
    """A run directory whose config was saved before ``target_ema`` existed trained against the student itself:
    today's default (LCM's EMA target) would change it, so continuing it is refused by name, and continuing it with
    ``target_ema: null`` is not."""
    import yaml

    from slimdit.distill.fewstep import StepsConfig
    from slimdit.identity import check_run_dir, input_fingerprints

    cfg = StepsConfig(teacher=tiny_teacher, out=str(tmp_path / "run"), method="consistency", steps=2,
                      data={"real": "shapes-train:8"})
    check_run_dir(cfg.out, cfg, input_fingerprints(cfg))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved.pop("target_ema") == 0.95
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))  # as written before the field existed
    (tmp_path / "run" / "rounds" / "00_2steps" / "checkpoints" / "step_0000001").mkdir(parents=True)  # work
    with pytest.raises(ValueError, match="target_ema"):
        check_run_dir(cfg.out, cfg, input_fingerprints(cfg))
    check_run_dir(cfg.out, cfg.model_copy(update={"target_ema": None}), input_fingerprints(cfg))

    # a run of another method saved before the field existed continues as it is (the field is not its to change)
    other = StepsConfig(teacher=tiny_teacher, out=str(tmp_path / "pd"), steps=2, start=4,
                        data={"real": "shapes-train:8"})
    check_run_dir(other.out, other, input_fingerprints(other))
    saved = yaml.safe_load((tmp_path / "pd" / "config.yaml").read_text())
    del saved["target_ema"]
    (tmp_path / "pd" / "config.yaml").write_text(yaml.safe_dump(saved))
    (tmp_path / "pd" / "rounds" / "00_8steps" / "checkpoints" / "step_0000001").mkdir(parents=True)
    check_run_dir(other.out, other, input_fingerprints(other))


def test_step_generators_keep_the_schedulers_signature_and_hand_it_back():
    """Pipelines read ``scheduler.step``'s signature to choose what to pass (``eta``, ``generator``): the seeding
    wrapper keeps it, passes each image's generator, and leaves the scheduler as it was."""
    import inspect

    from diffusers import DDIMScheduler, FlowMatchLCMScheduler

    from slimdit.pipelines.sampling import step_generators

    ddim = DDIMScheduler()
    with step_generators(ddim, [torch.Generator()]):
        assert {"eta", "generator"} <= set(inspect.signature(ddim.step).parameters)
    assert "step" not in vars(ddim)

    lcm = FlowMatchLCMScheduler()
    lcm.set_timesteps(2)
    x = torch.zeros(2, 3, 4)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    with step_generators(lcm, gens):
        out = lcm.step(torch.zeros_like(x), lcm.timesteps[0], x).prev_sample
    want = torch.cat([torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    assert torch.allclose(out, lcm.sigmas[1] * want)  # x0 = 0, so the step is its noise alone, image by image
    assert "step" not in vars(lcm)
