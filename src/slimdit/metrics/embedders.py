"""Embedders for the metrics: ``clip`` (transformers CLIP) and those the worlds register (``shapes``).

An embedder has ``name``, ``embed_images(uint8 (N, H, W, 3)) -> (N, D)`` and ``embed_texts(list[str]) -> (N, D)``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from slimdit.registry import EMBEDDERS

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"  # the CMMD reference model


class Embedder(Protocol):
    name: str

    def embed_images(self, images: np.ndarray) -> torch.Tensor: ...

    def embed_texts(self, texts: list[str]) -> torch.Tensor: ...


class ClipEmbedder:
    """CLIP image and text projections, with CMMD's preprocessing (google-research/cmmd ``io_util`` and
    ``embedding``): centre crop to the largest square and PIL bicubic resize to the model's input size (336 for
    ViT-L/14@336), then [0, 1] and CLIP mean/std."""

    name = "clip"

    def __init__(self, model_id: str = DEFAULT_CLIP, device: str | None = None, batch_size: int = 64):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(model_id).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model_id)
            proc = AutoImageProcessor.from_pretrained(model_id)
        except OSError as e:
            raise FileNotFoundError(f"could not load CLIP from {model_id!r} (a hub id with cached weights, or a "
                                    f"local directory holding a CLIP model, tokenizer and image processor): {e}") from e
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.size = int(self.model.config.vision_config.image_size)
        self.mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
        self.batch_size = batch_size

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        x = np.stack([center_crop_resize(im, (self.size, self.size)) for im in images])  # (N, S, S, 3) uint8
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, S, S) in [0, 1]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            px = self.preprocess(images[i:i + self.batch_size]).to(self.device)
            out.append(_features(self.model.get_image_features(pixel_values=px)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.model.config.text_config.max_position_embeddings,
                                 return_tensors="pt").to(self.device)
            out.append(_features(self.model.get_text_features(**tok)).float().cpu())
        return torch.cat(out)


def center_crop_resize(image: np.ndarray | Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Crop the largest centred box of ``size``'s (height, width) aspect and resize it to ``size`` with PIL bicubic,
    which antialiases when it shrinks; for a square size this is google-research/cmmd's ``_center_crop_and_resize``
    (box offsets ``(w - l) // 2``, ``(h - l) // 2``). Returns (H, W, 3) uint8."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    im = im.convert("RGB")
    th, tw = size
    w, h = im.size
    bw, bh = min(w, round(h * tw / th)), min(h, round(w * th / tw))
    left, top = (w - bw) // 2, (h - bh) // 2
    return np.asarray(im.crop((left, top, left + bw, top + bh)).resize((tw, th), Image.BICUBIC))


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooled projection is the features; older versions a tensor
    return out if torch.is_tensor(out) else out.pooler_output


@lru_cache(maxsize=4)
def get_embedder(spec: str) -> Embedder:
    """A registered embedder (``shapes``), ``clip`` (the CMMD CLIP) or ``clip:<hub id or directory>``.

    One instance per spec in a process (embedders are frozen once built): a run that evaluates several models
    loads each embedder once, and the benchmark's reference embeddings, cached per embedder, are computed once. The
    instance (a CLIP on the GPU, say) stays for the process; ``get_embedder.cache_clear()`` lets it go, and is
    needed to see a ``clip:<directory>`` rewritten within the process."""
    name, _, arg = spec.partition(":")
    if name == "clip":
        return ClipEmbedder(arg or DEFAULT_CLIP)
    if name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {spec!r}; allowed: {', '.join([*EMBEDDERS, 'clip'])} (or clip:<model>)")
    if arg:
        raise ValueError(f"embedder {name!r} takes no argument, got {spec!r}")
    return EMBEDDERS[name]()
