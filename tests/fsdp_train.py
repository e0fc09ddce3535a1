"""Run by test_sharding under ``accelerate launch --num_processes 2``: train a tiny student with FSDP sharding
(straight, and interrupted then resumed), and a Flux one; rank 0 saves the whole weights each ended with."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimdit.distill.trainer import TrainConfig, Trainer  # noqa: E402
from slimdit.io import save_tensors  # noqa: E402
from slimdit.models import adapter_for  # noqa: E402
from tests.test_sharding import FSDP_CFG, flux_case, pixart_case  # noqa: E402

out = Path(sys.argv[1])


def run(case, name: str, max_steps: int | None = None) -> Trainer:
    teacher, student, kept, data, sched = case()
    cfg = TrainConfig(**{**FSDP_CFG, "sharding": "fsdp"})
    t = Trainer(adapter_for(student, sched), teacher, student, data, cfg, out / name, kept)
    t.train(max_steps=max_steps, progress=False)
    return t


def record(t: Trainer, name: str) -> None:
    weights = dict(t.student_model().named_parameters())  # gathered on every process
    ema = dict(t.student_model(use_ema=True).named_parameters())
    if t.acc.is_main_process:
        save_tensors(out / f"{name}.safetensors", {**weights, **{"ema." + k: v for k, v in ema.items()}})
        (out / f"{name}.sharded").write_text(str(type(t.params[0]).__name__))


record(run(pixart_case, "straight"), "straight")
run(pixart_case, "resumed", max_steps=2)  # interrupted after step 2
record(run(pixart_case, "resumed"), "resumed")
record(run(flux_case, "flux"), "flux")
