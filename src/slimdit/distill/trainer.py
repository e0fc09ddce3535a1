"""The distillation trainer on HF accelerate: a student learns from a frozen teacher on cached conditioning.

Every random draw of step s (batch indices, caption dropout, noise, timesteps) is seeded by (seed, s,
process), so a run resumed from a checkpoint ends bit-identical to an uninterrupted one without saving RNG
states. Checkpoints are safetensors plus JSON, written atomically every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from slimdit.distill.feature_map import feature_map
from slimdit.distill.losses import PRESETS, kd_loss, per_sample_mse
from slimdit.distill.lr import warmup_cosine
from slimdit.distill.objectives import OBJECTIVES
from slimdit.io import load_tensors, optimizer_from_tensors, optimizer_to_tensors, read_json, save_tensors, write_json
from slimdit.models.base import Adapter


@dataclass
class TrainConfig:
    """Defaults are the thesis' for PixArt-Sigma (table 5.1)."""

    steps: int = 1000
    optimizer: str = "came"  # came | adamw
    lr: float = 2e-5
    weight_decay: float = 0.03
    betas: tuple[float, ...] = (0.9, 0.999, 0.9999)
    eps: tuple[float, ...] = (1e-30, 1e-16)
    warmup_steps: int = 1000
    lr_schedule: str = "constant"  # constant | cosine (to 0 at ``steps``)
    batch_size: int = 16  # per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    grad_clip: float = 0.001
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    caption_dropout: float = 0.1
    ema_decay: float | None = None
    kd: str = "normalized_hybrid"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    val_every: int = 50  # steps between validations, when the trainer is given a ``validate`` function; 0: never
    val_prompts: int = 8  # how many prompts the run records trajectories for (read by the run, not the trainer)
    seed: int = 0

    def validate(self) -> None:
        if self.optimizer not in ("came", "adamw"):
            raise ValueError(f"train.optimizer: {self.optimizer!r} is not one of came, adamw")
        if self.kd not in PRESETS:
            raise ValueError(f"train.kd: {self.kd!r} is not one of {', '.join(PRESETS)}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"train.lr_schedule: {self.lr_schedule!r} is not one of constant, cosine")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision: {self.mixed_precision!r} is not one of auto, no, bf16, fp16")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "val_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.val_every < 0:
            raise ValueError(f"train.val_every must be 0 (off) or more, got {self.val_every}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"train.caption_dropout must be in [0, 1), got {self.caption_dropout}")


@dataclass
class Conditioning:
    """Cached training inputs: clean latents, text-encoder outputs and the empty caption's (for dropout)."""

    latents: torch.Tensor  # (N, C, H, W)
    prompt_embeds: torch.Tensor  # (N, L, D)
    prompt_mask: torch.Tensor  # (N, L)
    null_embeds: torch.Tensor  # (1, L, D)
    null_mask: torch.Tensor  # (1, L)
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.latents.shape[0]


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "came":
        from came_pytorch import CAME

        return CAME(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=tuple(cfg.eps))
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas[:2]))


def lr_scale(cfg: TrainConfig, step: int) -> float:
    """The learning rate of ``step`` relative to ``cfg.lr``: linear warm-up, then constant or a cosine to 0."""
    return warmup_cosine(step, cfg.warmup_steps, cfg.steps,
                         cfg.warmup_steps if cfg.lr_schedule == "cosine" else None)


def _checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


