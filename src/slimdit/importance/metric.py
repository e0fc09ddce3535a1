"""Metric-based importance (eq. 4.4 of the thesis): modify each unit alone, generate the calibration set,
measure CMMD against the unmodified model's images and CLIP score against the prompts; rank each metric and
sum the ranks. The lowest rank sum is the first candidate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimdit.compress.plan import Plan, UnitOp, applied
from slimdit.metrics.clip_score import clip_score
from slimdit.metrics.cmmd import cmmd
from slimdit.metrics.embedders import Embedder
from slimdit.models.base import Adapter
from slimdit.pipelines.sampling import PipelineSampler


@dataclass
class Calibration:
    """Prompts, seeds and the unmodified model's embeddings, computed once and reused by every score."""

    prompts: list[str]
    seeds: list[int]
    reference: torch.Tensor  # image embeddings of the unmodified model
    texts: torch.Tensor  # text embeddings of the prompts

    @classmethod
    def build(cls, sampler: PipelineSampler, embedder: Embedder, prompts: list[str], seeds: list[int]
              ) -> Calibration:
        imgs = sampler.generate(prompts, seeds, progress=False)
        return cls(list(prompts), list(seeds), embedder.embed_images(imgs), embedder.embed_texts(prompts))


def unit_op(unit: str, op: str | float) -> UnitOp:
    """``"remove"`` or an SVD ratio c applied to every part."""
    return UnitOp(unit, "remove") if op == "remove" else UnitOp(unit, "svd", {"*": float(op)})


def plan_metrics(adapter: Adapter, sampler: PipelineSampler, embedder: Embedder, calib: Calibration,
                 plan: Plan) -> dict[str, float]:
    """CMMD and CLIP score of the model with ``plan`` applied (temporarily)."""
    with applied(adapter, sampler.pipe.transformer, plan):
        imgs = sampler.generate(calib.prompts, calib.seeds, progress=False)
    emb = embedder.embed_images(imgs)
    return {"cmmd": cmmd(emb, calib.reference), "clip_score": clip_score(emb, calib.texts)}


def _ranks(values: dict[str, float], reverse: bool) -> dict[str, int]:
    order = sorted(values, key=values.get, reverse=reverse)
    return {u: i + 1 for i, u in enumerate(order)}


def metric_importance(adapter: Adapter, sampler: PipelineSampler, embedder: Embedder, calib: Calibration,
                      op: str | float = "remove", units: list[str] | None = None, progress: bool = True
                      ) -> dict[str, dict[str, float]]:
    """Per unit: ``cmmd``, ``clip_score``, their ranks and ``rank`` = r_CMMD + r_CLIP (eq. 4.4)."""
    from tqdm.auto import tqdm

    model = sampler.pipe.transformer
    units = units or adapter.units(model)
    m = {u: plan_metrics(adapter, sampler, embedder, calib, Plan([unit_op(u, op)]))
         for u in tqdm(units, desc="metric importance", unit="unit", disable=not progress, dynamic_ncols=True)}
    r_cmmd = _ranks({u: v["cmmd"] for u, v in m.items()}, reverse=False)  # small CMMD: unit matters little
    r_clip = _ranks({u: v["clip_score"] for u, v in m.items()}, reverse=True)  # high CLIP: unit matters little
    return {u: {**m[u], "rank_cmmd": r_cmmd[u], "rank_clip": r_clip[u], "rank": r_cmmd[u] + r_clip[u]}
            for u in units}
