"""The distillation trainer on HF accelerate: a student learns from a frozen teacher on cached conditioning.

Every random draw of step s (batch indices, caption dropout, noise, timesteps) is seeded by (seed, s,
process), so a run resumed from a checkpoint ends bit-identical to an uninterrupted one without saving RNG
states. Checkpoints are safetensors plus JSON, written atomically every ``checkpoint_every`` steps.

A step whose loss or gradient is not finite stops the run (:class:`slimdit.errors.TrainingDiverged`) before the
optimizer applies it, unless ``max_skipped_steps`` allows skipping it (logged, never silent). Nothing non-finite
is ever checkpointed, so rotation cannot delete the last finite checkpoint.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from tqdm.auto import tqdm

from slimdit.config import sharding_problem
from slimdit.distill import sharding, zero
from slimdit.distill.feature_map import feature_map
from slimdit.distill.losses import PRESETS, Batch, KDLoss
from slimdit.distill.lr import warmup_cosine
from slimdit.errors import TrainingDiverged
from slimdit.io import (
    atomic_write_text,
    each_tensor,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_json,
    save_tensors,
    write_json,
)
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
    gradient_checkpointing: bool = False  # recompute block activations in the backward
    # none: each process holds whole models (DDP); fsdp: teacher, student, gradients and optimizer states sharded
    # over the processes, one shard group per unit (slimdit.distill.sharding); zero2 / zero3: DeepSpeed ZeRO for
    # the student (slimdit.distill.zero)
    sharding: str = "none"
    offload_optimizer: bool = False  # zero2 / zero3: the optimizer's states and step in host memory
    # read by the runs that load the models (slimdit.models.precision); the trainer trains what it is given
    frozen_dtype: str = "auto"
    student_dtype: str = "fp32"
    caption_dropout: float = 0.1
    ema_decay: float | None = None
    kd: str = "normalized_hybrid"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # optimizer steps with a non-finite loss or gradient that may be skipped (each logged) before the run stops;
    # 0: the first one stops it
    max_skipped_steps: int = 0
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
        if problem := sharding_problem(self.sharding, self.optimizer, self.mixed_precision, self.ema_decay,
                                       self.max_skipped_steps, self.offload_optimizer):
            raise ValueError(problem)
        if self.max_skipped_steps < 0:
            raise ValueError(f"train.max_skipped_steps must be 0 or more, got {self.max_skipped_steps}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"train.caption_dropout must be in [0, 1), got {self.caption_dropout}")


@dataclass
class Conditioning:
    """Cached training inputs: clean latents, each caption's text conditioning (a dict of per-sample tensors, as
    the adapter's ``encode_prompts`` makes it) and the empty caption's (for caption dropout)."""

    latents: torch.Tensor  # (N, C, H, W)
    cond: dict[str, torch.Tensor]  # each (N, ...)
    null: dict[str, torch.Tensor]  # each (1, ...)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def take(self, idx: torch.Tensor, drop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The conditioning of samples ``idx``; where ``drop`` is true, the empty caption's instead."""
        out = {}
        for k, v in self.cond.items():
            x = v[idx]
            out[k] = x if drop is None else torch.where(drop.view(-1, *[1] * (x.ndim - 1)), self.null[k], x)
        return out


