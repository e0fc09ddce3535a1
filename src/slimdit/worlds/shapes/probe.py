"""What a denoiser believes at each noise level: one-step x0 guesses on training scenes, as numbers and a picture.

Latent models are probed in their latent space; their guesses are decoded, so the MSE is in pixels either way.

For a scene x0 noised to x_t, the model's output is turned into its x0 guess with the pipeline scheduler's own
``prediction_type`` (epsilon: (x_t - sqrt(1-a) eps) / sqrt(a); v: sqrt(a) x_t - sqrt(1-a) v). A teacher that will
sample well has small x0 errors at high noise too, with and without its caption.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slimdit.worlds.shapes.autoencoder import images_to_tensor
from slimdit.worlds.shapes.pixel_vae import PixelSpaceVAE
from slimdit.worlds.shapes.prompts import TrainingSet
from slimdit.worlds.shapes.teacher import _encode, build_noise_scheduler

TIMESTEPS = (100, 300, 500, 700, 900)


def x0_guess(pred: torch.Tensor, xt: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return (xt - (1 - a).sqrt() * pred) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * xt - (1 - a).sqrt() * pred
    raise ValueError(f"cannot probe prediction_type {prediction_type!r}")


@torch.no_grad()
def probe_denoiser(model: str, n: int = 32, timesteps: tuple[int, ...] = TIMESTEPS, seed: int = 123,
                   out_png: str | Path | None = None) -> dict:
    """x0 MSE per timestep, with and without captions, on ``n`` training scenes; optionally a grid (rows: the
    scenes, then the captioned x0 guesses per timestep) of the first 8 scenes."""
    from PIL import Image

    from slimdit.pipelines.loading import load_pipeline

    pipe = load_pipeline(model, "cpu")
    pred_type = pipe.scheduler.config.prediction_type
    caps, imgs = TrainingSet(seed).batch(0, n)
    pixels = images_to_tensor(imgs)
    vae, latent = pipe.vae, not isinstance(pipe.vae, PixelSpaceVAE)
    x0 = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor if latent else pixels

    def to_pixels(z: torch.Tensor) -> torch.Tensor:
        return (vae.decode(z / vae.config.scaling_factor).sample if latent else z).clamp(-1, 1)

    alphas = build_noise_scheduler().alphas_cumprod
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    cond = _encode(pipe.tokenizer, pipe.text_encoder, caps)
    uncond = _encode(pipe.tokenizer, pipe.text_encoder, [""] * n)
    rows, result = [pixels[:8]], {"model": model, "prediction_type": pred_type, "n": n, "x0_mse": {}}
    for t in timesteps:
        tt = torch.full((n,), t)
        a = alphas[tt].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        mse = {}
        for name, (emb, mask) in (("cond", cond), ("uncond", uncond)):
            out = pipe.transformer(xt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=tt,
                                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            guess = to_pixels(x0_guess(out[:, : x0.shape[1]], xt, a, pred_type))
            mse[name] = float(((guess - pixels) ** 2).mean())
            if name == "cond":
                rows.append(guess[:8])
        result["x0_mse"][str(t)] = mse
    if out_png is not None:
        grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
        img = ((grid.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img)).resize((img.shape[1] * 4, img.shape[0] * 4),
                                                          Image.NEAREST).save(out_png)
    return result
