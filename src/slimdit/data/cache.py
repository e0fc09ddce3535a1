"""Cache text-encoder outputs and VAE latents once per dataset; every phase and stage reuses them.

An entry is a folder of safetensors shards of ``SHARD`` samples each (``latents`` and ``cond.*``), plus the empty
caption's conditioning (``null.safetensors``) and ``meta.json``, written last. Training reads the rows it draws
from the memory-mapped shards (:class:`Rows`), so a cache larger than host memory (a 100k-caption Flux cache is
about 0.8 TB in fp32) trains as a small one does. Shards are written one at a time, atomically, so an interrupted
caching resumes at the first missing shard.
"""

from __future__ import annotations

import bisect
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


def decode_images(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [-1, 1] of clean latents, differentiable (the VAE's decode, clamped)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
    return vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """uint8 images ``(N, H, W, 3)`` of clean latents: the inverse of :func:`encode_images`, rounded as samplers
    round."""
    out = []
    for i in range(0, len(latents), batch_size):
        x = decode_images(pipe, latents[i:i + batch_size])
        # diffusers' postprocess ((x + 1) / 2 in [0, 1]), then the samplers' rounding to uint8
        img = ((x + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        out.append(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def _key(model_id: str, data: CaptionImages, max_sequence_length: int, dtype: str) -> str:
    """The cache entry of ``data`` under ``model_id``'s current files (a model retrained under the same name gets a
    new entry), encoded in ``dtype`` (the frozen parts')."""
    from slimdit.pipelines.loading import model_fingerprint

    h = hashlib.sha256(b"conditioning v3")  # v3: shards of SHARD samples, read lazily
    h.update(json.dumps([model_id, model_fingerprint(model_id), data.source, max_sequence_length,
                         data.images.shape, SHARD, dtype]).encode())
    h.update("\n".join(data.captions).encode())
    h.update(data.images.tobytes())
    return h.hexdigest()[:16]


SHARD = 4096  # samples per shard file


class Rows:
    """The rows of one cached tensor across shard files, read on demand: ``rows[idx]`` (a 1-D index tensor)
    returns those rows, stacked; ``rows.shape`` is the whole tensor's."""

    def __init__(self, files: list[Path], key: str, counts: list[int]):
        from safetensors import safe_open

        self.files, self.key = files, key
        self.starts = [sum(counts[:i]) for i in range(len(counts))]
        self._open = lambda f: safe_open(str(f), framework="pt")
        self._handles: dict[int, object] = {}
        row = self._slice(0).get_shape()[1:]
        self.shape = torch.Size([sum(counts), *row])

    def _slice(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = self._open(self.files[shard])
        return self._handles[shard].get_slice(self.key)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: torch.Tensor | slice | int) -> torch.Tensor:
        if isinstance(idx, int):
            return self[torch.tensor([idx])][0]
        if isinstance(idx, slice):
            idx = torch.arange(len(self))[idx]
        rows = []
        for i in torch.as_tensor(idx).reshape(-1).tolist():  # CPU indices: no device sync
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} of {len(self)}")
            i %= len(self)
            s = bisect.bisect_right(self.starts, i) - 1
            j = i - self.starts[s]
            rows.append(self._slice(s)[j:j + 1])
        return torch.cat(rows)

    def load(self) -> torch.Tensor:
        """All rows, in memory."""
        return torch.cat([self._slice(s)[:] for s in range(len(self.files))])

    def __getstate__(self):  # handles are reopened where the rows are used
        return {**self.__dict__, "_handles": {}, "_open": None}

    def __setstate__(self, state):
        from safetensors import safe_open

        self.__dict__.update(state)
        self._open = lambda f: safe_open(str(f), framework="pt")


def cached_conditioning(pipe, model_id: str, data: CaptionImages, cache_dir: str | Path,
                        max_sequence_length: int) -> Conditioning:
    """The conditioning of ``data``, read lazily from its cache entry under ``cache_dir``, which is computed and
    written first when missing (shard by shard; finished shards of an interrupted attempt are kept).

    Training always reads what is on disk, fresh entry or not, so that a run and its resumption train on the very
    same tensors (freshly encoded latents may be ``channels_last``, reloaded ones are contiguous, and convolutions
    round the two differently)."""
    dtype = str(next(pipe.transformer.parameters()).dtype)  # the frozen parts' (bf16 encodes differently)
    d = Path(cache_dir) / _key(model_id, data, max_sequence_length, dtype)
    n = len(data.captions)
    starts = list(range(0, n, SHARD))
    files = [d / f"shard_{i:05d}.safetensors" for i in range(len(starts))]
    if not (d / "meta.json").exists():
        for f, a in tqdm(list(zip(files, starts)), desc="caching conditioning", unit="shard", dynamic_ncols=True,
                         disable=len(files) <= 1):
            if f.exists():
                continue
            cond = encode_captions(pipe, data.captions[a:a + SHARD], max_sequence_length)
            latents = encode_images(pipe, data.images[a:a + SHARD])
            save_tensors(f, {"latents": latents, **{f"cond.{k}": v for k, v in cond.items()}})
        null = encode_captions(pipe, [""], max_sequence_length)
        save_tensors(d / "null.safetensors", null)
        write_json(d / "meta.json", {"model": model_id, "source": data.source, "n": n, "shards": len(files),
                                     "shard_size": SHARD, "max_sequence_length": max_sequence_length})
    counts = [min(SHARD, n - a) for a in starts]
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        keys = list(f.keys())
    return Conditioning(Rows(files, "latents", counts),
                        {k[5:]: Rows(files, k, counts) for k in keys if k.startswith("cond.")},
                        load_tensors(d / "null.safetensors"))


def in_memory(c: Conditioning) -> Conditioning:
    """``c`` with every row read into memory (for a cache that will not outlive its use)."""
    def load(v):
        return v.load() if isinstance(v, Rows) else v

    return Conditioning(load(c.latents), {k: load(v) for k, v in c.cond.items()}, c.null)