def _host_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in host memory, made without a second copy on its device."""
    dev = next(model.parameters()).device
    copied = copy.deepcopy(model.cpu())
    model.to(dev)
    return copied


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


_ADVICE = ("rerun with --set train.max_skipped_steps=N to skip up to N such steps (it resumes from that "
           "checkpoint), or lower train.lr or train.grad_clip with a new out:")


def _row(line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return {}


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
                 trainable: list[str] | None = None, validate=None, loss=None):
        from accelerate import Accelerator

        cfg.validate()
        self.cfg, self.adapter, self.data = cfg, adapter, data
        self.run = Path(run_dir)
        # ZeRO over several processes (over one it would change nothing)
        self.zero = zero.STAGES.get(cfg.sharding, 0) if zero.world_size() > 1 else 0
        if self.zero:
            self.acc = zero.accelerator(cfg, _mixed_precision(cfg.mixed_precision), self.run)
        else:  # cpu=True on CPU-only machines: with it, a torchrun-launched run becomes multi-process (gloo)
            self.acc = Accelerator(cpu=not torch.cuda.is_available(),
                                   mixed_precision=_mixed_precision(cfg.mixed_precision),
                                   gradient_accumulation_steps=cfg.grad_accum, log_with="tensorboard",
                                   project_dir=str(self.run))
        n = self.acc.num_processes * cfg.grad_accum
        if cfg.batch_size % n:
            raise ValueError(f"train.batch_size {cfg.batch_size} is not divisible by processes x grad_accum = {n}")
        self.micro = cfg.batch_size // n
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.FSDP or (
                self.acc.distributed_type == DistributedType.DEEPSPEED and not self.zero):
            raise ValueError("slimdit sets up sharding itself: launch with a plain multi-process accelerate config "
                             "(accelerate launch --multi_gpu --num_processes N) and set train.sharding: fsdp (one "
                             "shard group per unit), zero2 or zero3 (DeepSpeed ZeRO); accelerate's own FSDP and "
                             "DeepSpeed configs are not read")
        # sharding over one process would change nothing
        self.sharded = cfg.sharding == "fsdp" and self.acc.num_processes > 1
        adapter.objective  # noqa: B018  (fails now, naming the fix, when the adapter has no scheduler config)
        teacher_units = adapter.units(teacher)
        self.pairs = feature_map(teacher_units, kept_units or teacher_units)
        # the loss callable the steps minimise: KD by default (eq. 4.10), anything of the same shape otherwise
        self.loss = loss if loss is not None else KDLoss(adapter, cfg.kd, tuple(self.pairs))
        teacher = teacher.requires_grad_(False).eval()
        student.requires_grad_(False)
        self.trainable = trainable
        units = trainable if trainable is not None else None
        params = ([p for u in units for p in adapter.unit(student, u).parameters()] if units is not None
                  else list(student.parameters()))
        for p in params:
            p.requires_grad_(True)
        self.names = [n for n, p in student.named_parameters() if p.requires_grad]
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        if self.zero:  # a host copy for student_model(): ZeRO-3 partitions the weights, ZeRO-2's are DeepSpeed's
            self._template = _host_copy(student)
        if self.sharded:  # the optimizer is built over the shards, after sharding
            # copies made on the host (the shards then move to the device): an unsharded student, which
            # student_model() fills with the gathered weights, and the teacher to shard, so that the caller's stays
            # whole for sampling (on the host in a sharded distill run)
            self._template = copy.deepcopy(student.cpu())
            self.teacher = sharding.shard(adapter, _host_copy(teacher), self.acc.device)
            self.student = sharding.shard(adapter, student.train(), self.acc.device)
            named = dict(self.student.named_parameters())
            params = [named[n] for n in self.names]
            self.opt = self.acc.prepare(_optimizer(cfg, params))
        else:
            self.teacher = teacher.to(self.acc.device)
            self.student, self.opt = self.acc.prepare(student.train(), _optimizer(cfg, params))
        # in fp32 whatever the weights' dtype: a bf16 average would swallow updates 1000 times smaller than it
        self.ema = ([p.detach().float().clone() for p in params] if cfg.ema_decay else None)
        self.params = params
        self.validate = validate
        self.step = 0
        self.skipped = 0  # non-finite steps skipped so far (train.max_skipped_steps)
        self._sums: dict[str, torch.Tensor] = {}  # loss terms summed over the steps since the last log
        self._n_sums = 0  # how many steps they sum
        self._log = None

    # ---- state ------------------------------------------------------------------------------------------
    def _lr_scale(self, step: int) -> float:
        return lr_scale(self.cfg, step)

    @staticmethod
    def _first_nonfinite(groups: dict[str, dict[str, torch.Tensor]]) -> str | None:
        """The first tensor (``"parameter NAME"``, ...) holding a NaN or inf, else None."""
        named = [(f"{what} {n}", t) for what, ts in groups.items() for n, t in ts.items() if t.is_floating_point()]
        return next((name for name, t in named if not torch.isfinite(t).all()), None)

    def _gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors on the host, on the main process only (others get {}): gathered one at a time, every
        process in the same order (each gather is a collective), so the device holds one whole tensor at most."""
        out = {}
        for k, v in tensors.items():
            whole = sharding.full(v)
            if self.acc.is_main_process:
                out[k] = whole.detach().cpu()
            del whole
        return out

    def save(self) -> Path:
        if self.zero:
            return self._zero_save()
        opt_t, opt_meta = optimizer_to_tensors(getattr(self.opt, "optimizer", self.opt))
        local = {"parameter": dict(zip(self.names, self.params)), "EMA weight": dict(zip(self.names, self.ema or [])),
                 "optimizer state": opt_t}
        # each process checks what it holds (its shards, or its replica); all take the same decision
        bad = self._first_nonfinite({what: {n: sharding.local(t) for n, t in ts.items()} for what, ts in local.items()})
        if self._bad(torch.tensor(bad is not None)):  # never write it: rotation would then delete a good checkpoint
            raise TrainingDiverged(f"training diverged by step {self.step} of {self.run}: "
                                   f"{bad or 'a tensor on another process'} is not finite; {self._last_good()}; "
                                   f"{_ADVICE}")
        opt_t = self._gather(opt_t)
        weights = self._gather(dict(zip(self.names, self.params)))
        ema = self._gather(dict(zip(self.names, self.ema))) if self.ema is not None else None
        if (sums := self._log_sums()) is None:
            return self.run
        ck, tmp = self._fresh_checkpoint()
        save_tensors(tmp / "optimizer.safetensors", opt_t)
        return self._finish_checkpoint(ck, tmp, weights, ema, sums, opt_meta)

    def _log_sums(self) -> dict[str, torch.Tensor] | None:
        """The loss sums since the last log (the same on every process), on the main process; None elsewhere."""
        sums = {k: v.reshape(1) for k, v in self._sums.items()}
        if self.acc.num_processes > 1:  # the same on every process after a resume (exact in one process)
            sums = {k: self.acc.reduce(v, reduction="mean") for k, v in sums.items()}
        return sums if self.acc.is_main_process else None

    def _fresh_checkpoint(self) -> tuple[Path, Path]:
        ck = self.run / "checkpoints" / f"step_{self.step:07d}"
        tmp = ck.with_name(ck.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        return ck, tmp

    def _finish_checkpoint(self, ck: Path, tmp: Path, weights: dict, ema: dict | None, sums: dict,
                           opt_meta: dict | None) -> Path:
        save_tensors(tmp / "trainable.safetensors", weights)
        if ema is not None:
            save_tensors(tmp / "ema.safetensors", ema)
        loss_meta = None
        if hasattr(self.loss, "state"):  # a loss that trains a network of its own (DMD's fake score)
            loss_t, loss_meta = self.loss.state()
            save_tensors(tmp / "loss.safetensors", {k: v.detach().cpu() for k, v in loss_t.items()})
        # the loss sums of the steps since the last log, so the first log after a resume is the same mean
        save_tensors(tmp / "log_sums.safetensors", {k: v.reshape(()) for k, v in sums.items()})
        write_json(tmp / "state.json", {"step": self.step, "skipped_steps": self.skipped, "summed_steps": self._n_sums,
                                        "optimizer": opt_meta, "sharding": self.cfg.sharding if self.zero else "none",
                                        "loss": loss_meta,
                                        "config": asdict(self.cfg)})
        shutil.rmtree(ck, ignore_errors=True)
        tmp.rename(ck)
        for old in _checkpoints(self.run)[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old)
        return ck

    def _zero_save(self) -> Path:
        """A checkpoint of a ZeRO run: whole weights and EMA as slimdit's, the optimizer partitions as DeepSpeed's
        (every process writes its own into the same temporary folder, then the main one completes it)."""
        ck, tmp = self._fresh_checkpoint()
        self.acc.wait_for_everyone()  # the main process cleared tmp before anyone writes into it
        bad = self._first_nonfinite({"EMA weight": dict(zip(self.names, self.ema or []))})
        weights = {}
        for n, p in zip(self.names, self.params):
            with zero.gathered([p], self.zero):  # one whole tensor at a time; the main process keeps it
                if bad is None and not torch.isfinite(p).all():
                    bad = f"parameter {n}"
                if self.acc.is_main_process:
                    weights[n] = p.detach().cpu().clone()
        if self._bad(torch.tensor(bad is not None)):
            raise TrainingDiverged(f"training diverged by step {self.step} of {self.run}: "
                                   f"{bad or 'a tensor on another process'} is not finite; {self._last_good()}; "
                                   f"{_ADVICE}")
        zero.save(self.acc, tmp)
        self.acc.wait_for_everyone()
        ema = {n: e.cpu() for n, e in zip(self.names, self.ema)} if self.ema is not None else None
        if (sums := self._log_sums()) is None:
            self.acc.wait_for_everyone()
            return self.run
        out = self._finish_checkpoint(ck, tmp, weights, ema, sums, None)
        self.acc.wait_for_everyone()
        return out

    def _last_good(self) -> str:
        cks = _checkpoints(self.run)
        if not cks:
            return "no checkpoint was written yet"
        return f"the last finite checkpoint is {cks[-1]} (step {int(cks[-1].name.split('_')[1])}), kept"

    def resume(self) -> bool:
        cks = _checkpoints(self.run)
        if not cks:
            self._truncate_log(0)
            return False
        ck = cks[-1]
        state = read_json(ck / "state.json")
        with safe_open(str(ck / "trainable.safetensors"), framework="pt") as f:
            if set(f.keys()) != set(self.names):
                raise ValueError(f"checkpoint {ck} trains other parameters than this run; use a new run directory")
        was_zero = state.get("sharding", "none").startswith("zero")
        if was_zero != bool(self.zero):
            raise ValueError(f"checkpoint {ck} was written with train.sharding: {state.get('sharding', 'none')}; a "
                             f"{'ZeRO' if was_zero else 'non-ZeRO'} run resumes only as one (the optimizer states are "
                             "kept in another form)")
        # one whole tensor at a time: a sharded process keeps its shard of each
        index = {n: i for i, n in enumerate(self.names)}
        if self.ema is not None:
            for n, v in each_tensor(ck / "ema.safetensors"):
                sharding.assign_(self.ema[index[n]], v)
        if self.zero:
            zero.load(self.acc, ck)  # weights and optimizer partitions, as DeepSpeed wrote them
        else:
            for n, v in each_tensor(ck / "trainable.safetensors"):
                sharding.assign_(self.params[index[n]], v)
            opt_t = {}
            for k, v in each_tensor(ck / "optimizer.safetensors"):  # a state shaped as its parameter is sharded so
                ref = self.params[int(k.split(".", 1)[0])]
                opt_t[k] = sharding.like(v, ref) if v.shape == ref.shape else v
            optimizer_from_tensors(getattr(self.opt, "optimizer", self.opt), opt_t, state["optimizer"])
        if hasattr(self.loss, "load_state"):
            if not (ck / "loss.safetensors").exists():
                raise ValueError(f"checkpoint {ck} holds no state of this run's loss ({type(self.loss).__name__}); "
                                 "use a new run directory")
            self.loss.load_state(load_tensors(ck / "loss.safetensors"), state["loss"])
        self.step = state["step"]
        self.skipped = state.get("skipped_steps", 0)
        if (ck / "log_sums.safetensors").exists():
            self._sums = {k: v.to(self.acc.device) for k, v in load_tensors(ck / "log_sums.safetensors").items()}
            self._n_sums = state["summed_steps"]
        self._truncate_log(self.step)
        return True

    def _truncate_log(self, step: int) -> None:
        """Drop ``metrics.jsonl`` rows after ``step`` (written before a kill, redone after the resume)."""
        log = self.run / "metrics.jsonl"
        if not self.acc.is_main_process or not log.exists():
            return
        rows = log.read_text().splitlines()
        kept = [r for r in rows if _row(r).get("step", step + 1) <= step]  # a line torn by the kill goes too
        if len(kept) != len(rows):
            atomic_write_text(log, "".join(r + "\n" for r in kept))

    def _logged_last(self) -> dict:
        """The last logged losses in ``metrics.jsonl`` (what a finished phase reports when rerun)."""
        log = self.run / "metrics.jsonl"
        rows = [_row(r) for r in log.read_text().splitlines()] if log.exists() else []
        return next((r for r in reversed(rows) if "total" in r), {})

    # ---- one step ---------------------------------------------------------------------------------------
    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, dict, torch.Generator, torch.Tensor]:
        cfg, d = self.cfg, self.data
        # draws are keyed by the micro-batch's index in the global batch, so one process with grad_accum = 2 draws
        # what two processes draw (the trailing 0 keeps one-process runs drawing what they always drew)
        k = self.acc.process_index * cfg.grad_accum + micro
        g = torch.Generator().manual_seed(hash((cfg.seed, step, k, 0)) & (2**62 - 1))
        idx = torch.randint(0, len(d), (self.micro,), generator=g)
        drop = torch.rand(self.micro, generator=g) < cfg.caption_dropout
        dev = self.acc.device
        return d.latents[idx].to(dev), {k: v.to(dev) for k, v in d.take(idx, drop).items()}, g, idx

    def _micro_step(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        x0, cond, g, idx = self._batch(step, micro)
        return self.loss(self.student, self.teacher, Batch(x0, cond, g, self.acc.autocast, idx))

    def _optimizer_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches; the averaged loss terms. A non-finite loss or
        gradient is never applied: the step is skipped (within ``max_skipped_steps``) or the run stops."""
        cfg = self.cfg
        if self.zero:
            return self._zero_step()
        terms_sum: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            with self.acc.accumulate(self.student):
                terms = self._micro_step(self.step, micro)
                self.acc.backward(terms["total"])  # accelerate divides by grad_accum
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0) + v.detach() / cfg.grad_accum
                if self.acc.sync_gradients:
                    loss, norm = terms_sum["total"], None
                    if self.acc.scaler is None:  # one check of loss and gradient norm
                        norm = sharding.full(self.acc.clip_grad_norm_(self.params, cfg.grad_clip))
                    # under fp16 loss scaling an inf gradient is the scaler's to skip (it lowers the scale), so
                    # only the loss is checked, before clipping unscales the gradients
                    flag = ~torch.isfinite(loss)
                    if norm is not None:
                        flag = flag | ~torch.isfinite(torch.as_tensor(norm).to(loss.device))
                    if self._bad(flag):
                        self.opt.zero_grad(set_to_none=True)
                        self._nonfinite(loss, norm)
                        return {}
                    if self.acc.scaler is not None:
                        self.acc.clip_grad_norm_(self.params, cfg.grad_clip)
                    self.opt.step()
                self.opt.zero_grad(set_to_none=True)
        self._update_ema()
        return terms_sum

    def _zero_step(self) -> dict[str, torch.Tensor]:
        """:meth:`_optimizer_step` under ZeRO, where DeepSpeed clips and steps inside the backward: a non-finite loss
        stops the run before its backward; a non-finite gradient norm (seen once the step is taken) stops it too, and
        the last checkpoint, written before, stays the last good one."""
        cfg = self.cfg
        terms_sum: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            with self.acc.accumulate(self.student):
                terms = self._micro_step(self.step, micro)
                if self._bad(~torch.isfinite(terms["total"].detach())):
                    self._nonfinite(terms["total"].detach(), None)
                self.acc.backward(terms["total"])  # the step, at the last micro-batch
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0) + v.detach() / cfg.grad_accum
        norm = zero.grad_norm(self.acc)
        if self._bad(~torch.isfinite(norm)):
            self._nonfinite(terms_sum["total"], norm)
        self._update_ema()  # zero2 only (zero3 refuses an EMA): its weights are whole on every process
        return terms_sum

    def _update_ema(self) -> None:
        """After each applied optimizer step: the trainer's EMA of the student, and a loss's own after-step update
        (consistency distillation's EMA target)."""
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.lerp_(p.detach().float(), 1 - self.cfg.ema_decay)
        if hasattr(self.loss, "after_step"):
            self.loss.after_step(self.student)

    def _bad(self, flag: torch.Tensor) -> bool:
        """``flag`` on any process (one host sync, as loss scaling has: a NaN applied once poisons every later
        step); every process takes the same decision."""
        flag = flag.float().reshape(1).to(self.acc.device)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _nonfinite(self, loss: torch.Tensor, norm: torch.Tensor | None) -> None:
        """Skip the step being taken (logged), or stop the run when no skip is left."""
        what = f"loss {float(loss):.4g}" + (f", gradient norm {float(norm):.4g}" if norm is not None else "")
        step = self.step + 1
        if self.skipped < self.cfg.max_skipped_steps:
            self.skipped += 1
            self._write({"step": step, "skipped": f"non-finite step ({what})", "skipped_steps": self.skipped})
            tqdm.write(f"warning: step {step} skipped, non-finite ({what}); {self.skipped} of "
                       f"train.max_skipped_steps = {self.cfg.max_skipped_steps} used")
            return
        self._write({"step": step, "error": f"non-finite step ({what})"})
        raise TrainingDiverged(f"training diverged at step {step} of {self.run}: non-finite {what}; "
                               f"{self._last_good()}; {_ADVICE}")

    def _write(self, row: dict) -> None:
        if self._log is not None:
            self._log.write(json.dumps(row) + "\n")
            self._log.flush()

    def train(self, max_steps: int | None = None, progress: bool = True) -> dict:
        """Train until ``cfg.steps`` (or ``max_steps`` more steps); return the last logged losses."""
        cfg = self.cfg
        self.resume()
        tb = {"tensorboard": {"purge_step": self.step + 1}}  # hide events an earlier attempt logged after this step
        self.acc.init_trackers("tb", config={k: str(v) for k, v in asdict(cfg).items()}, init_kwargs=tb)
        stop = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="distill", unit="step", dynamic_ncols=True,
                   disable=not (progress and self.acc.is_local_main_process))
        last: dict = self._logged_last()
        t0, s0 = time.time(), self.step
        self._log = (self.run / "metrics.jsonl").open("a") if self.acc.is_main_process else None
        try:
            while self.step < stop:
                for group in self.opt.param_groups:
                    group["lr"] = cfg.lr * self._lr_scale(self.step)
                terms = self._optimizer_step()
                for k, v in terms.items():
                    self._sums[k] = self._sums.get(k, 0) + v
                self._n_sums += bool(terms)
                self.step += 1
                bar.update(1)
                if (self.step % cfg.log_every == 0 or self.step == stop) and self._n_sums:
                    means = {k: v / self._n_sums for k, v in self._sums.items()}
                    if self.acc.num_processes > 1:  # the mean over the global batch, the same on every process
                        means = {k: self.acc.reduce(v.reshape(1), reduction="mean") for k, v in means.items()}
                    last = {k: v.item() for k, v in means.items()}  # the one host sync per interval
                    self._sums, self._n_sums = {}, 0
                    rate = (self.step - s0) * cfg.batch_size / max(time.time() - t0, 1e-9)
                    last.update(step=self.step, lr=self.opt.param_groups[0]["lr"], samples_per_s=rate)
                    self.acc.log({f"train/{k}": v for k, v in last.items() if k != "step"}, step=self.step)
                    bar.set_postfix(loss=f"{last['total']:.4f}", samples_s=f"{rate:.1f}")
                    self._write(last)
                gathers = self.sharded or self.zero == 3  # then every process takes part in student_model()
                if (self.validate is not None and cfg.val_every and (gathers or self.acc.is_main_process)
                        and (self.step % cfg.val_every == 0 or self.step == stop)):
                    model = self.student_model(cfg.ema_decay is not None)  # gathered by all, when sharded
                    if self.acc.is_main_process:
                        val = {f"val_{k}": v for k, v in self.validate(model.to(self.acc.device)).items()}
                        self.acc.log(val, step=self.step)
                        bar.set_postfix(loss=f"{last.get('total', float('nan')):.4f}",
                                        **{k: f"{v:.4g}" for k, v in list(val.items())[:1]})
                        self._write({"step": self.step, **val})
                if self.step % cfg.checkpoint_every == 0 or self.step == stop:
                    self.acc.wait_for_everyone()
                    self.save()
        finally:
            bar.close()
            if self._log is not None:
                self._log.close()
            self._log = None
            for tracker in self.acc.trackers:  # not end_training(): it destroys the process group the next phase
                tracker.finish()               # of a multi-process run still needs
        return last

    def student_model(self, use_ema: bool = False) -> nn.Module:
        """The trained student (unwrapped), optionally with EMA weights copied in. When sharded, a whole copy on
        the host, gathered from the shards one tensor at a time (a collective: every process must call it)."""
        if self.sharded or self.zero:
            model = copy.deepcopy(self._template)
            params = dict(model.named_parameters())
            values = self.ema if use_ema and self.ema is not None else self.params
            with torch.no_grad():
                for n, v, p in zip(self.names, values, self.params):
                    with zero.gathered([p], self.zero):  # one whole tensor at a time
                        params[n].copy_(sharding.full(v).cpu())
            return model
        model = self.acc.unwrap_model(self.student)
        if use_ema and self.ema is not None:
            model = copy.deepcopy(model)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, e in zip(self.names, self.ema):
                    params[n].copy_(e)
        return model
