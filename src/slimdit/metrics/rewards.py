"""Rewards for ``slimdit reward`` from the core's scorers: CLIP text-image similarity (the CMMD CLIP), ImageReward
and HPS v2.1 (the benchmark adapters' scoring models, with their weights as those adapters find them), and CLIP's
similarity again as a differentiable reward (direct reward fine-tuning). A reward is
``(captions, uint8 images (N, H, W, 3)) -> (N,) float32``, higher is better; a world registers its own (the shapes
world: its detector's verdict)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

Reward = Callable[[list[str], np.ndarray], np.ndarray]


def scorer_reward(scorer: Callable[[list, list[str]], Sequence[float]]) -> Reward:
    """A benchmark scorer (PIL images, their prompts) -> scores, as a reward on uint8 arrays."""

    def reward(captions: list[str], images: np.ndarray) -> np.ndarray:
        return np.asarray(scorer([Image.fromarray(im) for im in images], list(captions)), dtype=np.float32)

    return reward


def clip_reward(model_id: str | None = None) -> Reward:
    """Cosine similarity of CLIP's image and caption embeddings."""
    import torch

    from slimdit.metrics.embedders import DEFAULT_CLIP, ClipEmbedder

    emb = ClipEmbedder(model_id or DEFAULT_CLIP)

    def reward(captions: list[str], images: np.ndarray) -> np.ndarray:
        i = torch.nn.functional.normalize(emb.embed_images(images), dim=-1)
        t = torch.nn.functional.normalize(emb.embed_texts(list(captions)), dim=-1)
        return (i * t).sum(-1).numpy().astype(np.float32)

    return reward


def clip_differentiable_reward(model_id: str | None = None):
    """:func:`clip_reward` for direct reward fine-tuning: ``(captions, images (N, 3, H, W) in [-1, 1]) -> (N,)``
    with gradients into the images. The preprocessing is the embedder's (centre crop to a square, bicubic resize to
    CLIP's input size, CLIP mean/std) in torch; torch's antialiased bicubic stands in for PIL's."""
    import torch
    import torch.nn.functional as F

    from slimdit.metrics.embedders import DEFAULT_CLIP, ClipEmbedder, _features

    emb = ClipEmbedder(model_id or DEFAULT_CLIP)
    emb.model.requires_grad_(False)

    def reward(captions: list[str], images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = (images.float()[..., top:top + side, left:left + side] + 1) / 2
        x = F.interpolate(x, size=(emb.size, emb.size), mode="bicubic", antialias=True, align_corners=False)
        x = ((x - emb.mean.to(x.device)) / emb.std.to(x.device)).to(emb.device)
        i = F.normalize(_features(emb.model.get_image_features(pixel_values=x)).float(), dim=-1)
        t = F.normalize(emb.embed_texts(list(captions)).to(i.device), dim=-1)
        return (i * t).sum(-1).to(images.device)

    return reward


def imagereward_reward() -> Reward:
    from slimdit.metrics.external.imagereward import _image_reward, weights_root

    return scorer_reward(_image_reward(weights_root(), progress=False))


def hpsv2_reward() -> Reward:
    from slimdit.metrics.external.hpsv2 import _hps, checkpoint

    return scorer_reward(_hps(checkpoint(), progress=False))


def register() -> None:
    from slimdit import registry

    registry.REWARDS.update({"clip": clip_reward, "imagereward": imagereward_reward, "hpsv2": hpsv2_reward})
    registry.DIFFERENTIABLE_REWARDS["clip"] = clip_differentiable_reward
