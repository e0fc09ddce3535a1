"""``slimdit steps --config C``: make a model sample in fewer steps.

``method: progressive`` (:mod:`slimdit.distill.progressive`), one halving round at a time, from the teacher sampled
at ``start`` deterministic steps down to ``steps``: round k trains a student for ``start / 2^k`` steps against the
previous round's model at twice as many. ``method: consistency`` (:mod:`slimdit.distill.consistency`): one round
of latent consistency distillation on the teacher's ``solver_steps`` grid; the student samples with
``LCMScheduler`` (a flow teacher's: ``FlowMatchLCMScheduler``) in ``steps`` steps by default, and in any other count
too. ``method: reflow`` (flow teachers,
:mod:`slimdit.distill.reflow`): the teacher's ODE pairs (noise, sample), then velocity regression on the straight
line between them; the student keeps the Euler scheduler, at ``steps``. ``method: direct``
(:mod:`slimdit.distill.direct`, any teacher): the same pairs, and the student's whole ``steps``-step sampler from
each pair's noise regressed onto its sample; with ``pair_reward``, only the pairs whose sample the reward passes
(:mod:`slimdit.distill.pair_reward`). ``method: dmd2``
(:mod:`slimdit.distill.dmd`): distribution matching against the teacher's score with a fake score trained beside
the student, on the student's own ``steps``-step grid. ``method: ladd`` (:mod:`slimdit.distill.ladd`): adversarial
distillation with the frozen teacher's features as the discriminator, on the same grid. Each method is a loss
built by :data:`LOSSES`. The teacher may be any model, a compressed student included, so size and steps compose.
With a CFG teacher its guided sampling is distilled in (the first round's, for progressive; LADD learns the data's
latents instead), and the student samples without CFG. With ``refine:``, progressive distillation's rounds are
followed by one distribution-matching (DMD2) or adversarial (LADD) round on the final steps, from the last round's
student against the run's teacher.

Layout: ``config.yaml``, ``cache/``, ``rounds/NN_Msteps/`` (a trainer run each, ``NN_Msteps_dmd2`` or ``_ladd`` for
the refining round; ``student/`` and ``done.json`` once finished), ``student/`` (the final one: transformer, scheduler,
sampling defaults, card), ``metrics/*.json``, ``summary.json``. Rerunning the same config continues where it
stopped.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from slimdit.config import DataConfig, EvalSection, TrainSection, _Strict, _teacher_string, load_config
from slimdit.io import read_json, write_json


class RefineSection(_Strict):
    """A last round after progressive distillation's halvings, on the final steps, from the last round's student:
    distribution matching (``dmd2``, with the run's ``fake_updates``, ``fake_lr`` and GAN settings) against the
    run's teacher (its CFG distilled in again), or adversarial distillation (``ladd``, with the run's ``disc_lr``,
    ``disc_units`` and ``mismatch_weight``) with the run's teacher as the discriminator's features. Halving trains
    each student step on its own trajectory segment; both correct what the halvings lost on the samples the student
    really makes."""

    method: Literal["dmd2", "ladd"] = "dmd2"
    # optimizer steps; the rest of the train section is the run's, with no caption dropout (it matches the guided
    # distribution of each caption)
    steps: int = Field(200, ge=1)
    lr: float = Field(3e-5, gt=0)  # below a halving round's 1e-4: the student only needs nudging
    # the round keeps an EMA of the student and saves it (None: the run's train.ema_decay, which the halvings share)
    ema_decay: float | None = Field(None, gt=0, lt=1)


# the run-level settings that only one method reads: the method, whose they are, the fields
OWNED_SETTINGS = {"fake": ("dmd2", "the fake score belongs", ("fake_updates", "fake_lr")),
                  "gan": ("dmd2", "the GAN head belongs", ("gan_weight", "gan_d_weight", "gan_unit")),
                  "disc": ("ladd", "the discriminator heads belong", ("disc_lr", "disc_units", "mismatch_weight")),
                  "regression": ("dmd2", "the regression onto the teacher's pairs belongs", ("regression_weight",)),
                  "consistency": ("consistency", "LCM's EMA target and w-conditioning belong",
                                  ("target_ema", "guidance_range"))}


def owned_settings(method: str) -> tuple[str, ...]:
    """The fields of :data:`OWNED_SETTINGS` that ``method`` alone reads."""
    return tuple(k for m, _, keys in OWNED_SETTINGS.values() if m == method for k in keys)


class StepsConfig(_Strict):
    teacher: str = "shapes-pixart"  # a model, or a student directory (a compressed student made few-step)
    _teacher = field_validator("teacher", mode="before")(_teacher_string)  # or {pipeline: ..., transformer: ...}
    # the model the student starts from (default: the teacher), e.g. a compressed student that learns the original
    # teacher's steps; it must run in the teacher's base pipeline (the same text encoders and VAE)
    student: str | None = None
    _student = field_validator("student", mode="before")(_teacher_string)  # the same forms as teacher
    out: str
    method: Literal["progressive", "consistency", "reflow", "direct", "dmd2", "ladd"] = "progressive"
    steps: int = Field(4, ge=1)  # the final student's sampling steps
    start: int = Field(16, ge=2)  # progressive: the teacher's deterministic steps the first round distils; steps x 2^k
    solver_steps: int = Field(50, ge=2)  # consistency: the teacher's DDIM grid (LCM's skipping-step schedule)
    # consistency: LCM's target network, an EMA of the student at this decay (LCM's 0.95; None: the student itself
    # under stop-gradient, which measured worse on both shapes teachers: docs/steps.md)
    target_ema: float | None = Field(0.95, ge=0, lt=1)
    # consistency: LCM's w-conditioning for a guidance-embedded teacher (Flux-dev): w drawn per sample from
    # [low, high], the teacher's input and the student's, so the student samples at any scale in it (None: one w)
    guidance_range: tuple[float, float] | None = None
    # reflow, direct: the teacher's deterministic (Euler / DDIM) steps per pair (default: its own step count)
    pair_steps: int | None = Field(None, ge=1)
    # reflow, direct, dmd2's regression: run directories whose teacher pairs this run reuses (linked, not made again)
    # when their record says they were made as this run would make them; none matching: made anew
    pairs_from: list[str] = []
    fake_updates: int = Field(5, ge=1)  # dmd2: fake score steps per student step (the two time-scale rule)
    fake_lr: float | None = Field(None, gt=0)  # dmd2: the fake score's learning rate (default: train.lr)
    gan_weight: float = Field(0.0, ge=0)  # dmd2: the student's GAN loss weight (0: no GAN head)
    gan_d_weight: float = Field(1e-2, gt=0)  # dmd2: the GAN head's loss weight in the fake score's steps
    gan_unit: str | None = None  # dmd2: the unit whose features the GAN head reads (default: the middle one)
    # dmd2: DMD1's regression of the student's sampler onto the teacher's (noise, sample) pairs (0: none, DMD2's form)
    regression_weight: float = Field(0.0, ge=0)
    # reflow, direct, dmd2's regression: keep only the teacher's pairs whose sample this reward
    # (slimdit.registry.REWARDS, on its training caption) scores at least pair_reward_min (None: every pair)
    pair_reward: str | None = None
    pair_reward_min: float = 1.0
    disc_lr: float | None = Field(None, gt=0)  # ladd: the discriminator heads' learning rate (default: train.lr)
    disc_units: list[str] | None = None  # ladd: the teacher's units the heads read (default: every unit)
    # ladd: real latents under another row's caption count as fakes for the heads, at this weight (0: none)
    mismatch_weight: float = Field(0.0, ge=0)
    refine: RefineSection | None = None  # progressive: a DMD2 or LADD round after the halvings (None: none)
    guidance: float | None = None  # the teacher's CFG (or guidance input) scale; default: its sampling default
    device: str | None = None
    # the memory plan before any model loads (student: the teacher's size; dmd2: its fake score too): auto on a
    # GPU, on also on a CPU, off never; a run that cannot fit is refused, naming the fixes
    memory_plan: Literal["auto", "on", "off"] = "auto"
    data: DataConfig = DataConfig()
    train: TrainSection = TrainSection(steps=500, optimizer="adamw", lr=1e-4, warmup_steps=50, grad_clip=1.0,
                                       weight_decay=0.0, val_every=0, checkpoint_every=100, batch_size=32)
    eval: EvalSection = EvalSection()

    @classmethod
    def absent_means(cls, saved: dict) -> dict:
        """What a run saved before a field existed did, where today's default differs (read by
        :mod:`slimdit.identity`): consistency runs before ``target_ema`` trained against the student itself."""
        return {"target_ema": None} if saved.get("method") == "consistency" else {}

    @property
    def trains_on_pairs(self) -> bool:
        """Whether the run trains on the teacher's (noise, sample) pairs: reflow, direct, DMD1's regression."""
        return self.method in ("reflow", "direct") or bool(self.regression_weight)

    @model_validator(mode="after")
    def _halvings(self):
        if self.method == "consistency" and self.steps > self.solver_steps:
            raise ValueError(f"steps ({self.steps}) must not exceed solver_steps ({self.solver_steps}): the student "
                             "samples on the training grid")
        if self.guidance_range is not None and not 0 <= self.guidance_range[0] <= self.guidance_range[1]:
            raise ValueError(f"guidance_range {list(self.guidance_range)}: need 0 <= low <= high")
        if self.method == "consistency" and self.target_ema is not None and self.train.sharding in ("fsdp", "zero3"):
            raise ValueError(f"target_ema keeps a whole copy of the student, which sharded weights (train.sharding: "
                             f"{self.train.sharding}) do not hold on any one process: use train.sharding none or "
                             "zero2, or target_ema: null (the student as its own target)")
        if (self.method in ("dmd2", "ladd") or self.refine is not None) and self.train.sharding in ("fsdp", "zero3"):
            what = f"method: {self.method}" if self.refine is None else f"refine ({self.refine.method})"
            raise ValueError(f"{what} runs a drawn number of student passes per update (backward "
                             f"simulation), which sharded weights (train.sharding: {self.train.sharding}) would have "
                             "to gather in step on every process: use train.sharding none or zero2")
        if self.mismatch_weight and self.method == "ladd" and self.train.caption_dropout > 0:
            raise ValueError(f"mismatch_weight shows the heads real latents under another row's caption, which "
                             f"caption dropout (train.caption_dropout: {self.train.caption_dropout}) may have emptied: "
                             "set train.caption_dropout: 0")
        if self.mismatch_weight and self.train.batch_size // self.train.grad_accum < 2:
            raise ValueError("mismatch_weight needs at least 2 images per micro-batch (train.batch_size / "
                             "train.grad_accum) to give a row another row's caption")
        if self.refine is not None and self.method != "progressive":
            raise ValueError(f"refine: a round after progressive distillation's halvings; method {self.method} "
                             "has no halvings to refine (use method: dmd2 or ladd alone)")
        methods = {self.method} | ({self.refine.method} if self.refine is not None else set())
        # by value, not by the fields a file names: a saved config.yaml names every field at its default
        changed = {k for _, _, keys in OWNED_SETTINGS.values() for k in keys
                   if getattr(self, k) != type(self).model_fields[k].default}
        for method, owner, keys in OWNED_SETTINGS.values():
            given = changed & set(keys)
            if given and method not in methods:
                raise ValueError(f"{', '.join(sorted(given))}: {owner} to method: {method} (or a {method} refine), "
                                 f"not {self.method}")
        dmd, gan = "dmd2" in methods, changed & set(OWNED_SETTINGS["gan"][2])
        if dmd and not self.gan_weight and gan - {"gan_weight"}:
            raise ValueError(f"{', '.join(sorted(gan - {'gan_weight'}))} set without gan_weight > 0: the GAN head is "
                             "off, so it would be ignored")
        on_pairs = self.method in ("reflow", "direct")  # the pairs are its data rows (dmd2's regression: a term)
        if self.pair_reward is not None:
            from slimdit import registry

            if not self.trains_on_pairs:
                raise ValueError(f"pair_reward filters the teacher's pairs, which method: {self.method} does not "
                                 "train on (method: reflow or direct, or dmd2 with regression_weight > 0)")
            if self.pair_reward not in registry.REWARDS:
                raise ValueError(f"unknown pair_reward {self.pair_reward!r}; registered: "
                                 f"{', '.join(registry.REWARDS) or 'none'}")
        elif self.pair_reward_min != type(self).model_fields["pair_reward_min"].default:
            raise ValueError("pair_reward_min set without pair_reward: no pair is scored, so it would be ignored")
        if self.pairs_from and not self.trains_on_pairs:
            raise ValueError(f"pairs_from reuses the teacher's pairs, which method: {self.method} does not train on "
                             "(method: reflow or direct, or dmd2 with regression_weight > 0)")
        if self.trains_on_pairs and self.train.caption_dropout:
            what = f"method: {self.method}" if on_pairs else "regression_weight > 0"
            raise ValueError(f"{what} needs train.caption_dropout: 0 (each pair belongs to its caption)")
        if self.method != "progressive":
            return self
        k = math.log2(self.start / self.steps) if self.start > self.steps else 0
        if k < 1 or k != int(k):
            raise ValueError(f"start ({self.start}) must be steps ({self.steps}) times a power of 2, at least 2")
        return self


def describe_rounds(cfg: StepsConfig) -> str:
    """The rounds in one line, e.g. ``16 -> 8 -> 4 -> 4 (dmd2) steps``."""
    parts = [str(cfg.start)] if cfg.method == "progressive" else []
    parts += [f"{n} ({m})" if m != cfg.method else str(n) for n, m in _rounds(cfg)]
    return " -> ".join(parts) + " steps"


def _rounds(cfg: StepsConfig) -> list[tuple[int, str]]:
    """Each round's student steps and method: start/2, start/4, ..., steps by halving (the other methods: one round,
    steps), then steps again for a refining round."""
    if cfg.method != "progressive":
        return [(cfg.steps, cfg.method)]
    out, n = [], cfg.start
    while n > cfg.steps:
        n //= 2
        out.append((n, "progressive"))
    if cfg.refine is not None:
        out.append((cfg.steps, cfg.refine.method))
    return out


def run_steps(config: str | Path | dict | StepsConfig, progress: bool = True) -> Path:
    """Run (or continue) a step distillation; return the run directory."""
    from slimdit.compress.plan import Plan
    from slimdit.data.datasets import load_dataset
    from slimdit.distill.consistency import lcm_scheduler
    from slimdit.distill.dmd import check_gan_unit
    from slimdit.distill.ladd import check_units
    from slimdit.distill.run import Conditionings, check_memory
    from slimdit.distill.steps import check_cfg_scale, student_scheduler
    from slimdit.distill.trainer import TrainConfig, Trainer
    from slimdit.identity import check_run_dir, input_fingerprints, record_revisions
    from slimdit.models import adapter_for
    from slimdit.models.precision import DTYPES, cast_io, frozen_dtype, student_copy
    from slimdit.models.storage import load_model
    from slimdit.pipelines.loading import load_pipeline, sampling_defaults, save_student
    from slimdit.pipelines.placement import frozen_components, parked
    from slimdit.processes import process_state
    from slimdit.reports.card import write_card

    cfg = config if isinstance(config, StepsConfig) else load_config(config, StepsConfig)
    state = process_state()  # what the trainer's Accelerator uses
    run = Path(cfg.out)
    inputs = input_fingerprints(cfg)
    check_run_dir(run, cfg, inputs)
    real = load_dataset(cfg.data.real, cfg.data.image_size)  # fail on bad data before loading any model
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_memory(cfg, Plan(ops=[]), device, run, len(real.captions))
    pipe = load_pipeline(cfg.teacher, device, dtype=frozen_dtype(cfg.train.frozen_dtype, device))
    inputs = record_revisions(run, cfg, inputs)  # a hub teacher downloaded just now: its commit, for the pairs too
    teacher = cast_io(pipe.transformer.eval())
    sched_config = dict(pipe.scheduler.config)
    adapter = adapter_for(teacher, sched_config)
    defaults = sampling_defaults(cfg.teacher)
    w = cfg.guidance if cfg.guidance is not None else adapter.guidance_scale(teacher, defaults)
    check_cfg_scale(adapter, teacher, w, f"teacher {cfg.teacher}")
    guided_input = adapter.takes_guidance(teacher)  # a guidance-distilled teacher takes w as an input
    check_gan_unit(adapter, teacher, cfg.gan_unit)  # before caching anything
    check_units(adapter, teacher, cfg.disc_units)
    if cfg.method == "consistency":  # before caching anything
        from slimdit.distill.objectives import DDPM

        if cfg.guidance_range is not None and not guided_input:
            raise ValueError(f"guidance_range: LCM's w-conditioning needs a teacher with a guidance input (a "
                             f"guidance-distilled model such as Flux-dev); {cfg.teacher} guides by classifier-free "
                             "guidance, distilled in at one scale (guidance)")
        if cfg.guidance_range is not None and not cfg.guidance_range[0] <= w <= cfg.guidance_range[1]:
            raise ValueError(f"guidance {w} (the student's sampling default) lies outside guidance_range "
                             f"{list(cfg.guidance_range)}, where the student never learns")
        n_train = len(adapter.objective.alphas_cumprod) if isinstance(adapter.objective, DDPM) else 0
        if n_train and n_train % cfg.solver_steps:  # else DDIM's grid and LCMScheduler's differ
            raise ValueError(f"solver_steps ({cfg.solver_steps}) must divide the teacher's {n_train} training "
                             "timesteps, so that the training grid is LCMScheduler's")
    if cfg.method == "reflow":
        from slimdit.distill.objectives import RectifiedFlow

        if not isinstance(adapter.objective, RectifiedFlow):
            raise ValueError(f"method: reflow is for flow teachers; {cfg.teacher} is a diffusion model: use method: "
                             "progressive or consistency")
    start = _start(cfg, teacher)  # before any caching: a student of another family or base is refused here
    data = Conditionings(cfg.data, real, pipe, cfg.teacher, run, cfg.device, cfg.train.seed)("real")
    tokens = adapter.image_tokens(teacher, data.latents[:1])
    student = student_copy(start.to(device), cfg.train.student_dtype)
    del start
    consistency = cfg.method == "consistency"
    scheduler = lcm_scheduler(sched_config, cfg.solver_steps) if consistency else student_scheduler(sched_config)
    original = teacher  # a refining round's teacher; the halvings' are the previous rounds' students
    with parked(pipe, frozen_components(pipe)):
        for i, (n, method) in enumerate(_rounds(cfg)):
            refining = method != cfg.method
            rdir = run / "rounds" / (f"{i:02d}_{n}steps" + (f"_{method}" if refining else ""))
            if (rdir / "done.json").exists():
                student = cast_io(load_model(rdir / "student" / "transformer").to(device,
                                                                                   DTYPES[cfg.train.student_dtype]))
                teacher = copy.deepcopy(student).requires_grad_(False).eval()  # as after a trained round
                continue
            # round 0 distils the CFG teacher's guided steps; later teachers are students that sample without CFG
            # a refining round goes back to the run's teacher, and so to its CFG
            teacher = original if refining else teacher
            ctx = _Round(cfg, adapter, teacher, data, sched_config, tokens, w, guided_input, n,
                         data.null if ((i == 0 or refining) and not guided_input and w != 1) else None, run, state,
                         defaults, progress, pipe, list(real.captions), inputs)
            loss, train_data = LOSSES[method](ctx)
            train = {**cfg.train.model_dump(), "betas": tuple(cfg.train.betas), "eps": tuple(cfg.train.eps)}
            if refining:
                train.update(steps=cfg.refine.steps, lr=cfg.refine.lr, caption_dropout=0.0,
                             warmup_steps=max(1, min(cfg.train.warmup_steps, cfg.refine.steps // 10)))
                if cfg.refine.ema_decay is not None:
                    train["ema_decay"] = cfg.refine.ema_decay
            tcfg = TrainConfig(**train)
            t0 = time.time()
            trainer = Trainer(adapter, teacher, student, train_data, tcfg, rdir, loss=loss)
            last = trainer.train(progress=progress)
            student = trainer.student_model(use_ema=tcfg.ema_decay is not None).to(device)
            teacher_steps = {"consistency": cfg.solver_steps, "progressive": 2 * n, "dmd2": None, "ladd": None}.get(
                method, cfg.pair_steps or defaults["num_inference_steps"])
            if state.is_main_process:  # one writer; the others wait until the round is on disk
                save_student(student, rdir / "student", base=cfg.teacher, scheduler=scheduler,
                             sampling=_sampling(adapter, original, n, w))
                write_json(rdir / "done.json", {"steps": n, "method": method, "scheduler": type(scheduler).__name__,
                                                "teacher_steps": teacher_steps,
                                                "train_steps": tcfg.steps,
                                                "seconds": round(time.time() - t0, 1), "last": last})
            state.wait_for_everyone()
            del trainer, loss  # the round's optimizer states (and a fake score) go before the next round builds its own
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            teacher = copy.deepcopy(student).requires_grad_(False).eval()
    if not state.is_main_process:  # saving, evaluating and benchmarking are the main process's
        return run
    save_student(student, run / "student", base=cfg.teacher, scheduler=scheduler,
                 sampling=_sampling(adapter, original, cfg.steps, w))
    summary = {"teacher": cfg.teacher, "student": str(run / "student"), "started_from": cfg.student or cfg.teacher,
               "method": cfg.method, "steps": cfg.steps,
               "refine": cfg.refine.model_dump() if cfg.refine is not None else None,
               "teacher_steps": defaults["num_inference_steps"],
               "rounds": [read_json(d) for d in sorted((run / "rounds").glob("*/done.json"))]}
    if cfg.pair_reward is not None and (run / "pairs" / "kept.json").exists():  # (copied pairs may bring one)
        summary["pairs_kept"] = read_json(run / "pairs" / "kept.json")
    if cfg.eval.benchmark:
        summary.update(_evaluate(cfg, run))
    if cfg.eval.bench:
        if not (run / "bench.json").exists():
            from slimdit.speed.bench import bench

            write_json(run / "bench.json", bench(str(run / "student"), cfg.teacher, repeats=3).to_json())
        b = read_json(run / "bench.json")
        summary["bench"] = {k: b[k] for k in ("latency_ratio", "param_ratio", "flop_ratio")}
    write_json(run / "summary.json", summary)
    write_card(run / "student", run)  # after the evaluation: the card carries its numbers
    return run


def _start(cfg: StepsConfig, teacher: torch.nn.Module) -> torch.nn.Module:
    """The model the student starts from: the teacher, or ``cfg.student`` checked against it."""
    from slimdit.models import adapter_for
    from slimdit.pipelines.loading import load_transformer, same_base

    if not cfg.student:
        return teacher
    if not same_base(cfg.student, cfg.teacher):
        raise ValueError(f"student {cfg.student} does not run in teacher {cfg.teacher}'s base pipeline: the student "
                         "learns from the teacher's text conditioning and latents, so both need the same text "
                         "encoders and VAE")
    model = load_transformer(cfg.student, dtype=next(teacher.parameters()).dtype)
    if type(model) is not type(teacher):
        raise ValueError(f"student {cfg.student} is a {type(model).__name__}, teacher {cfg.teacher} a "
                         f"{type(teacher).__name__}: a student must be of the teacher's family")
    adapter = adapter_for(teacher)
    student_input, teacher_input = adapter.takes_guidance(model), adapter.takes_guidance(teacher)
    if student_input != teacher_input:
        says = {True: "takes a guidance input", False: "takes no guidance input"}
        raise ValueError(f"student {cfg.student} {says[student_input]} and teacher {cfg.teacher} "
                         f"{says[teacher_input]}: the student samples as the teacher guides, so both must be "
                         "guidance-distilled or neither")
    return model.eval()


@dataclass
class _Round:
    """What a method's loss is built from, for one round."""

    cfg: StepsConfig
    adapter: object
    teacher: torch.nn.Module
    data: object  # slimdit.distill.trainer.Conditioning
    sched_config: dict
    tokens: int | None
    w: float  # the teacher's CFG scale or guidance input
    guided_input: bool  # the teacher takes w as an input (guidance-distilled)
    steps: int  # the round's student steps
    cfg_null: dict | None  # the empty caption's conditioning when the round distils CFG
    run: Path
    state: object  # accelerate's PartialState
    defaults: dict  # the teacher's sampling defaults
    progress: bool
    pipe: object  # the teacher's pipeline (its VAE decodes the pairs a pair_reward scores)
    captions: list[str]  # the data's captions, row for row
    inputs: dict  # the contents of the run's inputs (slimdit.identity.input_fingerprints): what made its pairs


