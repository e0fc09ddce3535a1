"""The distillation trainer on tiny real PixArt models: exact resume, and KD against the teacher."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from slimdit.compress.plan import Plan, apply_plan
from slimdit.distill.trainer import Conditioning, TrainConfig, Trainer, lr_scale
from slimdit.models import adapter_for
from tests.test_compress import tiny

# the scheduler config the tiny models distil under: PixArt's 1000-step linear-beta DDPM, epsilon
SCHED = {"_class_name": "DDPMScheduler", "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
         "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def _data(n: int = 16) -> Conditioning:
    g = torch.Generator().manual_seed(0)
    return Conditioning(latents=torch.randn(n, 4, 8, 8, generator=g),
                        cond={"prompt_embeds": torch.randn(n, 5, 12, generator=g), "prompt_mask": torch.ones(n, 5)},
                        null={"prompt_embeds": torch.zeros(1, 5, 12), "prompt_mask": torch.ones(1, 5)})


def _student():
    teacher = tiny()
    student = copy.deepcopy(teacher)
    rec = apply_plan(adapter_for(student), student,
                     Plan.from_dict({"units": {"block.1": "remove", "block.2": {"svd": 0.5}}}))
    return teacher, student, rec.kept_units


CFG = dict(steps=6, batch_size=4, warmup_steps=2, lr=1e-3, grad_clip=1.0, checkpoint_every=3, log_every=2,
           ema_decay=0.9)


def _validator(teacher):
    """Output MSE against the teacher on one fixed batch: deterministic, like the trajectory MSE."""
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([10, 900])
    cond = {"prompt_embeds": _data().cond["prompt_embeds"][:2], "prompt_mask": torch.ones(2, 5)}
    adapter = adapter_for(teacher)
    with torch.no_grad():
        ref = adapter.predict(teacher, x, t, cond)

    def validate(student):
        with torch.no_grad():
            return {"mse": (adapter.predict(student, x, t, cond) - ref).pow(2).mean().item()}

    return validate


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resumed_training_ends_bit_identical(tmp_path, schedule):
    cfg = TrainConfig(**CFG, lr_schedule=schedule, val_every=3)
    teacher, student, kept = _student()
    v = _validator(teacher)
    a = Trainer(adapter_for(student, SCHED), teacher, student, _data(), cfg, tmp_path / "a", kept, validate=v)
    a.train(progress=False)

    teacher, student, kept = _student()
    b = Trainer(adapter_for(student, SCHED), teacher, student, _data(), cfg, tmp_path / "b", kept, validate=v)
    b.train(max_steps=3, progress=False)  # interrupted after step 3
    teacher, student, kept = _student()
    c = Trainer(adapter_for(student, SCHED), teacher, student, _data(), cfg, tmp_path / "b", kept, validate=v)
    c.train(progress=False)
    assert c.step == a.step == 6
    for (n, p), (_, q) in zip(a.student_model().named_parameters(), c.student_model().named_parameters()):
        assert torch.equal(p, q), n
    for e, f in zip(a.ema, c.ema):
        assert torch.equal(e, f)
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 3, 4, 6, 6]  # losses every 2 steps, validation every 3
    val = {r["step"]: r["val_mse"] for r in lines if "val_mse" in r}
    resumed = {r["step"]: r["val_mse"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text()
                                                     .splitlines()) if "val_mse" in r}
    assert val == resumed and val[3] > 0  # validated on the EMA weights, identically after the resume


def test_training_lowers_the_kd_loss(tmp_path):
    teacher, student, kept = _student()
    cfg = TrainConfig(**{**CFG, "steps": 30, "kd": "standard", "caption_dropout": 0.0, "ema_decay": None,
                         "optimizer": "adamw", "checkpoint_every": 100})
    t = Trainer(adapter_for(student, SCHED), teacher, student, _data(), cfg, tmp_path, kept)
    first = t._micro_step(0, 0)["total"].item()
    t.train(progress=False)
    assert t._micro_step(0, 0)["total"].item() < first


def launch_two(script: str, out, port: int, *args: str, timeout: int = 300) -> None:
    """Run ``tests/SCRIPT OUT [ARGS]`` as 2 processes under ``accelerate launch`` (over gloo on a CPU); assert it
    succeeds."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    # --multi_gpu selects accelerate's torchrun launcher; without CUDA the trainer runs multi-CPU over gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(root / "tests" / script), str(out), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]


def test_accelerate_launch_two_processes_on_cpu(tmp_path, tiny_teacher):
    launch_two("ddp_train.py", tmp_path, 29533, tiny_teacher)
    digests = [(tmp_path / f"rank{i}_of2.txt").read_text() for i in range(2)]
    assert digests[0] == digests[1]  # DDP kept the replicas identical
    assert (tmp_path / "checkpoints" / "step_0000004").is_dir()
    # a NaN on one rank stops both at the same step, neither waiting for the other
    stops = [(tmp_path / f"nan_rank{i}.txt").read_text() for i in range(2)]
    assert stops == ["training diverged at step 1"] * 2
    flux = [(tmp_path / f"flux_rank{i}.txt").read_text() for i in range(2)]
    assert flux[0] == flux[1]  # a Flux student under DDP
    # the main process encoded the 8 captions and the null caption once; the other read the same rows from disk
    (n0, rows0), (n1, rows1) = ((tmp_path / f"cache_rank{i}.txt").read_text().split() for i in range(2))
    assert (n0, n1) == ("9", "0") and rows0 == rows1


def test_cosine_schedule_warms_up_then_falls_to_zero_and_constant_stays_flat():
    cos = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine")
    flat = TrainConfig(steps=100, warmup_steps=10)
    assert [lr_scale(cos, s) for s in range(10)] == [lr_scale(flat, s) for s in range(10)] == \
        [(s + 1) / 10 for s in range(10)]
    tail = [lr_scale(cos, s) for s in range(10, 100)]
    assert tail[0] == 1.0 and all(a > b for a, b in zip(tail, tail[1:])) and tail[-1] < 1e-3
    assert lr_scale(cos, 55) == pytest.approx(0.5)
    assert [lr_scale(flat, s) for s in range(10, 100)] == [1.0] * 90
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step").validate()
