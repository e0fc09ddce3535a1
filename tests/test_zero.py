"""DeepSpeed ZeRO (slimdit.distill.zero): two processes over gloo train what one process trains, and resume
exactly. Needs ``pip install 'slimdit[deepspeed]'``; the first run on a machine compiles DeepSpeed's shared-memory
communication op (about 80 s on one core), hence slow."""

from __future__ import annotations

import pytest
import torch

from slimdit.distill.trainer import TrainConfig
from slimdit.io import load_tensors
from tests.test_sharding import FSDP_CFG, TOL, _close, _losses, _single, pixart_case
from tests.test_trainer import launch_two


def test_zero_config_is_checked():
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ValueError, match=r"needs DeepSpeed, which is not installed: pip install"):
            TrainConfig(sharding="zero2", optimizer="adamw").validate()
        return
    with pytest.raises(ValueError, match="adamw"):
        TrainConfig(sharding="zero2").validate()  # the default optimizer is CAME
    with pytest.raises(ValueError, match="max_skipped_steps"):
        TrainConfig(sharding="zero2", optimizer="adamw", max_skipped_steps=1).validate()
    with pytest.raises(ValueError, match="zero3 partitions the weights"):
        TrainConfig(sharding="zero3", optimizer="adamw", ema_decay=0.99).validate()
    with pytest.raises(ValueError, match="offload_optimizer needs"):
        TrainConfig(offload_optimizer=True, optimizer="adamw").validate()
    TrainConfig(sharding="zero3", optimizer="adamw", offload_optimizer=True).validate()


@pytest.mark.slow
def test_zero_over_two_processes_matches_one_process_and_resumes_exactly(tmp_path):
    pytest.importorskip("deepspeed")
    launch_two("zero_train.py", tmp_path, 29551, timeout=900)
    assert (tmp_path / "straight.engine").read_text() == "DeepSpeedEngine"
    straight = load_tensors(tmp_path / "straight.safetensors")
    # an interrupted ZeRO-2 run resumes bit-identically (DeepSpeed's optimizer partitions, slimdit's EMA)
    resumed = load_tensors(tmp_path / "resumed.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    assert (tmp_path / "straight" / "checkpoints" / "step_0000004" / "deepspeed").is_dir()
    # one process, the same global batches (grad_accum 2): the same losses and weights, up to rounding
    _, single = _single(pixart_case, tmp_path / "one")
    assert _close(straight, single) < TOL
    assert _losses(tmp_path / "straight") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    # the optimizer offloaded to the host steps the same AdamW
    assert _close(load_tensors(tmp_path / "offload.safetensors"), single) < TOL
    # ZeRO-3 partitions the weights as well; gathered, they are the same
    zero3 = load_tensors(tmp_path / "zero3.safetensors")
    assert _close(zero3, {k: v for k, v in single.items() if not k.startswith("ema.")}) < TOL
    assert FSDP_CFG["steps"] == 4


def test_the_memory_plan_divides_what_each_zero_stage_partitions(tiny_teacher, monkeypatch):
    from slimdit.compress.plan import Plan
    from slimdit.speed import memory
    from slimdit.speed.memory import memory_plan

    monkeypatch.setattr(memory, "activation_bytes", lambda *a, **k: 1)  # traced elsewhere; here only the division

    plan = Plan.from_dict({"units": {"block.1": "remove"}})
    kw = dict(optimizer="adamw", both=False, offload_text=True)
    whole = memory_plan(tiny_teacher, plan, 2, **kw).items
    z2 = memory_plan(tiny_teacher, plan, 2, processes=4, sharding="zero2", **kw)
    z3 = memory_plan(tiny_teacher, plan, 2, processes=4, sharding="zero3", **kw).items
    off = memory_plan(tiny_teacher, plan, 2, processes=4, sharding="zero3", offload_optimizer=True, **kw)
    assert z2.items["teacher"] == z3["teacher"] == whole["teacher"]  # the frozen teacher is not DeepSpeed's
    assert z2.items["student weights"] == whole["student weights"]  # ZeRO-2 keeps whole weights
    assert z3["student weights"] == whole["student weights"] // 4
    assert z2.items["optimizer states"] == whole["optimizer states"] // 4
    assert z2.items["fp32 weight partition (ZeRO)"] == whole["student weights"] // 4  # fp32 student
    assert "gathered units (ZeRO-3)" in z3 and "gathered units (ZeRO-3)" not in z2.items
    assert off.items["optimizer states"] == 0 and "fp32 weight partition (ZeRO)" not in off.items
    assert off.host["optimizer states and fp32 weights (ZeRO offload)"] == (
        z3["optimizer states"] + z3["fp32 weight partition (ZeRO)"])
    assert "DeepSpeed ZeRO-2" in z2.table()


def test_zero_over_one_process_is_a_plain_run_that_resumes(tmp_path):
    """Over one process ZeRO partitions nothing: the trainer runs plain and its checkpoints resume as plain."""
    pytest.importorskip("deepspeed")
    from slimdit.distill.trainer import Trainer
    from slimdit.models import adapter_for

    def run(max_steps=None):
        teacher, student, kept, data, sched = pixart_case()
        t = Trainer(adapter_for(student, sched), teacher, student, data,
                    TrainConfig(**{**FSDP_CFG, "sharding": "zero2"}), tmp_path, kept)
        t.train(max_steps=max_steps, progress=False)
        return t

    run(max_steps=2)
    assert run().step == FSDP_CFG["steps"]
