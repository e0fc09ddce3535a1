"""Importance scorers against their equations."""

from __future__ import annotations

import pytest
import torch

from slimdit.importance.cka import CKARecorder, linear_cka
from slimdit.importance.magnitude import magnitude
from slimdit.models import adapter_for
from tests.test_compress import inputs, tiny


def _cka_by_definition(x: torch.Tensor, y: torch.Tensor) -> float:
    n = x.shape[0]
    H = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    K, L = x.double() @ x.double().T, y.double() @ y.double().T

    def hsic(a, b):
        return torch.trace(a @ H @ b @ H) / (n - 1) ** 2

    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


def test_linear_cka_matches_the_definition_and_its_invariances():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 6, generator=g), torch.randn(20, 9, generator=g)
    assert float(linear_cka(x, y)) == pytest.approx(_cka_by_definition(x, y), rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert float(linear_cka(x, 3 * x @ q + 1)) == pytest.approx(1.0, rel=1e-10)  # rotation, scale, shift


def test_magnitude_is_the_root_sum_of_squares_of_unit_weights():
    m = tiny()
    a = adapter_for(m)
    s = magnitude(a, m)
    block = m.transformer_blocks[2]
    assert s["block.2"] == pytest.approx(float(torch.sqrt(sum((p.double() ** 2).sum() for p in block.parameters()))),
                                         rel=1e-6)


def test_cka_recorder_fills_a_unit_by_step_heatmap():
    m = tiny()
    rec = CKARecorder(adapter_for(m), m)
    with torch.no_grad(), rec.recording():
        for passes in (1, 2):  # a sample without CFG, then one with two passes (cond, uncond) per step
            rec.new_sample()
            for step in range(3):
                for _ in range(passes):
                    m(**{**inputs(), "timestep": torch.tensor([900 - 300 * step] * 2)})
    units, h = rec.heatmap()
    assert units == ["block.0", "block.1", "block.2", "block.3"] and h.shape == (4, 3)  # steps, not calls
    assert rec.counts[("block.0", "image", 2)] == 2 * 3  # 2 images x (1 + 2 passes) at the last step
    assert torch.isfinite(h).all() and (h <= 1 + 1e-9).all()
    assert set(rec.importance()) == set(units)
    with torch.no_grad(), adapter_for(m).capture(m) as out_feats:  # input-output MSE of block.1 by hand
        m(**inputs())
    direct = (out_feats["block.1"]["image"] - out_feats["block.0"]["image"]).double().pow(2).mean()
    one = CKARecorder(adapter_for(m), m)
    with torch.no_grad(), one.recording():
        m(**inputs())
    rms = one.feature_rms()
    assert one.io_mse()["block.1"] == pytest.approx(float(direct), rel=1e-6)  # block.1's input is block.0's output
    with torch.no_grad(), adapter_for(m).capture(m) as feats:
        m(**inputs())
    assert rms["block.0"] == pytest.approx(float(feats["block.0"]["image"].double().pow(2).mean().sqrt()), rel=1e-6)


def test_search_greedy_then_optuna_from_greedy(tmp_path):
    import json

    from slimdit.cli import main

    out = tmp_path / "search"
    assert main(["search", "--model", "shapes-pixart", "--units", "2", "--prompts", "shapes-train:4:7",
                 "--steps", "2", "--trials", "4", "--out", str(out)]) == 0
    r = json.loads((out / "search.json").read_text())
    assert len(r["greedy"]["units"]) == 2 and r["greedy"]["evaluations"] == 12 + 11
    assert sorted(r["optuna"]["trials"][0]["units"]) == sorted(r["greedy"]["units"])  # greedy first
    assert r["optuna"]["cmmd"] <= r["greedy"]["cmmd"] + 1e-12 and (out / "search.png").exists()
    from slimdit.compress.plan import Plan

    for name in ("greedy", "optuna"):  # each answer is a plan file to retrain
        plan = Plan.load(out / f"plan-{name}.yaml")
        assert [o.unit for o in plan.ops] == r[name]["units"] and {o.op for o in plan.ops} == {"remove"}
    assert main(["search", "--model", "shapes-pixart", "--units", "2", "--op", "1.5", "--out", str(out)]) == 2


def test_search_by_learned_masks_writes_a_plan_of_the_pattern(tmp_path, capsys):
    import json

    from slimdit.cli import main
    from slimdit.compress.plan import Plan

    out = tmp_path / "masks"
    assert main(["search", "--model", "shapes-pixart", "--method", "masks", "--pattern", "2:3", "--mask-steps", "2",
                 "--data", "shapes-train:8", "--prompts", "shapes-train:4:7", "--steps", "2", "--out", str(out)]) == 0
    r = json.loads((out / "search.json").read_text())["masks"]
    assert len(r["groups"]) == 4 and len(r["units"]) == 4  # one of every 3 of 12 blocks removed
    assert all(sum(u in g for u in r["units"]) == 1 for g in r["groups"]) and r["cmmd"] >= 0
    assert [o.unit for o in Plan.load(out / "plan-masks.yaml").ops] == r["units"]
    for bad, why in ((["--pattern", "3:2"], "1 <= N < M"), (["--pattern", "1:2", "--units", "3"], "removes 6"),
                     (["--op", "0.5"], "takes --op remove")):
        assert main(["search", "--model", "shapes-pixart", "--method", "masks", *bad, "--out", str(out)]) == 2
        assert why in capsys.readouterr().err
    assert main(["search", "--model", "shapes-pixart", "--method", "greedy", "--out", str(out)]) == 2
    assert "needs --units" in capsys.readouterr().err


def test_agreement_is_the_rank_correlation_with_the_metric():
    from slimdit.importance.analyze import agreement

    units = ["block.0", "block.1", "block.2", "block.3"]
    cmmd = [0.4, 0.1, 0.2, 0.05]
    clip = [60.0, 70.0, 65.0, 72.0]  # agrees with cmmd: the big-CMMD unit also costs the most CLIP score
    rank = [8, 4, 6, 2]  # eq. 4.4 rank sums of that order
    scores = {"units": units,
              "metric": {u: {"cmmd": c, "clip_score": s, "rank": r} for u, c, s, r in zip(units, cmmd, clip, rank)},
              "magnitude": dict(zip(units, [9.0, 2.0, 5.0, 1.0])),  # same order as the metric
              "cka": {"importance": dict(zip(units, [0.01, 0.3, 0.2, 0.5]))}}  # the opposite order
    a = agreement(scores)
    assert a["magnitude"] == {"cmmd": 1.0, "clip_drop": 1.0, "rank_sum": 1.0}
    assert a["cka"] == {"cmmd": -1.0, "clip_drop": -1.0, "rank_sum": -1.0}
