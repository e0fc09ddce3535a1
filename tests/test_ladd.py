"""Latent adversarial diffusion distillation (LADD): the heads learn to tell the data from the student's samples,
the student's gradient reaches it through the frozen teacher and nothing else trains from it, a resumed run (heads
and their optimizer included) ends where an uninterrupted one ends, ``slimdit steps`` runs it on PixArt and Flux
and as progressive distillation's refining round, and its memory plan counts the discriminator."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from slimdit.distill.ladd import LADDLoss, check_units
from slimdit.distill.steps import transitions
from slimdit.models import adapter_for
from tests.test_compress import tiny
from tests.test_dmd import _batch, _tiny_steps_run
from tests.test_steps import V
from tests.test_trainer import _data


def test_the_heads_read_every_unit_by_default_and_only_units_of_the_teacher():
    teacher = tiny()
    adapter = adapter_for(teacher, V)
    assert check_units(adapter, teacher, None) == list(adapter.units(teacher))
    assert check_units(adapter, teacher, ["block.1"]) == ["block.1"]
    with pytest.raises(ValueError, match=r"disc_units \['block.99'\]: not units of the teacher \(block.0"):
        LADDLoss(adapter, teacher, *transitions(V, 2), units=["block.99"])


def test_the_heads_learn_to_tell_the_data_from_the_students_samples():
    teacher = tiny()
    adapter, data = adapter_for(teacher, V), _data()
    loss = LADDLoss(adapter, teacher, *transitions(V, 2), disc_lr=3e-3)
    with torch.no_grad():
        x0 = loss.generate(teacher, _batch(data, seed=3)) + 0.5  # samples visibly off the data
    first = [float(loss._disc_step(teacher, x0, _batch(data, seed=100 + i))) for i in range(3)]
    for i in range(60):
        loss._disc_step(teacher, x0, _batch(data, seed=i))
    last = [float(loss._disc_step(teacher, x0, _batch(data, seed=100 + i))) for i in range(3)]
    assert sum(first) > 5.4 and sum(last) < 0.6 * sum(first)  # from hinge 2 (no idea) towards 0


def test_a_non_finite_head_step_stops_before_it_is_applied():
    from slimdit.errors import TrainingDiverged

    teacher = tiny()
    adapter, data = adapter_for(teacher, V), _data()
    loss = LADDLoss(adapter, teacher, *transitions(V, 2))
    x0 = torch.zeros(4, *data.latents.shape[1:])
    loss._disc_step(teacher, x0, _batch(data, seed=4))  # one good step: the optimizer has state to protect
    before = {k: v.clone() for k, v in loss.state()[0].items()}
    x0[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="LADD discriminator diverged: its loss"):
        loss._disc_step(teacher, x0, _batch(data, seed=5))
    after = loss.state()[0]
    assert all(torch.equal(before[k], after[k]) for k in before)  # heads and optimizer state untouched


def test_the_heads_step_first_and_the_students_gradient_reaches_only_the_student():
    teacher = tiny().requires_grad_(False)  # as the trainer holds it
    student = copy.deepcopy(teacher).requires_grad_(True)
    adapter, data = adapter_for(student, V), _data()
    loss = LADDLoss(adapter, teacher, *transitions(V, 4), units=["block.0", "block.2"])
    out = loss(student, teacher, _batch(data))
    assert set(loss.heads) == {"block_0", "block_2"}
    # the update's head step ran before the student's loss: the heads left their seeded start
    fresh = LADDLoss(adapter, teacher, *transitions(V, 4), units=["block.0", "block.2"])
    fresh._build(loss._widths(), "cpu")
    assert not all(torch.equal(p, q) for p, q in zip(loss.heads.parameters(), fresh.heads.parameters()))
    loss.opt.zero_grad(set_to_none=True)  # the heads' own step left their gradients: clear them
    out["total"].backward()
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0
    assert all(p.grad is None and p.requires_grad for p in loss.heads.parameters())  # they train again next step


def _train(tmp_path, steps, max_steps=None):
    from slimdit.distill.trainer import TrainConfig, Trainer

    teacher = tiny()
    student = copy.deepcopy(teacher)
    adapter, data = adapter_for(student, V), _data()
    loss = LADDLoss(adapter, teacher, *transitions(V, 2), disc_lr=1e-3)
    cfg = TrainConfig(steps=steps, batch_size=4, warmup_steps=1, lr=1e-3, optimizer="adamw", grad_clip=1.0,
                      weight_decay=0.0, checkpoint_every=2, log_every=1, val_every=0, caption_dropout=0.0)
    tr = Trainer(adapter, teacher, student, data, cfg, tmp_path, loss=loss)
    tr.train(max_steps=max_steps, progress=False)
    return tr, loss


def test_a_resumed_ladd_run_ends_where_an_uninterrupted_one_ends(tmp_path):
    _train(tmp_path / "a", 4, max_steps=2)
    resumed, rl = _train(tmp_path / "a", 4)
    whole, wl = _train(tmp_path / "b", 4)
    for p, q in zip(resumed.student_model().parameters(), whole.student_model().parameters()):
        assert torch.equal(p, q)
    assert rl.opt.state_dict()["state"].keys() == wl.opt.state_dict()["state"].keys()
    assert all(torch.equal(p, q) for p, q in zip(rl.heads.parameters(), wl.heads.parameters()))
    assert not torch.equal(next(whole.student_model().parameters()), next(tiny().parameters()))  # it trained
    assert (tmp_path / "a" / "checkpoints" / "step_0000004" / "loss.safetensors").exists()


@pytest.mark.parametrize("which", ["pixart", "flux"])
def test_slimdit_steps_ladd_runs_end_to_end(which, tiny_teacher, tiny_flux_pipeline, tmp_path):
    from slimdit.pipelines.loading import load_sampler, sampling_defaults

    teacher = tiny_teacher if which == "pixart" else str(tiny_flux_pipeline)
    aware = {"mismatch_weight": 0.5} if which == "flux" else {}  # Flux's heads also take the wrong captions
    run = _tiny_steps_run(tmp_path, teacher, 0.0, method="ladd", **aware)
    rows = [json.loads(r) for r in (run / "rounds" / "00_2steps" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("adv" in r and "disc" in r for r in rows)
    # logged at every step, also where a batch held one caption twice (0 then; shapes-train:8 holds one twice)
    assert all(("mismatch" in r) == bool(aware) for r in rows)
    student = str(run / "student")
    assert sampling_defaults(student)["num_inference_steps"] == 2
    assert load_sampler(student).generate(["a red circle"], [0], progress=False).shape[0] == 1
    card = (run / "student" / "README.md").read_text()
    assert "latent adversarial diffusion distillation" in card and "- adversarial-distillation" in card


def test_a_refining_ladd_round_follows_the_halvings(tiny_teacher, tmp_path):
    from slimdit.models.storage import load_model

    run = _tiny_steps_run(tmp_path, tiny_teacher, 0.0, start=4, refine={"method": "ladd", "steps": 2, "lr": 1e-3},
                          disc_units=["block.1"])
    assert sorted(p.name for p in (run / "rounds").iterdir()) == ["00_2steps", "01_2steps_ladd"]
    done = json.loads((run / "rounds" / "01_2steps_ladd" / "done.json").read_text())
    assert (done["method"], done["steps"], done["train_steps"]) == ("ladd", 2, 2)
    final = load_model(run / "student" / "transformer")
    halved = load_model(run / "rounds" / "00_2steps" / "student" / "transformer")
    assert not all(torch.equal(p, q) for p, q in zip(final.parameters(), halved.parameters()))
    card = (run / "student" / "README.md").read_text()
    assert "A last round of latent adversarial distillation (LADD" in card and "| 1 | ladd | 2 | – | 2 |" in card


def test_a_ladd_run_plans_its_discriminator(tiny_teacher):
    """The plan of a LADD run (or refine) is a progressive run's plus the teacher's pass and the heads, whose count
    is the heads' own. (Refusing a run that cannot fit, before caching, is the DMD2 test's.)"""
    from slimdit.compress.plan import Plan
    from slimdit.distill.fewstep import StepsConfig
    from slimdit.distill.ladd import FeatureHead
    from slimdit.pipelines.loading import load_transformer
    from slimdit.speed.memory import config_memory_plan

    def items(**kw):
        cfg = StepsConfig(teacher=tiny_teacher, out="x", steps=2, start=4, **kw, train={"steps": 1, "batch_size": 2})
        return config_memory_plan(cfg, Plan(ops=[]), "cpu").items

    ladd, progressive, refine = items(method="ladd"), items(), items(refine={"method": "ladd"})
    disc = {"LADD teacher pass", "LADD heads"}
    assert disc <= set(ladd) and not disc & set(progressive) and refine == ladd
    assert {k: v for k, v in ladd.items() if k not in disc} == progressive and ladd["LADD teacher pass"] > 0
    model = load_transformer(tiny_teacher)
    units = adapter_for(model, V).units(model)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    assert ladd["LADD heads"] == 16 * len(units) * sum(p.numel() for p in FeatureHead(width).parameters())


def test_mismatched_captions_roll_by_one_and_a_repeated_caption_is_left_out():
    from slimdit.distill.ladd import mismatched

    emb = torch.tensor([[1.0], [2.0], [2.0], [3.0]])
    wrong, other = mismatched({"prompt_embeds": emb, "prompt_mask": torch.ones(4, 1)})
    assert wrong["prompt_embeds"].flatten().tolist() == [3.0, 1.0, 2.0, 2.0]
    assert other.tolist() == [True, True, False, True]  # row 2 got row 1's caption: its own


def test_matching_aware_heads_add_the_hinge_of_real_latents_under_the_next_rows_caption():
    from slimdit.distill.ladd import mismatched

    teacher = tiny()
    adapter, data = adapter_for(teacher, V), _data()
    plain = LADDLoss(adapter, teacher, *transitions(V, 2), disc_lr=3e-3)
    aware = LADDLoss(adapter, teacher, *transitions(V, 2), disc_lr=3e-3, mismatch_weight=0.5)
    with torch.no_grad():
        x0 = plain.generate(teacher, _batch(data, seed=3)) + 0.5
    # the same heads and draws: the matching-aware loss is LADD's plus half the wrong captions' hinge
    a = float(plain._disc_step(teacher, x0, _batch(data, seed=7)))
    b = float(aware._disc_step(teacher, x0, _batch(data, seed=7)))
    assert plain.mismatch is None and b == pytest.approx(a + 0.5 * float(aware.mismatch), rel=1e-6)
    # that term, by hand: the fresh heads on the real latents, noised at the step's time, under the rolled captions
    ref, batch = LADDLoss(adapter, teacher, *transitions(V, 2)), _batch(data, seed=7)
    with torch.no_grad():
        t = ref._t(x0, batch.generator)
        ref._logits(teacher, batch.x0, t, batch, graph=False)
        ref._logits(teacher, x0, t, batch, graph=False)
        draw = batch.generator.get_state()
        wrong = ref._logits(teacher, batch.x0, t, batch, graph=False, cond=mismatched(batch.cond)[0])
        batch.generator.set_state(draw)
        right = ref._logits(teacher, batch.x0, t, batch, graph=False)
    assert float(aware.mismatch) == pytest.approx(float(torch.relu(1 + wrong).mean()), rel=1e-6)
    assert not torch.allclose(wrong, right)  # the caption reaches the heads' features
