"""Distribution matching distillation (DMD2): the gradient vanishes where the fake score is the real one, the fake
score learns the student's samples, the student's samples come from its own grid, a resumed run (fake score and its
optimizer included) ends where an uninterrupted one ends, and ``slimdit steps`` runs it on PixArt and on Flux."""

from __future__ import annotations

import copy

import pytest
import torch

from slimdit.distill.dmd import DMDLoss
from slimdit.distill.losses import Batch
from slimdit.distill.steps import deterministic_step, transitions
from slimdit.models import adapter_for
from tests.test_compress import tiny
from tests.test_steps import V
from tests.test_trainer import _data


def _batch(data, seed=0, n=4):
    return Batch(data.latents[:n], {k: v[:n] for k, v in data.cond.items()}, torch.Generator().manual_seed(seed))


def test_no_gradient_while_the_fake_score_is_the_real_one():
    teacher = tiny()
    student = copy.deepcopy(teacher).requires_grad_(True)
    adapter, data = adapter_for(student, V), _data()
    t, s = transitions(V, 4)
    loss = DMDLoss(adapter, teacher, t, s, fake_updates=1)  # no CFG: the fake copy scores as the teacher does
    out = loss(student, teacher, _batch(data))
    assert float(out["dm"]) == 0
    out["total"].backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in student.parameters())
    # the fake score took its step on the student's samples: now it differs, and the student gets a gradient
    student.zero_grad()
    out = loss(student, teacher, _batch(data, seed=1))
    out["total"].backward()
    assert float(out["dm"]) > 0 and sum(float(p.grad.abs().sum()) for p in student.parameters()) > 0


def test_the_generator_samples_on_its_own_grid():
    teacher = tiny()
    adapter, data = adapter_for(teacher, V), _data()
    t, s = transitions(V, 3)
    loss = DMDLoss(adapter, teacher, t, s, fake_updates=1)
    b = _batch(data, seed=5)
    with torch.no_grad():
        x0 = loss.generate(teacher, b)
    # redo it by hand: the same draws (the step, then the noise), deterministic steps to it, x0 there
    g = torch.Generator().manual_seed(5)
    k = int(torch.randint(3, (1,), generator=g))
    x = torch.randn(b.x0.shape, generator=g)
    with torch.no_grad():
        for j in range(k + 1):
            tt = t[j].expand(4)
            pred = adapter.prediction(teacher, adapter.predict(teacher, x, tt, b.cond))
            if j == k:
                want = adapter.objective.x0(x, pred, tt)
            else:
                x = deterministic_step(adapter.objective, x, pred, tt, s[j].expand(4))
    assert torch.allclose(x0, want, atol=1e-6)


def _two_step_samples(**kw):
    """A DMD loss on a tiny teacher's 2-step grid, its data, and the teacher's own samples as the student's."""
    teacher = tiny()
    adapter, data = adapter_for(teacher, V), _data()
    loss = DMDLoss(adapter, teacher, *transitions(V, 2), fake_updates=1, **kw)
    with torch.no_grad():
        x0 = loss.generate(teacher, _batch(data, seed=3))
    return loss, data, x0


def test_the_fake_score_learns_the_students_samples():
    loss, data, x0 = _two_step_samples(fake_lr=3e-3)
    first = [float(loss._fake_step(x0, _batch(data, seed=100 + i))[0]) for i in range(3)]
    for i in range(40):
        loss._fake_step(x0, _batch(data, seed=i))
    last = [float(loss._fake_step(x0, _batch(data, seed=100 + i))[0]) for i in range(3)]
    assert sum(last) < 0.8 * sum(first)


def test_a_non_finite_fake_score_step_stops_before_it_is_applied():
    from slimdit.errors import TrainingDiverged

    loss, data, x0 = _two_step_samples()
    loss._fake_step(x0, _batch(data, seed=4))  # one good step: the optimizer has state to protect
    before = {k: v.clone() for k, v in loss.state()[0].items()}
    x0[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="fake score diverged: its loss"):
        loss._fake_step(x0, _batch(data, seed=5))
    after = loss.state()[0]
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and optimizer state untouched