def _progressive(r: _Round):
    from slimdit.distill.progressive import ProgressiveLoss
    from slimdit.distill.steps import midpoints, transitions

    t, s = transitions(r.sched_config, r.steps, r.tokens)
    return ProgressiveLoss(r.adapter, t, s, null=r.cfg_null, guidance=r.w,
                           mid=midpoints(r.sched_config, r.steps, r.tokens)), r.data


def _consistency(r: _Round):
    from slimdit.distill.consistency import ConsistencyLoss, EMATargetConsistencyLoss
    from slimdit.distill.steps import transitions

    t, s = transitions(r.sched_config, r.cfg.solver_steps, r.tokens)
    common = dict(null=r.cfg_null, guidance=r.w, guidance_input=r.guided_input, guidance_range=r.cfg.guidance_range)
    if r.cfg.target_ema is not None:
        return EMATargetConsistencyLoss(r.adapter, t, s, **common, target_ema=r.cfg.target_ema), r.data
    return ConsistencyLoss(r.adapter, t, s, **common), r.data


def _pairs(r: _Round):
    """The teacher's (noise, sample) pairs on its own ``pair_steps`` grid, made once per run: each process makes its
    share of the shards, then every one reads them all. Returns ``(noise, data with the samples as latents)``."""
    from slimdit.distill.reflow import teacher_pairs
    from slimdit.distill.steps import transitions
    from slimdit.distill.trainer import Conditioning

    t, s = transitions(r.sched_config, r.cfg.pair_steps or r.defaults["num_inference_steps"], r.tokens)
    seed, folder = r.cfg.train.seed, r.run / "pairs"
    made_by = {k: r.inputs.get(k) for k in ("teacher", "data.real", "data.synth")}
    if r.cfg.pairs_from:
        from slimdit.distill.reflow import pairs_record, reuse_pairs

        with r.state.main_process_first():  # one process links them; the others find them there
            reuse_pairs(folder, pairs_record(r.teacher, r.data, t, s, r.w, seed, made_by),
                        [Path(p) / "pairs" for p in r.cfg.pairs_from])
    teacher_pairs(r.adapter, r.teacher, r.data, folder, t, s, r.w, seed, progress=r.progress,
                  part=(r.state.process_index, r.state.num_processes), made_by=made_by)
    r.state.wait_for_everyone()
    noise, x0 = teacher_pairs(r.adapter, r.teacher, r.data, folder, t, s, r.w, seed, progress=False, made_by=made_by)
    data = Conditioning(x0, r.data.cond, r.data.null)
    if r.cfg.pair_reward is None:
        return noise, data
    from slimdit.distill.pair_reward import kept_pairs, pair_scores

    with r.state.main_process_first():  # one process scores the pairs; the others read its scores
        scores = pair_scores(r.pipe, r.captions, x0, r.cfg.pair_reward, folder, progress=r.progress)
    noise, data, n = kept_pairs(noise, data, scores, r.cfg.pair_reward_min)
    if r.state.is_main_process:
        write_json(folder / "kept.json", {"reward": r.cfg.pair_reward, "min": r.cfg.pair_reward_min,
                                          "kept": n, "of": len(scores)})
    return noise, data


