"""FSDP sharding by units (slimdit.distill.sharding): two processes over gloo train what one process trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimdit.distill.trainer import TrainConfig, Trainer
from slimdit.io import load_tensors
from slimdit.models import adapter_for
from tests.test_flux import FLOW, flux_data, tiny_flux
from tests.test_trainer import SCHED, _data, _student, launch_two

# adamw (CAME does not run on shards); batch 4 as 2 micro-batches of 2: two processes, or one with grad_accum 2
FSDP_CFG = dict(steps=4, batch_size=4, warmup_steps=2, lr=1e-3, grad_clip=1.0, checkpoint_every=2, log_every=1,
                ema_decay=0.9, optimizer="adamw")
# what sharding changes is the order of the sums in the gradients' reduction; measured: losses agree to 2e-7
# and weights to 1e-5 of each tensor's largest entry (small weights with small gradients differ most)
TOL = 1e-4


def _noise_only(name: str) -> bool:
    """Attention key biases: their true gradient is zero (softmax ignores a constant added to every score of a
    query), so what they get is rounding noise, which Adam turns into steps of up to lr each way."""
    return name.endswith(("to_k.bias", "to_k.up.bias", "add_k_proj.bias", "add_k_proj.up.bias"))


def pixart_case():
    teacher, student, kept = _student()
    return teacher, student, kept, _data(), SCHED


def flux_case():
    return tiny_flux(2, 2), tiny_flux(2, 2), None, flux_data(4), FLOW


def _single(case, out: Path) -> tuple[Trainer, dict]:
    teacher, student, kept, data, sched = case()
    t = Trainer(adapter_for(student, sched), teacher, student, data, TrainConfig(**{**FSDP_CFG, "grad_accum": 2}),
                out, kept)
    t.train(progress=False)
    weights = dict(t.student_model().named_parameters())
    ema = dict(t.student_model(use_ema=True).named_parameters())
    return t, {**weights, **{"ema." + k: v for k, v in ema.items()}}


def _losses(run: Path) -> list[float]:
    return [json.loads(r)["total"] for r in (run / "metrics.jsonl").read_text().splitlines()]


def _close(a: dict, b: dict) -> float:
    """The largest relative difference of two sets of weights; noise-only ones may differ by 2 lr per step."""
    assert set(a) == set(b)
    bound = 2 * FSDP_CFG["lr"] * FSDP_CFG["steps"]
    assert all((a[k] - b[k]).abs().max() <= bound for k in a if _noise_only(k))
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item()
               for k in a if not _noise_only(k))


def test_sharding_config_is_checked():
    with pytest.raises(ValueError, match="adamw"):
        TrainConfig(sharding="fsdp").validate()  # the default optimizer is CAME
    with pytest.raises(ValueError, match="sharding"):
        TrainConfig(sharding="zero1", optimizer="adamw").validate()
    with pytest.raises(ValueError, match="fp16"):
        TrainConfig(sharding="fsdp", optimizer="adamw", mixed_precision="fp16").validate()


@pytest.mark.slow  # two launched processes plus single-process references for PixArt and Flux (about 15 s): with
# --runslow, beside the sharded end-to-end run, so the default suite stays within its 5 minutes on 2 cores
def test_fsdp_over_two_processes_matches_one_process(tmp_path):
    launch_two("fsdp_train.py", tmp_path, 29541, timeout=600)
    assert (tmp_path / "straight.sharded").read_text() == "DTensor"  # the parameters were sharded
    straight = load_tensors(tmp_path / "straight.safetensors")

    # a resumed sharded run ends exactly where the uninterrupted one ends
    resumed = load_tensors(tmp_path / "resumed.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")

    # one process, the same global batches: the same losses and weights, up to the reduction's rounding
    one, single = _single(pixart_case, tmp_path / "one")
    assert _close(straight, single) < TOL
    assert _losses(tmp_path / "straight") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    start = dict(_student()[1].named_parameters())  # and training moved them
    assert max((single[k] - start[k]).abs().max().item() for k in start) > 1e-4

    # Flux: double and single blocks sharded, each its own group
    _, flux_single = _single(flux_case, tmp_path / "flux_one")
    assert _close(load_tensors(tmp_path / "flux.safetensors"), flux_single) < TOL
    assert _losses(tmp_path / "flux") == pytest.approx(_losses(tmp_path / "flux_one"), rel=1e-5)


@pytest.mark.slow
def test_a_sharded_distill_runs_end_to_end_on_two_processes(tiny_teacher, tmp_path):
    import yaml

    from slimdit.models.storage import load_model

    cfg = {"teacher": tiny_teacher, "out": str(tmp_path / "run"),
           "plan": {"units": {"block.1": "remove", "block.2": {"svd": {"self_attn": {"rank": 3}}}}},
           "protocol": [{"name": "pre", "trainable": ["preceding"], "dataset": "real", "fraction": 0.5},
                        {"name": "all", "trainable": ["all"], "dataset": "synth", "fraction": 0.5}],
           "data": {"real": "shapes-train:8", "synth_images": 4},
           "train": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "lr": 1e-4, "val_every": 2, "ema_decay": 0.9,
                     "optimizer": "adamw", "sharding": "fsdp"},
           "eval": {"benchmark": None, "bench": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the README's launch line, with the shipped accelerate config (2 processes, fp32 on CPU)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "configs" / "accelerate" / "multi-gpu.yaml"), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", "29543", "-m", "slimdit.cli", "distill", "--config", str(tmp_path / "c.yaml")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    assert [json.loads(x)["phase"] for x in (run / "metrics.jsonl").read_text().splitlines()] == ["pre", "all"]
    assert any("val_traj_mse" in x for x in (run / "phases" / "01_all" / "metrics.jsonl").read_text().splitlines())
    student = load_model(run / "student" / "transformer")
    assert len(student.transformer_blocks) == 3  # block.1 removed; whole weights, not shards
