"""The shapes world's latent space: a small diffusers ``AutoencoderKL`` (32x32 RGB -> 8x8 x C latents), trained
on scenes before the teacher and frozen, so that the shapes teacher is a latent diffusion model as PixArt-Σ is.

The transformer then predicts C values per 4x4 pixel patch instead of 48, and the decoder, which has only ever
produced clean scenes, turns its latents into crisp shapes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimdit.io import write_json
from slimdit.worlds.shapes.checkpoints import resume, save_checkpoint
from slimdit.worlds.shapes.prompts import TrainingSet

DOWNSAMPLE = 4  # three encoder levels: 32x32 pixels -> 8x8 latents
L1_WEIGHT = 0.5  # beside the MSE, for sharp edges
SCALE_SCENES = 2048  # training scenes whose latent std sets the scaling factor (at most 32 batches)


def images_to_tensor(imgs: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def build_vae(width: int, latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(width, 2 * width, 2 * width),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=min(16, width),
                         sample_size=32)


def check_prompts(limit: int | None = None) -> tuple:
    """The evaluation prompts the reconstruction check renders: all of them, or ``limit`` evenly spaced over the set
    (which is stored category by category, so every category is represented once ``limit`` reaches their count)."""
    from slimdit.worlds.shapes.prompts import eval_prompts

    prompts = eval_prompts()
    if limit is None or limit >= len(prompts):
        return prompts
    if limit < 1:
        raise ValueError(f"vae_check_prompts must be at least 1, got {limit}")
    return tuple(prompts[k * len(prompts) // limit] for k in range(limit))


@torch.no_grad()
def reconstruction_accuracy(vae, device, prompts: tuple, n_per_batch: int = 100) -> float:
    """Share of ``prompts`` (:func:`check_prompts`) whose ground-truth render still satisfies the detector after
    encode-decode: the ceiling the latent space puts on any teacher that samples in it."""
    from slimdit.worlds.shapes.detector import detect, prompt_holds
    from slimdit.worlds.shapes.prompts import render_prompt

    ok = 0
    for i in range(0, len(prompts), n_per_batch):
        chunk = prompts[i:i + n_per_batch]
        imgs = np.stack([render_prompt(p, np.random.default_rng((7, i + j))) for j, p in enumerate(chunk)])
        rec = vae.decode(vae.encode(images_to_tensor(imgs).to(device)).latent_dist.mode()).sample
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        ok += sum(prompt_holds(p, detect(im)) for p, im in zip(chunk, rec))
    return ok / len(prompts)


def train_vae(run: Path, cfg, device: torch.device, deadline: float | None, build=None):
    """Train (or resume, or load when finished) the autoencoder of teacher run ``run``; returns it frozen, or
    None when ``deadline`` (a ``time.time()`` value) stopped it first. The finished VAE is ``run/vae``.
    ``build(width, latent_channels)`` makes the untrained autoencoder (default: :func:`build_vae`, x4)."""
    from diffusers import AutoencoderKL

    final = run / "vae"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final).to(device).requires_grad_(False).eval()
    folder = run / "vae_checkpoints"
    torch.manual_seed(cfg.seed)
    vae = (build or build_vae)(cfg.vae_width, cfg.latent_channels).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    step, elapsed = resume(folder, {"vae": vae}, {}, opt, device)
    data, t_start = TrainingSet(cfg.seed + 1), time.time()
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="autoencoder", unit="step", dynamic_ncols=True)
    while step < cfg.vae_steps:
        _, imgs = data.batch(step * cfg.batch_size, cfg.batch_size)
        x = images_to_tensor(imgs).to(device)
        g = torch.Generator().manual_seed(int(np.random.default_rng((cfg.seed, 2, step)).integers(2**62)))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + L1_WEIGHT * F.l1_loss(rec, x) + cfg.vae_kl_weight * post.kl().mean()
        warm = min(1.0, (step + 1) / 100)
        for group in opt.param_groups:  # warm-up, then cosine to zero
            group["lr"] = cfg.vae_lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        stop = deadline is not None and time.time() > deadline
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps or stop:
            save_checkpoint(folder, step, {"vae": vae}, {}, opt, elapsed + time.time() - t_start, 1)
        if stop and step < cfg.vae_steps:
            bar.close()
            return None
    bar.close()
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # unit-variance latents, as PixArt's VAE scaling factor gives
        n = min(SCALE_SCENES, 32 * cfg.batch_size)
        _, imgs = TrainingSet(cfg.seed + 2).batch(0, n)
        z = torch.cat([vae.encode(images_to_tensor(imgs[i:i + 256]).to(device)).latent_dist.mode()
                       for i in range(0, n, 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    if getattr(vae.config, "shift_factor", None) is not None:  # Flux's VAE centres its latents too
        vae.register_to_config(shift_factor=float(z.mean()))
    vae.save_pretrained(final, safe_serialization=True)
    checked = check_prompts(cfg.vae_check_prompts)
    write_json(run / "vae_quality.json", {"steps": step, "elapsed_s": round(elapsed + time.time() - t_start, 1),
                                          "latent_std": float(z.std()), "latent_mean": float(z.mean()),
                                          "reconstruction_geneval_accuracy": reconstruction_accuracy(vae, device,
                                                                                                     checked),
                                          "reconstruction_prompts": len(checked)})
    return vae
