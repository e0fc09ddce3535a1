"""The shapes teacher recipe: a small AutoencoderKL trained on scenes and frozen, then a real
PixArtTransformer2DModel and a tiny T5 encoder trained together on its latents with PixArt's DDPM objective
(v-prediction by default, caption dropout 0.1), exported as a diffusers ``PixArtSigmaPipeline`` directory.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slimdit.distill.lr import warmup_cosine
from slimdit.distill.objectives import DDPM
from slimdit.io import load_tensors, read_json, write_json
from slimdit.worlds.shapes.autoencoder import check_prompts, images_to_tensor
from slimdit.worlds.shapes.checkpoints import checkpoints, load_into
from slimdit.worlds.shapes.loop import TeacherLoop
from slimdit.worlds.shapes.prompts import TrainingSet
from slimdit.worlds.shapes.text import MAX_SEQUENCE_LENGTH, build_text_encoder, build_tokenizer


@dataclass
class TeacherConfig:
    # latent space: an AutoencoderKL (32x32 RGB -> 8x8 x latent_channels) trained first, then frozen;
    # latent_channels 0 trains in pixel space instead (runs saved before the autoencoder existed)
    latent_channels: int = 8
    vae_width: int = 16  # encoder/decoder channels (w, 2w, 2w)
    vae_steps: int = 2500
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # evaluation prompts whose renders the finished autoencoder's reconstruction is checked on (all 300 by default;
    # fewer for quick trials and tests: it only measures)
    vae_check_prompts: int = 300
    # transformer: 12 PixArt blocks, hidden 96, patch 1 on 8x8 latents (patch 4 on 32x32 pixels): 64 tokens
    num_layers: int = 12
    num_attention_heads: int = 4
    attention_head_dim: int = 24
    patch_size: int = 1
    text_dim: int = 64
    text_layers: int = 2
    # training
    steps: int = 30000
    batch_size: int = 64
    lr: float = 8e-4
    warmup: int = 200
    # 0 keeps the learning rate constant after warm-up; otherwise it follows a cosine from ``lr`` at this step
    # down to 0 at ``steps`` (set it on a branch of a finished constant-rate run: ``slimdit teacher train --from``)
    anneal_start: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    # the text encoder's learning rate relative to ``lr`` (0 keeps it at its random initialisation)
    text_lr_scale: float = 0.1
    # target-MSE weight clamp(1/SNR(t), 1, high_noise_weight): 1 keeps uniform weighting; larger values
    # give high-noise steps, where the caption decides the layout, up to that much more weight
    high_noise_weight: float = 1.0
    # what the transformer predicts: "v_prediction" (v = sqrt(a) eps - sqrt(1 - a) x0) or "epsilon" (PixArt's);
    # see docs/methods.md for why the pixel-space shapes teacher predicts v
    prediction_type: str = "v_prediction"
    # timestep sampling: a share ``focus_share`` of each batch is drawn uniformly below ``focus_timesteps``, the
    # rest over all 1000. On sparse 32x32 scenes objects are barely detectable in x_t above t ~ 700, so uniform
    # sampling spends about 30 % of training where only the caption-conditional mean can be learned.
    focus_timesteps: int = 700
    focus_share: float = 0.5
    seed: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 1
    threads: int = 0  # 0 = torch default
    device: str = "auto"  # auto | cpu | cuda
    data_workers: int = 0  # processes rendering batches ahead (a GPU outruns one CPU core)


# runs saved before a recipe field existed trained with these values
LEGACY_FIELDS = {"latent_channels": 0, "text_lr_scale": 1.0, "high_noise_weight": 1.0, "prediction_type": "epsilon",
                 "focus_share": 0.0}


def saved_config(run_dir: str | Path) -> TeacherConfig:
    """The recipe a run directory was trained with."""
    return TeacherConfig(**{**LEGACY_FIELDS, **read_json(Path(run_dir) / "config.json")})


# what may change when a run resumes: how long, where and how fast; never what is learned
RESUMABLE_FIELDS = frozenset({"steps", "threads", "device", "data_workers", "checkpoint_every", "keep_checkpoints",
                              "vae_check_prompts"})


def teacher_config(run_dir: str | Path, recipe: dict | None = None, **resumable) -> TeacherConfig:
    """The config for ``run_dir``: its saved recipe when it exists, else the defaults with ``recipe`` applied.

    ``resumable`` fields always apply; a recipe field that differs from a saved run's is an error that names it.
    """
    fields = set(TeacherConfig.__dataclass_fields__)
    unknown = sorted(set(recipe or {}) - fields) + sorted(set(resumable) - RESUMABLE_FIELDS)
    if unknown:
        raise ValueError(f"unknown or non-resumable teacher field(s): {', '.join(unknown)}; "
                         f"recipe fields are {', '.join(sorted(fields - RESUMABLE_FIELDS))}")
    saved = Path(run_dir) / "config.json"
    base = asdict(saved_config(run_dir)) if saved.exists() else asdict(TeacherConfig())
    if saved.exists():
        changed = sorted(k for k, v in (recipe or {}).items() if base[k] != v)
        if changed:
            raise ValueError(f"{run_dir} holds a run with another config ({', '.join(changed)} differ); "
                             "use a new directory, or leave these fields out to resume")
    cfg = TeacherConfig(**{**base, **(recipe or {}), **resumable})
    if not (0.0 <= cfg.focus_share <= 1.0 and 1 <= cfg.focus_timesteps <= 1000):
        raise ValueError(f"focus_share must be in [0, 1] and focus_timesteps in [1, 1000], got "
                         f"{cfg.focus_share} and {cfg.focus_timesteps}")
    if cfg.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {cfg.prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    if cfg.anneal_start and not 0 < cfg.anneal_start < cfg.steps:
        raise ValueError(f"anneal_start must lie between 0 and steps ({cfg.steps}), got {cfg.anneal_start}")
    check_prompts(cfg.vae_check_prompts)  # refuses a count under 1 before any training
    return cfg


def lr_factor(cfg: TeacherConfig, step: int) -> float:
    """The learning rate of ``step`` relative to ``cfg.lr``: linear warm-up, then constant or a cosine anneal."""
    return warmup_cosine(step, cfg.warmup, cfg.steps, cfg.anneal_start or None)


# what a branch may change: how the optimisation goes on, never the architecture or the target
BRANCHABLE_FIELDS = frozenset({"anneal_start", "lr", "ema_decay", "grad_clip", "weight_decay", "caption_dropout",
                               "text_lr_scale", "high_noise_weight", "focus_timesteps", "focus_share"})


def branch_run(source: str | Path, run_dir: str | Path, recipe: dict, step: int | None = None) -> TeacherConfig:
    """Start run ``run_dir`` from checkpoint ``step`` (default: the last) of run ``source`` with the optimisation
    fields in ``recipe`` changed from then on (:func:`slimdit.worlds.shapes.branch.branch_run`)."""
    from slimdit.worlds.shapes.branch import branch_run as branch

    return branch(source, run_dir, recipe, step, config=lambda run, fields: teacher_config(run, fields),
                  branchable=BRANCHABLE_FIELDS, resumable=RESUMABLE_FIELDS)


PREDICTION_TYPES = ("epsilon", "v_prediction")  # the DDPM targets distillation knows


def build_transformer(cfg: TeacherConfig):
    from diffusers import PixArtTransformer2DModel

    from slimdit.worlds.shapes.autoencoder import DOWNSAMPLE

    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    channels = cfg.latent_channels or 3
    return PixArtTransformer2DModel(
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=channels,
        out_channels=channels,
        num_layers=cfg.num_layers,
        cross_attention_dim=hidden,
        sample_size=32 // DOWNSAMPLE if cfg.latent_channels else 32,
        patch_size=cfg.patch_size,
        caption_channels=cfg.text_dim,
        use_additional_conditions=False,
    )


def build_noise_scheduler(prediction_type: str = "epsilon"):
    """The PixArt training schedule: 1000-step DDPM, linear betas 1e-4..2e-2, epsilon (or v) prediction."""
    from diffusers import DDPMScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         prediction_type=prediction_type)


def build_pipeline(tokenizer, text_encoder, transformer, prediction_type: str = "epsilon", vae=None):
    """Assemble a diffusers PixArtSigmaPipeline sampling with DPM-Solver++; without ``vae``, in pixel space."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from slimdit.worlds.shapes.pixel_vae import PixelSpaceVAE

    sched = DPMSolverMultistepScheduler.from_config(build_noise_scheduler(prediction_type).config,
                                                    algorithm_type="dpmsolver++",
                                                    solver_order=2)
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder,
                               vae=vae if vae is not None else PixelSpaceVAE(), transformer=transformer,
                               scheduler=sched)


