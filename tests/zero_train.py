"""Run by test_zero under ``accelerate launch --num_processes 2``: train a tiny student with DeepSpeed ZeRO-2
(straight, and interrupted then resumed; with the optimizer offloaded) and ZeRO-3; rank 0 saves the whole weights
each ended with."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimdit.distill.trainer import TrainConfig, Trainer  # noqa: E402
from slimdit.io import save_tensors  # noqa: E402
from slimdit.models import adapter_for  # noqa: E402
from tests.test_sharding import FSDP_CFG, pixart_case  # noqa: E402

out = Path(sys.argv[1])


def run(name: str, max_steps: int | None = None, **kw) -> Trainer:
    teacher, student, kept, data, sched = pixart_case()
    cfg = TrainConfig(**{**FSDP_CFG, "sharding": "zero2", **kw})
    t = Trainer(adapter_for(student, sched), teacher, student, data, cfg, out / name, kept)
    t.train(max_steps=max_steps, progress=False)
    return t


def record(t: Trainer, name: str) -> None:
    weights = dict(t.student_model().named_parameters())  # gathered on every process under ZeRO-3
    ema = dict(t.student_model(use_ema=True).named_parameters()) if t.ema is not None else {}
    if t.acc.is_main_process:
        save_tensors(out / f"{name}.safetensors", {**weights, **{"ema." + k: v for k, v in ema.items()}})
        (out / f"{name}.engine").write_text(type(t.student).__name__)


record(run("straight"), "straight")
run("resumed", max_steps=2)  # interrupted after step 2
record(run("resumed"), "resumed")
record(run("offload", offload_optimizer=True), "offload")
record(run("zero3", sharding="zero3", ema_decay=None), "zero3")
