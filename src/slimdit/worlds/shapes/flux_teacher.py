"""The shapes-flux recipe, made the way Flux-dev was made.

1. An ``AutoencoderKL`` with one downsampling (32x32 pixels -> 16x16 x 4 latents, 64 tokens after 2x2 packing),
   trained on scenes and frozen.
2. The base: a ``FluxTransformer2DModel`` without a guidance embedding, with a tiny CLIP (pooled vector) and the
   shapes T5 (token sequence), trained together by rectified flow (velocity target, the scheduler's shift) with
   caption dropout, so that it samples with true classifier-free guidance.
3. Guidance distillation (:mod:`slimdit.distill.guidance`, slimdit's own trainer): a ``guidance_embeds=True`` copy
   learns the base's CFG output in one pass per step; the result is ``shapes-flux``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from slimdit.io import load_tensors, read_json, write_json
from slimdit.worlds.shapes.checkpoints import checkpoints, load_into
from slimdit.worlds.shapes.flux import SAMPLING, FluxShape, build_pipeline, build_vae
from slimdit.worlds.shapes.loop import TeacherLoop
from slimdit.worlds.shapes.prompts import TrainingSet


@dataclass
class FluxTeacherConfig:
    # autoencoder
    latent_channels: int = 4
    vae_width: int = 16
    vae_steps: int = 2500
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_check_prompts: int = 300  # evaluation prompts the finished autoencoder's reconstruction is checked on
    # transformer and text encoders (FluxShape)
    double: int = 4
    single: int = 8
    heads: int = 4
    head_dim: int = 24
    t5_dim: int = 64
    t5_layers: int = 2
    clip_dim: int = 32
    clip_layers: int = 1
    # Flux-dev's T5 was trained before the transformer and frozen while it learned: a pipeline (a built-in name or
    # a directory) whose T5 ``text_encoder`` starts ours, and whether it then stays frozen
    t5_from: str = ""
    freeze_t5: bool = False
    # what every query and key RMSNorm weight starts at. Flux normalises queries and keys, so an attention logit is
    # at most sqrt(head_dim) times the product of the two norms' weights: about 4.9 at this head_dim (24) with the
    # weights at 1, against 11.3 at Flux-dev's 128. Trained bases kept these weights near 1 (means 0.8-1.5 per
    # block), while shapes-pixart (the same heads, no query/key norm) binds attributes; whether the bound is what
    # holds binding back is what a run at 1.5 (a bound near Flux-dev's) tests. Read only when a run starts.
    qk_norm_init: float = 1.0
    # base training
    steps: int = 30000
    batch_size: int = 64
    lr: float = 8e-4
    warmup: int = 200
    anneal_start: int = 0  # 0: constant after warm-up; else a cosine from here to 0 at ``steps``
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    # the share of (kept) captions whose pooled CLIP vector alone is dropped (the empty caption's, while T5 keeps
    # the caption). A jointly trained CLIP turns the pooled vector into a bag of words that every block's adaLN
    # reads: given the empty caption's pooled vector, the w128 base (trained at 0) falls from 0.633 to 0.208 on
    # 60 x 2, colours to 0.05. Its joint attention hardly carries the caption, so nothing binds attributes to
    # objects; dropping the pooled vector alone makes the attention carry it.
    pooled_dropout: float = 0.0
    # which latent of an image the base learns: a draw from the autoencoder's posterior ("sample", as diffusers'
    # trainers do), or its mean ("mean"). This autoencoder's posterior is wide (std about 0.47 against 0.69 for the
    # means; shapes-pixart's: 0.15 against 0.84), so a draw adds noise the base must learn to make.
    latents: str = "sample"
    text_lr_scale: float = 0.1
    weighting: str = "logit_normal"  # timestep density (diffusers' compute_density_for_timestep_sampling)
    cfg_scale: float = 3.5  # the base's true-CFG scale when it samples
    seed: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 1
    threads: int = 0
    device: str = "auto"

    def shape(self, guidance_embeds: bool = False) -> FluxShape:
        return FluxShape(self.double, self.single, self.heads, self.head_dim, self.t5_dim, self.t5_layers,
                         self.clip_dim, self.clip_layers, self.latent_channels, self.vae_width, guidance_embeds)


# what may change when a run resumes: how long, where and how fast; never what is learned
RESUMABLE = frozenset({"steps", "threads", "device", "checkpoint_every", "keep_checkpoints", "vae_check_prompts"})
# what a branch (``--from``) may change: how the optimisation goes on, never the architecture or the prediction
# target (the latents it learns may switch from posterior draws to their means)
BRANCHABLE = frozenset({"anneal_start", "lr", "ema_decay", "grad_clip", "weight_decay", "caption_dropout",
                        "pooled_dropout", "text_lr_scale", "weighting", "latents"})


def flux_config(run_dir: str | Path, fields: dict | None = None) -> FluxTeacherConfig:
    """The recipe of run ``run_dir``: its saved one (only :data:`RESUMABLE` fields of ``fields`` apply, and another
    recipe field is an error naming it), else the defaults with ``fields``."""
    known = set(FluxTeacherConfig.__dataclass_fields__)
    unknown = sorted(set(fields or {}) - known)
    if unknown:
        raise ValueError(f"unknown shapes-flux recipe field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    saved = Path(run_dir) / "config.json"
    if not saved.exists():
        return _checked(FluxTeacherConfig(**(fields or {})))
    # a run saved before a field existed has that field's default
    base = {**asdict(FluxTeacherConfig()), **read_json(saved)}
    free = RESUMABLE - ({"steps"} if base.get("anneal_start") else set())  # the anneal ends at ``steps``
    changed = sorted(k for k, v in (fields or {}).items() if k not in free and base.get(k) != v)
    if changed:
        raise ValueError(f"{run_dir} holds a run with another recipe ({', '.join(changed)} differ); use a new "
                         "directory, or leave these fields out to resume")
    return _checked(FluxTeacherConfig(**{**base, **{k: v for k, v in (fields or {}).items() if k in RESUMABLE}}))


def _checked(cfg: FluxTeacherConfig) -> FluxTeacherConfig:
    from slimdit.worlds.shapes.autoencoder import check_prompts

    if cfg.latents not in ("sample", "mean"):
        raise ValueError(f"latents must be 'sample' or 'mean', got {cfg.latents!r}")
    if not 0.0 <= cfg.pooled_dropout < 1.0:
        raise ValueError(f"pooled_dropout must lie in [0, 1), got {cfg.pooled_dropout}")
    if not cfg.qk_norm_init > 0:  # NaN too
        raise ValueError(f"qk_norm_init must be positive, got {cfg.qk_norm_init}")
    check_prompts(cfg.vae_check_prompts)  # refuses a count under 1 before any training
    if cfg.freeze_t5 and not cfg.t5_from:
        raise ValueError("freeze_t5 needs t5_from: a T5 trained from scratch cannot stay frozen")
    if cfg.anneal_start and not 0 < cfg.anneal_start < cfg.steps:
        raise ValueError(f"anneal_start must lie between 0 and steps ({cfg.steps}), got {cfg.anneal_start}")
    return cfg


def branch_flux_run(source: str | Path, run_dir: str | Path, recipe: dict,
                    step: int | None = None) -> FluxTeacherConfig:
    """Start run ``run_dir`` from checkpoint ``step`` (default: the last) of the shapes-flux run ``source``, with
    the optimisation fields in ``recipe`` changed from then on (e.g. ``anneal_start`` and ``steps`` to anneal a
    constant-rate run); see :func:`slimdit.worlds.shapes.branch.branch_run`."""
    from slimdit.worlds.shapes.branch import branch_run

    return branch_run(source, run_dir, recipe, step, config=flux_config, branchable=BRANCHABLE,
                      resumable=RESUMABLE)


def pretrained_t5(cfg: FluxTeacherConfig):
    """The T5 of pipeline ``cfg.t5_from`` (None when not set), checked against the recipe's T5 shape."""
    if not cfg.t5_from:
        return None
    from transformers import T5EncoderModel

    from slimdit.pipelines.loading import resolve_model_dir

    root = Path(resolve_model_dir(cfg.t5_from))
    index = read_json(root / "model_index.json") if (root / "model_index.json").exists() else {}
    names = [k for k, v in index.items() if isinstance(v, list) and v[-1] == "T5EncoderModel"]
    if not names:
        raise FileNotFoundError(f"t5_from={cfg.t5_from!r}: {root} is not a pipeline with a T5EncoderModel component")
    folder = root / names[0]
    t5 = T5EncoderModel.from_pretrained(folder)
    from slimdit.worlds.shapes.text import build_tokenizer

    if t5.config.vocab_size != len(build_tokenizer()):
        raise ValueError(f"t5_from={cfg.t5_from!r} holds a T5 over {t5.config.vocab_size} tokens; the shapes "
                         f"tokenizer has {len(build_tokenizer())}")
    got = (t5.config.d_model, t5.config.num_layers)
    if got != (cfg.t5_dim, cfg.t5_layers):
        raise ValueError(f"t5_from={cfg.t5_from!r} holds a T5 of width {got[0]} and {got[1]} layers; the recipe asks "
                         f"for t5_dim={cfg.t5_dim}, t5_layers={cfg.t5_layers}")
    return t5