def _encode(tokenizer, text_encoder, captions: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    tok = tokenizer(captions, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                    return_tensors="pt").to(device or "cpu")
    hidden = text_encoder(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state  # (B, L, D)
    return hidden, tok.attention_mask


def _render_batch(args: tuple[int, int, int]) -> tuple[list[str], np.ndarray]:
    seed, start, n = args
    return TrainingSet(seed).batch(start, n)


def _batch_stream(data: TrainingSet, cfg: TeacherConfig, step: int):
    """Yield the batches of steps ``step, step+1, ...``; with workers, render them ahead in other processes."""
    jobs = ((cfg.seed, s * cfg.batch_size, cfg.batch_size) for s in itertools.count(step))
    if cfg.data_workers <= 0:
        yield from map(_render_batch, jobs)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(cfg.data_workers) as pool:
        pending = [pool.submit(_render_batch, next(jobs)) for _ in range(2 * cfg.data_workers)]
        while True:
            yield pending.pop(0).result()
            pending.append(pool.submit(_render_batch, next(jobs)))


def train_teacher(run_dir: str | Path, cfg: TeacherConfig | None = None, max_minutes: float | None = None) -> Path:
    """Train the shapes teacher from scratch, or resume from the last checkpoint in ``run_dir``.

    Data item i depends only on (seed, i) and the noise of step s only on (seed, s), so a resumed run
    continues exactly where it stopped.
    """
    run = Path(run_dir)
    if (run / "config.json").exists():
        given = asdict(cfg) if cfg is not None else {}
        cfg = teacher_config(run, {k: v for k, v in given.items() if k not in RESUMABLE_FIELDS},
                             **{k: v for k, v in given.items() if k in RESUMABLE_FIELDS})
    cfg = cfg or TeacherConfig()
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "config.json", asdict(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    vae = None
    if cfg.latent_channels:
        from slimdit.worlds.shapes.autoencoder import train_vae

        vae = train_vae(run, cfg, device, deadline)
        if vae is None:  # stopped by max_minutes while the autoencoder trained
            return run
        torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), cfg.text_dim, cfg.text_layers).to(device)
    transformer = build_transformer(cfg).to(device)
    modules = {"transformer": transformer, "text_encoder": text_encoder}
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
    params = [p for m in modules.values() for p in m.parameters()]
    if cfg.text_lr_scale == 1.0:  # one group, as in runs saved before this option existed
        groups = [{"params": params, "lr_scale": 1.0}]
    else:
        groups = [{"params": list(transformer.parameters()), "lr_scale": 1.0}]
        if cfg.text_lr_scale > 0:
            groups.append({"params": list(text_encoder.parameters()), "lr_scale": cfg.text_lr_scale})
        else:
            text_encoder.requires_grad_(False)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = build_noise_scheduler(cfg.prediction_type)
    alphas = sched.alphas_cumprod.to(device)
    objective = DDPM(alphas, cfg.prediction_type)  # x_t and the target, on the scheduler's own alphas

    loop = TeacherLoop(run, cfg, modules, ema, opt, params, device, deadline, "teacher")
    batches = _batch_stream(TrainingSet(cfg.seed), cfg, loop.step)
    while loop.running:
        step = loop.step
        rng = np.random.default_rng((cfg.seed, 1, step))
        caps, imgs = next(batches)
        caps = ["" if d else c for c, d in zip(caps, rng.random(len(caps)) < cfg.caption_dropout)]
        x0 = images_to_tensor(imgs).to(device)
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        if vae is not None:
            with torch.no_grad():
                x0 = vae.encode(x0).latent_dist.sample(generator=g) * vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=g)
        if cfg.focus_share > 0:  # a share of the batch drawn below focus_timesteps instead
            focused = torch.randint(0, cfg.focus_timesteps, (x0.shape[0],), generator=g)
            t = torch.where(torch.rand(x0.shape[0], generator=g) < cfg.focus_share, focused, t)
        t = t.to(device)
        xt, target = objective.noise(x0, noise, t)
        emb, mask = _encode(tokenizer, text_encoder, caps, device)
        pred = transformer(xt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        if cfg.high_noise_weight > 1.0:
            w = ((1 - alphas[t]) / alphas[t]).clamp(1.0, cfg.high_noise_weight)
            loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        else:
            loss = F.mse_loss(pred, target)
        if loop.update(loss):
            break
    loop.close()
    return run


def export_teacher(run_dir: str | Path, out_dir: str | Path, use_ema: bool = True, step: int | None = None) -> Path:
    """Write the (EMA) weights of a teacher run as a diffusers PixArtSigmaPipeline directory."""
    run = Path(run_dir)
    cfg = saved_config(run)
    cks = checkpoints(run / "checkpoints")
    if not cks:
        raise FileNotFoundError(f"no checkpoint under {run / 'checkpoints'}")
    ck = cks[-1] if step is None else run / "checkpoints" / f"step_{step:07d}"
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), cfg.text_dim, cfg.text_layers)
    transformer = build_transformer(cfg)
    load_into({"transformer": transformer, "text_encoder": text_encoder},
               load_tensors(ck / ("ema.safetensors" if use_ema else "model.safetensors")))
    vae = None
    if cfg.latent_channels:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(run / "vae")
    pipe = build_pipeline(tokenizer, text_encoder, transformer, cfg.prediction_type, vae)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    state = read_json(ck / "state.json")
    write_json(out / "slimdit.json", {
        "world": "shapes",
        "sampling": {"num_inference_steps": 20, "guidance_scale": 3.5, "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "trained": {"steps": state["step"], "elapsed_s": round(state["elapsed_s"], 1), "ema": use_ema,
                    "hardware": read_json(run / "hardware.json") if (run / "hardware.json").exists() else None,
                    "config": asdict(cfg)},
    })
    return out