def test_the_gan_head_alone_moves_the_student_while_the_matching_gradient_is_zero():
    teacher = tiny()
    student = copy.deepcopy(teacher).requires_grad_(True)
    adapter, data = adapter_for(student, V), _data()
    loss = DMDLoss(adapter, teacher, *transitions(V, 4), fake_updates=1, gan_weight=0.5)
    assert loss.gan_unit == adapter.units(teacher)[len(adapter.units(teacher)) // 2]
    out = loss(student, teacher, _batch(data))
    assert float(out["dm"]) == 0 and float(out["gan"]) > 0 and float(out["disc"]) > 0
    loss.fake_opt.zero_grad(set_to_none=True)  # the fake score's own step left its gradients: clear them
    out["total"].backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    # the student's backward reached neither the fake score nor the head, which train again afterwards
    trained = [*loss.fake.parameters(), *loss.head.parameters()]
    assert all(p.grad is None for p in trained) and all(p.requires_grad for p in trained)
    with pytest.raises(ValueError, match="gan_unit 'block.99' is not a unit"):
        DMDLoss(adapter, teacher, *transitions(V, 4), gan_weight=0.5, gan_unit="block.99")


def test_the_gan_head_learns_real_data_from_the_students_samples():
    loss, data, x0 = _two_step_samples(fake_lr=3e-3, gan_weight=0.1, gan_d_weight=1.0)
    x0 = x0 + 0.5  # samples visibly off the data
    first = [float(loss._fake_step(x0, _batch(data, seed=100 + i))[1]) for i in range(3)]
    for i in range(60):
        loss._fake_step(x0, _batch(data, seed=i))
    last = [float(loss._fake_step(x0, _batch(data, seed=100 + i))[1]) for i in range(3)]
    assert sum(last) < 0.6 * sum(first)  # from log 4 (no idea) towards 0


def _train(tmp_path, steps, max_steps=None, **gan):
    from slimdit.distill.trainer import TrainConfig, Trainer

    teacher = tiny()
    student = copy.deepcopy(teacher)
    adapter, data = adapter_for(student, V), _data()
    t, s = transitions(V, 2)
    loss = DMDLoss(adapter, teacher, t, s, null=data.null, guidance=2.0, fake_updates=2, fake_lr=1e-3, **gan)
    cfg = TrainConfig(steps=steps, batch_size=4, warmup_steps=1, lr=1e-3, optimizer="adamw", grad_clip=1.0,
                      weight_decay=0.0, checkpoint_every=2, log_every=1, val_every=0, caption_dropout=0.0)
    tr = Trainer(adapter, teacher, student, data, cfg, tmp_path, loss=loss)
    tr.train(max_steps=max_steps, progress=False)
    return tr, loss


@pytest.mark.parametrize("gan", [{}, {"gan_weight": 0.1}], ids=["plain", "gan-head"])
def test_a_resumed_dmd_run_ends_where_an_uninterrupted_one_ends(tmp_path, gan):
    _train(tmp_path / "a", 4, max_steps=2, **gan)
    resumed, rl = _train(tmp_path / "a", 4, **gan)
    whole, wl = _train(tmp_path / "b", 4, **gan)
    for p, q in zip(resumed.student_model().parameters(), whole.student_model().parameters()):
        assert torch.equal(p, q)
    for p, q in zip(rl.fake.parameters(), wl.fake.parameters()):
        assert torch.equal(p, q)
    if gan:
        assert all(torch.equal(p, q) for p, q in zip(rl.head.parameters(), wl.head.parameters()))
    assert not torch.equal(next(wl.fake.parameters()), next(tiny().parameters()))  # the fake score trained
    assert (tmp_path / "a" / "checkpoints" / "step_0000004" / "loss.safetensors").exists()


def _tiny_steps_run(tmp_path, teacher, caption_dropout: float, **fields):
    """``slimdit steps`` on a tiny config (2 steps, 2 fake updates with a DMD2 round, 2 training steps of batch 2);
    the run directory."""
    import yaml

    from slimdit.cli import main

    refine = fields.get("refine")
    dmd = fields.get("method") == "dmd2" or (refine is not None and refine.get("method", "dmd2") == "dmd2")
    fake = {"fake_updates": 2} if dmd else {}  # the fake score's setting is refused without a DMD2 round
    cfg = {"teacher": teacher, "out": str(tmp_path / "run"), "steps": 2, **fake, **fields,
           "data": {"real": "shapes-train:8"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 1,
                     "caption_dropout": caption_dropout, "log_every": 1},
           "eval": {"benchmark": None, "bench": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["steps", "--config", str(tmp_path / "c.yaml")]) == 0
    return tmp_path / "run"


@pytest.mark.parametrize("which", ["pixart", "flux"])
def test_slimdit_steps_dmd2_runs_end_to_end(which, tiny_teacher, tiny_flux_pipeline, tmp_path):
    import json

    from slimdit.pipelines.loading import load_sampler, sampling_defaults

    teacher = tiny_teacher if which == "pixart" else str(tiny_flux_pipeline)
    # Flux: the GAN head on a double block's image stream
    run = _tiny_steps_run(tmp_path, teacher, 0.0, method="dmd2", gan_weight=0.01 if which == "flux" else 0.0)
    rows = [json.loads(r) for r in (run / "rounds" / "00_2steps" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("fake" in r and "dm" in r for r in rows)
    assert all(("gan" in r and "disc" in r) == (which == "flux") for r in rows)
    student = str(run / "student")
    assert sampling_defaults(student)["num_inference_steps"] == 2
    assert load_sampler(student).generate(["a red circle"], [0], progress=False).shape[0] == 1
    card = (run / "student" / "README.md").read_text()
    assert "distribution matching distillation" in card and "- distribution-matching-distillation" in card


def _spy_train_configs(monkeypatch) -> list:
    """The train config of each round's :class:`Trainer`, in the order the rounds build them."""
    from slimdit.distill import trainer

    seen = []

    class Trainer(trainer.Trainer):
        def __init__(self, *args, **kwargs):
            seen.append(args[4])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trainer, "Trainer", Trainer)
    return seen


def test_a_refining_dmd2_round_follows_the_halvings_against_the_original_guided_teacher(tiny_teacher, tmp_path,
                                                                                        monkeypatch):
    """``refine:`` adds one DMD2 round on the final steps after progressive distillation's rounds. It starts from the
    last halving's student, and its real score is the run's own teacher with CFG, not the previous round's student."""
    import json

    from slimdit.cli import main
    from slimdit.distill import fewstep
    from slimdit.models.storage import load_model

    seen = {}

    def spy(method):
        build = fewstep.LOSSES[method]

        def wrapped(r):
            seen[r.steps, method] = (r.teacher, r.cfg_null is not None)
            return build(r)
        return wrapped

    for method in ("progressive", "dmd2"):
        monkeypatch.setitem(fewstep.LOSSES, method, spy(method))
    train_configs = _spy_train_configs(monkeypatch)
    run = _tiny_steps_run(tmp_path, tiny_teacher, 0.1, start=4, refine={"steps": 3, "lr": 1e-3})
    dropout = [c.caption_dropout for c in train_configs]
    assert sorted(p.name for p in (run / "rounds").iterdir()) == ["00_2steps", "01_2steps_dmd2"]
    done = json.loads((run / "rounds" / "01_2steps_dmd2" / "done.json").read_text())
    assert (done["method"], done["steps"], done["train_steps"]) == ("dmd2", 2, 3)
    rows = [json.loads(r) for r in (run / "rounds" / "01_2steps_dmd2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("fake" in r for r in rows)
    assert rows[-1]["lr"] == 1e-3  # the refining round's own rate (the run's is 1e-4), after a one-step warm-up
    # both rounds are taught by the guided original (the halving's first round, and the refining round again)
    (pd_teacher, pd_cfg), (dmd_teacher, dmd_cfg) = seen[2, "progressive"], seen[2, "dmd2"]
    assert dmd_teacher is pd_teacher and pd_cfg and dmd_cfg
    assert dropout == [0.1, 0.0]  # the refining round matches each caption's guided distribution: no dropout
    assert json.loads((run / "summary.json").read_text())["refine"] == {"method": "dmd2", "steps": 3, "lr": 1e-3,
                                                                         "ema_decay": None}
    # the refining round trained the halving's student further, and that is the final student
    halved = load_model(run / "rounds" / "00_2steps" / "student" / "transformer")
    final = load_model(run / "student" / "transformer")
    refined = load_model(run / "rounds" / "01_2steps_dmd2" / "student" / "transformer")
    assert all(torch.equal(p, q) for p, q in zip(final.parameters(), refined.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(final.parameters(), halved.parameters()))
    card = (run / "student" / "README.md").read_text()
    assert "A last round of distribution matching (DMD2" in card and "| 1 | dmd2 | 2 | – | 3 |" in card
    assert "(the refining round: 3 at lr 0.001)" in card
    # a rerun finds both rounds done and trains nothing
    before = (run / "rounds" / "01_2steps_dmd2" / "done.json").read_text()
    assert main(["steps", "--config", str(tmp_path / "c.yaml")]) == 0
    assert (run / "rounds" / "01_2steps_dmd2" / "done.json").read_text() == before


def test_a_refining_round_with_its_own_ema_saves_the_ema_and_leaves_the_halvings_without_one(tiny_teacher, tmp_path,
                                                                                          monkeypatch):
    """``refine.ema_decay``: only the refining round keeps an EMA of the student (the run's halvings train as
    before), and the round's student, which is the run's final student, is that EMA: the EMA weights of the round's
    last checkpoint, not its trained weights."""
    from safetensors.torch import load_file

    from slimdit.models.storage import load_model

    train_configs = _spy_train_configs(monkeypatch)
    run = _tiny_steps_run(tmp_path, tiny_teacher, 0.0, start=4, refine={"steps": 3, "lr": 1e-3, "ema_decay": 0.5})
    assert [c.ema_decay for c in train_configs] == [None, 0.5]
    rdir = run / "rounds" / "01_2steps_dmd2"
    last = sorted((rdir / "checkpoints").glob("step_*"))[-1]
    ema, trained = load_file(last / "ema.safetensors"), load_file(last / "trainable.safetensors")
    final = dict(load_model(run / "student" / "transformer").named_parameters())
    assert all(torch.equal(final[n].detach(), ema[n]) for n in ema)
    assert not all(torch.equal(ema[n], trained[n]) for n in ema)  # the EMA is not the trained weights
    assert "its EMA 0.5 saved" in (run / "student" / "README.md").read_text()


def test_a_dmd2_run_plans_its_fake_score_and_is_refused_before_caching_when_it_cannot_fit(tiny_teacher, tmp_path,
                                                                                          capsys, monkeypatch):
    import yaml

    from slimdit.cli import main
    from slimdit.compress.plan import Plan
    from slimdit.distill.fewstep import StepsConfig
    from slimdit.speed.memory import config_memory_plan
    from slimdit.speed.shapes import build_component, component_configs, param_count

    # a refining DMD2 round that cannot fit is refused, with its plan written, before anything is cached
    cfg = {"teacher": tiny_teacher, "out": str(tmp_path / "run"), "steps": 2, "start": 4, "refine": {"steps": 1},
           "memory_plan": "on", "data": {"real": "shapes-train:8"},
           "train": {"steps": 1, "batch_size": 2**22}}  # four million images a step: cannot fit
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["steps", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "GiB per device" in capsys.readouterr().err
    assert (tmp_path / "run" / "memory_plan.json").exists()
    assert not (tmp_path / "run" / "cache").exists() and not (tmp_path / "run" / "rounds").exists()

    # the four plans below trace the same KD step: trace it once (the traced bytes, memoised, not replaced)
    import slimdit.speed.memory as memory

    traced, real, calls = {}, memory.activation_bytes, []

    def once(*args, **kw):
        calls.append(1)
        key = repr((args[:2], type(args[2]), args[3:], sorted(kw.items())))  # (cls, config, adapter, ...)
        if key not in traced:
            traced[key] = real(*args, **kw)
        return traced[key]

    monkeypatch.setattr(memory, "activation_bytes", once)

    def plan(train_caption_dropout=0.1, **kw):
        c = StepsConfig(teacher=tiny_teacher, out="x", steps=2, start=4, **kw,
                        train={"steps": 1, "batch_size": 2, "caption_dropout": train_caption_dropout})
        return config_memory_plan(c, Plan(ops=[]), "cpu").items

    n_teacher = param_count(build_component(*component_configs(tiny_teacher)["transformer"]))
    items = {"dmd2": plan(method="dmd2"), "gan": plan(method="dmd2", gan_weight=0.01), "progressive": plan(),
             "refine": plan(refine={"steps": 1})}
    assert items["dmd2"]["DMD fake score"] == 16 * n_teacher  # fp32 weights, gradients and AdamW's two states
    fake = {"DMD fake score", "DMD fake score's step"}
    assert not fake & set(items["progressive"])
    assert {k: v for k, v in items["dmd2"].items() if k not in fake} == items["progressive"]
    # the fake score's step (in fp32, the student's graph held) is one denoising pass; the GAN head adds a second
    # on real latents, and nothing else changes
    step, gan_step = items["dmd2"]["DMD fake score's step"], items["gan"]["DMD fake score's step"]
    assert step > 0 and gan_step == 2 * step
    assert {k: v for k, v in items["gan"].items() if k not in fake} == items["progressive"]
    assert items["refine"] == items["dmd2"]  # a refining DMD2 round after the halvings plans the same fake score
    # graphs held beside the training pass: DMD1's regression through the 2-step sampler, direct's second step
    reg = plan(method="dmd2", regression_weight=0.5, train_caption_dropout=0.0)
    direct = plan(method="direct", train_caption_dropout=0.0)
    assert reg["unrolled student passes"] == 2 * direct["unrolled student passes"] > 0
    assert {k: v for k, v in reg.items() if k != "unrolled student passes"} == items["dmd2"]
    assert "unrolled student passes" not in items["dmd2"]
    assert len(traced) < len(calls)  # the memo served the repeated traces


def test_the_regression_onto_the_teachers_pairs_adds_exactly_its_weighted_gradient(tmp_path):
    """DMD1's regression: while the fake score is the real one (no matching gradient), the student's gradient is
    exactly ``regression_weight`` times direct distillation's on the same pairs."""
    from slimdit.distill.direct import DirectLoss
    from slimdit.distill.reflow import teacher_pairs

    teacher = tiny()
    adapter, data = adapter_for(teacher, V), _data(6)
    t, s = transitions(V, 2)
    noise, x0 = teacher_pairs(adapter, teacher, data, tmp_path, t, s, 1.0, seed=2, progress=False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    idx = torch.tensor([4, 1, 3])
    batch = Batch(x0[idx], data.take(idx), torch.Generator().manual_seed(0), index=idx)
    direct = DirectLoss(adapter, noise, t, s)
    out = DMDLoss(adapter, teacher, t, s, fake_updates=1, regression=direct, regression_weight=0.5)(
        student, teacher, batch)
    assert float(out["dm"]) == 0 and float(out["regression"]) > 0
    out["total"].backward()
    both = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    direct(student, teacher, batch)["total"].backward()
    assert all(torch.allclose(g, 0.5 * p.grad, atol=1e-7, rtol=1e-5) for g, p in zip(both, student.parameters()))


def test_slimdit_steps_dmd2_with_the_regression_trains_on_the_teachers_pairs(tiny_teacher, tmp_path):
    import json

    from slimdit.distill.fewstep import StepsConfig

    run = _tiny_steps_run(tmp_path, tiny_teacher, 0.0, method="dmd2", regression_weight=0.5, pair_steps=2)
    assert sorted(p.name for p in (run / "pairs").iterdir()) == ["pairs.json", "pairs_00000.safetensors"]
    rows = [json.loads(r) for r in (run / "rounds" / "00_2steps" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["regression"] > 0 and "dm" in r for r in rows)
    base = {"out": str(tmp_path / "x"), "train": {"caption_dropout": 0.1}}
    with pytest.raises(ValueError, match="regression_weight > 0 needs train.caption_dropout: 0"):
        StepsConfig(**base, method="dmd2", regression_weight=0.5)
    with pytest.raises(ValueError, match="regression_weight: the regression onto the teacher's pairs belongs"):
        StepsConfig(out=str(tmp_path / "x"), method="ladd", regression_weight=0.5)
