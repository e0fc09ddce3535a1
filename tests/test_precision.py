"""Precision: a bf16 teacher beside an fp32 or bf16 student, through the real KD loss, trainer and distill run."""

from __future__ import annotations

import torch

from slimdit.distill.losses import Batch, KDLoss
from slimdit.distill.trainer import TrainConfig, Trainer
from slimdit.models import adapter_for
from slimdit.models.precision import cast_io, student_copy
from tests.test_compress import tiny
from tests.test_flux import FLOW, flux_data, tiny_flux
from tests.test_trainer import SCHED, _data


def _kd(adapter, student, teacher, data, preset="normalized_hybrid"):
    units = adapter.units(teacher)
    loss = KDLoss(adapter, preset, tuple(zip(units, units)))
    g = torch.Generator().manual_seed(3)
    return loss(student, teacher, Batch(data.latents[:4], {k: v[:4] for k, v in data.cond.items()}, g))


def test_a_bf16_copy_of_a_bf16_teacher_has_zero_kd_loss_and_an_fp32_copy_nearly():
    for teacher, sched, data in ((tiny(), SCHED, _data()), (tiny_flux(2, 2), FLOW, flux_data(4))):
        teacher = cast_io(teacher.to(torch.bfloat16))
        adapter = adapter_for(teacher, sched)
        same = _kd(adapter, student_copy(teacher, "bf16"), teacher, data)  # fp32 cached inputs, cast on the way in
        assert same["out"] == 0 and same["feat"] == 0 and same["total"].dtype == torch.float32
        wider = _kd(adapter, student_copy(teacher, "fp32"), teacher, data, "standard")  # unnormalised MSE
        # the same weights computed in fp32: bf16's rounding (about 1e-2 of each output) is all that differs
        assert 0 < wider["out"] < 1e-3 * _kd(adapter, teacher, teacher, data, "standard")["task"].item() + 1e-3
        assert next(student_copy(teacher, "fp32").parameters()).dtype == torch.float32


def test_a_bf16_student_trains_with_fp32_ema_and_resumes_exactly(tmp_path):
    def run(d, max_steps=None):
        teacher = cast_io(tiny().to(torch.bfloat16))
        student = student_copy(teacher, "bf16")
        cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=1, lr=1e-3, optimizer="adamw", checkpoint_every=2,
                          log_every=1, val_every=0, ema_decay=0.9, student_dtype="bf16", frozen_dtype="bf16")
        t = Trainer(adapter_for(student, SCHED), teacher, student, _data(), cfg, d)
        t.train(max_steps=max_steps, progress=False)
        return t

    a = run(tmp_path / "a")
    assert {p.dtype for p in a.params} == {torch.bfloat16} and {e.dtype for e in a.ema} == {torch.float32}
    state = a.opt.state[a.params[0]]
    assert state["exp_avg"].dtype == torch.bfloat16  # torch's AdamW keeps its states in the weights' dtype
    start = dict(student_copy(cast_io(tiny().to(torch.bfloat16)), "bf16").named_parameters())
    moved = dict(a.student_model().named_parameters())
    assert any(not torch.equal(moved[k], start[k]) for k in start)  # bf16 steps are not swallowed
    run(tmp_path / "b", max_steps=2)
    b = run(tmp_path / "b")
    for p, q in zip(a.params, b.params):
        assert torch.equal(p, q)
    for e, f in zip(a.ema, b.ema):
        assert torch.equal(e, f)


def test_distill_with_bf16_frozen_parts(tiny_teacher, tmp_path):
    from slimdit.distill.run import run_distill
    from slimdit.io import read_json
    from slimdit.models.storage import load_model

    cfg = {"teacher": tiny_teacher, "out": str(tmp_path / "run"),
           "plan": {"units": {"block.1": "remove", "block.2": {"svd": {"self_attn": {"rank": 3}}}}},
           "protocol": [{"name": "all", "trainable": ["all"], "dataset": "real", "fraction": 1.0}],
           "data": {"real": "shapes-train:8"},
           "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "lr": 1e-4, "val_every": 1,
                     "frozen_dtype": "bf16"},
           "eval": {"benchmark": None, "bench": True}}
    run = run_distill(cfg, progress=False)
    val = [r for r in (run / "phases" / "00_all" / "metrics.jsonl").read_text().splitlines() if "val_traj" in r]
    assert len(val) == 2  # the fp32 student validated on the bf16 teacher's trajectories
    assert next(load_model(run / "student" / "transformer").parameters()).dtype == torch.float32
    assert read_json(run / "bench.json")["param_ratio"] < 1
