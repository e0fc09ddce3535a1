"""Selection on a known cost, and metric importance on a tiny real pipeline."""

from __future__ import annotations

import pytest

from slimdit.search.greedy import greedy
from slimdit.search.optuna_search import optuna_search

UNITS = [f"block.{i}" for i in range(8)]
COST = {u: c for u, c in zip(UNITS, [5, 1, 4, 2, 8, 3, 7, 6])}


def cost(chosen: list[str]) -> float:
    # additive, plus a synergy greedy cannot see: blocks 4 and 6 are costly alone and cheap together
    bonus = -20 if {"block.4", "block.6"} <= set(chosen) else 0
    return sum(COST[u] for u in chosen) + bonus


def test_greedy_takes_the_cheapest_unit_each_round():
    chosen, history = greedy(cost, UNITS, 2)
    assert chosen == ["block.1", "block.3"] and len(history) == 2
    assert history[0]["scores"]["block.1"] == 1


def test_optuna_starts_from_the_greedy_prior_and_improves_on_it():
    prior, _ = greedy(cost, UNITS, 2)
    best, value, trials = optuna_search(cost, UNITS, 2, n_trials=60, prior=prior, seed=0)
    assert trials[0]["units"] == prior and trials[0]["value"] == cost(prior) == 3
    assert value <= 3 and value == cost(best)
    assert best == ["block.4", "block.6"]  # the optimum (-5), out of greedy's reach


def test_bad_k_is_named():
    with pytest.raises(ValueError, match="k must be between 1 and 8"):
        greedy(cost, UNITS, 9)


def test_metric_importance_on_a_tiny_pipeline(tmp_path):
    import torch

    from slimdit.importance.metric import Calibration, metric_importance
    from slimdit.pipelines.loading import load_sampler
    from slimdit.worlds.shapes.embedder import ShapesEmbedder
    from slimdit.worlds.shapes.teacher import TeacherConfig, export_teacher, train_teacher
    from tests.test_teacher import TINY

    run = train_teacher(tmp_path / "t", TeacherConfig(steps=1, **{**TINY, "num_layers": 3}))
    sampler = load_sampler(str(export_teacher(run, tmp_path / "p")), steps=2)
    torch.manual_seed(0)
    emb = ShapesEmbedder()
    prompts = ["a red circle", "two squares", "a big triangle", "a circle above a square"]
    calib = Calibration.build(sampler, emb, prompts, [0, 1, 2, 3])
    before = [p.clone() for p in sampler.pipe.transformer.parameters()]
    scores = metric_importance(sampler_adapter(sampler), sampler, emb, calib, op="remove", progress=False)
    assert set(scores) == {"block.0", "block.1", "block.2"}
    assert sorted(s["rank_cmmd"] for s in scores.values()) == [1, 2, 3]
    assert all(s["cmmd"] >= 0 for s in scores.values())
    assert all(torch.equal(a, b) for a, b in zip(before, sampler.pipe.transformer.parameters()))
    svd = metric_importance(sampler_adapter(sampler), sampler, emb, calib, op=0.5, units=["block.1"], progress=False)
    assert svd["block.1"]["rank"] == 2


def sampler_adapter(sampler):
    from slimdit.models import adapter_for

    return adapter_for(sampler.pipe.transformer)


def test_analyze_writes_scores_and_plots(tmp_path):
    import json

    from slimdit.cli import main
    from slimdit.worlds.shapes.teacher import TeacherConfig, export_teacher, train_teacher
    from tests.test_teacher import TINY

    run = train_teacher(tmp_path / "t", TeacherConfig(steps=1, **{**TINY, "num_layers": 3}))
    model = export_teacher(run, tmp_path / "p")
    out = tmp_path / "analysis"
    assert main(["analyze", "--model", str(model), "--criteria", "magnitude,cka", "--out", str(out),
                 "--prompts", "shapes-train:4", "--steps", "3"]) == 0
    s = json.loads((out / "scores.json").read_text())
    assert len(s["cka"]["heatmap"]) == 3 and len(s["cka"]["heatmap"][0]) == 3  # units x sampling steps
    for f in ("plots/criteria.png", "plots/cka_heatmap.png", "plots/feature_rms.png", "sensitivity.png"):
        assert (out / f).stat().st_size > 0, f
    assert main(["analyze", "--model", str(model), "--criteria", "fisher", "--out", str(out)]) == 2


def test_learned_masks_drop_the_units_that_do_nothing():
    import torch

    from slimdit.distill.trainer import Conditioning
    from slimdit.models import adapter_for
    from slimdit.search.masks import MaskConfig, learn_masks
    from tests.test_compress import tiny
    from tests.test_trainer import SCHED

    m = tiny(num_layers=4)
    with torch.no_grad():  # blocks 1 and 2 become the identity: removing them costs nothing
        for i in (1, 2):
            b = m.transformer_blocks[i]
            for lin in (b.attn1.to_out[0], b.attn2.to_out[0], b.ff.net[2]):
                lin.weight.zero_()
                lin.bias.zero_()
    g = torch.Generator().manual_seed(0)
    data = Conditioning(torch.randn(32, 4, 8, 8, generator=g),
                        {"prompt_embeds": torch.randn(32, 5, 12, generator=g), "prompt_mask": torch.ones(32, 5)},
                        {"prompt_embeds": torch.zeros(1, 5, 12), "prompt_mask": torch.ones(1, 5)})
    plan, info = learn_masks(adapter_for(m, SCHED), m, data, MaskConfig(steps=60, kd="output"))
    assert sorted(o.unit for o in plan.ops) == ["block.1", "block.2"]
    assert info["groups"] == [["block.0", "block.1"], ["block.2", "block.3"]]
