"""Cache text-encoder outputs and VAE latents once per dataset; every phase and stage reuses them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from slimdit.data.datasets import CaptionImages
from slimdit.distill.trainer import Conditioning
from slimdit.io import load_tensors, save_tensors, write_json


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_sequence_length: int, batch_size: int = 256
                    ) -> dict[str, torch.Tensor]:
    """The text conditioning of ``captions``, through the adapter of ``pipe``'s transformer (its own encoders)."""
    from slimdit.models import adapter_for

    adapter = adapter_for(pipe.transformer)
    parts = []
    for i in tqdm(range(0, len(captions), batch_size), desc="caching captions", unit="batch", dynamic_ncols=True,
                  disable=len(captions) <= batch_size):
        parts.append(adapter.encode_prompts(pipe, captions[i:i + batch_size], max_sequence_length))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def encode_images(pipe, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Clean latents ``(mean - shift) * scale`` of the pipeline's VAE (the identity for pixel-space models)."""
    vae = pipe.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="caching latents", unit="batch", dynamic_ncols=True,
                  disable=len(images) <= batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        x = x.to(vae.device, vae.dtype)
        enc = vae.encode(x)
        z = enc.latent_dist.mean if hasattr(enc, "latent_dist") else enc
        out.append(((z - shift) * scale).float().cpu())
    return torch.cat(out)


def _key(model_id: str, data: CaptionImages, max_sequence_length: int) -> str:
    """The cache entry of ``data`` under ``model_id``'s current files (a model retrained under the same name gets a
    new entry)."""
    from slimdit.pipelines.loading import model_fingerprint

    h = hashlib.sha256(b"conditioning v2")  # v2: the adapter's conditioning dict (cond.*, null.*)
    h.update(json.dumps([model_id, model_fingerprint(model_id), data.source, max_sequence_length,
                         data.images.shape]).encode())
    h.update("\n".join(data.captions).encode())
    h.update(data.images.tobytes())
    return h.hexdigest()[:16]


def cached_conditioning(pipe, model_id: str, data: CaptionImages, cache_dir: str | Path,
                        max_sequence_length: int) -> Conditioning:
    """Load the conditioning of ``data`` from ``cache_dir``, computing and saving it the first time.

    A fresh entry is read back from disk too, so that a run and its resumption train on the very same tensors
    (freshly encoded latents may be ``channels_last``, reloaded ones are contiguous, and convolutions round the
    two differently)."""
    d = Path(cache_dir) / _key(model_id, data, max_sequence_length)
    if not (d / "conditioning.safetensors").exists():
        cond = encode_captions(pipe, data.captions, max_sequence_length)
        null = encode_captions(pipe, [""], max_sequence_length)
        latents = encode_images(pipe, data.images)
        save_tensors(d / "conditioning.safetensors", {"latents": latents, **{f"cond.{k}": v for k, v in cond.items()},
                                                      **{f"null.{k}": v for k, v in null.items()}})
        write_json(d / "meta.json", {"model": model_id, "source": data.source, "n": len(data.captions),
                                     "max_sequence_length": max_sequence_length})
    t = load_tensors(d / "conditioning.safetensors")
    return Conditioning(t["latents"], {k[5:]: v for k, v in t.items() if k.startswith("cond.")},
                        {k[5:]: v for k, v in t.items() if k.startswith("null.")})