def _reflow(r: _Round):
    from slimdit.distill.reflow import ReflowLoss

    noise, data = _pairs(r)
    return ReflowLoss(r.adapter, noise, guidance=r.w if r.guided_input else None), data


def _direct(r: _Round):
    from slimdit.distill.direct import DirectLoss
    from slimdit.distill.steps import transitions

    noise, data = _pairs(r)
    t, s = transitions(r.sched_config, r.steps, r.tokens)
    return DirectLoss(r.adapter, noise, t, s, guidance=r.w if r.guided_input else None), data


def _dmd2(r: _Round):
    from slimdit.distill.dmd import DMDLoss
    from slimdit.distill.steps import transitions

    t, s = transitions(r.sched_config, r.steps, r.tokens)
    regression, data = None, r.data
    if r.cfg.regression_weight:  # DMD1: the data rows become the teacher's pairs
        regression, data = _direct(r)
    return DMDLoss(r.adapter, r.teacher, t, s, null=r.cfg_null, guidance=r.w, fake_updates=r.cfg.fake_updates,
                   fake_lr=r.cfg.fake_lr or r.cfg.train.lr, tokens=r.tokens, gan_weight=r.cfg.gan_weight,
                   gan_d_weight=r.cfg.gan_d_weight, gan_unit=r.cfg.gan_unit, regression=regression,
                   regression_weight=r.cfg.regression_weight), data


