"""``slimdit analyze``: score every unit by the chosen criteria and draw the thesis' plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from slimdit.compress.plan import Plan, applied
from slimdit.importance.cka import CKARecorder
from slimdit.importance.magnitude import magnitude
from slimdit.importance.metric import Calibration, metric_importance, unit_op
from slimdit.io import ensure_writable, write_json
from slimdit.metrics.embedders import get_embedder
from slimdit.models import adapter_for
from slimdit.pipelines.loading import load_pipeline, pipeline_sampler, resolve_model_dir
from slimdit.reports.grids import make_grid
from slimdit.reports.plots import plot_all

CRITERIA = ("magnitude", "cka", "io_mse", "metric")


def analyze(model: str, criteria: list[str], out: str | Path, prompts: list[str], op: str | float = "remove",
            steps: int | None = None, embedder: str = "shapes", seed: int = 0) -> dict:
    """Write ``scores.json``, ``plots/*.png`` and ``sensitivity.png`` (one image per modified unit) to ``out``."""
    bad = [c for c in criteria if c not in CRITERIA]
    if bad or not criteria:
        raise ValueError(f"unknown criteria {bad}; allowed: {', '.join(CRITERIA)}")
    resolve_model_dir(model)  # a wrong model is named before anything is written
    ensure_writable(out, "analyze --out")
    emb = get_embedder(embedder) if "metric" in criteria else None
    sampler = pipeline_sampler(load_pipeline(model), model, steps=steps)  # a transformer's
    net = sampler.pipe.transformer
    adapter = adapter_for(net, sampler.pipe.scheduler.config)
    units = adapter.units(net)
    seeds = [seed + i for i in range(len(prompts))]
    scores: dict = {"model": model, "units": units, "op": op, "n_prompts": len(prompts)}
    if "magnitude" in criteria:
        scores["magnitude"] = magnitude(adapter, net)
    if "cka" in criteria or "io_mse" in criteria:  # one sampling pass records both
        rec = CKARecorder(adapter, net)
        with torch.no_grad(), rec.recording():
            bs = sampler.options.batch_size
            for i in range(0, len(prompts), bs):
                rec.new_sample()
                sampler.generate(prompts[i:i + bs], seeds[i:i + bs], progress=False)
        if "io_mse" in criteria:
            scores["io_mse"] = rec.io_mse()
    if "cka" in criteria:
        names, heat = rec.heatmap()
        scores["cka"] = {"importance": rec.importance(), "heatmap": heat.tolist(), "feature_rms": rec.feature_rms()}
        for stream in adapter.streams[1:]:  # Flux: the text stream's transformation, step by step, beside it
            scores["cka"][stream] = {"importance": rec.importance(stream), "heatmap": rec.heatmap(stream)[1].tolist(),
                                     "feature_rms": rec.feature_rms(stream)}
    if "metric" in criteria:
        calib = Calibration.build(sampler, emb, prompts, seeds)
        scores["metric"] = metric_importance(adapter, sampler, emb, calib, op=op)
    if "metric" in criteria and len(units) > 2:
        scores["agreement"] = agreement(scores)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "scores.json", scores)
    plot_all(d)
    _sensitivity_grid(adapter, sampler, units, prompts[0], seed, op, d / "sensitivity.png")
    return scores


def agreement(scores: dict) -> dict[str, dict[str, float]]:
    """Spearman rank correlation of each cheap criterion with the metric-based importance (thesis figs. 5.2-5.5):
    +1 when a criterion orders the units exactly as the CMMD (or CLIP-score loss) of modifying them does."""
    from scipy.stats import spearmanr

    units = scores["units"]
    metric = scores["metric"]
    targets = {"cmmd": [metric[u]["cmmd"] for u in units],
               "clip_drop": [-metric[u]["clip_score"] for u in units],  # a larger drop = more important
               "rank_sum": [metric[u]["rank"] for u in units]}  # eq. 4.4: the lowest rank sum is removed first
    crit = {}
    if "magnitude" in scores:
        crit["magnitude"] = [scores["magnitude"][u] for u in units]
    if "cka" in scores:
        crit["cka"] = [scores["cka"]["importance"][u] for u in units]
    if "io_mse" in scores:
        crit["io_mse"] = [scores["io_mse"][u] for u in units]
    return {c: {t: float(spearmanr(x, y).statistic) for t, y in targets.items()} for c, x in crit.items()}


def _sensitivity_grid(adapter, sampler, units, prompt, seed, op, path: Path) -> None:
    """The unmodified image, then one image per modified unit, same prompt and seed (thesis figs. 5.1/5.6)."""
    imgs = [sampler.generate([prompt], [seed], progress=False)]
    for u in units:
        with applied(adapter, sampler.pipe.transformer, Plan([unit_op(u, op)])):
            imgs.append(sampler.generate([prompt], [seed], progress=False))
    make_grid(np.concatenate(imgs), ncol=min(len(imgs), 13), scale=4).save(path)
    (path.with_suffix(".txt")).write_text("\n".join(["unmodified", *units]) + f"\nprompt: {prompt}\n")
