"""``slimdit reward --config C``: fine-tune a model (a compressed student, typically) against a reward.

The model samples groups of images for training prompts (the captions of ``data.real``; its images are not used),
a registered reward scores them, and one of four methods tunes the model:
- ``grpo`` (:mod:`slimdit.distill.grpo`): group-relative policy gradient raises the likelihood of what scored above
  its group, with a KL to the model before tuning; any reward of :data:`slimdit.registry.REWARDS` (the shapes
  world's is its benchmark's detector verdict, refused on evaluation prompts);
- ``draft`` (:mod:`slimdit.distill.draft`): the reward's gradient through the VAE and the sampler's last steps; a
  differentiable reward of :data:`slimdit.registry.DIFFERENTIABLE_REWARDS` (the shapes world's is its embedder's
  caption-image similarity; the core's is CLIP's);
- ``raft`` (:mod:`slimdit.distill.raft`): reward-ranked fine-tuning, the model's denoising objective on the best
  images of each group that the reward accepts; any reward of :data:`slimdit.registry.REWARDS`;
- ``dpo`` (:mod:`slimdit.distill.dpo`): online Diffusion-DPO, each group's best image preferred to its worst,
  against the model before tuning; any reward of :data:`slimdit.registry.REWARDS`.

Evaluation then runs on the benchmark's held-out prompts: before and after, and a ``baseline`` beside them (the
student's own teacher), with FID and CMMD next to the score so that reward hacking shows.

Layout: ``config.yaml``, ``cache/``, ``train/`` (the trainer's run: checkpoints, ``metrics.jsonl`` with the mean
reward per step), ``student/`` (the tuned model: transformer, sampling defaults, card), ``metrics/*.json``,
``summary.json``. Rerunning the same config continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from slimdit.config import DataConfig, EvalSection, TrainSection, _Strict, _teacher_string, load_config
from slimdit.io import write_json


class RewardConfig(_Strict):
    teacher: str = "shapes-pixart"  # the model tuned (a model or a student directory); frozen, the KL reference
    _teacher = field_validator("teacher", mode="before")(_teacher_string)  # or {pipeline: ..., transformer: ...}
    out: str
    method: Literal["grpo", "draft", "raft", "dpo"] = "grpo"
    reward: str = "shapes-geneval"  # a registered reward (DIFFERENTIABLE_REWARDS for draft, else REWARDS)
    group: int = Field(8, ge=2)  # images sampled per prompt; advantages are relative within a group
    sample_steps: int = Field(10, ge=1)  # the sampler's steps while tuning (grpo: ≥ 2, the last is deterministic)
    eta: float = Field(1.0, gt=0, le=1)  # the sampler's stochasticity (DDIM's eta; above 1 it is no posterior)
    train_steps: int | None = Field(4, ge=1)  # stochastic steps each update trains on; None: all
    grad_steps: int = Field(1, ge=1)  # draft: the sampler's last steps the reward's gradient flows through
    # draft: the first of those steps whose model the update tunes (the later ones pass the gradient through their
    # input, the model held); None: all of them (DRaFT)
    tuned_steps: int | None = Field(None, ge=1)
    # draft: weight of the denoising loss on the training images (ReFL's guard against drifting from the data)
    data_weight: float = Field(0.0, ge=0)
    kl: float = Field(0.04, ge=0)  # weight of the KL (draft, raft: prediction distance) to the model before tuning
    keep: int = Field(1, ge=1)  # raft: the best images of each group kept (at most)
    threshold: float | None = None  # raft, dpo: the reward a kept (preferred) image must reach (None: any)
    sampler: Literal["reference", "model"] = "reference"  # raft: who draws the groups (the frozen model, or the tuned)
    draws: int = Field(4, ge=1)  # raft, dpo: timesteps each kept image (each pair) is noised at per update
    beta: float = Field(2000.0, gt=0)  # dpo: the preference's inverse temperature
    guidance: float | None = None  # CFG (or guidance input) scale while tuning; default: the model's sampling default
    baseline: str | None = None  # evaluated beside before and after (the compressed student's teacher)
    device: str | None = None
    data: DataConfig = DataConfig(real="shapes-train:1024")
    train: TrainSection = TrainSection(steps=100, batch_size=4, optimizer="adamw", lr=1e-5, warmup_steps=5,
                                       grad_clip=1.0, weight_decay=0.0, caption_dropout=0.0, val_every=0,
                                       checkpoint_every=10, log_every=1)
    eval: EvalSection = EvalSection(images_per_prompt=2)

    @model_validator(mode="after")
    def _consistent(self):
        rewards = _rewards(self.method)
        if self.reward not in rewards:
            kind = "differentiable reward" if self.method == "draft" else "reward"
            raise ValueError(f"unknown {kind} {self.reward!r} for method {self.method}; registered: "
                             f"{', '.join(rewards) or 'none'}")
        if self.method == "raft" and self.keep > self.group:
            raise ValueError(f"keep ({self.keep}) exceeds the group ({self.group})")
        if self.method == "draft" and self.grad_steps > self.sample_steps:
            raise ValueError(f"grad_steps ({self.grad_steps}) exceeds the sampler's {self.sample_steps} steps")
        if self.tuned_steps is not None and (self.method != "draft" or self.tuned_steps > self.grad_steps):
            raise ValueError(f"tuned_steps ({self.tuned_steps}) belongs to method draft and must not exceed "
                             f"grad_steps ({self.grad_steps})")
        if self.data_weight and self.method != "draft":
            raise ValueError(f"data_weight ({self.data_weight}) belongs to method draft, not {self.method}")
        if self.train.caption_dropout:
            raise ValueError("train.caption_dropout must be 0 for reward tuning: the reward judges the caption the "
                             "images were sampled for")
        if self.method == "grpo" and self.sample_steps < 2:
            raise ValueError(f"grpo needs sample_steps ≥ 2 (its last step is deterministic, so it trains on the "
                             f"stochastic ones before), got {self.sample_steps}")
        if self.method == "grpo" and self.train_steps is not None and self.train_steps > self.sample_steps - 1:
            raise ValueError(f"train_steps ({self.train_steps}) exceeds the sampler's {self.sample_steps - 1} "
                             "stochastic steps (the last of sample_steps is deterministic)")
        return self


def _rewards(method: str):
    from slimdit.registry import DIFFERENTIABLE_REWARDS, REWARDS

    return DIFFERENTIABLE_REWARDS if method == "draft" else REWARDS


def _grpo(cfg: RewardConfig, reward, adapter, captions, pipe, t, s, null, w):
    from slimdit.data.cache import decode_latents
    from slimdit.distill.grpo import GRPOLoss

    return GRPOLoss(adapter, captions, reward, lambda z: decode_latents(pipe, z), t, s, null=null, guidance=w,
                    group=cfg.group, eta=cfg.eta, train_steps=cfg.train_steps, kl=cfg.kl)


def _draft(cfg: RewardConfig, reward, adapter, captions, pipe, t, s, null, w):
    from slimdit.data.cache import decode_images
    from slimdit.distill.draft import DraftLoss

    return DraftLoss(adapter, captions, reward, lambda z: decode_images(pipe, z), t, s, null=null, guidance=w,
                     group=cfg.group, grad_steps=cfg.grad_steps, kl=cfg.kl, tuned_steps=cfg.tuned_steps,
                     data_weight=cfg.data_weight)


def _raft(cfg: RewardConfig, reward, adapter, captions, pipe, t, s, null, w):
    from slimdit.data.cache import decode_latents
    from slimdit.distill.raft import RaftLoss

    return RaftLoss(adapter, captions, reward, lambda z: decode_latents(pipe, z), t, s, null=null, guidance=w,
                    group=cfg.group, keep=cfg.keep, threshold=cfg.threshold, draws=cfg.draws, kl=cfg.kl,
                    sampler=cfg.sampler)


def _dpo(cfg: RewardConfig, reward, adapter, captions, pipe, t, s, null, w):
    from slimdit.data.cache import decode_latents
    from slimdit.distill.dpo import DPOLoss

    return DPOLoss(adapter, captions, reward, lambda z: decode_latents(pipe, z), t, s, null=null, guidance=w,
                   group=cfg.group, threshold=cfg.threshold, draws=cfg.draws, beta=cfg.beta)


# method -> its loss callable, built from the config and the models
LOSSES = {"grpo": _grpo, "draft": _draft, "raft": _raft, "dpo": _dpo}


def run_reward(config: str | Path | dict | RewardConfig, progress: bool = True) -> Path:
    """Run (or continue) a reward fine-tuning; return the run directory."""
    from slimdit.data.datasets import load_dataset
    from slimdit.distill.run import Conditionings
    from slimdit.distill.steps import check_cfg_scale, transitions
    from slimdit.distill.trainer import TrainConfig, Trainer
    from slimdit.identity import check_run_dir, input_fingerprints, record_revisions
    from slimdit.models import adapter_for
    from slimdit.models.precision import cast_io, frozen_dtype, student_copy
    from slimdit.pipelines.loading import load_pipeline, sampling_defaults, save_student, student_base
    from slimdit.pipelines.placement import frozen_components, parked
    from slimdit.processes import process_state
    from slimdit.reports.card import write_card

    cfg = config if isinstance(config, RewardConfig) else load_config(config, RewardConfig)
    state = process_state()
    run = Path(cfg.out)
    inputs = input_fingerprints(cfg)
    check_run_dir(run, cfg, inputs)
    prompts = load_dataset(cfg.data.real, cfg.data.image_size)  # fail on bad data before loading any model
    reward = _rewards(cfg.method)[cfg.reward]()
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(cfg.teacher, device, dtype=frozen_dtype(cfg.train.frozen_dtype, device))
    record_revisions(run, cfg, inputs)  # a hub model downloaded just now: its commit
    pipe.vae.requires_grad_(False)  # frozen; draft's gradient passes through it to the student
    reference = cast_io(pipe.transformer.eval())
    sched_config = dict(pipe.scheduler.config)
    adapter = adapter_for(reference, sched_config)
    defaults = sampling_defaults(cfg.teacher)
    w = cfg.guidance if cfg.guidance is not None else adapter.guidance_scale(reference, defaults)
    check_cfg_scale(adapter, reference, w, f"model {cfg.teacher}")
    data = Conditionings(cfg.data, prompts, pipe, cfg.teacher, run, cfg.device, cfg.train.seed)("real")
    t, s = transitions(sched_config, cfg.sample_steps, adapter.image_tokens(reference, data.latents[:1]))
    null = data.null if not adapter.takes_guidance(reference) and w != 1 else None
    loss = LOSSES[cfg.method](cfg, reward, adapter, prompts.captions, pipe, t, s, null, w)
    student = student_copy(reference, cfg.train.student_dtype)
    tcfg = TrainConfig(**{**cfg.train.model_dump(), "betas": tuple(cfg.train.betas), "eps": tuple(cfg.train.eps)})
    t0 = time.time()
    # the VAE decodes every sampled group for the reward; only the text encoders wait off the device
    with parked(pipe, [n for n in frozen_components(pipe) if n != "vae"]):
        trainer = Trainer(adapter, reference, student, data, tcfg, run / "train", loss=loss)
        last = trainer.train(progress=progress)
        student = trainer.student_model(use_ema=tcfg.ema_decay is not None)
    if not state.is_main_process:
        return run
    # a few-step student keeps the scheduler it samples with (load_pipeline gave the pipeline its own)
    own = student_base(cfg.teacher) is not None and (Path(cfg.teacher) / "scheduler").is_dir()
    save_student(student, run / "student", base=cfg.teacher, scheduler=pipe.scheduler if own else None)
    summary = {"teacher": cfg.teacher, "student": str(run / "student"), "method": cfg.method, "reward": cfg.reward,
               "train_steps": tcfg.steps, "images_per_step": tcfg.batch_size * cfg.group,
               "seconds": round(time.time() - t0, 1), "last": last, "reward_curve": _reward_curve(run / "train")}
    if cfg.eval.benchmark:
        summary.update(_evaluate(cfg, run))
    write_json(run / "summary.json", summary)
    write_card(run / "student", run)
    return run


def _reward_curve(train_dir: Path) -> list[list[float]]:
    """``[step, mean reward]`` of every logged step."""
    import json

    log = train_dir / "metrics.jsonl"
    rows = [json.loads(r) for r in log.read_text().splitlines() if r.strip()] if log.exists() else []
    return [[r["step"], r["reward"]] for r in rows if "reward" in r]


def _evaluate(cfg: RewardConfig, run: Path) -> dict:
    from slimdit.metrics.evaluate import saved_or_evaluated

    e, out = cfg.eval, {}
    models = [("before", cfg.teacher), ("after", str(run / "student"))]
    if cfg.baseline:
        models.append(("baseline", cfg.baseline))
    for name, model in models:
        path = run / "metrics" / f"{name}.json"
        m = saved_or_evaluated(path, model, e.benchmark, limit=e.limit, images_per_prompt=e.images_per_prompt,
                               seed=e.seed, steps=e.steps, guidance=e.guidance)
        out[f"{name}_metrics"] = {k: v for k, v in m.items() if isinstance(v, int | float)}
    before, after = out["before_metrics"], out["after_metrics"]
    if before.get("fid"):
        out["fid_change"] = after["fid"] / before["fid"] - 1  # how far tuning moved the images (hacking shows)
    if cfg.baseline and out["baseline_metrics"].get("overall"):
        out["after_vs_baseline"] = after["overall"] / out["baseline_metrics"]["overall"]
    return out