def _ladd(r: _Round):
    from slimdit.distill.ladd import LADDLoss
    from slimdit.distill.steps import transitions

    t, s = transitions(r.sched_config, r.steps, r.tokens)
    return LADDLoss(r.adapter, r.teacher, t, s, guidance=r.w if r.guided_input else 1.0,
                    disc_lr=r.cfg.disc_lr or r.cfg.train.lr, tokens=r.tokens, units=r.cfg.disc_units,
                    mismatch_weight=r.cfg.mismatch_weight), r.data


LOSSES = {"progressive": _progressive, "consistency": _consistency, "reflow": _reflow, "direct": _direct,
          "dmd2": _dmd2, "ladd": _ladd}


def _sampling(adapter, teacher, steps: int, w: float) -> dict:
    """A few-step student's sampling defaults: its steps, and no CFG (a CFG teacher's guidance is distilled in),
    or the teacher's guidance input scale; the adapter knows its pipeline's knobs for either. ``teacher`` is the
    run's teacher (its students take a guidance input exactly when it does: :func:`_start`)."""
    return {"num_inference_steps": steps, **adapter.guided_sampling(teacher, w if adapter.takes_guidance(teacher)
                                                                     else 1.0)}


def _evaluate(cfg: StepsConfig, run: Path) -> dict:
    from slimdit.metrics.evaluate import saved_or_evaluated

    e, out = cfg.eval, {}
    for name, model in (("teacher", cfg.teacher), ("student", str(run / "student"))):
        path = run / "metrics" / f"{name}.json"
        m = saved_or_evaluated(path, model, e.benchmark, limit=e.limit, images_per_prompt=e.images_per_prompt,
                               seed=e.seed)
        out[f"{name}_metrics"] = {k: m[k] for k in ("overall", "fid", "cmmd") if k in m}
    t, s = out["teacher_metrics"].get("overall"), out["student_metrics"].get("overall")
    out["retained_overall"] = s / t if t else None  # None: the teacher scores 0 (an untrained test model)
    return out