class Trainer:
    """Train ``student`` to match ``teacher`` under ``cfg``; resume from the last checkpoint in ``run_dir``.

    ``validate(student) -> {name: value}``, if given, runs every ``cfg.val_every`` steps and at the end (on the EMA
    weights when EMA is on); its values go to ``metrics.jsonl`` as ``val_<name>``. It must not draw random numbers
    from the global generator, so that a resumed run stays bit-identical.
    """

    def __init__(self, adapter: Adapter, teacher: nn.Module, student: nn.Module, data: Conditioning,
                 cfg: TrainConfig, run_dir: str | Path, kept_units: list[str] | None = None,
                 trainable: list[str] | None = None, validate=None):
        from accelerate import Accelerator

        cfg.validate()
        self.cfg, self.adapter, self.data = cfg, adapter, data
        self.run = Path(run_dir)
        # cpu=True on CPU-only machines: with it, a torchrun-launched run becomes multi-process (gloo)
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_mixed_precision(cfg.mixed_precision),
                               gradient_accumulation_steps=cfg.grad_accum, log_with="tensorboard",
                               project_dir=str(self.run))
        n = self.acc.num_processes * cfg.grad_accum
        if cfg.batch_size % n:
            raise ValueError(f"train.batch_size {cfg.batch_size} is not divisible by processes x grad_accum = {n}")
        self.micro = cfg.batch_size // n
        self.objective = OBJECTIVES[adapter.objective]()
        teacher_units = adapter.units(teacher)
        self.pairs = feature_map(teacher_units, kept_units or teacher_units)
        self.teacher = teacher.requires_grad_(False).eval().to(self.acc.device)
        student.requires_grad_(False)
        self.trainable = trainable
        units = trainable if trainable is not None else None
        params = ([p for u in units for p in adapter.unit(student, u).parameters()] if units is not None
                  else list(student.parameters()))
        for p in params:
            p.requires_grad_(True)
        self.names = [n for n, p in student.named_parameters() if p.requires_grad]
        self.opt = _optimizer(cfg, params)
        self.student, self.opt = self.acc.prepare(student.train(), self.opt)
        self.ema = ([p.detach().clone() for p in params] if cfg.ema_decay else None)
        self.params = params
        self.validate = validate
        self.step = 0

    # ---- state ------------------------------------------------------------------------------------------
    def _lr_scale(self, step: int) -> float:
        return lr_scale(self.cfg, step)

    def save(self) -> Path:
        if not self.acc.is_main_process:
            return self.run
        ck = self.run / "checkpoints" / f"step_{self.step:07d}"
        tmp = ck.with_name(ck.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_tensors(tmp / "trainable.safetensors", dict(zip(self.names, self.params)))
        if self.ema is not None:
            save_tensors(tmp / "ema.safetensors", dict(zip(self.names, self.ema)))
        opt_t, opt_meta = optimizer_to_tensors(getattr(self.opt, "optimizer", self.opt))
        save_tensors(tmp / "optimizer.safetensors", opt_t)
        write_json(tmp / "state.json", {"step": self.step, "optimizer": opt_meta, "config": asdict(self.cfg)})
        shutil.rmtree(ck, ignore_errors=True)
        tmp.rename(ck)
        for old in _checkpoints(self.run)[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old)
        return ck

    def resume(self) -> bool:
        cks = _checkpoints(self.run)
        if not cks:
            return False
        ck = cks[-1]
        state = read_json(ck / "state.json")
        saved = load_tensors(ck / "trainable.safetensors")
        if set(saved) != set(self.names):  # safetensors stores keys sorted
            raise ValueError(f"checkpoint {ck} trains other parameters than this run; use a new run directory")
        with torch.no_grad():
            for p, n in zip(self.params, self.names):
                p.copy_(saved[n])
            if self.ema is not None:
                ema = load_tensors(ck / "ema.safetensors")
                for e, n in zip(self.ema, self.names):
                    e.copy_(ema[n])
        inner = getattr(self.opt, "optimizer", self.opt)
        optimizer_from_tensors(inner, load_tensors(ck / "optimizer.safetensors"), state["optimizer"])
        self.step = state["step"]
        return True

    # ---- one step ---------------------------------------------------------------------------------------
    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, dict, torch.Generator]:
        cfg, d = self.cfg, self.data
        g = torch.Generator().manual_seed(hash((cfg.seed, step, micro, self.acc.process_index)) & (2**62 - 1))
        idx = torch.randint(0, len(d), (self.micro,), generator=g)
        drop = torch.rand(self.micro, generator=g) < cfg.caption_dropout
        emb = torch.where(drop[:, None, None], d.null_embeds, d.prompt_embeds[idx])
        mask = torch.where(drop[:, None], d.null_mask, d.prompt_mask[idx])
        dev = self.acc.device
        return d.latents[idx].to(dev), {"prompt_embeds": emb.to(dev), "prompt_mask": mask.to(dev)}, g

    def _micro_step(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        x0, cond, g = self._batch(step, micro)
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        t = self.objective.sample_t(x0.shape[0], g).to(x0.device)
        xt, target = self.objective.noise(x0, eps, t)
        a, student = self.adapter, self.acc.unwrap_model(self.student)
        t_units = [tu for _, tu in self.pairs]
        s_units = [su for su, _ in self.pairs]
        with torch.no_grad(), a.capture(self.teacher, t_units) as tf:
            t_out = a.predict(self.teacher, xt, t, cond)
        with self.acc.autocast(), a.capture(student, s_units) as sf:
            s_out = a.predict(self.student, xt, t, cond)
        task_i = per_sample_mse(a.prediction(student, s_out), target)
        return kd_loss(self.cfg.kd, task_i, t_out, s_out, [tf[u] for u in t_units], [sf[u] for u in s_units])

    def train(self, max_steps: int | None = None, progress: bool = True) -> dict:
        """Train until ``cfg.steps`` (or ``max_steps`` more steps); return the last logged losses."""
        cfg = self.cfg
        self.resume()
        self.acc.init_trackers("tb", config={k: str(v) for k, v in asdict(cfg).items()})
        stop = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="distill", unit="step", dynamic_ncols=True,
                   disable=not (progress and self.acc.is_local_main_process))
        acc_terms: dict[str, torch.Tensor] = {}
        last: dict = {}
        t0, s0 = time.time(), self.step
        log = (self.run / "metrics.jsonl").open("a") if self.acc.is_main_process else None
        while self.step < stop:
            for group in self.opt.param_groups:
                group["lr"] = cfg.lr * self._lr_scale(self.step)
            for micro in range(cfg.grad_accum):
                with self.acc.accumulate(self.student):
                    terms = self._micro_step(self.step, micro)
                    self.acc.backward(terms["total"])  # accelerate divides by grad_accum
                    if self.acc.sync_gradients:
                        self.acc.clip_grad_norm_(self.params, cfg.grad_clip)
                    self.opt.step()
                    self.opt.zero_grad(set_to_none=True)
                for k, v in terms.items():
                    acc_terms[k] = acc_terms.get(k, 0) + v.detach() / cfg.grad_accum
            if self.ema is not None:
                with torch.no_grad():
                    for e, p in zip(self.ema, self.params):
                        e.lerp_(p.detach(), 1 - cfg.ema_decay)
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == stop:
                n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                last = {k: (v / n).item() for k, v in acc_terms.items()}  # the only host sync, once per interval
                acc_terms = {}
                rate = (self.step - s0) * cfg.batch_size / max(time.time() - t0, 1e-9)
                last.update(step=self.step, lr=self.opt.param_groups[0]["lr"], samples_per_s=rate)
                self.acc.log({f"train/{k}": v for k, v in last.items() if k != "step"}, step=self.step)
                bar.set_postfix(loss=f"{last['total']:.4f}", samples_s=f"{rate:.1f}")
                if log is not None:
                    log.write(json.dumps(last) + "\n")
                    log.flush()
            if (self.validate is not None and cfg.val_every and self.acc.is_main_process
                    and (self.step % cfg.val_every == 0 or self.step == stop)):
                val = {f"val_{k}": v for k, v in self.validate(self.student_model(cfg.ema_decay is not None)).items()}
                self.acc.log(val, step=self.step)
                bar.set_postfix(loss=f"{last.get('total', float('nan')):.4f}",
                                **{k: f"{v:.4g}" for k, v in list(val.items())[:1]})
                if log is not None:
                    log.write(json.dumps({"step": self.step, **val}) + "\n")
                    log.flush()
            if self.step % cfg.checkpoint_every == 0 or self.step == stop:
                self.acc.wait_for_everyone()
                self.save()
        bar.close()
        if log is not None:
            log.close()
        self.acc.end_training()
        return last

    def student_model(self, use_ema: bool = False) -> nn.Module:
        """The trained student (unwrapped), optionally with EMA weights copied in."""
        model = self.acc.unwrap_model(self.student)
        if use_ema and self.ema is not None:
            model = copy.deepcopy(model)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, e in zip(self.names, self.ema):
                    params[n].copy_(e)
        return model
