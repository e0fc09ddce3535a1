"""``slimdit search``: which k units to modify, by greedy selection and by Optuna TPE (thesis section 4.2.2), or
which to remove by TinyFusion's learnable N:M masks (``--method masks``, eq. 4.5).

The cost of a choice is the calibration CMMD of the teacher with those units modified (removed, or SVD at one
ratio), against the teacher's own images of the same prompts and seeds, computed once. Modifications are applied
in place and undone after each score; the model is never copied (the masks train a copy). Writes ``search.json``,
one plan file per method (``plan-greedy.yaml``, ``plan-optuna.yaml``, ``plan-masks.yaml``) that
``slimdit compress`` and ``slimdit distill`` take as they are, so each answer can be retrained (thesis fig. 5.8),
and, when greedy and Optuna both ran, ``search.png``: every Optuna trial's CMMD beside the greedy answer (thesis
figs. 5.7-5.9).
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from slimdit.io import ensure_writable, write_json
from slimdit.search.masks import MaskConfig

METHODS = ("greedy", "optuna", "both", "masks")


def parse_pattern(spec: str) -> tuple[int, int]:
    """``"N:M"``: keep N of every M consecutive units."""
    try:
        n, m = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--pattern must be N:M (keep N of every M units), got {spec!r}") from None
    if not 1 <= n < m:
        raise ValueError(f"--pattern N:M needs 1 <= N < M, got {spec!r}")
    return n, m


def run_search(model: str, out: str | Path, k: int | None, method: str = "both", op: str | float = "remove",
               prompts: str = "shapes-train:32:7", trials: int = 60, steps: int | None = None,
               embedder: str = "shapes", seed: int = 0, pattern: str = "1:2", data: str = "shapes-train:2048",
               mask_steps: int = 200) -> dict:
    """Greedy and/or Optuna choose ``k`` units; ``masks`` learns an N:M keep ``pattern`` on ``data`` instead
    (TinyFusion), its answer scored by the same calibration CMMD."""
    from slimdit.compress.plan import Plan
    from slimdit.data.synth import read_prompts
    from slimdit.importance.metric import Calibration, plan_metrics, unit_op
    from slimdit.metrics.embedders import get_embedder
    from slimdit.models import adapter_for
    from slimdit.pipelines.loading import load_pipeline, pipeline_sampler, resolve_model_dir
    from slimdit.search.greedy import greedy
    from slimdit.search.optuna_search import optuna_search

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    if method == "masks":
        keep, group = parse_pattern(pattern)
        if op != "remove":
            raise ValueError("--method masks learns which units to remove; it takes --op remove")
        if mask_steps < 1:
            raise ValueError(f"--mask-steps must be at least 1, got {mask_steps}")
    elif k is None:
        raise ValueError(f"--method {method} needs --units K")
    resolve_model_dir(model)  # a wrong model is named before anything is written
    ensure_writable(out, "search --out")
    texts = read_prompts(prompts)
    emb = get_embedder(embedder)
    sampler = pipeline_sampler(load_pipeline(model), model, steps=steps)  # a transformer's
    net = sampler.pipe.transformer
    adapter = adapter_for(net, sampler.pipe.scheduler.config)
    units = adapter.units(net)
    if method == "masks":
        n_groups = len(units) // group
        if n_groups == 0:
            raise ValueError(f"--pattern {pattern}: groups of {group} need at least {group} units, the model has "
                             f"{len(units)}")
        if k is not None and k != n_groups * (group - keep):
            raise ValueError(f"--pattern {pattern} on {len(units)} units removes {n_groups * (group - keep)}, "
                             f"not --units {k}")
        k = n_groups * (group - keep)
    elif not 1 <= k <= len(units):
        raise ValueError(f"--units must be between 1 and {len(units)} (the model's units), got {k}")
    calib = Calibration.build(sampler, emb, texts, [seed + i for i in range(len(texts))])
    n_greedy = sum(len(units) - i for i in range(k)) + 1 if method in ("greedy", "both") else 0
    bar = tqdm(total=n_greedy + (trials if method in ("optuna", "both") else 0) + (method == "masks"),
               desc="search", unit="plan", dynamic_ncols=True)

    def score(chosen: list[str]) -> float:
        bar.update(1)
        return plan_metrics(adapter, sampler, emb, calib, Plan([unit_op(u, op) for u in chosen]))["cmmd"]

    result: dict = {"model": model, "op": op, "k": k, "units": units, "n_prompts": len(texts)}
    if method in ("greedy", "both"):
        t0 = time.time()
        chosen, history = greedy(score, units, k)
        result["greedy"] = {"units": chosen, "cmmd": score(chosen), "history": history,
                            "evaluations": sum(len(h["scores"]) for h in history),
                            "seconds": round(time.time() - t0, 1)}
    if method in ("optuna", "both"):
        t0 = time.time()
        prior = result["greedy"]["units"] if "greedy" in result else None
        best, value, all_trials = optuna_search(score, units, k, n_trials=trials, prior=prior, seed=seed)
        result["optuna"] = {"units": best, "cmmd": value, "trials": all_trials, "greedy_enqueued": prior is not None,
                            "seconds": round(time.time() - t0, 1)}
    d = Path(out)
    if method == "masks":
        t0 = time.time()
        plan, info = _learn_masks(sampler, adapter, model, data, d / "cache",
                                  MaskConfig(group_size=group, keep=keep, steps=mask_steps, seed=seed))
        chosen = [o.unit for o in plan.ops]
        result["masks"] = {"units": chosen, "cmmd": score(chosen), "pattern": pattern, "data": data, **info,
                           "seconds": round(time.time() - t0, 1)}
    bar.close()
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "search.json", result)
    for name in ("greedy", "optuna", "masks"):
        if name in result:
            plan = Plan([unit_op(u, op) for u in result[name]["units"]])
            (d / f"plan-{name}.yaml").write_text(
                f"# slimdit search: the {name} answer, {k} units, calibration CMMD {result[name]['cmmd']:.4f}\n"
                + yaml.safe_dump(plan.to_dict(), sort_keys=False))
    if "greedy" in result and "optuna" in result:
        _plot(result, d / "search.png")
    return result


def _learn_masks(sampler, adapter, model: str, data: str, cache: Path, cfg: MaskConfig):
    """TinyFusion's learnable N:M masks with LoRA recovery, trained on ``data`` against the model itself."""
    from slimdit.data.cache import cached_conditioning
    from slimdit.data.datasets import load_dataset
    from slimdit.pipelines.loading import sampling_defaults
    from slimdit.search.masks import learn_masks

    pipe = sampler.pipe
    max_len = sampling_defaults(model)["max_sequence_length"]
    cond = cached_conditioning(pipe, model, load_dataset(data), cache, max_len)
    return learn_masks(adapter, pipe.transformer, cond, cfg)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [t["value"] for t in result["optuna"]["trials"] if t["value"] is not None]
    best = [min(values[:i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(range(len(values)), values, s=10, color="#888", label="Optuna trial")
    ax.plot(best, color="C0", label="Optuna best so far")
    ax.axhline(result["greedy"]["cmmd"], color="C3", ls="--", label="greedy")
    ax.set_xlabel("trial (the first is the greedy answer)")
    ax.set_ylabel("calibration CMMD")
    ax.set_title(f"which {result['k']} units to {'remove' if result['op'] == 'remove' else 'compress'}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
