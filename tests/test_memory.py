"""The memory plan: exact weight and optimizer bytes from configs, traced activations, checked against measured
peaks; gradient checkpointing changes memory, not gradients; a run that cannot fit is refused before it loads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from slimdit.cli import main
from slimdit.compress.plan import Plan
from slimdit.speed.memory import measure_step_peak, memory_plan, optimizer_bytes


@pytest.mark.parametrize("checkpointing", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_the_plan_is_within_20_percent_of_the_measured_peak(tiny_teacher, checkpointing):
    plan = Plan.from_dict({"units": {"block.1": "remove", "block.2": {"svd": 0.5}}})
    measured = measure_step_peak(tiny_teacher, plan, 16, checkpointing=checkpointing)
    mp = memory_plan(tiny_teacher, plan, 16, checkpointing=checkpointing, offload_text=True, both=False)
    assert abs(mp.per_device / measured - 1) < 0.2, (mp.per_device, measured)


def test_weights_and_optimizer_states_are_counted_exactly():
    from slimdit.models.arch import component_params

    plan = Plan.from_dict({"units": {"block.0": "remove", "block.1": {"svd": {"mlp": {"rank": 512}}}}})
    mp = memory_plan("arch:pixart-sigma-xl", plan, 1, resolution=128, offload_text=True, both=False,
                     optimizer="adamw")
    teacher = component_params("arch:pixart-sigma-xl")["transformer"]
    block = 21_255_552  # one PixArt-Sigma-XL block (1152 wide, MLP 4608)
    mlp = 2 * 1152 * 4608  # the MLP's two weight matrices, factored at rank 512
    student = teacher - block - mlp + 512 * (1152 + 4608) * 2
    assert mp.params["student"] == student and mp.items["student weights"] == 4 * student
    assert mp.items["optimizer states"] == 8 * student  # AdamW: two fp32 moments
    assert mp.items["teacher"] == 4 * teacher
    assert optimizer_bytes([(4, 6), (6,)], "came") == 4 * (24 + 8 + 12) + 8 * 6
    half = memory_plan("arch:pixart-sigma-xl", plan, 1, resolution=128, offload_text=True, both=False,
                       optimizer="adamw", frozen_dtype="bf16", student_dtype="bf16")
    assert half.items["teacher"] == 2 * teacher and half.items["student weights"] == 2 * student
    assert half.items["optimizer states"] == 4 * student  # AdamW's moments in bf16, as torch keeps them


def test_gradient_checkpointing_changes_memory_not_the_training(tmp_path):
    from slimdit.distill.trainer import TrainConfig, Trainer
    from slimdit.models import adapter_for
    from tests.test_trainer import SCHED, _data, _student

    def run(d, ck):
        t, s, kept = _student()
        cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=1, lr=1e-3, optimizer="adamw", checkpoint_every=10,
                          log_every=1, val_every=0, gradient_checkpointing=ck)
        tr = Trainer(adapter_for(s, SCHED), t, s, _data(), cfg, d, kept)
        tr.train(progress=False)
        return tr.student_model()

    a, b = run(tmp_path / "a", False), run(tmp_path / "b", True)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


@pytest.mark.slow  # three memory plans traced at PixArt-Sigma-XL's real size
def test_dry_run_json_and_a_run_that_cannot_fit_is_refused_before_loading(tiny_teacher, tmp_path, capsys):
    cfg = {"teacher": "arch:pixart-sigma-xl", "plan": {"units": {"block.0": "remove"}}, "out": str(tmp_path / "x"),
           "train": {"batch_size": 1}, "data": {"image_size": 128, "max_sequence_length": 32}}  # small traces
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(tmp_path / "f.yaml"), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    mem = out["memory"]
    assert mem["fits"] == (mem["per_device_gib"] <= mem["device_gib"])
    assert out["params"]["text_encoder"] == 4_762_310_656 and out["activations"]["checkpointed"] > 0
    assert "text encoders and VAE" not in out["items"]  # distill parks them in host memory after caching
    assert not (tmp_path / "x").exists()

    # sharded over 4 processes: the models and optimizer states divide by 4, and two gathered units are added
    sharded = ["--set", "train.sharding=fsdp", "--set", "train.optimizer=adamw", "--set", "train.batch_size=4"]
    plans = []
    for extra in (["--set", "train.sharding=none"], ["--processes", "4"]):
        assert main(["distill", "--config", str(tmp_path / "f.yaml"), "--dry-run", "--json", *sharded, *extra]) == 0
        plans.append(json.loads(capsys.readouterr().out))
    whole, quarter = (q["items"] for q in plans)
    assert plans[1]["processes"] == 4 and plans[1]["batch_size"] == 1  # the batch of 4 split over 4 processes
    for k in ("teacher", "student weights", "optimizer states"):
        assert quarter[k] == whole[k] // 4, k
    # the largest unit twice (running and prefetched): fp32 teacher, student and gradient
    assert quarter["gathered units (FSDP)"] == 2 * 21_255_552 * 12
    assert "gathered units (FSDP)" not in whole

    cfg = {"teacher": tiny_teacher, "plan": {"units": {"block.1": "remove"}}, "out": str(tmp_path / "big"),
           "memory_plan": "on", "data": {"real": "shapes-train:8"},
           "train": {"batch_size": 2**22, "steps": 1}}  # four million images a step
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(tmp_path / "b.yaml")]) == 2
    err = capsys.readouterr().err
    assert "GiB per device" in err and "train.gradient_checkpointing: true" in err
    assert not (tmp_path / "big" / "phases").exists() and not (tmp_path / "big" / "cache").exists()


@pytest.mark.slow  # the fp32 plan is checked against a measured peak in the default suite
def test_a_measured_step_with_a_bf16_teacher_has_time_flops_and_the_planned_peak(tiny_teacher):
    from slimdit.speed.step import measure_step

    plan = Plan.from_dict({"units": {"block.1": "remove", "block.2": {"svd": 0.5}}})
    kw = dict(optimizer="adamw", frozen_dtype="bf16", mixed_precision="bf16")
    r = measure_step(tiny_teacher, plan, 16, steps=2, **kw)
    assert r.step_s > 0 and r.flops_per_step > 0 and r.mfu is None  # no known peak for a CPU
    mp = memory_plan(tiny_teacher, plan, 16, offload_text=True, both=False, **kw)
    assert abs(mp.per_device / r.peak_bytes - 1) < 0.2, (mp.per_device, r.peak_bytes)
