"""CLIP score (Hessel et al., 2021): 100 * cosine(image, text), clamped at 0, averaged."""

from __future__ import annotations

import torch


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"need one text per image, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    cos = torch.nn.functional.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
    return float((100 * cos).clamp_min(0).mean())
