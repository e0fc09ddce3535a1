"""``slimdit search``: which k units to modify, by greedy selection and by Optuna TPE (thesis section 4.2.2).

The cost of a choice is the calibration CMMD of the teacher with those units modified (removed, or SVD at one
ratio), against the teacher's own images of the same prompts and seeds, computed once. Modifications are applied
in place and undone after each score; the model is never copied. Writes ``search.json``, one plan file per method
(``plan-greedy.yaml``, ``plan-optuna.yaml``) that ``slimdit compress`` and ``slimdit distill`` take as they are,
so each answer can be retrained (thesis fig. 5.8), and, when both methods ran, ``search.png``: every Optuna
trial's CMMD beside the greedy answer (thesis figs. 5.7-5.9).
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from slimdit.io import write_json

METHODS = ("greedy", "optuna", "both")


def run_search(model: str, out: str | Path, k: int, method: str = "both", op: str | float = "remove",
               prompts: str = "shapes-train:32:7", trials: int = 60, steps: int | None = None,
               embedder: str = "shapes", seed: int = 0) -> dict:
    from slimdit.compress.plan import Plan
    from slimdit.data.synth import read_prompts
    from slimdit.importance.metric import Calibration, plan_metrics, unit_op
    from slimdit.metrics.embedders import get_embedder
    from slimdit.models import adapter_for
    from slimdit.pipelines.loading import load_sampler
    from slimdit.search.greedy import greedy
    from slimdit.search.optuna_search import optuna_search

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    texts = read_prompts(prompts)
    emb = get_embedder(embedder)
    sampler = load_sampler(model, steps=steps)
    net = sampler.pipe.transformer
    adapter = adapter_for(net, sampler.pipe.scheduler.config)
    units = adapter.units(net)
    if not 1 <= k <= len(units):
        raise ValueError(f"--units must be between 1 and {len(units)} (the model's units), got {k}")
    calib = Calibration.build(sampler, emb, texts, [seed + i for i in range(len(texts))])
    n_greedy = sum(len(units) - i for i in range(k)) + 1 if method in ("greedy", "both") else 0
    bar = tqdm(total=n_greedy + (trials if method in ("optuna", "both") else 0), desc="search", unit="plan",
               dynamic_ncols=True)

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
    bar.close()
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "search.json", result)
    for name in ("greedy", "optuna"):
        if name in result:
            plan = Plan([unit_op(u, op) for u in result[name]["units"]])
            (d / f"plan-{name}.yaml").write_text(
                f"# slimdit search: the {name} answer, {k} units, calibration CMMD {result[name]['cmmd']:.4f}\n"
                + yaml.safe_dump(plan.to_dict(), sort_keys=False))
    if "greedy" in result and "optuna" in result:
        _plot(result, d / "search.png")
    return result


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