def _vae(cfg: FluxTeacherConfig):
    return lambda width, channels: build_vae(cfg.shape())


def _objective(pipe, weighting: str):
    from slimdit.distill.objectives import objective_for

    obj = objective_for(pipe.scheduler.config)
    obj.weighting = weighting
    return obj


def _device(cfg: FluxTeacherConfig) -> torch.device:
    return torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                        "cpu" if cfg.device == "auto" else cfg.device)


def train_flux_base(run_dir: str | Path, cfg: FluxTeacherConfig | None = None,
                    max_minutes: float | None = None) -> Path:
    """Train (or resume) the autoencoder, then the CFG base, in ``run_dir``."""
    from slimdit.models.flux import FluxAdapter
    from slimdit.worlds.shapes.autoencoder import images_to_tensor, train_vae

    run = Path(run_dir)
    cfg = flux_config(run, asdict(cfg) if cfg is not None else None)
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "config.json", asdict(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg)
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes
    vae = train_vae(run, cfg, device, deadline, build=_vae(cfg))
    if vae is None:
        return run
    t5 = pretrained_t5(cfg)  # loaded, not drawn: the seeded draws below then start at the CLIP and transformer
    torch.manual_seed(cfg.seed)
    pipe = build_pipeline(cfg.shape(), vae=vae, text_encoder_2=t5).to(device)
    scale_qk_norms(pipe.transformer, cfg.qk_norm_init)  # a resumed run's checkpoint then overwrites them
    modules = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
               "text_encoder_2": pipe.text_encoder_2}
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
    texts = ("text_encoder",) if cfg.freeze_t5 else ("text_encoder", "text_encoder_2")
    pipe.text_encoder_2.requires_grad_(not cfg.freeze_t5)
    groups = [{"params": list(pipe.transformer.parameters()), "lr_scale": 1.0},
              {"params": [p for k in texts for p in modules[k].parameters()], "lr_scale": cfg.text_lr_scale}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    objective, adapter = _objective(pipe, cfg.weighting), FluxAdapter()
    params = [p for grp in groups for p in grp["params"]]
    loop = TeacherLoop(run, cfg, modules, ema, opt, params, device, deadline, "flux base")
    data = TrainingSet(cfg.seed)
    while loop.running:
        step = loop.step
        rng = np.random.default_rng((cfg.seed, 1, step))
        caps, imgs = data.batch(step * cfg.batch_size, cfg.batch_size)
        caps = ["" if d else c for c, d in zip(caps, rng.random(len(caps)) < cfg.caption_dropout)]
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        clip_caps = _drop_pooled(caps, cfg, step)
        with torch.no_grad():
            post = vae.encode(images_to_tensor(imgs).to(device)).latent_dist
            x0 = post.sample(generator=g) if cfg.latents == "sample" else post.mean
            x0 = (x0 - vae.config.shift_factor) * vae.config.scaling_factor
        emb, pooled, _ = pipe.encode_prompt(clip_caps, prompt_2=caps, device=device, max_sequence_length=SAMPLING[
            "max_sequence_length"])  # the pipeline's own encoding, with gradients into both text encoders
        eps = torch.randn(x0.shape, generator=g).to(device)
        t = objective.sample_t(x0.shape[0], g, adapter.image_tokens(pipe.transformer, x0)).to(device)
        xt, target = objective.noise(x0, eps, t)
        pred = adapter.predict(pipe.transformer, xt, t, {"prompt_embeds": emb, "pooled_prompt_embeds": pooled})
        if loop.update(F.mse_loss(pred, target)):
            break
    loop.close()
    return run


def scale_qk_norms(transformer: torch.nn.Module, value: float) -> int:
    """Set every query/key RMSNorm weight of a ``FluxTransformer2DModel`` (both streams) to ``value``; returns how
    many norms it set. The model stays a plain diffusers one: only the starting weights change."""
    names = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    norms = [m for n, m in transformer.named_modules() if n.rpartition(".")[2] in names and m.weight is not None]
    with torch.no_grad():
        for m in norms:
            m.weight.fill_(value)
    return len(norms)


def _drop_pooled(caps: list[str], cfg: FluxTeacherConfig, step: int) -> list[str]:
    """The captions CLIP reads at ``step`` (FluxPipeline's ``prompt``; T5 reads ``caps`` as ``prompt_2``): a share
    ``cfg.pooled_dropout`` of them emptied, drawn apart from the batch's stream (tag 1), so that a recipe at 0
    draws exactly as before. (Tag 2 is also the autoencoder's noise, a phase that trains another model.)"""
    if not cfg.pooled_dropout:
        return caps
    drop = np.random.default_rng((cfg.seed, 2, step)).random(len(caps)) < cfg.pooled_dropout
    return ["" if d else c for c, d in zip(caps, drop)]


def export_flux_base(run_dir: str | Path, out_dir: str | Path, use_ema: bool = False,
                     empty_pooled: bool = False) -> Path:
    """Write the base of a run as a ``FluxPipeline`` directory that samples with true CFG. ``empty_pooled`` writes
    an ablation instead: its CLIP gives every prompt the empty caption's pooled vector, so whatever the model still
    draws right reached it through T5 and the joint attention."""
    from diffusers import AutoencoderKL

    run = Path(run_dir)
    cfg = FluxTeacherConfig(**read_json(run / "config.json"))
    cks = checkpoints(run / "checkpoints")
    if not cks:
        raise FileNotFoundError(f"no checkpoint under {run / 'checkpoints'}")
    pipe = build_pipeline(cfg.shape(), vae=AutoencoderKL.from_pretrained(run / "vae"))
    load_into({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
               "text_encoder_2": pipe.text_encoder_2},
              load_tensors(cks[-1] / ("ema.safetensors" if use_ema else "model.safetensors")))
    if empty_pooled:
        _pool_as_empty(pipe)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    state = read_json(cks[-1] / "state.json")
    sampling = {**SAMPLING, "guidance_scale": 1.0, "true_cfg_scale": cfg.cfg_scale, "negative_prompt": ""}
    trained = {"steps": state["step"], "ema": use_ema, "config": asdict(cfg)}
    write_json(out / "slimdit.json", {"world": "shapes", "sampling": sampling, "trained": trained,
                                      **({"ablation": "every prompt's pooled vector is the empty caption's"}
                                         if empty_pooled else {})})
    return out


@torch.no_grad()
def _pool_as_empty(pipe) -> None:
    """Make ``pipe``'s CLIP return the empty caption's pooled vector for every prompt: the pooled output is read
    from the final layer norm, whose scale goes to 0 and whose shift becomes that vector."""
    _, empty, _ = pipe.encode_prompt([""], prompt_2=None, device=pipe.transformer.device,
                                     max_sequence_length=SAMPLING["max_sequence_length"])
    norm = pipe.text_encoder.final_layer_norm
    norm.weight.zero_()
    norm.bias.copy_(empty[0])


def guided_student(base_transformer, seed: int = 0):
    """A ``guidance_embeds=True`` copy of a base Flux transformer: the base's weights, and a guidance embedder whose
    output layer starts at zero, so the student starts as the base's conditional prediction (its input layer is
    drawn from ``seed``)."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = FluxTransformer2DModel.from_config({**base_transformer.config, "guidance_embeds": True})
    missing, unexpected = student.load_state_dict(base_transformer.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_text_embed.guidance_embedder.") for k in missing):
        raise ValueError(f"the base does not fit a guidance-embedded copy: missing {missing}, unexpected {unexpected}")
    last = student.time_text_embed.guidance_embedder.linear_2
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return student


# training settings that may change under a guidance distillation: how long, and how often it logs and checkpoints
BOOKKEEPING = ("steps", "checkpoint_every", "log_every", "keep_checkpoints")


def _claim_guidance_run(run: Path, base_dir, data: str, w_range, fields: dict) -> None:
    """Record what a guidance distillation in ``run`` is made from (``made_by.json``: the base's files, the data,
    the guidance range, the training settings but :data:`BOOKKEEPING`) and refuse a run whose checkpoints were
    made from anything else, naming each change. A run with no checkpoint yet is taken over (its cached
    conditioning, keyed by the base's path, is dropped). Checkpoints from before this record are continued, and
    recorded."""
    import shutil
    import sys

    from slimdit.identity import changed_fields, spec_contents
    from slimdit.pipelines.loading import model_fingerprint

    record = json.loads(json.dumps({"base": model_fingerprint(str(base_dir)), "data": spec_contents(data),
                                    "w_range": list(w_range),
                                    "train": {k: v for k, v in fields.items() if k not in BOOKKEEPING}}))
    path, started = run / "made_by.json", next(run.glob("checkpoints/step_*"), None) is not None
    changes = changed_fields(read_json(path), record) if path.exists() else []
    if changes and started:
        raise ValueError(f"{run} holds a guidance distillation made from other inputs; restore them or choose "
                         "another run directory:\n  " + "\n  ".join(changes))
    if changes:
        print(f"slimdit: {run} held no checkpoint yet; starting it with the new inputs", file=sys.stderr)
        shutil.rmtree(run / "cache", ignore_errors=True)
    run.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


def guidance_distill(base_dir: str | Path, run_dir: str | Path, out_dir: str | Path, data: str = "shapes-train:8192",
                     train: dict | None = None, w_range: tuple[float, float] = (1.0, 5.0),
                     progress: bool = True) -> Path:
    """Guidance-distil the base pipeline ``base_dir`` on ``data`` with slimdit's trainer (resumable in
    ``run_dir``); write the guided ``FluxPipeline`` to ``out_dir``, sampling at guidance 3.5 in one pass."""
    from slimdit.data.cache import cached_conditioning
    from slimdit.data.datasets import load_dataset
    from slimdit.distill.guidance import GuidanceLoss
    from slimdit.distill.trainer import TrainConfig, Trainer
    from slimdit.models import adapter_for
    from slimdit.pipelines.loading import load_pipeline, save_pipeline_with

    fields = {"steps": 2000, "optimizer": "adamw", "lr": 1e-4, "warmup_steps": 100, "batch_size": 64,
              "grad_clip": 1.0, "caption_dropout": 0.0, "checkpoint_every": 250, "val_every": 0,
              "lr_schedule": "cosine", **(train or {})}
    tcfg = TrainConfig(**fields)  # refuses bad settings before anything is recorded
    _claim_guidance_run(Path(run_dir), base_dir, data, w_range, fields)
    pipe = load_pipeline(str(base_dir))
    teacher = pipe.transformer.eval()
    student = guided_student(teacher, (train or {}).get("seed", 0))
    adapter = adapter_for(student, pipe.scheduler.config)
    cond = cached_conditioning(pipe, str(base_dir), load_dataset(data), Path(run_dir) / "cache",
                               SAMPLING["max_sequence_length"])
    trainer = Trainer(adapter, teacher, student, cond, tcfg, run_dir,
                      loss=GuidanceLoss(adapter, cond.null, *w_range))
    trainer.train(progress=progress)
    out = save_pipeline_with(pipe, trainer.student_model(), out_dir)
    base = read_json(Path(base_dir) / "slimdit.json")
    write_json(Path(out) / "slimdit.json", {
        "world": "shapes", "sampling": {**SAMPLING, "guidance_scale": base["sampling"]["true_cfg_scale"]},
        "trained": {"guidance_distilled_from": str(base_dir), "w_range": list(w_range), "train": fields,
                    "base": base.get("trained")}})
    return Path(out)
