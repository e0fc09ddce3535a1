"""What both shapes teacher recipes do around their forward pass: the learning rate, the optimizer step with
clipping, the EMA, the loss log, checkpoints and the hardware record, and the stop at ``steps`` or a deadline.
A resumed run drops the log rows written after its checkpoint, and each logged mean covers the steps it summed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slimdit.distill.lr import warmup_cosine
from slimdit.io import write_json
from slimdit.worlds.shapes.checkpoints import hardware, resume, save_checkpoint

LOG_EVERY = 25


class TeacherLoop:
    """Resume ``modules`` / ``ema`` / ``opt`` from ``run/checkpoints`` and account for each step's loss.

    ``cfg`` needs ``lr``, ``warmup``, ``steps``, ``anneal_start``, ``grad_clip``, ``ema_decay``, ``checkpoint_every``
    and ``keep_checkpoints``; optimizer groups may carry an ``lr_scale``."""

    def __init__(self, run: Path, cfg, modules: dict, ema: dict, opt, params: list, device: torch.device,
                 deadline: float | None, desc: str):
        self.run, self.cfg, self.modules, self.ema, self.opt, self.params = run, cfg, modules, ema, opt, params
        self.device, self.deadline = device, deadline
        self.step, self.elapsed = resume(run / "checkpoints", modules, ema, opt, device)
        _truncate_log(run / "metrics.jsonl", self.step)
        self.t_start, self.since, self.loss_sum = time.time(), self.step, torch.zeros(())
        self.bar = tqdm(total=cfg.steps, initial=self.step, desc=desc, unit="step", dynamic_ncols=True)
        self.log = (run / "metrics.jsonl").open("a")

    @property
    def running(self) -> bool:
        return self.step < self.cfg.steps

    def update(self, loss: torch.Tensor) -> bool:
        """Apply ``loss`` as step ``self.step``; return whether the run stops here (``steps`` or the deadline)."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * group.get("lr_scale", 1.0) * warmup_cosine(self.step, cfg.warmup, cfg.steps,
                                                                              cfg.anneal_start or None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for k, m in self.modules.items():
                for pe, p in zip(self.ema[k].parameters(), m.parameters()):
                    pe.lerp_(p, 1 - decay)
        self.step += 1
        self.loss_sum += loss.detach()
        self.bar.update(1)
        done = self.step == cfg.steps or (self.deadline is not None and time.time() > self.deadline)
        if self.step % LOG_EVERY == 0 or done:
            mean = (self.loss_sum / (self.step - self.since)).item()  # fewer steps in the first window of a resume
            self.loss_sum.zero_()
            self.since = self.step
            self.bar.set_postfix(loss=f"{mean:.4f}")
            self.log.write(json.dumps({"step": self.step, "loss": mean, "elapsed_s": self._elapsed()}) + "\n")
            self.log.flush()
        if self.step % cfg.checkpoint_every == 0 or done:
            save_checkpoint(self.run / "checkpoints", self.step, self.modules, self.ema, self.opt, self._elapsed(),
                            cfg.keep_checkpoints)
            write_json(self.run / "hardware.json", {**hardware(self.device), "steps": self.step,
                                                    "elapsed_s": self._elapsed()})
        return done

    def _elapsed(self) -> float:
        return self.elapsed + time.time() - self.t_start

    def close(self) -> None:
        self.bar.close()
        self.log.close()


def _truncate_log(log: Path, step: int) -> None:
    """Drop log rows after ``step`` (and a line torn by a kill): the resumed run logs them again."""
    if not log.exists():
        return
    rows = [r for r in log.read_text().splitlines() if r.strip()]
    keep = []
    for r in rows:
        try:
            if json.loads(r)["step"] <= step:
                keep.append(r)
        except (json.JSONDecodeError, KeyError):
            continue
    if len(keep) != len(rows):
        log.write_text("".join(r + "\n" for r in keep))
